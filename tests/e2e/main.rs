//! The daemon driven by a VMM the test plays: vhost-user message orders,
//! hostile descriptor chains and messages, reconnect, readiness and
//! shutdown. Frames go only to the gateway itself; nothing leaves the
//! process pair.
#![allow(clippy::unwrap_used)] // test harness: a failed set-up step should panic

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpProtocol,
    Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};

use kit::Daemon;
use kit::vmm::{BUF_SIZE, MEM_SIZE, TX_BUFS, Vmm};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
const GW_MAC: EthernetAddress = EthernetAddress([0x02, 0x76, 0x67, 0, 0, 1]);
const GW: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const WAIT: Duration = Duration::from_secs(5);

#[path = "../common/stack.rs"]
mod stack;

fn ethernet(dst: EthernetAddress, ethertype: EthernetProtocol, payload_len: usize) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + payload_len];
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: dst,
        ethertype,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    frame
}

fn arp_request() -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: GW,
    };
    let mut frame = ethernet(
        EthernetAddress::BROADCAST,
        EthernetProtocol::Arp,
        repr.buffer_len(),
    );
    repr.emit(&mut ArpPacket::new_unchecked(&mut frame[14..]));
    frame
}

fn is_arp_reply(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    if eth.ethertype() != EthernetProtocol::Arp {
        return false;
    }
    let Ok(arp) = ArpPacket::new_checked(eth.payload()) else {
        return false;
    };
    matches!(
        ArpRepr::parse(&arp),
        Ok(ArpRepr::EthernetIpv4 { operation: ArpOperation::Reply, source_hardware_addr, source_protocol_addr, .. })
            if source_hardware_addr == GW_MAC && source_protocol_addr == GW
    )
}

/// An IPv4 frame from the guest to `dst` carrying `l4_len` bytes of
/// `proto`, which `fill` writes (given the IP payload and the checksum
/// capabilities: everything computed).
fn from_guest(
    dst: Ipv4Addr,
    proto: IpProtocol,
    l4_len: usize,
    fill: impl FnOnce(&mut [u8], &ChecksumCapabilities),
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: dst,
        next_header: proto,
        payload_len: l4_len,
        hop_limit: 64,
    };
    let mut frame = ethernet(GW_MAC, EthernetProtocol::Ipv4, ip.buffer_len() + l4_len);
    let caps = ChecksumCapabilities::default();
    let mut packet = Ipv4Packet::new_unchecked(&mut frame[14..]);
    ip.emit(&mut packet, &caps);
    fill(packet.payload_mut(), &caps);
    frame
}

fn ping(dst: Ipv4Addr, seq: u16, payload: &[u8]) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 0x4242,
        seq_no: seq,
        data: payload,
    };
    from_guest(dst, IpProtocol::Icmp, icmp.buffer_len(), |b, caps| {
        icmp.emit(&mut Icmpv4Packet::new_unchecked(b), caps);
    })
}

fn echo_reply_seq(frame: &[u8]) -> Option<(Ipv4Addr, u16, usize)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
    match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).ok()? {
        Icmpv4Repr::EchoReply { seq_no, data, .. } => Some((ip.src_addr(), seq_no, data.len())),
        _ => None,
    }
}

fn dhcp_discover(mac: EthernetAddress) -> Vec<u8> {
    let repr = DhcpRepr {
        message_type: DhcpMessageType::Discover,
        transaction_id: 7,
        secs: 0,
        client_hardware_address: mac,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: Ipv4Addr::UNSPECIFIED,
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: true,
        requested_ip: None,
        client_identifier: None,
        server_identifier: None,
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let udp = UdpRepr {
        src_port: 68,
        dst_port: 67,
    };
    let ip = Ipv4Repr {
        src_addr: Ipv4Addr::UNSPECIFIED,
        dst_addr: Ipv4Addr::BROADCAST,
        next_header: IpProtocol::Udp,
        payload_len: 8 + repr.buffer_len(),
        hop_limit: 64,
    };
    let mut frame = ethernet(
        EthernetAddress::BROADCAST,
        EthernetProtocol::Ipv4,
        ip.buffer_len() + 8 + repr.buffer_len(),
    );
    frame[6..12].copy_from_slice(&mac.0);
    let caps = ChecksumCapabilities::default();
    let mut packet = Ipv4Packet::new_unchecked(&mut frame[14..]);
    ip.emit(&mut packet, &caps);
    let mut u = UdpPacket::new_unchecked(packet.payload_mut());
    udp.emit(
        &mut u,
        &Ipv4Addr::UNSPECIFIED.into(),
        &Ipv4Addr::BROADCAST.into(),
        repr.buffer_len(),
        |b| repr.emit(&mut DhcpPacket::new_unchecked(b)).unwrap(),
        &caps,
    );
    frame
}

fn dhcp_offer_for(frame: &[u8], mac: EthernetAddress) -> bool {
    let parse = || -> Option<bool> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        let udp = UdpPacket::new_checked(ip.payload()).ok()?;
        let dhcp = DhcpPacket::new_checked(udp.payload()).ok()?;
        let repr = DhcpRepr::parse(&dhcp).ok()?;
        Some(
            repr.message_type == DhcpMessageType::Offer
                && repr.client_hardware_address == mac
                && repr.your_ip == GUEST,
        )
    };
    parse().unwrap_or(false)
}

