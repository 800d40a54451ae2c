//! Each protocol, decoded by the receiver: labels, bodies, headers, credentials, TLS and
//! HTTP/2.

use std::{collections::BTreeMap, io::Write as _, time::Duration};

use prost::Message as _;

use super::{
    receiver::{Receiver, always, decode_pprof, parse_multipart},
    *,
};
use crate::write::{BasicAuth, Secret, TlsConfig, push::PushRequest};

#[tokio::test]
async fn push_sends_one_request_with_every_series_labels_and_profiles() {
    let rx = Receiver::start(always(200)).await;
    let mut ep = endpoint(&rx.url, Protocol::Push);
    ep.headers = BTreeMap::from([("X-Scope-OrgID".to_string(), Secret::new("tenant-1"))]);
    let config = WriteConfig {
        endpoint: vec![ep],
        external_labels: labels(&[("cluster", "c1"), ("service_name", "not-this")]),
        ..Default::default()
    };
    let (writer, metrics) = start(&config);
    writer.submit(vec![series("web", 7), series("db", 9)]);
    let reqs = rx.wait_for(1).await;
    let req = &reqs[0];
    assert_eq!(req.path, "/push.v1.PusherService/Push");
    assert_eq!(req.header("content-type"), Some("application/proto"));
    assert_eq!(req.header("x-scope-orgid"), Some("tenant-1"));
    let push = PushRequest::decode(req.body.clone()).expect("a PushRequest");
    assert_eq!(push.series.len(), 2);
    let mut ids = Vec::new();
    for (s, (service, value)) in push.series.iter().zip([("web", 7), ("db", 9)]) {
        let got: Labels = s
            .labels
            .iter()
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect();
        assert_eq!(
            got,
            labels(&[
                ("__name__", "process_cpu"),
                ("service_name", service),
                ("pod", "p-1"),
                ("cluster", "c1"),
            ])
        );
        assert_eq!(s.samples.len(), 1);
        assert_eq!(
            decode_pprof(&s.samples[0].raw_profile).sample[0].value,
            [value]
        );
        ids.push(s.samples[0].id.clone());
    }
    assert_ne!(ids[0], ids[1]);
    assert!(!ids[0].is_empty());
    let name = host_of(&rx.url);
    wait_until_sent(&metrics, &name, 2).await;
    assert!(metrics.sent_bytes(&name) > 0);
    writer.shutdown(Duration::from_secs(1)).await;
    assert_eq!(rx.count(), 1, "one request per batch");
}

