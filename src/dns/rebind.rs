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
use std::sync::Arc;

use crate::policy::addr::forms;
use crate::policy::rule::in_prefix;
use crate::policy::{Group, HostSet};

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
    host: Arc<HostSet>,
}

impl Rebind {
    /// `allow`: exempt names; `own`: the sandbox's own networks (address,
    /// prefix length); `host`: the host's own addresses (the policy's host
    /// group), internal too.
    pub fn new<'a>(
        allow: impl IntoIterator<Item = &'a str>,
        own: Vec<(IpAddr, u8)>,
        host: Arc<HostSet>,
    ) -> Self {
        Self {
            allow: NameSet::new(allow.into_iter().chain(["localhost", "*.localhost"])),
            own,
            host,
        }
    }

    /// Removes internal addresses from the answer section. An exemption
    /// holds only for the name the guest asked for and only when every
    /// name of the answer's CNAME chain is exempt too: a public name that
    /// CNAMEs to an exempt one gets nothing internal.
    pub fn filter(&self, answer: &[u8]) -> Filtered {
        let Ok(mut message) = Message::from_vec(answer) else {
            return Filtered::Unparseable;
        };
        let asked = message.queries.first().map(|q| q.name().to_ascii());
        let chain_exempt = asked.is_some_and(|n| self.allow.contains(&n))
            && message.answers.iter().all(|record| match &record.data {
                RData::CNAME(target) => {
                    self.allow.contains(&record.name.to_ascii())
                        && self.allow.contains(&target.0.to_ascii())
                }
                _ => true,
            });
        let before = message.answers.len();
        message.answers.retain(|record| {
            let ips = addresses(&record.data);
            if ips.is_empty() {
                return true;
            }
            let exempt = chain_exempt && self.allow.contains(&record.name.to_ascii());
            exempt || !ips.iter().any(|ip| self.is_internal(*ip))
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

    /// Whether any form of `ip` is internal: the host's, loopback, private,
    /// link-local, metadata, multicast or broadcast, unspecified, or in the
    /// sandbox's own networks.
    pub fn is_internal(&self, ip: IpAddr) -> bool {
        forms(ip).as_slice().iter().any(|&form| {
            let group = Group::of(form, &self.host);
            group == Group::Host
                || Group::INTERNAL.contains(&group)
                || self
                    .own
                    .iter()
                    .any(|(net, len)| in_prefix(form, *net, *len))
        })
    }
}

/// The addresses a record hands the guest: A, AAAA, and the address
/// hints of SVCB/HTTPS records (RFC 9460 7.3), which clients connect to.
fn addresses(data: &RData) -> Vec<IpAddr> {
    use hickory_proto::rr::rdata::svcb::SvcParamValue;
    let svcb = match data {
        RData::A(a) => return vec![IpAddr::V4(a.0)],
        RData::AAAA(a) => return vec![IpAddr::V6(a.0)],
        RData::SVCB(svcb) => svcb,
        RData::HTTPS(https) => &https.0,
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for (_, value) in &svcb.svc_params {
        match value {
            SvcParamValue::Ipv4Hint(hint) => out.extend(hint.0.iter().map(|a| IpAddr::V4(a.0))),
            SvcParamValue::Ipv6Hint(hint) => out.extend(hint.0.iter().map(|a| IpAddr::V6(a.0))),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, AAAA};
    use hickory_proto::rr::{Name, Record, RecordType};

    fn rebind(allow: &[&str]) -> Rebind {
        let host = HostSet::new(vec!["198.19.0.1".parse().unwrap()]);
        host.replace(
            [
                "203.0.113.7".parse().unwrap(),
                "2001:db8:ff::2".parse().unwrap(),
            ]
            .into(),
        );
        let own = vec![("198.19.0.0".parse().unwrap(), 24)];
        Rebind::new(allow.iter().copied(), own, Arc::new(host))
    }

    #[test]
    fn internal_table() {
        let r = rebind(&[]);
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
            // The host's own addresses, in any form.
            ("203.0.113.7", true),
            ("::ffff:203.0.113.7", true),
            ("2001:db8:ff::2", true),
            ("198.19.0.1", true),
            // Ranges and embeddings not classified before.
            ("192.0.0.9", true),
            ("198.18.5.5", true),
            ("240.1.2.3", true),
            ("255.255.255.255", true),
            ("::ffff:0.0.0.0", true),
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b:1::a00:1", true),
            ("::a9fe:a9fe", true),
            ("2002:7f00:1::", true),
            ("2001:0:c000:201::f5ff:fffe", true),
            ("64:ff9b::c000:20a", false),
            ("2002:c000:20a::1", false),
        ];
        for (ip, want) in cases {
            assert_eq!(r.is_internal(ip.parse().unwrap()), *want, "{ip}");
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
        let r = rebind(&["intranet.test", "*.corp.test"]);
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

    /// An answer for `asked` whose chain is `cnames` (owner, target) and
    /// ends in `last` -> `ip`.
    fn chained(asked: &str, cnames: &[(&str, &str)], last: &str, ip: &str) -> Vec<u8> {
        use hickory_proto::rr::rdata::CNAME;
        let mut m = Message::new(9, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii(asked).unwrap(),
            RecordType::A,
        ));
        for (owner, target) in cnames {
            let data = RData::CNAME(CNAME(Name::from_ascii(target).unwrap()));
            m.answers.push(Record::from_rdata(
                Name::from_ascii(owner).unwrap(),
                60,
                data,
            ));
        }
        let data = RData::A(A(ip.parse().unwrap()));
        m.answers.push(Record::from_rdata(
            Name::from_ascii(last).unwrap(),
            60,
            data,
        ));
        m.to_vec().unwrap()
    }

    #[test]
    fn exemptions_need_the_asked_name_and_the_whole_chain() {
        let r = rebind(&["intranet.test", "*.corp.test"]);
        // Asked for the exempt name itself: kept.
        let direct = chained("intranet.test.", &[], "intranet.test.", "10.0.0.1");
        assert_eq!(r.filter(&direct), Filtered::Unchanged);
        // Exempt to exempt through a chain: kept.
        let inside = chained(
            "a.corp.test.",
            &[("a.corp.test.", "intranet.test.")],
            "intranet.test.",
            "10.0.0.1",
        );
        assert_eq!(r.filter(&inside), Filtered::Unchanged);
        // A public name that CNAMEs to the exempt one: stripped.
        for chain in [
            vec![("evil.test.", "intranet.test.")],
            vec![
                ("evil.test.", "b.evil.test."),
                ("b.evil.test.", "intranet.test."),
            ],
        ] {
            let bytes = chained("evil.test.", &chain, "intranet.test.", "10.0.0.1");
            assert!(
                matches!(r.filter(&bytes), Filtered::Stripped(_, 1)),
                "{chain:?}"
            );
        }
        // An exempt name asked, but the chain leaves the exempt names.
        let out = chained(
            "intranet.test.",
            &[("intranet.test.", "evil.test.")],
            "evil.test.",
            "10.0.0.1",
        );
        assert!(matches!(r.filter(&out), Filtered::Stripped(_, 1)));
    }

    #[test]
    fn https_records_with_internal_hints_are_stripped() {
        use hickory_proto::rr::rdata::HTTPS;
        use hickory_proto::rr::rdata::svcb::{IpHint, SVCB, SvcParamKey, SvcParamValue};
        let r = rebind(&[]);
        let name = Name::from_ascii("evil.test.").unwrap();
        let mut m = Message::new(3, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name.clone(), RecordType::HTTPS));
        for hint in ["127.0.0.1", "192.0.2.1"] {
            let params = vec![(
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(vec![A(hint.parse().unwrap())])),
            )];
            let svcb = SVCB::new(1, Name::root(), params);
            m.answers.push(Record::from_rdata(
                name.clone(),
                60,
                RData::HTTPS(HTTPS(svcb)),
            ));
        }
        let Filtered::Stripped(bytes, 1) = r.filter(&m.to_vec().unwrap()) else {
            panic!("internal hint kept")
        };
        assert_eq!(Message::from_vec(&bytes).unwrap().answers.len(), 1);
    }
}
