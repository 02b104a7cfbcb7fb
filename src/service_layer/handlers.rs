//! One handler per command and the handlers of each event. Handlers load an
//! aggregate through the unit of work and call it; they never commit: the
//! caller owns the transaction, so a message's whole cascade commits together.

use crate::domain::commands::{Allocate, ChangeBatchQuantity, CreateBatch};
use crate::domain::events::Deallocated;
use crate::domain::{BatchRef, DomainError, Event, OrderLine, Product, Sku};

use super::unit_of_work::{ProductRepository, RepositoryError, UnitOfWork};

/// Why a message could not be handled. `Rejected` and the unknown-reference
/// variants are about the message; `Repository` is about the store.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("unknown SKU {0}")]
    UnknownSku(Sku),
    #[error("unknown batch {0}")]
    UnknownBatch(BatchRef),
    #[error(transparent)]
    Rejected(#[from] DomainError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
}

pub(crate) async fn create_batch<U: UnitOfWork>(
    cmd: CreateBatch,
    uow: &mut U,
) -> Result<(), HandlerError> {
    // References are unique across products: look the reference up first, so
    // that reusing it for another SKU is refused rather than stored twice.
    if let Some(owner) = uow.products().get_by_batchref(&cmd.reference).await? {
        if owner.sku() != &cmd.sku {
            return Err(DomainError::DuplicateBatch(cmd.reference).into());
        }
    }
    let repo = uow.products();
    if repo.get(&cmd.sku).await?.is_none() {
        repo.add(Product::new(cmd.sku.clone()));
    }
    let product = repo
        .get_for_batch(&cmd.sku, &cmd.reference)
        .await?
        .ok_or_else(|| HandlerError::UnknownSku(cmd.sku.clone()))?;
    product.add_batch(cmd.reference, cmd.qty, cmd.eta)?;
    Ok(())
}

pub(crate) async fn change_batch_quantity<U: UnitOfWork>(
    cmd: ChangeBatchQuantity,
    uow: &mut U,
) -> Result<(), HandlerError> {
    let product = uow
        .products()
        .get_for_quantity_change(&cmd.reference, cmd.qty)
        .await?
        .ok_or_else(|| HandlerError::UnknownBatch(cmd.reference.clone()))?;
    // The repository found the batch's product: it holds the batch. Should it
    // not, the change is not recorded as applied without its effect.
    if !product.change_quantity(&cmd.reference, cmd.qty)? {
        return Err(HandlerError::UnknownBatch(cmd.reference));
    }
    Ok(())
}

pub(crate) async fn allocate<U: UnitOfWork>(
    cmd: Allocate,
    uow: &mut U,
) -> Result<(), HandlerError> {
    let product = uow
        .products()
        .get_for_line(&cmd.sku, &cmd.orderid)
        .await?
        .ok_or_else(|| HandlerError::UnknownSku(cmd.sku.clone()))?;
    product.allocate(OrderLine {
        orderid: cmd.orderid,
        sku: cmd.sku,
        qty: cmd.qty,
    })?;
    Ok(())
}

/// Every outbound event goes through the outbox of the same transaction.
pub(crate) fn publish_event<U: UnitOfWork>(event: &Event, uow: &mut U) {
    uow.publish(event);
}

/// A freed line is allocated again by the normal rule, in the same unit of
/// work, so a deallocated line is never left unallocated and unreported.
pub(crate) async fn reallocate<U: UnitOfWork>(
    event: &Deallocated,
    uow: &mut U,
) -> Result<(), HandlerError> {
    allocate(
        Allocate {
            orderid: event.orderid.clone(),
            sku: event.sku.clone(),
            qty: event.qty,
        },
        uow,
    )
    .await
}
