//! The DNS forwarder: one query in, one answer out. Parses the guest's query
//! with hickory-proto, answers blocked names itself, and forwards the rest
//! verbatim (EDNS and all) to the upstreams in order, each with a timeout,
//! for the configured number of rounds; no answer means SERVFAIL, never
//! silence. Malformed queries get FORMERR when they have a header to answer,
//! and nothing otherwise.
//!
//! Runs as a tokio task per query (the engine bounds how many).
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

use super::pins::Pins;
use super::rebind::Filtered;
use super::rules::Live;
use crate::config::{BlockedAnswer, Dns};

/// Smallest DNS message: the header (RFC 1035 4.1.1).
const HEADER_BYTES: usize = 12;
/// TTL of a null answer for a blocked name.
const BLOCKED_TTL: u32 = 60;
/// EDNS option code of Extended DNS Errors (RFC 8914 2).
const EDE_OPTION: u16 = 15;
/// EDE info-code "Blocked" (RFC 8914 4.16).
const EDE_BLOCKED: u16 = 15;
/// UDP payload size we advertise in our own OPT records.
const EDNS_PAYLOAD: u16 = 1232;
/// Largest UDP answer accepted from an upstream.
const MAX_ANSWER: usize = 65_535;

/// What the forwarder works with.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    attempts: u32,
    pins: Arc<Pins>,
    rules: Live,
}

/// How a query reaches the upstreams: as it came from the guest, so a
/// truncated UDP answer leads to a TCP retry that really gets everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Datagrams.
    Udp,
    /// A TCP connection per query, messages with a 2-byte length (RFC 1035 4.2.2).
    Tcp,
}

/// How a query ended, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An upstream answered.
    Answered,
    /// The name is blocked.
    Blocked,
    /// An upstream answered; internal addresses were removed from it.
    RebindStripped,
    /// No upstream answered: SERVFAIL.
    Failed,
    /// Not a query we can parse: FORMERR, or dropped without a header.
    Malformed,
}

impl Outcome {
    /// The counter this outcome adds to.
    pub fn counter(self) -> crate::metrics::Counter {
        use crate::metrics::Counter;
        match self {
            Outcome::Answered => Counter::dns_answered,
            Outcome::Blocked => Counter::dns_blocked,
            Outcome::RebindStripped => Counter::dns_rebind_stripped,
            Outcome::Failed => Counter::dns_servfail,
            Outcome::Malformed => Counter::dns_malformed,
        }
    }
}

impl Forwarder {
    /// From the config; `upstreams` already resolved (config or host);
    /// block list, policy and rebind filter read from `rules` per query.
    pub fn new(
        config: &Dns,
        upstreams: Vec<SocketAddr>,
        pins: Arc<Pins>,
        rules: Live,
    ) -> Arc<Self> {
        Arc::new(Self {
            upstreams,
            timeout: Duration::from_millis(config.timeout_ms),
            attempts: config.attempts,
            pins,
            rules,
        })
    }

