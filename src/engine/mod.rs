//! The gateway engine: the guest's link partner.
//!
//! Runs on the single vring worker thread of vhost-user-backend and never
//! blocks or awaits. Each pass drains the TX queue through a smoltcp `Device`
//! (one copy per frame into a reused buffer), lets the gateway services (DHCP,
//! router advertisements) take their frames before smoltcp sees them, lets
//! smoltcp answer ARP, NDP and pings to the gateway's own addresses, and
//! writes what goes to the guest straight into RX chains. Between passes the
//! thread sleeps in epoll on queue kicks and a timerfd armed for the next
//! deadline ([`Engine::next_deadline`]), so an idle guest costs no CPU.
#![forbid(unsafe_code)]

pub mod device;
pub mod dhcp;
pub mod frames;
pub mod ndp;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use virtio_queue::Queue;
use vm_memory::GuestMemory;

use crate::config::Network;
use crate::metrics::{Counter, Metrics};
use crate::virtio::{self, Layout};
use device::{Device, Medium};

/// Frames from gateway services waiting for RX buffers; beyond this they are
/// dropped and counted (the guest is not reading).
const MAX_PENDING_TO_GUEST: usize = 64;
/// TX frames taken per smoltcp poll before egress gets its turn, so a flood
/// from the guest cannot starve frames going to it.
pub const TX_BUDGET_PER_POLL: usize = 256;

/// Gateway services that answer frames before smoltcp sees them.
pub struct Services {
    dhcp: dhcp::Server,
    ra: Option<ndp::Advertiser>,
    pending: VecDeque<Vec<u8>>,
    metrics: Arc<Metrics>,
}

impl Services {
    /// Offers a guest frame to the services; true when one of them took it.
    pub fn intercept(&mut self, frame: &[u8], now: Instant) -> bool {
        match frames::classify(frame) {
            frames::Kind::Dhcp { payload } => {
                match self.dhcp.handle(payload, now) {
                    dhcp::Outcome::Reply(reply) => {
                        self.metrics.inc(Counter::dhcp_replies);
                        self.queue(reply);
                    }
                    dhcp::Outcome::Quiet => {}
                    dhcp::Outcome::Malformed => self.metrics.inc(Counter::dhcp_malformed),
                    dhcp::Outcome::Refused => self.metrics.inc(Counter::dhcp_refused),
                }
                true
            }
            frames::Kind::RouterSolicit => {
                if let Some(reply) = self.ra.as_mut().and_then(|ra| ra.solicited(now)) {
                    self.metrics.inc(Counter::router_adverts);
                    self.queue(reply);
                }
                true
            }
            frames::Kind::Other => false,
        }
    }

    fn queue(&mut self, frame: Vec<u8>) {
        if self.pending.len() >= MAX_PENDING_TO_GUEST {
            self.metrics.inc(Counter::drop_pending_full);
            return;
        }
        self.pending.push_back(frame);
    }

    fn timers(&mut self, now: Instant) {
        if let Some(frame) = self.ra.as_mut().and_then(|ra| ra.periodic(now)) {
            self.metrics.inc(Counter::router_adverts);
            self.queue(frame);
        }
    }
}

/// Per-connection engine state: reset by building a new one.
pub struct Engine {
    iface: Interface,
    sockets: SocketSet<'static>,
    services: Services,
    layout: Layout,
    max_frame: usize,
    from_guest: Vec<u8>,
    to_guest: Vec<u8>,
    metrics: Arc<Metrics>,
}

/// What a pass did to each queue, for notification decisions.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassResult {
    /// Chains were returned on the TX queue.
    pub tx_used: bool,
    /// Chains were filled on the RX queue.
    pub rx_used: bool,
    /// Something for the guest waits for RX buffers.
    pub rx_starved: bool,
}

impl Engine {
    /// A fresh engine for one guest.
    pub fn new(net: &Network, metrics: Arc<Metrics>) -> Self {
        let max_frame = usize::from(net.mtu) + virtio::ETH_HDR_LEN;
        let mut medium = Medium::new(max_frame);
        let mut config = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(
            net.gateway_mac.0,
        )));
        config.random_seed = seed();
        let mut iface = Interface::new(config, &mut medium, smoltcp::time::Instant::now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                IpAddress::Ipv4(net.ipv4_gateway),
                net.ipv4_prefix_len,
            ));
            if net.ipv6_enabled {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(net.ipv6_gateway), 64));
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(ndp::GATEWAY_LINK_LOCAL), 64));
            }
        });
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            services: Services {
                dhcp: dhcp::Server::new(net),
                ra: ndp::Advertiser::new(net),
                pending: VecDeque::new(),
                metrics: metrics.clone(),
            },
            layout: Layout::from_features(0),
            max_frame,
            from_guest: Vec::with_capacity(max_frame + virtio::NET_HDR_LEN),
            to_guest: Vec::with_capacity(max_frame + virtio::NET_HDR_LEN),
            metrics,
        }
    }

    /// Applies the feature bits the driver acked.
    pub fn set_features(&mut self, features: u64) {
        self.layout = Layout::from_features(features);
    }

    /// The counters this engine writes.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// One pass: drain the TX queue (bounded per poll), run smoltcp and the
    /// service timers, flush pending service frames into the RX queue.
    pub fn pass<M: GuestMemory>(&mut self, mem: &M, tx: &mut Queue, rx: &mut Queue) -> PassResult {
        let now = Instant::now();
        self.services.timers(now);
        let mut result = PassResult::default();
        loop {
            let mut device = Device {
                mem,
                tx: &mut *tx,
                rx: &mut *rx,
                layout: self.layout,
                max_frame: self.max_frame,
                from_guest: &mut self.from_guest,
                to_guest: &mut self.to_guest,
                services: &mut self.services,
                metrics: &self.metrics,
                budget: TX_BUDGET_PER_POLL,
                now,
                tx_used: false,
                rx_used: false,
            };
            self.iface.poll(
                smoltcp::time::Instant::now(),
                &mut device,
                &mut self.sockets,
            );
            let budget_left = device.budget;
            result.tx_used |= device.tx_used;
            result.rx_used |= device.rx_used;
            if budget_left > 0 {
                break;
            }
        }
        while let Some(frame) = self.services.pending.front() {
            if !virtio::rx_available(rx, mem) {
                result.rx_starved = true;
                break;
            }
            let (_, sent) = device::send_to_guest(
                rx,
                mem,
                self.layout,
                &mut self.to_guest,
                &self.metrics,
                frame.len(),
                |buf| buf.copy_from_slice(frame),
            );
            result.rx_used |= sent;
            self.services.pending.pop_front();
        }
        result
    }

    /// When the engine next needs to run without a kick.
    pub fn next_deadline(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let smol = self
            .iface
            .poll_delay(smoltcp::time::Instant::now(), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        let ra = self
            .services
            .ra
            .as_ref()
            .and_then(ndp::Advertiser::deadline)
            .map(|t| t.saturating_duration_since(now));
        match (smol, ra) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// smoltcp's TCP initial sequence numbers and ports derive from this seed.
fn seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id())
}
