//! The gateway engine: the guest's link partner.
//!
//! Runs on the single vring worker thread of vhost-user-backend and never
//! blocks or awaits. Each pass drains the TX queue through a smoltcp `Device`
//! (one copy per frame into a reused buffer); the [`dispatch`] hands each
//! frame to its owner first — [`classify`] (what it is) → [`police`] (the
//! egress policy's verdict) → [`route`] (who takes it), all pure — : the DHCP
//! server, the router advertiser, the TCP flow table (new connections are
//! held until the host side connects), the UDP and ICMP relays, DNS
//! interception, local services, or smoltcp, which terminates guest TCP for
//! any destination (`any_ip`) and answers ARP, NDP and pings for the
//! gateway's own addresses.
//! After smoltcp has run, the flow table moves bytes between smoltcp sockets
//! and the host sockets the engine owns ([`hostio`]; tasks only for flows
//! that dial or that local services take), and the UDP and ICMP sessions
//! read their replies. Frames for the guest go straight into RX chains.
//! Between passes the thread sleeps in epoll on queue kicks, the host-socket
//! epoll, the host side's wake eventfd and a timerfd armed for
//! [`Engine::next_deadline`].

pub mod classify;
pub mod device;
pub mod dhcp;
pub mod dispatch;
pub mod dns;
pub mod frames;
pub mod gate;
pub mod guest;
pub mod hostio;
pub mod icmp;
pub mod ndp;
pub mod police;
pub mod publish;
pub mod reasm;
pub mod report;
pub mod route;
pub mod sessions;
pub mod steer;
pub mod tcp;
pub mod udp;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use virtio_queue::Queue;
use vm_memory::GuestMemory;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Host;
use crate::proxy::publish::Publisher;
use crate::tls::intercept::Interceptor;
use crate::virtio::{self, Layout};
use crate::wellknown::GATEWAY_LINK_LOCAL;
use device::{Device, Medium};
use dispatch::Gateway;
pub use guest::Guest;

/// TX frames taken per smoltcp poll before egress gets its turn, so a flood
/// from the guest cannot starve frames going to it.
pub const TX_BUDGET_PER_POLL: usize = 256;
/// Poll/service rounds per pass; more work left after them re-wakes the
/// engine instead of holding the thread.
const MAX_ROUNDS: usize = 16;
/// How often idle flows and sessions are looked for when any exist.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// What flow and session tables need from the engine for one frame.
pub struct Ctx<'a> {
    /// Where host tasks run.
    pub host: &'a Host,
    /// The host sockets the engine owns.
    pub io: &'a hostio::HostIo,
    /// Counters.
    pub metrics: &'a Arc<Metrics>,
    /// The gateway's addresses.
    pub own: classify::Own,
    /// Whether the gateway's addresses lead to the host's loopback.
    pub allow_host_loopback: bool,
    /// Time of this pass.
    pub now: Instant,
}

impl<'a> Ctx<'a> {
    /// The context of one frame.
    pub fn new(
        host: &'a Host,
        io: &'a hostio::HostIo,
        metrics: &'a Arc<Metrics>,
        setup: &route::Setup,
        now: Instant,
    ) -> Self {
        Self {
            host,
            io,
            metrics,
            own: setup.own,
            allow_host_loopback: setup.allow_host_loopback,
            now,
        }
    }

    /// Where traffic the guest sends to `dst` really goes ([`route::upstream`]).
    pub fn upstream(&self, dst: SocketAddr) -> Option<SocketAddr> {
        route::upstream(dst, &self.own, self.allow_host_loopback)
    }
}

/// Per-connection engine state: reset by building a new one.
pub struct Engine {
    config: Arc<Config>,
    iface: Interface,
    sockets: SocketSet<'static>,
    gateway: Gateway,
    layout: Layout,
    max_frame: usize,
    from_guest: Vec<u8>,
    to_guest: Vec<u8>,
    metrics: Arc<Metrics>,
    next_expiry: Instant,
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

/// Why an engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The smoltcp interface refused one of the gateway's addresses.
    #[error("the gateway's interface cannot hold {0}")]
    InterfaceAddress(String),
}

