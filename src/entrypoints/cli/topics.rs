//! The topic flags, shared: `run` and `simulate` name the ERP's three
//! inbound topics, `run` and `watch` the four outbound ones, with the same
//! flags, variables and defaults (contract §3 and §4).

use clap::Args;

use crate::configuration::{distinct_inbound, topic, ConfigError};

#[derive(Debug, Clone, Args)]
pub struct InboundTopicArgs {
    #[arg(long, env = "TOPIC_BATCH_CREATED", default_value = "erp.batch-created")]
    pub(crate) topic_batch_created: String,
    #[arg(
        long,
        env = "TOPIC_BATCH_QUANTITY_CHANGED",
        default_value = "erp.batch-quantity-changed"
    )]
    pub(crate) topic_batch_quantity_changed: String,
    #[arg(
        long,
        env = "TOPIC_ALLOCATION_REQUIRED",
        default_value = "erp.allocation-required"
    )]
    pub(crate) topic_allocation_required: String,
}

impl InboundTopicArgs {
    /// The names, checked and distinct: batch created, quantity changed,
    /// allocation required.
    pub fn names(&self) -> Result<[String; 3], ConfigError> {
        let names = [
            topic("TOPIC_BATCH_CREATED", &self.topic_batch_created)?,
            topic(
                "TOPIC_BATCH_QUANTITY_CHANGED",
                &self.topic_batch_quantity_changed,
            )?,
            topic("TOPIC_ALLOCATION_REQUIRED", &self.topic_allocation_required)?,
        ];
        distinct_inbound([&names[0], &names[1], &names[2]])?;
        Ok(names)
    }
}

#[derive(Debug, Clone, Args)]
pub struct OutboundTopicArgs {
    #[arg(long, env = "TOPIC_ALLOCATED", default_value = "allocation.allocated")]
    pub(crate) topic_allocated: String,
    #[arg(
        long,
        env = "TOPIC_DEALLOCATED",
        default_value = "allocation.deallocated"
    )]
    pub(crate) topic_deallocated: String,
    #[arg(
        long,
        env = "TOPIC_OUT_OF_STOCK",
        default_value = "allocation.out-of-stock"
    )]
    pub(crate) topic_out_of_stock: String,
    #[arg(
        long,
        env = "TOPIC_DEAD_LETTER",
        default_value = "allocation.dead-letter"
    )]
    pub(crate) topic_dead_letter: String,
}

impl OutboundTopicArgs {
    /// The names, checked: allocated, deallocated, out of stock, dead letter.
    pub fn names(&self) -> Result<[String; 4], ConfigError> {
        Ok([
            topic("TOPIC_ALLOCATED", &self.topic_allocated)?,
            topic("TOPIC_DEALLOCATED", &self.topic_deallocated)?,
            topic("TOPIC_OUT_OF_STOCK", &self.topic_out_of_stock)?,
            topic("TOPIC_DEAD_LETTER", &self.topic_dead_letter)?,
        ])
    }
}
