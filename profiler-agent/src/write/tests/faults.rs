//! Faults and queueing: retries, refusals, Retry-After, hanging and refused endpoints,
//! queue overflow with a blocking test double, the directory sink, shutdown.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;

use super::{
    receiver::{Receiver, Reply, always, wait_until},
    *,
};
use crate::write::{
    Delivered, DropReason, ProfileSink, RetryPolicy, SendFuture, directory::DIRECTORY_ENDPOINT,
};

const LONG: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_500_is_retried_and_delivered_exactly_once() {
    let rx = Receiver::start(Arc::new(|n| Reply::Status(if n == 0 { 500 } else { 200 }))).await;
    let (writer, metrics) = start(&one_endpoint(endpoint(&rx.url, Protocol::Push)));
    let name = host_of(&rx.url);
    writer.submit(vec![series("web", 1), series("db", 2)]);
    wait_until(|| metrics.sent_profiles(&name) == 2, LONG).await;
    writer.shutdown(Duration::from_secs(1)).await;
    assert_eq!(rx.count(), 2);
    assert_eq!(metrics.retries(&name), 1);
    for reason in [
        DropReason::Rejected,
        DropReason::RetriesExhausted,
        DropReason::Shutdown,
    ] {
        assert_eq!(metrics.dropped_profiles(&name, reason), 0, "{reason:?}");
    }
}

#[tokio::test]
async fn a_400_is_dropped_and_counted_not_retried() {
    let rx = Receiver::start(always(400)).await;
    let (writer, metrics) = start(&one_endpoint(endpoint(&rx.url, Protocol::Ingest)));
    let name = host_of(&rx.url);
    let batch = vec![series("web", 1), series("db", 2)];
    let bytes: u64 = batch.iter().map(|s| s.pprof_gzip.len() as u64).sum();
    writer.submit(batch);
    wait_until(
        || metrics.dropped_profiles(&name, DropReason::Rejected) == 2,
        LONG,
    )
    .await;
    writer.shutdown(Duration::from_secs(1)).await;
    assert_eq!(rx.count(), 2, "one request per series, none retried");
    assert_eq!(metrics.retries(&name), 0);
    assert_eq!(metrics.dropped_bytes(&name, DropReason::Rejected), bytes);
    assert_eq!(metrics.sent_profiles(&name), 0);
}

#[tokio::test]
async fn a_429_retry_after_is_honoured() {
    let rx = Receiver::start(Arc::new(|n| {
        if n == 0 {
            Reply::StatusWith(429, "retry-after", "1".into())
        } else {
            Reply::Status(200)
        }
    }))
    .await;
    let mut ep = endpoint(&rx.url, Protocol::Push);
    ep.max_backoff_period = Duration::from_secs(5);
    let (writer, metrics) = start(&one_endpoint(ep));
    let name = host_of(&rx.url);
    writer.submit(vec![series("web", 1)]);
    rx.wait_for(1).await;
    let first = Instant::now();
    rx.wait_for(2).await;
    let waited = first.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "retried after {waited:?}, not 1 s"
    );
    wait_until(|| metrics.sent_profiles(&name) == 1, LONG).await;
    assert_eq!(metrics.retries(&name), 1);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_without_delaying_a_healthy_one() {
    let hung = Receiver::start(Arc::new(|_| Reply::Hang)).await;
    let healthy = Receiver::start(always(200)).await;
    let mut slow = endpoint(&hung.url, Protocol::Push);
    slow.remote_timeout = Duration::from_millis(1500);
    slow.max_backoff_retries = 1;
    let config = WriteConfig {
        endpoint: vec![slow, endpoint(&healthy.url, Protocol::Push)],
        ..Default::default()
    };
    let (writer, metrics) = start(&config);
    let (hung_name, healthy_name) = (host_of(&hung.url), host_of(&healthy.url));
    let started = Instant::now();
    writer.submit(vec![series("web", 1)]);
    healthy.wait_for(1).await;
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "the healthy endpoint waited {:?} for the hung one",
        started.elapsed()
    );
    wait_until(
        || metrics.dropped_profiles(&hung_name, DropReason::RetriesExhausted) == 1,
        LONG,
    )
    .await;
    assert_eq!(
        hung.count(),
        2,
        "timed out twice (one retry), retries exhausted"
    );
    assert!(started.elapsed() >= Duration::from_millis(3000));
    assert_eq!(metrics.sent_profiles(&healthy_name), 1);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn connection_refused_backs_off_then_drops() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let (writer, metrics) = start(&one_endpoint(endpoint(&url, Protocol::Datakit)));
    let name = host_of(&url);
    // Two series, one request each: once the first exhausts its retries the second is
    // dropped with it rather than retried all over again.
    writer.submit(vec![series("web", 1), series("db", 2)]);
    wait_until(
        || metrics.dropped_profiles(&name, DropReason::RetriesExhausted) == 2,
        LONG,
    )
    .await;
    assert_eq!(metrics.retries(&name), 3);
    assert_eq!(metrics.sent_profiles(&name), 0);
    writer.shutdown(Duration::from_secs(1)).await;
}

/// A sink that records what it got and blocks each send until given a permit.
struct Gate {
    permits: Arc<Semaphore>,
    started: Arc<Mutex<Vec<i64>>>,
}

fn first_value(batch: &[ProfileSeries]) -> i64 {
    receiver::decode_pprof(&batch[0].pprof_gzip).sample[0].value[0]
}

