//! Relabel rules with the semantics of Prometheus' `relabel_config` (and so of Alloy's
//! `discovery.relabel` and `rule` blocks), so rules written for pyroscope.ebpf carry over.
//!
//! A rule list is applied to a target's label set in order; `keep`/`drop`-style actions can
//! drop the target, the others rewrite labels. Rules are validated when built (or
//! deserialized): a [`RelabelConfig`] that exists is one Prometheus would accept, so
//! [`process`] never fails and never panics.
//!
//! Label names follow Prometheus' legacy rule (`[a-zA-Z_][a-zA-Z0-9_]*`,
//! [`crate::labels::is_valid_label_name`]), the one Alloy's pyroscope components and the
//! Pyroscope push API expect. Regexes use Go's RE2 syntax and
//! `$` templates Go's `Regexp.Expand` rules, reproduced in [`go`].

#[cfg(test)]
mod config_tests;
mod go;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use md5::{Digest, Md5};
use regex::{Captures, Regex, RegexBuilder};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::labels::{Labels, is_valid_label_name};

/// What a rule does; names as in Prometheus, matched case-insensitively as it does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Action {
    /// Sets `target_label` to `replacement` expanded with the regex's groups, if it matches.
    #[default]
    Replace,
    /// Drops the target unless the joined source values match `regex`.
    Keep,
    /// Drops the target if the joined source values match `regex`.
    Drop,
    /// Drops the target unless the joined source values equal `target_label`'s value.
    KeepEqual,
    /// Drops the target if the joined source values equal `target_label`'s value.
    DropEqual,
    /// Sets `target_label` to the MD5 of the joined source values, modulo `modulus`.
    HashMod,
    /// Copies every label whose name matches `regex` to the name `replacement` expands to.
    LabelMap,
    /// Removes every label whose name matches `regex`.
    LabelDrop,
    /// Removes every label whose name does not match `regex`.
    LabelKeep,
    /// Sets `target_label` to the joined source values in lower case.
    Lowercase,
    /// Sets `target_label` to the joined source values in upper case.
    Uppercase,
}

