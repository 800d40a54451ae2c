//! Grafana Alloy's `pyroscope.ebpf` arguments, legacy and current, and what this agent does
//! with each one found at the top level of a config file: [`review`] leaves the ones it
//! implements to deserialization, warns about the deprecated ones, drops the ones that mean
//! nothing here, and refuses the ones not built yet unless they are set to their "off" value.
//! [`ARGUMENTS`] is also the source of README's compatibility table (a test keeps the two
//! equal).
//!
//! Legacy: Alloy up to v1.10, with its own eBPF profiler (defaults from its
//! `NewDefaultArguments`). Current: Alloy v1.11 and later, built on the OpenTelemetry eBPF
//! profiler (arguments and defaults of v1.19's `args.go` and `NewDefaultArguments`).

/// What this agent does with an Alloy argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// Implemented under the same name.
    Same,
    /// Implemented, but deprecated by current Alloy (a no-op there): accepted with a warning
    /// that names what to use instead.
    Deprecated { instead: &'static str },
    /// Accepted and dropped with a warning: it has no meaning in this agent.
    Ignored { why: &'static str },
    /// Not built yet: accepted only at `off` (a TOML literal, the value that asks for nothing
    /// this agent lacks), refused otherwise with `why`.
    NotBuilt {
        off: Option<&'static str>,
        why: &'static str,
    },
    /// Configured elsewhere in this file: refused, naming where.
    Elsewhere { instead: &'static str },
}

/// One argument of Alloy's `pyroscope.ebpf`, with its defaults as TOML literals (`None`:
/// not an argument of that version; `Some("")`: optional without a default;
/// `Some("required")`: required).
#[derive(Clone, Copy, Debug)]
pub struct AlloyArgument {
    pub name: &'static str,
    pub legacy: Option<&'static str>,
    pub current: Option<&'static str>,
    pub support: Support,
}

const fn arg(
    name: &'static str,
    legacy: Option<&'static str>,
    current: Option<&'static str>,
    support: Support,
) -> AlloyArgument {
    AlloyArgument {
        name,
        legacy,
        current,
        support,
    }
}

/// The repeated answers of [`ARGUMENTS`].
const SYMBOL_CACHE: Support = Support::Deprecated {
    instead: "symbol_memory_limit bounds symbol data",
};
const DEFAULT_SUITS: Support = Support::Deprecated {
    instead: "nothing: the default suits every host",
};
const MAP_SIZE: Support = Support::Ignored {
    why: "the kernel maps are sized by unwind_table_memory and the sampler",
};
const LANGUAGE: Support = not_built(
    Some("false"),
    "this agent names native (C, C++, Rust, Go), Python and JIT perf-map frames only",
);
const PROBES: &str = "this agent samples on a timer only, not from probes";
const CORRELATION: &str = "trace correlation through pinned maps is not built";

/// Every argument of both versions, in README's order.
pub const ARGUMENTS: &[AlloyArgument] = &[
    arg(
        "forward_to",
        Some("required"),
        Some("required"),
        Support::Elsewhere { instead: "[write]" },
    ),
    arg("targets", Some("required"), Some(""), Support::Same),
    arg(
        "collect_interval",
        Some("\"15s\""),
        Some("\"15s\""),
        Support::Same,
    ),
    arg("sample_rate", Some("97"), Some("19"), Support::Same),
    arg(
        "demangle",
        Some("\"none\""),
        Some("\"none\""),
        Support::Same,
    ),
    arg("comm", None, Some("\"none\""), Support::Same),
    arg("pid_label", None, Some("false"), Support::Same),
    arg("kernel_frames", None, Some("true"), Support::Same),
    arg("targets_only", None, Some("true"), Support::Same),
    arg("pid_cache_size", Some("32"), Some("32"), SYMBOL_CACHE),
    arg("build_id_cache_size", Some("64"), Some("64"), SYMBOL_CACHE),
    arg("same_file_cache_size", Some("8"), Some("8"), SYMBOL_CACHE),
    arg(
        "container_id_cache_size",
        Some("1024"),
        Some("1024"),
        DEFAULT_SUITS,
    ),
    arg("cache_rounds", Some("3"), Some(""), DEFAULT_SUITS),
    arg(
        "collect_user_profile",
        Some("true"),
        Some("true"),
        Support::Deprecated {
            instead: "nothing: user stacks are always wanted",
        },
    ),
    arg(
        "collect_kernel_profile",
        Some("true"),
        Some("true"),
        Support::Deprecated {
            instead: "kernel_frames",
        },
    ),
    arg("pid_map_size", Some("16384"), Some("2048"), MAP_SIZE),
    arg("symbols_map_size", Some("2048"), Some("16384"), MAP_SIZE),
    arg(
        "go_table_fallback",
        Some("false"),
        Some("false"),
        Support::Ignored {
            why: "Go binaries are named from .gopclntab, then from their symbol table",
        },
    ),
    arg("python_enabled", Some("true"), Some("true"), Support::Same),
    arg("hotspot_enabled", None, Some("true"), Support::Same),
    arg("perl_enabled", None, Some("true"), LANGUAGE),
    arg("php_enabled", None, Some("true"), LANGUAGE),
    arg("ruby_enabled", None, Some("true"), LANGUAGE),
    arg("v8_enabled", None, Some("true"), LANGUAGE),
    arg("dotnet_enabled", None, Some("true"), LANGUAGE),
    arg(
        "go_enabled",
        None,
        Some("true"),
        not_built(Some("true"), "Go frames are always named"),
    ),
    arg(
        "off_cpu_threshold",
        None,
        Some("0"),
        not_built(Some("0"), "this agent samples on-CPU stacks only"),
    ),
    arg("probe_links", None, Some(""), not_built(None, PROBES)),
    arg("u_probe_links", None, Some(""), not_built(None, PROBES)),
    arg(
        "load_probe",
        None,
        Some("false"),
        not_built(Some("false"), PROBES),
    ),
    arg(
        "bpf_fs_root",
        None,
        Some("\"/sys/fs/bpf/\""),
        not_built(None, CORRELATION),
    ),
    arg(
        "obi_process_context_enabled",
        None,
        Some("true"),
        not_built(Some("false"), CORRELATION),
    ),
    arg(
        "verbose_mode",
        None,
        Some("false"),
        not_built(Some("false"), "set RUST_LOG=debug for verbose logs"),
    ),
    arg(
        "lazy_mode",
        None,
        Some("false"),
        not_built(Some("false"), "the sampler always starts at once"),
    ),
    arg(
        "no_kernel_version_check",
        None,
        Some("false"),
        not_built(
            Some("false"),
            "the kernel's features are probed when the program loads",
        ),
    ),
];

const fn not_built(off: Option<&'static str>, why: &'static str) -> Support {
    Support::NotBuilt { off, why }
}

/// The argument called `name`, if Alloy has one.
pub fn argument(name: &str) -> Option<&'static AlloyArgument> {
    ARGUMENTS.iter().find(|a| a.name == name)
}

/// A refused argument: the field and the reason.
pub type Refusal = (String, String);

/// Reviews the top-level keys of `table` that are Alloy arguments: drops those accepted
/// without effect, and returns the warnings to log, or the first refusal.
pub fn review(table: &mut toml::Table) -> Result<Vec<String>, Refusal> {
    let mut warnings = Vec::new();
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let Some(argument) = argument(&key) else {
            continue;
        };
        match argument.support {
            Support::Same => {}
            Support::Deprecated { instead } => warnings.push(format!(
                "`{key}` is deprecated in Grafana Alloy's pyroscope.ebpf (a no-op there since \
                 v1.11); this agent still honours it. Instead: {instead}"
            )),
            Support::Ignored { why } => {
                table.remove(&key);
                warnings.push(format!(
                    "`{key}` has no effect in this agent and is ignored: {why}"
                ));
            }
            Support::NotBuilt { off, why } => {
                let value = table.remove(&key).map(|v| v.to_string());
                if off.is_none() || value.as_deref() != off {
                    let accepted = off.map_or(String::new(), |off| {
                        format!(" (only `{key} = {off}` is accepted)")
                    });
                    return Err((key, format!("not built in this agent: {why}{accepted}")));
                }
            }
            Support::Elsewhere { instead } => {
                return Err((
                    key,
                    format!("a pyroscope.ebpf argument that this agent configures in {instead}"),
                ));
            }
        }
    }
    Ok(warnings)
}
