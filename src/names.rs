//! Host names: the one grammar every part of the daemon uses for them.
//!
//! A *name* is a DNS name in presentation form (RFC 1035 2.3.4 lengths,
//! letters, digits, inner hyphens and underscores). Names compare
//! case-insensitively and without a trailing dot ([`normalize`]). A
//! *pattern* is what operators write in block lists, rebind exemptions, TLS
//! bypass lists and policy rules: `example.com` is exactly that name,
//! `*.example.com` every name under it (label-aligned: `badexample.com` is
//! not under `example.com`), not the name itself.
//!
//! Leaf module: pure data, no I/O, imports nothing from the crate.
#![forbid(unsafe_code)]

use std::collections::HashSet;

/// Where a flow's hostname came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameSource {
    /// The guest's own DNS answer for the address (a pin).
    Dns,
    /// TLS ClientHello SNI, from the flow's first bytes.
    Sni,
    /// HTTP/1 Host header, from the flow's first bytes.
    Host,
}

impl NameSource {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NameSource::Dns => "dns",
            NameSource::Sni => "sni",
            NameSource::Host => "host",
        }
    }
}

/// The comparable form of a name: lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Checks a name's syntax: 1..=253 characters (a trailing dot aside),
/// labels of 1..=63 letters, digits, `-` (not first or last) and `_`.
pub fn check(name: &str) -> Result<(), &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err("name must be 1..=253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1..=63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err("labels are letters, digits and inner hyphens");
        }
    }
    Ok(())
}

/// One pattern: a name exactly, or every name under one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Exactly this name (normalized).
    Exact(String),
    /// Every name under this one (normalized), not the name itself.
    Under(String),
}

impl Pattern {
    /// Parses `name` or `*.name`, checking the name's syntax.
    pub fn parse(entry: &str) -> Result<Self, &'static str> {
        let (under, name) = match entry.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        check(name)?;
        let name = normalize(name);
        Ok(if under {
            Pattern::Under(name)
        } else {
            Pattern::Exact(name)
        })
    }

    /// Whether `name` is covered.
    pub fn matches(&self, name: &str) -> bool {
        let name = normalize(name);
        match self {
            Pattern::Exact(n) => name == *n,
            Pattern::Under(parent) => is_under(&name, parent),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(n) => f.write_str(n),
            Pattern::Under(n) => write!(f, "*.{n}"),
        }
    }
}

/// Whether normalized `name` is a proper, label-aligned descendant of
/// normalized `parent`.
fn is_under(name: &str, parent: &str) -> bool {
    name.strip_suffix(parent)
        .is_some_and(|head| head.ends_with('.'))
}

/// A set of patterns with lookups that do not scan the set: block lists,
/// rebind exemptions, TLS bypass lists.
#[derive(Debug, Default, Clone)]
pub struct NameSet {
    exact: HashSet<String>,
    under: HashSet<String>,
}

impl NameSet {
    /// The set of `entries` (each `name` or `*.name`); entries that do not
    /// parse are left out, so callers validate first (config does).
    pub fn new<'a>(entries: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = Self::default();
        for entry in entries {
            match Pattern::parse(entry) {
                Ok(Pattern::Exact(n)) => set.exact.insert(n),
                Ok(Pattern::Under(n)) => set.under.insert(n),
                Err(_) => false,
            };
        }
        set
    }

    /// Whether `name` is covered by any pattern.
    pub fn contains(&self, name: &str) -> bool {
        let name = normalize(name);
        if self.exact.contains(&name) {
            return true;
        }
        // Every proper suffix that starts at a label boundary.
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if self.under.contains(parent) {
                return true;
            }
            rest = parent;
        }
        false
    }
}

/// Encodes a list of names as DNS wire names, uncompressed (RFC 1035
/// 3.1), as DHCP option 119 carries a search list (RFC 3397). Names must
/// have passed [`check`].
pub fn encode_wire(names: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for name in names {
        let name = name.strip_suffix('.').unwrap_or(name);
        for label in name.split('.') {
            // check() bounds labels to 63 bytes before this runs.
            out.push(u8::try_from(label.len()).unwrap_or(63));
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax() {
        assert!(check("example.com").is_ok());
        assert!(check("example.com.").is_ok());
        assert!(check("_dmarc.example.com").is_ok());
        for bad in ["", ".", "a..b", "-a.b", "a-.b", "a b.c", "ä.test"] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
        assert!(check(&"a".repeat(64)).is_err());
        assert!(check(&["a"; 127].join(".")).is_ok(), "253 characters");
        assert!(check(&["a"; 128].join(".")).is_err(), "255 characters");
        assert!(Pattern::parse("*.").is_err());
        assert!(Pattern::parse("*.*.a").is_err());
        assert_eq!(
            Pattern::parse("*.Ex.COM.").map(|p| p.to_string()),
            Ok("*.ex.com".into())
        );
    }

    #[test]
    fn set_and_pattern_agree_on_a_table() {
        let entries = ["ads.example", "*.tracker.test", "Mixed.Case.Test."];
        let set = NameSet::new(entries);
        let patterns: Vec<Pattern> = entries.iter().map(|e| Pattern::parse(e).unwrap()).collect();
        let cases = [
            ("ads.example", true),
            ("ADS.example.", true),
            ("www.ads.example", false),
            ("tracker.test", false),
            ("a.tracker.test", true),
            ("a.b.tracker.test", true),
            ("badtracker.test", false),
            // Not a valid name; covered like its parent's children, so a
            // deny still applies.
            (".tracker.test", true),
            ("tracker.test.evil", false),
            ("mixed.case.test", true),
            ("example", false),
            ("", false),
        ];
        for (name, want) in cases {
            assert_eq!(set.contains(name), want, "{name}");
            assert_eq!(patterns.iter().any(|p| p.matches(name)), want, "{name}");
        }
        assert!(!NameSet::default().contains("anything.test"));
    }

    #[test]
    fn wire_encoding() {
        assert_eq!(
            encode_wire(&["ab.c".into()]),
            vec![2, b'a', b'b', 1, b'c', 0]
        );
        assert_eq!(encode_wire(&["x.".into()]), vec![1, b'x', 0]);
    }
}
