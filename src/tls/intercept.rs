//! TLS interception on the configured ports, and DNS-over-TLS termination,
//! as local services of the guest's TCP flows (the engine accepts the SYN;
//! the service decides what the flow becomes).
//!
//! A flow's first bytes are read (handshake budget). Not TLS, or TLS
//! without SNI: passed through by the policy without a name, or reset, as
//! configured. A TLS name is decided like any first-bytes name
//! (`proxy::check`); a deny completes the handshake with our leaf and
//! answers HTTP 403, a bypassed name is relayed untouched, and any other is
//! intercepted: the upstream TLS connection (same SNI, the guest's ALPN
//! offers, verified against the configured roots) is made first, so the
//! guest's handshake can carry the upstream's ALPN choice — or, when the
//! upstream fails, end with an alert (access_denied) instead of a
//! downgrade. For HTTP/1 the first request's Host is decided too. Then
//! plaintext is copied both ways.
//!
//! Shared by every VMM connection of the daemon (the CA and the leaf cache
//! outlive guests); one tokio task per flow.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::{LazyConfigAcceptor, StartHandshake, TlsConnector};

use super::certs::Authority;
use crate::config::{Fallback, Tls, UpstreamRoots};
use crate::egress::{Inspector, relay_inspected};
use crate::metrics::{Counter, Metrics};
use crate::names::NameSet;
use crate::names::NameSource;
use crate::policy::{Claim, Denied};
use crate::proxy::Host;
use crate::proxy::stream::{GuestStream, spawn_local};
use crate::proxy::tcp::Channels;
use crate::sniff::{FirstName, first_name};

const TLS_HANDSHAKE_RECORD: u8 = 22;

/// The interception service, shared by all flows.
pub struct Interceptor {
    authority: Authority,
    client: Arc<ClientConfig>,
    /// Fails a guest's handshake with an alert (no certificate).
    refuse: Arc<ServerConfig>,
    bypass: NameSet,
    ports: Vec<u16>,
    no_sni: Fallback,
    not_tls: Fallback,
    handshake: Duration,
}

/// Why interception could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The operator CA.
    #[error(transparent)]
    Ca(#[from] super::certs::CaError),
    /// Roots or TLS configuration.
    #[error("{0}")]
    Config(String),
}

#[derive(Debug)]
struct NoCertificate;

impl ResolvesServerCert for NoCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn;
    Ok(config)
}

