#!/usr/bin/env bash
# Benchmark: shardflow's end-to-end PostgreSQL export (2 workers, COPY binary -> Arrow -> zstd
# Parquet -> atomic table swap) against the raw speed of the source: two parallel
# `psql -c "COPY (…half…) TO STDOUT (FORMAT binary)" > /dev/null` streams over the same table,
# in the same run. Reports the time ratio and shardflow's peak RSS.
#
#   bench/pg_export.sh [ROWS]      (default 5,000,000; the table is created once and reused)
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-5000000}"
psql_cmd=(psql -X -q -h 127.0.0.1 -U postgres -d test -v ON_ERROR_STOP=1)
out="bench/out"
mkdir -p "$out"

have=$("${psql_cmd[@]}" -tAc "SELECT count(*) FROM pg_class WHERE oid = to_regclass('bench.wide')")
if [ "$have" = "1" ]; then
  have=$("${psql_cmd[@]}" -tAc "SELECT reltuples::bigint FROM pg_class WHERE oid = 'bench.wide'::regclass")
fi
if [ "$have" != "$rows" ]; then
  echo "creating bench.wide with $rows rows (12 columns) ..."
  "${psql_cmd[@]}" <<SQL
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.wide (
  id bigint PRIMARY KEY, customer integer, quantity bigint, amount numeric(12,2), name text,
  code char(8), active boolean, created timestamp, updated timestamptz, day date,
  score double precision, attrs jsonb);
INSERT INTO bench.wide
SELECT i, NULLIF(i % 100000, 3), i * 7, round((i % 1000000) / 100.0, 2),
       CASE WHEN i % 10 = 0 THEN NULL ELSE 'customer name ' || i END,
       lpad((i % 99999999)::text, 8, '0'), CASE WHEN i % 9 = 0 THEN NULL ELSE i % 2 = 0 END,
       timestamp '2015-01-01' + i * interval '13 seconds',
       CASE WHEN i % 8 = 0 THEN NULL ELSE timestamptz '2015-01-01 00:00:00+00' + i * interval '11 seconds' END,
       date '2000-01-01' + i % 9000, i / 3.0,
       CASE WHEN i % 6 = 0 THEN NULL ELSE jsonb_build_object('k', i % 100, 'tag', 'x' || i % 7) END
FROM generate_series(1, $rows) AS i;
VACUUM ANALYZE bench.wide;
SQL
fi

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
 "connection_params": {"host": "127.0.0.1", "port": 5432, "database": "test", "username": "postgres"},
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
parquet_mb=$(du -sm "$out/warehouse/wide" | cut -f1)

printf 'rows                      %d (12 columns)\n' "$rows"
printf 'raw COPY binary, 2 streams %.2f s  (%.0f rows/s)\n' "$raw" "$(echo "$rows / $raw" | bc -l)"
printf 'shardflow, 2 workers      %.2f s  (%.0f rows/s), %s rows loaded, %s MB Parquet\n' "$ours" "$(echo "$rows / $ours" | bc -l)" "$loaded" "$parquet_mb"
printf 'ratio                     %.2f  (target <= 1.3)\n' "$(echo "$ours / $raw" | bc -l)"
printf 'peak RSS                  %d MB  (target <= 300)\n' "$(( rss_kb / 1024 ))"
[ "$loaded" = "$rows" ] || { echo "row count mismatch: loaded $loaded of $rows" >&2; exit 1; }
