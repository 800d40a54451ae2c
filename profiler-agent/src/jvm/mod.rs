//! HotSpot JVMs seen from the host: asking one, through its dynamic attach mechanism, to
//! write the perf map that names its JIT-compiled methods ([`attach`]), with no sidecar,
//! no flag and no restart; and doing so, rate-limited, for continuously profiled JVMs whose
//! compiled code went unnamed ([`refresh`]). The perf map is then read like any runtime's
//! (`symbolize::perfmap`, named by the JVM's pid in its own namespace).

pub mod attach;
pub mod refresh;

pub use attach::{AttachError, jcmd};
pub use refresh::PerfMapRefresher;

/// The diagnostic command that makes HotSpot (JDK 17+) write `/tmp/perf-<pid>.map`.
pub const PERF_MAP_COMMAND: &str = "Compiler.perfmap";
