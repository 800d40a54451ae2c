//! A write endpoint for benchmarks: accepts HTTP/1.1 requests on loopback, reads each body
//! whole (Content-Length or chunked), answers `200` with an empty body (an empty
//! `PushResponse` for Connect push) and counts requests and body bytes. It checks nothing: the
//! tests' receiver decodes and checks; this one only has to cost the agent what a healthy
//! Pyroscope would.
use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    thread,
};

use anyhow::{Context as _, Result};

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    body_bytes: AtomicU64,
}

pub struct Receiver {
    port: u16,
    counters: Arc<Counters>,
}

impl Receiver {
    /// Listens on an ephemeral loopback port; serves until the process exits.
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the receiver")?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let shared = Arc::clone(&counters);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counters = Arc::clone(&shared);
                thread::spawn(move || {
                    // A connection that breaks mid-request is the client's business.
                    let _ = serve(stream, &counters);
                });
            }
        });
        Ok(Self { port, counters })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// (requests, body bytes) received so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counters.requests.load(Relaxed),
            self.counters.body_bytes.load(Relaxed),
        )
    }
}

fn serve(stream: TcpStream, counters: &Counters) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut length = 0u64;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                }
            }
        }
        let body = if chunked {
            read_chunked(&mut reader)?
        } else {
            io::copy(&mut (&mut reader).take(length), &mut io::sink())?
        };
        counters.requests.fetch_add(1, Relaxed);
        counters.body_bytes.fetch_add(body, Relaxed);
        writer.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/proto\r\ncontent-length: 0\r\n\r\n",
        )?;
    }
}

/// Reads a chunked body to its end; returns its length.
fn read_chunked(reader: &mut BufReader<TcpStream>) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let size = u64::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                    return Ok(total);
                }
            }
        }
        total += io::copy(&mut reader.take(size), &mut io::sink())?;
        let mut crlf = String::new();
        reader.read_line(&mut crlf)?;
    }
}
