//! vhost-gateway: parse the command line, set up logging, run, exit code.
//! Everything else lives in the library (`src/lib.rs`).

use std::process::ExitCode;

use clap::Parser;

use vhost_gateway::cli::{Cli, LogFormat};
use vhost_gateway::commands;
use vhost_gateway::config::Config;
use vhost_gateway::daemon::error_chain;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_capabilities {
        println!("{}", commands::CAPABILITIES);
        return ExitCode::SUCCESS;
    }
    if let Some(command) = &cli.command {
        return commands::run(command);
    }
    let Some(socket_path) = cli.socket_path.clone() else {
        eprintln!("vhost-gateway: --socket-path PATH is required to run the daemon");
        return ExitCode::FAILURE;
    };
    let mut config = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("vhost-gateway: {}: {}", path.display(), error_chain(&e));
                return ExitCode::FAILURE;
            }
        },
        None => Config::embedded(),
    };
    if let Some(n) = cli.queue_pairs {
        config.network.queue_pairs = n;
    }
    if let Err(message) = init_logging(&cli.log_level, cli.log_format) {
        eprintln!("vhost-gateway: {message}");
        return ExitCode::FAILURE;
    }
    match vhost_gateway::daemon::run(&socket_path, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging goes to stderr already: one line, not two (under
            // systemd both would land in the journal).
            tracing::error!(error = %error_chain(&e), "stopped");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str, format: LogFormat) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("--log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
