//! `cargo xtask run [-- ARGS]`: the one command that shows the agent working. Builds the
//! agent and starts the daemon with the embedded default configuration (every process on
//! the host, profiles in `./profiles` of the workspace root, the flame graph page on
//! http://127.0.0.1:4100/, whose URL the agent prints). Extra arguments go to
//! `profiler-agent run` (`-- --config agent.toml`), or name another subcommand
//! (`-- record --pid 1234 --output p.pb.gz`).
use anyhow::Result;

use crate::{
    setup::setup,
    util::{ExitCode, agent_binary, build_agent, exit_code, status, workspace_root},
};

const SUBCOMMANDS: [&str; 4] = ["run", "record", "check-config", "help"];

pub fn run(extra: &[String]) -> Result<()> {
    setup()?;
    build_agent()?;
    let mut cmd = std::process::Command::new(agent_binary());
    cmd.current_dir(workspace_root()).args(agent_args(extra));
    let status = status(&mut cmd)?;
    if status.success() {
        Ok(())
    } else {
        Err(ExitCode(exit_code(status)).into())
    }
}

/// The agent's command line: `run` unless the arguments name a subcommand.
fn agent_args(extra: &[String]) -> Vec<String> {
    match extra.first() {
        Some(first) if SUBCOMMANDS.contains(&first.as_str()) => extra.to_vec(),
        _ => std::iter::once("run".to_owned())
            .chain(extra.iter().cloned())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::agent_args;

    #[test]
    fn runs_the_daemon_unless_a_subcommand_is_named() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(agent_args(&[]), args(&["run"]));
        assert_eq!(
            agent_args(&args(&["--config", "a.toml"])),
            args(&["run", "--config", "a.toml"])
        );
        assert_eq!(
            agent_args(&args(&["record", "--pid", "1"])),
            args(&["record", "--pid", "1"])
        );
    }
}
