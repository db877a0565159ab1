//! VM benchmark: the same guest booted through vhost-gateway, the kernel's
//! tap (QEMU's own virtio-net, `vhost=off`: the ceiling), passt (Debian's,
//! `-netdev stream`; a newer one with `--vhost-user` when PASST_BIN names
//! it) and QEMU's libslirp (`-netdev user`) in one run, each inside its own
//! network namespace that hosts the servers (iperf3, a TCP echo). The guest
//! reaches them through each backend's "gateway means host" mapping (tap:
//! the tap's own address). Columns: MTU 65520, MTU 1500 (with TSO where the
//! backend offers it), and vhost-gateway with 1 and 2 queue pairs under a
//! 2-vCPU guest running 4 streams. Prints one table with medians over
//! BENCH_RUNS runs (default 3) and the ratios of vhost-gateway to each.
//! BENCH_LOGS=DIR keeps each run's daemon log and guest console there.
//!
//! Run: `cargo bench --bench vm` as root (see README). Nothing leaves the
//! machine: every server is on a namespace's loopback.
#![allow(clippy::unwrap_used)] // a benchmark whose set-up fails should stop loudly

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kit::guest::{Backend, Guest, GuestOpts, line_after};
use kit::{Daemon, Netns, Server, TempDir, serve_tcp_echo};

/// The guest's part: network set-up, then idle, then the load. `{setup}`
/// is `dhcp` or a static address (tap); `{streams}` iperf3's -P.
const SCRIPT: &str = r#"
{setup}
GW=$(ip route | awk '/^default/ {print $3; exit}')
echo "VG-GW $GW"
sleep 1
echo VG-IDLE
sleep 3
echo VG-LOAD
echo VG-IPERF-UP
iperf3 -c $GW -t 6 -O 1 -f g -P {streams} --connect-timeout 5000
echo VG-IPERF-DOWN
iperf3 -c $GW -t 6 -O 1 -f g -P {streams} -R --connect-timeout 5000
vg-probe tcp-rr $GW:7 3000
vg-probe tcp-crr $GW:7 300
echo VG-LOADED
"#;

/// vhost-gateway's config in the benchmark: the defaults, plus the gateway
/// address leading to the namespace's loopback where the servers are (as
/// libslirp's 10.0.2.2 and passt's gateway do). BENCH_VG_CONFIG overrides it.
const BENCH_CONFIG: &str = "[outbound]\nallow-host-loopback = true\n[[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n";

/// The tap path's addresses (documentation range, inside the namespace).
const TAP_HOST: &str = "192.0.2.1";
const TAP_GUEST: &str = "192.0.2.2";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    VhostGateway,
    Slirp,
    /// Debian's passt over `-netdev stream`.
    Passt,
    /// A newer passt (`PASST_BIN`) with `--vhost-user`.
    PasstVhostUser,
    /// The kernel's tap, QEMU's own virtio-net (`vhost=off`).
    Tap,
}

/// One column of the table: a backend and the link it runs.
#[derive(Debug, Clone)]
struct Variant {
    name: String,
    kind: Kind,
    mtu: u32,
    pairs: u16,
    cpus: u16,
    streams: u16,
}

impl Variant {
    fn new(name: &str, kind: Kind, mtu: u32) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            mtu,
            pairs: 1,
            cpus: 1,
            streams: 1,
        }
    }

    fn script(&self) -> String {
        let setup = match self.kind {
            Kind::Tap => format!(
                "ip link set eth0 mtu {}\nip addr add {TAP_GUEST}/24 dev eth0\nip route add default via {TAP_HOST}",
                self.mtu
            ),
            _ => "dhcp".to_owned(),
        };
        SCRIPT
            .replace("{setup}", &setup)
            .replace("{streams}", &self.streams.to_string())
    }

    fn vg_config(&self) -> String {
        let base = std::env::var("BENCH_VG_CONFIG").unwrap_or_else(|_| BENCH_CONFIG.into());
        // queue-pairs only when needed: VG_BIN may name an older build
        // without the key, for a before/after run.
        let pairs = if self.pairs > 1 {
            format!("queue-pairs = {}\n", self.pairs)
        } else {
            String::new()
        };
        format!("{base}\n[network]\nmtu = {}\n{pairs}", self.mtu)
    }
}

