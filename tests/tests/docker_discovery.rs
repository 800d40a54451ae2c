//! Docker discovery against a real daemon: `profiler_agent::discovery::docker` runs in this
//! process on a tokio runtime, connected to the default socket of a daemon this test starts if
//! none runs. The image is made with `docker import` from a tiny rootfs (busybox-static plus
//! the static busy loop tests/fixtures/spin.c), as no registry is reachable.
//!
//! Checked: two named containers are published with their full ids, names without the
//! leading `/`, network mode and a sanitised label; a stopped container leaves the set within
//! a few seconds, driven by events (the refresh interval is an hour); across a daemon restart
//! the last set stays published while the daemon is down, errors are counted, and then the
//! discovery reconnects and publishes what the new daemon runs: the `--restart always`
//! container again and a container started after the restart.
//!
//! Root is needed (dockerd); under `CI=true` a missing prerequisite fails the test.

mod common;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use common::*;
use profiler_agent::{
    discovery::docker::{DockerConfig, DockerDiscovery},
    process::cgroup::ContainerIdCache,
    targets::{TargetOptions, TargetSet},
};
use tokio::sync::watch;

type Targets = Vec<BTreeMap<String, String>>;

/// How long a change may take to show up.
const SHOW_UP: Duration = Duration::from_secs(15);

/// A stopped container must leave the set within this long (events, not the refresh).
const LEAVE_WITHIN: Duration = Duration::from_secs(5);

fn wait_for(
    rx: &watch::Receiver<Targets>,
    within: Duration,
    what: &str,
    cond: impl Fn(&Targets) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if cond(&rx.borrow()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?}; published: {:#?}",
            *rx.borrow()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find<'a>(set: &'a Targets, id: &str) -> Option<&'a BTreeMap<String, String>> {
    set.iter()
        .find(|l| l.get("__meta_docker_container_id").map(String::as_str) == Some(id))
}

/// A tarball of a rootfs with /bin/busybox, /bin/sh and /spin (static).
fn rootfs_tarball(dir: &Path) -> std::path::PathBuf {
    busybox_rootfs_tarball(dir, &static_spin(dir), "/spin")
}

