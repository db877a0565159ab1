//! The egress policy against a real guest: test hosts on a public, a
//! private and the metadata address inside the namespace, each with a real
//! TCP/UDP echo server, so a refusal can only be the policy's.

use std::net::{TcpListener, UdpSocket};

use kit::guest::{Daemon, GuestOpts, Netns, boot, line_after, ping_result};
use kit::{serve_tcp_echo, serve_udp_echo};

#[test]
fn public_only_with_operator_rules_denies_fast_and_audits() {
    let ns = Netns::new("policy");
    ns.allow_ping_sockets();
    for addr in [
        "192.0.2.10",
        "192.0.2.66",
        "10.20.30.40",
        "10.20.30.41",
        "169.254.169.254",
    ] {
        ns.add_addr(&format!("{addr}/32"));
        let bind = format!("{addr}:7");
        let (tcp, udp) = ns.net_enter(move || {
            (
                TcpListener::bind(&bind).unwrap(),
                UdpSocket::bind(&bind).unwrap(),
            )
        });
        serve_tcp_echo(tcp);
        serve_udp_echo(udp);
    }
    let _dnsmasq = crate::dns::dnsmasq_with(
        &ns,
        &[
            "--address=/a.denied.test/192.0.2.10",
            "--address=/ok.test/192.0.2.10",
        ],
    );
    let config = r#"
[dns]
upstreams = ["192.0.2.53"]

[[policy.rule]]
action = "deny"
destination = "192.0.2.66"
protocols = ["tcp"]

[[policy.rule]]
action = "allow"
destination = "10.20.30.41/32"
protocols = ["tcp"]
ports = ["7-7"]

[[policy.rule]]
action = "deny"
destination = "*.denied.test"
"#;
    let daemon = Daemon::start(&ns, Some(config));
    let script = r#"
dhcp
vg-probe tcp-connect 192.0.2.10:7
vg-probe tcp-connect 192.0.2.66:7
vg-probe tcp-connect 10.20.30.40:7
vg-probe tcp-connect 10.20.30.41:7
vg-probe tcp-connect 169.254.169.254:7
vg-probe tcp-connect 198.19.0.1:7
vg-probe udp-echo 192.0.2.66:7 3 100
vg-probe udp-echo 10.20.30.40:7 3 100
vg-probe udp-echo 10.20.30.41:7 3 100
echo VG-PING-PRIVATE; ping -c 2 -W 1 10.20.30.40
echo VG-DNS-DENIED; nslookup a.denied.test
echo VG-DNS-OK; nslookup ok.test
echo VG-END
"#;
    let console = boot(&GuestOpts::new(&daemon.socket, script));
    let connect = |addr: &str| {
        line_after(&console, &format!("VG-CONNECT {addr} "))
            .unwrap_or("")
            .to_owned()
    };
    // Public, and a private host an operator CIDR rule opens.
    for addr in ["192.0.2.10:7", "10.20.30.41:7"] {
        assert!(connect(addr).contains("result=connected"), "{console}");
    }
    for addr in [
        "192.0.2.66:7",
        "10.20.30.40:7",
        "169.254.169.254:7",
        "198.19.0.1:7",
    ] {
        let line = connect(addr);
        assert!(line.contains("result=refused"), "{addr}: {console}");
        let ms: u64 = line
            .split("ms=")
            .nth(1)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(u64::MAX);
        assert!(ms < 500, "{addr} denied after {ms} ms");
    }
    // The operator's rule denies TCP only: UDP to 192.0.2.66 is public and
    // allowed; the private host is denied for UDP and ping too.
    let udp: Vec<&str> = console.lines().filter(|l| l.contains("VG-UDP")).collect();
    assert_eq!(udp.len(), 3, "{console}");
    assert!(udp[0].contains("ok=3"), "{console}");
    assert!(udp[1].contains("ok=0"), "{console}");
    // The CIDR allow names TCP port 7 only.
    assert!(udp[2].contains("ok=0"), "{console}");
    assert_eq!(ping_result(&console, "VG-PING-PRIVATE"), Some((2, 0)));
    let section = |from: &str, to: &str| {
        console
            .split(from)
            .nth(1)
            .and_then(|r| r.split(to).next())
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        section("VG-DNS-DENIED", "VG-DNS-OK").contains("NXDOMAIN"),
        "{console}"
    );
    assert!(
        section("VG-DNS-OK", "VG-END").contains("Address: 192.0.2.10"),
        "{console}"
    );
    // One audit line per denied TCP flow, naming the rule.
    let log = daemon.log();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("egress denied"))
        .collect();
    for (dst, rule) in [
        ("192.0.2.66", "rule=\"1\""),
        ("10.20.30.40", "rule=\"7\""),
        ("169.254.169.254", "rule=\"4\""),
        ("198.19.0.1", "rule=\"5\""),
    ] {
        assert!(
            audit.iter().any(|l| l.contains(&format!("dst={dst}"))
                && l.contains(rule)
                && l.contains("proto=\"tcp\"")),
            "no audit line for {dst} {rule}: {audit:#?}"
        );
    }
    assert!(
        audit
            .iter()
            .any(|l| l.contains("proto=\"dns\"") && l.contains("a.denied.test")),
        "{audit:#?}"
    );
}

