//! Block-list matching for DNS names.
//!
//! Grammar (config `dns.block`): `example.com` blocks exactly that name;
//! `*.example.com` blocks every name under it (not the name itself). Matching
//! is case-insensitive, label-aligned (`badexample.com` is not under
//! `example.com`) and ignores a trailing dot. Pure data; no I/O.
#![forbid(unsafe_code)]

use std::collections::HashSet;

/// Names and suffixes that are refused.
#[derive(Debug, Default, Clone)]
pub struct BlockList {
    exact: HashSet<String>,
    suffixes: HashSet<String>,
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl BlockList {
    /// Builds the list from config entries (already validated).
    pub fn new<'a>(entries: impl IntoIterator<Item = &'a str>) -> Self {
        let mut list = Self::default();
        for entry in entries {
            match entry.strip_prefix("*.") {
                Some(suffix) => list.suffixes.insert(normalize(suffix)),
                None => list.exact.insert(normalize(entry)),
            };
        }
        list
    }

    /// Whether `name` is blocked.
    pub fn blocks(&self, name: &str) -> bool {
        let name = normalize(name);
        if self.exact.contains(&name) {
            return true;
        }
        // Every proper suffix that starts at a label boundary.
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if self.suffixes.contains(parent) {
                return true;
            }
            rest = parent;
        }
        false
    }
}

/// Checks one `dns.block` entry's syntax.
pub fn check_entry(entry: &str) -> Result<(), &'static str> {
    let name = entry.strip_prefix("*.").unwrap_or(entry);
    crate::config::check_domain(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_table() {
        let list = BlockList::new(["ads.example", "*.tracker.test", "Mixed.Case.Test."]);
        let cases = [
            ("ads.example", true),
            ("ADS.example.", true),
            ("www.ads.example", false),
            ("tracker.test", false),
            ("a.tracker.test", true),
            ("a.b.tracker.test", true),
            ("badtracker.test", false),
            ("tracker.test.evil", false),
            ("mixed.case.test", true),
            ("example", false),
            ("", false),
        ];
        for (name, want) in cases {
            assert_eq!(list.blocks(name), want, "{name}");
        }
        assert!(!BlockList::default().blocks("anything.test"));
    }

    #[test]
    fn entries_are_checked() {
        assert!(check_entry("*.example.com").is_ok());
        assert!(check_entry("example.com").is_ok());
        assert!(check_entry("*.").is_err());
        assert!(check_entry("a..b").is_err());
    }
}
