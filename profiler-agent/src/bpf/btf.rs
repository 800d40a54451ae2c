//! Reads the running kernel's BTF (`/sys/kernel/btf/vmlinux`) for the one fact the kernel
//! program cannot learn itself: where `flags` sits in `struct task_struct`, so it can skip
//! kernel threads. aya-obj parses BTF but does not expose struct members, and the lookup is a
//! single linear walk, so it is done here with bounds-checked reads.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read kernel BTF at {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {what} at byte {offset}")]
    Malformed { what: &'static str, offset: usize },
    #[error("kernel BTF has no struct {strukt} with a member {member}")]
    MissingMember {
        strukt: &'static str,
        member: &'static str,
    },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Byte offset of `member` in `struct strukt` of the BTF blob at `path`.
pub fn member_offset_in_file(
    path: &Path,
    strukt: &'static str,
    member: &'static str,
) -> Result<u32, BtfError> {
    member_offset(&read(path)?, strukt, member)
}

/// The BTF blob at `path`, to look up several members with one read.
pub fn read(path: &Path) -> Result<Vec<u8>, BtfError> {
    std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn u32_at(&self, offset: usize) -> Result<u32, BtfError> {
        let bytes = offset
            .checked_add(4)
            .and_then(|end| self.data.get(offset..end))
            .ok_or(BtfError::Malformed {
                what: "truncated",
                offset,
            })?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    }
}

/// The NUL-terminated string at `offset` of the string section (empty when out of bounds).
fn str_at(strings: &[u8], offset: u32) -> &[u8] {
    let rest = strings.get(offset as usize..).unwrap_or(&[]);
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    &rest[..end]
}

/// Byte offset of `member` in the first `struct strukt` of a little-endian BTF blob.
pub fn member_offset(
    data: &[u8],
    strukt: &'static str,
    member: &'static str,
) -> Result<u32, BtfError> {
    let r = Reader { data };
    let header = data.get(..4).ok_or(BtfError::Malformed {
        what: "header",
        offset: 0,
    })?;
    if u16::from_le_bytes([header[0], header[1]]) != MAGIC {
        return Err(BtfError::Malformed {
            what: "magic (not little-endian BTF)",
            offset: 0,
        });
    }
    let hdr_len = r.u32_at(4)? as usize;
    let type_off = r.u32_at(8)? as usize;
    let type_len = r.u32_at(12)? as usize;
    let str_off = r.u32_at(16)? as usize;
    let str_len = r.u32_at(20)? as usize;
    let range = |off: usize, len: usize, what| {
        let start = hdr_len.checked_add(off);
        start
            .and_then(|s| s.checked_add(len).map(|e| (s, e)))
            .filter(|&(_, e)| e <= data.len())
            .ok_or(BtfError::Malformed { what, offset: 4 })
    };
    let (types_start, types_end) = range(type_off, type_len, "type section bounds")?;
    let (str_start, str_end) = range(str_off, str_len, "string section bounds")?;
    let strings = &data[str_start..str_end];

    let mut at = types_start;
    while at + 12 <= types_end {
        let name_off = r.u32_at(at)?;
        let info = r.u32_at(at + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let members_at = at + 12;
        if kind == KIND_STRUCT && str_at(strings, name_off) == strukt.as_bytes() {
            for i in 0..vlen {
                let m = members_at + i * 12;
                if str_at(strings, r.u32_at(m)?) == member.as_bytes() {
                    let raw = r.u32_at(m + 8)?;
                    // With kind_flag set the low 24 bits are the bit offset.
                    let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
                    return Ok(bits / 8);
                }
            }
            return Err(BtfError::MissingMember { strukt, member });
        }
        at = members_at
            + trailing_len(kind, vlen).ok_or(BtfError::Malformed {
                what: "unknown type kind",
                offset: at,
            })?;
    }
    Err(BtfError::MissingMember { strukt, member })
}

/// Bytes that follow the 12-byte common header for a type of `kind`.
fn trailing_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // ptr, fwd, typedef, volatile, const, restrict, func, float, type_tag
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // int, var, decl_tag
        1 | 14 | 17 => 4,
        // array
        3 => 12,
        // struct, union, datasec, enum64
        4 | 5 | 15 | 19 => vlen * 12,
        // enum, func_proto
        6 | 13 => vlen * 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `int` and `struct task_struct { int pad; int flags; }` plus a bitfield
    /// struct, built by hand so the parser is checked against the format, not against itself.
    fn blob(kind_flag: bool) -> Vec<u8> {
        let strings = b"\0int\0task_struct\0pad\0flags\0".to_vec();
        let mut types = Vec::new();
        let push = |t: &mut Vec<u8>, v: u32| t.extend_from_slice(&v.to_le_bytes());
        // [1] int: name "int", kind 1, size 4, encoding word
        push(&mut types, 1);
        push(&mut types, 1 << 24);
        push(&mut types, 4);
        push(&mut types, 32);
        // [2] struct task_struct with 2 members
        push(&mut types, 5);
        push(
            &mut types,
            (4 << 24) | 2 | if kind_flag { 1 << 31 } else { 0 },
        );
        push(&mut types, 8);
        for (name, bit_offset) in [(17u32, 0u32), (21, 32)] {
            push(&mut types, name);
            push(&mut types, 1);
            push(&mut types, bit_offset);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(1); // version
        out.push(0); // flags
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_member_offset() {
        assert_eq!(
            member_offset(&blob(false), "task_struct", "flags").unwrap(),
            4
        );
        assert_eq!(
            member_offset(&blob(true), "task_struct", "flags").unwrap(),
            4
        );
    }

    #[test]
    fn missing_member_is_named() {
        let err = member_offset(&blob(false), "task_struct", "mm").unwrap_err();
        assert!(err.to_string().contains("task_struct"), "{err}");
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error() {
        let full = blob(false);
        for cut in 0..full.len() {
            let _ = member_offset(&full[..cut], "task_struct", "flags");
        }
        assert!(member_offset(&[0xff; 64], "task_struct", "flags").is_err());
    }

    #[test]
    fn running_kernel_has_task_flags() {
        let path = Path::new(VMLINUX);
        // Only a developer machine without BTF may skip; CI has BTF and must check it.
        if !path.exists() && std::env::var_os("CI").is_none() {
            return;
        }
        let offset = member_offset_in_file(path, "task_struct", "flags").unwrap();
        assert!(offset > 0 && offset < 4096, "{offset}");
    }
}
