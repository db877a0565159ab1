//! vhost-gateway: parse the command line, set up logging, run, exit code.

mod audit;
mod cli;
mod config;
mod daemon;
mod dns;
mod engine;
mod metrics;
mod policy;
mod ports;
mod proxy;
mod tls;
mod vhost;
mod virtio;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command, LogFormat};
use config::Config;

/// The capabilities document of QEMU's vhost-user backend conventions
/// (docs/interop/vhost-user.json): a network device with no extra features.
const CAPABILITIES: &str = r#"{"type": "net"}"#;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    match cli.command {
        Some(Command::PrintDefaultConfig) => {
            print!("{}", config::DEFAULT_TOML);
            return ExitCode::SUCCESS;
        }
        Some(Command::CheckConfig { ref file }) => return check_config(file),
        Some(Command::Ca {
            action:
                cli::CaAction::Generate {
                    ref out,
                    ref name,
                    days,
                },
        }) => return ca_generate(out, name, days),
        Some(Command::Explain {
            ref config,
            dest,
            ref proto,
            port,
            ref name,
        }) => return explain(config.as_deref(), dest, proto, port, name.as_deref()),
        None => {}
    }
    let Some(socket_path) = cli.socket_path.clone() else {
        eprintln!("vhost-gateway: --socket-path PATH is required to run the daemon");
        return ExitCode::FAILURE;
    };
    let config = match &cli.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "vhost-gateway: {}: {}",
                    path.display(),
                    daemon::error_chain(&e)
                );
                return ExitCode::FAILURE;
            }
        },
        None => Config::embedded(),
    };
    if let Err(message) = init_logging(&cli.log_level, cli.log_format) {
        eprintln!("vhost-gateway: {message}");
        return ExitCode::FAILURE;
    }
    match daemon::run(&socket_path, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %daemon::error_chain(&e), "stopped");
            eprintln!("vhost-gateway: {}", daemon::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn ca_generate(out: &std::path::Path, name: &str, days: u32) -> ExitCode {
    match tls::certs::generate(out, name, days) {
        Ok((cert, key)) => {
            println!(
                "wrote {} (certificate) and {} (private key, mode 0600)\n\n\
                 In the daemon's config:\n\n  [tls]\n  enabled = true\n  \
                 ca-cert = \"{}\"\n  ca-key = \"{}\"\n\n\
                 In each guest, trust the certificate (not the key), e.g. on Debian/Ubuntu:\n\n  \
                 cp ca.pem /usr/local/share/ca-certificates/vhost-gateway.crt && update-ca-certificates\n\n\
                 (Fedora/RHEL: /etc/pki/ca-trust/source/anchors/ + update-ca-trust; Alpine: \
                 /usr/local/share/ca-certificates/ + update-ca-certificates; \
                 or point the client at it: curl --cacert, SSL_CERT_FILE, NODE_EXTRA_CA_CERTS.)",
                cert.display(),
                key.display(),
                cert.display(),
                key.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vhost-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(c) => {
            if c.tls.enabled {
                tls::install_provider();
                if let Err(e) = tls::intercept::Interceptor::new(&c.tls) {
                    eprintln!("{}: tls: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            }
            println!("{}: ok: {}", file.display(), c.summary());
            for (rule, by) in c.policy().shadowed() {
                if rule <= c.policy.rule.len() {
                    println!(
                        "{}: warning: policy rule {rule} is shadowed by rule {by} and never decides",
                        file.display()
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(config::Error::Invalid(problems)) => {
            for p in problems {
                eprintln!("{}: {p}", file.display());
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{}", daemon::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn explain(
    file: Option<&std::path::Path>,
    dest: std::net::IpAddr,
    proto: &str,
    port: Option<u16>,
    name: Option<&str>,
) -> ExitCode {
    use policy::{Action, Flow, NameSource, Proto};
    let config = match file.map(Config::load) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            eprintln!("vhost-gateway: {}", daemon::error_chain(&e));
            return ExitCode::FAILURE;
        }
        None => Config::embedded(),
    };
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        other => {
            eprintln!("vhost-gateway: --proto {other:?}: expected tcp, udp or icmp");
            return ExitCode::FAILURE;
        }
    };
    let policy = config.policy();
    let decision = policy.decide(&Flow {
        dst: dest,
        proto,
        port,
        name: name.map(|n| (n, NameSource::Dns)),
    });
    let action = match decision.action {
        Action::Allow => "allow",
        Action::Deny => "deny",
    };
    let user_rules = config.policy.rule.len();
    let why = match decision.rule {
        Some(n) if n <= user_rules => format!(
            "rule {n}: {} {}",
            action,
            config
                .policy
                .rule
                .get(n - 1)
                .map_or("", |r| r.destination.as_str())
        ),
        Some(n) => format!("rule {n} (from preset {:?})", config.policy.preset),
        None => "the default".to_owned(),
    };
    println!(
        "{action} {}{} by {why}",
        dest,
        port.map_or(String::new(), |p| format!(" port {p}"))
    );
    ExitCode::SUCCESS
}

fn init_logging(level: &str, format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("--log-level {level:?}: {e}"))?;
    use std::io::IsTerminal;
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
