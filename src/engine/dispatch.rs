//! The engine's dispatch of guest frames before smoltcp: classify → police
//! → route (pure steps, table-tested in their modules), then the route is
//! carried out here: held SYNs, relays, DHCP, router advertisements, DNS
//! interception, published-port replies. Also what goes back to the guest
//! outside smoltcp: RSTs for refused SYNs, relayed replies, queued frames.
//!
//! Engine thread only; never awaits.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;

use super::guest::{Guest, lock};
use super::police::{self, Facts, Subject, Verdict};
use super::route::{self, Open, Route, Setup};
use super::steer::{self, FlowKey, Owner};
use super::{Ctx, classify, device, dhcp, dns, frames, gate, icmp, ndp, publish, reasm, tcp, udp};
use crate::egress::Claimed;
use crate::metrics::{Counter, Metrics};
use crate::names::NameSource;
use crate::policy::Proto;
use crate::proxy::Host;

/// How often smoltcp is reminded of a guest address (its neighbor
/// entries age out after a minute).
const TEACH_EVERY: Duration = Duration::from_secs(20);
/// Guest addresses remembered for that; cleared when full.
const TAUGHT_MAX: usize = 64;
/// How often a denied UDP or ICMP destination is audited at most.
const AUDIT_REPEAT: Duration = Duration::from_secs(1);
/// Destinations remembered for that; the memory is cleared when full.
const AUDIT_MEMORY: usize = 4096;

/// Everything that sees guest frames before smoltcp, and what it queues.
pub struct Gateway {
    pub(super) setup: Setup,
    /// Which queue pair this is.
    pub(super) pair: usize,
    pub(super) gateway_mac: EthernetAddress,
    pub(super) guest_mac: EthernetAddress,
    pub(super) tcp: tcp::Flows,
    pub(super) udp: udp::Sessions,
    pub(super) icmp: icmp::Sessions,
    /// Frames for the guest waiting for RX buffers.
    pub(super) pending: device::ToGuest,
    /// Where frames are captured.
    pub(super) tap: std::sync::Arc<crate::pcap::Tap>,
    /// Frames for smoltcp (SYNs released once their upstream connected).
    pub(super) inject: VecDeque<Vec<u8>>,
    pub(super) host: Host,
    /// The host sockets the engine owns (flows' and sessions').
    pub(super) io: super::hostio::HostIo,
    pub(super) metrics: Arc<Metrics>,
    pub(super) published: Option<publish::Published>,
    pub(super) dns: dns::Interceptor,
    /// What all pairs share: DHCP, RA, DNS state, the local services and
    /// the egress boundary, the steering directory.
    pub(super) guest: Arc<Guest>,
    /// When each denied destination was last audited (UDP and ICMP repeat).
    pub(super) audit_logged: HashMap<Subject, Instant>,
    /// Guest source addresses smoltcp was told about, and when.
    pub(super) taught: HashMap<std::net::IpAddr, Instant>,
    pub(super) gateway_v4: std::net::Ipv4Addr,
    pub(super) guest_v4: std::net::Ipv4Addr,
    /// The guest's fragmented datagrams being put back together.
    pub(super) fragments: super::reasm::Reassembler,
    /// The guest's MTU: larger datagrams go to it in fragments.
    pub(super) ip_mtu: usize,
    /// Identification of the next datagram the gateway fragments.
    pub(super) next_ip_id: u32,
}

