//! A write endpoint for end-to-end tests: a plain HTTP/1.1 server on a loopback port that
//! keeps every request, and decoders for what the agent sends there (Pyroscope push
//! protobuf with gzipped pprof inside). The decoders are `profiler_tests::decode`'s, which
//! return errors (they are fuzzed); these wrappers panic, as test assertions.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use profiler_agent::profile::pprof::Profile;
use profiler_tests::decode::{self, gzip_pprof, ingest_request, push_series};
// Each test crate compiles common/ and uses only some of these.
#[allow(unused_imports)]
pub use profiler_tests::decode::{Ingested, PushRequest, PushedSeries};

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

/// Every series of every push request received.
pub fn pushed_series(requests: &[Request]) -> Vec<PushedSeries> {
    requests
        .iter()
        .filter(|r| r.path.ends_with("/push.v1.PusherService/Push"))
        .flat_map(|r| push_series(&r.body).unwrap_or_else(|e| panic!("{}: {e}", r.path)))
        .collect()
}

pub fn decode_gzip_pprof(bytes: &[u8]) -> Profile {
    gzip_pprof(bytes).unwrap_or_else(|e| panic!("gzipped pprof: {e}"))
}

/// Every function name of a profile.
pub fn function_names(p: &Profile) -> Vec<&str> {
    p.function
        .iter()
        .map(|f| p.string_table[f.name as usize].as_str())
        .collect()
}

/// The parts of a `multipart/form-data` body: (field name, content).
pub fn multipart_parts(request: &Request) -> Vec<(String, Vec<u8>)> {
    let content_type = request
        .headers
        .get("content-type")
        .map_or("", String::as_str);
    decode::multipart_parts(content_type, &request.body).unwrap_or_else(|e| panic!("{e}"))
}

pub fn ingested(requests: &[Request]) -> Vec<Ingested> {
    requests
        .iter()
        .filter(|r| r.path.starts_with("/ingest?"))
        .map(|r| {
            let content_type = r.headers.get("content-type").map_or("", String::as_str);
            ingest_request(&r.path, content_type, &r.body)
                .unwrap_or_else(|e| panic!("{}: {e}", r.path))
        })
        .collect()
}
