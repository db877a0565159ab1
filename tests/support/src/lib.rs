//! Test support shared by vhost-gateway's integration tests and
//! benchmarks: scratch directories, network namespaces, the daemon under
//! test as a child process, test servers ([`tls`] for TLS peers), a VMM the
//! test plays ([`vmm`]) and real-guest boots ([`guest`]).
//!
//! Everything here talks only to loopback or to hosts inside namespaces the
//! test creates itself.
#![allow(clippy::unwrap_used)] // test harness: a failed set-up step should panic

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod guest;
pub mod libvirt;
pub mod tls;
pub mod vmm;

/// The project's root directory (where `Cargo.toml` and `tests/` are).
pub fn project_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The daemon binary under test: `$VG_BIN`, else the `vhost-gateway` that
/// cargo built beside the running test or bench executable (they live in
/// `target/<profile>/deps/`, the binary in `target/<profile>/`).
pub fn daemon_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("VG_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let bin = profile_dir.join("vhost-gateway");
    assert!(
        bin.exists(),
        "{} is missing: run the tests through cargo, which builds it",
        bin.display()
    );
    bin
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn unique(tag: &str) -> String {
    format!(
        "vgt-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon's network namespace and its "internet": a second namespace
/// joined to it by a veth pair, which holds the test hosts (documentation
/// addresses on its loopback, [`Netns::add_addr`]) and the servers tests
/// start there ([`Netns::net_enter`], [`Netns::net_command`]). The daemon's
/// namespace holds only its uplink address ([`UPLINK_V4`], [`UPLINK_V6`]),
/// its loopback and default routes to the internet side, as a host does.
/// Both are deleted on drop. Nothing here routes off the machine.
pub struct Netns {
    /// The daemon's namespace.
    pub name: String,
    /// The internet side's namespace.
    pub net: String,
}

/// The daemon namespace's own address on its uplink.
pub const UPLINK_V4: &str = "198.51.100.2";
/// The daemon namespace's own IPv6 address on its uplink.
pub const UPLINK_V6: &str = "2001:db8:ff::2";
/// The internet side's end of the uplink (the daemon's default router).
pub const ROUTER_V4: &str = "198.51.100.1";
/// The internet side's IPv6 end of the uplink.
pub const ROUTER_V6: &str = "2001:db8:ff::1";

/// The resolver a daemon in a test namespace finds in /etc/resolv.conf
/// (`ip netns exec` mounts /etc/netns/NAME/resolv.conf over it): a test
/// address, so the daemon's default upstream is never the host's real
/// resolver. Tests that resolve run dnsmasq there.
pub const TEST_RESOLVER: &str = "192.0.2.53";

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        let net = format!("{name}-i");
        let etc = PathBuf::from("/etc/netns").join(&name);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("resolv.conf"),
            format!("nameserver {TEST_RESOLVER}\n"),
        )
        .unwrap();
        for ns in [&name, &net] {
            run(Command::new("ip").args(["netns", "add", ns]));
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        }
        let this = Self { name, net };
        let (d, i) = (this.name.as_str(), this.net.as_str());
        let steps: &[&[&str]] = &[
            &[
                "-n", d, "link", "add", "uplink", "type", "veth", "peer", "name", "downlink",
                "netns", i,
            ],
            &["-n", d, "addr", "add", "198.51.100.2/24", "dev", "uplink"],
            &[
                "-n",
                d,
                "addr",
                "add",
                "2001:db8:ff::2/64",
                "dev",
                "uplink",
                "nodad",
            ],
            &["-n", d, "link", "set", "uplink", "up"],
            &["-n", d, "route", "add", "default", "via", ROUTER_V4],
            &["-n", d, "-6", "route", "add", "default", "via", ROUTER_V6],
            &["-n", i, "addr", "add", "198.51.100.1/24", "dev", "downlink"],
            &[
                "-n",
                i,
                "addr",
                "add",
                "2001:db8:ff::1/64",
                "dev",
                "downlink",
                "nodad",
            ],
            &["-n", i, "link", "set", "downlink", "up"],
        ];
        for args in steps {
            run(Command::new("ip").args(*args));
        }
        this
    }

    /// A command run inside the daemon's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// A command run on the internet side (test servers).
    pub fn net_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.net]).arg(program);
        c
    }

    /// Adds a test host's address (CIDR) on the internet side.
    pub fn add_addr(&self, cidr: &str) {
        let mut args = vec!["-n", &self.net, "addr", "add", cidr, "dev", "lo"];
        if cidr.contains(':') {
            args.push("nodad");
        }
        run(Command::new("ip").args(args));
    }

    /// Lets unprivileged ping sockets be used in the daemon's namespace
    /// (its ICMP relay needs them; the default range allows no group).
    pub fn allow_ping_sockets(&self) {
        run(self
            .command("sysctl")
            .args(["-qw", "net.ipv4.ping_group_range=0 2147483647"]));
    }

    /// Runs `f` on a thread inside the daemon's namespace and returns its
    /// result: sockets it creates belong to the namespace and can be used
    /// anywhere.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        enter_ns(&self.name, f)
    }

    /// Runs `f` on a thread on the internet side (test servers' sockets).
    pub fn net_enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        enter_ns(&self.net, f)
    }
}

