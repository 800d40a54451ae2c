//! The profiler agent: pipeline stages from the kernel sampler to pprof.
//!
//! `bpf` loads and drains the kernel side; `sampler` drives it per interval; `process`
//! snapshots processes; `procfile` is the one way to open a file a process controls (its
//! binaries, debug files, perf map); `symbolize` names frames; `profile` builds pprof;
//! `record` is the one-shot command.

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
pub mod metrics;
pub mod process;
pub mod procfile;
pub mod profile;
pub mod record;
pub mod sampler;
pub mod server;
pub mod symbolize;
pub mod targets;
pub mod write;
