//! Fuzz harnesses: plain functions over arbitrary bytes, one per target of
//! `fuzz/` (cargo-fuzz, libFuzzer). `tests/fuzz_corpus.rs` replays every
//! committed corpus entry and fixed crasher through the same functions on
//! the stable toolchain, so a regression fails the ordinary test run.
//!
//! Each harness feeds hostile input to one boundary and checks what must
//! hold whatever the input: nothing panics, hangs or grows without bound,
//! and where a property is stated it holds. They run on the calling thread
//! and touch no socket but the local socket pairs of the relay harness.
//! Where a harness writes `let _ =`, the value or
//! error is what the input deserves and is not the point: the call must
//! return without panicking (a refused chain, an unparsable message).
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::Config;
use crate::engine::classify::{self, Kind, Own};
use crate::engine::{dhcp, police, route};
use crate::policy::Policy;
use crate::virtio::{self, Layout};

/// A harness: arbitrary bytes in, a panic when a property breaks.
pub type Harness = fn(&[u8]);

/// The targets, by name: what `fuzz/` builds and the corpus test replays.
pub const TARGETS: &[(&str, Harness)] = &[
    ("virtio_chains", virtio_chains),
    ("frame", frame),
    ("first_bytes", first_bytes),
    ("dns_message", dns_message),
    ("config_policy", config_policy),
    ("dhcp_ndp", dhcp_ndp),
    ("fragments", fragments),
    ("vhost_relay", vhost_relay),
    ("block_file", block_file),
];

/// Guest memory of the virtqueue harness.
const MEM_BYTES: usize = 64 * 1024;
/// Ring size of the virtqueue harness.
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x140;
/// Chains popped per harness run; the avail index may claim any number.
const MAX_CHAINS: usize = 64;

/// TX and RX descriptor chains on hostile guest memory: the input is the
/// memory itself (descriptor table, rings and buffers, from address 0),
/// after a byte choosing the negotiated layout and two bytes of avail
/// index. Every TX chain is read the way the engine reads it and its frame
/// classified; then a frame is written into RX chains the same memory
/// describes, mergeable or not.
pub fn virtio_chains(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (idx, memory) = rest.split_at(rest.len().min(2));
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES)]) else {
        return;
    };
    let image = memory.get(..MEM_BYTES).unwrap_or(memory);
    if mem.write_slice(image, GuestAddress(0)).is_err() {
        return;
    }
    // Offloads on or off together: with them, segmentation headers are
    // checked against the frames; without, refused.
    let offloads = mode & 0x80 != 0;
    let layout = Layout {
        hdr_len: if mode & 1 == 0 {
            virtio::NET_HDR_LEN
        } else {
            virtio::LEGACY_NET_HDR_LEN
        },
        mergeable: mode & 2 != 0,
        guest_csum: mode & 4 != 0,
        guest_tso4: offloads && mode & 4 != 0,
        host_tso4: offloads,
        host_tso6: offloads,
        host_ecn: offloads,
    };
    let avail_idx = match idx {
        [a, b] => u16::from_le_bytes([*a, *b]),
        _ => 0,
    };
    // The avail index the guest claims, written where the device reads it.
    if mem
        .write_obj(avail_idx.to_le(), GuestAddress(AVAIL_RING + 2))
        .is_err()
    {
        return;
    }
    let Some(mut tx) = queue(mode & 8 != 0) else {
        return;
    };
    let mut buf = Vec::new();
    let mut last = 0;
    // A 1500-byte link, so segmentation headers decide what is over it.
    let max_frame = 1500 + virtio::ETH_HDR_LEN;
    let own = own();
    for _ in 0..MAX_CHAINS {
        let Some(chain) = tx.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        if let Ok(read) = virtio::read_tx_chain(&mem, chain, layout, max_frame, &mut buf) {
            assert!(buf.len() >= layout.hdr_len + read.len, "frame length");
            assert!(read.len <= max_frame || read.segmented, "over the MTU");
            let frame = buf.get(layout.hdr_len..layout.hdr_len + read.len);
            let _ = classify::classify(frame.unwrap_or_default(), &own);
            last = read.len;
        }
        // The used ring is inside the input too: whatever it says.
        let _ = tx.add_used(&mem, head, 0);
    }
    let _ = virtio::needs_notification(&tx, &mem, 0);
    let Some(mut rx) = queue(mode & 8 != 0) else {
        return;
    };
    // The frame for the guest: the last guest frame read (hostile bytes
    // through the segmentation header's parser too), else a made-up one.
    let mut frame = match buf.get(layout.hdr_len..layout.hdr_len + last) {
        Some(f) if !f.is_empty() => f.to_vec(),
        _ => vec![0u8; usize::from((mode >> 4) & 7) * 600 + 60],
    };
    let mss = (mode & 0x40 != 0).then_some(1460);
    let mut header = vec![0u8; layout.hdr_len];
    if !virtio::rx_header(layout, &mut header, &mut frame, mss) {
        return;
    }
    for _ in 0..MAX_CHAINS {
        if !virtio::rx_available(&rx, &mem) {
            break;
        }
        if virtio::write_rx_frame(&mut rx, &mem, layout, &mut header, &frame).is_err() {
            break;
        }
    }
}

