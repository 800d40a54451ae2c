//! Arbitrary text as the agent's config file, through `AgentConfig::parse`: TOML, `${VAR}`
//! expansion, typed deserialization and validation must give an error, never a panic. An
//! accepted config must render (`check-config`) as TOML that reads back.
//!
//! Validation reads the files a config names (secrets, TLS certificates) as the agent does.
//! Inputs naming a file that is not regular, lives under /proc, /sys or /dev, or is larger
//! than 1 MiB are skipped: reading /dev/zero or /dev/stdin never ends, and that is the
//! host's doing, not the parser's.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use profiler_agent::config::{AgentConfig, expand};

/// A fixed environment, so results do not depend on the host's.
fn env(name: &str) -> Option<String> {
    let value = match name {
        // config/agent.toml's.
        "NODE_NAME" => "node-1",
        "TENANT" => "team-a",
        "DATAKIT_TOKEN" => "t0ken",
        // corpus/config/small-expand-capture.toml's.
        "EMPTY" => "",
        "PORT" => "4040",
        _ => return None,
    };
    Some(value.to_owned())
}

fn risky_path(s: &str) -> bool {
    let Ok(path) = Path::new(s).canonicalize() else {
        return false;
    };
    let special = ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| path.starts_with(p));
    special
        || std::fs::metadata(&path)
            .is_ok_and(|m| !m.is_dir() && (!m.is_file() || m.len() > 1 << 20))
}

fn names_risky_path(value: &toml::Value) -> bool {
    match value {
        toml::Value::String(s) => risky_path(s),
        toml::Value::Array(items) => items.iter().any(names_risky_path),
        toml::Value::Table(table) => table.values().any(names_risky_path),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    // The agent reads the file with read_to_string: non-UTF-8 files never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Paths as validation will see them: after expansion.
    if let Ok(mut table) = toml::from_str::<toml::Table>(text) {
        let _ = expand::expand_table(&mut table, "", &env);
        if names_risky_path(&toml::Value::Table(table)) {
            return;
        }
    }
    let Ok(config) = AgentConfig::parse(text, "fuzz", &env) else {
        return;
    };
    let rendered = config.to_toml();
    if let Err(e) = toml::from_str::<toml::Table>(&rendered) {
        panic!("check-config output is not TOML ({e}):\n{rendered}");
    }
});
