//! TLS interception overhead: one guest, one upstream HTTPS server (rustls,
//! in the benchmark's namespace) on two ports. Port 443 is intercepted (the
//! guest trusts our CA; the daemon re-encrypts upstream); port 8443 is not
//! (plain TCP proxying, the guest's TLS goes end to end). The probe makes
//! TLS_CONNS sequential HTTPS requests, each on a new connection (full
//! handshake), alternating plain and intercepted rounds BENCH_RUNS times
//! (default 3); prints the medians of connections per second and their
//! ratio.
//!
//! Run: `cargo bench --bench tls` as root (see README). Nothing leaves the
//! machine.
#![allow(clippy::unwrap_used)] // a benchmark whose set-up fails should stop loudly

use std::process::Command;

use kit::guest::{GuestOpts, boot};
use kit::tls::{serve_https, upstream_identity};
use kit::{Daemon, Netns, TempDir, run};

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let runs = env_or("BENCH_RUNS", 3);
    let conns = env_or("TLS_CONNS", 50);
    let ns = Netns::new("tlsbench");
    ns.add_addr("192.0.2.10/32");
    let (upstream_ca, server) = upstream_identity(&["www.bench.test"]);
    for port in [443, 8443] {
        serve_https(
            &ns,
            format!("192.0.2.10:{port}").parse().unwrap(),
            server.clone(),
        );
    }
    let dir = TempDir::new("tlsbench");
    run(Command::new(env!("CARGO_BIN_EXE_vhost-gateway"))
        .args(["ca", "generate", "--out"])
        .arg(dir.0.join("ca")));
    std::fs::write(dir.0.join("upstream-ca.pem"), &upstream_ca).unwrap();
    let config = format!(
        "[tls]\nenabled = true\nports = [443]\nca-cert = \"{0}/ca/ca.pem\"\n\
         ca-key = \"{0}/ca/ca.key\"\nupstream-roots = \"none\"\n\
         upstream-ca-file = \"{0}/upstream-ca.pem\"\n",
        dir.0.display()
    );
    let daemon = Daemon::start(&ns, Some(&config));
    let mut script = String::from("dhcp\n");
    for _ in 0..runs {
        script.push_str(&format!(
            "echo VG-ROUND plain\n\
             vg-probe https-crr 192.0.2.10:8443 www.bench.test /upstream-ca.pem {conns}\n\
             echo VG-ROUND intercepted\n\
             vg-probe https-crr 192.0.2.10:443 www.bench.test /ca.pem {conns}\n"
        ));
    }
    let mut opts = GuestOpts::new(&daemon.socket, &script);
    opts.timeout = std::time::Duration::from_secs(600);
    opts.extra_files = vec![
        (
            "ca.pem".into(),
            std::fs::read(dir.0.join("ca/ca.pem")).unwrap(),
            0o100_644,
        ),
        (
            "upstream-ca.pem".into(),
            upstream_ca.into_bytes(),
            0o100_644,
        ),
    ];
    let console = boot(&opts);
    let (mut plain, mut intercepted) = (Vec::new(), Vec::new());
    let mut round = "";
    for line in console.lines() {
        if let Some(i) = line.find("VG-ROUND ") {
            round = if line[i..].contains("intercepted") {
                "intercepted"
            } else {
                "plain"
            };
        }
        let Some(i) = line.find("VG-HTTPS-CRR ") else {
            continue;
        };
        let fields = &line[i..];
        let ok = fields.contains(&format!("ok={conns} "));
        assert!(ok, "not every connection succeeded: {fields}\n{console}");
        let rate: f64 = fields
            .split("per_sec=")
            .nth(1)
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        match round {
            "intercepted" => intercepted.push(rate),
            _ => plain.push(rate),
        }
    }
    assert_eq!(plain.len(), runs, "{console}");
    assert_eq!(intercepted.len(), runs, "{console}");
    let (p, i) = (median(plain.clone()), median(intercepted.clone()));
    println!(
        "HTTPS connections/s (new TLS connection + GET each, {conns} per round, median of {runs})"
    );
    println!("plain (end-to-end TLS, proxied TCP)  {p:8.1}   rounds {plain:?}");
    println!("intercepted (our leaf + upstream TLS) {i:8.1}   rounds {intercepted:?}");
    println!(
        "intercepted/plain: {:.2}x ({:.0}% of plain's rate)",
        i / p,
        100.0 * i / p
    );
}
