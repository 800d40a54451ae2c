//! Arbitrary text as `/proc/PID/cgroup`, whose paths a container runtime (or a process that
//! can create cgroups in its delegated subtree) chooses: `container_id` of the whole file and
//! `container_id_in_line` of each line must not panic, and an id must be 64 lowercase hex
//! digits found in the path part of the first line that names one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler_agent::process::cgroup::{container_id, container_id_in_line};

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fuzz_target!(|data: &[u8]| {
    // The agent reads the file with read_to_string; lossy text also exercises U+FFFD.
    let text = String::from_utf8_lossy(data);
    let mut first = None;
    for line in text.lines() {
        let Some(id) = container_id_in_line(line) else {
            continue;
        };
        assert!(is_id(&id), "{id:?} from {line:?}");
        let path = line.splitn(3, ':').nth(2).expect("an id needs two colons");
        assert!(
            path.contains(id.as_str()),
            "{id:?} not in the path of {line:?}"
        );
        first.get_or_insert(id);
    }
    assert_eq!(container_id(&text), first);
});
