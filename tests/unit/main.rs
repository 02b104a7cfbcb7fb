//! The tests that need no service: the domain, the service layer through
//! the message bus with in-memory fakes ("high gear"), the batch processor,
//! the decoding edge and the contracts in `schemas/`, and property tests
//! against reference models. `cargo test --test unit`.

mod aggregate_props;
mod chunk;
mod contracts;
mod decode_props;
mod domain;
mod handlers;
mod tracker_props;

// The aggregate as it was before it was loaded from summaries, the
// reference of aggregate_props.
#[path = "reference/full_history_model.rs"]
mod reference;
