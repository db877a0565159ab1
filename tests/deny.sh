#!/usr/bin/env bash
# Supply-chain checks (deny.toml): licences, banned or wildcard
# dependencies, and sources. Installs cargo-deny once if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deny --version >/dev/null 2>&1; then
  cargo install cargo-deny --locked --quiet
fi
cargo deny --log-level error check licenses bans sources
