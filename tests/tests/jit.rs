//! Java and other JIT runtimes from the host (issue 19): `profiler-agent run` with
//! `[capture]` enabled captures a JVM of the machine's JDK started with no flag, and the
//! agent asks the JVM itself, through HotSpot's attach socket, for the perf map that names its
//! compiled methods. Checked: `Hot.mix` (shown without its return type and parameters, which
//! stay in the system name, in the `[jvm jit]` mapping) is the innermost user frame of at
//! least 80% of the capture's samples; with `-XX:+PreserveFramePointer`, at least 80% show
//! the whole chain `main -> compute -> mix` down to the JVM's native `JavaMain`; a JVM started
//! with `-XX:+DisableAttachMechanism` is left alone, counted, and its capture still answers;
//! `profiler_jvm_attach_total` counts them. A JVM in its own pid and mount namespaces,
//! profiled continuously as a daemon target, is asked for its map through them and named in
//! a later profile pushed to Pyroscope. So is Node.js started with `--perf-basic-prof` in its
//! own namespaces, from the map V8 writes in its private `/tmp`: its hot function (`mix`, or
//! `compute` with `mix` inlined) with its script and line, in the `[node jit]` mapping,
//! walked down to V8's native `Builtins_JSEntry`.
//!
//! Root is needed (BPF, attaching as the JVM's user, namespaces); under `CI=true` a missing
//! prerequisite fails the test.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{http::*, receiver::*, *};
use profiler_agent::profile::KERNEL_MAPPING;

const SHOW_UP: Duration = Duration::from_secs(30);
const TOKEN: &str = "jvm-test-token";

fn javac(dir: &Path) -> bool {
    let fixture = workspace_root().join("tests/fixtures/java/Hot.java");
    let ok = Command::new("javac")
        .arg("-d")
        .arg(dir)
        .arg(&fixture)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("javac failed or is missing (the machine's JDK)");
        }
        eprintln!("SKIPPED: no javac");
    }
    ok
}

/// Captures `pid` for `seconds` through the agent's API into `path`; it must answer 200.
fn capture(port: u16, pid: u32, seconds: u32, path: &Path) {
    let (status, pprof) = http_get_within(
        port,
        &format!("/v1/profile?pid={pid}&duration={seconds}s"),
        Some(TOKEN),
        Duration::from_secs(120),
    )
    .expect("the capture answers");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&pprof));
    std::fs::write(path, &pprof).unwrap();
}

/// The user frames' function names of each sample (leaf first), with its count.
fn user_stacks(p: &Profile) -> Vec<(Vec<String>, i64)> {
    let s = |i: i64| p.string_table[i as usize].clone();
    p.sample
        .iter()
        .map(|sample| {
            let names = sample
                .location_id
                .iter()
                .filter_map(|id| {
                    let l = p.location.iter().find(|l| l.id == *id)?;
                    let m = p.mapping.iter().find(|m| m.id == l.mapping_id)?;
                    (s(m.filename) != KERNEL_MAPPING).then_some(l)
                })
                .flat_map(|l| l.line.iter())
                .filter_map(|line| {
                    let f = p.function.iter().find(|f| f.id == line.function_id)?;
                    Some(s(f.name))
                })
                .collect();
            (names, sample.value[0])
        })
        .collect()
}

/// Whether `stack` (leaf first) runs `Hot.mix` under `Hot.compute` under `main`, compiled
/// (`Hot.main`) or interpreted (its `[java interpreter]` activation: main loops too few
/// times to be compiled), and goes on down to the JVM's native entry (`JavaMain`).
fn whole_chain(stack: &[String]) -> bool {
    let at = stack.iter().position(|n| n == "Hot.mix");
    at.is_some_and(|i| {
        let rest = &stack[i..];
        rest.len() > 3
            && rest[1] == "Hot.compute"
            && (rest[2] == "Hot.main" || rest[2] == "[java interpreter]")
            && rest[3..].iter().any(|n| n == "JavaMain")
    })
}

