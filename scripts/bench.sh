#!/usr/bin/env bash
# Benchmarks bdr against PostgreSQL's built-in logical replication and
# pglogical 2, in one run on this machine; prints the table and writes
# bench-results.json. Arguments go to bdr-bench (see --help), e.g.
#   scripts/bench.sh                 # full run, medians of 3
#   scripts/bench.sh --runs 5 --backlog 300000
#   scripts/bench.sh --quick --runs 1
#
# Runs set-up first (idempotent), so the installed bdr.so and the
# bdr-applier used are the release builds of this checkout.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

scripts/setup.sh
cargo build --release --quiet -p bdr-bench
BDR_APPLIER_BIN="$root/target/release/bdr-applier" exec target/release/bdr-bench "$@"
