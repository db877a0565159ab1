//! Start-up and the connection loop: bind the socket (replacing a stale one,
//! refusing a live one), tell systemd we are ready, then serve one VMM at a
//! time, each with a fresh backend, until SIGTERM/SIGINT.
//!
//! Runs on the main thread. Per VMM connection it starts vhost-user-backend's
//! request handler on a private socket and relays the VMM to it through
//! [`crate::vhost::compat`].

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{Config, SeccompMode, Source};
use crate::confine::{self, Landlocked};
use crate::engine::Shared;
use crate::metrics::{Counter, Metrics};
use crate::vhost::compat;
use crate::wiring::reload::Reloader;
use crate::wiring::{Prepared, Wiring};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something already listens on the socket path.
    #[error("{0} is in use by a running process (another vhost-gateway?)")]
    SocketInUse(PathBuf),
    /// The path exists and is not a socket; we do not delete it.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Binding the listening socket failed.
    #[error("cannot listen on {path}")]
    BindListener {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The sockets systemd passed cannot be used.
    #[error("socket activation")]
    Activation(#[source] crate::activation::Error),
    /// The `--metrics-listen` address could not be bound.
    #[error("cannot listen for metrics")]
    MetricsListen(#[source] io::Error),
    /// The watchdog thread could not start.
    #[error("cannot start the watchdog thread")]
    Supervisor(#[source] io::Error),
    /// Signal handler installation failed.
    #[error("cannot install signal handlers")]
    Signals(#[source] io::Error),
    /// The daemon's parts could not be built.
    #[error(transparent)]
    Build(#[from] crate::wiring::Error),
    /// The private directory for handler sockets could not be made.
    #[error("cannot create the private handler directory")]
    HandlerDir(#[source] io::Error),
    /// The daemon could not confine itself.
    #[error(transparent)]
    Confine(confine::Error),
    /// Accepting a VMM connection failed.
    #[error("cannot accept a VMM connection")]
    Accept(#[source] io::Error),
    /// The control API could not start.
    #[error("cannot serve the control socket")]
    Control(#[source] io::Error),
    /// The capture asked for at start could not begin.
    #[error("--pcap")]
    Pcap(#[source] crate::pcap::Error),
}

/// Where captures go: the config's directory, else that of `--pcap`.
fn pcap_dir(config: &Config, pcap: Option<&Path>) -> Option<PathBuf> {
    config.pcap.dir.clone().or_else(|| {
        pcap.map(|file| match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        })
    })
}

/// Errors of one VMM connection; logged, then the next VMM is accepted.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("cannot set up the device")]
    Backend(#[from] crate::vhost::Error),
    #[error("cannot start the vhost-user handler: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot create the private handler socket")]
    PrivateSocket(#[source] io::Error),
    #[error("vhost-user session failed: {0}")]
    Session(vhost_user_backend::Error),
}

/// Sets `no_new_privs` on the main thread before any other thread exists,
/// so every thread inherits it: nothing the daemon ever runs can gain
/// privileges through setuid/setgid or file capabilities. The systemd unit
/// sets it too; this holds wherever the daemon is started.
fn set_no_new_privs() {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot set no_new_privs");
    }
}

/// Pins glibc's mmap threshold at its default, 128 KiB, which also turns
/// off its dynamic raising. Every flow allocates its socket buffers (by
/// default 1 MiB each way) zeroed, and only the pages that data touches
/// should cost memory. Left dynamic, the threshold rises to 1 MiB the first
/// time such a buffer is freed; from then on buffers come from the heap,
/// where `calloc` must clear them and freed ones come back dirty: 10,000
/// idle flows measured 39 KiB each on first use and 1.3 MiB each once
/// flows had closed and new ones opened (`cargo bench --bench stream`, the
/// idle flows row).
fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    {
        const THRESHOLD: libc::c_int = 128 * 1024;
        // SAFETY: mallopt only sets allocator parameters; it is called
        // before any thread but main exists.
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) } != 1 {
            tracing::warn!("mallopt(M_MMAP_THRESHOLD) failed: idle flows may cost more memory");
        }
    }
}

/// What the operator may use besides the vhost socket.
#[derive(Default)]
pub struct Operations {
    /// The control API's socket (`--control-socket`).
    pub control_socket: Option<PathBuf>,
    /// Changes the log filter at run time.
    pub log_level: Option<crate::control::LogLevel>,
    /// Capture from the start into this file (`--pcap`).
    pub pcap: Option<PathBuf>,
    /// Where the config was read from: a reload reads it again.
    pub source: crate::config::Source,
    /// Also serve `GET /metrics` on this TCP address.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Runs the daemon until a signal ends it.
///
/// The order is what confinement needs: everything that needs a
/// capability or a file the daemon will not touch again happens on the
/// main thread first (published ports, the CA, the vhost socket); then
/// capabilities go and landlock closes the filesystem, before any thread
/// exists, so every thread inherits both; then the threads start; then the
/// seccomp filter goes on all of them at once.
pub fn run(socket_path: &Path, config: Config, operations: Operations) -> Result<(), Error> {
    set_no_new_privs();
    fix_mmap_threshold();
    let needed = crate::proxy::fdlimit::needed(&config);
    match crate::proxy::fdlimit::raise(needed) {
        Ok(limit) if limit.soft < needed => tracing::warn!(
            soft = limit.soft,
            hard = limit.hard,
            needed,
            "the descriptor limit is below what the flow limits need: raise LimitNOFILE"
        ),
        Ok(limit) => tracing::debug!(soft = limit.soft, needed, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the descriptor limit"),
    }
    // Before anything opens a descriptor: the passed ones start at 3.
    let activated = crate::activation::take().map_err(Error::Activation)?;
    let pcap_dir = pcap_dir(&config, operations.pcap.as_deref());
    let prepared = Wiring::prepare(config)?;
    let (listener, id) = listen(socket_path, activated.vhost)?;
    let control = match (activated.control, operations.control_socket.as_deref()) {
        (Some(passed), path) => Ok(Some((passed, None, path))),
        (None, Some(path)) => bind(path).map(|(l, id)| Some((l, Some(id), Some(path)))),
        (None, None) => Ok(None),
    };
    let control = match control {
        Ok(control) => control,
        Err(e) => {
            remove_if_ours(socket_path, id);
            return Err(e);
        }
    };
    let handlers = match HandlerDir::create() {
        Ok(dir) => dir,
        Err(e) => {
            remove_if_ours(socket_path, id);
            if let Some((_, control_id, Some(path))) = &control {
                remove_if_ours(path, *control_id);
            }
            return Err(Error::HandlerDir(e));
        }
    };
    let (control_listener, control_socket) = match control {
        Some((listener, id, path)) => (Some(listener), path.map(|p| (p.to_owned(), id))),
        None => (None, None),
    };
    let cleanup = Cleanup {
        socket: socket_path.to_owned(),
        id,
        control: control_socket,
        handlers,
        pcap_dir: pcap_dir.clone(),
    };
    // Bound before the capabilities go (a port below 1024 needs one).
    let metrics_listener = match operations.metrics_listen.map(std::net::TcpListener::bind) {
        Some(Err(e)) => {
            cleanup.run();
            return Err(Error::MetricsListen(e));
        }
        bound => bound.and_then(Result::ok),
    };
    let wiring = match confine_and_start(prepared, &cleanup, &operations.source) {
        Ok(wiring) => wiring,
        Err(e) => {
            cleanup.run();
            return Err(e);
        }
    };
    let metrics = wiring.metrics().clone();
    if let Some(file) = &operations.pcap {
        let limits = &wiring.config().pcap;
        let started = wiring
            .shared()
            .tap
            .start(file, limits.max_bytes, limits.files);
        if let Err(e) = started {
            cleanup.run();
            return Err(Error::Pcap(e));
        }
    }
    let reloader = Arc::new(Reloader::new(
        wiring.shared(),
        operations.source,
        wiring.config().clone(),
    ));
    let state = Arc::new(crate::control::api::State::new(
        wiring.shared(),
        operations.log_level,
        pcap_dir,
        Some(reloader.clone()),
    ));
    use crate::control::server::{Endpoint, spawn as serve_api};
    if let Some(listener) = control_listener {
        serve_api(wiring.handle(), Endpoint::Control(listener), state.clone())
            .map_err(Error::Control)?;
    }
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr().map_err(Error::Control)?;
        serve_api(wiring.handle(), Endpoint::Metrics(listener), state).map_err(Error::Control)?;
        tracing::info!(%addr, "serving /metrics over TCP");
    }
    let handlers = cleanup.handlers.path.clone();
    let reload = (reloader, wiring.handle().clone());
    spawn_signal_thread(cleanup, metrics.clone(), reload)?;
    if let Err(e) = confine::seccomp(seccomp_mode(wiring.config())) {
        return Err(Error::Confine(e));
    }
    tracing::info!(socket = %socket_path.display(), config = %wiring.config().summary(), "listening");
    notify_systemd("READY=1");
    spawn_supervisor(wiring.shared(), wiring.handle().clone())?;
    loop {
        let vmm = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Out of descriptors is passing (flows close): wait, serve on.
            Err(e) if crate::proxy::fdlimit::note(&e, "accepting a VMM", Some(&metrics)) => {
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(Error::Accept(e)),
        };
        metrics.inc(Counter::vmm_connections);
        tracing::info!("VMM connected");
        match serve(vmm, &wiring, &handlers) {
            Ok(()) => {
                tracing::info!(counters = %metrics.snapshot(), "VMM disconnected; guest state reset")
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "VMM session ended with an error; guest state reset")
            }
        }
    }
}

fn seccomp_mode(config: &Config) -> confine::Seccomp {
    match config.confinement.seccomp {
        SeccompMode::Enforce => confine::Seccomp::Enforce,
        SeccompMode::Log => confine::Seccomp::Log,
        SeccompMode::Off => confine::Seccomp::Off,
    }
}

/// Drops capabilities and applies landlock on the main thread (no other
/// thread exists yet), then starts the threads, which inherit both.
fn confine_and_start(
    prepared: Prepared,
    cleanup: &Cleanup,
    source: &Source,
) -> Result<Wiring, Error> {
    confine::drop_capabilities().map_err(Error::Confine)?;
    let config = prepared.config();
    if config.confinement.landlock {
        let paths = landlock_paths(config, cleanup, source);
        match confine::landlock(&paths).map_err(Error::Confine)? {
            Landlocked::Fully => tracing::info!("landlock: filesystem confined"),
            Landlocked::Partly => {
                tracing::info!(
                    "landlock: filesystem confined as far as this kernel's landlock goes"
                )
            }
            Landlocked::Not => tracing::warn!(
                "this kernel has no landlock (Linux >= 5.13 with lsm=landlock): \
                 the filesystem is not confined"
            ),
        }
    }
    Ok(prepared.start()?)
}

/// What the daemon still touches once started: its socket's directory (to
/// remove the socket at exit), its handler directory, and the host's
/// resolver list when the DNS upstreams come from it.
fn landlock_paths(config: &Config, cleanup: &Cleanup, source: &Source) -> confine::Paths {
    let mut paths = confine::Paths::default();
    // A reload reads the config and its block lists again. Their
    // directories, not the files: an editor saves by renaming a new file
    // onto the old one, which a rule on the old file would not cover.
    let files = source.path.iter().chain(&config.dns.block_files);
    for file in files {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !paths.read.iter().any(|p| p == dir) {
            paths.read.push(dir.to_owned());
        }
    }
    let sockets = std::iter::once(&cleanup.socket).chain(cleanup.control.iter().map(|(p, _)| p));
    for socket in sockets {
        if let Some(dir) = socket.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            paths.remove_in.push(dir.to_owned());
        }
    }
    paths.sockets_in.push(cleanup.handlers.path.clone());
    paths.write_in.extend(cleanup.pcap_dir.iter().cloned());
    if let Some(parent) = cleanup.handlers.path.parent() {
        paths.remove_dirs_in.push(parent.to_owned());
    }
    if config.dns.upstreams.is_empty() {
        let resolv = PathBuf::from(crate::dns::resolv::RESOLV_CONF);
        // A resolver manager replaces the file by renaming a new one onto
        // it (systemd-resolved, resolvconf): a rule on the file would hold
        // the old one only, so its real directory is readable too, unless
        // that is /etc itself.
        if let Ok(real) = std::fs::canonicalize(&resolv)
            && let Some(dir) = real.parent()
            && dir != Path::new("/etc")
        {
            paths.read.push(dir.to_owned());
        }
        paths.read.push(resolv);
    }
    paths
}

/// What the daemon removes when it ends: its sockets (if still its own)
/// and its handler directory.
struct Cleanup {
    socket: PathBuf,
    /// None: the socket was passed by systemd, whose socket unit owns it.
    id: Option<FileId>,
    control: Option<(PathBuf, Option<FileId>)>,
    handlers: HandlerDir,
    /// Where captures are written (landlock leaves it writable).
    pcap_dir: Option<PathBuf>,
}

impl Cleanup {
    fn run(&self) {
        remove_if_ours(&self.socket, self.id);
        if let Some((path, id)) = &self.control {
            remove_if_ours(path, *id);
        }
        self.handlers.remove();
    }
}

/// A private 0700 directory where each VMM connection's handler socket
/// pair meets (see [`private_pair`]); made once at start, so landlock can
/// allow sockets there and nowhere else.
struct HandlerDir {
    path: PathBuf,
}

impl HandlerDir {
    fn create() -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("vhost-gateway-{}", std::process::id()));
        // A leftover from a crashed daemon with our pid: ours now.
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(Self { path })
    }

    fn remove(&self) {
        if let Err(e) = std::fs::remove_dir(&self.path) {
            tracing::debug!(dir = %self.path.display(), error = %e, "cannot remove the handler directory");
        }
    }
}

/// Which file a path named when we made it: (device, inode).
type FileId = (u64, u64);

/// The vhost socket: the one systemd passed (`passed`; its socket unit
/// owns the path, so it is never removed) or one bound at `path`.
fn listen(
    path: &Path,
    passed: Option<UnixListener>,
) -> Result<(UnixListener, Option<FileId>), Error> {
    match passed {
        Some(listener) => {
            tracing::info!(socket = %path.display(), "serving the socket systemd passed");
            Ok((listener, None))
        }
        None => bind(path).map(|(listener, id)| (listener, Some(id))),
    }
}

/// Binds the socket path. An existing socket nobody answers on is stale (a
/// crashed daemon) and is replaced; one that answers is refused.
///
/// The socket is bound and listening under a temporary name beside the
/// path and then renamed onto it, so the path never names a socket that is
/// not yet listening (a VMM started right after would be refused) and a
/// stale one is replaced in one step.
fn bind(path: &Path) -> Result<(UnixListener, FileId), Error> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::SocketInUse(path.to_owned()));
        }
        tracing::info!(socket = %path.display(), "replacing stale socket");
    }
    let failed = |source| Error::BindListener {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let temporary = path.with_file_name(format!(
        ".{}.{}.binding",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let bound = UnixListener::bind(&temporary).and_then(|listener| {
        std::fs::rename(&temporary, path)?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok((listener, (meta.dev(), meta.ino())))
    });
    if bound.is_err() {
        // Nothing to undo when the bind itself failed; a failed rename
        // leaves the temporary name, which nobody else would remove.
        let _ = std::fs::remove_file(&temporary);
    }
    bound.map_err(failed)
}

/// Removes the socket file at exit, unless the path has since been given
/// to another socket (a second daemon that found ours stale).
fn remove_if_ours(path: &Path, id: Option<FileId>) {
    let Some(id) = id else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    let ours = std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id);
    if ours && let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(socket = %path.display(), error = %e, "cannot remove the socket");
    }
}

