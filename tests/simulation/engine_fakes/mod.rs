//! The fakes the engine runs on in the simulation: a broker with a consumer
//! group, a database, and each instance's life (running, frozen, dead).
//! Every choice they make comes from the run's one seeded random source, on
//! one thread, in tokio's paused time: a seed replays the same run.

pub mod broker;
pub mod life;
pub mod store;
