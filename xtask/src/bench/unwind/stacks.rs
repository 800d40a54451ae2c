//! Reading the stacks each profiler wrote, for `cargo xtask bench unwind`: pprof (ours,
//! gzipped; lightswitch's, raw) and `perf script` text, reduced to one question per sample:
//! which program it belongs to (by pid: other copies of the same programs on the host do not
//! count), and whether its stack reaches the process (or thread) entry.
//!
//! The pprof messages are declared here, with only the fields this needs, rather than taken
//! from the agent: xtask stays free of the agent's build, and the same decoder reads every
//! profiler's file the same way.
use std::{collections::BTreeMap, io::Read as _};

use anyhow::{Context as _, Result};
use prost::Message as _;

/// Frames that only a complete walk reaches: the process entry and libc's start-up around
/// `main`, and the roots of threads (not used by the two benchmark programs, but a walk that
/// gets there is complete too). Versioned names (`__libc_start_main@@GLIBC_2.34`) count.
const ENTRY_FRAMES: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_main_impl",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
];

/// Whether a frame name is one of [`ENTRY_FRAMES`].
pub fn is_entry(name: &str) -> bool {
    let bare = name.split('@').next().unwrap_or(name).trim();
    ENTRY_FRAMES.contains(&bare)
}

/// Per program (comm): samples, and how many of them have a complete stack.
#[derive(Default, Debug, Clone, Copy, PartialEq)]
pub struct Share {
    pub samples: u64,
    pub complete: u64,
}

impl Share {
    pub fn percent(self) -> Option<f64> {
        (self.samples > 0).then(|| 100.0 * self.complete as f64 / self.samples as f64)
    }

    fn add(&mut self, count: u64, complete: bool) {
        self.samples += count;
        if complete {
            self.complete += count;
        }
    }
}

/// The shares of the programs, keyed by program, from one profiler's output.
pub type Shares = BTreeMap<String, Share>;

/// The processes whose samples count: pid to program name.
pub type Pids = BTreeMap<u32, String>;

/// The sum over all programs.
pub fn total(shares: &Shares) -> Share {
    shares.values().fold(Share::default(), |a, s| Share {
        samples: a.samples + s.samples,
        complete: a.complete + s.complete,
    })
}

#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    label: Vec<Label>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Label {
    #[prost(int64, tag = "1")]
    key: i64,
    #[prost(int64, tag = "3")]
    num: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(message, repeated, tag = "4")]
    line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    function_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
}

/// The shares in a pprof file (gzipped or not) whose samples carry the numeric label `pid`
/// (ours and lightswitch's do), and the count of all its samples (the whole host's); the
/// first sample value is the sample count.
pub fn from_pprof(bytes: &[u8], pids: &Pids) -> Result<(Shares, u64)> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut raw)
            .context("inflating the gzipped pprof")?;
        raw
    } else {
        bytes.to_vec()
    };
    let p = Profile::decode(raw.as_slice()).context("not a pprof Profile")?;
    let text = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| p.string_table.get(i))
            .map_or("", String::as_str)
    };
    let functions: BTreeMap<u64, &str> = p.function.iter().map(|f| (f.id, text(f.name))).collect();
    let locations: BTreeMap<u64, Vec<&str>> = p
        .location
        .iter()
        .map(|l| {
            let names = l
                .line
                .iter()
                .filter_map(|line| functions.get(&line.function_id).copied())
                .collect();
            (l.id, names)
        })
        .collect();
    let mut shares = empty(pids);
    let mut all = 0;
    for s in &p.sample {
        let count = s.value.first().copied().unwrap_or(0).max(0) as u64;
        all += count;
        let Some(share) = s
            .label
            .iter()
            .find(|l| text(l.key) == "pid")
            .and_then(|l| u32::try_from(l.num).ok())
            .and_then(|pid| pids.get(&pid))
            .and_then(|program| shares.get_mut(program))
        else {
            continue;
        };
        let complete = s
            .location_id
            .iter()
            .filter_map(|id| locations.get(id))
            .flatten()
            .any(|name| is_entry(name));
        share.add(count, complete);
    }
    Ok((shares, all))
}

/// The sample count `perf record` reports at its end (`... (3876 samples) ]`).
pub fn perf_record_samples(log: &str) -> Option<u64> {
    let (_, tail) = log.rsplit_once('(')?;
    tail.split_whitespace().next()?.parse().ok()
}

