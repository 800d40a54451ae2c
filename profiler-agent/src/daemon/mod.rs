//! `profiler-agent run`: the long-running agent. Wires the pieces together and owns their
//! lifetimes: the HTTP server, discovery (restarted on SIGHUP), the writer (replaced on
//! SIGHUP), the trigger monitor (reconfigured on SIGHUP, see `capture::reload`) and the
//! pipeline thread (kept across reloads: BPF is loaded once).

pub mod pipeline;

use std::{
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::write::Submit;
use crate::{
    bpf::BpfError,
    capture::{Capturer, reload::Triggers},
    config::{AgentConfig, ConfigError},
    discovery::{
        kubernetes::KubernetesError,
        manager::{Discovery, TargetsTx},
    },
    metrics::AgentMetrics,
    profile::BuildOptions,
    server::{self, CaptureApi, ServerState},
    targets::TargetSet,
    write::{WriteConfigError, WriteMetrics, Writer},
};
use pipeline::{Pipeline, PipelineSettings};

/// How long the last partial interval may take to reach the sinks on SIGTERM.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("kubernetes discovery: {0}")]
    Kubernetes(#[from] KubernetesError),
    #[error("write endpoints: {0}")]
    Write(#[from] WriteConfigError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl DaemonError {
    /// Exit status: 2 for configuration errors, as for a bad command line.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config(_) | DaemonError::Write(_) | DaemonError::Kubernetes(_) => 2,
            _ => 1,
        }
    }
}

/// Where the configuration came from, for reloads.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    File(PathBuf),
    EmbeddedDefault,
}

impl ConfigSource {
    /// Loads the configuration and logs what it had to say about Alloy arguments.
    pub fn load(&self) -> Result<AgentConfig, ConfigError> {
        let config = match self {
            ConfigSource::File(path) => AgentConfig::load(path)?,
            ConfigSource::EmbeddedDefault => AgentConfig::embedded_default(),
        };
        for warning in &config.warnings {
            tracing::warn!(%warning, "configuration");
        }
        Ok(config)
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(source: ConfigSource) -> Result<(), DaemonError> {
    let config = source.load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The pipeline has its own thread; the runtime only serves HTTP, discovery and writes.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(run_async(source, config))
}

async fn run_async(source: ConfigSource, mut config: AgentConfig) -> Result<(), DaemonError> {
    let mut registry = Registry::default();
    let metrics = Arc::new(AgentMetrics::register(&mut registry));
    let write_metrics = Arc::new(WriteMetrics::register(&mut registry));
    let registry = Arc::new(registry);

    let (targets_tx, targets_rx) = watch::channel(Arc::new(TargetSet::default()));
    let targets_tx = Arc::new(targets_tx);
    let (ready_tx, ready_rx) = watch::channel(false);
    let ready_tx = Arc::new(ready_tx);
    let bpf_attached = Arc::new(AtomicBool::new(false));
    let heartbeat = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let latest = crate::interval::latest::LatestProfiles::default();

    // Checked by validation already; read here once, as the file may hold a secret.
    let capture_token =
        config
            .capture
            .token(config.server.listen_address)
            .map_err(|(field, reason)| {
                DaemonError::Config(ConfigError::Invalid {
                    origin: "capture".into(),
                    field,
                    reason,
                })
            })?;
    let (capture_jobs, capture_rx) = std::sync::mpsc::channel();
    // Always there (it holds nothing until a capture runs): a reload may add triggers.
    let capturer = Arc::new(
        Capturer::new(
            config.capture.max_concurrent,
            config.collect_user_profile,
            config.collect_kernel(),
            capture_jobs,
            metrics.clone(),
        )
        .with_python(config.python_enabled)
        .with_hotspot(config.hotspot_enabled),
    );

    let address = config.server.listen_address;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| DaemonError::Listen { address, source })?;
    let state = ServerState {
        registry,
        metrics: metrics.clone(),
        bpf_attached: bpf_attached.clone(),
        discovery_ready: ready_rx,
        heartbeat: heartbeat.clone(),
        latest: latest.clone(),
        collect_interval: config.collect_interval,
        capture: config.capture.enabled.then(|| CaptureApi {
            capturer: capturer.clone(),
            token: capture_token,
        }),
        listen_address: address,
    };
    let (server_stop_tx, mut server_stop_rx) = watch::channel(false);
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = server_stop_rx.wait_for(|stop| *stop).await;
        };
        if let Err(error) = server::serve(listener, state, shutdown).await {
            tracing::error!(%error, "HTTP server failed");
        }
    });
    eprintln!(
        "profiler-agent: serving http://{}/ (metrics at /metrics)",
        listener_display(address)
    );

    let writer: Arc<RwLock<Option<Writer>>> = Arc::new(RwLock::new(Some(Writer::start(
        &config.write,
        write_metrics.clone(),
    )?)));
    let mut discovery = start_discovery(
        &config,
        targets_tx.clone(),
        ready_tx.clone(),
        metrics.clone(),
    )
    .await?;

    let submit_to = writer.clone();
    let submit: Submit = Arc::new(move |batch| {
        if let Ok(writer) = submit_to.read()
            && let Some(writer) = writer.as_ref()
        {
            writer.submit(batch);
        }
    });
    let settings = PipelineSettings {
        collect_interval: config.collect_interval,
        sample_rate: config.sample_rate,
        collect_user: config.collect_user_profile,
        collect_kernel: config.collect_kernel(),
        python: config.python_enabled,
        hotspot: config
            .hotspot_enabled
            .then_some(config.hotspot_perf_map_interval),
        demangle: config.demangle,
        caches: config.cache_config(),
        container_id_cache_size: config.container_id_cache_size,
        unwind_table_memory: config.unwind_table_memory,
        build: BuildOptions {
            sample_rate: config.sample_rate,
            comm: config.comm,
            pid_label: config.pid_label,
            container_label: false,
        },
    };
    let start_metrics = metrics.clone();
    let pipeline_submit = submit.clone();
    let monitor_targets = targets_rx.clone();
    let pipeline = tokio::task::spawn_blocking(move || {
        Pipeline::start(
            settings,
            pipeline::Outputs {
                targets: targets_rx,
                submit: pipeline_submit,
                metrics: start_metrics,
                latest,
                captures: capture_rx,
            },
            heartbeat,
        )
    })
    .await
    .expect("the pipeline start does not panic")?;
    bpf_attached.store(true, Ordering::SeqCst);
    let mut triggers = Triggers::start(
        &config.capture,
        &config.trigger,
        capturer.clone(),
        monitor_targets,
        submit.clone(),
        metrics.clone(),
    );
    tracing::info!(
        interval = ?config.collect_interval,
        sample_rate = config.sample_rate,
        "profiling"
    );

    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Runtime)?;
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                match reload(&source, &config, &writer, &write_metrics).await {
                    Ok(new_config) => {
                        // Discovery restarts; the last published targets stay until then.
                        drop(discovery);
                        discovery = start_discovery(
                            &new_config,
                            targets_tx.clone(),
                            ready_tx.clone(),
                            metrics.clone(),
                        )
                        .await?;
                        triggers.reload(&config.capture, &new_config.capture, &new_config.trigger);
                        config = new_config;
                        tracing::info!("configuration reloaded");
                    }
                    Err(error) => tracing::error!(%error, "reload refused; keeping the running configuration"),
                }
            }
        }
    }

    eprintln!("profiler-agent: stopping; flushing the last interval");
    drop(triggers);
    // Running captures end now, so the server's graceful shutdown does not wait minutes.
    capturer.stop();
    drop(discovery);
    tokio::task::spawn_blocking(move || pipeline.stop())
        .await
        .expect("the pipeline stops without panicking");
    bpf_attached.store(false, Ordering::SeqCst);
    let last_writer = writer.write().ok().and_then(|mut w| w.take());
    if let Some(w) = last_writer {
        w.shutdown(FLUSH_DEADLINE).await;
    }
    let _ = server_stop_tx.send(true);
    let _ = server.await;
    Ok(())
}

