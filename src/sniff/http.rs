//! HTTP/1 request heads, read the way servers read them (RFC 9112), and a
//! tracker that finds every request head on a connection: the first,
//! pipelined ones, and later keep-alive ones, past each body.
//!
//! What makes a head count as a request: a request line of a method token,
//! a target and an `HTTP/x.y` version, after any number of empty lines
//! (RFC 9112 2.2 lets servers skip them), lines ended by CRLF or a bare LF
//! (2.2 again), the method in any case (servers differ; none of them may
//! hide the name). The name is the target's authority in absolute form
//! (3.2.2: it overrides Host) or CONNECT's authority, else the one Host
//! field. Anything that looks like a request but that a server could read
//! differently from us is [`Head::Unreadable`]: a bare CR, a NUL, obs-fold,
//! whitespace before a colon, two Host fields, a Host that is not a host,
//! userinfo, a Host that disagrees with the target, a version other than
//! 1.x (HTTP/2 prior knowledge included), two Content-Lengths that differ,
//! Transfer-Encoding with Content-Length or without chunked last.
//!
//! Pure; bounded (a head over [`MAX_HEAD`] is unreadable); nothing panics.
#![forbid(unsafe_code)]

/// Largest request head read (request line and fields).
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest chunk-size line of a chunked body.
const MAX_CHUNK_LINE: usize = 1024;

/// What a request head says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// Not an HTTP/1 request at all.
    NotHttp,
    /// A valid prefix: wait for more.
    NeedMore,
    /// A complete head; the host it names (lower case, no port), None
    /// when it names none (HTTP/1.0 without Host). `len` is its length.
    Request {
        /// The host, when it names one (may be an address literal).
        host: Option<String>,
        /// Bytes of the head, blank line included.
        len: usize,
        /// How its body is framed.
        body: Body,
        /// The stream after it is not HTTP any more (CONNECT, Upgrade)
        /// unless what follows parses as a request.
        upgrade: bool,
    },
    /// Looks like a request but is not one a server reads as we would.
    Unreadable(&'static str),
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body.
    None,
    /// This many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The lines of a head: (line without its terminator, offset after it).
fn next_line(data: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = data.get(at..)?;
    let end = rest.iter().position(|&b| b == b'\n')?;
    let line = rest.get(..end)?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, at + end + 1))
}

/// Whether `data` could start a request line (a token, then SP).
fn looks_like_request(data: &[u8]) -> bool {
    let method = data.iter().take_while(|b| is_tchar(**b)).count();
    method > 0 && data.get(method).is_none_or(|b| *b == b' ' || *b == b'\t')
}