/// A sample's innermost user frame, and the sample's count.
#[derive(Debug)]
struct Leaf {
    name: String,
    system_name: String,
    file: String,
    line: i64,
    mapping: String,
    count: i64,
}

/// The innermost user frame of each sample.
fn leaves(p: &Profile) -> Vec<Leaf> {
    let s = |i: i64| p.string_table[i as usize].clone();
    p.sample
        .iter()
        .filter_map(|sample| {
            sample.location_id.iter().find_map(|id| {
                let l = p.location.iter().find(|l| l.id == *id)?;
                let m = p.mapping.iter().find(|m| m.id == l.mapping_id)?;
                if s(m.filename) == KERNEL_MAPPING {
                    return None;
                }
                let line = l.line.first()?;
                let f = p.function.iter().find(|f| f.id == line.function_id)?;
                Some(Leaf {
                    name: s(f.name),
                    system_name: s(f.system_name),
                    file: s(f.filename),
                    line: line.line,
                    mapping: s(m.filename),
                    count: sample.value[0],
                })
            })
        })
        .collect()
}

/// Samples in all, and those whose leaf is `name`.
fn leaf_share(leaves: &[Leaf], name: &str) -> (i64, i64) {
    let total = leaves.iter().map(|l| l.count).sum();
    let named = leaves
        .iter()
        .filter(|l| l.name == name)
        .map(|l| l.count)
        .sum();
    (named, total)
}

#[test]
fn a_jvm_with_no_flags_is_named_from_the_host() {
    const TEST: &str = "a_jvm_with_no_flags_is_named_from_the_host";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !javac(dir.path()) {
        return;
    }
    let classes = dir.path().to_str().unwrap().to_owned();
    let hot = Workload::spawn("java", &["-cp", &classes, "Hot"]);
    let refusing = Workload::spawn(
        "java",
        &["-XX:+DisableAttachMechanism", "-cp", &classes, "Hot"],
    );
    let framed = Workload::spawn(
        "java",
        &["-XX:+PreserveFramePointer", "-cp", &classes, "Hot"],
    );
    let agent = Agent::start_ready(
        dir.path(),
        &format!(
            r#"
collect_interval = "5s"
[write]
directory = "{profiles}"
[capture]
enabled = true
bearer_token = "{TOKEN}"
"#,
            profiles = dir.path().join("profiles").display(),
        ),
    );
    let port = agent.port;

    let path = dir.path().join("hot.pb.gz");
    capture(port, hot.pid(), 10, &path);
    go_pprof_raw(&path);
    let p = read_profile(&path);
    let leaves = leaves(&p);
    let (mix, total) = leaf_share(&leaves, "Hot.mix");
    let mut by_name: std::collections::BTreeMap<&str, i64> = Default::default();
    for leaf in &leaves {
        *by_name.entry(&leaf.name).or_default() += leaf.count;
    }
    eprintln!("Hot.mix is the leaf of {mix} of {total} samples; leaves: {by_name:?}");
    assert!(total >= 300, "{total} samples in 10 s");
    assert!(
        mix as f64 >= 0.8 * total as f64,
        "Hot.mix leaf of {mix} of {total}: {by_name:?}"
    );
    for leaf in leaves.iter().filter(|l| l.name == "Hot.mix") {
        assert_eq!(
            leaf.system_name, "long Hot.mix(long)",
            "the signature stays"
        );
        assert_eq!(
            leaf.mapping, "[jvm jit]",
            "JIT code is in the JVM's JIT mapping"
        );
    }

    // With frame pointers kept, the walk goes through the compiled frames to main.
    let path = dir.path().join("framed.pb.gz");
    capture(port, framed.pid(), 5, &path);
    let stacks = user_stacks(&read_profile(&path));
    let total: i64 = stacks.iter().map(|s| s.1).sum();
    let whole: i64 = stacks
        .iter()
        .filter(|s| whole_chain(&s.0))
        .map(|s| s.1)
        .sum();
    let mut others: Vec<&(Vec<String>, i64)> =
        stacks.iter().filter(|s| !whole_chain(&s.0)).collect();
    others.sort_by_key(|s| -s.1);
    eprintln!(
        "PreserveFramePointer: JavaMain .. main -> compute -> mix in {whole} of {total} samples"
    );
    assert!(
        whole as f64 >= 0.8 * total as f64 && total >= 150,
        "{whole} of {total}; others: {:?}",
        &others[..others.len().min(5)]
    );

    // A JVM that refuses attach: left alone, counted, and its capture still answers.
    capture(port, refusing.pid(), 2, &dir.path().join("refusing.pb.gz"));
    let (_, text) = http_get_text(port, "/metrics").expect("/metrics answers");
    let done = metric(&text, "profiler_jvm_attach_total{outcome=\"done\"}");
    let disabled = metric(&text, "profiler_jvm_attach_total{outcome=\"disabled\"}");
    assert_eq!((done, disabled), (Some(2.0), Some(1.0)), "{text}");
    // The maps the JVMs wrote in this machine's /tmp.
    for pid in [hot.pid(), framed.pid()] {
        let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
    }
    drop(refusing);
    drop(framed);
    drop(hot);
}

