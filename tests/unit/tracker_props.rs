//! Property tests of the per-partition waiting rules (docs/design.md,
//! "Late references") against a simple model.
//!
//! A partition's messages each name a few keys and need some of them to be
//! "known"; keys become known at random moments, and a message whose window
//! has closed is dead-lettered instead. A driver plays the worker's partition
//! task with the tracker and the batch gate (new messages in random batches,
//! retries of random sizes, keys becoming known in between, windows
//! closing), and checks against the model:
//!
//! - each key's messages settle (apply or are dead-lettered) in offset order;
//! - a message settles as soon as nothing holds it back: a message naming no
//!   key of an earlier unsettled message, whose needs are known, applies the
//!   first time it is handled;
//! - the stored offset never passes an unsettled message and never goes back;
//! - once every key is known, everything settles, and the stored offset is
//!   the end of the partition.

use std::collections::{BTreeMap, BTreeSet};

use allocation_worker::engine::tracker::Tracker;
use allocation_worker::service_layer::chunk::ChunkGate;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Msg {
    keys: Vec<u8>,
    /// Keys that must be known for it to apply.
    needs: Vec<u8>,
}

#[derive(Debug, Clone)]
enum Step {
    /// Read this many new messages as one batch.
    Read(usize),
    /// Retry up to this many waiting messages.
    Retry(usize),
    /// This key becomes known.
    Know(u8),
    /// The window of every message waiting so far closes.
    CloseWindows,
}

fn msg() -> impl Strategy<Value = Msg> {
    (
        proptest::collection::vec(0u8..6, 0..3),
        proptest::collection::vec(0u8..6, 0..2),
    )
        .prop_map(|(mut keys, needs)| {
            // What a message needs, it names (an order names its SKU).
            keys.extend(needs.iter().copied());
            keys.sort_unstable();
            keys.dedup();
            Msg { keys, needs }
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1usize..5).prop_map(Step::Read),
        3 => (1usize..6).prop_map(Step::Retry),
        2 => (0u8..6).prop_map(Step::Know),
        1 => Just(Step::CloseWindows),
    ]
}

/// What became of a message in one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    DeadLettered,
    Deferred,
}

struct Driver {
    msgs: Vec<Msg>,
    known: BTreeSet<u8>,
    /// Offsets whose window has closed.
    give_up: BTreeSet<i64>,
    tracker: Tracker<u8, ()>,
    read: usize,
    settled: BTreeMap<i64, Outcome>,
    /// Settling order.
    order: Vec<i64>,
    stored: Option<i64>,
}

impl Driver {
    /// The processor: one batch, message by message through the gate.
    fn process(&mut self, batch: &[i64]) -> Vec<Outcome> {
        let mut gate = ChunkGate::default();
        batch
            .iter()
            .map(|&o| {
                let m = &self.msgs[o as usize];
                if gate.blocked(&m.keys) {
                    return Outcome::Deferred;
                }
                if m.needs.iter().all(|k| self.known.contains(k)) {
                    Outcome::Applied
                } else if self.give_up.contains(&o) {
                    Outcome::DeadLettered
                } else {
                    gate.hold(&m.keys);
                    Outcome::Deferred
                }
            })
            .collect()
    }

    fn settle(&mut self, offset: i64, outcome: Outcome) {
        assert!(
            self.settled.insert(offset, outcome).is_none(),
            "{offset} settled twice"
        );
        self.order.push(offset);
    }

    fn read(&mut self, n: usize) {
        let end = (self.read + n).min(self.msgs.len());
        let mut ready = Vec::new();
        for o in self.read..end {
            let keys = self.msgs[o].keys.clone();
            if self.tracker.admit(o as i64, keys, ()).is_some() {
                ready.push(o as i64);
            }
        }
        self.read = end;
        let outcomes = self.process(&ready);
        for (o, outcome) in ready.into_iter().zip(outcomes) {
            if outcome == Outcome::Deferred {
                self.tracker
                    .defer(o, self.msgs[o as usize].keys.clone(), ());
            } else {
                self.tracker.settle(o);
                self.settle(o, outcome);
            }
        }
    }

