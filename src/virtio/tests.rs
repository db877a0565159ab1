//! Chains built by hand on mock guest memory, malformed ones included.

use super::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_LEN: u16 = 16;
const DATA: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x40_0000;
const MTU_FRAME: usize = 1514;
const LAYOUT: Layout = Layout::plain(NET_HDR_LEN, true, false);

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        u16::try_from(flags).unwrap(),
        0,
    ))
}

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
}

/// Puts a header and a frame in guest memory as a two-descriptor TX chain and
/// reads it back.
#[test]
fn tx_chain_header_and_frame_in_separate_descriptors() {
    let mem = memory();
    let q = MockSplitQueue::new(&mem, QUEUE_LEN);
    let payload = frame(100);
    mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&payload, GuestAddress(DATA + 0x1000))
        .unwrap();
    let chain = q
        .build_desc_chain(&[desc(DATA, 12, 0), desc(DATA + 0x1000, 100, 0)])
        .unwrap();
    let mut buf = Vec::new();
    let read = read_tx_chain(&mem, chain, LAYOUT, MTU_FRAME, &mut buf).unwrap();
    assert_eq!(read.len, 100);
    assert!(!read.segmented);
    assert_eq!(&buf[NET_HDR_LEN..NET_HDR_LEN + read.len], &payload[..]);
}

#[test]
fn hostile_tx_chains_are_dropped_with_a_reason() {
    let cases: Vec<(&str, Vec<RawDescriptor>, Drop)> = vec![
        (
            "outside memory",
            vec![desc(MEM_SIZE as u64 + 0x1000, 200, 0)],
            Drop::BadChain,
        ),
        (
            "straddles end of memory",
            vec![desc(MEM_SIZE as u64 - 10, 200, 0)],
            Drop::BadChain,
        ),
        (
            "write-only",
            vec![desc(DATA, 200, VRING_DESC_F_WRITE)],
            Drop::WrongDirection,
        ),
        (
            "shorter than header",
            vec![desc(DATA, 8, 0)],
            Drop::TooShort,
        ),
        (
            "header without ethernet",
            vec![desc(DATA, 12 + 13, 0)],
            Drop::TooShort,
        ),
        (
            "huge",
            vec![desc(DATA, 12 + u32::try_from(MTU_FRAME).unwrap() + 1, 0)],
            Drop::TooLong,
        ),
        (
            "length overflow",
            vec![desc(DATA, u32::MAX, 0), desc(DATA, u32::MAX, 0)],
            Drop::BadChain,
        ),
    ];
    for (name, descs, want) in cases {
        let mem = memory();
        let q = MockSplitQueue::new(&mem, QUEUE_LEN);
        let chain = q.build_desc_chain(&descs).unwrap();
        let mut buf = Vec::new();
        let got = read_tx_chain(&mem, chain, LAYOUT, MTU_FRAME, &mut buf);
        assert_eq!(got, Err(want), "{name}");
    }
}

#[test]
fn looping_tx_chain_terminates_and_is_dropped() {
    let mem = memory();
    let q = MockSplitQueue::new(&mem, QUEUE_LEN);
    // Descriptor 0 -> 1 -> 0 -> ...: a loop the guest wrote on purpose.
    let looped = [
        RawDescriptor::from(SplitDescriptor::new(
            DATA,
            64,
            u16::try_from(VRING_DESC_F_NEXT).unwrap(),
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            DATA,
            64,
            u16::try_from(VRING_DESC_F_NEXT).unwrap(),
            0,
        )),
    ];
    let chain = q.build_multiple_desc_chains(&looped).unwrap();
    let mut buf = Vec::new();
    let got = read_tx_chain(&mem, chain, LAYOUT, 65550, &mut buf);
    // The loop is cut by the queue-size bound: the chain is either rejected
    // outright or read as a finite (and then too long or bounded) frame.
    assert!(
        matches!(got, Err(Drop::BadChain) | Err(Drop::TooLong) | Ok(_)),
        "{got:?}"
    );
    assert!(buf.len() <= usize::from(QUEUE_LEN) * 64);
}

