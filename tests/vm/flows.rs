//! Guest flows to the outside: test hosts on documentation addresses inside
//! the test's namespace (its loopback holds 192.0.2.10 and 2001:db8::10), the
//! daemon in the same namespace, the guest under QEMU.

use std::net::{TcpListener, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use kit::guest::{Daemon, Guest, GuestOpts, Netns, boot, line_after};
use kit::{Server, TempDir, serve_sink, serve_tcp_echo, serve_udp_echo, sha256_file};

const HOST_V4: &str = "192.0.2.10";
const HOST_V6: &str = "2001:db8::10";

/// A namespace with the two test hosts, an HTTP server on both (port 80),
/// TCP and UDP echo on port 7, a sink on port 5001, and dnsmasq on the
/// test resolver (192.0.2.53, the daemon's default upstream there)
/// answering example.test with 192.0.2.10.
pub(crate) struct World {
    pub(crate) ns: Netns,
    pub(crate) www: TempDir,
    _httpd: Vec<Server>,
    _dns: Server,
    uploads: std::sync::mpsc::Receiver<std::path::PathBuf>,
}

impl World {
    pub(crate) fn new(tag: &str) -> Self {
        let ns = Netns::new(tag);
        ns.add_addr("192.0.2.10/32");
        ns.add_addr("2001:db8::10/128");
        ns.allow_ping_sockets();
        let www = TempDir::new("www");
        std::fs::write(www.0.join("small"), "hello from the namespace\n").unwrap();
        let httpd = [
            "192.0.2.10:80",
            "[2001:db8::10]:80",
            "127.0.0.1:8080",
            "[::1]:8080",
        ]
        .iter()
        .map(|addr| {
            // Loopback servers stand on the daemon's host; the rest on the
            // internet side.
            let mut command = if addr.starts_with("127.") || addr.starts_with("[::1]") {
                ns.command("busybox")
            } else {
                ns.net_command("busybox")
            };
            Server(
                command
                    .args(["httpd", "-f", "-p", addr, "-h"])
                    .arg(&www.0)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
        for addr in ["192.0.2.10:7", "[2001:db8::10]:7"] {
            let addr = addr.to_owned();
            let (tcp, udp) = ns.net_enter(move || {
                (
                    TcpListener::bind(&addr).unwrap(),
                    UdpSocket::bind(&addr).unwrap(),
                )
            });
            serve_tcp_echo(tcp);
            serve_udp_echo(udp);
        }
        let sink = ns.net_enter(|| TcpListener::bind("192.0.2.10:5001").unwrap());
        let uploads = serve_sink(sink, www.0.clone());
        let dns = crate::dns::dnsmasq_with(&ns, &["--address=/example.test/192.0.2.10"]);
        // busybox httpd binds in the background; give it a moment.
        std::thread::sleep(Duration::from_millis(200));
        Self {
            ns,
            www,
            _httpd: httpd,
            _dns: dns,
            uploads,
        }
    }
}

fn connect_result<'a>(console: &'a str, addr: &str) -> (&'a str, u64) {
    let line = line_after(console, &format!("VG-CONNECT {addr} ")).unwrap_or("result=none ms=0");
    let mut result = "none";
    let mut ms = 0;
    for kv in line.split_whitespace() {
        if let Some(r) = kv.strip_prefix("result=") {
            result = r;
        }
        if let Some(m) = kv.strip_prefix("ms=") {
            ms = m.parse().unwrap_or(0);
        }
    }
    (result, ms)
}

#[test]
fn tcp_udp_and_icmp_reach_namespace_hosts() {
    let world = World::new("flows");
    let daemon = Daemon::start(&world.ns, None);
    let script = format!(
        r#"
dhcp
wait_v6
echo VG-GET4; wget -q -O - http://{HOST_V4}/small
echo VG-GET6; wget -q -O - http://[{HOST_V6}]/small
vg-probe tcp-connect {HOST_V4}:81
vg-probe tcp-connect [{HOST_V6}]:81
vg-probe tcp-connect 198.19.0.1:8080
vg-probe udp-echo {HOST_V4}:7 20 1000
vg-probe udp-echo [{HOST_V6}]:7 20 1400
echo VG-PING-HOST; ping -c 3 -W 2 {HOST_V4}
echo VG-PING-HOST6; ping6 -c 3 -W 2 {HOST_V6}
echo VG-PING-NONE; ping -c 2 -W 1 192.0.2.99
vg-probe tcp-many {HOST_V4}:7 200
"#
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    let after = |m: &str| console.split(m).nth(1).unwrap_or("").to_owned();
    assert!(
        after("VG-GET4").contains("hello from the namespace"),
        "{console}"
    );
    assert!(
        after("VG-GET6").contains("hello from the namespace"),
        "{console}"
    );
    // A closed port fails fast with a reset, on both families.
    for addr in [format!("{HOST_V4}:81"), format!("[{HOST_V6}]:81")] {
        let (result, ms) = connect_result(&console, &addr);
        assert_eq!(result, "refused", "{addr}: {console}");
        assert!(ms < 1000, "{addr} took {ms} ms");
    }
    // The host loopback behind the gateway address is off by default.
    assert_eq!(connect_result(&console, "198.19.0.1:8080").0, "refused");
    let udp: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("VG-UDP sent="))
        .collect();
    assert_eq!(udp.len(), 2, "{console}");
    for line in udp {
        assert!(line.contains("sent=20 ok=20"), "{line}");
    }
    assert_eq!(
        kit::guest::ping_result(&console, "VG-PING-HOST"),
        Some((3, 3)),
        "{console}"
    );
    assert_eq!(
        kit::guest::ping_result(&console, "VG-PING-HOST6"),
        Some((3, 3)),
        "{console}"
    );
    assert_eq!(
        kit::guest::ping_result(&console, "VG-PING-NONE"),
        Some((2, 0)),
        "{console}"
    );
    assert!(
        console.contains("VG-MANY ok=200 refused=0 failed=0"),
        "{console}"
    );
}

/// A guest at MTU 1500 sends 4 and 8 KiB UDP datagrams and 6 KB pings, over
/// IPv4 and IPv6: its fragments are reassembled, decided, relayed, and the
/// echoes of the same size come back to it in fragments.
#[test]
fn fragmented_datagrams_go_both_ways_at_mtu_1500() {
    let world = World::new("frag");
    let daemon = Daemon::start(&world.ns, Some("[network]\nmtu = 1500\n"));
    let script = format!(
        r#"
dhcp
wait_v6
echo VG-MTU $(cat /sys/class/net/eth0/mtu)
vg-probe udp-echo {HOST_V4}:7 10 4000
vg-probe udp-echo {HOST_V4}:7 10 8000
vg-probe udp-echo [{HOST_V6}]:7 10 4000
vg-probe udp-echo [{HOST_V6}]:7 10 8000
echo VG-PING-BIG; ping -c 3 -W 2 -s 6000 {HOST_V4}
echo VG-PING-BIG6; ping6 -c 3 -W 2 -s 6000 {HOST_V6}
"#
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    assert!(console.contains("VG-MTU 1500"), "{console}");
    let udp: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("VG-UDP sent="))
        .collect();
    assert_eq!(udp, ["VG-UDP sent=10 ok=10"; 4], "{console}");
    for marker in ["VG-PING-BIG", "VG-PING-BIG6"] {
        assert_eq!(
            kit::guest::ping_result(&console, marker),
            Some((3, 3)),
            "{marker}: {console}"
        );
    }
    let counters = daemon_counters(&daemon);
    // 40 datagrams and 6 pings each way, at least 3 fragments each.
    assert!(
        counter(&counters, "fragments_reassembled") >= 46,
        "{counters}"
    );
    assert!(
        counter(&counters, "fragments_to_guest") >= 3 * 46,
        "{counters}"
    );
    for drop in [
        "drop_fragment_bad",
        "drop_fragment_overlap",
        "drop_fragment_evicted",
        "drop_pending_full",
    ] {
        assert_eq!(counter(&counters, drop), 0, "{drop}: {counters}");
    }
}

/// Real QEMU killed (SIGKILL) five times in a row while its guest moves
/// data both ways: each next guest is served, and the daemon's descriptors
/// and threads are back to their baseline afterwards. (The e2e suite does
/// the same 100 times with the harness VMM, plus 1,000 clean sessions.)
#[test]
fn qemu_killed_mid_transfer_leaves_the_daemon_as_it_was() {
    let world = World::new("kills");
    let big = world.www.0.join("big");
    let made = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=200", "status=none"])
        .arg(format!("of={}", big.display()))
        .status()
        .unwrap();
    assert!(made.success());
    let daemon = Daemon::start(&world.ns, None);
    let pid = daemon.pid();
    let resets = |d: &Daemon| d.log().matches("guest state reset").count();
    // The first guest builds what lives for the daemon's whole life.
    let check = format!("dhcp\necho VG-GET; wget -q -O - http://{HOST_V4}/small\n");
    let console = boot(&GuestOpts::new(&daemon.socket, &check));
    assert!(console.contains("hello from the namespace"), "{console}");
    assert!(daemon.wait_log("guest state reset", Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(300));
    let baseline = (open_fds(pid), task_statuses(pid).len());
    let moving = format!(
        r#"
dhcp
dd if=/dev/zero of=/tmp/blob bs=1M count=100 2>/dev/null
wget -q -O /dev/null http://{HOST_V4}/big &
vg-probe tcp-send-file {HOST_V4}:5001 /tmp/blob &
sleep 1
echo VG-MOVING
sleep 600
"#
    );
    for round in 1..=5 {
        let guest = Guest::spawn(&GuestOpts::new(&daemon.socket, &moving), "VG-MOVING");
        assert!(
            guest.wait_marker(Duration::from_secs(120)),
            "round {round}: {}",
            guest.console()
        );
        guest.kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while resets(&daemon) < round + 1 {
            assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        (open_fds(pid), task_statuses(pid).len()),
        baseline,
        "descriptors and threads after 5 kills (baseline first)"
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &check));
    assert!(console.contains("hello from the namespace"), "{console}");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A host peer on `addr` that, per connection, sends `send` bytes or reads
/// `read` bytes and then resets the connection (SO_LINGER 0).
fn resetting_peer(ns: &Netns, addr: &'static str, send: usize, read: usize) {
    use std::io::{Read, Write};
    let listener = ns.net_enter(move || TcpListener::bind(addr).unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let chunk = vec![0x42u8; 64 * 1024];
                let mut sent = 0;
                while sent < send && conn.write_all(&chunk).is_ok() {
                    sent += chunk.len();
                }
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0;
                while got < read {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let socket = socket2::Socket::from(conn);
                // A failed linger leaves a FIN instead: the test would see it.
                socket.set_linger(Some(Duration::ZERO)).ok();
                drop(socket);
            });
        }
    });
}

/// Host peers that reset a connection, while sending to the guest and
/// while the guest sends: the guest sees a reset (never a clean end that
/// would pass a truncated transfer off as complete), promptly, and the
/// daemon goes on serving.
#[test]
fn a_peer_that_resets_is_a_reset_for_the_guest() {
    let world = World::new("resets");
    resetting_peer(&world.ns, "192.0.2.10:5002", 1 << 20, 0);
    resetting_peer(&world.ns, "192.0.2.10:5003", 0, 1 << 20);
    let daemon = Daemon::start(&world.ns, None);
    let script = format!(
        r#"
dhcp
vg-probe tcp-read {HOST_V4}:5002
vg-probe tcp-write {HOST_V4}:5003 64
vg-probe tcp-read {HOST_V4}:5002
echo VG-GET; wget -q -O - http://{HOST_V4}/small
"#
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    let reads: Vec<&str> = console.lines().filter(|l| l.contains("VG-READ")).collect();
    assert_eq!(reads.len(), 2, "{console}");
    for line in reads {
        assert!(
            line.contains("end=reset") && ms_of(line) < 5000,
            "{line}\n{console}"
        );
    }
    let write = line_after(&console, "VG-WRITE").unwrap_or("");
    assert!(
        (write.contains("end=reset") || write.contains("end=broken-pipe")) && ms_of(write) < 5000,
        "{write}\n{console}"
    );
    assert!(
        console
            .split("VG-GET")
            .nth(1)
            .is_some_and(|s| s.contains("hello from the namespace")),
        "{console}"
    );
}

/// `mib` MiB of the xorshift64* stream from `seed`, as `vg-probe
/// tcp-send-prng` sends it, written to `path`.
fn write_prng(path: &std::path::Path, mib: usize, seed: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut state = seed;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        file.write_all(&chunk).unwrap();
    }
    file.flush().unwrap();
}

/// A gibibyte each way through a real guest at MTU 1500 with segmentation
/// offload (the guest's default with this device), sha256-checked: the
/// download hashed in the guest as it arrives, the upload generated in the
/// guest and compared with the same stream made on the host.
#[test]
fn a_gibibyte_each_way_with_checksums() {
    const MIB: usize = 1024;
    const SEED: u64 = 0x5eed_1234_abcd_ef01;
    let world = World::new("gib");
    let big = world.www.0.join("big");
    write_prng(&big, MIB, SEED);
    let sum = sha256_file(&big);
    let daemon = Daemon::start(&world.ns, Some("[network]\nmtu = 1500\n"));
    let script = format!(
        r#"
dhcp
echo VG-DOWN $(wget -q -O - http://{HOST_V4}/big | sha256sum)
vg-probe tcp-send-prng {HOST_V4}:5001 {MIB} {SEED}
"#
    );
    let mut opts = GuestOpts::new(&daemon.socket, &script);
    opts.timeout = Duration::from_secs(900);
    let console = boot(&opts);
    let down = line_after(&console, "VG-DOWN").unwrap_or("");
    assert!(
        down.starts_with(&sum),
        "download: {down} vs {sum}\n{console}"
    );
    assert!(
        console.contains(&format!("VG-SENT-PRNG bytes={}", MIB << 20)),
        "{console}"
    );
    let received = world.uploads.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(sha256_file(&received), sum, "upload corrupted");
    eprintln!("{}", line_after(&console, "VG-SENT-PRNG").unwrap_or(""));
}

/// (thread name, /proc status) of every thread of `pid`.
fn task_statuses(pid: u32) -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .map(|status| {
            let name = status
                .lines()
                .find_map(|l| l.strip_prefix("Name:\t"))
                .unwrap_or("")
                .to_owned();
            (name, status)
        })
        .collect()
}

/// The daemon as the systemd unit runs it, unprivileged, serves a guest
/// with every thread confined: the per-VMM threads (vring worker, relay)
/// are read while the guest is up. Traffic of every kind runs under the
/// filter and landlock, and nothing is denied.
#[test]
fn an_unprivileged_confined_daemon_serves_the_guest() {
    let world = World::new("confined");
    let daemon = Daemon::start_unprivileged(&world.ns, None);
    let pid = daemon.pid();
    let watcher = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            let tasks = task_statuses(pid);
            let has = |name: &str| tasks.iter().any(|(n, _)| n == name);
            if (has("vring_worker") && has("vhost-relay")) || std::time::Instant::now() > deadline {
                return tasks;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let script = format!(
        r#"
dhcp
wait_v6
echo VG-GET4; wget -q -O - http://{HOST_V4}/small
echo VG-GET6; wget -q -O - http://[{HOST_V6}]/small
vg-probe udp-echo {HOST_V4}:7 20 1000
echo VG-PING-HOST; ping -c 3 -W 2 {HOST_V4}
"#
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    let tasks = watcher.join().unwrap();
    let names: Vec<&str> = tasks.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"vring_worker"), "{names:?}");
    assert!(names.contains(&"vhost-relay"), "{names:?}");
    for (name, status) in &tasks {
        for line in [
            "Uid:\t65534\t65534\t65534\t65534",
            "NoNewPrivs:\t1",
            "Seccomp:\t2",
            "CapPrm:\t0000000000000000",
            "CapEff:\t0000000000000000",
        ] {
            assert!(status.contains(line), "{name} lacks {line}: {status}");
        }
    }
    let after = |m: &str| console.split(m).nth(1).unwrap_or("").to_owned();
    assert!(
        after("VG-GET4").contains("hello from the namespace"),
        "{console}"
    );
    assert!(
        after("VG-GET6").contains("hello from the namespace"),
        "{console}"
    );
    assert!(console.contains("sent=20 ok=20"), "{console}");
    assert_eq!(
        kit::guest::ping_result(&console, "VG-PING-HOST"),
        Some((3, 3)),
        "{console}"
    );
    let log = daemon.log();
    assert!(log.contains("landlock: filesystem confined"), "{log}");
    assert!(!log.contains("seccomp"), "{log}");
}

/// 100 MiB each way through a guest with `config` and `pairs` queue pairs
/// (and as many vCPUs), sha256-checked at both ends; returns the daemon's
/// counters afterwards. With more than one pair the two transfers run at
/// once, each pinned to its own vCPU, so each uses its own queue (Linux
/// maps CPU i to transmit queue i).
fn hundred_mib_each_way(tag: &str, config: Option<&str>, pairs: u16) -> String {
    let world = World::new(tag);
    let big = world.www.0.join("big");
    let out = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=100", "status=none"])
        .arg(format!("of={}", big.display()))
        .status()
        .unwrap();
    assert!(out.success());
    let download_sum = sha256_file(&big);
    let daemon = Daemon::start(&world.ns, config);
    let (on_cpu0, on_cpu1, then) = if pairs > 1 {
        ("taskset 1 ", "taskset 2 ", "&")
    } else {
        ("", "", ";")
    };
    let script = format!(
        r#"
dhcp
echo VG-MTU $(cat /sys/class/net/eth0/mtu)
echo VG-QUEUES $(ls /sys/class/net/eth0/queues)
dd if=/dev/urandom of=/tmp/blob bs=1M count=100 2>/dev/null
echo VG-UPSUM $(sha256sum /tmp/blob)
{on_cpu1}wget -q -O - http://{HOST_V4}/big | sha256sum > /tmp/down {then}
{on_cpu0}vg-probe tcp-send-file {HOST_V4}:5001 /tmp/blob
wait
echo VG-DOWN $(cat /tmp/down)
"#
    );
    let mut opts = GuestOpts::new(&daemon.socket, &script);
    opts.timeout = Duration::from_secs(300);
    opts.cpus = pairs;
    opts.queue_pairs = pairs;
    let console = boot(&opts);
    let down = line_after(&console, "VG-DOWN").unwrap_or("");
    assert!(
        down.starts_with(&download_sum),
        "download corrupted: {down} vs {download_sum}\n{console}"
    );
    let up = line_after(&console, "VG-UPSUM")
        .unwrap_or("none")
        .split_whitespace()
        .next()
        .unwrap_or("none")
        .to_owned();
    assert!(console.contains("VG-SENT bytes=104857600"), "{console}");
    let received = world.uploads.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(sha256_file(&received), up, "upload corrupted");
    let log = daemon_counters(&daemon);
    format!(
        "{log}\nguest queues {}\nguest MTU {}",
        line_after(&console, "VG-QUEUES").unwrap_or("?"),
        line_after(&console, "VG-MTU").unwrap_or("?")
    )
}

/// Two queue pairs, two vCPUs, a transfer each way at once: both pairs
/// carry frames and every byte arrives intact.
#[test]
fn hundred_mib_each_way_over_two_queue_pairs() {
    let log = hundred_mib_each_way("mq", Some("[network]\nqueue-pairs = 2\n"), 2);
    assert!(log.contains("guest queues rx-0 rx-1 tx-0 tx-1"), "{log}");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("counters"))
        .unwrap_or("");
    let by_pair: Vec<u64> = line
        .split(|c: char| c.is_whitespace() || c == '"')
        .find_map(|f| f.strip_prefix("frames_by_pair="))
        .unwrap_or("")
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        by_pair.len() == 2 && by_pair.iter().all(|&n| n > 100),
        "frames by pair {by_pair:?}\n{log}"
    );
}

