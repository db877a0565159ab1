//! The subcommands that do not run the daemon: `check-config`,
//! `print-default-config`, `explain`, `ca generate`, and the capabilities
//! document. Each returns the process exit code; messages go to stdout
//! (results) and stderr (problems), once.
//!
//! Runs on the main thread before (instead of) the daemon; touches no socket.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

use crate::cli::{CaAction, Command};
use crate::config::{self, Config};
use crate::daemon::error_chain;
use crate::policy::{Action, Flow, NameSource, Proto};

/// The capabilities document of QEMU's vhost-user backend conventions
/// (docs/interop/vhost-user.json): a network device with no extra features.
pub const CAPABILITIES: &str = r#"{"type": "net"}"#;

/// Runs one subcommand.
pub fn run(command: &Command) -> ExitCode {
    match command {
        Command::PrintDefaultConfig => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => check_config(file),
        Command::Ca {
            action: CaAction::Generate { out, name, days },
        } => ca_generate(out, name, *days),
        Command::Explain {
            config,
            dest,
            proto,
            port,
            name,
        } => explain(config.as_deref(), *dest, proto, *port, name.as_deref()),
    }
}

fn ca_generate(out: &Path, name: &str, days: u32) -> ExitCode {
    match crate::tls::certs::generate(out, name, days) {
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
            eprintln!("vhost-gateway: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &Path) -> ExitCode {
    match Config::load(file) {
        Ok(c) => {
            if c.tls.enabled {
                crate::tls::install_provider();
                if let Err(e) = crate::tls::intercept::Interceptor::new(&c.tls) {
                    eprintln!("{}: tls: {}", file.display(), error_chain(&e));
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
            eprintln!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn explain(
    file: Option<&Path>,
    dest: std::net::IpAddr,
    proto: &str,
    port: Option<u16>,
    name: Option<&str>,
) -> ExitCode {
    let config = match file.map(Config::load) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            eprintln!("vhost-gateway: {}", error_chain(&e));
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
    // The same host group the daemon would use: this host's addresses now.
    match crate::proxy::hostaddrs::snapshot() {
        Ok(now) => policy.host_set().replace(now),
        Err(e) => eprintln!("vhost-gateway: warning: cannot read this host's addresses: {e}"),
    }
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
    let why = match decision.rule.and_then(|n| policy.rule(n).map(|r| (n, r))) {
        Some((n, rule)) if n <= user_rules => format!("rule {n}: {rule}"),
        Some((n, rule)) => format!(
            "rule {n}: {rule} (from preset {})",
            config.policy.preset.as_str()
        ),
        None => "the default".to_owned(),
    };
    println!(
        "{action} {}{} by {why}",
        dest,
        port.map_or(String::new(), |p| format!(" port {p}"))
    );
    let forms = crate::policy::addr::forms(dest);
    for &form in forms.as_slice() {
        let group = policy.group_of(form);
        let what = if group == crate::policy::Group::Host {
            "this host's own address".to_owned()
        } else {
            crate::policy::addr::special_group(form).1.to_owned()
        };
        let carries = if forms.is_embedding(dest) {
            "carries "
        } else {
            ""
        };
        println!("  {carries}{form}: group {} ({what})", group.as_str());
    }
    if crate::policy::addr::reaches_local_host(dest) {
        println!(
            "  never dialled: the host's loopback is reachable only through the gateway's address (outbound.allow-host-loopback)"
        );
    }
    ExitCode::SUCCESS
}
