//! A TCP flow to an address no DNS answer of ours stands behind, whose
//! decision waits for its name: accepted at once (so the guest sends its
//! first bytes), decided on the TLS SNI or HTTP Host in them (or without a
//! name, see `sniff::first_name`, or after [`PEEK_TIME`]), then dialled and
//! relayed with those bytes first, or reset. A name that is what allows the
//! flow must resolve to the address through our own forwarder (the egress
//! boundary checks that): a guest cannot claim an allowed name to reach any
//! address it likes.
//!
//! One tokio task per flow; speaks the engine's channels like a dialled
//! flow's task.
#![forbid(unsafe_code)]

use std::time::Duration;

use tokio::sync::mpsc;

use crate::egress::Target;
use crate::names::NameSource;
use crate::policy::Claim;
use crate::proxy::tcp::{Channels, FromHost, ToHost, dial_and_relay, pair, reset};
use crate::proxy::{Host, Wake};
use crate::sniff::{FirstName, first_name};

/// How long the guest gets to name its flow.
pub const PEEK_TIME: Duration = Duration::from_secs(5);

/// Starts the flow's task; returns the engine's channel ends.
pub fn spawn(target: Target, host: &Host) -> Channels {
    let (channels, mut rx, tx) = pair();
    let host = host.clone();
    host.runtime.clone().spawn(async move {
        if tx.send(FromHost::Connected(None)).await.is_err() {
            return;
        }
        host.wake.wake();
        let Some((first, name)) = peek(&mut rx, &host.wake).await else {
            return;
        };
        let claim = match &name {
            Some((n, s)) => Claim::Named(n, *s),
            None => Claim::Unnamed,
        };
        if target.decide(claim).await.is_err() {
            reset(&tx, &host.wake).await;
            return;
        }
        target.egress.allowed();
        let (upstream, timeout) = (target.upstream, target.connect_timeout);
        dial_and_relay(&host, upstream, timeout, &first, rx, tx).await;
    });
    channels
}

/// The guest's first bytes and the name in them; None when the guest gave
/// up first.
async fn peek(
    rx: &mut mpsc::Receiver<ToHost>,
    wake: &Wake,
) -> Option<(Vec<u8>, Option<(String, NameSource)>)> {
    let mut first: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + PEEK_TIME;
    loop {
        let message = tokio::select! {
            m = rx.recv() => m,
            () = tokio::time::sleep_until(deadline) => return Some((first, None)),
        };
        wake.wake();
        let finished = match message {
            Some(ToHost::Data(bytes)) => {
                first.extend_from_slice(&bytes);
                false
            }
            // The guest sent all it will; an empty flow goes nowhere.
            Some(ToHost::Fin) if !first.is_empty() => true,
            _ => return None,
        };
        match first_name(&first, finished) {
            FirstName::Named(n, s) => return Some((first, Some((n, s)))),
            FirstName::Unnamed => return Some((first, None)),
            FirstName::Wait => {}
        }
    }
}
