//! Unit tests: labels, config, backoff; the pod fixtures shared with
//! `watch_tests`.

use serde_json::{Value, json};

use super::*;

pub(super) const NODE: &str = "node-a";

pub(super) fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A running pod on `node` with one container `app` whose id is `containerd://<name>-app`.
pub(super) fn pod(namespace: &str, name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox:1.36"}]},
        "status": {
            "phase": "Running", "hostIP": "10.0.0.5", "podIP": "10.244.1.9",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [status_of("app", Some(&format!("containerd://{name}-app")))],
        },
    })
}

pub(super) fn status_of(name: &str, id: Option<&str>) -> Value {
    let mut s = json!({"name": name, "image": "busybox:1.36", "imageID": "", "ready": id.is_some(),
        "restartCount": 0});
    if let Some(id) = id {
        s["containerID"] = json!(id);
    }
    s
}

/// A ReplicaSet pod with two containers, an init container, ports, and label and
/// annotation names that need sanitising.
pub(super) fn web_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-7d9f-x2x", "namespace": "shop",
            "uid": "5b7c3a52-9a7e-4c7b-9d53-0f7a1b2c3d4e",
            "labels": {"app.kubernetes.io/name": "web", "pod-template-hash": "7d9f", "tier": ""},
            "annotations": {"pyroscope.io/service_name": "shop-web",
                "kubectl.kubernetes.io/default-container": "app"},
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "n1"},
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f", "uid": "r1",
                    "controller": true, "blockOwnerDeletion": true},
            ],
        },
        "spec": {
            "nodeName": NODE,
            "initContainers": [{"name": "init-db", "image": "busybox:1.36"}],
            "containers": [
                {"name": "app", "image": "registry.example.com/shop/web:1.2.3",
                    "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]},
                {"name": "envoy", "image": "envoyproxy/envoy:v1.30"},
            ],
        },
        "status": {
            "phase": "Running", "hostIP": "10.0.0.5", "podIP": "10.244.1.7",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
            "containerStatuses": [status_of("envoy", Some("containerd://e2")), status_of("app", Some("containerd://a1"))],
            "initContainerStatuses": [status_of("init-db", Some("containerd://i0"))],
        },
    })
}

pub(super) fn web_targets() -> Vec<Labels> {
    let common = labels(&[
        ("__address__", "10.244.1.7"),
        ("__meta_kubernetes_namespace", "shop"),
        ("__meta_kubernetes_pod_name", "web-7d9f-x2x"),
        (
            "__meta_kubernetes_pod_uid",
            "5b7c3a52-9a7e-4c7b-9d53-0f7a1b2c3d4e",
        ),
        ("__meta_kubernetes_pod_ip", "10.244.1.7"),
        ("__meta_kubernetes_pod_host_ip", "10.0.0.5"),
        ("__meta_kubernetes_pod_node_name", "node-a"),
        ("__meta_kubernetes_pod_phase", "Running"),
        ("__meta_kubernetes_pod_ready", "true"),
        ("__meta_kubernetes_pod_controller_kind", "ReplicaSet"),
        ("__meta_kubernetes_pod_controller_name", "web-7d9f"),
        ("__meta_kubernetes_pod_label_app_kubernetes_io_name", "web"),
        (
            "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name",
            "true",
        ),
        ("__meta_kubernetes_pod_label_pod_template_hash", "7d9f"),
        (
            "__meta_kubernetes_pod_labelpresent_pod_template_hash",
            "true",
        ),
        ("__meta_kubernetes_pod_labelpresent_tier", "true"),
        (
            "__meta_kubernetes_pod_annotation_pyroscope_io_service_name",
            "shop-web",
        ),
        (
            "__meta_kubernetes_pod_annotationpresent_pyroscope_io_service_name",
            "true",
        ),
        (
            "__meta_kubernetes_pod_annotation_kubectl_kubernetes_io_default_container",
            "app",
        ),
        (
            "__meta_kubernetes_pod_annotationpresent_kubectl_kubernetes_io_default_container",
            "true",
        ),
    ]);
    let container = |name: &str, id: &str, image: &str, init: &str| {
        let mut l = common.clone();
        l.extend(labels(&[
            ("__meta_kubernetes_pod_container_name", name),
            ("__meta_kubernetes_pod_container_id", id),
            ("__meta_kubernetes_pod_container_image", image),
            ("__meta_kubernetes_pod_container_init", init),
        ]));
        l
    };
    vec![
        container(
            "app",
            "containerd://a1",
            "registry.example.com/shop/web:1.2.3",
            "false",
        ),
        container(
            "envoy",
            "containerd://e2",
            "envoyproxy/envoy:v1.30",
            "false",
        ),
        container("init-db", "containerd://i0", "busybox:1.36", "true"),
    ]
}

