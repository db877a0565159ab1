//! (policy, flow) -> decision, table-driven, both families.
#![allow(clippy::type_complexity)]

use super::*;
use crate::config::Config;

fn policy(toml: &str) -> Policy {
    Config::from_toml(toml).unwrap().policy()
}

fn decide(p: &Policy, dst: &str, proto: Proto, port: Option<u16>, name: Option<&str>) -> Decision {
    p.decide(&Flow {
        dst: dst.parse().unwrap(),
        proto,
        port,
        name: name.map(|n| (n, NameSource::Dns)),
    })
}

const ALLOW: Action = Action::Allow;
const DENY: Action = Action::Deny;

#[test]
fn default_preset_public_only() {
    let p = policy("");
    // Preset rules: 1 metadata, 2 host, 3 loopback, 4 private, 5 link-local,
    // 6 multicast, 7 public; default deny.
    let cases: &[(&str, Action, Option<usize>)] = &[
        ("192.0.2.10", ALLOW, Some(7)),
        ("2001:db8::1", ALLOW, Some(7)),
        ("169.254.169.254", DENY, Some(1)),
        ("fd00:ec2::254", DENY, Some(1)),
        ("198.19.0.1", DENY, Some(2)),
        ("fd76:6761:7465::1", DENY, Some(2)),
        ("fe80::1", DENY, Some(2)),
        ("127.0.0.1", DENY, Some(3)),
        ("::1", DENY, Some(3)),
        ("10.0.0.1", DENY, Some(4)),
        ("100.64.1.1", DENY, Some(4)),
        ("fd12::1", DENY, Some(4)),
        ("169.254.1.1", DENY, Some(5)),
        ("fe80::99", DENY, Some(5)),
        ("239.1.1.1", DENY, Some(6)),
        ("ff02::1", DENY, Some(6)),
        // IPv4-mapped IPv6 is decided as the IPv4 address.
        ("::ffff:10.0.0.1", DENY, Some(4)),
        ("::ffff:192.0.2.10", ALLOW, Some(7)),
        ("0.0.0.0", DENY, Some(2)),
        ("::ffff:0.0.0.0", DENY, Some(2)),
        ("::", DENY, Some(2)),
        ("192.0.0.9", DENY, Some(4)),
        ("198.18.0.1", DENY, Some(4)),
        ("240.0.0.1", DENY, Some(4)),
        ("255.255.255.255", DENY, Some(6)),
        ("64:ff9b::a9fe:a9fe", DENY, Some(1)),
        ("64:ff9b:1::a00:1", DENY, Some(4)),
        ("::169.254.169.254", DENY, Some(1)),
        ("2002:7f00:1::", DENY, Some(3)),
        ("2001:0:c000:201::f5ff:fffe", DENY, Some(4)),
        ("64:ff9b::c000:20a", ALLOW, Some(7)),
        ("2002:c000:20a::", ALLOW, Some(7)),
    ];
    for (dst, action, rule) in cases {
        let d = decide(&p, dst, Proto::Tcp, Some(443), None);
        assert_eq!((d.action, d.rule), (*action, *rule), "{dst}");
    }
}

