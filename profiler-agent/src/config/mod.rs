//! The agent's configuration file (TOML): pyroscope.ebpf's arguments under their own names,
//! plus static targets, discovery, relabel rules, write endpoints and the HTTP server.
//!
//! Loading is three steps, each of which names the offending field on failure: TOML syntax,
//! `${VAR}` expansion of string values ([`expand`]), then typed deserialization (unknown keys
//! refused) and the checks no type can express ([`AgentConfig::validate`]). With no file the
//! embedded default (`config/default.toml`) is used: every process on the host, named by its
//! container or executable, written to `./profiles`.

pub mod alloy;
pub mod expand;
#[cfg(test)]
mod tests;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    capture::{CaptureConfig, trigger::TriggerConfig},
    discovery::{DiscoveryConfig, relabel::RelabelConfig},
    labels::{Labels, is_valid_label_name},
    profile::CommMode,
    symbolize::{CacheConfig, Demangle},
    targets::TargetOptions,
    write::WriteConfig,
};

/// The embedded default configuration, used when no `--config` is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../config/default.toml");

/// Where profiles are written when no endpoint and no directory is configured.
pub const DEFAULT_DIRECTORY: &str = "./profiles";

/// The whole configuration. Every field has a default, documented in `config/agent.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// How often profiles are built and written (default 15s).
    #[serde(with = "crate::duration::positive")]
    pub collect_interval: Duration,
    /// Samples per second on each CPU (default 97).
    pub sample_rate: u64,
    pub pid_cache_size: usize,
    pub build_id_cache_size: usize,
    pub same_file_cache_size: usize,
    pub container_id_cache_size: usize,
    pub cache_rounds: u64,
    /// Bytes all loaded binaries' symbol data (file bytes read, decompressed sections, symbol
    /// tables, parsed DWARF) may take together (default 64 MiB); binaries past it degrade to
    /// their symbol table or `module+0x...`.
    pub symbol_memory_limit: u64,
    /// Bytes of kernel memory for unwind tables, 16 a row (default 32 MiB, two million rows;
    /// libc takes about 30 000). A binary whose table does not fit is walked with frame
    /// pointers, and counted in `profiler_unwind_tables_total{outcome="over_budget"}`.
    pub unwind_table_memory: u64,
    /// Deprecated by Alloy, still honoured: user stacks (default true).
    pub collect_user_profile: bool,
    /// Deprecated by Alloy for `kernel_frames`, still honoured (default true).
    pub collect_kernel_profile: bool,
    /// Kernel frames in the stacks (default true), as current Alloy's `kernel_frames`.
    pub kernel_frames: bool,
    /// Python functions in the stacks of CPython 3.8 to 3.13 processes (default true), as
    /// Alloy's `python_enabled`.
    pub python_enabled: bool,
    /// Ask a HotSpot JVM, before its capture ends, to write the perf map that names its
    /// JIT-compiled methods (default true), as Alloy's `hotspot_enabled`.
    pub hotspot_enabled: bool,
    /// With `hotspot_enabled`: a continuously profiled JVM whose compiled code went unnamed
    /// in an interval is asked for its perf map at most this often (default 5m). Not in
    /// pyroscope.ebpf.
    #[serde(with = "crate::duration::positive")]
    pub hotspot_perf_map_interval: Duration,
    /// none | simplified | templates | full (default simplified).
    #[serde(with = "demangle_name")]
    pub demangle: Demangle,
    /// Only processes matching a target are profiled (default true).
    pub targets_only: bool,
    /// Labels of the target unmatched processes go to when `targets_only` is false.
    pub default_target: Labels,
    /// none | label | stackframe | both (default label).
    pub comm: CommMode,
    /// Adds a `pid` label to every sample (default false).
    pub pid_label: bool,
    /// Static targets: label sets, e.g. `{ __process_pid__ = "42", service_name = "db" }`.
    pub targets: Vec<Labels>,
    pub discovery: DiscoveryConfig,
    /// Relabel rules applied in order to every discovered and static target.
    pub relabel: Vec<RelabelConfig>,
    pub write: WriteConfig,
    pub server: ServerConfig,
    /// The on-demand capture API (`GET /v1/profile`); fixed for the agent's life.
    pub capture: CaptureConfig,
    /// Threshold triggers (`[[trigger]]`); fixed for the agent's life.
    pub trigger: Vec<TriggerConfig>,
    /// What loading had to say about Alloy arguments (deprecated, ignored): logged by the
    /// caller. Not a key.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        let caches = CacheConfig::default();
        Self {
            collect_interval: Duration::from_secs(15),
            sample_rate: 97,
            pid_cache_size: caches.pid_cache_size,
            build_id_cache_size: caches.build_id_cache_size,
            same_file_cache_size: caches.same_file_cache_size,
            container_id_cache_size: 1024,
            cache_rounds: caches.cache_rounds,
            symbol_memory_limit: caches.symbol_memory_limit,
            unwind_table_memory: crate::bpf::DEFAULT_UNWIND_TABLE_MEMORY,
            collect_user_profile: true,
            collect_kernel_profile: true,
            kernel_frames: true,
            python_enabled: true,
            hotspot_enabled: true,
            hotspot_perf_map_interval: Duration::from_secs(300),
            demangle: Demangle::Simplified,
            targets_only: true,
            default_target: Labels::new(),
            comm: CommMode::Label,
            pid_label: false,
            targets: Vec::new(),
            discovery: DiscoveryConfig::default(),
            relabel: Vec::new(),
            write: WriteConfig::default(),
            server: ServerConfig::default(),
            capture: CaptureConfig::default(),
            trigger: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of /metrics, /ready, /healthz and the flame graph page.
    pub listen_address: SocketAddr,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen_address: SocketAddr::from(([127, 0, 0, 1], 4100)),
        }
    }
}

