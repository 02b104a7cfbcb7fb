//! PostgreSQL behind the service layer: the product repository, the unit of
//! work that commits a message's state, outbox rows, read-model changes and
//! idempotency record in one transaction, and the migrations.

use std::collections::HashMap;

use chrono::NaiveDate;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres, Transaction};

use crate::domain::{Batch, BatchRef, Event, OrderId, OrderLine, Product, Sku};
use crate::service_layer::{ProductRepository, ReadModelChange, RepositoryError, UnitOfWork};

use super::outbox::{self, MessageContext, OutboxRecord};

/// The migrations under `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool that does not connect until first used, so that the worker can start,
/// report not-ready and back off while the database is down.
pub fn lazy_pool(options: sqlx::postgres::PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy_with(options)
}

/// Maps a database error to the service layer's two transient kinds. Unique
/// violations, serialization failures and deadlocks mean another transaction
/// won a race; anything else means the database is not usable right now.
pub fn classify(error: sqlx::Error) -> RepositoryError {
    if let sqlx::Error::Database(db) = &error {
        if matches!(db.code().as_deref(), Some("23505" | "40001" | "40P01")) {
            return RepositoryError::Conflict(db.message().to_owned());
        }
    }
    RepositoryError::Unavailable(Box::new(error))
}

/// A product as loaded, kept beside the live one so that commit writes only
/// the difference and checks the version it was loaded at.
struct Tracked {
    product: Product,
    /// `None` for a product created in this unit of work.
    original: Option<Product>,
    batch_ids: HashMap<BatchRef, i64>,
}

pub struct PgProductRepository {
    tx: Transaction<'static, Postgres>,
    seen: Vec<Tracked>,
}

impl PgProductRepository {
    fn position(&self, sku: &Sku) -> Option<usize> {
        self.seen.iter().position(|t| t.product.sku() == sku)
    }

    async fn load(&mut self, sku: &Sku) -> Result<Option<usize>, RepositoryError> {
        let conn: &mut PgConnection = &mut self.tx;
        let version: Option<i64> =
            sqlx::query_scalar("SELECT version_number FROM products WHERE sku = $1")
                .bind(sku.as_str())
                .fetch_optional(&mut *conn)
                .await
                .map_err(classify)?;
        let Some(version) = version else {
            return Ok(None);
        };
        let batch_rows: Vec<(i64, String, i64, Option<NaiveDate>)> = sqlx::query_as(
            "SELECT id, reference, purchased_quantity, eta FROM batches WHERE sku = $1 ORDER BY id",
        )
        .bind(sku.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
        let line_rows: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT a.batch_id, a.orderid, a.qty FROM allocations a \
             JOIN batches b ON b.id = a.batch_id WHERE b.sku = $1 ORDER BY a.id",
        )
        .bind(sku.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;

        let mut lines: HashMap<i64, Vec<OrderLine>> = HashMap::new();
        for (batch_id, orderid, qty) in line_rows {
            lines.entry(batch_id).or_default().push(OrderLine {
                orderid: stored_name(OrderId::parse(orderid))?,
                sku: sku.clone(),
                qty: stored_qty(qty)?,
            });
        }
        let mut batch_ids = HashMap::new();
        let mut batches = Vec::with_capacity(batch_rows.len());
        for (id, reference, purchased, eta) in batch_rows {
            let reference = stored_name(BatchRef::parse(reference))?;
            batch_ids.insert(reference.clone(), id);
            batches.push(Batch::restore(
                reference,
                sku.clone(),
                stored_qty(purchased)?,
                eta,
                lines.remove(&id).unwrap_or_default(),
            ));
        }
        let product = Product::restore(sku.clone(), version, batches);
        self.seen.push(Tracked {
            original: Some(product.clone()),
            product,
            batch_ids,
        });
        Ok(Some(self.seen.len() - 1))
    }

    /// Writes every seen product. The version check comes first: it takes the
    /// product's row lock, so outbox rows of one SKU are inserted in commit order.
    async fn save_all(&mut self) -> Result<(), RepositoryError> {
        for tracked in &mut self.seen {
            save(&mut self.tx, tracked).await?;
        }
        Ok(())
    }
}

async fn save(conn: &mut PgConnection, tracked: &mut Tracked) -> Result<(), RepositoryError> {
    let product = &tracked.product;
    let sku = product.sku().as_str();
    match &tracked.original {
        None => {
            sqlx::query("INSERT INTO products (sku, version_number) VALUES ($1, $2)")
                .bind(sku)
                .bind(product.version_number())
                .execute(&mut *conn)
                .await
                .map_err(classify)?;
        }
        Some(original) => {
            // Runs even when nothing changed: a decision such as OutOfStock was
            // made on this version, and must not commit if it is stale.
            let updated = sqlx::query(
                "UPDATE products SET version_number = $2 WHERE sku = $1 AND version_number = $3",
            )
            .bind(sku)
            .bind(product.version_number())
            .bind(original.version_number())
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
            if updated.rows_affected() != 1 {
                return Err(RepositoryError::Conflict(format!(
                    "product {sku} is no longer at version {}",
                    original.version_number()
                )));
            }
        }
    }

    let original_batches: HashMap<&BatchRef, &Batch> = tracked
        .original
        .iter()
        .flat_map(|p| p.batches())
        .map(|b| (b.reference(), b))
        .collect();
    for batch in product.batches() {
        match original_batches.get(batch.reference()) {
            None => {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO batches (reference, sku, purchased_quantity, eta) \
                     VALUES ($1, $2, $3, $4) RETURNING id",
                )
                .bind(batch.reference().as_str())
                .bind(sku)
                .bind(i64::from(batch.purchased_quantity()))
                .bind(batch.eta())
                .fetch_one(&mut *conn)
                .await
                .map_err(classify)?;
                tracked.batch_ids.insert(batch.reference().clone(), id);
            }
            Some(old) if old.purchased_quantity() != batch.purchased_quantity() => {
                sqlx::query("UPDATE batches SET purchased_quantity = $2 WHERE reference = $1")
                    .bind(batch.reference().as_str())
                    .bind(i64::from(batch.purchased_quantity()))
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?;
            }
            Some(_) => {}
        }
    }

