//! The composition root: builds the daemon's shared parts once — the host
//! runtime, the counters, the compiled policy, TLS interception, the
//! published ports — and, per VMM connection, a backend whose engine gets
//! them. Nothing else constructs these; parts receive what they need and
//! reach for no globals.
//!
//! Runs on the main thread at start-up and at each VMM connection.
#![forbid(unsafe_code)]

pub mod reload;

use std::io;
use std::sync::Arc;

use crate::config::Config;
use crate::dns::rules::Rules;
use crate::engine::Shared;
use crate::metrics::Metrics;
use crate::proxy::publish::Publisher;
use crate::tls::intercept::{Interceptor, SetupError};
use crate::vhost::NetBackend;

/// tokio worker threads for host sockets; the engine has its own thread.
const HOST_THREADS: usize = 1;

/// Why the daemon's parts could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host-side runtime could not start.
    #[error("cannot start the host-side runtime")]
    Runtime(#[source] io::Error),
    /// A published port could not be bound.
    #[error(transparent)]
    Publish(#[from] crate::proxy::publish::Error),
    /// TLS interception is on but cannot work (CA, roots).
    #[error("TLS interception")]
    Tls(#[source] SetupError),
    /// The host's own addresses (the policy's host group) cannot be known.
    #[error("cannot watch the host's addresses")]
    HostAddrs(#[source] io::Error),
}

/// The daemon's parts.
pub struct Wiring {
    runtime: tokio::runtime::Runtime,
    shared: Arc<Shared>,
}

/// The parts that need no thread: built before the daemon confines itself,
/// while it may still bind privileged ports and read any file.
pub struct Prepared {
    config: Config,
    metrics: Arc<Metrics>,
    publish: crate::proxy::publish::Bound,
    tls: Option<Arc<Interceptor>>,
    icmp_available: bool,
}

impl Prepared {
    /// The configuration being prepared.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Starts the threads: the host-side runtime with the published ports'
    /// tasks, and the watch on the host's addresses.
    pub fn start(self) -> Result<Wiring, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(HOST_THREADS)
            .thread_name("vg-host")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let publisher = Some(Arc::new(
            self.publish.start(runtime.handle(), &self.metrics)?,
        ));
        let rules = Rules::from_config(&self.config, None);
        let host = rules.policy.host_set().clone();
        crate::proxy::hostaddrs::watch(host.clone()).map_err(Error::HostAddrs)?;
        tracing::info!(
            addresses = host.live().len(),
            "the host's own addresses are the policy's host group"
        );
        let shared = Shared {
            rules: rules.live(),
            config: Arc::new(self.config),
            metrics: self.metrics,
            tls: self.tls,
            publisher,
            icmp_available: self.icmp_available,
            board: Default::default(),
            tap: Default::default(),
        };
        Ok(Wiring {
            runtime,
            shared: Arc::new(shared),
        })
    }
}

impl Wiring {
    /// Builds what needs no thread: published ports are bound and the TLS
    /// CA checked here, before the vhost socket exists, so a daemon that
    /// cannot serve as configured does not start.
    pub fn prepare(config: Config) -> Result<Prepared, Error> {
        let metrics = Arc::new(Metrics::default());
        let publish = Publisher::bind(&config.publish)?;
        let tls = if config.tls.enabled {
            crate::tls::install_provider();
            let interceptor = Interceptor::new(&config.tls).map_err(Error::Tls)?;
            tracing::info!(ports = ?config.tls.ports, "TLS interception on");
            Some(Arc::new(interceptor))
        } else {
            None
        };
        let icmp_available = crate::proxy::icmp::available();
        if !icmp_available {
            tracing::warn!(
                "ping sockets are not permitted for this group (net.ipv4.ping_group_range): \
                 guest pings to outside hosts will be dropped and counted"
            );
        }
        Ok(Prepared {
            config,
            metrics,
            publish,
            tls,
            icmp_available,
        })
    }

    /// [`Wiring::prepare`] then [`Prepared::start`], for callers that do
    /// not confine the process in between (tests, benches).
    pub fn build(config: Config) -> Result<Self, Error> {
        Self::prepare(config)?.start()
    }

    /// The configuration the daemon runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The process-wide counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The shared parts, for the control API.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The host-side runtime.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// A fresh device for one VMM connection.
    pub fn backend(&self) -> Result<NetBackend, crate::vhost::Error> {
        NetBackend::new(self.shared.clone(), self.runtime.handle().clone())
    }
}
