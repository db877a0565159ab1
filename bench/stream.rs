//! Guest-free benchmark: the daemon's own cost, without a TCG guest in the
//! way. The VMM harness from the e2e tests plays QEMU (memfd memory, split
//! rings) and a smoltcp TCP stack on its side plays the guest, talking
//! through the daemon to servers on the host's loopback (the gateway
//! address maps there). For each MTU (65520 and 1500) it reports bulk
//! throughput both ways as Gbit/s, Gbit/s per daemon core (bytes over the
//! daemon's CPU seconds: what density depends on) and CPU seconds per GiB;
//! then 1-byte request/response latency (p50/p99) and connections per
//! second (connect, 1-byte exchange, close); last, memory per idle flow
//! with STREAM_FLOWS (default 10,000) flows held at once, on first use and
//! after churn.
//!
//! With STREAM_CALLGRIND=1 the daemon runs under valgrind's callgrind and
//! each bulk row reports the daemon's user-space instructions per GiB
//! instead (noise-free; this machine has no hardware counters for `perf
//! stat`): `STREAM_CALLGRIND=1 STREAM_GIB=0.125 cargo bench --bench stream`.
//!
//! Run: `cargo bench --bench stream`. STREAM_GIB sets the bulk size
//! (default 2), STREAM_MODES the links (default "65520,1500+tso,1500"; +tso: segmentation offload both ways, as a Linux guest uses it), STREAM_ONLY a
//! substring of the rows to run ("guest -> host", "host -> guest", "rr",
//! "connections", "idle flows"). Nothing leaves the machine: the far end is 127.0.0.1.
#![allow(clippy::unwrap_used)]
// a benchmark whose set-up fails should stop loudly
// Sizes and rates here are far below the truncation bounds.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;

use kit::{Daemon, cpu_seconds};

#[path = "../tests/common/stack.rs"]
mod stack;
use stack::{Guest, Mode, STALL};

const BULK_BUFFER: usize = 4 << 20;
const SMALL_BUFFER: usize = 16 << 10;
/// Round trips measured for the latency row (after a warm-up).
const RR_ROUNDS: usize = 5_000;
const RR_WARMUP: usize = 200;
/// The harness's socket buffers for idle flows (the daemon's are its own).
const IDLE_BUFFER: usize = 1024;
/// How long the connection-rate row runs.
const CRR_TIME: Duration = Duration::from_secs(3);

#[derive(Clone, Copy)]
enum Direction {
    Upload,
    Download,
}

/// Moves `bytes` through one connection; returns (seconds, daemon CPU s).
fn stream(daemon: &Daemon, mode: Mode, direction: Direction, bytes: u64) -> (f64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let far = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut moved = 0u64;
        match direction {
            Direction::Upload => {
                while moved < bytes {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "stream ended early at {moved}");
                    moved += n as u64;
                }
            }
            Direction::Download => {
                while moved < bytes {
                    let n = (bytes - moved).min(buf.len() as u64) as usize;
                    s.write_all(&buf[..n]).unwrap();
                    moved += n as u64;
                }
                // The harness aborts when it has everything; how the far
                // end learns it does not matter here.
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.read(&mut buf);
            }
        }
        moved
    });
    let upload = matches!(direction, Direction::Upload);
    let mut guest = Guest::start(daemon, mode);
    let handle = guest.connect(port, BULK_BUFFER);
    let pid = daemon.pid();
    guest.until("connect", |g| g.socket(handle).may_send());
    let (t0, cpu0) = (Instant::now(), cpu_seconds(pid));
    let mut moved = 0u64;
    guest.until("stream", |g| {
        let s = g.socket(handle);
        if upload {
            while s.can_send() && moved < bytes {
                let n = s
                    .send(|buf| {
                        let n = buf.len().min((bytes - moved) as usize);
                        (n, n)
                    })
                    .unwrap();
                moved += n as u64;
                if n == 0 {
                    break;
                }
            }
        } else {
            while s.can_recv() {
                moved += s.recv(|buf| (buf.len(), buf.len() as u64)).unwrap();
            }
        }
        // Uploads are done when the far end has everything.
        moved >= bytes && (!upload || far.is_finished())
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    guest.socket(handle).abort();
    guest.poll();
    drop(guest);
    // The far end's count was checked by its own loop.
    let _ = far.join();
    (secs, cpu)
}

/// A TCP echo on the host's loopback serving connections one at a time.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            s.set_nodelay(true).unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    });
    port
}

