//! A bounded flow table with least-recently-used eviction and idle expiry.
//!
//! One table per listener socket, owned by that listener's task: no lock anywhere.
//! Entries live in a slab linked in recency order (head = most recently used), so a
//! lookup that touches a flow, an insertion, an eviction and each expiry are O(1) and
//! allocation-free once the slab has grown to the table's size. The table never holds
//! more than its capacity: inserting into a full table hands back the least recently
//! used entry, which the caller closes and counts.
//!
//! Time is a caller-supplied tick count (milliseconds in the daemon), so the table is
//! deterministic under test.
use std::collections::HashMap;
use std::hash::Hash;

const NIL: usize = usize::MAX;

struct Slot<K, V> {
    entry: Option<(K, V)>,
    last_used: u64,
    /// Towards the head (more recent).
    prev: usize,
    /// Towards the tail (less recent).
    next: usize,
}

pub struct FlowTable<K, V> {
    index: HashMap<K, usize>,
    slots: Vec<Slot<K, V>>,
    free: Vec<usize>,
    head: usize,
    tail: usize,
    capacity: usize,
}

impl<K: Hash + Eq + Copy, V> FlowTable<K, V> {
    /// A table holding at most `capacity` flows (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        FlowTable {
            // Reserve a little: the slab grows with use, not up front, so a table
            // sized for 65536 flows costs nothing until they exist.
            index: HashMap::with_capacity(capacity.min(1024)),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The flow for `key`, marked as used at `now`.
    pub fn get_mut(&mut self, key: &K, now: u64) -> Option<&mut V> {
        let i = *self.index.get(key)?;
        self.unlink(i);
        self.push_front(i);
        let slot = self.slots.get_mut(i)?;
        slot.last_used = slot.last_used.max(now);
        slot.entry.as_mut().map(|(_, v)| v)
    }

    /// The flow for `key`, its recency untouched.
    pub fn peek_mut(&mut self, key: &K) -> Option<&mut V> {
        let i = *self.index.get(key)?;
        self.slots.get_mut(i)?.entry.as_mut().map(|(_, v)| v)
    }

    /// Adds a flow used at `now`. Returns the entry it pushed out: the previous value
    /// for `key` if there was one, otherwise the least recently used flow when the
    /// table was full.
    pub fn insert(&mut self, key: K, value: V, now: u64) -> Option<(K, V)> {
        if let Some(&i) = self.index.get(&key) {
            self.unlink(i);
            self.push_front(i);
            let slot = self.slots.get_mut(i)?;
            slot.last_used = now;
            return slot.entry.replace((key, value));
        }
        let evicted = if self.index.len() >= self.capacity {
            self.pop_lru()
        } else {
            None
        };
        let slot = Slot {
            entry: Some((key, value)),
            last_used: now,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                if let Some(s) = self.slots.get_mut(i) {
                    *s = slot;
                }
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.index.insert(key, i);
        self.push_front(i);
        evicted
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.index.remove(key)?;
        self.release(i).map(|(_, v)| v)
    }

    /// Removes and returns the least recently used flow.
    pub fn pop_lru(&mut self) -> Option<(K, V)> {
        let i = self.tail;
        let (k, v) = self.release(i)?;
        self.index.remove(&k);
        Some((k, v))
    }

    /// Removes every flow idle for at least `idle` ticks at `now`, oldest first,
    /// handing each to `expired`. Stops at the first flow still in use, so the cost is
    /// proportional to what expires.
    ///
    /// `activity` reports use the table did not see (answers relayed by another task):
    /// a flow whose `activity` is recent enough is kept and moved to the front with
    /// that time. Such a flow may then sit in front of flows used later than it, so it
    /// can outlive `idle` until they expire: idle flows are gone within `2 × idle`.
    pub fn expire(
        &mut self,
        now: u64,
        idle: u64,
        activity: impl Fn(&V) -> u64,
        mut expired: impl FnMut(K, V),
    ) {
        // Each flow is looked at most twice (once refreshed, then expired or kept).
        let mut budget = self.len().saturating_mul(2);
        while budget > 0 {
            budget -= 1;
            let i = self.tail;
            let Some(slot) = self.slots.get_mut(i) else {
                return;
            };
            let Some((_, v)) = slot.entry.as_ref() else {
                return;
            };
            if now.saturating_sub(slot.last_used) < idle {
                return;
            }
            let seen = activity(v);
            if seen > slot.last_used && now.saturating_sub(seen) < idle {
                slot.last_used = seen;
                self.unlink(i);
                self.push_front(i);
                continue;
            }
            if let Some((k, v)) = self.pop_lru() {
                expired(k, v);
            }
        }
    }

    /// For a full table about to evict: removes and returns the flow idle longest
    /// among the `looks` least recently used, by `last_seen(last_used, value)`: the
    /// later of the table's time and use the table did not see, on whatever scale
    /// the caller likes (a finer one than the table's ticks tells apart flows used
    /// within one tick). Each look may cost the caller a lookup, hence the bound;
    /// nothing is reordered, so the table's order stays its own (a flow busy
    /// elsewhere stays at the tail, to be looked at again).
    pub fn pop_idlest(
        &mut self,
        looks: usize,
        last_seen: impl Fn(u64, &V) -> u64,
    ) -> Option<(K, V)> {
        let mut i = self.tail;
        let mut idlest: Option<(usize, u64)> = None;
        for _ in 0..looks.max(1) {
            let Some(slot) = self.slots.get(i) else {
                break;
            };
            let Some((_, v)) = slot.entry.as_ref() else {
                break;
            };
            let seen = last_seen(slot.last_used, v);
            if idlest.is_none_or(|(_, t)| seen < t) {
                idlest = Some((i, seen));
            }
            i = slot.prev;
        }
        let (i, _) = idlest?;
        let (k, v) = self.release(i)?;
        self.index.remove(&k);
        Some((k, v))
    }

    /// Every flow, in no particular order (for shutdown and tests).
    pub fn drain(&mut self) -> impl Iterator<Item = (K, V)> + '_ {
        self.index.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
        self.slots.drain(..).filter_map(|s| s.entry)
    }