    // Allocations, batch by batch: the stored rows' ids must keep the domain's
    // allocation order (LIFO deallocation reads it back). Rows that both lists
    // share from the start stay; the rest of the old list is deleted and the
    // rest of the new list inserted in order, so a line freed and allocated
    // again in one message, even to the same batch, moves to the end. All
    // deletes come first, because a line may move to another batch.
    let mut removed = Vec::new();
    let mut added = Vec::new();
    for batch in product.batches() {
        let old = original_batches
            .get(batch.reference())
            .map_or(&[][..], |b| b.allocations());
        let new = batch.allocations();
        let kept = old.iter().zip(new).take_while(|(o, n)| o == n).count();
        removed.extend(old[kept..].iter().map(|l| &l.orderid));
        added.extend(new[kept..].iter().map(|l| (batch.reference(), l)));
    }
    for orderid in removed {
        sqlx::query("DELETE FROM allocations WHERE orderid = $1 AND sku = $2")
            .bind(orderid.as_str())
            .bind(sku)
            .execute(&mut *conn)
            .await
            .map_err(classify)?;
    }
    for (reference, line) in added {
        let batch_id = tracked.batch_ids.get(reference).copied().ok_or_else(|| {
            RepositoryError::Conflict(format!("batch {reference} has no stored id"))
        })?;
        sqlx::query(
            "INSERT INTO allocations (batch_id, orderid, sku, qty) VALUES ($1, $2, $3, $4)",
        )
        .bind(batch_id)
        .bind(line.orderid.as_str())
        .bind(sku)
        .bind(i64::from(line.qty))
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    }
    Ok(())
}

/// Stored names were validated on the way in; one that no longer parses means
/// the data was changed by hand, which retrying will not fix but must not panic.
fn stored_name<T>(parsed: Result<T, crate::domain::InvalidName>) -> Result<T, RepositoryError> {
    parsed.map_err(|e| RepositoryError::Unavailable(format!("invalid stored name: {e}").into()))
}

fn stored_qty(value: i64) -> Result<u32, RepositoryError> {
    u32::try_from(value).map_err(|_| {
        RepositoryError::Unavailable(format!("invalid stored quantity {value}").into())
    })
}

impl ProductRepository for PgProductRepository {
    fn add(&mut self, product: Product) {
        self.seen.push(Tracked {
            product,
            original: None,
            batch_ids: HashMap::new(),
        });
    }

    async fn get(&mut self, sku: &Sku) -> Result<Option<&mut Product>, RepositoryError> {
        let index = match self.position(sku) {
            Some(i) => Some(i),
            None => self.load(sku).await?,
        };
        Ok(index.map(|i| &mut self.seen[i].product))
    }