/// Serves one VMM connection to its end.
fn serve(vmm: UnixStream, wiring: &Wiring, handlers: &Path) -> Result<(), ConnectionError> {
    let backend = Arc::new(wiring.backend()?);
    let mut daemon = VhostUserDaemon::new(
        "vhost-gateway".to_owned(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(ConnectionError::Daemon)?;
    // One handler per worker thread, in queue-pair order.
    for (pair, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        backend.register(pair, handler)?;
    }
    let (mut inner, to_handler) = private_pair(handlers).map_err(ConnectionError::PrivateSocket)?;
    daemon.start(&mut inner).map_err(ConnectionError::Daemon)?;
    let relay = std::thread::Builder::new()
        .name("vhost-relay".into())
        .spawn(move || compat::relay(vmm, to_handler))
        .map_err(ConnectionError::PrivateSocket)?;
    let result = match daemon.wait() {
        // The VMM going away mid-message is how every session ends.
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected
            | vhost::vhost_user::Error::PartialMessage
            | vhost::vhost_user::Error::SocketBroken(_),
        )) => Ok(()),
        other => other.map_err(ConnectionError::Session),
    };
    match relay.join() {
        Ok(Err(e)) => tracing::debug!(error = %e, "relay ended"),
        Err(_) => tracing::warn!("relay thread panicked"),
        Ok(Ok(())) => {}
    }
    // Dropping the daemon stops and joins the vring worker threads.
    drop(daemon);
    result
}