/// A program started as pid 1 of its own pid and mount namespaces, with its own `/tmp` (a
/// private tmpfs, where its perf map goes). `unshare --kill-child` takes it down with it when
/// this is dropped.
struct Contained {
    _unshare: Workload,
    /// Its pid on the host.
    pid: u32,
}

impl Contained {
    /// Runs `command` (a shell command line that execs a process named `comm`) in `cwd`,
    /// where it may leave files (V8 writes its log there).
    fn start(command: &str, comm: &str, cwd: &Path) -> Self {
        let unshare = Workload::spawn(
            "unshare",
            &[
                "--pid",
                "--mount",
                "--fork",
                "--kill-child",
                "sh",
                "-c",
                &format!(
                    "mount -t tmpfs tmpfs /tmp && cd {} && exec {command}",
                    cwd.display()
                ),
            ],
        );
        let pid = wait_until(SHOW_UP, "the process in its namespaces", || {
            forked_child(unshare.pid(), comm)
        });
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
            "pid 1 in its namespace: {status}"
        );
        Self {
            _unshare: unshare,
            pid,
        }
    }
}

/// The child `unshare --fork` started, once its shell exec'd `comm`.
fn forked_child(unshare: u32, comm: &str) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
    let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
    let seen = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (seen.trim() == comm).then_some(pid)
}

/// The agent as a daemon profiling `pid` as target `service` every 3 s, pushing its
/// profiles to a Pyroscope receiver.
struct Daemon {
    agent: Agent,
    receiver: Receiver,
    service: String,
}

impl Daemon {
    fn start(dir: &Path, pid: u32, service: &str) -> Self {
        let receiver = Receiver::start();
        let agent = Agent::start(
            dir,
            &format!(
                r#"
collect_interval = "3s"
[[targets]]
__process_pid__ = "{pid}"
service_name = "{service}"
[[write.endpoint]]
url = "{url}"
"#,
                url = receiver.url(),
            ),
        );
        Self {
            agent,
            receiver,
            service: service.to_owned(),
        }
    }

    /// The service's pushed profiles, in the order they came.
    fn pushed(&self) -> Vec<Profile> {
        pushed_series(&self.receiver.requests())
            .into_iter()
            .filter(|s| s.labels.get("service_name") == Some(&self.service))
            .flat_map(|s| s.profiles)
            .collect()
    }

    /// The first pushed profile in which at least 80% of 100 or more samples have a
    /// `wanted` leaf, with its leaves and its profile.
    fn wait_for_leaves(&self, what: &str, wanted: impl Fn(&Leaf) -> bool) -> (Vec<Leaf>, Profile) {
        let mut seen = 0;
        wait_until(Duration::from_secs(120), what, || {
            let pushed = self.pushed();
            let new = pushed.len().saturating_sub(seen);
            seen = pushed.len();
            pushed.into_iter().skip(seen - new).find_map(|p| {
                let leaves = leaves(&p);
                let total: i64 = leaves.iter().map(|l| l.count).sum();
                let named: i64 = leaves.iter().filter(|l| wanted(l)).map(|l| l.count).sum();
                eprintln!("{what}: {named} of {total} samples");
                (total >= 100 && named as f64 >= 0.8 * total as f64).then_some((leaves, p))
            })
        })
    }
}

