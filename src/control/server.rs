//! Serves the API on the control socket: one task per connection on the
//! host runtime, HTTP/1.1 by hyper. At most [`MAX_CONNECTIONS`] at once
//! (more are closed at once, counted), request heads within
//! [`HEAD_TIMEOUT`], bodies up to [`super::api::MAX_BODY`] within
//! [`BODY_TIMEOUT`]: a stuck or greedy client costs a bounded share.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::api::{self, Answer, State};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send a request's head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// What a listener serves.
pub enum Endpoint {
    /// The whole API, on the control socket.
    Control(std::os::unix::net::UnixListener),
    /// `GET /metrics` only, on a TCP address (`--metrics-listen`).
    Metrics(std::net::TcpListener),
}

/// A listener the accept loop takes connections from.
trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn next_stream(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next_stream(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next_stream(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Serves `endpoint` on `runtime` until the process ends.
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    endpoint: Endpoint,
    state: Arc<State>,
) -> std::io::Result<()> {
    let _entered = runtime.enter();
    match endpoint {
        Endpoint::Control(listener) => {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(listener)?;
            runtime.spawn(accept_loop(listener, state, false));
        }
        Endpoint::Metrics(listener) => {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            runtime.spawn(accept_loop(listener, state, true));
        }
    }
    Ok(())
}

/// Accepts connections and serves each on a task of its own, at most
/// [`MAX_CONNECTIONS`] at once; `metrics_only` answers nothing but
/// `GET /metrics`.
async fn accept_loop(listener: impl Accept, state: Arc<State>, metrics_only: bool) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.next_stream().await {
            Ok(stream) => stream,
            Err(e) => {
                // Out of descriptors passes as flows close: wait.
                tracing::warn!(error = %e, "control socket: cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                max = MAX_CONNECTIONS,
                "control socket: too many connections; one closed"
            );
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, request, metrics_only).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "control connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn handle(
    state: &State,
    request: Request<Incoming>,
    metrics_only: bool,
) -> Response<Full<Bytes>> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    if metrics_only && (method.as_str(), path.as_str()) != ("GET", "/metrics") {
        return respond(Answer::error(404, "only GET /metrics is served here"));
    }
    let query = request.uri().query().unwrap_or("").to_owned();
    let body = Limited::new(request.into_body(), api::MAX_BODY).collect();
    let body = match tokio::time::timeout(BODY_TIMEOUT, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            return respond(Answer::error(
                413,
                format!(
                    "request body unreadable or over {} bytes: {e}",
                    api::MAX_BODY
                ),
            ));
        }
        Err(_) => return respond(Answer::error(408, "request body not received in time")),
    };
    respond(api::answer(state, &method, &path, &query, &body).await)
}

fn respond(answer: Answer) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = hyper::StatusCode::from_u16(answer.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(answer.content_type),
    );
    response
}
