//! TLS-related parsing. Today: the server name of a ClientHello and the Host
//! of an HTTP/1 request, which the egress policy reads from a flow's first
//! bytes. TLS interception itself is a later issue.

pub mod sni;
