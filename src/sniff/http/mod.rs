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

mod tracker;

pub use tracker::{Found, Tracker};

#[cfg(test)]
mod tests;
