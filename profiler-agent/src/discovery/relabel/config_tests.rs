//! Go compatibility (templates, RE2 syntax, case mapping; expected values taken from Go
//! 1.19's regexp and strings packages), rule validation, and (de)serialization.

use serde_json::json;

use super::tests::{labels, refused, rules};
use super::*;

// ---- Go's Regexp.Expand, compared with Go 1.19 on (?P<first>.)(?P<rest>.*) and "abcd" ----

#[test]
fn expand_follows_go_template_rules() {
    let re = compile_anchored("(?P<first>.)(?P<rest>.*)").unwrap();
    let caps = re.captures("abcd").unwrap();
    let cases = [
        ("$1", "a"),
        ("${1}x", "ax"),
        ("$1x", ""), // the group named "1x", not group 1 then "x"
        ("$first_x", ""),
        ("$01", ""), // a leading zero makes it a name
        ("$10", ""),
        ("$0", "abcd"),
        ("$2$1", "bcda"),
        ("${first}${rest}", "abcd"),
        ("$$", "$"),
        ("$$1", "$1"),
        ("$", "$"),
        ("a$", "a$"),
        ("$1$", "a$"),
        ("${", "${"),
        ("${}", "${}"),
        ("${1", "${1"),
        ("$-", "$-"),
        ("${rest-x}", "${rest-x}"),
        ("$é", ""), // Unicode letters belong to names
        ("$١", ""), // and so do Unicode decimal digits, as names
        ("x${99999999999999999999}", "x"),
    ];
    for (template, want) in cases {
        let mut got = String::new();
        go::expand(&mut got, template, &caps);
        assert_eq!(got, want, "template {template:?}");
    }
}

// ---- RE2 syntax where the regex crate differs ----

fn matches(pattern: &str, input: &str) -> bool {
    compile_anchored(pattern).unwrap().is_match(input)
}

#[test]
fn perl_classes_and_word_boundaries_are_ascii() {
    assert!(matches(r"\d+", "123") && !matches(r"\d+", "٣٤"));
    assert!(matches(r"\w+", "Foo_1") && !matches(r"\w+", "café"));
    assert!(matches(r"\s", " ") && !matches(r"\s", "\u{a0}") && !matches(r"\s", "\u{b}"));
    assert!(matches(r"[\d-z]+", "9-z") && !matches(r"[\D]+", "1"));
    assert!(matches(r"\W+", "é") && matches(r"\S+", "é"));
    // é is not an ASCII word character, so there is a boundary between it and x.
    assert!(matches(r"(a)\b(.*)", "a b") && matches(r"é\bx", "éx"));
}

#[test]
fn brackets_have_no_set_operations_or_nesting() {
    assert!(matches("[a&&b]+", "a&b"));
    // `--b` is the range from - to b, not a set difference.
    assert!(matches("[a-z--b]+", "q-bA") && !matches("[a-z--b]+", ","));
    assert!(matches("[~]", "~") && matches("[[a]+", "[a"));
    assert!(matches("[]a]+", "]a]") && !matches("[^]a]+", "]"));
    assert!(matches("[[:alpha:]]+", "abc") && matches("[[:foo]+", "[:foo"));
    assert!(matches(r"[\x41-\x43]+", "ABC") && matches(r"[\012]", "\n"));
}

#[test]
fn braces_quoting_and_octal_as_in_go() {
    assert!(matches("a{", "a{") && matches("a{,5}", "a{,5}") && matches("a{01}", "a{01}"));
    assert!(matches("x{2}", "xx") && matches("a{1,2}", "aa"));
    assert!(matches(r"\Q.*\E", ".*") && !matches(r"\Q.*\E", "ab"));
    assert!(matches(r"\Qab\Ec*", "abcc") && matches(r"\012", "\n"));
    // An unterminated \Q swallows the anchoring `)$` in Go, so it does not compile.
    assert_eq!(
        refused(json!({"regex": r"\Qa{b", "target_label": "x"})).field(),
        "regex"
    );
}

#[test]
fn case_mapping_is_gos_one_to_one_mapping() {
    assert_eq!(go::to_upper("straße"), "STRAßE"); // not "STRASSE"
    assert_eq!(go::to_lower("İSTANBUL"), "istanbul"); // not "i̇stanbul"
    assert_eq!(go::to_lower("ΟΔΟΣ"), "οδοσ"); // no final-sigma rule
    assert_eq!(go::to_upper("ᾳ"), "ᾼ");
    assert_eq!(go::to_upper("ǆ ﬁ"), "Ǆ ﬁ");
}

// ---- validation ----

