#!/usr/bin/env bash
# A local bdr group of three nodes on this machine.
#
#   scripts/mesh.sh [up]   set up what is missing, start nodes a, b and c
#   scripts/mesh.sh status show the nodes
#   scripts/mesh.sh down   stop the nodes (data is kept; `up` restarts them)
#   scripts/mesh.sh clean  stop the nodes and delete their data
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
        if "$bindir/postgres" --describe-config | grep -q '^output_plugin_libraries'; then
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
    echo "node $node: started on 127.0.0.1:$(port_of "$node") (bdr $(psql_on "$node" -Atc 'SELECT bdr.bdr_version()'))"
}

up() {
    "$root/scripts/setup.sh"
    bindir=$("$PG_CONFIG" --bindir)
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    local node
    for node in "${nodes[@]}"; do init_node "$node"; done
    for node in "${nodes[@]}"; do start_node "$node"; done
    for node in "${nodes[@]}"; do
        psql_on "$node" -c "INSERT INTO demo (id, written_on) VALUES ('hello from $node', '$node') ON CONFLICT DO NOTHING"
    done
    cat <<MSG

Three nodes with the bdr library preloaded and the extension created:
$(for node in "${nodes[@]}"; do echo "  psql -h 127.0.0.1 -p $(port_of "$node") -U postgres    # node $node"; done)
Each node has written a row into public.demo. Streaming between the nodes
starts once bdr-applier runs on each of them.

Logs: $dir/<node>.log    Stop: $0 down    Delete: $0 clean
MSG
}

down() {
    bindir=$("$PG_CONFIG" --bindir)
    local node
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
