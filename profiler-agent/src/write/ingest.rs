//! Pyroscope legacy ingest (`protocol = "ingest"`): one
//! `POST <url>/ingest?name=<service_name>{k=v,...}&from=&until=&format=pprof&sampleRate=&spyName=ebpfspy`
//! per series, the pprof in the multipart field `profile` (file `profile.pprof`).
//!
//! The pprof is sent gzipped as built: Pyroscope's ingest handler
//! (pkg/og/convert/pprof, `RawProfile.loadPprofFromForm` then `DecodePool`) detects and
//! inflates gzip itself. The `name` is a segment key (pkg/og/storage/segment `ParseKey`):
//! it has no escaping, so characters that end a key or value there (`{`, `}`, `,`, `=`)
//! are replaced by `_`, and label names keep only `[A-Za-z0-9_.]`.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    EndpointConfig, ProfileSeries, ProfileSink, SendFuture, WriteConfigError,
    http::{HttpEndpoint, pprof_part},
};

pub const INGEST_PATH: &str = "ingest";

/// The ingest sink of one endpoint.
pub struct IngestSink {
    name: String,
    http: HttpEndpoint,
    url: reqwest::Url,
}

impl IngestSink {
    pub fn new(config: &EndpointConfig, at: &str, name: String) -> Result<Self, WriteConfigError> {
        let http = HttpEndpoint::new(config, at)?;
        let url = http.join(INGEST_PATH);
        Ok(Self { name, http, url })
    }

    /// The request URL of one series.
    pub fn url_for(&self, series: &ProfileSeries) -> reqwest::Url {
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("name", &segment_key(series))
            .append_pair("from", &unix_seconds(series.start).to_string())
            .append_pair("until", &unix_seconds(series.end).to_string())
            .append_pair("format", "pprof")
            .append_pair("sampleRate", &series.sample_rate.to_string())
            .append_pair("spyName", "ebpfspy");
        url
    }
}

pub(crate) fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// `service_name{k=v,...}` with every label but `service_name` and `__name__`.
pub fn segment_key(series: &ProfileSeries) -> String {
    let app = clean_value(series.service_name());
    let labels: Vec<String> = series
        .labels
        .iter()
        .filter(|(k, _)| k.as_str() != "service_name" && k.as_str() != "__name__")
        .map(|(k, v)| format!("{}={}", clean_name(k), clean_value(v)))
        .collect();
    format!("{app}{{{}}}", labels.join(","))
}

fn clean_value(v: &str) -> String {
    v.chars()
        .map(|c| {
            if matches!(c, '{' | '}' | ',' | '=') {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn clean_name(k: &str) -> String {
    k.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl ProfileSink for IngestSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn per_series(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, batch: &'a [ProfileSeries]) -> SendFuture<'a> {
        Box::pin(self.http.send_each(batch, |series| {
            let form = reqwest::multipart::Form::new()
                .part("profile", pprof_part(series, "profile.pprof"));
            self.http.post(self.url_for(series)).multipart(form)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_key_escapes_what_the_parser_would_split_on() {
        let series = ProfileSeries {
            labels: [
                ("service_name", "web{1}"),
                ("__name__", "process_cpu"),
                ("pod", "a,b=c"),
                ("k8s-ns", "default"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            pprof_gzip: bytes::Bytes::new(),
            start: UNIX_EPOCH,
            end: UNIX_EPOCH,
            sample_rate: 97,
            samples: 0,
        };
        assert_eq!(segment_key(&series), "web_1_{k8s_ns=default,pod=a_b_c}");
    }
}
