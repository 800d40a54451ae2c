//! Threshold triggers (`[[trigger]]`): every `capture.monitor_interval` the monitor reads
//! each process's CPU time and resident memory from /proc. When a process matching a
//! trigger's `service` and `command` crosses its CPU or memory threshold, and that trigger's
//! cooldown for that process has passed, it is captured on a thread of its own; the profile
//! goes to every write endpoint with the process's target labels, the trigger's tags and
//! `trigger="cpu"|"memory"`, and the last `capture.keep` captures stay in
//! `capture.directory`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use regex::Regex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{CaptureError, Capturer, request};
use crate::{
    duration,
    labels::{Labels, SERVICE_NAME, check_label_name},
    metrics::AgentMetrics,
    process::{cgroup, procfs},
    targets::TargetSet,
    write::{ProfileSeries, Submit, directory::keep_capture},
};

/// One `[[trigger]]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriggerConfig {
    /// Only processes whose target has this `service_name`.
    pub service: Option<String>,
    /// Only processes whose command line (arguments joined by spaces) matches this regex.
    pub command: Option<String>,
    /// Fires above this CPU use (100 = one core; more on several cores).
    pub cpu_usage_percent: Option<f64>,
    /// Fires above this share of the host's memory, resident.
    pub mem_usage_percent: Option<f64>,
    /// Fires above this much resident memory, in MiB.
    pub mem_usage_mb: Option<u64>,
    /// Length of the capture (default 30s, at most 5m).
    #[serde(with = "duration::positive")]
    pub duration: Duration,
    /// Samples per second of the capture (default 97, at most 999).
    pub sample_rate: u64,
    /// Labels added to the pushed capture.
    pub tags: Labels,
    /// No second capture of the same process by this trigger for this long (default 5m).
    #[serde(with = "duration::positive")]
    pub cooldown: Duration,
}

impl Default for TriggerConfig {
    fn default() -> Self {
        Self {
            service: None,
            command: None,
            cpu_usage_percent: None,
            mem_usage_percent: None,
            mem_usage_mb: None,
            duration: request::DEFAULT_DURATION,
            sample_rate: request::DEFAULT_SAMPLE_RATE,
            tags: Labels::new(),
            cooldown: Duration::from_secs(300),
        }
    }
}

impl TriggerConfig {
    /// Errors are (field under `trigger[i].`, reason).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.cpu_usage_percent.is_none()
            && self.mem_usage_percent.is_none()
            && self.mem_usage_mb.is_none()
        {
            return Err((
                "cpu_usage_percent",
                "a trigger needs cpu_usage_percent, mem_usage_percent or mem_usage_mb".into(),
            ));
        }
        let positive = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v > 0.0);
        if !positive(self.cpu_usage_percent) {
            return Err(("cpu_usage_percent", "must be above 0".into()));
        }
        if !positive(self.mem_usage_percent) || self.mem_usage_percent.is_some_and(|v| v > 100.0) {
            return Err((
                "mem_usage_percent",
                "must be above 0 and at most 100".into(),
            ));
        }
        if self.mem_usage_mb == Some(0) {
            return Err(("mem_usage_mb", "must be at least 1".into()));
        }
        self.regex().map_err(|reason| ("command", reason))?;
        if !(request::MIN_DURATION..=request::MAX_DURATION).contains(&self.duration) {
            return Err(("duration", "must be between 100ms and 5m".into()));
        }
        if !(1..=request::MAX_SAMPLE_RATE).contains(&self.sample_rate) {
            return Err(("sample_rate", "must be between 1 and 999".into()));
        }
        for name in self.tags.keys() {
            check_label_name(name).map_err(|r| ("tags", format!("{name}: {r}")))?;
            if name == "trigger" || name == SERVICE_NAME {
                return Err(("tags", format!("{name}: set by the agent")));
            }
        }
        Ok(())
    }

    fn regex(&self) -> Result<Option<Regex>, String> {
        self.command
            .as_deref()
            .map(|c| request::command_regex(c).map_err(|e| e.to_string()))
            .transpose()
    }
}