impl Interceptor {
    /// From `[tls]` (enabled): loads the CA and the upstream roots.
    pub fn new(config: &Tls) -> Result<Self, SetupError> {
        let (Some(cert), Some(key)) = (&config.ca_cert, &config.ca_key) else {
            return Err(SetupError::Config(
                "tls.ca-cert and tls.ca-key are required".into(),
            ));
        };
        let authority = Authority::load(
            cert,
            key,
            config.leaf_validity_days,
            config.max_cached_certs,
        )?;
        let mut roots = rustls::RootCertStore::empty();
        match config.upstream_roots {
            UpstreamRoots::Webpki => {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            UpstreamRoots::System => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(SetupError::Config(format!(
                        "tls.upstream-roots = \"system\": no usable root certificate found ({} errors)",
                        found.errors.len()
                    )));
                }
            }
            UpstreamRoots::None => {}
        }
        if let Some(file) = &config.upstream_ca_file {
            for cert in super::certs::load_certs(file)? {
                roots
                    .add(cert)
                    .map_err(|e| SetupError::Config(format!("{}: {e}", file.display())))?;
            }
        }
        if roots.is_empty() {
            return Err(SetupError::Config(
                "no root verifies upstream servers: set tls.upstream-roots or tls.upstream-ca-file"
                    .into(),
            ));
        }
        let bad = |e: rustls::Error| SetupError::Config(e.to_string());
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(bad)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            authority,
            client: Arc::new(client),
            refuse: Arc::new(server_config(Arc::new(NoCertificate), Vec::new()).map_err(bad)?),
            bypass: NameSet::new(config.bypass.iter().map(String::as_str)),
            ports: config.ports.clone(),
            no_sni: config.no_sni,
            not_tls: config.not_tls,
            handshake: Duration::from_millis(config.handshake_timeout_ms),
        })
    }

    /// Leaf certificates cached now.
    pub fn cached_certs(&self) -> usize {
        self.authority.cached()
    }

    /// Whether TCP (and, for QUIC, UDP) to `port` is intercepted.
    pub fn intercepts(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    /// Serves a guest flow to `dst` on an intercepted port; `upstream` is
    /// where to dial (the host mapping applied).
    pub fn spawn(self: &Arc<Self>, host: &Host, flow: Flow) -> Channels {
        let this = self.clone();
        spawn_local(host, move |guest, host| async move {
            this.serve(guest, flow, &host).await;
        })
    }

    async fn serve(&self, mut guest: GuestStream, flow: Flow, host: &Host) {
        let metrics = flow.egress.metrics().clone();
        let Some((first, named)) = read_first(&mut guest.io, self.handshake).await else {
            return;
        };
        let is_tls = first.first() == Some(&TLS_HANDSHAKE_RECORD);
        let sni = match named {
            FirstName::Named(n, NameSource::Sni) if is_tls => n,
            // A hello that hides or doubles its name, or HTTP a server
            // could read otherwise: refused, whatever the fallbacks say.
            FirstName::Unreadable(_) => {
                let mut inspector = Inspector::new(flow.clone());
                let _ = inspector.pass(&first, true).await;
                metrics.inc(Counter::tls_refused);
                guest.reset().await;
                return;
            }
            _ => {
                let fallback = if is_tls { self.no_sni } else { self.not_tls };
                if fallback == Fallback::Refuse {
                    metrics.inc(Counter::tls_refused);
                    guest.reset().await;
                    return;
                }
                // Decided like any first-bytes flow, every later HTTP
                // request included.
                let mut inspector = Inspector::new(flow.clone());
                let Ok(cleared) = inspector.pass(&first, false).await else {
                    guest.reset().await;
                    return;
                };
                metrics.inc(Counter::tls_passed_through);
                relay_raw(guest, cleared, &flow, host, Some(inspector)).await;
                return;
            }
        };
        if let Err(denied) = flow.decide(Claim::Named(&sni, NameSource::Sni)).await {
            self.forbid(guest, first, &sni, denied, &metrics).await;
            return;
        }
        if self.bypass.contains(&sni) {
            metrics.inc(Counter::tls_bypassed);
            relay_raw(guest, first, &flow, host, None).await;
            return;
        }
        self.intercept(guest, first, sni, flow, host).await;
    }

    /// Completes the guest's handshake with our leaf and answers 403.
    async fn forbid(
        &self,
        guest: GuestStream,
        first: Vec<u8>,
        name: &str,
        (rule, reason): Denied,
        metrics: &Metrics,
    ) {
        let Some(start) = self.hello(guest, first).await else {
            return;
        };
        let offers_http1 = start
            .client_hello()
            .alpn()
            .is_none_or(|mut offers| offers.any(|p| p == b"http/1.1"));
        let alpn = if offers_http1 {
            vec![b"http/1.1".to_vec()]
        } else {
            Vec::new()
        };
        let Some(mut tls) = self.accept(start, name, alpn, metrics).await else {
            return;
        };
        metrics.inc(Counter::tls_denied_403);
        let why = match (reason, rule) {
            (crate::audit::Reason::Policy, Some(rule)) => format!("denied by rule {rule}"),
            (crate::audit::Reason::Policy, None) => "denied by the default".to_owned(),
            (other, _) => other.as_str().to_owned(),
        };
        let _ = tls.write_all(&forbidden(name, &why)).await;
        let _ = tls.shutdown().await;
    }

    /// Reads the guest's ClientHello (again, from `first` on).
    async fn hello(&self, guest: GuestStream, first: Vec<u8>) -> Option<StartHandshake<Prefixed>> {
        let acceptor = LazyConfigAcceptor::new(Acceptor::default(), Prefixed::new(first, guest));
        match tokio::time::timeout(self.handshake, acceptor).await {
            Ok(Ok(start)) => Some(start),
            _ => None,
        }
    }

    /// Finishes the guest's handshake with the leaf for `name`.
    async fn accept(
        &self,
        start: StartHandshake<Prefixed>,
        name: &str,
        alpn: Vec<Vec<u8>>,
        metrics: &Metrics,
    ) -> Option<tokio_rustls::server::TlsStream<Prefixed>> {
        let leaf = match self.authority.leaf(name) {
            Ok((leaf, minted)) => {
                if minted {
                    metrics.inc(Counter::tls_leaf_minted);
                }
                leaf
            }
            Err(e) => {
                tracing::warn!(error = %e, "no leaf certificate");
                let _ = start.into_stream(self.refuse.clone()).await;
                return None;
            }
        };
        let config = server_config(Arc::new(Fixed(leaf)), alpn).ok()?;
        match tokio::time::timeout(self.handshake, start.into_stream(Arc::new(config))).await {
            Ok(Ok(tls)) => Some(tls),
            _ => None,
        }
    }

    async fn intercept(
        &self,
        guest: GuestStream,
        first: Vec<u8>,
        sni: String,
        flow: Flow,
        host: &Host,
    ) {
        let metrics = flow.egress.metrics().clone();
        let Some(start) = self.hello(guest, first).await else {
            return;
        };
        // HTTP/2 is not offered upstream: its requests' :authority would
        // go undecided, while every HTTP/1 request's host is decided. The
        // upstream then picks HTTP/1.1 (or nothing), and so does the guest.
        let offers: Vec<Vec<u8>> = start
            .client_hello()
            .alpn()
            .map(|offers| offers.filter(|p| *p != b"h2").map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        let upstream = match self.connect_upstream(&sni, offers, &flow, host).await {
            Ok(upstream) => upstream,
            Err(error) => {
                metrics.inc(Counter::tls_upstream_failed);
                tracing::warn!(
                    dst = %flow.dst, name = %sni, %error,
                    "upstream TLS failed; failing the guest's handshake"
                );
                let _ = start.into_stream(self.refuse.clone()).await;
                return;
            }
        };
        let chosen = upstream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let Some(mut tls) = self
            .accept(start, &sni, chosen.clone().into_iter().collect(), &metrics)
            .await
        else {
            return;
        };
        metrics.inc(Counter::tls_intercepted);
        let mut upstream = upstream;
        // Every HTTP/1 request inside is decided by its host.
        let mut inspector = Inspector::inside_named(flow);
        if let Err(refusal) = relay_inspected(&mut tls, &mut upstream, &mut inspector).await {
            metrics.inc(Counter::tls_denied_403);
            let name = refusal.name.as_deref().unwrap_or(&sni);
            let _ = tls
                .write_all(&forbidden(name, refusal.denied.1.as_str()))
                .await;
            let _ = tls.shutdown().await;
        }
    }

    async fn connect_upstream(
        &self,
        sni: &str,
        alpn: Vec<Vec<u8>>,
        flow: &Flow,
        host: &Host,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let name = ServerName::try_from(sni.to_owned()).map_err(|e| e.to_string())?;
        let tcp =
            match tokio::time::timeout(flow.connect_timeout, host.upstream.connect(flow.upstream))
                .await
            {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(format!("connect: {e}")),
                Err(_) => return Err("connect: timed out".into()),
            };
        let mut config = (*self.client).clone();
        config.alpn_protocols = alpn;
        let connector = TlsConnector::from(Arc::new(config));
        match tokio::time::timeout(self.handshake, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("handshake timed out".into()),
        }
    }

    /// Terminates DNS over TLS from the guest: the queries go through the
    /// forwarder like any other (block list, policy, pins).
    pub fn spawn_dot(
        self: &Arc<Self>,
        host: &Host,
        dst: SocketAddr,
        forwarder: Arc<crate::dns::forward::Forwarder>,
        metrics: Arc<Metrics>,
    ) -> Channels {
        let this = self.clone();
        spawn_local(host, move |guest, _| async move {
            let Some(start) = this.hello(guest, Vec::new()).await else {
                return;
            };
            // Strict DoT clients check the name they asked for;
            // opportunistic ones take whatever: the SNI, else the address.
            let name = start
                .client_hello()
                .server_name()
                .map_or_else(|| dst.ip().to_string(), str::to_owned);
            let Some(mut tls) = this
                .accept(start, &name, vec![b"dot".to_vec()], &metrics)
                .await
            else {
                return;
            };
            metrics.inc(Counter::dns_tls_terminated);
            crate::dns::tcp::serve_stream(&mut tls, &forwarder, &metrics).await;
        })
    }
}

/// One intercepted flow: the same parts as a flow decided on its first
/// bytes.
pub use crate::egress::Target as Flow;

/// Reads the flow's beginning until it names itself or shows it will not,
/// within `budget`; None when the guest left without a byte. Nothing in
/// time is a server-speaks-first protocol (no name); a prefix of a name
/// that stalls is unreadable.
async fn read_first(
    io: &mut tokio::io::DuplexStream,
    budget: Duration,
) -> Option<(Vec<u8>, FirstName)> {
    let deadline = tokio::time::Instant::now() + budget;
    let mut first = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(read) => read.ok()?,
            Err(_) if first.is_empty() => return Some((first, FirstName::Unnamed)),
            Err(_) => return Some((first, FirstName::Unreadable("stalled before naming"))),
        };
        if n == 0 && first.is_empty() {
            return None;
        }
        first.extend_from_slice(buf.get(..n).unwrap_or_default());
        match first_name(&first, n == 0) {
            FirstName::Wait => {}
            named => return Some((first, named)),
        }
    }
}

