//! Kernel text symbols from /proc/kallsyms, with module names. The file is streamed once per
//! batch of addresses and only the names those addresses need are kept: holding the whole
//! table (100k+ symbols) would cost more memory than the rest of the agent. When the kernel
//! hides addresses (kptr_restrict) every address reads as zero: then nothing resolves and
//! kernel frames stay `[unknown]` rather than getting wrong names.
//!
//! [`KernelNames`] keeps the names found across intervals while the module layout stays the
//! same, so a steady host streams the file only when it samples a kernel address it has not
//! seen before.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "kernel symbol addresses are hidden (kernel.kptr_restrict); kernel frames will be [unknown]"
    )]
    Hidden,
}

/// Resolves kernel addresses against a kallsyms file.
#[derive(Debug, Clone)]
pub struct KernelSymbols {
    path: PathBuf,
}

impl KernelSymbols {
    /// Checks that /proc/kallsyms is readable and shows addresses.
    pub fn load() -> Result<Self, KallsymsError> {
        Self::load_from(Path::new("/proc/kallsyms"))
    }

    pub fn load_from(path: &Path) -> Result<Self, KallsymsError> {
        let symbols = Self {
            path: path.to_owned(),
        };
        // One probe address: resolving it reads the file and detects hidden addresses.
        symbols.resolve(&[u64::MAX])?;
        Ok(symbols)
    }

    /// The symbol (`name` or `name [module]`) containing each address that has one.
    pub fn resolve(&self, addresses: &[u64]) -> Result<HashMap<u64, String>, KallsymsError> {
        let file = std::fs::File::open(&self.path).map_err(|source| self.read_error(source))?;
        resolve_lines(std::io::BufReader::new(file), addresses).map_err(|e| match e {
            ResolveError::Io(source) => self.read_error(source),
            ResolveError::Hidden => KallsymsError::Hidden,
        })
    }

    /// A hash of the loaded modules' names and load addresses (`modules` beside the kallsyms
    /// file), or 0 when it cannot be read: it changes when a module loads or unloads, which
    /// is when module text can move. Reference counts are left out: they change all the time
    /// and move nothing.
    pub fn modules_fingerprint(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let Ok(modules) = std::fs::read_to_string(self.path.with_file_name("modules")) else {
            return 0;
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for line in modules.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first(), fields.get(5)).hash(&mut hasher);
        }
        hasher.finish()
    }

    fn read_error(&self, source: std::io::Error) -> KallsymsError {
        KallsymsError::Read {
            path: self.path.display().to_string(),
            source,
        }
    }
}

/// Kernel address names (or their absence) found so far.
#[derive(Debug, Default)]
pub struct KernelNames {
    names: HashMap<u64, Option<String>>,
    modules: u64,
}

/// Past this many addresses the names are dropped at the next round rather than kept: a
/// bound on memory whatever the kernel runs.
const MAX_KERNEL_NAMES: usize = 65_536;

impl KernelNames {
    /// `None` if the address was never resolved; `Some(None)` if it has no symbol.
    pub fn get(&self, address: u64) -> Option<Option<&str>> {
        self.names.get(&address).map(Option::as_deref)
    }

    /// Resolves the addresses not resolved before, streaming the file once if there are any.
    pub fn resolve_missing(
        &mut self,
        symbols: &KernelSymbols,
        addresses: &[u64],
    ) -> Result<(), KallsymsError> {
        let mut missing: Vec<u64> = addresses
            .iter()
            .copied()
            .filter(|a| !self.names.contains_key(a))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        let mut found = symbols.resolve(&missing)?;
        for address in missing {
            self.names.insert(address, found.remove(&address));
        }
        Ok(())
    }

