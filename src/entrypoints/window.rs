//! The clock of the unknown-reference window (docs/design.md, "Late
//! references"): it runs only while the worker can read the topic that would
//! bring a missing SKU or batch, so that a backlog, a restart or an outage
//! never turns a late reference into a dead letter. Pure: the caller says
//! what time it is and whether the time counts.

use std::time::{Duration, Instant};

/// Usable time: how long the conditions held, in total, since the clock
/// was made. A message waits until the clock has advanced by the window
/// since it was first read.
#[derive(Debug)]
pub struct UsableClock {
    counted: Duration,
    /// Since when the time counts, while it does.
    since: Option<Instant>,
}

impl UsableClock {
    /// A clock that does not run yet.
    pub fn new() -> Self {
        Self {
            counted: Duration::ZERO,
            since: None,
        }
    }

    /// Whether time counts from `now` on.
    pub fn set_usable(&mut self, usable: bool, now: Instant) {
        match (self.since, usable) {
            (None, true) => self.since = Some(now),
            (Some(since), false) => {
                self.counted += now.saturating_duration_since(since);
                self.since = None;
            }
            _ => {}
        }
    }

    pub fn is_usable(&self) -> bool {
        self.since.is_some()
    }

    /// Usable time up to `now`.
    pub fn read(&self, now: Instant) -> Duration {
        self.counted
            + self
                .since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

impl Default for UsableClock {
    fn default() -> Self {
        Self::new()
    }
}

/// What the worker knows of its inputs, gathered by its loop: whether the
/// window's clock runs. See [`Conditions::usable`].
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    /// The last database transaction committed (or nothing failed since).
    pub database_reachable: bool,
    /// The consumer has an assignment (and, through `unread_references`,
    /// its group is up).
    pub consumer_connected: bool,
    /// Messages of the reference-bringing topic fetched and not yet handled.
    pub unhandled_references: usize,
    /// Unread messages of each assigned partition of the reference-bringing
    /// topic, from statistics reported after the latest assignment; `None`
    /// while there are none.
    pub unread_references: Option<Vec<i64>>,
    /// Unread messages of each partition of the reference-bringing topic
    /// that other members of the group hold (or nobody does): from the
    /// group's committed offsets to each partition's end, read from the
    /// broker every few seconds; `None` while not known. Empty when this
    /// member holds every partition.
    pub group_unread_references: Option<Vec<i64>>,
    /// Most messages of one batch: unread below this counts as caught up
    /// (watermarks reported by a broker may lag by a batch).
    pub batch: usize,
    /// Waiting messages hold so much of the memory bound that nothing more
    /// can be read until some are given up.
    pub waiting_memory_full: bool,
}

impl Conditions {
    /// The clock runs while the database is reachable, the consumer is
    /// connected, and the worker has caught up with the topic that brings
    /// references (nothing fetched and unhandled, at most a batch unread on
    /// each of its assigned partitions, and the group's committed offsets
    /// at most a batch short of the end of the partitions other members
    /// hold), or while waiting messages fill their share of memory (reading
    /// on would need them given up).
    pub fn usable(&self) -> bool {
        let within = |unread: &Option<Vec<i64>>| {
            unread
                .as_ref()
                .is_some_and(|u| u.iter().all(|n| *n <= self.batch as i64))
        };
        // The whole group, not this member alone: a reference may come
        // through a partition another member holds, and that member may be
        // restarting or behind.
        let caught_up = self.unhandled_references == 0
            && within(&self.unread_references)
            && within(&self.group_unread_references);
        self.database_reachable
            && self.consumer_connected
            && (caught_up || self.waiting_memory_full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_usable_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = UsableClock::new();
        assert_eq!(c.read(t0 + s(5)), s(0));
        c.set_usable(true, t0 + s(5));
        assert_eq!(c.read(t0 + s(7)), s(2));
        c.set_usable(true, t0 + s(8));
        c.set_usable(false, t0 + s(10));
        assert_eq!(c.read(t0 + s(60)), s(5));
        c.set_usable(true, t0 + s(60));
        assert_eq!(c.read(t0 + s(61)), s(6));
    }

    #[test]
    fn usable_needs_every_condition() {
        let ok = Conditions {
            database_reachable: true,
            consumer_connected: true,
            unhandled_references: 0,
            unread_references: Some(vec![0, 3]),
            group_unread_references: Some(vec![2]),
            batch: 10,
            waiting_memory_full: false,
        };
        assert!(ok.usable());
        let mut c = ok.clone();
        c.database_reachable = false;
        assert!(!c.usable());
        let mut c = ok.clone();
        c.consumer_connected = false;
        assert!(!c.usable());
        let mut c = ok.clone();
        c.unhandled_references = 1;
        assert!(!c.usable());
        let mut c = ok.clone();
        c.unread_references = Some(vec![11]);
        assert!(!c.usable());
        c.waiting_memory_full = true;
        assert!(c.usable());
        let mut c = ok.clone();
        c.unread_references = None;
        assert!(!c.usable());
        c.unread_references = Some(vec![]);
        assert!(c.usable(), "no partition of the topic assigned here");
    }

    /// Issue 22 finding 2: a member holding no partition of the topic (or
    /// caught up on its own) does not count the window while another
    /// member's partitions are behind.
    #[test]
    fn usable_needs_the_whole_group_caught_up() {
        let mut c = Conditions {
            database_reachable: true,
            consumer_connected: true,
            unhandled_references: 0,
            unread_references: Some(vec![]),
            group_unread_references: Some(vec![0, 40]),
            batch: 10,
            waiting_memory_full: false,
        };
        assert!(!c.usable(), "another member is 40 behind");
        c.group_unread_references = None;
        assert!(!c.usable(), "the group's position is not known");
        c.group_unread_references = Some(vec![0, 10]);
        assert!(c.usable());
    }
}
