//! Kernel text symbols from /proc/kallsyms, with module names. When the kernel hides
//! addresses (kptr_restrict) every address reads as zero: then nothing resolves and kernel
//! frames stay `[unknown]` rather than getting wrong names.
//!
//! [`KernelNames`] reads the file once into a compact table (5 MiB for 120k functions) and
//! keeps it while the module layout stays the same and no BPF program is sampled: reading
//! the file costs the kernel 150-230 ms of formatting, and a busy host keeps being sampled in
//! functions it has not seen before, so a read per new function was a read per interval.
//! [`KernelSymbols::load`] reads only up to the first non-zero address to tell whether they are
//! hidden. A one-shot user (`record`, which names one window's frames once) asks for
//! [`KernelSymbols::one_shot`]: the file is then read once per batch of addresses, keeping
//! only the names of those addresses, and the 5 MiB table is never built.

use std::{
    collections::BTreeMap,
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
    one_shot: bool,
}

impl KernelSymbols {
    /// Checks that /proc/kallsyms is readable and shows addresses.
    pub fn load() -> Result<Self, KallsymsError> {
        Self::load_from(Path::new("/proc/kallsyms"))
    }

    pub fn load_from(path: &Path) -> Result<Self, KallsymsError> {
        let symbols = Self {
            path: path.to_owned(),
            one_shot: false,
        };
        // Addresses are all shown or all zero (kernel.kptr_restrict), so reading up to the
        // first non-zero one tells; the table itself is read at the first kernel frame, and
        // the kernel formats the whole file once at start-up instead of twice.
        let file = std::fs::File::open(path).map_err(|source| symbols.read_error(source))?;
        if !addresses_shown(std::io::BufReader::new(file))
            .map_err(|source| symbols.read_error(source))?
        {
            return Err(KallsymsError::Hidden);
        }
        Ok(symbols)
    }

    /// Names are wanted once, for one batch of addresses: see the module docs.
    pub fn one_shot(mut self) -> Self {
        self.one_shot = true;
        self
    }

    fn read_table(&self) -> Result<KernelTable, KallsymsError> {
        let file = std::fs::File::open(&self.path).map_err(|source| self.read_error(source))?;
        KernelTable::read(std::io::BufReader::new(file)).map_err(|e| self.resolve_error(e))
    }

    /// The names of `addresses` (sorted, deduplicated), in one pass over the file.
    fn read_names(&self, addresses: &[u64]) -> Result<Vec<Option<String>>, KallsymsError> {
        let file = std::fs::File::open(&self.path).map_err(|source| self.read_error(source))?;
        names_of(std::io::BufReader::new(file), addresses).map_err(|e| self.resolve_error(e))
    }

