//! The statements a commit runs: what changed in the tracked products (as
//! each recorded it, [`Change`]), and
//! what the messages queued (outbox rows, idempotency keys), written
//! set-based. Each kind of row is gathered column by column ([`Writes`]),
//! bound as arrays and unnested, so that a batch costs the same few round
//! trips whatever its size.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDate;
use sqlx::PgConnection;

use crate::adapters::outbox::{OutboxColumns, OutboxRecord};
use crate::domain::{BatchRef, Change, OrderId, OrderLine};
use crate::service_layer::ReadPosition;
use crate::service_layer::RepositoryError;

use super::cache::fresh_revision;
use super::pool::{classify, stored_name};
use super::repository::Tracked;

/// Writes every product handed to a handler (`seen` with `used` set) and
/// what the messages queued, then records the products' new revisions and
/// batch ids in `seen`. The rarer writes (new products and batches, changed
/// quantities, freed lines) get a statement each when there are any; the
/// rest, which every batch has, go in one statement of data-modifying CTEs,
/// so that a batch costs few round trips. Products were locked when loaded;
/// the version check guards against a writer that did not lock.
pub(super) async fn save_all(
    conn: &mut PgConnection,
    seen: &mut [Tracked],
    outbox: &[OutboxRecord],
    processed: &[String],
) -> Result<(), RepositoryError> {
    let changes: Vec<Vec<Change>> = seen
        .iter_mut()
        .map(|t| {
            if t.used {
                t.product.take_changes()
            } else {
                Vec::new()
            }
        })
        .collect();
    let mut writes = Writes::default();
    for (i, tracked) in seen.iter().enumerate().filter(|(_, t)| t.used) {
        writes.add(i, tracked, &changes[i]);
    }
    let mut new_ids: HashMap<BatchRef, i64> = HashMap::new();
    if !writes.new_products.skus.is_empty() {
        let rows = &writes.new_products;
        sqlx::query(
            "INSERT INTO products (sku, version_number, revision) \
             SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[])",
        )
        .bind(&rows.skus)
        .bind(&rows.versions)
        .bind(&rows.revisions)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    }
    if !writes.new_batches.references.is_empty() {
        let rows = &writes.new_batches;
        let ids: Vec<(i64, String)> = sqlx::query_as(
            "INSERT INTO batches (reference, sku, purchased_quantity, created_quantity, eta) \
             SELECT r, s, q, c, e \
             FROM unnest($1::text[], $2::text[], $3::int8[], $4::date[], $5::int8[]) \
             WITH ORDINALITY AS v(r, s, q, e, c, n) ORDER BY n RETURNING id, reference",
        )
        .bind(&rows.references)
        .bind(&rows.skus)
        .bind(&rows.purchased)
        .bind(&rows.etas)
        .bind(&rows.created)
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
        for (id, reference) in ids {
            new_ids.insert(stored_name(BatchRef::parse(reference))?, id);
        }
    }
    if !writes.quantities.references.is_empty() {
        let rows = &writes.quantities;
        sqlx::query(
            "UPDATE batches b SET purchased_quantity = v.q \
             FROM unnest($1::text[], $2::int8[]) AS v(r, q) WHERE b.reference = v.r",
        )
        .bind(&rows.references)
        .bind(&rows.purchased)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    }
    // A statement of its own, before the inserts: a line may move to
    // another batch, and (orderid, sku) is unique.
    if !writes.freed.orderids.is_empty() {
        let rows = &writes.freed;
        sqlx::query(
            "DELETE FROM allocations a USING unnest($1::text[], $2::text[]) AS v(o, s) \
             WHERE a.orderid = v.o AND a.sku = v.s",
        )
        .bind(&rows.orderids)
        .bind(&rows.skus)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    }

    let mut lines = NewLines::with_capacity(writes.added.len());
    for added in &writes.added {
        let id = seen[added.owner]
            .batch_ids
            .get(added.batch)
            .or_else(|| new_ids.get(added.batch))
            .copied()
            .ok_or_else(|| {
                RepositoryError::Conflict(format!("batch {} has no stored id", added.batch))
            })?;
        lines.batch_ids.push(id);
        lines.orderids.push(added.line.orderid.as_str());
        lines.skus.push(added.line.sku.as_str());
        lines.qtys.push(i64::from(added.line.qty));
    }
    let records =
        OutboxColumns::new(outbox).map_err(|e| RepositoryError::Unavailable(Box::new(e)))?;
    // Allocation rows go in list order, so that ids keep each batch's
    // allocation order (LIFO deallocation reads it back); outbox rows in
    // decision order, which the relay publishes in. A concurrent delivery
    // of a message in this batch fails on processed_messages' primary
    // key (a Conflict): retried, it finds the key taken.
    let versions = &writes.versions;
    let updated: i64 = sqlx::query_scalar(
        "WITH \
         versions AS ( \
             UPDATE products p SET version_number = v.new, revision = v.rev \
             FROM unnest($1::text[], $2::int8[], $3::int8[], $13::int8[]) \
             AS v(sku, old, new, rev) \
             WHERE p.sku = v.sku AND p.version_number = v.old RETURNING 1), \
         lines AS ( \
             INSERT INTO allocations (batch_id, orderid, sku, qty) \
             SELECT b, o, s, q FROM unnest($4::int8[], $5::text[], $6::text[], $7::int8[]) \
             WITH ORDINALITY AS v(b, o, s, q, n) ORDER BY n), \
         keys AS ( \
             INSERT INTO processed_messages (idempotency_key) SELECT unnest($8::text[])), \
         records AS ( \
             INSERT INTO outbox (kind, message_key, payload, headers) \
             SELECT x.kind, x.k, x.p, x.h \
             FROM unnest($9::text[], $10::bytea[], $11::bytea[], $12::bytea[]) \
             WITH ORDINALITY AS x(kind, k, p, h, n) ORDER BY x.n \
             RETURNING id, outbox_shard(message_key) AS shard), \
         pending AS ( \
             INSERT INTO outbox_pending (id, shard) SELECT id, shard FROM records) \
         SELECT count(*) FROM versions",
    )
    .bind(&versions.skus)
    .bind(&versions.loaded)
    .bind(&versions.versions)
    .bind(&lines.batch_ids)
    .bind(&lines.orderids)
    .bind(&lines.skus)
    .bind(&lines.qtys)
    .bind(processed)
    .bind(&records.kinds)
    .bind(&records.keys)
    .bind(&records.payloads)
    .bind(&records.headers)
    .bind(&versions.revisions)
    .fetch_one(&mut *conn)
    .await
    .map_err(classify)?;
    if updated != versions.skus.len() as i64 {
        return Err(RepositoryError::Conflict(
            "a product is no longer at the version it was loaded at".into(),
        ));
    }
    let revisions = std::mem::take(&mut writes.revisions);
    let new_batch_owners: HashMap<String, usize> = writes
        .new_batches
        .references
        .iter()
        .zip(&writes.new_batches.owners)
        .map(|(reference, owner)| ((*reference).to_owned(), *owner))
        .collect();
    drop(lines);
    drop(writes);
    for NewRevision { owner, revision } in revisions {
        seen[owner].revision = revision;
    }
    // The new batches' ids go to the products that added them: a walk of
    // what was added, not of every batch of every product used, which grew
    // with each product's history of restocks. Each becomes the batch's
    // place in creation order (`Product::stored_as`): a batch read later by
    // reference comes with its row id, and must sort among these by it.
    for (reference, id) in new_ids {
        if let Some(&owner) = new_batch_owners.get(reference.as_str()) {
            seen[owner].product.stored_as(&reference, id);
            seen[owner].batch_ids.insert(reference, id);
        }
    }
    Ok(())
}

