//! The window of append messages in flight to one follower, bounded in count and in bytes. Each slot remembers
//! the last index and the bytes of one message; an acknowledgement frees every slot up to its index.

use std::collections::VecDeque;

#[derive(Clone, Debug)]
pub struct Inflights {
    slots: VecDeque<(u64, u64)>,
    bytes: u64,
    count_max: usize,
    bytes_max: u64,
}

impl Inflights {
    pub fn new(count_max: usize, bytes_max: u64) -> Inflights {
        Inflights { slots: VecDeque::new(), bytes: 0, count_max, bytes_max }
    }

    pub fn add(&mut self, last_index: u64, bytes: u64) {
        assert!(!self.full(), "adding to a full inflight window");
        if let Some(&(previous, _)) = self.slots.back() {
            assert!(last_index > previous, "inflight index {last_index} not above {previous}");
        }
        self.slots.push_back((last_index, bytes));
        self.bytes += bytes;
    }

    /// Frees every message whose last index is at most `index`.
    pub fn free_to(&mut self, index: u64) {
        while let Some(&(last, bytes)) = self.slots.front() {
            if last > index {
                break;
            }
            self.slots.pop_front();
            self.bytes -= bytes;
        }
    }

    /// Frees the oldest message: used when a follower answers a heartbeat while the window is full, so that
    /// messages lost in the network cannot stall replication forever (the next append either succeeds or is
    /// rejected and turns the follower back to probing).
    pub fn free_first_one(&mut self) {
        if let Some((_, bytes)) = self.slots.pop_front() {
            self.bytes -= bytes;
        }
    }

    pub fn full(&self) -> bool {
        self.slots.len() >= self.count_max || self.bytes >= self.bytes_max
    }

    pub fn count(&self) -> usize {
        self.slots.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn reset(&mut self) {
        self.slots.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_count_and_bytes_and_freed_by_acks() {
        let mut window = Inflights::new(3, 1000);
        window.add(5, 100);
        window.add(9, 100);
        assert!(!window.full());
        window.add(12, 100);
        assert!(window.full(), "three messages fill a window of three");
        window.free_to(9);
        assert_eq!((window.count(), window.bytes()), (1, 100));
        window.add(20, 900);
        assert!(window.full(), "1000 bytes fill a window of 1000 bytes");
        window.free_to(100);
        assert_eq!((window.count(), window.bytes()), (0, 0));
    }
}
