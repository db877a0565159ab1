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
        ("0.0.0.0", DENY, None),
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
    assert_eq!(p.name_denied("www.example.com"), None);
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
    assert_eq!(p.name_denied("a.tracker.test"), Some(1));
    assert_eq!(
        p.name_denied("ok.tracker.test"),
        Some(1),
        "first match wins"
    );
    assert_eq!(p.name_denied("tracker.test"), None);
    assert_eq!(p.name_denied("other.test"), None);
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
