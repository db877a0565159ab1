//! `GET /metrics`: the counters and gauges in Prometheus text (OpenMetrics),
//! encoded by prometheus-client from a snapshot taken per scrape.
//!
//! Names: every counter as `vhost_gateway_<name>_total` with its doc comment
//! as help; frames per queue pair as `vhost_gateway_pair_frames_total{pair}`;
//! denies per policy rule as `vhost_gateway_policy_rule_denied_total{rule}`;
//! live flows as `vhost_gateway_flows{proto,state}`; the other gauges as
//! `vhost_gateway_<gauge>`.
#![forbid(unsafe_code)]

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::api::{Answer, Report};
use crate::engine::Shared;
use crate::metrics::Counter;

/// Values read once for one scrape.
#[derive(Debug)]
struct Snapshot {
    counters: Vec<(Counter, u64)>,
    pairs: Vec<u64>,
    rules: Vec<(String, u64)>,
    flows: Vec<(&'static str, &'static str, usize)>,
    gauges: Vec<(&'static str, &'static str, usize)>,
}

fn gauge(value: usize) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for &(counter, value) in &self.counters {
            let c = ConstCounter::new(value);
            let m = encoder.encode_descriptor(
                counter.name(),
                &counter.help(),
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        if !self.pairs.is_empty() {
            let kind = ConstCounter::new(0u64).metric_type();
            let mut family = encoder.encode_descriptor(
                "pair_frames",
                "Frames taken from each queue pair's TX queue.",
                None,
                kind,
            )?;
            for (pair, &value) in self.pairs.iter().enumerate() {
                let labels = [("pair", pair.to_string())];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        if !self.rules.is_empty() {
            let kind = ConstCounter::new(0u64).metric_type();
            let mut family = encoder.encode_descriptor(
                "policy_rule_denied",
                "Flows, datagrams and echoes denied (or revoked by a reload) by each rule of the \
                 policy in force: its number as `ctl`/`explain` show it, `default`, or `later` \
                 past rule 254. Numbers are positions: a reload that reorders rules carries \
                 the counts over to the rules now at those positions.",
                None,
                kind,
            )?;
            for (rule, value) in &self.rules {
                let labels = [("rule", rule.as_str())];
                ConstCounter::new(*value).encode(family.encode_family(&labels)?)?;
            }
        }
        let kind = gauge(0).metric_type();
        let mut family = encoder.encode_descriptor(
            "flows",
            "Live flows and datagram sessions of the attached guest, by protocol and state.",
            None,
            kind,
        )?;
        for &(proto, state, value) in &self.flows {
            let labels = [("proto", proto), ("state", state)];
            gauge(value).encode(family.encode_family(&labels)?)?;
        }
        for &(name, help, value) in &self.gauges {
            let g = gauge(value);
            let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)?;
        }
        Ok(())
    }
}

/// The exposition for `shared`'s counters and `report`'s gauges.
pub fn text(shared: &Shared, report: &Report) -> Result<String, std::fmt::Error> {
    let metrics = &shared.metrics;
    let g = &report.gauges;
    let (attached, pins) = match &report.guest {
        Some((_, _, pins)) => (1, *pins),
        None => (0, 0),
    };
    let snapshot = Snapshot {
        counters: Counter::ALL.iter().map(|&c| (c, metrics.get(c))).collect(),
        pairs: metrics.pair_frames(),
        rules: metrics
            .rule_denies()
            .into_iter()
            .map(|(slot, n)| (slot.label(), n))
            .collect(),
        flows: vec![
            ("tcp", "connecting", g.tcp_connecting),
            ("tcp", "established", g.tcp_established),
            ("tcp", "closing", g.tcp_closing),
            ("udp", "established", g.udp_sessions),
            ("icmp", "established", g.icmp_sessions),
        ],
        gauges: vec![
            ("vmm_attached", "1 while a VMM is attached.", attached),
            (
                "dns_inflight",
                "DNS queries in flight or with answers not yet delivered.",
                g.dns_inflight,
            ),
            (
                "dns_pins",
                "Names the guest resolved that are pinned to their addresses.",
                pins,
            ),
            (
                "frames_waiting_for_guest",
                "Frames waiting for the guest's RX buffers.",
                g.frames_waiting_for_guest,
            ),
            (
                "fragment_bytes_held",
                "Fragment reassembly budget in use.",
                g.fragment_bytes_held,
            ),
            (
                "cached_certificates",
                "Leaf certificates cached by TLS interception.",
                super::api::cached_certs(shared),
            ),
        ],
    };
    let mut registry = Registry::with_prefix("vhost_gateway");
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// `GET /metrics`.
pub fn answer(shared: &Shared, report: &Report) -> Answer {
    match text(shared, report) {
        Ok(body) => Answer {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        },
        Err(_) => Answer::error(500, "cannot encode the metrics"),
    }
}
