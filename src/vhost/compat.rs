//! The message relay between the VMM and vhost-user-backend's request
//! handler that makes QEMU 7.2's message order work.
//!
//! QEMU 7.2 sends `SET_VRING_ENABLE` before `SET_FEATURES`; the `vhost`
//! crate's dispatcher rejects it because PROTOCOL_FEATURES is not acked yet
//! and drops the connection, leaving the guest's NIC dead (FACTS.md). The
//! relay forwards every message unchanged (payload and file descriptors)
//! except early enables: it acks them itself when the VMM asked for a reply,
//! holds them, and replays them right after the `SET_FEATURES` that acks
//! PROTOCOL_FEATURES. cloud-hypervisor sends `SET_FEATURES` first and passes
//! through untouched. One thread per direction per VMM connection; this is the
//! control plane only, the data path never crosses it.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user header: request, flags, payload size, all u32 little-endian.
const HDR_LEN: usize = 12;
/// Protocol version 1 in the header flags.
const FLAG_VERSION_1: u32 = 0x1;
/// Header flag of a reply.
const FLAG_REPLY: u32 = 0x4;
/// Header flag asking for a REPLY_ACK answer.
const FLAG_NEED_REPLY: u32 = 0x8;
/// VHOST_USER_F_PROTOCOL_FEATURES in the virtio feature bits.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// VHOST_USER_PROTOCOL_F_REPLY_ACK in the protocol feature bits.
const REPLY_ACK_BIT: u64 = 1 << 3;
/// At most this many early enables are held (two per queue pair is all QEMU
/// sends; more is a misbehaving VMM and the extras are dropped).
const MAX_HELD_ENABLES: usize = 16;

/// One message read from a socket.
struct Message {
    header: [u8; HDR_LEN],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn field(&self, index: usize) -> u32 {
        let start = index * 4;
        self.header
            .get(start..start + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    fn request(&self) -> u32 {
        self.field(0)
    }

    fn flags(&self) -> u32 {
        self.field(1)
    }

    fn body_u64(&self) -> Option<u64> {
        self.body
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }

    fn new(request: u32, flags: u32, body: Vec<u8>) -> Self {
        let mut header = [0u8; HDR_LEN];
        let size = u32::try_from(body.len()).unwrap_or(0);
        for (i, v) in [request, flags, size].into_iter().enumerate() {
            if let Some(slot) = header.get_mut(i * 4..i * 4 + 4) {
                slot.copy_from_slice(&v.to_le_bytes());
            }
        }
        Self {
            header,
            body,
            fds: Vec::new(),
        }
    }
}

/// Reads one message; `Ok(None)` at a clean end of stream.
fn read_message(sock: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HDR_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, which lives across the call and is
    // valid for writes of its length.
    let (got, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw_fds
        .iter()
        .take(nfds)
        // SAFETY: recvmsg gave us these descriptors; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Ok(None);
    }
    if got < HDR_LEN {
        sock.read_exact(header.get_mut(got..).unwrap_or_default())?;
    }
    let mut message = Message {
        header,
        body: Vec::new(),
        fds,
    };
    let size = usize::try_from(message.field(2)).unwrap_or(usize::MAX);
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes exceeds {MAX_MSG_SIZE}"),
        ));
    }
    message.body.resize(size, 0);
    sock.read_exact(&mut message.body)?;
    Ok(Some(message))
}

fn write_message(sock: &UnixStream, message: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = message.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let parts: [&[u8]; 2] = [&message.header, &message.body];
    let total = HDR_LEN + message.body.len();
    let sent = sock
        .send_with_fds(&parts, &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent < total {
        // Descriptors went with the first byte; the rest is plain data.
        let mut rest = Vec::with_capacity(total - sent);
        rest.extend_from_slice(&message.header);
        rest.extend_from_slice(&message.body);
        let mut writer = sock;
        writer.write_all(rest.get(sent..).unwrap_or_default())?;
    }
    Ok(())
}

/// What the relay decided about one message from the VMM.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Pass it on.
    Forward,
    /// Pass it on, then replay these held (index, enable) pairs.
    ForwardThenReplay(Vec<[u8; 8]>),
    /// Hold it; answer the VMM with an ack if it wants one.
    Hold { ack: bool },
}

