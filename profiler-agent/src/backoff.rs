//! Jittered exponential backoff, shared by every component that retries something remote:
//! discovery providers (Docker, Kubernetes) and write endpoints. Many agents restarting
//! together must not retry in lockstep, so every delay is drawn from the upper half of its
//! step.

use std::{
    hash::{BuildHasher as _, RandomState},
    time::{Duration, Instant},
};

/// `min * 2^attempt` capped at `max`, each delay scaled by a random factor in [0.5, 1.0].
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// A failure this long after the previous one starts again from `min`.
    reset_after: Option<Duration>,
    attempt: u32,
    last_failure: Option<Instant>,
    seed: RandomState,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            reset_after: None,
            attempt: 0,
            last_failure: None,
            seed: RandomState::new(),
        }
    }

    /// Starts again from `min` when a failure comes `quiet` or more after the previous one.
    pub fn with_reset_after(mut self, quiet: Duration) -> Self {
        self.reset_after = Some(quiet);
        self
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let now = Instant::now();
        if let (Some(quiet), Some(last)) = (self.reset_after, self.last_failure)
            && now.duration_since(last) >= quiet
        {
            self.attempt = 0;
        }
        self.last_failure = Some(now);
        let base = self
            .min
            .saturating_mul(2u32.saturating_pow(self.attempt.min(30)))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let unit = self.seed.hash_one((self.attempt, now)) as f64 / u64::MAX as f64;
        base.mul_f64(0.5 + 0.5 * unit).max(self.min)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
        self.last_failure = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_within_bounds_and_resets() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let mut b = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = min.saturating_mul(1 << i.min(20)).min(max);
            assert!(
                *d >= (base / 2).max(min) && *d <= base,
                "attempt {i}: {d:?} vs {base:?}"
            );
        }
        assert!(
            delays[11] >= Duration::from_secs(15),
            "capped near the max: {delays:?}"
        );
        assert_eq!(b.attempts(), 12);
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn a_quiet_period_starts_again_from_the_minimum() {
        let min = Duration::from_millis(100);
        let mut b = Backoff::new(min, Duration::from_secs(1)).with_reset_after(Duration::ZERO);
        for _ in 0..5 {
            assert!(b.next_delay() <= min);
        }
        let mut b =
            Backoff::new(min, Duration::from_secs(1)).with_reset_after(Duration::from_secs(3600));
        for want_ms in [100, 200, 400, 800, 1000, 1000, 1000] {
            let d = b.next_delay().as_millis();
            assert!(
                d >= want_ms / 2 && d <= want_ms,
                "{d} ms for a {want_ms} ms step"
            );
        }
    }
}
