//! Names from a flow's own bytes: the server name of a TLS ClientHello
//! ([`tls`]) and the host of each HTTP/1 request ([`http`]), read the way
//! servers read them, so that no framing of a name — split records, empty
//! lines, lower-case methods, bare LFs, pipelined or later keep-alive
//! requests — hides it, and whatever a server could read differently from
//! us is refused rather than guessed at.
//!
//! [`first_name`] looks at the start of a flow; [`Stream`] follows all of
//! it: every request head of an HTTP connection is reported as it
//! completes, so the caller decides each before its bytes go on.
//!
//! Pure parsers over the daemon's own copy of the bytes; every length is
//! checked before use and nothing panics. Leaf module: imports only
//! [`crate::names`].
#![forbid(unsafe_code)]

pub mod http;
pub mod tls;

use crate::names::NameSource;

/// Largest beginning read for a name: room for a ClientHello of
/// [`tls::MAX_HELLO`] split into the smallest records, and for a request
/// head of [`http::MAX_HEAD`].
pub const FIRST_BYTES_LIMIT: usize = 96 * 1024;

/// A flow's name, as far as its first bytes tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstName {
    /// The TLS SNI, or the HTTP request's host.
    Named(String, NameSource),
    /// The bytes name nothing: not TLS or HTTP, TLS without SNI, HTTP/1.0
    /// without Host, or a name that is an address literal (it says nothing
    /// the destination does not). Decide without a name.
    Unnamed,
    /// TLS or HTTP that a server could read differently from us, or that
    /// hides its name: refuse where a name is needed.
    Unreadable(&'static str),
    /// A valid prefix: wait for more.
    Wait,
}

fn named(name: String, source: NameSource) -> FirstName {
    if name.parse::<std::net::IpAddr>().is_ok() {
        FirstName::Unnamed
    } else {
        FirstName::Named(name, source)
    }
}

/// The name in a flow's first bytes; `finished`: no more bytes will come
/// before the far end answers (FIN).
pub fn first_name(first: &[u8], finished: bool) -> FirstName {
    let incomplete = finished || first.len() >= FIRST_BYTES_LIMIT;
    match tls::client_hello(first) {
        tls::Hello::Name(n) => return named(n, NameSource::Sni),
        tls::Hello::NoName => return FirstName::Unnamed,
        tls::Hello::Unreadable(why) => return FirstName::Unreadable(why),
        tls::Hello::NeedMore if incomplete => {
            return FirstName::Unreadable("ClientHello incomplete");
        }
        tls::Hello::NeedMore => return FirstName::Wait,
        tls::Hello::NotTls => {}
    }
    match http::head(first) {
        http::Head::Request { host: Some(h), .. } => named(h, NameSource::Host),
        http::Head::Request { host: None, .. } | http::Head::NotHttp => FirstName::Unnamed,
        http::Head::Unreadable(why) => FirstName::Unreadable(why),
        http::Head::NeedMore if incomplete => FirstName::Unreadable("request head incomplete"),
        http::Head::NeedMore => FirstName::Wait,
    }
}

/// One connection's guest-to-server bytes, followed from the start.
#[derive(Debug, Clone)]
pub struct Stream {
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    /// Before the first bytes named the flow.
    Start,
    /// An HTTP connection: every request head is reported.
    Http(http::Tracker),
    /// Nothing more to read a name from (TLS after its hello, other
    /// protocols, upgraded HTTP).
    Done,
}

/// What the bytes fed so far call for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The start is incomplete: hold the bytes and feed more.
    Wait,
    /// Decide these names (None: a request or hello that names nothing)
    /// before passing the bytes fed; empty: pass them.
    Names(Vec<(Option<String>, NameSource)>),
    /// Refuse the flow.
    Unreadable(&'static str),
}

impl Default for Stream {
    fn default() -> Self {
        Self::new()
    }
}

impl Stream {
    /// A connection about to start.
    pub fn new() -> Self {
        Self {
            state: State::Start,
        }
    }

