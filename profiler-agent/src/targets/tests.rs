//! Unit tests of target resolution: validation, pid and container matching, precedence,
//! `service_name` inference and the default target.

use super::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const ID: &str = "4f2e5b7c9d1a3e6f8b0c2d4e6f8a0b1c3d5e7f9a1b3c5d7e9f0a2b4c6d8e0f1a";

#[test]
fn container_id_precedence_and_prefix_stripping() {
    for prefix in ["docker://", "containerd://", "cri-o://", ""] {
        let l = labels(&[(K8S_CONTAINER_ID, &format!("{prefix}{ID}"))]);
        assert_eq!(container_id(&l).as_deref(), Some(ID), "{prefix}");
    }
    let all = labels(&[
        (CONTAINER_ID, "explicit"),
        (K8S_CONTAINER_ID, "containerd://k8s"),
        (DOCKER_CONTAINER_ID, "docker"),
        (SWARM_CONTAINER_ID, "swarm"),
    ]);
    assert_eq!(container_id(&all).as_deref(), Some("explicit"));
    let no_explicit = labels(&[
        (K8S_CONTAINER_ID, "containerd://k8s"),
        (DOCKER_CONTAINER_ID, "docker"),
    ]);
    assert_eq!(container_id(&no_explicit).as_deref(), Some("k8s"));
    let docker = labels(&[
        (DOCKER_CONTAINER_ID, "docker"),
        (SWARM_CONTAINER_ID, "swarm"),
    ]);
    assert_eq!(container_id(&docker).as_deref(), Some("docker"));
    let swarm = labels(&[(SWARM_CONTAINER_ID, "swarm")]);
    assert_eq!(container_id(&swarm).as_deref(), Some("swarm"));
    // A pod container not started yet has no id.
    assert_eq!(container_id(&labels(&[(K8S_CONTAINER_ID, "")])), None);
    assert_eq!(container_id(&labels(&[("a", "b")])), None);
}

#[test]
fn service_name_inference_order() {
    let k8s = labels(&[
        (K8S_NAMESPACE, "shop"),
        (K8S_CONTAINER_NAME, "cart"),
        (DOCKER_CONTAINER_NAME, "k8s_cart_x"),
    ]);
    assert_eq!(infer_service_name(&k8s), "ebpf/shop/cart");
    let mut annotated = k8s.clone();
    annotated.insert(K8S_SERVICE_NAME_ANNOTATION.into(), "cart-service".into());
    assert_eq!(infer_service_name(&annotated), "cart-service");
    assert_eq!(
        infer_service_name(&labels(&[(DOCKER_CONTAINER_NAME, "redis")])),
        "redis"
    );
    assert_eq!(
        infer_service_name(&labels(&[
            (SWARM_SERVICE_LABEL, "web"),
            (SWARM_SERVICE_NAME, "stack_web")
        ])),
        "web"
    );
    assert_eq!(
        infer_service_name(&labels(&[(SWARM_SERVICE_NAME, "stack_web")])),
        "stack_web"
    );
    assert_eq!(
        infer_service_name(&labels(&[(K8S_NAMESPACE, "shop")])),
        "unspecified"
    );
}

#[test]
fn series_labels_drop_double_underscore_and_keep_explicit_service_name() {
    let t = Target::from_discovered(&labels(&[
        (DOCKER_CONTAINER_NAME, "redis"),
        (DOCKER_CONTAINER_ID, ID),
        ("env", "prod"),
    ]));
    assert_eq!(
        t.labels,
        labels(&[("env", "prod"), (SERVICE_NAME, "redis")])
    );
    let explicit = Target::from_discovered(&labels(&[
        (DOCKER_CONTAINER_NAME, "redis"),
        (SERVICE_NAME, "cache"),
    ]));
    assert_eq!(explicit.service_name(), "cache");
}

#[test]
fn pid_targets_win_over_containers_then_default() {
    let discovered = vec![
        labels(&[(DOCKER_CONTAINER_ID, ID), (DOCKER_CONTAINER_NAME, "redis")]),
        labels(&[(PROCESS_PID, "42"), (SERVICE_NAME, "special")]),
    ];
    let (set, rejected) = TargetSet::new(&discovered, &TargetOptions::default());
    assert!(rejected.is_empty());
    assert_eq!(set.active(), 2);
    assert_eq!(set.resolve(42, Some(ID)).unwrap().service_name(), "special");
    assert_eq!(set.resolve(7, Some(ID)).unwrap().service_name(), "redis");
    assert!(
        set.resolve(7, None).is_none(),
        "targets_only drops the rest"
    );
    assert!(set.resolve(7, Some("other")).is_none());
}

#[test]
fn default_target_when_not_targets_only() {
    let options = TargetOptions {
        targets_only: false,
        default_target: Labels::new(),
    };
    let (set, _) = TargetSet::new(&[], &options);
    assert_eq!(
        set.resolve(1, None).unwrap().service_name(),
        "ebpf/unspecified"
    );
    let options = TargetOptions {
        targets_only: false,
        default_target: labels(&[(SERVICE_NAME, "host"), ("region", "eu")]),
    };
    let (set, _) = TargetSet::new(&[], &options);
    let t = set.resolve(1, None).unwrap();
    assert_eq!(
        t.labels,
        labels(&[("region", "eu"), (SERVICE_NAME, "host")])
    );
    assert_eq!(
        set.active(),
        0,
        "the default target is not an active target"
    );
}