/// ARP, ping and DHCP through a started VMM.
fn exercise_gateway(vmm: &mut Vmm) {
    vmm.post_rx(64);
    vmm.send_frame(&arp_request());
    assert!(vmm.wait_frame(WAIT, is_arp_reply).is_some(), "no ARP reply");
    for seq in 0..3 {
        vmm.send_frame(&ping(GW, seq, b"hello gateway"));
        let reply = vmm.wait_frame(WAIT, |f| {
            echo_reply_seq(f).is_some_and(|(_, s, _)| s == seq)
        });
        assert!(reply.is_some(), "no echo reply for seq {seq}");
    }
    vmm.send_frame(&dhcp_discover(GUEST_MAC));
    assert!(
        vmm.wait_frame(WAIT, |f| dhcp_offer_for(f, GUEST_MAC))
            .is_some(),
        "no DHCP offer"
    );
}

#[test]
fn qemu_message_order_brings_the_device_up() {
    let daemon = Daemon::start_with(None, None, &[]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut vmm);
    assert!(daemon.log().contains("holding SET_VRING_ENABLE"));
}

#[test]
fn qemu_order_without_event_idx() {
    let daemon = Daemon::start_with(None, None, &[]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, false);
    exercise_gateway(&mut vmm);
}

#[test]
fn cloud_hypervisor_message_order_brings_the_device_up() {
    let daemon = Daemon::start_with(None, None, &[]);
    let mut vmm = Vmm::cloud_hypervisor_start(&daemon.socket);
    exercise_gateway(&mut vmm);
    assert!(!daemon.log().contains("holding SET_VRING_ENABLE"));
    // Config space: MAC, link up, one pair, MTU.
    let config = vmm.get_config(12);
    assert_eq!(&config[..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1);
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 65520);
}