/// What crossed a threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    Cpu,
    Memory,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::Cpu => "cpu",
            Cause::Memory => "memory",
        }
    }
}

/// One process's use over the last monitor interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    pub cpu_percent: f64,
    pub rss_bytes: u64,
}

/// Which threshold, if any, `usage` crosses for `trigger` (CPU first).
pub fn crossed(trigger: &TriggerConfig, usage: Usage, mem_total_bytes: u64) -> Option<Cause> {
    if trigger
        .cpu_usage_percent
        .is_some_and(|t| usage.cpu_percent >= t)
    {
        return Some(Cause::Cpu);
    }
    let mib = usage.rss_bytes as f64 / 1_048_576.0;
    let percent = if mem_total_bytes > 0 {
        100.0 * usage.rss_bytes as f64 / mem_total_bytes as f64
    } else {
        0.0
    };
    if trigger.mem_usage_mb.is_some_and(|t| mib >= t as f64)
        || trigger.mem_usage_percent.is_some_and(|t| percent >= t)
    {
        return Some(Cause::Memory);
    }
    None
}

fn mem_total_bytes(proc_root: &Path) -> u64 {
    std::fs::read_to_string(proc_root.join("meminfo"))
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The threshold monitor's settings from `[capture]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MonitorSettings {
    pub interval: Duration,
    pub directory: Option<PathBuf>,
    pub keep: usize,
}

/// The monitor thread; stops when dropped.
pub struct TriggerMonitor {
    stop: Arc<AtomicBool>,
    /// New triggers and settings (a reload), taken by the thread at its next turn.
    pending: Arc<Mutex<Option<Reconfiguration>>>,
}

/// Triggers and settings waiting for the monitor thread.
type Reconfiguration = (Vec<TriggerConfig>, MonitorSettings);

impl Drop for TriggerMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

struct Monitor {
    triggers: Vec<(TriggerConfig, Option<Regex>)>,
    settings: MonitorSettings,
    capturer: Arc<Capturer>,
    targets: watch::Receiver<Arc<TargetSet>>,
    submit: Submit,
    metrics: Arc<AgentMetrics>,
    proc_root: PathBuf,
    /// Each process at the last turn; the start time tells a reused pid.
    readings: HashMap<u32, procfs::Stat>,
    /// Last firing per (trigger index, pid).
    fired: HashMap<(usize, u32), Instant>,
}