/// A split queue of [`QUEUE_SIZE`] over the harness's fixed ring layout.
fn queue(event_idx: bool) -> Option<Queue> {
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.set_size(QUEUE_SIZE);
    let split = |a: u64| {
        let low = u32::try_from(a & 0xffff_ffff).ok();
        let high = u32::try_from(a >> 32).ok();
        (low, high)
    };
    let (lo, hi) = split(DESC_TABLE);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(AVAIL_RING);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(USED_RING);
    q.set_used_ring_address(lo, hi);
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Some(q)
}

fn own() -> Own {
    Own {
        v4: Ipv4Addr::new(198, 19, 0, 1),
        v6: Some((
            Ipv6Addr::new(0xfd76, 0x6761, 0x7465, 0, 0, 0, 0, 1),
            crate::wellknown::GATEWAY_LINK_LOCAL,
        )),
    }
}

fn default_policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| Config::embedded().policy())
}

/// One guest frame through the engine's pure dispatch steps — classify,
/// police (default policy), route — and, for DHCP, the server. The route
/// must fit the frame: a SYN route for a SYN, a datagram route for a
/// datagram.
pub fn frame(data: &[u8]) {
    let own = own();
    let kind = classify::classify(data, &own);
    let facts = police::Facts::default();
    let verdict = police::police(&kind, facts, default_policy(), |_| Vec::new());
    let setup = route::Setup {
        own,
        allow_host_loopback: false,
        tls_ports: vec![443],
        terminates_dot: true,
    };
    let routed = route::route(&kind, &verdict, facts, &setup);
    let fits = match (&kind, routed) {
        (Kind::TcpSyn { .. }, route::Route::Open(_) | route::Route::Refuse(_)) => true,
        (Kind::TcpSyn { .. }, _) => false,
        (_, route::Route::Open(_) | route::Route::Refuse(_) | route::Route::Existing) => false,
        _ => true,
    };
    assert!(fits, "{kind:?} routed to {routed:?}");
    if let Kind::TcpSyn { dst, .. } = &kind {
        // The gateway mapping never leads to loopback unless allowed.
        let up = route::upstream(*dst, &own, false);
        assert!(up.is_none_or(|u| !u.ip().is_loopback()), "{dst} -> {up:?}");
    }
    if let Kind::Dhcp { payload } = kind {
        let config = Config::embedded();
        let mut server = dhcp::Server::new(&config.network);
        let _ = server.handle(payload, Instant::now());
    }
}

