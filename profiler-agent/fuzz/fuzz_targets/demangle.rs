//! Symbol names from a profiled process's ELF files (any bytes it chooses) through
//! `Demangle::apply` in every mode: Rust legacy and v0, then the C++ demangler.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler_agent::symbolize::Demangle;

fuzz_target!(|data: &[u8]| {
    // Symbol names reach the demangler as UTF-8 (lossy) strings.
    let symbol = String::from_utf8_lossy(data);
    for mode in [
        Demangle::None,
        Demangle::Simplified,
        Demangle::Templates,
        Demangle::Full,
    ] {
        let out = mode.apply(&symbol);
        if mode == Demangle::None {
            assert_eq!(out, symbol);
        }
    }
});
