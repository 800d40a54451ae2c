//! Targets: discovered label sets (after relabeling) turned into the series a process's samples
//! are pushed under, with pyroscope.ebpf's rules. A target with `__process_pid__` matches that
//! pid and wins; otherwise a process matches the target of its container, whose id comes from
//! `__container_id__`, else `__meta_kubernetes_pod_container_id` (runtime prefix stripped),
//! else `__meta_docker_container_id`, else `__meta_dockerswarm_task_container_id`. Unmatched
//! processes are dropped when `targets_only`, else they go to the default target.
//!
//! A target's series labels are its labels without the `__`-prefixed ones, plus
//! `service_name` inferred when absent. Resolution is a lookup in the current set, so a
//! process seen before its target appeared is matched as soon as the set is rebuilt. A
//! process that started and ended between two scans of a per-process provider is given its
//! target at the drain by [`LateTargets`], from what the agent knows of it.

use std::{
    collections::{HashMap, HashSet},
    fmt::Debug,
    sync::Arc,
};

// Re-exported for the modules that still import them from here.
use crate::labels::is_valid_label_name;
use crate::labels::{Labels, SERVICE_NAME};
use crate::process::ProcessInfo;

pub const PROCESS_PID: &str = "__process_pid__";
pub const CONTAINER_ID: &str = "__container_id__";
const K8S_CONTAINER_ID: &str = "__meta_kubernetes_pod_container_id";
const DOCKER_CONTAINER_ID: &str = "__meta_docker_container_id";
const SWARM_CONTAINER_ID: &str = "__meta_dockerswarm_task_container_id";
const K8S_SERVICE_NAME_ANNOTATION: &str =
    "__meta_kubernetes_pod_annotation_pyroscope_io_service_name";
const K8S_NAMESPACE: &str = "__meta_kubernetes_namespace";
const K8S_CONTAINER_NAME: &str = "__meta_kubernetes_pod_container_name";
const DOCKER_CONTAINER_NAME: &str = "__meta_docker_container_name";
const SWARM_SERVICE_LABEL: &str = "__meta_dockerswarm_container_label_service_name";
const SWARM_SERVICE_NAME: &str = "__meta_dockerswarm_service_name";
const UNSPECIFIED: &str = "unspecified";
const DEFAULT_SERVICE_NAME: &str = "ebpf/unspecified";

/// pyroscope.ebpf's `targets_only` and `default_target`.
#[derive(Clone, Debug)]
pub struct TargetOptions {
    pub targets_only: bool,
    /// Labels of the target unmatched processes go to when `targets_only` is false.
    pub default_target: Labels,
}

impl Default for TargetOptions {
    fn default() -> Self {
        Self {
            targets_only: true,
            default_target: Labels::new(),
        }
    }
}

/// Series labels of one target, shared by every process it matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// Without `__` labels, with `service_name`; sorted by name.
    pub labels: Labels,
}

impl Target {
    fn from_discovered(discovered: &Labels) -> Self {
        let mut labels: Labels = discovered
            .iter()
            .filter(|(k, _)| !k.starts_with("__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if labels.get(SERVICE_NAME).is_none_or(|v| v.is_empty()) {
            labels.insert(SERVICE_NAME.to_owned(), infer_service_name(discovered));
        }
        Self { labels }
    }

    pub fn service_name(&self) -> &str {
        self.labels
            .get(SERVICE_NAME)
            .map_or(UNSPECIFIED, String::as_str)
    }
}

/// Why a discovered label set was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("invalid label name {name:?}")]
    InvalidLabelName { name: String },
    #[error("label {name} has a value that is not valid UTF-8 or is too long")]
    InvalidLabelValue { name: String },
    #[error("{PROCESS_PID} is not a pid: {value:?}")]
    InvalidPid { value: String },
}

/// The label set a per-process provider (process discovery) would have published for a
/// process its last scan did not list, after relabeling: how a process that lived less than
/// one scan period is named at the drain. Implemented by `discovery::process`.
pub trait LateTargets: Debug + Send + Sync {
    /// `process`'s relabeled labels, or `None` when the rules drop it.
    fn labels_of(&self, process: &ProcessInfo) -> Option<Labels>;
}

/// The current targets, indexed for resolution.
#[derive(Debug, Default)]
pub struct TargetSet {
    by_pid: HashMap<u32, Arc<Target>>,
    by_container: HashMap<String, Arc<Target>>,
    default: Option<Arc<Target>>,
    active: usize,
    late: Option<Arc<dyn LateTargets>>,
    /// Pids the providers listed: not named late, whatever the rules did with them.
    listed: HashSet<u32>,
}

/// How [`TargetSet::resolve_process`] found a process's target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// A discovered target: the process's own, or its container's.
    Listed,
    /// Labels made at the drain by [`LateTargets`] for a process no scan listed.
    Late,
    /// The default target (`targets_only = false`).
    Default,
    /// None: the samples are dropped.
    Untargeted,
}