/// With two pairs, a connection's SYN may arrive on either; each pair's
/// stack must reach the guest at once, without first having to learn its
/// link address (the guest's answer to a pair's ARP or NDP query may go out
/// on the other pair's queue). Every connect, from either vCPU and either
/// family, completes well before the guest's first SYN retransmission.
#[test]
fn every_queue_pair_answers_the_first_syn() {
    let world = World::new("mqsyn");
    let daemon = Daemon::start(&world.ns, Some("[network]\nqueue-pairs = 2\n"));
    let script = format!(
        r#"
dhcp
wait_v6
for i in 1 2 3; do
  for cpu in 1 2; do
    taskset $cpu vg-probe tcp-connect {HOST_V4}:80
    taskset $cpu vg-probe tcp-connect [2001:db8::10]:80
  done
done
"#
    );
    let mut opts = GuestOpts::new(&daemon.socket, &script);
    opts.cpus = 2;
    opts.queue_pairs = 2;
    let console = boot(&opts);
    let connects: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("VG-CONNECT"))
        .collect();
    assert_eq!(connects.len(), 12, "{console}");
    for line in connects {
        assert!(
            connected_within(line, 900),
            "{line}\n{console}\n{}",
            daemon.log()
        );
    }
}

/// Whether a `VG-CONNECT` line says connected in under `ms` milliseconds.
/// The probes a flood test runs during and right after its flood: a DNS
/// lookup through the gateway and a new connection.
const USABLE: &str =
    "vg-probe dns-a 198.19.0.1:53 example.test\nvg-probe tcp-connect 192.0.2.10:80";

