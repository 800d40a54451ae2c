//! Kept trigger captures: `capture.directory` holds the last `capture.keep` of them as
//! `<unix-ms>-<service>-<pid>-<trigger>.pb.gz`, written through the directory sink's atomic
//! writer ([`write_new_file`]: temporary file, rename, mode 0600). The service name comes
//! from the captured process (its executable, container or pod), so it is reduced to
//! `[A-Za-z0-9_-]` and cut to [`MAX_SERVICE_BYTES`]: the whole name stays far below the
//! 255-byte limit of file names.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    labels::{Labels, SERVICE_NAME},
    write::directory::write_new_file,
};

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
    let written =
        std::fs::create_dir_all(dir).and_then(|()| write_new_file(dir, &stem, ".pb.gz", bytes));
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
            name.starts_with(|c: char| c.is_ascii_digit()) && name.ends_with(".pb.gz")
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

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt as _, time::Duration};

    use super::*;

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
        let dir = tempfile::tempdir().unwrap();
        let long = "s".repeat(300);
        keep_capture(dir.path(), 10, &service(&long), 1, "memory", b"long");
        keep_capture(dir.path(), 10, &service("../../etc/x"), 2, "cpu", b"dots");
        keep_capture(dir.path(), 10, &service(".."), 3, "cpu", b"dotdot");
        keep_capture(
            dir.path(),
            10,
            &service(&"é/".repeat(200)),
            4,
            "cpu",
            b"wide",
        );
        let names = names(dir.path());
        assert_eq!(names.len(), 4, "{names:?}");
        for name in &names {
            assert!(name.len() <= 15 + MAX_SERVICE_BYTES + 30, "{name}");
            assert!(!name.contains('/') && !name.contains(".."), "{name}");
        }
        let long_one = names
            .iter()
            .find(|n| n.ends_with("-1-memory.pb.gz"))
            .unwrap();
        assert!(long_one.contains(&"s".repeat(MAX_SERVICE_BYTES)));
        assert!(!long_one.contains(&"s".repeat(MAX_SERVICE_BYTES + 1)));
        assert!(
            names
                .iter()
                .any(|n| n.ends_with("-______etc_x-2-cpu.pb.gz"))
        );
        assert!(names.iter().any(|n| n.ends_with("-__-3-cpu.pb.gz")));
        // Nothing was written outside the directory.
        assert_eq!(
            std::fs::read_dir(dir.path().parent().unwrap())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name() == "x" || e.file_name() == "etc")
                .count(),
            0
        );
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
