//! The offloads a virtio-net header carries (virtio 1.2 5.1.6): checksums
//! the guest left partial, and TCP segmentation offload both ways.
//!
//! Guest to us (`HOST_TSO4/6`, `HOST_ECN`): a TCP segment of up to 64 KiB
//! with a header saying how the guest would have cut it. We do not cut it:
//! the whole segment goes to smoltcp, which takes any size its window
//! allows. Every header field a hostile guest could bend is checked against
//! the frame itself — type negotiated, ECN only with `HOST_ECN`, a nonzero
//! segment size, a partial checksum starting exactly at a TCP header of
//! the family the type names — and anything else is refused and counted.
//!
//! Us to the guest (`GUEST_TSO4`): smoltcp hands over a TCP segment larger
//! than the link's MSS with the MSS in its metadata; the header asks the
//! guest to treat it as a segmentation-offload packet, its checksum
//! partial (the pseudo-header sum in the field, as Linux leaves it).
#![forbid(unsafe_code)]

use super::{Drop, ETH_HDR_LEN, Layout};

/// Header flag: the checksum from `csum_start` on is partial.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// Header flag (RX): checksums are known good.
pub const HDR_F_DATA_VALID: u8 = 2;
/// `gso_type` values (virtio 1.2 5.1.6).
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// The segment carries ECN's CWR bit.
pub const GSO_ECN: u8 = 0x80;
/// Largest frame with segmentation offload: a 64 KiB IPv4 packet (its
/// length field's limit) behind the Ethernet header; IPv6 frames of this
/// size are within their payload length's limit too.
pub const MAX_GSO_FRAME: usize = ETH_HDR_LEN + 65_535;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const PROTO_TCP: u8 = 6;
const IPV6_HDR_LEN: usize = 40;
/// Where a TCP header keeps its checksum.
const TCP_CHECKSUM_OFFSET: usize = 16;
const TCP_MIN_HDR_LEN: usize = 20;

/// What a guest frame's header asked for, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOffload {
    /// An ordinary frame (its partial checksum, if any, completed).
    None,
    /// A TCP segment larger than the link's MSS, checked and completed.
    Segmented,
}

/// Checks the offloads `packet`'s header (`hdr_len` bytes, then the frame)
/// asks for against what `layout` negotiated, and completes a partial
/// checksum on the copy unless nothing would read it (TCP segments other
/// than SYNs, see `left_partial`). Segmentation-offload frames are refused
/// unless negotiated and consistent with the frame.
pub fn tx(packet: &mut [u8], layout: Layout) -> Result<TxOffload, Drop> {
    let hdr_len = layout.hdr_len;
    let (Some(&flags), Some(&gso_type)) = (packet.first(), packet.get(1)) else {
        return Err(Drop::TooShort);
    };
    let field = |at: usize| {
        packet
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let (Some(gso_size), Some(start), Some(offset)) = (field(4), field(6), field(8)) else {
        return Err(Drop::TooShort);
    };
    let offload = if gso_type == GSO_NONE {
        TxOffload::None
    } else {
        let frame = packet.get(hdr_len..).unwrap_or_default();
        check_segment(frame, layout, gso_type, gso_size, flags, (start, offset))?;
        TxOffload::Segmented
    };
    if flags & HDR_F_NEEDS_CSUM != 0 && !left_partial(packet.get(hdr_len..), start, offset) {
        complete_checksum(packet, hdr_len + start, offset)?;
    }
    Ok(offload)
}

/// Whether a partial checksum can stay partial: a TCP segment other than a
/// SYN, the partial sum exactly on its checksum field. Nothing after this
/// reads those sums (smoltcp is told not to verify them, see
/// `engine::device::capabilities`, and every TCP flow ends here), while
/// completing one costs a pass over up to 64 KiB. SYNs are completed:
/// `engine::classify` checks theirs before holding a flow.
fn left_partial(frame: Option<&[u8]>, start: usize, offset: usize) -> bool {
    let Some(frame) = frame else {
        return false;
    };
    match tcp_offset(frame) {
        Some((l4, _)) => {
            let syn = frame.get(l4 + 13).is_none_or(|flags| flags & 0x02 != 0);
            start == l4 && offset == TCP_CHECKSUM_OFFSET && !syn
        }
        None => false,
    }
}

/// The checks of a segmentation-offload header against its frame.
fn check_segment(
    frame: &[u8],
    layout: Layout,
    gso_type: u8,
    gso_size: usize,
    flags: u8,
    (csum_start, csum_offset): (usize, usize),
) -> Result<(), Drop> {
    let ecn = gso_type & GSO_ECN != 0;
    let allowed = match gso_type & !GSO_ECN {
        GSO_TCPV4 => layout.host_tso4,
        GSO_TCPV6 => layout.host_tso6,
        _ => false,
    };
    if !allowed || (ecn && !layout.host_ecn) {
        return Err(Drop::BadOffload);
    }
    // Linux always leaves a segmented frame's checksum partial; a segment
    // size of 0 would ask for nothing.
    if gso_size == 0 || flags & HDR_F_NEEDS_CSUM == 0 || csum_offset != TCP_CHECKSUM_OFFSET {
        return Err(Drop::BadOffload);
    }
    let l4 = match tcp_offset(frame) {
        Some((l4, v4)) if v4 == (gso_type & !GSO_ECN == GSO_TCPV4) => l4,
        _ => return Err(Drop::BadOffload),
    };
    // csum_start counts from the frame's first byte (the Ethernet header).
    if csum_start != l4 || frame.len() < l4 + TCP_MIN_HDR_LEN {
        return Err(Drop::BadOffload);
    }
    Ok(())
}

/// Where the TCP header of an Ethernet frame starts, and whether it is
/// IPv4; None unless the frame is IPv4 or IPv6 (no extension headers)
/// carrying TCP.
fn tcp_offset(frame: &[u8]) -> Option<(usize, bool)> {
    let ethertype = frame.get(12..14)?;
    let ip = frame.get(ETH_HDR_LEN..)?;
    let first = *ip.first()?;
    if ethertype == ETHERTYPE_IPV4 && first >> 4 == 4 {
        let ihl = usize::from(first & 0x0f) * 4;
        (ihl >= 20 && *ip.get(9)? == PROTO_TCP).then_some((ETH_HDR_LEN + ihl, true))
    } else if ethertype == ETHERTYPE_IPV6 && first >> 4 == 6 {
        (*ip.get(6)? == PROTO_TCP).then_some((ETH_HDR_LEN + IPV6_HDR_LEN, false))
    } else {
        None
    }
}

/// Finishes a partial checksum (virtio 1.2 5.1.6.2): the 16-bit ones'
/// complement sum over the packet from `start` (whose checksum field holds
/// the pseudo-header sum) goes, complemented, to `start + offset`. Offsets
/// are checked against the packet.
fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), Drop> {
    let end = packet.len();
    let at = start + offset;
    if at + 2 > end || start >= end {
        return Err(Drop::BadOffload);
    }
    let sum = ones_complement_sum(packet.get(start..end).unwrap_or_default(), 0);
    if let Some(slot) = packet.get_mut(at..at + 2) {
        slot.copy_from_slice(&(!sum).to_be_bytes());
    }
    Ok(())
}