impl Action {
    const ALL: [Action; 11] = [
        Action::Replace,
        Action::Keep,
        Action::Drop,
        Action::KeepEqual,
        Action::DropEqual,
        Action::HashMod,
        Action::LabelMap,
        Action::LabelDrop,
        Action::LabelKeep,
        Action::Lowercase,
        Action::Uppercase,
    ];

    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Replace => "replace",
            Action::Keep => "keep",
            Action::Drop => "drop",
            Action::KeepEqual => "keepequal",
            Action::DropEqual => "dropequal",
            Action::HashMod => "hashmod",
            Action::LabelMap => "labelmap",
            Action::LabelDrop => "labeldrop",
            Action::LabelKeep => "labelkeep",
            Action::Lowercase => "lowercase",
            Action::Uppercase => "uppercase",
        }
    }

    /// The actions that write to `target_label` and so need one.
    fn needs_target(self) -> bool {
        use Action::*;
        matches!(
            self,
            Replace | HashMod | Lowercase | Uppercase | KeepEqual | DropEqual
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = RelabelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| RelabelError::UnknownAction(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A rule as written in configuration, before validation. Field names and defaults are
/// Prometheus' and Alloy's.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelabelConfigSpec {
    /// Labels whose values are joined with `separator`; a missing label counts as "".
    pub source_labels: Vec<String>,
    /// Placed between the source values (default `;`).
    pub separator: String,
    /// Target of replace, hashmod, lowercase, uppercase; compared by keepequal/dropequal.
    pub target_label: String,
    /// RE2 syntax, matched against the whole joined value (anchored at both ends). JSON
    /// `null` means "" as in Prometheus, which matches only the empty string.
    #[serde(deserialize_with = "null_is_empty")]
    pub regex: String,
    /// Divisor for hashmod; required there, refused by the actions that take no modulus.
    pub modulus: u64,
    /// Value template for replace, name template for labelmap (default `$1`).
    pub replacement: String,
    pub action: Action,
}

const DEFAULT_SEPARATOR: &str = ";";
const DEFAULT_REGEX: &str = "(.*)";
const DEFAULT_REPLACEMENT: &str = "$1";

impl Default for RelabelConfigSpec {
    fn default() -> Self {
        RelabelConfigSpec {
            source_labels: Vec::new(),
            separator: DEFAULT_SEPARATOR.into(),
            target_label: String::new(),
            regex: DEFAULT_REGEX.into(),
            modulus: 0,
            replacement: DEFAULT_REPLACEMENT.into(),
            action: Action::Replace,
        }
    }
}

fn null_is_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// Why a rule was refused. Every variant names the offending field (see [`Self::field`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelabelError {
    #[error("unknown relabel action {0:?} in `action`")]
    UnknownAction(String),
    #[error("invalid `regex` {regex:?}: {reason}")]
    Regex { regex: String, reason: String },
    #[error("relabel configuration for hashmod requires a non-zero `modulus`")]
    ZeroModulus,
    #[error("relabel configuration for {0} action requires `target_label`")]
    MissingTargetLabel(Action),
    #[error("{label:?} is an invalid `target_label` for {action} action")]
    InvalidTargetLabel { action: Action, label: String },
    #[error("{replacement:?} is an invalid `replacement` for {action} action")]
    InvalidReplacement { action: Action, replacement: String },
    #[error("`{field}` can not be set for {action} action (it takes only {allowed})")]
    FieldNotAllowed {
        action: Action,
        field: &'static str,
        allowed: &'static str,
    },
}

impl RelabelError {
    /// The configuration field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            RelabelError::UnknownAction(_) => "action",
            RelabelError::Regex { .. } => "regex",
            RelabelError::ZeroModulus => "modulus",
            RelabelError::MissingTargetLabel(_) | RelabelError::InvalidTargetLabel { .. } => {
                "target_label"
            }
            RelabelError::InvalidReplacement { .. } => "replacement",
            RelabelError::FieldNotAllowed { field, .. } => field,
        }
    }
}

/// A validated rule with its compiled regex. Deserializes from the fields of
/// [`RelabelConfigSpec`] and is checked as it is read, so bad rules fail config loading.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(try_from = "RelabelConfigSpec", into = "RelabelConfigSpec")]
pub struct RelabelConfig {
    spec: RelabelConfigSpec,
    regex: Regex,
}

impl TryFrom<RelabelConfigSpec> for RelabelConfig {
    type Error = RelabelError;

    fn try_from(spec: RelabelConfigSpec) -> Result<Self, RelabelError> {
        RelabelConfig::new(spec)
    }
}

impl From<RelabelConfig> for RelabelConfigSpec {
    fn from(c: RelabelConfig) -> Self {
        c.spec
    }
}

/// Go's `regexp.Compile("^(?s:" + s + ")$")`: the whole value must match, `.` spans lines.
fn compile_anchored(pattern: &str) -> Result<Regex, RelabelError> {
    let fail = |reason: String| RelabelError::Regex {
        regex: pattern.to_owned(),
        reason,
    };
    // Translate the wrapped pattern, not the bare one, so text that reaches past the
    // wrapper in Go does so here too: an unterminated `\Q` swallows the `)$` and fails.
    let translated = go::translate_regex(&format!("^(?s:{pattern})$")).map_err(fail)?;
    RegexBuilder::new(&translated)
        // Go reads `\012` as octal; the regex crate only when asked.
        .octal(true)
        .build()
        .map_err(|e| fail(e.to_string().lines().last().unwrap_or_default().to_owned()))
}

