//! What the HTTP sinks share: the reqwest client (rustls with ring, our own roots, client
//! certificates, `insecure_skip_verify`; HTTP/1.1 and HTTP/2 by ALPN), headers and
//! credentials on every request, and turning a response into delivered / retryable /
//! permanent (5xx, 408, 429 and network errors retry, honouring `Retry-After`).

use std::{sync::Arc, time::Duration};

use reqwest::{RequestBuilder, Response, StatusCode, header};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};

use super::{
    Delivered, ProfileSeries, SendError,
    config::{Auth, EndpointConfig, TlsConfig, WriteConfigError},
};

/// One HTTP endpoint: a client and what goes on every request.
pub(crate) struct HttpEndpoint {
    pub client: reqwest::Client,
    pub url: reqwest::Url,
    headers: header::HeaderMap,
    auth: Auth,
    max_retry_after: Duration,
}

impl HttpEndpoint {
    pub fn new(config: &EndpointConfig, at: &str) -> Result<Self, WriteConfigError> {
        let url = reqwest::Url::parse(&config.url)
            .map_err(|e| WriteConfigError::new(format!("{at}.url"), e))?;
        let mut headers = header::HeaderMap::new();
        for (name, value) in &config.headers {
            let field = || format!("{at}.headers.{name}");
            let name = header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| WriteConfigError::new(field(), e))?;
            let mut value = header::HeaderValue::from_str(value.expose())
                .map_err(|e| WriteConfigError::new(field(), e))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let tls = tls_config(&config.tls, &format!("{at}.tls"))?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(config.remote_timeout)
            .connect_timeout(config.remote_timeout)
            .user_agent(concat!("profiler-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WriteConfigError::new(format!("{at}.tls"), e))?;
        Ok(Self {
            client,
            url,
            headers,
            auth: config.auth(at)?,
            max_retry_after: config.max_backoff_period,
        })
    }

    /// `<url>/<path>`, keeping any path prefix of the configured URL.
    pub fn join(&self, path: &str) -> reqwest::Url {
        let mut url = self.url.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base}/{}", path.trim_start_matches('/')));
        url
    }

    /// A POST with the endpoint's headers and credentials.
    pub fn post(&self, url: reqwest::Url) -> RequestBuilder {
        let req = self.client.post(url).headers(self.headers.clone());
        match &self.auth {
            Auth::None => req,
            Auth::Basic { username, password } => req.basic_auth(username, Some(password.expose())),
            Auth::Bearer(token) => req.bearer_auth(token.expose()),
        }
    }

    /// Sends and classifies the outcome.
    pub async fn execute(&self, req: RequestBuilder) -> Result<Delivered, SendError> {
        classify(req.send().await, self.max_retry_after).await
    }

    /// One request per series, for protocols that take one profile per request; stops at the
    /// first failure, and the last delivery stands for the batch.
    pub async fn send_each(
        &self,
        batch: &[ProfileSeries],
        request: impl Fn(&ProfileSeries) -> RequestBuilder,
    ) -> Result<Delivered, SendError> {
        let mut last = Delivered::default();
        for series in batch {
            last = self.execute(request(series)).await?;
        }
        Ok(last)
    }
}

/// A series' gzipped pprof as a multipart file part named `file_name`.
pub fn pprof_part(series: &ProfileSeries, file_name: &'static str) -> reqwest::multipart::Part {
    reqwest::multipart::Part::bytes(series.pprof_gzip.to_vec())
        .file_name(file_name)
        .mime_str("application/octet-stream")
        .expect("a valid mime type")
}

async fn classify(
    result: Result<Response, reqwest::Error>,
    max_retry_after: Duration,
) -> Result<Delivered, SendError> {
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            // reqwest names the URL in its message, with any `user:password@`.
            let url = e.url().map(|u| super::config::redact_url(u.as_str()));
            let e = e.without_url();
            let cause = if e.is_timeout() {
                "timeout".to_string()
            } else if e.is_connect() {
                format!("connect: {}", error_chain(&e))
            } else {
                format!("request: {}", error_chain(&e))
            };
            let cause = match url {
                Some(url) => format!("{cause} ({url})"),
                None => cause,
            };
            return Err(SendError::Retryable {
                status: None,
                retry_after: None,
                cause,
            });
        }
    };
    let status = resp.status();
    if status.is_success() {
        return Ok(Delivered {
            status: Some(status.as_u16()),
        });
    }
    let retryable = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
        .map(|d| d.min(max_retry_after));
    let body = body_snippet(resp).await;
    let cause = format!("HTTP {status}: {body}");
    if retryable {
        Err(SendError::Retryable {
            status: Some(status.as_u16()),
            retry_after,
            cause,
        })
    } else {
        Err(SendError::Permanent {
            status: Some(status.as_u16()),
            cause,
        })
    }
}

/// The first few hundred bytes of an error body, for the log line.
async fn body_snippet(mut resp: Response) -> String {
    const LIMIT: usize = 512;
    let mut buf = Vec::new();
    while buf.len() < LIMIT {
        match resp.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    buf.truncate(LIMIT);
    String::from_utf8_lossy(&buf).trim().to_string()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 10.2.3).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client config of one endpoint (also run by `validate`, so that a bad CA or
/// key file is a config error).
pub(crate) fn tls_config(tls: &TlsConfig, at: &str) -> Result<ClientConfig, WriteConfigError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| WriteConfigError::new(at, e))?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(
                provider.signature_verification_algorithms,
            )))
    } else {
        let mut roots = RootCertStore::empty();
        match &tls.ca_file {
            Some(path) => {
                let field = format!("{at}.ca_file");
                let certs = read_certs(path).map_err(|r| WriteConfigError::new(&field, r))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| WriteConfigError::new(&field, e))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert)
                .map_err(|r| WriteConfigError::new(format!("{at}.cert_file"), r))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                WriteConfigError::new(format!("{at}.key_file"), format!("{}: {e}", key.display()))
            })?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| WriteConfigError::new(format!("{at}.key_file"), e))?
        }
        (Some(_), None) => {
            return Err(WriteConfigError::new(
                format!("{at}.key_file"),
                "cert_file needs key_file",
            ));
        }
        (None, Some(_)) => {
            return Err(WriteConfigError::new(
                format!("{at}.cert_file"),
                "key_file needs cert_file",
            ));
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// `insecure_skip_verify`: any server certificate is accepted; handshake signatures are
/// still checked so that the connection is at least to the holder of that certificate.
#[derive(Debug)]
struct NoVerify(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_http_date() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[tokio::test]
    async fn network_errors_do_not_show_the_url_password() {
        // Nothing listens on port 1 of loopback: the connection is refused.
        let config = EndpointConfig {
            url: "http://alice:s3cret@127.0.0.1:1/".into(),
            ..EndpointConfig::default()
        };
        let endpoint = HttpEndpoint::new(&config, "write.endpoint[0]").unwrap();
        let req = endpoint.post(endpoint.join("push"));
        let Err(SendError::Retryable { cause, .. }) = endpoint.execute(req).await else {
            panic!("a refused connection is retryable");
        };
        // reqwest moves the userinfo into an Authorization header, and the agent redacts
        // what would be left.
        assert!(!cause.contains("s3cret"), "{cause}");
        assert!(cause.contains("127.0.0.1:1/push"), "{cause}");
    }
}
