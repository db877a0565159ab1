//! Guest TCP flows on the engine side: the flow table, the held SYN, and
//! the host sockets the engine owns.
//!
//! Runs on the engine thread; never awaits. A guest SYN to a new
//! destination is held while a task dials; only a connected upstream makes
//! the engine open a listening smoltcp socket and replay the SYN into it, so
//! the guest's SYN-ACK means the far end is really there. A refused,
//! unreachable, timed-out or disallowed destination gets a RST at once.
//! Once connected, the engine owns the host socket (`pump`); local
//! services stay behind channels. The flow's slot is freed when its socket
//! closes or reaches TIME-WAIT, when it idles out, or when either side
//! resets.

mod pump;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};
use tokio::sync::mpsc::error::TryRecvError;

use super::Ctx;
use super::hostio::HostIo;
use crate::config::Tcp as TcpConfig;
use crate::egress::{ClaimRecord, Claimed};
use crate::metrics::{Counter, Metrics};
use crate::proxy::tcp::{FromHost, ToHost, spawn_outbound};
use crate::services::LocalService;
use pump::{Ends, HostSide, Owned, Traffic};

/// A flow: guest endpoint and the endpoint it talks to.
pub type Key = (SocketAddr, SocketAddr);

struct Flow {
    socket: Option<SocketHandle>,
    held_syn: Vec<u8>,
    syn_seq: u32,
    host: HostSide,
    ends: Ends,
    last_active: Instant,
    /// One poll has passed since the abort (its RST went out).
    abort_flushed: bool,
    /// The guest's bytes wait for name checks.
    gate: Option<super::gate::Gate>,
    opened: Instant,
    traffic: Traffic,
    /// For an egress flow, what its bytes were allowed for (a reload
    /// judges it again); None for inbound flows and DNS, which no policy
    /// decides.
    egress: Option<Claimed>,
}

impl Flow {
    fn new(host: HostSide, socket: Option<SocketHandle>, now: Instant) -> Self {
        Self {
            socket,
            held_syn: Vec::new(),
            syn_seq: 0,
            host,
            ends: Ends::default(),
            last_active: now,
            abort_flushed: false,
            gate: None,
            opened: now,
            traffic: Traffic::default(),
            egress: None,
        }
    }

    /// Makes the host see a reset, not a clean close.
    fn reset_host(&self) {
        match &self.host {
            // The task may be gone; then so is the connection.
            HostSide::Task { channels, .. } => {
                let _ = channels.to_host.try_send(ToHost::Reset);
            }
            HostSide::Owned(owned) => owned.reset(),
        }
    }
}

/// How a new flow reaches its far end.
pub enum Opener {
    /// Dial this address (the host mapping applied).
    Dial(SocketAddr),
    /// An in-process service answers instead (`services`).
    Local(LocalService),
}

/// What to do with a guest SYN.
#[derive(Debug, PartialEq, Eq)]
pub enum Syn {
    /// Taken: held for a new flow, or a retransmission of a held one.
    Held,
    /// The flow has a socket: let smoltcp see it.
    Pass,
    /// Refused: answer with a RST.
    Refuse,
}

/// Side effects of servicing flows, applied by the engine.
#[derive(Default)]
pub struct Effects {
    /// Frames to feed to smoltcp (released SYNs).
    pub inject: Vec<Vec<u8>>,
    /// SYNs to refuse: (guest endpoint, destination, SYN sequence).
    pub refuse: Vec<(SocketAddr, SocketAddr, u32)>,
    /// Whether any socket got data or a state change to send.
    pub progress: bool,
}

/// The TCP flow table.
pub struct Flows {
    flows: HashMap<Key, Flow>,
    config: TcpConfig,
    next_port: u16,
    /// Which flow each owned socket's token is.
    tokens: HashMap<u64, Key>,
    next_token: u64,
}

/// First ephemeral port for connections the gateway opens to the guest.
const EPHEMERAL_FIRST: u16 = 49_152;

impl Flows {
    /// An empty table.
    pub fn new(config: TcpConfig) -> Self {
        Self {
            flows: HashMap::new(),
            config,
            next_port: EPHEMERAL_FIRST,
            tokens: HashMap::new(),
            next_token: 0,
        }
    }