/// Every variant of the run: the backends at MTU 65520 (libslirp has only
/// 1500), then MTU 1500 with TSO, then one and two queue pairs with two
/// vCPUs and four streams.
fn variants() -> Vec<Variant> {
    let mut v = vec![
        Variant::new("vg-65520", Kind::VhostGateway, 65520),
        Variant::new("tap-65520", Kind::Tap, 65520),
        Variant::new("passt-65520", Kind::Passt, 65520),
    ];
    if std::env::var_os("PASST_BIN").is_some() {
        v.push(Variant::new("passt-vu-65520", Kind::PasstVhostUser, 65520));
    }
    v.extend([
        Variant::new("vg-1500", Kind::VhostGateway, 1500),
        Variant::new("tap-1500", Kind::Tap, 1500),
        Variant::new("slirp-1500", Kind::Slirp, 1500),
    ]);
    for pairs in [1, 2] {
        let mut mq = Variant::new(&format!("vg-{pairs}q-2cpu-P4"), Kind::VhostGateway, 65520);
        mq.pairs = pairs;
        mq.cpus = 2;
        mq.streams = 4;
        v.push(mq);
    }
    v
}

/// One run's figures; None where a backend has no separate process.
#[derive(Debug, Default, Clone)]
struct Figures {
    up_gbit: f64,
    down_gbit: f64,
    rr_p50_us: f64,
    crr_p50_us: f64,
    idle_cpu_pct: Option<f64>,
    load_cpu_pct: Option<f64>,
    idle_rss_mib: Option<f64>,
    peak_rss_mib: Option<f64>,
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn status_kib(pid: u32, key: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The iperf3 receiver rate (Gbit/s) after `marker`.
fn iperf_rate(console: &str, marker: &str) -> f64 {
    console
        .split(marker)
        .nth(1)
        // This run's output only; with -P, its [SUM] line.
        .map(|rest| rest.split("VG-").next().unwrap_or(rest))
        .and_then(|run| {
            let mut receivers = run.lines().filter(|l| l.contains("receiver"));
            let first = receivers.next()?;
            Some(receivers.find(|l| l.contains("[SUM]")).unwrap_or(first))
        })
        .and_then(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let unit = words.iter().position(|w| w.ends_with("bits/sec"))?;
            let value: f64 = words.get(unit - 1)?.parse().ok()?;
            Some(match words[unit] {
                "Gbits/sec" => value,
                "Mbits/sec" => value / 1000.0,
                "Kbits/sec" => value / 1e6,
                _ => value / 1e9,
            })
        })
        .unwrap_or(0.0)
}

fn field(console: &str, marker: &str, key: &str) -> f64 {
    line_after(console, marker)
        .and_then(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix(key)))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// iperf3 and the probe's dependencies for the guest's initramfs.
fn iperf3_files() -> Vec<(String, Vec<u8>, u32)> {
    let mut files: Vec<(String, Vec<u8>, u32)> = ["lib", "lib/x86_64-linux-gnu", "lib64"]
        .iter()
        .map(|d| (d.to_string(), Vec::new(), 0o040_755))
        .collect();
    let ldd = Command::new("ldd").arg("/usr/bin/iperf3").output().unwrap();
    let mut paths = vec![PathBuf::from("/usr/bin/iperf3")];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(p) = path {
            paths.push(p);
        }
    }
    for p in paths {
        let contents = std::fs::read(&p).unwrap();
        // Merged /usr: /lib is /usr/lib on the host; the guest has real /lib.
        let inside = p.to_string_lossy().trim_start_matches('/').to_owned();
        files.push((inside, contents, 0o100_755));
    }
    files
}

/// Runs `ip -n NS ARGS` for each line of arguments.
fn ip(ns: &Netns, lines: &[&[&str]]) {
    for args in lines {
        let ok = Command::new("ip")
            .args(["-n", &ns.name])
            .args(*args)
            .status()
            .unwrap();
        assert!(ok.success(), "ip {args:?}");
    }
}

