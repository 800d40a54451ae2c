//! Label sets and the rules for their names, in one place for every stage: [`Labels`] (a
//! discovered target's, a series', a capture's), [`SERVICE_NAME`], Prometheus' legacy
//! label-name rule ([`is_valid_label_name`]; [`check_label_name`] adds the agent's
//! reservation of `__` names for names a user sets), and [`sanitize_label_name`], which
//! turns a discovered name (a container label, a pod label or annotation) into a valid one
//! as Prometheus does. Label values become file names only in the directory sink
//! (`crate::write::directory`), under its own rules.

use std::collections::BTreeMap;

/// A label set: name to value, sorted by name as Prometheus keeps labels.
pub type Labels = BTreeMap<String, String>;

/// The label naming the service a series or capture belongs to.
pub const SERVICE_NAME: &str = "service_name";

/// Whether `name` is a label name under Prometheus' legacy rule `[a-zA-Z_][a-zA-Z0-9_]*`,
/// the one Alloy's pyroscope components and the Pyroscope push API expect.
pub fn is_valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A label name a user sets on what the agent sends (external labels, trigger tags): valid,
/// and not one of the `__` names reserved for the agent.
pub fn check_label_name(name: &str) -> Result<(), &'static str> {
    if !is_valid_label_name(name) {
        return Err("not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*)");
    }
    if name.starts_with("__") {
        return Err("names starting with __ are reserved");
    }
    Ok(())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_name_rule() {
        for ok in ["a", "_a", "_a1", "A_9", "__meta_x", "service_name"] {
            assert!(is_valid_label_name(ok), "{ok}");
        }
        for bad in ["", "9a", "1a", "a-b", "a.b", "ä", "é", "a b"] {
            assert!(!is_valid_label_name(bad), "{bad}");
        }
    }

    #[test]
    fn user_label_names_are_valid_and_not_reserved() {
        assert_eq!(check_label_name("cluster"), Ok(()));
        assert_eq!(check_label_name("_x"), Ok(()));
        assert!(
            check_label_name("bad-name")
                .unwrap_err()
                .contains("not a valid")
        );
        assert!(check_label_name("").is_err());
        assert!(
            check_label_name("__name__")
                .unwrap_err()
                .contains("reserved")
        );
    }

    #[test]
    fn sanitizes_label_names_like_prometheus() {
        assert_eq!(
            sanitize_label_name("app.kubernetes.io/name"),
            "app_kubernetes_io_name"
        );
        assert_eq!(
            sanitize_label_name("com.docker.compose.project"),
            "com_docker_compose_project"
        );
        assert_eq!(sanitize_label_name("a-b c:d"), "a_b_c_d");
        assert_eq!(sanitize_label_name("a-b_c9"), "a_b_c9");
        assert_eq!(sanitize_label_name("Already_OK_09"), "Already_OK_09");
        // One underscore per character, not per UTF-8 byte (Go's regexp works on runes).
        assert_eq!(sanitize_label_name("café"), "caf_");
        assert_eq!(sanitize_label_name("ünï"), "_n_");
        assert_eq!(sanitize_label_name("9lives"), "9lives");
        assert_eq!(sanitize_label_name(""), "");
    }
}
