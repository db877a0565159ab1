//! Guest-free benchmark: the daemon's own limit, without a TCG guest in the
//! way. The VMM harness from the e2e tests plays QEMU (memfd memory, split
//! rings) and a smoltcp TCP stack on its side plays the guest, streaming
//! through the daemon to a socket on the host's loopback (the gateway address
//! maps there) and back. Prints Gbit/s and the daemon's CPU seconds per GiB
//! each way.
//!
//! Run: `cargo bench --bench stream` (STREAM_GIB sets the size, default 2).
//! Nothing leaves the machine: the far end is 127.0.0.1.
#![allow(clippy::unwrap_used)]
// a benchmark whose set-up fails should stop loudly
// Sizes and rates here are far below the truncation bounds.
#![allow(clippy::cast_possible_truncation)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use kit::vmm::Vmm;
use kit::{Daemon, cpu_seconds};

const MTU: usize = 65520;
const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
/// Frames in flight on the TX ring (two descriptors each on a 256 ring).
const TX_INFLIGHT: usize = 120;
const RX_POSTED: usize = 240;
const SOCKET_BUFFER: usize = 4 << 20;

/// The harness's side of the link: frames from the daemon queue here; frames
/// to it go straight into the TX ring.
struct Link<'a> {
    vmm: &'a mut Vmm,
    inbox: VecDeque<Vec<u8>>,
    sent: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a, 'b>(&'a mut Link<'b>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_, '_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.vmm.send_frame(&frame);
        self.0.sent += 1;
        r
    }
}

impl<'b> phy::Device for Link<'b> {
    type RxToken<'a>
        = Rx
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<'a, 'b>
    where
        Self: 'a;

    fn receive(&mut self, _t: smoltcp::time::Instant) -> Option<(Rx, Tx<'_, 'b>)> {
        let frame = self.inbox.pop_front()?;
        Some((Rx(frame), Tx(self)))
    }

    fn transmit(&mut self, _t: smoltcp::time::Instant) -> Option<Tx<'_, 'b>> {
        (self.vmm.tx_inflight() < TX_INFLIGHT).then_some(Tx(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        // The daemon marks its frames DATA_VALID (GUEST_CSUM is acked):
        // checksums are computed on send and not verified on receipt, as a
        // guest kernel does.
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Upload,
    Download,
}

/// Moves `bytes` through one connection; returns (seconds, daemon CPU s).
fn stream(daemon: &Daemon, direction: Direction, bytes: u64) -> (f64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let far = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut moved = 0u64;
        match direction {
            Direction::Upload => {
                while moved < bytes {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "stream ended early at {moved}");
                    moved += n as u64;
                }
            }
            Direction::Download => {
                while moved < bytes {
                    let n = (bytes - moved).min(buf.len() as u64) as usize;
                    s.write_all(&buf[..n]).unwrap();
                    moved += n as u64;
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.read(&mut buf);
            }
        }
        moved
    });
    let upload = matches!(direction, Direction::Upload);

    let mut vmm = Vmm::qemu_start_with(
        &daemon.socket,
        true,
        kit::vmm::F_CSUM | kit::vmm::F_GUEST_CSUM,
    );
    vmm.post_rx(RX_POSTED);
    let mut link = Link {
        vmm: &mut vmm,
        inbox: VecDeque::new(),
        sent: 0,
    };
    let mut config = Config::new(HardwareAddress::Ethernet(GUEST_MAC));
    config.random_seed = 7;
    let mut iface = Interface::new(config, &mut link, smoltcp::time::Instant::now());
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::v4(198, 19, 0, 2), 24))
            .unwrap();
    });
    iface
        .routes_mut()
        .add_default_ipv4_route(Ipv4Address::new(198, 19, 0, 1))
        .unwrap();
    let mut sockets = SocketSet::new(Vec::new());
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
    );
    let handle = sockets.add(socket);
    sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(
            iface.context(),
            (IpAddress::v4(198, 19, 0, 1), port),
            49_152,
        )
        .unwrap();

    let pid = daemon.pid();
    let mut started: Option<(Instant, f64)> = None;
    let mut moved = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while moved < bytes {
        if Instant::now() > deadline {
            daemon.signal("USR1");
            daemon.wait_log("counters", Duration::from_secs(5));
            let log = daemon.log();
            let counters = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
            let s = sockets.get::<tcp::Socket>(handle);
            panic!(
                "stream stalled at {moved} of {bytes}: socket {:?} recv_queue {} send_queue {}, tx inflight {}\n{counters}",
                s.state(),
                s.recv_queue(),
                s.send_queue(),
                link.vmm.tx_inflight()
            );
        }
        for f in link.vmm.recv_frames() {
            link.inbox.push_back(f);
        }
        let used = link.vmm.rx_consumed();
        if used > 0 {
            link.vmm.post_rx(used);
        }
        iface.poll(smoltcp::time::Instant::now(), &mut link, &mut sockets);
        let s = sockets.get_mut::<tcp::Socket>(handle);
        if s.may_send() && started.is_none() {
            started = Some((Instant::now(), cpu_seconds(pid)));
        }
        if upload {
            while s.can_send() && moved < bytes {
                let n = s
                    .send(|buf| {
                        let n = buf.len().min((bytes - moved) as usize);
                        (n, n)
                    })
                    .unwrap();
                moved += n as u64;
                if n == 0 {
                    break;
                }
            }
        } else {
            while s.can_recv() {
                moved += s.recv(|buf| (buf.len(), buf.len() as u64)).unwrap();
            }
        }
        if link.inbox.is_empty() {
            std::thread::yield_now();
        }
    }
    // Uploads are done when the far end has everything.
    if upload {
        while !far.is_finished() {
            for f in link.vmm.recv_frames() {
                link.inbox.push_back(f);
            }
            let used = link.vmm.rx_consumed();
            if used > 0 {
                link.vmm.post_rx(used);
            }
            iface.poll(smoltcp::time::Instant::now(), &mut link, &mut sockets);
        }
    }
    let (t0, cpu0) = started.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    sockets.get_mut::<tcp::Socket>(handle).abort();
    iface.poll(smoltcp::time::Instant::now(), &mut link, &mut sockets);
    drop(link);
    drop(vmm);
    let _ = far.join();
    (secs, cpu)
}

fn main() {
    let gib: f64 = std::env::var("STREAM_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    let daemon = Daemon::start_with(
        None,
        Some(
            "[outbound]\nallow-host-loopback = true\n[policy]\npreset = \"allow-all\"\n\
             [[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n",
        ),
        &[],
    );
    println!(
        "\nvhost-gateway without a guest: {gib} GiB each way, harness smoltcp as the guest, MTU {MTU}\n"
    );
    println!(
        "{:<22} {:>10} {:>14}",
        "direction", "Gbit/s", "daemon CPU s/GiB"
    );
    let only = std::env::var("STREAM_ONLY").ok();
    for (name, direction) in [
        ("guest -> host", Direction::Upload),
        ("host -> guest", Direction::Download),
    ] {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let (secs, cpu) = stream(&daemon, direction, bytes);
        let gbit = bytes as f64 * 8.0 / secs / 1e9;
        println!("{name:<22} {gbit:>10.2} {:>14.3}", cpu / gib);
    }
}
