//! The one file sink. [`DirectorySink`] writes each series to
//! `<dir>/<service_name>/<unix-ts>.pb.gz` (the interval's end); a second series of the same
//! service in the same second gets `<unix-ts>-<n>.pb.gz`. Its errors (unwritable directory,
//! full disk) are reported as permanent failures: counted and logged by the queue, never
//! retried. [`keep_capture`] keeps trigger captures: `capture.directory` holds the last
//! `capture.keep` of them as `<unix-ms>-<service>-<pid>-<trigger>.pb.gz`; their failures are
//! logged, and the capture still goes to the endpoints.
//!
//! Both write through [`write_new_file`]: a temporary file in the same directory (mode 0600,
//! whatever the umask), renamed into place without replacing anything, so a reader never
//! sees half a profile. Service names come from the profiled process (its executable,
//! container or pod), so they are made safe before they name anything: [`path_component`]
//! for a series' directory, [`service_part`] (`[A-Za-z0-9_-]`, at most [`MAX_SERVICE_BYTES`])
//! for a kept capture's name, which stays far below the 255-byte limit of file names.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use super::{Delivered, ProfileSeries, ProfileSink, SendError, SendFuture, ingest::unix_seconds};
use crate::labels::{Labels, SERVICE_NAME};

/// The `endpoint` label of the directory sink.
pub const DIRECTORY_ENDPOINT: &str = "directory";

/// The suffix of every profile file: a gzipped pprof.
const PROFILE_SUFFIX: &str = ".pb.gz";

pub struct DirectorySink {
    dir: PathBuf,
}

impl DirectorySink {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
}

/// A service name as one safe path component: no separators, no `.`/`..`, no control
/// characters, not empty, at most 200 bytes.
pub fn path_component(name: &str) -> String {
    path_component_at_most(name, 200)
}

/// [`path_component`] cut to at most `max_bytes` bytes (at a character boundary).
pub fn path_component_at_most(name: &str, max_bytes: usize) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if s.len() > max_bytes {
        let mut end = max_bytes;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    if s.is_empty() || s.chars().all(|c| c == '.') {
        s = s.replace('.', "_");
        if s.is_empty() {
            s.push('_');
        }
    }
    s
}

/// Writes one series; returns the file written.
pub fn write_series(dir: &Path, series: &ProfileSeries) -> std::io::Result<PathBuf> {
    let service_dir = dir.join(path_component(series.service_name()));
    std::fs::create_dir_all(&service_dir)?;
    let ts = unix_seconds(series.end);
    write_new_file(
        &service_dir,
        &ts.to_string(),
        PROFILE_SUFFIX,
        &series.pprof_gzip,
    )
}

/// Writes `bytes` to `<dir>/<stem><suffix>`, or `<stem>-<n><suffix>` when that exists:
/// first to a temporary `.tmp-*` file in `dir` (created mode 0600), synced, then renamed
/// into place without replacing anything, so a reader never sees half a file. `stem` must
/// be one path component, short enough for the file system (the callers cap it).
pub fn write_new_file(
    dir: &Path,
    stem: &str,
    suffix: &str,
    bytes: &[u8],
) -> std::io::Result<PathBuf> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .suffix(suffix)
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_data()?;
    let mut n = 0u32;
    loop {
        let name = if n == 0 {
            format!("{stem}{suffix}")
        } else {
            format!("{stem}-{n}{suffix}")
        };
        let path = dir.join(name);
        match tmp.persist_noclobber(&path) {
            Ok(_) => return Ok(path),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => {
                tmp = e.file;
                n += 1;
            }
            Err(e) => return Err(e.error),
        }
    }
}

/// The longest service part of a kept capture's name, in bytes.
pub const MAX_SERVICE_BYTES: usize = 100;

/// The service part of a file name: `[A-Za-z0-9_-]`, every other character `_`, at most
/// [`MAX_SERVICE_BYTES`] bytes, `unknown` when there is none.
pub fn service_part(labels: &Labels) -> String {
    labels
        .get(SERVICE_NAME)
        .map_or("unknown", String::as_str)
        .chars()
        .take(MAX_SERVICE_BYTES)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `<dir>/<unix-ms>-<service>-<pid>-<cause>.pb.gz` and removes the oldest captures
/// beyond `keep`. Failures are logged: the capture still goes to the endpoints.
pub fn keep_capture(dir: &Path, keep: usize, labels: &Labels, pid: u32, cause: &str, bytes: &[u8]) {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let stem = format!("{ms:015}-{}-{pid}-{cause}", service_part(labels));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| write_new_file(dir, &stem, PROFILE_SUFFIX, bytes));
    if let Err(error) = written {
        tracing::warn!(directory = %dir.display(), %error, "cannot keep the capture");
        return;
    }
    prune(dir, keep);
}

/// Removes the oldest kept captures beyond `keep`. Only names that start with a digit
/// count: a `.tmp-*` file being written by another capture is never taken for an old one.
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut kept: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(|c: char| c.is_ascii_digit()) && name.ends_with(PROFILE_SUFFIX)
        })
        .map(|e| e.path())
        .collect();
    // Names start with a zero-padded time: name order is age order.
    kept.sort();
    let excess = kept.len().saturating_sub(keep);
    for old in &kept[..excess] {
        let _ = std::fs::remove_file(old);
    }
}

