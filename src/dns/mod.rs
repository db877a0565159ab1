//! DNS interception: the guest's resolver is the daemon, whatever address it
//! asks. `names` matches the block list, `forward` answers one query (host
//! side, tokio), `intercept` is the engine's side.
//!
//! `rebind` strips answers that point public names inside the sandbox's
//! reach. `tcp` serves DNS over TCP flows (any address, port 53). Not yet
//! here (issue 4 continues): block-list files, Extended DNS Errors. `pins`
//! records which name each answered address came from.

pub mod forward;
pub mod intercept;
pub mod pins;
pub mod rebind;
pub mod tcp;
