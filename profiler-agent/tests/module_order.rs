//! The crate's modules import only modules listed before them in `src/lib.rs`'s `//!` (the
//! pipeline order), so there are no upward imports and no cycles; and every module is listed.
//! Imports are `crate::<module>` paths in code, test files and `mod tests` blocks excluded.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module names in backticks in lib.rs's inner doc, in order.
fn documented_order(lib: &str) -> Vec<String> {
    let mut order = Vec::new();
    for line in lib.lines().filter_map(|l| l.strip_prefix("//!")) {
        let mut parts = line.split('`');
        parts.next();
        while let (Some(name), Some(_)) = (parts.next(), parts.next()) {
            if name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                && !order.iter().any(|o| o == name)
            {
                order.push(name.to_owned());
            }
        }
    }
    order
}

fn declared(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';').to_owned())
        .collect()
}

/// The files of module `name`, tests excluded.
fn files_of(name: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let single = src().join(format!("{name}.rs"));
    if single.exists() {
        files.push(single);
    }
    let mut dirs = vec![src().join(name)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if file != "tests" {
                    dirs.push(path);
                }
            } else if file.ends_with(".rs") && !file.ends_with("tests.rs") {
                files.push(path);
            }
        }
    }
    files
}

/// Modules of the crate a file's code refers to as `crate::<module>`.
fn imports(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    // Code before an inline test module; comment lines dropped.
    let code = code.split("#[cfg(test)]\nmod tests {").next().unwrap_or("");
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::{..}, c}`: the first segment of each top-level item.
            let mut depth = 0;
            let mut item_start = true;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        if item_start && !word.is_empty() {
                            found.insert(std::mem::take(&mut word));
                        }
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if c.is_ascii_lowercase()
                        || c == '_'
                        || (c.is_ascii_alphanumeric() && !word.is_empty()) =>
                    {
                        if item_start {
                            word.push(c);
                        }
                    }
                    _ => {
                        if item_start && !word.is_empty() {
                            found.insert(std::mem::take(&mut word));
                            item_start = false;
                        }
                        word.clear();
                    }
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found.retain(|m| modules.contains(m));
    found
}

#[test]
fn modules_import_only_modules_before_them() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let order = documented_order(&lib);
    let modules = declared(&lib);
    let unlisted: Vec<&String> = modules.iter().filter(|m| !order.contains(m)).collect();
    assert!(
        unlisted.is_empty(),
        "modules missing from lib.rs's order: {unlisted:?}"
    );
    let mut upward = Vec::new();
    for (position, module) in order
        .iter()
        .enumerate()
        .filter(|(_, m)| modules.contains(*m))
    {
        for file in files_of(module) {
            let code = std::fs::read_to_string(&file).unwrap();
            for imported in imports(&code, &modules) {
                let at = order.iter().position(|m| *m == imported).unwrap();
                if at > position {
                    upward.push(format!(
                        "{} imports `{imported}`, listed after `{module}`",
                        file.strip_prefix(src()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn the_import_reader_sees_paths_and_groups() {
    let modules: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
    let code = "use crate::{a::{X, b::Y}, c};\n// crate::d in a comment\nfn f() { crate::b::g() }";
    assert_eq!(
        imports(code, &modules),
        ["a", "b", "c"].map(String::from).into()
    );
    let tests = "use crate::a;\n#[cfg(test)]\nmod tests {\n use crate::d;\n}";
    assert_eq!(imports(tests, &modules), ["a"].map(String::from).into());
}
