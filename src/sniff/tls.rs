//! The server name of a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3), read
//! the way a server reads it: the handshake message reassembled across as
//! many TLS records as the client split it into (RFC 8446 5.1 allows any
//! split; rustls and OpenSSL servers accept it), so hiding the name behind
//! record boundaries is no cheaper than showing it.
//!
//! What a server would reject, and what hides or doubles the name, is
//! [`Hello::Unreadable`]: a record type other than handshake before the
//! hello is complete, a record over 2^14 bytes, a message other than
//! ClientHello, any length that does not add up, a repeated extension,
//! a server_name list with more or other than one host_name, a name that is
//! not a host name, and Encrypted Client Hello (the real name is
//! encrypted). Pure; lengths are checked before use; nothing panics.
#![forbid(unsafe_code)]

/// Content type of handshake records.
pub const HANDSHAKE_RECORD: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
/// Encrypted Client Hello (RFC 9849) and its draft predecessor ESNI.
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const EXT_ENCRYPTED_SERVER_NAME: u16 = 0xffce;
const HOST_NAME: u8 = 0;
/// Largest record plaintext (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;
/// Largest ClientHello we reassemble; real ones are a few KiB, post-quantum
/// key shares included.
pub const MAX_HELLO: usize = 1 << 16;

/// What the first bytes say as TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not a TLS handshake record at all.
    NotTls,
    /// A valid prefix of a ClientHello: wait for more.
    NeedMore,
    /// A complete ClientHello with this server name (lower case, no
    /// trailing dot; may be an address literal, which the caller judges).
    Name(String),
    /// A complete ClientHello without server_name.
    NoName,
    /// TLS a server would reject, or whose name is hidden or ambiguous.
    Unreadable(&'static str),
}

struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.data.get(..n)?, self.data.get(n..)?);
        self.data = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
    }

    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some(
            usize::from(*b.first()?) << 16 | usize::from(*b.get(1)?) << 8 | usize::from(*b.get(2)?),
        )
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// Reads the ClientHello at the start of `data`, across records.
pub fn client_hello(data: &[u8]) -> Hello {
    match data.first() {
        None => return Hello::NeedMore,
        Some(&HANDSHAKE_RECORD) => {}
        Some(_) => return Hello::NotTls,
    }
    let mut records = Cursor { data };
    let mut message: Vec<u8> = Vec::new();
    loop {
        if records.data.is_empty() {
            return Hello::NeedMore;
        }
        let (Some(kind), Some(major), Some(_minor), Some(len)) =
            (records.u8(), records.u8(), records.u8(), records.u16())
        else {
            return Hello::NeedMore;
        };
        if kind != HANDSHAKE_RECORD {
            return Hello::Unreadable("a non-handshake record inside the hello");
        }
        if major != 3 {
            return Hello::Unreadable("not a TLS record version");
        }
        let len = usize::from(len);
        if len > MAX_RECORD {
            return Hello::Unreadable("record over 2^14 bytes");
        }
        if len == 0 {
            return Hello::Unreadable("empty handshake record");
        }
        let Some(fragment) = records.take(len) else {
            return Hello::NeedMore;
        };
        message.extend_from_slice(fragment);
        let mut m = Cursor { data: &message };
        let (Some(kind), Some(body_len)) = (m.u8(), m.u24()) else {
            continue;
        };
        if kind != CLIENT_HELLO {
            return Hello::Unreadable("first handshake message is not a ClientHello");
        }
        if body_len > MAX_HELLO {
            return Hello::Unreadable("ClientHello too large");
        }
        if let Some(body) = m.take(body_len) {
            return parse_hello(body).unwrap_or(Hello::Unreadable("malformed ClientHello"));
        }
    }
}

/// A complete ClientHello body; None when its lengths do not add up.
fn parse_hello(body: &[u8]) -> Option<Hello> {
    let mut h = Cursor { data: body };
    h.take(2)?; // legacy_version
    h.take(32)?; // random
    let session = h.vec8()?;
    let suites = h.vec16()?;
    let compression = h.vec8()?;
    if session.len() > 32 || suites.is_empty() || suites.len() % 2 != 0 || compression.is_empty() {
        return None;
    }
    if h.data.is_empty() {
        return Some(Hello::NoName);
    }
    let mut exts = Cursor { data: h.vec16()? };
    if !h.data.is_empty() {
        return None;
    }
    let mut seen: Vec<u16> = Vec::new();
    let mut name = None;
    while !exts.data.is_empty() {
        let kind = exts.u16()?;
        let ext = exts.vec16()?;
        if seen.contains(&kind) {
            return Some(Hello::Unreadable("repeated extension"));
        }
        seen.push(kind);
        match kind {
            EXT_ENCRYPTED_CLIENT_HELLO | EXT_ENCRYPTED_SERVER_NAME => {
                return Some(Hello::Unreadable("encrypted client hello"));
            }
            EXT_SERVER_NAME => name = Some(server_name(ext)?),
            _ => {}
        }
    }
    Some(match name {
        Some(Ok(n)) => Hello::Name(n),
        Some(Err(why)) => Hello::Unreadable(why),
        None => Hello::NoName,
    })
}