#[test]
fn a_process_is_matched_once_its_target_appears() {
    let (before, _) = TargetSet::new(&[], &TargetOptions::default());
    assert!(before.resolve(9, Some(ID)).is_none());
    let (after, _) = TargetSet::new(
        &[labels(&[(CONTAINER_ID, ID), (SERVICE_NAME, "late")])],
        &TargetOptions::default(),
    );
    assert_eq!(after.resolve(9, Some(ID)).unwrap().service_name(), "late");
}

#[test]
fn invalid_label_sets_are_rejected_with_a_reason() {
    let discovered = vec![
        labels(&[("bad-name", "x"), (CONTAINER_ID, ID)]),
        labels(&[("1abc", "x"), (CONTAINER_ID, ID)]),
        labels(&[(PROCESS_PID, "not-a-pid")]),
        labels(&[
            ("long", &"v".repeat(MAX_LABEL_VALUE + 1)),
            (CONTAINER_ID, ID),
        ]),
        labels(&[("ok_name", "x"), (CONTAINER_ID, ID)]),
    ];
    let (set, rejected) = TargetSet::new(&discovered, &TargetOptions::default());
    assert_eq!(set.active(), 1);
    assert_eq!(
        rejected,
        vec![
            TargetError::InvalidLabelName {
                name: "bad-name".into()
            },
            TargetError::InvalidLabelName {
                name: "1abc".into()
            },
            TargetError::InvalidPid {
                value: "not-a-pid".into()
            },
            TargetError::InvalidLabelValue {
                name: "long".into()
            },
        ]
    );
}

/// Names a process by its comm unless it is called "drop-me" (a test double for the
/// process discovery's relabeled snapshot labels).
#[derive(Debug)]
struct ByComm;

impl LateTargets for ByComm {
    fn labels_of(&self, process: &ProcessInfo) -> Option<Labels> {
        (process.comm != "drop-me").then(|| {
            labels(&[
                (PROCESS_PID, &process.pid.to_string()),
                (SERVICE_NAME, &process.comm),
            ])
        })
    }
}

#[test]
fn a_process_no_scan_listed_gets_its_target_at_the_drain() {
    let options = TargetOptions {
        targets_only: false,
        default_target: Labels::new(),
    };
    let listed = [
        labels(&[(PROCESS_PID, "10"), (SERVICE_NAME, "listed")]),
        labels(&[(CONTAINER_ID, "c1"), (SERVICE_NAME, "web")]),
    ];
    let plain = TargetSet::new(&listed, &options).0;
    // Pid 15 was listed by a scan and dropped by its rules.
    let set = TargetSet::new(&listed, &options)
        .0
        .with_late(Some(Arc::new(ByComm)), HashSet::from([10, 15]));
    let process = |pid: u32, comm: &str, container: Option<&str>| ProcessInfo {
        container_id: container.map(str::to_owned),
        ..ProcessInfo::unknown(pid, comm)
    };
    let name = |set: &TargetSet, p: &ProcessInfo| {
        let (target, how) = set.resolve_process(p.pid, Some(p));
        (target.map(|t| t.service_name().to_owned()), how)
    };
    let some = |s: &str| Some(s.to_owned());
    // A listed pid keeps its own target.
    let p = process(10, "whatever", None);
    assert_eq!(name(&set, &p), (some("listed"), Resolution::Listed));
    // An unlisted one is named now, by the rules.
    let p = process(11, "cc1", None);
    assert_eq!(name(&set, &p), (some("cc1"), Resolution::Late));
    // Listed by a scan whose rules dropped it: not named again at the drain.
    let p = process(15, "cc1", None);
    assert_eq!(
        name(&set, &p),
        (some(DEFAULT_SERVICE_NAME), Resolution::Default)
    );
    // Without late targets, it is the default's, as before.
    let p = process(11, "cc1", None);
    assert_eq!(
        name(&plain, &p),
        (some(DEFAULT_SERVICE_NAME), Resolution::Default)
    );
    // Dropped by the rules: its container's target, else the default.
    let p = process(12, "drop-me", Some("c1"));
    assert_eq!(name(&set, &p), (some("web"), Resolution::Listed));
    let p = process(13, "drop-me", None);
    assert_eq!(
        name(&set, &p),
        (some(DEFAULT_SERVICE_NAME), Resolution::Default)
    );
    // No snapshot at all: nothing to name it by.
    assert_eq!(
        set.resolve_process(14, None).1,
        Resolution::Default,
        "no process snapshot"
    );
    // With targets_only, an unmatched process is untargeted.
    let only = TargetSet::new(
        &listed,
        &TargetOptions {
            targets_only: true,
            default_target: Labels::new(),
        },
    )
    .0;
    assert_eq!(
        name(&only, &process(13, "drop-me", None)).1,
        Resolution::Untargeted
    );
}
