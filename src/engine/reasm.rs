//! Reassembly of the guest's fragmented UDP and ICMP datagrams, IPv4 and
//! IPv6, into one unfragmented frame that then takes the path of any other
//! frame (steering, classify, police, route): a fragment never decides
//! anything by itself, so the policy sees every datagram whole.
//!
//! Bounded: every datagram being reassembled costs its bytes plus a fixed
//! [`ENTRY_COST`] against a total and a per-source budget; when a new piece
//! does not fit, the oldest datagrams (of that source, then of all) are
//! dropped to make room, so a flood of partial datagrams delays new ones by
//! nothing more than the flood itself. A datagram not complete within the
//! timeout is dropped. Overlapping pieces drop the whole datagram, and its
//! later pieces until it expires (RFC 5722 for IPv6; IPv4 is held to the
//! same rule, RFC 1858's overlap attacks); an exact duplicate is ignored.
//! A non-last piece must carry a multiple of 8 bytes, and no datagram may
//! outgrow what its header can state.
//!
//! Runs on the engine thread; pure apart from the counters.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

use crate::metrics::{Counter, Metrics};

/// Charged per datagram besides its bytes, so that many tiny pieces cannot
/// hold unbounded bookkeeping.
pub const ENTRY_COST: usize = 256;
const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const FRAGMENT_HEADER_LEN: usize = 8;
/// IPv4's total length is 16 bits and counts the header.
const MAX_V4_PAYLOAD: usize = 65_535 - IPV4_LEN;
/// IPv6's payload length is 16 bits.
const MAX_V6_PAYLOAD: usize = 65_535;

/// The budgets.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// All datagrams being reassembled, bytes plus [`ENTRY_COST`] each.
    pub max_bytes: usize,
    /// The same, for one source address.
    pub max_bytes_per_source: usize,
    /// A datagram not complete this long after its first piece is dropped.
    pub timeout: Duration,
}

/// One datagram's identity (RFC 791: source, destination, protocol, id;
/// RFC 8200: source, destination, id — the protocol is the same in every
/// piece of one datagram, so keying on it too changes nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    id: u32,
}

/// A fragment as read from a frame.
#[derive(Debug)]
struct Piece<'a> {
    key: Key,
    offset: usize,
    more: bool,
    data: &'a [u8],
    ethernet: &'a [u8],
    hop_limit: u8,
}

struct Datagram {
    /// Its place in `Reassembler::order`.
    since: (Instant, u64),
    /// Pieces by offset; never overlapping.
    pieces: BTreeMap<usize, Vec<u8>>,
    /// The payload's length, once the last piece came.
    total: Option<usize>,
    /// Bytes held in `pieces`.
    held: usize,
    /// Overlap seen: the datagram is gone and its later pieces are dropped
    /// until it expires.
    poisoned: bool,
    ethernet: [u8; ETH_LEN],
    hop_limit: u8,
}

impl Datagram {
    fn cost(&self) -> usize {
        self.held + ENTRY_COST
    }
}

/// What became of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a fragment of a UDP or ICMP datagram: the usual path.
    NotFragment,
    /// Kept for later, or dropped and counted: nothing more to do.
    Taken,
    /// The last missing piece: the whole datagram as one frame.
    Complete(Vec<u8>),
}

/// The datagrams being reassembled.
pub struct Reassembler {
    limits: Limits,
    datagrams: HashMap<Key, Datagram>,
    /// Oldest first: (first piece's time, sequence) -> datagram.
    order: BTreeMap<(Instant, u64), Key>,
    seq: u64,
    /// Budget used, in total and per source.
    used: usize,
    used_by: HashMap<IpAddr, usize>,
}

