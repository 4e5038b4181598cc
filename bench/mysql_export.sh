#!/usr/bin/env bash
# Benchmark: shardflow's end-to-end MySQL/MariaDB export (2 workers, prepared SELECT in binary
# protocol -> Arrow -> zstd Parquet -> atomic table swap) against the raw speed of the source:
# `mysql --quick --batch -e "SELECT …" > /dev/null` over the same table, as one stream and as
# two parallel half-table streams, in the same run. Reports the time ratios and shardflow's
# peak RSS.
#
#   bench/mysql_export.sh [ROWS]      (default 2,000,000; the table is created once and reused)
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-2000000}"
mysql_cmd=(mysql -h 127.0.0.1 -P 3306 -u root)
out="bench/out"
mkdir -p "$out"

have=$("${mysql_cmd[@]}" -N -e "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = 'sf_bench' AND TABLE_NAME = 'wide'")
if [ "$have" = "1" ]; then
  have=$("${mysql_cmd[@]}" -N -e "SELECT COUNT(*) FROM sf_bench.wide")
fi
if [ "$have" != "$rows" ]; then
  echo "creating sf_bench.wide with $rows rows (12 columns) ..."
  "${mysql_cmd[@]}" <<SQL
DROP DATABASE IF EXISTS sf_bench;
CREATE DATABASE sf_bench CHARACTER SET utf8mb4;
USE sf_bench;
SET SESSION time_zone = '+00:00';
CREATE TABLE sf_bench.wide (
  id bigint PRIMARY KEY, customer int, quantity bigint, amount decimal(12,2), name varchar(64),
  code char(8), active bool, created datetime(6), updated timestamp(6) NULL, day date,
  score double, attrs json);
INSERT INTO sf_bench.wide
SELECT seq, NULLIF(seq % 100000, 3), seq * 7, ROUND((seq % 1000000) / 100.0, 2),
       IF(seq % 10 = 0, NULL, CONCAT('customer name ', seq)),
       LPAD(seq % 99999999, 8, '0'), IF(seq % 9 = 0, NULL, seq % 2 = 0),
       TIMESTAMP('2015-01-01') + INTERVAL seq * 13 SECOND,
       IF(seq % 8 = 0, NULL, TIMESTAMP('2015-01-01') + INTERVAL seq * 11 SECOND),
       DATE('2000-01-01') + INTERVAL seq % 9000 DAY, seq / 3.0,
       IF(seq % 6 = 0, NULL, JSON_OBJECT('k', seq % 100, 'tag', CONCAT('x', seq % 7)))
FROM seq_1_to_$rows;
ANALYZE TABLE sf_bench.wide;
SQL
fi

cargo build --release --locked --bin dispatcher
bin=target/release/dispatcher
mid=$(( rows / 2 ))
cols="id, customer, quantity, amount, name, code, active, created, updated, day, score, attrs"

now() { date +%s.%N; }
# Warm the buffer pool once so every side reads from memory.
"${mysql_cmd[@]}" --quick --batch -e "SELECT $cols FROM sf_bench.wide" > /dev/null

t0=$(now)
"${mysql_cmd[@]}" --quick --batch -e "SELECT $cols FROM sf_bench.wide" > /dev/null
t1=$(now)
raw1=$(echo "$t1 - $t0" | bc -l)

t0=$(now)
"${mysql_cmd[@]}" --quick --batch -e "SELECT $cols FROM sf_bench.wide WHERE id <= $mid" > /dev/null &
"${mysql_cmd[@]}" --quick --batch -e "SELECT $cols FROM sf_bench.wide WHERE id > $mid" > /dev/null &
wait
t1=$(now)
raw2=$(echo "$t1 - $t0" | bc -l)

cat > "$out/mysql-job.json" <<JSON
{"data_source_id": 0, "source_type": "mysql",
 "connection_params": {"host": "127.0.0.1", "port": 3306, "database": "sf_bench", "username": "root"},
 "source_table_name": "wide", "dest_table_name": "wide",
 "load_type": "catalog", "processing_mode": "dataflow"}
JSON
rm -rf "$out/mysql-warehouse" "$out/mysql-state.db"*
t0=$(now)
/usr/bin/time -v -o "$out/mysql-time.txt" "$bin" --log-level warn run --no-progress --workers 2 \
  --job "$out/mysql-job.json" --dest "$out/mysql-warehouse" --state "sqlite://$out/mysql-state.db" \
  > "$out/mysql-report.json"
t1=$(now)
ours=$(echo "$t1 - $t0" | bc -l)
rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$out/mysql-time.txt")
report=$(tail -n1 "$out/mysql-report.json")
loaded=$(echo "$report" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows_loaded"])')
parquet_mb=$(du -smL "$out/mysql-warehouse/wide" | cut -f1)

printf 'rows                          %d (12 columns)\n' "$rows"
printf 'mysql --quick --batch, 1 stream   %.2f s  (%.0f rows/s)\n' "$raw1" "$(echo "$rows / $raw1" | bc -l)"
printf 'mysql --quick --batch, 2 streams  %.2f s  (%.0f rows/s)\n' "$raw2" "$(echo "$rows / $raw2" | bc -l)"
printf 'shardflow, 2 workers          %.2f s  (%.0f rows/s), %s rows loaded, %s MB Parquet\n' "$ours" "$(echo "$rows / $ours" | bc -l)" "$loaded" "$parquet_mb"
printf 'ratio to 1 stream             %.2f  (target <= 1.5)\n' "$(echo "$ours / $raw1" | bc -l)"
printf 'ratio to 2 streams            %.2f\n' "$(echo "$ours / $raw2" | bc -l)"
printf 'peak RSS                      %d MB  (target <= 300)\n' "$(( rss_kb / 1024 ))"
[ "$loaded" = "$rows" ] || { echo "row count mismatch: loaded $loaded of $rows" >&2; exit 1; }
