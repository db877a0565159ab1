//! The subcommands that do not run the daemon: `check-config`,
//! `print-default-config`, `explain`, `ca generate`, `ctl`, and the
//! capabilities document. Each returns the process exit code; messages go
//! to stdout (results) and stderr (problems), once.
//!
//! Runs on the main thread instead of the daemon; only `ctl` touches a
//! socket (a running daemon's control socket).
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

use crate::cli::{CaAction, Command, CtlAction, PcapAction, PublishAction};
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
        Command::Ctl {
            control_socket,
            json,
            action,
        } => ctl(control_socket, *json, action),
    }
}

/// `ctl`: one request; the answer printed for a person (or as JSON).
fn ctl(socket: &Path, json: bool, action: &CtlAction) -> ExitCode {
    let (method, path, body) = match action {
        CtlAction::Status => ("GET", "/v1/status".to_owned(), None),
        CtlAction::Counters { .. } => ("GET", "/v1/counters".to_owned(), None),
        CtlAction::Flows { limit } => ("GET", format!("/v1/flows?limit={limit}"), None),
        CtlAction::LogLevel { level } => {
            let body = crate::control::api::LogLevelBody {
                level: level.clone(),
            };
            let body = serde_json::to_string(&body).unwrap_or_default();
            ("PUT", "/v1/log-level".to_owned(), Some(body))
        }
        CtlAction::Metrics => ("GET", "/metrics".to_owned(), None),
        CtlAction::Reload => ("POST", "/v1/reload".to_owned(), None),
        CtlAction::Pcap { action } => match action {
            PcapAction::Status => ("GET", "/v1/pcap".to_owned(), None),
            PcapAction::Start { file } => {
                let body = serde_json::json!({ "action": "start", "file": file });
                ("POST", "/v1/pcap".to_owned(), Some(body.to_string()))
            }
            PcapAction::Stop => {
                let body = serde_json::json!({ "action": "stop" });
                ("POST", "/v1/pcap".to_owned(), Some(body.to_string()))
            }
        },
        CtlAction::Publish { action } => match action {
            PublishAction::List => ("GET", "/v1/publish".to_owned(), None),
            PublishAction::Add {
                host,
                guest_port,
                protocol,
            } => {
                let body = serde_json::json!({
                    "protocol": protocol, "host": host, "guest-port": guest_port
                });
                ("POST", "/v1/publish".to_owned(), Some(body.to_string()))
            }
            PublishAction::Remove { host, protocol } => {
                let body = serde_json::json!({ "protocol": protocol, "host": host });
                ("DELETE", "/v1/publish".to_owned(), Some(body.to_string()))
            }
        },
    };
    let (status, answer) = match crate::control::client::request(socket, method, &path, body) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("vhost-gateway ctl: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if !(200..300).contains(&status) {
        let reason = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(answer);
        eprintln!("vhost-gateway ctl: {status}: {}", reason.trim_end());
        return ExitCode::FAILURE;
    }
    if json || matches!(action, CtlAction::Metrics) {
        print!("{answer}");
        return ExitCode::SUCCESS;
    }
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&answer) else {
        print!("{answer}");
        return ExitCode::SUCCESS;
    };
    print!("{}", render(action, &value));
    ExitCode::SUCCESS
}

