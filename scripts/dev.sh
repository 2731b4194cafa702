#!/usr/bin/env bash
# Runs gybc-authz in dev mode. Nothing else needs to be running: the daemon creates a
# signing key, demo API keys and a user JWT in memory, prints them once together with
# ready-to-run `check` commands, and serves on 127.0.0.1:50051 (gRPC) and :8181 (HTTP).
# Extra arguments are passed on to `serve`, and GYBC_AUTHZ__* variables override config
# fields, for example GYBC_AUTHZ__SERVER__GRPC_ADDR=127.0.0.1:50052 ./scripts/dev.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --quiet -- serve --dev "$@"
