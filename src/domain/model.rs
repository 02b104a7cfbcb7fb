//! The `Product` aggregate and its parts. Every rule of contract §2 lives here;
//! handlers only load the aggregate, call it and let the bus collect events.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::NaiveDate;

use super::events::{Allocated, Deallocated, Event, OutOfStock};
use super::names::{BatchRef, OrderId, Sku};

/// A rule of the domain refused the change. Permanent: retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("batch {0} already exists with different data")]
    DuplicateBatch(BatchRef),
    #[error(
        "order line ({orderid}, {sku}) is already allocated with qty {allocated}, not {requested}"
    )]
    DuplicateLine {
        orderid: OrderId,
        sku: Sku,
        allocated: u32,
        requested: u32,
    },
    #[error("order line for SKU {line_sku} offered to product {product_sku}")]
    WrongSku { product_sku: Sku, line_sku: Sku },
    /// The repository did not tell the product whether the line is
    /// allocated (see [`Product::knows_line`]): a bug of the caller, refused
    /// rather than decided on a guess.
    #[error("order line ({orderid}, {sku}) was not looked up before it was allocated")]
    LineNotLoaded { orderid: OrderId, sku: Sku },
    /// The repository did not give the product enough of the batch's most
    /// recent lines to free (see [`Product::lines_wanted`]).
    #[error("the lines a quantity change of batch {0} frees were not loaded")]
    LinesNotLoaded(BatchRef),
    /// The repository did not tell the product whether batch `{0}` is one
    /// of its own (see [`Product::knows_batch`]).
    #[error("batch {0} was not looked up before it was used")]
    BatchNotLoaded(BatchRef),
    /// A line of quantity 0 can go to any batch, the preferred of all of
    /// them, which a product loaded with only the batches with stock left
    /// does not know. (The messages cannot carry such a line.)
    #[error("a line of quantity 0 for SKU {0} needs every batch, which was not loaded")]
    EveryBatchNotLoaded(Sku),
}

/// A customer's request for `qty` units of `sku`; identified by `(orderid, sku)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    pub orderid: OrderId,
    pub sku: Sku,
    pub qty: u32,
}

/// Stock of one SKU that arrives (or arrived, when `eta` is `None`) together.
///
/// A batch knows how much of it is allocated, always, but not necessarily
/// every line that makes that quantity up: a batch loaded from storage knows
/// only the lines its product was given since (its most recent ones, which a
/// quantity drop frees first), so that deciding costs the same however many
/// lines the batch has had. A batch built in memory knows all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    reference: BatchRef,
    sku: Sku,
    purchased_quantity: u32,
    /// The quantity the batch was created with: a BatchCreated that carries
    /// it (and the same SKU and eta) is the same message again, whatever
    /// quantity changes came since.
    created_quantity: u32,
    eta: Option<NaiveDate>,
    /// The sum of the quantities of every line allocated to the batch, known
    /// here or not.
    allocated: i64,
    /// The most recent of its lines, in the order they were allocated (all
    /// of them when their quantities add up to `allocated`): quantity drops
    /// free the last first.
    allocations: Vec<OrderLine>,
}

impl Batch {
    pub fn new(
        reference: BatchRef,
        sku: Sku,
        purchased_quantity: u32,
        eta: Option<NaiveDate>,
    ) -> Self {
        Self::restore(reference, sku, purchased_quantity, eta, Vec::new())
    }

    /// Rebuilds a stored batch with every line; `allocations` must be in
    /// allocation order. It was created with `purchased_quantity` unless
    /// [`Self::created_with`] says otherwise.
    pub fn restore(
        reference: BatchRef,
        sku: Sku,
        purchased_quantity: u32,
        eta: Option<NaiveDate>,
        allocations: Vec<OrderLine>,
    ) -> Self {
        let allocated = allocations.iter().map(|l| i64::from(l.qty)).sum();
        Self {
            reference,
            sku,
            purchased_quantity,
            created_quantity: purchased_quantity,
            eta,
            allocated,
            allocations,
        }
    }

    /// Rebuilds a stored batch from how much of it is allocated, without its
    /// lines: what a decision needs, whatever the batch's history.
    pub fn restore_summary(
        reference: BatchRef,
        sku: Sku,
        purchased_quantity: u32,
        eta: Option<NaiveDate>,
        allocated: i64,
    ) -> Self {
        Self {
            allocated,
            ..Self::restore(reference, sku, purchased_quantity, eta, Vec::new())
        }
    }

