//! The clock of the unknown-reference window (docs/design.md, "Late
//! references"): it runs only while the worker can read the topic that would
//! bring a missing SKU or batch, so that a backlog, a restart or an outage
//! never turns a late reference into a dead letter. Pure: the caller says
//! what time it is and whether the time counts.

use std::time::Duration;

// tokio's clock: simulated (paused) in the engine's simulation, the
// monotonic clock otherwise.
use tokio::time::Instant;

/// Usable time: how long the conditions held, in total, since the clock
/// was made. A message waits until the clock has advanced by the window
/// since it was first read.
///
/// The caller observes the conditions a few times a second
/// ([`Self::set_usable`] at each look), and time counts only in steps it
/// observed: at most [`MAX_STEP`] between two looks. A process that was
/// stopped (SIGSTOP, a VM paused) or starved of CPU for longer did not see
/// its inputs meanwhile: were the gap counted, a member that was frozen past
/// the window would wake to find every waiting message's window closed, and
/// dead-letter late references the group had not read yet.
#[derive(Debug)]
pub(crate) struct UsableClock {
    counted: Duration,
    /// When the conditions were last seen to hold, while they do.
    since: Option<Instant>,
}

/// The most time one observation counts (the caller looks every 250 ms).
pub(crate) const MAX_STEP: Duration = Duration::from_secs(1);

impl UsableClock {
    /// A clock that does not run yet.
    pub(crate) fn new() -> Self {
        Self {
            counted: Duration::ZERO,
            since: None,
        }
    }

    /// The conditions as seen at `now`: the time since the last look counts
    /// (up to [`MAX_STEP`]) if they held then; from `now` on, it counts if
    /// `usable`.
    pub(crate) fn set_usable(&mut self, usable: bool, now: Instant) {
        if let Some(since) = self.since {
            self.counted += now.saturating_duration_since(since).min(MAX_STEP);
        }
        self.since = usable.then_some(now);
    }

    /// Usable time up to `now`.
    pub(crate) fn read(&self, now: Instant) -> Duration {
        self.counted
            + self.since.map_or(Duration::ZERO, |s| {
                now.saturating_duration_since(s).min(MAX_STEP)
            })
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
pub(crate) struct Conditions {
    /// The last database transaction committed (or nothing failed since).
    pub(crate) database_reachable: bool,
    /// The consumer has an assignment (and, through `unread_references`,
    /// its group is up).
    pub(crate) consumer_connected: bool,
    /// Messages of the reference-bringing topic fetched and not yet handled.
    pub(crate) unhandled_references: usize,
    /// Unread messages of each assigned partition of the reference-bringing
    /// topic, from statistics reported after the latest assignment; `None`
    /// while there are none.
    pub(crate) unread_references: Option<Vec<i64>>,
    /// Unread messages of the reference-bringing topic for the whole group
    /// (each partition's end minus the group's committed offset, summed),
    /// whoever holds them; `None` until it could be asked.
    pub(crate) group_unread_references: Option<i64>,
    /// Most messages of one batch: unread below this counts as caught up
    /// (watermarks reported by a broker may lag by a batch).
    pub(crate) batch: usize,
    /// Waiting messages hold so much of the memory bound that nothing more
    /// can be read until some are given up.
    pub(crate) waiting_memory_full: bool,
}

impl Conditions {
    /// The clock runs while the database is reachable, the consumer is
    /// connected, and the worker has caught up with the topic that brings
    /// references (nothing fetched and unhandled, at most a batch unread on
    /// each of its assigned partitions) and so has the whole group (nothing
    /// between its committed offsets and the ends of that topic, whichever
    /// member holds them), or while waiting messages fill their share of
    /// memory (reading on would need them given up).
    pub(crate) fn usable(&self) -> bool {
        let caught_up = self.unhandled_references == 0
            && self
                .unread_references
                .as_ref()
                .is_some_and(|u| u.iter().all(|n| *n <= self.batch as i64))
            && self.group_unread_references == Some(0);
        self.database_reachable
            && self.consumer_connected
            && (caught_up || self.waiting_memory_full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looks every 250 ms from `from` to `to` (seconds after `t0`).
    fn look(c: &mut UsableClock, t0: Instant, from: u64, to: u64, usable: bool) {
        for quarter in from * 4..to * 4 {
            c.set_usable(usable, t0 + Duration::from_millis(quarter * 250));
        }
    }

    #[test]
    fn counts_only_usable_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = UsableClock::new();
        assert_eq!(c.read(t0 + s(5)), s(0));
        look(&mut c, t0, 5, 10, true);
        assert_eq!(c.read(t0 + s(10)), Duration::from_millis(5000));
        look(&mut c, t0, 10, 60, false);
        assert_eq!(c.read(t0 + s(60)), s(5), "nothing counts while unusable");
        look(&mut c, t0, 60, 61, true);
        assert_eq!(c.read(t0 + s(61)), s(6));
    }

    #[test]
    fn a_process_stopped_past_the_window_does_not_count_the_gap() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = UsableClock::new();
        look(&mut c, t0, 0, 2, true);
        // SIGSTOP at 2 s, SIGCONT at 120 s: nothing looked in between.
        assert!(c.read(t0 + s(120)) <= s(2) + MAX_STEP);
        c.set_usable(false, t0 + s(120));
        assert!(
            c.read(t0 + s(120)) <= s(2) + MAX_STEP,
            "the stopped time is not usable time"
        );
    }

    #[test]
    fn usable_needs_every_condition() {
        let ok = Conditions {
            database_reachable: true,
            consumer_connected: true,
            unhandled_references: 0,
            unread_references: Some(vec![0, 3]),
            group_unread_references: Some(0),
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
        assert!(
            c.usable(),
            "no partition of the topic assigned here, and the group has read it all"
        );
        c.group_unread_references = Some(1);
        assert!(
            !c.usable(),
            "another member has not read the topic yet (a restart, a backlog)"
        );
        c.group_unread_references = None;
        assert!(!c.usable(), "not known yet");
        c.waiting_memory_full = true;
        assert!(c.usable(), "waiting messages fill their memory share");
    }
}
