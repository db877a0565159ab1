//! The endpoints: what each answers, as JSON, and the errors.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/status` | version, uptime, the attached guest (lease, pairs), gauges |
//! | `GET /v1/counters` | every counter as a number, zeros included, and the gauges |
//! | `GET /v1/flows?limit=N` | live flows and sessions, oldest first (N ≤ 10,000, default 1,000) |
//! | `PUT /v1/log-level` | body `{"level": "debug"}` or any tracing filter |
//! | `GET /v1/publish` | the published ports |
//! | `POST /v1/publish` | body `{"protocol": "tcp", "host": "127.0.0.1:8080", "guest-port": 80}` |
//! | `DELETE /v1/publish` | body `{"protocol": "tcp", "host": "127.0.0.1:8080"}` |
//! | `GET /v1/pcap` | whether a capture runs, its file and numbers |
//! | `POST /v1/pcap` | body `{"action": "start", "file": "NAME"}` (in `[pcap] dir`) or `{"action": "stop"}` |
//! | `GET /metrics` | Prometheus/OpenMetrics text of counters and gauges |
//!
//! Anything else is 404 (no such path) or 405 (wrong method), always with
//! a JSON body `{"error": "..."}`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::LogLevel;
use crate::engine::Shared;
use crate::engine::report::{Flow, Gauges, GuestStatus, PairReport};
use crate::metrics::Counter;
use crate::wiring::reload::Reloader;

/// Flows listed when the request names no limit.
pub const DEFAULT_FLOW_LIMIT: usize = 1_000;
/// The most flows one request may list.
pub const MAX_FLOW_LIMIT: usize = 10_000;
/// How long a queue pair has to answer; one that does not run (its queues
/// not started) never does.
const PAIR_ANSWER: Duration = Duration::from_secs(2);
/// The largest request body taken.
pub const MAX_BODY: usize = 16 * 1024;

/// What the endpoints read and change.
pub struct State {
    pub(super) shared: Arc<Shared>,
    pub(super) started: Instant,
    pub(super) log_level: Option<LogLevel>,
    pub(super) pcap_dir: Option<std::path::PathBuf>,
    pub(super) reloader: Option<Arc<Reloader>>,
}

impl State {
    /// The state over the daemon's shared parts; `log_level` changes the
    /// log filter when given; captures go to `pcap_dir` (none: no capture
    /// can start at run time); `reloader` reloads the config (none: no
    /// reload).
    pub fn new(
        shared: Arc<Shared>,
        log_level: Option<LogLevel>,
        pcap_dir: Option<std::path::PathBuf>,
        reloader: Option<Arc<Reloader>>,
    ) -> Self {
        Self {
            shared,
            started: Instant::now(),
            log_level,
            pcap_dir,
            reloader,
        }
    }
}

/// An answer: status code and JSON (or, for /metrics, text) body.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Answer {
    fn json(status: u16, value: &impl Serialize) -> Self {
        let body = serde_json::to_string_pretty(value)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot encode the answer: {e}\"}}"));
        Self {
            status,
            content_type: "application/json",
            body: body + "\n",
        }
    }

    /// An error with its reason.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        #[derive(Serialize)]
        struct Error {
            error: String,
        }
        Self::json(
            status,
            &Error {
                error: message.into(),
            },
        )
    }
}

/// The attached guest's report, summed over its pairs.
pub struct Report {
    /// The guest, if a VMM is attached.
    pub guest: Option<(GuestStatus, Duration, usize)>,
    /// Gauges of every pair that answered.
    pub gauges: Gauges,
    /// Flows of every pair that answered, oldest first.
    pub flows: Vec<Flow>,
    /// Flows in all.
    pub total_flows: usize,
    /// Pairs that did not answer in time.
    pub silent_pairs: usize,
}