/// Removes the test's containers, then its image, on drop.
struct Cleanup {
    containers: Vec<String>,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn run_container(name: &str, image: &str, extra: &[&str]) -> String {
    let mut args = vec!["run", "-d", "--network", "none", "--stop-timeout", "1"];
    args.extend_from_slice(&["--name", name]);
    args.extend_from_slice(extra);
    args.extend_from_slice(&[image, "/spin", "600"]);
    let id = docker_ok(&args);
    assert_eq!(id.len(), 64, "docker run printed {id:?}");
    id
}

#[test]
fn docker_discovery_follows_containers_and_survives_a_daemon_restart() {
    const TEST: &str = "docker_discovery_follows_containers_and_survives_a_daemon_restart";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tarball = rootfs_tarball(dir.path());
    let Some(mut daemon) = DockerDaemon::get(&dir.path().join("dockerd.log")) else {
        return;
    };
    let nonce = nonce();
    let names = ["a", "b", "c"].map(|n| format!("profiler-discovery-{n}-{nonce}"));
    // Declared after the daemon: dropped (containers removed) before it stops.
    let _cleanup = Cleanup {
        containers: names.to_vec(),
        image: format!("profiler-discovery-test:{nonce}"),
    };
    let image = _cleanup.image.as_str();
    docker_ok(&["import", tarball.to_str().unwrap(), image]);

    // The discovery, on its own runtime thread; an hour-long refresh so that only events
    // can explain a change seen within seconds.
    let discovery = DockerDiscovery::new(DockerConfig {
        refresh_interval: Duration::from_secs(3600),
        ..DockerConfig::default()
    })
    .with_backoff(Duration::from_millis(100), Duration::from_secs(1));
    let errors = discovery.errors();
    let (tx, rx) = watch::channel(Targets::new());
    let runner = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(discovery.run(tx));
    });

    let a = run_container(
        &names[0],
        image,
        &["--restart", "always", "--label", "app.kubernetes.io/name=x"],
    );
    let b = run_container(&names[1], image, &[]);
    wait_for(&rx, SHOW_UP, "both containers published", |set| {
        find(set, &a).is_some() && find(set, &b).is_some()
    });
    {
        let set = rx.borrow();
        let (la, lb) = (find(&set, &a).unwrap(), find(&set, &b).unwrap());
        assert_eq!(la["__meta_docker_container_name"], names[0]);
        assert_eq!(lb["__meta_docker_container_name"], names[1]);
        assert_eq!(la["__meta_docker_container_network_mode"], "none");
        assert_eq!(
            la.get("__meta_docker_container_label_app_kubernetes_io_name")
                .map(String::as_str),
            Some("x")
        );
        assert!(
            !lb.contains_key("__meta_docker_container_label_app_kubernetes_io_name"),
            "{lb:?}"
        );
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "errors with a healthy daemon"
    );

    // Each container's process maps to its container id (from /proc/PID/cgroup) and, through
    // the discovered targets, to service_name=<container name>.
    let (targets, rejected) = TargetSet::new(&rx.borrow(), &TargetOptions::default());
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(targets.active(), rx.borrow().len());
    let mut cgroups = ContainerIdCache::new("/proc", 16);
    for (name, id) in [(&names[0], &a), (&names[1], &b)] {
        let pid: u32 = docker_ok(&["inspect", "-f", "{{.State.Pid}}", name])
            .trim()
            .parse()
            .expect("container pid");
        assert_eq!(cgroups.lookup(pid).as_deref(), Some(id.as_str()), "{name}");
        let target = targets
            .resolve(pid, Some(id))
            .unwrap_or_else(|| panic!("{name}: no target for pid {pid}"));
        assert_eq!(target.service_name(), name.as_str());
    }
    let active_before = targets.active();

    // Stopping one: it leaves, driven by the die/stop events.
    let stop_started = Instant::now();
    docker_ok(&["stop", "-t", "1", &names[1]]);
    let left = wait_for(&rx, LEAVE_WITHIN, "stopped container leaves", |set| {
        find(set, &b).is_none() && find(set, &a).is_some()
    });
    eprintln!(
        "stopped container left the set {left:?} after `docker stop` returned ({:?} in all)",
        stop_started.elapsed()
    );
    let (targets, _) = TargetSet::new(&rx.borrow(), &TargetOptions::default());
    assert_eq!(
        targets.active(),
        active_before - 1,
        "stopped container left the targets"
    );

    // A daemon restart.
    if !daemon.stop() {
        let why = "dockerd runs but was neither started by this test nor by systemd: \
                   cannot restart it";
        assert!(!in_ci(), "{why}");
        eprintln!("SKIPPED the daemon restart part of {TEST}: {why}");
        drop(rx);
        runner.join().unwrap();
        return;
    }
    let before = errors.load(Ordering::Relaxed);
    let deadline = Instant::now() + SHOW_UP;
    while errors.load(Ordering::Relaxed) <= before {
        assert!(
            Instant::now() < deadline,
            "the stopped daemon was never noticed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Down for a few reconnection attempts; the last good set stays published meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    assert!(errors.load(Ordering::Relaxed) >= before + 2);
    {
        let set = rx.borrow();
        assert!(
            find(&set, &a).is_some() && find(&set, &b).is_none(),
            "{set:#?}"
        );
    }
    daemon.start();
    // `a` comes back by its restart policy; `c` is new, so seeing it proves a list made after
    // the restart, and seeing `a` in that same set proves `a` was listed again.
    let c = run_container(&names[2], image, &[]);
    let back = wait_for(
        &rx,
        SHOW_UP,
        "containers published after the restart",
        |set| find(set, &a).is_some() && find(set, &c).is_some() && find(set, &b).is_none(),
    );
    eprintln!("reconnected and published {back:?} after `docker run` of the new container");
    let running = docker_ok(&["inspect", "-f", "{{.State.Running}}", &names[0]]);
    assert_eq!(running, "true", "restart-always container is running again");
    let copies = rx
        .borrow()
        .iter()
        .filter(|l| l["__meta_docker_container_id"] == a)
        .count();
    assert_eq!(copies, 1, "one target per container");

    drop(rx);
    runner.join().unwrap();
}
