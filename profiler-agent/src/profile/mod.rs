//! Aggregation and encoding: resolved stacks (from the frames stage) into one pprof
//! profile, with one location per resolved location, one function per distinct frame,
//! mappings as the frames stage found them, `samples/count` and `cpu/nanoseconds` values and
//! `pid`, `comm` and `container_id` labels; then gzip ([`BuiltProfile::encode_gzip`]) and
//! folded stacks for flame graphs ([`folded()`]). Stacks are leaf first: kernel frames, then
//! user frames. Nothing here names a frame.

mod folded;
pub mod pprof;

pub use folded::{folded, folded_frame};

use std::{
    io::Write as _,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flate2::{Compression, write::GzEncoder};
// foldhash: the builder does a few hash lookups per function and label; seeded per map.
use foldhash::HashMap as FastMap;
use prost::Message as _;

use crate::frames::{Frame, Frames, MappingInfo, Stacks, UNKNOWN};
pub use crate::frames::{KERNEL_MAPPING, LOST_KERNEL_STACK, LOST_USER_STACK};

/// Name of the mapping of unmapped addresses and synthetic frames.
pub const UNKNOWN_MAPPING: &str = "[unknown]";

/// A built profile and its heaviest functions.
pub struct BuiltProfile {
    pub profile: pprof::Profile,
    /// Leaf function names with their sample counts, heaviest first.
    pub top_self: Vec<(String, u64)>,
    pub total_samples: u64,
}

/// gzip level of the profiles the agent sends. On a profile of 10 000 stacks x 30 frames
/// (benches/pprof.rs, flate2's miniz_oxide), level 3 is 2% larger than the default 6 in a
/// third of the time; level 1 takes a third of level 3's time for 15% more bytes. Level 1 was
/// tried with zlib-rs, and in the faults test's outage the agent's RSS grew 7-8 MiB in 75 s
/// against 3.7 MiB at level 3; not measured again with miniz_oxide.
pub const GZIP_LEVEL: u32 = 3;

impl BuiltProfile {
    pub fn encode_gzip(&self) -> std::io::Result<Vec<u8>> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::new(GZIP_LEVEL));
        encoder.write_all(&self.profile.encode_to_vec())?;
        encoder.finish()
    }
}

/// How a sample's thread name appears: pyroscope.ebpf's `comm` argument.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommMode {
    None,
    #[default]
    Label,
    /// The root frame of every stack.
    Stackframe,
    Both,
}

/// What goes into a profile besides the stacks.
#[derive(Clone, Copy, Debug)]
pub struct BuildOptions {
    pub sample_rate: u64,
    pub comm: CommMode,
    /// A numeric `pid` label on every sample.
    pub pid_label: bool,
    /// A `container_id` label on samples of processes in containers.
    pub container_label: bool,
}

impl BuildOptions {
    /// What `record` writes: every label, comm as a label.
    pub fn record(sample_rate: u64) -> Self {
        Self {
            sample_rate,
            comm: CommMode::Label,
            pid_label: true,
            container_label: true,
        }
    }
}

