//! The seven topic names of one test, made unique by a suffix.

/// The seven topic names of one test.
#[derive(Debug, Clone)]
pub struct Topics {
    pub batch_created: String,
    pub batch_quantity_changed: String,
    pub allocation_required: String,
    pub allocated: String,
    pub deallocated: String,
    pub out_of_stock: String,
    pub dead_letter: String,
}

impl Topics {
    pub(crate) fn with_suffix(suffix: &str) -> Self {
        Self {
            batch_created: format!("erp.batch-created.{suffix}"),
            batch_quantity_changed: format!("erp.batch-quantity-changed.{suffix}"),
            allocation_required: format!("erp.allocation-required.{suffix}"),
            allocated: format!("allocation.allocated.{suffix}"),
            deallocated: format!("allocation.deallocated.{suffix}"),
            out_of_stock: format!("allocation.out-of-stock.{suffix}"),
            dead_letter: format!("allocation.dead-letter.{suffix}"),
        }
    }

    pub fn all(&self) -> [&str; 7] {
        [
            &self.batch_created,
            &self.batch_quantity_changed,
            &self.allocation_required,
            &self.allocated,
            &self.deallocated,
            &self.out_of_stock,
            &self.dead_letter,
        ]
    }

    /// What the worker consumes.
    pub fn inbound(&self) -> [&str; 3] {
        [
            &self.batch_created,
            &self.batch_quantity_changed,
            &self.allocation_required,
        ]
    }

    /// What the worker publishes to: what the witness reads.
    pub fn outbound(&self) -> [&str; 4] {
        [
            &self.allocated,
            &self.deallocated,
            &self.out_of_stock,
            &self.dead_letter,
        ]
    }

    pub(crate) fn worker_env(&self) -> [(&'static str, &str); 7] {
        [
            ("TOPIC_BATCH_CREATED", &self.batch_created),
            ("TOPIC_BATCH_QUANTITY_CHANGED", &self.batch_quantity_changed),
            ("TOPIC_ALLOCATION_REQUIRED", &self.allocation_required),
            ("TOPIC_ALLOCATED", &self.allocated),
            ("TOPIC_DEALLOCATED", &self.deallocated),
            ("TOPIC_OUT_OF_STOCK", &self.out_of_stock),
            ("TOPIC_DEAD_LETTER", &self.dead_letter),
        ]
    }
}