    /// Answers one query (wire bytes); None when there is nothing to answer
    /// (shorter than a header).
    pub async fn answer(&self, query: &[u8], transport: Transport) -> (Option<Vec<u8>>, Outcome) {
        let parsed = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                return (
                    error_reply(query, ResponseCode::FormErr),
                    Outcome::Malformed,
                );
            }
        };
        let single_query = parsed.queries.len() == 1;
        if parsed.metadata.message_type != MessageType::Query
            || parsed.metadata.op_code != OpCode::Query
            || !single_query
        {
            return (
                error_reply(query, ResponseCode::FormErr),
                Outcome::Malformed,
            );
        }
        let name = parsed
            .queries
            .first()
            .map(|q| q.name().to_ascii())
            .unwrap_or_default();
        // One set of rules for the whole query, even if a reload lands
        // while it waits for an upstream.
        let rules = self.rules.load_full();
        if rules.block.contains(&name) {
            return (refusal(&parsed, rules.blocked_answer), Outcome::Blocked);
        }
        // A name the egress policy could never allow a flow for is answered
        // like a blocked one, whatever the query type (no DNS tunnel out).
        let decision = rules.policy.query(&name);
        if decision.action == crate::policy::Action::Deny {
            crate::audit::deny(&crate::audit::Deny {
                proto: "dns",
                dst: None,
                port: 0,
                name: Some(name.trim_end_matches('.')),
                name_source: Some("query"),
                rule: decision.rule,
                reason: crate::audit::Reason::Policy,
                reload: false,
            });
            return (refusal(&parsed, rules.blocked_answer), Outcome::Blocked);
        }
        for _ in 0..self.attempts {
            for upstream in &self.upstreams {
                let asked = match transport {
                    Transport::Udp => self.ask(*upstream, query, &parsed).await,
                    Transport::Tcp => self.ask_tcp(*upstream, query, &parsed).await,
                };
                if let Some(answer) = asked {
                    let (answer, outcome) = match rules.rebind.as_ref().map(|r| r.filter(&answer)) {
                        None | Some(Filtered::Unchanged) => (answer, Outcome::Answered),
                        Some(Filtered::Stripped(bytes, _)) => (bytes, Outcome::RebindStripped),
                        // An answer we cannot check is not passed on.
                        Some(Filtered::Unparseable) => {
                            return (error_reply(query, ResponseCode::ServFail), Outcome::Failed);
                        }
                    };
                    // Pin what the guest is actually given.
                    self.pins.record_answer(&answer, std::time::Instant::now());
                    return (Some(answer), outcome);
                }
            }
        }
        (error_reply(query, ResponseCode::ServFail), Outcome::Failed)
    }

    /// Whether `name` resolves to `addr` through this forwarder (its block
    /// list, policy, rebind filter and upstreams; the answer is pinned like
    /// the guest's own). For a flow whose name came from its own first bytes
    /// with no DNS answer behind it: an allowed name admits only the
    /// addresses it really has.
    pub async fn resolves_to(&self, name: &str, addr: IpAddr) -> bool {
        use hickory_proto::op::Query;
        use hickory_proto::rr::Name;
        let Ok(qname) = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))) else {
            return false;
        };
        let kind = if addr.is_ipv4() {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        let mut query = Message::query();
        query.metadata.id = query_id();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(qname, kind));
        let Ok(bytes) = query.to_vec() else {
            return false;
        };
        let (Some(answer), Outcome::Answered | Outcome::RebindStripped) =
            self.answer(&bytes, Transport::Udp).await
        else {
            return false;
        };
        let Ok(answer) = Message::from_vec(&answer) else {
            return false;
        };
        answer.answers.iter().any(|r| match &r.data {
            RData::A(a) => IpAddr::V4(a.0) == addr,
            RData::AAAA(a) => IpAddr::V6(a.0) == addr,
            _ => false,
        })
    }

    async fn ask(&self, upstream: SocketAddr, query: &[u8], asked: &Message) -> Option<Vec<u8>> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind).await.ok()?;
        socket.connect(upstream).await.ok()?;
        socket.send(query).await.ok()?;
        let mut buf = vec![0u8; MAX_ANSWER];
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
                .await
                .ok()?
                .ok()?;
            let answer = buf.get(..n)?;
            // Anything else (a late or spoofed datagram) is ignored and the
            // real answer still awaited.
            if answers(asked, answer) {
                return Some(answer.to_vec());
            }
        }
    }

    async fn ask_tcp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        asked: &Message,
    ) -> Option<Vec<u8>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(upstream).await.ok()?;
            let len = u16::try_from(query.len()).ok()?;
            let mut message = Vec::with_capacity(query.len() + 2);
            message.extend_from_slice(&len.to_be_bytes());
            message.extend_from_slice(query);
            stream.write_all(&message).await.ok()?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.ok()?;
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut answer).await.ok()?;
            answers(asked, &answer).then_some(answer)
        };
        tokio::time::timeout(self.timeout, exchange).await.ok()?
    }
}

/// The answer for a blocked name: the question echoed; NXDOMAIN,
/// REFUSED, or a null address; with an Extended DNS Error "Blocked"
/// (RFC 8914, info-code 15) when the query spoke EDNS, so the guest can
/// tell policy from failure.
fn refusal(query: &Message, blocked_answer: BlockedAnswer) -> Option<Vec<u8>> {
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = query.queries.clone();
    reply.metadata.response_code = match blocked_answer {
        BlockedAnswer::Nxdomain => ResponseCode::NXDomain,
        BlockedAnswer::Refused => ResponseCode::Refused,
        BlockedAnswer::Null => {
            if let Some(q) = query.queries.first() {
                let data = match q.query_type() {
                    RecordType::A => Some(RData::A(A(Ipv4Addr::UNSPECIFIED))),
                    RecordType::AAAA => Some(RData::AAAA(AAAA(Ipv6Addr::UNSPECIFIED))),
                    _ => None,
                };
                if let Some(data) = data {
                    reply
                        .answers
                        .push(Record::from_rdata(q.name().clone(), BLOCKED_TTL, data));
                }
            }
            ResponseCode::NoError
        }
    };
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        // Option 15, INFO-CODE 15 "Blocked", no EXTRA-TEXT.
        edns.options_mut().insert(EdnsOption::Unknown(
            EDE_OPTION,
            EDE_BLOCKED.to_be_bytes().to_vec(),
        ));
        reply.set_edns(edns);
    }
    reply.to_vec().ok()
}

/// An unpredictable id for the forwarder's own queries (RFC 5452 9.2):
/// std's per-process random hash keys, mixed with the clock.
fn query_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let v = h.finish();
    u16::try_from(v & 0xffff).unwrap_or_default()
}