impl ProfileSink for DirectorySink {
    fn name(&self) -> &str {
        DIRECTORY_ENDPOINT
    }

    fn per_series(&self) -> bool {
        true
    }

    fn send<'a>(&'a self, batch: &'a [ProfileSeries]) -> SendFuture<'a> {
        let dir = self.dir.clone();
        let batch = batch.to_vec();
        Box::pin(async move {
            let result = tokio::task::spawn_blocking(move || {
                for series in &batch {
                    write_series(&dir, series).map_err(|e| {
                        format!(
                            "{}: {e}",
                            dir.join(path_component(series.service_name())).display()
                        )
                    })?;
                }
                Ok::<_, String>(())
            })
            .await;
            match result {
                Ok(Ok(())) => Ok(Delivered { status: None }),
                Ok(Err(cause)) => Err(SendError::Permanent {
                    status: None,
                    cause,
                }),
                Err(e) => Err(SendError::Permanent {
                    status: None,
                    cause: format!("writer task failed: {e}"),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt as _, time::Duration};

    use super::*;

    #[test]
    fn service_names_become_safe_components() {
        assert_eq!(path_component("ebpf/default/web"), "ebpf_default_web");
        assert_eq!(path_component(".."), "__");
        assert_eq!(path_component("."), "_");
        assert_eq!(path_component(""), "_");
        assert_eq!(path_component("a\nb"), "a_b");
        assert_eq!(path_component("..x"), "..x");
        assert_eq!(path_component(&"é".repeat(300)).len(), 200);
        assert_eq!(path_component_at_most(&"é".repeat(300), 9).len(), 8);
    }

    #[test]
    fn new_files_are_private_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: umask only swaps the process's file mode mask.
        let old = unsafe { libc::umask(0o000) };
        let first = write_new_file(dir.path(), "a", ".pb.gz", b"1");
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let first = first.unwrap();
        let second = write_new_file(dir.path(), "a", ".pb.gz", b"2").unwrap();
        assert_eq!(first, dir.path().join("a.pb.gz"));
        assert_eq!(second, dir.path().join("a-1.pb.gz"));
        assert_eq!(std::fs::read(&first).unwrap(), b"1");
        let mode = std::fs::metadata(&first).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn service(name: &str) -> Labels {
        Labels::from([(SERVICE_NAME.to_owned(), name.to_owned())])
    }

    #[test]
    fn kept_captures_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let captures = dir.path().join("captures");
        for i in 0..4 {
            keep_capture(&captures, 2, &service("a/b"), 7, "cpu", &[i]);
            std::thread::sleep(Duration::from_millis(3));
        }
        let names = names(&captures);
        assert_eq!(names.len(), 2);
        assert!(
            names.iter().all(|n| n.ends_with("-a_b-7-cpu.pb.gz")),
            "{names:?}"
        );
        let newest = std::fs::read(captures.join(&names[1])).unwrap();
        assert_eq!(newest, [3]);
        let mode = std::fs::metadata(captures.join(&names[1]))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn hostile_service_names_stay_one_short_file_name() {
        // Two levels below a root of its own, so `../..` stays where the test can see it.
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a").join("b");
        std::fs::create_dir_all(&dir).unwrap();
        let long = "s".repeat(300);
        keep_capture(&dir, 10, &service(&long), 1, "memory", b"long");
        keep_capture(&dir, 10, &service("../../etc/x"), 2, "cpu", b"dots");
        keep_capture(&dir, 10, &service(".."), 3, "cpu", b"dotdot");
        keep_capture(&dir, 10, &service(&"é/".repeat(200)), 4, "cpu", b"wide");
        let kept = names(&dir);
        assert_eq!(kept.len(), 4, "{kept:?}");
        for name in &kept {
            assert!(name.len() <= 15 + MAX_SERVICE_BYTES + 30, "{name}");
            assert!(!name.contains('/') && !name.contains(".."), "{name}");
        }
        let long_one = kept
            .iter()
            .find(|n| n.ends_with("-1-memory.pb.gz"))
            .unwrap();
        assert!(long_one.contains(&"s".repeat(MAX_SERVICE_BYTES)));
        assert!(!long_one.contains(&"s".repeat(MAX_SERVICE_BYTES + 1)));
        assert!(kept.iter().any(|n| n.ends_with("-______etc_x-2-cpu.pb.gz")));
        assert!(kept.iter().any(|n| n.ends_with("-__-3-cpu.pb.gz")));
        // Nothing was written outside the directory.
        assert_eq!(names(root.path()), ["a"]);
        assert_eq!(names(&root.path().join("a")), ["b"]);
    }

    #[test]
    fn a_capture_being_written_is_not_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(".tmp-abc.pb.gz");
        std::fs::write(&tmp, b"in flight").unwrap();
        keep_capture(dir.path(), 1, &service("a"), 1, "cpu", b"1");
        assert!(tmp.exists());
        assert_eq!(names(dir.path()).len(), 2);
    }
}
