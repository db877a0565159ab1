//! The tracker of a connection's request heads: past each body (length or
//! chunked) to the next head, pipelined or kept alive; opaque after an
//! upgrade or CONNECT.
#![forbid(unsafe_code)]

use super::{Body, Fields, Head, MAX_CHUNK_LINE, head};

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
