//! Where the label sets attached to profiles come from and how they are rewritten: providers
//! publish their full current targets on a watch channel (`docker`, `kubernetes`, `process`
//! scans, static targets from config), and `relabel` applies Prometheus relabel rules before
//! `crate::targets` resolves processes to them.

pub mod docker;
pub mod kubernetes;
pub mod manager;
pub mod process;
pub mod relabel;

/// Prometheus' `strutil.SanitizeLabelName`, for label names built from discovered names
/// (container labels, pod labels and annotations): every character outside `[a-zA-Z0-9_]`
/// becomes `_`, one per character, not per byte.
pub fn sanitize_label_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
