//! The egress policy against a real guest: test hosts on a public, a
//! private and the metadata address inside the namespace, each with a real
//! TCP/UDP echo server, so a refusal can only be the policy's.

use std::net::{TcpListener, UdpSocket};

use crate::common::{serve_tcp_echo, serve_udp_echo};
use crate::harness::{Daemon, GuestOpts, Netns, boot, line_after, ping_result};

#[test]
fn public_only_with_operator_rules_denies_fast_and_audits() {
    let ns = Netns::new("policy");
    ns.allow_ping_sockets();
    for addr in ["192.0.2.10", "192.0.2.66", "10.20.30.40", "169.254.169.254"] {
        ns.add_addr(&format!("{addr}/32"));
        let bind = format!("{addr}:7");
        let (tcp, udp) = ns.enter(move || {
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
action = "deny"
destination = "*.denied.test"
"#;
    let daemon = Daemon::start(&ns, Some(config));
    let script = r#"
dhcp
vg-probe tcp-connect 192.0.2.10:7
vg-probe tcp-connect 192.0.2.66:7
vg-probe tcp-connect 10.20.30.40:7
vg-probe tcp-connect 169.254.169.254:7
vg-probe tcp-connect 198.19.0.1:7
vg-probe udp-echo 192.0.2.66:7 3 100
vg-probe udp-echo 10.20.30.40:7 3 100
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
    assert!(
        connect("192.0.2.10:7").contains("result=connected"),
        "{console}"
    );
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
    assert_eq!(udp.len(), 2, "{console}");
    assert!(udp[0].contains("ok=3"), "{console}");
    assert!(udp[1].contains("ok=0"), "{console}");
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
        ("10.20.30.40", "rule=\"6\""),
        ("169.254.169.254", "rule=\"3\""),
        ("198.19.0.1", "rule=\"4\""),
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

#[test]
fn domain_allow_list_decides_on_sni_and_host_without_a_pin() {
    let ns = Netns::new("names");
    ns.add_addr("192.0.2.10/32");
    let tcp = ns.enter(|| TcpListener::bind("192.0.2.10:7").unwrap());
    serve_tcp_echo(tcp);
    let www = crate::common::TempDir::new("names-www");
    std::fs::write(www.0.join("small"), "hello by name\n").unwrap();
    let _httpd = crate::common::Server(
        ns.command("busybox")
            .args(["httpd", "-f", "-p", "192.0.2.10:80", "-h"])
            .arg(&www.0)
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Only names under allowed.test, by default deny: no DNS is involved, so
    // the names come from the flows' first bytes.
    let config = r#"
[policy]
preset = "none"

[[policy.rule]]
action = "allow"
destination = "*.allowed.test"
"#;
    let daemon = Daemon::start(&ns, Some(config));
    let script = r#"
dhcp
vg-probe tls-hello 192.0.2.10:7 www.allowed.test
vg-probe tls-hello 192.0.2.10:7 www.denied.test
echo VG-HOST-OK; wget -q -O - --header 'Host: www.allowed.test' http://192.0.2.10/small
echo VG-HOST-DENIED; wget -q -O - --header 'Host: www.denied.test' http://192.0.2.10/small
echo VG-BARE-IP; wget -q -O - http://192.0.2.10/small
echo VG-END
"#;
    let console = boot(&GuestOpts::new(&daemon.socket, script));
    assert!(
        console.contains("VG-TLS www.allowed.test result=echoed"),
        "{console}"
    );
    let denied = line_after(&console, "VG-TLS www.denied.test").unwrap_or("");
    assert!(
        denied.contains("result=reset") || denied.contains("result=closed"),
        "{console}"
    );
    let section = |from: &str, to: &str| {
        console
            .split(from)
            .nth(1)
            .and_then(|r| r.split(to).next())
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        section("VG-HOST-OK", "VG-HOST-DENIED").contains("hello by name"),
        "{console}"
    );
    assert!(
        !section("VG-HOST-DENIED", "VG-BARE-IP").contains("hello by name"),
        "{console}"
    );
    assert!(
        !section("VG-BARE-IP", "VG-END").contains("hello by name"),
        "{console}"
    );
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("egress denied")
            && l.contains("www.denied.test")
            && l.contains("\"sni\"")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("egress denied")
            && l.contains("www.denied.test")
            && l.contains("\"host\"")),
        "{log}"
    );
}