fn rx_queue<'a>(
    mem: &'a GuestMemoryMmap,
    buffers: &[u32],
) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
    let q = MockSplitQueue::new(mem, QUEUE_LEN);
    let descs: Vec<RawDescriptor> = buffers
        .iter()
        .enumerate()
        .map(|(i, len)| desc(DATA + 0x1_0000 * i as u64, *len, VRING_DESC_F_WRITE))
        .collect();
    q.add_desc_chains(&descs, 0).unwrap();
    let queue: Queue = q.create_queue().unwrap();
    (q, queue)
}

/// Writes `packet` (header, then frame) as the engine does.
fn write(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    layout: Layout,
    packet: &mut [u8],
) -> Result<u16, Drop> {
    let (header, frame) = packet.split_at_mut(layout.hdr_len);
    write_rx_frame(queue, mem, layout, header, frame)
}

fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = q.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

#[test]
fn rx_frame_merges_across_small_buffers_and_sets_num_buffers() {
    let mem = memory();
    let (q, mut queue) = rx_queue(&mem, &[1000, 1000, 1000]);
    let mut packet = vec![0u8; NET_HDR_LEN];
    packet.extend(frame(2500));
    let n = write(&mut queue, &mem, LAYOUT, &mut packet).unwrap();
    assert_eq!(n, 3);
    assert_eq!(q.used().idx().load(), 3);
    assert_eq!(used(&q, 0), (0, 1000));
    assert_eq!(used(&q, 1), (1, 1000));
    assert_eq!(used(&q, 2), (2, 2512 - 2000));
    let mut hdr = [0u8; NET_HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(DATA)).unwrap();
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3);
    let mut tail = vec![0u8; 512];
    mem.read_slice(&mut tail, GuestAddress(DATA + 0x2_0000))
        .unwrap();
    assert_eq!(&tail[..], &packet[2000..]);
}

#[test]
fn rx_without_enough_buffers_puts_them_back() {
    let mem = memory();
    let (q, mut queue) = rx_queue(&mem, &[1000]);
    let mut packet = vec![0u8; NET_HDR_LEN + 1500];
    assert_eq!(
        write(&mut queue, &mem, LAYOUT, &mut packet),
        Err(Drop::NoRxBuffers)
    );
    assert_eq!(q.used().idx().load(), 0);
    assert!(rx_available(&queue, &mem));
    // A frame that fits still goes into the same buffer afterwards.
    let mut small = vec![0u8; NET_HDR_LEN + 100];
    assert_eq!(write(&mut queue, &mem, LAYOUT, &mut small), Ok(1));
    assert!(!rx_available(&queue, &mem));
}

#[test]
fn rx_single_chain_too_small_is_returned_empty() {
    let mem = memory();
    let (q, mut queue) = rx_queue(&mem, &[100]);
    let layout = Layout::plain(NET_HDR_LEN, false, false);
    let mut packet = vec![0u8; NET_HDR_LEN + 500];
    assert_eq!(
        write(&mut queue, &mem, layout, &mut packet),
        Err(Drop::RxBuffersTooSmall)
    );
    assert_eq!(used(&q, 0), (0, 0));
}

#[test]
fn rx_buffer_outside_memory_is_skipped() {
    let mem = memory();
    let q = MockSplitQueue::new(&mem, QUEUE_LEN);
    q.add_desc_chains(
        &[
            desc(MEM_SIZE as u64 * 2, 2000, VRING_DESC_F_WRITE),
            desc(DATA, 2000, VRING_DESC_F_WRITE),
        ],
        0,
    )
    .unwrap();
    let mut queue: Queue = q.create_queue().unwrap();
    let mut packet = vec![0u8; NET_HDR_LEN + 100];
    assert_eq!(write(&mut queue, &mem, LAYOUT, &mut packet), Ok(1));
    assert_eq!(used(&q, 0), (0, 0));
    assert_eq!(used(&q, 1), (1, 112));
}

