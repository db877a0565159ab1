//! Real-guest harness: QEMU booting Debian's kernel with a busybox initramfs
//! against the daemon's socket, the daemon running inside a network namespace
//! the test creates. The test's script is appended to the initramfs as a
//! second cpio archive and run by the guest's /init; its serial console is the
//! test's evidence. Nothing here sends traffic off the machine: the daemon's
//! namespace reaches only the test's own "internet" namespace behind a veth
//! (see [`crate::Netns`]), whose hosts hold documentation addresses.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use crate::{Daemon, Netns};
use crate::{TempDir, collect, run};

/// The cached guest (kernel, base initramfs), built once per test binary.
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

pub fn guest_image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = crate::project_root();
        assert!(
            nix_is_root(),
            "VM tests need root (network namespaces); run the README's test command"
        );
        run(Command::new("bash").arg(root.join("tests/guest/build.sh")));
        let dir = root.join("target/guest");
        GuestImage {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio"),
        }
    })
}

fn nix_is_root() -> bool {
    run(Command::new("id").arg("-u")).trim() == "0"
}

/// Shell functions every guest script can use.
/// How long a guest whose script has ended may take to power off.
pub const POWER_OFF_GRACE: Duration = Duration::from_secs(15);

const PRELUDE: &str = r#"
# DAD would delay the SLAAC address by a second for no benefit here.
echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad
ip link set eth0 up
dhcp() { udhcpc -i eth0 -s /etc/udhcpc.sh -q -n -t 10 -T 1 -O mtu -O search; }
wait_v6() {
  for i in $(seq 1 150); do
    a=$(ip -6 addr show dev eth0 scope global | awk '/inet6/ {print $2; exit}')
    if [ -n "$a" ]; then echo "VG-V6 $a"; return 0; fi
    sleep 0.1
  done
  echo "VG-V6 none"; return 1
}
"#;

/// How to boot one guest.
pub struct GuestOpts<'a> {
    pub backend: Backend<'a>,
    pub mac: &'a str,
    pub script: &'a str,
    pub timeout: Duration,
    /// Extra files for the initramfs (path in the guest, contents, mode).
    pub extra_files: Vec<(String, Vec<u8>, u32)>,
    /// Run QEMU inside this namespace (libslirp's "host" is QEMU's).
    pub netns: Option<&'a str>,
    /// vCPUs (TCG runs one host thread each).
    pub cpus: u16,
    /// Queue pairs of the vhost-user NIC (multi-queue above 1).
    pub queue_pairs: u16,
    /// QEMU reconnects to the vhost-user socket once a second after the
    /// backend goes (`reconnect=1`).
    pub reconnect: bool,
}

