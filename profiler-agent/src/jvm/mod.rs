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
/// How long asking a JVM for its perf map may take (HotSpot starts its attach listener
/// within a few hundred milliseconds of the signal).
pub const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks process `pid` (under the procfs mount `proc`) for its perf map: the
/// `profiler_jvm_attach_total` outcome, `done` when the map was written, or `None` for a
/// process that is not a HotSpot JVM (never signalled). Failures are logged.
pub fn ask_for_perf_map(proc: &std::path::Path, pid: u32) -> Option<&'static str> {
    match jcmd(proc, pid, PERF_MAP_COMMAND, ATTACH_TIMEOUT) {
        Ok(_) => Some("done"),
        Err(AttachError::NotHotSpot { .. }) => None,
        Err(error) => {
            tracing::info!(pid, %error, "JVM perf map not written");
            Some(error.outcome())
        }
    }
}