/// One profile of some resolved stacks, sampled from `start` for `duration`.
pub fn build(
    stacks: &Stacks<'_>,
    start: Option<SystemTime>,
    duration: Duration,
    options: &BuildOptions,
) -> BuiltProfile {
    let mut b = Builder {
        mapping_ids: vec![0; stacks.mappings.len()],
        ..Builder::default()
    };
    b.profile.sample.reserve_exact(stacks.samples.len());
    let period = 1_000_000_000 / options.sample_rate.max(1) as i64;
    let samples_type = b.value_type("samples", "count");
    let cpu_type = b.value_type("cpu", "nanoseconds");
    b.profile.sample_type = vec![samples_type, cpu_type];
    b.profile.period_type = Some(cpu_type);
    b.profile.period = period;
    b.profile.default_sample_type = 1;
    b.profile.time_nanos = start
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64);
    b.profile.duration_nanos = duration.as_nanos() as i64;
    let pid_key = b.string("pid");
    let comm_key = b.string("comm");
    let container_key = b.string("container_id");
    let comm_label = matches!(options.comm, CommMode::Label | CommMode::Both);
    let comm_frame = matches!(options.comm, CommMode::Stackframe | CommMode::Both);

    // Every location in the stacks' order, so location `i` has id `i + 1`: one pass over
    // them while their frames are adjacent, and no lookup per frame below.
    b.profile.location.reserve_exact(stacks.locations.len());
    for location in &stacks.locations {
        b.location(stacks, location);
    }
    // Self counts by leaf location; named once at the end, not once per sample.
    let mut top: FastMap<u64, u64> = FastMap::default();
    let mut total = 0;
    for resolved in &stacks.samples {
        let sample = resolved.sample;
        let stack = stacks.stack(resolved);
        let mut location_id = Vec::with_capacity(stack.len() + 1);
        location_id.extend(stack.iter().map(|&index| u64::from(index) + 1));
        if let Some(&leaf) = location_id.first() {
            *top.entry(leaf).or_default() += sample.count;
        }
        if comm_frame {
            location_id.push(b.synthetic_location(&sample.comm));
        }
        total += sample.count;
        let mut label = Vec::new();
        if options.pid_label {
            label.push(pprof::Label {
                key: pid_key,
                num: sample.pid as i64,
                ..Default::default()
            });
        }
        if comm_label {
            label.push(pprof::Label {
                key: comm_key,
                str: b.string(&sample.comm),
                ..Default::default()
            });
        }
        if options.container_label
            && let Some(id) = resolved.container_id
        {
            label.push(pprof::Label {
                key: container_key,
                str: b.string(id),
                ..Default::default()
            });
        }
        b.profile.sample.push(pprof::Sample {
            location_id,
            value: vec![sample.count as i64, sample.count as i64 * period],
            label,
        });
    }
    let mut by_name: FastMap<&str, u64> = FastMap::default();
    for (location, count) in top {
        *by_name.entry(b.leaf_name(location)).or_default() += count;
    }
    let mut top_self: Vec<(String, u64)> = by_name
        .into_iter()
        .map(|(name, count)| (name.to_owned(), count))
        .collect();
    top_self.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    BuiltProfile {
        profile: b.profile,
        top_self,
        total_samples: total,
    }
}

#[derive(Default)]
struct Builder {
    profile: pprof::Profile,
    strings: FastMap<String, i64>,
    /// By (name, system name, file) string indices: distinct strings, distinct functions.
    functions: FastMap<(i64, i64, Option<i64>), u64>,
    /// By the addresses of a frame's shared strings: a frame source hands out the same
    /// strings for every address of a function, so most frames are found here without
    /// hashing or comparing text. Sound because the stacks being built from (or `held`) keep
    /// every frame looked up alive, so no address is reused for other text meanwhile.
    functions_by_pointer: FastMap<(usize, usize, usize), u64>,
    held: Vec<Frames>,
    /// pprof ids by index of the stacks' mappings; 0 until added.
    mapping_ids: Vec<u64>,
    /// Thread-name frames, by name.
    synthetic: FastMap<String, u64>,
    unknown_mapping: Option<u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if self.profile.string_table.is_empty() {
            self.profile.string_table.push(String::new());
            self.strings.insert(String::new(), 0);
        }
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.profile.string_table.len() as i64;
        self.profile.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn value_type(&mut self, kind: &str, unit: &str) -> pprof::ValueType {
        pprof::ValueType {
            r#type: self.string(kind),
            unit: self.string(unit),
        }
    }

    /// The function of a frame kept alive by the stacks or `held`.
    fn function(&mut self, frame: &Frame) -> u64 {
        let pointers = (
            Arc::as_ptr(&frame.name) as *const u8 as usize,
            Arc::as_ptr(&frame.system_name) as *const u8 as usize,
            frame
                .file
                .as_ref()
                .map_or(0, |f| Arc::as_ptr(f) as *const u8 as usize),
        );
        if let Some(&id) = self.functions_by_pointer.get(&pointers) {
            return id;
        }
        let id = self.function_by_text(frame);
        self.functions_by_pointer.insert(pointers, id);
        id
    }

