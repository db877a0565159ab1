//! ICMP echo to outside hosts through unprivileged ping sockets
//! (`SOCK_DGRAM, IPPROTO_ICMP[V6]`): one socket per (guest, destination,
//! guest identifier) session. The kernel picks the identifier on the wire and
//! matches replies to the socket; the engine restores the guest's own.
//!
//! The engine owns the sockets (see `engine::icmp`); this module opens
//! them and frames what goes through them.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// Opens a ping socket for `family`; fails with EACCES where
/// `net.ipv4.ping_group_range` excludes our group.
pub fn open(dst: IpAddr) -> std::io::Result<std::net::UdpSocket> {
    let (domain, protocol) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(protocol))?;
    socket.set_nonblocking(true)?;
    socket.connect(&SocketAddr::new(dst, 0).into())?;
    // A ping socket speaks datagrams like UDP does: send and recv are all
    // the engine needs.
    Ok(std::net::UdpSocket::from(socket))
}

/// Whether this host lets us open ping sockets at all (checked once at start).
pub fn available() -> bool {
    open(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)).is_ok()
}

/// The echo request to send on a ping socket: the kernel fills in the
/// identifier and the checksum.
pub fn request(v6: bool, seq: u16, data: &[u8]) -> Vec<u8> {
    let kind = if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 };
    let mut message = Vec::with_capacity(8 + data.len());
    message.extend_from_slice(&[kind, 0, 0, 0, 0, 0]);
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(data);
    message
}

/// An echo reply read from a ping socket: its sequence number and data;
/// None for anything else.
pub fn reply(v6: bool, message: &[u8]) -> Option<(u16, &[u8])> {
    let want = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    match message {
        [kind, 0, _, _, _, _, s0, s1, data @ ..] if *kind == want => {
            Some((u16::from_be_bytes([*s0, *s1]), data))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies() {
        assert_eq!(
            request(false, 0x0102, b"ab"),
            vec![8, 0, 0, 0, 0, 0, 1, 2, b'a', b'b']
        );
        assert_eq!(request(true, 1, b"")[0], 128);
        assert_eq!(
            reply(false, &[0, 0, 9, 9, 4, 4, 0, 7, b'x']),
            Some((7, &b"x"[..]))
        );
        assert_eq!(
            reply(true, &[129, 0, 9, 9, 4, 4, 0, 7]),
            Some((7, &b""[..]))
        );
        assert_eq!(reply(false, &[3, 1, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(reply(false, &[0, 0, 0]), None);
    }
}
