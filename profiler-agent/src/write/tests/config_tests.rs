//! The `[write]` table: TOML with defaults, validation naming the field, secrets redacted.

use std::{collections::BTreeMap, time::Duration};

use super::*;
use crate::write::{BasicAuth, Secret};

#[test]
fn toml_with_defaults() {
    let text = r#"
        external_labels = { cluster = "c1" }
        [[endpoint]]
        url = "http://pyroscope:4040"
        headers = { "X-Scope-OrgID" = "t1" }
        [[endpoint]]
        name = "dk"
        url = "http://datakit:9529"
        protocol = "datakit"
        remote_timeout = "3s"
        min_backoff_period = "100ms"
        max_backoff_period = "1m"
        max_backoff_retries = 2
    "#;
    let config: WriteConfig = toml::from_str(text).unwrap();
    config.validate().unwrap();
    assert_eq!(config.queue_size, 16);
    let ep = &config.endpoint[0];
    assert_eq!(ep.protocol, Protocol::Push);
    assert_eq!(ep.remote_timeout, Duration::from_secs(10));
    assert_eq!(ep.min_backoff_period, Duration::from_millis(500));
    assert_eq!(ep.max_backoff_period, Duration::from_secs(300));
    assert_eq!(ep.max_backoff_retries, 10);
    assert_eq!(ep.headers["X-Scope-OrgID"].expose(), "t1");
    assert_eq!(config.endpoint[1].remote_timeout, Duration::from_secs(3));
    assert_eq!(config.endpoint_names(), ["pyroscope:4040", "dk"]);
    assert!(toml::from_str::<WriteConfig>("[[endpoint]]\nurl = \"http://x\"\nbogus = 1").is_err());
    assert!(
        toml::from_str::<WriteConfig>("[[endpoint]]\nurl = \"http://x\"\nremote_timeout = \"0s\"")
            .is_err()
    );
}

#[test]
fn default_names_tell_endpoints_on_one_host_apart() {
    let config = WriteConfig {
        endpoint: vec![
            endpoint("http://h:1/a", Protocol::Push),
            endpoint("http://h:1/b", Protocol::Ingest),
            endpoint("https://other", Protocol::Push),
        ],
        ..Default::default()
    };
    assert_eq!(config.endpoint_names(), ["h:1#0", "h:1#1", "other"]);
}

fn field_of(config: &WriteConfig) -> String {
    config.validate().expect_err("an invalid config").field
}

#[test]
fn validate_names_the_field() {
    let ok = endpoint("http://localhost:4040", Protocol::Push);
    let mut config = WriteConfig {
        endpoint: vec![ok.clone(), endpoint("not a url", Protocol::Push)],
        ..Default::default()
    };
    assert_eq!(field_of(&config), "write.endpoint[1].url");
    config.endpoint[1].url = "ftp://host/".into();
    assert_eq!(field_of(&config), "write.endpoint[1].url");

    let mut missing = ok.clone();
    missing.bearer_token_file = Some("/nonexistent/token".into());
    let config = one_endpoint(missing);
    let err = config.validate().unwrap_err();
    assert_eq!(err.field, "write.endpoint[0].bearer_token_file");
    assert!(err.reason.contains("/nonexistent/token"), "{err}");
    // start refuses it the same way, before spawning anything.
    let metrics = Arc::new(WriteMetrics::default());
    assert_eq!(
        Writer::start(&config, metrics).err().unwrap().field,
        "write.endpoint[0].bearer_token_file"
    );

    let mut header = ok.clone();
    header.headers = BTreeMap::from([("bad header".to_string(), Secret::new("v"))]);
    assert_eq!(
        field_of(&one_endpoint(header)),
        "write.endpoint[0].headers.bad header"
    );

    let mut basic = ok.clone();
    basic.basic_auth = Some(BasicAuth {
        username: "u".into(),
        password: None,
        password_file: Some("/nonexistent/pw".into()),
    });
    assert_eq!(
        field_of(&one_endpoint(basic)),
        "write.endpoint[0].basic_auth.password_file"
    );

    let mut ca = ok.clone();
    ca.tls.ca_file = Some("/nonexistent/ca.pem".into());
    assert_eq!(field_of(&one_endpoint(ca)), "write.endpoint[0].tls.ca_file");

    let mut key = ok.clone();
    key.tls.cert_file = Some("/nonexistent/cert.pem".into());
    assert_eq!(
        field_of(&one_endpoint(key)),
        "write.endpoint[0].tls.key_file"
    );

    let mut backoff = ok.clone();
    backoff.min_backoff_period = Duration::from_secs(600);
    assert_eq!(
        field_of(&one_endpoint(backoff)),
        "write.endpoint[0].min_backoff_period"
    );

    let mut both = ok.clone();
    both.bearer_token = Some(Secret::new("a"));
    both.basic_auth = Some(BasicAuth {
        username: "u".into(),
        password: Some(Secret::new("p")),
        password_file: None,
    });
    assert_eq!(
        field_of(&one_endpoint(both)),
        "write.endpoint[0].basic_auth"
    );

    let mut dup = ok.clone();
    dup.name = Some("x".into());
    let config = WriteConfig {
        endpoint: vec![dup.clone(), dup],
        ..Default::default()
    };
    assert_eq!(field_of(&config), "write.endpoint[1].name");

    let config = WriteConfig {
        external_labels: labels(&[("bad-name", "v")]),
        ..Default::default()
    };
    assert_eq!(field_of(&config), "write.external_labels.bad-name");
    let config = WriteConfig {
        queue_size: 0,
        ..Default::default()
    };
    assert_eq!(field_of(&config), "write.queue_size");
}