/// The `ms=` of a probe line.
pub fn ms_of(line: &str) -> u64 {
    line.split("ms=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The console after `marker` up to the next line starting `VG-` that is
/// not a probe's result, and whether the lookup and the connection in it
/// each succeeded within a second.
pub fn usable_after(console: &str, marker: &str) -> Result<(), String> {
    let section = console.split(marker).nth(1).unwrap_or("");
    let dns = section
        .lines()
        .find(|l| l.starts_with("VG-DNSA example.test"))
        .unwrap_or("no lookup");
    let connect = section
        .lines()
        .find(|l| l.starts_with("VG-CONNECT"))
        .unwrap_or("no connection");
    if dns.contains("rcode=0 answers=1") && ms_of(dns) < 1000 && connected_within(connect, 1000) {
        Ok(())
    } else {
        Err(format!("{marker}: {dns} / {connect}"))
    }
}

fn connected_within(line: &str, ms: u64) -> bool {
    let took: u64 = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    line.contains("result=connected") && took < ms
}

/// A counter's value in the last counters line of `log` (absent: zero).
fn counter(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("counters"))
        .unwrap_or("");
    line.split(|c: char| c.is_whitespace() || c == '"')
        .find_map(|field| field.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn hundred_mib_each_way_with_checksums() {
    hundred_mib_each_way("bulk", None, 1);
}

/// At MTU 1500 the guest hands over 64 KiB segments and gets them back to
/// cut itself (TSO both ways), and every byte still arrives intact.
#[test]
fn hundred_mib_each_way_at_mtu_1500_with_segmentation_offload() {
    let log = hundred_mib_each_way("tso", Some("[network]\nmtu = 1500\n"), 1);
    assert!(log.ends_with("guest MTU 1500"), "{log}");
    let from = counter(&log, "segments_from_guest");
    let to = counter(&log, "segments_to_guest");
    assert!(
        from > 100 && to > 100,
        "segments {from} from, {to} to the guest\n{log}"
    );
    assert_eq!(counter(&log, "drop_bad_offload"), 0, "{log}");
}

/// With the offload off the same transfer works frame by frame.
#[test]
fn hundred_mib_each_way_at_mtu_1500_without_segmentation_offload() {
    let log = hundred_mib_each_way(
        "notso",
        Some("[network]\nmtu = 1500\nsegmentation-offload = false\n"),
        1,
    );
    assert!(log.ends_with("guest MTU 1500"), "{log}");
    assert_eq!(counter(&log, "segments_from_guest"), 0, "{log}");
    assert_eq!(counter(&log, "segments_to_guest"), 0, "{log}");
}

#[test]
fn host_loopback_through_the_gateway_when_allowed() {
    let world = World::new("loop");
    // The mapping switch and a policy rule that lets the guest use it (the
    // default preset denies the host).
    let daemon = Daemon::start(
        &world.ns,
        Some(
            "[outbound]\nallow-host-loopback = true\n[[policy.rule]]\naction = \"allow\"\ndestination = \"group:host\"\n",
        ),
    );
    let script = r#"
dhcp
wait_v6
echo VG-GET4; wget -q -O - http://198.19.0.1:8080/small
echo VG-GET6; wget -q -O - http://[fd76:6761:7465::1]:8080/small
"#;
    let console = boot(&GuestOpts::new(&daemon.socket, script));
    let after = |m: &str| console.split(m).nth(1).unwrap_or("").to_owned();
    assert!(
        after("VG-GET4").contains("hello from the namespace"),
        "{console}"
    );
    assert!(
        after("VG-GET6").contains("hello from the namespace"),
        "{console}"
    );
}

#[test]
fn published_ports_reach_guest_services() {
    let ns = Netns::new("publish");
    let config = r#"
[[publish]]
protocol = "tcp"
host = "127.0.0.1:18080"
guest-port = 8080

[[publish]]
protocol = "udp"
host = "127.0.0.1:18081"
guest-port = 8081

[[publish]]
protocol = "tcp"
host = "127.0.0.1:18082"
guest-port = 9999
"#;
    let daemon = Daemon::start(&ns, Some(config));
    let script = r#"
dhcp
vg-probe tcp-echo-server 8080 &
vg-probe udp-echo-server 8081 &
sleep 1
echo VG-SERVING
sleep 600
"#;
    let guest = Guest::spawn(&GuestOpts::new(&daemon.socket, script), "VG-SERVING");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    let (tcp_ok, udp_ok, unbound_ms) = ns.enter(|| {
        use std::io::{Read, Write};
        // 20 concurrent connections, each echoing its own line.
        let handles: Vec<_> = (0..20)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut s = std::net::TcpStream::connect("127.0.0.1:18080").ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
                    let msg = format!("published {i}\n");
                    s.write_all(msg.as_bytes()).ok()?;
                    let mut back = vec![0u8; msg.len()];
                    s.read_exact(&mut back).ok()?;
                    (back == msg.as_bytes()).then_some(())
                })
            })
            .collect();
        let tcp_ok = handles
            .into_iter()
            .map(|h| h.join())
            .filter(|r| matches!(r, Ok(Some(()))))
            .count();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut udp_ok = 0;
        let mut buf = [0u8; 100];
        for i in 0..10u8 {
            udp.send_to(&[i; 50], "127.0.0.1:18081").unwrap();
            if let Ok((n, _)) = udp.recv_from(&mut buf)
                && buf[..n] == [i; 50]
            {
                udp_ok += 1;
            }
        }
        // Nobody listens on guest port 9999: the host side must close fast.
        let t = std::time::Instant::now();
        let mut s = std::net::TcpStream::connect("127.0.0.1:18082").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.read(&mut buf);
        (tcp_ok, udp_ok, t.elapsed().as_millis())
    });
    guest.kill();
    assert_eq!(tcp_ok, 20, "{}", daemon.log());
    assert_eq!(udp_ok, 10);
    assert!(
        unbound_ms < 2000,
        "unbound guest port took {unbound_ms} ms to close"
    );
}

