//! A write endpoint for end-to-end tests: a plain HTTP/1.1 server on a loopback port that
//! keeps every request, and decoders for what the agent sends there (Pyroscope push
//! protobuf with gzipped pprof inside).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use profiler_agent::profile::pprof::Profile;
use prost::Message as _;

/// One request as received.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// The receiver; requests are answered 200 and kept.
pub struct Receiver {
    pub port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    pub fn start() -> Self {
        Self::start_on(0)
    }

    /// On a given port (0: any): an endpoint that comes back where the agent expects it.
    pub fn start_on(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind receiver");
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let kept = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || serve(stream, &kept));
            }
        });
        Self { port, requests }
    }

    /// An endpoint that accepts connections and reads requests but never answers.
    pub fn start_hanging() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        Self {
            port,
            requests: Arc::default(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the requests so far.
    pub fn wait_for(&self, within: Duration, what: &str, done: impl Fn(&[Request]) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if done(&self.requests()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "receiver: {what} not seen within {within:?}; {} requests to {:?}",
                self.requests().len(),
                self.requests()
                    .iter()
                    .map(|r| r.path.clone())
                    .collect::<std::collections::BTreeSet<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn serve(stream: TcpStream, kept: &Mutex<Vec<Request>>) {
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        kept.lock().unwrap().push(Request {
            method,
            path,
            headers,
            body,
        });
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/proto\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer).is_err() {
            return;
        }
    }
}

// Pyroscope's push.v1 messages, as DESIGN.md gives them.
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
pub struct LabelPair {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RawSample {
    #[prost(bytes = "vec", tag = "1")]
    pub raw_profile: Vec<u8>,
    #[prost(string, tag = "2")]
    pub id: String,
}

/// One pushed series: its labels and its decoded profiles.
pub struct PushedSeries {
    pub labels: BTreeMap<String, String>,
    pub profiles: Vec<Profile>,
}

/// Every series of every push request received.
pub fn pushed_series(requests: &[Request]) -> Vec<PushedSeries> {
    requests
        .iter()
        .filter(|r| r.path.ends_with("/push.v1.PusherService/Push"))
        .flat_map(|r| {
            PushRequest::decode(r.body.as_slice())
                .expect("push body is a PushRequest")
                .series
        })
        .map(|s| PushedSeries {
            labels: s.labels.into_iter().map(|l| (l.name, l.value)).collect(),
            profiles: s
                .samples
                .iter()
                .map(|raw| decode_gzip_pprof(&raw.raw_profile))
                .collect(),
        })
        .collect()
}

pub fn decode_gzip_pprof(bytes: &[u8]) -> Profile {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut raw)
        .expect("gzipped pprof");
    Profile::decode(raw.as_slice()).expect("pprof")
}

/// Every function name of a profile.
pub fn function_names(p: &Profile) -> Vec<&str> {
    p.function
        .iter()
        .map(|f| p.string_table[f.name as usize].as_str())
        .collect()
}

/// Percent-decoding of a query component (`+` is a space).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The query parameters of a request path.
pub fn query(path: &str) -> BTreeMap<String, String> {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

/// The parts of a `multipart/form-data` body: (field name, content).
pub fn multipart_parts(request: &Request) -> Vec<(String, Vec<u8>)> {
    let content_type = request
        .headers
        .get("content-type")
        .cloned()
        .unwrap_or_default();
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_owned())
        .expect("multipart boundary");
    let delimiter = format!("--{boundary}").into_bytes();
    let body = &request.body;
    let mut starts = Vec::new();
    let mut i = 0;
    while i + delimiter.len() <= body.len() {
        if body[i..].starts_with(&delimiter) {
            starts.push(i);
            i += delimiter.len();
        } else {
            i += 1;
        }
    }
    starts
        .windows(2)
        .filter_map(|w| {
            let part = &body[w[0] + delimiter.len()..w[1]];
            let part = part.strip_prefix(b"\r\n")?;
            let split = part.windows(4).position(|x| x == b"\r\n\r\n")?;
            let head = String::from_utf8_lossy(&part[..split]).into_owned();
            let content = part[split + 4..].strip_suffix(b"\r\n")?.to_vec();
            let name = head
                .split(';')
                .find_map(|p| p.trim().strip_prefix("name="))
                .map(|n| {
                    n.split(['\r', '\n'])
                        .next()
                        .unwrap_or(n)
                        .trim_matches('"')
                        .to_owned()
                })?;
            Some((name, content))
        })
        .collect()
}

/// A legacy `/ingest` request: its query and its profile.
pub struct Ingested {
    pub query: BTreeMap<String, String>,
    pub profile: Profile,
    pub raw_gzip: Vec<u8>,
}

pub fn ingested(requests: &[Request]) -> Vec<Ingested> {
    requests
        .iter()
        .filter(|r| r.path.starts_with("/ingest?"))
        .map(|r| {
            let (_, bytes) = multipart_parts(r)
                .into_iter()
                .find(|(name, _)| name == "profile")
                .expect("profile part");
            Ingested {
                query: query(&r.path),
                profile: decode_gzip_pprof(&bytes),
                raw_gzip: bytes,
            }
        })
        .collect()
}
