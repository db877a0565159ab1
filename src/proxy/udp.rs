//! One UDP session's host socket: bound to the family's unspecified
//! address, connected to the destination, nonblocking. The engine owns it
//! (sessions are per guest source and destination) and moves datagrams on
//! its own thread.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// A connected, nonblocking socket for datagrams to `dst`.
pub fn open(dst: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if dst.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(dst)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}
