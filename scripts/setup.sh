#!/usr/bin/env bash
# Idempotent set-up, shared by scripts/mesh.sh, scripts/test.sh and .ci/run.
#
# 1. installs the Debian packages that are missing (PostgreSQL 15 server and
#    headers, libclang for pgrx's bindgen, pglogical and wal2json for the
#    benchmarks), running apt-get only when something is missing;
# 2. builds the bdr shared library (release) and bdr-applier;
# 3. installs bdr.so, bdr.control and the extension SQL into PostgreSQL's
#    directories, only when their content changed.
#
# No cargo-pgrx and no ~/.pgrx: pgrx-pg-sys finds pg_config through
# PGRX_PG_CONFIG_PATH. A second run takes seconds and reinstalls nothing.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
export PGRX_PG_CONFIG_PATH=$PG_CONFIG

log() { printf 'setup: %s\n' "$*" >&2; }

packages=(
    postgresql-15 postgresql-server-dev-15 postgresql-contrib
    libclang-dev clang pkg-config libssl-dev
    postgresql-15-pglogical postgresql-15-wal2json
)

install_packages() {
    local missing=() p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        log "missing packages: ${missing[*]}; run this script as root or install them"
        exit 1
    fi
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts a default cluster on 5432; this project runs its own.
    if command -v pg_ctlcluster >/dev/null; then
        pg_ctlcluster 15 main stop 2>/dev/null || true
    fi
}

check_toolchain() {
    if ! command -v cargo >/dev/null; then
        log "cargo not found: install Rust 1.95 (rustup) first"
        exit 1
    fi
    [ -x "$PG_CONFIG" ] || { log "pg_config not found at $PG_CONFIG"; exit 1; }
}

# install_if_changed SRC DEST MODE
install_if_changed() {
    if ! cmp -s "$1" "$2"; then
        install -m "$3" "$1" "$2"
        log "installed $2"
    fi
}

build_and_install() {
    cd "$root"
    cargo build --release --quiet -p bdr -p bdr-applier
    local libdir sharedir
    libdir=$("$PG_CONFIG" --pkglibdir)
    sharedir=$("$PG_CONFIG" --sharedir)/extension
    install_if_changed target/release/libbdr.so "$libdir/bdr.so" 755
    local f
    for f in sql/bdr.control sql/bdr--*.sql; do
        install_if_changed "$f" "$sharedir/$(basename "$f")" 644
    done
}

install_packages
check_toolchain
build_and_install
