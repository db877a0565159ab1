//! Sockets handed over by systemd socket activation (sd_listen_fds(3)):
//! `LISTEN_PID` names this process, `LISTEN_FDS` counts descriptors from 3
//! on, `LISTEN_FDNAMES` names them (`vhost`, `control`; unnamed: the first
//! is the vhost socket, the second the control socket). Each must be a
//! listening unix stream socket; anything else is refused, since serving a
//! VMM on the wrong descriptor would be worse than not starting.
//!
//! Read once at start, on the main thread, before any other descriptor is
//! opened.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

/// The first passed descriptor (SD_LISTEN_FDS_START).
const FIRST_FD: i32 = 3;
/// More would be a misconfigured unit.
const MAX_FDS: i32 = 16;

/// The listeners systemd passed, by role.
#[derive(Debug, Default)]
pub struct Activated {
    /// The vhost-user socket.
    pub vhost: Option<UnixListener>,
    /// The control API's socket.
    pub control: Option<UnixListener>,
}

/// Why the passed descriptors cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// LISTEN_FDS is not a count we take.
    #[error("LISTEN_FDS={0:?}: expected 1 to {MAX_FDS}")]
    Count(String),
    /// A descriptor is not a listening unix stream socket.
    #[error("descriptor {fd} ({name}) passed by systemd is not a listening unix stream socket")]
    NotAListener {
        /// The descriptor.
        fd: i32,
        /// Its name.
        name: String,
    },
    /// A name we do not know, or one role twice.
    #[error(
        "descriptor {fd} passed by systemd is named {name:?}: expected vhost or control, once each"
    )]
    Name {
        /// The descriptor.
        fd: i32,
        /// Its name.
        name: String,
    },
}

/// The listeners passed to this process, if systemd passed any.
pub fn take() -> Result<Activated, Error> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    if !ours {
        return Ok(Activated::default());
    }
    let count = std::env::var("LISTEN_FDS").unwrap_or_default();
    let n = match count.parse::<i32>() {
        Ok(n) if (1..=MAX_FDS).contains(&n) => n,
        _ => return Err(Error::Count(count)),
    };
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':').filter(|s| !s.is_empty());
    let mut out = Activated::default();
    for i in 0..n {
        let fd = FIRST_FD + i;
        let name = match names.next() {
            Some(name) => name.to_owned(),
            None if i == 0 => "vhost".to_owned(),
            None if i == 1 => "control".to_owned(),
            None => String::new(),
        };
        let listener = listener(fd, &name)?;
        let slot = match name.as_str() {
            "vhost" => &mut out.vhost,
            "control" => &mut out.control,
            _ => return Err(Error::Name { fd, name }),
        };
        if slot.replace(listener).is_some() {
            return Err(Error::Name { fd, name });
        }
    }
    Ok(out)
}

/// Takes descriptor `fd` as a listening unix stream socket.
fn listener(fd: i32, name: &str) -> Result<UnixListener, Error> {
    let not = || Error::NotAListener {
        fd,
        name: name.to_owned(),
    };
    // SAFETY: systemd passed `fd` to this process to own (sd_listen_fds:
    // LISTEN_PID is ours), and nothing else in the process has taken it:
    // this runs once, at start, before the daemon opens any descriptor.
    // If it is not what systemd promised, the checks below refuse it and
    // dropping it closes a descriptor that was ours to close.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let socket = socket2::Socket::from(owned);
    let fits = socket.domain().is_ok_and(|d| d == socket2::Domain::UNIX)
        && socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
        && socket.is_listener().unwrap_or(false);
    if !fits {
        return Err(not());
    }
    // The descriptor is not to leak into anything the daemon might run.
    socket.set_cloexec(true).map_err(|_| not())?;
    Ok(UnixListener::from(OwnedFd::from(socket)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn only_a_listening_unix_stream_socket_is_taken() {
        let dir = std::env::temp_dir().join(format!("vg-activation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
        let taken = listener(fd, "vhost").unwrap();
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(taken.accept().is_ok());
        let datagram = std::os::unix::net::UnixDatagram::unbound().unwrap();
        assert!(matches!(
            listener(datagram.into_raw_fd(), "vhost"),
            Err(Error::NotAListener { .. })
        ));
        let (stream, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(listener(stream.into_raw_fd(), "control").is_err());
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(listener(tcp.into_raw_fd(), "vhost").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
