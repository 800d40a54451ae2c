//! End-to-end tests live in tests/. The library holds what is worth fuzzing: the decoders
//! for what the agent sends.

pub mod decode;