/// One byte out and back on `handle`.
fn round_trip(guest: &mut Guest, handle: SocketHandle) {
    let mut sent = false;
    guest.until("round trip", |g| {
        let s = g.socket(handle);
        if !sent && s.can_send() {
            sent = s.send_slice(b"x").unwrap() == 1;
        }
        sent && s.can_recv() && s.recv(|b| (b.len(), b.len())).unwrap() > 0
    });
}

/// Request/response latency on one connection: sorted round-trip times.
fn rr(daemon: &Daemon, mode: Mode, port: u16) -> Vec<Duration> {
    let mut guest = Guest::start(daemon, mode);
    let handle = guest.connect(port, SMALL_BUFFER);
    guest.until("connect", |g| g.socket(handle).may_send());
    let mut times = Vec::with_capacity(RR_ROUNDS);
    for i in 0..RR_WARMUP + RR_ROUNDS {
        let t0 = Instant::now();
        round_trip(&mut guest, handle);
        if i >= RR_WARMUP {
            times.push(t0.elapsed());
        }
    }
    guest.socket(handle).close();
    guest.until("close", |g| {
        matches!(g.socket(handle).state(), State::Closed | State::TimeWait)
    });
    times.sort();
    times
}

/// Connections per second: connect, one byte each way, close; returns
/// (connections, seconds, daemon CPU s).
fn crr(daemon: &Daemon, mode: Mode, port: u16) -> (usize, f64, f64) {
    let mut guest = Guest::start(daemon, mode);
    let pid = daemon.pid();
    let (t0, cpu0) = (Instant::now(), cpu_seconds(pid));
    let mut done = 0;
    while t0.elapsed() < CRR_TIME {
        let handle = guest.connect(port, SMALL_BUFFER);
        guest.until("connect", |g| g.socket(handle).may_send());
        round_trip(&mut guest, handle);
        guest.socket(handle).close();
        guest.until("close", |g| {
            matches!(g.socket(handle).state(), State::Closed | State::TimeWait)
        });
        guest.sockets.remove(handle);
        done += 1;
    }
    (done, t0.elapsed().as_secs_f64(), cpu_seconds(pid) - cpu0)
}

