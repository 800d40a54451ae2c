//! Reading and emptying one generation of the kernel's maps: the counts, the kernel stacks
//! they point at, the walked user stacks and, for samples of CPython processes, the Python
//! stacks stored under the same hash as their user stack.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData, PerCpuHashMap, StackTraceMap};
use profiler_common::{
    PythonStack, STACK_LOST, STACK_NOT_COLLECTED, STACK_WALKED, SampleKey, UserStack,
};

use crate::sampler::{RawSample, Stack};

/// One generation's maps.
pub(super) struct Generation<'m> {
    pub counts: &'m mut PerCpuHashMap<MapData, SampleKey, u64>,
    pub stacks: &'m mut StackTraceMap<MapData>,
    pub user_stacks: &'m mut HashMap<MapData, u64, UserStack>,
    pub python_stacks: &'m mut HashMap<MapData, u64, PythonStack>,
}

/// Every sample counted in `maps`, with its stacks; leaves the maps empty.
pub(super) fn drain(maps: Generation<'_>) -> Vec<RawSample> {
    let totals = take_counts(maps.counts);
    let user = take_user_stacks(&totals, maps.user_stacks, maps.python_stacks);

    let stacks = maps.stacks;
    let mut resolved: StdHashMap<i32, Stack> = StdHashMap::new();
    let mut lookup = |id: i32| -> Stack {
        match id {
            STACK_NOT_COLLECTED => Stack::NotCollected,
            STACK_LOST => Stack::Lost,
            id if id < 0 => Stack::Lost,
            id => resolved
                .entry(id)
                .or_insert_with(|| match stacks.get(&(id as u32), 0) {
                    Ok(trace) => Stack::Frames(trace.frames().iter().map(|f| f.ip).collect()),
                    Err(_) => Stack::Lost,
                })
                .clone(),
        }
    };
    let samples = totals
        .into_iter()
        .zip(user)
        .map(|((key, count), (user, python))| RawSample {
            pid: key.pid,
            comm: comm_string(&key.comm),
            user,
            kernel: lookup(key.kernel_stack_id),
            python,
            count,
        })
        .collect();

    let ids: Vec<u32> = stacks.stack_ids().filter_map(Result::ok).collect();
    for id in ids {
        let _ = stacks.remove(&id);
    }
    samples
}

fn take_counts(counts: &mut PerCpuHashMap<MapData, SampleKey, u64>) -> Vec<(SampleKey, u64)> {
    let keys: Vec<SampleKey> = counts.keys().filter_map(Result::ok).collect();
    let mut totals = Vec::with_capacity(keys.len());
    for key in keys {
        let count: u64 = match counts.get(&key, 0) {
            Ok(values) => values.iter().sum(),
            Err(_) => continue,
        };
        let _ = counts.remove(&key);
        if count > 0 {
            totals.push((key, count));
        }
    }
    totals
}

/// Each sample's user stack and Python frames (empty when it has none).
fn take_user_stacks(
    totals: &[(SampleKey, u64)],
    user_stacks: &mut HashMap<MapData, u64, UserStack>,
    python_stacks: &mut HashMap<MapData, u64, PythonStack>,
) -> Vec<(Stack, Vec<u64>)> {
    let mut walked: StdHashMap<u64, (Stack, Vec<u64>)> = StdHashMap::new();
    let mut user = |key: &SampleKey| match key.user_stack_id {
        STACK_WALKED => walked
            .entry(key.user_stack_hash)
            .or_insert_with(|| match user_stacks.get(&key.user_stack_hash, 0) {
                Ok(stack) => {
                    let len = (stack.len as usize).min(stack.frames.len());
                    let python = if stack.flags & UserStack::HAS_PYTHON != 0 {
                        python_frames(python_stacks, key.user_stack_hash)
                    } else {
                        Vec::new()
                    };
                    (Stack::Frames(stack.frames[..len].to_vec()), python)
                }
                Err(_) => (Stack::Lost, Vec::new()),
            })
            .clone(),
        STACK_NOT_COLLECTED => (Stack::NotCollected, Vec::new()),
        _ => (Stack::Lost, Vec::new()),
    };
    let out = totals.iter().map(|(key, _)| user(key)).collect();
    let hashes: Vec<u64> = user_stacks.keys().filter_map(Result::ok).collect();
    for hash in hashes {
        let _ = user_stacks.remove(&hash);
    }
    let hashes: Vec<u64> = python_stacks.keys().filter_map(Result::ok).collect();
    for hash in hashes {
        let _ = python_stacks.remove(&hash);
    }
    out
}

fn python_frames(python_stacks: &HashMap<MapData, u64, PythonStack>, hash: u64) -> Vec<u64> {
    match python_stacks.get(&hash, 0) {
        Ok(stack) => {
            let len = (stack.len as usize).min(stack.frames.len());
            stack.frames[..len].to_vec()
        }
        Err(_) => Vec::new(),
    }
}

pub(super) fn comm_string(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}
