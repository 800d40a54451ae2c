//! Runs `profiler-agent run` for a benchmark: with a given config for a given window, its RSS
//! sampled along the way, its `/metrics` scraped just before SIGTERM, and its CPU and peak RSS
//! from `wait4`. Shared by the agent, scale, churn and soak benchmarks.
use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::child::{self, Child};
use crate::util::agent_binary;

/// A profiler's cost over its window.
pub struct Cost {
    pub cpu_per_s: f64,
    pub max_rss_kib: u64,
    pub wall_s: f64,
}

impl Cost {
    pub fn of(exit: &child::Exit) -> Self {
        let wall_s = exit.wall.as_secs_f64();
        Self {
            cpu_per_s: exit.cpu.as_secs_f64() / wall_s,
            max_rss_kib: exit.max_rss_kib,
            wall_s,
        }
    }
}

/// What one daemon run gave.
pub struct DaemonRun {
    pub cost: Cost,
    /// `/metrics` one second before SIGTERM.
    pub metrics: String,
    /// (seconds since start, VmRSS KiB), every `rss_every`.
    pub rss: Vec<(f64, u64)>,
    pub log: PathBuf,
}

/// Which processes a benchmark daemon profiles.
pub enum Targets<'a> {
    /// Every process on the host (as the embedded default).
    All,
    /// Only processes whose executable path matches this regex: the benchmark's own load,
    /// so that whatever else runs on the host is not symbolized and cannot skew the figures.
    Only(&'a str),
}

/// The config every benchmark daemon shares: targets named after their executable (as the
/// embedded default names processes outside containers), discovery every 5 s, the server on
/// `port`; `write` is the `[write]` table and anything after it.
pub fn config(port: u16, collect_interval_s: u64, targets: Targets, write: &str) -> String {
    let (targets_only, keep) = match targets {
        Targets::All => (false, String::new()),
        Targets::Only(regex) => (
            true,
            format!(
                "\n[[relabel]]\nsource_labels = [\"__meta_process_exe\"]\nregex = \"{regex}\"\n\
                 action = \"keep\"\n"
            ),
        ),
    };
    format!(
        r#"targets_only = {targets_only}
sample_rate = 97
collect_interval = "{collect_interval_s}s"

[discovery.process]
refresh_interval = "5s"

[[relabel]]
source_labels = ["__meta_process_exe"]
regex = ".*/([^/]+?)( \\(deleted\\))?"
target_label = "service_name"
action = "replace"
{keep}
[server]
listen_address = "127.0.0.1:{port}"

{write}
"#
    )
}

/// The `[write]` table that pushes every profile to `url` (a loopback receiver).
pub fn push_to(url: &str) -> String {
    format!("[write]\n[[write.endpoint]]\nname = \"bench\"\nurl = \"{url}\"\nprotocol = \"push\"\n")
}

/// `n` idle `sleep` processes living `seconds`, each a target for process discovery.
pub fn spawn_sleepers(n: usize, seconds: u64) -> Result<Vec<Child>> {
    (0..n)
        .map(|i| {
            let mut cmd = Command::new("sleep");
            cmd.arg(seconds.to_string()).stdin(Stdio::null());
            Child::spawn(&format!("idle process {i}"), &mut cmd)
        })
        .collect()
}

/// Runs the daemon with `config` for `seconds`, then SIGTERM (its final flush counts).
pub fn run(
    name: &str,
    config: &str,
    seconds: u64,
    rss_every: Duration,
    tmp: &Path,
) -> Result<DaemonRun> {
    let port = config_port(config)?;
    let config_path = tmp.join(format!("{name}.toml"));
    fs::write(&config_path, config)?;
    let log_path = tmp.join(format!("{name}.log"));
    let log = File::create(&log_path)?;
    let mut cmd = Command::new(agent_binary());
    cmd.args(["run", "--config"])
        .arg(&config_path)
        .current_dir(tmp)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut running = Child::spawn("profiler-agent run", &mut cmd)?;
    let window = Duration::from_secs(seconds);
    let scrape_at = window - Duration::from_secs(1);
    let mut rss = Vec::new();
    let mut next = rss_every;
    while running.elapsed() < scrape_at {
        child::sleep(next.min(scrape_at).saturating_sub(running.elapsed()))?;
        if running.elapsed() >= next {
            if let Some(kib) = vm_rss_kib(running.pid()) {
                rss.push((running.elapsed().as_secs_f64(), kib));
            }
            next += rss_every;
        }
    }
    let metrics = scrape(port).context("scraping the agent's /metrics")?;
    child::sleep(window.saturating_sub(running.elapsed()))?;
    running.signal(libc::SIGTERM)?;
    // `wait` counts from spawn: the window, then the flush deadline with room to spare.
    let exit = running.wait(window + Duration::from_secs(60))?;
    if !exit.status.success() {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        bail!(
            "profiler-agent run failed ({}); its log ends:\n{}",
            exit.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(DaemonRun {
        cost: Cost::of(&exit),
        metrics,
        rss,
        log: log_path,
    })
}

fn config_port(config: &str) -> Result<u16> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("listen_address = \"127.0.0.1:"))
        .and_then(|rest| rest.trim_end_matches('"').parse().ok())
        .context("the benchmark config has no loopback listen_address")
}

fn vm_rss_kib(pid: libc::pid_t) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET /metrics` in the text format.
fn scrape(port: u16) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of headers")?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "/metrics answered {}",
        head.lines().next().unwrap_or_default()
    );
    Ok(body.to_owned())
}

/// The sum of every series of `name` (all label sets).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Least-squares slope of `points` (x, y), in y units per x unit.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_series_of_one_name_only() {
        let text = "# TYPE a counter\na_total{x=\"1\"} 2\na_total{x=\"2\"} 3.5\n\
                    a_total_more 100\nb 7\n";
        assert_eq!(metric_sum(text, "a_total"), 5.5);
        assert_eq!(metric_sum(text, "b"), 7.0);
        assert_eq!(metric_sum(text, "c"), 0.0);
    }

    #[test]
    fn slope_of_a_line_and_of_noise_around_it() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), Some(2.0));
        assert_eq!(slope(&[(0.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
        let s = slope(&[(0.0, 10.0), (1.0, 9.0), (2.0, 12.0), (3.0, 11.0)]).unwrap();
        assert!((s - 0.6).abs() < 1e-9, "{s}");
    }

    #[test]
    fn port_from_the_config() {
        let c = config(4123, 15, Targets::All, "");
        assert_eq!(config_port(&c).unwrap(), 4123);
    }

    #[test]
    fn only_the_given_executables_are_targets() {
        let all = config(1, 15, Targets::All, "");
        assert!(all.starts_with("targets_only = false") && !all.contains("\"keep\""));
        let only = config(1, 15, Targets::Only(".*/bench-.*"), "");
        assert!(only.starts_with("targets_only = true"));
        assert!(only.contains("regex = \".*/bench-.*\"\naction = \"keep\""));
    }
}