    /// End of an interval: everything is forgotten if a module loaded or unloaded (module
    /// text may have moved) or the table grew past its bound; names inside JIT-compiled BPF
    /// programs are always forgotten, as programs come and go at the same addresses.
    pub fn next_round(&mut self, symbols: &KernelSymbols) {
        let modules = symbols.modules_fingerprint();
        if modules != self.modules || self.names.len() > MAX_KERNEL_NAMES {
            self.names.clear();
            self.modules = modules;
        } else {
            self.names
                .retain(|_, name| name.as_deref().is_none_or(|n| !n.ends_with("[bpf]")));
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

enum ResolveError {
    Io(std::io::Error),
    Hidden,
}

/// For every address, the text symbol with the greatest start at or below it.
fn resolve_lines(
    mut reader: impl std::io::BufRead,
    addresses: &[u64],
) -> Result<HashMap<u64, String>, ResolveError> {
    let mut wanted = addresses.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    // best[i]: the best symbol whose start lies in (wanted[i-1], wanted[i]].
    let mut best: Vec<Option<(u64, String)>> = vec![None; wanted.len()];
    let mut any_address = false;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(ResolveError::Io)? == 0 {
            break;
        }
        let mut fields = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(start) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        any_address |= start != 0;
        if !matches!(kind, "t" | "T") {
            continue;
        }
        let i = wanted.partition_point(|&a| a < start);
        let Some(slot) = best.get_mut(i) else {
            continue;
        };
        if slot.as_ref().is_none_or(|(s, _)| start >= *s) {
            let module = fields.next();
            let entry = slot.get_or_insert_with(|| (start, String::new()));
            entry.0 = start;
            entry.1.clear();
            entry.1.push_str(name);
            if let Some(module) = module {
                entry.1.push(' ');
                entry.1.push_str(module);
            }
        }
    }
    if !any_address {
        return Err(ResolveError::Hidden);
    }
    for i in 1..best.len() {
        if best[i].is_none() {
            best[i] = best[i - 1].clone();
        }
    }
    Ok(wanted
        .into_iter()
        .zip(best)
        .filter_map(|(a, b)| Some((a, b?.1)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 t do_one_initcall
ffffffff81002000 D some_data
ffffffffc0000000 t ext4_read [ext4]
";

    fn resolve(text: &str, addresses: &[u64]) -> Result<HashMap<u64, String>, ResolveError> {
        resolve_lines(text.as_bytes(), addresses)
    }

    #[test]
    fn names_are_kept_across_rounds_until_modules_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kallsyms");
        std::fs::write(&path, SAMPLE).unwrap();
        std::fs::write(
            dir.path().join("modules"),
            "ext4 1 0 - Live 0xffffffffc0000000\n",
        )
        .unwrap();
        let symbols = KernelSymbols::load_from(&path).unwrap();
        let mut names = KernelNames::default();
        names.next_round(&symbols);
        let (core, module, nothing) = (0xffffffff81000010, 0xffffffffc0000004, 0x1000);
        names
            .resolve_missing(&symbols, &[core, module, nothing])
            .unwrap();
        assert_eq!(names.get(core), Some(Some("_stext")));
        assert_eq!(names.get(module), Some(Some("ext4_read [ext4]")));
        assert_eq!(names.get(nothing), Some(None));

        // Known addresses are not looked up again: a changed file is not even read.
        std::fs::write(&path, SAMPLE.replace("_stext", "renamed")).unwrap();
        names.resolve_missing(&symbols, &[core, nothing]).unwrap();
        // A refcount change moves nothing.
        std::fs::write(
            dir.path().join("modules"),
            "ext4 1 3 - Live 0xffffffffc0000000\n",
        )
        .unwrap();
        names.next_round(&symbols);
        assert_eq!(names.get(core), Some(Some("_stext")));
        assert_eq!(names.len(), 3);

        // A module loaded: everything is resolved afresh.
        std::fs::write(
            dir.path().join("modules"),
            "ext4 1 3 - Live 0xffffffffc0000000\nxfs 1 0 - Live 0xffffffffc0100000\n",
        )
        .unwrap();
        names.next_round(&symbols);
        assert!(names.is_empty());
        names.resolve_missing(&symbols, &[core]).unwrap();
        assert_eq!(names.get(core), Some(Some("renamed")));
    }

    #[test]
    fn bpf_program_names_are_forgotten_every_round() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kallsyms");
        std::fs::write(
            &path,
            format!("{SAMPLE}ffffffffa0000000 t bpf_prog_6deef7357e7b4530_x [bpf]\n"),
        )
        .unwrap();
        let symbols = KernelSymbols::load_from(&path).unwrap();
        let mut names = KernelNames::default();
        names
            .resolve_missing(&symbols, &[0xffffffffa0000010, 0xffffffff81000010])
            .unwrap();
        assert_eq!(names.len(), 2);
        names.next_round(&symbols);
        assert_eq!(names.get(0xffffffffa0000010), None);
        assert_eq!(names.get(0xffffffff81000010), Some(Some("_stext")));
    }

    #[test]
    fn text_symbols_with_modules() {
        let r = resolve(
            SAMPLE,
            &[
                0xffffffff81000010,
                0xffffffff81001fff,
                0xffffffff81002010,
                0xffffffffc0000004,
                0x1000,
                0xffffffff81000010,
            ],
        )
        .ok()
        .unwrap();
        assert_eq!(r[&0xffffffff81000010], "_stext");
        assert_eq!(r[&0xffffffff81001fff], "do_one_initcall");
        // Data symbols are not functions: the text symbol before them is kept.
        assert_eq!(r[&0xffffffff81002010], "do_one_initcall");
        assert_eq!(r[&0xffffffffc0000004], "ext4_read [ext4]");
        assert!(!r.contains_key(&0x1000));
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn exact_symbol_starts() {
        let r = resolve(SAMPLE, &[0xffffffff81001000, 0xffffffff81000000])
            .ok()
            .unwrap();
        assert_eq!(r[&0xffffffff81001000], "do_one_initcall");
        assert_eq!(r[&0xffffffff81000000], "_stext");
    }

    #[test]
    fn hidden_addresses_give_no_names() {
        let hidden: String = SAMPLE
            .lines()
            .map(|l| format!("0000000000000000{}\n", &l[16..]))
            .collect();
        assert!(matches!(
            resolve(&hidden, &[0xffffffff81000010]),
            Err(ResolveError::Hidden)
        ));
    }

    #[test]
    fn running_kernel_names_a_syscall_entry() {
        let Ok(k) = KernelSymbols::load() else {
            assert!(std::env::var_os("CI").is_none(), "CI must read kallsyms");
            return;
        };
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap();
        let entry = text
            .lines()
            .find(|l| l.ends_with(" do_syscall_64"))
            .and_then(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
            .unwrap();
        let r = k.resolve(&[entry + 4]).unwrap();
        assert_eq!(r[&(entry + 4)], "do_syscall_64");
    }
}