/// Reads the request head at the start of `data`.
pub fn head(data: &[u8]) -> Head {
    // Empty lines before the request line.
    let mut start = 0;
    loop {
        match data.get(start..) {
            Some([b'\r', b'\n', ..]) => start += 2,
            Some([b'\n', ..]) => start += 1,
            Some([b'\r']) | Some([]) => return Head::NeedMore,
            _ => break,
        }
        if start > MAX_HEAD {
            return Head::Unreadable("too many empty lines");
        }
    }
    let rest = data.get(start..).unwrap_or_default();
    let token = rest.iter().take_while(|b| is_tchar(**b)).count();
    if token == rest.len() {
        // Still inside the first word: a request if a space follows.
        return if token > 0 && token < 64 {
            Head::NeedMore
        } else {
            Head::NotHttp
        };
    }
    if !looks_like_request(rest) {
        return Head::NotHttp;
    }
    let Some((request_line, mut at)) = next_line(data, start) else {
        return if data.len() > MAX_HEAD {
            Head::Unreadable("request line too long")
        } else if rest.contains(&b'\r') && !rest.ends_with(b"\r") {
            Head::Unreadable("bare CR")
        } else {
            Head::NeedMore
        };
    };
    if request_line.contains(&b'\r') || request_line.contains(&0) {
        return Head::Unreadable("bare CR or NUL in the request line");
    }
    let words: Vec<&[u8]> = request_line
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|w| !w.is_empty())
        .collect();
    let is_version = |w: &[u8]| w.get(..5).is_some_and(|v| v.eq_ignore_ascii_case(b"HTTP/"));
    let is_target =
        |w: &[u8]| w.starts_with(b"/") || w == b"*" || w.windows(3).any(|x| x == b"://");
    let (method, target, version) = match words.as_slice() {
        [method, target, version] if is_version(version) => (*method, *target, *version),
        // HTTP/0.9 and other near misses: a server may still serve them,
        // from a default host we do not know.
        [_, target, ..] if is_target(target) => return Head::Unreadable("not a request line"),
        [.., last] if is_version(last) => return Head::Unreadable("not a request line"),
        _ => return Head::NotHttp,
    };
    if !version.to_ascii_uppercase().starts_with(b"HTTP/1.") || version.len() != 8 {
        return Head::Unreadable("not HTTP/1.x");
    }
    let mut fields = Fields::default();
    loop {
        let Some((line, next)) = next_line(data, at) else {
            if data.len() > MAX_HEAD {
                return Head::Unreadable("head too long");
            }
            return match data.get(at..) {
                Some(tail) if tail.contains(&b'\r') && !tail.ends_with(b"\r") => {
                    Head::Unreadable("bare CR")
                }
                Some(tail) if tail.contains(&0) => Head::Unreadable("NUL"),
                _ => Head::NeedMore,
            };
        };
        at = next;
        if at > MAX_HEAD {
            return Head::Unreadable("head too long");
        }
        if line.is_empty() {
            break;
        }
        if let Err(why) = fields.add(line) {
            return Head::Unreadable(why);
        }
    }
    let connect = method.eq_ignore_ascii_case(b"CONNECT");
    let host = match authority_of(target, connect) {
        Err(why) => return Head::Unreadable(why),
        Ok(from_target) => match (from_target, fields.host.take()) {
            (Some(t), Some(h)) if t != h => {
                return Head::Unreadable("Host disagrees with the target");
            }
            (Some(t), _) => Some(t),
            (None, h) => h,
        },
    };
    if host.is_none() && version.eq_ignore_ascii_case(b"HTTP/1.1") {
        return Head::Unreadable("HTTP/1.1 without Host");
    }
    let body = match fields.body() {
        Ok(body) => body,
        Err(why) => return Head::Unreadable(why),
    };
    Head::Request {
        host,
        len: at,
        body,
        upgrade: connect || fields.upgrade,
    }
}

/// The fields of a head that matter.
#[derive(Default)]
struct Fields {
    host: Option<String>,
    hosts: usize,
    length: Option<u64>,
    chunked_last: Option<bool>,
    upgrade: bool,
}

