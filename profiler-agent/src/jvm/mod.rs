//! HotSpot JVMs seen from the host: asking one, through its dynamic attach mechanism, to
//! write the perf map that names its JIT-compiled methods ([`attach`]), with no sidecar,
//! no flag and no restart. The perf map is then read like any runtime's
//! (`symbolize::perfmap`, named by the JVM's pid in its own namespace).

pub mod attach;

pub use attach::{AttachError, jcmd};

/// The diagnostic command that makes HotSpot (JDK 17+) write `/tmp/perf-<pid>.map`.
pub const PERF_MAP_COMMAND: &str = "Compiler.perfmap";