/// The one host_name of a server_name extension (RFC 6066 3).
fn server_name(ext: &[u8]) -> Option<Result<String, &'static str>> {
    let mut e = Cursor { data: ext };
    let mut list = Cursor { data: e.vec16()? };
    if !e.data.is_empty() {
        return None;
    }
    let kind = list.u8()?;
    let raw = list.vec16()?;
    if kind != HOST_NAME || !list.data.is_empty() {
        return Some(Err("server_name is not exactly one host_name"));
    }
    let Ok(text) = std::str::from_utf8(raw) else {
        return Some(Err("server_name is not text"));
    };
    let name = crate::names::normalize(text);
    let literal = name.parse::<std::net::IpAddr>().is_ok();
    if !literal && crate::names::check(&name).is_err() {
        return Some(Err("server_name is not a host name"));
    }
    Some(Ok(name))
}

/// A ClientHello carrying `sni` (or none), optionally split into records of
/// at most `record` bytes, for tests, benchmarks and fuzz seeds.
pub fn build_hello(sni: Option<&str>, extra: &[(u16, Vec<u8>)], record: usize) -> Vec<u8> {
    let be16 = |n: usize| u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes();
    let mut exts = Vec::new();
    if let Some(sni) = sni {
        let name = sni.as_bytes();
        let mut entry = vec![HOST_NAME];
        entry.extend_from_slice(&be16(name.len()));
        entry.extend_from_slice(name);
        let mut list = be16(entry.len()).to_vec();
        list.extend_from_slice(&entry);
        exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
        exts.extend_from_slice(&be16(list.len()));
        exts.extend_from_slice(&list);
    }
    for (kind, data) in extra {
        exts.extend_from_slice(&kind.to_be_bytes());
        exts.extend_from_slice(&be16(data.len()));
        exts.extend_from_slice(data);
    }
    let mut hello = vec![3, 3];
    hello.extend_from_slice(&[7; 32]);
    hello.push(0);
    hello.extend_from_slice(&[0, 2, 0x13, 0x01]);
    hello.extend_from_slice(&[1, 0]);
    hello.extend_from_slice(&be16(exts.len()));
    hello.extend_from_slice(&exts);
    let len = u32::try_from(hello.len()).unwrap_or(0).to_be_bytes();
    let mut message = vec![CLIENT_HELLO, len[1], len[2], len[3]];
    message.extend_from_slice(&hello);
    let mut out = Vec::new();
    for fragment in message.chunks(record.clamp(1, MAX_RECORD)) {
        out.extend_from_slice(&[HANDSHAKE_RECORD, 3, 1]);
        out.extend_from_slice(&be16(fragment.len()));
        out.extend_from_slice(fragment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_in_one_record_and_in_every_split() {
        let whole = build_hello(Some("Www.Example.TEST."), &[], MAX_RECORD);
        assert_eq!(client_hello(&whole), Hello::Name("www.example.test".into()));
        for record in 1..=80 {
            let split = build_hello(Some("www.example.test"), &[], record);
            assert_eq!(
                client_hello(&split),
                Hello::Name("www.example.test".into()),
                "records of {record}"
            );
            for cut in 0..split.len() {
                assert_eq!(
                    client_hello(&split[..cut]),
                    Hello::NeedMore,
                    "{record}/{cut}"
                );
            }
        }
    }

    #[test]
    fn what_a_server_rejects_or_what_hides_the_name_is_unreadable() {
        let unreadable = |bytes: &[u8]| matches!(client_hello(bytes), Hello::Unreadable(_));
        // ECH and ESNI.
        assert!(unreadable(&build_hello(
            Some("cover.test"),
            &[(0xfe0d, vec![0; 8])],
            500
        )));
        assert!(unreadable(&build_hello(
            Some("cover.test"),
            &[(0xffce, vec![0; 8])],
            500
        )));
        // Two server_name extensions; a list with two names.
        let second = build_hello(Some("b.test"), &[], 500);
        let ext_at = second.len() - ("b.test".len() + 9);
        let sni_ext = second[ext_at..].to_vec();
        let twice = build_hello(Some("a.test"), &[(0, sni_ext[4..].to_vec())], 500);
        assert!(unreadable(&twice));
        let mut list = vec![0, 0];
        for name in ["a.test", "b.test"] {
            list.push(0);
            list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            list.extend_from_slice(name.as_bytes());
        }
        let n = u16::try_from(list.len() - 2).unwrap();
        list[..2].copy_from_slice(&n.to_be_bytes());
        assert!(unreadable(&build_hello(None, &[(0, list)], 500)));
        // Names that are not host names.
        for bad in ["evil.test\0.ok.test", "a b.test", "", "evil.test/"] {
            assert!(unreadable(&build_hello(Some(bad), &[], 500)), "{bad:?}");
        }
        // A record of another type in the middle, a huge record, a
        // message that is not a ClientHello, SSLv3-less versions.
        let mut mixed = build_hello(Some("a.test"), &[], 20);
        mixed[25] = 20; // the second record becomes change_cipher_spec
        assert!(unreadable(&mixed));
        assert!(unreadable(&[22, 3, 1, 0x40, 0x01]));
        assert!(unreadable(&[22, 3, 1, 0, 4, 2, 0, 0, 0]));
        assert!(unreadable(&[22, 2, 0, 0, 4, 1, 0, 0, 0]));
    }

    #[test]
    fn other_outcomes() {
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(client_hello(&[]), Hello::NeedMore);
        assert_eq!(client_hello(&build_hello(None, &[], 100)), Hello::NoName);
        assert_eq!(
            client_hello(&build_hello(Some("192.0.2.1"), &[], 100)),
            Hello::Name("192.0.2.1".into())
        );
    }
}