/// The relay's view of the negotiation.
#[derive(Debug, Default)]
struct Negotiation {
    protocol_features_acked: bool,
    reply_ack: bool,
    held: Vec<[u8; 8]>,
}

impl Negotiation {
    fn step(&mut self, message: &Message) -> Step {
        let request = message.request();
        if request == FrontendReq::SET_PROTOCOL_FEATURES as u32 {
            self.reply_ack = message.body_u64().is_some_and(|f| f & REPLY_ACK_BIT != 0);
            Step::Forward
        } else if request == FrontendReq::SET_FEATURES as u32 {
            let acked = message
                .body_u64()
                .is_some_and(|f| f & PROTOCOL_FEATURES_BIT != 0);
            self.protocol_features_acked = acked;
            if acked && !self.held.is_empty() {
                Step::ForwardThenReplay(std::mem::take(&mut self.held))
            } else {
                Step::Forward
            }
        } else if request == FrontendReq::RESET_OWNER as u32
            || request == FrontendReq::RESET_DEVICE as u32
        {
            self.protocol_features_acked = false;
            self.held.clear();
            Step::Forward
        } else if request == FrontendReq::SET_VRING_ENABLE as u32 && !self.protocol_features_acked {
            if let Ok(state) = <[u8; 8]>::try_from(message.body.as_slice())
                && self.held.len() < MAX_HELD_ENABLES
            {
                // A later enable/disable of the same ring replaces the earlier.
                self.held.retain(|h| h.get(..4) != state.get(..4));
                self.held.push(state);
            }
            Step::Hold {
                ack: self.reply_ack && message.flags() & FLAG_NEED_REPLY != 0,
            }
        } else {
            Step::Forward
        }
    }
}

/// Relays one VMM connection to the backend handler's socket until either
/// side closes. Returns when both directions have stopped.
pub fn relay(vmm: UnixStream, backend: UnixStream) -> io::Result<()> {
    let vmm_writer = Arc::new(Mutex::new(vmm.try_clone()?));
    let backend_reader = backend.try_clone()?;
    let to_vmm = vmm_writer.clone();
    let vmm_for_shutdown = vmm.try_clone()?;
    let replies = std::thread::Builder::new()
        .name("vhost-relay".into())
        .spawn(move || {
            let result = copy_replies(backend_reader, &to_vmm);
            let _ = vmm_for_shutdown.shutdown(std::net::Shutdown::Both);
            result
        })?;
    let result = forward_requests(vmm, &backend, &vmm_writer);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let replies_result = replies
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("relay thread panicked")));
    result.and(replies_result)
}

fn copy_replies(mut backend: UnixStream, vmm: &Mutex<UnixStream>) -> io::Result<()> {
    while let Some(message) = read_message(&mut backend)? {
        let vmm = vmm
            .lock()
            .map_err(|_| io::Error::other("relay lock poisoned"))?;
        write_message(&vmm, &message)?;
    }
    Ok(())
}