    /// The same batch, recorded as created with `qty` (a stored batch whose
    /// quantity was changed since).
    pub fn created_with(mut self, qty: u32) -> Self {
        self.created_quantity = qty;
        self
    }

    pub fn reference(&self) -> &BatchRef {
        &self.reference
    }

    pub fn sku(&self) -> &Sku {
        &self.sku
    }

    pub fn eta(&self) -> Option<NaiveDate> {
        self.eta
    }

    pub fn purchased_quantity(&self) -> u32 {
        self.purchased_quantity
    }

    /// The quantity of the message that created the batch.
    pub fn created_quantity(&self) -> u32 {
        self.created_quantity
    }

    /// The lines this copy knows, the most recent ones, in allocation order:
    /// every line of a batch built in memory, those loaded or allocated since
    /// of a batch restored from a summary.
    pub fn allocations(&self) -> &[OrderLine] {
        &self.allocations
    }

    pub fn allocated_quantity(&self) -> i64 {
        self.allocated
    }

    /// Negative while a quantity drop is being resolved, never afterwards.
    pub fn available_quantity(&self) -> i64 {
        i64::from(self.purchased_quantity) - self.allocated
    }

    pub fn can_allocate(&self, line: &OrderLine) -> bool {
        self.sku == line.sku && self.available_quantity() >= i64::from(line.qty)
    }

    /// Whether every line of the batch is known here.
    fn knows_every_line(&self) -> bool {
        self.known_quantity() == self.allocated
    }

    fn known_quantity(&self) -> i64 {
        self.allocations.iter().map(|l| i64::from(l.qty)).sum()
    }

    /// Whether a BatchCreated with this data is the one that created the
    /// batch, delivered again.
    fn created_by(&self, sku: &Sku, qty: u32, eta: Option<NaiveDate>) -> bool {
        &self.sku == sku && self.created_quantity == qty && self.eta == eta
    }
}

/// A change of the aggregate's state, recorded as it is made, so that
/// storing it writes what changed rather than comparing whole copies.
/// Batches are named by their position in [`Product::batches`], which never
/// changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    BatchAdded(usize),
    QuantityChanged(usize),
    /// Appended to the batch's lines: the most recent from now on.
    LineAllocated {
        batch: usize,
        line: OrderLine,
    },
    /// Taken off the end of the batch's lines by a quantity drop.
    LineFreed {
        batch: usize,
        line: OrderLine,
    },
}

/// What a product knows of one order line: where it is allocated, or that
/// it is not.
type KnownLine = Option<(usize, OrderLine)>;

/// The aggregate: every batch of one SKU. All changes to allocations go
/// through it, and each change bumps `version_number` so that two concurrent
/// changes cannot both be stored.
///
/// A product restored from summaries ([`Batch::restore_summary`]) does not
/// know every line. Whoever loads it tells it what a decision needs before
/// asking for the decision: whether a line is allocated
/// ([`Self::learn_line`]) before [`Self::allocate`], and a batch's earlier
/// lines ([`Self::learn_earlier_lines`]) before a quantity drop frees more
/// than it knows ([`Self::lines_wanted`]). It refuses, rather than guesses,
/// when it was not told.
///
/// A product restored with some of its batches ([`Self::restore_some`]:
/// those with stock left, which is all a choice of a batch looks at) does
/// not know every batch either. Whoever loads it gives it a batch a message
/// names ([`Self::learn_batch`]), or tells it the reference is not one of
/// its own ([`Self::learn_not_a_batch`]), before a quantity change or a
/// creation with that reference; a line's lookup brings the batch the line
/// is allocated to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    sku: Sku,
    version_number: i64,
    /// The batches this copy knows, in the order it came to know them.
    batches: Vec<Batch>,
    /// By position in `batches`: the batch's place in creation order, which
    /// breaks ties between equal ETAs: a stored batch's row id; a batch
    /// added in memory comes after every stored one until it is stored
    /// ([`Self::stored_as`]).
    ties: Vec<i64>,
    /// The tie of the next batch added.
    next_tie: i64,
    /// Every batch of the product is in `batches`.
    all_batches: bool,
    /// References the product was told are not its batches.
    not_batches: HashSet<BatchRef>,
    /// Each batch's position in `batches`, by reference.
    positions: HashMap<BatchRef, usize>,
    /// The batches with some quantity available, keyed in the order the
    /// choice of a batch prefers them: warehouse stock first (`None` sorts
    /// before `Some`), then the earliest ETA, ties by creation order
    /// (`ties`), then the position. A
    /// product's batches only grow, and most of an old product's are taken
    /// in full: the choice looks only here, so that it costs the same however
    /// many batches the product has had.
    open: BTreeSet<(Option<NaiveDate>, i64, usize)>,
    /// The batches with something allocated (whose sum is not zero).
    allocated_batches: usize,
    /// The batches whose `allocations` may not be empty: what
    /// [`Self::forget_lines`] clears, rather than every batch.
    with_lines: Vec<usize>,
    events: Vec<Event>,
    /// Lines this copy knows of, by order id (the SKU is the product's).
    lines: HashMap<OrderId, KnownLine>,
    /// Every line allocated to the product is in `lines`: one not there is
    /// not allocated.
    complete: bool,
    changes: Vec<Change>,
}

