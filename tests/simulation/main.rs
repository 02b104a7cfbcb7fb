//! Seeded deterministic simulations: the production code, unchanged, on
//! in-memory fakes of what it talks to, under tokio's paused clock, one
//! seed deciding every choice. Needs no services.

mod relay;
mod relay_fakes;
