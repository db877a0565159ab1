//! The `ctl` client: one HTTP/1.1 request over the control socket, by
//! hyper, on a runtime of its own.
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// The largest answer read (a full flow list is a few MiB).
const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// Time the whole exchange may take.
const EXCHANGE: Duration = Duration::from_secs(30);

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error("cannot connect to {path}")]
    Connect {
        /// The control socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("the request failed")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No answer in time.
    #[error("no answer within {} s", EXCHANGE.as_secs())]
    Timeout,
}

/// Sends `method path` with `body` (JSON) to the daemon at `socket`; its
/// status and body.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(u16, String), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Http(e.into()))?;
    runtime.block_on(async {
        tokio::time::timeout(EXCHANGE, exchange(socket, method, path, body))
            .await
            .map_err(|_| Error::Timeout)?
    })
}

async fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(u16, String), Error> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| Error::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Http(e.into()))?;
    tokio::spawn(async move {
        // Ends with the exchange; an error here shows as the request's.
        let _ = connection.await;
    });
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "vhost-gateway");
    if body.is_some() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| Error::Http(e.into()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Error::Http(e.into()))?;
    let status = response.status().as_u16();
    let bytes = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(Error::Http)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