/// A name that becomes valid once its `$1`/`${name}` references are filled with word
/// characters; Prometheus' `relabelTarget` pattern, with Go's ASCII `\w`.
fn is_valid_name_template(s: &str) -> bool {
    static TEMPLATE: LazyLock<Regex> = LazyLock::new(|| {
        let w = "[0-9A-Za-z_]";
        Regex::new(&format!(r"^(?:(?:[a-zA-Z_]|\$(?:\{{{w}+\}}|{w}+))+{w}*)+$"))
            .expect("static pattern")
    });
    TEMPLATE.is_match(s)
}

impl RelabelConfig {
    /// Compiles and validates a rule with the checks of Prometheus' `Config.Validate`, in
    /// its order, under legacy label-name validation.
    pub fn new(spec: RelabelConfigSpec) -> Result<Self, RelabelError> {
        use Action::*;
        let regex = compile_anchored(&spec.regex)?;
        let action = spec.action;
        if action == HashMod && spec.modulus == 0 {
            return Err(RelabelError::ZeroModulus);
        }
        if action.needs_target() && spec.target_label.is_empty() {
            return Err(RelabelError::MissingTargetLabel(action));
        }
        let bad_target = match action {
            // Replace may build its target from groups: `${1}_total`.
            Replace => !is_valid_name_template(&spec.target_label),
            HashMod | Lowercase | Uppercase | KeepEqual | DropEqual => {
                !is_valid_label_name(&spec.target_label)
            }
            _ => false,
        };
        if bad_target {
            return Err(RelabelError::InvalidTargetLabel {
                action,
                label: spec.target_label,
            });
        }
        if action == LabelMap && !is_valid_name_template(&spec.replacement) {
            return Err(RelabelError::InvalidReplacement {
                action,
                replacement: spec.replacement,
            });
        }
        let not_allowed = |field, allowed| {
            Err(RelabelError::FieldNotAllowed {
                action,
                field,
                allowed,
            })
        };
        if matches!(action, Lowercase | Uppercase | KeepEqual | DropEqual)
            && spec.replacement != DEFAULT_REPLACEMENT
        {
            return not_allowed("replacement", "`source_labels` and `target_label`");
        }
        if matches!(action, KeepEqual | DropEqual) {
            let allowed = "`source_labels` and `target_label`";
            if spec.regex != DEFAULT_REGEX {
                return not_allowed("regex", allowed);
            }
            if spec.modulus != 0 {
                return not_allowed("modulus", allowed);
            }
            if spec.separator != DEFAULT_SEPARATOR {
                return not_allowed("separator", allowed);
            }
        }
        if matches!(action, LabelDrop | LabelKeep) {
            let allowed = "`regex`";
            if !spec.source_labels.is_empty() {
                return not_allowed("source_labels", allowed);
            }
            if !spec.target_label.is_empty() {
                return not_allowed("target_label", allowed);
            }
            if spec.modulus != 0 {
                return not_allowed("modulus", allowed);
            }
            if spec.separator != DEFAULT_SEPARATOR {
                return not_allowed("separator", allowed);
            }
            if spec.replacement != DEFAULT_REPLACEMENT {
                return not_allowed("replacement", allowed);
            }
        }
        Ok(RelabelConfig { spec, regex })
    }

    /// The rule as configured.
    pub fn spec(&self) -> &RelabelConfigSpec {
        &self.spec
    }

    pub fn action(&self) -> Action {
        self.spec.action
    }

    fn expand(&self, template: &str, caps: &Captures<'_>) -> String {
        let mut out = String::new();
        go::expand(&mut out, template, caps);
        out
    }

