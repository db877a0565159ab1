//! Process-wide counters: frames, bytes, drops by reason, service events.
//!
//! Written by the engine thread with relaxed atomics (no locks on the data
//! path), read by anyone: `SIGUSR1` logs a snapshot, and the daemon logs one
//! when a VMM disconnects.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// One named counter.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub enum Counter { $($(#[doc = $doc])* $name),* }

        impl Counter {
            /// Every counter, in declaration order.
            pub const ALL: &'static [Counter] = &[$(Counter::$name),*];

            /// The counter's name as it appears in logs.
            pub fn name(self) -> &'static str {
                match self { $(Counter::$name => stringify!($name)),* }
            }

            /// What it counts: its doc comment, on one line.
            pub fn help(self) -> String {
                let lines: &[&str] = match self { $(Counter::$name => &[$($doc),*]),* };
                lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ")
            }
        }
    };
}

counters! {
    /// Frames taken from the guest's TX queue and accepted.
    frames_from_guest,
    /// Bytes of those frames (without virtio-net header).
    bytes_from_guest,
    /// Frames written into the guest's RX queue.
    frames_to_guest,
    /// Bytes of those frames.
    bytes_to_guest,
    /// TCP segments over the MTU the guest handed over for us to take whole
    /// (HOST_TSO4/6).
    segments_from_guest,
    /// TCP segments over the guest's MSS handed to it to split (GUEST_TSO4).
    segments_to_guest,
    /// TX chains outside guest memory or malformed.
    drop_bad_chain,
    /// TX chains with nothing readable.
    drop_wrong_direction,
    /// TX frames shorter than header + Ethernet.
    drop_too_short,
    /// TX frames longer than the MTU allows.
    drop_too_long,
    /// TX frames asking for an offload not negotiated, with a segmentation
    /// header that does not match the frame, or with a partial checksum
    /// outside the frame.
    drop_bad_offload,
    /// Segments smoltcp asked to offload that were not TCP/IPv4 (never
    /// expected; counted rather than sent whole to a guest that cannot
    /// take them).
    drop_bad_segment,
    /// Frames for the guest with no RX buffer posted.
    drop_no_rx_buffers,
    /// Frames for the guest larger than its RX buffers.
    drop_rx_buffers_too_small,
    /// Service replies dropped because the pending queue was full.
    drop_pending_full,
    /// DHCP messages that could not be parsed or were not requests.
    dhcp_malformed,
    /// DHCP messages from a second client while the lease is held.
    dhcp_refused,
    /// DHCP replies sent.
    dhcp_replies,
    /// Router advertisements sent.
    router_adverts,
    /// VMM connections accepted.
    vmm_connections,
    /// ARP requests and Neighbor Solicitations for addresses not ours.
    neighbor_not_ours,
    /// IPv4 fragments the gateway does not reassemble (TCP: guests set DF
    /// and follow the path MTU).
    drop_fragment,
    /// Fragments of UDP and ICMP datagrams from the guest.
    fragments_from_guest,
    /// Datagrams reassembled from them.
    fragments_reassembled,
    /// Fragments that were empty, not a multiple of 8 bytes before the
    /// last, or past the largest datagram.
    drop_fragment_bad,
    /// Fragments overlapping another of their datagram, and the later
    /// fragments of such a datagram.
    drop_fragment_overlap,
    /// Partial datagrams not completed in time.
    drop_fragment_timeout,
    /// Partial datagrams (or pieces) dropped to stay within the
    /// reassembly budget.
    drop_fragment_evicted,
    /// Fragments the gateway sent to the guest (datagrams over its MTU).
    fragments_to_guest,
    /// Outbound TCP flows opened (SYN held, upstream dialled).
    tcp_flows,
    /// Inbound TCP flows opened for published ports.
    tcp_inbound,
    /// SYNs refused because the destination is not allowed.
    tcp_denied,
    /// SYNs refused at max-connections (every flow established).
    tcp_over_limit,
    /// Dialling flows dropped at max-connections to make room for a new
    /// SYN (the oldest first, no reset: the client's retransmission gets a
    /// new chance), so a SYN flood cannot lock new flows out.
    tcp_dial_evicted,
    /// Upstream dials that failed or timed out.
    tcp_connect_failed,
    /// Sockets not opened because the process ran out of descriptors.
    fd_limit_hit,
    /// RSTs sent to the guest for refused SYNs.
    tcp_resets_sent,
    /// Flows reset after idling past the timeout.
    tcp_idle_timeouts,
    /// UDP sessions opened.
    udp_sessions,
    /// UDP datagrams to destinations that are not allowed.
    udp_denied,
    /// UDP datagrams dropped at max-sessions (every session in use).
    udp_over_limit,
    /// UDP sessions quiet for a second that gave way at max-sessions.
    udp_session_evicted,
    /// Guest replies at published UDP ports dropped because the port's send
    /// queue was full.
    udp_queue_full,
    /// UDP sends to the host network that failed.
    udp_send_failed,
    /// UDP replies the kernel dropped because the guest did not take them
    /// in time (the session socket's receive buffer overflowed).
    udp_reply_dropped,
    /// Echo requests dropped because ping sockets are not available.
    icmp_unavailable,
    /// Echo requests to destinations that are not allowed.
    icmp_denied,
    /// Echo requests dropped at max-sessions (every session in use).
    icmp_over_limit,
    /// Echo sessions quiet for a second that gave way at max-sessions.
    icmp_session_evicted,
    /// Echo sends that failed.
    icmp_send_failed,
    /// Echo replies the kernel dropped because the guest did not take them
    /// in time.
    icmp_reply_dropped,
    /// Guest frames handed to the queue pair that owns their flow.
    steer_handed_over,
    /// Frames dropped because the owning pair's inbox was full.
    steer_inbox_full,
    /// Flows not remembered because the steering directory was full (their
    /// frames are handled on the pair they arrive on).
    steer_full,
    /// Connections or datagrams at published ports with no guest to take them.
    publish_refused,
    /// DNS queries from the guest (UDP/53, any address).
    dns_queries,
    /// DNS queries answered by an upstream.
    dns_answered,
    /// DNS queries for blocked names.
    dns_blocked,
    /// DNS queries no upstream answered (SERVFAIL).
    dns_servfail,
    /// DNS queries that could not be parsed (FORMERR or dropped).
    dns_malformed,
    /// DNS queries refused at the in-flight bound (every slot held an
    /// answer on its way to the engine).
    dns_over_limit,
    /// DNS queries cancelled, or answers the guest had not taken yet
    /// discarded, at the in-flight bound to make room for a newer query.
    dns_evicted,
    /// DNS answers lost because the engine's answer queue was full.
    dns_answers_dropped,
    /// DNS answers with internal addresses removed (rebind protection).
    dns_rebind_stripped,
    /// DNS-over-TLS connections and DNS-over-QUIC datagrams refused.
    dns_encrypted_refused,
    /// TCP flows the egress policy allowed.
    policy_allowed,
    /// Flows, datagrams and echoes the egress policy denied.
    policy_denied,
    /// Live flows and sessions a reload's new rules deny: reset (TCP) or
    /// closed (UDP, ICMP), each audited with reason `reload`.
    policy_revoked,
    /// Reloads applied (SIGHUP or `POST /v1/reload`).
    reloads,
    /// Reloads refused: the new config is invalid, or changes what needs a
    /// restart; the running config stays.
    reloads_refused,
    /// TLS flows terminated and re-encrypted upstream.
    tls_intercepted,
    /// TLS flows passed through untouched (bypass list).
    tls_bypassed,
    /// Flows on intercepted ports passed through by IP policy (no SNI, or
    /// not TLS).
    tls_passed_through,
    /// Flows on intercepted ports refused (no SNI, not TLS, or no
    /// ClientHello in time, as configured).
    tls_refused,
    /// Upstream TLS failures (dial, handshake, certificate): the guest's
    /// handshake was failed with an alert.
    tls_upstream_failed,
    /// Denied names on intercepted ports answered with HTTP 403.
    tls_denied_403,
    /// Leaf certificates minted (cache misses).
    tls_leaf_minted,
    /// UDP datagrams to intercepted ports (QUIC) dropped while
    /// interception is on.
    tls_quic_dropped,
    /// DNS-over-TLS connections terminated by the gateway.
    dns_tls_terminated,
}