impl Product {
    /// A product that has never been stored.
    pub fn new(sku: Sku) -> Self {
        Self::restore(sku, 0, Vec::new())
    }

    /// Rebuilds a stored product from every batch it has, in creation order,
    /// each with every line ([`Batch::restore`]) or with a summary
    /// ([`Batch::restore_summary`]).
    pub fn restore(sku: Sku, version_number: i64, batches: Vec<Batch>) -> Self {
        let batches = (0..).zip(batches).collect();
        Self::build(sku, version_number, batches, true, Self::NEW_TIES)
    }

    /// Rebuilds a stored product from some of its batches, each with its
    /// place in creation order (its row id, below [`Self::NEW_TIES`]), in
    /// any order: those with stock left, which is what a decision looks at.
    /// The product then refuses what needs another batch until it is told
    /// of it (see [`Self::knows_batch`]).
    pub fn restore_some(sku: Sku, version_number: i64, batches: Vec<(i64, Batch)>) -> Self {
        Self::build(sku, version_number, batches, false, Self::NEW_TIES)
    }

    /// Where the ties of batches added in memory begin: after every stored
    /// batch's row id (or position). Once stored, a batch takes its row id
    /// as its tie ([`Self::stored_as`]), so that a batch read later by
    /// reference, with its row id, sorts among them in creation order.
    pub const NEW_TIES: i64 = 1 << 62;

    fn build(
        sku: Sku,
        version_number: i64,
        batches: Vec<(i64, Batch)>,
        all_batches: bool,
        next_tie: i64,
    ) -> Self {
        let mut product = Self {
            sku,
            version_number,
            batches: Vec::with_capacity(batches.len()),
            ties: Vec::with_capacity(batches.len()),
            next_tie,
            all_batches,
            not_batches: HashSet::new(),
            positions: HashMap::with_capacity(batches.len()),
            open: BTreeSet::new(),
            allocated_batches: 0,
            with_lines: Vec::new(),
            events: Vec::new(),
            lines: HashMap::new(),
            complete: all_batches,
            changes: Vec::new(),
        };
        for (tie, batch) in batches {
            product.push_batch(tie, batch);
        }
        product
    }

    /// Appends a batch the product did not have, with its lines, to the
    /// indexes.
    fn push_batch(&mut self, tie: i64, batch: Batch) {
        let i = self.batches.len();
        // The first of a reference given twice, as a scan would find it.
        self.positions.entry(batch.reference.clone()).or_insert(i);
        if !batch.knows_every_line() {
            self.complete = false;
        }
        if !batch.allocations.is_empty() {
            self.with_lines.push(i);
        }
        for line in &batch.allocations {
            self.lines
                .insert(line.orderid.clone(), Some((i, line.clone())));
        }
        self.batches.push(batch);
        self.ties.push(tie);
        self.reindex(i, 0);
    }

