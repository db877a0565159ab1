//! The first-bytes readers over every framing: table tests, then property
//! tests that split ClientHellos into random records and segments and
//! reframe HTTP requests (empty lines, case, bare LFs, pipelining) — the
//! name decided is the one sent, or the flow is refused.

use super::*;
use proptest::prelude::*;

#[test]
fn first_name_decides_when_to_stop_waiting() {
    let hello = tls::build_hello(Some("a.test"), &[], 16_384);
    assert_eq!(
        first_name(&hello, false),
        FirstName::Named("a.test".into(), NameSource::Sni)
    );
    assert_eq!(first_name(&hello[..20], false), FirstName::Wait);
    // The guest stopped sending (FIN) mid-hello: a server gets no name
    // either, and we will not guess.
    assert!(matches!(
        first_name(&hello[..20], true),
        FirstName::Unreadable(_)
    ));
    assert_eq!(
        first_name(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n", false),
        FirstName::Named("b.test".into(), NameSource::Host)
    );
    // Address literals name nothing the destination does not.
    for host in ["192.0.2.10:80", "[2001:db8::1]"] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        assert_eq!(first_name(req.as_bytes(), false), FirstName::Unnamed);
    }
    assert_eq!(first_name(b"SSH-2.0-x\r\n", false), FirstName::Unnamed);
    // A prefix that never completes stops at the limit, refused.
    let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
    long.resize(FIRST_BYTES_LIMIT, b'a');
    assert!(matches!(first_name(&long, false), FirstName::Unreadable(_)));
    assert_eq!(first_name(&long[..1000], false), FirstName::Wait);
}

#[test]
fn mutated_hellos_never_panic_or_invent_names() {
    // Every byte of a real-shaped hello set to boundary values: the parsers
    // return, and a name is one the grammar accepts.
    let hello = tls::build_hello(Some("www.example.test"), &[], 100);
    for at in 0..hello.len() {
        for value in [0u8, 1, 0x7f, 0x80, 0xfe, 0xff] {
            let mut bad = hello.clone();
            bad[at] = value;
            for cut in [bad.len(), at + 1, bad.len() / 2] {
                let data = &bad[..cut.min(bad.len())];
                if let FirstName::Named(n, _) = first_name(data, true) {
                    assert!(crate::names::check(&n).is_ok(), "{at}/{value}: {n:?}");
                }
                let _ = http::head(data);
            }
        }
    }
}

/// Re-splits a single-record TLS handshake into records of the given sizes.
fn resplit(one_record: &[u8], sizes: &[usize]) -> Vec<u8> {
    let message = &one_record[5..];
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < message.len() {
        let n = sizes[i % sizes.len()].clamp(1, message.len() - at);
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        out.extend_from_slice(&message[at..at + n]);
        at += n;
        i += 1;
    }
    out
}

/// Feeds `data` to a stream in segments of the given sizes, holding bytes
/// while it waits, as the gate does; returns every name it reported.
fn run(data: &[u8], segments: &[usize]) -> Result<Vec<Option<String>>, &'static str> {
    let mut stream = Stream::new();
    let mut held: Vec<u8> = Vec::new();
    let mut names = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < data.len() {
        let n = segments[i % segments.len()].clamp(1, data.len() - at);
        let segment = &data[at..at + n];
        at += n;
        i += 1;
        let finished = at == data.len();
        let step = if held.is_empty() && !matches!(stream.state, State::Start) {
            stream.feed(segment, finished)
        } else {
            held.extend_from_slice(segment);
            let step = stream.feed(&held, finished);
            if step != Step::Wait {
                held.clear();
            }
            step
        };
        match step {
            Step::Wait => {}
            Step::Names(found) => names.extend(found.into_iter().map(|(n, _)| n)),
            Step::Unreadable(why) => return Err(why),
        }
    }
    Ok(names)
}

fn host_name() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..4)
        .prop_map(|labels| format!("{}.test", labels.join(".")))
}

proptest! {
    #[test]
    fn a_hello_split_any_way_names_its_server(
        name in host_name(),
        records in proptest::collection::vec(1usize..300, 1..8),
        segments in proptest::collection::vec(1usize..400, 1..8),
    ) {
        let hello = resplit(&tls::build_hello(Some(&name), &[], 16_384), &records);
        prop_assert_eq!(run(&hello, &segments), Ok(vec![Some(name)]));
    }

    #[test]
    fn every_request_any_framing_names_its_host(
        hosts in proptest::collection::vec(host_name(), 1..4),
        empties in proptest::collection::vec(0usize..3, 4),
        lf_only in any::<bool>(),
        lower in any::<bool>(),
        bodies in proptest::collection::vec(0usize..40, 4),
        segments in proptest::collection::vec(1usize..60, 1..6),
    ) {
        let eol = if lf_only { "\n" } else { "\r\n" };
        let mut data = String::new();
        for (i, host) in hosts.iter().enumerate() {
            data.push_str(&eol.repeat(empties[i % empties.len()]));
            let method = if lower { "post" } else { "POST" };
            let body = "x".repeat(bodies[i % bodies.len()]);
            data.push_str(&format!(
                "{method} /{i} HTTP/1.1{eol}Accept: */*{eol}hOsT: {}{eol}Content-Length: {}{eol}{eol}{body}",
                host.to_uppercase(),
                body.len()
            ));
        }
        let want: Vec<Option<String>> = hosts.iter().map(|h| Some(h.clone())).collect();
        prop_assert_eq!(run(data.as_bytes(), &segments), Ok(want));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_names_pass_the_grammar(
        data in proptest::collection::vec(any::<u8>(), 0..600),
        segments in proptest::collection::vec(1usize..100, 1..5),
    ) {
        if let Ok(names) = run(&data, &segments) {
            for name in names.into_iter().flatten() {
                prop_assert!(crate::names::check(&name).is_ok(), "{:?}", name);
            }
        }
    }
}
