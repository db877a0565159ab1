//! TLS: the operator CA and minted leaves (`certs`), and interception
//! of TLS flows on the configured ports (`intercept`), including
//! DNS-over-TLS termination.

pub mod certs;
pub mod intercept;

/// Makes ring the process's rustls crypto provider (FACTS: install it
/// explicitly); harmless when already installed.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
