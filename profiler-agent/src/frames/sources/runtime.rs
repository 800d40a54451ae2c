//! Which runtime generated a process's JIT code, told from what the process maps (HotSpot's
//! `libjvm.so`, Node's `node` executable or `libnode.so`, .NET's `libcoreclr.so`), and how
//! each runtime's perf-map names are shown. The mapping of its JIT code is named after the
//! runtime (`[jvm jit]`), and so is JIT code its map does not name.
//!
//! HotSpot's `long Hot.mix(long)` is shown as `Hot.mix` and its template interpreter as
//! `[java interpreter]`; V8's `JS:*mix /srv/hot.js:7:13` as `mix` in `/srv/hot.js` at line
//! 7. The name as the map wrote it stays the frame's system name.

use crate::{
    frames::Frame,
    process::{MappingKind, ProcessInfo},
    symbolize::Demangle,
};

/// Frames of HotSpot's template interpreter: one per interpreted activation.
pub const JAVA_INTERPRETER: &str = "[java interpreter]";

/// A runtime that writes JIT code into anonymous executable memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// HotSpot (`libjvm.so`).
    Jvm,
    /// Node.js (V8).
    Node,
    /// .NET (CoreCLR).
    Dotnet,
    /// Anything else: its anonymous code is JIT code only when it writes a perf map.
    Unknown,
}

impl Runtime {
    /// The runtime of `process`, from the files it maps executable (its executable among
    /// them).
    pub fn of(process: &ProcessInfo) -> Self {
        let mut runtime = Self::Unknown;
        for mapping in &process.mappings {
            if !matches!(mapping.kind, MappingKind::File { .. }) {
                continue;
            }
            let name = mapping.module_name();
            match name.strip_suffix(" (deleted)").unwrap_or(name) {
                "libjvm.so" => return Self::Jvm,
                "libcoreclr.so" => return Self::Dotnet,
                "node" | "nodejs" => runtime = Self::Node,
                name if name.starts_with("libnode.so") => runtime = Self::Node,
                _ => {}
            }
        }
        runtime
    }

    /// The name of the mapping its JIT code is shown in, which is also the name of JIT code
    /// no perf map names.
    pub fn jit_mapping(self) -> &'static str {
        match self {
            Self::Jvm => "[jvm jit]",
            Self::Node => "[node jit]",
            Self::Dotnet => "[dotnet jit]",
            Self::Unknown => "[jit]",
        }
    }

    /// The frame for a perf-map entry's `name`.
    pub fn frame(self, name: &str, demangle: Demangle) -> Frame {
        let cleaned = match self {
            Self::Jvm => java_name(name).map(|n| (n, None, 0)),
            Self::Node => v8_name(name),
            Self::Dotnet | Self::Unknown => None,
        };
        let (display, file, line) = cleaned.unwrap_or_else(|| (demangle.apply(name), None, 0));
        Frame {
            name: display.into(),
            system_name: name.into(),
            file: file.map(Into::into),
            line,
        }
    }
}

/// HotSpot's `Compiler.perfmap` names: `long Hot.mix(long)` as `Hot.mix`, the template
/// interpreter as [`JAVA_INTERPRETER`]; `None` for other names (stubs, perf-map-agent's).
fn java_name(name: &str) -> Option<String> {
    if name == "Interpreter" {
        return Some(JAVA_INTERPRETER.to_owned());
    }
    let (before, _) = name.strip_suffix(')')?.split_once('(')?;
    let (_return_type, method) = before.rsplit_once(' ')?;
    method.contains('.').then(|| method.to_owned())
}

/// V8's names for JavaScript code (`--perf-basic-prof`): `TYPE:TIER NAME SCRIPT:LINE:COLUMN`,
/// where the tier is `~` (interpreted), `^` (baseline), `+` (Maglev) or `*` (TurboFan). The
/// function's name (`(anonymous)` when it has none), its script and line; `None` for
/// builtins, stubs and handlers, which keep their names.
fn v8_name(name: &str) -> Option<(String, Option<String>, u32)> {
    let (kind, rest) = name.split_once(':')?;
    if !matches!(kind, "JS" | "Eval" | "Function" | "LazyCompile" | "Script") {
        return None;
    }
    let rest = rest.strip_prefix(['~', '^', '+', '*']).unwrap_or(rest);
    let (function, location) = match rest.rsplit_once(' ') {
        Some((function, location)) if script_line(location).is_some() => {
            (function, script_line(location))
        }
        _ => (rest, None),
    };
    let function = match function.trim() {
        "" => "(anonymous)",
        named => named,
    };
    let (file, line) = location.map_or((None, 0), |(file, line)| (Some(file.to_owned()), line));
    Some((function.to_owned(), file, line))
}

