//! The engine's one door to the daemon's local services: flows the gateway
//! serves itself instead of dialling their destination. Each method returns
//! a [`LocalService`], which the engine starts when the flow's SYN is held
//! and which answers `Connected` like a dialled upstream:
//!
//! - [`first_bytes`]: a flow whose decision waits for its TLS SNI or HTTP
//!   Host;
//! - TLS interception on the configured ports, and DNS over TLS (853)
//!   terminated while interception is on (`tls`);
//! - DNS over TCP (port 53, any address), answered by the guest's forwarder.
//!
//! Built once per VMM connection; runs on the engine thread (it only builds
//! closures), the services themselves on tokio tasks.
#![forbid(unsafe_code)]

pub mod first_bytes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::dns::tcp::serve_stream;
use crate::egress::{Claimed, Egress, Target};
use crate::proxy::Host;
use crate::proxy::stream::spawn_local;
use crate::proxy::tcp::Channels;
use crate::tls::intercept::Interceptor;

/// An in-process service for one TCP flow: starts its task, returns the
/// engine's channel ends.
pub type LocalService = Box<dyn FnOnce(&Host) -> Channels>;

/// The local services of one guest.
pub struct Services {
    egress: Arc<Egress>,
    tls: Option<Arc<Interceptor>>,
    connect_timeout: Duration,
}

impl Services {
    /// Services deciding through `egress`, intercepting TLS with `tls` when
    /// it is on, dialling within `connect_timeout`.
    pub fn new(
        egress: Arc<Egress>,
        tls: Option<Arc<Interceptor>>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            egress,
            tls,
            connect_timeout,
        }
    }

    /// The egress boundary these services decide through.
    pub fn egress(&self) -> &Arc<Egress> {
        &self.egress
    }

    /// Whether TLS on `port` is intercepted (and QUIC to it dropped).
    pub fn intercepts(&self, port: u16) -> bool {
        self.tls.as_ref().is_some_and(|t| t.intercepts(port))
    }

    /// Whether DNS over TLS is terminated (interception is on).
    pub fn terminates_dot(&self) -> bool {
        self.tls.is_some()
    }

    fn target(&self, dst: SocketAddr, upstream: SocketAddr, claimed: Claimed) -> Target {
        Target {
            dst,
            upstream,
            connect_timeout: self.connect_timeout,
            egress: self.egress.clone(),
            claimed,
        }
    }

    /// A flow to `dst` (dialled at `upstream`) decided on its first bytes,
    /// which go into `claimed` once allowed.
    pub fn first_bytes(
        &self,
        dst: SocketAddr,
        upstream: SocketAddr,
        claimed: Claimed,
    ) -> LocalService {
        let target = self.target(dst, upstream, claimed);
        Box::new(move |host: &Host| first_bytes::spawn(target, host))
    }

    /// A flow to an intercepted port (its allowed names go into
    /// `claimed`); None when interception is off.
    pub fn tls(
        &self,
        dst: SocketAddr,
        upstream: SocketAddr,
        claimed: Claimed,
    ) -> Option<LocalService> {
        let tls = self.tls.clone()?;
        let target = self.target(dst, upstream, claimed);
        Some(Box::new(move |host: &Host| tls.spawn(host, target)))
    }

    /// DNS over TLS to `dst`, answered by the guest's forwarder; None when
    /// interception is off (then the flow is refused).
    pub fn dns_over_tls(&self, dst: SocketAddr) -> Option<LocalService> {
        let tls = self.tls.clone()?;
        let forwarder = self.egress.forwarder().clone();
        let metrics = self.egress.metrics().clone();
        Some(Box::new(move |host: &Host| {
            tls.spawn_dot(host, dst, forwarder, metrics)
        }))
    }

    /// DNS over TCP (any address), answered by the guest's forwarder.
    pub fn dns_over_tcp(&self) -> LocalService {
        let forwarder = self.egress.forwarder().clone();
        let metrics = self.egress.metrics().clone();
        Box::new(move |host: &Host| {
            spawn_local(host, move |mut guest, _| async move {
                if !serve_stream(&mut guest.io, &forwarder, &metrics).await {
                    // The guest broke the framing: reset, as a server would.
                    guest.reset().await;
                }
            })
        })
    }
}