    /// Applies the rule; false when it drops the target.
    fn apply(&self, b: &mut Builder) -> bool {
        use Action::*;
        let spec = &self.spec;
        let values: Vec<&str> = spec.source_labels.iter().map(|n| b.get(n)).collect();
        let val = values.join(&spec.separator);
        match spec.action {
            Keep => return self.regex.is_match(&val),
            Drop => return !self.regex.is_match(&val),
            KeepEqual => return b.get(&spec.target_label) == val,
            DropEqual => return b.get(&spec.target_label) != val,
            Replace => {
                // No match: nothing is written.
                let Some(caps) = self.regex.captures(&val) else {
                    return true;
                };
                let target = self.expand(&spec.target_label, &caps);
                // A target built from groups may not be a name: the rule does nothing.
                if is_valid_label_name(&target) {
                    let value = self.expand(&spec.replacement, &caps);
                    b.set(target, value);
                }
            }
            Lowercase => b.set(spec.target_label.clone(), go::to_lower(&val)),
            Uppercase => b.set(spec.target_label.clone(), go::to_upper(&val)),
            HashMod => {
                // The low 64 bits of the digest, big-endian, as Prometheus has always used.
                let digest = Md5::digest(val.as_bytes());
                let low: [u8; 8] = digest[8..].try_into().expect("MD5 is 16 bytes");
                let m = u64::from_be_bytes(low) % spec.modulus;
                b.set(spec.target_label.clone(), m.to_string());
            }
            LabelMap => {
                for (name, value) in b.snapshot() {
                    if !self.regex.is_match(&name) {
                        continue;
                    }
                    let new = self
                        .regex
                        .replace_all(&name, |c: &Captures<'_>| self.expand(&spec.replacement, c));
                    // Prometheus would write any string here; a name the push API refuses
                    // is skipped instead, as replace does with its target.
                    if is_valid_label_name(&new) {
                        b.set(new.into_owned(), value);
                    }
                }
            }
            LabelDrop | LabelKeep => {
                let keep_matching = spec.action == LabelKeep;
                for (name, _) in b.snapshot() {
                    if self.regex.is_match(&name) != keep_matching {
                        b.del(&name);
                    }
                }
            }
        }
        true
    }
}

/// Applies `configs` in order. Returns None when a rule drops the target, else the
/// rewritten labels.
pub fn process(labels: Labels, configs: &[RelabelConfig]) -> Option<Labels> {
    let mut b = Builder::new(labels);
    for c in configs {
        if !c.apply(&mut b) {
            return None;
        }
    }
    Some(b.finish())
}

/// Prometheus' `labels.Builder`, kept so label-iterating actions see labels in its order:
/// untouched input labels by name, then labels written by earlier rules in write order. That
/// order decides which value wins when `labelmap` maps two names onto one.
struct Builder {
    base: Labels,
    del: BTreeSet<String>,
    add: Vec<(String, String)>,
}

impl Builder {
    fn new(base: Labels) -> Self {
        Builder {
            base,
            del: BTreeSet::new(),
            add: Vec::new(),
        }
    }

    /// A label's value; missing labels read as "" as in Prometheus.
    fn get(&self, name: &str) -> &str {
        if let Some((_, v)) = self.add.iter().find(|(n, _)| n == name) {
            return v;
        }
        if self.del.contains(name) {
            return "";
        }
        self.base.get(name).map_or("", String::as_str)
    }

    /// Writes a label; an empty value removes it (an empty label is an absent label).
    fn set(&mut self, name: String, value: String) {
        if value.is_empty() {
            return self.del(&name);
        }
        match self.add.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.add.push((name, value)),
        }
    }

    fn del(&mut self, name: &str) {
        self.add.retain(|(n, _)| n != name);
        self.del.insert(name.to_owned());
    }

    /// The current labels, copied so the caller may write while iterating.
    fn snapshot(&self) -> Vec<(String, String)> {
        let shadowed = |n: &String| self.del.contains(n) || self.add.iter().any(|(a, _)| a == n);
        self.base
            .iter()
            .filter(|(n, _)| !shadowed(n))
            .chain(self.add.iter().map(|(n, v)| (n, v)))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    fn finish(self) -> Labels {
        let mut out = self.base;
        for name in &self.del {
            out.remove(name);
        }
        out.extend(self.add);
        out
    }
}