    fn function_by_text(&mut self, frame: &Frame) -> u64 {
        // The same strings in the same order as when the function is first added, and none
        // new when it already exists: the string table is as if looked up by the frame.
        let name = self.string(&frame.name);
        let system_name = self.string(&frame.system_name);
        let filename = frame.file.as_deref().map(|f| self.string(f));
        let key = (name, system_name, filename);
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let function = pprof::Function {
            id,
            name,
            system_name,
            filename: filename.unwrap_or(0),
            start_line: 0,
        };
        self.profile.function.push(function);
        self.functions.insert(key, id);
        id
    }

    fn mapping(&mut self, stacks: &Stacks<'_>, index: u32) -> u64 {
        let known = self.mapping_ids[index as usize];
        if known != 0 {
            return known;
        }
        let m: &MappingInfo = &stacks.mappings[index as usize];
        let id = self.profile.mapping.len() as u64 + 1;
        let build_id = m.build_id.as_deref().map_or(0, |b| self.string(b));
        let mapping = pprof::Mapping {
            id,
            memory_start: m.start,
            memory_limit: m.end,
            file_offset: m.offset,
            filename: self.string(&m.path),
            build_id,
            has_functions: true,
            ..Default::default()
        };
        self.profile.mapping.push(mapping);
        self.mapping_ids[index as usize] = id;
        id
    }

    /// The mapping of addresses outside every known mapping and of synthetic frames, so
    /// that every location has one (pprof readers expect it).
    fn unknown_mapping(&mut self) -> u64 {
        if let Some(id) = self.unknown_mapping {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let mapping = pprof::Mapping {
            id,
            filename: self.string(UNKNOWN_MAPPING),
            ..Default::default()
        };
        self.profile.mapping.push(mapping);
        self.unknown_mapping = Some(id);
        id
    }

    /// Adds the pprof location of one of the stacks' locations, with the next id.
    fn location(&mut self, stacks: &Stacks<'_>, location: &crate::frames::Location) -> u64 {
        let mapping_id = match location.mapping {
            Some(m) => self.mapping(stacks, m),
            None => self.unknown_mapping(),
        };
        let frames = &location.frames;
        // pprof wants the inlined callee first and its caller last, as the frames are.
        let line = frames
            .iter()
            .map(|f| pprof::Line {
                function_id: self.function(f),
                line: f.line as i64,
            })
            .collect();
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(pprof::Location {
            id,
            mapping_id,
            address: location.address,
            line,
            is_folded: false,
        });
        if let Some(m) = self
            .profile
            .mapping
            .get_mut(mapping_id.wrapping_sub(1) as usize)
        {
            m.has_filenames |= frames.iter().any(|f| f.file.is_some());
            m.has_line_numbers |= frames.iter().any(|f| f.line > 0);
            m.has_inline_frames |= frames.len() > 1;
        }
        id
    }

    /// A frame standing for no instruction (the thread name), on the unknown mapping.
    fn synthetic_location(&mut self, name: &str) -> u64 {
        if let Some(&id) = self.synthetic.get(name) {
            return id;
        }
        let frames: Frames = Arc::new([Frame::named(name)]);
        let function_id = self.function(&frames[0]);
        self.held.push(frames);
        let mapping_id = self.unknown_mapping();
        let id = self.profile.location.len() as u64 + 1;
        self.profile.location.push(pprof::Location {
            id,
            mapping_id,
            line: vec![pprof::Line {
                function_id,
                line: 0,
            }],
            ..Default::default()
        });
        self.synthetic.insert(name.to_owned(), id);
        id
    }

    /// The innermost function's name at a location (its first line's), or [`UNKNOWN`].
    fn leaf_name(&self, location_id: u64) -> &str {
        let p = &self.profile;
        p.location
            .get(location_id.wrapping_sub(1) as usize)
            .and_then(|l| l.line.first())
            .and_then(|line| p.function.get(line.function_id.wrapping_sub(1) as usize))
            .map_or(UNKNOWN, |f| &p.string_table[f.name as usize])
    }
}

#[cfg(test)]
mod roundtrip_tests;
#[cfg(test)]
mod tests;
