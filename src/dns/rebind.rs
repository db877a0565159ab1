//! DNS rebinding protection: answers that map a public name to an address
//! inside the sandbox's reach (loopback, private, CGNAT, link-local and
//! cloud metadata, unique-local, multicast, the sandbox's own subnets) are
//! removed, so a page cannot turn a name it controls into a path to the
//! host or the local network. Names on the allow-list (same grammar as the
//! block list) and `localhost` names are exempt.
//!
//! Pure: bytes in, bytes out; runs inside the forwarder's task.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use hickory_proto::op::Message;
use hickory_proto::rr::RData;

use crate::names::NameSet;
use crate::policy::Group;
use crate::policy::rule::in_prefix;

/// What filtering did to an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    /// Nothing to remove: send the upstream's bytes as they are.
    Unchanged,
    /// Records removed; the re-encoded answer and how many went.
    Stripped(Vec<u8>, usize),
    /// The answer could not be parsed, so it cannot be checked.
    Unparseable,
}

/// The filter.
pub struct Rebind {
    allow: NameSet,
    own: Vec<(IpAddr, u8)>,
}

impl Rebind {
    /// `allow`: exempt names; `own`: the sandbox's own networks (address,
    /// prefix length).
    pub fn new<'a>(allow: impl IntoIterator<Item = &'a str>, own: Vec<(IpAddr, u8)>) -> Self {
        Self {
            allow: NameSet::new(allow.into_iter().chain(["localhost", "*.localhost"])),
            own,
        }
    }

    /// Removes internal addresses from the answer section.
    pub fn filter(&self, answer: &[u8]) -> Filtered {
        let Ok(mut message) = Message::from_vec(answer) else {
            return Filtered::Unparseable;
        };
        let before = message.answers.len();
        message.answers.retain(|record| {
            let ip = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return true,
            };
            !self.is_internal(ip) || self.allow.contains(&record.name.to_ascii())
        });
        let removed = before - message.answers.len();
        if removed == 0 {
            return Filtered::Unchanged;
        }
        match message.to_vec() {
            Ok(bytes) => Filtered::Stripped(bytes, removed),
            Err(_) => Filtered::Unparseable,
        }
    }

    fn is_internal(&self, ip: IpAddr) -> bool {
        internal(ip) || self.own.iter().any(|(net, len)| in_prefix(ip, *net, *len))
    }
}

/// Addresses no public name should point at: the policy's loopback,
/// private, link-local, metadata and multicast groups (one definition of
/// "internal" for both), plus unspecified, broadcast and 0.0.0.0/8.
pub fn internal(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let special = match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_broadcast() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified(),
    };
    special || Group::INTERNAL.iter().any(|g| g.contains(ip, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, AAAA};
    use hickory_proto::rr::{Name, Record, RecordType};

    #[test]
    fn internal_table() {
        let cases: &[(&str, bool)] = &[
            ("127.0.0.1", true),
            ("10.1.2.3", true),
            ("172.16.0.1", true),
            ("172.32.0.1", false),
            ("192.168.1.1", true),
            ("169.254.169.254", true),
            ("100.64.0.1", true),
            ("100.128.0.1", false),
            ("0.0.0.0", true),
            ("192.0.2.10", false),
            ("8.8.8.8", false),
            ("::1", true),
            ("fd00:ec2::254", true),
            ("fe80::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:192.0.2.1", false),
            ("2001:db8::1", false),
        ];
        for (ip, want) in cases {
            assert_eq!(internal(ip.parse().unwrap()), *want, "{ip}");
        }
    }

    fn answer(name: &str, ips: &[&str]) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        let n = Name::from_ascii(name).unwrap();
        m.add_query(Query::query(n.clone(), RecordType::A));
        for ip in ips {
            let data = match ip.parse::<IpAddr>().unwrap() {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            m.answers.push(Record::from_rdata(n.clone(), 60, data));
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn strips_internal_keeps_public_and_allowed() {
        let own = vec![("198.19.0.0".parse().unwrap(), 24)];
        let r = Rebind::new(["intranet.test", "*.corp.test"], own);
        assert_eq!(
            r.filter(&answer("www.test.", &["192.0.2.1"])),
            Filtered::Unchanged
        );
        let Filtered::Stripped(bytes, 2) = r.filter(&answer(
            "evil.test.",
            &["192.0.2.1", "127.0.0.1", "198.19.0.1"],
        )) else {
            panic!("not stripped")
        };
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.metadata.id, 7);
        assert_eq!(
            r.filter(&answer("intranet.test.", &["10.0.0.1"])),
            Filtered::Unchanged
        );
        assert_eq!(
            r.filter(&answer("a.corp.test.", &["10.0.0.1"])),
            Filtered::Unchanged
        );
        assert_eq!(
            r.filter(&answer("localhost.", &["127.0.0.1"])),
            Filtered::Unchanged
        );
        assert_eq!(r.filter(&[1, 2, 3]), Filtered::Unparseable);
    }
}