/// Asks the attached guest's pairs for their report.
pub async fn report(shared: &Shared, limit: usize) -> Report {
    let Some((guest, since)) = shared.board.guest() else {
        return Report {
            guest: None,
            gauges: Gauges::default(),
            flows: Vec::new(),
            total_flows: 0,
            silent_pairs: 0,
        };
    };
    let answers = guest.ask(limit);
    let status = guest.status();
    let pins = guest.pins();
    // Not held while waiting: a guest whose VMM leaves meanwhile goes.
    drop(guest);
    let mut out = Report {
        guest: Some((status, since.elapsed(), pins)),
        gauges: Gauges::default(),
        flows: Vec::new(),
        total_flows: 0,
        silent_pairs: 0,
    };
    for answer in answers {
        match tokio::time::timeout(PAIR_ANSWER, answer).await {
            Ok(Ok(PairReport {
                gauges,
                flows,
                total_flows,
            })) => {
                out.gauges.add(&gauges);
                out.flows.extend(flows);
                out.total_flows += total_flows;
            }
            _ => out.silent_pairs += 1,
        }
    }
    out.flows.sort_by_key(|f| std::cmp::Reverse(f.age_ms));
    out.flows.truncate(limit);
    out
}

/// Answers one request: `method`, `path`, `query` (without `?`), `body`.
pub async fn answer(state: &State, method: &str, path: &str, query: &str, body: &[u8]) -> Answer {
    match (method, path) {
        ("GET", "/v1/status") => status(state).await,
        ("GET", "/v1/counters") => counters(state).await,
        ("GET", "/v1/flows") => match flow_limit(query) {
            Ok(limit) => flows(state, limit).await,
            Err(message) => Answer::error(400, message),
        },
        ("PUT", "/v1/log-level") => log_level(state, body),
        ("GET", "/v1/publish") => published(state),
        ("POST", "/v1/publish") => publish(state, body),
        ("DELETE", "/v1/publish") => unpublish(state, body).await,
        ("GET", "/v1/pcap") => Answer::json(200, &state.shared.tap.stats()),
        ("POST", "/v1/pcap") => pcap(state, body),
        ("POST", "/v1/reload") => reload(state).await,
        ("GET", "/metrics") => {
            let report = report(&state.shared, 0).await;
            super::prom::answer(&state.shared, &report)
        }
        (
            _,
            "/v1/status" | "/v1/counters" | "/v1/flows" | "/v1/log-level" | "/v1/publish"
            | "/v1/pcap" | "/v1/reload" | "/metrics",
        ) => Answer::error(405, format!("{method} is not allowed on {path}")),
        _ => Answer::error(404, format!("no endpoint {path}")),
    }
}

/// The `limit` of a flows query.
fn flow_limit(query: &str) -> Result<usize, String> {
    let mut limit = DEFAULT_FLOW_LIMIT;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", n)) => {
                limit = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_FLOW_LIMIT).contains(n))
                    .ok_or_else(|| format!("limit must be 1 to {MAX_FLOW_LIMIT}, not {n:?}"))?;
            }
            _ => return Err(format!("unknown query parameter {pair:?} (only limit)")),
        }
    }
    Ok(limit)
}

#[derive(Serialize)]
struct GuestJson {
    attached_seconds: u64,
    queue_pairs: usize,
    mac: Option<String>,
    lease_seconds_left: Option<u64>,
    ipv4: String,
    ipv6: Option<String>,
    dns_pins: usize,
}

#[derive(Serialize)]
struct StatusJson {
    version: &'static str,
    uptime_seconds: u64,
    vmm_attached: bool,
    guest: Option<GuestJson>,
    gauges: Gauges,
    cached_certificates: usize,
    silent_pairs: usize,
}

/// Reloads the config: 200 with what changed; 422 when the new config is
/// invalid or needs a restart, 409 when a port cannot be published (the
/// running config stays in every case).
async fn reload(state: &State) -> Answer {
    use crate::wiring::reload::Error;
    let Some(reloader) = &state.reloader else {
        return Answer::error(409, "this daemon cannot reload");
    };
    match reloader.reload().await {
        Ok(done) => Answer::json(200, &done),
        Err(e @ (Error::Invalid(_) | Error::NeedsRestart(_) | Error::Privileged(_))) => {
            Answer::error(422, crate::errors::chain(&e))
        }
        Err(e @ Error::Publish(_)) => Answer::error(409, crate::errors::chain(&e)),
    }
}