    fn release(&mut self, i: usize) -> Option<(K, V)> {
        let entry = self.slots.get_mut(i)?.entry.take()?;
        self.unlink(i);
        self.free.push(i);
        Some(entry)
    }

    fn unlink(&mut self, i: usize) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let (prev, next) = (slot.prev, slot.next);
        slot.prev = NIL;
        slot.next = NIL;
        match self.slots.get_mut(prev) {
            Some(p) => p.next = next,
            None => {
                if self.head == i {
                    self.head = next;
                }
            }
        }
        match self.slots.get_mut(next) {
            Some(n) => n.prev = prev,
            None => {
                if self.tail == i {
                    self.tail = prev;
                }
            }
        }
    }

    fn push_front(&mut self, i: usize) {
        let old = self.head;
        if let Some(slot) = self.slots.get_mut(i) {
            slot.prev = NIL;
            slot.next = old;
        }
        if let Some(h) = self.slots.get_mut(old) {
            h.prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn keys<V>(t: &FlowTable<u32, V>) -> Vec<u32> {
        // Head to tail: most to least recently used.
        let mut out = Vec::new();
        let mut i = t.head;
        while let Some(s) = t.slots.get(i) {
            out.push(s.entry.as_ref().unwrap().0);
            i = s.next;
        }
        out
    }

    #[test]
    fn full_table_evicts_the_least_recently_used() {
        let mut t = FlowTable::new(3);
        assert!(t.insert(1, "a", 0).is_none());
        assert!(t.insert(2, "b", 1).is_none());
        assert!(t.insert(3, "c", 2).is_none());
        // Touching 1 makes 2 the oldest.
        assert_eq!(t.get_mut(&1, 3), Some(&mut "a"));
        assert_eq!(keys(&t), [1, 3, 2]);
        assert_eq!(t.insert(4, "d", 4), Some((2, "b")));
        assert_eq!(t.len(), 3);
        assert!(t.get_mut(&2, 5).is_none());
        assert_eq!(t.insert(5, "e", 6), Some((3, "c")));
        assert_eq!(keys(&t), [5, 4, 1]);
    }

    #[test]
    fn never_grows_beyond_capacity_and_reuses_slots() {
        let mut t = FlowTable::new(100);
        for i in 0..10_000u32 {
            t.insert(i, i, u64::from(i));
            assert!(t.len() <= 100);
        }
        assert_eq!(t.len(), 100);
        assert!(t.slots.len() <= 101, "slab grew to {}", t.slots.len());
        assert_eq!(keys(&t), (9900..10_000).rev().collect::<Vec<_>>());
    }

    #[test]
    fn insert_of_an_existing_key_replaces_without_evicting() {
        let mut t = FlowTable::new(2);
        t.insert(1, "a", 0);
        t.insert(2, "b", 0);
        assert_eq!(t.insert(1, "A", 1), Some((1, "a")));
        assert_eq!(t.len(), 2);
        assert_eq!(keys(&t), [1, 2]);
    }

    #[test]
    fn expiry_removes_idle_flows_oldest_first_and_keeps_fresh_ones() {
        let mut t = FlowTable::new(10);
        for (k, at) in [(1, 0), (2, 10), (3, 20), (4, 30)] {
            t.insert(k, (), at);
        }
        t.get_mut(&1, 25);
        let mut gone = Vec::new();
        t.expire(40, 15, |_| 0, |k, _| gone.push(k));
        // 2 (idle 30) and 3 (idle 20) expire; 1 was used at 25, 4 at 30.
        assert_eq!(gone, [2, 3]);
        assert_eq!(keys(&t), [1, 4]);
        t.expire(1000, 15, |_| 0, |k, _| gone.push(k));
        assert_eq!(gone, [2, 3, 4, 1]);
        assert!(t.is_empty());
        // An empty table and a zero budget are fine.
        t.expire(2000, 15, |_| 0, |_, _| panic!("nothing to expire"));
    }

    #[test]
    fn activity_seen_elsewhere_keeps_a_flow_alive() {
        let mut t = FlowTable::new(10);
        let replied = Cell::new(0u64);
        t.insert(1, &replied, 0);
        t.insert(2, &replied, 5);
        replied.set(90);
        let mut gone = Vec::new();
        t.expire(100, 50, |v| v.get(), |k, _| gone.push(k));
        assert!(gone.is_empty(), "answers at 90 keep both alive");
        replied.set(0);
        t.expire(141, 50, |v| v.get(), |k, _| gone.push(k));
        gone.sort();
        assert_eq!(gone, [1, 2]);
    }

    #[test]
    fn the_idlest_of_the_tail_is_evicted_and_the_order_kept() {
        let mut t = FlowTable::new(4);
        let seen: [Cell<u64>; 5] = Default::default();
        for k in 0..4u32 {
            t.insert(k, k as usize, u64::from(k));
        }
        // 0 and 1 were busy elsewhere at 50 and 60; 2 was not, 3 is the newest.
        seen[0].set(50);
        seen[1].set(60);
        let activity = |used: u64, v: &usize| used.max(seen[*v].get());
        assert_eq!(t.pop_idlest(8, activity), Some((2, 2)));
        assert_eq!(keys(&t), [3, 1, 0], "nothing reordered");
        // Only `looks` flows are looked at: of 0 and 1, 0 was idle longer.
        t.insert(4, 4, 70);
        assert_eq!(t.pop_idlest(2, activity), Some((0, 0)));
        // Nothing busy elsewhere: the least recently used, as insert() would.
        assert_eq!(t.pop_idlest(8, |used, _| used), Some((1, 1)));
        assert_eq!(keys(&t), [4, 3]);
        t.drain().for_each(drop);
        assert_eq!(t.pop_idlest(8, activity), None);
    }

    #[test]
    fn remove_and_drain() {
        let mut t = FlowTable::new(4);
        for k in 0..4 {
            t.insert(k, k, 0);
        }
        assert_eq!(t.remove(&2), Some(2));
        assert_eq!(t.remove(&2), None);
        assert_eq!(keys(&t), [3, 1, 0]);
        assert_eq!(t.pop_lru(), Some((0, 0)));
        let mut rest: Vec<_> = t.drain().collect();
        rest.sort();
        assert_eq!(rest, [(1, 1), (3, 3)]);
        assert!(t.is_empty());
        t.insert(9, 9, 0);
        assert_eq!(keys(&t), [9]);
    }
}
