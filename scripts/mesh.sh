#!/usr/bin/env bash
# A local bdr group of three nodes on this machine: three PostgreSQL
# clusters and one bdr-applier each, every node streaming from the others.
#
#   scripts/mesh.sh [up]   set up what is missing, start the group, write a
#                          row on every node and show it arriving everywhere
#   scripts/mesh.sh status show the nodes and each applier's peers
#   scripts/mesh.sh down   stop appliers and nodes (data is kept; `up` again
#                          restarts them)
#   scripts/mesh.sh clean  stop everything and delete the data
#
# Nodes listen on 127.0.0.1, ports BDR_MESH_PORT (default 5501) and up; data
# lives in BDR_MESH_DIR (default /var/tmp/bdr-mesh). PostgreSQL runs as the
# unprivileged `postgres` OS user when this is run as root.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
dir=${BDR_MESH_DIR:-/var/tmp/bdr-mesh}
base_port=${BDR_MESH_PORT:-5501}
nodes=(a b c)

as_server() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_of() {
    local i
    for i in "${!nodes[@]}"; do
        [ "${nodes[$i]}" = "$1" ] && echo $((base_port + i))
    done
}

applier=$root/target/release/bdr-applier

applier_on() {
    local node=$1
    shift
    "$applier" --node-name "$node" --dsn "$(dsn_of "$node")" "$@"
}

dsn_of() {
    echo "host=127.0.0.1 port=$(port_of "$1") user=postgres dbname=postgres"
}

psql_on() {
    local node=$1
    shift
    "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(port_of "$node")" -U postgres -d postgres "$@"
}

init_node() {
    local node=$1 data="$dir/$1"
    [ -f "$data/PG_VERSION" ] && return
    as_server "$bindir/initdb" -U postgres -A trust -E UTF8 --locale=C -D "$data" >/dev/null
    {
        printf '\n# bdr mesh node %s\n' "$node"
        cat "$root/scripts/node.conf"
        # (no grep -q: it would close the pipe early and fail under pipefail)
        if "$bindir/postgres" --describe-config | grep -c '^output_plugin_libraries' >/dev/null; then
            echo "output_plugin_libraries = 'bdr, pgoutput, test_decoding'"
        fi
        echo "port = $(port_of "$node")"
        echo "unix_socket_directories = '$dir'"
        echo "cluster_name = 'bdr_$node'"
    } >>"$data/postgresql.conf"
    printf 'local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n' \
        >"$data/pg_hba.conf"
}

start_node() {
    local node=$1 data="$dir/$1"
    if as_server "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        echo "node $node: already running"
        return
    fi
    as_server "$bindir/pg_ctl" -D "$data" -l "$dir/$node.log" -w start >/dev/null
    psql_on "$node" -c "CREATE EXTENSION IF NOT EXISTS bdr" 2>/dev/null
    psql_on "$node" -c "CREATE TABLE IF NOT EXISTS public.demo (id text PRIMARY KEY, written_on text, at timestamptz DEFAULT now())"
    echo "node $node: PostgreSQL on 127.0.0.1:$(port_of "$node") (bdr $(psql_on "$node" -Atc 'SELECT bdr.bdr_version()'))"
}

register_node() {
    local node=$1 peer
    applier_on "$node" init >/dev/null
    for peer in "${nodes[@]}"; do
        [ "$peer" = "$node" ] || applier_on "$node" add-peer "$peer" "$(dsn_of "$peer")" >/dev/null
    done
}

applier_running() {
    [ -f "$dir/$1-applier.pid" ] && kill -0 "$(cat "$dir/$1-applier.pid")" 2>/dev/null
}

start_applier() {
    local node=$1
    if applier_running "$node"; then
        echo "node $node: bdr-applier already running"
        return
    fi
    # nohup: the daemon outlives this script and the terminal.
    nohup "$applier" --node-name "$node" --dsn "$(dsn_of "$node")" run >>"$dir/$node-applier.log" 2>&1 &
    echo $! >"$dir/$node-applier.pid"
    echo "node $node: bdr-applier started (pid $!)"
}

stop_applier() {
    local node=$1 pid
    applier_running "$node" || return 0
    pid=$(cat "$dir/$node-applier.pid")
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -f "$dir/$node-applier.pid"
    echo "node $node: bdr-applier stopped"
}

# wait_until NODE SQL EXPECTED: polls for up to 60 s.
wait_until() {
    local i
    for i in $(seq 600); do
        [ "$(psql_on "$1" -Atc "$2")" = "$3" ] && return 0
        sleep 0.1
    done
    echo "node $1: timed out waiting for: $2 = $3" >&2
    return 1
}

up() {
    "$root/scripts/setup.sh"
    bindir=$("$PG_CONFIG" --bindir)
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    local node
    for node in "${nodes[@]}"; do init_node "$node"; done
    for node in "${nodes[@]}"; do start_node "$node"; done
    for node in "${nodes[@]}"; do register_node "$node"; done
    for node in "${nodes[@]}"; do start_applier "$node"; done
    for node in "${nodes[@]}"; do
        wait_until "$node" "SELECT count(DISTINCT application_name) FROM pg_stat_replication WHERE state = 'streaming'" \
            $((${#nodes[@]} - 1))
    done
    echo
    local stamp
    stamp=$(date +%H:%M:%S)
    for node in "${nodes[@]}"; do
        psql_on "$node" -c "INSERT INTO demo (id, written_on) VALUES ('hello from $node at $stamp', '$node')"
        echo "node $node: wrote 'hello from $node at $stamp'"
    done
    for node in "${nodes[@]}"; do
        wait_until "$node" "SELECT count(*) FROM demo WHERE id LIKE '% at $stamp'" "${#nodes[@]}"
        echo
        echo "node $node now has:"
        psql_on "$node" -c "SELECT id, written_on FROM demo WHERE id LIKE '% at $stamp' ORDER BY id"
    done
    cat <<MSG
Every row written on one node arrived on the other two.

Connect:
$(for node in "${nodes[@]}"; do echo "  psql -h 127.0.0.1 -p $(port_of "$node") -U postgres    # node $node"; done)
Status of node a's streams:  $applier --node-name a --dsn '$(dsn_of a)' status
Logs: $dir/<node>.log, $dir/<node>-applier.log
Stop: $0 down    Delete everything: $0 clean
MSG
}

down() {
    bindir=$("$PG_CONFIG" --bindir)
    local node
    for node in "${nodes[@]}"; do stop_applier "$node"; done
    for node in "${nodes[@]}"; do
        if [ -f "$dir/$node/postmaster.pid" ]; then
            as_server "$bindir/pg_ctl" -D "$dir/$node" -m fast -w stop >/dev/null && echo "node $node: stopped"
        fi
    done
}

status() {
    bindir=$("$PG_CONFIG" --bindir)
    local node
    for node in "${nodes[@]}"; do
        if [ -d "$dir/$node" ] && as_server "$bindir/pg_ctl" -D "$dir/$node" status >/dev/null 2>&1; then
            echo "node $node: running on 127.0.0.1:$(port_of "$node")"
            if applier_running "$node"; then
                applier_on "$node" status | sed 's/^/    /'
            else
                echo "    bdr-applier not running"
            fi
        else
            echo "node $node: stopped"
        fi
    done
}

case "${1:-up}" in
    up) up ;;
    down) down ;;
    status) status ;;
    clean) down; rm -rf "$dir"; echo "removed $dir" ;;
    *) echo "usage: $0 [up|status|down|clean]" >&2; exit 2 ;;
esac