/// Queue pairs counted one by one at most (as many as can be configured).
pub const PAIRS: usize = 8;

/// The counters.
#[derive(Debug)]
pub struct Metrics {
    values: [AtomicU64; Counter::ALL.len()],
    /// Frames taken from each queue pair's TX queue.
    pair_frames: [AtomicU64; PAIRS],
    /// Denies by the rule that decided: slot 0 the default, slot n rule n
    /// (up to [`RULES`]), slot `RULES + 1` any later rule.
    rule_denies: [AtomicU64; RULES + 2],
}

/// Rules counted one by one; later ones share a slot.
pub const RULES: usize = 254;

/// Which rule a counted deny came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSlot {
    /// The policy's default.
    Default,
    /// Rule n (1-based), n <= [`RULES`].
    Rule(usize),
    /// A rule after the first [`RULES`].
    Later,
}

impl RuleSlot {
    /// The label value: `default`, the rule's number, or `later`.
    pub fn label(self) -> String {
        match self {
            RuleSlot::Default => "default".to_owned(),
            RuleSlot::Rule(n) => n.to_string(),
            RuleSlot::Later => "later".to_owned(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            pair_frames: std::array::from_fn(|_| AtomicU64::new(0)),
            rule_denies: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(&self, counter: Counter, n: u64) {
        if let Some(v) = self.values.get(counter as usize) {
            v.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Adds one.
    pub fn inc(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// A counter's value.
    pub fn get(&self, counter: Counter) -> u64 {
        self.values
            .get(counter as usize)
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// Counts frames taken from queue pair `pair`'s TX queue.
    pub fn add_pair_frames(&self, pair: usize, n: u64) {
        if let Some(v) = self.pair_frames.get(pair) {
            v.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts a deny by the policy's rule `rule` (None: its default).
    pub fn rule_denied(&self, rule: Option<usize>) {
        let slot = match rule {
            None => 0,
            Some(n) if (1..=RULES).contains(&n) => n,
            Some(_) => RULES + 1,
        };
        if let Some(v) = self.rule_denies.get(slot) {
            v.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The rules that denied anything, with how often.
    pub fn rule_denies(&self) -> Vec<(RuleSlot, u64)> {
        self.rule_denies
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let slot = match i {
                    0 => RuleSlot::Default,
                    n if n <= RULES => RuleSlot::Rule(n),
                    _ => RuleSlot::Later,
                };
                (slot, v.load(Ordering::Relaxed))
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Frames taken from each queue pair's TX queue, up to the last pair
    /// that took any.
    pub fn pair_frames(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self
            .pair_frames
            .iter()
            .map(|v| v.load(Ordering::Relaxed))
            .collect();
        while all.last() == Some(&0) {
            all.pop();
        }
        all
    }

    /// `name=value` pairs of every non-zero counter, for a log line; with
    /// more than one queue pair in use, `frames_by_pair=a,b,...` too.
    pub fn snapshot(&self) -> String {
        let mut out: Vec<String> = Counter::ALL
            .iter()
            .filter_map(|&c| {
                let v = self.get(c);
                (v != 0).then(|| format!("{}={v}", c.name()))
            })
            .collect();
        let pairs = self.pair_frames();
        if pairs.len() > 1 {
            let list: Vec<String> = pairs.iter().map(u64::to_string).collect();
            out.push(format!("frames_by_pair={}", list.join(",")));
        }
        out.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_snapshots() {
        let m = Metrics::default();
        m.inc(Counter::drop_too_short);
        m.add(Counter::bytes_to_guest, 10);
        assert_eq!(m.get(Counter::drop_too_short), 1);
        assert_eq!(m.snapshot(), "bytes_to_guest=10 drop_too_short=1");
        m.add_pair_frames(0, 3);
        assert_eq!(m.snapshot(), "bytes_to_guest=10 drop_too_short=1");
        m.add_pair_frames(2, 4);
        m.add_pair_frames(PAIRS, 9);
        assert_eq!(m.pair_frames(), [3, 0, 4]);
        assert!(m.snapshot().ends_with(" frames_by_pair=3,0,4"));
    }

    #[test]
    fn every_counter_says_what_it_counts() {
        for &c in Counter::ALL {
            let help = c.help();
            assert!(
                help.len() > 10 && !help.contains("  "),
                "{}: {help:?}",
                c.name()
            );
        }
        assert_eq!(
            Counter::drop_too_short.help(),
            "TX frames shorter than header + Ethernet."
        );
    }

    #[test]
    fn denies_are_counted_by_rule() {
        let m = Metrics::default();
        assert!(m.rule_denies().is_empty());
        m.rule_denied(None);
        m.rule_denied(Some(1));
        m.rule_denied(Some(1));
        m.rule_denied(Some(RULES));
        m.rule_denied(Some(RULES + 1));
        m.rule_denied(Some(usize::MAX));
        m.rule_denied(Some(0));
        let labels: Vec<(String, u64)> = m
            .rule_denies()
            .into_iter()
            .map(|(slot, n)| (slot.label(), n))
            .collect();
        // Rule 0 does not exist: counted with the default's slot 0 would
        // be wrong, so it goes with the rules past the last counted one.
        assert_eq!(
            labels,
            [
                ("default".to_owned(), 1),
                ("1".to_owned(), 2),
                (RULES.to_string(), 1),
                ("later".to_owned(), 3)
            ]
        );
    }
}
