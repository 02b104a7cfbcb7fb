//! PostgreSQL behind the service layer: the product repository, the unit of
//! work that commits the state, outbox rows and idempotency records of a
//! batch of messages in one transaction, and the migrations. The read model
//! `allocations_view` is a view over `allocations` and `batches`, so it is
//! current as soon as they are.
//!
//! A unit of work here spans several messages of one partition, so that the
//! cost of a commit (a WAL flush with `synchronous_commit` on) is shared.
//! The products the batch names are locked up front in SKU order
//! (`SELECT ... FOR UPDATE`), which makes the versions read current for the
//! whole transaction and makes concurrent batches queue rather than deadlock.
//! Writes are set-based: one statement per table, whatever the batch size.
//!
//! One job per file:
//!
//! - [`pool`]: connecting (session settings, the lazy pool, connections kept
//!   between transactions), the migrations, and what database errors mean
//!   to the service layer;
//! - [`repository`]: [`repository::PgProductRepository`], which locks, loads
//!   and tracks the products of a transaction;
//! - [`unit_of_work`]: [`unit_of_work::PgUnitOfWork`], one transaction for a
//!   batch of messages, and [`unit_of_work::PgStore`], which begins one per
//!   attempt for the batch processor;
//! - [`cache`]: the products and batch owners kept in memory between
//!   transactions, and the revisions that tell a current copy;
//! - `writes`: the set-based statements a commit runs.

pub mod cache;
pub mod pool;
pub mod repository;
pub mod unit_of_work;
mod writes;
