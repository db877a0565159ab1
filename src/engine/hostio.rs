//! The host sockets the engine owns: an epoll of its own, holding every
//! established flow's socket edge-triggered, itself one fd in the vring
//! worker's epoll. A readiness edge wakes the worker; the engine then
//! collects which sockets became readable or writable and moves their
//! bytes on its own thread — no task, channel or thread hop per byte.
//!
//! Edge-triggered, so a socket the engine stops reading (the guest's window
//! is shut) does not keep waking it: the engine keeps its own readable and
//! writable flags and clears one only when a call would block.
//!
//! Engine thread only.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Events taken per collection; more are left for the next.
const EVENTS_PER_POLL: usize = 256;

/// What a socket became.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Bytes (or EOF, or an error) to read.
    pub readable: bool,
    /// Room to write (or an error).
    pub writable: bool,
}

/// The engine's epoll of host sockets. It outlives an engine (a device
/// reset builds a new one over the same epoll, whose fd the worker already
/// watches): a reset engine's sockets close, which removes them.
pub struct HostIo {
    epoll: Arc<Epoll>,
    events: Vec<EpollEvent>,
}

impl HostIo {
    /// An empty set.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Arc::new(Epoll::new()?),
            events: vec![EpollEvent::default(); EVENTS_PER_POLL],
        })
    }

    /// The same epoll, for the next engine.
    pub fn share(&self) -> Self {
        Self {
            epoll: self.epoll.clone(),
            events: vec![EpollEvent::default(); EVENTS_PER_POLL],
        }
    }

    /// The epoll's fd, for the worker's epoll set.
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Watches `fd` under `token` (closing the fd ends the watch).
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let interest =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(interest, token))
    }

    /// The sockets that became ready since the last call: (token, what).
    pub fn ready(&mut self) -> Vec<(u64, Readiness)> {
        let n = self.epoll.wait(0, &mut self.events).unwrap_or(0);
        self.events
            .iter()
            .take(n)
            .map(|e| {
                let set = e.event_set();
                // An error or hang-up is read (and written) to learn what
                // it is.
                let broken = set.intersects(EventSet::ERROR | EventSet::HANG_UP);
                let readiness = Readiness {
                    readable: broken || set.intersects(EventSet::IN | EventSet::READ_HANG_UP),
                    writable: broken || set.contains(EventSet::OUT),
                };
                (e.data(), readiness)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn edges_are_reported_once() {
        let mut io = HostIo::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        io.add(client.as_raw_fd(), 7).unwrap();
        // Connected: writable once.
        let first = io.ready();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, 7);
        assert!(first[0].1.writable);
        assert!(io.ready().is_empty(), "an edge is reported once");
        server.write_all(b"x").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let next = io.ready();
        assert!(next.iter().any(|(t, r)| *t == 7 && r.readable), "{next:?}");
    }
}