    /// Whether no later byte can name anything (so the caller may stop
    /// feeding).
    pub fn is_done(&self) -> bool {
        match &self.state {
            State::Done => true,
            State::Http(t) => t.is_opaque(),
            State::Start => false,
        }
    }

    /// Whether the first bytes are still awaited (feed all bytes again).
    pub fn is_starting(&self) -> bool {
        matches!(self.state, State::Start)
    }

    /// Trailing bytes of what was fed that must not reach the server yet:
    /// everything while starting, else an incomplete request head.
    pub fn held_back(&self, fed: usize) -> usize {
        match &self.state {
            State::Start => fed,
            State::Http(t) => t.incomplete_head(),
            State::Done => 0,
        }
    }

    /// During [`Step::Wait`], the caller keeps the bytes and feeds all of
    /// them again with more appended; afterwards, only new bytes.
    /// `finished`: the guest sent its FIN after these bytes; an incomplete
    /// head then is refused.
    pub fn feed(&mut self, data: &[u8], finished: bool) -> Step {
        match &mut self.state {
            State::Done => Step::Names(Vec::new()),
            State::Http(tracker) => match tracker.feed(data) {
                http::Found::Heads(_) if finished && tracker.incomplete_head() > 0 => {
                    Step::Unreadable("request head incomplete at FIN")
                }
                http::Found::Heads(heads) => Step::Names(
                    heads
                        .into_iter()
                        .map(|h| {
                            (
                                h.filter(|n| n.parse::<std::net::IpAddr>().is_err()),
                                NameSource::Host,
                            )
                        })
                        .collect(),
                ),
                http::Found::Unreadable(why) => Step::Unreadable(why),
            },
            State::Start => match first_name(data, finished) {
                FirstName::Wait => Step::Wait,
                FirstName::Unreadable(why) => Step::Unreadable(why),
                _ if http::head(data) != http::Head::NotHttp => {
                    self.state = State::Http(http::Tracker::new());
                    self.feed(data, finished)
                }
                FirstName::Named(name, source) => {
                    self.state = State::Done;
                    Step::Names(vec![(Some(name), source)])
                }
                FirstName::Unnamed => {
                    self.state = State::Done;
                    Step::Names(vec![(None, NameSource::Sni)])
                }
            },
        }
    }
}

/// One connection's guest bytes, held until what they name is decided:
/// everything until the first bytes name the flow, later an incomplete
/// request head. The caller pushes bytes, decides the [`Step`], then
/// releases what is cleared.
#[derive(Debug, Clone, Default)]
pub struct Held {
    stream: Stream,
    bytes: Vec<u8>,
}

impl Held {
    /// Nothing held yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Whether the first bytes are still awaited.
    pub fn is_starting(&self) -> bool {
        self.stream.is_starting()
    }

    /// Whether later bytes cannot name anything and nothing is held.
    pub fn is_done(&self) -> bool {
        self.stream.is_done() && self.bytes.is_empty()
    }

    /// Adds the guest's next bytes (`fin`: its FIN follows them) and says
    /// what they call for; nothing new is `Names` of none.
    pub fn push(&mut self, data: &[u8], fin: bool) -> Step {
        let before = self.bytes.len();
        self.bytes.extend_from_slice(data);
        let fresh = self.bytes.len() > before || (fin && !self.bytes.is_empty());
        if !fresh {
            return Step::Names(Vec::new());
        }
        if self.stream.is_starting() {
            self.stream.feed(&self.bytes, fin)
        } else {
            self.stream
                .feed(self.bytes.get(before..).unwrap_or_default(), fin)
        }
    }

    /// Takes out what may go to the server now, once the step's names were
    /// allowed.
    pub fn release(&mut self) -> Vec<u8> {
        let back = self
            .stream
            .held_back(self.bytes.len())
            .min(self.bytes.len());
        let cleared = self.bytes.len() - back;
        self.bytes.drain(..cleared).collect()
    }
}

#[cfg(test)]
mod tests;