impl Reassembler {
    /// An empty reassembler with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            datagrams: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
            used: 0,
            used_by: HashMap::new(),
        }
    }

    /// Budget in use (bytes plus [`ENTRY_COST`] per datagram).
    pub fn used(&self) -> usize {
        self.used
    }

    /// Datagrams being reassembled (or remembered as poisoned).
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// Offers a guest frame.
    pub fn offer(&mut self, frame: &[u8], now: Instant, metrics: &Metrics) -> Outcome {
        let Some(piece) = parse(frame) else {
            return Outcome::NotFragment;
        };
        self.expire(now, metrics);
        metrics.inc(Counter::fragments_from_guest);
        match self.insert(&piece, now, metrics) {
            Some(frame) => {
                metrics.inc(Counter::fragments_reassembled);
                Outcome::Complete(frame)
            }
            None => Outcome::Taken,
        }
    }

    /// Drops datagrams older than the timeout.
    pub fn expire(&mut self, now: Instant, metrics: &Metrics) {
        while let Some((&(since, seq), &key)) = self.order.first_key_value() {
            if now.saturating_duration_since(since) < self.limits.timeout {
                break;
            }
            if let Some(datagram) = self.remove(&key)
                && !datagram.poisoned
            {
                metrics.inc(Counter::drop_fragment_timeout);
            }
            // `remove` took it out of `order`; a stale entry cannot remain.
            self.order.remove(&(since, seq));
        }
    }

    fn insert(&mut self, piece: &Piece<'_>, now: Instant, metrics: &Metrics) -> Option<Vec<u8>> {
        let len = piece.data.len();
        let end = piece.offset + len;
        let max = if piece.key.src.is_ipv4() {
            MAX_V4_PAYLOAD
        } else {
            MAX_V6_PAYLOAD
        };
        let malformed = len == 0 || (piece.more && !len.is_multiple_of(8)) || end > max;
        if malformed {
            metrics.inc(Counter::drop_fragment_bad);
            return None;
        }
        let exists = self.datagrams.contains_key(&piece.key);
        let cost = len + if exists { 0 } else { ENTRY_COST };
        if !self.make_room(piece.key, cost, metrics) {
            metrics.inc(Counter::drop_fragment_evicted);
            return None;
        }
        if !self.datagrams.contains_key(&piece.key) {
            let since = (now, self.seq);
            self.seq += 1;
            self.order.insert(since, piece.key);
            let mut ethernet = [0u8; ETH_LEN];
            ethernet.copy_from_slice(piece.ethernet);
            self.datagrams.insert(
                piece.key,
                Datagram {
                    since,
                    pieces: BTreeMap::new(),
                    total: None,
                    held: 0,
                    poisoned: false,
                    ethernet,
                    hop_limit: piece.hop_limit,
                },
            );
            self.charge(piece.key.src, ENTRY_COST as isize);
        }
        let datagram = self.datagrams.get_mut(&piece.key)?;
        if datagram.poisoned {
            metrics.inc(Counter::drop_fragment_overlap);
            return None;
        }
        match fits(datagram, piece.offset, piece.data, piece.more) {
            Fit::Duplicate => return None,
            Fit::Overlap => {
                let freed = datagram.held;
                datagram.pieces.clear();
                datagram.held = 0;
                datagram.poisoned = true;
                datagram.total = None;
                self.charge(piece.key.src, -(freed as isize));
                metrics.inc(Counter::drop_fragment_overlap);
                return None;
            }
            Fit::New => {}
        }
        if !piece.more {
            datagram.total = Some(end);
        }
        if piece.offset == 0 {
            // The first piece's link header and hop limit stand for the
            // whole datagram.
            datagram.ethernet.copy_from_slice(piece.ethernet);
            datagram.hop_limit = piece.hop_limit;
        }
        datagram.pieces.insert(piece.offset, piece.data.to_vec());
        datagram.held += len;
        let complete = datagram.total == Some(datagram.held);
        self.charge(piece.key.src, len as isize);
        if !complete {
            return None;
        }
        let datagram = self.remove(&piece.key)?;
        Some(build(&piece.key, &datagram))
    }

    /// Frees `cost` of budget for `key`'s source by dropping the oldest
    /// datagrams (that source's first, then anyone's); false when `cost`
    /// cannot fit even in an empty budget.
    fn make_room(&mut self, key: Key, cost: usize, metrics: &Metrics) -> bool {
        let limits = self.limits;
        if cost > limits.max_bytes_per_source.min(limits.max_bytes) {
            return false;
        }
        let source_used = |s: &Self| s.used_by.get(&key.src).copied().unwrap_or(0);
        while source_used(self) + cost > limits.max_bytes_per_source {
            let oldest = self
                .order
                .values()
                .find(|k| k.src == key.src && **k != key)
                .copied();
            let Some(victim) = oldest else {
                return false;
            };
            self.evict(&victim, metrics);
        }
        while self.used + cost > limits.max_bytes {
            let oldest = self.order.values().find(|k| **k != key).copied();
            let Some(victim) = oldest else {
                return false;
            };
            self.evict(&victim, metrics);
        }
        true
    }

    fn evict(&mut self, key: &Key, metrics: &Metrics) {
        if let Some(datagram) = self.remove(key)
            && !datagram.poisoned
        {
            metrics.inc(Counter::drop_fragment_evicted);
        }
    }

    fn remove(&mut self, key: &Key) -> Option<Datagram> {
        let datagram = self.datagrams.remove(key)?;
        self.order.remove(&datagram.since);
        self.charge(key.src, -(datagram.cost() as isize));
        Some(datagram)
    }

    fn charge(&mut self, src: IpAddr, delta: isize) {
        self.used = self.used.saturating_add_signed(delta);
        let by = self.used_by.entry(src).or_insert(0);
        *by = by.saturating_add_signed(delta);
        if *by == 0 {
            self.used_by.remove(&src);
        }
    }
}

