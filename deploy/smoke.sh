#!/usr/bin/env bash
# End-to-end check of a shardflow deployment against a real Google Cloud project (or, with the
# emulator variables set, against the emulators: the test suite runs it that way).
#
# It creates a temporary dataset, bucket and Pub/Sub topics, a PostgreSQL source table with
# json, jsonb, numeric(50,20), timestamptz, timestamp, date and column names BigQuery cannot take ("Amount"
# beside amount, "order id"), then runs `dispatcher serve` and `worker serve` with a stand-in
# of the Django API and sends them job messages as Django does:
#   1. a catalog load, 2. a transactional load, then new rows and a second one,
#   3. a merge load, then changed and new rows and a second one, 4. the catalog load again,
#   5. a GCS file job that BigQuery loads directly (the fast path, no worker reads the files).
# After each, every value in BigQuery is compared with PostgreSQL's. It deletes what it
# created (SMOKE_KEEP=1 keeps it) and ends with "smoke: passed".
#
#   GCP_PROJECT_ID=my-project BIGQUERY_LOCATION=EU bash deploy/smoke.sh
#
# Real project: gcloud authenticated (`gcloud auth login` for the script's own calls and
# `gcloud auth application-default login` for dispatcher and worker), with rights to create
# datasets, buckets and Pub/Sub topics; PostgreSQL reachable as SMOKE_PG_HOST (127.0.0.1),
# SMOKE_PG_PORT (5432), SMOKE_PG_DATABASE (test), SMOKE_PG_USER (postgres),
# SMOKE_PG_PASSWORD (empty). Binaries from SHARDFLOW_BIN_DIR (default target/release, else
# target/debug). Needs curl, psql and python3.
#
# Emulators: BIGQUERY_EMULATOR_HOST, STORAGE_EMULATOR_HOST and PUBSUB_EMULATOR_HOST set (eval
# "$(bash tests/emulators.sh env)"); BigQuery then goes through the strict rules layer (which
# keeps BIGNUMERIC's exact text: bqemulator cannot hold it as a number).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HELPERS=$ROOT/deploy/smoke_helpers.py
PROJECT=${GCP_PROJECT_ID:?set GCP_PROJECT_ID}
BIN=${SHARDFLOW_BIN_DIR:-$ROOT/target/release}
[ -x "$BIN/dispatcher" ] || BIN=$ROOT/target/debug
for tool in curl psql python3 "$BIN/dispatcher" "$BIN/worker"; do
    command -v "$tool" >/dev/null || { echo "smoke: $tool is missing" >&2; exit 2; }
done

if [ -n "${BIGQUERY_EMULATOR_HOST:-}" ]; then
    MODE=emulator
    BQ=${BIGQUERY_EMULATOR_HOST%/}/bigquery/v2
    GCS=${STORAGE_EMULATOR_HOST:?the emulators need STORAGE_EMULATOR_HOST too}
    PUBSUB=http://${PUBSUB_EMULATOR_HOST:?the emulators need PUBSUB_EMULATOR_HOST too}/v1
    LOCATION=${BIGQUERY_LOCATION:-US}
    TOKEN=
else
    MODE=bigquery
    BQ=https://bigquery.googleapis.com/bigquery/v2
    GCS=https://storage.googleapis.com
    PUBSUB=https://pubsub.googleapis.com/v1
    LOCATION=${BIGQUERY_LOCATION:?set BIGQUERY_LOCATION: the dataset and bucket are created there}
    TOKEN=$(gcloud auth print-access-token)
fi

ID=$(date +%s)$((RANDOM % 1000))
DATASET=sf_smoke_$ID
BUCKET=sf-smoke-$ID
SCHEMA=smoke_$ID
WORK=$(mktemp -d)
export PGHOST=${SMOKE_PG_HOST:-127.0.0.1} PGPORT=${SMOKE_PG_PORT:-5432}
export PGDATABASE=${SMOKE_PG_DATABASE:-test} PGUSER=${SMOKE_PG_USER:-postgres}
export PGPASSWORD=${SMOKE_PG_PASSWORD:-}
PIDS=()

say() { echo "smoke: $*"; }
fail() { echo "smoke: FAILED: $*" >&2; exit 1; }

# curl with the token (none for the emulators); prints the body, fails on an HTTP error.
call() {
    local method=$1 url=$2 body=${3:-}
    local args=(-sS -X "$method" -H 'content-type: application/json' -o "$WORK/answer" -w '%{http_code}')
    [ -n "$TOKEN" ] && args+=(-H "authorization: Bearer $TOKEN")
    [ -n "$body" ] && args+=(--data-binary "$body")
    local status
    status=$(curl "${args[@]}" "$url") || fail "$method $url: no answer"
    if [ "$status" -ge 400 ]; then
        fail "$method $url: HTTP $status: $(cat "$WORK/answer")"
    fi
    cat "$WORK/answer"
}

