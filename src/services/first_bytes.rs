//! A TCP flow to an address no DNS answer of ours stands behind, whose
//! decision waits for its name: accepted at once (so the guest sends its
//! first bytes), decided on the TLS SNI or HTTP host in them, then dialled
//! and relayed with those bytes first, or reset. A name that is what allows
//! the flow must resolve to the address through our own forwarder (the
//! egress boundary checks that): a guest cannot claim an allowed name to
//! reach any address it likes. An HTTP connection's later requests are
//! decided the same way as they come ([`crate::egress::Inspector`]).
//!
//! A guest that sends nothing for [`PEEK_TIME`] (a protocol where the
//! server speaks first) gets its flow decided without a name; whatever it
//! sends later is still read from its start. One that stalls mid-name is
//! refused.
//!
//! One tokio task per flow; speaks the engine's channels like a dialled
//! flow's task.
#![forbid(unsafe_code)]

use std::time::Duration;

use crate::egress::{Inspector, Target};
use crate::proxy::Host;
use crate::proxy::tcp::{Channels, FromHost, ToHost, dial_and_relay, pair, reset};

/// How long the guest gets to start naming its flow.
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
        let (upstream, timeout) = (target.upstream, target.connect_timeout);
        let mut inspector = Inspector::new(target);
        let deadline = tokio::time::Instant::now() + PEEK_TIME;
        let mut first: Vec<u8> = Vec::new();
        while inspector.is_starting() {
            let message = tokio::select! {
                m = rx.recv() => m,
                () = tokio::time::sleep_until(deadline) => {
                    // Nothing at all: decide without a name for now. A
                    // stalled prefix of a name: refuse.
                    if inspector.held() > 0 || inspector.decide_unnamed().await.is_err() {
                        reset(&tx, &host.wake).await;
                        return;
                    }
                    break;
                }
            };
            host.wake.wake();
            let passed = match message {
                Some(ToHost::Data(bytes)) => inspector.pass(&bytes, false).await,
                // The guest sent all it will; an empty flow goes nowhere.
                Some(ToHost::Fin) if inspector.held() > 0 => inspector.pass(&[], true).await,
                _ => return,
            };
            match passed {
                Ok(cleared) => first.extend_from_slice(&cleared),
                Err(_refused) => {
                    reset(&tx, &host.wake).await;
                    return;
                }
            }
        }
        let channels = (rx, tx);
        let inspect: Box<dyn crate::proxy::tcp::Inspect> = Box::new(inspector);
        dial_and_relay(&host, upstream, timeout, &first, channels, Some(inspect)).await;
    });
    channels
}