/// A server on the host's loopback that greets each connection with one
/// byte and then holds it, unread, until `release` is set.
fn holding_server(release: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u16 {
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        loop {
            if release.load(Ordering::Relaxed) {
                held.clear();
            }
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.write_all(b"x").unwrap();
                    held.push(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    port
}

fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Opens `n` connections to `port` at once (a window of SYNs in flight),
/// each taking the server's greeting byte and sending one of its own, and
/// holds them open.
fn open_idle(guest: &mut Guest, port: u16, n: usize) -> Vec<SocketHandle> {
    const WINDOW: usize = 256;
    let mut open: Vec<SocketHandle> = Vec::with_capacity(n);
    let mut pending: Vec<SocketHandle> = Vec::new();
    let deadline = Instant::now() + STALL;
    while open.len() < n {
        assert!(
            Instant::now() < deadline,
            "idle flows: stalled at {}",
            open.len()
        );
        while pending.len() < WINDOW && open.len() + pending.len() < n {
            let handle = guest.connect(port, IDLE_BUFFER);
            pending.push(handle);
        }
        if !guest.poll() {
            std::thread::yield_now();
        }
        pending.retain(|&h| {
            let s = guest.socket(h);
            if s.can_recv() && s.can_send() {
                s.recv(|b| (b.len(), ())).unwrap();
                s.send_slice(b"y").unwrap();
                open.push(h);
                return false;
            }
            assert!(s.is_open(), "idle flow {} refused", open.len());
            true
        });
    }
    // Let the last bytes and ACKs settle.
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        if !guest.poll() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    open
}

/// Memory per idle flow: the daemon's RSS growth over `n` held flows, on
/// first use and again after all of them closed and `n` new ones opened
/// (where allocator reuse shows). Returns (KiB/flow first, KiB/flow after
/// churn, RSS MiB with the flows held, RSS MiB at rest before).
fn idle_flows(daemon: &Daemon, mode: Mode, n: usize) -> (f64, f64, f64, f64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pid = daemon.pid();
    let mut guest = Guest::start(daemon, mode);
    std::thread::sleep(Duration::from_millis(300));
    let rest = rss_kib(pid);
    let mut per_flow = Vec::new();
    for _round in 0..2 {
        // A new server each round: new 4-tuples, whatever lingers.
        let release = std::sync::Arc::new(AtomicBool::new(false));
        let port = holding_server(release.clone());
        let flows = open_idle(&mut guest, port, n);
        let held = rss_kib(pid);
        per_flow.push(((held - rest) / n as f64, held));
        for &h in &flows {
            guest.socket(h).abort();
        }
        guest.poll();
        release.store(true, Ordering::Relaxed);
        for h in flows {
            guest.sockets.remove(h);
        }
        // The daemon drops a flow on the guest's RST; give it a moment.
        let settle = Instant::now() + Duration::from_secs(2);
        while Instant::now() < settle {
            if !guest.poll() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    (
        per_flow[0].0,
        per_flow[1].0,
        per_flow[0].1.max(per_flow[1].1) / 1024.0,
        rest / 1024.0,
    )
}

/// Lifts the soft fd limit to the hard one (the daemon, started after,
/// inherits it): the idle-flow row holds thousands of sockets each side.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The daemon under callgrind: counts zeroed before a row and dumped
/// after it.
struct Callgrind {
    out: std::path::PathBuf,
}

impl Callgrind {
    fn control(pid: u32, flag: &str) {
        let status = std::process::Command::new("callgrind_control")
            .arg(flag)
            .arg(pid.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "callgrind_control {flag}");
    }

    /// Instructions since the last call (the counters are zeroed).
    fn take(&self, pid: u32) -> u64 {
        let before: Vec<_> = self.dumps();
        Self::control(pid, "--dump");
        let deadline = Instant::now() + STALL;
        let dump = loop {
            if let Some(new) = self.dumps().into_iter().find(|d| !before.contains(d)) {
                break new;
            }
            assert!(Instant::now() < deadline, "no callgrind dump");
            std::thread::sleep(Duration::from_millis(50));
        };
        // The dump is complete once its totals line is there.
        let total = loop {
            let text = std::fs::read_to_string(&dump).unwrap_or_default();
            let total = text
                .lines()
                .find_map(|l| l.strip_prefix("totals: "))
                .and_then(|t| t.split_whitespace().next()?.parse().ok());
            if let Some(total) = total {
                break total;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Self::control(pid, "--zero");
        total
    }

    fn dumps(&self) -> Vec<std::path::PathBuf> {
        let dir = self.out.parent().unwrap();
        let stem = self.out.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&stem))
            })
            .collect()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn main() {
    raise_fd_limit();
    let gib: f64 = std::env::var("STREAM_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    let modes: Vec<Mode> = std::env::var("STREAM_MODES")
        .unwrap_or_else(|_| "65520,1500+tso,1500".into())
        .split(',')
        .filter_map(|m| {
            let m = m.trim();
            let (mtu, tso) = m.strip_suffix("+tso").map_or((m, false), |m| (m, true));
            Some(Mode {
                mtu: mtu.parse().ok()?,
                tso,
            })
        })
        .collect();
    let only = std::env::var("STREAM_ONLY").ok();
    let wanted = |row: &str| only.as_deref().is_none_or(|o| row.contains(o));
    println!(
        "\nvhost-gateway without a guest: harness smoltcp as the guest, {gib} GiB per bulk row\n"
    );
    println!(
        "{:<9} {:<16} {:>9} {:>14} {:>10}",
        "link", "row", "Gbit/s", "Gbit/s/core", "CPU s/GiB"
    );
    let callgrind = std::env::var_os("STREAM_CALLGRIND").map(|_| Callgrind {
        out: std::env::temp_dir().join(format!("vg-stream-callgrind.{}", std::process::id())),
    });
    if callgrind.is_some() {
        println!(
            "(under callgrind: the last column is the daemon's user-space instructions per GiB)"
        );
    }
    for mode in modes {
        let mtu = mode.mtu;
        let config = format!(
            "[network]\nmtu = {mtu}\n[outbound]\nallow-host-loopback = true\n\
             [policy]\npreset = \"allow-all\"\n\
             [[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n"
        );
        let daemon = match &callgrind {
            Some(cg) => {
                let out = format!("--callgrind-out-file={}", cg.out.display());
                Daemon::start_wrapped(Some(&config), &["valgrind", "--tool=callgrind", "-q", &out])
            }
            None => Daemon::start_with(None, Some(&config), &[]),
        };
        for (name, direction) in [
            ("guest -> host", Direction::Upload),
            ("host -> guest", Direction::Download),
        ] {
            if !wanted(name) {
                continue;
            }
            if let Some(cg) = &callgrind {
                cg.take(daemon.pid());
                stream(&daemon, mode, direction, bytes);
                let per_gib = cg.take(daemon.pid()) as f64 / gib;
                println!(
                    "{:<9} {name:<16} {:>36.0} M instructions/GiB",
                    mode.to_string(),
                    per_gib / 1e6
                );
                continue;
            }
            let (secs, cpu) = stream(&daemon, mode, direction, bytes);
            let gbit = bytes as f64 * 8.0 / 1e9;
            println!(
                "{:<9} {name:<16} {:>9.2} {:>14.2} {:>10.3}",
                mode.to_string(),
                gbit / secs,
                gbit / cpu.max(0.01),
                cpu / gib
            );
        }
        if callgrind.is_some() {
            continue;
        }
        let port = echo_server();
        if wanted("rr") {
            let times = rr(&daemon, mode, port);
            println!(
                "{:<9} {:<16} p50 {:.1} µs, p99 {:.1} µs over {} round trips",
                mode.to_string(),
                "rr (1 byte)",
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                times.len()
            );
        }
        if wanted("connections") {
            let (n, secs, cpu) = crr(&daemon, mode, port);
            println!(
                "{:<9} {:<16} {:.0}/s, daemon CPU {:.0} µs per connection",
                mode.to_string(),
                "connections",
                n as f64 / secs,
                cpu / n as f64 * 1e6
            );
        }
    }
    if wanted("idle flows") && callgrind.is_none() {
        let n: usize = std::env::var("STREAM_FLOWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        let mode = Mode {
            mtu: 65520,
            tso: false,
        };
        let config = format!(
            "[network]\nmtu = 65520\n[outbound]\nallow-host-loopback = true\n\
             [tcp]\nmax-connections = {}\n\
             [[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n",
            n + 64
        );
        let daemon = Daemon::start_with(None, Some(&config), &[]);
        let (first, churned, held, rest) = idle_flows(&daemon, mode, n);
        println!(
            "{:<9} {:<16} {n} held: {first:.1} KiB/flow first, {churned:.1} KiB/flow after churn; RSS {rest:.1} MiB at rest, {held:.1} MiB held",
            mode.to_string(),
            "idle flows",
        );
    }
}
