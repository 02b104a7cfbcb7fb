//! The service layer: the message bus, the handlers it dispatches to, the
//! chunk processor that runs a partition's messages through them in one
//! transaction, and the unit-of-work traits they run in. It knows the domain
//! and nothing of PostgreSQL or Kafka; adapters implement its traits.

pub mod chunk;
pub mod handlers;
pub mod messagebus;
pub mod unit_of_work;

pub use handlers::HandlerError;
pub use messagebus::handle;
pub use unit_of_work::{
    ChunkUnitOfWork, DeadLetterReason, Idempotent, ProductRepository, ReadPosition,
    RepositoryError, Store, UnitOfWork,
};