/// A connected pair: the backend handler's listener (already holding our
/// connection in its backlog) and our end. vhost-user-backend only accepts
/// from a listener, so the pair meets on a socket in the daemon's private
/// 0700 directory, removed at once; nobody else can reach it.
fn private_pair(dir: &Path) -> io::Result<(Listener, UnixStream)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!(
        "handler-{}.sock",
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = UnixListener::bind(&path).and_then(|listener| {
        let ours = UnixStream::connect(&path)?;
        Ok((Listener::from(listener), ours))
    });
    // The name is not needed once connected; a failed removal leaves a
    // dead socket in our private directory, removed with it at exit.
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::debug!(path = %path.display(), error = %e, "cannot remove a handler socket");
    }
    result
}

/// SIGTERM/SIGINT remove the socket and exit; SIGUSR1 logs the counters;
/// SIGHUP reloads the config (the reloader logs how it went).
fn spawn_signal_thread(
    cleanup: Cleanup,
    metrics: Arc<Metrics>,
    (reloader, runtime): (Arc<Reloader>, tokio::runtime::Handle),
) -> Result<(), Error> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])
        .map_err(Error::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGUSR1 {
                    tracing::info!(counters = %metrics.snapshot(), "counters");
                    continue;
                }
                if signal == SIGHUP {
                    notify_systemd("RELOADING=1");
                    // Logged and counted by the reloader; nobody else
                    // waits for the outcome of a signal.
                    let _ = runtime.block_on(reloader.reload());
                    notify_systemd("READY=1");
                    continue;
                }
                tracing::info!(signal, counters = %metrics.snapshot(), "exiting");
                cleanup.run();
                std::process::exit(0);
            }
        })
        .map_err(Error::Signals)?;
    Ok(())
}

