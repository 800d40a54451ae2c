//! Both resolvers against real hostile file trees: FIFOs, devices, sparse files, symlinks out
//! of the root, `..` and loops.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt as _, fs::symlink},
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use super::*;

/// The resolvers this kernel can run: both on 5.6+.
fn resolvers() -> Vec<Resolver> {
    match Resolver::detect() {
        Resolver::Openat2 => vec![Resolver::Openat2, Resolver::Walk],
        Resolver::Walk => vec![Resolver::Walk],
    }
}

fn root_at(dir: &Path, resolver: Resolver) -> ProcRoot {
    ProcRoot::new(dir).unwrap().with_resolver(resolver)
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn read(root: &ProcRoot, path: &str) -> Result<String, ProcFileError> {
    let opened = root.open(Path::new(path), 1 << 20)?;
    Ok(String::from_utf8(opened.read_capped(1 << 20)?).unwrap())
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

/// Runs `f` on a thread and fails the test if it does not return within five seconds.
fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()));
    rx.recv_timeout(Duration::from_secs(5))
        .expect("blocked for 5 s")
}

fn refused(reason: &str) -> u64 {
    refusals().iter().find(|(r, _)| *r == reason).unwrap().1
}

#[test]
fn symlinks_inside_the_root_still_work() {
    for resolver in resolvers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(&root.join("usr/lib/debug/real/app.debug"), "debug");
        std::fs::create_dir_all(root.join("usr/lib/debug/.build-id/ab")).unwrap();
        // Relative, as .build-id links are.
        symlink(
            "../../real/app.debug",
            root.join("usr/lib/debug/.build-id/ab/cdef.debug"),
        )
        .unwrap();
        // Absolute: means the same file inside the process's root.
        symlink("/usr/lib/debug/real/app.debug", root.join("abs")).unwrap();
        // A symlinked directory along the way.
        symlink("usr/lib", root.join("lib")).unwrap();
        let r = root_at(root, resolver);
        for path in [
            "/usr/lib/debug/.build-id/ab/cdef.debug",
            "usr/lib/debug/.build-id/ab/cdef.debug",
            "/abs",
            "/lib/debug/real/app.debug",
            "/lib/./debug/../debug/.build-id/ab/cdef.debug",
        ] {
            assert_eq!(read(&r, path).unwrap(), "debug", "{resolver:?} {path}");
        }
    }
}

#[test]
fn absolute_symlink_to_a_host_file_stays_inside_the_root() {
    for resolver in resolvers() {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host/secret");
        write(&host, "HOST");
        let root = tmp.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        symlink(&host, root.join("link")).unwrap();
        let r = root_at(&root, resolver);
        // Nothing at that path inside the root: not found, and the host file is not read.
        let err = read(&r, "/link").unwrap_err();
        assert_eq!(err.reason(), "open_failed", "{resolver:?} {err}");
        // The same path inside the root is what the link names.
        write(&root.join(host.strip_prefix("/").unwrap()), "ROOT");
        assert_eq!(read(&r, "/link").unwrap(), "ROOT", "{resolver:?}");
    }
}

#[test]
fn dot_dot_cannot_leave_the_root() {
    for resolver in resolvers() {
        let tmp = tempfile::tempdir().unwrap();
        write(&tmp.path().join("secret"), "HOST");
        let root = tmp.path().join("root");
        write(&root.join("secret"), "INSIDE");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        symlink("../../../../../secret", root.join("a/b/up")).unwrap();
        let r = root_at(&root, resolver);
        for path in [
            "../secret",
            "/../../secret",
            "a/b/../../../../secret",
            "a/b/up",
        ] {
            assert_eq!(read(&r, path).unwrap(), "INSIDE", "{resolver:?} {path}");
        }
    }
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    for resolver in resolvers() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("usr/bin")).unwrap();
        mkfifo(&tmp.path().join("usr/bin/app.debug"));
        let before = refused("not_regular");
        let dir = tmp.path().to_owned();
        let err = within_5s(move || {
            root_at(&dir, resolver)
                .open(Path::new("/usr/bin/app.debug"), 1 << 20)
                .unwrap_err()
        });
        assert!(
            matches!(err, ProcFileError::NotRegular { kind: "fifo", .. }),
            "{resolver:?} {err}"
        );
        assert!(refused("not_regular") > before);
    }
}

#[test]
fn a_symlink_to_dev_zero_is_refused_as_not_regular() {
    for resolver in resolvers() {
        // A process whose root is the host's: /dev/zero inside its root is the real one.
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("perf-1.map");
        symlink("/dev/zero", &link).unwrap();
        let r = root_at(Path::new("/"), resolver);
        let err = within_5s(move || r.open(&link, 64 << 20).unwrap_err());
        assert!(
            matches!(
                err,
                ProcFileError::NotRegular {
                    kind: "character device",
                    ..
                }
            ),
            "{resolver:?} {err}"
        );
        assert_eq!(err.reason(), "not_regular");
    }
}

