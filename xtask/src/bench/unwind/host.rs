//! The host side of `cargo xtask bench unwind`: the load (Debian's gzip and python3.11, their
//! pids recorded), the file systems tracepoints need, and the run's scratch directory.
use std::{
    fs::{self, File},
    io::{self, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use super::{DATA_MIB, GZIP, PROGRAMS, PYTHON, PYTHON_LOOP, WARMUP, stacks::Pids};
use crate::{
    bench::child::{self, Child},
    util::check,
};

/// The file systems the profilers look for tracepoints in: tracefs for ours (aya), and
/// debugfs, under which lightswitch reads `tracing/` (it refuses to start without it).
const MOUNTS: [(&str, &str); 2] = [
    ("tracefs", "/sys/kernel/tracing"),
    ("debugfs", "/sys/kernel/debug"),
];

/// [`MOUNTS`] for the whole run, those the host lacks mounted here and unmounted on drop, so
/// that every profiler sees the same host, one where tracepoints can be attached.
pub(super) struct Mounts {
    pub(super) mounted_here: Vec<(&'static str, &'static str)>,
}

impl Mounts {
    pub(super) fn mount() -> Result<Self> {
        let mounts = fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
        let mut guard = Self {
            mounted_here: Vec::new(),
        };
        for (kind, dir) in MOUNTS {
            let present = mounts.lines().any(|l| {
                let mut fields = l.split_whitespace();
                let (_, d, k) = (fields.next(), fields.next(), fields.next());
                d == Some(dir) && k == Some(kind)
            });
            if !present {
                eprintln!("bench: mounting {kind} on {dir} for this run (unmounted at the end)");
                check(Command::new("mount").args(["-t", kind, kind, dir]))?;
                guard.mounted_here.push((kind, dir));
            }
        }
        Ok(guard)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some((_, dir)) = self.mounted_here.pop() {
            // Recursive: debugfs's tracing/ is an automount of tracefs below it.
            match Command::new("umount").args(["-R", dir]).status() {
                Ok(s) if s.success() => eprintln!("bench: unmounted {dir}"),
                _ => eprintln!("bench: warning: could not unmount {dir}"),
            }
        }
    }
}

/// The run's directory: deleted at the end unless `--keep`.
pub(super) struct Scratch {
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    pub(super) fn new(keep: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("xtask-bench-unwind-")
            .tempdir()?;
        if !keep {
            let path = dir.path().to_owned();
            return Ok(Self {
                _dir: Some(dir),
                path,
            });
        }
        let path = dir.keep();
        eprintln!("bench: profiles and logs are kept in {}", path.display());
        Ok(Self { _dir: None, path })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

/// `DATA_MIB` of random bytes for gzip: incompressible, so gzip -9 works hard throughout.
pub(super) fn random_file(tmp: &Path) -> Result<PathBuf> {
    let path = tmp.join("random.bin");
    let mut out = File::create(&path)?;
    let mut random = File::open("/dev/urandom")?.take(DATA_MIB << 20);
    io::copy(&mut random, &mut out).context("writing the random file")?;
    Ok(path)
}

/// The two programs, `copies` of each, in their own process groups (killed on drop). Each
/// gzip loop appends the pid of every gzip it starts to a file of its own.
pub(super) struct Load {
    _children: Vec<Child>,
    pythons: Vec<u32>,
    gzip_pid_files: Vec<PathBuf>,
}

impl Load {
    /// Every process of the load so far, pid to program.
    pub(super) fn pids(&self) -> Result<Pids> {
        let mut pids: Pids = self
            .pythons
            .iter()
            .map(|&pid| (pid, PROGRAMS[1].to_owned()))
            .collect();
        for file in &self.gzip_pid_files {
            let text = fs::read_to_string(file)?;
            for pid in text.split_whitespace() {
                let pid = pid
                    .parse()
                    .with_context(|| format!("{pid:?} in {}", file.display()))?;
                pids.insert(pid, PROGRAMS[0].to_owned());
            }
        }
        Ok(pids)
    }
}

pub(super) fn start_load(copies: usize, data: &Path, tmp: &Path) -> Result<Load> {
    let mut load = Load {
        _children: Vec::new(),
        pythons: Vec::new(),
        gzip_pid_files: Vec::new(),
    };
    for i in 0..copies {
        let pid_file = tmp.join(format!("gzip-pids-{i}"));
        File::create(&pid_file)?;
        let mut gzip = Command::new("/bin/sh");
        gzip.args([
            "-c",
            &format!(
                "while :; do {GZIP} -9 -c \"$0\" > /dev/null & echo $! >> \"$1\"; \
                 wait $! || exit 1; done"
            ),
        ])
        .arg(data)
        .arg(&pid_file)
        .stdin(Stdio::null());
        load._children.push(Child::spawn("gzip loop", &mut gzip)?);
        load.gzip_pid_files.push(pid_file);
        let mut python = Command::new(PYTHON);
        python
            .args(["-c", PYTHON_LOOP])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let python = Child::spawn("python3.11 loop", &mut python)?;
        load.pythons.push(u32::try_from(python.pid())?);
        load._children.push(python);
    }
    child::sleep(WARMUP)?;
    Ok(load)
}
