//! Symbol sources a stripped binary can still have, built here with the GNU toolchain the way
//! distributions build them: MiniDebugInfo (`.gnu_debugdata`, Fedora's recipe) and a separate
//! debug file found through `.gnu_debuglink` in the binary's `.debug/` directory.

use std::{fs::File, path::Path, process::Command};

use profiler_agent::symbolize::{binary::Binary, debuginfo::RootedDebugFinder};

const SOURCE: &str = r#"
static volatile int sink;
__attribute__((noinline)) static void hidden_static(int n) { for (int i = 0; i < n; i++) sink += i; }
__attribute__((noinline)) void exported(int n) { hidden_static(n); }
int main(int argc, char **argv) { (void)argv; exported(argc); return 0; }
"#;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh(script: &str, dir: &Path) {
    run(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
}

/// Compiles the program with symbols and DWARF; returns the address of `hidden_static`.
fn build(dir: &Path) -> u64 {
    std::fs::write(dir.join("prog.c"), SOURCE).unwrap();
    run(Command::new("gcc")
        .args(["-O1", "-g", "-o", "prog", "prog.c"])
        .current_dir(dir));
    let out = Command::new("nm")
        .arg("prog")
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.ends_with(" hidden_static"))
        .and_then(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
        .expect("hidden_static in nm output")
}

fn nm_output(dir: &Path) -> String {
    let out = Command::new("nm")
        .arg("prog")
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn mini_debug_info_names_static_functions_of_a_stripped_binary() {
    let dir = tempfile::tempdir().unwrap();
    let addr = build(dir.path());
    sh(
        "nm -D prog --format=posix --defined-only | awk '{ print $1 }' | sort > dynsyms
         nm prog --format=posix --defined-only | awk '{ if ($2 == \"T\" || $2 == \"t\") print $1 }' | sort > funcsyms
         comm -13 dynsyms funcsyms > keep_symbols
         objcopy --only-keep-debug prog prog.debug
         objcopy -S --remove-section .gdb_index --remove-section .comment --keep-symbols=keep_symbols prog.debug mini_debuginfo
         strip --strip-all -R .comment prog
         xz mini_debuginfo
         objcopy --add-section .gnu_debugdata=mini_debuginfo.xz prog",
        dir.path(),
    );
    assert!(
        !nm_output(dir.path()).contains("hidden_static"),
        "strip left the symbol"
    );
    let binary = Binary::load(&File::open(dir.path().join("prog")).unwrap(), &mut ()).unwrap();
    let frames = binary.frames(addr + 1);
    assert_eq!(frames.last().map(|f| &*f.name), Some("hidden_static"));
}

#[test]
fn debuglink_finds_lines_in_the_dot_debug_directory() {
    let dir = tempfile::tempdir().unwrap();
    let addr = build(dir.path());
    sh(
        "objcopy --only-keep-debug prog prog.debug
         strip --strip-debug --strip-unneeded prog
         objcopy --add-gnu-debuglink=prog.debug prog
         mkdir .debug && mv prog.debug .debug/",
        dir.path(),
    );
    let path = dir.path().join("prog");
    let mut finder = RootedDebugFinder::new("/", &path);
    let binary = Binary::load(&File::open(&path).unwrap(), &mut finder).unwrap();
    assert!(binary.has_debug_file());
    let frames = binary.frames(addr + 1);
    let outer = frames.last().expect("frames");
    assert_eq!(&*outer.name, "hidden_static");
    assert!(
        outer
            .file
            .as_deref()
            .unwrap_or_default()
            .ends_with("prog.c"),
        "{frames:?}"
    );
    assert_eq!(outer.line, 3, "{frames:?}");

    // Without the finder the stripped binary has no lines.
    let bare = Binary::load(&File::open(&path).unwrap(), &mut ()).unwrap();
    assert!(bare.frames(addr + 1).iter().all(|f| f.line == 0));
}