#[test]
fn invalid_rules_are_refused_naming_the_field() {
    let cases = [
        (json!({"action": "hashmod", "target_label": "h"}), "modulus"),
        (json!({"regex": "(", "target_label": "x"}), "regex"),
        (
            json!({"action": "labelmap", "replacement": "-${1}"}),
            "replacement",
        ),
        (
            json!({"action": "lowercase", "target_label": "l", "replacement": "x"}),
            "replacement",
        ),
        (
            json!({"action": "keepequal", "target_label": "t", "regex": "a"}),
            "regex",
        ),
        (
            json!({"action": "dropequal", "target_label": "t", "separator": "/"}),
            "separator",
        ),
        (
            json!({"action": "keepequal", "target_label": "t", "modulus": 2}),
            "modulus",
        ),
        (
            json!({"action": "labeldrop", "regex": "a", "source_labels": ["x"]}),
            "source_labels",
        ),
        (
            json!({"action": "labelkeep", "regex": "a", "target_label": "x"}),
            "target_label",
        ),
        (
            json!({"action": "labeldrop", "regex": "a", "replacement": "x"}),
            "replacement",
        ),
        (
            json!({"action": "labelkeep", "regex": "a", "separator": ","}),
            "separator",
        ),
    ];
    for (rule, field) in cases {
        let err = refused(rule.clone());
        assert_eq!(err.field(), field, "{rule}: {err}");
        assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
    }
}

#[test]
fn target_label_is_required_where_written() {
    for action in [
        "replace",
        "hashmod",
        "lowercase",
        "uppercase",
        "keepequal",
        "dropequal",
    ] {
        let err = refused(json!({"action": action, "modulus": 1}));
        assert_eq!(
            err,
            RelabelError::MissingTargetLabel(action.parse().unwrap())
        );
        assert_eq!(err.field(), "target_label");
    }
}

#[test]
fn target_label_names_are_checked() {
    // Prometheus' TestTargetLabelLegacyValidity, for replace (which allows $ references).
    let cases = [
        ("-label", false),
        ("label", true),
        ("label${1}", true),
        ("${1}label", true),
        ("${1}", true),
        ("${", false),
        ("$", false),
        ("${}", false),
        ("foo${", false),
        ("$1", true),
        ("asd$2asd", true),
        ("-foo${1}bar-", false),
        ("bar.foo${1}bar", false),
        ("_${1}_", true),
        ("foo${bar}foo", true),
    ];
    for (target, ok) in cases {
        let res = RelabelConfig::new(RelabelConfigSpec {
            target_label: target.into(),
            ..Default::default()
        });
        assert_eq!(res.is_ok(), ok, "{target:?}");
    }
    // The other writers take a plain name only.
    for action in [
        "lowercase",
        "uppercase",
        "keepequal",
        "dropequal",
        "hashmod",
    ] {
        let err = refused(json!({"action": action, "target_label": "${1}", "modulus": 1}));
        assert_eq!(err.field(), "target_label", "{action}");
    }
}

#[test]
fn labelmap_replacement_templates() {
    for ok in ["$1", "${1}", "__param_$1", "x"] {
        RelabelConfig::new(RelabelConfigSpec {
            action: Action::LabelMap,
            replacement: ok.into(),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
}

// ---- serde ----

#[test]
fn toml_rules_deserialize_with_defaults() {
    #[derive(Deserialize)]
    struct Config {
        relabel: Vec<RelabelConfig>,
    }
    let cfg: Config = toml::from_str(
        r#"
        [[relabel]]
        source_labels = ["__meta_docker_container_name"]
        regex = "/?(.*)"
        target_label = "service_name"

        [[relabel]]
        action = "LabelDrop"
        regex = "__meta_.*"

        [[relabel]]
        source_labels = ["__address__"]
        action = "hashmod"
        modulus = 4
        target_label = "__tmp_shard"
        "#,
    )
    .unwrap();
    let first = cfg.relabel[0].spec();
    assert_eq!(
        (first.action, first.separator.as_str()),
        (Action::Replace, ";")
    );
    assert_eq!(first.replacement, "$1");
    assert_eq!(cfg.relabel[1].action(), Action::LabelDrop);
    assert_eq!(cfg.relabel[1].spec().regex, "__meta_.*");
    assert_eq!(cfg.relabel[2].spec().modulus, 4);
    let input = labels(&[
        ("__meta_docker_container_name", "/web"),
        ("__address__", "a"),
    ]);
    let out = process(input, &cfg.relabel).unwrap();
    assert_eq!(out["service_name"], "web");
    assert!(!out.contains_key("__meta_docker_container_name"));
    assert!(out.contains_key("__tmp_shard"));
}

#[test]
fn deserializing_reports_bad_rules() {
    let err = |s: &str| toml::from_str::<RelabelConfig>(s).unwrap_err().to_string();
    assert!(err(r#"action = "uppercase""#).contains("`target_label`"));
    assert!(err(r#"action = "hashmod""#).contains("`modulus`"));
    assert!(err(r#"action = "nope""#).contains("unknown relabel action \"nope\""));
    assert!(err(r#"sources = ["a"]"#).contains("unknown field `sources`"));
    assert!(err(r#"regex = "[a""#).contains("`regex`"));
}

#[test]
fn json_rules_round_trip_and_null_regex_is_empty() {
    let rs = rules(json!([{"regex": null, "source_labels": ["a"], "action": "KEEP"}]));
    assert_eq!(rs[0].spec().regex, "");
    assert_eq!(process(labels(&[]), &rs), Some(labels(&[])));
    assert_eq!(process(labels(&[("a", "x")]), &rs), None);
    let out = serde_json::to_value(&rs[0]).unwrap();
    assert_eq!(out["action"], "keep");
    assert_eq!(out["separator"], ";");
    let again: RelabelConfig = serde_json::from_value(out).unwrap();
    assert_eq!(again.spec(), rs[0].spec());
}