    async fn get_by_batchref(
        &mut self,
        reference: &BatchRef,
    ) -> Result<Option<&mut Product>, RepositoryError> {
        if let Some(i) = self
            .seen
            .iter()
            .position(|t| t.product.batch(reference).is_some())
        {
            return Ok(Some(&mut self.seen[i].product));
        }
        let sku: Option<String> =
            sqlx::query_scalar("SELECT sku FROM batches WHERE reference = $1")
                .bind(reference.as_str())
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(classify)?;
        match sku {
            Some(sku) => {
                let sku = stored_name(Sku::parse(sku))?;
                self.get(&sku).await
            }
            None => Ok(None),
        }
    }

    fn seen(&mut self) -> Vec<&mut Product> {
        self.seen.iter_mut().map(|t| &mut t.product).collect()
    }
}

/// One message's transaction. Created by [`PgUnitOfWork::begin`]; nothing is
/// stored until [`PgUnitOfWork::commit`]; dropping it rolls back.
pub struct PgUnitOfWork {
    products: PgProductRepository,
    context: MessageContext,
    outbox: Vec<OutboxRecord>,
    read_model: Vec<ReadModelChange>,
}

/// Whether a message's idempotency key was new to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    New,
    AlreadyProcessed,
}

impl PgUnitOfWork {
    pub async fn begin(pool: &PgPool, context: MessageContext) -> Result<Self, RepositoryError> {
        let tx = pool.begin().await.map_err(classify)?;
        Ok(Self {
            products: PgProductRepository {
                tx,
                seen: Vec::new(),
            },
            context,
            outbox: Vec::new(),
            read_model: Vec::new(),
        })
    }

    /// Records the message's idempotency key. Done first, so that a concurrent
    /// delivery of the same message waits on the key and then sees it taken.
    pub async fn claim(&mut self) -> Result<Claim, RepositoryError> {
        let inserted = sqlx::query(
            "INSERT INTO processed_messages (idempotency_key) VALUES ($1) ON CONFLICT DO NOTHING",
        )
        .bind(&self.context.idempotency_key)
        .execute(&mut *self.products.tx)
        .await
        .map_err(classify)?;
        Ok(if inserted.rows_affected() == 1 {
            Claim::New
        } else {
            Claim::AlreadyProcessed
        })
    }

    /// Queues a record (such as a dead letter) for the outbox of this transaction.
    pub fn add_outbox_record(&mut self, record: OutboxRecord) {
        self.outbox.push(record);
    }

    /// Stores everything queued, then commits. A `Conflict` means the caller
    /// must retry the message from the start in a new unit of work.
    pub async fn commit(mut self) -> Result<(), RepositoryError> {
        self.products.save_all().await?;
        let conn: &mut PgConnection = &mut self.products.tx;
        for record in &self.outbox {
            outbox::insert(&mut *conn, record).await.map_err(classify)?;
        }
        for change in &self.read_model {
            match change {
                ReadModelChange::Allocated {
                    orderid,
                    sku,
                    batchref,
                } => {
                    sqlx::query(
                        "INSERT INTO allocations_view (orderid, sku, batchref) VALUES ($1, $2, $3) \
                         ON CONFLICT (orderid, sku) DO UPDATE SET batchref = EXCLUDED.batchref",
                    )
                    .bind(orderid.as_str())
                    .bind(sku.as_str())
                    .bind(batchref.as_str())
                    .execute(&mut *conn)
                    .await
                    .map_err(classify)?;
                }
                ReadModelChange::Deallocated { orderid, sku } => {
                    sqlx::query("DELETE FROM allocations_view WHERE orderid = $1 AND sku = $2")
                        .bind(orderid.as_str())
                        .bind(sku.as_str())
                        .execute(&mut *conn)
                        .await
                        .map_err(classify)?;
                }
            }
        }
        self.products.tx.commit().await.map_err(classify)
    }
}

impl UnitOfWork for PgUnitOfWork {
    type Products = PgProductRepository;

    fn products(&mut self) -> &mut PgProductRepository {
        &mut self.products
    }

    fn publish(&mut self, event: &Event) {
        let record = outbox::event_record(event, &self.context, self.outbox.len());
        self.outbox.push(record);
    }

    fn update_read_model(&mut self, change: ReadModelChange) {
        self.read_model.push(change);
    }
}