    fn retry(&mut self, n: usize) {
        let batch: Vec<i64> = self
            .tracker
            .retry_batch(n)
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        let outcomes = self.process(&batch);
        for (o, outcome) in batch.into_iter().zip(outcomes) {
            if outcome != Outcome::Deferred {
                assert!(self.tracker.settle(o).is_some(), "{o} was waiting");
                self.settle(o, outcome);
            }
        }
    }

    fn store(&mut self) {
        let Some(safe) = self.tracker.safe_offset() else {
            return;
        };
        let lowest_unsettled = (0..self.read as i64).find(|o| !self.settled.contains_key(o));
        if let Some(u) = lowest_unsettled {
            assert!(safe <= u, "safe offset {safe} passes unsettled {u}");
        } else {
            assert_eq!(safe, self.read as i64, "everything read is settled");
        }
        if let Some(stored) = self.stored {
            assert!(safe >= stored, "safe offset went back: {stored} -> {safe}");
        }
        self.stored = Some(safe);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn keys_apply_in_partition_order_and_offsets_are_safe(
        msgs in proptest::collection::vec(msg(), 1..25),
        steps in proptest::collection::vec(step(), 0..40),
    ) {
        let mut d = Driver {
            msgs: msgs.clone(),
            known: BTreeSet::new(),
            give_up: BTreeSet::new(),
            tracker: Tracker::new(),
            read: 0,
            settled: BTreeMap::new(),
            order: Vec::new(),
            stored: None,
        };
        for step in steps {
            match step {
                Step::Read(n) => d.read(n),
                Step::Retry(n) => d.retry(n),
                Step::Know(k) => { d.known.insert(k); }
                Step::CloseWindows => {
                    let waiting: Vec<i64> = d.tracker.waiting().map(|(o, _)| o).collect();
                    d.give_up.extend(waiting);
                }
            }
            d.store();
            // Between steps nothing is in hand: what is read and not
            // settled waits.
            prop_assert_eq!(d.tracker.in_hand_len(), 0);
            prop_assert_eq!(d.tracker.waiting_len(), d.read - d.settled.len());
        }
        // Everything becomes known; retries until nothing waits.
        d.known.extend(0u8..6);
        d.read(msgs.len());
        let mut rounds = 0;
        while d.tracker.waiting_len() > 0 {
            d.retry(3);
            d.store();
            rounds += 1;
            prop_assert!(rounds <= msgs.len() + 1, "retries make no progress");
        }
        prop_assert_eq!(d.settled.len(), msgs.len(), "everything settled");
        prop_assert_eq!(d.tracker.safe_offset(), Some(msgs.len() as i64));
        // Per key, settling follows offsets.
        for key in 0u8..6 {
            let seq: Vec<i64> = d
                .order
                .iter()
                .copied()
                .filter(|o| d.msgs[*o as usize].keys.contains(&key))
                .collect();
            let mut sorted = seq.clone();
            sorted.sort_unstable();
            prop_assert_eq!(&seq, &sorted, "key {}'s messages settled out of order", key);
        }
        // Dead letters only for messages whose window closed while they
        // needed an unknown key.
        for (o, outcome) in &d.settled {
            if *outcome == Outcome::DeadLettered {
                prop_assert!(d.give_up.contains(o));
            }
        }
    }

    /// A message that names no key of an earlier unsettled message and whose
    /// needs are known applies at once: waiting never holds back what it
    /// need not.
    #[test]
    fn others_flow(
        msgs in proptest::collection::vec(msg(), 1..25),
        known in proptest::collection::btree_set(0u8..6, 0..6),
    ) {
        let mut d = Driver {
            msgs: msgs.clone(),
            known: known.clone(),
            give_up: BTreeSet::new(),
            tracker: Tracker::new(),
            read: 0,
            settled: BTreeMap::new(),
            order: Vec::new(),
            stored: None,
        };
        // One at a time, so that "earlier unsettled" is well defined.
        for o in 0..msgs.len() as i64 {
            let m = &msgs[o as usize];
            let behind = (0..o).any(|e| {
                !d.settled.contains_key(&e)
                    && msgs[e as usize].keys.iter().any(|k| m.keys.contains(k))
            });
            let can = m.needs.iter().all(|k| known.contains(k));
            d.read(1);
            d.store();
            let settled = d.settled.contains_key(&o);
            prop_assert_eq!(settled, !behind && can, "message {} ({:?})", o, m);
        }
    }
}
