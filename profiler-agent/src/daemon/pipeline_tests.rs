//! The pipeline worker over doubles: page and metrics stay bounded, intervals go to their
//! targets, the stop submits the partial interval.

use super::*;
use crate::{
    interval::{
        latest::STALE_INTERVALS,
        tests::{Names, labels},
    },
    labels::SERVICE_NAME,
    process::{Mapping, MappingKind, ProcessInfo},
    sampler::{RawSample, Stack, tests::ScriptedSource},
    targets::{CONTAINER_ID, PROCESS_PID, TargetOptions},
};

#[test]
fn ever_new_services_leave_metrics_and_page_bounded() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = AgentMetrics::register(&mut registry);
    let latest = LatestProfiles::default();
    let series = |registry: &prometheus_client::registry::Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text.lines()
            .filter(|l| l.starts_with("pyroscope_ebpf_pprofs_total{"))
            .count()
    };
    let per_interval = 4;
    let bound = per_interval * STALE_INTERVALS as usize;
    for interval in 0..200 {
        // What collect_recording does for each service with samples.
        let profiles = (0..per_interval)
            .map(|i| {
                let name = format!("container-{interval}-{i}");
                let label = ServiceLabel {
                    service_name: name.clone(),
                };
                metrics.pprofs.get_or_create(&label).inc();
                metrics.pprof_bytes.get_or_create(&label).inc_by(10);
                metrics.pprof_samples.get_or_create(&label).inc_by(1);
                (name, ServiceProfile::new(0, Vec::new(), 1))
            })
            .collect();
        publish(&latest, &metrics, profiles);
        assert!(latest.len() <= bound && series(&registry) <= bound);
    }
    assert_eq!(latest.len(), bound);
    assert_eq!(series(&registry), bound);
    // The newest services are the ones kept, with their counts.
    let text = {
        let mut t = String::new();
        prometheus_client::encoding::text::encode(&mut t, &registry).unwrap();
        t
    };
    assert!(text.contains("service_name=\"container-199-0\"} 1"));
    assert!(!text.contains("container-0-0"));
    // Intervals with no samples at all empty both.
    for _ in 0..STALE_INTERVALS {
        publish(&latest, &metrics, Vec::new());
    }
    assert_eq!((latest.len(), series(&registry)), (0, 0));
}

/// Every process has one anonymous mapping; pid 3 is in container `c0ffee`.
struct Processes;

impl ProcessSource for Processes {
    fn snapshot(&mut self, pid: u32, comm: &str) -> ProcessInfo {
        ProcessInfo {
            container_id: (pid == 3).then(|| "c0ffee".to_owned()),
            mappings: vec![Mapping {
                start: 0x1000,
                end: 0x9000,
                offset: 0,
                path: "[anon]".into(),
                kind: MappingKind::Anonymous,
            }],
            ..ProcessInfo::unknown(pid, comm)
        }
    }
}

fn sample(pid: u32, leaf: u64, count: u64) -> RawSample {
    RawSample {
        pid,
        comm: format!("p{pid}"),
        user: Stack::Frames(vec![leaf]),
        kernel: Stack::NotCollected,
        python: Vec::new(),
        count,
    }
}

/// Runs a worker over scripted drains until `stop_after`, returning what it submitted
/// and its metrics' text.
fn run_worker(
    drains: Vec<Vec<RawSample>>,
    collect_interval: Duration,
    stop_after: Duration,
) -> (Vec<ProfileSeries>, String) {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(AgentMetrics::register(&mut registry));
    let (targets, _) = TargetSet::new(
        &[
            labels(&[(PROCESS_PID, "1"), (SERVICE_NAME, "one")]),
            labels(&[(CONTAINER_ID, "c0ffee"), (SERVICE_NAME, "three")]),
        ],
        &TargetOptions::default(),
    );
    let (_targets_tx, targets_rx) = watch::channel(Arc::new(targets));
    let submitted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let submit: Submit = {
        let submitted = submitted.clone();
        Arc::new(move |batch| submitted.lock().unwrap().extend(batch))
    };
    let (_captures_tx, captures) = mpsc::channel();
    let settings = PipelineSettings {
        collect_interval,
        sample_rate: 97,
        collect_user: true,
        collect_kernel: false,
        python: false,
        hotspot: None,
        demangle: Demangle::None,
        caches: CacheConfig::default(),
        container_id_cache_size: 16,
        unwind_table_memory: 1 << 20,
        build: BuildOptions::record(97),
    };
    let outputs = Outputs {
        targets: targets_rx,
        submit,
        metrics,
        latest: LatestProfiles::default(),
        captures,
    };
    let source = ScriptedSource {
        drains,
        recorded: 0,
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Built on its thread: the frame sources are not Send.
            let worker = Worker::new(settings, Sources::new(vec![Box::new(Names)]), outputs);
            let sampler = Sampler::new(source, Processes).unwrap();
            worker.run(sampler, &stop, &AtomicU64::new(0))
        });
        std::thread::sleep(stop_after);
        stop.store(true, Ordering::SeqCst);
    });
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let batches = std::mem::take(&mut *submitted.lock().unwrap());
    (batches, text)
}

fn samples_of(series: &[ProfileSeries], service: &str) -> u64 {
    series
        .iter()
        .filter(|s| s.labels.get(SERVICE_NAME).map(String::as_str) == Some(service))
        .map(|s| s.samples)
        .sum()
}

#[test]
fn intervals_go_to_targets_and_count_the_untargeted() {
    let drains = vec![
        vec![sample(1, 0x1100, 2), sample(2, 0x1200, 5)],
        vec![sample(3, 0x1300, 4), sample(1, 0x1100, 1)],
    ];
    // Intervals of 50 ms (drains as often): both drains land in the first intervals.
    let (series, metrics) = run_worker(
        drains,
        Duration::from_millis(50),
        Duration::from_millis(600),
    );
    assert_eq!(samples_of(&series, "one"), 3);
    assert_eq!(samples_of(&series, "three"), 4);
    assert_eq!(series.iter().map(|s| s.samples).sum::<u64>(), 7);
    assert!(
        series
            .iter()
            .all(|s| s.end >= s.start && !s.pprof_gzip.is_empty()),
        "every series has its window and a body"
    );
    assert!(
        metrics.contains("profiler_samples_untargeted_total 5"),
        "{metrics}"
    );
}

#[test]
fn stopping_submits_the_partial_interval() {
    // An interval far longer than the run: only the stop can submit anything.
    // Nothing is drained before the stop: the final drain takes everything.
    let drains = vec![vec![sample(1, 0x1100, 6), sample(3, 0x1300, 1)]];
    let (series, _) = run_worker(
        drains,
        Duration::from_secs(3600),
        Duration::from_millis(100),
    );
    assert_eq!(samples_of(&series, "one"), 6);
    assert_eq!(samples_of(&series, "three"), 1);
}