/// How often the status line is refreshed without a watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The watchdog period systemd asks for (`WatchdogSec=`: WATCHDOG_USEC, for
/// this process when WATCHDOG_PID says so).
fn watchdog_period() -> Option<Duration> {
    let for_us = std::env::var("WATCHDOG_PID").map_or(true, |pid| {
        pid.parse::<u32>().ok() == Some(std::process::id())
    });
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (for_us && usec > 0).then(|| Duration::from_micros(usec))
}

/// Under systemd (NOTIFY_SOCKET): a thread that keeps `STATUS=` current
/// (VMM attached or not, live flows) and, with `WatchdogSec=`, sends
/// `WATCHDOG=1` twice per period — but only while every queue pair's
/// engine is between passes or in one that began less than half a period
/// ago, and the host runtime runs a task within a quarter period. A worker
/// stuck in a pass, or a wedged runtime, stops the pings, and systemd
/// restarts the daemon (QEMU's `reconnect=` brings the guest back).
fn spawn_supervisor(shared: Arc<Shared>, runtime: tokio::runtime::Handle) -> Result<(), Error> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    let watchdog = watchdog_period();
    let every = watchdog.map_or(STATUS_EVERY, |p| (p / 2).min(STATUS_EVERY));
    let stuck_after = watchdog.map_or(STATUS_EVERY, |p| p / 2);
    if let Some(period) = watchdog {
        tracing::info!(period_ms = period.as_millis(), "systemd watchdog on");
    }
    std::thread::Builder::new()
        .name("vg-watchdog".into())
        .spawn(move || {
            let mut last = String::new();
            loop {
                std::thread::sleep(every);
                let stuck = shared
                    .board
                    .guest()
                    .and_then(|(guest, _)| guest.stuck(stuck_after));
                let runs = runtime.block_on(async {
                    tokio::time::timeout(every / 2, tokio::spawn(async {})).await
                });
                match (stuck, runs) {
                    (None, Ok(Ok(()))) => {
                        if watchdog.is_some() {
                            notify_systemd("WATCHDOG=1");
                        }
                    }
                    (Some((pair, took)), _) => tracing::error!(
                        pair,
                        stuck_ms = took.as_millis(),
                        "a queue pair's engine is stuck in one pass: no watchdog ping"
                    ),
                    (None, _) => {
                        tracing::error!("the host runtime runs no task: no watchdog ping")
                    }
                }
                let line = runtime.block_on(async {
                    tokio::time::timeout(every / 2, status_line(&shared)).await
                });
                // A report that takes longer (a pair whose queues do not run
                // yet) leaves the last line standing.
                if let Ok(line) = line
                    && line != last
                {
                    notify_systemd(&format!("STATUS={line}"));
                    last = line;
                }
            }
        })
        .map_err(Error::Supervisor)?;
    Ok(())
}

