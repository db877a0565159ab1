//! The host's own resolvers, the default upstreams of the DNS forwarder.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use crate::wellknown::DNS_PORT;

/// Where the host lists its resolvers.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The host's resolvers from /etc/resolv.conf, port 53.
pub fn host_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string(RESOLV_CONF)
        .map(|text| parse_resolv_conf(&text))
        .unwrap_or_default()
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|ip| ip.parse().ok())
                .map(|ip| SocketAddr::new(ip, DNS_PORT))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch example\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver fe80::1%eth0\noptions ndots:2\n";
        let got = parse_resolv_conf(text);
        assert_eq!(
            got,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }
}
