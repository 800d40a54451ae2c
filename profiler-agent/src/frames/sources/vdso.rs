//! The vdso: every process on the host maps the same image, so it is read once from this
//! process's own memory and named from its symbol table.

use std::{fs::File, rc::Rc};

use crate::frames::{Found, FrameKind, FrameSource, MappingClass, Site};
use crate::{
    process::{Mapping, ProcessInfo},
    symbolize::{Demangle, binary::Binary, budget::SymbolBudget},
};

pub struct VdsoSource {
    demangle: Demangle,
    budget: SymbolBudget,
    /// Loaded on first use; `Some(None)` when it could not be read.
    image: Option<Option<Rc<Binary>>>,
}

impl VdsoSource {
    pub fn new(demangle: Demangle, budget: SymbolBudget) -> Self {
        Self {
            demangle,
            budget,
            image: None,
        }
    }

    fn image(&mut self) -> Option<Rc<Binary>> {
        self.image
            .get_or_insert_with(|| {
                read_own_vdso()
                    .and_then(|bytes| Binary::from_vec_with(bytes, &self.budget).ok())
                    .map(|b| Rc::new(b.with_demangle(self.demangle)))
            })
            .clone()
    }
}

impl FrameSource for VdsoSource {
    fn name(&self) -> &'static str {
        "vdso"
    }

    fn serves(&self, class: MappingClass) -> bool {
        class == MappingClass::Vdso
    }

    fn kind(&self) -> FrameKind {
        FrameKind::Native
    }

    fn frames(&mut self, site: &Site<'_>) -> Option<Found> {
        let offset = site.mapping?.file_offset(site.address);
        let image = self.image()?;
        let frames = image.frames(image.vaddr_of_file_offset(offset)?);
        (!frames.is_empty()).then_some(Found::Frames(frames))
    }

    fn build_id(&mut self, _: &ProcessInfo, _: &Mapping) -> Option<String> {
        self.image()?.build_id_hex()
    }

    fn read_file(&mut self, _: &ProcessInfo, _: &Mapping, offset: u64, buf: &mut [u8]) -> bool {
        self.image().is_some_and(|b| b.read_file_at(offset, buf))
    }
}

/// The vdso image of this process.
fn read_own_vdso() -> Option<Vec<u8>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("[vdso]"))?;
    let (start, end) = line.split_whitespace().next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let len = usize::try_from(end.checked_sub(start)?).ok()?;
    if len > 1 << 20 {
        return None;
    }
    let mut mem = File::open("/proc/self/mem").ok()?;
    mem.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = vec![0; len];
    mem.read_exact(&mut buf).ok()?;
    Some(buf)
}