#[test]
fn connection_flood_is_capped_and_earlier_flows_keep_working() {
    let world = World::new("flood");
    let daemon = Daemon::start(&world.ns, Some("[tcp]\nmax-connections = 40\n"));
    let script = format!(
        r#"
dhcp
vg-probe tcp-many {HOST_V4}:7 100
echo VG-AFTER; wget -q -O - http://{HOST_V4}/small
"#
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    let line = line_after(&console, "VG-MANY").unwrap_or("");
    let field = |k: &str| -> u32 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u32::MAX)
    };
    assert_eq!(field("ok="), 40, "{console}");
    assert_eq!(field("refused="), 60, "{console}");
    assert!(
        console
            .split("VG-AFTER")
            .nth(1)
            .unwrap_or("")
            .contains("hello from the namespace")
    );
    let rss_kib = status_kib(daemon.pid(), "VmRSS:");
    assert!(
        rss_kib < 128 * 1024,
        "daemon RSS {rss_kib} KiB after the flood"
    );
    // Each refused client got one RST: a SYN over the limit is refused at
    // once, or first takes the place of a flow still dialling, whose
    // client is refused when it retransmits.
    let log = daemon_counters(&daemon);
    assert_eq!(counter(&log, "tcp_over_limit"), 60, "{log}");
}