/// Starts the discovery `config` describes, publishing into `targets` and flipping `ready`
/// once the first set is built.
async fn start_discovery(
    config: &AgentConfig,
    targets: TargetsTx,
    ready: Arc<watch::Sender<bool>>,
    metrics: Arc<AgentMetrics>,
) -> Result<Discovery, KubernetesError> {
    let providers = Discovery::providers(&config.discovery, config.targets.clone()).await?;
    Ok(Discovery::start(
        providers,
        config.relabel.clone(),
        config.target_options(),
        targets,
        ready,
        metrics,
    ))
}

fn listener_display(address: std::net::SocketAddr) -> String {
    if address.ip().is_unspecified() {
        format!("localhost:{}", address.port())
    } else {
        address.to_string()
    }
}

/// Applies a new configuration's write settings; discovery and relabel settings are applied
/// by the caller. Settings that need the BPF program reloaded are reported and ignored.
async fn reload(
    source: &ConfigSource,
    running: &AgentConfig,
    writer: &RwLock<Option<Writer>>,
    write_metrics: &Arc<WriteMetrics>,
) -> Result<AgentConfig, DaemonError> {
    let new = source.load()?;
    if new.sample_rate != running.sample_rate
        || new.collect_interval != running.collect_interval
        || new.collect_user_profile != running.collect_user_profile
        || new.collect_kernel() != running.collect_kernel()
        || new.python_enabled != running.python_enabled
        || new.server.listen_address != running.server.listen_address
    {
        tracing::warn!(
            "sample_rate, collect_interval, collect_*_profile, kernel_frames, python_enabled \
             and server changes take effect only after a restart"
        );
    }
    let fresh = Writer::start(&new.write, write_metrics.clone())?;
    let old = writer.write().ok().and_then(|mut w| w.replace(fresh));
    if let Some(old) = old {
        // What the old endpoints still hold is delivered in the background.
        tokio::spawn(old.shutdown(FLUSH_DEADLINE));
    }
    Ok(new)
}