cleanup() {
    local status=$?
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${SMOKE_KEEP:-}" ]; then
        say "kept dataset $DATASET, bucket $BUCKET, schema $SCHEMA and $WORK"
        exit "$status"
    fi
    set +e
    curl -sS -o /dev/null -X DELETE ${TOKEN:+-H "authorization: Bearer $TOKEN"} \
        "$BQ/projects/$PROJECT/datasets/$DATASET?deleteContents=true"
    local names
    names=$(curl -sS ${TOKEN:+-H "authorization: Bearer $TOKEN"} "$GCS/storage/v1/b/$BUCKET/o" \
        | python3 -c 'import json,sys; [print(i["name"]) for i in json.load(sys.stdin).get("items", [])]' 2>/dev/null)
    for name in $names; do
        local encoded
        encoded=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$name")
        curl -sS -o /dev/null -X DELETE ${TOKEN:+-H "authorization: Bearer $TOKEN"} "$GCS/storage/v1/b/$BUCKET/o/$encoded"
    done
    curl -sS -o /dev/null -X DELETE ${TOKEN:+-H "authorization: Bearer $TOKEN"} "$GCS/storage/v1/b/$BUCKET"
    for kind in subscriptions topics; do
        for name in "${CREATED_PUBSUB[@]:-}"; do
            [ -n "$name" ] && curl -sS -o /dev/null -X DELETE ${TOKEN:+-H "authorization: Bearer $TOKEN"} \
                "$PUBSUB/projects/$PROJECT/$kind/$name"
        done
    done
    psql -q -v ON_ERROR_STOP=1 -c "SET client_min_messages = warning; DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

say "$MODE: project $PROJECT, location $LOCATION, dataset $DATASET, bucket $BUCKET"

# --- What the deployment needs: a bucket and a dataset in one location, the topics. --------
call POST "$GCS/storage/v1/b?project=$PROJECT" "{\"name\": \"$BUCKET\", \"location\": \"$LOCATION\"}" >/dev/null
call POST "$BQ/projects/$PROJECT/datasets" \
    "{\"datasetReference\": {\"projectId\": \"$PROJECT\", \"datasetId\": \"$DATASET\"}, \"location\": \"$LOCATION\"}" >/dev/null
for topic in JOBS_TOPIC JOBS_SUBSCRIPTION SHARDS_TOPIC SHARDS_SUBSCRIPTION RESULTS_TOPIC \
    RESULTS_SUBSCRIPTION DEAD_LETTER_TOPIC DEAD_LETTER_SUBSCRIPTION; do
    export "SHARDFLOW_$topic=smoke-$ID-$(echo "$topic" | tr 'A-Z_' 'a-z-')"
done
CREATED_PUBSUB=("$SHARDFLOW_JOBS_SUBSCRIPTION" "$SHARDFLOW_SHARDS_SUBSCRIPTION" "$SHARDFLOW_RESULTS_SUBSCRIPTION"
    "$SHARDFLOW_DEAD_LETTER_SUBSCRIPTION" "$SHARDFLOW_JOBS_TOPIC" "$SHARDFLOW_SHARDS_TOPIC"
    "$SHARDFLOW_RESULTS_TOPIC" "$SHARDFLOW_DEAD_LETTER_TOPIC")
"$BIN/dispatcher" pubsub-setup --project "$PROJECT" >"$WORK/pubsub-setup.log" 2>&1 \
    || fail "pubsub-setup: $(tail -5 "$WORK/pubsub-setup.log")"

# --- The source: strict types and names BigQuery cannot take. -----------------------------
rows() { # rows FROM TO TAG SEEN_BASE: insert or update rows FROM..TO
    cat <<SQL
INSERT INTO $SCHEMA.t SELECT i, i * 1.25, -i * 0.5, '$3 ' || i || CASE WHEN i % 3 = 0 THEN ' ü😀' ELSE '' END,
    CASE WHEN i % 5 = 0 THEN NULL ELSE jsonb_build_object('i', i, 'tag', '$3', 'list', jsonb_build_array(1, 'two', NULL, 3.5)) END,
    CASE WHEN i % 6 = 0 THEN NULL ELSE json_build_object('n', i::bigint * 1000000007, 'ok', i % 2 = 0) END,
    CASE WHEN i % 7 = 0 THEN NULL ELSE ('123456789012345678901234567' || i || '.12345678901234567890')::numeric(50,20) END,
    timestamptz '$4' + i * interval '1 minute', timestamp '2023-02-03 04:05:06.789012' + i * interval '1 day',
    date '1999-12-31' + i
  FROM generate_series($1, $2) i
ON CONFLICT (id) DO UPDATE SET "order id" = EXCLUDED."order id", doc = EXCLUDED.doc, seen = EXCLUDED.seen;
SQL
}
psql -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE SCHEMA $SCHEMA;
CREATE TABLE $SCHEMA.t (id bigint PRIMARY KEY, "Amount" numeric(12,2), amount numeric(12,2),
    "order id" text, doc jsonb, js json, big numeric(50,20), seen timestamptz NOT NULL,
    local_at timestamp, day date);
$(rows 1 20 first '2024-05-01 00:00:00.250001+00')
ANALYZE $SCHEMA.t;
SQL

# --- Django, the dispatcher and a worker. ---------------------------------------------------
python3 "$HELPERS" django "$WORK" >"$WORK/django.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -s "$WORK/port" ] && break; sleep 0.1; done
[ -s "$WORK/port" ] || fail "the Django stand-in did not start"
export DJANGO_API_URL=http://127.0.0.1:$(cat "$WORK/port") ETL_API_TOKEN=smoke-token
export GCP_PROJECT_ID=$PROJECT BIGQUERY_DATASET=$DATASET BIGQUERY_LOCATION=$LOCATION
export SHARDFLOW_STAGING=gs://$BUCKET/staging SHARDFLOW_STATE=sqlite://$WORK/state.db
export SHARDFLOW_METRICS_PORT=0 SHARDFLOW_METRICS_HOST=127.0.0.1 SHARDFLOW_SHARD_ROWS=8
export ETL_MAX_RETRIES=2 ETL_RETRY_DELAY=0.5 LOG_LEVEL=${LOG_LEVEL:-info}
"$BIN/dispatcher" serve >"$WORK/dispatcher.log" 2>&1 &
PIDS+=($!)
"$BIN/worker" serve >"$WORK/worker.log" 2>&1 &
PIDS+=($!)

pg_params=$(python3 -c 'import json, os; print(json.dumps({"host": os.environ["PGHOST"], "port": int(os.environ["PGPORT"]), "database": os.environ["PGDATABASE"], "username": os.environ["PGUSER"], "password": os.environ["PGPASSWORD"]}))')
job_config() { # job_config DATA_SOURCE_ID DEST LOAD_TYPE
    cat >"$WORK/config-$1.json" <<JSON
{"source_type": "postgresql", "connection_params": $pg_params, "schema_name": "$SCHEMA",
 "source_table_name": "t", "dest_table_name": "$2", "load_type": "$3",
 "timestamp_column": "seen", "processing_mode": "dataflow"}
JSON
}

# run DATA_SOURCE_ID ETL_RUN_ID: publishes the job message as Django does and waits for the
# run's final status from the dispatcher's PATCH.
run() {
    local data
    data=$(printf '{"data_source_id": %s, "etl_run_id": %s}' "$1" "$2" | base64 | tr -d '\n')
    call POST "$PUBSUB/projects/$PROJECT/topics/$SHARDFLOW_JOBS_TOPIC:publish" \
        "{\"messages\": [{\"data\": \"$data\"}]}" >/dev/null
    local patch
    if ! patch=$(python3 "$HELPERS" wait "$WORK" "$2" 300); then
        echo "--- dispatcher.log" >&2; tail -30 "$WORK/dispatcher.log" >&2
        echo "--- worker.log" >&2; tail -15 "$WORK/worker.log" >&2
        fail "run $2: $patch"
    fi
    echo "$patch"
}

rows_loaded() { # rows_loaded PATCH: the rows_loaded of a run's final PATCH
    python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get("rows_loaded"))' "$1"
}