/// What every engine of the daemon shares, built once by the composition
/// root (`wiring`): the configuration, the compiled policy, the counters,
/// TLS interception and the published ports.
pub struct Shared {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Counters (process-wide).
    pub metrics: Arc<Metrics>,
    /// The egress policy and DNS rules in force (a reload swaps them).
    pub rules: crate::dns::rules::Live,
    /// TLS interception, when on (its leaf cache outlives guests).
    pub tls: Option<Arc<Interceptor>>,
    /// Published ports (the config's, bound at start, and those added at
    /// run time), kept across VMM connections.
    pub publisher: Option<Arc<Publisher>>,
    /// Whether ping sockets work on this host.
    pub icmp_available: bool,
    /// The guest attached now, for the control API.
    pub board: report::Board,
    /// Where frames are captured while a capture runs.
    pub tap: Arc<crate::pcap::Tap>,
}

impl Shared {
    /// Shared parts for unit tests: `config`'s rules, no TLS, no
    /// publisher, no ping sockets.
    #[cfg(test)]
    pub(crate) fn for_tests(config: &Config) -> Self {
        Self {
            rules: crate::dns::rules::Rules::from_config(config, None).live(),
            config: Arc::new(config.clone()),
            metrics: Arc::default(),
            tls: None,
            publisher: None,
            icmp_available: false,
            board: Default::default(),
            tap: Default::default(),
        }
    }
}

impl Engine {
    /// A fresh engine for queue pair `pair` of `guest`, its host side on
    /// `host`, the host sockets it owns in `io`.
    pub fn new(
        shared: &Shared,
        guest: Arc<Guest>,
        pair: usize,
        host: Host,
        io: hostio::HostIo,
    ) -> Result<Self, Error> {
        let config = &*shared.config;
        let metrics = shared.metrics.clone();
        let net = &config.network;
        let max_frame = usize::from(net.mtu) + virtio::ETH_HDR_LEN;
        let layout = Layout::from_features(0);
        let iface = interface(config, device::capabilities(layout, max_frame))?;
        let gateway_mac = EthernetAddress(net.gateway_mac.0);
        // Published ports come in on the first pair.
        let published = shared.publisher.as_ref().filter(|_| pair == 0).map(|p| {
            publish::Published::new(
                p.attach(host.wake.clone()),
                config.udp.max_sessions,
                Duration::from_secs(config.udp.idle_timeout_seconds),
            )
        });
        Ok(Self {
            config: shared.config.clone(),
            iface,
            sockets: SocketSet::new(Vec::new()),
            gateway: Gateway {
                setup: guest.setup.clone(),
                pair,
                gateway_mac,
                guest_mac: EthernetAddress(net.guest_mac.0),
                tcp: tcp::Flows::new(config.tcp.clone()),
                udp: udp::Sessions::new(config.udp.clone()),
                icmp: icmp::Sessions::new(config.icmp.clone(), shared.icmp_available),
                pending: device::ToGuest::default(),
                tap: shared.tap.clone(),
                inject: VecDeque::new(),
                host,
                io,
                metrics: metrics.clone(),
                published,
                dns: dns::Interceptor::new(guest.forwarder.clone(), config.dns.max_inflight),
                guest,
                audit_logged: HashMap::new(),
                taught: HashMap::new(),
                gateway_v4: net.ipv4_gateway,
                guest_v4: net.ipv4_guest,
                fragments: reasm::Reassembler::new(reasm::Limits {
                    max_bytes: config.fragments.max_bytes,
                    max_bytes_per_source: config.fragments.max_bytes_per_source,
                    timeout: Duration::from_secs(config.fragments.timeout_seconds),
                }),
                ip_mtu: usize::from(net.mtu),
                next_ip_id: 0,
            },
            layout,
            max_frame,
            from_guest: Vec::with_capacity(max_frame + virtio::NET_HDR_LEN),
            to_guest: Vec::with_capacity(max_frame + virtio::NET_HDR_LEN),
            metrics,
            next_expiry: Instant::now() + EXPIRY_TICK,
        })
    }