/// The rows a commit writes, gathered product by product.
#[derive(Default)]
struct Writes<'a> {
    new_products: NewProducts<'a>,
    versions: NewVersions<'a>,
    /// The revision each product written gets.
    revisions: Vec<NewRevision>,
    new_batches: NewBatches<'a>,
    quantities: NewQuantities<'a>,
    freed: FreedLines<'a>,
    /// Lines to insert, in the order their ids must keep.
    added: Vec<AddedLine<'a>>,
}

/// `products` rows to insert.
#[derive(Default)]
struct NewProducts<'a> {
    skus: Vec<&'a str>,
    versions: Vec<i64>,
    revisions: Vec<i64>,
}

/// `products` rows to move on from the version they were loaded at.
#[derive(Default)]
struct NewVersions<'a> {
    skus: Vec<&'a str>,
    /// As loaded: the row must still be at it.
    loaded: Vec<i64>,
    versions: Vec<i64>,
    revisions: Vec<i64>,
}

/// `batches` rows to insert.
#[derive(Default)]
struct NewBatches<'a> {
    references: Vec<&'a str>,
    skus: Vec<&'a str>,
    purchased: Vec<i64>,
    etas: Vec<Option<NaiveDate>>,
    /// The quantity the batch was created with (see `Batch::created_with`).
    created: Vec<i64>,
    /// Which product of `seen` added it.
    owners: Vec<usize>,
}

/// Batches whose purchased quantity changed.
#[derive(Default)]
struct NewQuantities<'a> {
    references: Vec<&'a str>,
    purchased: Vec<i64>,
}

/// `allocations` rows to delete, by order line.
#[derive(Default)]
struct FreedLines<'a> {
    orderids: Vec<&'a str>,
    skus: Vec<&'a str>,
}

/// `allocations` rows to insert, once every batch has an id.
struct NewLines<'a> {
    batch_ids: Vec<i64>,
    orderids: Vec<&'a str>,
    skus: Vec<&'a str>,
    qtys: Vec<i64>,
}