impl TargetSet {
    /// Builds the set; label sets that fail validation are returned with the reason and left
    /// out (the caller counts them).
    pub fn new(discovered: &[Labels], options: &TargetOptions) -> (Self, Vec<TargetError>) {
        let mut set = TargetSet::default();
        let mut rejected = Vec::new();
        for labels in discovered {
            if let Err(e) = validate(labels) {
                rejected.push(e);
                continue;
            }
            let target = Arc::new(Target::from_discovered(labels));
            if let Some(pid) = labels.get(PROCESS_PID) {
                match pid.parse::<u32>() {
                    Ok(pid) => {
                        set.by_pid.insert(pid, target);
                        set.active += 1;
                    }
                    Err(_) => rejected.push(TargetError::InvalidPid { value: pid.clone() }),
                }
                continue;
            }
            if let Some(id) = container_id(labels) {
                set.by_container.insert(id, target);
                set.active += 1;
            }
        }
        if !options.targets_only {
            let mut labels = options.default_target.clone();
            labels
                .entry(SERVICE_NAME.to_owned())
                .or_insert_with(|| DEFAULT_SERVICE_NAME.to_owned());
            set.default = Some(Arc::new(Target::from_discovered(&labels)));
        }
        (set, rejected)
    }

    /// Also names, with `late`, the processes that no provider listed: `listed` holds the
    /// pids the providers published (before relabeling), whose fate the rules decided.
    pub fn with_late(mut self, late: Option<Arc<dyn LateTargets>>, listed: HashSet<u32>) -> Self {
        self.late = late;
        self.listed = listed;
        self
    }

    /// The target of a process known by its snapshot: its pid target, else, for a process
    /// no provider listed, one made now by [`LateTargets`] when the set has them and the
    /// rules keep the process, else its container's, else the default.
    pub fn resolve_process(
        &self,
        pid: u32,
        process: Option<&ProcessInfo>,
    ) -> (Option<Arc<Target>>, Resolution) {
        let container = process.and_then(|p| p.container_id.as_deref());
        self.resolve_with(pid, container, || self.late_target(process?))
    }

    /// The target of a process: its pid target, else its container's, else the default.
    pub fn resolve(&self, pid: u32, container_id: Option<&str>) -> Option<Arc<Target>> {
        self.resolve_with(pid, container_id, || None).0
    }

    /// pid target, then `late`, then the container's target, then the default.
    fn resolve_with(
        &self,
        pid: u32,
        container_id: Option<&str>,
        late: impl FnOnce() -> Option<Arc<Target>>,
    ) -> (Option<Arc<Target>>, Resolution) {
        if let Some(target) = self.by_pid.get(&pid) {
            return (Some(target.clone()), Resolution::Listed);
        }
        if let Some(target) = late() {
            return (Some(target), Resolution::Late);
        }
        if let Some(target) = container_id.and_then(|id| self.by_container.get(id)) {
            return (Some(target.clone()), Resolution::Listed);
        }
        match &self.default {
            Some(target) => (Some(target.clone()), Resolution::Default),
            None => (None, Resolution::Untargeted),
        }
    }

    /// A pid target made from `process`'s late labels, as the scan's set would have it.
    fn late_target(&self, process: &ProcessInfo) -> Option<Arc<Target>> {
        if self.listed.contains(&process.pid) {
            return None;
        }
        let labels = self.late.as_ref()?.labels_of(process)?;
        validate(&labels).ok()?;
        labels
            .contains_key(PROCESS_PID)
            .then(|| Arc::new(Target::from_discovered(&labels)))
    }

    /// Targets that can match a process (pyroscope_ebpf_active_targets).
    pub fn active(&self) -> usize {
        self.active
    }
}

/// The container id a discovered label set names, in pyroscope.ebpf's order of precedence.
pub fn container_id(labels: &Labels) -> Option<String> {
    let non_empty = |k: &str| labels.get(k).filter(|v| !v.is_empty());
    if let Some(id) = non_empty(CONTAINER_ID) {
        return Some(id.clone());
    }
    if let Some(id) = non_empty(K8S_CONTAINER_ID) {
        // `containerd://<id>`, `docker://<id>`, `cri-o://<id>`.
        let id = id.split_once("://").map_or(id.as_str(), |(_, id)| id);
        return (!id.is_empty()).then(|| id.to_owned());
    }
    non_empty(DOCKER_CONTAINER_ID)
        .or_else(|| non_empty(SWARM_CONTAINER_ID))
        .cloned()
}

/// `service_name` for a target without one, as pyroscope.ebpf infers it.
pub fn infer_service_name(labels: &Labels) -> String {
    let non_empty = |k: &str| labels.get(k).filter(|v| !v.is_empty());
    if let Some(name) = non_empty(K8S_SERVICE_NAME_ANNOTATION) {
        return name.clone();
    }
    if let (Some(ns), Some(container)) = (non_empty(K8S_NAMESPACE), non_empty(K8S_CONTAINER_NAME)) {
        return format!("ebpf/{ns}/{container}");
    }
    non_empty(DOCKER_CONTAINER_NAME)
        .or_else(|| non_empty(SWARM_SERVICE_LABEL))
        .or_else(|| non_empty(SWARM_SERVICE_NAME))
        .cloned()
        .unwrap_or_else(|| UNSPECIFIED.to_owned())
}

/// Label values longer than this are refused, as Pyroscope's distributor does by default.
const MAX_LABEL_VALUE: usize = 2048;

fn validate(labels: &Labels) -> Result<(), TargetError> {
    for (name, value) in labels {
        if !is_valid_label_name(name) {
            return Err(TargetError::InvalidLabelName { name: name.clone() });
        }
        if !name.starts_with("__") && value.len() > MAX_LABEL_VALUE {
            return Err(TargetError::InvalidLabelValue { name: name.clone() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
