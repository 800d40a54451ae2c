//! `[capture]` and `[[trigger]]` across SIGHUP. Triggers and the monitor's settings
//! (`monitor_interval`, `directory`, `keep`) are applied from the next monitor turn on
//! (cooldowns of unchanged triggers carry over); `max_concurrent` applies to the next
//! capture. `enabled`, `bearer_token` and `bearer_token_file` belong to the HTTP server,
//! which is built once: a change to them is reported by [`Triggers::reload`] and logged as
//! needing a restart.

use std::sync::Arc;

use tokio::sync::watch;

use super::{
    CaptureConfig, Capturer,
    trigger::{MonitorSettings, TriggerConfig, TriggerMonitor},
};
use crate::{metrics::AgentMetrics, targets::TargetSet, write::Submit};

/// The trigger monitor, started, reconfigured or stopped to follow the configuration.
pub struct Triggers {
    monitor: Option<TriggerMonitor>,
    capturer: Arc<Capturer>,
    targets: watch::Receiver<Arc<TargetSet>>,
    submit: Submit,
    metrics: Arc<AgentMetrics>,
}

fn settings(capture: &CaptureConfig) -> MonitorSettings {
    MonitorSettings {
        interval: capture.monitor_interval,
        directory: capture.directory.clone(),
        keep: capture.keep,
    }
}

/// The `[capture]` fields whose change needs a restart, by name.
pub fn restart_only_changes(running: &CaptureConfig, new: &CaptureConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if running.enabled != new.enabled {
        changed.push("capture.enabled");
    }
    if running.bearer_token != new.bearer_token {
        changed.push("capture.bearer_token");
    }
    if running.bearer_token_file != new.bearer_token_file {
        changed.push("capture.bearer_token_file");
    }
    changed
}

impl Triggers {
    /// Starts the monitor when there are triggers (validated with the configuration).
    pub fn start(
        capture: &CaptureConfig,
        triggers: &[TriggerConfig],
        capturer: Arc<Capturer>,
        targets: watch::Receiver<Arc<TargetSet>>,
        submit: Submit,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        let mut this = Self {
            monitor: None,
            capturer,
            targets,
            submit,
            metrics,
        };
        this.apply(capture, triggers);
        this
    }

    /// Whether a monitor thread runs.
    pub fn running(&self) -> bool {
        self.monitor.is_some()
    }

    /// Applies a reloaded configuration; returns the fields that need a restart (also
    /// logged).
    pub fn reload(
        &mut self,
        running: &CaptureConfig,
        new: &CaptureConfig,
        triggers: &[TriggerConfig],
    ) -> Vec<&'static str> {
        self.capturer.set_limit(new.max_concurrent);
        self.apply(new, triggers);
        let restart = restart_only_changes(running, new);
        if !restart.is_empty() {
            tracing::warn!(
                fields = ?restart,
                "these [capture] changes take effect only after a restart"
            );
        }
        restart
    }

    fn apply(&mut self, capture: &CaptureConfig, triggers: &[TriggerConfig]) {
        if triggers.is_empty() {
            self.monitor = None;
            return;
        }
        match &self.monitor {
            Some(monitor) => monitor.reconfigure(triggers, settings(capture)),
            None => {
                self.monitor = Some(TriggerMonitor::start(
                    triggers,
                    settings(capture),
                    self.capturer.clone(),
                    self.targets.clone(),
                    self.submit.clone(),
                    self.metrics.clone(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::mpsc,
        time::{Duration, Instant},
    };

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{metrics::TriggerLabel, write::Secret};

    fn trigger(command: &str) -> TriggerConfig {
        toml::from_str(&format!(
            "mem_usage_mb = 1\ncommand = {command:?}\ncooldown = \"1h\""
        ))
        .unwrap()
    }

    fn fired(metrics: &AgentMetrics) -> u64 {
        metrics
            .triggers_fired
            .get_or_create(&TriggerLabel {
                trigger: "memory".into(),
            })
            .get()
    }

    /// Waits up to 5 s for `fired` to reach `n`.
    fn wait_fired(metrics: &AgentMetrics, n: u64) -> u64 {
        let until = Instant::now() + Duration::from_secs(5);
        while fired(metrics) < n && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        fired(metrics)
    }

    #[test]
    fn triggers_follow_reloads() {
        let mut registry = Registry::default();
        let metrics = Arc::new(AgentMetrics::register(&mut registry));
        let (jobs, _rx) = mpsc::channel();
        let capturer = Arc::new(Capturer::new(1, true, false, jobs, metrics.clone()));
        // Fired triggers then fail at once: this test runs no BPF.
        capturer.stop();
        let (_targets_tx, targets) = watch::channel(Arc::new(TargetSet::default()));
        let submit: Submit = Arc::new(|_| {});
        // A process only this test matches.
        let token = format!("capfix-reload-{}", std::process::id());
        let mut sleeper = std::process::Command::new("bash")
            .args(["-c", "sleep 30; :", &token])
            .spawn()
            .unwrap();
        let capture = CaptureConfig {
            monitor_interval: Duration::from_millis(100),
            ..CaptureConfig::default()
        };

        let mut triggers = Triggers::start(
            &capture,
            &[],
            capturer.clone(),
            targets,
            submit,
            metrics.clone(),
        );
        assert!(!triggers.running());
        // Added by a reload: the monitor starts and fires.
        let other = [trigger("^no-such-process-anywhere$")];
        assert!(triggers.reload(&capture, &capture, &other).is_empty());
        assert!(triggers.running());
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(fired(&metrics), 0, "the first trigger matches nothing");
        // Replaced by a reload: the running monitor takes the new trigger.
        let sleep = [trigger(&format!("sleep 30; : {token}$"))];
        let _ = triggers.reload(&capture, &capture, &sleep);
        // `bash -c CMD NAME` shows as `bash -c sleep 30; : NAME` (about 3 MiB resident).
        assert_eq!(wait_fired(&metrics, 1), 1);
        // Unchanged: its cooldown carries over, no second firing.
        let _ = triggers.reload(&capture, &capture, &sleep);
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(fired(&metrics), 1);
        // Removed: the monitor stops.
        let _ = triggers.reload(&capture, &capture, &[]);
        assert!(!triggers.running());

        // The server's settings need a restart, and say so.
        let new = CaptureConfig {
            enabled: true,
            bearer_token: Some(Secret::new("t")),
            max_concurrent: 3,
            ..capture.clone()
        };
        assert_eq!(
            triggers.reload(&capture, &new, &[]),
            ["capture.enabled", "capture.bearer_token"]
        );
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
}