impl TriggerMonitor {
    /// Starts watching; triggers were validated with the configuration.
    pub fn start(
        triggers: &[TriggerConfig],
        settings: MonitorSettings,
        capturer: Arc<Capturer>,
        targets: watch::Receiver<Arc<TargetSet>>,
        submit: Submit,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut monitor = Monitor {
            triggers: triggers
                .iter()
                .map(|t| (t.clone(), t.regex().ok().flatten()))
                .collect(),
            settings,
            capturer,
            targets,
            submit,
            metrics,
            proc_root: PathBuf::from("/proc"),
            readings: HashMap::new(),
            fired: HashMap::new(),
        };
        let flag = stop.clone();
        let pending: Arc<Mutex<Option<Reconfiguration>>> = Arc::new(Mutex::new(None));
        let taken = pending.clone();
        std::thread::Builder::new()
            .name("triggers".into())
            .spawn(move || {
                let mut last = Instant::now();
                while !flag.load(Ordering::SeqCst) {
                    let elapsed = last.elapsed();
                    last = Instant::now();
                    if let Some((triggers, settings)) = taken.lock().ok().and_then(|mut p| p.take())
                    {
                        monitor.reconfigure(&triggers, settings);
                    }
                    monitor.check(elapsed);
                    let until = last + monitor.settings.interval;
                    while Instant::now() < until && !flag.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
            .expect("spawning a thread");
        Self { stop, pending }
    }

    /// Replaces the triggers and settings from the next turn on (a reload). Cooldowns
    /// carry over for triggers that did not change.
    pub fn reconfigure(&self, triggers: &[TriggerConfig], settings: MonitorSettings) {
        if let Ok(mut pending) = self.pending.lock() {
            *pending = Some((triggers.to_vec(), settings));
        }
    }
}

impl Monitor {
    fn reconfigure(&mut self, triggers: &[TriggerConfig], settings: MonitorSettings) {
        let old = std::mem::take(&mut self.triggers);
        self.triggers = triggers
            .iter()
            .map(|t| (t.clone(), t.regex().ok().flatten()))
            .collect();
        let unchanged = |i: usize| old.get(i).map(|(t, _)| t) == triggers.get(i);
        self.fired.retain(|(i, _), _| unchanged(*i));
        self.settings = settings;
        tracing::info!(triggers = self.triggers.len(), "triggers reloaded");
    }

    fn check(&mut self, elapsed: Duration) {
        let ticks_per_s = procfs::clock_ticks() as f64;
        let mem_total = mem_total_bytes(&self.proc_root);
        let page = procfs::page_size();
        let me = std::process::id();
        let mut seen = HashMap::with_capacity(self.readings.len());
        for pid in procfs::pids(&self.proc_root).filter(|&pid| pid != me) {
            let dir = self.proc_root.join(pid.to_string());
            let Some(now) = procfs::stat(&dir) else {
                continue;
            };
            // A first reading (or a reused pid) has no CPU rate yet.
            let cpu_percent = match self.readings.get(&pid) {
                Some(before) if before.start_time == now.start_time && elapsed > Duration::ZERO => {
                    100.0 * (now.cpu_ticks.saturating_sub(before.cpu_ticks)) as f64
                        / ticks_per_s
                        / elapsed.as_secs_f64()
                }
                _ => 0.0,
            };
            seen.insert(pid, now);
            let usage = Usage {
                cpu_percent,
                rss_bytes: now.rss_pages * page,
            };
            for i in 0..self.triggers.len() {
                if let Some(cause) = crossed(&self.triggers[i].0, usage, mem_total) {
                    self.consider(i, pid, &dir, cause);
                }
            }
        }
        self.readings = seen;
        let longest = self
            .triggers
            .iter()
            .map(|(t, _)| t.cooldown)
            .max()
            .unwrap_or_default();
        self.fired.retain(|_, at| at.elapsed() < longest);
    }

    /// Fires trigger `i` for `pid` if the process matches and the cooldown has passed.
    fn consider(&mut self, i: usize, pid: u32, dir: &Path, cause: Cause) {
        let (trigger, regex) = &self.triggers[i];
        if self
            .fired
            .get(&(i, pid))
            .is_some_and(|at| at.elapsed() < trigger.cooldown)
        {
            return;
        }
        if let Some(re) = regex
            && !procfs::command_line(dir).is_some_and(|command| re.is_match(&command))
        {
            return;
        }
        let mut labels = self.labels_of(pid, dir);
        if trigger
            .service
            .as_ref()
            .is_some_and(|s| labels.get(SERVICE_NAME) != Some(s))
        {
            return;
        }
        labels.extend(trigger.tags.clone());
        labels.insert("trigger".into(), cause.label().into());
        self.fired.insert((i, pid), Instant::now());
        self.metrics.trigger_fired(cause.label());
        tracing::info!(pid, trigger = cause.label(), ?labels, "trigger fired");
        let job = TriggeredCapture {
            pid,
            cause,
            labels,
            duration: trigger.duration,
            sample_rate: trigger.sample_rate,
            capturer: self.capturer.clone(),
            submit: self.submit.clone(),
            metrics: self.metrics.clone(),
            directory: self.settings.directory.clone(),
            keep: self.settings.keep,
        };
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || job.run())
            .expect("spawning a thread");
    }

    /// The process's target labels, or a `service_name` from its executable.
    fn labels_of(&self, pid: u32, dir: &Path) -> Labels {
        let container = std::fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|c| cgroup::container_id(&c));
        if let Some(target) = self.targets.borrow().resolve(pid, container.as_deref()) {
            return target.labels.clone();
        }
        let exe = std::fs::read_link(dir.join("exe"))
            .ok()
            .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .unwrap_or_else(|| format!("pid-{pid}"));
        Labels::from([(SERVICE_NAME.to_owned(), exe)])
    }
}

/// A capture started by a trigger, run on its own thread.
struct TriggeredCapture {
    pid: u32,
    cause: Cause,
    labels: Labels,
    duration: Duration,
    sample_rate: u64,
    capturer: Arc<Capturer>,
    submit: Submit,
    metrics: Arc<AgentMetrics>,
    directory: Option<PathBuf>,
    keep: usize,
}

impl TriggeredCapture {
    fn run(self) {
        let start = SystemTime::now();
        let cause = self.cause.label();
        let built = match self
            .capturer
            .capture(self.pid, self.duration, self.sample_rate, cause)
        {
            Ok(built) => built,
            Err(error) => {
                if matches!(error, CaptureError::Busy { .. }) {
                    // Not counted by the capturer: nothing started.
                    self.metrics.capture(cause, "failed");
                }
                tracing::warn!(pid = self.pid, trigger = cause, %error, "triggered capture failed");
                return;
            }
        };
        let bytes = match built.encode_gzip() {
            Ok(b) => b,
            Err(error) => {
                tracing::warn!(%error, "encoding a triggered capture failed");
                return;
            }
        };
        if let Some(dir) = &self.directory {
            keep_capture(dir, self.keep, &self.labels, self.pid, cause, &bytes);
        }
        (self.submit)(vec![ProfileSeries {
            labels: self.labels,
            pprof_gzip: bytes.into(),
            start,
            end: SystemTime::now(),
            sample_rate: self.sample_rate as u32,
            samples: built.total_samples,
        }]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trigger(text: &str) -> TriggerConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn thresholds() {
        let usage = |cpu, mib: u64| Usage {
            cpu_percent: cpu,
            rss_bytes: mib << 20,
        };
        let t = trigger("cpu_usage_percent = 150.0\nmem_usage_mb = 100");
        assert_eq!(crossed(&t, usage(149.0, 99), 0), None);
        assert_eq!(crossed(&t, usage(150.0, 10), 0), Some(Cause::Cpu));
        assert_eq!(crossed(&t, usage(10.0, 100), 0), Some(Cause::Memory));
        assert_eq!(crossed(&t, usage(200.0, 200), 0), Some(Cause::Cpu));
        let t = trigger("mem_usage_percent = 50.0");
        assert_eq!(crossed(&t, usage(0.0, 499), 1000 << 20), None);
        assert_eq!(
            crossed(&t, usage(0.0, 500), 1000 << 20),
            Some(Cause::Memory)
        );
        // An unknown total never fires a percentage.
        assert_eq!(crossed(&t, usage(0.0, 500), 0), None);
    }

    #[test]
    fn validation_names_the_field() {
        let field = |text: &str| trigger(text).validate().unwrap_err().0;
        assert_eq!(field("service = \"x\""), "cpu_usage_percent");
        assert_eq!(field("cpu_usage_percent = -1.0"), "cpu_usage_percent");
        assert_eq!(field("mem_usage_percent = 101.0"), "mem_usage_percent");
        assert_eq!(field("mem_usage_mb = 0"), "mem_usage_mb");
        assert_eq!(field("mem_usage_mb = 1\ncommand = \"(\""), "command");
        assert_eq!(field("mem_usage_mb = 1\nduration = \"6m\""), "duration");
        assert_eq!(field("mem_usage_mb = 1\nsample_rate = 1000"), "sample_rate");
        assert_eq!(
            field("mem_usage_mb = 1\ntags = { trigger = \"x\" }"),
            "tags"
        );
        assert_eq!(
            field("mem_usage_mb = 1\ntags = { \"a-b\" = \"x\" }"),
            "tags"
        );
        let ok = trigger("cpu_usage_percent = 80.0\ncommand = \"^java\"\ntags = { team = \"a\" }");
        assert!(ok.validate().is_ok());
        assert_eq!(ok.cooldown, Duration::from_secs(300));
        assert_eq!(ok.duration, Duration::from_secs(30));
    }
}
