//! Real-guest tests: QEMU boots Debian's kernel against the daemon, which runs
//! in a network namespace the test creates. Needs root, QEMU and the guest
//! image (built and cached by tests/guest/build.sh on first use).

#![allow(clippy::unwrap_used)] // test harness: a failed set-up step should panic

mod control;
mod dns;
mod egress;
mod flows;
mod policy;
mod tls;

use std::time::Duration;

use kit::guest::{Daemon, Guest, GuestOpts, Netns, boot, lease_field, line_after, ping_result};

const NETWORK_CHECK: &str = r#"
dhcp
wait_v6
echo VG-PING4; ping -c 3 -W 2 198.19.0.1
echo VG-PING6; ping6 -c 3 -W 2 fd76:6761:7465::1
echo VG-PINGOUT4; ping -c 2 -W 1 192.0.2.99
echo VG-PINGOUT6; ping6 -c 2 -W 1 2001:db8::99
ip -6 route
"#;

fn assert_default_network(console: &str) {
    assert_eq!(
        lease_field(console, "ip").as_deref(),
        Some("198.19.0.2"),
        "{console}"
    );
    assert_eq!(lease_field(console, "mask").as_deref(), Some("24"));
    assert_eq!(
        lease_field(console, "router").as_deref(),
        Some("198.19.0.1")
    );
    assert_eq!(lease_field(console, "dns").as_deref(), Some("198.19.0.1"));
    assert_eq!(lease_field(console, "mtu").as_deref(), Some("65520"));
    assert_eq!(lease_field(console, "lease").as_deref(), Some("3600"));
    let v6 = line_after(console, "VG-V6").unwrap_or("none");
    assert!(
        v6.starts_with("fd76:6761:7465:0:"),
        "no SLAAC address: {console}"
    );
    assert!(v6.ends_with("/64"), "{v6}");
    assert_eq!(ping_result(console, "VG-PING4"), Some((3, 3)), "{console}");
    assert_eq!(ping_result(console, "VG-PING6"), Some((3, 3)), "{console}");
}

#[test]
fn guest_gets_lease_and_slaac_and_pings_only_the_gateway() {
    let ns = Netns::new("basic");
    let daemon = Daemon::start(&ns, None);
    let console = boot(&GuestOpts::new(&daemon.socket, NETWORK_CHECK));
    assert_default_network(&console);
    // The RA's router is the default route, learned from fe80::1.
    assert!(
        console.contains("default via fe80::1 dev eth0"),
        "{console}"
    );
    // Outside addresses are not answered by the gateway.
    assert_eq!(
        ping_result(&console, "VG-PINGOUT4"),
        Some((2, 0)),
        "{console}"
    );
    assert_eq!(
        ping_result(&console, "VG-PINGOUT6"),
        Some((2, 0)),
        "{console}"
    );
    let log = daemon.log();
    assert!(
        log.contains("holding SET_VRING_ENABLE"),
        "QEMU 7.2 order not seen: {log}"
    );
}

#[test]
fn killed_vmm_is_replaced_by_a_second_qemu_on_the_same_daemon() {
    let ns = Netns::new("reconnect");
    let mut daemon = Daemon::start(&ns, None);
    let first = Guest::spawn(
        &GuestOpts::new(
            &daemon.socket,
            "dhcp\nping -c 1 -W 2 198.19.0.1 && echo VG-FIRST-UP\nsleep 600\n",
        ),
        "VG-FIRST-UP",
    );
    assert!(
        first.wait_marker(Duration::from_secs(120)),
        "first guest never reached the gateway:\n{}",
        first.console()
    );
    first.kill();
    // A different guest MAC: nothing of the first guest's lease survives.
    let mut opts = GuestOpts::new(&daemon.socket, NETWORK_CHECK);
    opts.mac = "52:54:00:65:43:21";
    let console = boot(&opts);
    assert_default_network(&console);
    assert!(daemon.is_running());
    let log = daemon.log();
    assert_eq!(log.matches("VMM connected").count(), 2, "{log}");
    assert!(log.contains("guest state reset"), "{log}");
    assert!(daemon.terminate().success());
    assert!(!daemon.socket.exists(), "socket left behind after SIGTERM");
}