/// Whether `answer` answers `asked` (RFC 5452 9.1): a response with the
/// same id and the same question (name, case aside; type; class). Only the
/// header and the question are read, so an answer whose records do not
/// parse still counts here and is judged by the rebind filter.
fn answers(asked: &Message, answer: &[u8]) -> bool {
    use hickory_proto::op::{Header, Query};
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
    if answer.len() < HEADER_BYTES {
        return false;
    }
    let mut decoder = BinDecoder::new(answer);
    let Ok(header) = Header::read(&mut decoder) else {
        return false;
    };
    if header.metadata.id != asked.metadata.id
        || header.metadata.message_type != MessageType::Response
        || usize::from(header.counts.queries) != asked.queries.len()
    {
        return false;
    }
    asked.queries.iter().all(|want| {
        Query::read(&mut decoder).is_ok_and(|got| {
            got.name() == want.name()
                && got.query_type() == want.query_type()
                && got.query_class() == want.query_class()
        })
    })
}

/// REFUSED for a query we will not take (the in-flight bound).
pub fn refused(query: &[u8]) -> Option<Vec<u8>> {
    error_reply(query, ResponseCode::Refused)
}

/// An error answer built on the query's own header (id, opcode, RD) and
/// question bytes when they parse, so even a query hickory rejects gets a
/// reply the stub can match; None without a full header.
fn error_reply(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let header = query.get(..HEADER_BYTES)?;
    let mut reply = header.to_vec();
    // QR=1, keep opcode and RD; RA=1, rcode; no sections.
    let (flags_hi, _) = (header.get(2).copied()?, header.get(3).copied()?);
    let rcode = u8::try_from(u16::from(code) & 0x0f).unwrap_or(2);
    if let Some(b) = reply.get_mut(2) {
        *b = 0x80 | (flags_hi & 0x79);
    }
    if let Some(b) = reply.get_mut(3) {
        *b = 0x80 | rcode;
    }
    if let Some(counts) = reply.get_mut(4..HEADER_BYTES) {
        counts.fill(0);
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::rules::Rules;
    use crate::policy::Policy;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    /// A response to `name` with `id`, one A record.
    fn response(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::response(id, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.add_answer(Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            60,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 66))),
        ));
        m.to_vec().unwrap()
    }

    #[test]
    fn only_a_response_to_the_same_question_answers() {
        let asked = Message::from_vec(&query("example.test.")).unwrap();
        assert!(answers(&asked, &response(0x4242, "example.test.")));
        assert!(answers(&asked, &response(0x4242, "EXAMPLE.Test.")));
        // Another id, another name (an answer that would pin a name the
        // guest never asked for), the query echoed, garbage.
        assert!(!answers(&asked, &response(0x4243, "example.test.")));
        assert!(!answers(&asked, &response(0x4242, "other.test.")));
        assert!(!answers(&asked, &query("example.test.")));
        let mut garbage = response(0x4242, "example.test.");
        garbage.truncate(14);
        assert!(!answers(&asked, &garbage));
        assert!(!answers(&asked, &[0x42, 0x42, 0x80]));
    }

    fn allow_all() -> Policy {
        Policy::new(Vec::new(), crate::policy::Action::Allow, Vec::new())
    }

    fn forwarder(block: &[&str], upstreams: Vec<SocketAddr>) -> Arc<Forwarder> {
        let config = Dns {
            block: block.iter().map(|s| (*s).to_owned()).collect(),
            timeout_ms: 200,
            attempts: 1,
            ..Dns::default()
        };
        let rules = Rules::new(&config, Vec::new(), Arc::new(allow_all())).live();
        Forwarder::new(&config, upstreams, Arc::new(Pins::new(16)), rules)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blocked_name_gets_nxdomain_with_its_question() {
        let f = forwarder(&["*.blocked.test"], vec![]);
        let (answer, outcome) = f.answer(&query("a.blocked.test."), Transport::Udp).await;
        assert_eq!(outcome, Outcome::Blocked);
        let m = Message::from_vec(&answer.unwrap()).unwrap();
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.queries.len(), 1);
        assert!(m.answers.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn null_answer_and_extended_error_for_edns_queries() {
        let config = Dns {
            block: vec!["ads.test".into()],
            blocked_answer: BlockedAnswer::Null,
            ..Dns::default()
        };
        let rules = Rules::new(&config, Vec::new(), Arc::new(allow_all())).live();
        let f = Forwarder::new(&config, vec![], Arc::new(Pins::new(16)), rules);
        let mut m = Message::query();
        m.metadata.id = 9;
        m.add_query(Query::query(
            Name::from_ascii("ads.test.").unwrap(),
            RecordType::A,
        ));
        m.set_edns(Edns::new());
        let (answer, outcome) = f.answer(&m.to_vec().unwrap(), Transport::Udp).await;
        assert_eq!(outcome, Outcome::Blocked);
        let reply = Message::from_vec(&answer.unwrap()).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(reply.answers[0].data, RData::A(A(Ipv4Addr::UNSPECIFIED)));
        let edns = reply.edns.expect("OPT in the reply");
        let ede = edns
            .options()
            .as_ref()
            .iter()
            .find(|(code, _)| u16::from(*code) == EDE_OPTION)
            .map(|(_, option)| option.clone());
        assert_eq!(ede, Some(EdnsOption::Unknown(15, vec![0, 15])));
        // Without EDNS in the query, no OPT in the reply.
        let (answer, _) = f.answer(&query("ads.test."), Transport::Udp).await;
        assert!(Message::from_vec(&answer.unwrap()).unwrap().edns.is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_upstream_answer_is_servfail_not_silence() {
        // A bound socket that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let f = forwarder(&[], vec![silent.local_addr().unwrap()]);
        let (answer, outcome) = f.answer(&query("example.test."), Transport::Udp).await;
        assert_eq!(outcome, Outcome::Failed);
        let m = Message::from_vec(&answer.unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(m.metadata.id, 0x4242);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn upstream_answer_is_passed_through_and_wrong_ids_ignored() {
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (n, peer) = upstream.recv_from(&mut buf).unwrap();
            // A spoofed answer with another id first, then the real one.
            let mut wrong = buf[..n].to_vec();
            wrong[0] ^= 0xff;
            upstream.send_to(&wrong, peer).unwrap();
            let mut right = buf[..n].to_vec();
            right[2] |= 0x80;
            upstream.send_to(&right, peer).unwrap();
        });
        let f = forwarder(&[], vec![addr]);
        let q = query("example.test.");
        let (answer, outcome) = f.answer(&q, Transport::Udp).await;
        assert_eq!(outcome, Outcome::Answered);
        let answer = answer.unwrap();
        assert_eq!(&answer[..2], &q[..2]);
        assert_eq!(answer[2] & 0x80, 0x80);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn failover_to_the_next_upstream() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let alive = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let alive_addr = alive.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (n, peer) = alive.recv_from(&mut buf).unwrap();
            buf[2] |= 0x80;
            alive.send_to(&buf[..n], peer).unwrap();
        });
        let f = forwarder(&[], vec![silent.local_addr().unwrap(), alive_addr]);
        let (_, outcome) = f.answer(&query("example.test."), Transport::Udp).await;
        assert_eq!(outcome, Outcome::Answered);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn resolves_to_checks_the_name_against_its_real_answer() {
        // An upstream where www.a.test is 192.0.2.10 and nothing else exists.
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = upstream.recv_from(&mut buf) {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut reply = Message::response(q.metadata.id, OpCode::Query);
                reply.queries = q.queries.clone();
                let question = q.queries[0].clone();
                if question.name().to_ascii() == "www.a.test." {
                    if question.query_type() == RecordType::A {
                        reply.answers.push(Record::from_rdata(
                            question.name().clone(),
                            60,
                            RData::A(A(Ipv4Addr::new(192, 0, 2, 10))),
                        ));
                    }
                } else {
                    reply.metadata.response_code = ResponseCode::NXDomain;
                }
                upstream.send_to(&reply.to_vec().unwrap(), peer).unwrap();
            }
        });
        let f = forwarder(&["blocked.test"], vec![addr]);
        let ten: IpAddr = "192.0.2.10".parse().unwrap();
        assert!(f.resolves_to("www.a.test", ten).await);
        assert!(
            !f.resolves_to("www.a.test", "192.0.2.11".parse().unwrap())
                .await
        );
        assert!(
            !f.resolves_to("www.a.test", "2001:db8::10".parse().unwrap())
                .await
        );
        assert!(!f.resolves_to("other.test", ten).await);
        assert!(!f.resolves_to("blocked.test", ten).await);
        assert!(!f.resolves_to("bad name with spaces", ten).await);
        // The check pins what it saw, like a guest's own query.
        let now = std::time::Instant::now();
        assert_eq!(f.pins.name_of(ten, now).as_deref(), Some("www.a.test"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn malformed_queries() {
        let f = forwarder(&[], vec![]);
        assert_eq!(
            f.answer(&[1, 2, 3], Transport::Udp).await,
            (None, Outcome::Malformed)
        );
        let mut garbage = query("example.test.");
        garbage.truncate(20);
        let (answer, outcome) = f.answer(&garbage, Transport::Udp).await;
        assert_eq!(outcome, Outcome::Malformed);
        let answer = answer.unwrap();
        assert_eq!(&answer[..2], &[0x42, 0x42]);
        assert_eq!(answer[3] & 0x0f, 1, "FORMERR");
    }
}
