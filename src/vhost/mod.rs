//! The vhost-user front: the only users of vhost-user types.
//!
//! [`NetBackend`] implements vhost-user-backend's `VhostUserBackend` for one
//! VMM connection: feature and protocol-feature offers, the virtio-net config
//! space, guest memory updates, and the event handler that runs the engine on
//! the vring worker thread. [`compat`] makes QEMU 7.2's message order work.
//! A new backend (and so a new engine) is built per VMM connection, which is
//! how guest state is reset on reconnect.

pub mod compat;

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::timerfd::TimerFd;

use crate::engine::hostio::HostIo;
use crate::engine::{Engine, Guest, Shared};
use crate::proxy::{Direct, Host, Wake};

/// Index of a pair's receive queue (device to guest) among its worker's
/// queues; pair `i` has queues `2i` and `2i + 1` (virtio 1.2 5.1.2).
pub const RX_QUEUE: usize = 0;
/// Index of a pair's transmit queue (guest to device).
pub const TX_QUEUE: usize = 1;
/// Event ids of a worker's own descriptors, after `2 * pairs` (ids
/// 0..=num_queues belong to the queues and the exit event): the engine's
/// deadline timer, the host side's wake eventfd, the epoll of the host
/// sockets the engine owns.
const TIMER_EVENT: u16 = 1;
const WAKE_EVENT: u16 = 2;
const SOCKETS_EVENT: u16 = 3;
/// Largest ring the VMM may choose; QEMU allows up to 1024.
const MAX_QUEUE_SIZE: usize = 1024;
/// Re-check interval while the guest's RX queue has no buffers and we have
/// frames for it; its refill kick normally comes first.
const STARVED_RETRY: Duration = Duration::from_millis(20);
/// Size of `struct virtio_net_config` up to `mtu` (virtio 1.2 5.1.4).
const CONFIG_SPACE_LEN: usize = 12;

