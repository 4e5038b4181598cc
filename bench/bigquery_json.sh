#!/usr/bin/env bash
# What a JSON column costs on the way into BigQuery. A Parquet load cannot fill a JSON column
# ("If you use a batch load job to ingest JSON data into a table, the source data must be in
# CSV, Avro, or JSON format"), so a table with one loads its parts into a staging table (JSON
# as STRING, a free load) and moves them with ONE query (INSERT … SELECT PARSE_JSON(…), or a
# transaction for a catalog load), billed as the bytes that query reads: the staging table's
# logical size. This benchmark loads bench.wide (12 columns, attrs jsonb) twice into BigQuery
# (bqemulator behind the rules layer): with attrs, through the staging table and the query, and
# without it (selected_columns), by one direct load job. It reports both times, the bytes the
# query scans (by BigQuery's documented data sizes, computed by PostgreSQL over the same rows)
# and shardflow's peak RSS.
#
#   eval "$(bash tests/emulators.sh start)"; cargo build --workspace --bins --tests; eval "$(bash tests/emulators.sh rules)"
#   bench/bigquery_json.sh [ROWS]     (default 1,000,000)
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-1000000}"
psql_cmd=(psql -X -q -h 127.0.0.1 -U postgres -d test -v ON_ERROR_STOP=1)
out="bench/out"
mkdir -p "$out"
: "${BIGQUERY_EMULATOR_HOST:?start the emulators: eval \"\$(bash tests/emulators.sh start)\"}"
curl -sf -o /dev/null "$BIGQUERY_EMULATOR_HOST/rules" \
  || { echo "BIGQUERY_EMULATOR_HOST is not the rules layer: eval \"\$(bash tests/emulators.sh rules)\"" >&2; exit 1; }

# shellcheck source=bench/wide_table.sh
. bench/wide_table.sh
ensure_wide_table "$rows"

cargo build --release --locked --bin dispatcher
bin=target/release/dispatcher
id=$(date +%s)
bucket="bench-json-$id"
curl -sf -o /dev/null -X POST -H 'content-type: application/json' -d "{\"name\": \"$bucket\"}" \
  "$STORAGE_EMULATOR_HOST/storage/v1/b?project=$GCP_PROJECT_ID"

# One run into dataset $1 with extra job fields $2; prints "seconds rss_mb rows_loaded".
load() {
  cat > "$out/job.json" <<JSON
{"data_source_id": 0, "source_type": "postgresql",
 "connection_params": {"host": "127.0.0.1", "port": 5432, "database": "test", "username": "postgres"},
 "source_table_name": "wide", "schema_name": "bench", "dest_table_name": "wide",
 "load_type": "catalog", "processing_mode": "dataflow" $2}
JSON
  rm -f "$out/state.db"*
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -v -o "$out/time.txt" "$bin" --log-level warn run --no-progress --workers 2 \
    --job "$out/job.json" --dest "bigquery://$GCP_PROJECT_ID/$1" --staging "gs://$bucket/$1" \
    --state "sqlite://$out/state.db" > "$out/report.json"
  t1=$(date +%s.%N)
  local rss loaded
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$out/time.txt")
  loaded=$(tail -n1 "$out/report.json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows_loaded"])')
  echo "$(echo "$t1 - $t0" | bc -l) $(( rss / 1024 )) $loaded"
}

read -r with_s with_rss with_rows < <(load "bench_json_$id" "")
read -r without_s without_rss without_rows < <(load "bench_nojson_$id" \
  ', "selected_columns": ["id", "customer", "quantity", "amount", "name", "code", "active", "created", "updated", "day", "score"]')

# BigQuery's logical bytes (Data type sizes: INT64, DATETIME, TIMESTAMP, DATE, FLOAT64 8;
# NUMERIC 16; BOOL 1; STRING 2 + UTF-8 bytes; NULL 0) of the staging table the query reads.
scanned=$("${psql_cmd[@]}" -tAc "
  SELECT sum(8 + CASE WHEN customer IS NULL THEN 0 ELSE 8 END + 8
    + CASE WHEN amount IS NULL THEN 0 ELSE 16 END
    + CASE WHEN name IS NULL THEN 0 ELSE 2 + octet_length(name) END + 2 + octet_length(code)
    + CASE WHEN active IS NULL THEN 0 ELSE 1 END + 8 + CASE WHEN updated IS NULL THEN 0 ELSE 8 END
    + 8 + 8 + CASE WHEN attrs IS NULL THEN 0 ELSE 2 + octet_length(attrs::text) END)
  FROM bench.wide")

printf 'rows                                  %d (12 columns, attrs jsonb)\n' "$rows"
printf 'with the JSON column (staging + SQL)  %.2f s, %s rows, peak RSS %d MB\n' "$with_s" "$with_rows" "$with_rss"
printf 'without it (one direct load job)      %.2f s, %s rows, peak RSS %d MB\n' "$without_s" "$without_rows" "$without_rss"
printf 'bytes the query reads                 %d (%.1f MB, %.6f TiB; loads are free)\n' \
  "$scanned" "$(echo "$scanned / 1000000" | bc -l)" "$(echo "$scanned / 1099511627776" | bc -l)"
[ "$with_rows" = "$rows" ] && [ "$without_rows" = "$rows" ] \
  || { echo "row count mismatch: $with_rows and $without_rows of $rows" >&2; exit 1; }
