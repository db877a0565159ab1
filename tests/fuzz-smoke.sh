#!/usr/bin/env bash
# A short libFuzzer run of every cargo-fuzz target (FUZZ_SECONDS each,
# default 20), starting from the committed corpus. New corpus entries go to
# a scratch directory, not into the repository. Needs cargo-fuzz (installed
# here when missing) and RUSTC_BOOTSTRAP for the sanitizer flags on stable.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi
cd fuzz
cargo fuzz build 2>&1 | grep -vE "^ *(Compiling|Finished|Fresh)" || true
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
  mkdir -p "$scratch/$target"
  echo "fuzz: $target for ${seconds}s"
  if ! cargo fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$scratch/$target.log" || tail -20 "$scratch/$target.log"
    echo "fuzz: $target failed (the input is in fuzz/artifacts/$target)"
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|new_units_added)" "$scratch/$target.log"
done