/// A flow's first bytes through the name readers, as the gate and the
/// first-bytes service read them: whole, finished or not, and as a stream
/// in two pieces split where the input's first byte says. A name found
/// passes the host-name grammar and is never an address literal.
pub fn first_bytes(data: &[u8]) {
    use crate::sniff::{FirstName, Step, Stream, first_name, http, tls};
    let check = |name: &str| {
        assert!(crate::names::check(name).is_ok(), "{name:?}");
        assert!(name.parse::<IpAddr>().is_err(), "{name:?}");
    };
    let _ = tls::client_hello(data);
    let _ = http::head(data);
    for finished in [false, true] {
        if let FirstName::Named(name, _) = first_name(data, finished) {
            check(&name);
        }
    }
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (a, b) = data.split_at(split);
    let mut stream = Stream::new();
    let mut steps = vec![stream.feed(a, false)];
    let next = if stream.is_starting() { data } else { b };
    steps.push(stream.feed(next, true));
    for step in steps {
        if let Step::Names(names) = step {
            for name in names.into_iter().filter_map(|(n, _)| n) {
                check(&name);
            }
        }
    }
}

/// A DNS message as a query from the guest and as an answer from an
/// upstream: parse → build → parse agrees on the sections; the rebind
/// filter, the pins and the error reply builder take it without panicking.
pub fn dns_message(data: &[u8]) {
    use hickory_proto::op::Message;
    if let Ok(message) = Message::from_vec(data)
        && let Ok(bytes) = message.to_vec()
    {
        let again = Message::from_vec(&bytes);
        assert!(again.is_ok(), "a message we built does not parse");
        if let Ok(again) = again {
            assert_eq!(again.queries.len(), message.queries.len());
            assert_eq!(again.answers.len(), message.answers.len());
        }
    }
    let own = vec![(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 0)), 24)];
    let host = std::sync::Arc::new(crate::policy::HostSet::new(Vec::new()));
    let rebind = crate::dns::rebind::Rebind::new(["intranet.test"], own, host);
    if let crate::dns::rebind::Filtered::Stripped(bytes, _) = rebind.filter(data) {
        // What we hand the guest after stripping must itself pass.
        assert_eq!(
            rebind.filter(&bytes),
            crate::dns::rebind::Filtered::Unchanged
        );
    }
    let pins = crate::dns::pins::Pins::new(16);
    pins.record_answer(data, Instant::now());
    if let Some(reply) = crate::dns::forward::refused(data) {
        assert_eq!(reply.get(..2), data.get(..2), "id kept");
    }
}

/// A configuration file through parsing, validation and policy
/// compilation; a valid one's policy decides a few flows and reports its
/// shadowed rules without panicking.
pub fn config_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    let policy = config.policy();
    let _ = policy.shadowed();
    for dst in ["192.0.2.1:443", "[2001:db8::1]:80", "10.0.0.1:22"] {
        let dst: SocketAddr = dst.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        for proto in [
            crate::policy::Proto::Tcp,
            crate::policy::Proto::Udp,
            crate::policy::Proto::Icmp,
        ] {
            let _ = policy.judge(&crate::policy::Query {
                dst: dst.ip(),
                proto,
                port: Some(dst.port()),
                pinned: &["www.example.test".to_owned()],
                claim: crate::policy::Claim::Unread,
            });
        }
    }
}

