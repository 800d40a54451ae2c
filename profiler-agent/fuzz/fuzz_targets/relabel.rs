//! Relabel rules applied to a label set. A rule that builds (deserialized from the agent's
//! config file, or constructed from fields) is one `process` must apply without panicking;
//! every label it writes has a valid name and a non-empty value, a target is dropped only by
//! a keep/drop-style action, and no rules leave the labels as they were.
//!
//! Byte 0 picks the form of the rest. Even: TOML text as in the config file (`[[relabel]]`
//! tables), a NUL, then `name=value` lines. Odd: fields drawn by `Unstructured`, which
//! reaches regexes and templates without first having to be valid TOML.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Unstructured};
use libfuzzer_sys::fuzz_target;
use profiler_agent::config::AgentConfig;
use profiler_agent::discovery::relabel::{Action, RelabelConfig, RelabelConfigSpec, process};
use profiler_agent::labels::{Labels, is_valid_label_name};

const ACTIONS: [&str; 11] = [
    "replace",
    "keep",
    "drop",
    "keepequal",
    "dropequal",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
];

/// Names the drawn rules and labels share, so rules see labels they name.
const NAMES: [&str; 6] = ["a", "b", "__name__", "service_name", "${1}", "x_$1"];

fn from_toml(data: &[u8]) -> Option<(Vec<RelabelConfig>, Labels)> {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let text = std::str::from_utf8(&data[..split]).ok()?;
    let config = AgentConfig::parse(text, "fuzz", &|_| None).ok()?;
    let labels = String::from_utf8_lossy(data.get(split + 1..).unwrap_or_default())
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    Some((config.relabel, labels))
}

fn name(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    Ok(if u.ratio(3, 4)? {
        u.choose(&NAMES)?.to_string()
    } else {
        u.arbitrary()?
    })
}

/// A field's value: its default half of the time, since most rules set few fields.
fn field(u: &mut Unstructured<'_>, default: &str) -> arbitrary::Result<String> {
    Ok(if u.arbitrary()? {
        default.to_owned()
    } else {
        u.arbitrary()?
    })
}

fn from_fields(data: &[u8]) -> arbitrary::Result<(Vec<RelabelConfig>, Labels)> {
    let mut u = Unstructured::new(data);
    let mut rules = Vec::new();
    for _ in 0..u.int_in_range(0..=6)? {
        let defaults = RelabelConfigSpec::default();
        let source_labels = (0..u.int_in_range(0..=3)?)
            .map(|_| name(&mut u))
            .collect::<Result<_, _>>()?;
        let spec = RelabelConfigSpec {
            action: u.choose(&ACTIONS)?.parse::<Action>().expect("known action"),
            source_labels,
            separator: field(&mut u, &defaults.separator)?,
            target_label: if u.arbitrary()? {
                String::new()
            } else {
                name(&mut u)?
            },
            regex: field(&mut u, &defaults.regex)?,
            modulus: u.int_in_range(0..=3)?,
            replacement: field(&mut u, &defaults.replacement)?,
        };
        if let Ok(rule) = RelabelConfig::new(spec) {
            rules.push(rule);
        }
    }
    let mut labels = Labels::new();
    for _ in 0..u.int_in_range(0..=6)? {
        labels.insert(name(&mut u)?, u.arbitrary()?);
    }
    Ok((rules, labels))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parsed = if mode % 2 == 0 {
        from_toml(rest)
    } else {
        from_fields(rest).ok()
    };
    let Some((rules, labels)) = parsed else {
        return;
    };
    match process(labels.clone(), &rules) {
        Some(out) => {
            if rules.is_empty() {
                assert_eq!(out, labels);
            }
            for (n, v) in &out {
                if labels.get(n) != Some(v) {
                    assert!(is_valid_label_name(n), "wrote label name {n:?}");
                    assert!(!v.is_empty(), "wrote {n:?} empty");
                }
            }
        }
        None => assert!(
            rules.iter().any(|r| matches!(
                r.action(),
                Action::Keep | Action::Drop | Action::KeepEqual | Action::DropEqual
            )),
            "dropped by rules that cannot drop"
        ),
    }
});
