//! The wait between attempts while the database or the broker is down,
//! shared by the consumer loop, the partitions and the relay.

use std::time::Duration;

/// Exponential back-off from 100 ms to 5 s, for outages of the database or broker.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failures: u32,
}

impl Backoff {
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = Duration::from_millis(100u64.saturating_mul(1 << self.failures.min(6)));
        self.failures = self.failures.saturating_add(1);
        delay.min(Duration::from_secs(5))
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}