/// Guest messages with valid framing and checksums, so the fuzzer reaches
/// the servers rather than the checksum checks: the first byte picks a
/// DHCP request (UDP 68 -> 67), a Router Solicitation or a Neighbor
/// Solicitation for the gateway (ICMPv6, hop limit 255), the rest is the
/// message. Each goes through [`frame`] and its server: DHCP replies stay
/// within the frame size, the advertiser answers at most once per
/// solicitation burst.
pub fn dhcp_ndp(data: &[u8]) {
    use crate::engine::{frames, ndp};
    use smoltcp::wire::EthernetAddress;
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let guest_mac = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let gateway_mac = EthernetAddress([0x52, 0x54, 0, 0, 0, 1]);
    let config = Config::embedded();
    let now = Instant::now();
    match pick % 3 {
        0 => {
            let ends = frames::Ends {
                src_mac: guest_mac,
                dst_mac: EthernetAddress::BROADCAST,
                src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                dst: IpAddr::V4(Ipv4Addr::BROADCAST),
                hop_limit: 64,
            };
            let built = frames::udp(&ends, 68, crate::wellknown::DHCP_SERVER_PORT, body);
            frame(&built);
            let mut server = dhcp::Server::new(&config.network);
            for _ in 0..2 {
                if let dhcp::Outcome::Reply(reply) = server.handle(body, now) {
                    assert!(reply.len() <= 1514, "DHCP reply of {} bytes", reply.len());
                }
            }
        }
        kind => {
            let own = own();
            let (gateway, link_local) = own
                .v6
                .unwrap_or((Ipv6Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED));
            let (dst, icmp_type) = if kind == 1 {
                (Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2), 133)
            } else {
                (gateway, 135)
            };
            let mut message = vec![icmp_type, 0, 0, 0];
            message.extend_from_slice(body);
            if icmp_type == 135 && message.len() >= 24 {
                // Mostly ask for one of the gateway's addresses.
                let target = if pick & 0x80 != 0 {
                    link_local
                } else {
                    gateway
                };
                message[8..24].copy_from_slice(&target.octets());
            }
            let ends = frames::Ends {
                src_mac: guest_mac,
                dst_mac: gateway_mac,
                src: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456)),
                dst: IpAddr::V6(dst),
                hop_limit: 255,
            };
            let built = frames::icmp_v6(&ends, &message);
            frame(&built);
            match classify::classify(&built, &own) {
                Kind::RouterSolicit => {
                    if let Some(mut ra) = ndp::Advertiser::new(&config.network) {
                        assert!(
                            ra.solicited(now).is_some(),
                            "a solicitation goes unanswered"
                        );
                        // A burst may be rate-limited or not: either way
                        // it must return.
                        let _ = ra.solicited(now);
                    }
                }
                Kind::NeighborSolicit { src, target } => {
                    assert!(own.is_own(IpAddr::V6(target)), "NS for {target} taken");
                    let na = ndp::neighbor_advert(gateway_mac, src, guest_mac, target);
                    assert!(na.len() <= 1514);
                }
                _ => {}
            }
        }
    }
}

/// Fragments with valid IP headers whose offsets, flags, identifications
/// and lengths the input chooses, IPv4 and IPv6, into a reassembler with a
/// small budget: the budget holds after every piece, and what comes out
/// is one whole datagram the usual path sees as no fragment.
pub fn fragments(data: &[u8]) {
    use crate::engine::reasm::{Limits, Outcome, Reassembler};
    use crate::metrics::Metrics;
    let limits = Limits {
        max_bytes: 96 << 10,
        max_bytes_per_source: 80 << 10,
        timeout: std::time::Duration::from_secs(15),
    };
    let metrics = Metrics::default();
    let mut reassembler = Reassembler::new(limits);
    let start = Instant::now();
    let mut rest = data;
    // Per piece: flags (family, more, time step), offset (2), id, length.
    while let [flags, o0, o1, id, len, tail @ ..] = rest {
        let len = usize::from(*len) * 8 + usize::from(flags & 7);
        let (payload, next) = tail.split_at(tail.len().min(len));
        rest = next;
        let v6 = flags & 0x80 != 0;
        let more = flags & 0x40 != 0;
        let offset = u16::from_be_bytes([*o0, *o1]) & 0x1fff;
        let piece = fragment_frame(v6, more, offset, *id, payload);
        let now = start + std::time::Duration::from_secs(u64::from(flags >> 3 & 7));
        if let Outcome::Complete(whole) = reassembler.offer(&piece, now, &metrics) {
            assert!(whole.len() <= 14 + 40 + 65_535, "{} bytes", whole.len());
            assert!(
                !matches!(classify::classify(&whole, &own()), Kind::Fragment),
                "a reassembled datagram is still a fragment"
            );
            assert_eq!(
                reassembler.offer(&whole, now, &metrics),
                Outcome::NotFragment
            );
        }
        assert!(reassembler.used() <= limits.max_bytes_per_source);
    }
}

