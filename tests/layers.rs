//! The module graph runs one way: each module of `src/` may import only
//! modules of layers below its own (top to bottom, along the path a frame
//! travels; see ARCHITECTURE.md). This test reads every `crate::…` and
//! `super::…` path in the library's sources (test modules aside: a test may
//! build its inputs from any layer) and fails on one that runs up or
//! sideways, and on a top-level module no layer lists.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top to bottom. A module may import from layers below its own only;
/// modules of one layer are independent of each other.
const LAYERS: &[&[&str]] = &[
    &["commands", "fuzzing"],
    &["daemon"],
    &["control"],
    &["wiring"],
    &["vhost"],
    &["engine"],
    &["services"],
    &["tls"],
    &["egress"],
    &["dns"],
    &["proxy"],
    &["config"],
    &["policy"],
    &["sniff"],
    &[
        "activation",
        "audit",
        "cli",
        "confine",
        "errors",
        "metrics",
        "names",
        "pcap",
        "virtio",
        "wellknown",
    ],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// A source file's module path: `src/engine/tcp.rs` -> [engine, tcp],
/// `src/engine/mod.rs` -> [engine].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The source without its trailing `#[cfg(test)] mod tests` (inline or
/// out of line): production code only.
fn production(text: &str) -> &str {
    let mut at = 0;
    while let Some(found) = text[at..].find("#[cfg(test)]") {
        let start = at + found;
        let rest = text[start + "#[cfg(test)]".len()..].trim_start();
        if rest.starts_with("mod tests") {
            return &text[..start];
        }
        at = start + 1;
    }
    text
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules a file's code refers to: `crate::x`, the names in
/// `crate::{x, y::z}`, and `super::` chains that climb to the crate root.
fn referenced(module: &[String], code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| is_ident(c) || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item.trim().chars().take_while(|c| is_ident(*c)).collect();
                if !name.is_empty() && name != "self" {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            out.insert(name);
        }
    }
    let mut rest = code;
    while let Some(i) = rest.find("super::") {
        let before = rest[..i].chars().next_back();
        let chain = &rest[i..];
        rest = &rest[i + "super::".len()..];
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        let mut depth = 0;
        let mut tail = chain;
        while let Some(t) = tail.strip_prefix("super::") {
            depth += 1;
            tail = t;
        }
        // `super` from [a, b] is [a]; climbing past the crate root is a
        // compile error, so only an exact climb to the root names a
        // top-level module.
        if depth == module.len() {
            let name: String = tail.chars().take_while(|c| is_ident(*c)).collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// Every import that breaks the layering, as readable lines.
fn violations(files: &[(Vec<String>, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (module, text) in files {
        let Some(top) = module.first() else { continue };
        let Some(own) = layer_of(top) else {
            out.push(format!(
                "{}: module `{top}` is in no layer (add it to LAYERS)",
                module.join("::")
            ));
            continue;
        };
        for name in referenced(module, production(text)) {
            if name == *top {
                continue;
            }
            match layer_of(&name) {
                Some(layer) if layer > own => {}
                Some(_) => out.push(format!(
                    "{}: imports `{name}`, which is not below `{top}`",
                    module.join("::")
                )),
                None => out.push(format!(
                    "{}: refers to `crate::{name}`, which no layer lists",
                    module.join("::")
                )),
            }
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    sources(&src, &mut paths);
    let files: Vec<(Vec<String>, String)> = paths
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap();
            // The binary and the root declare modules; `tests.rs` files are
            // out-of-line test modules.
            name != "main.rs" && name != "lib.rs" && name != "tests.rs"
        })
        .map(|p| (module_path(&src, p), std::fs::read_to_string(p).unwrap()))
        .collect();
    assert!(files.len() > 40, "found only {} source files", files.len());
    let problems = violations(&files);
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_declared_module_has_a_layer() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(name) = line.trim().strip_prefix("pub mod ") {
            let name = name.trim_end_matches(';');
            assert!(layer_of(name).is_some(), "`{name}` is in no layer");
        }
    }
}

#[test]
fn the_checker_catches_back_imports_in_every_spelling() {
    let file = |path: &str, text: &str| {
        (
            path.split("::").map(str::to_owned).collect::<Vec<_>>(),
            text.to_owned(),
        )
    };
    let bad = [
        file("policy", "use crate::config::Config;"),
        file("policy::rule", "use crate::{names, engine::Ctx};"),
        file(
            "dns::forward",
            "fn f() { crate::engine::TX_BUDGET_PER_POLL; }",
        ),
        file("proxy", "use super::tls::Interceptor;"),
        file("proxy::tcp", "use super::super::egress::Egress;"),
        file("names", "use crate::audit::Reason;"),
        file("nowhere", "fn f() {}"),
    ];
    for f in &bad {
        assert_eq!(violations(std::slice::from_ref(f)).len(), 1, "{f:?}");
    }
    let good = [
        file("engine", "use crate::policy::Policy; use super::virtio;"),
        file(
            "engine::tcp",
            "use super::Ctx; use crate::{proxy, metrics::Counter};",
        ),
        file(
            "policy",
            "#[cfg(test)]\nmod tests { use crate::config::Config; }",
        ),
        file(
            "config",
            "let _ = $crate::x; // macro paths are not imports\n",
        ),
    ];
    for f in &good {
        assert_eq!(violations(std::slice::from_ref(f)), Vec::<String>::new());
    }
}
