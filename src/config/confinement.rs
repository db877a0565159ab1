//! The `[confinement]` table: how the daemon confines itself once started
//! (see `confine`). Capabilities are always dropped and `no_new_privs` is
//! always set; what can be switched is what an operator may need to turn
//! down to find a problem.
#![forbid(unsafe_code)]

use serde::Deserialize;

/// What a system call outside the seccomp allow-list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeccompMode {
    /// The daemon logs the call's number and exits.
    Enforce,
    /// The kernel logs the call (audit) and lets it run.
    Log,
    /// No filter.
    Off,
}

/// The `[confinement]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Confinement {
    /// The seccomp allow-list's mode.
    pub seccomp: SeccompMode,
    /// Restrict the filesystem with landlock where the kernel has it.
    pub landlock: bool,
}

impl Default for Confinement {
    fn default() -> Self {
        Self {
            seccomp: SeccompMode::Enforce,
            landlock: true,
        }
    }
}
