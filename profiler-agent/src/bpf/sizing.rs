//! Map sizes derived from how many samples one generation can hold: `sample_rate x CPUs x
//! collect_interval`, with headroom because a drain can start late.

use std::time::Duration;

/// Entries of each per-generation map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Entries of each counts map: at most one new key per sample.
    pub counts_entries: u32,
    /// Entries of each kernel stack trace map.
    pub stack_entries: u32,
    /// Entries of each walked user stack map: one per distinct user stack.
    pub user_stack_entries: u32,
    /// Entries of each Python stack map: a quarter of the user stacks (only samples of
    /// CPython processes have one).
    pub python_stack_entries: u32,
}

/// A drain may run up to one interval late, so a generation can see two intervals of samples.
const LATE_DRAIN_FACTOR: u64 = 2;
/// A sample stores up to two stacks (user and kernel). Sizing buckets for every stack being
/// distinct leaves real workloads, which repeat stacks, far below one bucket in ten used, which
/// keeps bucket collisions (a lost stack, counted) rare at about 1 KiB of kernel memory a bucket.
const STACKS_PER_SAMPLE: u64 = 2;
const MIN_COUNTS: u64 = 1024;
const MIN_STACKS: u64 = 4096;
/// Stack map values are 127 x 8 bytes: past this a map pins more than 128 MiB.
const MAX_STACKS: u64 = 1 << 17;
/// A walked user stack is 1 KiB, and its map is a hash map (no bucket collisions): one entry
/// per sample of a generation is the worst case, capped at 32 MiB a generation.
const MIN_USER_STACKS: u64 = 1024;
const MAX_USER_STACKS: u64 = 1 << 15;
const MAX_COUNTS: u64 = 1 << 20;
const MIN_PYTHON_STACKS: u64 = 256;

impl MapSizes {
    pub fn derive(sample_rate: u64, cpus: usize, interval: Duration) -> Self {
        let interval_ms = interval.as_millis().max(1) as u64;
        let samples = (sample_rate.max(1) * cpus.max(1) as u64 * interval_ms).div_ceil(1000);
        let per_generation = samples * LATE_DRAIN_FACTOR;
        let counts = per_generation
            .clamp(MIN_COUNTS, MAX_COUNTS)
            .next_power_of_two();
        let stacks = (per_generation * STACKS_PER_SAMPLE)
            .next_power_of_two()
            .clamp(MIN_STACKS, MAX_STACKS);
        let user_stacks = per_generation
            .next_power_of_two()
            .clamp(MIN_USER_STACKS, MAX_USER_STACKS);
        Self {
            counts_entries: counts.min(MAX_COUNTS) as u32,
            stack_entries: stacks as u32,
            user_stack_entries: user_stacks as u32,
            python_stack_entries: (user_stacks / 4).max(MIN_PYTHON_STACKS) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_with_rate_cpus_and_interval() {
        let small = MapSizes::derive(97, 2, Duration::from_secs(1));
        let big = MapSizes::derive(97, 64, Duration::from_secs(15));
        assert_eq!(small.counts_entries, 1024);
        assert_eq!(small.stack_entries, 4096);
        // 97 * 64 * 15 * 2 = 186240 samples per generation.
        assert_eq!(big.counts_entries, 262_144);
        assert!(big.counts_entries as u64 >= 97 * 64 * 15 * 2);
        assert_eq!(big.stack_entries, 1 << 17);
    }

    #[test]
    fn default_daemon_on_two_cpus() {
        let s = MapSizes::derive(97, 2, Duration::from_secs(15));
        // 2910 samples, 5820 per generation.
        assert_eq!(s.counts_entries, 8192);
        assert_eq!(s.stack_entries, 16_384);
        assert_eq!(s.user_stack_entries, 8192);
    }

    #[test]
    fn sizes_are_powers_of_two_and_bounded() {
        for rate in [1, 19, 97, 1000, 10_000] {
            for cpus in [0, 1, 3, 256] {
                for secs in [0, 1, 15, 600] {
                    let s = MapSizes::derive(rate, cpus, Duration::from_secs(secs));
                    assert!(s.counts_entries.is_power_of_two(), "{s:?}");
                    assert!(s.stack_entries.is_power_of_two(), "{s:?}");
                    assert!(s.counts_entries as u64 <= MAX_COUNTS);
                    assert!(s.stack_entries as u64 <= MAX_STACKS);
                }
            }
        }
    }
}
