//! Frames into the guest's RX queue: one chain, or several merged
//! (MRG_RXBUF), published together; and the notification decision.
//!
//! Guest memory is written only through `VolatileSlice`s that vm-memory
//! resolved against the memory map (bounds-checked, volatile copies), never
//! through a `&mut [u8]` into shared memory. Each chain's writable
//! descriptors are resolved once and written from there, without the
//! per-chain allocations of `virtio_queue::Writer`: a 64 KiB frame in 4 KiB
//! buffers is 17 chains.
#![forbid(unsafe_code)]

use std::io::Write;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};

use super::{Drop, Layout, MAX_MERGED_CHAINS, NUM_BUFFERS_OFFSET};

/// Writable areas resolved per merged frame at most: Linux posts one per
/// mergeable buffer. A chain with more descriptors than fit offers only
/// those that did, and no chain is taken once they are all used, so a
/// guest posting many tiny descriptors gets the same treatment as one
/// posting too few buffers: the frame waits, and is dropped if it never
/// fits. (Kept small: the array is initialized per frame.)
const MAX_AREAS: usize = MAX_MERGED_CHAINS + 16;

/// Writes one frame behind its `header` (`layout.hdr_len` bytes, filled by
/// [`super::rx_header`]; `num_buffers` is set here) into the RX queue: into
/// one chain, or across several when mergeable buffers are on. Returns the
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
    if !layout.mergeable {
        return write_single(queue, mem, header, frame);
    }
    let total = header.len() + frame.len();
    let mut areas: [Option<VolatileSlice<'_, BS<'_, M::Bitmap>>>; MAX_AREAS] =
        [const { None }; MAX_AREAS];
    let mut area_count = 0usize;
    // Per chain taken: its head and how many areas, in order.
    let mut chains = [(0u16, 0usize); MAX_MERGED_CHAINS];
    let mut count = 0usize;
    let mut room = 0usize;
    while room < total && count < MAX_MERGED_CHAINS && area_count < MAX_AREAS {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let first = area_count;
        let capacity = resolve(mem, chain, &mut areas, &mut area_count);
        if capacity == 0 {
            area_count = first;
            if count == 0 {
                // Unwritable or outside memory at the head: hand it back
                // empty so the ring moves on.
                let _ = queue.add_used(mem, head, 0);
                continue;
            }
            // Behind chains already taken: put everything back in order;
            // the guest that wrote it gets its own RX stalled, nobody
            // else's.
            for _ in 0..=count {
                queue.go_to_previous_position();
            }
            return Err(Drop::BadChain);
        }
        if let Some(slot) = chains.get_mut(count) {
            *slot = (head, area_count - first);
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
    // The header and the frame as one stream of bytes cut at area sizes.
    let mut rest: [&[u8]; 2] = [header, frame];
    let mut used = [(0u16, 0u32); MAX_MERGED_CHAINS];
    let mut next_area = areas.get(..area_count).unwrap_or_default().iter().flatten();
    for (&(head, n), entry) in chains.iter().zip(used.iter_mut()).take(count) {
        let mut written = 0usize;
        for area in next_area.by_ref().take(n) {
            written += fill(area, &mut rest);
        }
        *entry = (head, u32::try_from(written).unwrap_or(0));
    }
    publish_used(queue, mem, used.get(..count).unwrap_or_default());
    Ok(num_buffers)
}

/// Resolves a chain's writable descriptors into `areas` (from `*count` on)
/// and returns their total size; 0 when a descriptor lies outside memory or
/// the chain is malformed (its areas are then to be discarded).
fn resolve<'m, M: GuestMemory>(
    mem: &'m M,
    chain: DescriptorChain<&'m M>,
    areas: &mut [Option<VolatileSlice<'m, BS<'m, M::Bitmap>>>],
    count: &mut usize,
) -> usize {
    let mut capacity = 0usize;
    for desc in chain.writable() {
        let Ok(slices) = mem.get_slices(desc.addr(), desc.len() as usize, Permissions::Write)
        else {
            return 0;
        };
        for slice in slices {
            let Ok(slice) = slice else {
                return 0;
            };
            let Some(slot) = areas.get_mut(*count) else {
                return capacity;
            };
            capacity += slice.len();
            *slot = Some(slice);
            *count += 1;
        }
    }
    capacity
}

/// Copies the next bytes of `rest` into `area`; returns how many.
fn fill<B: vm_memory::bitmap::BitmapSlice>(
    area: &VolatileSlice<'_, B>,
    rest: &mut [&[u8]; 2],
) -> usize {
    let mut at = 0usize;
    for part in rest.iter_mut() {
        let n = part.len().min(area.len() - at);
        if n == 0 {
            continue;
        }
        let (now, later) = part.split_at(n);
        let Ok(target) = area.subslice(at, n) else {
            break;
        };
        target.copy_from(now);
        at += n;
        *part = later;
    }
    at
}

/// One chain for the whole frame (no MRG_RXBUF).
fn write_single<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    header: &[u8],
    frame: &[u8],
) -> Result<u16, Drop> {
    let total = header.len() + frame.len();
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
    result.map(|()| 1)
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
            // The ring's address was checked when the queue was set up; a
            // write that still fails leaves an entry the guest reads as
            // garbage from its own memory, which harms only the guest.
            let _ = mem.write_obj(u32::from(head).to_le(), GuestAddress(at));
            let _ = mem.write_obj(len.to_le(), GuestAddress(at.wrapping_add(4)));
        }
        next = next.wrapping_add(1);
    }
    queue.set_next_used(next);
    // Fails only for a head out of range, which the chain's own pop ruled
    // out; the frame is then lost like any frame the guest's ring refuses.
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