/// The shares in the output of `perf script -F comm,pid,ip,sym`: a header line per sample
/// (`comm pid`, comm may hold spaces), its frames on indented lines (`addr symbol`), and a
/// blank line after each sample.
pub fn from_perf_script(text: &str, pids: &Pids) -> Shares {
    let mut shares = empty(pids);
    let mut current: Option<(Option<u32>, bool)> = None;
    let mut finish = |current: &mut Option<(Option<u32>, bool)>| {
        if let Some((Some(pid), complete)) = current.take()
            && let Some(share) = pids.get(&pid).and_then(|p| shares.get_mut(p))
        {
            share.add(1, complete);
        }
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            finish(&mut current);
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, complete)) = &mut current {
                let symbol = line.trim().split_once(char::is_whitespace).map(|(_, s)| s);
                // perf prints the symbol, then ` (dso)` if asked for; the name has no spaces
                // (C++ signatures do, but none of the entry frames is one).
                let name = symbol.and_then(|s| s.split_whitespace().next());
                *complete |= name.is_some_and(is_entry);
            }
        } else {
            finish(&mut current);
            let pid = line
                .split_whitespace()
                .next_back()
                .and_then(|pid| pid.parse().ok());
            current = Some((pid, false));
        }
    }
    finish(&mut current);
    shares
}

fn empty(pids: &Pids) -> Shares {
    pids.values()
        .map(|p| (p.clone(), Share::default()))
        .collect()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Two gzip processes and a python one; pid 9 (another gzip on the host) does not count.
    fn pids() -> Pids {
        [(101, "gzip"), (102, "gzip"), (202, "python3.11")]
            .into_iter()
            .map(|(pid, p)| (pid, p.to_owned()))
            .collect()
    }

    #[test]
    fn entry_frames_with_and_without_versions() {
        assert!(is_entry("_start"));
        assert!(is_entry("__libc_start_main@@GLIBC_2.34"));
        assert!(!is_entry("main"));
        assert!(!is_entry("[unknown]"));
        assert!(!is_entry("_start_other"));
    }

    #[test]
    fn perf_record_sample_count() {
        let log = "[ perf record: Woken up 128 times to write data ]\n\
            [ perf record: Captured and wrote 32.243 MB /tmp/x/perf.data (3876 samples) ]\n";
        assert_eq!(perf_record_samples(log), Some(3876));
        assert_eq!(perf_record_samples("nothing"), None);
    }

    #[test]
    fn perf_script_samples_by_pid() {
        let text = "gzip 101\n\
            \t    55d1 deflate\n\
            \t    7f01 __libc_start_main@@GLIBC_2.34\n\
            \t    55c0 _start\n\
            \n\
            gzip 102\n\
            \t    55d1 deflate\n\
            \t    ffff [unknown]\n\
            \n\
            gzip 9\n\
            \t    55c0 _start\n\
            \n\
            python3.11 202\n\
            \t    55e1 _PyEval_EvalFrameDefault\n\
            \t    7f02 __libc_start_call_main\n\
            \n\
            sh 303\n\
            \t    55c0 _start\n";
        let shares = from_perf_script(text, &pids());
        assert_eq!(
            shares["gzip"],
            Share {
                samples: 2,
                complete: 1
            }
        );
        assert_eq!(
            shares["python3.11"],
            Share {
                samples: 1,
                complete: 1
            }
        );
        assert_eq!(shares.len(), 2, "other processes are not counted");
    }

    #[test]
    fn pprof_samples_by_pid_label_gzipped_or_not() {
        let strings = ["", "pid", "tid", "_start", "deflate"];
        let sample = |locations: Vec<u64>, count: i64, pid: i64| Sample {
            location_id: locations,
            value: vec![count, count * 1000],
            label: vec![Label { key: 2, num: 1 }, Label { key: 1, num: pid }],
        };
        let p = Profile {
            sample: vec![
                sample(vec![2, 1], 5, 101),
                sample(vec![2], 3, 102),
                sample(vec![2, 1], 7, 202),
                sample(vec![1], 9, 9),
            ],
            location: vec![
                Location {
                    id: 1,
                    line: vec![Line { function_id: 10 }],
                },
                Location {
                    id: 2,
                    line: vec![Line { function_id: 20 }],
                },
            ],
            function: vec![Function { id: 10, name: 3 }, Function { id: 20, name: 4 }],
            string_table: strings.iter().map(|s| (*s).to_owned()).collect(),
        };
        let raw = p.encode_to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let gz = gz.finish().unwrap();
        for bytes in [&raw, &gz] {
            let (shares, all) = from_pprof(bytes, &pids()).unwrap();
            assert_eq!(all, 24, "every sample of the host");
            assert_eq!(
                shares["gzip"],
                Share {
                    samples: 8,
                    complete: 5
                }
            );
            assert_eq!(
                shares["python3.11"],
                Share {
                    samples: 7,
                    complete: 7
                }
            );
            assert_eq!(
                total(&shares),
                Share {
                    samples: 15,
                    complete: 12
                }
            );
        }
        let (none, _) = from_pprof(&raw, &Pids::new()).unwrap();
        assert_eq!(total(&none).samples, 0, "no pid, no sample");
    }
}