/// What the guest's NIC is connected to (the VM tests use vhost-gateway;
/// the benchmark all three).
#[derive(Clone, Copy)]
#[allow(dead_code)]
pub enum Backend<'a> {
    /// vhost-gateway's socket.
    VhostUser(&'a Path),
    /// QEMU's built-in libslirp.
    Slirp,
    /// passt's socket (`-netdev stream`).
    Passt(&'a Path),
    /// A tap interface QEMU opens itself (`vhost=off`: the kernel path
    /// with QEMU's own virtio-net, the benchmark's ceiling); QEMU must run
    /// in the tap's namespace.
    Tap(&'a str),
}

impl<'a> GuestOpts<'a> {
    pub fn new(socket: &'a Path, script: &'a str) -> Self {
        Self {
            backend: Backend::VhostUser(socket),
            mac: "52:54:00:12:34:56",
            script,
            timeout: Duration::from_secs(180),
            cpus: 1,
            queue_pairs: 1,
            reconnect: false,
            extra_files: Vec::new(),
            netns: None,
        }
    }
}

/// Writes the guest's initramfs with the test's script (and extra files)
/// into `dir`; returns its path.
pub fn write_initrd(opts: &GuestOpts<'_>, dir: &Path) -> std::path::PathBuf {
    let initrd = dir.join("initrd");
    let mut data = std::fs::read(&guest_image().initramfs).unwrap();
    let script = format!("{PRELUDE}\n{}", opts.script);
    let mut files: Vec<(&str, &[u8], u32)> = vec![("test.sh", script.as_bytes(), 0o100_755)];
    for (path, contents, mode) in &opts.extra_files {
        files.push((path.as_str(), contents.as_slice(), *mode));
    }
    data.extend(cpio_newc(&files));
    std::fs::write(&initrd, data).unwrap();
    initrd
}

/// A running QEMU with its console being collected.
pub struct Guest {
    child: Child,
    console: Arc<Mutex<String>>,
    marker: std::sync::mpsc::Receiver<()>,
    _dir: TempDir,
    timeout: Duration,
}

/// Where to find the wanted accelerator: KVM only with real KVM modules
/// (FACTS.md: /dev/kvm here is PVM, which cannot boot a stock kernel).
fn accel_args() -> Vec<&'static str> {
    if Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists() {
        vec!["-accel", "kvm", "-cpu", "host"]
    } else {
        vec!["-accel", "tcg,thread=multi", "-cpu", "max"]
    }
}

impl Guest {
    /// Boots QEMU; `marker` is a console string the test may wait for.
    pub fn spawn(opts: &GuestOpts<'_>, marker: &str) -> Self {
        let image = guest_image();
        let dir = TempDir::new("guest");
        let initrd = write_initrd(opts, &dir.0);
        // No MSI-X (vectors=0, INTx): QEMU 7.2 under TCG segfaults in
        // msix_set_vector_notifiers when vhost-user starts with MSI-X on
        // (seen with mq=on, vectors=6).
        let mq = if opts.queue_pairs > 1 { ",mq=on" } else { "" };
        let device = format!(
            "virtio-net-pci,netdev=n0,mac={}{mq},vectors=0,romfile=",
            opts.mac
        );
        let netdev: Vec<String> = match opts.backend {
            Backend::VhostUser(socket) => vec![
                "-chardev".into(),
                format!(
                    "socket,id=c0,path={}{}",
                    socket.display(),
                    if opts.reconnect { ",reconnect=1" } else { "" }
                ),
                "-netdev".into(),
                format!("vhost-user,id=n0,chardev=c0,queues={}", opts.queue_pairs),
            ],
            Backend::Slirp => vec!["-netdev".into(), "user,id=n0".into()],
            Backend::Tap(ifname) => vec![
                "-netdev".into(),
                format!("tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=off"),
            ],
            Backend::Passt(socket) => vec![
                "-netdev".into(),
                format!(
                    "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                    socket.display()
                ),
            ],
        };
        let mut qemu = match opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let mut child = qemu
            .args(accel_args())
            .args([
                "-m",
                "512M",
                "-smp",
                &opts.cpus.to_string(),
                "-nographic",
                "-nodefaults",
                "-no-reboot",
            ])
            .args(["-serial", "stdio"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .args(&netdev)
            .args(["-device", &device])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initrd)
            // No crypto self-tests at boot: under TCG on a loaded host
            // they can run for minutes (seen: cryptomgr_test soft-locked
            // a second vCPU for 157 s and the boot never finished), and
            // they test the guest kernel, not the gateway.
            .args(["-append", "console=ttyS0 quiet panic=-1 cryptomgr.notests"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64 runs");
        let console = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        collect(
            child.stdout.take().unwrap(),
            console.clone(),
            Some((marker.to_owned(), tx)),
        );
        collect(child.stderr.take().unwrap(), console.clone(), None);
        Self {
            child,
            console,
            marker: rx,
            _dir: dir,
            timeout: opts.timeout,
        }
    }

    /// Waits for the marker on the console.
    pub fn wait_marker(&self, limit: Duration) -> bool {
        self.marker.recv_timeout(limit).is_ok()
    }

    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Kills QEMU at once, as a crashing VMM would end.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the guest to power off; returns its console.
    ///
    /// Once the script has ended (`VG-EXIT` on the console) the guest gets
    /// [`POWER_OFF_GRACE`] to power off and is then killed: Debian's 6.1
    /// guest kernel can soft-lock in virtio_net's transmit completion
    /// during `poweroff -f` (ksoftirqd spinning, seen under TCG on a loaded
    /// host), after everything the test looks at has been printed.
    pub fn finish(mut self) -> String {
        let deadline = Instant::now() + self.timeout;
        let mut ended_at = None;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break Some(status);
            }
            let now = Instant::now();
            if ended_at.is_none() && self.console().contains("VG-EXIT ") {
                ended_at = Some(now);
            }
            let hung = ended_at.is_some_and(|t| now.duration_since(t) > POWER_OFF_GRACE);
            if hung || now > deadline {
                if hung {
                    eprintln!(
                        "the guest did not power off {POWER_OFF_GRACE:?} after its script ended; killed"
                    );
                }
                // Killing can fail only if it has exited meanwhile; wait
                // reaps it either way.
                self.child.kill().ok();
                let reaped = self.child.wait().ok();
                break reaped.filter(|_| hung);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Let the collector threads drain the pipes.
        std::thread::sleep(Duration::from_millis(100));
        let console = self.console();
        assert!(status.is_some(), "guest timed out:\n{console}");
        console
    }
}

/// Boots a guest, runs `script`, returns the console once it powers off.
pub fn boot(opts: &GuestOpts<'_>) -> String {
    let console = Guest::spawn(opts, "VG-EXIT").finish();
    assert!(
        console.contains("VG-BOOTED"),
        "guest did not boot:\n{console}"
    );
    assert!(
        !console.contains("VG-MODULE-FAILED"),
        "module load failed:\n{console}"
    );
    console
}

/// The text after `prefix` on the first console line that has it.
pub fn line_after<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.find(prefix).map(|i| l[i + prefix.len()..].trim()))
}

/// `key=value` from a `VG-LEASE ...` line.
pub fn lease_field(console: &str, key: &str) -> Option<String> {
    let line = line_after(console, "VG-LEASE")?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

/// (transmitted, received) of the ping summary after `marker`.
pub fn ping_result(console: &str, marker: &str) -> Option<(u32, u32)> {
    let start = console.find(marker)?;
    let line = console[start..]
        .lines()
        .find(|l| l.contains("packets transmitted"))?;
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    Some((*nums.first()?, *nums.get(1)?))
}

/// A cpio "newc" archive of regular files and directories (given with their
/// full mode), as the kernel's initramfs unpacker reads it.
fn cpio_newc(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: usize, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, (name, data, mode)) in files.iter().enumerate() {
        entry(&mut out, i + 1, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}