/// Relays a flow to its destination, its first bytes first; the guest's
/// later bytes through `inspector` when there is one (a refusal resets).
async fn relay_raw(
    guest: GuestStream,
    first: Vec<u8>,
    flow: &Flow,
    host: &Host,
    inspector: Option<Inspector>,
) {
    let dialled =
        tokio::time::timeout(flow.connect_timeout, host.upstream.connect(flow.upstream)).await;
    let Ok(Ok(mut upstream)) = dialled else {
        guest.reset().await;
        return;
    };
    if upstream.write_all(&first).await.is_err() {
        guest.reset().await;
        return;
    }
    let mut guest = guest;
    match inspector {
        Some(mut inspector) => {
            if relay_inspected(&mut guest.io, &mut upstream, &mut inspector)
                .await
                .is_err()
            {
                guest.reset().await;
            }
        }
        None => {
            // Errors end the relay; both sides see the connection close.
            let _ = tokio::io::copy_bidirectional(&mut guest.io, &mut upstream).await;
        }
    }
}

/// The 403 answer for a denied name.
fn forbidden(name: &str, why: &str) -> Vec<u8> {
    let body = format!("Forbidden by the sandbox's egress policy: {name} ({why})\n");
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The guest stream with bytes already read put back in front.
pub struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    guest: GuestStream,
}

impl Prefixed {
    fn new(prefix: Vec<u8>, guest: GuestStream) -> Self {
        Self {
            prefix,
            at: 0,
            guest,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.guest.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.guest.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.guest.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.guest.io).poll_shutdown(cx)
    }
}