    /// Brings the indexes up to date after batch `i`'s allocated quantity
    /// or purchased quantity changed from `was_allocated` allocated.
    fn reindex(&mut self, i: usize, was_allocated: i64) {
        let batch = &self.batches[i];
        match (was_allocated == 0, batch.allocated == 0) {
            (true, false) => self.allocated_batches += 1,
            (false, true) => self.allocated_batches -= 1,
            _ => {}
        }
        let key = (batch.eta, self.ties[i], i);
        if batch.available_quantity() > 0 {
            self.open.insert(key);
        } else {
            self.open.remove(&key);
        }
    }

    pub fn sku(&self) -> &Sku {
        &self.sku
    }

    pub fn version_number(&self) -> i64 {
        self.version_number
    }

    pub fn batches(&self) -> &[Batch] {
        &self.batches
    }

    /// The batch `reference`, if this copy knows it (see
    /// [`Self::knows_batch`]).
    pub fn batch(&self, reference: &BatchRef) -> Option<&Batch> {
        self.position(reference).map(|i| &self.batches[i])
    }

    /// Whether this copy knows if `reference` is one of its batches: it has
    /// the batch, it has every batch, or it was told the reference is not
    /// one of them.
    pub fn knows_batch(&self, reference: &BatchRef) -> bool {
        self.all_batches
            || self.positions.contains_key(reference)
            || self.not_batches.contains(reference)
    }

    /// Whether every batch of the product is known here.
    pub fn knows_every_batch(&self) -> bool {
        self.all_batches
    }

    /// Gives the product one of its stored batches, with its place in
    /// creation order (its row id), as stored: a batch it had not loaded.
    /// A batch it has already is kept as it is (its own changes win).
    pub fn learn_batch(&mut self, tie: i64, batch: Batch) {
        if self.positions.contains_key(&batch.reference) || batch.sku != self.sku {
            return;
        }
        self.not_batches.remove(&batch.reference);
        self.push_batch(tie, batch);
    }

    /// Records that batch `reference`, added in memory, is stored as row
    /// `id`: its place in creation order from now on. Every batch a product
    /// keeps between transactions then has its row id as its tie, as a
    /// batch read by reference will, whichever way it was first known.
    pub fn stored_as(&mut self, reference: &BatchRef, id: i64) {
        let Some(i) = self.position(reference) else {
            return;
        };
        let eta = self.batches[i].eta;
        let was_open = self.open.remove(&(eta, self.ties[i], i));
        self.ties[i] = id;
        if was_open {
            self.open.insert((eta, id, i));
        }
    }

    /// Tells the product that `reference` is not one of its stored batches.
    pub fn learn_not_a_batch(&mut self, reference: BatchRef) {
        if !self.knows_batch(&reference) {
            self.not_batches.insert(reference);
        }
    }

    fn position(&self, reference: &BatchRef) -> Option<usize> {
        self.positions.get(reference).copied()
    }

    /// Events recorded since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Changes made since the last [`Self::take_changes`], oldest first.
    pub(crate) fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Changes made since the last call, oldest first.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Whether this copy knows if the line `(orderid, self.sku())` is
    /// allocated, and where.
    pub fn knows_line(&self, orderid: &OrderId) -> bool {
        self.complete || self.lines.contains_key(orderid)
    }

    /// Tells the product where `(orderid, self.sku())` is allocated, as
    /// stored: in the batch `reference` with `qty`, or nowhere (`None`). What
    /// the product knows already (its own changes) is kept; a batch it does
    /// not have teaches nothing.
    pub fn learn_line(&mut self, orderid: OrderId, at: Option<(&BatchRef, u32)>) {
        if self.knows_line(&orderid) {
            return;
        }
        let known = match at {
            None => None,
            Some((reference, qty)) => match self.position(reference) {
                Some(i) => Some((
                    i,
                    OrderLine {
                        orderid: orderid.clone(),
                        sku: self.sku.clone(),
                        qty,
                    },
                )),
                None => return,
            },
        };
        self.lines.insert(orderid, known);
    }

    /// How much more quantity than the lines it knows a change of batch
    /// `reference` to `qty` must free: 0 when the known lines are enough
    /// (or nothing is freed). Load that much of the batch's earlier lines,
    /// most recent first, and give them to [`Self::learn_earlier_lines`].
    pub fn lines_wanted(&self, reference: &BatchRef, qty: u32) -> i64 {
        let Some(batch) = self.batch(reference) else {
            return 0;
        };
        let to_free = batch.allocated - i64::from(qty);
        (to_free - batch.known_quantity()).max(0)
    }

