use std::{fs, net::SocketAddr};

use prometheus_client::registry::Registry;

use super::*;

fn listen(addr: &str) -> SocketAddr {
    addr.parse().unwrap()
}

#[test]
fn a_public_address_needs_a_token() {
    let enabled = CaptureConfig {
        enabled: true,
        ..CaptureConfig::default()
    };
    assert_eq!(
        enabled.token(listen("127.0.0.1:4100")).unwrap().map(|_| ()),
        None
    );
    assert_eq!(
        enabled.token(listen("[::1]:4100")).unwrap().map(|_| ()),
        None
    );
    let (field, reason) = enabled.token(listen("0.0.0.0:4100")).unwrap_err();
    assert_eq!(field, "capture.bearer_token");
    assert!(reason.contains("0.0.0.0:4100"), "{reason}");
    // Disabled, nothing is served, so nothing is required.
    assert!(
        CaptureConfig::default()
            .token(listen("0.0.0.0:4100"))
            .is_ok()
    );

    let with_token = CaptureConfig {
        bearer_token: Some(Secret::new("t0ken")),
        ..enabled.clone()
    };
    let token = with_token.token(listen("0.0.0.0:4100")).unwrap().unwrap();
    assert_eq!(token.expose(), "t0ken");
}

#[test]
fn token_file_empty_token_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    fs::write(&file, "from-file\n").unwrap();
    let from_file = CaptureConfig {
        enabled: true,
        bearer_token_file: Some(file.clone()),
        ..CaptureConfig::default()
    };
    let token = from_file.token(listen("10.0.0.1:4100")).unwrap().unwrap();
    assert_eq!(token.expose(), "from-file");

    let missing = CaptureConfig {
        bearer_token_file: Some(dir.path().join("absent")),
        ..from_file.clone()
    };
    assert_eq!(
        missing.token(listen("10.0.0.1:4100")).unwrap_err().0,
        "capture.bearer_token_file"
    );
    let both = CaptureConfig {
        bearer_token: Some(Secret::new("x")),
        ..from_file.clone()
    };
    assert_eq!(
        both.token(listen("10.0.0.1:4100")).unwrap_err().0,
        "capture.bearer_token_file"
    );
    let empty = CaptureConfig {
        bearer_token: Some(Secret::new("")),
        enabled: true,
        ..CaptureConfig::default()
    };
    assert_eq!(
        empty.token(listen("10.0.0.1:4100")).unwrap_err().0,
        "capture.bearer_token"
    );
    let zero = CaptureConfig {
        max_concurrent: 0,
        ..CaptureConfig::default()
    };
    assert_eq!(
        zero.token(listen("127.0.0.1:1")).unwrap_err().0,
        "capture.max_concurrent"
    );
}

/// A fake /proc with three processes and a kernel thread.
fn fake_proc() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let add = |pid: u32, cmdline: &[u8], ticks: (u64, u64)| {
        let dir = root.path().join(pid.to_string());
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("cmdline"), cmdline).unwrap();
        // Fields after the `)`: state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime ...
        fs::write(
            dir.join("stat"),
            format!(
                "{pid} (a) b) S 1 1 1 0 -1 0 0 0 0 0 {} {} 0 0 20 0 1 0 100 1000 10",
                ticks.0, ticks.1
            ),
        )
        .unwrap();
    };
    add(10, b"java\0-jar\0app.jar\0", (5, 5));
    add(11, b"java\0-jar\0other.jar\0", (50, 1));
    add(12, b"/usr/bin/python3\0server.py\0", (1, 1));
    add(13, b"", (100, 100));
    fs::create_dir(root.path().join("self")).unwrap();
    root
}

#[test]
fn command_regex_picks_the_busiest_match() {
    let root = fake_proc();
    let re = |s: &str| Regex::new(s).unwrap();
    assert_eq!(find_by_command(root.path(), &re("^java ")).unwrap(), 11);
    assert_eq!(find_by_command(root.path(), &re("app\\.jar$")).unwrap(), 10);
    assert_eq!(
        find_by_command(root.path(), &re("python3 server")).unwrap(),
        12
    );
    assert!(matches!(
        find_by_command(root.path(), &re("^nothing")),
        Err(CaptureError::NoProcess)
    ));
    // The kernel thread's empty command line matches nothing, even an empty regex.
    assert_eq!(find_by_command(root.path(), &re("")).unwrap(), 11);
}

#[test]
fn slots_are_bounded_and_given_back() {
    let mut registry = Registry::default();
    let metrics = Arc::new(AgentMetrics::register(&mut registry));
    let (jobs, _rx) = mpsc::channel();
    let capturer = Capturer::new(2, true, true, jobs, metrics);
    let a = capturer.take_slot().unwrap();
    let _b = capturer.take_slot().unwrap();
    assert!(matches!(
        capturer.take_slot(),
        Err(CaptureError::Busy { limit: 2 })
    ));
    drop(a);
    assert!(capturer.take_slot().is_ok());
}

#[test]
fn a_missing_pid_is_not_found() {
    let mut registry = Registry::default();
    let metrics = Arc::new(AgentMetrics::register(&mut registry));
    let (jobs, _rx) = mpsc::channel();
    let mut capturer = Capturer::new(1, true, true, jobs, metrics);
    let root = fake_proc();
    capturer.proc_root = root.path().to_owned();
    assert_eq!(capturer.find(&Selector::Pid(12)).unwrap(), 12);
    assert!(matches!(
        capturer.find(&Selector::Pid(99)),
        Err(CaptureError::NoProcess)
    ));
}
