//! Names from a flow's first bytes: the server name of a TLS ClientHello
//! (RFC 8446 4.1.2, RFC 6066 3) and the Host header of an HTTP/1 request.
//!
//! Pure parsers over the daemon's own copy of the bytes; every length is
//! checked before use, nothing panics, and an incomplete prefix says so, so
//! the caller can wait for more (within its own size and time budget).
//!
//! Leaf module: imports only [`crate::names`].
#![forbid(unsafe_code)]

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek {
    /// A name was found.
    Name(String),
    /// The bytes so far are a valid prefix; more are needed.
    NeedMore,
    /// Neither TLS with SNI nor HTTP with Host.
    NoName,
}

const TLS_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const HOST_NAME: u8 = 0;

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

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

/// The SNI of a ClientHello at the start of `data`.
pub fn client_hello_sni(data: &[u8]) -> Peek {
    match data.first() {
        None => return Peek::NeedMore,
        Some(&TLS_HANDSHAKE) => {}
        Some(_) => return Peek::NoName,
    }
    let mut record = Cursor { data };
    let (Some(_), Some(_), Some(len)) = (record.u8(), record.u16(), record.u16()) else {
        return Peek::NeedMore;
    };
    // The ClientHello must sit in the first record (it does in practice;
    // a fragmented hello is treated as nameless).
    let Some(body) = record.take(usize::from(len)) else {
        return Peek::NeedMore;
    };
    parse_hello(body).map_or(Peek::NoName, |name| match name {
        Some(n) => Peek::Name(n),
        None => Peek::NoName,
    })
}