    /// Gives batch `reference` lines allocated before every line it knows,
    /// in allocation order: stored lines, read back for a quantity drop.
    pub fn learn_earlier_lines(&mut self, reference: &BatchRef, earlier: Vec<OrderLine>) {
        let Some(i) = self.position(reference) else {
            return;
        };
        for line in &earlier {
            self.lines
                .entry(line.orderid.clone())
                .or_insert_with(|| Some((i, line.clone())));
        }
        let batch = &mut self.batches[i];
        if batch.allocations.is_empty() && !earlier.is_empty() {
            self.with_lines.push(i);
        }
        let later = std::mem::replace(&mut batch.allocations, earlier);
        batch.allocations.extend(later);
    }

    /// Forgets every line it knows, and every batch with no stock left,
    /// keeping the batches a decision looks at and how much of each is
    /// allocated: what is worth keeping between transactions. A product's
    /// batches only grow, and most of an old product's are taken in full:
    /// what is kept does not grow with them. The batches stay while changes
    /// are recorded and not taken ([`Self::take_changes`]): those name
    /// batches by position.
    pub fn forget_lines(&mut self) {
        for i in self.with_lines.drain(..) {
            self.batches[i].allocations = Vec::new();
        }
        self.lines = HashMap::new();
        self.not_batches = HashSet::new();
        if self.open.len() < self.batches.len() && self.changes.is_empty() {
            let batches = std::mem::take(&mut self.batches);
            let ties = std::mem::take(&mut self.ties);
            let kept: Vec<(i64, Batch)> = ties
                .into_iter()
                .zip(batches)
                .filter(|(_, b)| b.available_quantity() > 0)
                .collect();
            let events = std::mem::take(&mut self.events);
            *self = Self::build(
                self.sku.clone(),
                self.version_number,
                kept,
                false,
                self.next_tie,
            );
            self.events = events;
        }
        self.complete = self.all_batches && self.allocated_batches == 0;
    }

    /// Adds a batch. The message that created the batch, again, is a no-op
    /// (redelivery from the ERP), even after the batch's quantity was changed
    /// since; the same reference with other data is refused.
    pub fn add_batch(
        &mut self,
        reference: BatchRef,
        qty: u32,
        eta: Option<NaiveDate>,
    ) -> Result<(), DomainError> {
        if let Some(existing) = self.batch(&reference) {
            return if existing.created_by(&self.sku, qty, eta) {
                Ok(())
            } else {
                Err(DomainError::DuplicateBatch(reference))
            };
        }
        if !self.knows_batch(&reference) {
            return Err(DomainError::BatchNotLoaded(reference));
        }
        self.not_batches.remove(&reference);
        let i = self.batches.len();
        let tie = self.next_tie;
        self.next_tie += 1;
        self.push_batch(tie, Batch::new(reference, self.sku.clone(), qty, eta));
        self.changes.push(Change::BatchAdded(i));
        self.version_number += 1;
        Ok(())
    }

    /// Where `(orderid, sku)` is allocated now, if anywhere (as far as this
    /// copy knows: see [`Self::knows_line`]).
    pub fn allocation_of(&self, orderid: &OrderId) -> Option<(&Batch, &OrderLine)> {
        match self.lines.get(orderid) {
            Some(Some((i, line))) => Some((&self.batches[*i], line)),
            _ => None,
        }
    }

