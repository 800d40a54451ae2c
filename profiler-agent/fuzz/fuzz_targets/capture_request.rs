//! A `GET /v1/profile` query string (sent by whoever reaches the capture API) into
//! `CaptureRequest::parse`: every accepted request is within the documented bounds, and a
//! `command` regex answers in bounded time on a long command line.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use profiler_agent::capture::{
    CaptureRequest, Selector,
    request::{MAX_DURATION, MAX_REGEX_LEN, MAX_SAMPLE_RATE, MIN_DURATION},
};

fuzz_target!(|data: &[u8]| {
    // `k=v&k=v`, as axum's `Query` hands it over after percent-decoding (the fuzzer writes
    // any byte directly, so no decoding is done here); the last of a repeated key wins.
    let text = String::from_utf8_lossy(data);
    let query: HashMap<String, String> = text
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (pair.to_owned(), String::new()),
        })
        .collect();
    match CaptureRequest::parse(&query) {
        Ok(request) => {
            assert!((MIN_DURATION..=MAX_DURATION).contains(&request.duration));
            assert!((1..=MAX_SAMPLE_RATE).contains(&request.sample_rate));
            match &request.selector {
                Selector::Pid(pid) => assert!(*pid > 0),
                Selector::Command(re) => {
                    assert!(re.as_str().len() <= MAX_REGEX_LEN);
                    let line = "java -Xmx1g -jar app.jar ".repeat(400);
                    let _ = re.is_match(&line);
                }
            }
        }
        Err(bad) => {
            // Messages name the parameter, never the value sent.
            assert!(
                ["pid", "command", "duration", "sample_rate", "format", "(unknown)"]
                    .contains(&bad.parameter)
            );
        }
    }
});