#[test]
fn operator_rules_ports_protocols_and_names() {
    let p = policy(
        r#"
[policy]
preset = "none"

[[policy.rule]]
action = "deny"
destination = "192.0.2.66"

[[policy.rule]]
action = "allow"
destination = "192.0.2.0/24"
protocols = ["tcp"]
ports = [80, "8000-8100"]

[[policy.rule]]
action = "allow"
destination = "*.example.com"

[[policy.rule]]
action = "allow"
destination = "2001:db8::/32"
protocols = ["icmp"]
"#,
    );
    let cases: &[(
        &str,
        Proto,
        Option<u16>,
        Option<&str>,
        Action,
        Option<usize>,
    )] = &[
        ("192.0.2.66", Proto::Tcp, Some(80), None, DENY, Some(1)),
        ("192.0.2.5", Proto::Tcp, Some(80), None, ALLOW, Some(2)),
        ("192.0.2.5", Proto::Tcp, Some(8000), None, ALLOW, Some(2)),
        ("192.0.2.5", Proto::Tcp, Some(8100), None, ALLOW, Some(2)),
        ("192.0.2.5", Proto::Tcp, Some(7999), None, DENY, None),
        ("192.0.2.5", Proto::Tcp, Some(8101), None, DENY, None),
        ("192.0.2.5", Proto::Udp, Some(80), None, DENY, None),
        (
            "203.0.113.9",
            Proto::Tcp,
            Some(443),
            Some("www.example.com"),
            ALLOW,
            Some(3),
        ),
        (
            "203.0.113.9",
            Proto::Tcp,
            Some(443),
            Some("a.b.example.com."),
            ALLOW,
            Some(3),
        ),
        // Label-aligned: not under example.com; and the apex is not a subdomain.
        (
            "203.0.113.9",
            Proto::Tcp,
            Some(443),
            Some("badexample.com"),
            DENY,
            None,
        ),
        (
            "203.0.113.9",
            Proto::Tcp,
            Some(443),
            Some("example.com"),
            DENY,
            None,
        ),
        ("203.0.113.9", Proto::Tcp, Some(443), None, DENY, None),
        ("2001:db8::5", Proto::Icmp, None, None, ALLOW, Some(4)),
        ("2001:db8::5", Proto::Tcp, Some(80), None, DENY, None),
    ];
    for (dst, proto, port, name, action, rule) in cases {
        let d = decide(&p, dst, *proto, *port, *name);
        assert_eq!(
            (d.action, d.rule),
            (*action, *rule),
            "{dst} {proto:?} {port:?} {name:?}"
        );
    }
    // A CIDR allow comes first: the name may resolve into it.
    assert_eq!(p.query("www.example.com").action, ALLOW);
}

#[test]
fn dns_names_denied_by_domain_rules() {
    let p = policy(
        r#"
[[policy.rule]]
action = "deny"
destination = "*.tracker.test"

[[policy.rule]]
action = "allow"
destination = "ok.tracker.test"
"#,
    );
    let q = |name| {
        let d = p.query(name);
        (d.action, d.rule)
    };
    assert_eq!(q("a.tracker.test"), (DENY, Some(1)));
    assert_eq!(q("ok.tracker.test"), (DENY, Some(1)), "first match wins");
    // Not covered by a name rule: the preset's allow of public addresses
    // (rule 9) means some flow could go; forwarded.
    assert_eq!(q("tracker.test"), (ALLOW, Some(9)));
    assert_eq!(q("other.test"), (ALLOW, Some(9)));
}

#[test]
fn dns_names_under_a_default_deny_allow_list_are_never_forwarded() {
    let names = policy(
        "[policy]\npreset = \"none\"\n[[policy.rule]]\naction = \"allow\"\ndestination = \"*.ok.test\"\n",
    );
    let q = |p: &Policy, name| {
        let d = p.query(name);
        (d.action, d.rule)
    };
    assert_eq!(q(&names, "www.ok.test"), (ALLOW, Some(1)));
    for name in [
        "evil.test",
        "ok.test",
        "a.b.evil.test",
        "1.0.0.10.in-addr.arpa",
    ] {
        assert_eq!(q(&names, name), (DENY, None), "{name}");
    }
    // Everything denied up front: nothing is forwarded either.
    let closed = policy(
        "[policy]\npreset = \"allow-all\"\n[[policy.rule]]\naction = \"deny\"\ndestination = \"group:any\"\n",
    );
    assert_eq!(q(&closed, "www.ok.test"), (DENY, Some(1)));
    // allow-all forwards everything.
    let open = policy("[policy]\npreset = \"allow-all\"\n");
    assert_eq!(q(&open, "anything.test"), (ALLOW, None));
}

#[test]
fn invalid_rules_are_rejected_with_their_number() {
    let bad = [
        r#"[[policy.rule]]
action = "allow"
destination = "10.0.0.0/33""#,
        r#"[[policy.rule]]
action = "allow"
destination = "group:nonsense""#,
        r#"[[policy.rule]]
action = "allow"
destination = "bad..name""#,
        r#"[[policy.rule]]
action = "allow"
destination = "any.test"
ports = ["90-80"]"#,
        r#"[[policy.rule]]
action = "allow"
destination = "any.test"
protocols = ["icmp"]
ports = [80]"#,
    ];
    for text in bad {
        let Err(crate::config::Error::Invalid(problems)) = Config::from_toml(text) else {
            panic!("accepted: {text}")
        };
        assert!(
            problems
                .iter()
                .any(|p| p.key == "policy.rule" && p.message.starts_with("rule 1:")),
            "{text}: {problems:?}"
        );
    }
}

