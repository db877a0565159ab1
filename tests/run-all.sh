#!/usr/bin/env bash
# The whole test suite: formatting, lints, docs, unit, integration and
# real-guest VM tests, and a short run of every fuzz target. Run as root
# from the repository (network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --all-features -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items --quiet
# Supply chain: licences, bans, sources (deny.toml).
bash tests/deny.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast
else
  cargo test --no-fail-fast
fi
# A short libFuzzer run of every fuzz target (fuzz/, cargo-fuzz).
bash tests/fuzz-smoke.sh
