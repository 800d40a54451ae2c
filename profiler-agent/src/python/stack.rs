//! The Python stack of each thread of an interpreter, read from its memory: the runtime's
//! first interpreter, its thread states, each one's current frame and the chain of
//! `previous` frames, each frame a code object and the instruction it is at. [`CodeNames`]
//! names a code object (qualified name, or before 3.11 the bare name, file, line of the
//! instruction from its line table) and keeps the answer only while the object still holds
//! the same name and file pointers, so a freed and reused code object is never given a stale
//! name.

use std::{collections::HashMap, sync::Arc};

use super::{
    detect::Interpreter,
    layout::{Instruction, Layout, LineTable},
    remote::{RemoteError, RemoteMemory},
};

/// Frames read per thread at most: deeper stacks are cut (and say so).
pub const MAX_DEPTH: usize = 128;
/// Threads read per interpreter at most.
const MAX_THREADS: usize = 1024;
/// Longest name or file name read, in characters.
const MAX_STRING: u64 = 1024;
/// Largest location table read, in bytes (a function of thousands of lines takes a few
/// KiB): a longer one is read up to this, and lines past it are unknown.
const MAX_LINETABLE: u64 = 256 << 10;
/// What one process's cache of code objects may hold: past either bound it starts afresh, so
/// a process that makes code objects without end (or huge tables) costs bounded memory.
const MAX_CODES: usize = 16_384;
const MAX_CODE_BYTES: usize = 8 << 20;
/// `_PyInterpreterFrame.owner` of 3.12's shim frames (C calling into Python).
const FRAME_OWNED_BY_CSTACK: u8 = 3;

/// One Python frame as the walk finds it: what the kernel program will record per frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RawFrame {
    /// Address of the code object.
    pub code: u64,
    /// Index of the code unit (2 bytes) the frame is at, from the start of its
    /// instructions.
    pub instruction: u32,
}

/// The frames of one thread, innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadStack {
    /// `native_thread_id` (3.11+).
    pub native_thread_id: Option<u64>,
    pub frames: Vec<RawFrame>,
    /// True when the chain went on past [`MAX_DEPTH`].
    pub cut: bool,
}

/// The Python stacks of every thread of `interpreter`'s first (main) interpreter state.
pub fn read_stacks(
    memory: &dyn RemoteMemory,
    interpreter: &Interpreter,
) -> Result<Vec<ThreadStack>, RemoteError> {
    let l = &interpreter.layout;
    let interp = memory.read_u64(interpreter.runtime + l.runtime_interpreters_head)?;
    if interp == 0 {
        return Ok(Vec::new());
    }
    let mut thread = memory.read_u64(interp + l.interp_threads_head)?;
    let mut stacks = Vec::new();
    while thread != 0 && stacks.len() < MAX_THREADS {
        stacks.push(read_thread(memory, l, thread)?);
        thread = memory.read_u64(thread + l.thread_next)?;
    }
    Ok(stacks)
}

fn read_thread(
    memory: &dyn RemoteMemory,
    l: &Layout,
    thread: u64,
) -> Result<ThreadStack, RemoteError> {
    let native_thread_id = match l.thread_native_id {
        Some(offset) => Some(memory.read_u64(thread + offset)?),
        None => None,
    };
    let field = memory.read_u64(thread + l.thread_frame)?;
    let mut frame = match l.cframe_current_frame {
        Some(offset) if field != 0 => memory.read_u64(field + offset)?,
        Some(_) => 0,
        // 3.13 and before 3.11: the thread points at its frame.
        None => field,
    };
    let mut frames = Vec::new();
    let mut steps = 0;
    while frame != 0 && frames.len() < MAX_DEPTH && steps < 2 * MAX_DEPTH {
        steps += 1;
        if let Some(owner_at) = l.frame_owner {
            let mut owner = [0u8];
            memory.read(frame + owner_at, &mut owner)?;
            if owner[0] == FRAME_OWNED_BY_CSTACK {
                frame = memory.read_u64(frame + l.frame_previous)?;
                continue;
            }
        }
        let code = memory.read_u64(frame + l.frame_code)?;
        let at = frame + l.frame_instruction;
        let instruction = match l.instruction {
            Instruction::Pointer { code_instructions } => {
                let prev_instr = memory.read_u64(at)?;
                // A new frame's prev_instr is one unit before its first instruction.
                u32::try_from(prev_instr.saturating_sub(code + code_instructions) / 2).unwrap_or(0)
            }
            // `f_lasti` is -1 before the first instruction: read as the first.
            Instruction::LastiUnits => lasti(memory, at)?,
            Instruction::LastiBytes => lasti(memory, at)? / 2,
        };
        frames.push(RawFrame { code, instruction });
        frame = memory.read_u64(frame + l.frame_previous)?;
    }
    Ok(ThreadStack {
        native_thread_id,
        frames,
        cut: frame != 0,
    })
}

