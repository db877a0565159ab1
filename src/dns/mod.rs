//! DNS for the guest: the daemon is its resolver, whatever address it asks.
//!
//! `forward` answers one query (block list, the policy's name rules, the
//! upstreams, rebind filtering, pinning); `pins` records which names each
//! answered address came from; `rebind` strips answers that point public
//! names inside the sandbox's reach; `tcp` serves length-prefixed queries
//! over a byte stream; `resolv` reads the host's resolvers. The engine's
//! side of interception is `engine::dns`.

pub mod forward;
pub mod pins;
pub mod rebind;
pub mod resolv;
pub mod rules;
pub mod tcp;