#[test]
fn shadowed_rules_are_found() {
    let p = policy(
        r#"
[policy]
preset = "allow-all"

[[policy.rule]]
action = "deny"
destination = "10.0.0.0/8"

[[policy.rule]]
action = "allow"
destination = "10.1.0.0/16"

[[policy.rule]]
action = "allow"
destination = "192.0.2.0/24"
protocols = ["tcp"]
ports = [443]

[[policy.rule]]
action = "deny"
destination = "192.0.2.0/24"
"#,
    );
    assert_eq!(p.shadowed(), vec![(2, 1)]);
}

#[test]
fn a_name_is_needed_only_when_it_could_change_the_outcome() {
    let flow = |dst: &str, port| Flow {
        dst: dst.parse().unwrap(),
        proto: Proto::Tcp,
        port: Some(port),
        name: None,
    };
    // Deny rules for names cannot change a deny; an allow for names can.
    let p = policy(
        r#"
[[policy.rule]]
action = "deny"
destination = "*.denied.test"

[[policy.rule]]
action = "allow"
destination = "*.allowed.test"
ports = [443]
"#,
    );
    assert!(
        !p.needs_name(&flow("10.0.0.1", 80)),
        "private is denied either way"
    );
    assert!(
        p.needs_name(&flow("192.0.2.1", 80)),
        "public allowed, but a name could deny"
    );
    assert!(p.needs_name(&flow("10.0.0.1", 443)), "a name could allow");
    assert!(!p.needs_name(&flow("10.0.0.1", 22)));
    assert!(
        !policy("").needs_name(&flow("192.0.2.1", 443)),
        "no domain rules"
    );
}

mod encodings {
    //! Every encoding of an IPv4 address inside IPv6 is decided as the
    //! address it carries, under several policies, with the host's own
    //! addresses in the host group.
    use super::*;
    use crate::policy::addr::SPECIAL;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn policies() -> Vec<(&'static str, Policy)> {
        let list = vec![
            ("public-only", policy("")),
            (
                "operator rules",
                policy(
                    "[[policy.rule]]\naction = \"allow\"\ndestination = \"10.1.2.3\"\n\
                     [[policy.rule]]\naction = \"deny\"\ndestination = \"192.0.2.0/25\"\n",
                ),
            ),
            ("allow-all", policy("[policy]\npreset = \"allow-all\"\n")),
            (
                "host allowed",
                policy("[[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n"),
            ),
        ];
        for (_, p) in &list {
            p.host_set().replace(
                [
                    "198.51.100.2".parse().unwrap(),
                    "203.0.113.7".parse().unwrap(),
                    "2001:db8:ff::2".parse().unwrap(),
                ]
                .into(),
            );
        }
        list
    }

