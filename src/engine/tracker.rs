//! The waiting rule of one partition (docs/contract.md §5, "Late
//! references"; docs/design.md, "Late references"), kept apart from Kafka,
//! the database and time so that it can be tested on its own
//! (tests/unit/tracker_props.rs checks it against a model). A message's
//! keys are its SKU and batch references. The offset that is safe to store
//! never passes a message that is not settled yet (in hand or waiting), so
//! a crash sees it again.
//!
//! The tracker does not run anything: the partition task asks it whether a
//! new message may go ahead ([`Tracker::admit`]), tells it what became of the
//! messages it handled ([`Tracker::settle`], [`Tracker::defer`]), and takes the
//! waiting messages to try again, in order, a few at a time
//! ([`Tracker::retry_batch`]). Within one batch the same rule applies message
//! by message: [`ChunkGate`], kept with the batch processor.
//!
//! [`ChunkGate`]: crate::service_layer::chunk::ChunkGate

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;

/// One partition's messages in hand and waiting. `K` is a key (SKU or batch),
/// `T` what is kept of a waiting message until it is tried again.
#[derive(Debug)]
pub struct Tracker<K, T> {
    /// Admitted and not settled nor waiting: the batch being handled.
    in_hand: BTreeSet<i64>,
    /// Waiting messages, in offset order.
    waiting: BTreeMap<i64, Waiting<K, T>>,
    /// How many waiting messages name each key.
    held: HashMap<K, usize>,
    /// The offset after the last message admitted.
    next: Option<i64>,
}

#[derive(Debug)]
struct Waiting<K, T> {
    keys: Vec<K>,
    item: T,
}

impl<K: Eq + Hash + Clone, T> Default for Tracker<K, T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone, T> Tracker<K, T> {
    pub fn new() -> Self {
        Self {
            in_hand: BTreeSet::new(),
            waiting: BTreeMap::new(),
            held: HashMap::new(),
            next: None,
        }
    }

    /// A message read from the partition, in offset order. `Some(item)`: it
    /// may be handled now (it is in hand until settled or deferred). `None`:
    /// it names a key of a waiting message and waits behind it, kept here.
    pub fn admit(&mut self, offset: i64, keys: Vec<K>, item: T) -> Option<T> {
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
        if keys.iter().any(|k| self.held.contains_key(k)) {
            self.wait(offset, keys, item);
            None
        } else {
            self.in_hand.insert(offset);
            Some(item)
        }
    }

    /// The message is done (applied, a duplicate, or dead-lettered): in hand,
    /// or waiting and tried again.
    /// Returns what was kept of it, if it was waiting.
    pub fn settle(&mut self, offset: i64) -> Option<T> {
        self.in_hand.remove(&offset);
        let w = self.waiting.remove(&offset)?;
        self.release(&w.keys);
        Some(w.item)
    }

    /// A message in hand was deferred: it now waits, holding its keys.
    pub fn defer(&mut self, offset: i64, keys: Vec<K>, item: T) {
        self.in_hand.remove(&offset);
        self.wait(offset, keys, item);
    }

    /// The first `max` waiting messages, in offset order, to try again in
    /// one batch (with a [`ChunkGate`](crate::service_layer::chunk::ChunkGate)). They stay waiting, and keep holding
    /// their keys, until [`Self::settle`]d.
    pub fn retry_batch(&self, max: usize) -> Vec<(i64, &T)> {
        self.waiting
            .iter()
            .take(max)
            .map(|(offset, w)| (*offset, &w.item))
            .collect()
    }

    /// Every waiting message, in offset order.
    pub fn waiting(&self) -> impl Iterator<Item = (i64, &T)> {
        self.waiting.iter().map(|(o, w)| (*o, &w.item))
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    pub fn in_hand_len(&self) -> usize {
        self.in_hand.len()
    }

    /// The offset to store (the next one to read after a restart): the
    /// lowest message not settled, else the one after the last admitted.
    pub fn safe_offset(&self) -> Option<i64> {
        let first_in_hand = self.in_hand.first().copied();
        let first_waiting = self.waiting.keys().next().copied();
        match (first_in_hand, first_waiting) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (Some(a), None) | (None, Some(a)) => Some(a),
            (None, None) => self.next,
        }
    }

    /// Drops everything (the partition was revoked); what was not settled is
    /// read again by whoever owns the partition next.
    pub(crate) fn clear(&mut self) {
        self.in_hand.clear();
        self.waiting.clear();
        self.held.clear();
    }

    fn wait(&mut self, offset: i64, keys: Vec<K>, item: T) {
        for k in unique(&keys) {
            *self.held.entry(k.clone()).or_insert(0) += 1;
        }
        if let Some(old) = self.waiting.insert(offset, Waiting { keys, item }) {
            // The same offset twice: undo the first one's hold.
            self.release(&old.keys);
        }
    }

    fn release(&mut self, keys: &[K]) {
        for k in unique(keys) {
            if let Some(n) = self.held.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(k);
                }
            }
        }
    }
}

fn unique<K: Eq + Hash>(keys: &[K]) -> impl Iterator<Item = &K> {
    let mut seen = HashSet::new();
    keys.iter().filter(move |k| seen.insert(*k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_behind_a_waiting_one_with_a_shared_key_waits() {
        let mut t: Tracker<&str, i64> = Tracker::new();
        assert_eq!(t.admit(0, vec!["a"], 0), Some(0));
        t.defer(0, vec!["a"], 0);
        assert_eq!(t.admit(1, vec!["b"], 1), Some(1), "other keys flow");
        assert_eq!(t.admit(2, vec!["b", "a"], 2), None, "shares a");
        assert_eq!(t.admit(3, vec!["b"], 3), None, "shares b with 2");
        assert_eq!(t.safe_offset(), Some(0));
        t.settle(1);
        assert_eq!(t.safe_offset(), Some(0));
        let batch: Vec<i64> = t.retry_batch(10).into_iter().map(|(o, _)| o).collect();
        assert_eq!(batch, vec![0, 2, 3]);
        t.settle(0);
        assert_eq!(t.safe_offset(), Some(2));
        t.settle(2);
        t.settle(3);
        assert_eq!(t.safe_offset(), Some(4));
        assert_eq!(t.admit(4, vec!["a", "b"], 4), Some(4), "nothing held now");
    }
}
