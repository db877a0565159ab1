//! Command-line types (clap derive) only.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// vhost-user-net backend that is the whole network of a VM sandbox.
#[derive(Debug, Parser)]
#[command(name = "vhost-gateway", version, about)]
pub struct Cli {
    /// vhost-user socket the VMM connects to.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Configuration file (TOML); embedded defaults without it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Queue pairs to offer (overrides `network.queue-pairs`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=8))]
    pub queue_pairs: Option<u16>,

    /// Control API socket (HTTP/1.1, JSON; see `ctl`). Off without it.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Also serve the Prometheus exposition (`GET /metrics`, nothing else)
    /// on this TCP address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Capture every frame to and from the guest into FILE (libpcap), from
    /// the start; `[pcap]` sets the size and ring of files.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,

    /// Print the vhost-user backend capabilities JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// A subcommand instead of running the daemon.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration file: a summary line and exit 0, or every
    /// problem with its key and line and exit 1.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the embedded default configuration, every key documented.
    PrintDefaultConfig,
    /// Say which policy rule decides a destination, and why.
    Explain {
        /// Configuration file; embedded defaults without it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Destination address (IPv4 or IPv6).
        dest: std::net::IpAddr,
        /// tcp, udp or icmp.
        #[arg(long, default_value = "tcp")]
        proto: String,
        /// Destination port (not for icmp).
        #[arg(long)]
        port: Option<u16>,
        /// Hostname the address was resolved from (as a DNS pin would give).
        #[arg(long)]
        name: Option<String>,
    },
    /// Ask a running daemon through its control socket.
    Ctl {
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH")]
        control_socket: PathBuf,
        /// Print the daemon's JSON answer as it is.
        #[arg(long)]
        json: bool,
        /// What to ask.
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Certificate authority for TLS interception.
    Ca {
        /// What to do.
        #[command(subcommand)]
        action: CaAction,
    },
}

/// `ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum CtlAction {
    /// Version, uptime, the attached guest, live gauges.
    Status,
    /// Every non-zero counter (all with --all) and the live gauges.
    Counters {
        /// Zero counters too.
        #[arg(long)]
        all: bool,
    },
    /// Live flows and sessions, oldest first.
    Flows {
        /// At most this many (1 to 10,000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Set the log level (error, warn, info, debug, trace or a tracing
    /// filter).
    LogLevel {
        /// The new level.
        level: String,
    },
    /// The Prometheus exposition, as a scraper sees it.
    Metrics,
    /// Packet capture: start (into a file in `[pcap] dir`), stop, or its
    /// state.
    Pcap {
        /// What to do.
        #[command(subcommand)]
        action: PcapAction,
    },
    /// Re-read the config file and apply its policy, DNS block lists and
    /// published ports (flows the new policy denies are reset); a config
    /// that is invalid or changes anything else is refused.
    Reload,
    /// Published ports: list, add or remove at run time.
    Publish {
        /// What to do.
        #[command(subcommand)]
        action: PublishAction,
    },
}

/// `ctl pcap` subcommands.
#[derive(Debug, Subcommand)]
pub enum PcapAction {
    /// Start capturing into FILE (a name in the daemon's `[pcap] dir`).
    Start {
        /// The file's name.
        file: String,
    },
    /// Stop capturing (everything captured is written first).
    Stop,
    /// Whether a capture runs, and its numbers.
    Status,
}

/// `ctl publish` subcommands.
#[derive(Debug, Subcommand)]
pub enum PublishAction {
    /// The ports published now.
    List,
    /// Publish a host address to a guest port (host ports >= 1024; lower
    /// ones only in the config).
    Add {
        /// Host address and port to listen on (e.g. 127.0.0.1:8080).
        host: std::net::SocketAddr,
        /// Guest port to forward to.
        guest_port: u16,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        protocol: String,
    },
    /// Stop publishing a host address (accepted connections go on).
    Remove {
        /// The host address and port.
        host: std::net::SocketAddr,
        /// tcp or udp.
        #[arg(long, default_value = "tcp")]
        protocol: String,
    },
}

/// `ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaAction {
    /// Write a new CA: DIR/ca.pem (certificate) and DIR/ca.key (private
    /// key, mode 0600; an existing key is never overwritten).
    Generate {
        /// Directory for the files (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "vhost-gateway sandbox CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}
