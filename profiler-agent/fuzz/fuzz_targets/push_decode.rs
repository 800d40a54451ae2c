//! The end-to-end tests' decoders for what the agent sends (`profiler_tests::decode`):
//! Pyroscope push requests, gzipped pprof, `multipart/form-data` bodies and query strings.
//! They must return an error for bad input, never panic, and a gzip bomb must be refused at
//! the size limit rather than inflated.
//!
//! Byte 0 picks the decoder for the rest: 0 push request; 1 gzipped pprof; 2 pprof that the
//! target gzips itself (random bytes almost never pass gzip's CRC), which must decode exactly
//! when plain prost decoding does; 3 a content type line then a multipart body, also as an
//! `/ingest` request; 4 a request path's query.
#![no_main]

use std::io::Write as _;

use libfuzzer_sys::fuzz_target;
use profiler_agent::profile::pprof::Profile;
use profiler_tests::decode;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 5 {
        0 => {
            let _ = decode::push_series(rest);
        }
        1 => {
            let _ = decode::gzip_pprof(rest);
        }
        2 => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(rest).expect("write to a Vec");
            let gz = gz.finish().expect("write to a Vec");
            let direct = Profile::decode(rest);
            match decode::gzip_pprof(&gz) {
                Ok(p) => assert_eq!(Some(p), direct.ok()),
                Err(e) => assert!(direct.is_err(), "{e}"),
            }
        }
        3 => {
            let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            let content_type = String::from_utf8_lossy(&rest[..split]);
            let body = rest.get(split + 1..).unwrap_or_default();
            if let Ok(parts) = decode::multipart_parts(&content_type, body) {
                for (name, _) in parts {
                    assert!(!name.contains(['\r', '\n']), "{name:?}");
                }
            }
            let _ = decode::ingest_request("/ingest?name=x", &content_type, body);
        }
        _ => {
            let path = String::from_utf8_lossy(rest);
            for (k, v) in decode::query(&path) {
                assert!(!k.contains('&') && !v.contains('&') || path.contains('%'));
            }
            let _ = decode::percent_decode(&path);
        }
    }
});
