//! Bounded LRU caches with pyroscope.ebpf's `cache_rounds` rule: an entry used in the last N
//! rounds (collect intervals) is not evicted, so a working set slightly larger than the cache
//! does not thrash within an interval. Hits, misses and evictions are counted.

use std::hash::Hash;
use std::num::NonZeroUsize;

use lru::LruCache;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub len: usize,
}

pub struct RoundLru<K: Hash + Eq, V> {
    entries: LruCache<K, (V, u64)>,
    capacity: usize,
    rounds: u64,
    round: u64,
    stats: CacheStats,
}

impl<K: Hash + Eq, V: Clone> RoundLru<K, V> {
    pub fn new(capacity: usize, rounds: u64) -> Self {
        let capacity = capacity.max(1);
        Self {
            entries: LruCache::new(NonZeroUsize::new(capacity).expect("max(1)")),
            capacity,
            rounds,
            round: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn get(&mut self, key: &K) -> Option<V> {
        let round = self.round;
        match self.entries.get_mut(key) {
            Some((value, last_used)) => {
                *last_used = round;
                self.stats.hits += 1;
                Some(value.clone())
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    fn protected(&self, last_used: u64) -> bool {
        self.rounds > 0 && last_used + self.rounds > self.round
    }

    pub fn insert(&mut self, key: K, value: V) {
        if self.entries.len() >= self.entries.cap().get() && !self.entries.contains(&key) {
            let oldest_protected = self
                .entries
                .peek_lru()
                .is_some_and(|(_, (_, used))| self.protected(*used));
            if oldest_protected {
                // Everything is in use this round: grow rather than evict.
                let grown = NonZeroUsize::new(self.entries.cap().get() + 1).expect("nonzero");
                self.entries.resize(grown);
            } else if self.entries.pop_lru().is_some() {
                self.stats.evictions += 1;
            }
        }
        self.entries.put(key, (value, self.round));
    }

    /// Drops `key`'s entry (its value went stale), and gives its value back.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.entries.pop(key).map(|(value, _)| value)
    }

    /// Starts a new round and shrinks back toward the configured capacity, evicting entries
    /// no longer protected.
    pub fn next_round(&mut self) {
        self.round += 1;
        while self.entries.len() > self.capacity {
            let unprotected = self
                .entries
                .peek_lru()
                .is_some_and(|(_, (_, used))| !self.protected(*used));
            if !unprotected {
                break;
            }
            self.entries.pop_lru();
            self.stats.evictions += 1;
        }
        let cap = self.entries.len().max(self.capacity);
        self.entries
            .resize(NonZeroUsize::new(cap).expect("capacity >= 1"));
    }

    /// The cached values, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, (value, _))| value)
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            len: self.entries.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lru_without_rounds() {
        let mut c = RoundLru::new(2, 0);
        c.insert(1, "a");
        c.insert(2, "b");
        assert_eq!(c.get(&1), Some("a"));
        c.insert(3, "c"); // evicts 2, the least recently used
        assert_eq!(c.get(&2), None);
        assert_eq!(c.get(&3), Some("c"));
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions, s.len), (2, 1, 1, 2));
    }

    #[test]
    fn entries_used_in_recent_rounds_survive_then_go() {
        let mut c = RoundLru::new(2, 2);
        c.insert(1, ());
        c.insert(2, ());
        c.insert(3, ()); // all used this round: grows to 3
        assert_eq!(c.stats().len, 3);
        assert_eq!(c.stats().evictions, 0);
        c.next_round(); // round 1: still protected (used in round 0, rounds = 2)
        assert_eq!(c.stats().len, 3);
        c.get(&3);
        c.next_round(); // round 2: 1 and 2 last used in round 0 -> evicted down to capacity
        let s = c.stats();
        assert_eq!(s.len, 2);
        assert_eq!(s.evictions, 1);
        assert!(c.get(&3).is_some());
    }

    #[test]
    fn bounded_when_nothing_is_protected() {
        let mut c = RoundLru::new(4, 1);
        for round in 0..10u64 {
            for k in 0..100u64 {
                c.insert(round * 1000 + k, k);
            }
            c.next_round();
            assert!(c.stats().len <= 4, "round {round}: {:?}", c.stats());
        }
    }
}