/// Why a configuration was refused. Every variant names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: invalid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: `{field}`: {reason}")]
    Invalid {
        origin: String,
        field: String,
        reason: String,
    },
}

impl ConfigError {
    /// The field the error is about, when it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

impl AgentConfig {
    /// Reads, expands, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), &|name| {
            std::env::var(name).ok()
        })
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Self {
        Self::parse(EMBEDDED_DEFAULT, "embedded default", &|_| None)
            .expect("the embedded default config is valid (tested)")
    }

    /// Parses `text`, taking `${VAR}` values from `env`; `origin` names the source in errors.
    pub fn parse(
        text: &str,
        origin: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let invalid = |field: String, reason: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            field,
            reason,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: crate::write::config::redact_urls(e.to_string().trim_end()),
        })?;
        expand::expand_table(&mut table, "", env).map_err(|e| invalid(e.field, e.reason))?;
        let warnings =
            alloy::review(&mut table).map_err(|(field, reason)| invalid(field, reason))?;
        let config: AgentConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let field = e.path().to_string();
                invalid(field, e.into_inner().message().to_owned())
            })?;
        let mut config = config;
        config.warnings = warnings;
        config
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        if config.write.endpoint.is_empty() && config.write.directory.is_none() {
            // Profiles must go somewhere: with no endpoint, to a local directory.
            config.write.directory = Some(PathBuf::from(DEFAULT_DIRECTORY));
        }
        Ok(config)
    }

    /// Checks that types cannot express. Returns the field and the reason.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let positive = |name: &str, value: usize| {
            if value == 0 {
                Err((name.to_owned(), "must be at least 1".to_owned()))
            } else {
                Ok(())
            }
        };
        if !(1..=10_000).contains(&self.sample_rate) {
            return Err(("sample_rate".into(), "must be between 1 and 10000".into()));
        }
        positive("pid_cache_size", self.pid_cache_size)?;
        positive("build_id_cache_size", self.build_id_cache_size)?;
        positive("same_file_cache_size", self.same_file_cache_size)?;
        positive("container_id_cache_size", self.container_id_cache_size)?;
        if !self.collect_user_profile && !self.collect_kernel() {
            return Err((
                "collect_user_profile".into(),
                "no user stacks (collect_user_profile = false) and no kernel frames \
                 (kernel_frames or collect_kernel_profile = false): nothing to profile"
                    .into(),
            ));
        }
        check_label_names("default_target", &self.default_target)?;
        for (i, target) in self.targets.iter().enumerate() {
            check_label_names(&format!("targets[{i}]"), target)?;
        }
        if let Some(docker) = &self.discovery.docker {
            docker
                .validate()
                .map_err(|e| ("discovery.docker.host".to_owned(), e.to_string()))?;
        }
        self.write
            .validate()
            .map_err(|e| (e.field.clone(), e.reason.clone()))?;
        self.capture.token(self.server.listen_address)?;
        for (i, trigger) in self.trigger.iter().enumerate() {
            trigger
                .validate()
                .map_err(|(field, reason)| (format!("trigger[{i}].{field}"), reason))?;
        }
        Ok(())
    }

    /// Kernel stacks are recorded: `kernel_frames` and the deprecated
    /// `collect_kernel_profile` both true.
    pub fn collect_kernel(&self) -> bool {
        self.kernel_frames && self.collect_kernel_profile
    }

    pub fn cache_config(&self) -> CacheConfig {
        CacheConfig {
            pid_cache_size: self.pid_cache_size,
            build_id_cache_size: self.build_id_cache_size,
            same_file_cache_size: self.same_file_cache_size,
            cache_rounds: self.cache_rounds,
            symbol_memory_limit: self.symbol_memory_limit,
        }
    }

    pub fn target_options(&self) -> TargetOptions {
        TargetOptions {
            targets_only: self.targets_only,
            default_target: self.default_target.clone(),
        }
    }

    /// The effective configuration as TOML, secrets redacted (`check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn check_label_names(field: &str, labels: &Labels) -> Result<(), (String, String)> {
    match labels.keys().find(|name| !is_valid_label_name(name)) {
        Some(name) => Err((
            format!("{field}.{name}"),
            "label names must match [a-zA-Z_][a-zA-Z0-9_]*".to_owned(),
        )),
        None => Ok(()),
    }
}

/// `demangle` by its pyroscope.ebpf name.
mod demangle_name {
    use serde::{Deserialize as _, Deserializer, Serializer};

    use crate::symbolize::Demangle;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Demangle, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "unknown demangle mode {s:?}, expected none, simplified, templates or full"
            ))
        })
    }

    pub fn serialize<S: Serializer>(value: &Demangle, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match value {
            Demangle::None => "none",
            Demangle::Simplified => "simplified",
            Demangle::Templates => "templates",
            Demangle::Full => "full",
        })
    }
}