/// `None`: malformed; `Some(None)`: no SNI; `Some(Some(name))`.
fn parse_hello(body: &[u8]) -> Option<Option<String>> {
    let mut c = Cursor { data: body };
    if c.u8()? != CLIENT_HELLO {
        return None;
    }
    let len = usize::from(c.u8()?) << 16 | usize::from(c.u16()?);
    let mut h = Cursor { data: c.take(len)? };
    h.take(2)?; // legacy_version
    h.take(32)?; // random
    h.vec8()?; // session id
    h.vec16()?; // cipher suites
    h.vec8()?; // compression methods
    if h.data.is_empty() {
        return Some(None);
    }
    let mut exts = Cursor { data: h.vec16()? };
    while !exts.data.is_empty() {
        let kind = exts.u16()?;
        let ext = exts.vec16()?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        let mut list = Cursor {
            data: Cursor { data: ext }.vec16()?,
        };
        while !list.data.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == HOST_NAME {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

/// The Host header of an HTTP/1 request at the start of `data`.
pub fn http_host(data: &[u8]) -> Peek {
    const METHODS: &[&[u8]] = &[
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
    ];
    let starts = METHODS.iter().any(|m| {
        let n = m.len().min(data.len());
        data.get(..n) == m.get(..n)
    });
    if !starts {
        return Peek::NoName;
    }
    let Some(end) = find(data, b"\r\n\r\n") else {
        return Peek::NeedMore;
    };
    let head = String::from_utf8_lossy(data.get(..end).unwrap_or_default());
    for line in head.split("\r\n").skip(1) {
        if let Some((key, value)) = line.split_once(':')
            && key.trim().eq_ignore_ascii_case("host")
        {
            let value = value.trim();
            // Strip a port; keep IPv6 literals' brackets out of it.
            let host = match value.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or(v6),
                // A bare IPv6 literal has colons but no port.
                None if value.parse::<std::net::IpAddr>().is_ok() => value,
                None => value.rsplit_once(':').map_or(value, |(h, _)| h),
            };
            return Peek::Name(host.trim_end_matches('.').to_ascii_lowercase());
        }
    }
    Peek::NoName
}

/// Largest beginning read for a name: a whole TLS record (16 KiB plus its
/// header), so big post-quantum ClientHellos fit.
pub const FIRST_BYTES_LIMIT: usize = 16 * 1024 + 5;

/// A flow's name, as far as its first bytes tell.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstName {
    /// The TLS SNI, else the HTTP Host.
    Named(String, crate::names::NameSource),
    /// Decide without a name: the bytes name nothing, the name is an
    /// address literal (it says nothing the destination does not), or the
    /// guest sent all it will before an answer, or reached the limit.
    Unnamed,
    /// A valid prefix: wait for more.
    Wait,
}

/// The name in a flow's first bytes; `finished`: no more bytes will come
/// before the far end answers.
pub fn first_name(first: &[u8], finished: bool) -> FirstName {
    use crate::names::NameSource;
    let (name, source) = match (client_hello_sni(first), http_host(first)) {
        (Peek::Name(n), _) => (n, NameSource::Sni),
        (_, Peek::Name(n)) => (n, NameSource::Host),
        (Peek::NoName, Peek::NoName) => return FirstName::Unnamed,
        _ if finished || first.len() >= FIRST_BYTES_LIMIT => return FirstName::Unnamed,
        _ => return FirstName::Wait,
    };
    if name.parse::<std::net::IpAddr>().is_ok() {
        return FirstName::Unnamed;
    }
    FirstName::Named(name, source)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A minimal TLS 1.2-style ClientHello carrying `sni` (for tests and the
/// guest probe's peer).
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data, far below u16::MAX
pub fn client_hello(sni: &str) -> Vec<u8> {
    let name = sni.as_bytes();
    let mut server_name = vec![HOST_NAME];
    server_name.extend_from_slice(&(name.len() as u16).to_be_bytes());
    server_name.extend_from_slice(name);
    let mut list = (server_name.len() as u16).to_be_bytes().to_vec();
    list.extend_from_slice(&server_name);
    let mut ext = EXT_SERVER_NAME.to_be_bytes().to_vec();
    ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
    ext.extend_from_slice(&list);
    let mut hello = vec![3, 3];
    hello.extend_from_slice(&[7; 32]);
    hello.push(0);
    hello.extend_from_slice(&[0, 2, 0x13, 0x01]);
    hello.extend_from_slice(&[1, 0]);
    hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ext);
    let mut hs = vec![CLIENT_HELLO, 0];
    hs.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    hs.extend_from_slice(&hello);
    let mut record = vec![TLS_HANDSHAKE, 3, 1];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_from_a_hello_and_every_truncation() {
        let hello = client_hello("Www.Example.TEST");
        assert_eq!(
            client_hello_sni(&hello),
            Peek::Name("www.example.test".into())
        );
        for cut in 0..hello.len() {
            let got = client_hello_sni(&hello[..cut]);
            assert!(
                matches!(got, Peek::NeedMore | Peek::NoName),
                "cut {cut}: {got:?}"
            );
        }
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n"), Peek::NoName);
        // Corrupt inner lengths: no panic, no name.
        let mut bad = hello.clone();
        bad[43] = 0xff; // session id length, past the end
        assert_eq!(client_hello_sni(&bad), Peek::NoName);
    }

    #[test]
    fn host_header_table() {
        let cases: &[(&[u8], Peek)] = &[
            (
                b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
                Peek::Name("a.test".into()),
            ),
            (
                b"GET / HTTP/1.1\r\nhost:B.Test:8080\r\nX: y\r\n\r\n",
                Peek::Name("b.test".into()),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
                Peek::Name("2001:db8::1".into()),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: 2001:db8::1\r\n\r\n",
                Peek::Name("2001:db8::1".into()),
            ),
            (b"GET / HTTP/1.1\r\nHost: a.test\r\n", Peek::NeedMore),
            (b"GE", Peek::NeedMore),
            (b"GET / HTTP/1.0\r\n\r\n", Peek::NoName),
            (b"SSH-2.0-x\r\n", Peek::NoName),
        ];
        for (data, want) in cases {
            assert_eq!(
                &http_host(data),
                want,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn first_name_decides_when_to_stop_waiting() {
        use crate::names::NameSource;
        let hello = client_hello("a.test");
        assert_eq!(
            first_name(&hello, false),
            FirstName::Named("a.test".into(), NameSource::Sni)
        );
        assert_eq!(first_name(&hello[..20], false), FirstName::Wait);
        // The guest stopped sending (FIN) mid-hello: decide without a name.
        assert_eq!(first_name(&hello[..20], true), FirstName::Unnamed);
        assert_eq!(
            first_name(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n", false),
            FirstName::Named("b.test".into(), NameSource::Host)
        );
        // Address literals name nothing the destination does not.
        for host in ["192.0.2.10:80", "[2001:db8::1]", "2001:db8::1"] {
            let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert_eq!(first_name(req.as_bytes(), false), FirstName::Unnamed);
        }
        assert_eq!(first_name(b"SSH-2.0-x\r\n", false), FirstName::Unnamed);
        // A prefix that never completes stops at the limit.
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(FIRST_BYTES_LIMIT, b'a');
        assert_eq!(first_name(&long, false), FirstName::Unnamed);
        assert_eq!(first_name(&long[..1000], false), FirstName::Wait);
    }

    #[test]
    fn mutated_hellos_never_panic_or_invent_names() {
        // Every byte of a real-shaped hello set to boundary values: the
        // parsers must return, and any name must be plain text.
        let hello = client_hello("www.example.test");
        for at in 0..hello.len() {
            for value in [0u8, 1, 0x7f, 0x80, 0xfe, 0xff] {
                let mut bad = hello.clone();
                bad[at] = value;
                for cut in [bad.len(), at + 1, bad.len() / 2] {
                    let data = &bad[..cut.min(bad.len())];
                    if let Peek::Name(n) = client_hello_sni(data) {
                        assert!(n.len() <= data.len(), "{at}/{value}: {n:?}");
                    }
                    let _ = first_name(data, true);
                    let _ = http_host(data);
                }
            }
        }
    }
}