#[test]
fn secrets_never_print() {
    let mut ep = endpoint("http://localhost:4040", Protocol::Push);
    ep.bearer_token = Some(Secret::new("tok-SECRET-1"));
    ep.headers = BTreeMap::from([("Authorization".to_string(), Secret::new("hdr-SECRET-2"))]);
    ep.basic_auth = Some(BasicAuth {
        username: "user".into(),
        password: Some(Secret::new("pw-SECRET-3")),
        password_file: None,
    });
    let config = one_endpoint(ep);
    let outputs = [
        format!("{config:?}"),
        format!("{config:#?}"),
        serde_json::to_string(&config).unwrap(),
        toml::to_string(&config).unwrap(),
    ];
    for out in outputs {
        assert!(!out.contains("SECRET"), "{out}");
        assert!(out.contains("<redacted>"), "{out}");
        assert!(out.contains("user"), "{out}");
    }
    let err = WriteConfigError::new("write.endpoint[0].url", "bad");
    assert_eq!(err.to_string(), "write.endpoint[0].url: bad");
}

#[test]
fn metrics_use_pyroscope_write_names() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = WriteMetrics::register(&mut registry);
    metrics.sent("ep", 2, 100);
    metrics.dropped("ep", crate::write::DropReason::QueueFull, 1, 50);
    metrics.retried("ep");
    metrics.observe_latency("ep", "200", 0.1);
    metrics.observe_fanout(0.2);
    metrics.set_queue_depth("ep", 3);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for want in [
        r#"pyroscope_write_sent_bytes_total{endpoint="ep"} 100"#,
        r#"pyroscope_write_sent_profiles_total{endpoint="ep"} 2"#,
        r#"pyroscope_write_dropped_bytes_total{endpoint="ep",reason="queue_full"} 50"#,
        r#"pyroscope_write_dropped_profiles_total{endpoint="ep",reason="queue_full"} 1"#,
        r#"pyroscope_write_retries_total{endpoint="ep"} 1"#,
        r#"pyroscope_write_latency_count{endpoint="ep",status="200"} 1"#,
        "pyroscope_fanout_latency_count 1",
        r#"profiler_write_queue_depth{endpoint="ep"} 3"#,
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
}

#[test]
fn url_passwords_are_redacted() {
    use crate::write::config::{redact_url, redact_urls};
    assert_eq!(
        redact_url("https://alice:s3cret@pyroscope:4040/base?x=1"),
        "https://alice:<redacted>@pyroscope:4040/base?x=1"
    );
    // No password, no userinfo, no scheme: as they are.
    for url in [
        "https://alice@host/",
        "http://host:4040/a@b",
        "host:1",
        "http://[::1]:80/",
    ] {
        assert_eq!(redact_url(url), url);
    }
    // A password holding `@` (unencoded, so not a valid URL) is still hidden whole.
    assert_eq!(redact_url("http://u:p@ss@h/"), "http://u:<redacted>@h/");
    assert_eq!(
        redact_urls("bad \"http://u:pw@h\" and 'ftp://v:x@[::1]:21/p' end"),
        "bad \"http://u:<redacted>@h\" and 'ftp://v:<redacted>@[::1]:21/p' end"
    );
}

#[test]
fn url_passwords_never_reach_check_config_or_errors() {
    let mut config: WriteConfig =
        toml::from_str("[[endpoint]]\nurl = \"https://alice:s3cret@pyroscope:4040/\"").unwrap();
    config.validate().unwrap();
    let shown = toml::to_string(&config).unwrap();
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("alice:<redacted>@pyroscope:4040"), "{shown}");
    config.endpoint[0].url = "ftp://alice:s3cret@host/".into();
    let error = config.validate().unwrap_err().to_string();
    assert!(!error.contains("s3cret"), "{error}");
    assert!(error.contains("alice:<redacted>@host"), "{error}");
    config.endpoint[0].url = "http://alice:s3cret@ho st/".into();
    let error = config.validate().unwrap_err().to_string();
    assert!(!error.contains("s3cret"), "{error}");
}