    /// Allocates the line to the first batch that can take it, warehouse stock
    /// first, then by earliest ETA, ties by creation order. Records `Allocated`,
    /// or `OutOfStock` (changing nothing) when no batch can take it. A line that
    /// is already allocated with the same quantity is left as it is.
    pub fn allocate(&mut self, line: OrderLine) -> Result<Option<BatchRef>, DomainError> {
        if line.sku != self.sku {
            // Handlers load the product by the line's SKU; this guards the invariant.
            return Err(DomainError::WrongSku {
                product_sku: self.sku.clone(),
                line_sku: line.sku,
            });
        }
        if !self.knows_line(&line.orderid) {
            return Err(DomainError::LineNotLoaded {
                orderid: line.orderid,
                sku: line.sku,
            });
        }
        if let Some((_, existing)) = self.allocation_of(&line.orderid) {
            return if existing.qty == line.qty {
                Ok(None)
            } else {
                Err(DomainError::DuplicateLine {
                    allocated: existing.qty,
                    orderid: line.orderid,
                    sku: line.sku,
                    requested: line.qty,
                })
            };
        }
        let chosen = if line.qty > 0 {
            // The open batches in order of preference: the first that can
            // take the line. A batch not open has nothing available, so it
            // could take no line of a positive quantity.
            self.open
                .iter()
                .map(|&(_, _, i)| i)
                .find(|&i| self.batches[i].can_allocate(&line))
        } else if self.all_batches {
            // Any batch can take nothing: the preferred of them all. (The
            // messages cannot carry a quantity of 0; the domain allows it.)
            self.batches
                .iter()
                .enumerate()
                .filter(|(_, b)| b.can_allocate(&line))
                // `None` sorts before `Some`: warehouse stock first, then
                // the earliest created.
                .min_by_key(|&(i, b)| (b.eta, self.ties[i]))
                .map(|(i, _)| i)
        } else {
            return Err(DomainError::EveryBatchNotLoaded(line.sku));
        };
        match chosen {
            Some(i) => {
                let batch = &mut self.batches[i];
                let was_allocated = batch.allocated;
                if batch.allocations.is_empty() {
                    self.with_lines.push(i);
                }
                batch.allocations.push(line.clone());
                batch.allocated += i64::from(line.qty);
                let batchref = batch.reference.clone();
                self.reindex(i, was_allocated);
                self.version_number += 1;
                self.lines
                    .insert(line.orderid.clone(), Some((i, line.clone())));
                self.changes.push(Change::LineAllocated {
                    batch: i,
                    line: line.clone(),
                });
                self.events.push(Event::Allocated(Allocated {
                    orderid: line.orderid,
                    sku: line.sku,
                    qty: line.qty,
                    batchref: batchref.clone(),
                }));
                Ok(Some(batchref))
            }
            None => {
                self.events.push(Event::OutOfStock(OutOfStock {
                    sku: line.sku,
                    orderid: line.orderid,
                    qty: line.qty,
                }));
                Ok(None)
            }
        }
    }

    /// Sets a batch's purchased quantity. While the batch is over-allocated,
    /// frees its most recently allocated line and records `Deallocated`; the
    /// bus then allocates each freed line again.
    ///
    /// Returns `false` when the product has no batch with that reference (or,
    /// see [`Self::change_quantity`], did not know the lines to free).
    pub fn change_batch_quantity(&mut self, reference: &BatchRef, qty: u32) -> bool {
        self.change_quantity(reference, qty).unwrap_or(false)
    }

    /// [`Self::change_batch_quantity`], refusing (and changing nothing) when
    /// the lines the drop frees are not all known here
    /// ([`Self::lines_wanted`]).
    pub fn change_quantity(&mut self, reference: &BatchRef, qty: u32) -> Result<bool, DomainError> {
        let Some(i) = self.position(reference) else {
            return if self.knows_batch(reference) {
                Ok(false)
            } else {
                Err(DomainError::BatchNotLoaded(reference.clone()))
            };
        };
        if self.batches[i].purchased_quantity == qty {
            return Ok(true);
        }
        if self.lines_wanted(reference, qty) > 0 {
            return Err(DomainError::LinesNotLoaded(reference.clone()));
        }
        let batch = &mut self.batches[i];
        let was_allocated = batch.allocated;
        batch.purchased_quantity = qty;
        let mut freed = Vec::new();
        while batch.available_quantity() < 0 {
            match batch.allocations.pop() {
                Some(line) => {
                    batch.allocated -= i64::from(line.qty);
                    freed.push(line);
                }
                None => break,
            }
        }
        self.reindex(i, was_allocated);
        self.version_number += 1;
        self.changes.push(Change::QuantityChanged(i));
        for line in &freed {
            self.lines.insert(line.orderid.clone(), None);
            self.changes.push(Change::LineFreed {
                batch: i,
                line: line.clone(),
            });
        }
        self.events.extend(freed.into_iter().map(|line| {
            Event::Deallocated(Deallocated {
                orderid: line.orderid,
                sku: line.sku,
                qty: line.qty,
            })
        }));
        Ok(true)
    }
}
