//! The control API under a real guest: what an operator reads and changes
//! while the guest works.

use std::process::Command;
use std::time::{Duration, Instant};

use kit::guest::{Daemon, Guest, GuestOpts};

use crate::flows::World;

/// The TCP flow to `remote` in a `ctl flows --json` answer.
fn flow_to<'a>(flows: &'a serde_json::Value, remote: &str) -> Option<&'a serde_json::Value> {
    flows["flows"]
        .as_array()?
        .iter()
        .find(|f| f["proto"] == "tcp" && f["remote"] == remote)
}

/// A guest downloads 100 MiB from a name it resolved through the gateway,
/// and its reader pauses for a few seconds on the way (the transfer stands
/// still with the flow open). Meanwhile the operator reads the flow with
/// its name and its bytes growing, the counters growing, the guest's lease
/// and the Prometheus gauges, from another process, while the transfer
/// runs.
#[test]
fn counters_and_flows_are_read_while_a_transfer_runs() {
    let world = World::new("ctl");
    let big = world.www.0.join("big");
    let made = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=100", "status=none"])
        .arg(format!("of={}", big.display()))
        .status()
        .unwrap();
    assert!(made.success());
    let daemon = Daemon::start(&world.ns, None);
    let script = r#"
dhcp
echo VG-START
wget -q -O - http://example.test/big | (sleep 4; cat > /dev/null)
echo VG-DONE
"#;
    let guest = Guest::spawn(&GuestOpts::new(&daemon.socket, script), "VG-START");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    let remote = "192.0.2.10:80";
    // The flow appears, paused by the slow reader, then moves on.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first: Option<(u64, u64)> = None;
    let mut grown = None;
    while grown.is_none() && Instant::now() < deadline {
        let flows = daemon.ctl_json(&["flows"]);
        let counters = daemon.ctl_json(&["counters"]);
        let to_guest = counters["counters"]["bytes_to_guest"].as_u64().unwrap();
        if let Some(flow) = flow_to(&flows, remote) {
            let bytes = flow["bytes_to_guest"].as_u64().unwrap();
            assert_eq!(flow["name"], "example.test", "{flows}");
            assert_eq!(flow["state"], "established", "{flows}");
            match first {
                None if bytes > 0 => {
                    first = Some((bytes, to_guest));
                    let status = daemon.ctl_json(&["status"]);
                    assert_eq!(status["vmm_attached"], true, "{status}");
                    assert_eq!(status["gauges"]["tcp_established"], 1, "{status}");
                    let lease = status["guest"]["lease_seconds_left"].as_u64().unwrap_or(0);
                    assert!(lease > 3000, "{status}");
                    assert!(status["guest"]["mac"].is_string(), "{status}");
                    let (ok, metrics) = daemon.ctl(&["metrics"]);
                    assert!(ok, "{metrics}");
                    let line = "vhost_gateway_flows{proto=\"tcp\",state=\"established\"} 1";
                    assert!(metrics.contains(line), "{metrics}");
                    let (ok, table) = daemon.ctl(&["flows"]);
                    assert!(ok && table.contains("example.test"), "{table}");
                    eprintln!("{table}");
                }
                Some((at_first, counted_first)) if bytes > at_first => {
                    assert!(to_guest > counted_first, "{counters}");
                    grown = Some((at_first, bytes));
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = guest.finish();
    let (at_first, later) = grown.unwrap_or_else(|| panic!("{first:?}\n{console}"));
    eprintln!("flow bytes to the guest: {at_first} then {later}");
    assert!(console.contains("VG-DONE"), "{console}");
}

/// Echoes one line over TCP to `addr` inside `ns`: Ok(true) when it came
/// back, Err when the connection was refused.
fn tcp_echo_once(ns: &kit::guest::Netns, addr: &'static str) -> Result<bool, String> {
    ns.enter(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"through the gateway\n")
            .map_err(|e| e.to_string())?;
        let mut back = [0u8; 20];
        Ok(s.read_exact(&mut back).is_ok() && &back == b"through the gateway\n")
    })
}

/// Echoes one UDP datagram to `addr` inside `ns`; whether it came back.
fn udp_echo_once(ns: &kit::guest::Netns, addr: &'static str) -> bool {
    ns.enter(move || {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        (0..3).any(|_| {
            udp.send_to(b"datagram", addr).is_ok()
                && udp
                    .recv_from(&mut buf)
                    .is_ok_and(|(n, _)| &buf[..n] == b"datagram")
        })
    })
}

/// Ports published and unpublished while the guest runs: reachable once
/// added (TCP and UDP), listed, refused once removed, a duplicate and a
/// privileged port refused with the reason, and a connection accepted
/// before the removal still working after it.
#[test]
fn ports_published_and_removed_at_run_time() {
    let ns = kit::guest::Netns::new("pubrt");
    let daemon = Daemon::start(&ns, None);
    let script = r#"
dhcp
vg-probe tcp-echo-server 8080 &
vg-probe udp-echo-server 8081 &
sleep 1
echo VG-SERVING
sleep 600
"#;
    let guest = Guest::spawn(&GuestOpts::new(&daemon.socket, script), "VG-SERVING");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    assert!(
        tcp_echo_once(&ns, "127.0.0.1:18080").is_err(),
        "published before asked"
    );

    let (ok, out) = daemon.ctl(&["publish", "add", "127.0.0.1:18080", "8080"]);
    assert!(
        ok && out.contains("tcp 127.0.0.1:18080 -> guest port 8080"),
        "{out}"
    );
    let (ok, out) = daemon.ctl(&[
        "publish",
        "add",
        "--protocol",
        "udp",
        "127.0.0.1:18081",
        "8081",
    ]);
    assert!(ok, "{out}");
    assert_eq!(tcp_echo_once(&ns, "127.0.0.1:18080"), Ok(true));
    assert!(udp_echo_once(&ns, "127.0.0.1:18081"));
    let list = daemon.ctl_json(&["publish", "list"]);
    assert_eq!(
        list["published"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );

    let (ok, out) = daemon.ctl(&["publish", "add", "127.0.0.1:18080", "9999"]);
    assert!(
        !ok && out.contains("409") && out.contains("published already"),
        "{out}"
    );
    let (ok, out) = daemon.ctl(&["publish", "add", "127.0.0.1:80", "8080"]);
    assert!(
        !ok && out.contains("403") && out.contains("CAP_NET_BIND_SERVICE"),
        "{out}"
    );
    let (ok, out) = daemon.ctl(&["publish", "add", "127.0.0.1:18083", "0"]);
    assert!(!ok && out.contains("400"), "{out}");

    // A connection from before the removal goes on after it.
    let held = ns.enter(|| {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect("127.0.0.1:18080").unwrap();
        s.write_all(b"before\n").unwrap();
        s
    });
    let (ok, out) = daemon.ctl(&["publish", "remove", "127.0.0.1:18080"]);
    assert!(ok && out.contains("unpublished"), "{out}");
    let (ok, out) = daemon.ctl(&["publish", "remove", "--protocol", "udp", "127.0.0.1:18081"]);
    assert!(ok, "{out}");
    let refused = tcp_echo_once(&ns, "127.0.0.1:18080");
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("refused")),
        "{refused:?}"
    );
    assert!(!udp_echo_once(&ns, "127.0.0.1:18081"));
    let (ok, out) = daemon.ctl(&["publish", "remove", "127.0.0.1:18080"]);
    assert!(!ok && out.contains("404"), "{out}");
    let echoed = ns.enter(move || {
        use std::io::{Read, Write};
        let mut s = held;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"after\n").unwrap();
        let mut back = [0u8; 13];
        s.read_exact(&mut back).is_ok() && &back == b"before\nafter\n"
    });
    assert!(echoed, "the connection from before the removal broke");
    // Added again, it serves again.
    let (ok, out) = daemon.ctl(&["publish", "add", "127.0.0.1:18080", "8080"]);
    assert!(ok, "{out}");
    assert_eq!(tcp_echo_once(&ns, "127.0.0.1:18080"), Ok(true));
    guest.kill();
}

