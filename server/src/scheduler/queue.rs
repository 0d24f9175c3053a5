//! Waiter ordering: priority, then oldest turn start, then arrival; with aging so nobody starves.
//!
//! # The order and the aging rule
//! A waiter's key is `started_at - priority × aging_step` (smaller is served first), with the
//! arrival number breaking ties. So:
//! - within one priority, the oldest `started_at` goes first, then the earliest arrival;
//! - a higher priority goes first unless the lower one's turn started more than
//!   `aging_step × (difference in priority)` earlier. One priority level is worth `aging_step`
//!   of waiting (default 30 s), so a priority-0 waiter overtakes every priority-9 request whose
//!   turn started 9 × 30 s = 4.5 min after its own: no waiter starves while newer ones arrive.
//!
//! The key does not change while a request waits, so the order is a plain `BTreeSet` and every
//! queue operation is O(log n). Effective priority grows continuously with age, without
//! re-sorting.

use std::collections::BTreeSet;

/// Identifies one queued request; also its arrival number (strictly increasing).
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct WaiterId(pub u64);

/// Ordering key: nanoseconds relative to the scheduler's epoch; smaller is served first.
pub type WaitKey = i64;

/// One pool's waiters.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// Admitted waiters in service order.
    ready: BTreeSet<(WaitKey, WaiterId)>,
    /// Admitted waiters in arrival order (for `shed_oldest`).
    by_arrival: BTreeSet<WaiterId>,
    /// Waiters that found the queue full under `on_overflow = "block"`, in arrival order, with their keys.
    blocked: BTreeSet<(WaiterId, WaitKey)>,
}

impl Queue {
    /// How far from either end of the queue [`Queue::push`] counts exactly.
    pub(crate) const EXACT_POSITION: usize = 1024;

    /// Admitted waiters (not counting blocked ones).
    pub(crate) fn depth(&self) -> usize {
        self.ready.len()
    }

    /// Admitted and blocked waiters.
    pub(crate) fn len(&self) -> usize {
        self.ready.len() + self.blocked.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.blocked.is_empty()
    }

    /// The next waiter to serve.
    pub(crate) fn head(&self) -> Option<(WaitKey, WaiterId)> {
        self.ready.first().copied()
    }

    /// Admits a waiter and returns its 0-based position.
    ///
    /// The position is exact when the waiter lands within [`Queue::EXACT_POSITION`] places of either end
    /// of the queue (the common cases: appended behind its peers, or jumping to the front). Deeper in a
    /// long queue it is estimated by interpolating its key between the first and last keys, so that
    /// admitting stays O(log n) instead of counting half the queue.
    pub(crate) fn push(&mut self, key: WaitKey, id: WaiterId) -> u32 {
        self.ready.insert((key, id));
        self.by_arrival.insert(id);
        let entry = (key, id);
        let mut ahead = self.ready.range(..entry);
        let mut behind = self.ready.range(entry..).skip(1);
        for n in 0..Self::EXACT_POSITION {
            match (ahead.next(), behind.next()) {
                (None, _) => return n as u32,
                (_, None) => return (self.ready.len() - 1 - n) as u32,
                _ => {}
            }
        }
        let len = self.ready.len();
        let (first, last) = match (self.ready.first(), self.ready.last()) {
            (Some(f), Some(l)) => (i128::from(f.0), i128::from(l.0)),
            _ => return 0,
        };
        let estimate = if last > first {
            ((i128::from(key) - first) * (len as i128 - 1) / (last - first)) as usize
        } else {
            len / 2
        };
        estimate.clamp(Self::EXACT_POSITION, len - 1 - Self::EXACT_POSITION) as u32
    }

    /// Holds a waiter outside the full queue; returns its position counting the queue ahead of it.
    pub(crate) fn push_blocked(&mut self, key: WaitKey, id: WaiterId) -> u32 {
        self.blocked.insert((id, key));
        (self.ready.len() + self.blocked.len() - 1) as u32
    }

    /// Removes a waiter wherever it is; true if it was there.
    pub(crate) fn remove(&mut self, key: WaitKey, id: WaiterId) -> bool {
        if self.ready.remove(&(key, id)) {
            self.by_arrival.remove(&id);
            true
        } else {
            self.blocked.remove(&(id, key))
        }
    }

    /// The admitted waiter that arrived first.
    pub(crate) fn oldest(&self) -> Option<WaiterId> {
        self.by_arrival.first().copied()
    }

    /// Moves blocked waiters into the queue while it has room.
    pub(crate) fn admit_blocked(&mut self, max_depth: usize) {
        while self.ready.len() < max_depth {
            let Some((id, key)) = self.blocked.pop_first() else {
                break;
            };
            self.ready.insert((key, id));
            self.by_arrival.insert(id);
        }
    }

    /// Every waiter, admitted first (in service order), then blocked ones.
    pub(crate) fn iter(&self) -> impl Iterator<Item = WaiterId> + '_ {
        self.ready.iter().map(|(_, id)| *id).chain(self.blocked.iter().map(|(id, _)| *id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_counts_from_the_nearer_end() {
        let mut q = Queue::default();
        assert_eq!(q.push(10, WaiterId(1)), 0);
        assert_eq!(q.push(20, WaiterId(2)), 1);
        assert_eq!(q.push(30, WaiterId(3)), 2);
        assert_eq!(q.push(5, WaiterId(4)), 0);
        assert_eq!(q.push(15, WaiterId(5)), 2);
        // Equal keys are served by arrival.
        assert_eq!(q.push(15, WaiterId(6)), 3);
        assert_eq!(q.head(), Some((5, WaiterId(4))));
        assert_eq!(q.oldest(), Some(WaiterId(1)));
    }

    #[test]
    fn deep_positions_are_estimated_without_counting() {
        let mut q = Queue::default();
        let n = 3 * Queue::EXACT_POSITION as u64;
        for i in 0..n {
            q.push(10 * i as i64, WaiterId(i));
        }
        // Exactly in the middle of evenly spread keys: the estimate is the true rank.
        let mid = q.push(10 * (n as i64 / 2) + 5, WaiterId(n));
        assert_eq!(mid as u64, n / 2 + 1);
        // Near the ends it is counted exactly.
        assert_eq!(q.push(10 * 5 + 5, WaiterId(n + 1)), 6);
        assert_eq!(q.push(i64::MAX, WaiterId(n + 2)), q.depth() as u32 - 1);
    }

    #[test]
    fn blocked_waiters_enter_in_arrival_order() {
        let mut q = Queue::default();
        q.push(10, WaiterId(1));
        assert_eq!(q.push_blocked(1, WaiterId(2)), 1);
        assert_eq!(q.push_blocked(0, WaiterId(3)), 2);
        assert_eq!(q.depth(), 1);
        assert_eq!(q.len(), 3);
        assert!(q.remove(10, WaiterId(1)));
        q.admit_blocked(1);
        // Only waiter 2 moved: waiter 3 still waits outside the full queue.
        assert_eq!(q.depth(), 1);
        assert_eq!(q.head(), Some((1, WaiterId(2))));
        assert!(q.remove(0, WaiterId(3)));
        assert!(!q.remove(0, WaiterId(3)));
    }
}
