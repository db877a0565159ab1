//! The smoltcp `Device` over the two virtqueues.
//!
//! `receive` pops a TX chain, copies the frame once into the engine's reused
//! buffer and offers it to the gateway services; what they do not take goes to
//! smoltcp. `transmit` hands smoltcp a token that serializes into a reused
//! buffer behind a zeroed virtio-net header and then writes it into RX chains.
//! Lives only for one poll pass, borrowing the engine's state.
#![forbid(unsafe_code)]

use std::time::Instant;

use smoltcp::phy::{self, DeviceCapabilities};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use super::dispatch::Gateway;

use crate::metrics::{Counter, Metrics};
use crate::pcap::Tap;
use crate::virtio::{self, Layout};

/// What smoltcp may rely on the link for, given the negotiated layout.
///
/// TCP and UDP checksums are not computed for a guest that takes unchecked
/// sums, and never verified on the guest's frames: nothing lies between the
/// guest and us to corrupt them, and every TCP flow ends here, so a guest
/// that sends a wrong sum only spoils its own bytes. (SYNs, whose checksum
/// decides whether a flow is held, are checked by `classify`.) With
/// GUEST_TSO4, TCP/IPv4 segments go out up to 64 KiB for the guest to cut.
/// IPv6 stays at the MTU: smoltcp 0.14 drops IPv6 packets over the MTU
/// even when asked to offload them.
pub fn capabilities(layout: Layout, max_frame: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = phy::Medium::Ethernet;
    caps.max_transmission_unit = max_frame;
    let l4 = if layout.guest_csum {
        phy::Checksum::None
    } else {
        phy::Checksum::Tx
    };
    caps.checksum.tcp = l4;
    caps.checksum.udp = l4;
    if layout.guest_tso4 {
        caps.segmentation.tcpv4 = std::num::NonZeroUsize::new(virtio::offload::MAX_GSO_FRAME);
    }
    caps
}

/// A device with no queues, for building the smoltcp interface.
pub struct Medium {
    caps: DeviceCapabilities,
}

impl Medium {
    /// A medium with `caps`.
    pub fn new(caps: DeviceCapabilities) -> Self {
        Self { caps }
    }
}

impl phy::Device for Medium {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = NoTx;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        None
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        None
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
}

/// The transmit token of [`Medium`]; never handed out.
pub struct NoTx;

impl phy::TxToken for NoTx {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        f(&mut vec![0; len])
    }
}

/// The virtqueue device for one pass.
pub struct Device<'a, M: GuestMemory> {
    /// Guest memory, checked by every access.
    pub mem: &'a M,
    /// Guest-to-device queue.
    pub tx: &'a mut Queue,
    /// Device-to-guest queue.
    pub rx: &'a mut Queue,
    /// Negotiated header layout.
    pub layout: Layout,
    /// Largest Ethernet frame accepted.
    pub max_frame: usize,
    /// Reused copy of the current guest frame (header included).
    pub from_guest: &'a mut Vec<u8>,
    /// Reused buffer for frames to the guest (header included).
    pub to_guest: &'a mut Vec<u8>,
    /// The dispatch that sees frames first.
    pub gateway: &'a mut Gateway,
    /// Counters.
    pub metrics: &'a Metrics,
    /// Frames still allowed this poll.
    pub budget: usize,
    /// Time of this pass.
    pub now: Instant,
    /// Whether TX chains were returned.
    pub tx_used: bool,
    /// Whether RX chains were filled.
    pub rx_used: bool,
    /// Whether smoltcp had a frame for the guest and no RX buffer for it.
    pub rx_starved: bool,
}

/// A frame from the guest, already copied out of guest memory.
pub struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

/// Permission to write one frame into the RX queue.
pub struct TxToken<'a, M: GuestMemory> {
    rx: &'a mut Queue,
    mem: &'a M,
    layout: Layout,
    buf: &'a mut Vec<u8>,
    metrics: &'a Metrics,
    tap: &'a Tap,
    waiting: &'a mut ToGuest,
    rx_used: &'a mut bool,
    now: Instant,
    /// The segment size of a frame for the guest to cut (GUEST_TSO4).
    mss: Option<u16>,
}

impl<M: GuestMemory> phy::TxToken for TxToken<'_, M> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let hdr = self.layout.hdr_len;
        // Not zeroed between frames: smoltcp writes every byte of the frame
        // it asks for, and whatever the buffer held was a frame for this
        // same guest.
        if self.buf.len() < hdr + len {
            self.buf.resize(hdr + len, 0);
        }
        let (header, frame) = self
            .buf
            .get_mut(..hdr + len)
            .unwrap_or_default()
            .split_at_mut(hdr);
        let out = f(frame);
        if !virtio::rx_header(self.layout, header, frame, self.mss) {
            self.metrics.inc(Counter::drop_bad_segment);
            return out;
        }
        if self.mss.is_some() {
            self.metrics.inc(Counter::segments_to_guest);
        }
        match write_frame(
            self.rx,
            self.mem,
            self.layout,
            (header, frame),
            (self.metrics, self.tap),
        ) {
            Written::Yes => *self.rx_used = true,
            Written::NoRoom => {
                // Not enough buffers for this frame yet: keep it, in order,
                // rather than drop it and wait for a TCP retransmission.
                self.waiting
                    .push_segment(frame.to_vec(), self.mss, self.now, self.metrics);
            }
            Written::Dropped { used } => *self.rx_used |= used,
        }
        out
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.mss = meta
            .segmentation_offload_size
            .map(std::num::NonZeroU16::get);
    }
}

