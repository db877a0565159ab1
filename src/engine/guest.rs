//! What the queue pairs of one guest share: its DHCP lease and router
//! advertisements (answered on whichever pair asks), its DNS state (pins
//! and the forwarder making them) with the egress boundary and local
//! services over it, and, with more than one pair, the steering of flows
//! between them ([`steer`]). Built once per device (VMM connection, device
//! reset); each pair's engine holds it.
//!
//! Everything here is reached from several worker threads: the DHCP server
//! and the advertiser behind their own locks (taken per DHCP or RS frame
//! and per RA period), the rest shared immutable or internally locked.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::classify::Own;
use super::{Shared, dhcp, ndp, route, steer};
use crate::config::Config;
use crate::dns::forward::Forwarder;
use crate::dns::pins::Pins;
use crate::egress::Egress;
use crate::proxy::Wake;
use crate::services::Services;
use crate::wellknown::GATEWAY_LINK_LOCAL;

/// The shared state of one guest.
pub struct Guest {
    /// What does not change between frames.
    pub(super) setup: route::Setup,
    pub(super) dhcp: Mutex<dhcp::Server>,
    /// Router advertisements (periodic ones go out on pair 0).
    pub(super) ra: Mutex<Option<ndp::Advertiser>>,
    pub(super) forwarder: Arc<Forwarder>,
    /// The local services and, through them, the egress boundary.
    pub(super) services: Services,
    /// Which pair owns each flow; None with one pair.
    pub(super) steer: Option<steer::Steer>,
    /// Each pair's wake and its inbox of operator requests.
    pub(super) wakes: Vec<Arc<Wake>>,
    pub(super) inboxes: Vec<super::report::Inbox>,
    /// The names the guest resolved (shared with the forwarder).
    pub(super) pins: Arc<Pins>,
    /// Per pair: when its current pass began (report::stamp), 0 between
    /// passes.
    pub(super) busy: Vec<std::sync::atomic::AtomicU64>,
}

/// Locks one of the guest's parts. A pair that panicked holding it left
/// state that is still structurally valid: go on with it.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Guest {
    /// The shared state of a guest whose queue pairs are woken by `wakes`
    /// (one per pair, in order).
    pub fn new(shared: &Shared, wakes: Vec<Arc<Wake>>) -> Arc<Self> {
        let config = &*shared.config;
        let net = &config.network;
        let pins = Arc::new(Pins::new(config.dns.max_pins));
        let forwarder = Forwarder::new(
            &config.dns,
            dns_upstreams(config),
            pins.clone(),
            shared.rules.clone(),
        );
        let egress = Arc::new(Egress::new(
            shared.rules.clone(),
            pins.clone(),
            forwarder.clone(),
            shared.metrics.clone(),
        ));
        let connect_timeout = Duration::from_millis(config.tcp.connect_timeout_ms);
        let services = Services::new(egress, shared.tls.clone(), connect_timeout);
        let setup = route::Setup {
            own: Own {
                v4: net.ipv4_gateway,
                v6: net
                    .ipv6_enabled
                    .then_some((net.ipv6_gateway, GATEWAY_LINK_LOCAL)),
            },
            allow_host_loopback: config.outbound.allow_host_loopback,
            tls_ports: match &shared.tls {
                Some(_) => config.tls.ports.clone(),
                None => Vec::new(),
            },
            terminates_dot: services.terminates_dot(),
        };
        // Room for every flow and session the pairs may hold, twice over
        // (claims of frames that opened nothing linger until a sweep).
        let flows = config.tcp.max_connections + config.udp.max_sessions + config.icmp.max_sessions;
        let steer = (wakes.len() > 1).then(|| {
            let max = flows.saturating_mul(2).saturating_mul(wakes.len());
            steer::Steer::new(wakes.clone(), max)
        });
        let inboxes = wakes.iter().map(|_| Default::default()).collect();
        let busy = wakes.iter().map(|_| Default::default()).collect();
        Arc::new(Self {
            setup,
            dhcp: Mutex::new(dhcp::Server::new(net)),
            ra: Mutex::new(ndp::Advertiser::new(net)),
            forwarder,
            services,
            steer,
            wakes,
            inboxes,
            pins,
            busy,
        })
    }
}

/// The configured DNS upstreams, or the host's (read when a guest's state
/// is built, so a changed /etc/resolv.conf reaches the next guest).
fn dns_upstreams(config: &Config) -> Vec<SocketAddr> {
    if config.dns.upstreams.is_empty() {
        crate::dns::resolv::host_resolvers()
    } else {
        config.dns.upstreams.iter().map(|r| r.0).collect()
    }
}
