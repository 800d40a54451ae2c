//! The directory sink: each series to `<dir>/<service_name>/<unix-ts>.pb.gz` (the interval's
//! end), written to a temporary file in the same directory and renamed into place, so a
//! reader never sees half a profile. A second series of the same service in the same second
//! gets `<unix-ts>-<n>.pb.gz`. [`write_new_file`] is that atomic writer (files mode 0600,
//! whatever the umask), also used for kept trigger captures. Errors (unwritable directory, full disk) are reported as
//! permanent failures: counted and logged by the queue, never retried.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use super::{Delivered, ProfileSeries, ProfileSink, SendError, SendFuture, ingest::unix_seconds};

/// The `endpoint` label of the directory sink.
pub const DIRECTORY_ENDPOINT: &str = "directory";

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
    write_new_file(&service_dir, &ts.to_string(), ".pb.gz", &series.pprof_gzip)
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
        use std::os::unix::fs::PermissionsExt as _;
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
}