    /// The addresses the gateway answers on (its smoltcp interface's).
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.iface
            .ip_addrs()
            .iter()
            .map(|cidr| IpAddr::from(cidr.address()))
            .collect()
    }

    /// Applies the feature bits the driver acked. smoltcp reads a device's
    /// capabilities (checksums, segmentation) once, when its interface is
    /// built, so a layout that changes them gets a new interface; features
    /// are acked before the queues run, when it holds nothing yet.
    pub fn set_features(&mut self, features: u64) -> Result<(), Error> {
        let layout = Layout::from_features(features);
        if layout != self.layout {
            let caps = device::capabilities(layout, self.max_frame);
            self.iface = interface(&self.config, caps)?;
            self.layout = layout;
        }
        Ok(())
    }

    /// The counters this engine writes.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The epoll of the host sockets this engine owns, for the next
    /// engine of the same device.
    pub fn io(&self) -> hostio::HostIo {
        self.gateway.io.share()
    }

    /// The host side this engine uses.
    pub fn host(&self) -> Host {
        self.gateway.host.clone()
    }

    /// One pass: drain the TX queue (bounded per poll), run smoltcp, move
    /// flow data, run timers, flush frames for the guest into the RX queue.
    pub fn pass<M: GuestMemory>(&mut self, mem: &M, tx: &mut Queue, rx: &mut Queue) -> PassResult {
        // The watchdog tells a pass that never ends from an idle pair.
        self.gateway.guest.pass_begins(self.gateway.pair);
        let result = self.run_pass(mem, tx, rx);
        self.gateway.guest.pass_ends(self.gateway.pair);
        result
    }

    fn run_pass<M: GuestMemory>(&mut self, mem: &M, tx: &mut Queue, rx: &mut Queue) -> PassResult {
        let now = Instant::now();
        self.gateway.host.wake.clear();
        self.answer_requests(now);
        self.gateway.timers(now);
        let mut result = PassResult::default();
        let mut more = true;
        for _ in 0..MAX_ROUNDS {
            let mut device = Device {
                mem,
                tx: &mut *tx,
                rx: &mut *rx,
                layout: self.layout,
                max_frame: self.max_frame,
                from_guest: &mut self.from_guest,
                to_guest: &mut self.to_guest,
                gateway: &mut self.gateway,
                metrics: &self.metrics,
                budget: TX_BUDGET_PER_POLL,
                now,
                tx_used: false,
                rx_used: false,
                rx_starved: false,
            };
            self.iface.poll(
                smoltcp::time::Instant::now(),
                &mut device,
                &mut self.sockets,
            );
            let budget_left = device.budget;
            result.tx_used |= device.tx_used;
            result.rx_used |= device.rx_used;
            result.rx_starved |= device.rx_starved;
            let serviced = self.service(now);
            if budget_left > 0 && !serviced {
                more = false;
                break;
            }
        }
        if more {
            // Work is left: come back after the other events are handled.
            self.gateway.host.wake.wake();
        }
        let gw = &mut self.gateway;
        let (used, waiting) = gw
            .pending
            .flush(rx, mem, self.layout, (&self.metrics, &gw.tap), now);
        result.rx_used |= used;
        result.rx_starved |= waiting;
        // Session sockets are edge-triggered, and a DNS answer wakes the
        // engine once, when it arrives: replies left for want of room (or
        // beyond the relayed queue's depth) bring no new wake. With RX
        // buffers free, come back for them; without, the guest's next RX
        // kick does.
        let unread = self.gateway.udp.has_readable()
            || self.gateway.icmp.has_readable()
            || self.gateway.dns.has_answers();
        if unread && !waiting {
            self.gateway.host.wake.wake();
        }
        result
    }

    /// Answers the operator's requests waiting for this pair.
    fn answer_requests(&mut self, now: Instant) {
        let requests = self.gateway.guest.requests(self.gateway.pair);
        if requests.is_empty() {
            return;
        }
        let mut reports = Vec::new();
        for request in requests {
            match request {
                report::Request::Report { limit, reply } => reports.push((limit, reply)),
                report::Request::Reconsider { old, new, reply } => {
                    let reset = self.reconsider(&old, &new, now);
                    // The reload may have given up waiting; the resets
                    // stand and were counted.
                    let _ = reply.send(reset);
                }
            }
        }
        if reports.is_empty() {
            return;
        }
        let limit = reports.iter().map(|(l, _)| *l).max().unwrap_or(0);
        let report = self.report(now, limit);
        for (limit, reply) in reports {
            let mut answer = report.clone();
            answer.flows.truncate(limit);
            // The asker may have given up waiting; then no one wants it.
            let _ = reply.send(answer);
        }
    }

    /// Judges this pair's live egress flows and sessions again after a
    /// reload replaced `old` with `new`: what `new` denies and `old` did
    /// not is reset (TCP: RST to the guest, reset to the host) or closed
    /// (UDP, ICMP), counted and audited with reason `reload`. Returns how
    /// many.
    fn reconsider(
        &mut self,
        old: &crate::policy::Policy,
        new: &crate::policy::Policy,
        now: Instant,
    ) -> usize {
        use classify::{Echo, Kind};
        let gw = &mut self.gateway;
        let egress = gw.guest.services.egress().clone();
        let pinned = |ip| egress.pinned(ip, now);
        let mut revoked = Vec::new();
        for ((src, dst), claims, gating) in gw.tcp.egress_flows() {
            let live = police::Live {
                kind: Kind::TcpSyn { src, dst, seq: 0 },
                pinned: pinned(dst.ip()),
                claims,
                gating,
            };
            if let Some(deny) = police::revoked(&live, old, new) {
                revoked.push(deny);
                if let Some(seq) = gw.tcp.reset(&(src, dst), &mut self.sockets) {
                    gw.refuse(src, dst, seq);
                }
            }
        }
        for (src, dst) in gw.udp.keys() {
            let live = police::Live {
                kind: Kind::Udp {
                    src,
                    dst,
                    payload: &[],
                },
                pinned: pinned(dst.ip()),
                claims: Vec::new(),
                gating: false,
            };
            if let Some(deny) = police::revoked(&live, old, new) {
                revoked.push(deny);
                gw.udp.close(&(src, dst));
            }
        }
        for (src, dst, ident) in gw.icmp.keys() {
            let echo = Echo {
                src,
                dst,
                ident,
                seq: 0,
                data: &[],
            };
            let live = police::Live {
                kind: Kind::Echo(echo),
                pinned: pinned(dst),
                claims: Vec::new(),
                gating: false,
            };
            if let Some(deny) = police::revoked(&live, old, new) {
                revoked.push(deny);
                gw.icmp.close(&(src, dst, ident));
            }
        }
        for ((proto, dst, port), denied, name) in &revoked {
            let name = name.as_ref().map(|(n, s)| (n.as_str(), *s));
            egress.revoke(*proto, (*dst, *port), name, *denied);
        }
        revoked.len()
    }

    /// This pair's gauges and its oldest `limit` flows.
    fn report(&self, now: Instant, limit: usize) -> report::PairReport {
        use report::FlowState;
        let gw = &self.gateway;
        let mut gauges = report::Gauges {
            udp_sessions: gw.udp.len(),
            icmp_sessions: gw.icmp.len(),
            dns_inflight: gw.dns.inflight(),
            frames_waiting_for_guest: gw.pending.len(),
            fragment_bytes_held: gw.fragments.used(),
            ..Default::default()
        };
        let mut flows: Vec<report::Flow> = gw
            .tcp
            .report(&self.sockets, now)
            .chain(gw.udp.report(now))
            .chain(gw.icmp.report(now))
            .collect();
        for flow in &flows {
            if flow.proto == "tcp" {
                match flow.state {
                    FlowState::Connecting => gauges.tcp_connecting += 1,
                    FlowState::Established => gauges.tcp_established += 1,
                    FlowState::Closing => gauges.tcp_closing += 1,
                }
            }
        }
        let total_flows = flows.len();
        // Oldest first: at a limit, the long-lived flows are the ones an
        // operator looks for.
        flows.sort_unstable_by_key(|f| std::cmp::Reverse(f.age_ms));
        flows.truncate(limit);
        for flow in &mut flows {
            flow.pair = gw.pair;
            flow.name = gw.guest.name_of(flow.remote.ip(), now);
        }
        report::PairReport {
            gauges,
            flows,
            total_flows,
        }
    }

    /// Flow and session work after smoltcp ran; true when smoltcp has new
    /// input or output to process.
    fn service(&mut self, now: Instant) -> bool {
        let mut effects = tcp::Effects::default();
        let gw = &mut self.gateway;
        for (token, ready) in gw.io.ready() {
            if gw.udp.owns(token) {
                gw.udp.mark(token);
            } else if gw.icmp.owns(token) {
                gw.icmp.mark(token);
            } else {
                gw.tcp.mark(token, ready);
            }
        }
        gw.tcp
            .service(&gw.io, &mut self.sockets, &self.metrics, now, &mut effects);
        let injected = !effects.inject.is_empty();
        self.gateway.inject.extend(effects.inject);
        for (guest, remote, seq) in effects.refuse {
            self.gateway.refuse(guest, remote, seq);
        }
        self.gateway.relay_replies(now);
        let opened = self.inbound(now);
        if now >= self.next_expiry {
            self.gateway.udp.expire(now);
            self.gateway.icmp.expire(now);
            self.gateway.fragments.expire(now, &self.metrics);
            if let Some(p) = self.gateway.published.as_mut() {
                p.expire(now);
            }
            let gw = &self.gateway;
            if let Some(steer) = &gw.guest.steer {
                steer.sweep(gw.pair, |key| gw.holds(key));
            }
            self.next_expiry = now + EXPIRY_TICK;
        }
        injected || effects.progress || opened
    }

    /// Takes connections and datagrams from published ports; true when a
    /// connection to the guest was opened (smoltcp has a SYN to send).
    fn inbound(&mut self, now: Instant) -> bool {
        let mut opened = false;
        for _ in 0..publish::INBOUND_PER_PASS {
            if !self.gateway.has_room() {
                break;
            }
            let Some(item) = self
                .gateway
                .published
                .as_mut()
                .and_then(publish::Published::next_inbound)
            else {
                break;
            };
            let gw = &mut self.gateway;
            match item {
                crate::proxy::publish::Inbound::Tcp { stream, guest_port } => {
                    let ctx = Ctx::new(&gw.host, &gw.io, &gw.metrics, &gw.setup, now);
                    let guest = SocketAddr::new(IpAddr::V4(gw.guest_v4), guest_port);
                    let local = IpAddr::V4(gw.gateway_v4);
                    let key = gw.tcp.open_inbound(
                        &ctx,
                        &mut self.iface,
                        &mut self.sockets,
                        stream,
                        local,
                        guest,
                    );
                    if let Some((guest, local)) = key {
                        opened = true;
                        // The guest may answer on any queue.
                        if let Some(steer) = &gw.guest.steer {
                            steer.own(steer::FlowKey::Tcp(guest, local), gw.pair);
                        }
                    }
                }
                crate::proxy::publish::Inbound::Udp {
                    entry,
                    peer,
                    payload,
                } => {
                    let ports = gw
                        .published
                        .as_mut()
                        .and_then(|p| p.datagram_to_guest(entry, peer, now, &gw.metrics));
                    if let Some((from_port, guest_port)) = ports {
                        if let Some(steer) = &gw.guest.steer {
                            let guest = SocketAddr::new(IpAddr::V4(gw.guest_v4), guest_port);
                            let ours = SocketAddr::new(IpAddr::V4(gw.gateway_v4), from_port);
                            steer.own(steer::FlowKey::Udp(guest, ours), gw.pair);
                        }
                        let ends = gw.to_guest(IpAddr::V4(gw.gateway_v4), IpAddr::V4(gw.guest_v4));
                        let frame = frames::udp(&ends, from_port, guest_port, &payload);
                        gw.queue(frame);
                    }
                }
            }
        }
        opened
    }

    /// When the engine next needs to run without a kick.
    pub fn next_deadline(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let smol = self
            .iface
            .poll_delay(smoltcp::time::Instant::now(), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        // Periodic advertisements are the first pair's.
        let ra = (self.gateway.pair == 0)
            .then(|| {
                guest::lock(&self.gateway.guest.ra)
                    .as_ref()
                    .and_then(ndp::Advertiser::deadline)
            })
            .flatten()
            .map(|t| t.saturating_duration_since(now));
        let gw = &self.gateway;
        let expiry = (!gw.tcp.is_empty() || !gw.udp.is_empty() || !gw.icmp.is_empty())
            .then(|| self.next_expiry.saturating_duration_since(now));
        [smol, ra, expiry].into_iter().flatten().min()
    }
}

