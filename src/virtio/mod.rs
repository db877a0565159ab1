//! Descriptor chains <-> frame bytes, and the virtio-net header.
//!
//! Runs on the engine's vring worker thread. Guest memory is shared and
//! hostile: a TX chain is copied exactly once into a daemon-owned buffer and
//! never read again, and every address and length the guest wrote is checked by
//! `virtio_queue`'s `Reader`/`Writer` against the memory map before use. No
//! function here panics on guest data; failures are returned as [`Drop`]
//! reasons for the caller to count.

use std::io::Read;

pub mod offload;
mod rx;

pub use offload::rx_header;
pub use rx::{needs_notification, rx_available, write_rx_frame};

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

/// virtio-net header size with VERSION_1 or MRG_RXBUF (virtio 1.2 5.1.6).
pub const NET_HDR_LEN: usize = 12;
/// Legacy header without `num_buffers` (virtio 1.2 5.1.6.1, legacy interface).
pub const LEGACY_NET_HDR_LEN: usize = 10;
/// Offset of `num_buffers` inside the header.
pub(crate) const NUM_BUFFERS_OFFSET: usize = 10;
/// Ethernet header length.
pub const ETH_HDR_LEN: usize = 14;
/// Most chains one received frame may be merged across; a guest posts at least
/// 1.5 KiB per buffer, so 64 buffers carry any 64 KiB frame.
pub(crate) const MAX_MERGED_CHAINS: usize = 64;

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

/// Copies the readable part of a TX chain into `buf` (grown as needed,
/// reused); the frame is `buf[layout.hdr_len..][..len]`. Offloads the header asks for are
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
    // Grown, never shrunk: zeroing 64 KiB again after every short frame
    // would cost a pass per segment. Bytes past the frame are never read.
    if buf.len() < total {
        buf.resize(total, 0);
    }
    let packet = buf.get_mut(..total).ok_or(Drop::TooLong)?;
    reader.read_exact(packet).map_err(|_| Drop::BadChain)?;
    let segmented = offload::tx(packet, layout)? == offload::TxOffload::Segmented;
    if frame_len > max_frame && !segmented {
        return Err(Drop::TooLong);
    }
    Ok(TxFrame {
        len: frame_len,
        segmented,
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod offload_tests;
