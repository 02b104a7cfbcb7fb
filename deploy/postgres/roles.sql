-- The two database roles of allocation-worker (deploy/README.md "Database
-- roles"): a migration role that owns the schema and runs
-- `allocation-worker migrate` (the init container, Secret
-- allocation-worker-migrator), and a runtime role with only what the
-- worker needs (`allocation-worker run` with SKIP_MIGRATIONS=true, Secret
-- allocation-worker-secrets): read and write the rows, use the sequences,
-- no CREATE on the schema, no ownership.
--
-- Run it as a superuser (or the database's owner with CREATEROLE),
-- connected to the worker's database; it is idempotent:
--
--   psql -v ON_ERROR_STOP=1 -d allocation -f deploy/postgres/roles.sql \
--        -v migrator_password="$MIGRATOR_PASSWORD" -v runtime_password="$RUNTIME_PASSWORD"
--
-- Variables (psql -v NAME=VALUE), all optional:
--   migrator            the migration role's name (allocation_migrator)
--   runtime             the runtime role's name (allocation_runtime)
--   migrator_password   its password; unset leaves the password as it is
--   runtime_password    the same for the runtime role
--
-- Run it before the first `migrate`, and once more after it: the second
-- run also takes away the runtime role's writes to _sqlx_migrations, the
-- table `migrate` creates (reading it is how /readyz checks the schema).
-- Tables, sequences and functions that later migrations create are granted
-- to the runtime role by the default privileges below.
\set ON_ERROR_STOP on
\if :{?migrator}
\else
\set migrator allocation_migrator
\endif
\if :{?runtime}
\else
\set runtime allocation_runtime
\endif

-- The roles: log in, nothing else.
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION', name)
  FROM (VALUES (:'migrator'), (:'runtime')) AS roles(name)
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name)
\gexec
\if :{?migrator_password}
ALTER ROLE :"migrator" PASSWORD :'migrator_password';
\endif
\if :{?runtime_password}
ALTER ROLE :"runtime" PASSWORD :'runtime_password';
\endif

-- Both connect to this database.
SELECT format('GRANT CONNECT ON DATABASE %I TO %I, %I', current_database(), :'migrator', :'runtime')
\gexec

-- The schema belongs to the migration role; nobody else creates in it.
ALTER SCHEMA public OWNER TO :"migrator";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE ALL ON SCHEMA public FROM :"runtime";
GRANT USAGE ON SCHEMA public TO :"runtime";

-- What exists already...
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"runtime";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"runtime";
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO :"runtime";

-- ...and what the migration role creates from now on.
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"runtime";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"runtime";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA public
    GRANT EXECUTE ON FUNCTIONS TO :"runtime";

-- sqlx's record of the applied migrations: the worker only reads it.
SELECT format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON %I.%I FROM %I', schemaname, tablename, :'runtime')
  FROM pg_tables
 WHERE schemaname = 'public' AND tablename = '_sqlx_migrations'
\gexec