/// How writing one frame into the RX queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// In the guest's buffers.
    Yes,
    /// The posted buffers cannot hold it yet; nothing was consumed.
    NoRoom,
    /// Dropped and counted; `used` when chains were returned empty.
    Dropped {
        /// Whether the used ring changed.
        used: bool,
    },
}

/// Writes a frame behind its header, counts the outcome and captures the
/// frame if it went.
fn write_frame<M: GuestMemory>(
    rx: &mut Queue,
    mem: &M,
    layout: Layout,
    (header, frame): (&mut [u8], &[u8]),
    (metrics, tap): (&Metrics, &Tap),
) -> Written {
    match virtio::write_rx_frame(rx, mem, layout, header, frame) {
        Ok(_) => {
            tap.record(frame);
            metrics.inc(Counter::frames_to_guest);
            metrics.add(Counter::bytes_to_guest, frame.len() as u64);
            Written::Yes
        }
        Err(virtio::Drop::NoRxBuffers) => Written::NoRoom,
        Err(drop) => {
            metrics.inc(counter_for(drop));
            // Chains handed back empty still need the guest to see them.
            Written::Dropped {
                used: drop == virtio::Drop::RxBuffersTooSmall,
            }
        }
    }
}

/// Frames for the guest that wait for RX buffers, oldest first: gateway
/// service replies, relayed datagrams, and smoltcp frames that did not fit
/// the buffers posted when they were made. Bounded; the head is dropped if
/// it cannot be written for `MAX_WAIT` (buffers that will never hold it).
#[derive(Default)]
pub struct ToGuest {
    /// Frames and, for segments the guest is to cut, their segment size.
    frames: std::collections::VecDeque<(Vec<u8>, Option<u16>)>,
    head_since: Option<Instant>,
}

