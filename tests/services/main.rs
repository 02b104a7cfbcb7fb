//! The tests that need PostgreSQL and the broker: the adapters against a
//! real database, and the real `allocation-worker` binary driven through
//! Kafka, under bad input, crashes, outages, several instances and the
//! operator's commands. `cargo test --test services`; one file with
//! `cargo test --test services end_to_end::`.
//!
//! The services are those of `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS`
//! (`source scripts/services.sh`, or `scripts/test.sh`), or containers of
//! each test's own when they are not set (testkit's `containers`).
//! Worker logs: `target/e2e-logs/<test>-w<n>.log` (named in every failure).
//! The tests that time outages, shutdowns and hand-overs run alone
//! (testkit's `alone`).

mod bad_input;
mod cli;
mod crash;
mod end_to_end;
mod faults;
mod http_surface;
mod operations;
mod postgres;
mod postgres_aggregate;
mod replay;
mod secrets_tls;
mod traces;
mod waiting;
