//! DNS forwarder benchmark: queries/s through the whole daemon. The e2e VMM
//! harness plays the guest, writing UDP queries to the gateway's port 53
//! into the TX ring and collecting answers from RX, with a fixed number in
//! flight; the upstream is a minimal responder on 127.0.0.1 that answers
//! every query at once, so what is measured is the daemon (interception,
//! parsing, block-list check, forwarding, rebind filter, pins, framing).
//!
//! Run: `cargo bench --bench dns` (DNS_QUERIES sets the count, default
//! 50000). Nothing leaves the machine.
#![allow(clippy::unwrap_used)]
// a benchmark whose set-up fails should stop loudly
// Counts and rates here are far below the truncation bounds.
#![allow(clippy::cast_possible_truncation)]

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet,
    Ipv4Repr, UdpPacket, UdpRepr,
};

use kit::vmm::Vmm;
use kit::{Daemon, cpu_seconds};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
const GW_MAC: EthernetAddress = EthernetAddress([0x02, 0x76, 0x67, 0, 0, 1]);
const GUEST: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const GW: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const IN_FLIGHT: usize = 64;

/// A query for `nNNNN.bench.test` A, with id `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    let label = format!("n{id}");
    q.push(label.len() as u8);
    q.extend_from_slice(label.as_bytes());
    for l in ["bench", "test"] {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn frame(src_port: u16, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port,
        dst_port: 53,
    };
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: GW,
        next_header: IpProtocol::Udp,
        payload_len: 8 + payload.len(),
        hop_limit: 64,
    };
    let mut f = vec![0u8; 14 + 20 + 8 + payload.len()];
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: GW_MAC,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    let caps = ChecksumCapabilities::default();
    let mut packet = Ipv4Packet::new_unchecked(&mut f[14..]);
    ip.emit(&mut packet, &caps);
    udp.emit(
        &mut UdpPacket::new_unchecked(packet.payload_mut()),
        &GUEST.into(),
        &GW.into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    f
}

fn is_answer(f: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(f) else {
        return false;
    };
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
        return false;
    };
    let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
        return false;
    };
    udp.src_port() == 53 && udp.payload().get(2).is_some_and(|b| b & 0x80 != 0)
}

fn main() {
    let total: usize = std::env::var("DNS_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    // The upstream: answers every query at once with its header turned into
    // a response (no records).
    let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = upstream.recv_from(&mut buf) {
            buf[2] |= 0x80;
            buf[3] = 0x80;
            let _ = upstream.send_to(&buf[..n], peer);
        }
    });
    let config =
        format!("[dns]\nupstreams = [\"{upstream_addr}\"]\nblock = [\"*.blocked.test\"]\n");
    let daemon = Daemon::start_with(None, Some(&config), &[]);
    let mut vmm = Vmm::qemu_start(&daemon.socket, true);
    vmm.post_rx(240);
    let pid = daemon.pid();
    let (t0, cpu0) = (Instant::now(), cpu_seconds(pid));
    let (mut sent, mut answered) = (0usize, 0usize);
    let deadline = t0 + Duration::from_secs(120);
    while answered < total {
        assert!(
            Instant::now() < deadline,
            "stalled at {answered} of {total}"
        );
        while sent < total && sent - answered < IN_FLIGHT && vmm.tx_inflight() < 120 {
            let id = sent as u16;
            vmm.send_frame(&frame(10_000 + (sent % 50_000) as u16, &query(id)));
            sent += 1;
        }
        let frames = vmm.recv_frames();
        answered += frames.iter().filter(|f| is_answer(f)).count();
        let used = vmm.rx_consumed();
        if used > 0 {
            vmm.post_rx(used);
        }
        if frames.is_empty() {
            std::thread::yield_now();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    println!(
        "\nvhost-gateway DNS forwarder: {total} UDP queries, {IN_FLIGHT} in flight, upstream on loopback\n"
    );
    println!("queries/s {:>10.0}", total as f64 / secs);
    println!(
        "daemon CPU s per 10k queries {:>6.3}",
        cpu / total as f64 * 10_000.0
    );
}