async fn status(state: &State) -> Answer {
    let report = report(&state.shared, 0).await;
    let net = &state.shared.config.network;
    let guest = report.guest.map(|(status, since, pins)| GuestJson {
        attached_seconds: since.as_secs(),
        queue_pairs: status.queue_pairs,
        mac: status.mac,
        lease_seconds_left: status.lease_seconds_left,
        ipv4: format!("{}/{}", net.ipv4_guest, net.ipv4_prefix_len),
        ipv6: net
            .ipv6_enabled
            .then(|| format!("{}/{} (SLAAC)", net.ipv6_prefix.addr, net.ipv6_prefix.len)),
        dns_pins: pins,
    });
    Answer::json(
        200,
        &StatusJson {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: state.started.elapsed().as_secs(),
            vmm_attached: guest.is_some(),
            guest,
            gauges: report.gauges,
            cached_certificates: cached_certs(&state.shared),
            silent_pairs: report.silent_pairs,
        },
    )
}

/// Leaf certificates cached by TLS interception (0 when it is off).
pub fn cached_certs(shared: &Shared) -> usize {
    shared.tls.as_ref().map_or(0, |tls| tls.cached_certs())
}

#[derive(Serialize)]
struct CountersJson {
    counters: BTreeMap<&'static str, u64>,
    frames_by_pair: Vec<u64>,
    gauges: Gauges,
}

async fn counters(state: &State) -> Answer {
    let report = report(&state.shared, 0).await;
    let metrics = &state.shared.metrics;
    let counters = Counter::ALL
        .iter()
        .map(|&c| (c.name(), metrics.get(c)))
        .collect();
    Answer::json(
        200,
        &CountersJson {
            counters,
            frames_by_pair: metrics.pair_frames(),
            gauges: report.gauges,
        },
    )
}

#[derive(Serialize)]
struct FlowsJson {
    total: usize,
    listed: usize,
    silent_pairs: usize,
    flows: Vec<Flow>,
}

async fn flows(state: &State, limit: usize) -> Answer {
    let report = report(&state.shared, limit).await;
    Answer::json(
        200,
        &FlowsJson {
            total: report.total_flows,
            listed: report.flows.len(),
            silent_pairs: report.silent_pairs,
            flows: report.flows,
        },
    )
}

/// The body of `PUT /v1/log-level`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLevelBody {
    /// error, warn, info, debug, trace, or a tracing filter.
    pub level: String,
}

fn log_level(state: &State, body: &[u8]) -> Answer {
    let Some(set) = &state.log_level else {
        return Answer::error(409, "this daemon's log level cannot be changed at run time");
    };
    let wanted: LogLevelBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return Answer::error(400, format!("expected {{\"level\": \"...\"}}: {e}")),
    };
    match set(&wanted.level) {
        Ok(()) => {
            tracing::info!(level = %wanted.level, "log level changed by the control API");
            Answer::json(200, &wanted)
        }
        Err(e) => Answer::error(400, e),
    }
}

/// Which published entry a `DELETE /v1/publish` means.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PublishedEntry {
    /// tcp or udp.
    pub protocol: crate::config::Protocol,
    /// The host address it listens on.
    pub host: std::net::SocketAddr,
}

#[derive(Serialize)]
struct PublishedJson {
    published: Vec<crate::config::Publish>,
}

fn published(state: &State) -> Answer {
    let published = state
        .shared
        .publisher
        .as_ref()
        .map(|p| p.list())
        .unwrap_or_default();
    Answer::json(200, &PublishedJson { published })
}