/// Errors setting up a backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// eventfd or timerfd creation failed.
    #[error("cannot create event descriptors")]
    CreateEvents(#[source] io::Error),
    /// The engine could not be built.
    #[error("cannot build the engine")]
    Engine(#[source] crate::engine::Error),
    /// Adding the timer or wake eventfd to a worker's epoll set failed.
    #[error("cannot register the engine's timer and wake events")]
    RegisterEvents(#[source] io::Error),
}

/// One queue pair: its engine and what its worker thread needs.
struct Pair {
    engine: Engine,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: bool,
    timer: TimerFd,
}

/// The virtio-net device for one VMM connection.
pub struct NetBackend {
    shared: Arc<Shared>,
    pairs: Vec<Mutex<Pair>>,
    /// The read ends of the workers' exit eventfds. vhost-user-backend
    /// 0.24 adds each to its worker's epoll through `into_raw_fd` and never
    /// closes it: one descriptor lost per VMM connection (and per liveness
    /// probe of the socket) unless we close them, which [`Drop`] does once
    /// the workers and their epoll sets are gone (they hold this backend).
    exit_consumers: Mutex<Vec<std::os::fd::RawFd>>,
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        use std::os::fd::{FromRawFd, OwnedFd};
        let fds = std::mem::take(
            self.exit_consumers
                .get_mut()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for fd in fds {
            // SAFETY: `fd` is a read end we created in `exit_event`; the
            // crate took it as a bare number and never closes it, and every
            // worker handler that used it held this backend, so none is
            // left. Closing it here is its one close.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl NetBackend {
    /// A backend with fresh engines (one per configured queue pair) over
    /// the daemon's `shared` parts, their host side on `runtime`.
    pub fn new(shared: Arc<Shared>, runtime: tokio::runtime::Handle) -> Result<Self, Error> {
        let count = usize::from(shared.config.network.queue_pairs.max(1));
        let mut hosts = Vec::with_capacity(count);
        for _ in 0..count {
            let host = Host {
                runtime: runtime.clone(),
                wake: Arc::new(Wake::new().map_err(Error::CreateEvents)?),
                upstream: Arc::new(Direct),
            };
            let io = HostIo::new().map_err(Error::CreateEvents)?;
            hosts.push((host, io));
        }
        let engines = engines(&shared, hosts).map_err(Error::Engine)?;
        let mut pairs = Vec::with_capacity(count);
        for engine in engines {
            pairs.push(Mutex::new(Pair {
                engine,
                mem: None,
                event_idx: false,
                timer: nonblocking_timer().map_err(Error::CreateEvents)?,
            }));
        }
        Ok(Self {
            shared,
            pairs,
            exit_consumers: Mutex::new(Vec::new()),
        })
    }

    /// Adds pair `index`'s engine timer, host-side wake eventfd and epoll
    /// of owned host sockets to its vring worker's epoll set.
    pub fn register(
        &self,
        index: usize,
        handler: &VringEpollHandler<Arc<Self>>,
    ) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        let Some(pair) = self.pairs.get(index) else {
            return Ok(());
        };
        let pair = lock(pair);
        let timer = pair.timer.as_raw_fd();
        let wake = pair.engine.host().wake.as_raw_fd();
        let sockets = pair.engine.io().as_raw_fd();
        drop(pair);
        let id = |event| u64::from(self.event_base() + event);
        handler
            .register_listener(timer, EventSet::IN, id(TIMER_EVENT))
            .and_then(|()| handler.register_listener(wake, EventSet::IN, id(WAKE_EVENT)))
            .and_then(|()| handler.register_listener(sockets, EventSet::IN, id(SOCKETS_EVENT)))
            .map_err(Error::RegisterEvents)
    }

    /// Event ids of our own descriptors start after this.
    fn event_base(&self) -> u16 {
        u16::try_from(2 * self.pairs.len()).unwrap_or(u16::MAX - 8)
    }

    fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let n = &self.shared.config.network;
        let mut c = [0u8; CONFIG_SPACE_LEN];
        let link_up = u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1);
        let fields: [(&mut [u8], &[u8]); 4] = {
            let (mac, rest) = c.split_at_mut(6);
            let (status, rest) = rest.split_at_mut(2);
            let (pairs, mtu) = rest.split_at_mut(2);
            [
                (mac, &n.guest_mac.0[..]),
                (status, &link_up.to_le_bytes()[..]),
                (pairs, &n.queue_pairs.to_le_bytes()[..]),
                (mtu, &n.mtu.to_le_bytes()[..]),
            ]
        };
        for (dst, src) in fields {
            dst.copy_from_slice(src);
        }
        c
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.pairs.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // IPv6 segments for the guest are not offered: smoltcp 0.14 drops
        // IPv6 packets over the MTU even with offload metadata.
        let segmentation: &[u32] = if self.shared.config.network.segmentation_offload {
            &[
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
                VIRTIO_NET_F_GUEST_TSO4,
            ]
        } else {
            &[]
        };
        let multiqueue: &[u32] = if self.pairs.len() > 1 {
            &[VIRTIO_NET_F_MQ]
        } else {
            &[]
        };
        [
            VIRTIO_F_VERSION_1,
            // Checksum offload both ways: the guest may leave TX checksums
            // partial (completed on our copy) and skip verifying ours.
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ]
        .iter()
        .chain(segmentation)
        .chain(multiqueue)
        .fold(
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            |acc, bit| acc | (1u64 << bit),
        )
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!(features = format_args!("{features:#x}"), "features acked");
        for pair in &self.pairs {
            if let Err(e) = lock(pair).engine.set_features(features) {
                // Built from the same addresses at connection time, so this
                // does not happen; if it did, the engine keeps its old link.
                tracing::error!(error = %e, "cannot apply the acked features");
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE;
        if self.pairs.len() > 1 {
            base | VhostUserProtocolFeatures::MQ
        } else {
            base
        }
    }

    fn reset_device(&self) {
        // Every pair at once: they share the guest's state.
        let mut pairs: Vec<_> = self.pairs.iter().map(lock).collect();
        // The same host sides: their wake eventfds and socket epolls are in
        // the workers' epoll sets.
        let hosts = pairs
            .iter()
            .map(|p| (p.engine.host(), p.engine.io()))
            .collect();
        match engines(&self.shared, hosts) {
            Ok(engines) => {
                for (pair, engine) in pairs.iter_mut().zip(engines) {
                    pair.engine = engine;
                }
            }
            // They were built from the same parts at connection time, so
            // this does not happen; if it did, the old state is all there is.
            Err(e) => tracing::error!(error = %e, "device reset failed; guest state kept"),
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        for pair in &self.pairs {
            lock(pair).event_idx = enabled;
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
        space
            .get(start..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        for pair in &self.pairs {
            lock(pair).mem = Some(mem.clone());
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker per pair, both its queues on it: each engine is
        // single-threaded by design.
        (0..self.pairs.len())
            .map(|i| ((1 << RX_QUEUE) | (1 << TX_QUEUE)) << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        use std::os::fd::AsRawFd;
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        lock_consumers(&self.exit_consumers).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(pair) = self.pairs.get(thread_id) else {
            return Ok(());
        };
        let mut state = lock(pair);
        if device_event == self.event_base() + TIMER_EVENT {
            // Reading clears readiness; the count does not matter.
            let _ = state.timer.wait();
        }
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return Ok(());
        };
        let Some(mem) = state.mem.as_ref().map(GuestAddressSpace::memory) else {
            return Ok(());
        };
        let event_idx = state.event_idx;
        let starved = run_engine(&mut state.engine, &mem, rx, tx, event_idx);
        let delay = state.engine.next_deadline();
        // A zero duration disarms a timerfd: wake as soon as possible instead.
        // While the guest has no RX buffers, smoltcp wants to send "now"
        // forever; the guest's refill kick is what we wait for then, with a
        // slow timer only as a safety net.
        let floor = if starved {
            STARVED_RETRY
        } else {
            Duration::from_micros(50)
        };
        let arm = delay.map(|d| d.max(floor));
        let _ = match arm {
            Some(d) => state.timer.reset(d, None),
            None => state.timer.clear(),
        };
        Ok(())
    }
}

/// Locks a pair. A poisoned lock means an engine pass panicked; its state
/// is still structurally valid, so carry on rather than take the guest down.
fn lock(pair: &Mutex<Pair>) -> MutexGuard<'_, Pair> {
    pair.lock().unwrap_or_else(|e| e.into_inner())
}

/// Engines for every pair of a fresh guest: `hosts` holds each pair's host
/// side and socket epoll, in order.
fn engines(
    shared: &Arc<Shared>,
    hosts: Vec<(Host, HostIo)>,
) -> Result<Vec<Engine>, crate::engine::Error> {
    let wakes = hosts.iter().map(|(h, _)| h.wake.clone()).collect();
    let guest = Guest::new(shared, wakes);
    shared.board.attach(&guest);
    hosts
        .into_iter()
        .enumerate()
        .map(|(i, (host, io))| Engine::new(shared, guest.clone(), i, host, io))
        .collect()
}

fn lock_consumers(
    m: &Mutex<Vec<std::os::fd::RawFd>>,
) -> std::sync::MutexGuard<'_, Vec<std::os::fd::RawFd>> {
    // A list of numbers stays valid whatever panicked while holding it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A monotonic timerfd that reads without blocking: an expiry seen by epoll
/// may be cleared by a re-arm before the read, and the worker must not sleep
/// in `read` then.
fn nonblocking_timer() -> io::Result<TimerFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh timerfd that nothing else owns.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

/// Runs engine passes until the TX queue is drained with notifications back
/// on, then signals the guest for each queue that needs it; returns whether
/// frames still wait for RX buffers. Errors from the rings (guest wrote
/// garbage indexes) end the pass; they never propagate, since a handler
/// error would stop the worker thread for good.
fn run_engine(
    engine: &mut Engine,
    mem: &GuestMemoryMmap,
    rx: &VringRwLock,
    tx: &VringRwLock,
    event_idx: bool,
) -> bool {
    let mut rx_state = rx.get_mut();
    let mut tx_state = tx.get_mut();
    if !rx_state.get_queue().ready() || !tx_state.get_queue().ready() {
        return false;
    }
    let mut tx_used = false;
    let mut rx_used = false;
    let rx_used_before = rx_state.get_queue().next_used();
    let mut starved;
    let mut idle_passes = 0;
    loop {
        if event_idx {
            let _ = tx_state.disable_notification();
        }
        let result = engine.pass(mem, tx_state.get_queue_mut(), rx_state.get_queue_mut());
        tx_used |= result.tx_used;
        rx_used |= result.rx_used;
        starved = result.rx_starved;
        // Ask for a kick when the guest refills RX buffers; if it already
        // has (raced us), that kick will never come: go again now.
        let mut again = starved && matches!(rx_state.enable_notification(), Ok(true));
        if event_idx {
            again |= matches!(tx_state.enable_notification(), Ok(true));
        }
        idle_passes = if result.tx_used || result.rx_used {
            0
        } else {
            idle_passes + 1
        };
        // "More available" after passes that moved nothing means an avail
        // index no chain can be popped from (a guest writing garbage): stop
        // rather than spin; its next kick retries.
        if !again || idle_passes >= 2 {
            break;
        }
    }
    if tx_used && tx_state.needs_notification().unwrap_or(true) {
        let _ = tx_state.signal_used_queue();
    }
    // RX frames are published in batches (see virtio::publish_used), which
    // the queue's own notification counter does not see.
    if rx_used && crate::virtio::needs_notification(rx_state.get_queue(), mem, rx_used_before) {
        let _ = rx_state.signal_used_queue();
    }
    starved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn shared(config: crate::config::Config) -> Arc<Shared> {
        Arc::new(Shared::for_tests(&config))
    }

    #[test]
    fn config_space_layout() {
        let mut config = crate::config::Config::embedded();
        config.network.mtu = 9000;
        let rt = test_runtime();
        let b = NetBackend::new(shared(config), rt.handle().clone()).unwrap();
        let space = b.get_config(0, 12);
        assert_eq!(&space[..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(&space[6..8], &[1, 0]);
        assert_eq!(&space[10..12], &9000u16.to_le_bytes());
        assert_eq!(b.get_config(10, 2), 9000u16.to_le_bytes());
        assert!(b.get_config(11, 4).is_empty());
        assert!(b.get_config(u32::MAX, u32::MAX).is_empty());
    }

    #[test]
    fn features_offer_what_the_foundation_needs() {
        let rt = test_runtime();
        let config = crate::config::Config::embedded();
        let b = NetBackend::new(shared(config), rt.handle().clone()).unwrap();
        let f = b.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert!(MAX_QUEUE_SIZE.is_power_of_two());
    }
}
