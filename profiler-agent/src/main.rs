use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use profiler_agent::{
    config::AgentConfig,
    daemon::{self, ConfigSource},
    record::{self, RecordArgs},
};

/// Host-wide eBPF CPU profiler.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Profile continuously and write per-target profiles every collect_interval.
    Run {
        /// Configuration file (TOML); without it, the embedded default: every process on
        /// the host, profiles in ./profiles, the flame graph page on 127.0.0.1:4100.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print the effective configuration, secrets
    /// redacted.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Record CPU samples of some or all processes, or of a command, into a profile file.
    Record(RecordArgs),
}

/// Exit status of a refused configuration, as for a bad command line.
const CONFIG_ERROR: u8 = 2;

fn main() -> ExitCode {
    profiler_agent::memory::configure();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // kube logs every failed request itself; discovery counts and reports those.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            let source = config.map_or(ConfigSource::EmbeddedDefault, ConfigSource::File);
            match daemon::run(source) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::from(error.exit_code())
                }
            }
        }
        Command::CheckConfig { config } => match AgentConfig::load(&config) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("warning: {warning}");
                }
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(CONFIG_ERROR)
            }
        },
        Command::Record(args) => match record::run(&args) {
            Ok(None) => ExitCode::SUCCESS,
            // `record -- COMMAND` exits as the command did.
            Ok(Some(status)) => ExitCode::from(record::exit_code(status)),
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
