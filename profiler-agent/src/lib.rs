//! The profiler agent. Its modules in pipeline order, each importing only modules listed
//! before it (checked by `tests/module_order.rs`):
//!
//! 1. Foundations: `backoff` (retry delays), `cache` (round-based LRU), `duration` (config
//!    durations), `labels` (label sets and name rules), `memory` (giving freed heap back to
//!    the kernel), `procfile` (the one way to open a file a profiled process controls).
//! 2. Sample: `process` (process snapshots: mappings, executable, container), `sampler` (the
//!    drain loop over a stack source), `unwind` (unwind tables from `.eh_frame` and
//!    `.debug_frame`, which the kernel program will walk user stacks with: before `bpf`, which
//!    loads them), `bpf` (the kernel program, its maps, opening a sampler).
//! 3. Frames: `symbolize` (ELF, DWARF, Go, kallsyms and perf-map readers), `python`
//!    (CPython's layout: finding an interpreter, reading and naming its frames), `jvm`
//!    (HotSpot's dynamic attach: asking a JVM for its perf map), `frames`
//!    (the stage that resolves raw stacks, and its frame sources).
//! 4. Counters: `metrics` (the Prometheus registry every later stage reports to).
//! 5. Targets: `targets` (which series a process's samples go to), `discovery` (Docker,
//!    Kubernetes, process and static providers, relabeling).
//! 6. Profile: `profile` (aggregation into pprof, folded stacks), `interval` (one interval from
//!    samples to one profile per target: the stage `run`, `record` and captures share).
//! 7. Write: `write` (Pyroscope, DataKit and directory sinks, queue and retries).
//! 8. Entry points: `capture` (on-demand and triggered captures of one process), `server`
//!    (HTTP: metrics, health, page, capture API), `config` (the configuration file), `daemon`
//!    (`run`), `record` (the one-shot command).

pub mod backoff;
pub mod bpf;
pub mod cache;
pub mod capture;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod duration;
pub mod frames;
pub mod interval;
pub mod jvm;
pub mod labels;
pub mod memory;
pub mod metrics;
pub mod process;
pub mod procfile;
pub mod profile;
pub mod python;
pub mod record;
pub mod sampler;
pub mod server;
pub mod symbolize;
pub mod targets;
pub mod unwind;
pub mod write;