impl ProfileSink for Gate {
    fn name(&self) -> &str {
        "gate"
    }

    fn send<'a>(&'a self, batch: &'a [ProfileSeries]) -> SendFuture<'a> {
        Box::pin(async move {
            self.started.lock().unwrap().push(first_value(batch));
            self.permits.acquire().await.unwrap().forget();
            Ok(Delivered::default())
        })
    }
}

#[tokio::test]
async fn a_full_queue_drops_its_oldest_batch_and_counts_it() {
    let permits = Arc::new(Semaphore::new(0));
    let started = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Gate {
        permits: permits.clone(),
        started: started.clone(),
    });
    let metrics = Arc::new(WriteMetrics::default());
    let writer = Writer::with_sinks(
        vec![(gate, RetryPolicy::no_retries())],
        2,
        Labels::new(),
        metrics.clone(),
    );
    writer.submit(vec![series("web", 1)]);
    wait_until(|| started.lock().unwrap().len() == 1, LONG).await;
    // Batch 1 is in flight; 2 and 3 fill the queue; 4 pushes 2 out; submit never blocks.
    let t = Instant::now();
    for v in 2..=4 {
        writer.submit(vec![series("web", v)]);
    }
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(metrics.dropped_profiles("gate", DropReason::QueueFull), 1);
    assert_eq!(metrics.queue_depth("gate"), 2);
    permits.add_permits(10);
    wait_until(|| metrics.sent_profiles("gate") == 3, LONG).await;
    assert_eq!(*started.lock().unwrap(), [1, 3, 4]);
    writer.shutdown(Duration::from_secs(1)).await;
    assert_eq!(metrics.queue_depth("gate"), 0);
}

#[tokio::test]
async fn shutdown_stops_at_the_deadline_and_counts_what_is_left() {
    let permits = Arc::new(Semaphore::new(0));
    let gate = Arc::new(Gate {
        permits,
        started: Arc::default(),
    });
    let metrics = Arc::new(WriteMetrics::default());
    let writer = Writer::with_sinks(
        vec![(gate, RetryPolicy::no_retries())],
        4,
        Labels::new(),
        metrics.clone(),
    );
    for v in 1..=3 {
        writer.submit(vec![series("web", v)]);
    }
    let t = Instant::now();
    writer.shutdown(Duration::from_millis(100)).await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(metrics.dropped_profiles("gate", DropReason::Shutdown), 3);
    assert_eq!(metrics.sent_profiles("gate"), 0);
}

#[tokio::test]
async fn shutdown_delivers_what_is_queued_before_the_deadline() {
    let rx = Receiver::start(always(200)).await;
    let (writer, metrics) = start(&one_endpoint(endpoint(&rx.url, Protocol::Ingest)));
    for v in 1..=3 {
        writer.submit(vec![series("web", v)]);
    }
    writer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(metrics.sent_profiles(&host_of(&rx.url)), 3);
    assert_eq!(rx.count(), 3);
}

#[tokio::test]
async fn the_directory_sink_writes_service_files_and_counts_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = WriteConfig {
        directory: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let (writer, metrics) = start(&config);
    let a = series("ebpf/default/web", 4);
    writer.submit(vec![a.clone(), series("ebpf/default/web", 5)]);
    writer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(metrics.sent_profiles(DIRECTORY_ENDPOINT), 2);
    let service_dir = dir.path().join("ebpf_default_web");
    let first = std::fs::read(service_dir.join("1700000015.pb.gz")).unwrap();
    assert_eq!(first, a.pprof_gzip);
    let second = std::fs::read(service_dir.join("1700000015-1.pb.gz")).unwrap();
    assert_eq!(receiver::decode_pprof(&second).sample[0].value, [5]);
    let names: Vec<_> = std::fs::read_dir(&service_dir).unwrap().collect();
    assert_eq!(names.len(), 2, "no temporary files left: {names:?}");

    // A directory that cannot be created (its parent is a file), even as root.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let config = WriteConfig {
        directory: Some(file.join("sub")),
        ..Default::default()
    };
    let (writer, metrics) = start(&config);
    writer.submit(vec![series("web", 1)]);
    writer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        metrics.dropped_profiles(DIRECTORY_ENDPOINT, DropReason::Rejected),
        1
    );
    assert_eq!(metrics.sent_profiles(DIRECTORY_ENDPOINT), 0);
}

/// `max_backoff_retries = 0` retries until the endpoint answers, as in Alloy's
/// `pyroscope.write`: twelve failures (more than the default ten retries) and the profile
/// still arrives, dropped nowhere.
#[tokio::test]
async fn zero_max_backoff_retries_retries_until_the_endpoint_recovers() {
    const FAILURES: usize = 12;
    let rx = Receiver::start(Arc::new(|n| {
        Reply::Status(if n < FAILURES { 503 } else { 200 })
    }))
    .await;
    let name = host_of(&rx.url);
    let mut forever = endpoint(&rx.url, Protocol::Push);
    forever.max_backoff_retries = 0;
    forever.max_backoff_period = Duration::from_millis(20);
    let (writer, metrics) = start(&one_endpoint(forever));
    writer.submit(vec![series("web", 1)]);
    wait_until(|| metrics.sent_profiles(&name) == 1, LONG).await;
    assert_eq!(rx.count(), FAILURES + 1);
    assert_eq!(metrics.retries(&name), FAILURES as u64);
    assert_eq!(
        metrics.dropped_profiles(&name, DropReason::RetriesExhausted),
        0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}