async fn wait_until_sent(metrics: &WriteMetrics, name: &str, n: u64) {
    receiver::wait_until(|| metrics.sent_profiles(name) >= n, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn ingest_sends_one_multipart_request_per_series() {
    let rx = Receiver::start(always(200)).await;
    let (writer, metrics) = start(&one_endpoint(endpoint(&rx.url, Protocol::Ingest)));
    let mut s = series("web", 5);
    s.labels.insert("zone".into(), "a,b".into());
    writer.submit(vec![s, series("db", 6)]);
    let reqs = rx.wait_for(2).await;
    for (req, (name, value)) in reqs
        .iter()
        .zip([("web{pod=p-1,zone=a_b}", 5), ("db{pod=p-1}", 6)])
    {
        assert_eq!(req.path, "/ingest");
        let q: BTreeMap<_, _> = req.query_pairs().into_iter().collect();
        assert_eq!(q["name"], name);
        assert_eq!(q["from"], "1700000000");
        assert_eq!(q["until"], "1700000015");
        assert_eq!(q["format"], "pprof");
        assert_eq!(q["sampleRate"], "99");
        assert_eq!(q["spyName"], "ebpfspy");
        let parts = parse_multipart(req.header("content-type").unwrap(), &req.body);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].name, "profile");
        assert_eq!(parts[0].filename.as_deref(), Some("profile.pprof"));
        assert_eq!(decode_pprof(&parts[0].data).sample[0].value, [value]);
    }
    wait_until_sent(&metrics, &host_of(&rx.url), 2).await;
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn datakit_sends_event_json_and_the_pprof_attachment() {
    let rx = Receiver::start(always(200)).await;
    let config = WriteConfig {
        endpoint: vec![endpoint(&format!("{}/base/", rx.url), Protocol::Datakit)],
        external_labels: labels(&[("env", "prod")]),
        ..Default::default()
    };
    let (writer, metrics) = start(&config);
    writer.submit(vec![series("web", 3)]);
    let reqs = rx.wait_for(1).await;
    assert_eq!(reqs[0].path, "/base/profiling/v1/input");
    let parts = parse_multipart(reqs[0].header("content-type").unwrap(), &reqs[0].body);
    let event = parts
        .iter()
        .find(|p| p.name == "event")
        .expect("an event part");
    assert_eq!(event.filename.as_deref(), Some("event.json"));
    assert_eq!(event.content_type.as_deref(), Some("application/json"));
    let event: serde_json::Value = serde_json::from_slice(&event.data).unwrap();
    assert_eq!(event["attachments"], serde_json::json!(["auto.pprof"]));
    assert_eq!(event["format"], "pprof");
    assert_eq!(event["version"], "4");
    assert_eq!(event["start"], "2023-11-14T22:13:20.000000000Z");
    assert_eq!(event["end"], "2023-11-14T22:13:35.000000000Z");
    let tags: Vec<&str> = event["tags_profiler"]
        .as_str()
        .unwrap()
        .split(',')
        .collect();
    for want in ["service:web", "pod:p-1", "env:prod"] {
        assert!(tags.contains(&want), "{want} in {tags:?}");
    }
    let pprof = parts
        .iter()
        .find(|p| p.name == "auto.pprof")
        .expect("the attachment");
    assert_eq!(pprof.filename.as_deref(), Some("auto.pprof"));
    assert_eq!(decode_pprof(&pprof.data).sample[0].value, [3]);
    wait_until_sent(&metrics, &host_of(&rx.url), 1).await;
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn bearer_token_file_and_basic_auth_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cr3t-token\n").unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "pass").unwrap();

    let bearer_rx = Receiver::start(always(200)).await;
    let basic_rx = Receiver::start(always(200)).await;
    let mut bearer = endpoint(&bearer_rx.url, Protocol::Push);
    bearer.bearer_token_file = Some(token_file);
    let mut basic = endpoint(&basic_rx.url, Protocol::Ingest);
    basic.basic_auth = Some(BasicAuth {
        username: "user".into(),
        password: None,
        password_file: Some(password_file),
    });
    let config = WriteConfig {
        endpoint: vec![bearer, basic],
        ..Default::default()
    };
    let (writer, _) = start(&config);
    writer.submit(vec![series("web", 1)]);
    let got = bearer_rx.wait_for(1).await;
    assert_eq!(got[0].header("authorization"), Some("Bearer s3cr3t-token"));
    let got = basic_rx.wait_for(1).await;
    // base64("user:pass")
    assert_eq!(got[0].header("authorization"), Some("Basic dXNlcjpwYXNz"));
    writer.shutdown(Duration::from_secs(1)).await;
}

fn self_signed() -> (rcgen::CertifiedKey<rcgen::KeyPair>, tempfile::NamedTempFile) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let mut ca = tempfile::NamedTempFile::new().unwrap();
    ca.write_all(cert.cert.pem().as_bytes()).unwrap();
    (cert, ca)
}

#[tokio::test]
async fn push_over_tls_negotiates_http2_with_a_custom_ca() {
    let (cert, ca) = self_signed();
    let rx = Receiver::start_tls(always(200), &cert).await;
    let mut ep = endpoint(&rx.url, Protocol::Push);
    ep.tls = TlsConfig {
        ca_file: Some(ca.path().to_path_buf()),
        ..Default::default()
    };
    let (writer, metrics) = start(&one_endpoint(ep));
    writer.submit(vec![series("web", 1)]);
    let reqs = rx.wait_for(1).await;
    assert_eq!(reqs[0].version, hyper::Version::HTTP_2);
    assert_eq!(
        PushRequest::decode(reqs[0].body.clone())
            .unwrap()
            .series
            .len(),
        1
    );
    wait_until_sent(&metrics, &host_of(&rx.url), 1).await;
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn tls_without_the_ca_fails_unless_insecure_skip_verify() {
    let (cert, _ca) = self_signed();
    let rx = Receiver::start_tls(always(200), &cert).await;
    let name = host_of(&rx.url);
    let mut strict = endpoint(&rx.url, Protocol::Push);
    strict.max_backoff_retries = 1;
    let (writer, metrics) = start(&one_endpoint(strict.clone()));
    writer.submit(vec![series("web", 1)]);
    receiver::wait_until(
        || metrics.dropped_profiles(&name, crate::write::DropReason::RetriesExhausted) == 1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(rx.count(), 0, "an unverified server gets nothing");
    writer.shutdown(Duration::from_secs(1)).await;

    strict.tls.insecure_skip_verify = true;
    let (writer, metrics) = start(&one_endpoint(strict));
    writer.submit(vec![series("web", 1)]);
    rx.wait_for(1).await;
    wait_until_sent(&metrics, &name, 1).await;
    writer.shutdown(Duration::from_secs(1)).await;
}
