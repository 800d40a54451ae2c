use super::*;

fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
    AgentConfig::parse(text, "test.toml", &|name| match name {
        "NODE" => Some("node-a".to_owned()),
        "TOKEN" => Some("s3cret".to_owned()),
        _ => None,
    })
}

fn field_of(text: &str) -> String {
    match parse(text) {
        Err(e) => e.field().unwrap_or("<none>").to_owned(),
        Ok(_) => panic!("accepted: {text}"),
    }
}

#[test]
fn empty_file_gives_pyroscope_ebpf_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.collect_interval, Duration::from_secs(15));
    assert_eq!(c.sample_rate, 97);
    assert_eq!(
        (
            c.pid_cache_size,
            c.build_id_cache_size,
            c.same_file_cache_size
        ),
        (32, 64, 8)
    );
    assert_eq!((c.container_id_cache_size, c.cache_rounds), (1024, 3));
    assert!(c.targets_only && c.collect_user_profile && c.collect_kernel_profile);
    assert_eq!(c.comm, CommMode::Label);
    assert_eq!(c.server.listen_address.to_string(), "127.0.0.1:4100");
    assert_eq!(
        c.write.directory.as_deref(),
        Some(Path::new(DEFAULT_DIRECTORY))
    );
}

#[test]
fn the_documented_example_and_the_embedded_default_parse() {
    // The example's secret files, made real in a scratch directory.
    let dir = tempfile::tempdir().unwrap();
    for file in ["token", "password"] {
        std::fs::write(dir.path().join(file), "x\n").unwrap();
    }
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("ca.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("client.pem"), cert.cert.pem()).unwrap();
    let key = cert.signing_key.serialize_pem();
    std::fs::write(dir.path().join("client-key.pem"), key).unwrap();
    let example = include_str!("../../../config/agent.toml")
        .replace("/etc/profiler/", &format!("{}/", dir.path().display()));
    let c = AgentConfig::parse(&example, "agent.toml", &|name| Some(format!("<{name}>")))
        .unwrap_or_else(|e| panic!("config/agent.toml: {e}"));
    assert_eq!(c.write.endpoint.len(), 3);
    assert_eq!(c.trigger.len(), 1);
    assert_eq!(c.trigger[0].tags["team"], "payments");
    let shown = c.to_toml();
    assert!(
        !shown.contains("<TENANT>") && !shown.contains("<DATAKIT_TOKEN>"),
        "{shown}"
    );
    assert_eq!(c.sample_rate, 97);
    assert!(c.discovery.docker.is_some() && c.discovery.process.is_some());
    let d = AgentConfig::embedded_default();
    assert!(!d.targets_only);
    assert_eq!(d.write.directory.as_deref(), Some(Path::new("./profiles")));
}

#[test]
fn unknown_keys_name_their_field() {
    assert_eq!(field_of("sample_rat = 5"), "sample_rat");
    assert_eq!(field_of("[server]\nlisten = \"x\""), "server.listen");
    assert_eq!(
        field_of("[discovery.docker]\nhots = \"unix:///x\""),
        "discovery.docker.hots"
    );
    assert_eq!(
        field_of("[[relabel]]\nactoin = \"keep\""),
        "relabel[0].actoin"
    );
}

#[test]
fn bad_values_name_their_field() {
    assert_eq!(
        field_of("collect_interval = \"15 parsecs\""),
        "collect_interval"
    );
    assert_eq!(field_of("collect_interval = \"0s\""), "collect_interval");
    assert_eq!(field_of("sample_rate = 0"), "sample_rate");
    assert_eq!(field_of("sample_rate = \"fast\""), "sample_rate");
    assert_eq!(field_of("demangle = \"pretty\""), "demangle");
    assert_eq!(field_of("comm = \"sometimes\""), "comm");
    assert_eq!(field_of("pid_cache_size = 0"), "pid_cache_size");
    assert_eq!(
        field_of("[server]\nlisten_address = \"nowhere\""),
        "server.listen_address"
    );
    assert_eq!(
        field_of("[discovery.docker]\nhost = \"ftp://x\""),
        "discovery.docker.host"
    );
    assert_eq!(
        field_of("[[relabel]]\naction = \"replace\"\nregex = \"(\""),
        "relabel[0]"
    );
    assert_eq!(
        field_of("[[targets]]\n\"bad-name\" = \"x\""),
        "targets[0].bad-name"
    );
    assert_eq!(
        field_of("collect_user_profile = false\ncollect_kernel_profile = false"),
        "collect_user_profile"
    );
}

#[test]
fn write_errors_name_their_field() {
    assert_eq!(
        field_of("[[write.endpoint]]\nurl = \"not a url\""),
        "write.endpoint[0].url"
    );
    assert_eq!(
        field_of(
            "[[write.endpoint]]\nurl = \"http://x\"\nbearer_token_file = \"/nonexistent/token\""
        ),
        "write.endpoint[0].bearer_token_file"
    );
    assert_eq!(
        field_of("[[write.endpoint]]\nurl = \"http://x\"\nremote_timeout = \"soon\""),
        "write.endpoint[0].remote_timeout"
    );
    assert_eq!(
        field_of("[[write.endpoint]]\nurl = \"http://x\"\nprotocol = \"smtp\""),
        "write.endpoint[0].protocol"
    );
}

#[test]
fn secrets_are_redacted_in_the_effective_config() {
    let c = parse("[[write.endpoint]]\nurl = \"http://x\"\nbearer_token = \"${TOKEN}\"").unwrap();
    let shown = c.to_toml();
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
}

#[test]
fn syntax_errors_say_where() {
    let e = parse("sample_rate = = 3").unwrap_err();
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn environment_variables_expand_in_strings() {
    let c = parse(
        "[discovery.kubernetes]\nnode_name = \"${NODE}\"\n\
         [default_target]\nservice_name = \"svc-${UNSET:-fallback}-$$1\"",
    )
    .unwrap();
    let k8s = c.discovery.kubernetes.unwrap();
    assert_eq!(k8s.node_name.as_deref(), Some("node-a"));
    assert_eq!(c.default_target["service_name"], "svc-fallback-$1");
    assert_eq!(
        field_of("[discovery.kubernetes]\nnode_name = \"${MISSING}\""),
        "discovery.kubernetes.node_name"
    );
    let e = parse("[[targets]]\nservice_name = \"${MISSING}\"").unwrap_err();
    assert!(e.to_string().contains("MISSING is not set"), "{e}");
}

#[test]
fn relabel_templates_are_not_environment_variables() {
    let c = parse(
        "[[relabel]]\nsource_labels = [\"a\"]\ntarget_label = \"b\"\nreplacement = \"${1}-x\"",
    )
    .unwrap();
    assert_eq!(c.relabel[0].spec().replacement, "${1}-x");
}

#[test]
fn check_config_output_parses_back() {
    let c = parse("sample_rate = 49\n[default_target]\nservice_name = \"x\"").unwrap();
    let again = parse(&c.to_toml()).unwrap_or_else(|e| panic!("{e}\n{}", c.to_toml()));
    assert_eq!(again.sample_rate, 49);
    assert_eq!(again.collect_interval, c.collect_interval);
}

#[test]
fn capture_api_on_a_public_address_needs_a_token() {
    let public = "[server]\nlisten_address = \"0.0.0.0:4100\"\n[capture]\nenabled = true\n";
    assert_eq!(field_of(public), "capture.bearer_token");
    // ${VAR:-} unset is no token either.
    assert_eq!(
        field_of(&format!("{public}bearer_token = \"${{UNSET:-}}\"\n")),
        "capture.bearer_token"
    );
    let c = parse(&format!("{public}bearer_token = \"${{TOKEN}}\"\n")).unwrap();
    assert!(c.capture.enabled);
    assert!(!c.to_toml().contains("s3cret"), "the token is redacted");
    assert!(
        parse("[capture]\nenabled = true\n").is_ok(),
        "loopback by default"
    );
    assert_eq!(
        field_of("[capture]\nmax_concurrent = 0\n"),
        "capture.max_concurrent"
    );
    assert_eq!(field_of("[capture]\nenable = true\n"), "capture.enable");
}

#[test]
fn trigger_errors_name_their_field() {
    assert_eq!(
        field_of("[[trigger]]\nservice = \"a\"\n"),
        "trigger[0].cpu_usage_percent"
    );
    assert_eq!(
        field_of(
            "[[trigger]]\nmem_usage_mb = 1\n[[trigger]]\nmem_usage_mb = 1\ncooldown = \"0s\"\n"
        ),
        "trigger[1].cooldown"
    );
    assert_eq!(
        field_of("[[trigger]]\nmem_usage_mb = 1\ncommand = \"[\"\n"),
        "trigger[0].command"
    );
    assert_eq!(field_of("[[trigger]]\ncpu = 1\n"), "trigger[0].cpu");
    assert_eq!(field_of("[capture]\nkeep = 0\n"), "capture.keep");
}

#[test]
fn url_passwords_are_redacted_in_syntax_errors() {
    let err = parse("[[write.endpoint]]\nurl = \"https://alice:s3cret@host/\" oops")
        .unwrap_err()
        .to_string();
    assert!(!err.contains("s3cret"), "{err}");
}

/// The embedded default names a process after its executable's file name, or after its comm
/// when the executable is a memfd or was deleted, and leaves containers to their targets.
#[test]
fn the_embedded_default_names_processes() {
    use crate::discovery::{process, relabel};
    let rules = AgentConfig::embedded_default().relabel;
    let name = |exe: &str, comm: &str| {
        let labels: crate::labels::Labels = [
            (crate::targets::PROCESS_PID, "42"),
            (process::EXE, exe),
            (process::COMM, comm),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        relabel::process(labels, &rules).map(|l| l.get("service_name").cloned())
    };
    let named = |s: &str| Some(Some(s.to_owned()));
    assert_eq!(name("/usr/bin/gzip", "gzip"), named("gzip"));
    assert_eq!(
        name("/opt/app/bin/server-v2", "server-v2"),
        named("server-v2")
    );
    assert_eq!(
        name("/memfd:sealed-91173221a7ea (deleted)", "node-jit"),
        named("node-jit")
    );
    assert_eq!(
        name("/memfd:runc (deleted)", "runc:[2:INIT]"),
        named("runc:[2:INIT]")
    );
    assert_eq!(
        name("/usr/bin/old-tool (deleted)", "old-tool"),
        named("old-tool")
    );
    // Without a comm (the process went away mid-read) a deleted file keeps its file name.
    assert_eq!(
        relabel::process(
            [
                (crate::targets::PROCESS_PID.to_owned(), "42".to_owned()),
                (
                    process::EXE.to_owned(),
                    "/usr/bin/old-tool (deleted)".to_owned()
                ),
            ]
            .into_iter()
            .collect(),
            &rules
        )
        .and_then(|l| l.get("service_name").cloned()),
        Some("old-tool".to_owned())
    );
    // Without an executable (gone before the agent read it), its comm.
    assert_eq!(name("", "cc1"), named("cc1"));
    // A process in a container is its container target's.
    let mut in_container: crate::labels::Labels = [(process::EXE, "/usr/bin/gzip")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    in_container.insert(crate::targets::CONTAINER_ID.to_owned(), "abc123".to_owned());
    assert_eq!(relabel::process(in_container, &rules), None);
}

/// The README's cell for an Alloy default.
fn alloy_cell(default: Option<&str>) -> String {
    match default {
        None => "—".to_owned(),
        Some("") => "no default".to_owned(),
        Some("required") => "required".to_owned(),
        Some(value) => format!("`{value}`"),
    }
}

/// The README's cell for what this agent does, its default from `defaults`.
fn ours_cell(argument: &alloy::AlloyArgument, defaults: &toml::Table) -> String {
    use alloy::Support;
    let default = || {
        let value = defaults
            .get(argument.name)
            .unwrap_or_else(|| panic!("{} has no default", argument.name));
        format!("`{value}`")
    };
    match argument.support {
        Support::Same => default(),
        Support::Deprecated { .. } => format!("{} (warns: deprecated)", default()),
        Support::Ignored { .. } => "ignored (warns)".to_owned(),
        Support::NotBuilt { off: Some(off), .. } => format!("refused unless `{off}`"),
        Support::NotBuilt { off: None, .. } => "refused".to_owned(),
        Support::Elsewhere { instead } => format!("refused: use `{instead}`"),
    }
}

#[test]
fn the_readme_alloy_table_matches_the_arguments_and_our_defaults() {
    let defaults = match toml::Value::try_from(AgentConfig::default()).unwrap() {
        toml::Value::Table(t) => t,
        other => panic!("{other:?}"),
    };
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("<!-- alloy-arguments:start -->")
        .expect("README has the Alloy table");
    let end = readme.find("<!-- alloy-arguments:end -->").unwrap();
    let rows: Vec<Vec<String>> = readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect();
    let expected: Vec<String> = alloy::ARGUMENTS
        .iter()
        .map(|a| {
            format!(
                "| `{}` | {} | {} | {} |",
                a.name,
                alloy_cell(a.legacy),
                alloy_cell(a.current),
                ours_cell(a, &defaults)
            )
        })
        .collect();
    let found: Vec<String> = rows
        .iter()
        .map(|r| format!("| {} |", r[..4.min(r.len())].join(" | ")))
        .collect();
    assert_eq!(
        found, expected,
        "README's Alloy table (first four columns) drifted"
    );
    // Where ours differs from current Alloy, the last column says why.
    for (row, argument) in rows.iter().zip(alloy::ARGUMENTS) {
        let differs = alloy_cell(argument.current) != ours_cell(argument, &defaults);
        assert!(
            !differs || row.get(4).is_some_and(|why| why.len() > 3),
            "README's Alloy table: say why `{}` differs",
            argument.name
        );
    }
    // And config/agent.toml shows the same defaults for the arguments it has.
    let example: toml::Table = toml::from_str(include_str!("../../../config/agent.toml")).unwrap();
    for argument in alloy::ARGUMENTS {
        let implemented = matches!(
            argument.support,
            alloy::Support::Same | alloy::Support::Deprecated { .. }
        );
        if implemented && argument.name != "targets" {
            assert_eq!(
                example.get(argument.name).map(ToString::to_string),
                defaults.get(argument.name).map(ToString::to_string),
                "config/agent.toml's {}",
                argument.name
            );
        }
    }
}

#[test]
fn alloy_arguments_are_honoured_warned_dropped_or_refused() {
    let parse = |text: &str| AgentConfig::parse(text, "test", &|_| None);
    // Current names we implement: no warning.
    let c = parse("kernel_frames = false\ncomm = \"none\"\npid_label = true").unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert!(!c.collect_kernel() && c.collect_user_profile);
    // Deprecated: honoured, with a warning naming the replacement.
    let c = parse("collect_kernel_profile = false\npid_cache_size = 7").unwrap();
    assert!(!c.collect_kernel());
    assert_eq!(c.pid_cache_size, 7);
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("`collect_kernel_profile`") && w.contains("kernel_frames"))
    );
    // Legacy arguments without meaning here: dropped with a warning.
    let c = parse("pid_map_size = 2048\nsymbols_map_size = 16384").unwrap();
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    // Not built: accepted at their off value, refused otherwise, naming the field.
    let c = parse("python_enabled = false\noff_cpu_threshold = 0\ngo_enabled = true").unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    for text in [
        "off_cpu_threshold = 0.5",
        "probe_links = [\"kprobe:foo\"]",
        "forward_to = []",
    ] {
        let error = parse(text).expect_err(text);
        let field = text.split(' ').next().unwrap();
        assert_eq!(error.field(), Some(field), "{text}: {error}");
    }
    // Both kinds of stack turned off: refused.
    assert_eq!(
        parse("collect_user_profile = false\nkernel_frames = false")
            .unwrap_err()
            .field(),
        Some("collect_user_profile")
    );
}