#[test]
fn a_sparse_64_gib_file_is_refused_by_size_at_once() {
    for resolver in resolvers() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("perf-1.map");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(64 << 30)
            .unwrap();
        let before = refused("too_large");
        let started = Instant::now();
        let err = root_at(tmp.path(), resolver)
            .open(Path::new("perf-1.map"), 64 << 20)
            .unwrap_err();
        assert!(
            matches!(err, ProcFileError::TooLarge { size, cap, .. } if size == 64 << 30 && cap == 64 << 20),
            "{resolver:?} {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(refused("too_large") > before);
    }
}

#[test]
fn read_capped_stops_at_the_cap_of_an_endless_or_sparse_input() {
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let err = read_capped(&zero, 1 << 20, Path::new("/dev/zero")).unwrap_err();
    assert!(
        matches!(err, ProcFileError::Grew { cap, .. } if cap == 1 << 20),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sparse");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(64 << 30).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let started = Instant::now();
    let err = read_capped(&file, 4 << 20, &path).unwrap_err();
    assert_eq!(err.reason(), "too_large");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn read_capped_takes_exactly_the_cap() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("f"), "0123456789");
    let r = ProcRoot::new(tmp.path()).unwrap();
    let opened = r.open(Path::new("f"), 10).unwrap();
    assert_eq!(opened.size, 10);
    assert_eq!(opened.read_capped(10).unwrap(), b"0123456789");
    assert_eq!(opened.read_capped(9).unwrap_err().reason(), "too_large");
    assert_eq!(r.open(Path::new("f"), 9).unwrap_err().reason(), "too_large");
    // The reader alone, without the size from fstat.
    let file = std::fs::File::open(tmp.path().join("f")).unwrap();
    assert_eq!(
        read_capped(&file, 9, Path::new("f")).unwrap_err().reason(),
        "too_large"
    );
    let file = std::fs::File::open(tmp.path().join("f")).unwrap();
    assert_eq!(
        read_capped(&file, 10, Path::new("f")).unwrap(),
        b"0123456789"
    );
}

#[test]
fn symlink_loops_and_directories_are_refused() {
    for resolver in resolvers() {
        let tmp = tempfile::tempdir().unwrap();
        symlink("b", tmp.path().join("a")).unwrap();
        symlink("/a", tmp.path().join("b")).unwrap();
        std::fs::create_dir(tmp.path().join("dir")).unwrap();
        let r = root_at(tmp.path(), resolver);
        assert_eq!(read(&r, "a").unwrap_err().reason(), "loop", "{resolver:?}");
        for dir in ["/", "dir", "dir/..", "."] {
            assert_eq!(
                read(&r, dir).unwrap_err().reason(),
                "not_regular",
                "{resolver:?} {dir}"
            );
        }
    }
}

#[test]
fn openat2_does_not_follow_magic_links() {
    if Resolver::detect() != Resolver::Openat2 {
        return;
    }
    let r = ProcRoot::new("/").unwrap();
    let err = r
        .open(Path::new("/proc/self/root/etc/hostname"), 1 << 20)
        .unwrap_err();
    assert_eq!(err.reason(), "loop", "{err}");
}

#[test]
fn map_files_links_open_through_the_magic_link_helper() {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let exe = std::env::current_exe().unwrap();
    let line = maps
        .lines()
        .find(|l| l.ends_with(exe.to_str().unwrap()))
        .expect("our executable is mapped");
    let range = line.split_whitespace().next().unwrap();
    let opened = open_magic_link(
        Path::new(&format!("/proc/self/map_files/{range}")),
        MAX_OBJECT_FILE_SIZE,
    )
    .unwrap();
    assert_eq!(opened.size, std::fs::metadata(&exe).unwrap().len());

    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let err = within_5s(move || open_magic_link(&fifo, 1 << 20).unwrap_err());
    assert_eq!(err.reason(), "not_regular");
    let err = open_magic_link(&exe, 1).unwrap_err();
    assert_eq!(err.reason(), "too_large");
}

/// Found by the `procfile` fuzz target: the walker opened `file/` and `file/../x`, which the
/// kernel (and so openat2) refuses with ENOTDIR.
#[test]
fn a_file_is_not_a_directory_for_either_resolver() {
    for resolver in resolvers() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(&dir.join("file"), "f");
        write(&dir.join("dir/x"), "x");
        symlink("file", dir.join("lf")).unwrap();
        symlink("dir", dir.join("ld")).unwrap();
        symlink("file/", dir.join("slash")).unwrap();
        let root = root_at(dir, resolver);
        for path in [
            "file/",
            "file/.",
            "file/../dir/x",
            "lf/",
            "lf/../dir/x",
            "slash",
            "dir/x/",
        ] {
            match read(&root, path) {
                Err(ProcFileError::Open { source, .. }) => {
                    assert_eq!(
                        source.raw_os_error(),
                        Some(libc::ENOTDIR),
                        "{resolver:?} {path}"
                    )
                }
                other => panic!("{resolver:?} {path}: {other:?}"),
            }
        }
        assert_eq!(read(&root, "ld/../file").unwrap(), "f", "{resolver:?}");
        assert_eq!(read(&root, "ld/x").unwrap(), "x", "{resolver:?}");
        assert_eq!(read(&root, "/dir/./x").unwrap(), "x", "{resolver:?}");
    }
}