impl Gateway {
    /// Offers a guest frame to the services; true when one of them took it
    /// (or another queue pair, which owns its flow: see [`steer`]).
    /// `steered`: the frame was handed here by another pair, so it stays.
    pub fn intercept(&mut self, frame: &[u8], now: Instant, steered: bool) -> bool {
        if let Some(src) = frame.get(6..12).and_then(|b| <[u8; 6]>::try_from(b).ok()) {
            let mac = EthernetAddress(src);
            if mac.is_unicast() {
                self.guest_mac = mac;
            }
        }
        match self.fragments.offer(frame, now, &self.metrics) {
            reasm::Outcome::NotFragment => {}
            reasm::Outcome::Taken => return true,
            reasm::Outcome::Complete(whole) => {
                // The whole datagram takes the usual path. One that none
                // of the relays takes (a large ping to the gateway itself)
                // would reach smoltcp over the MTU: dropped instead.
                if !self.intercept(&whole, now, steered) {
                    self.metrics.inc(Counter::drop_fragment);
                }
                return true;
            }
        }
        if !steered && self.hand_over(frame) {
            return true;
        }
        self.teach(frame, now);
        let kind = classify::classify(frame, &self.setup.own);
        let facts = Facts {
            flow_exists: self.tcp.has_socket_for(&kind),
            published_session: match &kind {
                classify::Kind::Udp { dst, .. } => {
                    self.setup.own.is_own(dst.ip())
                        && self
                            .published
                            .as_ref()
                            .is_some_and(|p| p.is_session_port(dst.port()))
                }
                _ => false,
            },
        };
        let egress = self.guest.services.egress().clone();
        let verdict = police::police(&kind, facts, &egress.rules().policy, |dst| {
            egress.pinned(dst, now)
        });
        self.count(&verdict, now);
        let route = route::route(&kind, &verdict, facts, &self.setup);
        self.apply(&kind, route, verdict, frame, now)
    }

    /// Hands a frame to the pair that owns its flow; true when handed.
    /// Frames of flows this pair holds never take the directory's lock.
    fn hand_over(&mut self, frame: &[u8]) -> bool {
        let Some(steer) = self.guest.steer.as_ref() else {
            return false;
        };
        let Some(key) = steer::key(frame) else {
            return false;
        };
        if self.holds(&key) {
            return false;
        }
        match steer.claim(key, self.pair, &self.metrics) {
            Owner::Here => false,
            Owner::Pair(owner) => {
                steer.hand_over(owner, frame, &self.metrics);
                true
            }
        }
    }

    /// Whether this pair holds state for a flow.
    pub(super) fn holds(&self, key: &FlowKey) -> bool {
        match *key {
            FlowKey::Tcp(guest, remote) => self.tcp.holds(&(guest, remote)),
            FlowKey::Udp(guest, dst) => {
                self.udp.holds(&(guest, dst))
                    || (self.setup.own.is_own(dst.ip())
                        && self
                            .published
                            .as_ref()
                            .is_some_and(|p| p.is_session_port(dst.port())))
            }
            FlowKey::Echo(guest, dst, ident) => self.icmp.holds(&(guest, dst, ident)),
        }
    }

    /// Keeps smoltcp's neighbor cache knowing each address the guest sends
    /// from: its IPv4 lease and every IPv6 source. The gateway answers the
    /// guest's solicitations itself (as a router), and the guest learns the
    /// gateway from its RAs, so smoltcp would otherwise learn the guest
    /// only by asking — dropping the reply (a SYN-ACK, an echo reply) that
    /// made it ask. With several queue pairs each pair's stack must learn
    /// it from the frames it sees: the guest's answer to one pair's query
    /// may well go out on another pair's queue, and never reach it.
    fn teach(&mut self, frame: &[u8], now: Instant) {
        let src = match ndp::ipv6_source(frame) {
            Some(v6) => std::net::IpAddr::V6(v6),
            None if ipv4_source(frame) == Some(self.guest_v4) => self.guest_v4.into(),
            None => return,
        };
        let fresh = self
            .taught
            .get(&src)
            .is_some_and(|t| now.saturating_duration_since(*t) < TEACH_EVERY);
        if fresh {
            return;
        }
        if self.taught.len() >= TAUGHT_MAX {
            self.taught.clear();
        }
        self.taught.insert(src, now);
        let learned = match src {
            std::net::IpAddr::V6(v6) => {
                let own = crate::wellknown::GATEWAY_LINK_LOCAL;
                ndp::learned(v6, self.guest_mac, own, self.gateway_mac)
            }
            std::net::IpAddr::V4(v4) => {
                frames::arp_learned(v4, self.guest_mac, self.gateway_v4, self.gateway_mac)
            }
        };
        self.inject.push_back(learned);
    }