/// Frames waiting at most.
pub const MAX_WAITING: usize = 512;
/// How long the head frame may wait for buffers that can hold it.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl ToGuest {
    /// Queues a frame (no header); dropped and counted when full.
    pub fn push(&mut self, frame: Vec<u8>, now: Instant, metrics: &Metrics) {
        self.push_segment(frame, None, now, metrics);
    }

    /// Queues a frame that may be a segment for the guest to cut.
    pub fn push_segment(
        &mut self,
        frame: Vec<u8>,
        mss: Option<u16>,
        now: Instant,
        metrics: &Metrics,
    ) {
        if self.frames.len() >= MAX_WAITING {
            metrics.inc(Counter::drop_pending_full);
            return;
        }
        if self.frames.is_empty() {
            self.head_since = Some(now);
        }
        self.frames.push_back((frame, mss));
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// How many more frames fit.
    pub fn room(&self) -> usize {
        MAX_WAITING.saturating_sub(self.frames.len())
    }

    /// Whether there is room for more.
    pub fn has_room(&self) -> bool {
        self.frames.len() < MAX_WAITING
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Writes waiting frames in order while buffers hold them. Returns
    /// (used ring changed, frames still wait).
    pub fn flush<M: GuestMemory>(
        &mut self,
        rx: &mut Queue,
        mem: &M,
        layout: Layout,
        (metrics, tap): (&Metrics, &Tap),
        now: Instant,
    ) -> (bool, bool) {
        let mut used = false;
        let mut header = [0u8; virtio::NET_HDR_LEN];
        let header = header.get_mut(..layout.hdr_len).unwrap_or_default();
        while let Some((frame, mss)) = self.frames.front_mut() {
            let written = if virtio::rx_header(layout, header, frame, *mss) {
                write_frame(rx, mem, layout, (header, frame), (metrics, tap))
            } else {
                metrics.inc(Counter::drop_bad_segment);
                Written::Dropped { used: false }
            };
            match written {
                Written::Yes => used = true,
                Written::Dropped { used: u } => used |= u,
                Written::NoRoom => {
                    let stuck = self
                        .head_since
                        .is_some_and(|t| now.saturating_duration_since(t) > MAX_WAIT);
                    if !stuck {
                        return (used, true);
                    }
                    metrics.inc(Counter::drop_no_rx_buffers);
                }
            }
            self.frames.pop_front();
            self.head_since = Some(now);
        }
        self.head_since = None;
        (used, false)
    }
}

fn counter_for(drop: virtio::Drop) -> Counter {
    match drop {
        virtio::Drop::BadChain => Counter::drop_bad_chain,
        virtio::Drop::WrongDirection => Counter::drop_wrong_direction,
        virtio::Drop::TooShort => Counter::drop_too_short,
        virtio::Drop::BadOffload => Counter::drop_bad_offload,
        virtio::Drop::TooLong => Counter::drop_too_long,
        virtio::Drop::NoRxBuffers => Counter::drop_no_rx_buffers,
        virtio::Drop::RxBuffersTooSmall => Counter::drop_rx_buffers_too_small,
    }
}

/// Copies a frame that is not in the TX ring (handed over by another pair,
/// or injected) into the buffer smoltcp reads guest frames from; the
/// buffer is grown, never shrunk (see `virtio::read_tx_chain`).
fn stage(buf: &mut Vec<u8>, frame: &[u8]) -> Option<std::ops::Range<usize>> {
    if buf.len() < frame.len() {
        buf.resize(frame.len(), 0);
    }
    let range = 0..frame.len();
    buf.get_mut(range.clone())?.copy_from_slice(frame);
    Some(range)
}

/// The transmit token over a [`Device`]'s fields, borrowed one by one so a
/// receive token can borrow `from_guest` beside it.
macro_rules! tx_token {
    ($device:ident) => {
        TxToken {
            rx: $device.rx,
            mem: $device.mem,
            layout: $device.layout,
            buf: $device.to_guest,
            metrics: $device.metrics,
            tap: &$device.gateway.tap,
            waiting: &mut $device.gateway.pending,
            rx_used: &mut $device.rx_used,
            now: $device.now,
            mss: None,
        }
    };
}

impl<M: GuestMemory> Device<'_, M> {
    /// The next frame smoltcp should see, as a range of `from_guest`: a
    /// held SYN released once its upstream connected (counted when the
    /// guest sent it), else the next guest frame no gateway service takes.
    /// None when the TX queue is drained or this poll's budget is spent.
    fn next_for_stack(&mut self) -> Option<std::ops::Range<usize>> {
        // Frames another queue pair handed over (this pair owns their
        // flow) come before new ones from the guest, and count the same.
        while self.budget > 0 {
            let Some(frame) = self
                .gateway
                .guest
                .steer
                .as_ref()
                .and_then(|s| s.take(self.gateway.pair))
            else {
                break;
            };
            self.budget -= 1;
            if !self.gateway.intercept(&frame, self.now, true) {
                return stage(self.from_guest, &frame);
            }
        }
        if let Some(frame) = self.gateway.inject.pop_front() {
            return stage(self.from_guest, &frame);
        }
        loop {
            if self.budget == 0 {
                return None;
            }
            let chain = self.tx.pop_descriptor_chain(self.mem)?;
            self.budget -= 1;
            let head = chain.head_index();
            let read = virtio::read_tx_chain(
                self.mem,
                chain,
                self.layout,
                self.max_frame,
                self.from_guest,
            );
            // TX buffers are only read: used length is 0 (virtio 1.2 5.1.6.2).
            let _ = self.tx.add_used(self.mem, head, 0);
            self.tx_used = true;
            let frame_len = match read {
                Ok(read) => {
                    if read.segmented {
                        self.metrics.inc(Counter::segments_from_guest);
                    }
                    read.len
                }
                Err(drop) => {
                    self.metrics.inc(counter_for(drop));
                    continue;
                }
            };
            self.metrics.inc(Counter::frames_from_guest);
            self.metrics.add_pair_frames(self.gateway.pair, 1);
            self.metrics
                .add(Counter::bytes_from_guest, frame_len as u64);
            let frame = self.layout.hdr_len..self.layout.hdr_len + frame_len;
            let taken = match self.from_guest.get(frame.clone()) {
                Some(bytes) => {
                    self.gateway.tap.record(bytes);
                    self.gateway.intercept(bytes, self.now, false)
                }
                None => true,
            };
            if !taken {
                return Some(frame);
            }
        }
    }
}

impl<M: GuestMemory> phy::Device for Device<'_, M> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a, M>
    where
        Self: 'a;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.next_for_stack()?;
        let tx = tx_token!(self);
        let rx = RxToken {
            frame: self.from_guest.get(frame).unwrap_or_default(),
        };
        Some((rx, tx))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        // Frames already waiting go first, so the guest sees them in order.
        if !self.gateway.pending.is_empty() {
            let gw = &mut *self.gateway;
            let (used, waiting) = gw.pending.flush(
                self.rx,
                self.mem,
                self.layout,
                (self.metrics, &gw.tap),
                self.now,
            );
            self.rx_used |= used;
            if waiting {
                self.rx_starved = true;
                return None;
            }
        }
        if !virtio::rx_available(self.rx, self.mem) {
            self.rx_starved = true;
            return None;
        }
        Some(tx_token!(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.layout, self.max_frame)
    }
}
