//! The agent as the DaemonSet runs it, end to end (issue 6): `profiler-agent run` in a
//! container with `--pid=host` and the DaemonSet's security context (uid 0, the capabilities
//! config/daemonset.yaml adds, no seccomp or AppArmor confinement, a read-only root, kernel
//! BTF and the config mounted read-only), plus the Docker socket for Docker discovery and
//! `--network=host` to reach the test's receiver on loopback, profiles a second container.
//!
//! Checked: the pushed series is named after the workload container, carries exactly
//! `__name__`, `service_name` and the external label, and its stacks are the fixture's
//! `spin_inner <- spin_outer <- main` in `/spin` (the path inside the workload's root, so
//! frames were read through /proc/PID/root from inside the agent's container); the agent
//! container is still running at the end. Its `docker logs` are printed on failure.
//!
//! Capabilities the machine cannot grant are left out, and said so: Docker 20.10 (Debian 12)
//! knows no CAP_BPF, CAP_PERFMON or CAP_CHECKPOINT_RESTORE (CAP_SYS_ADMIN, also in the list,
//! stands in for them), and these machines' bounding set lacks CAP_SYS_RESOURCE (not needed
//! since Linux 5.11), which is also why `docker run --privileged` fails here
//! (moby/moby#42906).
//!
//! Images are made with `docker import` from rootfs tarballs, as no registry is reachable
//! (config/Dockerfile needs base images from one): the agent's binary plus the libraries
//! `ldd` lists, and busybox-static plus the static busy loop tests/fixtures/spin.c.
//! Root is needed (dockerd, BPF); under `CI=true` a missing prerequisite fails the test.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{receiver::*, *};

