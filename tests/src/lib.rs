//! End-to-end tests live in tests/. The library holds the decoders for what the agent sends
//! (worth fuzzing) and the reader of `go tool pprof -raw`.

pub mod decode;
pub mod go_pprof;