impl Fields {
    fn add(&mut self, line: &[u8]) -> Result<(), &'static str> {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err("obs-fold");
        }
        if line.contains(&b'\r') || line.contains(&0) {
            return Err("bare CR or NUL in a field");
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            return Err("field without a colon");
        };
        let (name, value) = (
            line.get(..colon).unwrap_or_default(),
            line.get(colon + 1..).unwrap_or_default(),
        );
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err("field name is not a token");
        }
        let value = value.trim_ascii();
        let text = std::str::from_utf8(value).map_err(|_| "field value is not text")?;
        match name.to_ascii_lowercase().as_slice() {
            b"host" => {
                self.hosts += 1;
                if self.hosts > 1 {
                    return Err("two Host fields");
                }
                self.host = parse_authority(text)?;
                if self.host.is_none() {
                    return Err("empty Host");
                }
            }
            b"content-length" => {
                for part in text.split(',') {
                    // 1*DIGIT only: Rust's parser would take "+5", which a
                    // server might read otherwise.
                    let part = part.trim();
                    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                        return Err("Content-Length is not a number");
                    }
                    let n: u64 = part.parse().map_err(|_| "Content-Length is not a number")?;
                    if self.length.is_some_and(|m| m != n) {
                        return Err("Content-Lengths differ");
                    }
                    self.length = Some(n);
                }
            }
            b"transfer-encoding" => {
                let last = text.rsplit(',').next().unwrap_or_default().trim();
                self.chunked_last = Some(last.eq_ignore_ascii_case("chunked"));
            }
            b"upgrade" => self.upgrade = true,
            _ => {}
        }
        Ok(())
    }

    fn body(&self) -> Result<Body, &'static str> {
        match (self.chunked_last, self.length) {
            (Some(_), Some(_)) => Err("Transfer-Encoding with Content-Length"),
            (Some(true), None) => Ok(Body::Chunked),
            (Some(false), None) => Err("Transfer-Encoding without chunked last"),
            (None, Some(0) | None) => Ok(Body::None),
            (None, Some(n)) => Ok(Body::Length(n)),
        }
    }
}

/// The host of a request target in absolute form (or CONNECT's authority
/// form); None for origin form (`/path`) and `*`.
fn authority_of(target: &[u8], connect: bool) -> Result<Option<String>, &'static str> {
    let text = std::str::from_utf8(target).map_err(|_| "target is not text")?;
    if connect {
        return parse_authority(text);
    }
    if text.starts_with('/') || text == "*" {
        return Ok(None);
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err("target is neither a path nor absolute");
    };
    if !scheme
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err("bad scheme");
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    parse_authority(rest.get(..end).unwrap_or_default())
}

/// `host[:port]`, `[v6][:port]`: the host, lower case. Userinfo, a bad
/// port or a host that is neither a name nor an address literal is an
/// error; an empty authority is None.
fn parse_authority(text: &str) -> Result<Option<String>, &'static str> {
    if text.is_empty() {
        return Ok(None);
    }
    if text.contains('@') {
        return Err("userinfo in an authority");
    }
    let (host, port) = match text.strip_prefix('[') {
        Some(v6) => {
            let (addr, rest) = v6.split_once(']').ok_or("unclosed [")?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err("bad IPv6 literal");
            }
            (addr, rest.strip_prefix(':'))
        }
        None => match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        },
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("bad port");
    }
    let host = crate::names::normalize(host);
    if host.parse::<std::net::IpAddr>().is_err() && crate::names::check(&host).is_err() {
        return Err("not a host name");
    }
    Ok(Some(host))
}

/// Follows a connection's guest-to-server bytes and reports every request
/// head as it completes, so each one's host can be decided before its
/// bytes are passed on.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    state: State,
    /// A head (or chunk-size line) split across feeds.
    pending: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
enum State {
    /// Expecting a request head.
    #[default]
    Head,
    /// Expecting a request head; if what comes does not look like one,
    /// the connection was upgraded and is opaque from here on.
    AfterUpgrade,
    /// Inside a body of known length: bytes left.
    Body(u64),
    /// Chunked: reading a chunk-size line.
    ChunkSize,
    /// Chunked: inside a chunk (bytes left, then its CRLF).
    Chunk(u64),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: trailer fields after the last chunk.
    Trailers,
    /// Not HTTP any more (upgraded, tunnelled): nothing to decide.
    Opaque,
}

/// What a feed found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Heads completed in this feed, in order: each host to decide.
    Heads(Vec<Option<String>>),
    /// A request a server could read otherwise: refuse the connection.
    Unreadable(&'static str),
}

impl Tracker {
    /// A tracker for a connection whose first bytes were HTTP.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the connection stopped being HTTP (upgrade, CONNECT).
    pub fn is_opaque(&self) -> bool {
        matches!(self.state, State::Opaque)
    }