fn publish(state: &State, body: &[u8]) -> Answer {
    use crate::proxy::publish::Error;
    let Some(publisher) = &state.shared.publisher else {
        return Answer::error(409, "this daemon publishes no ports");
    };
    let entry: crate::config::Publish = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(e) => {
            return Answer::error(
                400,
                format!(
                    "expected {{\"protocol\": \"tcp\"|\"udp\", \"host\": \"ADDR:PORT\", \"guest-port\": N}}: {e}"
                ),
            );
        }
    };
    if let Some((key, why)) = entry.problem() {
        return Answer::error(400, format!("{key}: {why}"));
    }
    match publisher.add(entry.clone()) {
        Ok(()) => Answer::json(201, &entry),
        Err(e @ Error::Exists { .. }) => Answer::error(409, e.to_string()),
        Err(e @ Error::Privileged { .. }) => Answer::error(403, e.to_string()),
        Err(e @ Error::Bind { .. }) => {
            let status = match &e {
                Error::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => 409,
                Error::Bind { source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    403
                }
                _ => 500,
            };
            Answer::error(status, crate::errors::chain(&e))
        }
    }
}

async fn unpublish(state: &State, body: &[u8]) -> Answer {
    let Some(publisher) = &state.shared.publisher else {
        return Answer::error(409, "this daemon publishes no ports");
    };
    let which: PublishedEntry = match serde_json::from_slice(body) {
        Ok(w) => w,
        Err(e) => {
            return Answer::error(
                400,
                format!("expected {{\"protocol\": \"tcp\"|\"udp\", \"host\": \"ADDR:PORT\"}}: {e}"),
            );
        }
    };
    match publisher.remove(which.protocol, which.host) {
        Some((entry, task)) => {
            // The task was aborted: this waits only for its socket to close,
            // so the port is refused once the answer is out.
            let _ = task.await;
            Answer::json(200, &entry)
        }
        None => Answer::error(
            404,
            format!("{:?} {} is not published", which.protocol, which.host),
        ),
    }
}

/// The body of `POST /v1/pcap`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "action", rename_all = "kebab-case")]
pub enum PcapRequest {
    /// Start capturing into `file`, a name in the capture directory.
    Start {
        /// The file's name.
        file: String,
    },
    /// Stop the capture.
    Stop,
}

fn pcap(state: &State, body: &[u8]) -> Answer {
    let request: PcapRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Answer::error(
                400,
                format!(
                    "expected {{\"action\": \"start\", \"file\": \"NAME\"}} or {{\"action\": \"stop\"}}: {e}"
                ),
            );
        }
    };
    let tap = &state.shared.tap;
    match request {
        PcapRequest::Stop => match tap.stop() {
            Some(stats) => Answer::json(200, &stats),
            None => Answer::error(409, "no capture is running"),
        },
        PcapRequest::Start { file } => {
            let Some(dir) = &state.pcap_dir else {
                return Answer::error(
                    409,
                    "no capture directory: set [pcap] dir in the config (or start with --pcap)",
                );
            };
            let plain = std::path::Path::new(&file)
                .file_name()
                .is_some_and(|name| name == file.as_str())
                && !file.starts_with('.');
            if !plain {
                return Answer::error(
                    400,
                    format!(
                        "{file:?}: a file name in {} (no directories)",
                        dir.display()
                    ),
                );
            }
            let limits = &state.shared.config.pcap;
            match tap.start(&dir.join(&file), limits.max_bytes, limits.files) {
                Ok(()) => Answer::json(201, &tap.stats()),
                Err(e @ crate::pcap::Error::Running(_)) => Answer::error(409, e.to_string()),
                Err(e) => Answer::error(500, crate::errors::chain(&e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_limits_are_checked() {
        assert_eq!(flow_limit(""), Ok(DEFAULT_FLOW_LIMIT));
        assert_eq!(flow_limit("limit=5"), Ok(5));
        assert_eq!(flow_limit("limit=10000"), Ok(MAX_FLOW_LIMIT));
        for bad in [
            "limit=0",
            "limit=10001",
            "limit=-1",
            "limit=x",
            "limit=",
            "other=1",
        ] {
            assert!(flow_limit(bad).is_err(), "{bad}");
        }
    }
}
