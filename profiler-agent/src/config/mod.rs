//! The agent's configuration file (TOML): pyroscope.ebpf's arguments under their own names,
//! plus targets, discovery, relabel rules, write endpoints, the HTTP server and triggers.

pub mod duration;
