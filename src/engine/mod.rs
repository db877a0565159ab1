//! The gateway engine: the guest's link partner.
//!
//! Runs on the single vring worker thread of vhost-user-backend and never
//! blocks or awaits. Each pass drains the TX queue through a smoltcp `Device`
//! (one copy per frame into a reused buffer); [`classify`] hands each frame
//! to its owner first: the DHCP server, the router advertiser, the TCP flow
//! table (new connections are held until the host side connects), the UDP and
//! ICMP relays, or smoltcp, which terminates guest TCP for any destination
//! (`any_ip`) and answers ARP, NDP and pings for the gateway's own addresses.
//! After smoltcp has run, the flow table moves data between smoltcp sockets
//! and host tasks. Frames for the guest go straight into RX chains. Between
//! passes the thread sleeps in epoll on queue kicks, the host side's wake
//! eventfd and a timerfd armed for [`Engine::next_deadline`].

pub mod classify;
pub mod device;
pub mod dhcp;
pub mod frames;
pub mod gate;
pub mod icmp;
pub mod ndp;
pub mod publish;
pub mod sessions;
pub mod tcp;
pub mod udp;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use virtio_queue::Queue;
use vm_memory::GuestMemory;

use crate::config::Config;
use crate::metrics::{Counter, Metrics};
use crate::proxy::Host;
use crate::virtio::{self, Layout};
use device::{Device, Medium};

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
    /// Counters.
    pub metrics: &'a Arc<Metrics>,
    /// The gateway's addresses.
    pub own: classify::Own,
    /// Whether the gateway's addresses lead to the host's loopback.
    pub allow_host_loopback: bool,
    /// Time of this pass.
    pub now: Instant,
}

impl Ctx<'_> {
    /// Where traffic the guest sends to `dst` really goes, or None when
    /// nowhere: the gateway's addresses map to the host's loopback (same
    /// port) when allowed; unspecified, multicast, broadcast and port 0 go
    /// nowhere.
    pub fn upstream(&self, dst: SocketAddr) -> Option<SocketAddr> {
        let ip = dst.ip();
        if self.own.is_own(ip) {
            let loopback = if ip.is_ipv4() {
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            };
            return self
                .allow_host_loopback
                .then_some(SocketAddr::new(loopback, dst.port()));
        }
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_multicast() || broadcast || dst.port() == 0 {
            return None;
        }
        Some(dst)
    }
}

/// The policy's answer for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    Deny,
    /// Accept the TCP flow and decide on its first bytes.
    Peek,
}

/// Everything that sees guest frames before smoltcp, and what it queues.
pub struct Services {
    own: classify::Own,
    gateway_mac: EthernetAddress,
    guest_mac: EthernetAddress,
    dhcp: dhcp::Server,
    ra: Option<ndp::Advertiser>,
    tcp: tcp::Flows,
    udp: udp::Sessions,
    icmp: icmp::Sessions,
    /// Frames for the guest waiting for RX buffers.
    pending: device::ToGuest,
    /// Frames for smoltcp (SYNs released once their upstream connected).
    inject: VecDeque<Vec<u8>>,
    host: Host,
    metrics: Arc<Metrics>,
    allow_host_loopback: bool,
    published: Option<publish::Published>,
    dns: crate::dns::intercept::Interceptor,
    /// Which name each address the guest was given came from.
    pins: Arc<crate::dns::pins::Pins>,
    /// The egress policy.
    policy: Arc<crate::policy::Policy>,
    /// When each denied destination was last logged (UDP and ICMP repeat).
    audit_logged: std::collections::HashMap<(crate::policy::Proto, IpAddr, Option<u16>), Instant>,
    gateway_v4: std::net::Ipv4Addr,
    guest_v4: std::net::Ipv4Addr,
}