enum Fit {
    New,
    Duplicate,
    Overlap,
}

/// Where a piece at `offset` falls among a datagram's pieces.
fn fits(datagram: &Datagram, offset: usize, data: &[u8], more: bool) -> Fit {
    let end = offset + data.len();
    // A second different end, or a piece past the end, is an overlap too.
    if let Some(total) = datagram.total
        && (end > total || (!more && end != total))
    {
        return Fit::Overlap;
    }
    if !more && datagram.pieces.range(end..).next().is_some() {
        return Fit::Overlap;
    }
    if let Some((&start, held)) = datagram.pieces.range(..=offset).next_back()
        && start + held.len() > offset
    {
        return if start == offset && held.as_slice() == data {
            Fit::Duplicate
        } else {
            Fit::Overlap
        };
    }
    if let Some((&start, _)) = datagram.pieces.range(offset + 1..).next()
        && start < end
    {
        return Fit::Overlap;
    }
    Fit::New
}

/// The whole datagram as one unfragmented frame: the first piece's link
/// header, a fresh IP header, the payload.
fn build(key: &Key, datagram: &Datagram) -> Vec<u8> {
    let total = datagram.held;
    let ip_len = if key.src.is_ipv4() {
        IPV4_LEN
    } else {
        IPV6_LEN
    };
    let mut frame = vec![0u8; ETH_LEN + ip_len + total];
    frame[..ETH_LEN].copy_from_slice(&datagram.ethernet);
    let protocol = IpProtocol::from(key.protocol);
    match (key.src, key.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: protocol,
            payload_len: total,
            hop_limit: datagram.hop_limit,
        }
        .emit(
            &mut Ipv4Packet::new_unchecked(&mut frame[ETH_LEN..]),
            &ChecksumCapabilities::default(),
        ),
        (IpAddr::V6(src), IpAddr::V6(dst)) => Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: protocol,
            payload_len: total,
            hop_limit: datagram.hop_limit,
        }
        .emit(&mut Ipv6Packet::new_unchecked(&mut frame[ETH_LEN..])),
        // Keys pair addresses of one header: never mixed.
        _ => {}
    }
    let body = ETH_LEN + ip_len;
    for (offset, data) in &datagram.pieces {
        if let Some(slot) = frame.get_mut(body + offset..body + offset + data.len()) {
            slot.copy_from_slice(data);
        }
    }
    frame
}