/// A UDP fragment from the guest to a test host, with a correct header.
fn fragment_frame(v6: bool, more: bool, offset_units: u16, id: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x52, 0x54, 0, 0, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let field = offset_units << 3;
    if v6 {
        frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        let len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&[44, 64]);
        frame.extend_from_slice(&Ipv6Addr::new(0xfd76, 0x6761, 0x7465, 0, 0, 0, 0, 2).octets());
        frame.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10).octets());
        frame.extend_from_slice(&[17, 0]);
        frame.extend_from_slice(&(field | u16::from(more)).to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, id]);
    } else {
        frame.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        let len = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&[0, id]);
        let flags = (offset_units & 0x1fff) | if more { 0x2000 } else { 0 };
        frame.extend_from_slice(&flags.to_be_bytes());
        frame.extend_from_slice(&[64, 17, 0, 0, 198, 19, 0, 2, 192, 0, 2, 10]);
        let mut ip = smoltcp::wire::Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.fill_checksum();
    }
    frame.extend_from_slice(payload);
    frame
}

/// A VMM's byte stream through the message relay to a backend that reads
/// everything: whatever the messages (sizes, early enables, garbage), the
/// relay ends when the VMM closes, and never forwards a message larger
/// than the protocol's limit.
pub fn vhost_relay(data: &[u8]) {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    // Within the socket buffer: the writes below cannot block.
    let data = data.get(..64 * 1024).unwrap_or(data);
    let Ok((mut vmm, relay_vmm)) = UnixStream::pair() else {
        return;
    };
    let Ok((relay_backend, mut backend)) = UnixStream::pair() else {
        return;
    };
    if vmm.write_all(data).is_err() || vmm.shutdown(std::net::Shutdown::Write).is_err() {
        return;
    }
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        // The relay closes its end when it stops: end of stream.
        let _ = backend.read_to_end(&mut seen);
        seen
    });
    // Input the relay refuses (a message over the size limit, a short
    // one) ends it with an error, which is its answer to such a VMM.
    let _ = crate::vhost::compat::relay(relay_vmm, relay_backend);
    let forwarded = reader.join().unwrap_or_default();
    // What the backend got parses as whole messages within the limit.
    let mut at = 0;
    while let Some(header) = forwarded.get(at..at + 12) {
        let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        assert!(
            size <= vhost::vhost_user::message::MAX_MSG_SIZE,
            "forwarded a {size}-byte message"
        );
        at += 12 + size;
    }
    assert_eq!(at, forwarded.len(), "a partial message was forwarded");
}

/// A block-list file as the config reads it: every entry's line is one of
/// the file's; each entry that parses as a pattern blocks the name it
/// names (and, for `*.name`, the names under it), through the set the
/// forwarder uses as through the pattern itself.
pub fn block_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().count();
    for (line, name) in crate::config::dns::block_file_entries(&text) {
        assert!((1..=lines).contains(&line), "line {line} of {lines}");
        assert!(!name.contains('#') && !name.trim().is_empty(), "{name:?}");
        let Ok(pattern) = crate::names::Pattern::parse(name) else {
            continue;
        };
        let set = crate::names::NameSet::new([name]);
        let probe = match &pattern {
            crate::names::Pattern::Exact(n) => n.clone(),
            crate::names::Pattern::Under(n) => format!("x.{n}"),
        };
        assert!(pattern.matches(&probe), "{pattern} does not match {probe}");
        assert!(set.contains(&probe), "the set of {pattern} misses {probe}");
    }
}
