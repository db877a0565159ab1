//! Error reporting shared by the daemon, the control API and the
//! subcommands: one line per error, causes included.
#![forbid(unsafe_code)]

/// "a: b: c" from an error and its sources.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