/// 50,000 SYNs from a real guest to distinct silent destinations (the
/// uplink's subnet, where nothing answers ARP, so each dial waits): a
/// normal connection made during the flood and one made right after it
/// both connect within a second, the daemon's memory stays bounded and its
/// descriptors are back near their baseline, and the counters show the
/// dialling flows that gave way.
#[test]
fn syn_flood_from_the_guest_leaves_the_sandbox_usable() {
    let world = World::new("synfl");
    let daemon = Daemon::start(&world.ns, None);
    let pid = daemon.pid();
    let script = format!(
        r#"
dhcp
vg-probe syn-flood eth0 02:76:67:00:00:01 198.19.0.2 50000 > /tmp/flood &
sleep 2
echo VG-DURING
{USABLE}
wait
cat /tmp/flood
echo VG-RIGHT-AFTER
{USABLE}
"#
    );
    let mut opts = GuestOpts::new(&daemon.socket, &script);
    opts.timeout = Duration::from_secs(300);
    let console = boot(&opts);
    let sent: u32 = line_after(&console, "VG-FLOOD")
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("sent=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert_eq!(sent, 50_000, "{console}");
    for marker in ["VG-DURING", "VG-RIGHT-AFTER"] {
        let usable = usable_after(&console, marker);
        assert!(
            usable.is_ok(),
            "{usable:?}\n{console}\n{}\n{}",
            daemon
                .log()
                .lines()
                .filter(|l| l.contains("192.0.2.10"))
                .collect::<Vec<_>>()
                .join("\n"),
            daemon_counters(&daemon)
                .lines()
                .rev()
                .find(|l| l.contains("counters"))
                .unwrap_or("")
        );
    }
    let peak = status_kib(pid, "VmHWM:");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let log = daemon_counters(&daemon);
    eprintln!(
        "syn flood: peak RSS {peak} KiB, {fds} fds after, {}, dial evictions {}, over limit {}, probes: {:?}",
        line_after(&console, "VG-FLOOD").unwrap_or(""),
        counter(&log, "tcp_dial_evicted"),
        counter(&log, "tcp_over_limit"),
        probes(&console)
    );
    assert!(peak < 128 * 1024, "peak RSS {peak} KiB");
    assert!(fds < 1024 + 128, "{fds} descriptors after the flood");
    assert!(counter(&log, "tcp_dial_evicted") > 0, "{log}");
}

/// A flood of one-datagram UDP sessions (5,000 destinations against the
/// default 512 sessions) does not lock the guest's next session out for
/// the idle timeout: a second later, sessions that went quiet give way and
/// a UDP exchange with a real host works.
#[test]
fn udp_session_flood_leaves_new_sessions_possible() {
    let world = World::new("udpfl");
    let daemon = Daemon::start(&world.ns, None);
    let script = format!(
        r#"
dhcp
vg-probe udp-flood 50000 > /tmp/flood &
sleep 0.3
echo VG-DURING
{USABLE}
vg-probe udp-echo {HOST_V4}:7 3 100
wait
cat /tmp/flood
echo VG-RIGHT-AFTER
{USABLE}
vg-probe udp-echo {HOST_V4}:7 3 100
"#
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    assert!(console.contains("VG-UDPFLOOD sent=50000"), "{console}");
    for marker in ["VG-DURING", "VG-RIGHT-AFTER"] {
        let usable = usable_after(&console, marker);
        assert!(usable.is_ok(), "{usable:?}\n{console}");
    }
    // A new session each time, each echo back within its second.
    let echoes: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("VG-UDP sent="))
        .collect();
    assert_eq!(echoes, ["VG-UDP sent=3 ok=3"; 2], "{console}");
    session_flood_figures(&daemon, &console, "udp", "VG-UDPFLOOD");
}

/// Prints a session flood's figures (peak RSS, the flood's own line,
/// sessions evicted and datagrams over the limit, the probes' times) and
/// checks that memory stayed bounded and the flood's sessions gave way.
fn session_flood_figures(daemon: &Daemon, console: &str, proto: &str, marker: &str) {
    let log = daemon_counters(daemon);
    let peak = status_kib(daemon.pid(), "VmHWM:");
    let evicted = counter(&log, &format!("{proto}_session_evicted"));
    eprintln!(
        "{proto} flood: peak RSS {peak} KiB, {}, evicted {evicted}, over limit {}, probes: {:?}",
        line_after(console, marker).unwrap_or(""),
        counter(&log, &format!("{proto}_over_limit")),
        probes(console)
    );
    assert!(peak < 128 * 1024, "peak RSS {peak} KiB");
    assert!(evicted > 0, "{log}");
}

#[test]
fn echo_session_flood_leaves_new_pings_possible() {
    let world = World::new("icmpfl");
    let daemon = Daemon::start(&world.ns, None);
    let script = format!(
        r#"
dhcp
vg-probe icmp-flood 20000 > /tmp/flood &
sleep 0.3
echo VG-DURING
{USABLE}
echo VG-PING-DURING; ping -c 3 -W 1 {HOST_V4}
wait
cat /tmp/flood
echo VG-RIGHT-AFTER
{USABLE}
echo VG-PING-AFTER; ping -c 3 -W 1 {HOST_V4}
"#
    );
    let console = boot(&GuestOpts::new(&daemon.socket, &script));
    assert!(console.contains("VG-ICMPFLOOD sent=20000"), "{console}");
    for marker in ["VG-DURING", "VG-RIGHT-AFTER"] {
        let usable = usable_after(&console, marker);
        assert!(usable.is_ok(), "{usable:?}\n{console}");
    }
    // A ping's session is new: while every slot is younger than the
    // eviction age its first request may find no room (sessions in use
    // keep theirs); the next ones get through.
    let during = kit::guest::ping_result(&console, "VG-PING-DURING");
    assert!(
        during.is_some_and(|(_, got)| got >= 2),
        "{during:?}: {console}"
    );
    assert_eq!(
        kit::guest::ping_result(&console, "VG-PING-AFTER"),
        Some((3, 3)),
        "{console}"
    );
    eprintln!("pings during the flood (sent, answered): {during:?}");
    session_flood_figures(&daemon, &console, "icmp", "VG-ICMPFLOOD");
}

fn daemon_counters(daemon: &Daemon) -> String {
    daemon.signal("USR1");
    daemon.wait_log("counters", Duration::from_secs(5));
    daemon.log()
}

#[test]
fn silent_destination_is_reset_after_the_connect_timeout() {
    let world = World::new("silent");
    // 203.0.113.0/24 sits behind a veth whose other end (in the same
    // namespace) answers nothing: SYNs go out and die, as to a dead host.
    for args in [
        vec!["link", "add", "vt0", "type", "veth", "peer", "name", "vt1"],
        vec!["addr", "add", "203.0.113.1/24", "dev", "vt0"],
        vec!["link", "set", "vt0", "up"],
        vec!["link", "set", "vt1", "up"],
    ] {
        let ok = Command::new("ip")
            .args(["-n", &world.ns.name])
            .args(&args)
            .status()
            .unwrap();
        assert!(ok.success(), "ip {args:?}");
    }
    let daemon = Daemon::start(&world.ns, Some("[tcp]\nconnect-timeout-ms = 1500\n"));
    let script = r#"
dhcp
vg-probe tcp-connect 203.0.113.5:80
"#;
    let console = boot(&GuestOpts::new(&daemon.socket, script));
    let (result, ms) = connect_result(&console, "203.0.113.5:80");
    // The guest's SYN was held, unanswered, for the timeout; then a RST.
    assert_eq!(result, "refused", "{console}");
    // The kernel would give up on the silent neighbor only after ~3 s.
    assert!(
        (1300..2600).contains(&ms),
        "reset after {ms} ms, expected ~1500"
    );
}

/// A `/proc/PID/status` figure in KiB (`VmRSS:`, `VmHWM:`).
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The usability probes' lines (lookups and connects, with their times).
fn probes(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| l.starts_with("VG-CONNECT") || l.starts_with("VG-DNSA"))
        .collect()
}

