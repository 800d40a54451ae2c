//! DataKit profiling input (`protocol = "datakit"`): one `POST <url>/profiling/v1/input`
//! per series, in the ddtrace-compatible multipart form DataKit's `profile` input accepts
//! (docs: https://docs.guance.com/en/integrations/profile; parsing in GuanceCloud/datakit
//! internal/plugins/inputs/profile/metrics/resolve.go, `ParseMetadata`):
//!
//! - part `event`, file `event.json`, `application/json`: `{"attachments": ["auto.pprof"],
//!   "tags_profiler": "k:v,k:v", "start": RFC 3339, "end": RFC 3339, "family", "format":
//!   "pprof", "profiler", "version": "4"}`; `tags_profiler` is split on `,` then on the
//!   first `:`, and carries `service` (the service name) plus every label;
//! - part `auto.pprof`, file `auto.pprof`: the pprof, gzipped (DataKit parses it with
//!   google/pprof, which inflates gzip).

use super::{
    EndpointConfig, ProfileSeries, ProfileSink, SendFuture, WriteConfigError,
    http::{HttpEndpoint, pprof_part},
};

pub const DATAKIT_PATH: &str = "profiling/v1/input";
pub const ATTACHMENT: &str = "auto.pprof";

/// The DataKit sink of one endpoint.
pub struct DatakitSink {
    name: String,
    http: HttpEndpoint,
    url: reqwest::Url,
}

impl DatakitSink {
    pub fn new(config: &EndpointConfig, at: &str, name: String) -> Result<Self, WriteConfigError> {
        let http = HttpEndpoint::new(config, at)?;
        let url = http.join(DATAKIT_PATH);
        Ok(Self { name, http, url })
    }
}

/// The `event.json` of one series.
pub fn event_json(series: &ProfileSeries) -> serde_json::Value {
    let mut tags = vec![format!("service:{}", clean(series.service_name()))];
    for (k, v) in &series.labels {
        if k == "__name__" || k == "service_name" || k == "service" {
            continue;
        }
        tags.push(format!("{}:{}", clean(k).replace(':', "_"), clean(v)));
    }
    serde_json::json!({
        "attachments": [ATTACHMENT],
        "tags_profiler": tags.join(","),
        "start": humantime::format_rfc3339_nanos(series.start).to_string(),
        "end": humantime::format_rfc3339_nanos(series.end).to_string(),
        "family": "ebpf",
        "format": "pprof",
        "profiler": "profiler-agent",
        "version": "4",
    })
}

/// Tags are split on `,`.
fn clean(s: &str) -> String {
    s.replace(',', "_")
}

impl ProfileSink for DatakitSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn per_series(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, batch: &'a [ProfileSeries]) -> SendFuture<'a> {
        Box::pin(self.http.send_each(batch, |series| {
            let event =
                reqwest::multipart::Part::bytes(event_json(series).to_string().into_bytes())
                    .file_name("event.json")
                    .mime_str("application/json")
                    .expect("a valid mime type");
            let form = reqwest::multipart::Form::new()
                .part("event", event)
                .part(ATTACHMENT, pprof_part(series, ATTACHMENT));
            self.http.post(self.url.clone()).multipart(form)
        }))
    }
}