fn from_json(v: Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

#[test]
fn pod_labels_match_prometheus_pod_role() {
    assert_eq!(pod_targets(&from_json(web_pod())), web_targets());
}

#[test]
fn pod_label_edge_cases() {
    // No IP yet: no targets, as Prometheus.
    let mut p = web_pod();
    p["status"]["podIP"] = json!(null);
    assert!(pod_targets(&from_json(p)).is_empty());
    // No Ready condition: "unknown"; an owner that is not the controller gives no
    // controller labels; a container not running yet has no id label.
    let mut p = pod("ns", "p", NODE);
    p["status"]["conditions"] = json!([]);
    p["status"]["containerStatuses"] = json!([status_of("app", None)]);
    p["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "u", "controller": false}]);
    let targets = pod_targets(&from_json(p));
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0]["__meta_kubernetes_pod_ready"], "unknown");
    assert!(!targets[0].contains_key("__meta_kubernetes_pod_controller_kind"));
    assert!(!targets[0].contains_key("__meta_kubernetes_pod_container_id"));
    let mut p = pod("ns", "p", NODE);
    p["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    assert_eq!(
        pod_targets(&from_json(p))[0]["__meta_kubernetes_pod_ready"],
        "false"
    );
}

#[test]
fn node_name_from_config_then_env() {
    let config = |n: Option<&str>| KubernetesConfig {
        node_name: n.map(Into::into),
        kubeconfig: None,
    };
    assert_eq!(
        resolve_node_name(&config(Some("a")), Some("b".into())).unwrap(),
        "a"
    );
    assert_eq!(
        resolve_node_name(&config(None), Some("b".into())).unwrap(),
        "b"
    );
    assert_eq!(
        resolve_node_name(&config(Some(" ")), Some("b".into())).unwrap(),
        "b"
    );
    let err = resolve_node_name(&config(None), Some(String::new())).unwrap_err();
    assert!(err.to_string().contains("`node_name`"), "{err}");
    assert!(err.to_string().contains("NODE_NAME"), "{err}");
}

#[test]
fn config_deserializes_with_defaults_and_rejects_unknown_fields() {
    let c: KubernetesConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c, KubernetesConfig::default());
    let c: KubernetesConfig =
        serde_json::from_str(r#"{"node_name":"n1","kubeconfig":"/etc/kube.yaml"}"#).unwrap();
    assert_eq!(c.node_name.as_deref(), Some("n1"));
    assert_eq!(c.kubeconfig, Some(PathBuf::from("/etc/kube.yaml")));
    let err = serde_json::from_str::<KubernetesConfig>(r#"{"nodename":"n1"}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
}

#[tokio::test]
async fn missing_kubeconfig_is_an_error_naming_the_file() {
    let config = KubernetesConfig {
        node_name: Some(NODE.into()),
        kubeconfig: Some("/nonexistent/kubeconfig.yaml".into()),
    };
    let err = PodDiscovery::from_config(&config)
        .await
        .err()
        .expect("must fail");
    assert!(matches!(err, KubernetesError::Kubeconfig { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/kubeconfig.yaml"),
        "{err}"
    );
}

#[test]
fn failure_causes_ignore_resource_versions() {
    let status = |message: &str| kube::core::Status::failure(message, "Expired").with_code(410);
    let a = watcher::Error::WatchError(Box::new(status("too old resource version: 5 (9)")));
    let b = watcher::Error::WatchError(Box::new(status("too old resource version: 7 (12)")));
    assert_eq!(cause_of(&a), cause_of(&b));
    let c = watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(status("x"))));
    assert!(needs_restart(&c));
    assert!(
        !needs_restart(&a),
        "the watcher relists by itself on an ERROR event"
    );
    assert!(is_expired(&a) && is_expired(&c));
    let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    let d = watcher::Error::WatchStartFailed(kube::Error::ReadEvents(refused()));
    assert!(!is_expired(&d));
    assert_eq!(cause_of(&d), "watch: i/o ConnectionRefused");

    // Once per cause until a recovery, then again.
    let e = watcher::Error::InitialListFailed(kube::Error::ReadEvents(refused()));
    let mut log = CauseLog::default();
    assert!(!log.success(NODE), "nothing to recover from");
    assert!(log.failure(&d, NODE));
    assert!(!log.failure(&d, NODE));
    assert!(log.failure(&e, NODE), "another stage is another cause");
    assert!(!log.failure(&e, NODE));
    assert!(log.success(NODE));
    assert!(!log.success(NODE));
    assert!(log.failure(&d, NODE), "a new outage is logged again");
}

#[test]
fn watch_events_ignore_pods_of_other_nodes() {
    let mut state = PodTargets::default();
    assert!(!state.apply(watcher::Event::Init, NODE));
    assert!(!state.apply(
        watcher::Event::InitApply(from_json(pod("ns", "elsewhere", "node-b"))),
        NODE
    ));
    assert!(state.apply(watcher::Event::InitDone, NODE));
    state.apply(
        watcher::Event::Apply(from_json(pod("ns", "also-elsewhere", "node-b"))),
        NODE,
    );
    assert!(state.targets().is_empty());
}