    /// Takes over a connected host socket for the flow `key`, watched in
    /// `io`. TCP tokens carry tag 0 (the datagram relays tag theirs).
    fn own(&mut self, io: &HostIo, stream: std::net::TcpStream, key: Key) -> Option<Owned> {
        let token = self.next_token & ((1 << super::sessions::TAG_SHIFT) - 1);
        self.next_token = self.next_token.wrapping_add(1);
        let owned = Owned::new(stream, token).ok()?;
        io.add(owned.stream.as_raw_fd(), token).ok()?;
        self.tokens.insert(token, key);
        Some(owned)
    }

    /// Records readiness of an owned socket.
    pub fn mark(&mut self, token: u64, ready: super::hostio::Readiness) {
        let flow = self.tokens.get(&token).and_then(|k| self.flows.get_mut(k));
        if let Some(Flow {
            host: HostSide::Owned(owned),
            ..
        }) = flow
        {
            owned.readable |= ready.readable;
            owned.writable |= ready.writable;
        }
    }

    /// Whether the flow (guest endpoint, other end) is in the table.
    pub fn holds(&self, key: &Key) -> bool {
        self.flows.contains_key(key)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Whether a SYN belongs to a flow that already exists (a retransmit
    /// or a SYN smoltcp must see), which keeps its first decision.
    pub fn has_socket_for(&self, kind: &super::classify::Kind<'_>) -> bool {
        match kind {
            super::classify::Kind::TcpSyn { src, dst, .. } => {
                self.flows.contains_key(&(*src, *dst))
            }
            _ => false,
        }
    }

    /// A guest SYN (`frame`) from `src` to `dst` with sequence `seq`, of a
    /// flow that is opened with `opener` (None: only a retransmission of a
    /// known flow is expected), with its claims when it is egress. A local service's task answers `Connected`
    /// like a dialled upstream; with `gate`, the guest's first bytes are
    /// checked before they go on.
    pub fn on_syn(
        &mut self,
        ctx: &Ctx<'_>,
        frame: &[u8],
        (src, dst): (SocketAddr, SocketAddr),
        seq: u32,
        opener: Option<(Opener, Option<Claimed>)>,
        gate: Option<super::gate::Gate>,
    ) -> Syn {
        let metrics = ctx.metrics;
        if let Some(flow) = self.flows.get_mut(&(src, dst)) {
            if flow.socket.is_some() {
                return Syn::Pass;
            }
            // A retransmitted SYN while dialling: keep the newest copy.
            flow.held_syn.clear();
            flow.held_syn.extend_from_slice(frame);
            flow.syn_seq = seq;
            return Syn::Held;
        }
        let Some((opener, egress)) = opener else {
            return Syn::Refuse;
        };
        if self.flows.len() >= self.config.max_connections {
            // Flows still dialling (a flood's SYNs to silent destinations
            // sit here for the whole connect timeout) give way to new ones,
            // oldest first; established flows never do. The evicted flow is
            // dropped without a reset, as if its SYN had been lost: a real
            // client retransmits and gets a new chance, and a flood's
            // resets would only crowd the guest's RX queue ahead of the
            // frames that matter.
            let oldest = self
                .flows
                .iter()
                .filter(|(_, f)| f.socket.is_none())
                .min_by_key(|(_, f)| f.last_active)
                .map(|(k, _)| *k);
            if oldest.and_then(|k| self.flows.remove(&k)).is_none() {
                metrics.inc(Counter::tcp_over_limit);
                return Syn::Refuse;
            }
            metrics.inc(Counter::tcp_dial_evicted);
        }
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let channels = match opener {
            Opener::Local(serve) => serve(ctx.host),
            Opener::Dial(upstream) => spawn_outbound(ctx.host, upstream, timeout),
        };
        metrics.inc(Counter::tcp_flows);
        let mut flow = Flow::new(HostSide::task(channels), None, ctx.now);
        flow.gate = gate;
        flow.egress = egress;
        flow.held_syn = frame.to_vec();
        flow.syn_seq = seq;
        self.flows.insert((src, dst), flow);
        Syn::Held
    }

    /// Opens a connection from the gateway (`local_ip`, an ephemeral port)
    /// to `guest` for an accepted host connection (a published port);
    /// returns the flow's key (guest, gateway endpoint) when opened.
    pub fn open_inbound(
        &mut self,
        ctx: &Ctx<'_>,
        iface: &mut smoltcp::iface::Interface,
        sockets: &mut SocketSet<'static>,
        stream: std::net::TcpStream,
        local_ip: IpAddr,
        guest: SocketAddr,
    ) -> Option<Key> {
        let metrics = ctx.metrics;
        if self.flows.len() >= self.config.max_connections {
            metrics.inc(Counter::tcp_over_limit);
            return None;
        }
        let port = self.free_port(local_ip, guest)?;
        let local = SocketAddr::new(local_ip, port);
        let mut socket = tcp_socket(self.config.buffer_bytes);
        if socket
            .connect(
                iface.context(),
                IpEndpoint::from(guest),
                IpEndpoint::from(local),
            )
            .is_err()
        {
            return None;
        }
        let owned = self.own(ctx.io, stream, (guest, local))?;
        let handle = sockets.add(socket);
        metrics.inc(Counter::tcp_inbound);
        self.flows.insert(
            (guest, local),
            Flow::new(HostSide::Owned(owned), Some(handle), ctx.now),
        );
        Some((guest, local))
    }

    fn free_port(&mut self, local_ip: IpAddr, guest: SocketAddr) -> Option<u16> {
        for _ in EPHEMERAL_FIRST..=u16::MAX {
            let port = self.next_port;
            self.next_port = if port == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                port + 1
            };
            if !self
                .flows
                .contains_key(&(guest, SocketAddr::new(local_ip, port)))
            {
                return Some(port);
            }
        }
        None
    }

    /// The egress flows a reload judges again: each one's key, what its
    /// bytes were allowed for, and whether its gate still reads them.
    /// Flows already going away are left to go.
    pub fn egress_flows(&self) -> Vec<(Key, Vec<ClaimRecord>, bool)> {
        self.flows
            .iter()
            .filter(|(_, f)| !f.ends.aborted)
            .filter_map(|(key, f)| {
                let claimed = f.egress.as_ref()?;
                Some((*key, claimed.claims(), f.gate.is_some()))
            })
            .collect()
    }

    /// Resets the flow `key` both ways: an open socket is aborted (its RST
    /// goes out at the next poll) and the host side reset; a flow still
    /// dialling is dropped, and its SYN's sequence returned for the caller
    /// to refuse.
    pub fn reset(&mut self, key: &Key, sockets: &mut SocketSet<'static>) -> Option<u32> {
        let flow = self.flows.get_mut(key)?;
        flow.reset_host();
        match flow.socket {
            Some(handle) => {
                sockets.get_mut::<tcp::Socket>(handle).abort();
                flow.ends.aborted = true;
                None
            }
            None => self.flows.remove(key).map(|f| f.syn_seq),
        }
    }

    /// Every flow as the operator sees it, in no particular order.
    pub fn report<'a>(
        &'a self,
        sockets: &'a SocketSet<'static>,
        now: Instant,
    ) -> impl Iterator<Item = super::report::Flow> + 'a {
        use super::report::{Flow, FlowState};
        self.flows.iter().map(move |(&(guest, remote), flow)| {
            let state = match flow.socket {
                _ if flow.ends.aborted => FlowState::Closing,
                None => FlowState::Connecting,
                Some(handle) => match sockets.get::<tcp::Socket>(handle).state() {
                    State::Listen | State::SynSent | State::SynReceived => FlowState::Connecting,
                    State::Established => FlowState::Established,
                    _ => FlowState::Closing,
                },
            };
            Flow {
                proto: "tcp",
                guest,
                remote,
                name: None,
                state,
                bytes_from_guest: flow.traffic.from_guest,
                bytes_to_guest: flow.traffic.to_guest,
                age_ms: duration_ms(now.saturating_duration_since(flow.opened)),
                pair: 0,
            }
        })
    }

    /// Moves data and state between sockets and host sides; drops
    /// finished flows.
    pub fn service(
        &mut self,
        io: &HostIo,
        sockets: &mut SocketSet<'static>,
        metrics: &Metrics,
        now: Instant,
        effects: &mut Effects,
    ) {
        let limits = (
            Duration::from_secs(self.config.idle_timeout_seconds),
            Duration::from_millis(self.config.connect_timeout_ms),
        );
        let mut finished: Vec<Key> = Vec::new();
        let keys: Vec<Key> = self.flows.keys().copied().collect();
        for key in keys {
            let Some(flow) = self.flows.get_mut(&key) else {
                continue;
            };
            let Some(handle) = flow.socket else {
                self.connecting(io, key, sockets, (metrics, now), effects, &mut finished);
                continue;
            };
            let socket = sockets.get_mut::<tcp::Socket>(handle);
            if pump::pump(
                &mut flow.host,
                &mut flow.gate,
                &mut flow.ends,
                &mut flow.traffic,
                socket,
            ) {
                flow.last_active = now;
                effects.progress = true;
            }
            // An aborted socket stays one more poll so smoltcp sends its RST;
            // removed right away, the guest would never hear of the reset.
            if flow.ends.aborted {
                flow.reset_host();
                if flow.abort_flushed {
                    finished.push(key);
                } else {
                    flow.abort_flushed = true;
                    effects.progress = true;
                }
                continue;
            }
            let (stalled, idle_out) = pump::expired(socket, flow.last_active, now, limits);
            if stalled || idle_out {
                if idle_out {
                    metrics.inc(Counter::tcp_idle_timeouts);
                }
                socket.abort();
                flow.ends.aborted = true;
                flow.reset_host();
                effects.progress = true;
                continue;
            }
            if matches!(socket.state(), State::Closed | State::TimeWait) {
                if !(flow.ends.fin_to_host && flow.ends.host_fin) {
                    // Not a clean close on both sides: the host must see a
                    // reset, not a FIN.
                    flow.reset_host();
                }
                finished.push(key);
            }
        }
        for key in finished {
            if let Some(flow) = self.flows.remove(&key) {
                if let Some(handle) = flow.socket {
                    sockets.remove(handle);
                }
                if let HostSide::Owned(owned) = &flow.host {
                    self.tokens.remove(&owned.token);
                }
            }
        }
    }

    /// A flow whose host side is still dialling: its task's answer.
    fn connecting(
        &mut self,
        io: &HostIo,
        key: Key,
        sockets: &mut SocketSet<'static>,
        (metrics, now): (&Metrics, Instant),
        effects: &mut Effects,
        finished: &mut Vec<Key>,
    ) {
        let Some(flow) = self.flows.get_mut(&key) else {
            return;
        };
        let HostSide::Task { channels, .. } = &mut flow.host else {
            return;
        };
        let refused = match channels.from_host.try_recv() {
            Ok(FromHost::Connected(stream)) => {
                let mut socket = tcp_socket(self.config.buffer_bytes);
                let listen = IpListenEndpoint {
                    addr: Some(key.1.ip().into()),
                    port: key.1.port(),
                };
                if socket.listen(listen).is_err() {
                    true
                } else {
                    flow.socket = Some(sockets.add(socket));
                    tracing::debug!(src = %key.0, dst = %key.1, "upstream connected; SYN released");
                    effects.inject.push(std::mem::take(&mut flow.held_syn));
                    flow.last_active = now;
                    effects.progress = true;
                    // A dialled flow's socket is the engine's from now on.
                    if let Some(stream) = stream {
                        match self.own(io, stream, key) {
                            Some(owned) => {
                                if let Some(flow) = self.flows.get_mut(&key) {
                                    flow.host = HostSide::Owned(owned);
                                }
                            }
                            None => {
                                if let Some(flow) = self.flows.get_mut(&key) {
                                    flow.ends.aborted = true;
                                }
                            }
                        }
                    }
                    false
                }
            }
            Ok(FromHost::Failed(kind)) => {
                tracing::debug!(dst = %key.1, ?kind, "upstream connect failed");
                metrics.inc(Counter::tcp_connect_failed);
                true
            }
            Ok(_) | Err(TryRecvError::Disconnected) => true,
            Err(TryRecvError::Empty) => false,
        };
        if refused && let Some(flow) = self.flows.get(&key) {
            tracing::debug!(src = %key.0, dst = %key.1, "held SYN refused");
            effects.refuse.push((key.0, key.1, flow.syn_seq));
            finished.push(key);
        }
    }
}

fn tcp_socket(buffer_bytes: usize) -> tcp::Socket<'static> {
    // The guest's own stack does its coalescing; a proxy adding Nagle or
    // delayed ACKs only adds round trips.
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buffer_bytes]),
        tcp::SocketBuffer::new(vec![0; buffer_bytes]),
    );
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    socket
}

/// Whole milliseconds, saturating.
pub(super) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