/// A JVM in its own pid and mount namespaces (pid 1 there, a private /tmp), profiled by the
/// daemon as a target: its compiled code goes unnamed in the first interval, the agent asks
/// the JVM for its perf map through the namespaces, and a later profile names `Hot.mix`.
#[test]
fn a_jvm_in_its_own_namespaces_is_named_in_continuous_profiles() {
    const TEST: &str = "a_jvm_in_its_own_namespaces_is_named_in_continuous_profiles";
    if !require_root(TEST) {
        return;
    }
    // Outside /tmp, which the JVM's mount namespace covers with its own.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    if !javac(dir.path()) {
        return;
    }
    let java = Contained::start(
        &format!("java -cp {} Hot", dir.path().display()),
        "java",
        dir.path(),
    );
    let daemon = Daemon::start(dir.path(), java.pid, "jvm");
    daemon.wait_for_leaves("Hot.mix as the leaf", |l| l.name == "Hot.mix");
    let (_, text) = http_get_text(daemon.agent.port, "/metrics").expect("/metrics answers");
    let asked = metric(&text, "profiler_jvm_attach_total{outcome=\"done\"}").unwrap_or(0.0);
    assert!(asked >= 1.0, "the JVM was asked: {text}");
}

/// Node.js started with `--perf-basic-prof` as pid 1 of its own namespaces: V8 writes
/// `/tmp/perf-1.map` in its private `/tmp`, and the daemon names its hot function from it,
/// with its script and line, in the `[node jit]` mapping, and walks its frames down to V8's
/// native entry.
#[test]
fn node_in_its_own_namespaces_is_named_from_its_perf_map() {
    const TEST: &str = "node_in_its_own_namespaces_is_named_from_its_perf_map";
    if !require_root(TEST) {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let script = dir.path().join("hot.js");
    std::fs::copy(workspace_root().join("tests/fixtures/node/hot.js"), &script).unwrap();
    let has_node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_node {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("node is missing");
        }
        eprintln!("SKIPPED: no node");
        return;
    }
    let node = Contained::start(
        &format!("node --perf-basic-prof {}", script.display()),
        "node",
        dir.path(),
    );
    let daemon = Daemon::start(dir.path(), node.pid, "node");
    // TurboFan inlines mix into compute (or not): either is named from the script.
    let script = script.display().to_string();
    let (leaves, profile) = daemon.wait_for_leaves("mix or compute as the leaf", |l| {
        l.file == script
            && l.mapping == "[node jit]"
            && l.system_name.starts_with("JS:")
            && matches!((l.name.as_str(), l.line), ("mix", 7) | ("compute", 16))
    });
    let mut by_name: std::collections::BTreeMap<&str, i64> = Default::default();
    for leaf in &leaves {
        *by_name.entry(&leaf.name).or_default() += leaf.count;
    }
    let stacks = user_stacks(&profile);
    let total: i64 = stacks.iter().map(|s| s.1).sum();
    // Through the JIT frames and the interpreted ones (each V8's interpreter trampoline: only
    // `--interpreted-frames-native-stack` names them) down to V8's native entry.
    let chain: i64 = stacks
        .iter()
        .filter(|(names, _)| names.iter().any(|n| n == "Builtins_JSEntry"))
        .map(|s| s.1)
        .sum();
    eprintln!("leaves {by_name:?}; down to Builtins_JSEntry in {chain} of {total} samples");
    assert!(
        chain as f64 >= 0.8 * total as f64,
        "{chain} of {total}: {:?}",
        &stacks[..stacks.len().min(3)]
    );
}