fn enter_ns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a namespace fd we just opened; it only changes
        // this thread's network namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    })
    .join()
    .unwrap()
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.name, &self.net] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        // Test scratch: a leftover directory harms nothing.
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
    }
}

/// Polls `done` every 10 ms until it holds (true) or `limit` passes.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The daemon under test, running inside a namespace; its stderr is kept.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    /// Its control API's socket.
    pub control: PathBuf,
    log: Arc<Mutex<String>>,
    dir: Option<TempDir>,
}

impl Daemon {
    /// Starts the daemon inside `ns` with `config` (None: embedded
    /// defaults) and waits for its socket.
    pub fn start(ns: &Netns, config: Option<&str>) -> Self {
        Self::start_with(Some(ns), config, &[])
    }

    /// Starts the daemon, inside `ns` or not, with extra command-line
    /// arguments (a `--log-level` of their own replaces the default debug).
    pub fn start_args(ns: Option<&Netns>, config: Option<&str>, args: &[&str]) -> Self {
        Self::spawn(ns, config, &[], args)
    }

    /// Starts the daemon inside `ns` as the unprivileged user `nobody`
    /// (uid and gid 65534, no supplementary groups), as the systemd unit
    /// runs it under a user of its own.
    pub fn start_unprivileged(ns: &Netns, config: Option<&str>) -> Self {
        Self::spawn_wrapped(
            Some(ns),
            config,
            &[],
            &[],
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ],
        )
    }

    /// Starts the daemon as systemd socket activation does
    /// (`systemd-socket-activate`, which binds the vhost and control
    /// sockets, names them `vhost` and `control` in LISTEN_FDNAMES, and
    /// execs the daemon with them at the first connection to either).
    pub fn start_activated(ns: Option<&Netns>, config: Option<&str>) -> Self {
        let dir = TempDir::new("daemon");
        let (socket, control) = (dir.0.join("vhost.sock"), dir.0.join("control.sock"));
        let wrapper = [
            "systemd-socket-activate",
            "-l",
            socket.to_str().unwrap(),
            "--fdname=vhost",
            "-l",
            control.to_str().unwrap(),
            "--fdname=control",
        ];
        Self::spawn_in(dir, ns, config, &[], &[], &wrapper)
    }

    /// Starts the daemon, in a namespace or not, with extra environment.
    pub fn start_with(ns: Option<&Netns>, config: Option<&str>, env: &[(&str, &str)]) -> Self {
        Self::spawn(ns, config, env, &[])
    }

    /// Starts the daemon (outside namespaces) under `wrapper`, a command
    /// that runs the program given after its own arguments (valgrind).
    pub fn start_wrapped(config: Option<&str>, wrapper: &[&str]) -> Self {
        Self::spawn_wrapped(None, config, &[], &[], wrapper)
    }

    fn spawn(
        ns: Option<&Netns>,
        config: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        Self::spawn_wrapped(ns, config, env, args, &[])
    }

    fn spawn_wrapped(
        ns: Option<&Netns>,
        config: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
        wrapper: &[&str],
    ) -> Self {
        Self::spawn_in(TempDir::new("daemon"), ns, config, env, args, wrapper)
    }

    /// Kills the daemon (SIGKILL, as a crash would end it) and starts a
    /// new one with `config` on the same socket path, which the new one
    /// finds stale and replaces.
    pub fn kill_and_restart(&mut self, ns: &Netns, config: Option<&str>) {
        if let Some(mut child) = self.child.take() {
            // Already gone is as good as killed.
            let _ = child.kill();
            // The new daemon must find the old one's socket stale.
            child.wait().expect("the killed daemon is reaped");
        }
        let dir = self.dir.take().expect("daemon directory");
        *self = Self::spawn_in(dir, Some(ns), config, &[], &[], &[]);
    }

    fn spawn_in(
        dir: TempDir,
        ns: Option<&Netns>,
        config: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
        wrapper: &[&str],
    ) -> Self {
        let socket = dir.0.join("vhost.sock");
        let control = dir.0.join("control.sock");
        let bin = daemon_bin();
        if !wrapper.is_empty() {
            // The wrapper may drop to another user: it must create the socket.
            std::os::unix::fs::chown(&dir.0, Some(65534), Some(65534)).unwrap();
        }
        let mut cmd = match (ns, wrapper.split_first()) {
            (Some(ns), Some((program, rest))) => {
                let mut cmd = ns.command(program);
                cmd.args(rest).arg(bin);
                cmd
            }
            (Some(ns), None) => ns.command(bin),
            (None, Some((program, rest))) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(bin);
                cmd
            }
            (None, None) => Command::new(bin),
        };
        cmd.arg("--socket-path").arg(&socket);
        cmd.arg("--control-socket").arg(&control);
        if !args.contains(&"--log-level") {
            cmd.args(["--log-level", "debug"]);
        }
        cmd.args(args).envs(env.iter().copied());
        if let Some(text) = config {
            let path = dir.0.join("config.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        collect(child.stderr.take().unwrap(), log.clone(), None);
        // Under valgrind start-up alone takes seconds.
        let patience = if wrapper.is_empty() { 10 } else { 120 };
        let deadline = Instant::now() + Duration::from_secs(patience);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "daemon did not listen: {}",
                log.lock().unwrap()
            );
            if let Ok(Some(status)) = child.try_wait() {
                panic!("daemon exited with {status}: {}", log.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child: Some(child),
            socket,
            control,
            log,
            dir: Some(dir),
        }
    }

    /// Runs `vhost-gateway ctl` against this daemon: whether it succeeded,
    /// and its stdout (with stderr after it).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(daemon_bin())
            .arg("ctl")
            .arg("--control-socket")
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// `ctl --json ARGS`, parsed; panics when it fails.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (ok, text) = self.ctl(&all);
        assert!(ok, "ctl {args:?}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {text}"))
    }

    /// Sends `request` as it is over the control socket; the whole answer.
    pub fn control_raw(&self, request: &[u8]) -> String {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut answer = Vec::new();
        // The server closes after a `Connection: close` request; a read
        // error (a reset after a refused body) ends the answer too.
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Replaces the daemon's config file (started with one) with `text`,
    /// as an operator edits it before a reload: a new file renamed onto
    /// the old one.
    pub fn rewrite_config(&self, text: &str) {
        let dir = &self.dir.as_ref().expect("daemon directory").0;
        let new = dir.join("config.toml.new");
        std::fs::write(&new, text).unwrap();
        std::fs::rename(&new, dir.join("config.toml")).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends a signal (`kill -SIG`); `ip netns exec` execs the daemon, so
    /// the child's pid is the daemon's.
    pub fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("daemon running");
        run(Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]));
    }

    /// Waits until the log contains `text`.
    pub fn wait_log(&self, text: &str, limit: Duration) -> bool {
        wait_until(limit, || self.log().contains(text))
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().expect("daemon running");
        wait_timeout(&mut child, Duration::from_secs(10)).expect("daemon exits on SIGTERM")
    }
}

