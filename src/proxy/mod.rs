//! The host side: real host sockets for guest flows, and the tokio tasks
//! for what is slow by nature.
//!
//! Dials of new TCP flows (the task hands the connected socket to the
//! engine's thread and ends), published ports' listeners, and the host's
//! address watcher run on the runtime; the engine spawns them through a
//! [`tokio::runtime::Handle`] (spawning is synchronous, so the engine never
//! awaits). UDP and ICMP sockets are opened here and owned by the engine.
//! Tasks and engine meet in bounded channels, each message followed by a
//! [`Wake`] of the engine's eventfd. The process's descriptor limit and
//! running out of descriptors: [`fdlimit`].

pub mod fdlimit;
pub mod hostaddrs;
pub mod icmp;
pub mod publish;
pub mod stream;
pub mod tcp;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Wakes the engine's worker thread from any thread, at most one eventfd
/// write per engine pass however many tasks call it.
pub struct Wake {
    fd: EventFd,
    pending: AtomicBool,
}

impl Wake {
    /// A new, non-blocking wake eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            fd: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            pending: AtomicBool::new(false),
        })
    }

    /// Asks the engine to run a pass soon.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // The counter cannot overflow in practice; a failed write only
            // means the engine is already readable.
            let _ = self.fd.write(1);
        }
    }

    /// Called by the engine when woken, before it looks at any channel, so a
    /// message sent after this call wakes it again.
    pub fn clear(&self) {
        let _ = self.fd.read();
        self.pending.store(false, Ordering::Release);
    }

    /// The eventfd, for the worker's epoll set.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }
}

/// What the host side needs from the engine's world.
#[derive(Clone)]
pub struct Host {
    /// Where tasks run.
    pub runtime: tokio::runtime::Handle,
    /// The engine's wake-up.
    pub wake: Arc<Wake>,
    /// Dials upstream connections (real sockets; tests inject failures).
    pub upstream: Arc<dyn Upstream>,
}

/// How the host side opens TCP connections; a trait so tests can inject
/// refusals, stalls and slow peers.
pub trait Upstream: Send + Sync {
    /// Connects to `dst`.
    fn connect(
        &self,
        dst: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>;
}

/// Dials with the kernel's TCP stack, `TCP_NODELAY` set.
pub struct Direct;

impl Upstream for Direct {
    fn connect(
        &self,
        dst: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>
    {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(dst).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}