#[test]
fn rx_with_no_buffers_is_reported() {
    let mem = memory();
    let (_q, mut queue) = rx_queue(&mem, &[]);
    let mut packet = vec![0u8; NET_HDR_LEN + 100];
    assert_eq!(
        write(&mut queue, &mem, LAYOUT, &mut packet),
        Err(Drop::NoRxBuffers)
    );
    assert!(!rx_available(&queue, &mem));
}

#[test]
fn layout_follows_features() {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
    assert_eq!(Layout::from_features(0).hdr_len, LEGACY_NET_HDR_LEN);
    assert_eq!(
        Layout::from_features(1 << VIRTIO_F_VERSION_1).hdr_len,
        NET_HDR_LEN
    );
    assert!(Layout::from_features(1 << VIRTIO_NET_F_MRG_RXBUF).mergeable);
}

/// A UDP/IPv4 frame whose checksum the guest left partial: the pseudo-header
/// sum in the field, NEEDS_CSUM with start and offset in the header.
#[test]
fn partial_checksums_are_completed_and_bad_offsets_dropped() {
    use smoltcp::wire::{EthernetFrame, IpAddress, Ipv4Packet, UdpPacket};
    let (src, dst): (IpAddress, IpAddress) =
        (IpAddress::v4(198, 19, 0, 2), IpAddress::v4(192, 0, 2, 1));
    let mut frame = vec![0u8; 14 + 20 + 8 + 5];
    frame[12] = 0x08; // IPv4
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(33);
        ip.set_hop_limit(64);
        ip.set_next_header(smoltcp::wire::IpProtocol::Udp);
        ip.set_src_addr("198.19.0.2".parse().unwrap());
        ip.set_dst_addr("192.0.2.1".parse().unwrap());
        ip.fill_checksum();
        let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
        udp.set_src_port(1000);
        udp.set_dst_port(2000);
        udp.set_len(13);
        udp.payload_mut().copy_from_slice(b"hello");
        udp.fill_checksum(&src, &dst);
    }
    let good = frame.clone();
    // Replace the full checksum with the pseudo-header sum, as Linux does
    // with checksum offload: sum(src, dst, proto, udp length).
    let pseudo: u32 = 0xc613 + 0x0002 + 0xc000 + 0x0201 + 17 + 13;
    let folded = u16::try_from((pseudo & 0xffff) + (pseudo >> 16)).unwrap();
    frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&folded.to_be_bytes());
    let mut packet = vec![0u8; NET_HDR_LEN];
    packet[0] = 1; // NEEDS_CSUM
    packet[6..8].copy_from_slice(&34u16.to_le_bytes());
    packet[8..10].copy_from_slice(&6u16.to_le_bytes());
    packet.extend_from_slice(&frame);
    offload::tx(&mut packet, LAYOUT).unwrap();
    assert_eq!(&packet[NET_HDR_LEN..], &good[..]);
    let eth = EthernetFrame::new_checked(&packet[NET_HDR_LEN..]).unwrap();
    assert!(
        Ipv4Packet::new_checked(eth.payload())
            .unwrap()
            .verify_checksum()
    );

    for (start, offset) in [(60u16, 0u16), (34, 100), (u16::MAX, u16::MAX)] {
        let mut p = packet.clone();
        p[6..8].copy_from_slice(&start.to_le_bytes());
        p[8..10].copy_from_slice(&offset.to_le_bytes());
        assert_eq!(
            offload::tx(&mut p, LAYOUT),
            Err(Drop::BadOffload),
            "{start}/{offset}"
        );
    }
    let mut gso = packet.clone();
    gso[1] = 1;
    assert_eq!(offload::tx(&mut gso, LAYOUT), Err(Drop::BadOffload));
}

#[test]
fn rx_header_marks_data_valid_only_when_acked() {
    let mut h = [0xffu8; NET_HDR_LEN];
    let mut frame = frame(60);
    assert!(rx_header(LAYOUT, &mut h, &mut frame, None));
    assert_eq!(h, [0; NET_HDR_LEN]);
    let csum = Layout::plain(NET_HDR_LEN, true, true);
    assert!(rx_header(csum, &mut h, &mut frame, None));
    assert_eq!(h[0], 2);
}