/// The status line systemd shows.
async fn status_line(shared: &Shared) -> String {
    let report = crate::control::api::report(shared, 0).await;
    let Some((status, _, _)) = report.guest else {
        return "waiting for a VMM".to_owned();
    };
    let g = &report.gauges;
    let tcp = g.tcp_connecting + g.tcp_established + g.tcp_closing;
    format!(
        "VMM attached, {} queue pair(s), lease {}; {tcp} TCP flow(s), {} UDP and {} ICMP session(s)",
        status.queue_pairs,
        if status.mac.is_some() { "held" } else { "none" },
        g.udp_sessions,
        g.icmp_sessions,
    )
}

/// sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub use crate::errors::chain as error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_live_one_refused_file_kept() {
        let dir = std::env::temp_dir().join(format!("vg-bind-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let (live, first) = bind(&path).unwrap();
        // Listening the moment the path exists.
        UnixStream::connect(&path).unwrap();
        assert!(matches!(bind(&path), Err(Error::SocketInUse(_))));
        drop(live);
        // The file is still there, nobody listens: stale.
        assert!(path.exists());
        let (_again, second) = bind(&path).unwrap();
        assert_ne!(first, second);
        // The first daemon's exit leaves the second one's socket alone.
        remove_if_ours(&path, Some(first));
        UnixStream::connect(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"], "no temporary name is left");
        remove_if_ours(&path, Some(second));
        assert!(!path.exists());
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(Error::NotASocket(_))));
        assert!(file.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn private_pair_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("vg-pair-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (_l, _s) = private_pair(&dir).unwrap();
        let (_l2, _s2) = private_pair(&dir).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir(&dir).unwrap();
    }
}