/// Reads a fragment of a UDP or ICMP datagram; None for anything else
/// (including an IPv4 header with a bad checksum, which the usual path
/// drops).
fn parse(frame: &[u8]) -> Option<Piece<'_>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ethernet = frame.get(..ETH_LEN)?;
    let packet = frame.get(ETH_LEN..)?;
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let flags = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]);
            let more = flags & 0x2000 != 0;
            let offset = usize::from(flags & 0x1fff) * 8;
            if !more && offset == 0 {
                return None;
            }
            let protocol = ip.next_header();
            if !matches!(protocol, IpProtocol::Udp | IpProtocol::Icmp) || !ip.verify_checksum() {
                return None;
            }
            let data = packet.get(usize::from(ip.header_len())..usize::from(ip.total_len()))?;
            Some(Piece {
                key: Key {
                    src: IpAddr::V4(ip.src_addr()),
                    dst: IpAddr::V4(ip.dst_addr()),
                    protocol: protocol.into(),
                    id: u32::from(ip.ident()),
                },
                offset,
                more,
                data,
                ethernet,
                hop_limit: ip.hop_limit(),
            })
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Ipv6Frag {
                return None;
            }
            let body = packet.get(IPV6_LEN..IPV6_LEN + usize::from(ip.payload_len()))?;
            let header = body.get(..FRAGMENT_HEADER_LEN)?;
            let protocol = IpProtocol::from(header[0]);
            if !matches!(protocol, IpProtocol::Udp | IpProtocol::Icmpv6) {
                return None;
            }
            let field = u16::from_be_bytes([header[2], header[3]]);
            Some(Piece {
                key: Key {
                    src: IpAddr::V6(ip.src_addr()),
                    dst: IpAddr::V6(ip.dst_addr()),
                    protocol: protocol.into(),
                    id: u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
                },
                offset: usize::from(field >> 3) * 8,
                more: field & 1 != 0,
                data: body.get(FRAGMENT_HEADER_LEN..)?,
                ethernet,
                hop_limit: ip.hop_limit(),
            })
        }
        _ => None,
    }
}

/// Splits a frame the gateway built for the guest into IP fragments that
/// fit `ip_mtu`; None when it fits already (or is not IP). The gateway is
/// the datagram's source as far as the guest can tell, so it fragments
/// IPv6 too (RFC 8200 4.5).
pub fn fragment(frame: &[u8], ip_mtu: usize, id: u32) -> Option<Vec<Vec<u8>>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let packet = frame.get(ETH_LEN..)?;
    if packet.len() <= ip_mtu {
        return None;
    }
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let header_len = usize::from(ip.header_len());
            let payload = packet.get(header_len..usize::from(ip.total_len()))?;
            let chunk = ip_mtu.checked_sub(header_len)? & !7;
            if chunk == 0 {
                return None;
            }
            let pieces = payload.chunks(chunk).enumerate();
            let count = payload.len().div_ceil(chunk);
            let out = pieces
                .map(|(i, data)| {
                    let mut out = Vec::with_capacity(ETH_LEN + header_len + data.len());
                    out.extend_from_slice(&frame[..ETH_LEN + header_len]);
                    out.extend_from_slice(data);
                    let mut ip = Ipv4Packet::new_unchecked(&mut out[ETH_LEN..]);
                    ip.set_total_len(u16::try_from(header_len + data.len()).unwrap_or(u16::MAX));
                    ip.set_ident(u16::try_from(id & 0xffff).unwrap_or(0));
                    ip.clear_flags();
                    ip.set_more_frags(i + 1 < count);
                    ip.set_frag_offset(u16::try_from(i * chunk).unwrap_or(0));
                    ip.fill_checksum();
                    out
                })
                .collect();
            Some(out)
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            let next = u8::from(ip.next_header());
            let payload = packet.get(IPV6_LEN..IPV6_LEN + usize::from(ip.payload_len()))?;
            let chunk = ip_mtu.checked_sub(IPV6_LEN + FRAGMENT_HEADER_LEN)? & !7;
            if chunk == 0 {
                return None;
            }
            let count = payload.len().div_ceil(chunk);
            let out = payload
                .chunks(chunk)
                .enumerate()
                .map(|(i, data)| {
                    let mut out =
                        Vec::with_capacity(ETH_LEN + IPV6_LEN + FRAGMENT_HEADER_LEN + data.len());
                    out.extend_from_slice(&frame[..ETH_LEN + IPV6_LEN]);
                    let field = u16::try_from(i * chunk).unwrap_or(0) | u16::from(i + 1 < count);
                    out.extend_from_slice(&[next, 0]);
                    out.extend_from_slice(&field.to_be_bytes());
                    out.extend_from_slice(&id.to_be_bytes());
                    out.extend_from_slice(data);
                    let mut ip = Ipv6Packet::new_unchecked(&mut out[ETH_LEN..]);
                    ip.set_next_header(IpProtocol::Ipv6Frag);
                    ip.set_payload_len(
                        u16::try_from(FRAGMENT_HEADER_LEN + data.len()).unwrap_or(u16::MAX),
                    );
                    out
                })
                .collect();
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