/// A `ctl` answer for a person.
fn render(action: &CtlAction, v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        // Writing into a String cannot fail.
        let _ = writeln!(out, "{key:<28} {value}");
    };
    let gauges = |line: &mut dyn FnMut(&str, String), g: &serde_json::Value| {
        if let Some(map) = g.as_object() {
            for (name, value) in map {
                line(name, text(value));
            }
        }
    };
    match action {
        CtlAction::Status => {
            line("version", text(&v["version"]));
            line("uptime", format!("{} s", text(&v["uptime_seconds"])));
            let guest = &v["guest"];
            if guest.is_null() {
                line("VMM attached", "no".to_owned());
            } else {
                line(
                    "VMM attached",
                    format!(
                        "yes, for {} s, {} queue pair(s)",
                        text(&guest["attached_seconds"]),
                        text(&guest["queue_pairs"])
                    ),
                );
                line(
                    "guest lease",
                    match guest["mac"].as_str() {
                        Some(mac) => {
                            format!("{mac}, {} s left", text(&guest["lease_seconds_left"]))
                        }
                        None => "none".to_owned(),
                    },
                );
                line("guest IPv4", text(&guest["ipv4"]));
                line("guest IPv6", text(&guest["ipv6"]));
                line("DNS pins", text(&guest["dns_pins"]));
            }
            line("cached certificates", text(&v["cached_certificates"]));
            gauges(&mut line, &v["gauges"]);
        }
        CtlAction::Counters { all } => {
            if let Some(map) = v["counters"].as_object() {
                for (name, value) in map {
                    if *all || value.as_u64() != Some(0) {
                        line(name, text(value));
                    }
                }
            }
            if let Some(pairs) = v["frames_by_pair"].as_array()
                && pairs.len() > 1
            {
                let list: Vec<String> = pairs.iter().map(text).collect();
                line("frames_by_pair", list.join(","));
            }
            gauges(&mut line, &v["gauges"]);
        }
        CtlAction::Flows { .. } => {
            out.push_str(&format!(
                "{:<5} {:<11} {:<40} {:<40} {:<24} {:>12} {:>12} {:>9} {:>4}\n",
                "PROTO",
                "STATE",
                "GUEST",
                "REMOTE",
                "NAME",
                "FROM GUEST",
                "TO GUEST",
                "AGE",
                "PAIR"
            ));
            for f in v["flows"].as_array().into_iter().flatten() {
                let age = f["age_ms"].as_u64().unwrap_or(0);
                out.push_str(&format!(
                    "{:<5} {:<11} {:<40} {:<40} {:<24} {:>12} {:>12} {:>8}s {:>4}\n",
                    text(&f["proto"]),
                    text(&f["state"]),
                    text(&f["guest"]),
                    text(&f["remote"]),
                    text(&f["name"]),
                    text(&f["bytes_from_guest"]),
                    text(&f["bytes_to_guest"]),
                    age / 1000,
                    text(&f["pair"]),
                ));
            }
            out.push_str(&format!(
                "{} of {} flow(s) listed\n",
                text(&v["listed"]),
                text(&v["total"])
            ));
        }
        CtlAction::LogLevel { .. } => line("log level", text(&v["level"])),
        CtlAction::Pcap { .. } => {
            line("capture file", text(&v["file"]));
            line("frames written", text(&v["frames"]));
            line("frames dropped", text(&v["dropped"]));
            line("files begun", text(&v["files_begun"]));
        }
        CtlAction::Reload => {
            let changed: Vec<String> = v["changed"]
                .as_array()
                .map(|a| a.iter().map(&text).collect())
                .unwrap_or_default();
            let changed = if changed.is_empty() {
                "nothing".to_owned()
            } else {
                changed.join(", ")
            };
            line("reloaded; changed", changed);
            for (key, verb) in [("published", "published"), ("unpublished", "unpublished")] {
                for e in v[key].as_array().into_iter().flatten() {
                    line(verb, publish_entry(e));
                }
            }
            line("flows reset", text(&v["flows_reset"]));
        }
        CtlAction::Publish { action } => {
            let entries = match action {
                PublishAction::List => v["published"].as_array().cloned().unwrap_or_default(),
                _ => vec![v.clone()],
            };
            let verb = match action {
                PublishAction::Remove { .. } => "unpublished",
                _ => "published",
            };
            for e in &entries {
                line(verb, publish_entry(e));
            }
        }
        CtlAction::Metrics => {}
    }
    out
}

/// A published entry for a person.
fn publish_entry(e: &serde_json::Value) -> String {
    let field = |k: &str| match &e[k] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!(
        "{} {} -> guest port {}",
        field("protocol"),
        field("host"),
        field("guest-port")
    )
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