#[test]
fn echo_to_other_destinations_is_not_answered() {
    let daemon = Daemon::start_with(None, None, &[]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    vmm.post_rx(16);
    vmm.send_frame(&arp_request());
    assert!(vmm.wait_frame(WAIT, is_arp_reply).is_some());
    vmm.send_frame(&ping(Ipv4Addr::new(192, 0, 2, 99), 1, b"x"));
    vmm.send_frame(&ping(GW, 2, b"y"));
    // The gateway's own reply arrives; none for the outside address.
    let mut replies = Vec::new();
    let _ = vmm.wait_frame(WAIT, |f| {
        if let Some(r) = echo_reply_seq(f) {
            replies.push(r);
        }
        false
    });
    assert_eq!(replies, vec![(GW, 2, 1)]);
}

#[test]
fn hostile_descriptor_chains_are_dropped_and_the_device_keeps_working() {
    let daemon = Daemon::start_with(None, None, &[]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    vmm.post_rx(32);
    let mem_end = MEM_SIZE as u64;
    let chains: Vec<Vec<(u64, u32, u16)>> = vec![
        vec![(mem_end + 0x1000, 200, 0)],        // outside memory
        vec![(mem_end - 16, 200, 0)],            // straddles the end
        vec![(TX_BUFS, 200, 2)],                 // write-only on TX
        vec![(TX_BUFS, 8, 0)],                   // shorter than the header
        vec![(TX_BUFS, 12, 0), (TX_BUFS, 5, 0)], // header, no Ethernet
        vec![(TX_BUFS, 12 + 70_000, 0)],         // huge
        vec![(TX_BUFS, u32::MAX, 0), (TX_BUFS, u32::MAX, 0)], // length overflow
    ];
    let n = chains.len();
    for chain in &chains {
        vmm.send_chain(chain);
    }
    // A descriptor loop: 100 -> 101 -> 100.
    let tx = &mut vmm.rings[kit::vmm::TX as usize];
    tx.write_desc(&vmm.mem, 100, TX_BUFS, 64, 1, 101);
    tx.write_desc(&vmm.mem, 101, TX_BUFS, 64, 1, 100);
    tx.publish(&vmm.mem, 100);
    // A head index beyond the ring.
    tx.publish(&vmm.mem, 4000);
    vmm.kick(kit::vmm::TX);
    // Every hostile chain is consumed, and the device still answers.
    std::thread::sleep(Duration::from_millis(300));
    vmm.send_frame(&arp_request());
    assert!(
        vmm.wait_frame(WAIT, is_arp_reply).is_some(),
        "device dead after hostile chains"
    );
    vmm.send_frame(&ping(GW, 9, &[0xa5; 1000]));
    assert!(
        vmm.wait_frame(WAIT, |f| echo_reply_seq(f).is_some_and(|r| r.1 == 9))
            .is_some()
    );
    assert!(vmm.tx_completed() >= n + 2);
    daemon.signal("USR1");
    assert!(daemon.wait_log("counters", WAIT));
    let log = daemon.log();
    for counter in [
        "drop_bad_chain=",
        "drop_wrong_direction=",
        "drop_too_short=",
        "drop_too_long=",
    ] {
        assert!(log.contains(counter), "{counter} not counted: {log}");
    }
}

#[test]
fn frames_larger_than_one_rx_buffer_are_merged() {
    let daemon = Daemon::start_with(None, Some("[network]\nmtu = 9000\n"), &[]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    vmm.post_rx(64);
    vmm.send_frame(&arp_request());
    assert!(vmm.wait_frame(WAIT, is_arp_reply).is_some());
    // Needs three 4 KiB buffers on the way back.
    vmm.send_frame(&ping(GW, 5, &[0x5a; 8900]));
    let reply = vmm.wait_frame(WAIT, |f| echo_reply_seq(f).is_some_and(|r| r.1 == 5));
    assert_eq!(reply.map(|f| f.len()), Some(14 + 20 + 8 + 8900));
    let _ = BUF_SIZE;
}

#[test]
fn reconnecting_vmm_gets_a_fresh_guest_state() {
    let daemon = Daemon::start_with(None, None, &[]);
    let mut first = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut first);
    drop(first);
    // A second VMM with another MAC gets the lease the first one held.
    let mut second = Vmm::qemu_start(&daemon.socket, true);
    second.post_rx(16);
    let other = EthernetAddress([0x52, 0x54, 0, 1, 1, 1]);
    second.send_frame(&dhcp_discover(other));
    assert!(
        second
            .wait_frame(WAIT, |f| dhcp_offer_for(f, other))
            .is_some(),
        "lease survived the disconnect"
    );
    assert!(daemon.wait_log("guest state reset", WAIT));
}

#[test]
fn malformed_vhost_messages_end_the_session_not_the_daemon() {
    let daemon = Daemon::start_with(None, None, &[]);
    // A message claiming a 4 GiB payload.
    let mut bad = Vmm::connect(&daemon.socket);
    let mut msg = Vec::new();
    for v in [kit::vmm::SET_FEATURES, 1, u32::MAX] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    bad.send_raw(&msg, &[]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(bad.is_closed(), "oversized message accepted");
    // An unknown request and a ring index out of range.
    let mut bad = Vmm::connect(&daemon.socket);
    bad.send(9999, &[], &[], false);
    std::thread::sleep(Duration::from_millis(200));
    assert!(bad.is_closed());
    let mut bad = Vmm::connect(&daemon.socket);
    bad.send(
        kit::vmm::SET_VRING_NUM,
        &[[7u8, 0, 0, 0], [0, 1, 0, 0]].concat(),
        &[],
        false,
    );
    std::thread::sleep(Duration::from_millis(200));
    drop(bad);
    // The daemon still serves the next VMM.
    let mut good = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut good);
}

#[test]
fn ready_notification_and_clean_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let dir = kit::TempDir::new("notify");
    let notify_path = dir.0.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let mut daemon = Daemon::start_with(
        None,
        None,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let status = daemon.terminate();
    assert!(status.success(), "{status}");
    assert!(!daemon.socket.exists());
}

/// Under systemd's watchdog (WATCHDOG_USEC), the daemon pings twice per
/// period and keeps STATUS= current: waiting, then the attached VMM.
#[test]
fn watchdog_pings_and_status_lines() {
    use std::os::unix::net::UnixDatagram;
    let dir = kit::TempDir::new("watchdog");
    let notify_path = dir.0.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let daemon = Daemon::start_with(
        None,
        None,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = notify.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    let started = Instant::now();
    let (mut pings, mut statuses) = (0, Vec::new());
    while started.elapsed() < Duration::from_secs(2) {
        match next() {
            m if m == "WATCHDOG=1" => pings += 1,
            m => statuses.push(m),
        }
    }
    // Every 200 ms: about 10 in 2 s.
    assert!((7..=12).contains(&pings), "{pings} pings");
    assert_eq!(statuses, ["STATUS=waiting for a VMM"]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut vmm);
    let attached = (0..40)
        .map(|_| next())
        .find(|m| m.starts_with("STATUS=VMM attached"));
    assert!(
        attached
            .as_deref()
            .is_some_and(|m| m.contains("1 queue pair(s)")),
        "{attached:?}"
    );
    assert!(daemon.log().contains("systemd watchdog on"));
}

/// `--metrics-listen` serves the Prometheus text over TCP and nothing else.
#[test]
fn metrics_over_tcp_and_only_metrics() {
    use std::io::{Read, Write};
    let daemon = Daemon::start_args(None, None, &["--metrics-listen", "127.0.0.1:0"]);
    assert!(daemon.wait_log("serving /metrics over TCP", WAIT));
    let log = daemon.log();
    let addr = log
        .lines()
        .find(|l| l.contains("serving /metrics over TCP"))
        .and_then(|l| l.split("addr=").nth(1))
        .map(|a| a.split_whitespace().next().unwrap_or("").to_owned())
        .unwrap();
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    let metrics = get("/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("vhost_gateway_vmm_connections_total 0"),
        "{metrics}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    for path in ["/v1/status", "/v1/counters", "/v1/flows"] {
        let refused = get(path);
        assert!(refused.starts_with("HTTP/1.1 404"), "{path}: {refused}");
    }
}

/// Started by socket activation, the daemon serves the sockets systemd
/// passed (named vhost and control) and leaves their files to the socket
/// unit when it stops.
#[test]
fn socket_activation_serves_the_passed_sockets() {
    let mut daemon = Daemon::start_activated(None, None);
    // The first connection starts the daemon.
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut vmm);
    assert!(
        daemon.wait_log("serving the socket systemd passed", WAIT),
        "{}",
        daemon.log()
    );
    let status = daemon.ctl_json(&["status"]);
    assert_eq!(status["vmm_attached"], true, "{status}");
    drop(vmm);
    let exit = daemon.terminate();
    assert!(exit.success(), "{exit}");
    assert!(daemon.socket.exists() && daemon.control.exists());
}

/// The running daemon, started as root, can gain no privileges and holds
/// none: no_new_privs, no capabilities in any set, the seccomp filter on
/// every thread.
#[test]
fn daemon_runs_confined() {
    let daemon = Daemon::start_with(None, None, &[]);
    // The socket exists before the filter goes on; "listening" comes after.
    assert!(daemon.wait_log("listening", Duration::from_secs(10)));
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).unwrap();
    let mut seen = 0;
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        for line in [
            "NoNewPrivs:\t1",
            "Seccomp:\t2",
            "CapInh:\t0000000000000000",
            "CapPrm:\t0000000000000000",
            "CapEff:\t0000000000000000",
            "CapBnd:\t0000000000000000",
            "CapAmb:\t0000000000000000",
        ] {
            assert!(status.contains(line), "{line}: {status}");
        }
        seen += 1;
    }
    assert!(seen > 1, "threads: {seen}");
}

