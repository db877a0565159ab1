//! The `[pcap]` table: where captures of the guest's frames may be written
//! at run time, and how large they may grow.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use serde::Deserialize;

use super::Checks;

/// The `[pcap]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Pcap {
    /// The directory run-time captures go to (`POST /v1/pcap` names a file
    /// in it); none: only `--pcap FILE`, whose directory it then is.
    pub dir: Option<PathBuf>,
    /// Bytes per capture file before the next file of the ring is begun.
    pub max_bytes: u64,
    /// Files in the ring: NAME, NAME.1, ... NAME.(files-1); the oldest is
    /// overwritten.
    pub files: u32,
}

impl Default for Pcap {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 64 * 1024 * 1024,
            files: 4,
        }
    }
}

impl Pcap {
    pub(super) fn validate(&self, out: &mut Checks) {
        out.range("pcap.max-bytes", self.max_bytes, 65_536..=(64 << 30));
        out.range("pcap.files", self.files, 1..=1000);
        if let Some(dir) = &self.dir {
            out.check("pcap.dir", dir.is_absolute(), || {
                format!("{}: must be an absolute path", dir.display())
            });
        }
    }
}
