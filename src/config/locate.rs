//! Where in a TOML document a problem is: the line of a byte offset
//! (syntax errors carry a span) and the line that sets a dotted key
//! (semantic errors carry a key).
#![forbid(unsafe_code)]

/// 1-based line number of a byte offset.
pub(super) fn line_of_offset(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |head| head.bytes().filter(|&b| b == b'\n').count())
        + 1
}

/// Finds the line where a dotted key (`table.key`) is set, by scanning table
/// headers and `key =` lines. Our schema is a set of flat tables, so this is
/// exact for it; it returns None rather than guess when the key is absent.
pub(super) fn locate_key(text: &str, dotted: &str) -> Option<usize> {
    let (table, key) = dotted.rsplit_once('.').unwrap_or(("", dotted));
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            continue;
        }
        if current == table
            && let Some((k, _)) = line.split_once('=')
            && k.trim().trim_matches('"') == key
        {
            return Some(i + 1);
        }
    }
    None
}