fn run_once(variant: &Variant, run: usize, extra: &[(String, Vec<u8>, u32)]) -> Figures {
    let ns = Netns::new(&format!("bench{run}"));
    let dir = TempDir::new("bench");
    // Every address of the namespace: its loopback (the gateways' "host")
    // and, for the tap path, the tap's own address.
    let _iperf = Server(
        ns.command("iperf3")
            .args(["-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    serve_tcp_echo(ns.enter(|| std::net::TcpListener::bind("0.0.0.0:7").unwrap()));
    let mut daemon = None;
    let mut passt = None;
    let passt_socket = dir.0.join("passt.sock");
    let mtu = variant.mtu.to_string();
    let mut backend = Backend::Slirp;
    match variant.kind {
        Kind::VhostGateway => daemon = Some(Daemon::start(&ns, Some(&variant.vg_config()))),
        Kind::Slirp => {}
        Kind::Tap => {
            ip(
                &ns,
                &[
                    &["tuntap", "add", "dev", "tap0", "mode", "tap"],
                    &["addr", "add", &format!("{TAP_HOST}/24"), "dev", "tap0"],
                    &["link", "set", "tap0", "mtu", &mtu],
                    &["link", "set", "tap0", "up"],
                ],
            );
            backend = Backend::Tap("tap0");
        }
        Kind::Passt | Kind::PasstVhostUser => {
            // passt takes its addresses from the namespace's routed uplink.
            // passt drops to "nobody" before it binds its socket.
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o1777)).unwrap();
            }
            let (bin, mode): (String, &[&str]) = if variant.kind == Kind::Passt {
                ("passt".into(), &[])
            } else {
                (std::env::var("PASST_BIN").unwrap(), &["--vhost-user"])
            };
            passt = Some(Server(
                ns.command(&bin)
                    .args(mode)
                    .args(["-f", "-q", "-1", "-m", &mtu, "-s"])
                    .arg(&passt_socket)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            ));
            wait_for(&passt_socket);
            backend = if variant.kind == Kind::Passt {
                Backend::Passt(&passt_socket)
            } else {
                Backend::VhostUser(&passt_socket)
            };
        }
    }
    if let Some(d) = &daemon {
        backend = Backend::VhostUser(&d.socket);
    }
    std::thread::sleep(Duration::from_millis(200));
    let script = variant.script();
    let mut opts = GuestOpts::new(Path::new("/"), &script);
    opts.backend = backend;
    opts.extra_files = extra.to_vec();
    opts.timeout = Duration::from_secs(240);
    opts.cpus = variant.cpus;
    opts.queue_pairs = variant.pairs;
    let ns_name = ns.name.clone();
    if matches!(variant.kind, Kind::Slirp | Kind::Tap) {
        opts.netns = Some(&ns_name);
    }
    let pid = daemon
        .as_ref()
        .map(Daemon::pid)
        .or_else(|| passt.as_ref().map(|p| p.0.id()));
    let guest = Guest::spawn(&opts, "VG-IDLE");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    let idle_start = (Instant::now(), pid.and_then(cpu_ticks));
    std::thread::sleep(Duration::from_secs(2));
    let idle_end = (Instant::now(), pid.and_then(cpu_ticks));
    let idle_rss = pid.and_then(|p| status_kib(p, "VmRSS:"));
    // The load phase: from the guest's VG-LOAD to its end.
    while !guest.console().contains("VG-LOAD") {
        std::thread::sleep(Duration::from_millis(20));
    }
    let load_start = (Instant::now(), pid.and_then(cpu_ticks));
    while !guest.console().contains("VG-LOADED") && !guest.console().contains("VG-EXIT") {
        std::thread::sleep(Duration::from_millis(20));
    }
    let load_end = (Instant::now(), pid.and_then(cpu_ticks));
    let peak_rss = pid.and_then(|p| status_kib(p, "VmHWM:"));
    let console = guest.finish();
    let pct = |a: (Instant, Option<u64>), b: (Instant, Option<u64>)| -> Option<f64> {
        let ticks = b.1?.checked_sub(a.1?)? as f64;
        Some(100.0 * ticks / ticks_per_second() / (b.0 - a.0).as_secs_f64())
    };
    let figures = Figures {
        up_gbit: iperf_rate(&console, "VG-IPERF-UP"),
        down_gbit: iperf_rate(&console, "VG-IPERF-DOWN"),
        rr_p50_us: field(&console, "VG-RR", "p50_us="),
        crr_p50_us: field(&console, "VG-CRR", "p50_us="),
        idle_cpu_pct: pct(idle_start, idle_end),
        load_cpu_pct: pct(load_start, load_end),
        idle_rss_mib: idle_rss.map(|k| k / 1024.0),
        peak_rss_mib: peak_rss.map(|k| k / 1024.0),
    };
    if figures.up_gbit == 0.0 || figures.rr_p50_us.is_nan() {
        eprintln!(
            "{} run {run}: incomplete figures; console:\n{console}",
            variant.name
        );
    }
    if let Some(d) = &daemon
        && std::env::var_os("BENCH_COUNTERS").is_some()
    {
        d.signal("USR1");
        d.wait_log("counters", Duration::from_secs(5));
        let log = d.log();
        eprintln!(
            "{}",
            log.lines()
                .rev()
                .find(|l| l.contains("counters"))
                .unwrap_or("")
        );
    }
    if let (Some(d), Some(dir)) = (&daemon, std::env::var_os("BENCH_LOGS")) {
        let path = Path::new(&dir).join(format!("{}-{run}.log", variant.name));
        std::fs::write(&path, format!("{}\n--- console ---\n{console}", d.log())).unwrap();
    }
    drop(daemon);
    figures
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn median_of(runs: &[Figures], f: impl Fn(&Figures) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = runs.iter().filter_map(&f).collect();
    (!v.is_empty()).then(|| median(v))
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or("n/a".to_owned(), |x| format!("{x:.decimals$}"))
}

fn main() {
    // `cargo bench` passes --bench; any other argument is ignored.
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let extra = iperf3_files();
    // BENCH_ONLY=vg-65520,tap-65520 measures only those columns.
    let only = std::env::var("BENCH_ONLY").ok();
    let mut results: Vec<(Variant, Vec<Figures>)> = variants()
        .into_iter()
        .filter(|v| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == v.name))
        })
        .map(|v| (v, Vec::new()))
        .collect();
    // Interleave variants run by run, so drift in the machine's speed hits
    // all of them alike.
    for run in 0..runs {
        for (variant, figures) in &mut results {
            eprintln!("run {}/{runs}: {}", run + 1, variant.name);
            figures.push(run_once(variant, run, &extra));
        }
    }
    let accel = if Path::new("/sys/module/kvm_intel").exists()
        || Path::new("/sys/module/kvm_amd").exists()
    {
        "KVM"
    } else {
        "TCG"
    };
    println!(
        "\nvhost-gateway VM benchmark: {accel} guest (Debian cloud kernel), medians of {runs} runs\n"
    );
    println!(
        "{:<16} {:>4} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "backend",
        "P",
        "g->h Gb/s",
        "h->g Gb/s",
        "RR p50 us",
        "CRR p50us",
        "idle CPU%",
        "load CPU%",
        "idle MiB",
        "peak MiB"
    );
    let mut table: Vec<(&str, [Option<f64>; 8])> = Vec::new();
    for (variant, figures) in &results {
        let row = [
            median_of(figures, |f| Some(f.up_gbit)),
            median_of(figures, |f| Some(f.down_gbit)),
            median_of(figures, |f| Some(f.rr_p50_us)),
            median_of(figures, |f| Some(f.crr_p50_us)),
            median_of(figures, |f| f.idle_cpu_pct),
            median_of(figures, |f| f.load_cpu_pct),
            median_of(figures, |f| f.idle_rss_mib),
            median_of(figures, |f| f.peak_rss_mib),
        ];
        println!(
            "{:<16} {:>4} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
            variant.name,
            variant.streams,
            cell(row[0], 2),
            cell(row[1], 2),
            cell(row[2], 0),
            cell(row[3], 0),
            cell(row[4], 1),
            cell(row[5], 1),
            cell(row[6], 1),
            cell(row[7], 1),
        );
        table.push((&variant.name, row));
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".to_owned(),
    };
    let row = |name: &str| table.iter().find(|(n, _)| *n == name).map(|(_, r)| *r);
    println!();
    for (ours, other) in [
        ("vg-65520", "tap-65520"),
        ("vg-65520", "passt-65520"),
        ("vg-65520", "passt-vu-65520"),
        ("vg-65520", "slirp-1500"),
        ("vg-1500", "tap-1500"),
        ("vg-1500", "slirp-1500"),
        ("vg-2q-2cpu-P4", "vg-1q-2cpu-P4"),
    ] {
        let (Some(a), Some(b)) = (row(ours), row(other)) else {
            continue;
        };
        println!(
            "{ours}/{other}: g->h {}  h->g {}  RR p50 {}  CRR p50 {}",
            ratio(a[0], b[0]),
            ratio(a[1], b[1]),
            ratio(a[2], b[2]),
            ratio(a[3], b[3]),
        );
    }
    println!(
        "(throughput: higher is better; latency: lower is better.) vg: vhost-gateway; \
         -1500 runs with segmentation offload (TSO) where the backend has it; \
         libslirp and tap run inside QEMU or the kernel: no CPU or memory of their own is shown."
    );
}
