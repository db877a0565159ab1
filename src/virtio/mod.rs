//! Descriptor chains <-> frame bytes, and the virtio-net header.
//!
//! Runs on the engine's vring worker thread. Guest memory is shared and
//! hostile: a TX chain is copied exactly once into a daemon-owned buffer and
//! never read again, and every address and length the guest wrote is checked by
//! `virtio_queue`'s `Reader`/`Writer` against the memory map before use. No
//! function here panics on guest data; failures are returned as [`Drop`]
//! reasons for the caller to count.

use std::io::{Read, Write};

pub mod offload;

pub use offload::rx_header;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// virtio-net header size with VERSION_1 or MRG_RXBUF (virtio 1.2 5.1.6).
pub const NET_HDR_LEN: usize = 12;
/// Legacy header without `num_buffers` (virtio 1.2 5.1.6.1, legacy interface).
pub const LEGACY_NET_HDR_LEN: usize = 10;
/// Offset of `num_buffers` inside the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Ethernet header length.
pub const ETH_HDR_LEN: usize = 14;
/// Most chains one received frame may be merged across; a guest posts at least
/// 1.5 KiB per buffer, so 64 buffers carry any 64 KiB frame.
const MAX_MERGED_CHAINS: usize = 64;

/// Why a frame was dropped at the virtqueue boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// A descriptor points outside guest memory or the chain is malformed
    /// (loop, bad indirect table, length overflow).
    BadChain,
    /// The TX chain has no readable bytes (wrong direction).
    WrongDirection,
    /// Shorter than the virtio-net header plus an Ethernet header.
    TooShort,
    /// A header asking for an offload we did not offer (GSO), or a partial
    /// checksum pointing outside the frame.
    BadOffload,
    /// Longer than the largest frame the link allows.
    TooLong,
    /// No RX buffers posted by the guest.
    NoRxBuffers,
    /// The guest's RX buffers are too small for the frame.
    RxBuffersTooSmall,
}

/// The header layout and offloads negotiated for this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of virtio-net header before each frame.
    pub hdr_len: usize,
    /// Whether RX frames may span several chains (VIRTIO_NET_F_MRG_RXBUF).
    pub mergeable: bool,
    /// Whether frames to the guest may skip their TCP/UDP checksums and say
    /// so with DATA_VALID (VIRTIO_NET_F_GUEST_CSUM).
    pub guest_csum: bool,
    /// Whether the guest takes TCP/IPv4 segments larger than its MSS
    /// (VIRTIO_NET_F_GUEST_TSO4; needs GUEST_CSUM).
    pub guest_tso4: bool,
    /// Whether the guest may send TCP/IPv4 segments larger than the MTU
    /// (VIRTIO_NET_F_HOST_TSO4).
    pub host_tso4: bool,
    /// The same for TCP/IPv6 (VIRTIO_NET_F_HOST_TSO6).
    pub host_tso6: bool,
    /// Whether those segments may carry ECN's CWR (VIRTIO_NET_F_HOST_ECN).
    pub host_ecn: bool,
}

impl Layout {
    /// The layout from the acked feature bits. An offload acked without
    /// the one it depends on (virtio 1.2 5.1.3.1) counts as not acked.
    pub fn from_features(features: u64) -> Self {
        use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
        use virtio_bindings::virtio_net::{
            VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
        };
        let has = |bit: u32| features & (1 << bit) != 0;
        let mergeable = has(VIRTIO_NET_F_MRG_RXBUF);
        let guest_csum = has(VIRTIO_NET_F_GUEST_CSUM);
        let csum = has(VIRTIO_NET_F_CSUM);
        let host_tso4 = csum && has(VIRTIO_NET_F_HOST_TSO4);
        let host_tso6 = csum && has(VIRTIO_NET_F_HOST_TSO6);
        Self {
            hdr_len: if has(VIRTIO_F_VERSION_1) || mergeable {
                NET_HDR_LEN
            } else {
                LEGACY_NET_HDR_LEN
            },
            mergeable,
            guest_csum,
            guest_tso4: guest_csum && has(VIRTIO_NET_F_GUEST_TSO4),
            host_tso4,
            host_tso6,
            host_ecn: (host_tso4 || host_tso6) && has(VIRTIO_NET_F_HOST_ECN),
        }
    }