    /// Counts a verdict and audits a deny (repeats of a UDP/ICMP
    /// destination at most once per [`AUDIT_REPEAT`]).
    fn count(&mut self, verdict: &Verdict, now: Instant) {
        let (subject, denied, name) = match verdict {
            Verdict::Allow((Proto::Tcp, ..)) => {
                self.metrics.inc(Counter::policy_allowed);
                return;
            }
            Verdict::Deny {
                subject,
                denied,
                name,
            } => (*subject, *denied, name.as_deref()),
            _ => return,
        };
        let quiet = subject.0 != Proto::Tcp
            && self
                .audit_logged
                .get(&subject)
                .is_some_and(|t| now.saturating_duration_since(*t) < AUDIT_REPEAT);
        if quiet {
            self.metrics.inc(Counter::policy_denied);
            self.guest.services.egress().count_rule(denied);
            return;
        }
        if self.audit_logged.len() >= AUDIT_MEMORY {
            self.audit_logged.clear();
        }
        self.audit_logged.insert(subject, now);
        let (proto, dst, port) = subject;
        let name = name.map(|n| (n, NameSource::Dns));
        self.guest
            .services
            .egress()
            .deny(proto, dst, port, name, denied);
    }

    /// Carries out a route; true when the frame was taken (not smoltcp's).
    fn apply(
        &mut self,
        kind: &classify::Kind<'_>,
        route: Route,
        verdict: Verdict,
        frame: &[u8],
        now: Instant,
    ) -> bool {
        use classify::Kind;
        match (route, kind) {
            (Route::Stack, _) => false,
            (Route::Existing, Kind::TcpSyn { src, dst, seq }) => {
                self.syn(now, frame, (*src, *dst, *seq), None, None)
            }
            (Route::Refuse(counter), Kind::TcpSyn { src, dst, seq }) => {
                if let Some(c) = counter {
                    self.metrics.inc(c);
                }
                self.refuse(*src, *dst, *seq);
                true
            }
            (Route::Open(open), Kind::TcpSyn { src, dst, seq }) => {
                // Egress flows keep what their bytes were allowed for: a
                // reload judges them again on it.
                let claimed = Claimed::default();
                let (opener, gate) = match open {
                    Open::Dial(up) => (tcp::Opener::Dial(up), None),
                    Open::Gate(up) => {
                        let names = match verdict {
                            Verdict::Peek(names) => names,
                            _ => Vec::new(),
                        };
                        let egress = self.guest.services.egress().clone();
                        let gate = gate::Gate::new(names, egress, *dst, claimed.clone());
                        (tcp::Opener::Dial(up), Some(gate))
                    }
                    Open::FirstBytes(up) => (
                        tcp::Opener::Local(self.guest.services.first_bytes(
                            *dst,
                            up,
                            claimed.clone(),
                        )),
                        None,
                    ),
                    Open::Tls(up) => match self.guest.services.tls(*dst, up, claimed.clone()) {
                        Some(local) => (tcp::Opener::Local(local), None),
                        None => {
                            self.refuse(*src, *dst, *seq);
                            return true;
                        }
                    },
                    Open::DnsTcp => (tcp::Opener::Local(self.guest.services.dns_over_tcp()), None),
                    Open::DnsTls => match self.guest.services.dns_over_tls(*dst) {
                        Some(local) => (tcp::Opener::Local(local), None),
                        None => {
                            self.refuse(*src, *dst, *seq);
                            return true;
                        }
                    },
                };
                if matches!(open, Open::Dial(_)) && tracing::enabled!(tracing::Level::DEBUG) {
                    let names = self.guest.services.egress().pinned(dst.ip(), now);
                    let name = names.first().map_or("-", String::as_str);
                    tracing::debug!(%src, %dst, name, pair = self.pair, "new TCP flow");
                }
                let egress = (!matches!(open, Open::DnsTcp | Open::DnsTls)).then_some(claimed);
                self.syn(now, frame, (*src, *dst, *seq), Some((opener, egress)), gate)
            }
            (Route::Drop(counter), _) => {
                if let Some(c) = counter {
                    self.metrics.inc(c);
                }
                true
            }
            (Route::Dhcp, Kind::Dhcp { payload }) => {
                let outcome = lock(&self.guest.dhcp).handle(payload, now);
                match outcome {
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
            (Route::RouterSolicit, _) => {
                let reply = lock(&self.guest.ra)
                    .as_mut()
                    .and_then(|ra| ra.solicited(now));
                if let Some(reply) = reply {
                    self.metrics.inc(Counter::router_adverts);
                    self.queue(reply);
                }
                true
            }
            (Route::NeighborSolicit, Kind::NeighborSolicit { src, target }) => {
                let reply = ndp::neighbor_advert(self.gateway_mac, *src, self.guest_mac, *target);
                self.queue(reply);
                true
            }
            (Route::PublishedReply, Kind::Udp { dst, payload, .. }) => {
                if let Some(p) = self.published.as_mut() {
                    p.datagram_from_guest(dst.port(), payload, now, &self.metrics);
                }
                true
            }
            (Route::DnsQuery, Kind::Udp { src, dst, payload }) => {
                let refusal = self
                    .dns
                    .query(&self.host, &self.metrics, *src, *dst, payload);
                if let Some(refusal) = refusal {
                    let ends = self.to_guest(dst.ip(), src.ip());
                    self.queue(frames::udp(&ends, dst.port(), src.port(), &refusal));
                }
                true
            }
            (Route::Udp, Kind::Udp { src, dst, payload }) => {
                let ctx = Ctx::new(&self.host, &self.io, &self.metrics, &self.setup, now);
                self.udp.send(&ctx, *src, *dst, payload);
                true
            }
            (Route::Echo, Kind::Echo(echo)) => {
                let ctx = Ctx::new(&self.host, &self.io, &self.metrics, &self.setup, now);
                self.icmp.send(&ctx, echo);
                true
            }
            // A route for another kind of frame: route() never makes one.
            _ => true,
        }
    }

    /// Hands a SYN to the flow table; true when taken.
    fn syn(
        &mut self,
        now: Instant,
        frame: &[u8],
        (src, dst, seq): (SocketAddr, SocketAddr, u32),
        opener: Option<(tcp::Opener, Option<Claimed>)>,
        gate: Option<gate::Gate>,
    ) -> bool {
        let ctx = Ctx::new(&self.host, &self.io, &self.metrics, &self.setup, now);
        match self.tcp.on_syn(&ctx, frame, (src, dst), seq, opener, gate) {
            tcp::Syn::Held => true,
            tcp::Syn::Pass => false,
            tcp::Syn::Refuse => {
                self.refuse(src, dst, seq);
                true
            }
        }
    }

    pub(super) fn to_guest(&self, from: IpAddr, to: IpAddr) -> frames::Ends {
        ends((self.gateway_mac, self.guest_mac), from, to)
    }

    pub(super) fn refuse(&mut self, guest: SocketAddr, remote: SocketAddr, seq: u32) {
        let ends = self.to_guest(remote.ip(), guest.ip());
        let rst = frames::tcp_reset_for_syn(&ends, remote.port(), guest.port(), seq);
        self.metrics.inc(Counter::tcp_resets_sent);
        self.queue(rst);
    }

    /// Queues a frame for the guest; a datagram over the guest's MTU goes
    /// in fragments, all or none.
    pub(super) fn queue(&mut self, frame: Vec<u8>) {
        let now = Instant::now();
        if frame.len() > self.ip_mtu + crate::virtio::ETH_HDR_LEN
            && let Some(pieces) = reasm::fragment(&frame, self.ip_mtu, self.next_ip_id)
        {
            self.next_ip_id = self.next_ip_id.wrapping_add(1);
            if self.pending.room() < pieces.len() {
                self.metrics.inc(Counter::drop_pending_full);
                return;
            }
            self.metrics
                .add(Counter::fragments_to_guest, pieces.len() as u64);
            for piece in pieces {
                self.pending.push(piece, now, &self.metrics);
            }
            return;
        }
        self.pending.push(frame, now, &self.metrics);
    }

    pub(super) fn has_room(&self) -> bool {
        self.pending.has_room()
    }

    pub(super) fn timers(&mut self, now: Instant) {
        // Periodic advertisements go out once, on the first pair.
        if self.pair != 0 {
            return;
        }
        let frame = lock(&self.guest.ra)
            .as_mut()
            .and_then(|ra| ra.periodic(now));
        if let Some(frame) = frame {
            self.metrics.inc(Counter::router_adverts);
            self.queue(frame);
        }
    }

    /// Replies from the UDP, DNS and ICMP relays, as far as there is room.
    /// They only wait for RX buffers: queued, they need no new poll.
    pub(super) fn relay_replies(&mut self, now: Instant) {
        self.drain(|gw| {
            // The reply borrows the session table's buffer: frame it
            // before anything else of the gateway is touched.
            let (macs, udp) = ((gw.gateway_mac, gw.guest_mac), &mut gw.udp);
            let (guest, remote, payload) = udp.next_reply(now, &gw.metrics)?;
            let ends = ends(macs, remote.ip(), guest.ip());
            Some(frames::udp(&ends, remote.port(), guest.port(), payload))
        });
        self.drain(|gw| {
            let (guest, asked, answer) = gw.dns.next_answer()?;
            let ends = gw.to_guest(asked.ip(), guest.ip());
            Some(frames::udp(&ends, asked.port(), guest.port(), &answer))
        });
        self.drain(|gw| {
            let (macs, icmp) = ((gw.gateway_mac, gw.guest_mac), &mut gw.icmp);
            let (guest, remote, ident, seq, data) = icmp.next_reply(now, &gw.metrics)?;
            let ends = ends(macs, remote, guest);
            Some(frames::echo_reply(&ends, ident, seq, data))
        });
    }

    /// Queues the frames `next` builds while fewer than
    /// [`RELAYED_WAITING`] frames wait.
    fn drain(&mut self, mut next: impl FnMut(&mut Self) -> Option<Vec<u8>>) {
        while self.pending.len() < RELAYED_WAITING {
            let Some(frame) = next(self) else {
                break;
            };
            self.queue(frame);
        }
    }
}

/// Relayed datagrams (UDP and echo replies, DNS answers) are queued for the
/// guest only while fewer frames than this wait. smoltcp's frames go out
/// only once every waiting frame is written (the guest sees one order), so
/// a reply stream that kept the queue full would hold a TCP handshake back
/// for as long as the stream lasts; a short queue lets smoltcp in each time
/// the guest frees buffers, and is still deeper than one burst of RX
/// buffers. What is left waits in the session sockets (and the kernel's
/// receive buffers) and the answer channel.
const RELAYED_WAITING: usize = 64;

/// The ends of a frame from the gateway (`macs`: gateway's, guest's).
fn ends(
    (gateway, guest): (EthernetAddress, EthernetAddress),
    from: IpAddr,
    to: IpAddr,
) -> frames::Ends {
    frames::Ends {
        src_mac: gateway,
        dst_mac: guest,
        src: from,
        dst: to,
        hop_limit: 64,
    }
}

/// The IPv4 source of a frame, when it is an IPv4 packet.
fn ipv4_source(frame: &[u8]) -> Option<std::net::Ipv4Addr> {
    const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
    if frame.get(12..14)? != ETHERTYPE_IPV4 {
        return None;
    }
    Some(<[u8; 4]>::try_from(frame.get(26..30)?).ok()?.into())
}