/// An `int f_lasti`, a negative one as 0.
fn lasti(memory: &dyn RemoteMemory, at: u64) -> Result<u32, RemoteError> {
    let value = memory.read_u32(at)? as i32;
    Ok(u32::try_from(value).unwrap_or(0))
}

/// A named Python frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrame {
    /// `co_qualname`: `Class.method`, `outer.<locals>.inner`; before 3.11, `co_name`:
    /// `method`, `inner`.
    pub name: Arc<str>,
    /// `co_filename`.
    pub file: Arc<str>,
    /// The line of the instruction, when the location table has one.
    pub line: Option<u32>,
    /// `co_firstlineno`: the function's `def` line.
    pub first_line: u32,
}

/// What a code object says about itself, with the pointers that identify it.
#[derive(Clone, Debug)]
struct Code {
    /// `co_qualname` (`co_name`), `co_filename` and line table pointers when read.
    identity: [u64; 3],
    name: Arc<str>,
    file: Arc<str>,
    first_line: u32,
    format: LineTable,
    linetable: Vec<u8>,
}

/// Names code objects of one process, caching each by address while its identity holds.
pub struct CodeNames<M> {
    memory: M,
    layout: Layout,
    codes: HashMap<u64, Code>,
    /// Bytes of names, files and tables in `codes`.
    bytes: usize,
    limits: (usize, usize),
}

impl<M: RemoteMemory> CodeNames<M> {
    pub fn new(memory: M, layout: Layout) -> Self {
        Self::with_limits(memory, layout, MAX_CODES, MAX_CODE_BYTES)
    }

    /// A cache of at most `codes` code objects and `bytes` bytes.
    pub fn with_limits(memory: M, layout: Layout, codes: usize, bytes: usize) -> Self {
        Self {
            memory,
            layout,
            codes: HashMap::new(),
            bytes: 0,
            limits: (codes, bytes),
        }
    }

    /// Code objects named so far.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// [`CodeNames::name`], or when the process can no longer be read (it exited), the name
    /// its code object had when last read.
    pub fn name_or_last(&mut self, frame: RawFrame) -> Option<PyFrame> {
        match self.name(frame) {
            Ok(named) => Some(named),
            Err(_) => self.codes.get(&frame.code).map(|code| code.frame(frame)),
        }
    }

    /// The name, file and line of `frame`.
    pub fn name(&mut self, frame: RawFrame) -> Result<PyFrame, RemoteError> {
        let l = &self.layout;
        let identity = [
            self.memory.read_u64(frame.code + l.code_name)?,
            self.memory.read_u64(frame.code + l.code_filename)?,
            self.memory.read_u64(frame.code + l.code_linetable)?,
        ];
        let cached = self
            .codes
            .get(&frame.code)
            .is_some_and(|c| c.identity == identity);
        if !cached {
            let code = self.read_code(frame.code, identity)?;
            let size = code.size();
            if self.codes.len() >= self.limits.0 || self.bytes + size > self.limits.1 {
                self.codes.clear();
                self.bytes = 0;
            }
            self.bytes += size;
            if let Some(old) = self.codes.insert(frame.code, code) {
                self.bytes = self.bytes.saturating_sub(old.size());
            }
        }
        Ok(self.codes[&frame.code].frame(frame))
    }

    fn read_code(&self, code: u64, identity: [u64; 3]) -> Result<Code, RemoteError> {
        let [name, filename, linetable] = identity;
        let memory = &self.memory;
        Ok(Code {
            identity,
            name: read_str(memory, &self.layout, name)?.into(),
            file: read_str(memory, &self.layout, filename)?.into(),
            first_line: memory.read_u32(code + self.layout.code_firstlineno)?,
            format: self.layout.line_table,
            linetable: read_bytes(memory, &self.layout, linetable)?,
        })
    }
}

impl Code {
    fn size(&self) -> usize {
        self.name.len() + self.file.len() + self.linetable.len() + std::mem::size_of::<Self>()
    }

    fn frame(&self, frame: RawFrame) -> PyFrame {
        PyFrame {
            name: self.name.clone(),
            file: self.file.clone(),
            line: match self.format {
                LineTable::Locations => {
                    line_of(&self.linetable, self.first_line, frame.instruction)
                }
                LineTable::Ranges310 => {
                    line_of_310(&self.linetable, self.first_line, frame.instruction)
                }
                LineTable::Lnotab => {
                    line_of_lnotab(&self.linetable, self.first_line, frame.instruction)
                }
            },
            first_line: self.first_line,
        }
    }
}