impl Drop for Daemon {
    /// Stops the daemon the way systemd does (SIGTERM, then SIGKILL after
    /// a grace period), so its clean exit runs in every test and no
    /// handler directory is left behind in /tmp.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: a signal to our own child, which has not been
                // reaped yet (so the pid is still its own).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            // Past the grace period it is killed; a failure then means it
            // is gone already.
            wait_timeout(&mut child, Duration::from_secs(3));
        }
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Appends everything `stream` prints to `sink`; signals `marker` sightings.
pub fn collect(
    stream: impl Read + Send + 'static,
    sink: Arc<Mutex<String>>,
    marker: Option<(String, std::sync::mpsc::Sender<()>)>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).into_owned();
            if let Some((m, tx)) = &marker
                && text.contains(m.as_str())
            {
                let _ = tx.send(());
            }
            sink.lock().unwrap().push_str(&text);
            line.clear();
        }
    });
}

/// A child process killed on drop (test servers).
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves every connection on `listener` by echoing it back.
pub fn serve_tcp_echo(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::Write;
                let mut stream = stream;
                let mut buf = vec![0u8; 65536];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
}

/// Echoes every datagram on `socket`.
pub fn serve_udp_echo(socket: std::net::UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
}

/// Writes each connection's bytes to `dir/upload-N` and reports the path
/// once the peer has finished sending.
pub fn serve_sink(
    listener: std::net::TcpListener,
    dir: PathBuf,
) -> std::sync::mpsc::Receiver<PathBuf> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().flatten().enumerate() {
            let path = dir.join(format!("upload-{i}"));
            let mut file = std::fs::File::create(&path).unwrap();
            let mut stream = stream;
            let _ = std::io::copy(&mut stream, &mut file);
            drop(stream);
            let _ = tx.send(path);
        }
    });
    rx
}

