//! Decoders for what the agent sends to its write endpoints: Pyroscope push requests,
//! gzipped pprof, `multipart/form-data` bodies (ingest, DataKit) and query strings.
//!
//! The end-to-end tests wrap these and `expect()`; here they return errors so that the fuzz
//! target `push_decode` can feed them arbitrary bytes. The push messages are declared again
//! rather than taken from the agent, so a wrong field number in the agent shows up in the
//! tests instead of cancelling out.

use std::{collections::BTreeMap, io::Read as _};

use profiler_agent::profile::pprof::Profile;
use prost::Message as _;

/// Largest pprof a gzipped body may inflate to; more is an error, not an allocation.
pub const MAX_PPROF_SIZE: u64 = 64 << 20;

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a PushRequest: {0}")]
    Push(prost::DecodeError),
    #[error("not gzip: {0}")]
    Gzip(std::io::Error),
    #[error("gzipped pprof inflates to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("not a pprof Profile: {0}")]
    Pprof(prost::DecodeError),
    #[error("no multipart boundary in content-type {0:?}")]
    NoBoundary(String),
    #[error("no multipart part named {0:?}")]
    NoPart(String),
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

/// The series of one push request body, every profile decoded.
pub fn push_series(body: &[u8]) -> Result<Vec<PushedSeries>, DecodeError> {
    PushRequest::decode(body)
        .map_err(DecodeError::Push)?
        .series
        .into_iter()
        .map(|s| {
            Ok(PushedSeries {
                labels: s.labels.into_iter().map(|l| (l.name, l.value)).collect(),
                profiles: s
                    .samples
                    .iter()
                    .map(|raw| gzip_pprof(&raw.raw_profile))
                    .collect::<Result<_, _>>()?,
            })
        })
        .collect()
}

/// A gzipped pprof, inflated to at most [`MAX_PPROF_SIZE`] bytes.
pub fn gzip_pprof(bytes: &[u8]) -> Result<Profile, DecodeError> {
    gzip_pprof_limited(bytes, MAX_PPROF_SIZE)
}

/// A gzipped pprof, inflated to at most `limit` bytes.
pub fn gzip_pprof_limited(bytes: &[u8], limit: u64) -> Result<Profile, DecodeError> {
    let mut raw = Vec::new();
    // One byte past the limit tells a pprof of exactly `limit` bytes from a longer one.
    flate2::read::GzDecoder::new(bytes)
        .take(limit.saturating_add(1))
        .read_to_end(&mut raw)
        .map_err(DecodeError::Gzip)?;
    if raw.len() as u64 > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    Profile::decode(raw.as_slice()).map_err(DecodeError::Pprof)
}

/// Percent-decoding of a query component (`+` is a space). A `%` not followed by two hex
/// digits is kept as it is; bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match bytes.get(i + 1..i + 3).and_then(hex_byte) {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Two hex digits. Not `u8::from_str_radix`, which also takes a sign (`%+1`).
fn hex_byte(digits: &[u8]) -> Option<u8> {
    let digit = |b: u8| (b as char).to_digit(16);
    let [hi, lo] = digits else { return None };
    Some((digit(*hi)? * 16 + digit(*lo)?) as u8)
}

/// The query parameters of a request path; later duplicates win.
pub fn query(path: &str) -> BTreeMap<String, String> {
    path.split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

/// The parts of a `multipart/form-data` body: (field name, content). Parts without a name
/// or without the blank line ending their headers are skipped.
pub fn multipart_parts(
    content_type: &str,
    body: &[u8],
) -> Result<Vec<(String, Vec<u8>)>, DecodeError> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_owned())
        .ok_or_else(|| DecodeError::NoBoundary(content_type.to_owned()))?;
    let delimiter = format!("--{boundary}").into_bytes();
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
    Ok(starts
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
        .collect())
}

/// A legacy `/ingest` request: its query and its profile.
pub struct Ingested {
    pub query: BTreeMap<String, String>,
    pub profile: Profile,
    pub raw_gzip: Vec<u8>,
}

/// An `/ingest` request from its path, content type and body: the `profile` part decoded.
pub fn ingest_request(
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Result<Ingested, DecodeError> {
    let (_, bytes) = multipart_parts(content_type, body)?
        .into_iter()
        .find(|(name, _)| name == "profile")
        .ok_or_else(|| DecodeError::NoPart("profile".to_owned()))?;
    Ok(Ingested {
        query: query(path),
        profile: gzip_pprof(&bytes)?,
        raw_gzip: bytes,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn gzip_pprof_stops_at_the_limit() {
        let profile = Profile {
            string_table: vec![String::new(), "x".repeat(1000)],
            ..Default::default()
        };
        let raw = profile.encode_to_vec();
        let gz = gzip(&raw);
        assert_eq!(gzip_pprof_limited(&gz, raw.len() as u64).unwrap(), profile);
        assert!(matches!(
            gzip_pprof_limited(&gz, raw.len() as u64 - 1),
            Err(DecodeError::TooLarge { .. })
        ));
        // A bomb: 1 MiB of zeros from about 1 KiB, refused with a 64 KiB limit.
        let bomb = gzip(&vec![0; 1 << 20]);
        assert!(matches!(
            gzip_pprof_limited(&bomb, 64 << 10),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(gzip_pprof(b"\x1f\x8b"), Err(DecodeError::Gzip(_))));
    }

    #[test]
    fn percent_decode_needs_two_hex_digits() {
        assert_eq!(percent_decode("a%20b+c%2"), "a b c%2");
        assert_eq!(percent_decode("%41%4"), "A%4");
        assert_eq!(percent_decode("%+1%-1%zz"), "% 1%-1%zz");
        assert_eq!(percent_decode("%e2%82%ac%ff"), "€\u{fffd}");
        assert_eq!(
            query("/ingest?name=a%2Cb&x&spy=ebpf"),
            BTreeMap::from([("name".into(), "a,b".into()), ("spy".into(), "ebpf".into())])
        );
    }

    #[test]
    fn multipart_parts_and_ingest() {
        let profile = Profile {
            string_table: vec![String::new(), "main".into()],
            ..Default::default()
        };
        let gz = gzip(&profile.encode_to_vec());
        let mut body = b"--XY\r\ncontent-disposition: form-data; name=\"profile\"; \
            filename=\"profile.pprof\"\r\n\r\n"
            .to_vec();
        body.extend(&gz);
        body.extend(
            b"\r\n--XY\r\ncontent-disposition: form-data; name=\"x\"\r\n\r\n1\r\n--XY--\r\n",
        );
        let parts = multipart_parts("multipart/form-data; boundary=\"XY\"", &body).unwrap();
        assert_eq!(
            parts,
            [("profile".into(), gz.clone()), ("x".into(), b"1".to_vec())]
        );
        let got =
            ingest_request("/ingest?name=s", "multipart/form-data; boundary=XY", &body).unwrap();
        assert_eq!(got.profile, profile);
        assert_eq!(got.raw_gzip, gz);
        assert!(matches!(
            multipart_parts("multipart/form-data", &body),
            Err(DecodeError::NoBoundary(_))
        ));
        assert!(matches!(
            ingest_request("/ingest", "multipart/form-data; boundary=XZ", &body),
            Err(DecodeError::NoPart(_))
        ));
    }
}
