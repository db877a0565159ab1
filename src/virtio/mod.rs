//! Descriptor chains <-> frame bytes, and the virtio-net header.
//!
//! Runs on the engine's vring worker thread. Guest memory is shared and
//! hostile: a TX chain is copied exactly once into a daemon-owned buffer and
//! never read again, and every address and length the guest wrote is checked by
//! `virtio_queue`'s `Reader`/`Writer` against the memory map before use. No
//! function here panics on guest data; failures are returned as [`Drop`]
//! reasons for the caller to count.

use std::io::{Read, Write};

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

/// The header layout negotiated for this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of virtio-net header before each frame.
    pub hdr_len: usize,
    /// Whether RX frames may span several chains (VIRTIO_NET_F_MRG_RXBUF).
    pub mergeable: bool,
    /// Whether frames to the guest may skip their TCP/UDP checksums and say
    /// so with DATA_VALID (VIRTIO_NET_F_GUEST_CSUM).
    pub guest_csum: bool,
}

impl Layout {
    /// The layout from the acked feature bits.
    pub fn from_features(features: u64) -> Self {
        use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
        use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};
        let version_1 = features & (1 << VIRTIO_F_VERSION_1) != 0;
        let mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        Self {
            guest_csum: features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0,
            hdr_len: if version_1 || mergeable {
                NET_HDR_LEN
            } else {
                LEGACY_NET_HDR_LEN
            },
            mergeable,
        }
    }
}

/// Copies the readable part of a TX chain into `buf` (resized, reused) and
/// returns the frame's length; the frame is `buf[layout.hdr_len..][..len]`.
/// A partial checksum the guest left to us (VIRTIO_NET_F_CSUM) is completed
/// on the copy, so everything after this sees ordinary, valid frames.
pub fn read_tx_chain<M>(
    mem: &M,
    chain: DescriptorChain<&M>,
    layout: Layout,
    max_frame: usize,
    buf: &mut Vec<u8>,
) -> Result<usize, Drop>
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
    if frame_len > max_frame {
        return Err(Drop::TooLong);
    }
    buf.resize(total, 0);
    reader.read_exact(buf).map_err(|_| Drop::BadChain)?;
    complete_checksum(buf, layout.hdr_len)?;
    Ok(frame_len)
}

/// virtio-net header flag: the checksum from `csum_start` on is partial.
const HDR_F_NEEDS_CSUM: u8 = 1;
/// virtio-net header flag (RX): checksums are known good.
const HDR_F_DATA_VALID: u8 = 2;

/// Finishes a partial checksum (virtio 1.2 5.1.6.2): the 16-bit ones'
/// complement sum over the frame from `csum_start` (whose checksum field
/// holds the pseudo-header sum) goes, complemented, to `csum_start +
/// csum_offset`. Offsets are checked against the frame; GSO is refused since
/// no segmentation offload is offered.
fn complete_checksum(packet: &mut [u8], hdr_len: usize) -> Result<(), Drop> {
    let (Some(&flags), Some(&gso_type)) = (packet.first(), packet.get(1)) else {
        return Err(Drop::TooShort);
    };
    if gso_type != 0 {
        return Err(Drop::BadOffload);
    }
    if flags & HDR_F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let field = |at: usize| {
        packet
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let (Some(start), Some(offset)) = (field(6), field(8)) else {
        return Err(Drop::TooShort);
    };
    let (frame_start, frame_end) = (hdr_len + start, packet.len());
    let at = frame_start + offset;
    if at + 2 > frame_end || frame_start >= frame_end {
        return Err(Drop::BadOffload);
    }
    let sum = ones_complement_sum(packet.get(frame_start..frame_end).unwrap_or_default());
    if let Some(slot) = packet.get_mut(at..at + 2) {
        slot.copy_from_slice(&(!sum).to_be_bytes());
    }
    Ok(())
}

/// RFC 1071 sum, folded to 16 bits.
fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// Fills the header of a frame for the guest: zeroed, DATA_VALID when the
/// guest accepts it.
pub fn rx_header(layout: Layout, header: &mut [u8]) {
    header.fill(0);
    if layout.guest_csum
        && let Some(flags) = header.first_mut()
    {
        *flags = HDR_F_DATA_VALID;
    }
}

/// Writes one frame, already prefixed by `layout.hdr_len` zero bytes in
/// `packet`, into the RX queue: into one chain, or across several when
/// mergeable buffers are on. Returns the number of chains used. On failure
/// nothing is left half-written in the used ring: chains taken for a frame
/// that does not fit are put back (mergeable) or returned empty (a single
/// chain too small for any frame of this size).
pub fn write_rx_frame<M>(
    queue: &mut Queue,
    mem: &M,
    layout: Layout,
    packet: &mut [u8],
) -> Result<u16, Drop>
where
    M: GuestMemory,
{
    if !layout.mergeable {
        let chain = queue.pop_descriptor_chain(mem).ok_or(Drop::NoRxBuffers)?;
        let head = chain.head_index();
        let result = chain
            .writer(mem)
            .map_err(|_| Drop::BadChain)
            .and_then(|mut w| {
                if w.available_bytes() < packet.len() {
                    return Err(Drop::RxBuffersTooSmall);
                }
                w.write_all(packet).map_err(|_| Drop::BadChain)
            });
        let used = if result.is_ok() { packet.len() } else { 0 };
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
    while room < packet.len() {
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
    if room < packet.len() {
        for _ in 0..count {
            queue.go_to_previous_position();
        }
        return Err(Drop::NoRxBuffers);
    }
    let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
    if let Some(field) = packet.get_mut(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2) {
        field.copy_from_slice(&num_buffers.to_le_bytes());
    }
    let mut offset = 0usize;
    let mut used = [(0u16, 0u32); MAX_MERGED_CHAINS];
    for ((slot, capacity), entry) in chains
        .iter_mut()
        .zip(capacities)
        .zip(used.iter_mut())
        .take(count)
    {
        let Some(chain) = slot.take() else { break };
        let head = chain.head_index();
        let end = packet.len().min(offset + capacity);
        let part = packet.get(offset..end).unwrap_or(&[]);
        let written = chain
            .writer(mem)
            .ok()
            .and_then(|mut w| w.write_all(part).ok())
            .map_or(0, |()| part.len());
        offset = end;
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
