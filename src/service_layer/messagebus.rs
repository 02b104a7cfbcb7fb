//! The message bus (cosmicpython chapters 9 and 10). A command goes to its one
//! handler; after every handler the bus collects the events the unit of work's
//! products recorded and dispatches each to all of its handlers, until the
//! queue is empty.
//!
//! Unlike the book, a failing event handler fails the whole message: state and
//! outbox share one transaction here, and an event handled half-way would
//! leave them disagreeing. The caller retries or dead-letters.
//!
//! Also unlike the book's last step in chapter 12, no event handler keeps a
//! read-model table: `allocations_view` is a database view of the allocations
//! (the book's "hand-rolled SQL" option), which cannot disagree with them and
//! costs the write path nothing.

use std::collections::VecDeque;

use crate::domain::{Command, Event};

use super::handlers::{self, HandlerError};
use super::unit_of_work::UnitOfWork;

enum Message {
    Command(Command),
    Event(Event),
}

/// Handles one command and every event it leads to, inside `uow`. Does not
/// commit: whoever began the unit of work decides when it ends.
pub async fn handle<U: UnitOfWork>(command: Command, uow: &mut U) -> Result<(), HandlerError> {
    let mut queue = VecDeque::from([Message::Command(command)]);
    while let Some(message) = queue.pop_front() {
        match message {
            Message::Command(command) => handle_command(command, uow).await?,
            Message::Event(event) => handle_event(&event, uow).await?,
        }
        queue.extend(uow.collect_new_events().into_iter().map(Message::Event));
    }
    Ok(())
}

async fn handle_command<U: UnitOfWork>(command: Command, uow: &mut U) -> Result<(), HandlerError> {
    tracing::debug!(command = command.name(), "handling command");
    match command {
        Command::CreateBatch(c) => handlers::create_batch(c, uow).await,
        Command::ChangeBatchQuantity(c) => handlers::change_batch_quantity(c, uow).await,
        Command::Allocate(c) => handlers::allocate(c, uow).await,
    }
}

/// The event handler table: every handler of an event runs, in this order.
async fn handle_event<U: UnitOfWork>(event: &Event, uow: &mut U) -> Result<(), HandlerError> {
    tracing::debug!(event = event.name(), sku = %event.sku(), "handling event");
    match event {
        Event::Allocated(_) => handlers::publish_event(event, uow),
        Event::Deallocated(e) => {
            handlers::publish_event(event, uow);
            handlers::reallocate(e, uow).await?;
        }
        Event::OutOfStock(_) => handlers::publish_event(event, uow),
    }
    Ok(())
}