fn forward_requests(
    mut vmm: UnixStream,
    backend: &UnixStream,
    vmm_writer: &Mutex<UnixStream>,
) -> io::Result<()> {
    let mut negotiation = Negotiation::default();
    while let Some(message) = read_message(&mut vmm)? {
        tracing::trace!(request = message.request(), "vhost-user request");
        match negotiation.step(&message) {
            Step::Forward => write_message(backend, &message)?,
            Step::ForwardThenReplay(held) => {
                write_message(backend, &message)?;
                tracing::debug!(count = held.len(), "replaying early SET_VRING_ENABLE");
                for state in held {
                    // No NEED_REPLY: the backend answers nothing, so the VMM
                    // never sees a reply it did not ask for.
                    let replay = Message::new(
                        FrontendReq::SET_VRING_ENABLE as u32,
                        FLAG_VERSION_1,
                        state.to_vec(),
                    );
                    write_message(backend, &replay)?;
                }
            }
            Step::Hold { ack } => {
                tracing::debug!("holding SET_VRING_ENABLE sent before SET_FEATURES");
                if ack {
                    let reply = Message::new(
                        message.request(),
                        FLAG_VERSION_1 | FLAG_REPLY,
                        0u64.to_le_bytes().to_vec(),
                    );
                    let vmm = vmm_writer
                        .lock()
                        .map_err(|_| io::Error::other("relay lock poisoned"))?;
                    write_message(&vmm, &reply)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: FrontendReq, flags: u32, body: &[u8]) -> Message {
        Message::new(request as u32, flags, body.to_vec())
    }

    fn enable(index: u32, on: u32) -> Vec<u8> {
        [index.to_le_bytes(), on.to_le_bytes()].concat()
    }

    #[test]
    fn qemu_order_holds_enables_until_protocol_features_acked() {
        let mut n = Negotiation::default();
        assert_eq!(
            n.step(&msg(
                FrontendReq::SET_PROTOCOL_FEATURES,
                1,
                &(REPLY_ACK_BIT | 1).to_le_bytes()
            )),
            Step::Forward
        );
        assert_eq!(
            n.step(&msg(FrontendReq::SET_VRING_ENABLE, 1, &enable(0, 1))),
            Step::Hold { ack: false }
        );
        assert_eq!(
            n.step(&msg(
                FrontendReq::SET_VRING_ENABLE,
                1 | FLAG_NEED_REPLY,
                &enable(1, 1)
            )),
            Step::Hold { ack: true }
        );
        // A second enable of ring 0 replaces the first.
        n.step(&msg(FrontendReq::SET_VRING_ENABLE, 1, &enable(0, 1)));
        // SET_FEATURES without PROTOCOL_FEATURES releases nothing.
        assert_eq!(
            n.step(&msg(FrontendReq::SET_FEATURES, 1, &1u64.to_le_bytes())),
            Step::Forward
        );
        let Step::ForwardThenReplay(held) = n.step(&msg(
            FrontendReq::SET_FEATURES,
            1,
            &PROTOCOL_FEATURES_BIT.to_le_bytes(),
        )) else {
            panic!("enables not replayed")
        };
        assert_eq!(held.len(), 2);
        assert_eq!(held.iter().map(|h| h[0]).collect::<Vec<_>>(), vec![1, 0]);
        // After the ack, enables pass straight through.
        assert_eq!(
            n.step(&msg(FrontendReq::SET_VRING_ENABLE, 1, &enable(0, 0))),
            Step::Forward
        );
    }

    #[test]
    fn cloud_hypervisor_order_passes_through() {
        let mut n = Negotiation::default();
        assert_eq!(
            n.step(&msg(
                FrontendReq::SET_FEATURES,
                1,
                &PROTOCOL_FEATURES_BIT.to_le_bytes()
            )),
            Step::Forward
        );
        assert_eq!(
            n.step(&msg(FrontendReq::SET_VRING_ENABLE, 1, &enable(0, 1))),
            Step::Forward
        );
    }

    #[test]
    fn malformed_and_excess_enables_are_bounded() {
        let mut n = Negotiation::default();
        n.step(&msg(FrontendReq::SET_VRING_ENABLE, 1, &[1, 2, 3]));
        for i in 0..100 {
            n.step(&msg(FrontendReq::SET_VRING_ENABLE, 1, &enable(i, 1)));
        }
        assert_eq!(n.held.len(), MAX_HELD_ENABLES);
        n.step(&msg(FrontendReq::RESET_OWNER, 1, &[]));
        assert!(n.held.is_empty());
    }

    #[test]
    fn messages_with_fds_cross_a_socket_pair_intact() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (r, _w) = UnixStream::pair().unwrap();
        let mut m = msg(FrontendReq::SET_VRING_KICK, 1, &7u64.to_le_bytes());
        m.fds.push(OwnedFd::from(r));
        write_message(&a, &m).unwrap();
        let got = read_message(&mut b).unwrap().unwrap();
        assert_eq!(got.request(), FrontendReq::SET_VRING_KICK as u32);
        assert_eq!(got.body_u64(), Some(7));
        assert_eq!(got.fds.len(), 1);
        drop(a);
        assert!(read_message(&mut b).unwrap().is_none());
    }

    #[test]
    fn oversized_message_is_an_error_not_an_allocation() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut header = Vec::new();
        for v in [1u32, 1, u32::MAX] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        (&a).write_all(&header).unwrap();
        assert!(read_message(&mut b).is_err());
    }
}
