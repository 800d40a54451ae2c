//! The attach protocol's parts, and the whole of it against real JVMs of the machine's JDK.

use super::*;

#[test]
fn attach_is_disabled_by_the_last_flag() {
    let cmd = |args: &[&str]| args.join("\0").into_bytes();
    assert!(disables_attach(
        &cmd(&["java", "-XX:+DisableAttachMechanism", "Hot"]),
        b""
    ));
    assert!(!disables_attach(&cmd(&["java", "Hot"]), b""));
    assert!(disables_attach(
        &cmd(&["java", "Hot"]),
        b"PATH=/bin\0JAVA_TOOL_OPTIONS=-Xmx1g -XX:+DisableAttachMechanism\0"
    ));
    assert!(!disables_attach(
        &cmd(&["java", "-XX:-DisableAttachMechanism", "Hot"]),
        b"JAVA_TOOL_OPTIONS=-XX:+DisableAttachMechanism\0"
    ));
}

#[test]
fn answers_are_parsed_and_failures_reported() {
    assert_eq!(parse_answer(b"0\nok\n", 1, "x").unwrap(), "ok\n");
    assert!(matches!(
        parse_answer(b"101\n", 1, "x"),
        Err(AttachError::Command { status: 101, .. })
    ));
    assert!(matches!(
        parse_answer(
            b"0\njava.lang.IllegalArgumentException: Unknown diagnostic command\n",
            1,
            "x"
        ),
        Err(AttachError::Command { .. })
    ));
    assert!(matches!(
        parse_answer(b"HTTP/1.1 400\n", 1, "x"),
        Err(AttachError::Socket { .. })
    ));
}

#[test]
fn a_process_without_libjvm_is_never_signalled() {
    let me = std::process::id();
    assert!(matches!(
        Target::of(Path::new("/proc"), me),
        Err(AttachError::NotHotSpot { .. })
    ));
    assert!(matches!(
        jcmd(
            Path::new("/proc"),
            me,
            "Compiler.perfmap",
            Duration::from_secs(1)
        ),
        Err(AttachError::NotHotSpot { .. })
    ));
}

/// A JVM of the machine's JDK, started with no flag, run `Hot` from the test fixtures.
struct Jvm(std::process::Child);

impl Drop for Jvm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn java(dir: &Path, flags: &[&str]) -> Option<Jvm> {
    java_with(dir, &[], flags)
}

/// [`java`] run by `wrapper` (a command line that runs the rest).
fn java_with(dir: &Path, wrapper: &[&str], flags: &[&str]) -> Option<Jvm> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/java/Hot.java");
    let javac = std::process::Command::new("javac")
        .arg("-d")
        .arg(dir)
        .arg(&fixture)
        .status();
    if !javac.is_ok_and(|s| s.success()) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("javac is missing (the JDK is on every machine of this kind)");
        }
        eprintln!("SKIPPED: no javac");
        return None;
    }
    let mut command = std::process::Command::new(wrapper.first().copied().unwrap_or("java"));
    if !wrapper.is_empty() {
        command.args(&wrapper[1..]).arg("java");
    }
    let child = command
        .args(flags)
        .arg("-cp")
        .arg(dir)
        .arg("Hot")
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    Some(Jvm(child))
}

/// Asks JVM `pid` for its perf map, which must then name `Hot.mix`; removes the map.
fn assert_map_names_hot_mix(pid: u32) {
    let output = jcmd(
        Path::new("/proc"),
        pid,
        crate::jvm::PERF_MAP_COMMAND,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let map = std::fs::read_to_string(format!("/tmp/perf-{pid}.map"))
        .unwrap_or_else(|e| panic!("no perf map after {output:?}: {e}"));
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
    assert!(map.lines().any(|l| l.contains("Hot.mix")), "{map}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The real protocol against a real JVM: the perf map appears, naming `Hot.mix`; a JVM
/// that disabled attach is refused before any signal.
#[test]
fn a_jvm_writes_its_perf_map_when_asked() {
    if !is_root() {
        eprintln!("SKIPPED: attaching as another user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(jvm) = java(dir.path(), &[]) else {
        return;
    };
    let pid = jvm.0.id();
    // Let the listener-less JVM start and compile its hot method.
    std::thread::sleep(Duration::from_secs(2));
    let proc = Path::new("/proc");
    assert_map_names_hot_mix(pid);
    // The trigger file was removed; asking again reuses the socket.
    assert!(!Path::new(&format!("/proc/{pid}/cwd/.attach_pid{pid}")).exists());
    jcmd(
        proc,
        pid,
        crate::jvm::PERF_MAP_COMMAND,
        Duration::from_secs(10),
    )
    .unwrap();
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
    drop(jvm);

    let Some(refusing) = java(dir.path(), &["-XX:+DisableAttachMechanism"]) else {
        return;
    };
    let pid = refusing.0.id();
    std::thread::sleep(Duration::from_millis(500));
    // Refused from its command line, before any signal (not a timeout).
    assert!(matches!(
        jcmd(
            proc,
            pid,
            crate::jvm::PERF_MAP_COMMAND,
            Duration::from_secs(10)
        ),
        Err(AttachError::Disabled { .. })
    ));
}

/// A JVM that is root in a user namespace of its own, run by `nobody` on the host: there
/// the host's root is no one (the overflow uid), so HotSpot accepts only a client that is
/// the JVM's own host user, as jcmd run by that user would be.
#[test]
fn a_jvm_in_a_user_namespace_is_asked_as_its_own_user() {
    if !is_root() {
        eprintln!("SKIPPED: attaching as another user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The JVM's user reads its classes.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "unshare",
        "--user",
        "--map-root-user",
    ];
    let Some(jvm) = java_with(dir.path(), &wrapper, &[]) else {
        return;
    };
    let unshare = jvm.0.id();
    // setpriv and unshare exec: the JVM keeps the child's pid.
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{unshare}/status")).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t65534")),
        "the JVM runs as nobody on the host: {status}"
    );
    assert_map_names_hot_mix(unshare);
}