/// `SCRIPT:LINE:COLUMN` or `SCRIPT:LINE` as the script and its line.
fn script_line(location: &str) -> Option<(&str, u32)> {
    let (before, last) = location.rsplit_once(':')?;
    let last: u32 = last.parse().ok()?;
    match before.rsplit_once(':') {
        Some((script, line)) if !script.is_empty() => line.parse().ok().map(|line| (script, line)),
        _ => (!before.is_empty()).then_some((before, last)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{FileId, Mapping};

    fn process(exe: &str, files: &[&str]) -> ProcessInfo {
        ProcessInfo {
            exe: Some(exe.into()),
            mappings: files
                .iter()
                .enumerate()
                .map(|(i, path)| Mapping {
                    start: 0x1000 * (i as u64 + 1),
                    end: 0x1000 * (i as u64 + 2),
                    offset: 0,
                    path: (*path).into(),
                    kind: MappingKind::File {
                        id: FileId {
                            dev_major: 0,
                            dev_minor: 0,
                            inode: i as u64,
                        },
                        file: None,
                    },
                })
                .collect(),
            ..ProcessInfo::default()
        }
    }

    #[test]
    fn runtimes_are_told_by_what_they_map() {
        let jvm = process(
            "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
            &[
                "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
                "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so",
            ],
        );
        assert_eq!(Runtime::of(&jvm), Runtime::Jvm);
        assert_eq!(
            Runtime::of(&process("/usr/bin/node", &["/usr/bin/node"])),
            Runtime::Node
        );
        assert_eq!(
            Runtime::of(&process("/srv/app", &["/usr/lib/libnode.so.108"])),
            Runtime::Node
        );
        assert_eq!(
            Runtime::of(&process(
                "/usr/share/dotnet/dotnet",
                &["/usr/share/dotnet/shared/Microsoft.NETCore.App/8.0.0/libcoreclr.so"]
            )),
            Runtime::Dotnet
        );
        assert_eq!(
            Runtime::of(&process("/usr/bin/gzip", &["/usr/bin/gzip"])),
            Runtime::Unknown
        );
        assert_eq!(Runtime::Jvm.jit_mapping(), "[jvm jit]");
        assert_eq!(Runtime::Node.jit_mapping(), "[node jit]");
    }

    #[test]
    fn hotspot_names_lose_their_return_type_and_parameters() {
        let name = |n: &str| Runtime::Jvm.frame(n, Demangle::Full).name.to_string();
        assert_eq!(name("long Hot.mix(long)"), "Hot.mix");
        assert_eq!(
            name("java.lang.String com.x.Y$Z.run(int, java.lang.Object[])"),
            "com.x.Y$Z.run"
        );
        assert_eq!(name("Interpreter"), JAVA_INTERPRETER);
        assert_eq!(name("stub (x)"), "stub (x)");
        let frame = Runtime::Jvm.frame("long Hot.mix(long)", Demangle::Full);
        assert_eq!(&*frame.system_name, "long Hot.mix(long)");
    }

    #[test]
    fn v8_names_become_function_script_and_line() {
        let frame = |n: &str| {
            let f = Runtime::Node.frame(n, Demangle::Full);
            (f.name.to_string(), f.file.map(|f| f.to_string()), f.line)
        };
        let hot = Some("/srv/hot.js".to_owned());
        assert_eq!(
            frame("JS:*mix /srv/hot.js:7:13"),
            ("mix".into(), hot.clone(), 7)
        );
        assert_eq!(
            frame("JS:~compute /srv/hot.js:16:17"),
            ("compute".into(), hot.clone(), 16)
        );
        assert_eq!(frame("JS:^mix /srv/hot.js:7:13").0, "mix");
        assert_eq!(frame("JS:+mix /srv/hot.js:7:13").0, "mix");
        assert_eq!(
            frame("Eval:~ /srv/hot.js:1:1"),
            ("(anonymous)".into(), hot.clone(), 1)
        );
        assert_eq!(
            frame("LazyCompile:*fib /x.js:3"),
            ("fib".into(), Some("/x.js".into()), 3)
        );
        assert_eq!(
            frame("JS:~get size node:internal/url:120:5"),
            ("get size".into(), Some("node:internal/url".into()), 120)
        );
        assert_eq!(frame("JS:*noScript"), ("noScript".into(), None, 0));
        // Builtins, handlers and stubs keep their names.
        assert_eq!(
            frame("Builtin:ArrayPrototypePush"),
            ("Builtin:ArrayPrototypePush".into(), None, 0)
        );
        assert_eq!(
            frame("BytecodeHandler:LdaZero").0,
            "BytecodeHandler:LdaZero"
        );
        let f = Runtime::Node.frame("JS:*mix /srv/hot.js:7:13", Demangle::Full);
        assert_eq!(&*f.system_name, "JS:*mix /srv/hot.js:7:13");
    }

    #[test]
    fn other_runtimes_names_are_demangled() {
        let f = Runtime::Unknown.frame("_ZN3foo3barEv", Demangle::Full);
        assert_eq!(&*f.name, "foo::bar()");
        assert_eq!(
            &*Runtime::Dotnet
                .frame("[x] System.String::Concat()", Demangle::Full)
                .name,
            "[x] System.String::Concat()"
        );
    }
}
