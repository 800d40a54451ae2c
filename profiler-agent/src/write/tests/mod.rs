//! Write path tests against a real local HTTP receiver: every protocol decoded on the
//! receiving side (`protocols`), faults and queueing (`faults`), config and secrets
//! (`config_tests`).

mod config_tests;
mod faults;
mod protocols;
mod receiver;

use std::{
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use super::{
    EndpointConfig, ProfileSeries, Protocol, WriteConfig, WriteConfigError, WriteMetrics, Writer,
};
use crate::labels::Labels;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A series of service `service` whose pprof has one sample of value `value`.
fn series(service: &str, value: i64) -> ProfileSeries {
    ProfileSeries {
        labels: labels(&[("service_name", service), ("pod", "p-1")]),
        pprof_gzip: receiver::pprof_gz(value),
        start: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        end: UNIX_EPOCH + Duration::from_secs(1_700_000_015),
        sample_rate: 99,
        samples: 1,
    }
}

/// An endpoint with test-sized backoff and timeouts.
fn endpoint(url: &str, protocol: Protocol) -> EndpointConfig {
    EndpointConfig {
        url: url.to_string(),
        protocol,
        remote_timeout: Duration::from_secs(5),
        min_backoff_period: Duration::from_millis(10),
        max_backoff_period: Duration::from_millis(40),
        max_backoff_retries: 3,
        ..Default::default()
    }
}

fn start(config: &WriteConfig) -> (Writer, Arc<WriteMetrics>) {
    let metrics = Arc::new(WriteMetrics::default());
    let writer = Writer::start(config, metrics.clone()).expect("a valid config");
    (writer, metrics)
}

fn one_endpoint(ep: EndpointConfig) -> WriteConfig {
    WriteConfig {
        endpoint: vec![ep],
        ..Default::default()
    }
}

fn host_of(url: &str) -> String {
    let u = reqwest::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
}
