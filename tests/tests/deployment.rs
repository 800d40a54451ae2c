//! The deployment files in config/ against the real agent.
//!
//! - `profiler-agent.service`: `systemd-analyze verify` accepts it with its `ExecStart` binary
//!   pointed at the agent built here (nothing else rewritten), and it keeps what the agent
//!   needs: its capabilities, `LimitMEMLOCK=infinity`, and none of the sandboxing options that
//!   would hide other processes' /proc, kallsyms or the loader's mount namespace.
//! - `daemonset.yaml`: parses; the DaemonSet runs in the host PID namespace under the
//!   ServiceAccount the ClusterRoleBinding binds to a ClusterRole that can get, list and watch
//!   pods; NODE_NAME comes from `spec.nodeName`; probes, scrape annotations, BTF and config
//!   mounts and the grace period fit the agent; the ConfigMap's agent.toml passes
//!   `profiler-agent check-config` with NODE_NAME set (and names the field without it).
//! - `Dockerfile`: runs the config path the DaemonSet mounts and exposes the server port.
//!
//! No root needed. Under `CI=true` a missing `systemd-analyze` fails instead of skipping
//! (Debian package `systemd`, installed by `cargo xtask setup`).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::{agent, in_ci, workspace_root};
use yaml_rust2::{Yaml, YamlLoader};

const UNIT: &str = "config/profiler-agent.service";
const MANIFESTS: &str = "config/daemonset.yaml";
const DOCKERFILE: &str = "config/Dockerfile";
const INSTALLED_BINARY: &str = "/usr/local/bin/profiler-agent";

/// Capabilities without which the agent cannot sample or name frames (see README,
/// Deployment).
const REQUIRED_CAPS: [&str; 5] = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYSLOG"];

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `systemd-analyze` on PATH; None (skip) on a developer machine without it.
fn systemd_analyze() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("systemd-analyze"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = "systemd-analyze not found (Debian package `systemd`: cargo xtask setup)";
        if in_ci() {
            panic!("{why}; CI=true forbids skipping");
        }
        eprintln!("SKIPPED systemd unit verification: {why}");
    }
    found
}

/// The unit's `Key=value` settings (all sections), in order.
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn systemd_unit_verifies_with_the_built_agent() {
    let unit = read(UNIT);
    let exec_start = unit
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart= line");
    assert!(
        exec_start.starts_with(&format!("ExecStart={INSTALLED_BINARY} run --config ")),
        "{exec_start}"
    );
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    // Only the binary's path changes: verify checks that ExecStart is executable.
    let binary = agent();
    let rewritten_exec = exec_start.replacen(INSTALLED_BINARY, &binary.display().to_string(), 1);
    let rewritten = unit.replacen(exec_start, &rewritten_exec, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("profiler-agent.service");
    std::fs::write(&path, rewritten).unwrap();
    let out = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
    // verify exits 0 on unknown keys and bad values, which it only reports: any line about
    // the unit is a mistake in it.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("profiler-agent"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complained:\n{}",
        complaints.join("\n")
    );
}