    fn resolve_error(&self, error: ResolveError) -> KallsymsError {
        match error {
            ResolveError::Io(source) => self.read_error(source),
            ResolveError::Hidden => KallsymsError::Hidden,
        }
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

/// Every kernel text symbol, sorted by address, names packed in one string: about 16 bytes a
/// symbol plus its name (5 MiB for a distribution kernel's 120k functions).
#[derive(Debug, Default)]
struct KernelTable {
    /// (start, name start, name end in `names`), sorted by start.
    symbols: Vec<(u64, u32, u32)>,
    names: String,
}

/// Whether any line of a kallsyms file has a non-zero address; stops at the first.
fn addresses_shown(reader: impl std::io::BufRead) -> std::io::Result<bool> {
    for line in reader.lines() {
        let line = line?;
        let address = line.split_whitespace().next().unwrap_or_default();
        if u64::from_str_radix(address, 16).is_ok_and(|a| a != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Calls `each(start, name, module)` for every text symbol of a kallsyms file; errs with
/// [`ResolveError::Hidden`] when every address is zero.
fn text_symbols(
    mut reader: impl std::io::BufRead,
    mut each: impl FnMut(u64, &str, Option<&str>),
) -> Result<(), ResolveError> {
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
        if matches!(kind, "t" | "T") {
            each(start, name, fields.next());
        }
    }
    if any_address {
        Ok(())
    } else {
        Err(ResolveError::Hidden)
    }
}

/// The name of each of `addresses` (sorted, deduplicated): the text symbol with the greatest
/// start at or below it (the last in the file among equal starts, as [`KernelTable::lookup`]
/// answers), found in one pass that keeps nothing else.
///
/// The best symbol so far grows along the sorted addresses, so it is kept as runs: a map from
/// the index of each run's first address to its symbol. A symbol takes over the run of
/// addresses from the first at or above its start up to the first one whose best is higher;
/// each run boundary is inserted and removed at most once per symbol that makes it, so the
/// pass is O((symbols + addresses) log addresses), with one name per run.
fn names_of(
    reader: impl std::io::BufRead,
    addresses: &[u64],
) -> Result<Vec<Option<String>>, ResolveError> {
    let count = addresses.len();
    let mut runs: BTreeMap<usize, Option<(u64, String)>> = BTreeMap::from([(0, None)]);
    text_symbols(reader, |start, name, module| {
        let first = addresses.partition_point(|&a| a < start);
        if first == count {
            return;
        }
        let higher = |run: &Option<(u64, String)>| run.as_ref().is_some_and(|(s, _)| *s > start);
        if runs
            .range(..=first)
            .next_back()
            .is_some_and(|(_, run)| higher(run))
        {
            return;
        }
        let end = runs
            .range(first + 1..)
            .find(|(_, run)| higher(run))
            .map_or(count, |(&at, _)| at);
        // The run at `end` (a higher symbol's) stays and still starts there.
        let covered: Vec<usize> = runs.range(first..end).map(|(&at, _)| at).collect();
        for at in covered {
            runs.remove(&at);
        }
        let label = match module {
            Some(module) => format!("{name} {module}"),
            None => name.to_owned(),
        };
        runs.insert(first, Some((start, label)));
    })?;
    let mut names = Vec::with_capacity(count);
    let mut runs = runs.into_iter().peekable();
    let mut current = None;
    for index in 0..count {
        while runs.peek().is_some_and(|(at, _)| *at <= index) {
            current = runs.next().and_then(|(_, run)| run.map(|(_, name)| name));
        }
        names.push(current.clone());
    }
    Ok(names)
}

impl KernelTable {
    fn read(reader: impl std::io::BufRead) -> Result<Self, ResolveError> {
        let mut table = Self::default();
        let mut full = false;
        text_symbols(reader, |start, name, module| {
            if full {
                return;
            }
            let name_start = table.names.len();
            table.names.push_str(name);
            if let Some(module) = module {
                table.names.push(' ');
                table.names.push_str(module);
            }
            let (Ok(from), Ok(to)) = (u32::try_from(name_start), u32::try_from(table.names.len()))
            else {
                full = true;
                return;
            };
            table.symbols.push((start, from, to));
        })?;
        table.symbols.sort_by_key(|s| s.0);
        table.symbols.shrink_to_fit();
        table.names.shrink_to_fit();
        Ok(table)
    }

    /// The text symbol with the greatest start at or below `address`.
    fn lookup(&self, address: u64) -> Option<&str> {
        let i = self.symbols.partition_point(|s| s.0 <= address);
        let &(_, from, to) = self.symbols[..i].last()?;
        self.names.get(from as usize..to as usize)
    }
}

/// The kernel's text symbols, read once and kept while the module layout stays the same. A
/// busy kernel is sampled in functions not seen before for a long time (a dozen a minute on
/// an idle-ish host), and reading /proc/kallsyms costs the kernel 150-230 ms of formatting
/// each time: a compact table of every symbol costs 5 MiB instead.
#[derive(Debug, Default)]
pub struct KernelNames {
    table: Option<KernelTable>,
    /// One-shot mode: the names of exactly the addresses asked for.
    exact: Option<std::collections::HashMap<u64, Option<String>>>,
    modules: u64,
    /// A lookup landed in a JIT-compiled BPF program: programs come and go at the same
    /// addresses, so the table is read again next round.
    stale: std::cell::Cell<bool>,
}

impl KernelNames {
    /// `None` if the table is not read yet; `Some(None)` if the address has no symbol.
    pub fn get(&self, address: u64) -> Option<Option<&str>> {
        if let Some(exact) = &self.exact {
            return exact.get(&address).map(Option::as_deref);
        }
        let name = self.table.as_ref()?.lookup(address);
        if name.is_some_and(|n| n.ends_with("[bpf]")) {
            self.stale.set(true);
        }
        Some(name)
    }

    /// Reads the table if it is not read yet and there is an address to name.
    pub fn resolve_missing(
        &mut self,
        symbols: &KernelSymbols,
        addresses: &[u64],
    ) -> Result<(), KallsymsError> {
        if symbols.one_shot {
            let exact = self.exact.get_or_insert_with(Default::default);
            let mut missing: Vec<u64> = addresses
                .iter()
                .copied()
                .filter(|a| !exact.contains_key(a))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            missing.sort_unstable();
            missing.dedup();
            let names = symbols.read_names(&missing)?;
            exact.extend(missing.into_iter().zip(names));
            return Ok(());
        }
        if self.table.is_some() || addresses.is_empty() {
            return Ok(());
        }
        let table = symbols.read_table()?;
        tracing::debug!(symbols = table.symbols.len(), "read kallsyms");
        self.table = Some(table);
        Ok(())
    }

    /// End of an interval: the table is dropped if a module loaded or unloaded (module text
    /// may have moved) or a BPF program was sampled (see `stale`).
    pub fn next_round(&mut self, symbols: &KernelSymbols) {
        let modules = symbols.modules_fingerprint();
        if modules != self.modules || self.stale.replace(false) {
            self.table = None;
            self.modules = modules;
        }
    }

    /// Symbols held (one-shot: addresses named).
    pub fn len(&self) -> usize {
        match &self.exact {
            Some(exact) => exact.len(),
            None => self.table.as_ref().map_or(0, |t| t.symbols.len()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

enum ResolveError {
    Io(std::io::Error),
    Hidden,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 t do_one_initcall
ffffffff81002000 D some_data
ffffffffc0000000 t ext4_read [ext4]
";

    fn resolve(text: &str, addresses: &[u64]) -> Result<HashMap<u64, String>, ResolveError> {
        let table = KernelTable::read(text.as_bytes())?;
        Ok(addresses
            .iter()
            .filter_map(|&a| Some((a, table.lookup(a)?.to_owned())))
            .collect())
    }

    #[test]
    fn one_read_names_every_later_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kallsyms");
        std::fs::write(&path, SAMPLE).unwrap();
        let symbols = KernelSymbols::load_from(&path).unwrap();
        let mut names = KernelNames::default();
        names
            .resolve_missing(&symbols, &[0xffffffff81001004])
            .unwrap();
        // With the file gone, a read would fail: only the table can answer.
        std::fs::remove_file(&path).unwrap();
        let later = [0xffffffff81001ff0, 0xffffffff81002010, 0xffffffffc0000010];
        names.resolve_missing(&symbols, &later).unwrap();
        assert_eq!(names.get(later[0]), Some(Some("do_one_initcall")));
        assert_eq!(names.get(later[1]), Some(Some("do_one_initcall")));
        assert_eq!(names.get(later[2]), Some(Some("ext4_read [ext4]")));
        assert_eq!(names.get(0x1000), Some(None));
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
        assert_eq!(names.len(), 3, "the SAMPLE's text symbols");

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
        assert_eq!(
            names.get(0xffffffffa0000010),
            Some(Some("bpf_prog_6deef7357e7b4530_x [bpf]"))
        );
        assert_eq!(names.len(), 4);
        names.next_round(&symbols);
        assert_eq!(names.get(0xffffffffa0000010), None, "read again next time");
        names
            .resolve_missing(&symbols, &[0xffffffff81000010])
            .unwrap();
        assert_eq!(names.get(0xffffffff81000010), Some(Some("_stext")));
        names.next_round(&symbols);
        assert!(!names.is_empty(), "kept: no BPF program was sampled");
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
        assert!(!addresses_shown(hidden.as_bytes()).unwrap());
        // x86's first lines are per-CPU symbols, the very first at 0.
        let per_cpu_first = format!("0000000000000000 A fixed_percpu_data\n{SAMPLE}");
        assert!(addresses_shown(per_cpu_first.as_bytes()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kallsyms");
        std::fs::write(&path, hidden).unwrap();
        assert!(matches!(
            KernelSymbols::load_from(&path),
            Err(KallsymsError::Hidden)
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
        let mut names = KernelNames::default();
        names.resolve_missing(&k, &[entry + 4]).unwrap();
        assert_eq!(names.get(entry + 4), Some(Some("do_syscall_64")));
    }

    /// The one-pass names of `addresses` are the table's, address by address.
    fn assert_names_match_the_table(text: &str, addresses: &mut Vec<u64>) {
        addresses.sort_unstable();
        addresses.dedup();
        let table = KernelTable::read(text.as_bytes()).ok().unwrap();
        let names = names_of(text.as_bytes(), addresses).ok().unwrap();
        for (&a, name) in addresses.iter().zip(&names) {
            assert_eq!(name.as_deref(), table.lookup(a), "{a:#x}");
        }
    }

    #[test]
    fn one_pass_names_are_the_tables() {
        let aliased = format!("{SAMPLE}ffffffff81001000 T alias_of_initcall\n");
        assert_names_match_the_table(
            &aliased,
            &mut vec![
                0x1000,
                0xffffffff81000000,
                0xffffffff81000010,
                0xffffffff81001000,
                0xffffffff81002010,
                0xffffffffc0000004,
                u64::MAX,
            ],
        );
        // The running kernel's, unsorted modules and aliases included: every symbol start,
        // one byte before and after it, and addresses in between.
        let Ok(text) = std::fs::read_to_string("/proc/kallsyms") else {
            return;
        };
        let starts: Vec<u64> = text
            .lines()
            .filter_map(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
            .filter(|&a| a != 0)
            .collect();
        let mut addresses: Vec<u64> = starts
            .iter()
            .step_by(7)
            .flat_map(|&a| [a.wrapping_sub(1), a, a + 1, a + 0x123])
            .collect();
        assert_names_match_the_table(&text, &mut addresses);
    }

    #[test]
    fn one_shot_names_only_the_addresses_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kallsyms");
        std::fs::write(&path, SAMPLE).unwrap();
        let symbols = KernelSymbols::load_from(&path).unwrap().one_shot();
        let mut names = KernelNames::default();
        let (core, module) = (0xffffffff81000010, 0xffffffffc0000004);
        assert_eq!(names.get(core), None);
        names
            .resolve_missing(&symbols, &[module, core, 0x1000])
            .unwrap();
        assert_eq!(names.get(core), Some(Some("_stext")));
        assert_eq!(names.get(module), Some(Some("ext4_read [ext4]")));
        assert_eq!(names.get(0x1000), Some(None));
        assert_eq!(names.len(), 3, "no table: the three addresses");
        // Another address is not guessed from the ones read: it is read for.
        let other = 0xffffffff81001004;
        assert_eq!(names.get(other), None);
        names.resolve_missing(&symbols, &[other]).unwrap();
        assert_eq!(names.get(other), Some(Some("do_one_initcall")));
    }
}
