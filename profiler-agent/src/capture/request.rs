//! The parameters of `GET /v1/profile`, checked and bounded. Error messages name the
//! parameter and the rule, never the value sent, so nothing from the request is echoed.

use std::{collections::HashMap, time::Duration};

use regex::{Regex, RegexBuilder};

/// Longest capture an operator may ask for.
pub const MAX_DURATION: Duration = Duration::from_secs(300);
pub const DEFAULT_DURATION: Duration = Duration::from_secs(30);
/// Shortest capture: below this a profile would hold a handful of samples at most.
pub const MIN_DURATION: Duration = Duration::from_millis(100);
pub const DEFAULT_SAMPLE_RATE: u64 = 97;
pub const MAX_SAMPLE_RATE: u64 = 999;
/// Bounds on the `command` regex: its source length and its compiled size.
pub const MAX_REGEX_LEN: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A `command` regex within the bounds: at most [`MAX_REGEX_LEN`] bytes of source and a
/// bounded compiled size. The API and `[[trigger]]` both build theirs here.
pub fn command_regex(source: &str) -> Result<Regex, CommandRegexError> {
    if source.len() > MAX_REGEX_LEN {
        return Err(CommandRegexError::TooLong);
    }
    RegexBuilder::new(source)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(CommandRegexError::Invalid)
}

#[derive(Debug, thiserror::Error)]
pub enum CommandRegexError {
    #[error("longer than 1024 bytes")]
    TooLong,
    #[error(transparent)]
    Invalid(regex::Error),
}

/// Which process to capture.
#[derive(Clone, Debug)]
pub enum Selector {
    Pid(u32),
    /// A regex over the command line (arguments joined by spaces).
    Command(Regex),
}

/// How the profile is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Gzipped pprof.
    Pprof,
    /// `root;...;leaf count` lines, heaviest first.
    Folded,
    /// An inferno flame graph.
    Svg,
}

#[derive(Clone, Debug)]
pub struct CaptureRequest {
    pub selector: Selector,
    pub duration: Duration,
    pub sample_rate: u64,
    pub format: Format,
}

/// A parameter that was refused, and why; the answer is a 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("parameter `{parameter}`: {reason}")]
pub struct BadRequest {
    pub parameter: &'static str,
    pub reason: &'static str,
}

const PARAMETERS: [&str; 5] = ["pid", "command", "duration", "sample_rate", "format"];

impl CaptureRequest {
    /// From the query string's parameters. `pid` wins over `command` when both are given.
    pub fn parse(query: &HashMap<String, String>) -> Result<Self, BadRequest> {
        if query.keys().any(|k| !PARAMETERS.contains(&k.as_str())) {
            return Err(BadRequest {
                parameter: "(unknown)",
                reason: "only pid, command, duration, sample_rate and format are accepted",
            });
        }
        let bad = |parameter, reason| BadRequest { parameter, reason };
        let selector = match (query.get("pid"), query.get("command")) {
            (Some(pid), _) => Selector::Pid(
                pid.parse()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or(bad("pid", "must be a process id (a positive integer)"))?,
            ),
            (None, Some(command)) => {
                if command.is_empty() || command.len() > MAX_REGEX_LEN {
                    return Err(bad("command", "must be a regex of 1 to 1024 bytes"));
                }
                Selector::Command(
                    command_regex(command)
                        .map_err(|_| bad("command", "is not a valid regex (or too large)"))?,
                )
            }
            (None, None) => return Err(bad("pid", "pid or command is required")),
        };
        let duration = match query.get("duration") {
            None => DEFAULT_DURATION,
            Some(d) => humantime::parse_duration(d)
                .map_err(|_| bad("duration", "must be a duration such as 30s or 2m"))?,
        };
        if !(MIN_DURATION..=MAX_DURATION).contains(&duration) {
            return Err(bad("duration", "must be between 100ms and 5m"));
        }
        let sample_rate = match query.get("sample_rate") {
            None => DEFAULT_SAMPLE_RATE,
            Some(r) => r
                .parse()
                .ok()
                .filter(|r| (1..=MAX_SAMPLE_RATE).contains(r))
                .ok_or(bad("sample_rate", "must be an integer between 1 and 999"))?,
        };
        let format = match query.get("format").map(String::as_str) {
            None | Some("pprof") => Format::Pprof,
            Some("folded") => Format::Folded,
            Some("svg") => Format::Svg,
            Some(_) => return Err(bad("format", "must be pprof, folded or svg")),
        };
        Ok(Self {
            selector,
            duration,
            sample_rate,
            format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<CaptureRequest, BadRequest> {
        let query = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CaptureRequest::parse(&query)
    }

    fn refused(pairs: &[(&str, &str)]) -> &'static str {
        parse(pairs).expect_err("should be refused").parameter
    }

    #[test]
    fn defaults() {
        let r = parse(&[("pid", "42")]).unwrap();
        assert!(matches!(r.selector, Selector::Pid(42)));
        assert_eq!(r.duration, DEFAULT_DURATION);
        assert_eq!(r.sample_rate, 97);
        assert_eq!(r.format, Format::Pprof);
    }

    #[test]
    fn pid_wins_over_command() {
        let r = parse(&[("pid", "7"), ("command", "(")]).unwrap();
        assert!(matches!(r.selector, Selector::Pid(7)));
        let r = parse(&[("command", "^java .*Main$"), ("format", "svg")]).unwrap();
        assert!(matches!(&r.selector, Selector::Command(re) if re.is_match("java a.Main")));
        assert_eq!(r.format, Format::Svg);
    }

    #[test]
    fn bounds_and_bad_values_name_the_parameter() {
        assert_eq!(refused(&[]), "pid");
        assert_eq!(refused(&[("pid", "0")]), "pid");
        assert_eq!(refused(&[("pid", "-1")]), "pid");
        assert_eq!(refused(&[("pid", "x<script>")]), "pid");
        assert_eq!(refused(&[("command", "(")]), "command");
        assert_eq!(refused(&[("command", "")]), "command");
        assert_eq!(refused(&[("command", &"a".repeat(1025))]), "command");
        // Compiles to far more than the size limit.
        assert_eq!(
            refused(&[("command", r"\w{1000}\w{1000}\w{1000}")]),
            "command"
        );
        assert_eq!(refused(&[("pid", "1"), ("duration", "soon")]), "duration");
        assert_eq!(refused(&[("pid", "1"), ("duration", "6m")]), "duration");
        assert_eq!(refused(&[("pid", "1"), ("duration", "1ms")]), "duration");
        assert_eq!(
            refused(&[("pid", "1"), ("sample_rate", "1000")]),
            "sample_rate"
        );
        assert_eq!(
            refused(&[("pid", "1"), ("sample_rate", "0")]),
            "sample_rate"
        );
        assert_eq!(refused(&[("pid", "1"), ("format", "html")]), "format");
        assert_eq!(refused(&[("pid", "1"), ("evil", "1")]), "(unknown)");
        let r = parse(&[("pid", "1"), ("duration", "5m"), ("sample_rate", "999")]).unwrap();
        assert_eq!((r.duration, r.sample_rate), (MAX_DURATION, 999));
    }

    #[test]
    fn messages_never_echo_the_value() {
        let e = parse(&[("pid", "<img src=x>")]).unwrap_err();
        assert!(!e.to_string().contains('<'), "{e}");
    }
}
