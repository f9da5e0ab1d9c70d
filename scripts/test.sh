#!/usr/bin/env bash
# Runs every check and test: set-up (idempotent), formatting, lints, then
# the unit tests and the real-cluster integration tests.
#
# Test clusters run as the unprivileged `postgres` OS user on free loopback
# ports in temp dirs, and are stopped by the tests themselves.
# BDR_TEST_TIMEOUT (seconds, default 180) bounds each wait in the tests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

scripts/setup.sh
export PGRX_PG_CONFIG_PATH=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
# The plugin only links inside a PostgreSQL backend: it is tested through
# the clusters that the bdr-tests crate starts, with the library that
# setup.sh just built and installed.
cargo test --locked --workspace --exclude bdr