#[test]
fn a_stalled_reader_throttles_the_sender_without_memory_growth() {
    let ns = Netns::new("backpressure");
    ns.add_addr("192.0.2.10/32");
    // Upload sink that reads nothing for 8 s, then everything.
    let sink = ns.net_enter(|| TcpListener::bind("192.0.2.10:5002").unwrap());
    let upload = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, _) = sink.accept().unwrap();
        std::thread::sleep(Duration::from_secs(8));
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    // Download source that pushes 100 MiB at a guest that reads nothing
    // for 8 s.
    let source = ns.net_enter(|| TcpListener::bind("192.0.2.10:5003").unwrap());
    let download = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = source.accept().unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..100 {
            if s.write_all(&chunk).is_err() {
                return false;
            }
        }
        true
    });
    let daemon = Daemon::start(&ns, None);
    let script = r#"
dhcp
dd if=/dev/zero of=/tmp/blob bs=1M count=100 2>/dev/null
vg-probe tcp-hold 192.0.2.10:5003 8 &
vg-probe tcp-send-file 192.0.2.10:5002 /tmp/blob
wait
"#;
    let mut opts = GuestOpts::new(&daemon.socket, script);
    opts.timeout = Duration::from_secs(240);
    let guest = Guest::spawn(&opts, "VG-HOLDING");
    assert!(
        guest.wait_marker(Duration::from_secs(120)),
        "{}",
        guest.console()
    );
    // Both transfers are stalled by their readers now; the daemon must hold
    // at most its per-flow buffers, not the 200 MiB the senders have.
    std::thread::sleep(Duration::from_secs(5));
    let stalled_rss = status_kib(daemon.pid(), "VmRSS:");
    eprintln!("daemon RSS with both readers stalled: {stalled_rss} KiB");
    let console = guest.finish();
    assert!(
        stalled_rss < 48 * 1024,
        "daemon RSS {stalled_rss} KiB while both readers stalled"
    );
    assert!(console.contains("VG-SENT bytes=104857600"), "{console}");
    assert!(console.contains("VG-HELD bytes=104857600"), "{console}");
    assert_eq!(upload.join().unwrap(), 104_857_600);
    assert!(download.join().unwrap());
}