    /// A layout with no offloads beyond what is given.
    pub const fn plain(hdr_len: usize, mergeable: bool, guest_csum: bool) -> Self {
        Self {
            hdr_len,
            mergeable,
            guest_csum,
            guest_tso4: false,
            host_tso4: false,
            host_tso6: false,
            host_ecn: false,
        }
    }

    /// The largest frame the guest may send: `max_frame` (the MTU's), or a
    /// 64 KiB segment with segmentation offload.
    pub fn max_tx_frame(&self, max_frame: usize) -> usize {
        if self.host_tso4 || self.host_tso6 {
            max_frame.max(offload::MAX_GSO_FRAME)
        } else {
            max_frame
        }
    }
}

/// A frame read from a TX chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxFrame {
    /// Its length (after the header).
    pub len: usize,
    /// Whether it is a segmentation-offload segment.
    pub segmented: bool,
}

/// Copies the readable part of a TX chain into `buf` (resized, reused); the
/// frame is `buf[layout.hdr_len..]`. Offloads the header asks for are
/// checked and a partial checksum completed on the copy where anything
/// reads it ([`offload::tx`]). Frames over `max_frame` (the MTU's) are
/// refused unless they are checked segments.
pub fn read_tx_chain<M>(
    mem: &M,
    chain: DescriptorChain<&M>,
    layout: Layout,
    max_frame: usize,
    buf: &mut Vec<u8>,
) -> Result<TxFrame, Drop>
where
    M: GuestMemory,
{
    let mut reader = chain.reader(mem).map_err(|_| Drop::BadChain)?;
    let total = reader.available_bytes();
    if total == 0 {
        return Err(Drop::WrongDirection);
    }
    if total < layout.hdr_len + ETH_HDR_LEN {
        return Err(Drop::TooShort);
    }
    let frame_len = total - layout.hdr_len;
    if frame_len > layout.max_tx_frame(max_frame) {
        return Err(Drop::TooLong);
    }
    buf.resize(total, 0);
    reader.read_exact(buf).map_err(|_| Drop::BadChain)?;
    let segmented = offload::tx(buf, layout)? == offload::TxOffload::Segmented;
    if frame_len > max_frame && !segmented {
        return Err(Drop::TooLong);
    }
    Ok(TxFrame {
        len: frame_len,
        segmented,
    })
}

/// Writes one frame behind its `header` (`layout.hdr_len` bytes, filled by
/// [`rx_header`]; `num_buffers` is set here) into the RX queue: into one
/// chain, or across several when mergeable buffers are on. Returns the
/// number of chains used. On failure nothing is left half-written in the
/// used ring: chains taken for a frame that does not fit are put back
/// (mergeable) or returned empty (a single chain too small for any frame of
/// this size).
pub fn write_rx_frame<M>(
    queue: &mut Queue,
    mem: &M,
    layout: Layout,
    header: &mut [u8],
    frame: &[u8],
) -> Result<u16, Drop>
where
    M: GuestMemory,
{
    let total = header.len() + frame.len();
    if !layout.mergeable {
        let chain = queue.pop_descriptor_chain(mem).ok_or(Drop::NoRxBuffers)?;
        let head = chain.head_index();
        let result = chain
            .writer(mem)
            .map_err(|_| Drop::BadChain)
            .and_then(|mut w| {
                if w.available_bytes() < total {
                    return Err(Drop::RxBuffersTooSmall);
                }
                w.write_all(header)
                    .and_then(|()| w.write_all(frame))
                    .map_err(|_| Drop::BadChain)
            });
        let used = if result.is_ok() { total } else { 0 };
        // A chain that cannot hold the frame is handed back empty: keeping it
        // would leave the slot unusable for the guest forever.
        let _ = queue.add_used(mem, head, u32::try_from(used).unwrap_or(0));
        return result.map(|()| 1);
    }

    let mut chains: [Option<DescriptorChain<&M>>; MAX_MERGED_CHAINS] =
        [const { None }; MAX_MERGED_CHAINS];
    let mut capacities = [0usize; MAX_MERGED_CHAINS];
    let mut count = 0usize;
    let mut room = 0usize;
    while room < total {
        let Some(slot) = chains.get_mut(count) else {
            break;
        };
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let capacity = chain
            .clone()
            .writer(mem)
            .map(|w| w.available_bytes())
            .unwrap_or(0);
        if capacity == 0 {
            if count == 0 {
                // Unwritable or outside memory at the head: hand it back empty
                // so the ring moves on.
                let _ = queue.add_used(mem, chain.head_index(), 0);
                continue;
            }
            // Behind chains already taken: put everything back in order; the
            // guest that wrote it gets its own RX stalled, nobody else's.
            for _ in 0..=count {
                queue.go_to_previous_position();
            }
            return Err(Drop::BadChain);
        }
        *slot = Some(chain);
        if let Some(c) = capacities.get_mut(count) {
            *c = capacity;
        }
        room += capacity;
        count += 1;
    }
    if room < total {
        for _ in 0..count {
            queue.go_to_previous_position();
        }
        return Err(Drop::NoRxBuffers);
    }
    let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
    if let Some(field) = header.get_mut(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2) {
        field.copy_from_slice(&num_buffers.to_le_bytes());
    }
    // The header and the frame as one stream of bytes cut at chain sizes.
    let mut rest: [&[u8]; 2] = [header, frame];
    let mut used = [(0u16, 0u32); MAX_MERGED_CHAINS];
    for ((slot, capacity), entry) in chains
        .iter_mut()
        .zip(capacities)
        .zip(used.iter_mut())
        .take(count)
    {
        let Some(chain) = slot.take() else { break };
        let head = chain.head_index();
        let mut written = 0usize;
        if let Ok(mut w) = chain.writer(mem) {
            for part in &mut rest {
                let n = part.len().min(capacity - written);
                let (now, later) = part.split_at(n);
                if w.write_all(now).is_err() {
                    break;
                }
                written += n;
                *part = later;
            }
        }
        *entry = (head, u32::try_from(written).unwrap_or(0));
    }
    publish_used(queue, mem, used.get(..count).unwrap_or_default());
    Ok(num_buffers)
}