impl Services {
    /// Offers a guest frame to the services; true when one of them took it.
    pub fn intercept(&mut self, frame: &[u8], now: Instant) -> bool {
        if let Some(src) = frame.get(6..12).and_then(|b| <[u8; 6]>::try_from(b).ok()) {
            let mac = EthernetAddress(src);
            if mac.is_unicast() {
                self.guest_mac = mac;
            }
        }
        let kind = classify::classify(frame, &self.own);
        let verdict = self.police(&kind, now);
        let allowed = verdict != Verdict::Deny;
        let ctx = Ctx {
            host: &self.host,
            metrics: &self.metrics,
            own: self.own,
            allow_host_loopback: self.allow_host_loopback,
            now,
        };
        match kind {
            classify::Kind::TcpSyn { src, dst, seq } if !allowed => {
                self.refuse(src, dst, seq);
                true
            }
            classify::Kind::TcpSyn { src, dst, seq }
                if self
                    .host
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.intercepts(dst.port())) =>
            {
                // The interceptor decides on the SNI itself (and the Host
                // inside); only an address-level deny stops it at the SYN.
                let (Some(tls), Some(upstream)) = (self.host.tls.clone(), ctx.upstream(dst)) else {
                    self.refuse(src, dst, seq);
                    return true;
                };
                let flow = self.deciding(dst, upstream);
                let local: tcp::LocalService = Box::new(move |host: &Host| tls.spawn(host, flow));
                self.syn(now, frame, (src, dst, seq), Some(local), None)
            }
            classify::Kind::TcpSyn { src, dst, seq } if verdict == Verdict::Peek => {
                let names = self.pins.names_of(dst.ip(), now);
                let (local, gate) = if names.is_empty() {
                    let Some(upstream) = ctx.upstream(dst) else {
                        self.refuse(src, dst, seq);
                        return true;
                    };
                    let deciding = self.deciding(dst, upstream);
                    let local: tcp::LocalService =
                        Box::new(move |host: &Host| deciding.spawn(host));
                    (Some(local), None)
                } else {
                    (None, Some(gate::Gate::new(names, self.policy.clone())))
                };
                self.syn(now, frame, (src, dst, seq), local, gate)
            }
            classify::Kind::Udp { .. } | classify::Kind::Echo(_) if !allowed => true,
            classify::Kind::Dhcp { payload } => {
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
            classify::Kind::RouterSolicit => {
                if let Some(reply) = self.ra.as_mut().and_then(|ra| ra.solicited(now)) {
                    self.metrics.inc(Counter::router_adverts);
                    self.queue(reply);
                }
                true
            }
            classify::Kind::NotOurs => {
                self.metrics.inc(Counter::neighbor_not_ours);
                true
            }
            classify::Kind::Fragment => {
                self.metrics.inc(Counter::drop_fragment);
                true
            }
            classify::Kind::TcpSyn { src, dst, seq }
                if dst.port() == crate::wellknown::ENCRYPTED_DNS_PORT =>
            {
                // DNS over TLS: answered by our forwarder when we can
                // terminate TLS, refused otherwise (the guest falls back).
                let Some(tls) = self.host.tls.clone() else {
                    self.metrics.inc(Counter::dns_encrypted_refused);
                    self.refuse(src, dst, seq);
                    return true;
                };
                let (forwarder, metrics) = (self.dns.forwarder(), self.metrics.clone());
                let local: tcp::LocalService =
                    Box::new(move |host: &Host| tls.spawn_dot(host, dst, forwarder, metrics));
                self.syn(now, frame, (src, dst, seq), Some(local), None)
            }
            classify::Kind::Udp { dst, .. }
                if dst.port() == crate::wellknown::ENCRYPTED_DNS_PORT =>
            {
                self.metrics.inc(Counter::dns_encrypted_refused);
                true
            }
            classify::Kind::TcpSyn { src, dst, seq } => {
                // DNS over TCP to any address is answered by the forwarder.
                let local: Option<tcp::LocalService> = (dst.port() == crate::wellknown::DNS_PORT)
                    .then(|| {
                        let forwarder = self.dns.forwarder();
                        let metrics = self.metrics.clone();
                        Box::new(move |host: &Host| {
                            crate::dns::tcp::spawn(host, forwarder, metrics)
                        }) as tcp::LocalService
                    });
                if tracing::enabled!(tracing::Level::DEBUG) {
                    let name = self.pins.name_of(dst.ip(), now);
                    tracing::debug!(%src, %dst, name = name.as_deref().unwrap_or("-"), "new TCP flow");
                }
                self.syn(now, frame, (src, dst, seq), local, None)
            }
            classify::Kind::Udp { src, dst, payload } => {
                let published = self.own.is_own(dst.ip())
                    && self.published.as_mut().is_some_and(|p| {
                        p.datagram_from_guest(dst.port(), payload, now, &self.metrics)
                    });
                if published {
                    // Taken by a published port's session.
                } else if self
                    .host
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.intercepts(dst.port()))
                {
                    // QUIC would bypass interception: dropped, so the
                    // client falls back to TCP.
                    self.metrics.inc(Counter::tls_quic_dropped);
                } else if dst.port() == crate::wellknown::DNS_PORT {
                    if let Some(refusal) = self.dns.query(&ctx, src, dst, payload) {
                        let ends = self.to_guest(dst.ip(), src.ip());
                        self.queue(frames::udp(&ends, dst.port(), src.port(), &refusal));
                    }
                } else {
                    self.udp.send(&ctx, src, dst, payload);
                }
                true
            }
            classify::Kind::Echo(echo) => {
                self.icmp.send(&ctx, &echo);
                true
            }
            classify::Kind::Stack => false,
        }
    }

    /// The egress policy's word on a frame that would open or use a flow;
    /// Allow for everything else. Denies are counted and logged to the audit
    /// stream (repeats of a UDP/ICMP destination at most once per second). A
    /// TCP flow whose decision a hostname could change is decided on its
    /// first bytes (Peek): with no DNS pin for its address, entirely; with
    /// pins that allow it, its SNI/Host must be a pinned name and allowed.
    fn police(&mut self, kind: &classify::Kind<'_>, now: Instant) -> Verdict {
        use crate::policy::{Action, Flow, NameSource, Proto};
        use crate::wellknown::{DNS_PORT, ENCRYPTED_DNS_PORT};
        // A SYN for a flow that exists (a retransmission) keeps the flow's
        // first decision.
        if self.tcp.has_socket_for(kind) {
            return Verdict::Allow;
        }
        let (proto, dst, port) = match kind {
            classify::Kind::TcpSyn { dst, .. }
                if dst.port() != DNS_PORT && dst.port() != ENCRYPTED_DNS_PORT =>
            {
                (Proto::Tcp, dst.ip(), Some(dst.port()))
            }
            classify::Kind::Udp { dst, .. }
                if dst.port() != DNS_PORT && dst.port() != ENCRYPTED_DNS_PORT =>
            {
                // Replies to published ports are inbound traffic.
                let published = self.own.is_own(dst.ip())
                    && self
                        .published
                        .as_ref()
                        .is_some_and(|p| p.is_session_port(dst.port()));
                if published {
                    return Verdict::Allow;
                }
                (Proto::Udp, dst.ip(), Some(dst.port()))
            }
            classify::Kind::Echo(e) => (Proto::Icmp, e.dst, None),
            _ => return Verdict::Allow,
        };
        let name = self.pins.name_of(dst, now);
        let flow = Flow {
            dst,
            proto,
            port,
            name: name.as_deref().map(|n| (n, NameSource::Dns)),
        };
        let decision = self.policy.decide(&flow);
        if proto == Proto::Tcp
            && (name.is_none() || decision.action == Action::Allow)
            && self.policy.needs_name(&flow)
        {
            return Verdict::Peek;
        }
        if decision.action == Action::Allow {
            if proto == Proto::Tcp {
                self.metrics.inc(Counter::policy_allowed);
            }
            return Verdict::Allow;
        }
        self.metrics.inc(Counter::policy_denied);
        let key = (proto, dst, port);
        let quiet = proto != Proto::Tcp
            && self
                .audit_logged
                .get(&key)
                .is_some_and(|t| now.saturating_duration_since(*t) < Duration::from_secs(1));
        if !quiet {
            if self.audit_logged.len() >= 4096 {
                self.audit_logged.clear();
            }
            self.audit_logged.insert(key, now);
            crate::audit::deny(&crate::audit::Deny {
                proto: proto.as_str(),
                dst: Some(dst),
                port: port.unwrap_or(0),
                name: name.as_deref(),
                name_source: name.as_ref().map(|_| NameSource::Dns.as_str()),
                rule: decision.rule,
                reason: crate::audit::Reason::Policy,
            });
        }
        Verdict::Deny
    }

    /// Hands a SYN to the flow table; true when taken.
    fn syn(
        &mut self,
        now: Instant,
        frame: &[u8],
        (src, dst, seq): (SocketAddr, SocketAddr, u32),
        local: Option<tcp::LocalService>,
        gate: Option<gate::Gate>,
    ) -> bool {
        let ctx = Ctx {
            host: &self.host,
            metrics: &self.metrics,
            own: self.own,
            allow_host_loopback: self.allow_host_loopback,
            now,
        };
        let taken = self.tcp.on_syn(&ctx, frame, (src, dst), seq, local, gate);
        match taken {
            tcp::Syn::Held => true,
            tcp::Syn::Pass => false,
            tcp::Syn::Refuse => {
                self.refuse(src, dst, seq);
                true
            }
        }
    }

    /// The parts of a flow decided on its name (first bytes or TLS).
    fn deciding(&self, dst: SocketAddr, upstream: SocketAddr) -> crate::proxy::tcp::Deciding {
        crate::proxy::tcp::Deciding {
            dst,
            upstream,
            connect_timeout: self.tcp.connect_timeout(),
            check: crate::proxy::check::NameCheck {
                policy: self.policy.clone(),
                pins: self.pins.clone(),
                forwarder: self.dns.forwarder(),
            },
            metrics: self.metrics.clone(),
        }
    }

    fn to_guest(&self, from: IpAddr, to: IpAddr) -> frames::Ends {
        frames::Ends {
            src_mac: self.gateway_mac,
            dst_mac: self.guest_mac,
            src: from,
            dst: to,
            hop_limit: 64,
        }
    }

    fn refuse(&mut self, guest: SocketAddr, remote: SocketAddr, seq: u32) {
        let ends = self.to_guest(remote.ip(), guest.ip());
        let rst = frames::tcp_reset_for_syn(&ends, remote.port(), guest.port(), seq);
        self.metrics.inc(Counter::tcp_resets_sent);
        self.queue(rst);
    }

    fn queue(&mut self, frame: Vec<u8>) {
        self.pending.push(frame, Instant::now(), &self.metrics);
    }

    fn has_room(&self) -> bool {
        self.pending.has_room()
    }

    fn timers(&mut self, now: Instant) {
        if let Some(frame) = self.ra.as_mut().and_then(|ra| ra.periodic(now)) {
            self.metrics.inc(Counter::router_adverts);
            self.queue(frame);
        }
    }

    /// Replies from the UDP and ICMP relays, as far as there is room.
    fn relay_replies(&mut self, now: Instant) -> bool {
        let mut any = false;
        while self.has_room() {
            let Some((guest, remote, payload)) = self.udp.next_reply(now) else {
                break;
            };
            let ends = self.to_guest(remote.ip(), guest.ip());
            let frame = frames::udp(&ends, remote.port(), guest.port(), &payload);
            self.queue(frame);
            any = true;
        }
        while self.has_room() {
            let Some((guest, asked, answer)) = self.dns.next_answer() else {
                break;
            };
            let ends = self.to_guest(asked.ip(), guest.ip());
            let frame = frames::udp(&ends, asked.port(), guest.port(), &answer);
            self.queue(frame);
            any = true;
        }
        while self.has_room() {
            let Some((guest, remote, ident, seq, data)) = self.icmp.next_reply(now) else {
                break;
            };
            let ends = self.to_guest(remote, guest);
            self.queue(frames::echo_reply(&ends, ident, seq, &data));
            any = true;
        }
        any
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

impl Engine {
    /// A fresh engine for one guest.
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        host: Host,
        icmp_available: bool,
        attachment: Option<crate::ports::Attachment>,
    ) -> Self {
        let net = &config.network;
        let max_frame = usize::from(net.mtu) + virtio::ETH_HDR_LEN;
        let mut medium = Medium::new(max_frame);
        let gateway_mac = EthernetAddress(net.gateway_mac.0);
        let mut iface_config = IfaceConfig::new(HardwareAddress::Ethernet(gateway_mac));
        iface_config.random_seed = seed();
        let mut iface = Interface::new(iface_config, &mut medium, smoltcp::time::Instant::now());
        // Terminate guest TCP for any destination; classify keeps ARP, NDP
        // and pings for other addresses away from smoltcp.
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(
                IpAddress::Ipv4(net.ipv4_gateway),
                net.ipv4_prefix_len,
            ));
            if net.ipv6_enabled {
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(net.ipv6_gateway), 64));
                let _ = addrs.push(IpCidr::new(
                    IpAddress::Ipv6(crate::wellknown::GATEWAY_LINK_LOCAL),
                    64,
                ));
            }
        });
        let allow_loopback = config.outbound.allow_host_loopback;
        let pins = Arc::new(crate::dns::pins::Pins::new(config.dns.max_pins));
        let policy = Arc::new(config.policy());
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            services: Services {
                own: classify::Own {
                    v4: net.ipv4_gateway,
                    v6: net
                        .ipv6_enabled
                        .then_some((net.ipv6_gateway, crate::wellknown::GATEWAY_LINK_LOCAL)),
                },
                gateway_mac,
                guest_mac: EthernetAddress(net.guest_mac.0),
                dhcp: dhcp::Server::new(net),
                ra: ndp::Advertiser::new(net),
                tcp: tcp::Flows::new(config.tcp.clone()),
                udp: udp::Sessions::new(config.udp.clone()),
                icmp: icmp::Sessions::new(config.icmp.clone(), icmp_available),
                pending: device::ToGuest::default(),
                inject: VecDeque::new(),
                host,
                metrics: metrics.clone(),
                allow_host_loopback: allow_loopback,
                published: attachment.map(|a| {
                    publish::Published::new(
                        a,
                        config.udp.max_sessions,
                        Duration::from_secs(config.udp.idle_timeout_seconds),
                    )
                }),
                dns: crate::dns::intercept::Interceptor::new(
                    crate::dns::forward::Forwarder::new(
                        &config.dns,
                        dns_upstreams(config),
                        own_networks(config),
                        pins.clone(),
                        policy.clone(),
                    ),
                    config.dns.max_inflight,
                ),
                pins,
                policy,
                audit_logged: std::collections::HashMap::new(),
                gateway_v4: net.ipv4_gateway,
                guest_v4: net.ipv4_guest,
            },
            layout: Layout::from_features(0),
            max_frame,
            from_guest: Vec::with_capacity(max_frame + virtio::NET_HDR_LEN),
            to_guest: Vec::with_capacity(max_frame + virtio::NET_HDR_LEN),
            metrics,
            next_expiry: Instant::now() + EXPIRY_TICK,
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

    /// The host side this engine uses.
    pub fn host(&self) -> Host {
        self.services.host.clone()
    }

    /// One pass: drain the TX queue (bounded per poll), run smoltcp, move
    /// flow data, run timers, flush frames for the guest into the RX queue.
    pub fn pass<M: GuestMemory>(&mut self, mem: &M, tx: &mut Queue, rx: &mut Queue) -> PassResult {
        let now = Instant::now();
        self.services.host.wake.clear();
        self.services.timers(now);
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
                services: &mut self.services,
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
            self.services.host.wake.wake();
        }
        let (used, waiting) = self.services.pending.flush(
            rx,
            mem,
            self.layout,
            &mut self.to_guest,
            &self.metrics,
            now,
        );
        result.rx_used |= used;
        result.rx_starved |= waiting;
        result
    }

    /// Flow and session work after smoltcp ran; true when smoltcp has new
    /// input or output to process.
    fn service(&mut self, now: Instant) -> bool {
        let mut effects = tcp::Effects::default();
        self.services
            .tcp
            .service(&mut self.sockets, &self.metrics, now, &mut effects);
        let injected = !effects.inject.is_empty();
        self.services.inject.extend(effects.inject);
        for (guest, remote, seq) in effects.refuse {
            self.services.refuse(guest, remote, seq);
        }
        let relayed = self.services.relay_replies(now);
        let opened = self.inbound(now);
        if now >= self.next_expiry {
            self.services.udp.expire(now);
            self.services.icmp.expire(now);
            if let Some(p) = self.services.published.as_mut() {
                p.expire(now);
            }
            self.next_expiry = now + EXPIRY_TICK;
        }
        // Relayed replies only wait for RX buffers; they need no new poll.
        let _ = relayed;
        injected || effects.progress || opened
    }

    /// Takes connections and datagrams from published ports; true when a
    /// connection to the guest was opened (smoltcp has a SYN to send).
    fn inbound(&mut self, now: Instant) -> bool {
        let mut opened = false;
        for _ in 0..publish::INBOUND_PER_PASS {
            if !self.services.has_room() {
                break;
            }
            let Some(item) = self
                .services
                .published
                .as_mut()
                .and_then(publish::Published::next_inbound)
            else {
                break;
            };
            let services = &mut self.services;
            match item {
                crate::ports::Inbound::Tcp { stream, guest_port } => {
                    let ctx = Ctx {
                        host: &services.host,
                        metrics: &services.metrics,
                        own: services.own,
                        allow_host_loopback: services.allow_host_loopback,
                        now,
                    };
                    let guest = SocketAddr::new(IpAddr::V4(services.guest_v4), guest_port);
                    let local = IpAddr::V4(services.gateway_v4);
                    opened |= services.tcp.open_inbound(
                        &ctx,
                        &mut self.iface,
                        &mut self.sockets,
                        stream,
                        local,
                        guest,
                    );
                }
                crate::ports::Inbound::Udp {
                    entry,
                    peer,
                    payload,
                } => {
                    let ports = services
                        .published
                        .as_mut()
                        .and_then(|p| p.datagram_to_guest(entry, peer, now, &services.metrics));
                    if let Some((from_port, guest_port)) = ports {
                        let ends = services.to_guest(
                            IpAddr::V4(services.gateway_v4),
                            IpAddr::V4(services.guest_v4),
                        );
                        let frame = frames::udp(&ends, from_port, guest_port, &payload);
                        services.queue(frame);
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
        let ra = self
            .services
            .ra
            .as_ref()
            .and_then(ndp::Advertiser::deadline)
            .map(|t| t.saturating_duration_since(now));
        let expiry = (!self.services.tcp.is_empty() || !self.services.udp.is_empty())
            .then(|| self.next_expiry.saturating_duration_since(now));
        [smol, ra, expiry].into_iter().flatten().min()
    }
}

/// The configured DNS upstreams, or the host's.
fn dns_upstreams(config: &Config) -> Vec<SocketAddr> {
    if config.dns.upstreams.is_empty() {
        crate::dns::intercept::host_resolvers()
    } else {
        config.dns.upstreams.iter().map(|r| r.0).collect()
    }
}

/// The sandbox's own subnets: internal for rebind protection.
fn own_networks(config: &Config) -> Vec<(IpAddr, u8)> {
    let net = &config.network;
    let mut own = vec![(IpAddr::V4(net.ipv4_gateway), net.ipv4_prefix_len)];
    if net.ipv6_enabled {
        own.push((IpAddr::V6(net.ipv6_prefix.addr), net.ipv6_prefix.len));
    }
    own
}

/// smoltcp's TCP initial sequence numbers and ports derive from this seed.
fn seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id())
}
