#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for N seconds (default 60), starting from
# the committed seeds in fuzz/corpus/<target>/. New inputs go to fuzz/target/corpus/<target>/ (not
# committed); a crash stops the script non-zero and leaves its input in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS]                 every target, SECONDS each
#   FUZZ_TARGETS="jwt credentials" scripts/fuzz.sh 600
#   FUZZ_SANITIZER=address scripts/fuzz.sh 3600   with AddressSanitizer (slower build and runs)
#
# cargo-fuzz needs a nightly rustc; RUSTC_BOOTSTRAP=1 lets the machine's stable toolchain act as
# one (the only toolchain a new machine here can install). Longer runs: docs/security.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null; then
  echo "installing cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
echo "building fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build --sanitizer "$sanitizer"

summary=()
for t in $targets; do
  work="target/corpus/$t"
  mkdir -p "$work" "artifacts/$t"
  log="target/fuzz-$t.log"
  echo "==> fuzzing $t for ${secs}s"
  # The first corpus directory receives new inputs; the committed seeds are only read.
  if ! cargo fuzz run --sanitizer "$sanitizer" "$t" "$work" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
      >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz target $t failed; reproduce with: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $t artifacts/$t/<file>)" >&2
    exit 1
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)"
  summary+=("$t: ${execs:-?} executions, ${cov:-cov: ?}, $(find "$work" -type f | wc -l) new corpus inputs")
done

echo
echo "fuzzing done, no crash:"
printf '  %s\n' "${summary[@]}"