/// The daemon crashes (SIGKILL) under a running guest and is started again
/// on the same socket, as systemd's `Restart=` or an upgrade does: with
/// QEMU's `reconnect=1` the guest's connections work again in under five
/// seconds, on the address and routes it already had (no new DHCP).
#[test]
fn a_restarted_daemon_brings_the_running_guests_network_back() {
    let ns = Netns::new("restart");
    ns.add_addr("192.0.2.10/32");
    let web = ns.net_enter(|| std::net::TcpListener::bind("192.0.2.10:80").unwrap());
    std::thread::spawn(move || for _conn in web.incoming() {});
    let mut daemon = Daemon::start(&ns, None);
    let script = r#"
dhcp
echo VG-ADDR-BEFORE $(ip -4 -o addr show eth0 | awk '{print $4}')
vg-probe reach 192.0.2.10:80 20
echo VG-ADDR-AFTER $(ip -4 -o addr show eth0 | awk '{print $4}')
echo VG-ROUTE-AFTER $(ip -4 route show default)
"#;
    let mut opts = GuestOpts::new(&daemon.socket, script);
    opts.reconnect = true;
    let guest = Guest::spawn(&opts, "VG-REACH-START");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    std::thread::sleep(Duration::from_secs(2));
    daemon.kill_and_restart(&ns, None);
    let console = guest.finish();
    let summary = line_after(&console, "VG-REACH attempts=").unwrap_or("");
    let outage: u64 = summary
        .split_whitespace()
        .find_map(|f| f.strip_prefix("longest-outage-ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    eprintln!(
        "{}",
        console
            .lines()
            .filter(|l| l.starts_with("VG-REACH"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        console.contains("VG-REACH down"),
        "no outage seen: {console}"
    );
    assert!(outage < 5000, "outage {outage} ms\n{console}");
    assert!(summary.ends_with("last=ok"), "{console}");
    let before = line_after(&console, "VG-ADDR-BEFORE").unwrap_or("none");
    assert_eq!(before, "198.19.0.2/24", "{console}");
    assert_eq!(
        line_after(&console, "VG-ADDR-AFTER"),
        Some(before),
        "{console}"
    );
    assert!(
        line_after(&console, "VG-ROUTE-AFTER").is_some_and(|r| r.contains("via 198.19.0.1")),
        "{console}"
    );
    assert!(daemon.log().contains("VMM connected"), "{}", daemon.log());
}

#[test]
fn non_default_config_reaches_the_guest() {
    let ns = Netns::new("custom");
    let config = r#"
[network]
ipv4-gateway = "10.213.0.1"
ipv4-guest = "10.213.7.42"
ipv4-prefix-len = 16
ipv6-prefix = "fd12:3456:789a:1::/64"
ipv6-gateway = "fd12:3456:789a:1::fe"
mtu = 9000
dns-ipv4 = ["10.213.0.53"]
domain-search = ["sandbox.test"]
dhcp-lease-seconds = 600
"#;
    let daemon = Daemon::start(&ns, Some(config));
    let script = r#"
dhcp
wait_v6
ip link show eth0
echo VG-PING4; ping -c 3 -W 2 -s 8000 10.213.0.1
echo VG-PING6; ping6 -c 3 -W 2 -s 8000 fd12:3456:789a:1::fe
"#;
    let console = boot(&GuestOpts::new(&daemon.socket, script));
    assert_eq!(
        lease_field(&console, "ip").as_deref(),
        Some("10.213.7.42"),
        "{console}"
    );
    assert_eq!(lease_field(&console, "mask").as_deref(), Some("16"));
    assert_eq!(
        lease_field(&console, "router").as_deref(),
        Some("10.213.0.1")
    );
    assert_eq!(lease_field(&console, "dns").as_deref(), Some("10.213.0.53"));
    assert_eq!(lease_field(&console, "mtu").as_deref(), Some("9000"));
    assert_eq!(lease_field(&console, "lease").as_deref(), Some("600"));
    assert_eq!(
        lease_field(&console, "search").as_deref(),
        Some("sandbox.test")
    );
    assert!(console.contains("mtu 9000"), "{console}");
    let v6 = line_after(&console, "VG-V6").unwrap_or("none");
    assert!(v6.starts_with("fd12:3456:789a:1:"), "{console}");
    // 8000-byte pings only pass if 9000-byte frames cross both queues.
    assert_eq!(ping_result(&console, "VG-PING4"), Some((3, 3)), "{console}");
    assert_eq!(ping_result(&console, "VG-PING6"), Some((3, 3)), "{console}");
}
