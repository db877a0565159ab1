//! The operator's door: an HTTP/1.1 API with JSON bodies on a unix socket
//! (`--control-socket`), with the counters also in Prometheus text at
//! `/metrics`, and the `ctl` client that speaks it.
//!
//! Owns the endpoints, their JSON shapes and their errors. Reads what the
//! rest of the daemon exposes (counters, the attached guest's report) and
//! changes only what it is handed a handle for (the log filter). The guest
//! never reaches this socket: it is a file on the host, and the engine
//! opens nothing for it.
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod prom;
pub mod server;

/// Changes the log filter at run time (`PUT /v1/log-level`); the error says
/// why a filter was not taken.
pub type LogLevel = std::sync::Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
