//! The latest interval's stacks of each service, for the flame graph page: published by the
//! pipeline thread once per interval, read by the HTTP server. A service with no samples for
//! [`STALE_INTERVALS`] intervals is pruned, so services with ever-new names (containers,
//! executables) cannot grow the map without end; the pipeline prunes the service's metric
//! series with it. Each profile carries its flame graph, rendered at most once, on the first
//! request: a new interval's profile comes with an empty slot, which replaces the cache.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use tokio::sync::OnceCell;

/// Intervals without samples after which a service leaves the page and its per-service
/// metric series are removed: 5 intervals (75 s at the default 15 s), so the last values of
/// a series stay visible to scrapes as slow as a quarter of that.
pub const STALE_INTERVALS: u64 = 5;

/// One service's stacks from its latest interval with samples.
#[derive(Debug, Default)]
pub struct ServiceProfile {
    /// Unix seconds when the interval was built.
    pub collected_at: u64,
    /// Root first, `;`-separated, heaviest first ([`crate::profile::folded`]).
    pub folded: Vec<(String, u64)>,
    pub samples: u64,
    /// The flame graph of `folded`, or why it could not be rendered; filled on first use.
    pub svg: OnceCell<Result<Bytes, String>>,
}

impl ServiceProfile {
    pub fn new(collected_at: u64, folded: Vec<(String, u64)>, samples: u64) -> Self {
        Self {
            collected_at,
            folded,
            samples,
            svg: OnceCell::new(),
        }
    }
}

/// A service's entry on the page, as the index lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSummary {
    pub name: String,
    pub samples: u64,
    pub collected_at: u64,
}

/// Shared between the pipeline thread (writer) and the server (readers); cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct LatestProfiles {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Intervals published so far.
    interval: u64,
    services: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    /// The interval this service last had samples in.
    last_seen: u64,
    profile: Arc<ServiceProfile>,
}

impl LatestProfiles {
    /// Records one interval: these services had samples (their profiles replace the previous
    /// ones, and with them the cached graphs); every other service has one interval more
    /// without. Returns the services pruned now, for their metric series to go too.
    pub fn publish(&self, profiles: Vec<(String, ServiceProfile)>) -> Vec<String> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.interval += 1;
        let interval = inner.interval;
        for (name, profile) in profiles {
            let entry = Entry {
                last_seen: interval,
                profile: Arc::new(profile),
            };
            inner.services.insert(name, entry);
        }
        let mut pruned = Vec::new();
        inner.services.retain(|name, entry| {
            let keep = interval - entry.last_seen < STALE_INTERVALS;
            if !keep {
                pruned.push(name.clone());
            }
            keep
        });
        pruned
    }

    /// A service's latest profile.
    pub fn get(&self, service: &str) -> Option<Arc<ServiceProfile>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.services.get(service).map(|e| e.profile.clone())
    }

    /// Every service on the page, by name.
    pub fn summaries(&self) -> Vec<ServiceSummary> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .services
            .iter()
            .map(|(name, e)| ServiceSummary {
                name: name.clone(),
                samples: e.profile.samples,
                collected_at: e.profile.collected_at,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(samples: u64) -> ServiceProfile {
        ServiceProfile::new(1, vec![("main".into(), samples)], samples)
    }

    #[test]
    fn a_service_goes_after_stale_intervals_without_samples() {
        let latest = LatestProfiles::default();
        assert!(
            latest
                .publish(vec![("a".into(), profile(1)), ("b".into(), profile(2))])
                .is_empty()
        );
        // `a` keeps having samples; `b` has none from now on.
        for _ in 1..STALE_INTERVALS {
            assert!(latest.publish(vec![("a".into(), profile(3))]).is_empty());
            assert!(latest.get("b").is_some(), "b stays while not yet stale");
        }
        assert_eq!(latest.publish(vec![("a".into(), profile(4))]), ["b"]);
        assert!(latest.get("b").is_none());
        assert_eq!(latest.get("a").unwrap().samples, 4);
        // Intervals with no samples at all age services too.
        for _ in 1..STALE_INTERVALS {
            assert!(latest.publish(Vec::new()).is_empty());
        }
        assert_eq!(latest.publish(Vec::new()), ["a"]);
        assert!(latest.is_empty());
    }

    #[test]
    fn ever_new_service_names_stay_bounded() {
        let latest = LatestProfiles::default();
        let mut pruned = 0;
        for i in 0..1000 {
            let names = (0..10)
                .map(|j| (format!("svc-{i}-{j}"), profile(1)))
                .collect();
            pruned += latest.publish(names).len();
            assert!(
                latest.len() <= 10 * STALE_INTERVALS as usize,
                "{}",
                latest.len()
            );
        }
        assert_eq!(latest.len(), 10 * STALE_INTERVALS as usize);
        assert_eq!(pruned, 10 * (1000 - STALE_INTERVALS as usize));
    }

    #[test]
    fn a_new_interval_replaces_the_cached_graph() {
        let latest = LatestProfiles::default();
        latest.publish(vec![("a".into(), profile(1))]);
        let first = latest.get("a").unwrap();
        first.svg.set(Ok(Bytes::from_static(b"<svg/>"))).unwrap();
        assert!(latest.get("a").unwrap().svg.get().is_some(), "cached");
        latest.publish(vec![("a".into(), profile(2))]);
        assert!(latest.get("a").unwrap().svg.get().is_none(), "replaced");
        // An interval without samples of `a` keeps its profile and its graph.
        latest.get("a").unwrap().svg.set(Ok(Bytes::new())).unwrap();
        latest.publish(Vec::new());
        assert!(latest.get("a").unwrap().svg.get().is_some());
    }
}
