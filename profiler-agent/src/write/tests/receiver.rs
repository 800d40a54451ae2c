//! A real local HTTP receiver for the write tests: hyper 1 over HTTP/1.1 and HTTP/2 (plain or
//! TLS with a self-signed certificate), recording every request and answering from a
//! script; plus a small multipart/form-data parser and pprof helpers.

use std::{
    io::{Read as _, Write as _},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use prost::Message as _;

use crate::profile::pprof::{Profile, ValueType};

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub query: String,
    pub headers: hyper::HeaderMap,
    pub version: hyper::Version,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn query_pairs(&self) -> Vec<(String, String)> {
        url_pairs(&self.query)
    }
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// What to answer the n-th request (0-based).
#[derive(Clone, Debug)]
pub enum Reply {
    Status(u16),
    StatusWith(u16, &'static str, String),
    /// Never answer.
    Hang,
}

pub type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

pub fn always(status: u16) -> Script {
    Arc::new(move |_| Reply::Status(status))
}

pub struct Receiver {
    /// `http://127.0.0.1:port` or `https://localhost:port`.
    pub url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Receiver {
    pub async fn start(script: Script) -> Self {
        Self::serve(script, None, "http://127.0.0.1").await
    }

    /// TLS with `cert` (ALPN h2 and http/1.1), at `https://localhost:port`.
    pub async fn start_tls(script: Script, cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> Self {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        Self::serve(script, Some(acceptor), "https://localhost").await
    }

    async fn serve(script: Script, tls: Option<tokio_rustls::TlsAcceptor>, base: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let recorded = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (script, recorded, tls) = (script.clone(), recorded.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, script.clone(), recorded.clone()));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Self {
            url: format!("{base}:{port}"),
            requests,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Waits (up to 10 s) until `n` requests arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Recorded> {
        wait_until(|| self.count() >= n, Duration::from_secs(10)).await;
        self.requests()
    }
}

async fn handle(
    req: Request<Incoming>,
    script: Script,
    recorded: Arc<Mutex<Vec<Recorded>>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let n = {
        let mut r = recorded.lock().unwrap();
        r.push(Recorded {
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            headers: parts.headers,
            version: parts.version,
            body,
        });
        r.len() - 1
    };
    let (status, header) = match script(n) {
        Reply::Status(s) => (s, None),
        Reply::StatusWith(s, name, value) => (s, Some((name, value))),
        Reply::Hang => std::future::pending().await,
    };
    let mut resp = Response::builder().status(status);
    if let Some((name, value)) = header {
        resp = resp.header(name, value);
    }
    Ok(resp
        .body(Full::new(Bytes::from_static(b"receiver says")))
        .unwrap())
}

/// Polls `cond` every 5 ms; panics after `limit`.
pub async fn wait_until(cond: impl Fn() -> bool, limit: Duration) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One part of a multipart/form-data body.
#[derive(Debug)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

/// Parses a multipart/form-data body (RFC 7578) given its Content-Type header.
pub fn parse_multipart(content_type: &str, body: &[u8]) -> Vec<Part> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .expect("a boundary")
        .trim_matches('"');
    let delim = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut rest = body;
    let first = find(rest, delim.as_bytes()).expect("opening boundary");
    rest = &rest[first + delim.len()..];
    loop {
        if rest.starts_with(b"--") {
            break;
        }
        rest = rest.strip_prefix(b"\r\n").expect("CRLF after boundary");
        let head_end = find(rest, b"\r\n\r\n").expect("part headers");
        let head = std::str::from_utf8(&rest[..head_end]).unwrap();
        rest = &rest[head_end + 4..];
        let end = find(rest, format!("\r\n{delim}").as_bytes()).expect("closing boundary");
        let data = rest[..end].to_vec();
        rest = &rest[end + 2 + delim.len()..];
        let (mut name, mut filename, mut ctype) = (String::new(), None, None);
        for line in head.split("\r\n") {
            let (k, v) = line.split_once(':').unwrap();
            match k.trim().to_ascii_lowercase().as_str() {
                "content-disposition" => {
                    for attr in v.split(';').skip(1) {
                        let (ak, av) = attr.trim().split_once('=').unwrap();
                        let av = av.trim_matches('"').to_string();
                        match ak {
                            "name" => name = av,
                            "filename" => filename = Some(av),
                            _ => {}
                        }
                    }
                }
                "content-type" => ctype = Some(v.trim().to_string()),
                _ => {}
            }
        }
        parts.push(Part {
            name,
            filename,
            content_type: ctype,
            data,
        });
    }
    parts
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A small valid CPU pprof whose only sample has value `value`, gzipped.
pub fn pprof_gz(value: i64) -> Bytes {
    let profile = Profile {
        sample_type: vec![ValueType { r#type: 1, unit: 2 }],
        period_type: Some(ValueType { r#type: 1, unit: 2 }),
        period: 10_101_010,
        string_table: vec!["".into(), "cpu".into(), "nanoseconds".into()],
        sample: vec![crate::profile::pprof::Sample {
            location_id: vec![],
            value: vec![value],
            label: vec![],
        }],
        ..Default::default()
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&profile.encode_to_vec()).unwrap();
    Bytes::from(gz.finish().unwrap())
}

/// Inflates and decodes a gzipped pprof.
pub fn decode_pprof(gz: &[u8]) -> Profile {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .expect("a gzipped body");
    Profile::decode(raw.as_slice()).expect("a pprof")
}