/// A second daemon started on a live daemon's socket: it probes the
/// socket, is refused, and says why on stderr (returned).
fn second_daemon_on(socket: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-gateway"))
        .arg("--socket-path")
        .arg(socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn live_socket_is_refused() {
    let daemon = Daemon::start_with(None, None, &[]);
    let stderr = second_daemon_on(&daemon.socket);
    assert!(stderr.contains("in use by a running process"), "{stderr}");
}

#[test]
fn garbage_avail_index_does_not_take_the_daemon_down() {
    let daemon = Daemon::start_with(None, None, &[]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    vmm.post_rx(8);
    // The driver claims 40000 new TX buffers on a 256-entry ring, and as
    // many RX buffers.
    for q in [kit::vmm::TX, kit::vmm::RX] {
        let mem = vmm.mem.clone();
        vmm.rings[q as usize].set_avail_idx(&mem, 40_000);
        vmm.kick(q);
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(vmm);
    let mut next = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut next);
}

#[test]
fn idle_guest_costs_no_cpu() {
    let daemon = Daemon::start_with(None, None, &[]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut vmm);
    let pid = daemon.pid();
    let before = kit::cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = kit::cpu_seconds(pid) - before;
    // A busy-polling loop would burn ~3 s here.
    assert!(used <= 0.02, "daemon used {used} s of CPU while idle");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = kit::TempDir::new("json");
    let socket = dir.0.join("s.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-gateway"))
        .args(["--log-format", "json", "--socket-path"])
        .arg(&socket)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(text.lines().count() >= 2, "{text}");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// Waits until the daemon has logged `n` disconnects (its per-connection
/// threads and descriptors are gone once the log line is written).
fn wait_disconnects(daemon: &Daemon, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    while daemon.log().matches("VMM disconnected").count() < n {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A long-lived daemon serves a sandbox that reboots its VM over and over:
/// after each VMM goes (cleanly or killed mid-session), and after a second
/// daemon's liveness probe of the socket, the daemon's descriptors and
/// threads are back to exactly what they were.
#[test]
fn reconnects_and_probes_leave_no_descriptors_or_threads() {
    let daemon = Daemon::start_with(None, None, &[]);
    let pid = daemon.pid();
    // The first session builds what lives for the daemon's whole life.
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut vmm);
    drop(vmm);
    wait_disconnects(&daemon, 1);
    std::thread::sleep(Duration::from_millis(200));
    let (fds, tasks) = (open_fds(pid), threads(pid));
    for i in 0..30 {
        let mut vmm = Vmm::qemu_start(&daemon.socket, i % 2 == 0);
        if i % 3 == 0 {
            exercise_gateway(&mut vmm);
        }
        drop(vmm);
        wait_disconnects(&daemon, i + 2);
    }
    for _ in 0..5 {
        second_daemon_on(&daemon.socket);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        (open_fds(pid), threads(pid)),
        (fds, tasks),
        "descriptors and threads after 30 sessions and 5 probes (baseline first)"
    );
    // And the next VMM is still served.
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut vmm);
}

/// Host peers on loopback for transfers that never end by themselves: a
/// sink that reads each connection until it goes, and a source that
/// writes to each until it goes. Returns (sink port, source port).
fn sink_and_source() -> (u16, u16) {
    use std::io::{Read, Write};
    let sink = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let source = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ports = (
        sink.local_addr().unwrap().port(),
        source.local_addr().unwrap().port(),
    );
    std::thread::spawn(move || {
        for mut conn in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    std::thread::spawn(move || {
        for mut conn in source.incoming().flatten() {
            std::thread::spawn(move || {
                let buf = vec![0x5au8; 1 << 16];
                while conn.write_all(&buf).is_ok() {}
            });
        }
    });
    ports
}

/// A session whose VMM goes away in the middle of moving `bytes` each way
/// on two flows at once: the harness drops its connection with both flows
/// open and data in flight, as a killed QEMU does.
fn killed_mid_transfer(daemon: &Daemon, (sink, source): (u16, u16), bytes: usize) {
    let mode = stack::Mode {
        mtu: 65520,
        tso: false,
    };
    let mut guest = stack::Guest::start(daemon, mode);
    let up = guest.connect(sink, 1 << 20);
    let down = guest.connect(source, 1 << 20);
    let (mut sent, mut got) = (0, 0);
    guest.until("both directions moving", |g| {
        let s = g.socket(up);
        while s.can_send() {
            match s.send(|b| (b.len(), b.len())) {
                Ok(n) if n > 0 => sent += n,
                _ => break,
            }
        }
        let d = g.socket(down);
        while d.can_recv() {
            match d.recv(|b| (b.len(), b.len())) {
                Ok(n) if n > 0 => got += n,
                _ => break,
            }
        }
        sent >= bytes && got >= bytes
    });
    drop(guest);
}

/// A daemon whose VMM is killed mid-transfer 100 times in a row, both
/// directions at once, then connected and disconnected cleanly 1,000
/// times: every next VMM is served, descriptors and threads return exactly
/// to their baseline and memory stays flat.
#[test]
fn a_hundred_kills_mid_transfer_and_a_thousand_sessions_leave_the_daemon_as_it_was() {
    let config = "[outbound]\nallow-host-loopback = true\n\
                  [[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n";
    // Quiet logs: a thousand sessions at debug level is a lot of text to
    // search for each disconnect.
    let daemon = Daemon::start_args(None, Some(config), &["--log-level", "info"]);
    let pid = daemon.pid();
    let peers = sink_and_source();
    // The first session builds what lives for the daemon's whole life.
    killed_mid_transfer(&daemon, peers, 1 << 20);
    let mut sessions = 1;
    wait_disconnects(&daemon, sessions);
    std::thread::sleep(Duration::from_millis(300));
    let (fds, tasks, rss) = (open_fds(pid), threads(pid), rss_kib(pid));
    for _ in 0..100 {
        killed_mid_transfer(&daemon, peers, 1 << 20);
        sessions += 1;
        wait_disconnects(&daemon, sessions);
    }
    for i in 0..1000 {
        drop(Vmm::qemu_start(&daemon.socket, i % 2 == 0));
        sessions += 1;
        wait_disconnects(&daemon, sessions);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        (open_fds(pid), threads(pid)),
        (fds, tasks),
        "descriptors and threads after 100 kills and 1,000 sessions (baseline first)"
    );
    let grown = rss_kib(pid).saturating_sub(rss);
    eprintln!("baseline {fds} fds, {tasks} threads, {rss} KiB; after: RSS +{grown} KiB");
    assert!(grown < 4096, "RSS grew {grown} KiB from {rss} KiB");
    killed_mid_transfer(&daemon, peers, 1 << 20);
}

/// The daemon's resident memory.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// A UDP datagram from the guest to the gateway's `dst_port`.
fn udp_to_gateway(src_port: u16, dst_port: u16) -> Vec<u8> {
    udp_to_gateway_with(src_port, dst_port, b"ping")
}

/// A UDP datagram carrying `payload` from the guest to the gateway.
fn udp_to_gateway_with(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr { src_port, dst_port };
    from_guest(GW, IpProtocol::Udp, 8 + payload.len(), |b, caps| {
        udp.emit(
            &mut UdpPacket::new_unchecked(b),
            &GUEST.into(),
            &GW.into(),
            payload.len(),
            |p| p.copy_from_slice(payload),
            caps,
        );
    })
}

/// Under a descriptor limit below what the config's flow limits need, the
/// daemon says so at start, and when sockets then fail for want of
/// descriptors it logs why and counts it, and keeps serving the guest.
#[test]
fn running_out_of_descriptors_is_logged_and_counted() {
    let config = "[outbound]\nallow-host-loopback = true\n\
                  [[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n";
    let daemon = Daemon::start_wrapped(Some(config), &["prlimit", "--nofile=64:64"]);
    assert!(
        daemon.wait_log("descriptor limit is below", WAIT),
        "{}",
        daemon.log()
    );
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    vmm.post_rx(64);
    // Each datagram from a new source port opens a session socket.
    for i in 0..100 {
        vmm.send_frame(&udp_to_gateway(40_000 + i, 9));
    }
    assert!(
        daemon.wait_log("out of file descriptors", WAIT),
        "{}",
        daemon.log()
    );
    exercise_gateway(&mut vmm);
    daemon.signal("USR1");
    assert!(daemon.wait_log("fd_limit_hit=", WAIT), "{}", daemon.log());
}

/// A TCP SYN from the guest (`src_port`) to `dst`, checksums filled.
fn syn_to(dst: std::net::SocketAddrV4, src_port: u16) -> Vec<u8> {
    use smoltcp::wire::{TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};
    let tcp = TcpRepr {
        src_port,
        dst_port: dst.port(),
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64_240,
        window_scale: None,
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    from_guest(*dst.ip(), IpProtocol::Tcp, tcp.buffer_len(), |b, caps| {
        tcp.emit(
            &mut TcpPacket::new_unchecked(b),
            &GUEST.into(),
            &(*dst.ip()).into(),
            caps,
        );
    })
}

/// Whether a frame for the guest is a SYN-ACK from `from` to `to_port`.
fn is_syn_ack(frame: &[u8], from: std::net::SocketAddrV4, to_port: u16) -> bool {
    use smoltcp::wire::TcpPacket;
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return false;
    };
    let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
        return false;
    };
    ip.src_addr() == *from.ip()
        && tcp.src_port() == from.port()
        && tcp.dst_port() == to_port
        && tcp.syn()
        && tcp.ack()
}

/// A flood of SYNs to distinct silent destinations (each dial waits for
/// the connect timeout) fills max-connections; a connection the guest
/// opens during the flood is still answered at once, since dialling flows
/// give way to new SYNs, oldest first, and their dials end with them (the
/// daemon's descriptors stay bounded). Runs inside a namespace: the silent
/// destinations are on its uplink's subnet, where nothing answers ARP.
#[test]
fn a_syn_flood_does_not_lock_new_connections_out() {
    let ns = kit::Netns::new("synflood");
    let listener = ns.enter(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let config = "[tcp]\nmax-connections = 64\n\
                  [outbound]\nallow-host-loopback = true\n\
                  [policy]\npreset = \"allow-all\"\n\
                  [[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n";
    let daemon = Daemon::start(&ns, Some(config));
    let pid = daemon.pid();
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    vmm.post_rx(256);
    for i in 0..2_000u16 {
        let dst = std::net::SocketAddrV4::new(
            Ipv4Addr::new(198, 51, 100, 10 + u8::try_from(i % 200).unwrap()),
            1000 + i / 200,
        );
        // Two descriptors a frame on a 256-entry ring; the evicted flows'
        // resets come back and need RX buffers.
        while vmm.tx_inflight() >= 100 {
            vmm.recv_frames();
            let used = vmm.rx_consumed();
            vmm.post_rx(used);
            std::thread::sleep(Duration::from_millis(1));
        }
        vmm.send_frame(&syn_to(dst, 20_000 + i));
    }
    vmm.recv_frames();
    let used = vmm.rx_consumed();
    vmm.post_rx(used);
    let probe = std::net::SocketAddrV4::new(GW, port);
    let start = std::time::Instant::now();
    vmm.send_frame(&syn_to(probe, 40_000));
    // The flood's resets are still coming back: keep RX buffers posted.
    let deadline = start + Duration::from_secs(1);
    let mut answered = false;
    while !answered && std::time::Instant::now() < deadline {
        answered = vmm
            .recv_frames()
            .iter()
            .any(|f| is_syn_ack(f, probe, 40_000));
        let used = vmm.rx_consumed();
        vmm.post_rx(used);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        answered,
        "no SYN-ACK within 1 s during the flood\n{}",
        daemon.log()
    );
    let fds = open_fds(pid);
    assert!(fds < 64 + 64, "{fds} descriptors open for 64 flows");
    daemon.signal("USR1");
    assert!(
        daemon.wait_log("tcp_dial_evicted=", WAIT),
        "{}",
        daemon.log()
    );
    eprintln!("probe answered in {:?}, {fds} fds", start.elapsed());
}

/// A DNS query (A, IN) for `name` with `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).unwrap());
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The destination port of a UDP datagram from the gateway's port 53.
fn dns_answer_port(frame: &[u8]) -> Option<u16> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    (udp.src_port() == 53).then(|| udp.dst_port())
}

/// DNS answers that arrive while the guest has no RX buffers wait; when
/// the guest then posts buffers once and sends nothing more, every one of
/// them still arrives. (A burst beyond the relayed queue's depth used to
/// strand the rest until the guest's next frame: a lookup made right after
/// a query flood timed out.)
#[test]
fn dns_answers_left_after_a_burst_reach_a_quiet_guest() {
    const QUERIES: u16 = 200;
    let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = upstream.local_addr().unwrap().port();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = asked.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = upstream.recv_from(&mut buf) {
            // The query itself with QR set: same id and question.
            buf[2] |= 0x80;
            upstream.send_to(&buf[..n], from).unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let config = format!("[dns]\nupstreams = [\"127.0.0.1:{port}\"]\n");
    let daemon = Daemon::start_with(None, Some(&config), &[]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    for i in 0..QUERIES {
        while vmm.tx_inflight() >= 100 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let query = dns_query(i, &format!("q{i}.example"));
        vmm.send_frame(&udp_to_gateway_with(30_000 + i, 53, &query));
    }
    let deadline = std::time::Instant::now() + WAIT;
    while asked.load(std::sync::atomic::Ordering::SeqCst) < usize::from(QUERIES) {
        assert!(std::time::Instant::now() < deadline, "upstream not asked");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Let the forwarder tasks hand their answers to the engine.
    std::thread::sleep(Duration::from_millis(300));
    vmm.post_rx(256);
    let mut ports = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while ports.len() < usize::from(QUERIES) && std::time::Instant::now() < deadline {
        ports.extend(vmm.recv_frames().iter().filter_map(|f| dns_answer_port(f)));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        ports.len(),
        usize::from(QUERIES),
        "answers reached the guest\n{}",
        daemon.log()
    );
}

/// The control API over a VMM the test plays: the guest's state before and
/// after it attaches, a live UDP session with its bytes each way, every
/// counter as a number (zeros too), the Prometheus text, the log level
/// changed at run time, a clear 4xx for every bad request, and the socket
/// gone when the daemon stops.
#[test]
fn the_control_api_reports_the_guest_its_flows_and_counters() {
    let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    kit::serve_udp_echo(echo);
    let config = "[outbound]\nallow-host-loopback = true\n\
                  [[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n";
    let mut daemon = Daemon::start_args(None, Some(config), &["--log-level", "info"]);
    let before = daemon.ctl_json(&["status"]);
    assert_eq!(before["vmm_attached"], false, "{before}");
    assert!(before["guest"].is_null(), "{before}");

    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    exercise_gateway(&mut vmm);
    vmm.send_frame(&udp_to_gateway_with(40_000, port, b"hello"));
    let echoed = vmm.wait_frame(WAIT, |f| {
        let Ok(eth) = EthernetFrame::new_checked(f) else {
            return false;
        };
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return false;
        };
        UdpPacket::new_checked(ip.payload())
            .is_ok_and(|udp| udp.src_port() == port && udp.dst_port() == 40_000)
    });
    assert!(echoed.is_some(), "no echo\n{}", daemon.log());

    let status = daemon.ctl_json(&["status"]);
    assert_eq!(status["vmm_attached"], true, "{status}");
    assert_eq!(status["guest"]["queue_pairs"], 1, "{status}");
    assert_eq!(status["gauges"]["udp_sessions"], 1, "{status}");
    let flows = daemon.ctl_json(&["flows"]);
    assert_eq!(flows["total"], 1, "{flows}");
    let flow = &flows["flows"][0];
    assert_eq!(flow["proto"], "udp", "{flows}");
    assert_eq!(flow["state"], "established", "{flows}");
    assert_eq!(flow["guest"], "198.19.0.2:40000", "{flows}");
    assert_eq!(flow["remote"], format!("198.19.0.1:{port}"), "{flows}");
    assert_eq!(flow["bytes_from_guest"], 5, "{flows}");
    assert_eq!(flow["bytes_to_guest"], 5, "{flows}");
    let (ok, table) = daemon.ctl(&["flows"]);
    assert!(
        ok && table.contains("udp") && table.contains("1 of 1 flow(s) listed"),
        "{table}"
    );

    let counters = daemon.ctl_json(&["counters"]);
    let all = counters["counters"].as_object().unwrap();
    assert_eq!(
        all.len(),
        vhost_gateway::metrics::Counter::ALL.len(),
        "{counters}"
    );
    assert!(all.values().all(serde_json::Value::is_u64), "{counters}");
    assert_eq!(all["drop_bad_chain"], 0, "{counters}");
    assert!(
        all["frames_from_guest"].as_u64().unwrap() >= 6,
        "{counters}"
    );
    let (ok, human) = daemon.ctl(&["counters"]);
    assert!(ok && human.contains("frames_from_guest") && !human.contains("drop_bad_chain"));

    let (ok, metrics) = daemon.ctl(&["metrics"]);
    assert!(ok, "{metrics}");
    for line in [
        "# TYPE vhost_gateway_frames_from_guest counter",
        "vhost_gateway_drop_bad_chain_total 0",
        "vhost_gateway_flows{proto=\"udp\",state=\"established\"} 1",
        "vhost_gateway_vmm_attached 1",
        "# EOF",
    ] {
        assert!(metrics.contains(line), "{line:?} missing:\n{metrics}");
    }

    let (ok, set) = daemon.ctl(&["log-level", "debug"]);
    assert!(ok && set.contains("debug"), "{set}");
    assert!(
        daemon.wait_log("log level changed", WAIT),
        "{}",
        daemon.log()
    );
    let (ok, refused) = daemon.ctl(&["log-level", "not[a filter"]);
    assert!(!ok && refused.contains("400"), "{refused}");

    let ask = |request: &str| daemon.control_raw(request.as_bytes());
    let head = |answer: String| answer.lines().next().unwrap_or("").to_owned();
    for (request, status) in [
        (
            "GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "404",
        ),
        (
            "DELETE /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "405",
        ),
        (
            "GET /v1/flows?limit=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "400",
        ),
        (
            "GET /v1/flows?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "400",
        ),
        (
            "PUT /v1/log-level HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nlevel",
            "400",
        ),
        ("not http at all\r\n\r\n", "400"),
    ] {
        let answer = ask(request);
        assert!(
            head(answer.clone()).contains(status),
            "{request:?}: {answer}"
        );
    }
    let huge = format!(
        "PUT /v1/log-level HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n{}",
        "x".repeat(100_000)
    );
    let answer = ask(&huge);
    assert!(head(answer.clone()).contains("413"), "{answer}");
    let error = ask("GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(
        error.contains("\"error\": \"no endpoint /v1/nothing\""),
        "{error}"
    );

    let control = daemon.control.clone();
    assert!(daemon.terminate().success());
    assert!(!control.exists(), "the control socket is left behind");
}
