//! A smoltcp TCP stack on the VMM harness playing the guest: the
//! guest-free benchmark (`bench/stream.rs`) and the e2e fault tests share
//! it (included by path; it needs both the test kit and the crate's
//! `virtio` header code, and the kit does not depend on the crate).
//! Frames from the daemon queue in the link; frames to it go straight into
//! the TX ring. Not every user needs every item.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use kit::Daemon;
use kit::vmm::Vmm;
use vhost_gateway::virtio::{Layout, rx_header};

pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
pub const GATEWAY: IpAddress = IpAddress::v4(198, 19, 0, 1);
/// Frames in flight on the TX ring (two descriptors each on a 256 ring).
pub const TX_INFLIGHT: usize = 120;
pub const RX_POSTED: usize = 240;
pub const STALL: Duration = Duration::from_secs(60);
/// What the harness acks besides the basics: checksum offload both ways.
pub const FEATURES: u64 = kit::vmm::F_CSUM | kit::vmm::F_GUEST_CSUM | kit::vmm::F_VERSION_1;
/// And with segmentation offload.
pub const TSO_FEATURES: u64 = kit::vmm::F_HOST_TSO4 | kit::vmm::F_GUEST_TSO4;
/// A link setting: MTU and whether segmentation offload is on.
#[derive(Clone, Copy)]
pub struct Mode {
    pub mtu: usize,
    pub tso: bool,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tso = if self.tso { "+tso" } else { "" };
        format!("{}{tso}", self.mtu).fmt(f)
    }
}

/// The harness's side of the link: frames from the daemon queue here; frames
/// to it go straight into the TX ring.
pub struct Link {
    vmm: Vmm,
    mtu: usize,
    /// Segmentation offload both ways, as a Linux guest uses it.
    tso: bool,
    inbox: VecDeque<Vec<u8>>,
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a>(&'a mut Link, Option<u16>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        let mut header = [0u8; kit::vmm::NET_HDR_LEN];
        if self.0.tso {
            // The header a guest kernel writes for a segment (the same
            // fields the daemon writes for the guest) or a partial sum.
            let layout = Layout::from_features(FEATURES | TSO_FEATURES);
            if self.1.is_some() {
                assert!(rx_header(layout, &mut header, &mut frame, self.1));
            } else {
                fill_tcp_checksum(&mut frame);
            }
        }
        self.0.vmm.send_packet(&header, &frame);
        r
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.1 = meta
            .segmentation_offload_size
            .map(std::num::NonZeroU16::get);
    }
}

impl phy::Device for Link {
    type RxToken<'a>
        = Rx
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<'a>
    where
        Self: 'a;

    fn receive(&mut self, _t: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.inbox.pop_front()?;
        Some((Rx(frame), Tx(self, None)))
    }

    fn transmit(&mut self, _t: smoltcp::time::Instant) -> Option<Tx<'_>> {
        (self.vmm.tx_inflight() < TX_INFLIGHT).then_some(Tx(self, None))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        // The daemon marks its frames DATA_VALID (GUEST_CSUM is acked):
        // checksums are computed on send and not verified on receipt, as a
        // guest kernel does.
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        if self.tso {
            // Segments go out whole with the pseudo-header sum only.
            caps.checksum.tcp = Checksum::None;
            caps.segmentation.tcpv4 = std::num::NonZeroUsize::new(14 + 65_535);
        }
        caps
    }
}

/// The harness guest: a VMM connection and a smoltcp stack over it.
pub struct Guest {
    pub link: Link,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub next_port: u16,
}

impl Guest {
    pub fn start(daemon: &Daemon, mode: Mode) -> Self {
        let tso = if mode.tso { TSO_FEATURES } else { 0 };
        let mut vmm = Vmm::qemu_start_with(&daemon.socket, true, FEATURES | tso);
        vmm.post_rx(RX_POSTED);
        let mut link = Link {
            vmm,
            mtu: mode.mtu,
            tso: mode.tso,
            inbox: VecDeque::new(),
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
        Self {
            link,
            iface,
            sockets: SocketSet::new(Vec::new()),
            next_port: 49_152,
        }
    }

    /// Moves frames both ways once; true when frames came in.
    pub fn poll(&mut self) -> bool {
        let frames = self.link.vmm.recv_frames();
        let any = !frames.is_empty();
        self.link.inbox.extend(frames);
        let used = self.link.vmm.rx_consumed();
        if used > 0 {
            self.link.vmm.post_rx(used);
        }
        self.iface.poll(
            smoltcp::time::Instant::now(),
            &mut self.link,
            &mut self.sockets,
        );
        any
    }

    /// Opens a connection to the gateway's `port` (the host's loopback).
    pub fn connect(&mut self, port: u16, buffer: usize) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buffer]),
            tcp::SocketBuffer::new(vec![0; buffer]),
        );
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        let local = self.next_port;
        self.next_port = if local == u16::MAX { 49_152 } else { local + 1 };
        let handle = self.sockets.add(socket);
        self.sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(self.iface.context(), (GATEWAY, port), local)
            .unwrap();
        handle
    }

    pub fn socket(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Polls until `done` holds, panicking with `what` after [`STALL`].
    pub fn until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + STALL;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: stalled");
            if !self.poll() {
                std::thread::yield_now();
            }
        }
    }
}

/// Completes the TCP checksum smoltcp left out (checksum offload is on
/// while segments go out).
pub fn fill_tcp_checksum(frame: &mut [u8]) {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, TcpPacket};
    let mut eth = EthernetFrame::new_unchecked(frame);
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    if ip.next_header() != IpProtocol::Tcp {
        return;
    }
    let (src, dst) = (ip.src_addr().into(), ip.dst_addr().into());
    TcpPacket::new_unchecked(ip.payload_mut()).fill_checksum(&src, &dst);
}
