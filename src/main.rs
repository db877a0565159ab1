//! vhost-gateway: parse the command line, set up logging, run, exit code.
//! Everything else lives in the library (`src/lib.rs`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use vhost_gateway::cli::{Cli, LogFormat};
use vhost_gateway::commands;
use vhost_gateway::control::LogLevel;
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
    let source = vhost_gateway::config::Source {
        path: cli.config.clone(),
        queue_pairs: cli.queue_pairs,
    };
    let config = match source.read() {
        Ok(c) => c,
        Err(e) => {
            let path = cli.config.as_deref().unwrap_or(std::path::Path::new("-"));
            eprintln!("vhost-gateway: {}: {}", path.display(), error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let log_level = match init_logging(&cli.log_level, cli.log_format) {
        Ok(set) => set,
        Err(message) => {
            eprintln!("vhost-gateway: {message}");
            return ExitCode::FAILURE;
        }
    };
    let operations = vhost_gateway::daemon::Operations {
        control_socket: cli.control_socket.clone(),
        pcap: cli.pcap.clone(),
        log_level: Some(log_level),
        source,
        metrics_listen: cli.metrics_listen,
    };
    match vhost_gateway::daemon::run(&socket_path, config, operations) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging goes to stderr already: one line, not two (under
            // systemd both would land in the journal).
            tracing::error!(error = %error_chain(&e), "stopped");
            ExitCode::FAILURE
        }
    }
}

/// Logging to stderr at `level`; returns what changes the level later.
fn init_logging(level: &str, format: LogFormat) -> Result<LogLevel, String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("--log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let set: LogLevel = match format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |level: &str| reload(&handle, level))
        }
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Arc::new(move |level: &str| reload(&handle, level))
        }
    };
    Ok(set)
}

fn reload<S>(
    handle: &tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
    level: &str,
) -> Result<(), String> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("{level:?}: {e}"))?;
    handle.reload(filter).map_err(|e| e.to_string())
}