bq_query() { # bq_query SQL > file: a jobs.query answer
    local body
    body=$(python3 -c 'import json,sys; print(json.dumps({"query": sys.argv[1], "useLegacySql": False, "location": sys.argv[2], "timeoutMs": 60000, "maxResults": 100000}))' "$1" "$2")
    call POST "$BQ/projects/$PROJECT/queries" "$body"
}

# check TABLE: every value of the table in BigQuery against PostgreSQL's source.
check() {
    psql -At -v ON_ERROR_STOP=1 -c "SELECT json_agg(json_build_array(id::text, \"Amount\"::text, amount::text,
        \"order id\", doc::text, js::text, big::text,
        to_char(seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'),
        to_char(local_at, 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), day::text) ORDER BY id) FROM $SCHEMA.t" >"$WORK/pg.json"
    bq_query "SELECT id, CAST(Amount AS STRING), CAST(amount_2 AS STRING), order_id, TO_JSON_STRING(doc),
        TO_JSON_STRING(js), CAST(big AS STRING), FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%E6S', seen),
        FORMAT_DATETIME('%Y-%m-%dT%H:%M:%E6S', local_at), CAST(day AS STRING)
        FROM \`$PROJECT.$DATASET.$1\` ORDER BY id" "$LOCATION" >"$WORK/bq.json"
    python3 "$HELPERS" compare "$WORK/pg.json" "$WORK/bq.json" "$MODE" || fail "$1 differs from the source"
    say "$1: $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$WORK/pg.json") rows, every value as in PostgreSQL"
}

job_config 1 smoke_catalog catalog
job_config 2 smoke_tx transactional
job_config 3 smoke_merge merge

run 1 101 >/dev/null && check smoke_catalog
run 2 201 >/dev/null && check smoke_tx
psql -q -v ON_ERROR_STOP=1 -c "$(rows 21 25 later '2024-06-01 00:00:00+00')" >/dev/null
patch=$(run 2 202)
[ "$(rows_loaded "$patch")" = 5 ] || fail "the second transactional run loaded other than 5 rows: $patch"
check smoke_tx
run 3 301 >/dev/null && check smoke_merge
psql -q -v ON_ERROR_STOP=1 -c "$(rows 3 5 changed '2024-07-01 00:00:00+00') $(rows 26 27 new '2024-07-01 00:00:00+00')" >/dev/null
patch=$(run 3 302)
[ "$(rows_loaded "$patch")" = 5 ] || fail "the second merge touched other than 3 changed and 2 new rows: $patch"
check smoke_merge
run 1 102 >/dev/null && check smoke_catalog

# --- A GCS file job on the fast path. -------------------------------------------------------
for n in 1 2; do
    # JSON lines: the workers read CSV files (BigQuery's CSV reader is not pandas').
    # Ids as text: BigQuery asks for integers in JSON as strings (past 2^53 numbers corrupt).
    printf '{"id": "%s1", "name": "file %s one", "at": "2024-01-0%s 10:00:00"}\n{"id": "%s2", "name": "file %s two", "at": "2024-01-0%s 11:30:00.5"}\n' \
        "$n" "$n" "$n" "$n" "$n" "$n" >"$WORK/tx_$n.jsonl"
    curl -sS -f -o /dev/null -X POST ${TOKEN:+-H "authorization: Bearer $TOKEN"} --data-binary "@$WORK/tx_$n.jsonl" \
        "$GCS/upload/storage/v1/b/$BUCKET/o?uploadType=media&name=files/tx_$n.jsonl" || fail "upload tx_$n.jsonl"
done
cat >"$WORK/config-4.json" <<JSON
{"source_type": "gcs", "connection_params": {"bucket": "$BUCKET"}, "is_file_based": true,
 "file_path_prefix": "files/", "file_pattern": "tx_*.jsonl", "file_format": "json",
 "dest_table_name": "smoke_files", "load_type": "transactional", "load_latest_only": false,
 "bigquery_schema": [{"name": "id", "bigquery_type": "INT64", "bigquery_mode": "NULLABLE"},
                     {"name": "name", "bigquery_type": "STRING", "bigquery_mode": "NULLABLE"},
                     {"name": "at", "bigquery_type": "TIMESTAMP", "bigquery_mode": "NULLABLE"}]}
JSON
patch=$(run 4 401)
[ "$(rows_loaded "$patch")" = 4 ] || fail "the file job loaded other than 4 rows: $patch"
grep -q "one BigQuery load job over the files" "$WORK/dispatcher.log" \
    || fail "the file job did not take the fast path (see the dispatcher's plan log)"
bq_query "SELECT id, name, FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%E6S', \`at\`) FROM \`$PROJECT.$DATASET.smoke_files\` ORDER BY id" \
    "$LOCATION" >"$WORK/files.json"
want="11|file 1 one|2024-01-01T10:00:00.000000;12|file 1 two|2024-01-01T11:30:00.500000;21|file 2 one|2024-01-02T10:00:00.000000;22|file 2 two|2024-01-02T11:30:00.500000"
got=$(python3 -c '
import json, sys
answer = json.load(open(sys.argv[1]))
if answer.get("errors"):
    sys.exit(f"BigQuery refused the read-back query: {answer}")
print(";".join("|".join(c["v"] for c in r["f"]) for r in answer.get("rows", [])))' "$WORK/files.json") || fail "smoke_files: $got"
[ "$got" = "$want" ] || fail "smoke_files holds $got, not $want"
say "smoke_files: 4 rows from 2 JSON lines files, loaded by BigQuery from GCS directly"

say "passed ($MODE)"