/// `tcpdump -r FILE -nn [-A] FILTER`: its output; panics when tcpdump
/// cannot read the file.
fn tcpdump(file: &std::path::Path, ascii: bool, filter: &str) -> String {
    let mut cmd = Command::new("tcpdump");
    cmd.arg("-r").arg(file).arg("-nn");
    if ascii {
        cmd.arg("-A");
    }
    let out = cmd.arg(filter).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tcpdump -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A capture from the start (`--pcap`) holds the guest's DHCP exchange and
/// its TCP, in a ring of files none larger than the limit, each readable
/// by tcpdump; a capture started and stopped at run time holds the HTTP
/// request made meanwhile; a name with a directory in it is refused.
#[test]
fn a_capture_of_a_guest_session_reads_in_tcpdump() {
    let world = World::new("pcap");
    let made = Command::new("dd")
        .args(["if=/dev/zero", "bs=1K", "count=2048", "status=none"])
        .arg(format!("of={}", world.www.0.join("two").display()))
        .status()
        .unwrap();
    assert!(made.success());
    let captures = kit::TempDir::new("pcap");
    let boot_file = captures.0.join("boot.pcap");
    let config = "[pcap]\nmax-bytes = 1048576\nfiles = 4\n";
    let daemon = Daemon::start_args(
        Some(&world.ns),
        Some(config),
        &["--pcap", boot_file.to_str().unwrap()],
    );
    let script = r#"
dhcp
wget -q -O /dev/null http://192.0.2.10/two
echo VG-READY
sleep 2
wget -q -O - http://192.0.2.10/small
"#;
    let guest = Guest::spawn(&GuestOpts::new(&daemon.socket, script), "VG-READY");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    let boot = daemon.ctl_json(&["pcap", "stop"]);
    let (ok, out) = daemon.ctl(&["pcap", "start", "../escape.pcap"]);
    assert!(!ok && out.contains("400"), "{out}");
    let (ok, out) = daemon.ctl(&["pcap", "start", "run.pcap"]);
    assert!(ok && out.contains("run.pcap"), "{out}");
    let (ok, out) = daemon.ctl(&["pcap", "start", "again.pcap"]);
    assert!(!ok && out.contains("409"), "{out}");
    let console = guest.finish();
    assert!(console.contains("hello from the namespace"), "{console}");
    let run = daemon.ctl_json(&["pcap", "stop"]);
    eprintln!("boot capture {boot}\nrun capture {run}");
    assert_eq!(boot["dropped"], 0, "{boot}");
    // 2 MiB in 1 MiB files: the ring has begun its third file, not
    // wrapped (the first, with the DHCP exchange, is still there).
    let begun = boot["files_begun"].as_u64().unwrap();
    assert!((3..=4).contains(&begun), "{boot}");

    // The ring: boot.pcap, .1, .2, each within the limit and readable.
    let mut dhcp = String::new();
    let mut tcp = 0;
    for name in ["boot.pcap", "boot.pcap.1", "boot.pcap.2"] {
        let file = captures.0.join(name);
        let size = std::fs::metadata(&file).unwrap().len();
        assert!(size <= 1_048_576, "{name}: {size} bytes");
        dhcp += &tcpdump(&file, false, "udp port 67 or udp port 68");
        tcp += tcpdump(&file, false, "tcp port 80").lines().count();
    }
    assert!(dhcp.contains("BOOTP/DHCP, Request"), "{dhcp}");
    assert!(dhcp.contains("BOOTP/DHCP, Reply"), "{dhcp}");
    assert!(tcp > 10, "{tcp} TCP frames");
    let http = tcpdump(&captures.0.join("run.pcap"), true, "tcp port 80");
    assert!(http.contains("GET /small HTTP/1.1"), "{http}");
    assert!(http.contains("hello from the namespace"), "{http}");
    assert!(!captures.0.join("again.pcap").exists());
}

/// Waits until the guest's console holds `text`.
fn wait_console(guest: &Guest, text: &str, limit: Duration) -> bool {
    kit::wait_until(limit, || guest.console().contains(text))
}

/// A reload (`ctl reload`, then SIGHUP) swaps the policy under a running
/// guest: a live flow the new policy denies is reset and audited with
/// reason `reload`, one it allows goes on, new flows are decided by the
/// new policy; an invalid config and one that changes the network are
/// refused with the reason, and the old config keeps working.
#[test]
fn a_reload_resets_the_flows_the_new_policy_denies() {
    let world = World::new("reload");
    let daemon = Daemon::start(&world.ns, Some("# the embedded defaults\n"));
    let phase = |name: &str| std::fs::write(world.www.0.join(name), "go\n").unwrap();
    // The guest waits for each phase on the address no policy here denies.
    let script = r#"
dhcp
wait_v6
vg-probe tcp-echo-loop 192.0.2.10:7 120 &
vg-probe tcp-echo-loop [2001:db8::10]:7 120 &
sleep 2
echo VG-LOOPING
until wget -q -O /dev/null http://[2001:db8::10]/phase2; do sleep 0.3; done
vg-probe tcp-connect 192.0.2.10:80
vg-probe tcp-connect [2001:db8::10]:80
echo VG-CHECKED-DENY
until wget -q -O /dev/null http://[2001:db8::10]/phase3; do sleep 0.3; done
vg-probe tcp-connect 192.0.2.10:80
echo VG-CHECKED-ALLOW
sleep 600
"#;
    let guest = Guest::spawn(&GuestOpts::new(&daemon.socket, script), "VG-LOOPING");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    let console = guest.console();
    assert!(
        console.contains("VG-ECHOING 192.0.2.10:7")
            && console.contains("VG-ECHOING [2001:db8::10]:7"),
        "{console}"
    );

    // Refused: invalid, then a change that needs a new guest.
    daemon.rewrite_config("[policy\n");
    let (ok, out) = daemon.ctl(&["reload"]);
    assert!(
        !ok && out.contains("422") && out.contains("invalid"),
        "{out}"
    );
    daemon.rewrite_config("[network]\nmtu = 9000\n");
    let (ok, out) = daemon.ctl(&["reload"]);
    assert!(
        !ok && out.contains("422") && out.contains("network") && out.contains("restart"),
        "{out}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !guest.console().contains("VG-ECHOLOOP"),
        "a refused reload touched a flow: {}",
        guest.console()
    );

    // Applied: 192.0.2.10 denied from now on.
    daemon.rewrite_config("[[policy.rule]]\naction = \"deny\"\ndestination = \"192.0.2.10\"\n");
    let done = daemon.ctl_json(&["reload"]);
    assert_eq!(done["changed"], serde_json::json!(["policy"]), "{done}");
    assert_eq!(done["flows_reset"], 1, "{done}");
    assert!(
        wait_console(
            &guest,
            "VG-ECHOLOOP 192.0.2.10:7 result=reset",
            Duration::from_secs(10)
        ),
        "{}",
        guest.console()
    );
    let audit = daemon
        .log()
        .lines()
        .find(|l| l.contains("revoked by a reload"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no audit line: {}", daemon.log()));
    for field in [
        "reason=\"reload\"",
        "dst=192.0.2.10",
        "rule=\"1\"",
        "port=7",
        "cause=\"policy\"",
    ] {
        assert!(audit.contains(field), "{field} missing: {audit}");
    }
    let flows = daemon.ctl_json(&["flows"]);
    assert!(flow_to(&flows, "[2001:db8::10]:7").is_some(), "{flows}");
    assert!(
        flow_to(&flows, "192.0.2.10:7").is_none_or(|f| f["state"] == "closing"),
        "{flows}"
    );
    phase("phase2");
    assert!(
        wait_console(&guest, "VG-CHECKED-DENY", Duration::from_secs(60)),
        "{}",
        guest.console()
    );
    let console = guest.console();
    assert!(
        console.contains("VG-CONNECT 192.0.2.10:80 result=refused"),
        "{console}"
    );
    assert!(
        console.contains("VG-CONNECT [2001:db8::10]:80 result=connected"),
        "{console}"
    );
    let counters = daemon.ctl_json(&["counters"]);
    assert_eq!(counters["counters"]["policy_revoked"], 1, "{counters}");
    assert_eq!(counters["counters"]["reloads"], 1, "{counters}");
    assert_eq!(counters["counters"]["reloads_refused"], 2, "{counters}");
    // Rule 1 revoked the echo flow and refused the new connection.
    let (ok, metrics) = daemon.ctl(&["metrics"]);
    let by_rule_1 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vhost_gateway_policy_rule_denied_total{rule=\"1\"} "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(ok && by_rule_1 >= Some(2), "{metrics}");

    // SIGHUP: back to the defaults.
    daemon.rewrite_config("# the embedded defaults\n");
    daemon.signal("HUP");
    assert!(
        daemon.wait_log("config reloaded", Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    phase("phase3");
    assert!(
        wait_console(&guest, "VG-CHECKED-ALLOW", Duration::from_secs(60)),
        "{}",
        guest.console()
    );
    let console = guest.console();
    let after = &console[console.find("VG-CHECKED-DENY").unwrap_or(0)..];
    assert!(
        after.contains("VG-CONNECT 192.0.2.10:80 result=connected"),
        "{console}"
    );
    assert!(
        !console.contains("VG-ECHOLOOP [2001:db8::10]:7"),
        "the allowed flow ended: {console}"
    );
    guest.kill();
}

/// A guest boots through a daemon that systemd socket activation started:
/// QEMU's connection starts it on the passed socket, the guest gets its
/// lease and reaches a namespace host, and the control API answers on its
/// passed socket.
#[test]
fn a_guest_boots_through_a_socket_activated_daemon() {
    let world = World::new("activate");
    let daemon = Daemon::start_activated(Some(&world.ns), None);
    let script = r#"
dhcp
echo VG-GET; wget -q -O - http://192.0.2.10/small
echo VG-DONE
sleep 600
"#;
    let guest = Guest::spawn(&GuestOpts::new(&daemon.socket, script), "VG-DONE");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    assert!(
        guest.console().contains("hello from the namespace"),
        "{}",
        guest.console()
    );
    assert!(daemon.log().contains("serving the socket systemd passed"));
    let status = daemon.ctl_json(&["status"]);
    assert_eq!(status["vmm_attached"], true, "{status}");
    assert!(status["guest"]["mac"].is_string(), "{status}");
    guest.kill();
}

/// The libvirt path: Debian's libvirtd starts QEMU from the documented
/// domain XML (`config/libvirt-domain.xml`: shared memfd memory, a
/// vhostuser interface in client mode), and the guest gets its lease and
/// reaches a namespace host through the daemon.
#[test]
fn a_guest_boots_through_libvirt() {
    let libvirt = match kit::libvirt::Libvirt::start() {
        Ok(libvirt) => libvirt,
        Err(why) => {
            eprintln!("SKIPPED: libvirt cannot run here: {why}");
            return;
        }
    };
    let world = World::new("libvirt");
    let daemon = Daemon::start(&world.ns, None);
    kit::libvirt::admit_qemu_user(&daemon.socket).unwrap();
    let script = r#"
dhcp
echo VG-GET; wget -q -O - http://192.0.2.10/small
echo VG-DONE
"#;
    let domain =
        kit::libvirt::Domain::create(&GuestOpts::new(&daemon.socket, script), &daemon.socket)
            .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    assert!(
        domain.wait_console("VG-DONE", Duration::from_secs(120)),
        "{}\n{}",
        domain.console(),
        daemon.log()
    );
    let console = domain.console();
    assert!(console.contains("VG-LEASE ip=198.19.0.2"), "{console}");
    assert!(console.contains("hello from the namespace"), "{console}");
    assert!(daemon.log().contains("VMM connected"));
    let running = kit::libvirt::virsh(&["list", "--name"]).unwrap_or_default();
    assert!(running.contains(&domain.name) || !console.is_empty());
    drop(domain);
    drop(libvirt);
}