/// A `docker import`-able rootfs of the agent alone: its binary at
/// /usr/local/bin/profiler-agent (as in config/Dockerfile), debug info stripped (the debug
/// build's 250 MiB of it would only slow the import), and every library `ldd` lists for it,
/// the dynamic loader included, at the same absolute paths.
fn agent_rootfs_tarball(dir: &Path) -> PathBuf {
    let rootfs = dir.join("agent-rootfs");
    let bin = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&bin).unwrap();
    run_ok(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(agent())
            .arg(bin.join("profiler-agent")),
    );
    let ldd = run_ok(Command::new("ldd").arg(agent()));
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 ...`
    let libs: BTreeSet<&str> = ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .collect();
    assert!(
        libs.iter().any(|l| l.contains("ld-linux")),
        "no dynamic loader in ldd's output:\n{ldd}"
    );
    for lib in libs {
        let inside = rootfs.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        // Follows symlinks: the image gets the files themselves.
        std::fs::copy(lib, &inside).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
    }
    let tarball = dir.join("agent-rootfs.tar");
    tar_directory(&rootfs, &tarball);
    tarball
}

/// The function names of one location (several when inlined).
fn location_functions(p: &Profile, id: u64) -> Vec<&str> {
    let location = p.location.iter().find(|l| l.id == id).expect("location");
    location
        .line
        .iter()
        .filter_map(|line| p.function.iter().find(|f| f.id == line.function_id))
        .map(|f| p.string_table[f.name as usize].as_str())
        .collect()
}

/// Prints the container's `docker logs` when dropped during a panic.
struct LogsOnFailure<'a>(&'a str);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = docker(&["logs", self.0]);
            eprintln!(
                "--- docker logs {} ---\n{}{}--- end of logs ---",
                self.0,
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
    }
}

/// Capability names by number (linux/capability.h), up to CAP_CHECKPOINT_RESTORE.
const CAPABILITIES: &str = "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID \
    SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER \
    SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE \
    SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN \
    SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE";

/// The capabilities config/daemonset.yaml adds to the agent's container, split into those
/// this machine's bounding set has and those it lacks (a container cannot be given them).
fn daemonset_capabilities() -> (Vec<String>, Vec<String>) {
    let manifests = std::fs::read_to_string(workspace_root().join("config/daemonset.yaml"))
        .expect("read config/daemonset.yaml");
    let docs = yaml_rust2::YamlLoader::load_from_str(&manifests).expect("daemonset.yaml");
    let daemonset = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .expect("a DaemonSet");
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let added = container["securityContext"]["capabilities"]["add"]
        .as_vec()
        .expect("securityContext.capabilities.add");
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("CapBnd in /proc/self/status");
    added
        .iter()
        .map(|c| c.as_str().expect("capability name").to_owned())
        .partition(|name| {
            let bit = CAPABILITIES
                .split_whitespace()
                .position(|c| c == name)
                .unwrap_or_else(|| panic!("unknown capability {name}"));
            bounding & (1 << bit) != 0
        })
}

/// `docker run` with `--cap-add` for each of `capabilities` between `head` and `tail`,
/// leaving out those this dockerd does not know: Docker 20.10 (Debian 12's docker.io)
/// predates CAP_BPF, CAP_PERFMON and CAP_CHECKPOINT_RESTORE, for which the kernel accepts
/// CAP_SYS_ADMIN. Returns the capabilities left out.
fn run_with_capabilities(
    head: &[&str],
    mut capabilities: Vec<String>,
    tail: &[&str],
) -> Vec<String> {
    let mut unknown = Vec::new();
    loop {
        let mut args = head.to_vec();
        for cap in &capabilities {
            args.extend(["--cap-add", cap]);
        }
        args.extend_from_slice(tail);
        let out = docker(&args);
        if out.status.success() {
            return unknown;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        // `invalid CapAdd: unknown capability: "CAP_BPF"`; nothing was created.
        let name = stderr
            .split("unknown capability: \"CAP_")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .filter(|name| capabilities.iter().any(|c| c == name))
            .unwrap_or_else(|| panic!("docker {args:?} failed ({}):\n{stderr}", out.status))
            .to_owned();
        capabilities.retain(|c| *c != name);
        unknown.push(name);
    }
}

/// Time for the agent container to start, load BPF, discover and push.
const AGENT_SHOW_UP: Duration = Duration::from_secs(60);

#[test]
fn agent_in_a_daemonset_like_container_profiles_another_container() {
    const TEST: &str = "agent_in_a_daemonset_like_container_profiles_another_container";
    if !require_root(TEST) {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let workload_tarball = busybox_rootfs_tarball(dir.path(), &static_spin(dir.path()), "/spin");
    let agent_tarball = agent_rootfs_tarball(dir.path());
    let Some(_daemon) = DockerDaemon::get(&dir.path().join("dockerd.log")) else {
        return;
    };
    let nonce = nonce();
    // Declared after the daemon: dropped (containers and images removed) before it stops.
    let workload = ContainerGuard {
        container: format!("profiler-workload-{nonce}"),
        image: format!("profiler-workload-test:{nonce}"),
    };
    let agent = ContainerGuard {
        container: format!("profiler-agent-{nonce}"),
        image: format!("profiler-agent-test:{nonce}"),
    };
    docker_ok(&[
        "import",
        workload_tarball.to_str().unwrap(),
        &workload.image,
    ]);
    docker_ok(&["import", agent_tarball.to_str().unwrap(), &agent.image]);
    let imported = started.elapsed();

    let receiver = Receiver::start();
    let port = free_port();
    // Mounted read-only at /etc/profiler-agent, as the DaemonSet mounts its ConfigMap.
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("agent.toml"),
        format!(
            r#"
collect_interval = "2s"
[discovery.docker]
host = "unix:///var/run/docker.sock"
[write.external_labels]
cluster = "container-e2e"
[[write.endpoint]]
url = "{url}"
[server]
listen_address = "127.0.0.1:{port}"
"#,
            url = receiver.url(),
        ),
    )
    .unwrap();

    docker_ok(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        &workload.container,
        &workload.image,
        "/spin",
        "600",
    ]);
    let config_mount = format!("{}:/etc/profiler-agent:ro", config_dir.display());
    // The DaemonSet's security context and mounts (see the top of the file).
    let (capabilities, missing) = daemonset_capabilities();
    if !missing.is_empty() {
        eprintln!("not in this machine's capability bounding set, left out: {missing:?}");
    }
    let head = [
        "run",
        "-d",
        "--name",
        &agent.container,
        "--pid=host",
        "--network=host",
        "--read-only",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--cap-drop",
        "ALL",
        // As the DaemonSet sets it, for `docker logs` worth printing on failure.
        "-e",
        "RUST_LOG=info,kube_client=off",
    ];
    let tail = [
        "-v",
        "/sys/kernel/btf:/sys/kernel/btf:ro",
        "-v",
        &config_mount,
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        &agent.image,
        "/usr/local/bin/profiler-agent",
        "run",
        "--config",
        "/etc/profiler-agent/agent.toml",
    ];
    let unknown = run_with_capabilities(&head, capabilities, &tail);
    if !unknown.is_empty() {
        eprintln!("unknown to this dockerd, left out: {unknown:?}");
    }
    let _logs = LogsOnFailure(&agent.container);
    let agent_started = Instant::now();

    // Two pushes of the workload: the second covers a whole interval with the target known.
    let service = workload.container.as_str();
    let pushes = |r: &[Request]| {
        pushed_series(r)
            .into_iter()
            .filter(|s| s.labels.get("service_name").map(String::as_str) == Some(service))
            .collect::<Vec<_>>()
    };
    receiver.wait_for(AGENT_SHOW_UP, "two pushes of the workload", |r| {
        pushes(r).len() >= 2
    });
    let first_push = agent_started.elapsed();

    let expected: BTreeMap<String, String> = [
        ("__name__", "process_cpu"),
        ("service_name", service),
        ("cluster", "container-e2e"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into();
    let chain = ["spin_inner", "spin_outer", "main"];
    let (mut total, mut in_chain) = (0, 0);
    for series in pushes(&receiver.requests()) {
        assert_eq!(series.labels, expected);
        for p in &series.profiles {
            assert_eq!(p.period, 1_000_000_000 / 97);
            for s in &p.sample {
                let names = stack_names(p, s);
                total += s.value[0];
                if names.windows(chain.len()).any(|w| w == chain) {
                    in_chain += s.value[0];
                    let file = s
                        .location_id
                        .iter()
                        .find(|&&id| location_functions(p, id).contains(&chain[0]))
                        .and_then(|&id| mapping_name(p, id));
                    assert_eq!(file, Some("/spin"), "{names:?}");
                }
            }
        }
    }
    // The busy loop spends its time in spin_inner (and spin_tick, called from it).
    assert!(
        total > 0 && in_chain * 10 >= total * 9,
        "{in_chain} of {total} sample counts under {chain:?}"
    );

    let running = docker_ok(&[
        "inspect",
        "-f",
        "{{.State.Running}} {{.RestartCount}}",
        &agent.container,
    ]);
    assert_eq!(running, "true 0", "the agent container is still running");
    eprintln!(
        "images built and imported in {imported:?}; first two pushes {first_push:?} after \
         `docker run` of the agent; {total} samples, {in_chain} under {chain:?}; \
         {:?} in all",
        started.elapsed()
    );
}
