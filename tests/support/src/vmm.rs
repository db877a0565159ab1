//! A VMM played by the test: a vhost-user frontend speaking raw messages (so
//! it can replay QEMU's and cloud-hypervisor's exact orders, including the
//! ones the `vhost` crate's own frontend refuses to send), memfd guest memory
//! shared with the daemon, and a split-virtqueue driver for the RX and TX
//! rings.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const SET_VRING_ENABLE: u32 = 18;
pub const GET_CONFIG: u32 = 24;

const FLAG_VERSION: u32 = 0x1;
const FLAG_NEED_REPLY: u32 = 0x8;
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;
pub const PF_CONFIG: u64 = 1 << 9;
pub const PF_REPLY_ACK: u64 = 1 << 3;

pub const RX: u32 = 0;
pub const TX: u32 = 1;
pub const NET_HDR_LEN: usize = 12;
pub const MEM_SIZE: usize = 64 << 20;
/// Where the frontend claims guest memory is mapped in its own address space;
/// vring addresses are sent in this space, as QEMU does.
const USER_BASE: u64 = 0x7f00_0000_0000;
pub const QUEUE_SIZE: u16 = 256;
const RING_BASE: [u64; 2] = [0x0, 0x1_0000];
pub const TX_BUFS: u64 = 0x10_0000;
/// A TX slot holds a header and a 64 KiB frame.
const TX_SLOT: u64 = 0x1_1000;
pub const RX_BUFS: u64 = 0x200_0000;
/// RX buffers are 4 KiB, as a guest's mergeable buffers are; larger frames
/// are merged across several.
pub const BUF_SIZE: u64 = 0x1000;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// The driver side of one split virtqueue in guest memory.
pub struct Ring {
    base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    fn new(base: u64) -> Self {
        Self {
            base,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn desc_addr(&self) -> u64 {
        self.base
    }

    pub fn avail_addr(&self) -> u64 {
        self.base + 16 * u64::from(QUEUE_SIZE)
    }

    pub fn used_addr(&self) -> u64 {
        // Avail ring: flags, idx, ring[size], used_event; used ring 4-aligned.
        (self.avail_addr() + 6 + 2 * u64::from(QUEUE_SIZE) + 3) & !3
    }

    /// Writes a chain of raw descriptors (addr, len, flags; NEXT is filled
    /// in), publishes it, returns its head index.
    pub fn push(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + u16::try_from(i).unwrap()) % QUEUE_SIZE;
            let last = i + 1 == descs.len();
            let next = (index + 1) % QUEUE_SIZE;
            let flags = if last { *flags } else { flags | DESC_F_NEXT };
            self.write_desc(mem, index, *addr, *len, flags, next);
        }
        self.next_desc = (head + u16::try_from(descs.len()).unwrap()) % QUEUE_SIZE;
        self.publish(mem, head);
        head
    }

    /// Writes one descriptor exactly as given (for hostile chains).
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc_addr() + 16 * u64::from(index));
        mem.write_obj(addr.to_le(), at).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
            .unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
            .unwrap();
    }

    /// Puts `head` in the avail ring and bumps its index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(head.to_le(), GuestAddress(self.avail_addr() + 4 + 2 * slot))
            .unwrap();
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Sets the avail index directly (for hostile rings).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.write_obj(idx.to_le(), GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Used entries (id, len) not seen yet.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used_addr() + 2)).unwrap();
        fence(Ordering::Acquire);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QUEUE_SIZE);
            let at = GuestAddress(self.used_addr() + 4 + 8 * slot);
            let id: u32 = mem.read_obj(at).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at.0 + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// One connected VMM with its memory and rings.
pub struct Vmm {
    sock: UnixStream,
    pub mem: GuestMemoryMmap,
    memfd: File,
    pub rings: [Ring; 2],
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    pub features: u64,
    rx_slot: u64,
    tx_slot: u64,
    /// Buffer address by descriptor head.
    rx_posted: Vec<u64>,
    rx_consumed: usize,
    tx_done: u64,
}

