//! The unit-of-work and repository traits (cosmicpython chapters 6 and 7).
//! A unit of work is one atomic change: the products it loaded and the events
//! to publish are stored together or not at all. The read model
//! (`allocations_view`) is a view of the stored allocations, so it needs no
//! writes of its own (docs/design.md, "Read model").

use std::future::Future;

use crate::domain::{BatchRef, Event, Product, Sku};

/// Why the store could not do what was asked. Both kinds are transient: the
/// caller retries the whole unit of work (every message in it) in a fresh one.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// Another transaction changed the same product first (optimistic concurrency).
    #[error("product {0} was changed concurrently")]
    Conflict(String),
    /// The store is unreachable or failed; retry after a back-off.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Products by SKU, with an identity map: a product is loaded once per unit of
/// work, and `get` hands out the same instance every time, so that changes
/// made by one handler are seen by the next and saved on commit.
pub trait ProductRepository: Send {
    /// Starts tracking a product that has never been stored.
    fn add(&mut self, product: Product);

    fn get(
        &mut self,
        sku: &Sku,
    ) -> impl Future<Output = Result<Option<&mut Product>, RepositoryError>> + Send;

    fn get_by_batchref(
        &mut self,
        reference: &BatchRef,
    ) -> impl Future<Output = Result<Option<&mut Product>, RepositoryError>> + Send;

    /// Every product loaded or added in this unit of work.
    fn seen(&mut self) -> Vec<&mut Product>;
}

pub trait UnitOfWork: Send {
    type Products: ProductRepository;

    fn products(&mut self) -> &mut Self::Products;

    /// Queues an event for publication; it is stored with the state change
    /// (transactional outbox) and sent after commit.
    fn publish(&mut self, event: &Event);

    /// Drains the events recorded by the products seen so far, oldest first.
    fn collect_new_events(&mut self) -> Vec<Event> {
        self.products()
            .seen()
            .into_iter()
            .flat_map(|p| p.take_events())
            .collect()
    }
}
