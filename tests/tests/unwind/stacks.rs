//! User stacks for `unwind.rs`: ours from the pprof `record` writes (perf's come from
//! `perf.rs` in the same shape), and what a frame is independently of names, because stock
//! binaries are stripped: the function (an `.eh_frame_hdr` entry, one per FDE) that holds
//! the frame's address in its file.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use profiler_agent::profile::{KERNEL_MAPPING, LOST_KERNEL_STACK, pprof::Profile};

use crate::common::label_num;

/// One user frame: a function name (one per inline level in our profiles, so an inlined call
/// gives several frames at one address; empty when unnamed), the file mapped there and the
/// offset in that file of the instruction (the byte before the return address for callers,
/// as both profilers give it).
#[derive(Clone, Debug)]
pub struct Frame {
    pub name: String,
    pub file: String,
    pub offset: u64,
}

/// A stack, leaf first, and how many samples had it.
#[derive(Clone, Debug)]
pub struct Stack {
    pub count: u64,
    pub frames: Vec<Frame>,
}

/// The user frames of every sample of `pid` in our profile (kernel frames and the
/// lost-kernel-stack marker left out; a lost user stack stays, as its marker frame).
pub fn ours(p: &Profile, pid: u32) -> Vec<Stack> {
    let s = |i: i64| p.string_table[i as usize].as_str();
    let locations: HashMap<u64, _> = p.location.iter().map(|l| (l.id, l)).collect();
    let mappings: HashMap<u64, _> = p.mapping.iter().map(|m| (m.id, m)).collect();
    let functions: HashMap<u64, _> = p.function.iter().map(|f| (f.id, f)).collect();
    p.sample
        .iter()
        .filter(|sample| label_num(p, sample, "pid") == Some(i64::from(pid)))
        .map(|sample| {
            let mut frames = Vec::new();
            for id in &sample.location_id {
                let l = locations[id];
                let (file, offset) = match mappings.get(&l.mapping_id) {
                    Some(m) => (
                        s(m.filename),
                        (l.address.wrapping_sub(m.memory_start)).wrapping_add(m.file_offset),
                    ),
                    None => ("", l.address),
                };
                if file == KERNEL_MAPPING {
                    continue;
                }
                let names: Vec<&str> = match l.line.as_slice() {
                    [] => vec![""],
                    lines => lines
                        .iter()
                        .map(|line| s(functions[&line.function_id].name))
                        .collect(),
                };
                for name in names.into_iter().filter(|&n| n != LOST_KERNEL_STACK) {
                    frames.push(Frame {
                        name: name.to_owned(),
                        file: file.to_owned(),
                        offset,
                    });
                }
            }
            Stack {
                count: sample.value[0] as u64,
                frames,
            }
        })
        .collect()
}

/// A function name without what compilers and tools append: parameters, `[clone .cold]`,
/// `.cold`/`.part.N`/`.isra.N`/`.constprop.N` suffixes and symbol versions (`@@GLIBC_2.34`).
pub fn base_name(name: &str) -> &str {
    let mut end = name.len();
    for cut in [" [clone", ".cold", ".part.", ".isra.", ".constprop.", "@"] {
        if let Some(at) = name.find(cut) {
            end = end.min(at);
        }
    }
    if let Some(at) = name.find('(')
        && at > 0
    {
        end = end.min(at);
    }
    &name[..end]
}

/// The process and thread entry functions glibc and the kernel start user code in.
pub fn is_entry_name(name: &str) -> bool {
    let name = base_name(name);
    name == "_start"
        || name.starts_with("__libc_start_main")
        || name == "__libc_start_call_main"
        || name == "start_thread"
        || name == "clone"
        || name == "clone3"
        || name.starts_with("__clone")
}

/// What a frame is, the same for both profilers whatever they name it: its file (canonical
/// path) and the start address of the function (FDE) holding its instruction.
pub type FunctionKey = (PathBuf, u64);

/// Functions of the files frames point into, read once per file.
#[derive(Default)]
pub struct Functions {
    files: HashMap<String, Option<ElfFunctions>>,
}

struct ElfFunctions {
    path: PathBuf,
    /// (file offset, size in the file, virtual address) of each loadable segment.
    segments: Vec<(u64, u64, u64)>,
    /// Start addresses of every function with unwind information, sorted.
    starts: Vec<u64>,
    entry: u64,
}

impl Functions {
    /// The function `frame` is in; none when its file is not a readable ELF file with
    /// `.eh_frame_hdr` (`[vdso]`, `[unknown]`, anonymous memory) or the offset is in no
    /// function.
    pub fn key(&mut self, frame: &Frame) -> Option<FunctionKey> {
        let elf = self
            .files
            .entry(frame.file.clone())
            .or_insert_with(|| ElfFunctions::read(Path::new(&frame.file)))
            .as_ref()?;
        let vaddr = elf.segments.iter().find_map(|&(offset, size, vaddr)| {
            (frame.offset >= offset && frame.offset < offset + size)
                .then(|| frame.offset - offset + vaddr)
        })?;
        let i = elf.starts.partition_point(|&s| s <= vaddr);
        Some((elf.path.clone(), *elf.starts.get(i.checked_sub(1)?)?))
    }

    /// The function holding the ELF entry point (`_start`) of `exe`.
    pub fn entry_of(&mut self, exe: &Path) -> FunctionKey {
        let file = exe.to_string_lossy().into_owned();
        let elf = self
            .files
            .entry(file)
            .or_insert_with(|| ElfFunctions::read(exe))
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no .eh_frame_hdr", exe.display()));
        let i = elf.starts.partition_point(|&s| s <= elf.entry);
        (elf.path.clone(), elf.starts[i - 1])
    }
}

