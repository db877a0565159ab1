//! Replays every committed fuzz corpus entry and fixed crasher
//! (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) through the
//! harness functions the cargo-fuzz targets wrap, on the stable toolchain.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use vhost_gateway::fuzzing::TARGETS;

fn entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = read.map(|e| e.unwrap().path()).collect();
    out.sort();
    out
}

#[test]
fn every_target_has_a_corpus_and_a_cargo_fuzz_binary() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        assert!(
            !entries(&fuzz.join("corpus").join(name)).is_empty(),
            "{name}: no corpus"
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "{name}: not a cargo-fuzz target"
        );
    }
}

#[test]
fn corpus_and_regressions_replay_cleanly() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, harness) in TARGETS {
        for kind in ["corpus", "regressions"] {
            for path in entries(&fuzz.join(kind).join(name)) {
                let data = std::fs::read(&path).unwrap();
                let outcome = std::panic::catch_unwind(|| harness(&data));
                assert!(outcome.is_ok(), "{}", path.display());
                replayed += 1;
            }
        }
    }
    assert!(replayed >= TARGETS.len());
}

/// The seed frames are what their names say, so the fuzzer starts from
/// every route rather than from noise.
#[test]
fn seed_frames_classify_as_named() {
    use vhost_gateway::engine::classify::{Kind, Own, classify};
    let own = Own {
        v4: "198.19.0.1".parse().unwrap(),
        v6: None,
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frame");
    type IsKind = fn(&Kind<'_>) -> bool;
    let cases: &[(&str, IsKind)] = &[
        ("syn_public", |k| matches!(k, Kind::TcpSyn { .. })),
        ("syn_gateway", |k| matches!(k, Kind::TcpSyn { .. })),
        ("syn_dns", |k| matches!(k, Kind::TcpSyn { .. })),
        ("udp_dns", |k| matches!(k, Kind::Udp { .. })),
        ("udp_quic", |k| matches!(k, Kind::Udp { .. })),
        ("dhcp_discover", |k| matches!(k, Kind::Dhcp { .. })),
        ("arp_other", |k| matches!(k, Kind::NotOurs)),
        ("arp_gateway", |k| matches!(k, Kind::Stack)),
        ("echo_metadata", |k| matches!(k, Kind::Echo(_))),
        ("fragment", |k| matches!(k, Kind::Fragment)),
    ];
    for (name, want) in cases {
        let frame = std::fs::read(dir.join(name)).unwrap();
        let kind = classify(&frame, &own);
        assert!(want(&kind), "{name}: {kind:?}");
    }
}
