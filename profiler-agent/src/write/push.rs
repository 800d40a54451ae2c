//! Pyroscope Connect push (`protocol = "push"`, what pyroscope.write speaks):
//! `POST <url>/push.v1.PusherService/Push` with a protobuf `PushRequest`, Connect unary over
//! HTTP/1.1 or HTTP/2. The messages are declared here with prost derives (push.proto's
//! field numbers). Unlike Alloy, which sends one series per request, the whole batch goes in
//! one request: one round trip per interval, and all-or-nothing retries.

use std::hash::{BuildHasher as _, RandomState};

use prost::Message as _;

use super::{
    EndpointConfig, ProfileSeries, ProfileSink, SendFuture, WriteConfigError, http::HttpEndpoint,
};

#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    pub series: Vec<RawProfileSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RawProfileSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<LabelPair>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<RawSample>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RawSample {
    /// A gzipped (or plain) pprof.
    #[prost(bytes = "bytes", tag = "1")]
    pub raw_profile: bytes::Bytes,
    /// A unique id (uuid form), letting the server drop duplicates of a retried request.
    #[prost(string, tag = "2")]
    pub id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelPair {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

pub const PUSH_PATH: &str = "push.v1.PusherService/Push";

/// The push sink of one endpoint.
pub struct PushSink {
    name: String,
    http: HttpEndpoint,
    url: reqwest::Url,
}

impl PushSink {
    pub fn new(config: &EndpointConfig, at: &str, name: String) -> Result<Self, WriteConfigError> {
        let http = HttpEndpoint::new(config, at)?;
        let url = http.join(PUSH_PATH);
        Ok(Self { name, http, url })
    }
}

/// The request body of one batch.
pub fn encode(batch: &[ProfileSeries]) -> Vec<u8> {
    let seed = RandomState::new();
    let req = PushRequest {
        series: batch
            .iter()
            .enumerate()
            .map(|(i, s)| RawProfileSeries {
                labels: s
                    .labels
                    .iter()
                    .map(|(name, value)| LabelPair {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                samples: vec![RawSample {
                    raw_profile: s.pprof_gzip.clone(),
                    id: random_uuid(&seed, i as u64),
                }],
            })
            .collect(),
    };
    req.encode_to_vec()
}

/// A random version-4 UUID string (no uuid crate: 122 random bits from the std hasher's
/// per-process random keys are all the server needs to tell requests apart).
fn random_uuid(seed: &RandomState, n: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let hi = seed.hash_one((n, now, 1u8));
    let lo = seed.hash_one((n, now, 2u8));
    let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x4000;
    let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

impl ProfileSink for PushSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn send<'a>(&'a self, batch: &'a [ProfileSeries]) -> SendFuture<'a> {
        Box::pin(async move {
            let body = encode(batch);
            let req = self
                .http
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/proto")
                .header("Connect-Protocol-Version", "1")
                .body(body);
            self.http.execute(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_v4_and_distinct() {
        let seed = RandomState::new();
        let a = random_uuid(&seed, 0);
        let b = random_uuid(&seed, 1);
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4", "{a}");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }
}
