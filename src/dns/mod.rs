//! DNS interception: the guest's resolver is the daemon, whatever address it
//! asks. `names` matches the block list, `forward` answers one query (host
//! side, tokio), `intercept` is the engine's side.
//!
//! Not yet here (issue 4 continues): TCP/53, rebind protection, name pins,
//! block-list files, Extended DNS Errors, refusing encrypted-DNS ports.

pub mod forward;
pub mod intercept;
pub mod names;