/// Puts the used elements of one frame in the used ring and makes them
/// visible together: a driver that sees the first buffer of a merged frame
/// before the rest drops the frame (Linux: "rx error: buffers missing").
/// `virtio_queue` publishes the used index on every `add_used`, so all but
/// the last element are written directly, the internal index moved past
/// them, and the last `add_used` publishes the index once (Release store,
/// after the element writes). Notification decisions for this queue must
/// then use [`needs_notification`], not the queue's own counter.
fn publish_used<M: GuestMemory>(queue: &mut Queue, mem: &M, used: &[(u16, u32)]) {
    let Some((&(last_head, last_len), earlier)) = used.split_last() else {
        return;
    };
    let size = queue.size().max(1);
    let mut next = queue.next_used();
    for &(head, len) in earlier {
        let slot = u64::from(next % size);
        let at = queue
            .used_ring()
            .checked_add(USED_RING_HEADER_BYTES + slot * USED_ELEMENT_BYTES);
        if let Some(at) = at {
            let _ = mem.write_obj(u32::from(head).to_le(), GuestAddress(at));
            let _ = mem.write_obj(len.to_le(), GuestAddress(at.wrapping_add(4)));
        }
        next = next.wrapping_add(1);
    }
    queue.set_next_used(next);
    let _ = queue.add_used(mem, last_head, last_len);
}

/// `flags` and `idx` before the used ring's elements (virtio 1.2 2.7.8).
const USED_RING_HEADER_BYTES: u64 = 4;
/// One used element: id and len, both le32.
const USED_ELEMENT_BYTES: u64 = 8;

/// Whether the driver wants an interrupt for the used entries added since
/// the used index was `old_used` (virtio 1.2 2.7.10: `vring_need_event`
/// against `used_event` when EVENT_IDX is on; always otherwise).
pub fn needs_notification<M: GuestMemory>(queue: &Queue, mem: &M, old_used: u16) -> bool {
    let new = queue.next_used();
    if new == old_used {
        return false;
    }
    if !queue.event_idx_enabled() {
        return true;
    }
    // used_event sits after the avail ring's entries: flags, idx, ring[size].
    let at = queue
        .avail_ring()
        .checked_add(4 + 2 * u64::from(queue.size()));
    let Some(event) = at.and_then(|a| mem.read_obj::<u16>(GuestAddress(a)).ok()) else {
        return true;
    };
    let event = u16::from_le(event);
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old_used)
}

/// Whether the guest has posted RX buffers we have not used yet.
pub fn rx_available<M: GuestMemory>(queue: &Queue, mem: &M) -> bool {
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map(|idx| idx.0 != queue.next_avail())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod offload_tests;