    /// Addresses from every special-purpose IPv4 range, the host's own,
    /// and anything at all.
    fn address() -> impl Strategy<Value = Ipv4Addr> {
        let ranges: Vec<(u32, u8)> = SPECIAL
            .iter()
            .filter_map(|(net, len, _, _)| match net {
                IpAddr::V4(v4) => Some((u32::from(*v4), *len)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let n = ranges.len();
        prop_oneof![
            any::<u32>().prop_map(Ipv4Addr::from),
            (0..n, any::<u32>()).prop_map(move |(i, bits)| {
                let (net, len) = ranges[i];
                let host = bits.checked_shr(u32::from(len)).unwrap_or(0);
                Ipv4Addr::from(net | host)
            }),
            prop_oneof![
                Just(Ipv4Addr::new(203, 0, 113, 7)),
                Just(Ipv4Addr::new(198, 51, 100, 2)),
                Just(Ipv4Addr::new(198, 19, 0, 1)),
                Just(Ipv4Addr::new(10, 1, 2, 3)),
                Just(Ipv4Addr::new(169, 254, 169, 254)),
            ],
        ]
    }

    fn v6(bits: u128) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(bits))
    }

    /// Encodings that carry exactly `a`.
    fn exact_encodings(a: Ipv4Addr, noise: u64) -> Vec<IpAddr> {
        let a32 = u128::from(u32::from(a));
        let noise = u128::from(noise);
        vec![
            IpAddr::V6(a.to_ipv6_mapped()),
            v6((0xffff_u128 << 48) | a32),
            v6(a32),
            v6((0x0064_ff9b_u128 << 96) | a32),
            // Local-use NAT64 in the /96 layout, u octet set so no shorter
            // layout applies.
            v6((0x0064_ff9b_0001_u128 << 80)
                | (0xff_u128 << 56)
                | ((noise & 0xff_ffff) << 32)
                | a32),
            // 6to4, any subnet and interface id.
            v6((0x2002_u128 << 112) | (a32 << 80) | (noise & 0xffff_ffff_ffff_ffff_ffff)),
        ]
    }

    proptest! {
        #[test]
        fn every_encoding_is_decided_as_what_it_carries(
            a in address(),
            noise in any::<u64>(),
            server in any::<u32>(),
        ) {
            for (label, p) in policies() {
                let decide = |ip: IpAddr| decide(&p, &ip.to_string(), Proto::Tcp, Some(443), None).action;
                let want = decide(IpAddr::V4(a));
                for e in exact_encodings(a, noise) {
                    prop_assert_eq!(decide(e), want, "{} {} as {}", label, a, e);
                }
                // Teredo: the client's address inverted; a server the policy
                // allows leaves the client to decide.
                let server = Ipv4Addr::from(server);
                let teredo = v6((0x2001_0000_u128 << 96)
                    | (u128::from(u32::from(server)) << 64)
                    | u128::from(!u32::from(a)));
                let server_allowed = decide(IpAddr::V4(server)) == Action::Allow;
                if server_allowed {
                    prop_assert_eq!(decide(teredo), want, "{} {} as {}", label, a, teredo);
                } else {
                    prop_assert_eq!(decide(teredo), Action::Deny);
                }
                // Local-use NAT64 in its shorter layouts: never cheaper.
                let [b0, b1, b2, b3] = a.octets();
                let layout48 = v6((0x0064_ff9b_0001_u128 << 80)
                    | (u128::from(b0) << 72) | (u128::from(b1) << 64)
                    | (u128::from(b2) << 48) | (u128::from(b3) << 40));
                if want == Action::Deny {
                    prop_assert_eq!(decide(layout48), Action::Deny, "{} {} as {}", label, a, layout48);
                }
            }
        }
    }

    #[test]
    fn host_addresses_only_through_the_host_group() {
        let ps = policies();
        let decide_in = |name: &str, dst: &str| {
            let (_, p) = ps.iter().find(|(n, _)| *n == name).unwrap();
            decide(p, dst, Proto::Tcp, Some(22), None).action
        };
        for dst in [
            "203.0.113.7",
            "::ffff:203.0.113.7",
            "2001:db8:ff::2",
            "198.51.100.2",
        ] {
            assert_eq!(decide_in("public-only", dst), DENY, "{dst}");
            assert_eq!(decide_in("allow-all", dst), DENY, "{dst}");
            assert_eq!(decide_in("host allowed", dst), ALLOW, "{dst}");
        }
        // Neither group:any nor an allowing default opens the host.
        for text in [
            "[policy]\npreset = \"none\"\n[[policy.rule]]\naction = \"allow\"\ndestination = \"group:any\"\n",
            "[policy]\npreset = \"none\"\ndefault = \"allow\"\n",
        ] {
            let p = policy(text);
            p.host_set()
                .replace(["203.0.113.7".parse().unwrap()].into());
            assert_eq!(
                decide(&p, "203.0.113.7", Proto::Tcp, Some(22), None).action,
                DENY
            );
            assert_eq!(
                decide(&p, "203.0.113.8", Proto::Tcp, Some(22), None).action,
                ALLOW
            );
        }
        // An operator prefix that holds a host address does not open it.
        let p = policy("[[policy.rule]]\naction = \"allow\"\ndestination = \"203.0.113.0/24\"\n");
        p.host_set()
            .replace(["203.0.113.7".parse().unwrap()].into());
        assert_eq!(
            decide(&p, "203.0.113.8", Proto::Tcp, Some(22), None).action,
            ALLOW
        );
        assert_eq!(
            decide(&p, "203.0.113.7", Proto::Tcp, Some(22), None).action,
            DENY
        );
        // Addresses come and go.
        p.host_set().replace(Default::default());
        assert_eq!(
            decide(&p, "203.0.113.7", Proto::Tcp, Some(22), None).action,
            ALLOW
        );
    }
}
