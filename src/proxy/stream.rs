//! A local service's flow as an ordinary byte stream (`AsyncRead` +
//! `AsyncWrite`), for services that run protocol libraries over it (TLS
//! interception, DNS over TLS): a bridge task copies between the engine's
//! channels and one end of an in-memory pipe, with the same backpressure
//! as a dialled flow (a slot reserved before reading) and FIN carried both
//! ways. A guest reset ends the stream (EOF); the service resets the guest
//! through [`GuestStream::reset`].
#![forbid(unsafe_code)]

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::Host;
use super::tcp::{CHUNK_BYTES, FromHost, ToHost};

/// The service's side of a guest flow.
pub struct GuestStream {
    /// The bytes.
    pub io: DuplexStream,
    reset: mpsc::Sender<FromHost>,
    wake: std::sync::Arc<super::Wake>,
}

impl GuestStream {
    /// Bridges a flow's task ends (from `tcp::pair`) to a stream.
    pub fn bridge(
        host: &Host,
        mut from_engine: mpsc::Receiver<ToHost>,
        to_engine: mpsc::Sender<FromHost>,
    ) -> Self {
        let (io, theirs) = tokio::io::duplex(CHUNK_BYTES);
        let (mut read, mut write) = tokio::io::split(theirs);
        let reset = to_engine.clone();
        let wake = host.wake.clone();
        let (wake_in, wake_out) = (wake.clone(), wake.clone());
        host.runtime.spawn(async move {
            let inbound = async move {
                while let Some(message) = from_engine.recv().await {
                    // A slot was freed: the engine may read the guest again.
                    wake_in.wake();
                    match message {
                        ToHost::Data(bytes) => {
                            if write.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        ToHost::Fin => {
                            let _ = write.shutdown().await;
                            return;
                        }
                        ToHost::Reset => return,
                    }
                }
            };
            let outbound = async move {
                loop {
                    let Ok(permit) = to_engine.reserve().await else {
                        return;
                    };
                    let mut buf = vec![0u8; CHUNK_BYTES];
                    match read.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            permit.send(FromHost::Fin);
                            wake_out.wake();
                            return;
                        }
                        Ok(n) => {
                            buf.truncate(n);
                            permit.send(FromHost::Data(buf));
                            wake_out.wake();
                        }
                    }
                }
            };
            tokio::join!(inbound, outbound);
        });
        Self { io, reset, wake }
    }

    /// Resets the guest's connection (bytes still in the pipe may be lost:
    /// a reset is a reset).
    pub async fn reset(self) {
        let _ = self.reset.send(FromHost::Reset).await;
        self.wake.wake();
    }
}

/// Starts a local service's task: the flow is accepted at once (its SYN
/// answered without dialling) and `serve` gets the guest's bytes as a
/// stream. Returns the engine's channel ends.
pub fn spawn_local<F, Fut>(host: &Host, serve: F) -> super::tcp::Channels
where
    F: FnOnce(GuestStream, Host) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (channels, from_engine, to_engine) = super::tcp::pair();
    let host = host.clone();
    host.runtime.clone().spawn(async move {
        if to_engine.send(FromHost::Connected(None)).await.is_err() {
            return;
        }
        host.wake.wake();
        let guest = GuestStream::bridge(&host, from_engine, to_engine);
        serve(guest, host).await;
    });
    channels
}