/// `sha256sum` of a file.
pub fn sha256_file(path: &std::path::Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// What a recording server received: the bytes of each connection, in
/// order of arrival. The ground truth of tests that must show a request
/// never reached its server.
#[derive(Clone, Default)]
pub struct Recorder(pub Arc<Mutex<Vec<Vec<u8>>>>);

impl Recorder {
    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Everything received, all connections joined.
    pub fn all(&self) -> String {
        let conns = self.0.lock().unwrap();
        conns
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

/// Serves `listener`, recording every byte; answers each request head
/// (a blank line) with a small HTTP 200, keeping the connection open.
pub fn serve_recorder(listener: std::net::TcpListener) -> Recorder {
    let recorder = Recorder::default();
    let shared = recorder.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let index = {
                let mut conns = shared.0.lock().unwrap();
                conns.push(Vec::new());
                conns.len() - 1
            };
            let shared = shared.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let mut stream = stream;
                let mut buf = vec![0u8; 65536];
                let mut answered = 0;
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let heads = {
                        let mut conns = shared.0.lock().unwrap();
                        let conn = &mut conns[index];
                        conn.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(conn);
                        text.matches("\r\n\r\n").count() + text.matches("\n\n").count()
                    };
                    while answered < heads {
                        answered += 1;
                        let body = "recorded\n";
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    recorder
}

/// Lowercase hex of `bytes`, for the guest probe's `tcp-script`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
