//! Debian's libvirt for the libvirt path's test: the system libvirtd if one
//! runs, else one of the test's own (with the virtlogd it sends QEMU's
//! output to), and transient domains made from `config/libvirt-domain.xml`
//! that boot the test guest through a vhost-user interface.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;
use crate::guest::{GuestOpts, guest_image, write_initrd};

/// `virsh -c qemu:///system ARGS`: its stdout, or why it failed.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// libvirt's daemons, stopped when dropped if the test started them.
pub struct Libvirt {
    started: Vec<Child>,
}

impl Libvirt {
    /// The running libvirtd, or one started for the test; Err says why
    /// libvirt cannot run here.
    pub fn start() -> Result<Self, String> {
        if virsh(&["version"]).is_ok() {
            return Ok(Self {
                started: Vec::new(),
            });
        }
        let mut started = Vec::new();
        for daemon in ["virtlogd", "libvirtd"] {
            let child = Command::new(daemon)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{daemon}: {e}"))?;
            started.push(child);
        }
        let this = Self { started };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match virsh(&["version"]) {
                Ok(_) => return Ok(this),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for child in &mut self.started {
            // Gone already is as good as stopped, and a daemon that cannot
            // be reaped has nothing left to tell the test.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A transient domain; destroyed when dropped.
pub struct Domain {
    pub name: String,
    console: PathBuf,
    _dir: TempDir,
}

impl Domain {
    /// Boots `opts`'s script through a vhost-user interface on `socket`,
    /// QEMU started by libvirt (as its own user: the socket, the initrd
    /// and the console file must be reachable for it).
    pub fn create(opts: &GuestOpts<'_>, socket: &Path) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("libvirt");
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        let initrd = write_initrd(opts, &dir.0);
        let console = dir.0.join("console.log");
        std::fs::write(&console, "").unwrap();
        std::fs::set_permissions(&console, std::fs::Permissions::from_mode(0o666)).unwrap();
        let name = format!("vg-test-{}", dir.0.file_name().unwrap().to_string_lossy());
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/libvirt-domain.xml"),
        )
        .unwrap();
        let xml = template
            .replace("@NAME@", &name)
            .replace("@KERNEL@", &guest_image().kernel.display().to_string())
            .replace("@INITRD@", &initrd.display().to_string())
            .replace("@SOCKET@", &socket.display().to_string())
            .replace("@CONSOLE@", &console.display().to_string());
        let file = dir.0.join("domain.xml");
        std::fs::write(&file, xml).unwrap();
        virsh(&["create", file.to_str().unwrap()])?;
        Ok(Self {
            name,
            console,
            _dir: dir,
        })
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Waits until the console holds `text`.
    pub fn wait_console(&self, text: &str, limit: Duration) -> bool {
        crate::wait_until(limit, || self.console().contains(text))
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // A guest that powered off took its transient domain with it.
        let _ = virsh(&["destroy", &self.name]);
    }
}

/// Lets libvirt's QEMU user (`libvirt-qemu` on Debian) connect to `socket`,
/// as the README asks of an operator: the socket's group becomes that
/// user's group, with read and write.
pub fn admit_qemu_user(socket: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let out = Command::new("id")
        .args(["-g", "libvirt-qemu"])
        .output()
        .map_err(|e| e.to_string())?;
    let gid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| "no libvirt-qemu user".to_owned())?;
    std::os::unix::fs::chown(socket, None, Some(gid)).map_err(|e| e.to_string())?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o770))
        .map_err(|e| e.to_string())
}
