#!/usr/bin/env bash
# Benchmark: shardflow's end-to-end PostgreSQL export (2 workers, COPY binary -> Arrow -> zstd
# Parquet -> atomic table swap) against the raw speed of the source: two parallel
# `psql -c "COPY (…half…) TO STDOUT (FORMAT binary)" > /dev/null` streams over the same table,
# in the same run. Reports the time ratio and shardflow's peak RSS.
#
#   bench/pg_export.sh [ROWS]      (default 5,000,000; the table is created once and reused)
#   SSLMODE=disable bench/pg_export.sh   both sides without TLS (default prefer: both use the
#                                        server's TLS, as psql and shardflow do by default)
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-5000000}"
export PGSSLMODE="${SSLMODE:-prefer}"
psql_cmd=(psql -X -q -h 127.0.0.1 -U postgres -d test -v ON_ERROR_STOP=1)
out="bench/out"
mkdir -p "$out"

# shellcheck source=bench/wide_table.sh
. bench/wide_table.sh
ensure_wide_table "$rows"

cargo build --release --locked --bin dispatcher
bin=target/release/dispatcher
mid=$(( rows / 2 ))
cols="id, customer, quantity, amount, name, code, active, created, updated, day, score, attrs"

now() { date +%s.%N; }
# Warm the cache once so both sides read from memory.
"${psql_cmd[@]}" -c "COPY (SELECT $cols FROM bench.wide) TO STDOUT (FORMAT binary)" > /dev/null

t0=$(now)
"${psql_cmd[@]}" -c "COPY (SELECT $cols FROM bench.wide WHERE id <= $mid) TO STDOUT (FORMAT binary)" > /dev/null &
"${psql_cmd[@]}" -c "COPY (SELECT $cols FROM bench.wide WHERE id > $mid) TO STDOUT (FORMAT binary)" > /dev/null &
wait
t1=$(now)
raw=$(echo "$t1 - $t0" | bc -l)

cat > "$out/job.json" <<JSON
{"data_source_id": 0, "source_type": "postgresql",
 "connection_params": {"host": "127.0.0.1", "port": 5432, "database": "test", "username": "postgres", "sslmode": "$PGSSLMODE"},
 "source_table_name": "wide", "schema_name": "bench", "dest_table_name": "wide",
 "load_type": "catalog", "processing_mode": "dataflow"}
JSON
rm -rf "$out/warehouse" "$out/state.db"*
t0=$(now)
/usr/bin/time -v -o "$out/time.txt" "$bin" --log-level warn run --no-progress --workers 2 \
  --job "$out/job.json" --dest "$out/warehouse" --state "sqlite://$out/state.db" > "$out/report.json"
t1=$(now)
ours=$(echo "$t1 - $t0" | bc -l)
rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$out/time.txt")
report=$(tail -n1 "$out/report.json")
loaded=$(echo "$report" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows_loaded"])')
parquet_mb=$(du -smL "$out/warehouse/wide" | cut -f1)

printf 'rows                      %d (12 columns)\n' "$rows"
printf 'raw COPY binary, 2 streams %.2f s  (%.0f rows/s)\n' "$raw" "$(echo "$rows / $raw" | bc -l)"
printf 'shardflow, 2 workers      %.2f s  (%.0f rows/s), %s rows loaded, %s MB Parquet\n' "$ours" "$(echo "$rows / $ours" | bc -l)" "$loaded" "$parquet_mb"
printf 'ratio                     %.2f  (target <= 1.3)\n' "$(echo "$ours / $raw" | bc -l)"
printf 'peak RSS                  %d MB  (target <= 300)\n' "$(( rss_kb / 1024 ))"
[ "$loaded" = "$rows" ] || { echo "row count mismatch: loaded $loaded of $rows" >&2; exit 1; }
