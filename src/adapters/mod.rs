//! Adapters: the outside world behind the service layer's traits. PostgreSQL
//! (repository, unit of work, outbox), Kafka (decoding, consumer, relay), and
//! what the HTTP server reports (health, metrics).

pub mod backoff;
pub mod consumer;
pub mod group_progress;
pub mod health;
pub mod inbound;
pub mod kafka;
pub mod metrics;
pub mod outbox;
pub mod postgres;
pub mod quarantine;
pub mod relay;
pub mod retention;
pub mod topic_reader;
pub mod topic_retention;
