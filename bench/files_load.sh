#!/usr/bin/env bash
# Benchmark: shardflow loading one large CSV file (local source -> Arrow -> zstd Parquet ->
# atomic table swap) against the raw speed of the source, reading the same bytes with
# `cat FILE > /dev/null`, and against DuckDB converting the same file to Parquet when the
# emulators' venv has it. Reports the ratio, rows/s, MB/s and shardflow's peak RSS, which must
# not grow with the file.
#
#   bench/files_load.sh [GB]     (default 10; the file is generated once under bench/out and kept)
set -euo pipefail
cd "$(dirname "$0")/.."
gb="${1:-10}"
out="$PWD/bench/out"
data="$out/files"
file="$data/in/big_${gb}g.csv"
mkdir -p "$data/in"

if [ ! -f "$file" ]; then
  echo "generating $file ($gb GB of CSV: id, amount, name, at) ..."
  # awk writes about 30 MB/s here (10 GB: about 6 minutes, once); rows are ~93 bytes.
  awk -v bytes="$((gb * 1000 * 1000 * 1000))" 'BEGIN {
    print "id,amount,name,at"; n = 0; size = 18
    while (size < bytes) {
      line = sprintf("%d,%d.%02d,customer %d of the generated file with some text,2024-%02d-%02dT%02d:%02d:%02d",
                     n, n % 100000, n % 100, n, n % 12 + 1, n % 28 + 1, n % 24, n % 60, n % 60)
      print line; size += length(line) + 1; n++
    }
  }' > "$file.tmp"
  mv "$file.tmp" "$file"
fi
bytes=$(stat -c %s "$file")

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked --bin dispatcher
bin="$CARGO_TARGET_DIR/release/dispatcher"

cat > "$data/job.json" <<EOF
{"source_type": "local", "dest_table_name": "big", "file_path_prefix": "$data/in/",
 "file_pattern": "big_${gb}g.csv", "file_format": "csv", "load_type": "catalog",
 "processing_mode": "dataflow", "load_latest_only": false}
EOF

now() { date +%s.%N; }
# Warm the page cache once so both sides read from memory as far as it holds the file.
cat "$file" > /dev/null
t0=$(now)
cat "$file" > /dev/null
t1=$(now)
raw=$(echo "$t1 - $t0" | bc -l)

duck=""
venv_python="$PWD/target/emulators/venv/bin/python"
if [ -x "$venv_python" ] && "$venv_python" -c "import duckdb" 2>/dev/null; then
  rm -f "$data/duckdb.parquet"
  t0=$(now)
  "$venv_python" -c "import duckdb; duckdb.sql('SET enable_progress_bar = false'); duckdb.sql(\"COPY (SELECT * FROM read_csv('$file')) TO '$data/duckdb.parquet' (FORMAT parquet, COMPRESSION zstd)\")"
  t1=$(now)
  duck=$(echo "$t1 - $t0" | bc -l)
  rm -f "$data/duckdb.parquet"
fi

rm -rf "$data/warehouse" "$data/state.db"
t0=$(now)
/usr/bin/time -v "$bin" run --job "$data/job.json" --dest "$data/warehouse" \
  --state "sqlite://$data/state.db" --no-progress > "$out/files_report.json" 2> "$out/files_time.txt"
t1=$(now)
sf=$(echo "$t1 - $t0" | bc -l)
rss_kb=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$out/files_time.txt")
rows=$(tail -n 1 "$out/files_report.json" | sed -E 's/.*"rows_loaded":([0-9]+).*/\1/')
status=$(tail -n 1 "$out/files_report.json" | sed -E 's/.*"status":"([a-z]+)".*/\1/')
parquet_mb=$(du -smL "$data/warehouse/big" | cut -f1)

printf 'file: %.2f GB of CSV, %s rows; shardflow %s, %s MB of Parquet\n' \
  "$(echo "$bytes / 1000000000" | bc -l)" "$rows" "$status" "$parquet_mb"
printf 'raw read (cat):      %6.2f s  (%.0f MB/s)\n' "$raw" "$(echo "$bytes / $raw / 1000000" | bc -l)"
if [ -n "$duck" ]; then
  printf 'duckdb CSV->Parquet: %6.2f s  (%.0f MB/s)\n' "$duck" "$(echo "$bytes / $duck / 1000000" | bc -l)"
fi
printf 'shardflow:           %6.2f s  (%.0f MB/s, %.2f M rows/s)\n' "$sf" \
  "$(echo "$bytes / $sf / 1000000" | bc -l)" "$(echo "$rows / $sf / 1000000" | bc -l)"
printf 'ratio to raw read:   %6.2f\n' "$(echo "$sf / $raw" | bc -l)"
if [ -n "$duck" ]; then
  printf 'ratio to duckdb:     %6.2f\n' "$(echo "$sf / $duck" | bc -l)"
fi
printf 'peak RSS:            %6.0f MB\n' "$(echo "$rss_kb / 1024" | bc -l)"
rm -rf "$data/warehouse" "$data/state.db"
