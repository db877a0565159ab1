//! The name gate of a TCP flow to an address the guest was given by our
//! DNS, when the policy has a domain rule that another name could turn:
//! the flow is dialled and accepted as usual, but the guest's first bytes
//! stay in the engine until they name the flow (TLS SNI, HTTP Host) or show
//! they will not. A name must be one of the names the address was given for
//! — no fronting an address with another name — and the policy decides on
//! it. Without a name the pin's decision (made at the SYN) stands.
//!
//! Runs on the engine thread, synchronously: the pins and the policy are
//! all it needs. The server may speak first: only the guest's direction
//! waits.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use smoltcp::socket::tcp;

use crate::egress::Egress;
use crate::policy::{Claim, Proto, Query, Verdict};
use crate::sniff::{FIRST_BYTES_LIMIT, FirstName, first_name};

/// A flow held until its first bytes are checked.
pub struct Gate {
    /// Names the destination was given for, newest first.
    names: Vec<String>,
    egress: Arc<Egress>,
    first: Vec<u8>,
}

/// What the gate says after taking the guest's latest bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not decided yet.
    Wait,
    /// Let the flow through, these bytes first.
    Open(Vec<u8>),
    /// Denied (counted and audited): reset the flow.
    Denied,
}

impl Gate {
    /// A gate for a destination pinned to `names` (not empty), deciding
    /// through `egress`.
    pub fn new(names: Vec<String>, egress: Arc<Egress>) -> Self {
        Self {
            names,
            egress,
            first: Vec::new(),
        }
    }

    /// Takes what the guest sent so far (up to the limit) from `socket`.
    pub fn feed(&mut self, socket: &mut tcp::Socket<'static>, dst: SocketAddr) -> Outcome {
        let first = &mut self.first;
        while socket.can_recv() && first.len() < FIRST_BYTES_LIMIT {
            let room = FIRST_BYTES_LIMIT - first.len();
            let taken = socket.recv(|buf| {
                let n = buf.len().min(room);
                first.extend_from_slice(buf.get(..n).unwrap_or_default());
                (n, n)
            });
            if !matches!(taken, Ok(n) if n > 0) {
                break;
            }
        }
        // Only the guest's FIN ends its first bytes; a socket still in its
        // handshake has not started them.
        let finished = matches!(
            socket.state(),
            tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::Closing
                | tcp::State::TimeWait
        );
        self.decide(dst, finished)
    }

    fn decide(&mut self, dst: SocketAddr, finished: bool) -> Outcome {
        let (name, source) = match first_name(&self.first, finished) {
            FirstName::Wait => return Outcome::Wait,
            FirstName::Unnamed => {
                self.egress.allowed();
                return Outcome::Open(std::mem::take(&mut self.first));
            }
            FirstName::Named(name, source) => (name, source),
        };
        let query = Query {
            dst: dst.ip(),
            proto: Proto::Tcp,
            port: Some(dst.port()),
            pinned: &self.names,
            claim: Claim::Named(&name, source),
        };
        match self.egress.policy().judge(&query) {
            // The names are pins, so nothing is left to resolve.
            Verdict::Allow(_) | Verdict::Resolve(_) | Verdict::NeedsName => {
                self.egress.allowed();
                Outcome::Open(std::mem::take(&mut self.first))
            }
            Verdict::Deny(denied) => {
                let (ip, port) = (dst.ip(), Some(dst.port()));
                let named = Some((name.as_str(), source));
                self.egress.deny(Proto::Tcp, ip, port, named, denied);
                Outcome::Denied
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Action, Destination, Policy, Rule};
    use crate::sniff::client_hello;

    fn gate() -> Gate {
        // Allow *.ok.test, deny the rest; the address was given for
        // www.ok.test and evil.test (shared hosting).
        let rule = Rule {
            action: Action::Allow,
            destination: Destination::Name(crate::names::Pattern::Under("ok.test".into())),
            protos: Vec::new(),
            ports: Vec::new(),
        };
        let policy = Arc::new(Policy::new(vec![rule], Action::Deny, Vec::new()));
        let pins = Arc::new(crate::dns::pins::Pins::new(16));
        let dns = crate::config::Dns::default();
        let forwarder = crate::dns::forward::Forwarder::new(
            &dns,
            Vec::new(),
            Vec::new(),
            pins.clone(),
            policy.clone(),
        );
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let egress = Egress::new(policy, pins, forwarder, metrics);
        Gate::new(
            vec!["www.ok.test".into(), "evil.test".into()],
            Arc::new(egress),
        )
    }

    fn run(gate: &mut Gate, bytes: &[u8], finished: bool) -> Outcome {
        gate.first.extend_from_slice(bytes);
        let dst: SocketAddr = "192.0.2.10:443".parse().unwrap();
        gate.decide(dst, finished)
    }

    #[test]
    fn a_socket_still_in_its_handshake_waits() {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64]),
            tcp::SocketBuffer::new(vec![0; 64]),
        );
        socket.listen(443).unwrap();
        let dst: SocketAddr = "192.0.2.10:443".parse().unwrap();
        let outcome = gate().feed(&mut socket, dst);
        assert_eq!(outcome, Outcome::Wait);
    }

    #[test]
    fn a_pinned_allowed_name_opens_with_its_bytes() {
        let hello = client_hello("www.ok.test");
        let mut g = gate();
        assert_eq!(run(&mut g, &hello[..30], false), Outcome::Wait);
        assert_eq!(run(&mut g, &hello[30..], false), Outcome::Open(hello));
    }

    #[test]
    fn an_allowed_name_the_address_was_not_given_for_is_fronting() {
        let hello = client_hello("api.ok.test");
        assert_eq!(run(&mut gate(), &hello, false), Outcome::Denied);
    }

    #[test]
    fn a_pinned_name_the_policy_denies_is_denied() {
        let req = b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
        assert_eq!(run(&mut gate(), req, false), Outcome::Denied);
    }

    #[test]
    fn no_name_keeps_the_pins_decision() {
        let ssh = b"SSH-2.0-probe\r\n".to_vec();
        assert_eq!(run(&mut gate(), &ssh, false), Outcome::Open(ssh));
        let ip = b"GET / HTTP/1.1\r\nHost: 192.0.2.10\r\n\r\n".to_vec();
        assert_eq!(run(&mut gate(), &ip, false), Outcome::Open(ip));
        // A half hello then FIN: nothing more will come.
        let hello = client_hello("www.ok.test");
        assert_eq!(
            run(&mut gate(), &hello[..10], true),
            Outcome::Open(hello[..10].to_vec())
        );
    }
}
