//! Java from the host (issue 19, its capture half): `profiler-agent run` with `[capture]`
//! enabled captures a JVM of the machine's JDK started with no flag, and the agent asks the
//! JVM itself, through HotSpot's attach socket, for the perf map that names its compiled
//! methods. Checked: `Hot.mix` (shown without its return type and parameters, which stay in
//! the system name) is the innermost user frame of at least 80% of the capture's samples;
//! with `-XX:+PreserveFramePointer`, at least 80% show the whole chain `main -> compute ->
//! mix` down to the JVM's native `JavaMain`; a JVM started with `-XX:+DisableAttachMechanism`
//! is left alone, counted, and its capture still answers; `profiler_jvm_attach_total` counts
//! them. A JVM in its own pid and mount namespaces, profiled continuously as a daemon
//! target, is asked for its map through them and named in a later interval.
//!
//! Root is needed (BPF, attaching as the JVM's user); under `CI=true` a missing
//! prerequisite fails the test.

mod common;

use std::{net::TcpStream, path::Path, process::Command, time::Duration};

use common::{http::*, *};
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

/// The innermost user frame's function and system names of each sample, with its count.
fn leaves(p: &Profile) -> Vec<(String, String, i64)> {
    let s = |i: i64| p.string_table[i as usize].clone();
    p.sample
        .iter()
        .filter_map(|sample| {
            let leaf = sample.location_id.iter().find_map(|id| {
                let l = p.location.iter().find(|l| l.id == *id)?;
                let m = p.mapping.iter().find(|m| m.id == l.mapping_id)?;
                if s(m.filename) == KERNEL_MAPPING {
                    return None;
                }
                let id = l.line.first()?.function_id;
                let f = p.function.iter().find(|f| f.id == id)?;
                Some((s(f.name), s(f.system_name)))
            })?;
            Some((leaf.0, leaf.1, sample.value[0]))
        })
        .collect()
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
    let port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
collect_interval = "5s"
[write]
directory = "{profiles}"
[server]
listen_address = "127.0.0.1:{port}"
[capture]
enabled = true
bearer_token = "{TOKEN}"
"#,
            profiles = dir.path().join("profiles").display(),
        ),
    )
    .unwrap();
    let log_path = dir.path().join("agent.log");
    let _agent = Workload::run_agent(&config, &log_path);
    let _show_log = ShowLogOnPanic(log_path.clone());
    wait_until(SHOW_UP, "agent ready", || {
        TcpStream::connect(("127.0.0.1", port)).ok()?;
        (http_get(port, "/ready", None)?.0 == 200).then_some(())
    });

    let path = dir.path().join("hot.pb.gz");
    capture(port, hot.pid(), 10, &path);
    go_pprof_raw(&path);
    let p = read_profile(&path);
    let leaves = leaves(&p);
    let total: i64 = leaves.iter().map(|l| l.2).sum();
    let mix: i64 = leaves
        .iter()
        .filter(|l| l.0 == "Hot.mix")
        .map(|l| l.2)
        .sum();
    let mut by_name: std::collections::BTreeMap<&str, i64> = Default::default();
    for (name, _, n) in &leaves {
        *by_name.entry(name).or_default() += n;
    }
    eprintln!("Hot.mix is the leaf of {mix} of {total} samples; leaves: {by_name:?}");
    assert!(total >= 300, "{total} samples in 10 s");
    assert!(
        mix as f64 >= 0.8 * total as f64,
        "Hot.mix leaf of {mix} of {total}: {by_name:?}"
    );
    assert!(
        leaves
            .iter()
            .filter(|l| l.0 == "Hot.mix")
            .all(|l| l.1 == "long Hot.mix(long)"),
        "the signature stays in the system name"
    );

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

/// The child `unshare --fork` started (the JVM, once its shell exec'd it).
fn forked_child(unshare: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
    let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "java").then_some(pid)
}

/// A JVM in its own pid and mount namespaces (pid 1 there, a private /tmp), profiled by the
/// daemon as a target: its compiled code goes unnamed in the first interval, the agent asks
/// the JVM for its perf map through the namespaces, and a later profile names `Hot.mix`.
/// `unshare --kill-child` takes the JVM down with it when the test ends.
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
    let classes = dir.path().display().to_string();
    let unshare = Workload::spawn(
        "unshare",
        &[
            "--pid",
            "--mount",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            &format!("mount -t tmpfs tmpfs /tmp && exec java -cp {classes} Hot"),
        ],
    );
    let java = wait_until(SHOW_UP, "the JVM in its namespaces", || {
        forked_child(unshare.pid())
    });
    let status = std::fs::read_to_string(format!("/proc/{java}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
        "pid 1 in its namespace: {status}"
    );
    let port = free_port();
    let profiles = dir.path().join("profiles");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
collect_interval = "3s"
[[targets]]
__process_pid__ = "{java}"
service_name = "jvm"
[write]
directory = "{profiles}"
[server]
listen_address = "127.0.0.1:{port}"
"#,
            profiles = profiles.display(),
        ),
    )
    .unwrap();
    let log_path = dir.path().join("agent.log");
    let _agent = Workload::run_agent(&config, &log_path);
    let _show_log = ShowLogOnPanic(log_path.clone());
    let named = wait_until(Duration::from_secs(120), "a profile naming Hot.mix", || {
        written_profiles(&profiles.join("jvm"))
            .into_iter()
            .find_map(|p| {
                let leaves = leaves(&p);
                let total: i64 = leaves.iter().map(|l| l.2).sum();
                let mix: i64 = leaves
                    .iter()
                    .filter(|l| l.0 == "Hot.mix")
                    .map(|l| l.2)
                    .sum();
                (total >= 100 && mix as f64 >= 0.8 * total as f64).then_some((mix, total))
            })
    });
    eprintln!(
        "a continuous profile names Hot.mix as the leaf of {} of {} samples",
        named.0, named.1
    );
    let (_, text) = http_get_text(port, "/metrics").expect("/metrics answers");
    let asked = metric(&text, "profiler_jvm_attach_total{outcome=\"done\"}").unwrap_or(0.0);
    assert!(asked >= 1.0, "the JVM was asked: {text}");
    drop(unshare);
}
