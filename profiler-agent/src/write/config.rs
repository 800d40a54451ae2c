//! The `[write]` table of agent.toml: endpoints (pyroscope.write's `endpoint` block names),
//! the directory sink, external labels and the queue size; `validate` for everything a retry
//! could never fix; `Secret` for values that must never be printed; [`redact_url`] for URLs
//! that carry a `user:password@` (shown as `user:<redacted>@` in `check-config`, errors and
//! logs); reading secret files.

use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::labels::{Labels, check_label_name};

/// Default per-endpoint queue length, in batches (one batch per collect interval: 16 batches
/// of 15 s are four minutes of profiles kept while an endpoint is down).
pub const DEFAULT_QUEUE_SIZE: usize = 16;

/// A value that must never appear in logs, `Debug` output or serialized config: both print
/// `<redacted>`. The plain value is only reachable through [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// `url` with the password of its userinfo replaced: `https://user:<redacted>@host/`. Works
/// on the text, so URLs that do not parse (shown in validation errors) are redacted too;
/// a URL without a password is returned as it is.
pub fn redact_url(url: &str) -> String {
    redact_urls(url)
}

/// `text` with the password of every `scheme://user:password@` in it replaced by
/// `<redacted>` (error messages that quote a config line or a URL).
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, query, fragment, or where quoted text ends.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@').and_then(|at| {
            let colon = authority[..at].find(':')?;
            Some((colon, at))
        }) {
            Some((colon, at)) => {
                out.push_str(&authority[..colon]);
                out.push_str(":<redacted>");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Serializes a URL redacted (`check-config`).
fn serialize_redacted_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// A config error that no retry could fix, naming the offending field
/// (`write.endpoint[1].url`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct WriteConfigError {
    pub field: String,
    pub reason: String,
}

impl WriteConfigError {
    pub fn new(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

/// The `[write]` table.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriteConfig {
    /// `[[write.endpoint]]`, each written concurrently with its own queue.
    pub endpoint: Vec<EndpointConfig>,
    /// File sink: `<dir>/<service_name>/<unix-ts>.pb.gz`.
    pub directory: Option<PathBuf>,
    /// Added to every series unless the series already has that label.
    pub external_labels: Labels,
    /// Per sink, in batches; a full queue drops its oldest batch. Default 16.
    pub queue_size: usize,
}

impl Default for WriteConfig {
    fn default() -> Self {
        Self {
            endpoint: Vec::new(),
            directory: None,
            external_labels: Labels::new(),
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// Wire protocol of one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Pyroscope Connect `PusherService/Push` (what pyroscope.write speaks).
    #[default]
    Push,
    /// Pyroscope legacy `/ingest` (multipart pprof).
    Ingest,
    /// DataKit profiling input `/profiling/v1/input` (ddtrace-style multipart).
    Datakit,
}

/// One `[[write.endpoint]]`, named as in Alloy's pyroscope.write `endpoint` block.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// The `endpoint` metric label; default the URL's host:port (plus `#index` when two
    /// endpoints share a host).
    pub name: Option<String>,
    /// Printed with its password redacted.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    pub protocol: Protocol,
    #[serde(with = "crate::duration::positive")]
    pub remote_timeout: Duration,
    /// Extra request headers (e.g. `X-Scope-OrgID`); values are treated as secrets.
    pub headers: BTreeMap<String, Secret>,
    pub basic_auth: Option<BasicAuth>,
    pub bearer_token: Option<Secret>,
    pub bearer_token_file: Option<PathBuf>,
    pub tls: TlsConfig,
    #[serde(with = "crate::duration::positive")]
    pub min_backoff_period: Duration,
    #[serde(with = "crate::duration::positive")]
    pub max_backoff_period: Duration,
    /// Retries after the first attempt; 0 retries until the write succeeds or the agent
    /// stops, as in Alloy's `pyroscope.write` (default 10).
    pub max_backoff_retries: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            name: None,
            url: String::new(),
            protocol: Protocol::Push,
            remote_timeout: Duration::from_secs(10),
            headers: BTreeMap::new(),
            basic_auth: None,
            bearer_token: None,
            bearer_token_file: None,
            tls: TlsConfig::default(),
            min_backoff_period: Duration::from_millis(500),
            max_backoff_period: Duration::from_secs(300),
            max_backoff_retries: 10,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA bundle; when set it replaces the system roots (as Go's `RootCAs`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for mutual TLS; both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

/// Credentials of one endpoint with files read.
#[derive(Clone, Debug, Default)]
pub(crate) enum Auth {
    #[default]
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer(Secret),
}

impl WriteConfig {
    /// Checks everything a retry could never fix: URLs, header names and values, secret
    /// files readable, TLS files, label names, backoff bounds, names unique.
    pub fn validate(&self) -> Result<(), WriteConfigError> {
        if self.queue_size == 0 {
            return Err(WriteConfigError::new(
                "write.queue_size",
                "must be at least 1",
            ));
        }
        for name in self.external_labels.keys() {
            check_label_name(name)
                .map_err(|r| WriteConfigError::new(format!("write.external_labels.{name}"), r))?;
        }
        if let Some(dir) = &self.directory
            && dir.as_os_str().is_empty()
        {
            return Err(WriteConfigError::new(
                "write.directory",
                "must not be empty",
            ));
        }
        for (i, ep) in self.endpoint.iter().enumerate() {
            ep.validate(&format!("write.endpoint[{i}]"))?;
        }
        let names = self.endpoint_names();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(WriteConfigError::new(
                    format!("write.endpoint[{i}].name"),
                    format!("{name:?} is used by another endpoint"),
                ));
            }
        }
        Ok(())
    }

    /// The `endpoint` metric label of every endpoint, in order.
    pub fn endpoint_names(&self) -> Vec<String> {
        let hosts: Vec<String> = self
            .endpoint
            .iter()
            .map(|ep| {
                reqwest::Url::parse(&ep.url)
                    .ok()
                    .and_then(|u| {
                        u.host_str()
                            .map(|h| u.port().map_or(h.to_string(), |p| format!("{h}:{p}")))
                    })
                    .unwrap_or_else(|| "endpoint".to_string())
            })
            .collect();
        self.endpoint
            .iter()
            .enumerate()
            .map(|(i, ep)| match &ep.name {
                Some(name) => name.clone(),
                None if hosts.iter().filter(|h| **h == hosts[i]).count() > 1 => {
                    format!("{}#{i}", hosts[i])
                }
                None => hosts[i].clone(),
            })
            .collect()
    }
}

impl EndpointConfig {
    fn validate(&self, at: &str) -> Result<(), WriteConfigError> {
        let err = |field: &str, reason: &dyn fmt::Display| {
            WriteConfigError::new(format!("{at}.{field}"), reason)
        };
        if let Some(name) = &self.name
            && name.trim().is_empty()
        {
            return Err(err("name", &"must not be empty"));
        }
        let shown = redact_url(&self.url);
        let url =
            reqwest::Url::parse(&self.url).map_err(|e| err("url", &format!("{shown:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(err(
                "url",
                &format!("{shown:?}: need an http:// or https:// URL with a host"),
            ));
        }
        for (name, value) in &self.headers {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| err(&format!("headers.{name}"), &"not a valid header name"))?;
            reqwest::header::HeaderValue::from_str(value.expose())
                .map_err(|_| err(&format!("headers.{name}"), &"not a valid header value"))?;
        }
        if self.min_backoff_period > self.max_backoff_period {
            return Err(err(
                "min_backoff_period",
                &"must not exceed max_backoff_period",
            ));
        }
        self.auth(at)?;
        super::http::tls_config(&self.tls, &format!("{at}.tls"))?;
        Ok(())
    }

    /// The credentials, secret files read now.
    pub(crate) fn auth(&self, at: &str) -> Result<Auth, WriteConfigError> {
        let err = |field: &str, reason: &dyn fmt::Display| {
            WriteConfigError::new(format!("{at}.{field}"), reason)
        };
        let bearer = match (&self.bearer_token, &self.bearer_token_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "bearer_token_file",
                    &"set bearer_token or bearer_token_file, not both",
                ));
            }
            (Some(token), None) => Some(token.clone()),
            (None, Some(path)) => {
                Some(read_secret(path).map_err(|r| err("bearer_token_file", &r))?)
            }
            (None, None) => None,
        };
        let basic = match &self.basic_auth {
            None => None,
            Some(b) => {
                if b.username.is_empty() {
                    return Err(err("basic_auth.username", &"must not be empty"));
                }
                let password = match (&b.password, &b.password_file) {
                    (Some(_), Some(_)) => {
                        return Err(err(
                            "basic_auth.password_file",
                            &"set password or password_file, not both",
                        ));
                    }
                    (Some(p), None) => p.clone(),
                    (None, Some(path)) => {
                        read_secret(path).map_err(|r| err("basic_auth.password_file", &r))?
                    }
                    (None, None) => Secret::default(),
                };
                Some((b.username.clone(), password))
            }
        };
        match (basic, bearer) {
            (Some(_), Some(_)) => Err(err(
                "basic_auth",
                &"set basic_auth or a bearer token, not both",
            )),
            (Some((username, password)), None) => Ok(Auth::Basic { username, password }),
            (None, Some(token)) => Ok(Auth::Bearer(token)),
            (None, None) => Ok(Auth::None),
        }
    }
}

/// A secret file's content without its trailing newline (as Prometheus and Alloy do).
pub(crate) fn read_secret(path: &std::path::Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Secret(text.trim_end_matches(['\r', '\n']).to_string()))
}
