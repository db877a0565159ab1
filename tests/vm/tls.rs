//! TLS interception against a real guest: the upstream is a rustls HTTPS
//! server the test runs in the namespace, with its own test CA (given to the
//! daemon as `upstream-ca-file`); the daemon's CA comes from `vhost-gateway
//! ca generate`; the guest's client is the probe, trusting exactly one CA
//! per request, so "ok" says whose certificate it saw.

use std::net::UdpSocket;
use std::process::Command;

use kit::guest::{Daemon, GuestOpts, Netns, boot, line_after};
use kit::tls::{serve_https, upstream_identity};
use kit::{TempDir, run, serve_udp_echo};

#[test]
fn interception_bypass_bad_upstream_403_quic_and_dot() {
    let ns = Netns::new("tls");
    for addr in ["192.0.2.10/32", "192.0.2.30/32", "2001:db8::10/128"] {
        ns.add_addr(addr);
    }
    let (upstream_ca, good) = upstream_identity(&[
        "www.secure.test",
        "bypass.secure.test",
        "denied.secure.test",
    ]);
    // Signed by a CA nobody trusts.
    let (_, bad) = upstream_identity(&["bad.secure.test"]);
    for addr in ["192.0.2.10:443", "[2001:db8::10]:443"] {
        serve_https(&ns, addr.parse().unwrap(), good.clone());
    }
    serve_https(&ns, "192.0.2.30:443".parse().unwrap(), bad);
    // Something that would answer QUIC-port datagrams, so silence is ours.
    serve_udp_echo(ns.net_enter(|| UdpSocket::bind("192.0.2.10:443").unwrap()));
    let _dnsmasq = crate::dns::dnsmasq_with(
        &ns,
        &[
            "--address=/www.secure.test/192.0.2.10",
            "--address=/blocked.secure.test/192.0.2.10",
        ],
    );
    let dir = TempDir::new("tls-ca");
    run(Command::new(env!("CARGO_BIN_EXE_vhost-gateway"))
        .args(["ca", "generate", "--out"])
        .arg(dir.0.join("ca")));
    let our_ca = std::fs::read(dir.0.join("ca/ca.pem")).unwrap();
    std::fs::write(dir.0.join("upstream-ca.pem"), &upstream_ca).unwrap();
    let config = format!(
        r#"
[dns]
upstreams = ["192.0.2.53"]
block = ["blocked.secure.test"]

[tls]
enabled = true
ca-cert = "{0}/ca/ca.pem"
ca-key = "{0}/ca/ca.key"
bypass = ["bypass.secure.test"]
upstream-roots = "none"
upstream-ca-file = "{0}/upstream-ca.pem"

[[policy.rule]]
action = "deny"
destination = "denied.secure.test"
"#,
        dir.0.display()
    );
    let daemon = Daemon::start(&ns, Some(&config));
    let script = r#"
dhcp
wait_v6
P="vg-probe https-get"
$P 192.0.2.10:443 www.secure.test /ca.pem /
$P 192.0.2.10:443 www.secure.test /upstream-ca.pem /
$P [2001:db8::10]:443 www.secure.test /ca.pem /
$P 192.0.2.10:443 bypass.secure.test /upstream-ca.pem /
$P 192.0.2.30:443 bad.secure.test /ca.pem /
$P 192.0.2.10:443 denied.secure.test /ca.pem /
$P 192.0.2.10:443 www.secure.test /ca.pem / denied.secure.test
vg-probe udp-echo 192.0.2.10:443 3 100
vg-probe dot 192.0.2.53:853 dns.test /ca.pem www.secure.test
vg-probe dot 203.0.113.53:853 dns.test /ca.pem blocked.secure.test
echo VG-END
"#;
    let mut opts = GuestOpts::new(&daemon.socket, script);
    opts.extra_files = vec![
        ("ca.pem".into(), our_ca, 0o100_644),
        (
            "upstream-ca.pem".into(),
            upstream_ca.into_bytes(),
            0o100_644,
        ),
    ];
    let console = boot(&opts);
    let https: Vec<&str> = console
        .lines()
        .filter_map(|l| l.find("VG-HTTPS ").map(|i| &l[i..]))
        .collect();
    assert_eq!(https.len(), 7, "{console}");
    // Intercepted: the guest sees a leaf from our CA (trusting only it
    // works, trusting only the upstream's CA does not), over v4 and v6.
    for i in [0, 2] {
        assert!(
            https[i].contains("result=ok status=200")
                && https[i].contains("body=hello from upstream www.secure.test"),
            "{console}"
        );
    }
    assert!(https[1].contains("result=error"), "{console}");
    // Bypassed: the upstream's own certificate, untouched.
    assert!(
        https[3].contains("result=ok status=200")
            && https[3].contains("upstream bypass.secure.test"),
        "{console}"
    );
    // A bad upstream certificate fails the guest's handshake with an alert.
    assert!(
        https[4].contains("result=error") && https[4].to_lowercase().contains("access"),
        "{console}"
    );
    // Denied by SNI, and by the Host inside the tunnel: 403 from us.
    for i in [5, 6] {
        assert!(
            https[i].contains("result=ok status=403") && https[i].contains("denied.secure.test"),
            "{console}"
        );
    }
    // QUIC to an intercepted port is dropped.
    let udp = line_after(&console, "VG-UDP").unwrap_or("");
    assert!(udp.contains("ok=0"), "{console}");
    // DNS over TLS, to any address, answered by our forwarder with its
    // block list applied.
    let dot: Vec<&str> = console.lines().filter(|l| l.contains("VG-DOT")).collect();
    assert_eq!(dot.len(), 2, "{console}");
    assert!(
        dot[0].contains("rcode=0") && dot[0].contains("last=192.0.2.10"),
        "{console}"
    );
    assert!(dot[1].contains("rcode=3"), "{console}");
    let log = daemon.log();
    assert!(
        log.contains("upstream TLS failed") && log.contains("bad.secure.test"),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("egress denied") && l.contains("denied.secure.test")),
        "{log}"
    );
}
