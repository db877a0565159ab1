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
//! | [`commands`], [`fuzzing`] | subcommands that do not run the daemon; fuzz harnesses |
//! | [`daemon`] | start-up order, accept loop, signals |
//! | [`wiring`] | the composition root: shared parts once, a backend per VMM |
//! | [`vhost`] | vhost-user types only: features, config space, events, the message relay |
//! | [`engine`] | the guest's link partner: classify → police → route, smoltcp device, flows |
//! | [`services`] | the engine's door to local services: first-bytes flows, TLS, DNS over TCP/TLS |
//! | [`tls`] | the operator CA, minted leaves, interception |
//! | [`egress`] | the egress decision's async side: pins, own resolution, audit |
//! | [`dns`] | forwarder, name pins, rebind filter, TCP framing |
//! | [`proxy`] | host sockets: dial, relay, UDP/ICMP sessions, published ports |
//! | [`config`] | schema per table, validation, line locator; compiles the policy |
//! | [`policy`] | pure egress decisions ([`policy::Policy::judge`]) |
//! | [`sniff`] | names from a flow's first bytes |
//! | [`names`], [`wellknown`], [`virtio`], [`metrics`], [`audit`], [`cli`], [`confine`] | leaves ([`confine`]: capabilities, landlock, the seccomp allow-list) |
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

pub mod activation;
pub mod audit;
pub mod cli;
pub mod commands;
pub mod config;
pub mod confine;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod egress;
pub mod engine;
pub mod errors;
pub mod fuzzing;
pub mod metrics;
pub mod names;
pub mod pcap;
pub mod policy;
pub mod proxy;
pub mod services;
pub mod sniff;
pub mod tls;
pub mod vhost;
pub mod virtio;
pub mod wellknown;
pub mod wiring;
