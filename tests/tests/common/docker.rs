//! Docker for the container tests: a daemon (the host's or one started here), images made
//! with `docker import` from a busybox rootfs, and guards that remove what a test made.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use super::{fixture, in_ci, run_ok};

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

pub fn docker_ok(args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok(Command::new("docker").args(args)).stdout)
        .trim()
        .to_owned()
}

/// A name suffix unique to this test run.
pub fn nonce() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    )
}

/// A Docker daemon for the test: the running one, or one started here (default socket, its
/// output in `log`) and stopped on drop.
pub struct DockerDaemon {
    child: Option<Child>,
    /// Started by this test (else it was running already).
    owned: bool,
    log: PathBuf,
}

impl DockerDaemon {
    /// None (with a note) when no daemon can be had outside CI; under CI a failure panics.
    pub fn get(log: &Path) -> Option<Self> {
        let running = docker(&["info"]).status.success();
        let mut daemon = Self {
            child: None,
            owned: !running,
            log: log.to_owned(),
        };
        if running || daemon.spawn() {
            return Some(daemon);
        }
        let why = format!(
            "cannot start dockerd; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        drop(daemon);
        if in_ci() {
            panic!("{why}");
        }
        eprintln!("SKIPPED container test: {why}");
        None
    }

    /// True when this test started dockerd itself.
    pub fn owned(&self) -> bool {
        self.owned
    }

    /// Starts dockerd (appending to the log) and waits until it answers; false if it died or
    /// never answered.
    fn spawn(&mut self) -> bool {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let Ok(child) = Command::new("dockerd")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
        else {
            return false;
        };
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if docker(&["info"]).status.success() {
                return true;
            }
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }

    fn systemd() -> bool {
        Path::new("/run/systemd/system").exists()
    }

    /// Stops the daemon, for [`Self::start`] to bring back: the one started here, or a
    /// systemd-managed one. False (nothing done) for a daemon run some other way.
    pub fn stop(&mut self) -> bool {
        if self.owned {
            if let Some(child) = &mut self.child {
                terminate(child);
            }
            self.child = None;
            return true;
        }
        if Self::systemd() {
            run_ok(Command::new("systemctl").args(["stop", "docker.socket", "docker.service"]));
            return true;
        }
        false
    }

    /// Starts the daemon stopped by [`Self::stop`] and waits until it answers.
    pub fn start(&mut self) {
        if self.owned {
            assert!(
                self.spawn(),
                "cannot restart dockerd; its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            return;
        }
        run_ok(Command::new("systemctl").args(["start", "docker.socket", "docker.service"]));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !docker(&["info"]).status.success() {
            assert!(Instant::now() < deadline, "docker did not come back");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// SIGTERM, then SIGKILL after 30 s.
fn terminate(child: &mut Child) {
    // SAFETY: plain kill(2) on a child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for DockerDaemon {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            terminate(child);
        }
    }
}

/// The test's container and image, removed on drop.
pub struct ContainerGuard {
    pub container: String,
    pub image: String,
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

/// tests/fixtures/spin.c built static (it runs as pid 1 of a busybox container), with
/// frame pointers and debug info so its frames can be named.
pub fn static_spin(dir: &Path) -> PathBuf {
    let spin = dir.join("spin");
    run_ok(
        Command::new("gcc")
            .args(["-static", "-O1", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&spin)
            .arg(fixture("spin.c")),
    );
    spin
}

/// A `docker import`-able tarball of a minimal rootfs: /bin/busybox (busybox-static), /bin/sh,
/// and `binary` at `inside` (an absolute path within the image). Written under `dir`.
pub fn busybox_rootfs_tarball(dir: &Path, binary: &Path, inside: &str) -> PathBuf {
    let rootfs = dir.join("rootfs");
    let target = rootfs.join(inside.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().expect("inside has a parent")).unwrap();
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(binary, &target).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("/bin/busybox (install busybox-static)");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let tarball = dir.join("rootfs.tar");
    tar_directory(&rootfs, &tarball);
    tarball
}

/// `tar -C dir -cf tarball .`: a rootfs as `docker import` takes it.
pub fn tar_directory(dir: &Path, tarball: &Path) {
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(dir)
            .arg("-cf")
            .arg(tarball)
            .arg("."),
    );
}

/// A Docker daemon with the static `spin` (tests/fixtures/spin.c) imported as a fresh image,
/// `/spin` inside. Declare the test's [`ContainerGuard`]s after it, so that they remove the
/// containers and the image before the daemon stops.
pub struct SpinImage {
    pub daemon: DockerDaemon,
    /// `<prefix>:<nonce>`.
    pub image: String,
    /// Unique to this run, for container names.
    pub nonce: String,
}

impl SpinImage {
    /// Builds and imports the image under `dir`; `None` when no Docker daemon can run here
    /// (which fails the test under CI, see [`DockerDaemon::get`]).
    pub fn import(dir: &Path, prefix: &str) -> Option<Self> {
        let spin = static_spin(dir);
        let tarball = busybox_rootfs_tarball(dir, &spin, "/spin");
        let daemon = DockerDaemon::get(&dir.join("dockerd.log"))?;
        let nonce = nonce();
        let image = format!("{prefix}:{nonce}");
        docker_ok(&["import", tarball.to_str().unwrap(), &image]);
        Some(Self {
            daemon,
            image,
            nonce,
        })
    }
}
