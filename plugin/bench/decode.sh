#!/usr/bin/env bash
# Decoding throughput of the bdr output plugin against pgoutput (binary off
# and on) and wal2json, on the same WAL, through the SQL slot functions
# (pg_logical_slot_peek_binary_changes, which decodes without consuming);
# then the peak memory (VmHWM) of the backend decoding one transaction of
# 1,000,000 rows with each plugin.
#
# Usage (as root, after scripts/setup.sh):
#   plugin/bench/decode.sh [rows-in-many-transactions] [rows-in-one-transaction]
# Defaults: 200000 and 1000000. Prints changes/s and bytes/change, the
# median of 3 runs, per plugin, and the ratio to pgoutput.
set -euo pipefail

ROWS=${1:-200000}
BIG=${2:-1000000}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bindir=$(${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config} --bindir)
dir=$(mktemp -d /tmp/bdr-bench-XXXXXX)
chown postgres: "$dir"
port=$((20000 + RANDOM % 10000))
as_pg() { runuser -u postgres -- "$@"; }
psql_() { "$bindir/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
cleanup() { as_pg "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT

as_pg "$bindir/initdb" -U postgres -A trust -E UTF8 --locale=C --no-sync -D "$dir/data" >/dev/null
{
    cat "$root/scripts/node.conf"
    echo "port = $port"
    echo "unix_socket_directories = '$dir'"
    echo "fsync = off"
    echo "shared_buffers = 256MB"
    echo "logical_decoding_work_mem = 64MB"
    echo "output_plugin_libraries = 'bdr, pgoutput, test_decoding, wal2json'"
} >>"$dir/data/postgresql.conf"
as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null

psql_ -c "CREATE TABLE bench (id int PRIMARY KEY, a int, b text, c timestamptz, d numeric, e float8)"
psql_ -c "CREATE PUBLICATION p FOR TABLE bench"
for s in "bdr_s bdr" "pgo_s pgoutput" "w2j_s wal2json"; do
    set -- $s
    psql_ -c "SELECT pg_create_logical_replication_slot('$1', '$2')" >/dev/null
done

# The workload: inserts in transactions of 1000 rows, then updates and
# deletes of half of them (row changes: ROWS + ROWS/2 + ROWS/4).
batch=1000
for ((i = 0; i < ROWS; i += batch)); do
    echo "INSERT INTO bench SELECT g, g % 1000, md5(g::text), now(), g * 1.5, g / 7.0 FROM generate_series($((i + 1)), $((i + batch))) g;"
done | psql_
psql_ -c "UPDATE bench SET a = a + 1, b = b || 'x' WHERE id % 2 = 0"
psql_ -c "DELETE FROM bench WHERE id % 4 = 1"
changes=$((ROWS + ROWS / 2 + ROWS / 4))

version=$(psql_ -c "SHOW server_version_num")
bdr_opts="'startup_version','1','min_proto_version','1','max_proto_version','1','node_id','1','node_name','bench','pg_version_num','$version'"
declare -A cases=(
    ["bdr binary"]="bdr_s|$bdr_opts,'datum_formats','text,binary'"
    ["bdr text"]="bdr_s|$bdr_opts,'datum_formats','text'"
    ["pgoutput text"]="pgo_s|'proto_version','1','publication_names','p'"
    ["pgoutput binary"]="pgo_s|'proto_version','1','publication_names','p','binary','true'"
    ["wal2json v2"]="w2j_s|'format-version','2'"
)
order=("pgoutput text" "pgoutput binary" "bdr binary" "bdr text" "wal2json v2")

median() { sort -g | sed -n 2p; }

declare -A rate
printf '%-16s %14s %14s %10s\n' plugin changes/s bytes/change vs_pgoutput
for name in "${order[@]}"; do
    IFS='|' read -r slot opts <<<"${cases[$name]}"
    times=()
    for run in 1 2 3; do
        start=$(date +%s.%N)
        bytes=$(psql_ -c "SELECT sum(octet_length(data)) FROM pg_logical_slot_peek_binary_changes('$slot', NULL, NULL, $opts)")
        end=$(date +%s.%N)
        times+=("$(echo "$end - $start" | bc -l)")
    done
    t=$(printf '%s\n' "${times[@]}" | median)
    rate[$name]=$(echo "$changes / $t" | bc -l)
    base=${rate["pgoutput text"]}
    printf '%-16s %14.0f %14.1f %10.2f\n' "$name" "${rate[$name]}" "$(echo "$bytes / $changes" | bc -l)" \
        "$(echo "${rate[$name]} / $base" | bc -l)"
done

# Peak memory of the backend decoding one transaction of BIG rows.
for s in bdr_s pgo_s w2j_s; do
    psql_ -c "SELECT pg_replication_slot_advance('$s', pg_current_wal_lsn())" >/dev/null
done
psql_ -c "INSERT INTO bench SELECT g, g % 1000, md5(g::text), now(), g * 1.5, g / 7.0 FROM generate_series($((ROWS + 1)), $((ROWS + BIG))) g"
echo
echo "peak RSS (VmHWM) of the decoding backend, one transaction of $BIG rows:"
for name in "bdr binary" "pgoutput binary" "wal2json v2"; do
    IFS='|' read -r slot opts <<<"${cases[$name]}"
    hwm=$(psql_ <<SQL
SELECT pg_backend_pid() AS pid \gset
\setenv BENCH_PID :pid
SELECT count(*) FROM pg_logical_slot_peek_binary_changes('$slot', NULL, NULL, $opts) \g /dev/null
\! grep VmHWM /proc/\$BENCH_PID/status
SQL
)
    printf '%-16s %s\n' "$name" "$(echo "$hwm" | grep VmHWM | awk '{print $2, $3}')"
done
