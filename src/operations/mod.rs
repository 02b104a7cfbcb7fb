//! The operator's commands besides `run` and `migrate`: `replay` (dead
//! letters back to their topics), `rewind` (the group's offsets to a
//! position the database recorded) and `quarantine` (outbox rows the relay
//! could not publish).

pub mod quarantine;
pub mod replay;
pub mod rewind;