/// RFC 1071 sum of `data` added to `initial`, folded to 16 bits.
fn ones_complement_sum(data: &[u8], initial: u64) -> u16 {
    let mut sum = initial;
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

/// Fills the header in front of a frame for the guest. Without `mss`: all
/// zero, DATA_VALID when the guest takes unchecked sums. With `mss` (only
/// for a TCP segment smoltcp made while `GUEST_TSO4` is on): a
/// segmentation-offload header, and the pseudo-header sum written into the
/// segment's checksum field. False when `frame` is not a TCP/IPv4 segment
/// (then the header is zeroed and the frame must not be sent).
pub fn rx_header(layout: Layout, header: &mut [u8], frame: &mut [u8], mss: Option<u16>) -> bool {
    header.fill(0);
    let Some(mss) = mss else {
        if layout.guest_csum
            && let Some(flags) = header.first_mut()
        {
            *flags = HDR_F_DATA_VALID;
        }
        return true;
    };
    let Some((l4, true)) = tcp_offset(frame) else {
        return false;
    };
    let Some(&data_offset) = frame.get(l4 + 12) else {
        return false;
    };
    let tcp_hdr_len = usize::from(data_offset >> 4) * 4;
    let tcp_len = frame.len().saturating_sub(l4);
    let (Some(addrs), Ok(tcp_len16)) = (frame.get(26..34), u16::try_from(tcp_len)) else {
        return false;
    };
    let pseudo = ones_complement_sum(addrs, u64::from(PROTO_TCP) + u64::from(tcp_len16));
    let Some(check) = frame.get_mut(l4 + TCP_CHECKSUM_OFFSET..l4 + TCP_CHECKSUM_OFFSET + 2) else {
        return false;
    };
    check.copy_from_slice(&pseudo.to_be_bytes());
    let le = |v: usize| u16::try_from(v).unwrap_or(u16::MAX).to_le_bytes();
    let fields: [(usize, [u8; 2]); 4] = [
        (2, le(l4 + tcp_hdr_len)),
        (4, mss.to_le_bytes()),
        (6, le(l4)),
        (8, le(TCP_CHECKSUM_OFFSET)),
    ];
    if header.len() < 10 {
        return false;
    }
    header[0] = HDR_F_NEEDS_CSUM;
    header[1] = GSO_TCPV4;
    for (at, bytes) in fields {
        if let Some(slot) = header.get_mut(at..at + 2) {
            slot.copy_from_slice(&bytes);
        }
    }
    true
}