/// The gateway's smoltcp interface over a link with `caps`: every gateway
/// address on it, and guest TCP terminated for any destination.
fn interface(config: &Config, caps: smoltcp::phy::DeviceCapabilities) -> Result<Interface, Error> {
    let net = &config.network;
    let mut medium = Medium::new(caps);
    let gateway_mac = EthernetAddress(net.gateway_mac.0);
    let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(gateway_mac));
    iface_config.random_seed = seed();
    let mut iface = Interface::new(iface_config, &mut medium, smoltcp::time::Instant::now());
    // Terminate guest TCP for any destination; classify keeps ARP, NDP
    // and pings for other addresses away from smoltcp.
    iface.set_any_ip(true);
    let mut wanted = vec![IpCidr::new(
        IpAddress::Ipv4(net.ipv4_gateway),
        net.ipv4_prefix_len,
    )];
    if net.ipv6_enabled {
        wanted.push(IpCidr::new(IpAddress::Ipv6(net.ipv6_gateway), 64));
        wanted.push(IpCidr::new(IpAddress::Ipv6(GATEWAY_LINK_LOCAL), 64));
    }
    let mut refused = None;
    iface.update_ip_addrs(|addrs| {
        for cidr in &wanted {
            // A full list would leave the gateway deaf on that address
            // (fe80::1 is the guest's IPv6 router): never ignore it.
            if addrs.push(*cidr).is_err() {
                refused.get_or_insert(*cidr);
            }
        }
    });
    match refused {
        Some(cidr) => Err(Error::InterfaceAddress(cidr.to_string())),
        None => Ok(iface),
    }
}

