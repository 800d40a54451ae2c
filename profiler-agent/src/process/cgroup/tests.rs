use std::path::Path;

use super::*;

const ID: &str = "4f2e5b7c9d1a3e6f8b0c2d4e6f8a0b1c3d5e7f9a1b3c5d7e9f0a2b4c6d8e0f1a";
const ID2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// (runtime and driver, cgroup line, expected id), lines in the forms real systems write.
fn cases() -> Vec<(&'static str, String, Option<&'static str>)> {
    vec![
        (
            "docker, cgroup v1 cgroupfs",
            format!("12:cpu,cpuacct:/docker/{ID}"),
            Some(ID),
        ),
        (
            "docker, cgroup v2 cgroupfs",
            format!("0::/docker/{ID}"),
            Some(ID),
        ),
        (
            "docker, cgroup v2 systemd",
            format!("0::/system.slice/docker-{ID}.scope"),
            Some(ID),
        ),
        (
            "docker, v1 systemd named hierarchy",
            format!("1:name=systemd:/system.slice/docker-{ID}.scope"),
            Some(ID),
        ),
        (
            "kubernetes containerd, cgroupfs driver",
            format!("0::/kubepods/burstable/pod7c1e2a50-8f3b-4a1e-9d2c-1b2a3c4d5e6f/{ID}"),
            Some(ID),
        ),
        (
            "kubernetes containerd, systemd driver",
            format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7c1e2a50_8f3b_4a1e_9d2c_1b2a3c4d5e6f.slice/cri-containerd-{ID}.scope"
            ),
            Some(ID),
        ),
        (
            "containerd systemd driver, colon form",
            format!(
                "0::/system.slice/containerd.service/kubepods-besteffort-pod7c1e2a50_8f3b_4a1e_9d2c_1b2a3c4d5e6f.slice:cri-containerd:{ID}"
            ),
            Some(ID),
        ),
        (
            "cri-o, systemd driver",
            format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2a.slice/crio-{ID}.scope"
            ),
            Some(ID),
        ),
        (
            "cri-o, cgroupfs driver",
            format!("11:memory:/kubepods/besteffort/pod1b2a/crio-{ID}"),
            Some(ID),
        ),
        (
            "cri-o conmon is not the container",
            format!("0::/kubepods.slice/kubepods-besteffort.slice/crio-conmon-{ID}.scope"),
            None,
        ),
        (
            "podman rootful",
            format!("0::/machine.slice/libpod-{ID}.scope"),
            Some(ID),
        ),
        (
            "podman rootless",
            format!(
                "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            ),
            Some(ID),
        ),
        (
            "podman conmon",
            format!("0::/machine.slice/libpod-conmon-{ID}.scope"),
            None,
        ),
        (
            "kind: a pod inside the node container",
            format!(
                "0::/docker/{ID2}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod1b2a.slice/cri-containerd-{ID}.scope"
            ),
            Some(ID),
        ),
        (
            "kind: the node container's own processes",
            format!("0::/docker/{ID2}/system.slice/containerd.service"),
            Some(ID2),
        ),
        (
            "user session slice",
            "0::/user.slice/user-1000.slice/session-3.scope".into(),
            None,
        ),
        ("host service", "0::/system.slice/sshd.service".into(), None),
        ("root cgroup", "0::/".into(), None),
        ("init scope", "0::/init.scope".into(), None),
        ("not hex", format!("0::/docker/{}", "g".repeat(64)), None),
        ("too short", format!("0::/docker/{}", &ID[..63]), None),
        ("garbage", "no colons at all".into(), None),
    ]
}

#[test]
fn every_runtime_and_driver() {
    for (what, line, expected) in cases() {
        assert_eq!(
            container_id_in_line(&line).as_deref(),
            expected,
            "{what}: {line}"
        );
    }
}

#[test]
fn first_line_with_an_id_wins_in_a_v1_file() {
    let file = format!("12:pids:/\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n");
    assert_eq!(container_id(&file).as_deref(), Some(ID));
    assert_eq!(container_id("0::/init.scope\n"), None);
}

fn fake_proc(root: &Path, pid: u32, start: u64, cgroup: &str) {
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let stat = format!(
        "{pid} (a (weird) name) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0"
    );
    std::fs::write(dir.join("stat"), stat).unwrap();
    std::fs::write(dir.join("cgroup"), cgroup).unwrap();
}

#[test]
fn reused_pid_does_not_inherit_the_old_container() {
    let root = tempfile::tempdir().unwrap();
    fake_proc(root.path(), 42, 1000, &format!("0::/docker/{ID}\n"));
    let mut cache = ContainerIdCache::new(root.path(), 4);
    assert_eq!(cache.lookup(42).as_deref(), Some(ID));
    assert_eq!(cache.lookup(42).as_deref(), Some(ID));
    assert_eq!((cache.stats().hits, cache.stats().misses), (1, 1));
    // The process exits and a host process gets the same pid.
    fake_proc(
        root.path(),
        42,
        2000,
        "0::/user.slice/user-1000.slice/session-1.scope\n",
    );
    assert_eq!(cache.lookup(42), None);
    assert_eq!(cache.stats().misses, 2);
    // Gone processes are unknown, not cached.
    assert_eq!(cache.lookup(7), None);
}

#[test]
fn cache_is_bounded() {
    let root = tempfile::tempdir().unwrap();
    for pid in 1..=10 {
        fake_proc(root.path(), pid, 1, &format!("0::/docker/{ID}\n"));
    }
    let mut cache = ContainerIdCache::new(root.path(), 3);
    for pid in 1..=10 {
        cache.lookup(pid);
    }
    assert_eq!(cache.stats().len, 3);
    assert_eq!(cache.stats().evictions, 7);
}

#[test]
fn this_process_on_the_host_has_no_container_or_its_own() {
    // Whatever this machine is, the lookup of a live pid must not fail or panic, and must
    // agree with parsing the file directly.
    let me = std::process::id();
    let mut cache = ContainerIdCache::new("/proc", 8);
    let direct = std::fs::read_to_string(format!("/proc/{me}/cgroup"))
        .ok()
        .and_then(|t| container_id(&t));
    assert_eq!(cache.lookup(me), direct);
}
