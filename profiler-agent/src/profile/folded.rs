//! Folded stacks, the text a flame graph is drawn from: one line per distinct stack, root
//! first, frames separated by `;`, then a count. Frame names come from profiled processes,
//! so this module owns the escaping that keeps one frame one frame.

use std::{borrow::Cow, collections::HashMap};

use super::pprof;
use crate::symbolize::UNKNOWN;

/// The profile as folded stacks (root first, `;`-separated, inline callers before their
/// callees) with their sample counts, heaviest first: the input of a flame graph. Every
/// frame name goes through [`folded_frame`], so a frame is always one frame.
pub fn folded(profile: &pprof::Profile) -> Vec<(String, u64)> {
    let name = |i: i64| {
        profile
            .string_table
            .get(i as usize)
            .map_or("", String::as_str)
    };
    let functions: HashMap<u64, &str> = profile
        .function
        .iter()
        .map(|f| (f.id, name(f.name)))
        .collect();
    let locations: HashMap<u64, &pprof::Location> =
        profile.location.iter().map(|l| (l.id, l)).collect();
    let mut stacks: HashMap<String, u64> = HashMap::new();
    for sample in &profile.sample {
        let mut frames: Vec<Cow<'_, str>> = Vec::new();
        for id in sample.location_id.iter().rev() {
            let Some(location) = locations.get(id) else {
                continue;
            };
            for line in location.line.iter().rev() {
                let name = functions.get(&line.function_id).copied().unwrap_or(UNKNOWN);
                frames.push(folded_frame(name));
            }
        }
        let count = sample.value.first().copied().unwrap_or(0).max(0) as u64;
        *stacks.entry(frames.join(";")).or_default() += count;
    }
    let mut out: Vec<(String, u64)> = stacks.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

/// A frame name (a function, a `comm`) as it may appear in a folded line. Names come from
/// the profiled processes (symbols, perf maps, thread names), so what would change how a
/// line is read is written as a visible escape instead: `;` (the frame separator) as
/// `\x3b`, control characters (a newline ends the line; most are not allowed in the SVG's
/// XML) and the non-characters U+FFFE and U+FFFF as `\n`, `\t`, `\r` or `\u{..}`, and a
/// space followed only by digits and dots at the end of the name as `\x20` (inferno would
/// read that tail as a count: `f 100` as the leaf would become frame `f` with a count column).
pub fn folded_frame(name: &str) -> Cow<'_, str> {
    let numeric_tail = name.rfind(' ').filter(|&i| {
        name[i + 1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.')
    });
    let forbidden = |c: char| c == ';' || c.is_control() || matches!(c, '\u{fffe}' | '\u{ffff}');
    if numeric_tail.is_none() && !name.contains(forbidden) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for (i, c) in name.char_indices() {
        match c {
            ';' => out.push_str("\\x3b"),
            ' ' if Some(i) == numeric_tail => out.push_str("\\x20"),
            c if forbidden(c) => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}
