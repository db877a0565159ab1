//! The host's own addresses, kept live: every address of every interface
//! of the daemon's (network namespace's) host, which the policy counts as
//! its `host` group and the rebind filter as internal. A guest must not
//! reach a service bound to 0.0.0.0 or `[::]` through the host's interface
//! addresses unless the policy allows `group:host`.
//!
//! A snapshot comes from getifaddrs(3); a thread listens for the kernel's
//! address notifications (rtnetlink, RTMGRP_IPV4_IFADDR and _IPV6_IFADDR)
//! and takes a new snapshot on each, so addresses that come and go (DHCP on
//! the host, hot-plugged NICs) are tracked. Subscribed before the first
//! snapshot, so no change falls between the two.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};

use crate::policy::HostSet;

/// rtnetlink multicast groups for IPv4 and IPv6 address changes
/// (linux/rtnetlink.h).
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// Every address of every interface now.
pub fn snapshot() -> io::Result<HashSet<IpAddr>> {
    let mut out = HashSet::new();
    for interface in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(address) = interface.address else {
            continue;
        };
        if let Some(v4) = address.as_sockaddr_in() {
            out.insert(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = address.as_sockaddr_in6() {
            out.insert(IpAddr::V6(v6.ip()));
        }
    }
    Ok(out)
}

/// Fills `set` with the host's addresses now and keeps it current from a
/// thread of its own (for the daemon's life). Fails when neither the
/// notifications nor a first snapshot can be had: without them the policy
/// would not know the host.
pub fn watch(set: Arc<HostSet>) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(io::Error::from)?;
    let groups = NetlinkAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR);
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &groups).map_err(io::Error::from)?;
    set.replace(snapshot()?);
    std::thread::Builder::new()
        .name("vg-hostaddrs".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match recv(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    // Any message (or a lost burst, ENOBUFS) means: look again.
                    Ok(_) | Err(nix::errno::Errno::ENOBUFS) => match snapshot() {
                        Ok(now) => set.replace(now),
                        Err(e) => tracing::warn!(error = %e, "cannot read the host's addresses"),
                    },
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "host address notifications stopped");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_has_loopback() {
        let now = snapshot().unwrap();
        assert!(
            now.contains(&IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            "{now:?}"
        );
    }
}
