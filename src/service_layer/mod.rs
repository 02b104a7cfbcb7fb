//! The service layer: the message bus, the handlers it dispatches to, and the
//! unit-of-work trait they run in. It knows the domain and nothing of
//! PostgreSQL or Kafka; adapters implement its traits.

pub mod handlers;
pub mod messagebus;
pub mod unit_of_work;

pub use handlers::HandlerError;
pub use messagebus::handle;
pub use unit_of_work::{ProductRepository, RepositoryError, UnitOfWork};
