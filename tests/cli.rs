//! The command line: subcommands, capabilities, errors before the socket.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn vg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-gateway"))
        .args(args)
        .output()
        .unwrap()
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("vg-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn print_default_config_passes_check_config() {
    let out = vg(&["print-default-config"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[network]"));
    let path = temp_file("default.toml", &text);
    let out = vg(&["check-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.contains("ok: guest 198.19.0.2/24 via 198.19.0.1"),
        "{line}"
    );
}

#[test]
fn check_config_names_key_and_line_of_each_error() {
    let path = temp_file(
        "bad.toml",
        "# comment\n[network]\nmtu = 100\nipv4-guest = \"10.9.9.9\"\n",
    );
    let out = vg(&["check-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("network.mtu (line 3)"), "{err}");
    assert!(err.contains("network.ipv4-guest (line 4)"), "{err}");

    let path = temp_file("syntax.toml", "[network]\nmtu = \"big\"\n");
    let out = vg(&["check-config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("line 2"));

    let out = vg(&["check-config", "/nonexistent/vg.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("cannot read")
    );
}

#[test]
fn capabilities_are_vhost_user_json() {
    let out = vg(&["--print-capabilities"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "net");
}

#[test]
fn bad_invocations_fail_before_touching_the_socket() {
    let out = vg(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("--socket-path")
    );

    let sock = std::env::temp_dir().join(format!("vg-cli-{}-never.sock", std::process::id()));
    let cfg = temp_file("invalid.toml", "[network]\nbogus = 1\n");
    let out = vg(&[
        "--socket-path",
        sock.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&cfg);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("unknown field")
    );
    assert!(!sock.exists(), "socket created despite an invalid config");

    let out = vg(&[
        "--socket-path",
        sock.to_str().unwrap(),
        "--log-level",
        "loud=???",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!sock.exists());
}

#[test]
fn explain_names_the_deciding_rule() {
    let out = vg(&["explain", "10.1.2.3", "--port", "443"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(
            "deny 10.1.2.3 port 443 by rule 4: deny group:private (from preset public-only)\n  10.1.2.3: group private (private (RFC 1918))"
        ),
        "{text}"
    );
    let out = vg(&["explain", "192.0.2.10", "--proto", "udp", "--port", "53"]);
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("allow 192.0.2.10")
    );
    let cfg = temp_file(
        "explain.toml",
        "[policy]\npreset = \"none\"\n[[policy.rule]]\naction = \"allow\"\ndestination = \"*.example.com\"\n[[policy.rule]]\naction = \"deny\"\ndestination = \"*.example.com\"\n",
    );
    let out = vg(&[
        "explain",
        "--config",
        cfg.to_str().unwrap(),
        "203.0.113.5",
        "--name",
        "www.example.com",
    ]);
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("allow 203.0.113.5 by rule 1: allow *.example.com\n")
    );
    let out = vg(&["explain", "--config", cfg.to_str().unwrap(), "203.0.113.5"]);
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("deny 203.0.113.5 by the default\n")
    );
    let out = vg(&["check-config", cfg.to_str().unwrap()]);
    let _ = std::fs::remove_file(&cfg);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("warning: policy rule 2 is shadowed by rule 1"),
        "{text}"
    );
    let out = vg(&["explain", "192.0.2.10", "--proto", "sctp"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn explain_shows_groups_embedded_addresses_and_the_host() {
    let text = |args: &[&str]| String::from_utf8(vg(args).stdout).unwrap();
    let nat64 = text(&["explain", "64:ff9b::a9fe:a9fe", "--port", "80"]);
    assert!(
        nat64.starts_with("deny 64:ff9b::a9fe:a9fe port 80 by rule 1: deny group:metadata"),
        "{nat64}"
    );
    assert!(
        nat64.contains("carries 169.254.169.254: group metadata"),
        "{nat64}"
    );
    // Loopback is this host's own address here, and never dialled.
    let lo = text(&["explain", "::ffff:127.0.0.1", "--port", "22"]);
    assert!(
        lo.starts_with("deny ::ffff:127.0.0.1 port 22 by rule 2: deny group:host"),
        "{lo}"
    );
    assert!(lo.contains("never dialled"), "{lo}");
    let doc = text(&["explain", "2002:c633:6401::1", "--port", "443"]);
    assert!(doc.starts_with("allow"), "{doc}");
    assert!(doc.contains("carries 198.51.100.1"), "{doc}");
}