    /// Trailing bytes of what was fed that belong to a request head not
    /// complete yet: they must not reach the server before it is decided
    /// (some servers end a head at EOF).
    pub fn incomplete_head(&self) -> usize {
        match self.state {
            State::Head | State::AfterUpgrade => self.pending.len(),
            _ => 0,
        }
    }

    /// Takes the next bytes of the connection.
    pub fn feed(&mut self, mut data: &[u8]) -> Found {
        let mut heads = Vec::new();
        while !data.is_empty() {
            match self.state {
                State::Opaque => break,
                State::Head | State::AfterUpgrade => {
                    let had = self.pending.len();
                    self.pending.extend_from_slice(data);
                    match head(&self.pending) {
                        Head::NeedMore => return Found::Heads(heads),
                        Head::NotHttp if matches!(self.state, State::AfterUpgrade) => {
                            self.state = State::Opaque;
                            self.pending.clear();
                            break;
                        }
                        Head::NotHttp => return Found::Unreadable("not a request"),
                        Head::Unreadable(why) => return Found::Unreadable(why),
                        Head::Request {
                            host,
                            len,
                            body,
                            upgrade,
                        } => {
                            heads.push(host);
                            let used = len.saturating_sub(had);
                            data = data.get(used..).unwrap_or_default();
                            self.pending.clear();
                            self.state = match body {
                                Body::None if upgrade => State::AfterUpgrade,
                                Body::None => State::Head,
                                Body::Length(n) => State::Body(n),
                                Body::Chunked => State::ChunkSize,
                            };
                        }
                    }
                }
                State::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    data = data.get(n..).unwrap_or_default();
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::Chunk(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    data = data.get(n..).unwrap_or_default();
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::Chunk(left)
                    };
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        self.pending.extend_from_slice(data);
                        if self.pending.len() > MAX_CHUNK_LINE {
                            return Found::Unreadable("chunk line too long");
                        }
                        return Found::Heads(heads);
                    };
                    self.pending
                        .extend_from_slice(data.get(..nl).unwrap_or_default());
                    data = data.get(nl + 1..).unwrap_or_default();
                    let line = std::mem::take(&mut self.pending);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    match self.line(line) {
                        Ok(next) => self.state = next,
                        Err(why) => return Found::Unreadable(why),
                    }
                }
            }
        }
        Found::Heads(heads)
    }

    /// The state after a complete line of a chunked body.
    fn line(&self, line: &[u8]) -> Result<State, &'static str> {
        if line.contains(&b'\r') || line.contains(&0) {
            return Err("bare CR in a chunked body");
        }
        match self.state {
            State::ChunkSize => {
                let size = line
                    .split(|b| *b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                if size.is_empty() || size.len() > 16 {
                    return Err("bad chunk size");
                }
                let text = std::str::from_utf8(size).map_err(|_| "bad chunk size")?;
                let n = u64::from_str_radix(text, 16).map_err(|_| "bad chunk size")?;
                Ok(if n == 0 {
                    State::Trailers
                } else {
                    State::Chunk(n)
                })
            }
            State::ChunkEnd if line.is_empty() => Ok(State::ChunkSize),
            State::ChunkEnd => Err("chunk data longer than its size"),
            State::Trailers if line.is_empty() => Ok(State::Head),
            State::Trailers => {
                let mut fields = Fields::default();
                fields.add(line)?;
                Ok(State::Trailers)
            }
            _ => Err("not in a chunked body"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(data: &[u8]) -> Result<Option<String>, String> {
        match head(data) {
            Head::Request { host, .. } => Ok(host),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn the_name_in_every_framing_servers_accept() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"\r\n\r\nGET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"\n\nGET / HTTP/1.1\nHost: a.test\n\n",
            b"get / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"gEt / http/1.1\r\nhOsT:a.test\r\n\r\n",
            b"PROPFIND /x HTTP/1.1\r\nX: y\r\nHost: A.Test.:8080\r\n\r\n",
            b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n",
            b"GET http://a.test:81/x HTTP/1.1\r\n\r\n",
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
            b"GET  /  HTTP/1.1\r\nHost:   a.test   \r\n\r\n",
        ];
        for case in cases {
            assert_eq!(
                host(case),
                Ok(Some("a.test".into())),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        assert_eq!(host(b"GET / HTTP/1.0\r\n\r\n"), Ok(None));
        assert_eq!(
            host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"),
            Ok(Some("2001:db8::1".into()))
        );
    }

    #[test]
    fn what_a_server_could_read_otherwise_is_unreadable() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: y\r\n Host: b.test\r\nHost: a.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\rHost: b.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: ok.test@evil.test\r\n\r\n",
            b"GET http://evil.test/ HTTP/1.1\r\nHost: ok.test\r\n\r\n",
            b"GET http://ok.test@evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET /\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test:80x\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \xc3\xa4.test\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5 5\r\n\r\n",
        ];
        for case in cases {
            assert!(
                matches!(head(case), Head::Unreadable(_)),
                "{:?}: {:?}",
                String::from_utf8_lossy(case),
                head(case)
            );
        }
    }

    #[test]
    fn not_http_and_prefixes() {
        for other in [
            &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
            b"\x16\x03\x01",
            b"get foo\r\n",
            b"EHLO client.test\r\n",
            b"SET key value\r\n",
            b"PING\r\n",
        ] {
            assert_eq!(
                head(other),
                Head::NotHttp,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        assert_eq!(head(b"SSH-2.0-OpenSSH_9.2\r\n"), Head::NotHttp);
        let full = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(head(&full[..cut]), Head::NeedMore, "{cut}");
        }
    }

    fn feed_split(data: &[u8], size: usize) -> Result<Vec<Option<String>>, &'static str> {
        let mut t = Tracker::new();
        let mut all = Vec::new();
        for chunk in data.chunks(size.max(1)) {
            match t.feed(chunk) {
                Found::Heads(h) => all.extend(h),
                Found::Unreadable(why) => return Err(why),
            }
        }
        Ok(all)
    }

    #[test]
    fn every_request_on_a_connection_in_every_split() {
        let stream: &[u8] = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n\
            POST /up HTTP/1.1\r\nHost: b.test\r\nContent-Length: 11\r\n\r\nHost: x.tes\
            POST /c HTTP/1.1\r\nHost: c.test\r\nTransfer-Encoding: chunked\r\n\r\n\
            4;ext=1\r\nGET \r\n0\r\nX-Trailer: 1\r\n\r\n\
            \r\nget / HTTP/1.1\r\nhost: D.test\r\n\r\n";
        let want: Vec<Option<String>> = ["a.test", "b.test", "c.test", "d.test"]
            .iter()
            .map(|s| Some((*s).to_owned()))
            .collect();
        for size in 1..=stream.len() {
            assert_eq!(feed_split(stream, size), Ok(want.clone()), "split {size}");
        }
    }

    #[test]
    fn upgrades_end_in_opaque_bytes_unless_a_request_follows() {
        let ws = b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x85abcd12345";
        let mut t = Tracker::new();
        assert_eq!(t.feed(ws), Found::Heads(vec![Some("a.test".into())]));
        assert!(t.is_opaque());
        let declined = b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n";
        assert_eq!(
            feed_split(declined, 7),
            Ok(vec![Some("a.test".into()), Some("b.test".into())])
        );
        let mut t = Tracker::new();
        assert_eq!(
            t.feed(b"CONNECT b.test:443 HTTP/1.1\r\n\r\n\x16\x03\x01"),
            Found::Heads(vec![Some("b.test".into())])
        );
        assert!(t.is_opaque());
        // Garbage where the next request should be is refused.
        let mut t = Tracker::new();
        assert!(matches!(
            t.feed(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n\x00\x01binary"),
            Found::Unreadable(_)
        ));
    }
}
