//! One deadline structure for every timer of the server (allocations, permissions, channel
//! bindings, reservations, cached transactions): a binary heap with lazy deletion. A refresh
//! pushes a new entry; an entry whose object has gone or whose deadline moved is skipped when
//! it surfaces. There is never a timer per object in the IO layer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// What a deadline belongs to.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum TimerKey {
    /// An allocation (slab index, generation).
    Allocation(u32, u32),
    /// A reservation token's held port.
    Reservation([u8; 8]),
    /// A cached transaction response.
    Transaction(u64),
}

#[derive(Default, Debug)]
pub(crate) struct Deadlines {
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
}

impl Deadlines {
    pub(crate) fn push(&mut self, at: Instant, key: TimerKey) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest deadline (possibly stale: a stale wake-up is harmless).
    pub(crate) fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _))| *t)
    }

    /// Pops one entry due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(Instant, TimerKey)> {
        match self.heap.peek() {
            Some(Reverse((t, _))) if *t <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }
}