/// A `str` object's text (compact strings only, which every name and file name is).
fn read_str(memory: &impl RemoteMemory, l: &Layout, object: u64) -> Result<String, RemoteError> {
    let length = memory.read_u64(object + l.unicode_length)?.min(MAX_STRING);
    let state = memory.read_u32(object + l.unicode_state)?;
    // state: interned:2, kind:3, compact:1, ascii:1, ready:1.
    let kind = (state >> 2) & 7;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact || !(1..=4).contains(&kind) || kind == 3 {
        return Ok(String::from("<?>"));
    }
    let data = object + if ascii { l.ascii_size } else { l.compact_size };
    let mut bytes = vec![0u8; (length * u64::from(kind)) as usize];
    memory.read(data, &mut bytes)?;
    Ok(match kind {
        1 => bytes.iter().map(|&b| char::from(b)).collect(),
        2 => char::decode_utf16(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        )
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| {
                char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('\u{fffd}')
            })
            .collect(),
    })
}

/// A `bytes` object's contents.
fn read_bytes(memory: &impl RemoteMemory, l: &Layout, object: u64) -> Result<Vec<u8>, RemoteError> {
    let size = memory.read_u64(object + l.bytes_size)?.min(MAX_LINETABLE);
    let mut bytes = vec![0u8; size as usize];
    memory.read(object + l.bytes_data, &mut bytes)?;
    Ok(bytes)
}

/// The line of code unit `instruction` from a CPython 3.11 location table (`co_linetable`,
/// the format of `Objects/locations.md`): entries of a first byte `1cccclll` (code, length
/// in code units minus one) and code-dependent varints; the line starts at `first_line`.
pub fn line_of(table: &[u8], first_line: u32, instruction: u32) -> Option<u32> {
    let mut line = i64::from(first_line);
    let mut at = 0usize;
    let mut unit = 0u32;
    while at < table.len() {
        let first = table[at];
        at += 1;
        if first & 0x80 == 0 {
            return None; // not at an entry: a malformed table
        }
        let code = (first >> 3) & 15;
        let length = u32::from(first & 7) + 1;
        let varint = |at: &mut usize| -> Option<u64> {
            let (mut value, mut shift) = (0u64, 0);
            loop {
                let b = *table.get(*at)?;
                *at += 1;
                value |= u64::from(b & 63) << shift;
                if b & 64 == 0 || shift > 56 {
                    return Some(value);
                }
                shift += 6;
            }
        };
        let signed = |v: u64| {
            if v & 1 != 0 {
                -((v >> 1) as i64)
            } else {
                (v >> 1) as i64
            }
        };
        let has_line = match code {
            15 => false,
            14 => {
                line += signed(varint(&mut at)?);
                for _ in 0..3 {
                    varint(&mut at)?; // end line, start and end column
                }
                true
            }
            13 => {
                line += signed(varint(&mut at)?);
                true
            }
            10..=12 => {
                line += i64::from(code) - 10;
                at += 2; // start and end column
                true
            }
            _ => {
                at += 1; // column
                true
            }
        };
        if instruction < unit + length {
            return (has_line && line > 0)
                .then(|| u32::try_from(line).ok())
                .flatten();
        }
        unit += length;
    }
    None
}

/// The line of code unit `instruction` from a CPython 3.10 `co_linetable` (its
/// `Objects/lnotab_notes.txt`): pairs of an unsigned byte-offset delta and a signed line
/// delta, each pair the range of bytes from the offset reached to the offset plus its delta,
/// on the line reached; a line delta of -128 means the range has no line (and leaves the line
/// as it was). The line starts at `first_line`.
pub fn line_of_310(table: &[u8], first_line: u32, instruction: u32) -> Option<u32> {
    let offset = u64::from(instruction) * 2;
    let mut line = i64::from(first_line);
    let mut start = 0u64;
    for pair in table.chunks_exact(2) {
        let end = start + u64::from(pair[0]);
        let delta = pair[1] as i8;
        let here = (delta != -128).then(|| {
            line += i64::from(delta);
            line
        });
        if (start..end).contains(&offset) {
            return here.and_then(|l| u32::try_from(l).ok()).filter(|&l| l > 0);
        }
        start = end;
    }
    None
}

/// The line of code unit `instruction` from a CPython 3.8 or 3.9 `co_lnotab` (its
/// `Objects/lnotab_notes.txt`): pairs of an unsigned byte-offset delta and a signed line
/// delta; the line starts at `first_line`, and each pair's line delta applies from the offset
/// reached after its byte delta (`PyCode_Addr2Line`). Every offset has a line.
pub fn line_of_lnotab(table: &[u8], first_line: u32, instruction: u32) -> Option<u32> {
    let offset = u64::from(instruction) * 2;
    let mut line = i64::from(first_line);
    let mut at = 0u64;
    for pair in table.chunks_exact(2) {
        at += u64::from(pair[0]);
        if at > offset {
            break;
        }
        line += i64::from(pair[1] as i8);
    }
    u32::try_from(line).ok().filter(|&l| l > 0)
}

#[cfg(test)]
mod tests;
