//! vhost-gateway: a vhost-user-net backend that is the whole network of a
//! VM sandbox.
//!
//! A VMM connects to the daemon's unix socket and hands over a virtio-net
//! device's queues; from then on the daemon is the guest's gateway, DHCP and
//! DNS server, router to the outside, and the enforcer of the sandbox's
//! egress policy. See `ARCHITECTURE.md` for the whole picture.
//!
//! # Module map (layers)
//!
//! Imports run one way, top to bottom, along the path a frame travels;
//! `tests/layers.rs` fails on an import that runs up the list.
//!
//! | layer | owns |
//! |---|---|
//! | [`cli`], [`commands`] | command-line types; subcommands that do not run the daemon |
//! | [`daemon`] | start-up order, accept loop, signals |
//! | [`vhost`] | vhost-user types only: features, config space, events, the message relay |
//! | [`engine`] | the guest's link partner: classify → police → route, smoltcp device, flows |
//! | [`tls`] | the operator CA, minted leaves, interception over egress |
//! | [`proxy`] | host sockets: dial with timeout, relay, UDP/ICMP sessions, published ports |
//! | [`dns`] | forwarder, name pins, rebind filter, TCP framing |
//! | [`config`] | schema per table, validation, TOML line locator; compiles the policy |
//! | [`policy`] | pure egress decisions |
//! | [`virtio`], [`metrics`], [`audit`] | leaves: descriptor chains, counters, the audit writer |
//!
//! # Threads
//!
//! The main thread accepts one VMM at a time. Per VMM, vhost-user-backend's
//! request thread handles control messages (through the relay's two
//! threads) and one vring worker thread runs the engine; it never blocks or
//! awaits. A tokio runtime (`vg-host`) runs the slow paths: dials, DNS,
//! TLS, first-bytes decisions, published-port accepts.
//!
//! # Trust boundaries
//!
//! Guest memory is shared and hostile: each frame is copied once out of its
//! descriptor chain ([`virtio`]) and everything is decided on that copy.
//! Bytes from the network (DNS answers, TLS, HTTP) and from the VMM
//! (vhost-user messages) are parsed with lengths checked first. Every
//! outbound flow is decided by [`policy`] before it leaves.

pub mod audit;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod egress;
pub mod engine;
pub mod fuzzing;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod proxy;
pub mod services;
pub mod sniff;
pub mod tls;
pub mod vhost;
pub mod virtio;
pub mod wellknown;
pub mod wiring;