impl NewLines<'_> {
    fn with_capacity(n: usize) -> Self {
        Self {
            batch_ids: Vec::with_capacity(n),
            orderids: Vec::with_capacity(n),
            skus: Vec::with_capacity(n),
            qtys: Vec::with_capacity(n),
        }
    }
}

/// A line allocated in a batch that may be new (its id known only once the
/// new batches are inserted).
struct AddedLine<'a> {
    /// Position of the tracked product that holds the batch.
    owner: usize,
    batch: &'a BatchRef,
    line: &'a OrderLine,
}

/// The revision a tracked product is written with.
struct NewRevision {
    /// Position of the tracked product.
    owner: usize,
    revision: i64,
}

impl<'a> Writes<'a> {
    fn add(&mut self, position: usize, tracked: &'a Tracked, changes: &'a [Change]) {
        let product = &tracked.product;
        let sku = product.sku().as_str();
        match tracked.loaded_version {
            None => {
                let revision = fresh_revision();
                self.new_products.skus.push(sku);
                self.new_products.versions.push(product.version_number());
                self.new_products.revisions.push(revision);
                self.revisions.push(NewRevision {
                    owner: position,
                    revision,
                });
            }
            // An unchanged product is not written: it stays locked until
            // commit, so a decision such as OutOfStock made on it holds.
            Some(loaded) if loaded == product.version_number() => {}
            Some(loaded) => {
                let revision = fresh_revision();
                self.versions.skus.push(sku);
                self.versions.loaded.push(loaded);
                self.versions.versions.push(product.version_number());
                self.versions.revisions.push(revision);
                self.revisions.push(NewRevision {
                    owner: position,
                    revision,
                });
            }
        }
        // What changed, from the product's own record of it: new batches
        // (written with their current quantity), changed quantities, and
        // lines. A line allocated and freed again in this unit of work
        // never reaches the table; a stored line freed is deleted, and
        // allocated again it is inserted anew, at the end of its batch's
        // order, as the domain has it.
        let batches = product.batches();
        let mut added_batches: HashSet<usize> = HashSet::new();
        let mut changed_quantities: Vec<usize> = Vec::new();
        let mut inserted: Vec<Option<(usize, &'a OrderLine)>> = Vec::new();
        let mut inserted_at: HashMap<&'a OrderId, usize> = HashMap::new();
        for change in changes {
            match change {
                Change::BatchAdded(i) => {
                    added_batches.insert(*i);
                    if let Some(batch) = batches.get(*i) {
                        let rows = &mut self.new_batches;
                        rows.references.push(batch.reference().as_str());
                        rows.skus.push(sku);
                        rows.purchased.push(i64::from(batch.purchased_quantity()));
                        rows.etas.push(batch.eta());
                        rows.created.push(i64::from(batch.created_quantity()));
                        rows.owners.push(position);
                    }
                }
                Change::QuantityChanged(i) => {
                    if !added_batches.contains(i) && !changed_quantities.contains(i) {
                        changed_quantities.push(*i);
                    }
                }
                Change::LineAllocated { batch, line } => {
                    inserted_at.insert(&line.orderid, inserted.len());
                    inserted.push(Some((*batch, line)));
                }
                Change::LineFreed { line, .. } => match inserted_at.remove(&line.orderid) {
                    Some(at) => inserted[at] = None,
                    None => {
                        self.freed.orderids.push(line.orderid.as_str());
                        self.freed.skus.push(sku);
                    }
                },
            }
        }
        for i in changed_quantities {
            if let Some(batch) = batches.get(i) {
                let rows = &mut self.quantities;
                rows.references.push(batch.reference().as_str());
                rows.purchased.push(i64::from(batch.purchased_quantity()));
            }
        }
        for (batch, line) in inserted.into_iter().flatten() {
            if let Some(batch) = batches.get(batch) {
                self.added.push(AddedLine {
                    owner: position,
                    batch: batch.reference(),
                    line,
                });
            }
        }
    }
}

/// Records where `position`'s partition is to be read again from after a
/// restore (`partition_positions`). Overwritten, never only raised: after a
/// topic is recreated its offsets start again from 0, and the newest batch
/// is the one that knows. A late batch of an instance that lost the
/// partition may write a lower offset than its successor did; a lower one
/// only makes a rewind read more again, which the idempotency keys absorb.
pub(super) async fn save_position(
    conn: &mut PgConnection,
    position: &ReadPosition,
) -> Result<(), RepositoryError> {
    sqlx::query(
        "INSERT INTO partition_positions (topic, partition, next_offset, recorded_at) \
         VALUES ($1, $2, $3, now()) \
         ON CONFLICT (topic, partition) DO UPDATE \
         SET next_offset = EXCLUDED.next_offset, recorded_at = EXCLUDED.recorded_at",
    )
    .bind(&position.topic)
    .bind(position.partition)
    .bind(position.next_offset)
    .execute(conn)
    .await
    .map_err(classify)?;
    Ok(())
}