impl ElfFunctions {
    fn read(path: &Path) -> Option<Self> {
        use object::{Object as _, ObjectSection as _, ObjectSegment as _};
        let path = std::fs::canonicalize(path).ok()?;
        let data = std::fs::read(&path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let hdr = file.section_by_name(".eh_frame_hdr")?;
        let mut starts = eh_frame_hdr_starts(hdr.data().ok()?, hdr.address())?;
        starts.sort_unstable();
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (offset, size, s.address())
            })
            .collect();
        Some(ElfFunctions {
            path,
            segments,
            starts,
            entry: file.entry(),
        })
    }
}

/// The initial locations of `.eh_frame_hdr`'s binary search table (one per FDE), for the
/// encodings every x86_64 toolchain writes: version 1, the table as pairs of
/// `DW_EH_PE_datarel | DW_EH_PE_sdata4` relative to the section start.
fn eh_frame_hdr_starts(data: &[u8], address: u64) -> Option<Vec<u64>> {
    let (&[version, frame_ptr_enc, count_enc, table_enc], rest) = data.split_first_chunk()?;
    if version != 1 || table_enc != 0x3b {
        return None;
    }
    let size = |enc: u8| match enc & 0x0f {
        0x02 | 0x0a => Some(2),
        0x03 | 0x0b => Some(4),
        0x04 | 0x0c => Some(8),
        _ => None,
    };
    let rest = rest.get(size(frame_ptr_enc)?..)?;
    let count = match size(count_enc)? {
        4 => u64::from(u32::from_le_bytes(*rest.first_chunk()?)),
        8 => u64::from_le_bytes(*rest.first_chunk()?),
        _ => return None,
    };
    let table = rest.get(size(count_enc)?..)?;
    (0..count as usize)
        .map(|i| {
            let entry = table.get(i * 8..i * 8 + 4)?;
            let rel = i32::from_le_bytes(entry.try_into().ok()?);
            Some(address.wrapping_add_signed(i64::from(rel)))
        })
        .collect()
}

/// Share of samples whose stack reaches the process entry: one of its three outermost
/// frames is an entry function by name, or is in the function holding `entry` (a stripped
/// executable's `_start`).
pub fn complete_share(stacks: &[Stack], functions: &mut Functions, entry: &FunctionKey) -> f64 {
    share(stacks, |s| is_complete(s, functions, entry))
}

/// Whether one stack reaches the process entry (see [`complete_share`]).
pub fn is_complete(stack: &Stack, functions: &mut Functions, entry: &FunctionKey) -> bool {
    stack
        .frames
        .iter()
        .rev()
        .take(3)
        .any(|f| is_entry_name(&f.name) || functions.key(f).as_ref() == Some(entry))
}

/// Share of samples (by count) for which `pred` holds.
pub fn share(stacks: &[Stack], mut pred: impl FnMut(&Stack) -> bool) -> f64 {
    let total: u64 = stacks.iter().map(|s| s.count).sum();
    let hits: u64 = stacks.iter().filter(|s| pred(s)).map(|s| s.count).sum();
    hits as f64 / total.max(1) as f64
}

/// The `n` functions with the most self samples (leaf frames), heaviest first, each with a
/// name to print (perf's, or FILE+0xSTART for a stripped one).
pub fn hottest(
    stacks: &[Stack],
    functions: &mut Functions,
    n: usize,
) -> Vec<(FunctionKey, String)> {
    let mut counts: HashMap<FunctionKey, (u64, String)> = HashMap::new();
    for s in stacks {
        let Some(leaf) = s.frames.first() else {
            continue;
        };
        let Some(key) = functions.key(leaf) else {
            continue;
        };
        let name = if leaf.name.is_empty() || leaf.name.starts_with('[') {
            let file = key.0.file_name().unwrap_or_default().to_string_lossy();
            format!("{file}+{:#x}", key.1)
        } else {
            leaf.name.clone()
        };
        counts.entry(key).or_insert((0, name)).0 += s.count;
    }
    let mut hot: Vec<_> = counts.into_iter().collect();
    hot.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(&b.0)));
    hot.into_iter()
        .take(n)
        .map(|(key, (_, name))| (key, name))
        .collect()
}

/// Share of samples with `key` anywhere in their stack.
pub fn appears_share(stacks: &[Stack], functions: &mut Functions, key: &FunctionKey) -> f64 {
    share(stacks, |s| {
        s.frames
            .iter()
            .any(|f| functions.key(f).as_ref() == Some(key))
    })
}

/// A stack for a failure message: names leaf first, runs of one name collapsed (`recurse×100`).
pub fn describe(frames: &[Frame]) -> String {
    let mut parts: Vec<(String, usize)> = Vec::new();
    for f in frames {
        let name = if f.name.is_empty() {
            format!("{}+{:#x}", f.file, f.offset)
        } else {
            f.name.clone()
        };
        match parts.last_mut() {
            Some((last, n)) if *last == name => *n += 1,
            _ => parts.push((name, 1)),
        }
    }
    if parts.is_empty() {
        return "(no user frames)".to_owned();
    }
    parts
        .into_iter()
        .map(|(name, n)| if n > 1 { format!("{name}×{n}") } else { name })
        .collect::<Vec<_>>()
        .join(" <- ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(base_name("throwing::cx_e(unsigned long)"), "throwing::cx_e");
        assert_eq!(base_name("uw_e.cold"), "uw_e");
        assert_eq!(base_name("f(int) [clone .cold]"), "f");
        assert_eq!(
            base_name("(anonymous namespace)::g"),
            "(anonymous namespace)::g"
        );
        assert!(is_entry_name("__libc_start_main@@GLIBC_2.34"));
        assert!(is_entry_name("_start"));
        assert!(!is_entry_name("main"));
    }
}