/// smoltcp's TCP initial sequence numbers and ports derive from this seed.
fn seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_holds_every_gateway_address() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let config = Config::embedded();
        let shared = Shared::for_tests(&config);
        let host = Host {
            runtime: runtime.handle().clone(),
            wake: Arc::new(crate::proxy::Wake::new().unwrap()),
            upstream: Arc::new(crate::proxy::Direct),
        };
        let io = hostio::HostIo::new().unwrap();
        let guest = Guest::new(&shared, vec![host.wake.clone()]);
        let engine = Engine::new(&shared, guest, 0, host, io).unwrap();
        let held = engine.addresses();
        let net = &config.network;
        for want in [
            IpAddr::V4(net.ipv4_gateway),
            IpAddr::V6(net.ipv6_gateway),
            IpAddr::V6(GATEWAY_LINK_LOCAL),
        ] {
            assert!(held.contains(&want), "{want} missing from {held:?}");
        }
    }

    /// The watchdog's question: a pair inside one pass for longer than
    /// the limit is stuck; one between passes never is.
    #[test]
    fn a_pair_inside_one_pass_too_long_is_stuck() {
        let shared = Shared::for_tests(&Config::embedded());
        let wakes = (0..2)
            .map(|_| Arc::new(crate::proxy::Wake::new().unwrap()))
            .collect();
        let guest = Guest::new(&shared, wakes);
        assert_eq!(guest.stuck(Duration::ZERO), None);
        guest.pass_begins(1);
        std::thread::sleep(Duration::from_millis(20));
        let (pair, took) = guest.stuck(Duration::from_millis(5)).unwrap();
        assert_eq!(pair, 1);
        assert!(took >= Duration::from_millis(15), "{took:?}");
        assert_eq!(guest.stuck(Duration::from_secs(3600)), None);
        guest.pass_ends(1);
        assert_eq!(guest.stuck(Duration::ZERO), None);
        // A pair number the guest does not have is nobody's.
        guest.pass_begins(7);
        assert_eq!(guest.stuck(Duration::ZERO), None);
    }
}