fn memfd(size: usize) -> File {
    // SAFETY: memfd_create with a valid C string; result checked.
    let fd = unsafe { libc::memfd_create(c"vmm-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fresh descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

impl Vmm {
    /// Connects; the handshake is up to the caller (see `qemu_start` and
    /// `cloud_hypervisor_start`).
    pub fn connect(socket: &Path) -> Self {
        let sock = UnixStream::connect(socket).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let memfd = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(memfd.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let efd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Self {
            sock,
            mem,
            memfd,
            rings: [Ring::new(RING_BASE[0]), Ring::new(RING_BASE[1])],
            kicks: [efd(), efd()],
            calls: [efd(), efd()],
            features: 0,
            rx_slot: 0,
            tx_slot: 0,
            rx_posted: vec![0; usize::from(QUEUE_SIZE)],
            rx_consumed: 0,
            tx_done: 0,
        }
    }

    /// Sends one message; `need_reply` sets NEED_REPLY.
    pub fn send(&mut self, request: u32, body: &[u8], fds: &[RawFd], need_reply: bool) {
        let flags = FLAG_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        let mut msg = Vec::new();
        for v in [request, flags, u32::try_from(body.len()).unwrap()] {
            msg.extend_from_slice(&v.to_le_bytes());
        }
        msg.extend_from_slice(body);
        self.send_raw(&msg, fds);
    }

    /// Sends bytes as they are (for malformed messages).
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let sent = self.sock.send_with_fds(&[bytes], fds).unwrap();
        if sent < bytes.len() {
            self.sock.write_all(&bytes[sent..]).unwrap();
        }
    }

    /// Reads one reply; returns (request, body).
    pub fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut hdr = [0u8; 12];
        self.sock.read_exact(&mut hdr).unwrap();
        let field = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
        let mut body = vec![0u8; field(2) as usize];
        self.sock.read_exact(&mut body).unwrap();
        (field(0), body)
    }

    fn get_u64(&mut self, request: u32) -> u64 {
        self.send(request, &[], &[], false);
        let (req, body) = self.reply();
        assert_eq!(req, request);
        u64::from_le_bytes(body[..8].try_into().unwrap())
    }

    /// Sends with NEED_REPLY and checks the ack says success.
    pub fn send_acked(&mut self, request: u32, body: &[u8], fds: &[RawFd]) {
        self.send(request, body, fds, true);
        let (req, reply) = self.reply();
        assert_eq!(req, request, "reply to the wrong request");
        assert_eq!(
            u64::from_le_bytes(reply[..8].try_into().unwrap()),
            0,
            "request {request} failed"
        );
    }

    fn state(index: u32, num: u32) -> Vec<u8> {
        [index.to_le_bytes(), num.to_le_bytes()].concat()
    }

    fn negotiate_protocol(&mut self) -> u64 {
        let offered = self.get_u64(GET_PROTOCOL_FEATURES);
        let wanted = offered & (PF_CONFIG | PF_REPLY_ACK);
        self.send(SET_PROTOCOL_FEATURES, &wanted.to_le_bytes(), &[], false);
        wanted
    }

    fn set_mem_table(&mut self) {
        let mut body = Vec::new();
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        for v in [0u64, MEM_SIZE as u64, USER_BASE, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let fd = self.memfd.as_raw_fd();
        self.send_acked(SET_MEM_TABLE, &body, &[fd]);
    }

    fn setup_ring(&mut self, index: u32) {
        let ring = &self.rings[index as usize];
        let mut addr = Vec::new();
        addr.extend_from_slice(&index.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes());
        for v in [ring.desc_addr(), ring.used_addr(), ring.avail_addr(), 0] {
            addr.extend_from_slice(&(USER_BASE + v).to_le_bytes());
        }
        self.send(
            SET_VRING_NUM,
            &Self::state(index, u32::from(QUEUE_SIZE)),
            &[],
            false,
        );
        self.send(SET_VRING_BASE, &Self::state(index, 0), &[], false);
        self.send(SET_VRING_ADDR, &addr, &[], false);
        let kick = self.kicks[index as usize].as_raw_fd();
        self.send(
            SET_VRING_KICK,
            &u64::from(index).to_le_bytes(),
            &[kick],
            false,
        );
        let call = self.calls[index as usize].as_raw_fd();
        self.send_acked(SET_VRING_CALL, &u64::from(index).to_le_bytes(), &[call]);
    }

    /// QEMU 7.2's order (FACTS.md): vring enables before SET_FEATURES, which
    /// comes only at DRIVER_OK, followed by memory and ring setup.
    pub fn qemu_start(socket: &Path, event_idx: bool) -> Self {
        Self::qemu_start_with(socket, event_idx, 0)
    }

    /// `qemu_start` also acking `extra` feature bits where offered.
    pub fn qemu_start_with(socket: &Path, event_idx: bool, extra: u64) -> Self {
        let mut vmm = Self::connect(socket);
        let offered = vmm.get_u64(GET_FEATURES);
        vmm.negotiate_protocol();
        vmm.send(SET_OWNER, &[], &[], false);
        let _ = vmm.get_u64(GET_FEATURES);
        for q in [RX, TX] {
            let call = vmm.calls[q as usize].as_raw_fd();
            vmm.send(SET_VRING_CALL, &u64::from(q).to_le_bytes(), &[call], false);
        }
        // The early enables; the second asks for an ack, which the daemon
        // must give even though it cannot apply the enable yet.
        vmm.send(SET_VRING_ENABLE, &Self::state(RX, 1), &[], false);
        vmm.send_acked(SET_VRING_ENABLE, &Self::state(TX, 1), &[]);
        vmm.features = offered
            & (extra
                | F_VERSION_1
                | F_MRG_RXBUF
                | F_PROTOCOL_FEATURES
                | if event_idx { F_EVENT_IDX } else { 0 });
        vmm.send_acked(SET_FEATURES, &vmm.features.to_le_bytes(), &[]);
        vmm.set_mem_table();
        vmm.setup_ring(RX);
        vmm.setup_ring(TX);
        vmm
    }

    /// cloud-hypervisor's order: features first, enables last.
    pub fn cloud_hypervisor_start(socket: &Path) -> Self {
        let mut vmm = Self::connect(socket);
        vmm.send(SET_OWNER, &[], &[], false);
        let offered = vmm.get_u64(GET_FEATURES);
        vmm.negotiate_protocol();
        vmm.features = offered & (F_VERSION_1 | F_MRG_RXBUF | F_PROTOCOL_FEATURES | F_EVENT_IDX);
        vmm.send_acked(SET_FEATURES, &vmm.features.to_le_bytes(), &[]);
        vmm.set_mem_table();
        for q in [RX, TX] {
            vmm.setup_ring(q);
            vmm.send_acked(SET_VRING_ENABLE, &Self::state(q, 1), &[]);
        }
        vmm
    }

    pub fn kick(&self, queue: u32) {
        self.kicks[queue as usize].write(1).unwrap();
    }

    /// Posts `n` RX buffers of BUF_SIZE bytes.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = RX_BUFS + (self.rx_slot % u64::from(QUEUE_SIZE)) * BUF_SIZE;
            self.rx_slot += 1;
            let head = self.rings[RX as usize].push(
                &self.mem,
                &[(addr, u32::try_from(BUF_SIZE).unwrap(), DESC_F_WRITE)],
            );
            self.rx_posted[usize::from(head)] = addr;
        }
        self.kick(RX);
    }

    /// Sends one frame (header prepended) as a two-descriptor TX chain.
    pub fn send_frame(&mut self, frame: &[u8]) {
        self.send_packet(&[0u8; NET_HDR_LEN], frame);
    }

    /// Sends one frame behind the given virtio-net header.
    pub fn send_packet(&mut self, header: &[u8; NET_HDR_LEN], frame: &[u8]) {
        let addr = TX_BUFS + (self.tx_slot % u64::from(QUEUE_SIZE)) * TX_SLOT;
        self.tx_slot += 1;
        self.mem.write_slice(header, GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(frame, GuestAddress(addr + NET_HDR_LEN as u64))
            .unwrap();
        self.rings[TX as usize].push(
            &self.mem,
            &[
                (addr, u32::try_from(NET_HDR_LEN).unwrap(), 0),
                (
                    addr + NET_HDR_LEN as u64,
                    u32::try_from(frame.len()).unwrap(),
                    0,
                ),
            ],
        );
        self.kick(TX);
    }

    /// Sends a TX chain made of raw descriptors (for hostile input).
    pub fn send_chain(&mut self, descs: &[(u64, u32, u16)]) {
        self.rings[TX as usize].push(&self.mem, descs);
        self.kick(TX);
    }

    /// Frames received so far (merged buffers joined, header stripped).
    pub fn recv_frames(&mut self) -> Vec<Vec<u8>> {
        let used = self.rings[RX as usize].take_used(&self.mem);
        self.rx_consumed += used.len();
        let mut frames = Vec::new();
        let mut iter = used.into_iter();
        while let Some((id, len)) = iter.next() {
            let mut data = self.read_rx(id, len);
            if data.len() < NET_HDR_LEN {
                continue;
            }
            let buffers = u16::from_le_bytes([data[10], data[11]]);
            for _ in 1..buffers {
                if let Some((id, len)) = iter.next() {
                    data.extend(self.read_rx(id, len));
                }
            }
            frames.push(data[NET_HDR_LEN..].to_vec());
        }
        frames
    }

    fn read_rx(&self, id: u32, len: u32) -> Vec<u8> {
        let addr = self.rx_posted[id as usize % usize::from(QUEUE_SIZE)];
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }

    /// Waits for a received frame that `want` accepts; returns it.
    pub fn wait_frame(
        &mut self,
        limit: Duration,
        mut want: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            for f in self.recv_frames() {
                if want(&f) {
                    return Some(f);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    /// Used TX entries so far.
    pub fn tx_completed(&mut self) -> usize {
        let n = self.rings[TX as usize].take_used(&self.mem).len();
        self.tx_done += n as u64;
        usize::try_from(self.tx_done).unwrap()
    }

    /// TX frames sent and not yet returned by the daemon.
    pub fn tx_inflight(&mut self) -> usize {
        self.tx_completed();
        usize::try_from(self.tx_slot.saturating_sub(self.tx_done)).unwrap()
    }

    /// RX buffers the daemon has filled since the last call.
    pub fn rx_consumed(&mut self) -> usize {
        std::mem::take(&mut self.rx_consumed)
    }

    /// Reads the device config space.
    pub fn get_config(&mut self, size: u32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend(vec![0u8; size as usize]);
        self.send(GET_CONFIG, &body, &[], false);
        let (req, reply) = self.reply();
        assert_eq!(req, GET_CONFIG);
        reply[12..].to_vec()
    }

    /// Whether the daemon has closed our connection.
    pub fn is_closed(&mut self) -> bool {
        self.sock.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let closed = matches!(self.sock.read(&mut b), Ok(0));
        self.sock.set_nonblocking(false).unwrap();
        closed
    }
}