/// Addresses of the allow-list test's hosts: `www.allowed.test` and a
/// public host no allowed name resolves to, each on IPv4 and IPv6.
const NAMED: [&str; 4] = ["192.0.2.10", "2001:db8::10", "192.0.2.20", "2001:db8::20"];

#[test]
fn domain_allow_list_by_name_sni_and_host_v4_v6_no_fronting() {
    let ns = Netns::new("names");
    let www = kit::TempDir::new("names-www");
    std::fs::write(www.0.join("small"), "hello by name\n").unwrap();
    let mut servers = Vec::new();
    for addr in NAMED {
        let (prefix, listen) = if addr.contains(':') {
            (128, format!("[{addr}]:80"))
        } else {
            (32, format!("{addr}:80"))
        };
        ns.add_addr(&format!("{addr}/{prefix}"));
        let bind = std::net::SocketAddr::new(addr.parse().unwrap(), 7);
        serve_tcp_echo(ns.net_enter(move || TcpListener::bind(bind).unwrap()));
        servers.push(kit::Server(
            ns.net_command("busybox")
                .args(["httpd", "-f", "-p", &listen, "-h"])
                .arg(&www.0)
                .spawn()
                .unwrap(),
        ));
    }
    let _dnsmasq = crate::dns::dnsmasq_with(
        &ns,
        &[
            "--address=/www.allowed.test/192.0.2.10",
            "--address=/www.allowed.test/2001:db8::10",
            "--address=/v6.allowed.test/2001:db8::10",
            "--address=/www.other.test/192.0.2.20",
            "--address=/www.other.test/2001:db8::20",
        ],
    );
    // Only names under allowed.test, by default deny.
    let config = r#"
[dns]
upstreams = ["192.0.2.53"]

[policy]
preset = "none"

[[policy.rule]]
action = "allow"
destination = "*.allowed.test"

[[policy.rule]]
action = "allow"
destination = "www.other.test"
protocols = ["tcp"]
ports = [443]
"#;
    let daemon = Daemon::start_args(Some(&ns), Some(config), &["--log-format", "json"]);
    // First with no DNS answer for the addresses (names from the flows'
    // own bytes), then after the guest resolved them (names from pins).
    let script = r#"
dhcp
wait_v6
echo VG-STEP unpinned
vg-probe tls-hello 192.0.2.10:7 www.denied.test
echo VG-GET host-denied; wget -q -O - --header 'Host: www.denied.test' http://192.0.2.10/small
echo VG-GET bare-ip-v4; wget -q -O - http://192.0.2.10/small
echo VG-GET host-ok; wget -q -O - --header 'Host: www.allowed.test' http://192.0.2.10/small
vg-probe tls-hello 192.0.2.20:7 www.allowed.test
vg-probe tls-hello [2001:db8::20]:7 www.allowed.test
echo VG-STEP pinned
nslookup www.allowed.test
nslookup www.other.test
vg-probe tls-hello [2001:db8::10]:7 www.allowed.test
vg-probe tls-hello [2001:db8::10]:7 api.allowed.test
vg-probe tcp-connect [2001:db8::20]:7
vg-probe tcp-connect 192.0.2.20:7
echo VG-GET by-name-v6; wget -q -O - http://v6.allowed.test/small
echo VG-GET bare-ip-pinned-v6; wget -q -O - http://[2001:db8::10]/small
echo VG-GET host-other-v6; wget -q -O - --header 'Host: www.other.test' http://[2001:db8::10]/small
echo VG-END
"#;
    let console = boot(&GuestOpts::new(&daemon.socket, script));
    let section = |from: &str| {
        console
            .split(from)
            .nth(1)
            .and_then(|r| r.split("VG-").next())
            .unwrap_or("")
            .to_owned()
    };
    let tls: Vec<&str> = console.lines().filter(|l| l.contains("VG-TLS")).collect();
    assert_eq!(tls.len(), 5, "{console}");
    let reset = |l: &str| l.contains("result=reset") || l.contains("result=closed");
    // A denied name; an allowed name claimed for addresses it does not
    // resolve to (v4, v6); a pinned allowed name; an allowed name the
    // address was not given for (fronting).
    assert!(reset(tls[0]), "{console}");
    assert!(reset(tls[1]) && reset(tls[2]), "{console}");
    assert!(
        tls[3].contains("www.allowed.test result=echoed"),
        "{console}"
    );
    assert!(reset(tls[4]), "{console}");
    let served = |step: &str| section(&format!("VG-GET {step}")).contains("hello by name");
    assert!(!served("host-denied"), "{console}");
    assert!(!served("bare-ip-v4"), "{console}");
    assert!(served("host-ok"), "{console}");
    assert!(served("by-name-v6"), "{console}");
    assert!(served("bare-ip-pinned-v6"), "{console}");
    assert!(!served("host-other-v6"), "{console}");
    // A pinned address whose name the policy allows only on another port
    // is refused at the SYN, both families.
    for addr in ["[2001:db8::20]:7", "192.0.2.20:7"] {
        let line = line_after(&console, &format!("VG-CONNECT {addr} ")).unwrap_or("");
        assert!(line.contains("result=refused"), "{addr}: {console}");
    }
    // The audit stream, as JSON: one object per deny, with the fields
    // operators parse.
    let log = daemon.log();
    let audit: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("egress denied"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let has = |dst: &str, name: &str, source: &str, reason: &str| {
        audit.iter().any(|v| {
            let f = &v["fields"];
            f["dst"] == dst
                && f["name"] == name
                && f["name_source"] == source
                && f["reason"] == reason
                && f["proto"] == "tcp"
                && f["decision"] == "deny"
                && v["timestamp"].is_string()
        })
    };
    assert!(
        has(
            "192.0.2.20",
            "www.allowed.test",
            "sni",
            "name-not-resolving"
        ),
        "{audit:#?}"
    );
    assert!(
        has(
            "2001:db8::20",
            "www.allowed.test",
            "sni",
            "name-not-resolving"
        ),
        "{audit:#?}"
    );
    assert!(
        has("192.0.2.10", "www.denied.test", "sni", "policy"),
        "{audit:#?}"
    );
    assert!(
        has("192.0.2.10", "www.denied.test", "host", "policy"),
        "{audit:#?}"
    );
    assert!(
        has("2001:db8::10", "api.allowed.test", "sni", "name-not-pinned"),
        "{audit:#?}"
    );
    assert!(
        has("2001:db8::10", "www.other.test", "host", "name-not-pinned"),
        "{audit:#?}"
    );
    assert!(
        has("2001:db8::20", "www.other.test", "dns", "policy"),
        "{audit:#?}"
    );
}
