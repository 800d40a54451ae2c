//! Plain HTTP/1.1 GETs to the agent's server on loopback, and reading one series from its
//! `/metrics` text.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

/// `GET path` on 127.0.0.1:`port`, with a bearer token when given: (status, body), or
/// `None` when the server is not there or the answer is cut. Waits up to a minute, as long
/// as an on-demand capture may take to answer.
pub fn http_get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, Vec<u8>)> {
    http_get_within(port, path, token, Duration::from_secs(60))
}

/// [`http_get`] that gives up after `within`: a server that stalls is an answer of `None`,
/// not a hang.
pub fn http_get_within(
    port: u16,
    path: &str,
    token: Option<&str>,
    within: Duration,
) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(within)).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &answer[split + 4..];
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some((status, body))
}

/// `GET path` with a text body.
pub fn http_get_text(port: u16, path: &str) -> Option<(u16, String)> {
    let (status, body) = http_get(port, path, None)?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line_end]).ok()?, 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        let start = line_end + 2;
        out.extend_from_slice(body.get(start..start + size)?);
        body = body.get(start + size + 2..)?;
    }
}

/// The value of one series in the text format: its name with its labels exactly as the
/// agent prints them (`name{a="1",b="2"}`), or a bare name for an unlabelled sample.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The sum of every series of metric `name` whose labels contain each of `labels` (each as
/// `key="value"`); None when no series matches.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_set, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some(parts) => parts,
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if !labels.iter().all(|l| label_set.contains(l)) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Percent-encodes a query value.
pub fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The agent's `/metrics` text, or `None` when it does not answer 200.
pub fn scrape_metrics(port: u16) -> Option<String> {
    let (status, body) = http_get_text(port, "/metrics")?;
    (status == 200).then_some(body)
}