#[test]
fn systemd_unit_grants_what_the_agent_needs() {
    let settings = unit_settings(&read(UNIT));
    let caps = |key: &str| -> Vec<String> {
        setting(&settings, key)
            .unwrap_or_else(|| panic!("{key} missing"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let bounding = caps("CapabilityBoundingSet");
    assert_eq!(bounding, caps("AmbientCapabilities"));
    for cap in REQUIRED_CAPS {
        assert!(
            bounding.contains(&format!("CAP_{cap}")),
            "CAP_{cap} missing"
        );
    }
    assert_eq!(setting(&settings, "LimitMEMLOCK"), Some("infinity"));
    assert_eq!(
        setting(&settings, "WorkingDirectory"),
        Some("/var/lib/profiler-agent")
    );
    assert_eq!(setting(&settings, "StateDirectory"), Some("profiler-agent"));
    assert_eq!(
        setting(&settings, "ExecReload"),
        Some("/bin/kill -HUP $MAINPID")
    );
    assert_eq!(setting(&settings, "Restart"), Some("on-failure"));
    // Each of these would break the agent (see the unit's comments).
    for (key, breaking) in [
        ("ProtectProc", "invisible"),
        ("ProtectProc", "noaccess"),
        ("ProtectProc", "ptraceable"),
        ("ProcSubset", "pid"),
        ("PrivateUsers", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("RestrictNamespaces", "yes"),
    ] {
        assert_ne!(setting(&settings, key), Some(breaking), "{key}={breaking}");
    }
    if let Some(ns) = setting(&settings, "RestrictNamespaces") {
        assert!(
            !ns.starts_with('~') && ns.split_whitespace().any(|n| n == "mnt"),
            "RestrictNamespaces={ns} forbids the loader's mount namespace"
        );
    }
    for (key, filter) in settings.iter().filter(|(k, _)| k == "SystemCallFilter") {
        assert!(
            filter.starts_with('~'),
            "{key}={filter}: only a deny list is safe"
        );
        for needed in [
            "bpf",
            "perf_event_open",
            "unshare",
            "mount",
            "@debug",
            "@mount",
        ] {
            assert!(
                !filter
                    .split_whitespace()
                    .any(|s| s.trim_start_matches('~') == needed),
                "SystemCallFilter denies {needed}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests.

struct Manifests(Vec<Yaml>);

impl Manifests {
    fn load() -> Self {
        let docs = YamlLoader::load_from_str(&read(MANIFESTS))
            .unwrap_or_else(|e| panic!("{MANIFESTS} is not valid YAML: {e}"));
        Self(docs.into_iter().filter(|d| !d.is_null()).collect())
    }

    /// The only object of `kind`.
    fn one(&self, kind: &str) -> &Yaml {
        let found: Vec<&Yaml> = self
            .0
            .iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect();
        assert_eq!(found.len(), 1, "{MANIFESTS}: expected one {kind}");
        found[0]
    }
}

fn name(object: &Yaml) -> &str {
    object["metadata"]["name"].as_str().expect("metadata.name")
}

fn strings(list: &Yaml) -> Vec<&str> {
    list.as_vec()
        .map(|v| v.iter().filter_map(Yaml::as_str).collect())
        .unwrap_or_default()
}

fn the_container(daemonset: &Yaml) -> &Yaml {
    let containers = daemonset["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one agent container");
    &containers[0]
}

/// The value of `--config` in the container's args.
fn config_arg(container: &Yaml) -> String {
    let args = strings(&container["args"]);
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config in args");
    args[at + 1].to_owned()
}

#[test]
fn manifests_bind_the_service_account_to_pod_reads() {
    let m = Manifests::load();
    let account = name(m.one("ServiceAccount"));
    let role = m.one("ClusterRole");
    let binding = m.one("ClusterRoleBinding");
    let daemonset = m.one("DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];

    assert_eq!(pod["serviceAccountName"].as_str(), Some(account));
    assert_eq!(binding["roleRef"]["kind"].as_str(), Some("ClusterRole"));
    assert_eq!(binding["roleRef"]["name"].as_str(), Some(name(role)));
    let subjects = binding["subjects"].as_vec().expect("subjects");
    assert!(
        subjects
            .iter()
            .any(|s| s["kind"].as_str() == Some("ServiceAccount")
                && s["name"].as_str() == Some(account)
                && s["namespace"].as_str().is_some()),
        "the ClusterRoleBinding does not bind ServiceAccount {account}"
    );
    let rules = role["rules"].as_vec().expect("rules");
    let pods = rules
        .iter()
        .find(|r| strings(&r["apiGroups"]) == [""] && strings(&r["resources"]).contains(&"pods"))
        .expect("a rule on core pods");
    let mut verbs = strings(&pods["verbs"]);
    verbs.sort_unstable();
    assert_eq!(verbs, ["get", "list", "watch"]);
}

#[test]
fn daemonset_runs_the_agent_as_it_needs() {
    let m = Manifests::load();
    let daemonset = m.one("DaemonSet");
    let template = &daemonset["spec"]["template"];
    let pod = &template["spec"];
    let c = the_container(daemonset);

    assert_eq!(pod["hostPID"].as_bool(), Some(true), "hostPID: true");
    let env = c["env"].as_vec().expect("env");
    let node = env
        .iter()
        .find(|e| e["name"].as_str() == Some("NODE_NAME"))
        .expect("NODE_NAME in env");
    assert_eq!(
        node["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );

    // The grace period covers the partial interval's flush deadline.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace period");
    assert!(
        grace as u64 > profiler_agent::daemon::FLUSH_DEADLINE.as_secs(),
        "terminationGracePeriodSeconds {grace}"
    );
    let tolerations = pod["tolerations"].as_vec().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_badvalue()),
        "no toleration matching every taint"
    );

    // Server port, probes and scrape annotations agree.
    let port = c["ports"]
        .as_vec()
        .and_then(|p| p.first())
        .expect("a container port");
    assert_eq!(port["containerPort"].as_i64(), Some(4100));
    let port_matches = |probe: &Yaml| {
        let p = &probe["httpGet"]["port"];
        p.as_i64() == Some(4100) || p.as_str() == port["name"].as_str()
    };
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert!(port_matches(&c[probe]), "{probe} port");
    }
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("4100"));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));

    let resources = &c["resources"];
    assert_eq!(resources["requests"]["cpu"].as_str(), Some("50m"));
    assert_eq!(resources["requests"]["memory"].as_str(), Some("64Mi"));
    assert_eq!(resources["limits"]["memory"].as_str(), Some("128Mi"));

    // Privileges: privileged, or uid 0 with the capabilities the agent uses.
    let security = &c["securityContext"];
    if security["privileged"].as_bool() != Some(true) {
        let added = strings(&security["capabilities"]["add"]);
        for cap in REQUIRED_CAPS {
            assert!(added.contains(&cap), "capability {cap} not added");
        }
        assert_eq!(security["runAsUser"].as_i64(), Some(0));
    }

    // Mounts: kernel BTF read-only from the host, the ConfigMap at the --config path.
    let mounts = c["volumeMounts"].as_vec().expect("volumeMounts");
    let volumes = pod["volumes"].as_vec().expect("volumes");
    let volume = |mount_path: &str| {
        let mount = mounts
            .iter()
            .find(|v| v["mountPath"].as_str() == Some(mount_path))
            .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
        assert_eq!(
            mount["readOnly"].as_bool(),
            Some(true),
            "{mount_path} read-only"
        );
        volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume for {mount_path}"))
    };
    assert_eq!(
        volume("/sys/kernel/btf")["hostPath"]["path"].as_str(),
        Some("/sys/kernel/btf")
    );
    // A read-only root still has a writable /tmp (inflated debug sections), bounded.
    if security["readOnlyRootFilesystem"].as_bool() == Some(true) {
        let tmp = mounts
            .iter()
            .find(|v| v["mountPath"].as_str() == Some("/tmp"))
            .expect("a writable /tmp under readOnlyRootFilesystem");
        assert_ne!(tmp["readOnly"].as_bool(), Some(true), "/tmp read-only");
        let tmp_volume = volumes
            .iter()
            .find(|v| v["name"] == tmp["name"])
            .expect("no volume for /tmp");
        let empty_dir = &tmp_volume["emptyDir"];
        assert!(!empty_dir.is_badvalue(), "/tmp is not an emptyDir");
        assert!(
            empty_dir["sizeLimit"].as_str().is_some(),
            "/tmp has no sizeLimit"
        );
        assert_ne!(
            empty_dir["medium"].as_str(),
            Some("Memory"),
            "/tmp in memory counts against the memory limit"
        );
    }
    let config_path = config_arg(c);
    let (dir, file) = config_path
        .rsplit_once('/')
        .expect("absolute --config path");
    let config_volume = volume(dir);
    assert_eq!(
        config_volume["configMap"]["name"].as_str(),
        Some(name(m.one("ConfigMap")))
    );
    assert!(
        m.one("ConfigMap")["data"][file].as_str().is_some(),
        "the ConfigMap has no {file}"
    );
}

/// Runs `check-config` on the ConfigMap's agent.toml with NODE_NAME set to `node` (or unset).
fn check_configmap(node: Option<&str>) -> std::process::Output {
    let m = Manifests::load();
    let config_path = config_arg(the_container(m.one("DaemonSet")));
    let file = Path::new(&config_path)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    let toml = m.one("ConfigMap")["data"][file]
        .as_str()
        .expect("agent.toml in the ConfigMap")
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(agent());
    cmd.arg("check-config").arg("--config").arg(&path);
    cmd.env_remove("NODE_NAME").env_remove("CLUSTER_NAME");
    if let Some(node) = node {
        cmd.env("NODE_NAME", node);
    }
    cmd.output().expect("run profiler-agent check-config")
}

#[test]
fn configmap_config_passes_check_config() {
    let out = check_configmap(Some("worker-7"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check-config refused the ConfigMap's agent.toml:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The effective config: this node, every interface, the Pyroscope endpoint.
    for expected in [
        "node_name = \"worker-7\"",
        "listen_address = \"0.0.0.0:4100\"",
        "protocol = \"push\"",
        "cluster = \"kubernetes\"",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    assert!(stdout.contains("[[relabel]]"), "{stdout}");

    // Without the downward API's NODE_NAME the config is refused, naming the field.
    let out = check_configmap(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("discovery.kubernetes.node_name"),
        "{stderr}"
    );
}

#[test]
fn dockerfile_runs_the_config_the_daemonset_mounts() {
    let dockerfile = read(DOCKERFILE);
    let m = Manifests::load();
    let config_path = config_arg(the_container(m.one("DaemonSet")));
    let instruction = |name: &str| {
        dockerfile
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {DOCKERFILE}"))
            .trim()
            .to_owned()
    };
    assert_eq!(instruction("ENTRYPOINT"), r#"["profiler-agent"]"#);
    assert_eq!(
        instruction("CMD"),
        format!(r#"["run", "--config", "{config_path}"]"#)
    );
    assert_eq!(instruction("EXPOSE"), "4100");
    assert!(dockerfile.contains("cargo build --release"), "{dockerfile}");
}
