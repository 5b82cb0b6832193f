//! Hands a table's spare capacity back once it holds far fewer entries than at its peak. Hash
//! maps and deques never shrink by themselves, so a burst of 2000 connections left the
//! agent's connection tables at about 330 KiB after every connection had closed.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};

/// Capacity kept regardless: small tables are not worth reallocating.
const KEEP: usize = 256;

pub trait ShrinkWhenSparse {
    /// Shrinks to twice the current length when under a quarter full; the gap between that and
    /// the growth threshold keeps a table whose size hovers from reallocating back and forth.
    fn shrink_when_sparse(&mut self);
}

impl<K: Eq + Hash, V, S: BuildHasher> ShrinkWhenSparse for HashMap<K, V, S> {
    fn shrink_when_sparse(&mut self) {
        if self.capacity() > KEEP && self.len() < self.capacity() / 4 {
            self.shrink_to((self.len() * 2).max(KEEP));
        }
    }
}

impl<T> ShrinkWhenSparse for VecDeque<T> {
    fn shrink_when_sparse(&mut self) {
        if self.capacity() > KEEP && self.len() < self.capacity() / 4 {
            self.shrink_to((self.len() * 2).max(KEEP));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_table_gives_its_peak_capacity_back() {
        let mut map: HashMap<i64, [u8; 32]> = (0..10_000).map(|i| (i, [0; 32])).collect();
        let peak = map.capacity();
        for i in 0..9_990 {
            map.remove(&i);
            map.shrink_when_sparse();
        }
        assert!(map.capacity() < peak / 16, "{} of {peak}", map.capacity());
        assert!(map.capacity() >= KEEP);
        assert_eq!(map.len(), 10);
    }

    #[test]
    fn a_busy_table_keeps_its_capacity() {
        let mut queue: VecDeque<u64> = (0..4096).collect();
        let peak = queue.capacity();
        for _ in 0..2048 {
            queue.pop_front();
            queue.shrink_when_sparse();
        }
        assert_eq!(queue.capacity(), peak);
    }
}
