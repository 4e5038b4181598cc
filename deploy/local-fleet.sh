#!/usr/bin/env bash
# The whole fleet on one machine, against the emulators, in one command:
#
#   bash deploy/local-fleet.sh
#
# It starts the emulators (tests/emulators.sh; kept if they already run) with the strict
# BigQuery rules layer in front of bqemulator when it is built, a stand-in of the Django API
# (deploy/django_standin.py, job configs from examples/django/<id>.json), creates the Pub/Sub
# topics and subscriptions, the BigQuery dataset raw_data, the GCS staging bucket and the
# sample table in PostgreSQL (examples/sample.sql), starts `dispatcher serve` and two
# `worker serve`, publishes a job message as Django does ({"data_source_id", "etl_run_id"} on
# etl-jobs), waits for the run's final status from the stand-in, and prints it, where the data
# landed, the row counts of BigQuery and PostgreSQL and a command to query the table. On exit
# (or Ctrl-C) it stops what it started; the emulators keep running (they are shared with the
# test suite) unless LOCAL_FLEET_STOP_EMULATORS=1. Exits non-zero on any failure.
#
# Knobs (environment):
#   LOCAL_FLEET_ROWS=2000000        rows of the sample table; 0 keeps the table as it is
#   LOCAL_FLEET_TIMEOUT=900         seconds to wait for the run's final status
#   LOCAL_FLEET_DIR=target/local-fleet   logs/ (with the pids file), the stand-in's runs/, state.db
#   LOCAL_FLEET_CONFIGS=examples/django  job configs the stand-in serves, <data source id>.json
#   LOCAL_FLEET_DATA_SOURCE_ID=1    the data source the job message names
#   LOCAL_FLEET_ETL_RUN_ID=<epoch seconds>   the run id the job message names
#   LOCAL_FLEET_DATASET=raw_data    BigQuery dataset
#   LOCAL_FLEET_DJANGO_PORT=8000    the stand-in's port
#   LOCAL_FLEET_METRICS_PORT=9090   the dispatcher's /metrics and /healthz; worker N on +N
#   LOCAL_FLEET_WORKERS=2           worker processes
#   LOCAL_FLEET_STOP_EMULATORS=1    also stop the emulators at the end
#   LOCAL_FLEET_DJANGO_PATCH=accept the stand-in's answer to PATCHes: accept, 503 or hang (a
#                                   Django down for updates; the run's end is then read from
#                                   what the dispatcher sent: bench/django_down.sh)
#   SHARDFLOW_BIN_DIR               dispatcher and worker binaries (default target/release,
#                                   else target/debug)
#   ETL_API_TOKEN=local-fleet-token the Bearer token the stand-in checks (empty: not checked)
#   SHARDFLOW_* and LOG_LEVEL are passed to the binaries (topic names, SHARDFLOW_SHARD_ROWS, …).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STANDIN=$ROOT/deploy/django_standin.py
BIN=${SHARDFLOW_BIN_DIR:-$ROOT/target/release}
[ -x "$BIN/dispatcher" ] || BIN=$ROOT/target/debug
ROWS=${LOCAL_FLEET_ROWS:-2000000}
TIMEOUT=${LOCAL_FLEET_TIMEOUT:-900}
DIR=${LOCAL_FLEET_DIR:-$ROOT/target/local-fleet}
CONFIGS=${LOCAL_FLEET_CONFIGS:-$ROOT/examples/django}
DATA_SOURCE_ID=${LOCAL_FLEET_DATA_SOURCE_ID:-1}
ETL_RUN_ID=${LOCAL_FLEET_ETL_RUN_ID:-$(date +%s)}
DATASET=${LOCAL_FLEET_DATASET:-raw_data}
DJANGO_PORT=${LOCAL_FLEET_DJANGO_PORT:-8000}
METRICS_PORT=${LOCAL_FLEET_METRICS_PORT:-9090}
WORKERS=${LOCAL_FLEET_WORKERS:-2}
DJANGO_PATCH=${LOCAL_FLEET_DJANGO_PATCH:-accept}
BUCKET=shardflow-staging
LOGS=$DIR/logs
RUNS=$DIR/runs
PIDS_FILE=$LOGS/pids
PIDS=()
NAMES=()

say() { echo "local-fleet: $*"; }
fail() { echo "local-fleet: FAILED: $*" >&2; exit 1; }
answers() { curl -s -o /dev/null --max-time 2 "$1"; }
# Whether BIGQUERY_EMULATOR_HOST is the strict rules layer (it marks its answers), not bqemulator.
rules_layer() { curl -s -D - -o /dev/null --max-time 2 "$BIGQUERY_EMULATOR_HOST/rules" | grep -qi '^x-shardflow-rules'; }

# Stops what this script started: SIGTERM (the dispatcher drains, workers finish their
# shards), SIGKILL after 20 s; the Django stand-in last, as the dispatcher may still PATCH.
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [ "${#PIDS[@]}" -gt 0 ]; then
        local i pid
        for i in "${!PIDS[@]}"; do
            [ "${NAMES[$i]}" = django-standin ] || kill -TERM "${PIDS[$i]}" 2>/dev/null
        done
        for _ in $(seq 100); do
            local alive=0
            for i in "${!PIDS[@]}"; do
                [ "${NAMES[$i]}" = django-standin ] && continue
                kill -0 "${PIDS[$i]}" 2>/dev/null && alive=1
            done
            [ "$alive" = 0 ] && break
            sleep 0.2
        done
        for i in "${!PIDS[@]}"; do
            pid=${PIDS[$i]}
            if [ "${NAMES[$i]}" != django-standin ] && kill -0 "$pid" 2>/dev/null; then
                echo "local-fleet: ${NAMES[$i]} (pid $pid) did not stop within 20 s; killing it" >&2
                kill -KILL "$pid" 2>/dev/null
            fi
        done
        for i in "${!PIDS[@]}"; do
            [ "${NAMES[$i]}" = django-standin ] && kill -TERM "${PIDS[$i]}" 2>/dev/null
        done
        for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
        say "stopped ${NAMES[*]}"
    fi
    if [ "${LOCAL_FLEET_STOP_EMULATORS:-}" = 1 ]; then
        bash "$ROOT/tests/emulators.sh" stop
        say "stopped the emulators"
    elif [ -n "${EMULATORS_UP:-}" ]; then
        say "the emulators keep running (shared with the test suite): bash tests/emulators.sh stop"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'echo "local-fleet: interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

# start NAME LOG COMMAND…: runs it in the background, records its pid.
start() {
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    PIDS+=($!)
    NAMES+=("$name")
    echo "$name $!" >>"$PIDS_FILE"
}

# wait_healthy NAME PID URL LOG: until URL answers (any HTTP status), failing if the process
# dies or 60 s pass.
wait_healthy() {
    local name=$1 pid=$2 url=$3 log=$4
    for _ in $(seq 300); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "--- $log" >&2; tail -20 "$log" >&2
            fail "$name exited at start"
        fi
        answers "$url" && return 0
        sleep 0.2
    done
    echo "--- $log" >&2; tail -20 "$log" >&2
    fail "$name did not answer $url within 60 s"
}

# listening PORT: whether something accepts connections on 127.0.0.1:PORT.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- Checks before anything starts. ----------------------------------------------------------
for tool in curl psql python3 "$BIN/dispatcher" "$BIN/worker"; do
    command -v "$tool" >/dev/null || fail "$tool is missing (binaries: cargo build --workspace --bins, or set SHARDFLOW_BIN_DIR)"
done
[[ $ROWS =~ ^[0-9]+$ ]] || fail "LOCAL_FLEET_ROWS must be a number of rows, not $ROWS"
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || fail "LOCAL_FLEET_WORKERS must be a positive number, not $WORKERS"
[[ $ETL_RUN_ID =~ ^[0-9]+$ ]] || fail "LOCAL_FLEET_ETL_RUN_ID must be a number, not $ETL_RUN_ID"
case $DJANGO_PATCH in
    accept|503|hang) ;;
    *) fail "LOCAL_FLEET_DJANGO_PATCH must be accept, 503 or hang, not $DJANGO_PATCH" ;;
esac
CONFIG=$CONFIGS/$DATA_SOURCE_ID.json
[ -f "$CONFIG" ] || fail "no job config $CONFIG for data source $DATA_SOURCE_ID"
# The source and destination the config names; psql connects as the config says.
eval "$(python3 - "$CONFIG" <<'PY'
import json, shlex, sys
config = json.load(open(sys.argv[1]))
params = config.get("connection_params") or {}
values = {
    "SOURCE_TYPE": config.get("source_type", ""),
    "PGHOST": params.get("host", "127.0.0.1"),
    "PGPORT": str(params.get("port", 5432)),
    "PGDATABASE": params.get("database", ""),
    "PGUSER": params.get("username", ""),
    "PGPASSWORD": params.get("password", ""),
    "SOURCE_SCHEMA": config.get("schema_name") or "public",
    "SOURCE_TABLE": config.get("source_table_name", ""),
    "DEST_TABLE": config.get("dest_table_name", ""),
}
for name, value in values.items():
    print(f"{name}={shlex.quote(str(value))}")
PY
)"
[ "$SOURCE_TYPE" = postgresql ] || fail "$CONFIG: source_type is $SOURCE_TYPE; this script counts rows in PostgreSQL"
export PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD
pg_isready -h "$PGHOST" -p "$PGPORT" -q \
    || fail "PostgreSQL is not answering on $PGHOST:$PGPORT; start it: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start"

# One local fleet per directory: a previous one still running would share its topics.
if [ -f "$PIDS_FILE" ]; then
    while read -r name pid; do
        if kill -0 "$pid" 2>/dev/null; then
            fail "$name (pid $pid) of a local fleet started earlier from $DIR is still running; stop it first"
        fi
    done <"$PIDS_FILE"
fi
for port in "$DJANGO_PORT" $(seq "$METRICS_PORT" $((METRICS_PORT + WORKERS))); do
    if listening "$port"; then
        fail "port $port is in use; choose others with LOCAL_FLEET_DJANGO_PORT / LOCAL_FLEET_METRICS_PORT"
    fi
done
rm -rf "$LOGS" "$RUNS" "$DIR/state.db" "$DIR/state.db-wal" "$DIR/state.db-shm"
mkdir -p "$LOGS" "$RUNS"
: >"$PIDS_FILE"

# --- The emulators (and the rules layer in front of bqemulator). --------------------------
emulators_env() { bash "$ROOT/tests/emulators.sh" env 2>/dev/null; }
eval "$(emulators_env)"
RULES_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/bq-rules
if answers "http://$PUBSUB_EMULATOR_HOST/" && answers "$STORAGE_EMULATOR_HOST/storage/v1/b" \
    && answers "$SHARDFLOW_BQEMULATOR_URL/bigquery/v2/projects/$GCP_PROJECT_ID/datasets"; then
    say "the emulators are running"
    if ! rules_layer && [ -x "$RULES_BIN" ]; then
        bash "$ROOT/tests/emulators.sh" rules >/dev/null 2>"$LOGS/emulators.log" \
            || fail "the rules layer did not start: $(tail -5 "$LOGS/emulators.log")"
    fi
else
    say "starting the emulators (tests/emulators.sh start; the first time installs them, minutes)"
    bash "$ROOT/tests/emulators.sh" start >/dev/null 2>"$LOGS/emulators.log" \
        || fail "the emulators did not start: $(tail -5 "$LOGS/emulators.log") (more in target/test-logs/emulator-*.log)"
fi
EMULATORS_UP=1
eval "$(emulators_env)"
if ! rules_layer; then
    say "warning: the strict BigQuery rules layer is not built (cargo build -p shardflow-tests --bin bq-rules); BigQuery calls go to bqemulator itself"
fi
PROJECT=$GCP_PROJECT_ID
BQ=${BIGQUERY_EMULATOR_HOST%/}/bigquery/v2
PUBSUB=http://$PUBSUB_EMULATOR_HOST/v1
export BIGQUERY_DATASET=$DATASET BIGQUERY_LOCATION=${BIGQUERY_LOCATION:-US}

# --- What the fleet needs: topics, dataset, bucket, the source table. ----------------------
"$BIN/dispatcher" pubsub-setup --project "$PROJECT" >"$LOGS/pubsub-setup.log" 2>&1 \
    || fail "pubsub-setup: $(tail -5 "$LOGS/pubsub-setup.log")"
# Messages an earlier fleet left unacked (a run stopped with Ctrl-C) are dropped, not run
# again: each subscription is sought to now. subscriptions.seek: "Messages retained in the
# subscription that were published before this time are marked as acknowledged".
now=$(date -u +%Y-%m-%dT%H:%M:%S.000Z)
for sub in "${SHARDFLOW_JOBS_SUBSCRIPTION:-etl-jobs-dispatcher}" \
    "${SHARDFLOW_SHARDS_SUBSCRIPTION:-etl-shards-workers}" \
    "${SHARDFLOW_RESULTS_SUBSCRIPTION:-etl-shard-results-dispatcher}" \
    "${SHARDFLOW_DEAD_LETTER_SUBSCRIPTION:-etl-shards-dead-letter-dispatcher}"; do
    curl -sSf -o /dev/null -X POST -H 'content-type: application/json' -d "{\"time\": \"$now\"}" \
        "$PUBSUB/projects/$PROJECT/subscriptions/$sub:seek" || fail "seek $sub to now"
done

# create URL BODY WHAT: POST, where 409 (it exists) is fine: datasets.insert and buckets.insert
# answer 409 Conflict for a name that exists. A US bucket is one a US dataset loads from.
create() {
    local status
    status=$(curl -sS -o "$LOGS/create.answer" -w '%{http_code}' -X POST \
        -H 'content-type: application/json' --data-binary "$2" "$1") || fail "$3: no answer from $1"
    case $status in
        2*|409) ;;
        *) fail "$3: HTTP $status: $(cat "$LOGS/create.answer")" ;;
    esac
}
create "$BQ/projects/$PROJECT/datasets" \
    "{\"datasetReference\": {\"projectId\": \"$PROJECT\", \"datasetId\": \"$DATASET\"}, \"location\": \"$BIGQUERY_LOCATION\"}" \
    "dataset $DATASET"
create "$STORAGE_EMULATOR_HOST/storage/v1/b?project=$PROJECT" \
    "{\"name\": \"$BUCKET\", \"location\": \"$BIGQUERY_LOCATION\"}" "bucket $BUCKET"

if [ "$ROWS" != 0 ]; then
    say "creating $SOURCE_SCHEMA.$SOURCE_TABLE with $ROWS rows (examples/sample.sql)"
    psql -q -v ON_ERROR_STOP=1 -v rows="$ROWS" -f "$ROOT/examples/sample.sql" >"$LOGS/sample.log" 2>&1 \
        || fail "examples/sample.sql: $(tail -5 "$LOGS/sample.log")"
fi
quoted_table="\"${SOURCE_SCHEMA//\"/\"\"}\".\"${SOURCE_TABLE//\"/\"\"}\""
PG_ROWS=$(psql -At -v ON_ERROR_STOP=1 -c "SELECT count(*) FROM $quoted_table" 2>"$LOGS/count.log") \
    || fail "counting $SOURCE_SCHEMA.$SOURCE_TABLE: $(cat "$LOGS/count.log")"

# --- Django, the dispatcher, the workers. ---------------------------------------------------
export ETL_API_TOKEN=${ETL_API_TOKEN-local-fleet-token}
DJANGO_STANDIN_PATCH=$DJANGO_PATCH \
    start django-standin "$LOGS/django-standin.log" python3 "$STANDIN" serve "$CONFIGS" "$RUNS" "$DJANGO_PORT"
export DJANGO_API_URL=http://127.0.0.1:$DJANGO_PORT
wait_healthy "the Django stand-in" "${PIDS[-1]}" "$DJANGO_API_URL/" "$LOGS/django-standin.log"
curl -sSf -o /dev/null -H "authorization: Bearer $ETL_API_TOKEN" \
    "$DJANGO_API_URL/api/etl/job-config/$DATA_SOURCE_ID/" \
    || fail "the Django stand-in does not serve job config $DATA_SOURCE_ID (see $LOGS/django-standin.log)"

export GCP_PROJECT_ID=$PROJECT
export SHARDFLOW_STAGING=gs://$BUCKET/local-fleet SHARDFLOW_STATE=sqlite://$DIR/state.db
export SHARDFLOW_METRICS_HOST=127.0.0.1 SHARDFLOW_DRAIN_SECS=${SHARDFLOW_DRAIN_SECS:-10}
export LOG_LEVEL=${LOG_LEVEL:-info}
SHARDFLOW_METRICS_PORT=$METRICS_PORT start dispatcher "$LOGS/dispatcher.log" "$BIN/dispatcher" serve
wait_healthy dispatcher "${PIDS[-1]}" "http://127.0.0.1:$METRICS_PORT/healthz" "$LOGS/dispatcher.log"
for n in $(seq "$WORKERS"); do
    HOSTNAME=local-worker-$n SHARDFLOW_METRICS_PORT=$((METRICS_PORT + n)) \
        start "worker-$n" "$LOGS/worker-$n.log" "$BIN/worker" serve
    wait_healthy "worker-$n" "${PIDS[-1]}" "http://127.0.0.1:$((METRICS_PORT + n))/healthz" "$LOGS/worker-$n.log"
done
say "running: Django stand-in $DJANGO_API_URL, dispatcher :$METRICS_PORT, $WORKERS workers :$((METRICS_PORT + 1))..:$((METRICS_PORT + WORKERS)) (/metrics, /healthz), logs in $LOGS"

# --- The job message, as Django publishes it. ------------------------------------------------
# topics.publish: PubsubMessage.data is "A base64-encoded string"; attribute values are strings.
JOBS_TOPIC=${SHARDFLOW_JOBS_TOPIC:-etl-jobs}
published_at=$(date +%s.%N)
data=$(printf '{"data_source_id":%s,"etl_run_id":%s}' "$DATA_SOURCE_ID" "$ETL_RUN_ID" | base64 | tr -d '\n')
curl -sSf -o "$LOGS/publish.answer" -X POST -H 'content-type: application/json' \
    --data-binary "{\"messages\": [{\"data\": \"$data\", \"attributes\": {\"data_source_id\": \"$DATA_SOURCE_ID\", \"etl_run_id\": \"$ETL_RUN_ID\"}}]}" \
    "$PUBSUB/projects/$PROJECT/topics/$JOBS_TOPIC:publish" || fail "publishing the job message to $JOBS_TOPIC"
say "published {\"data_source_id\": $DATA_SOURCE_ID, \"etl_run_id\": $ETL_RUN_ID} to $JOBS_TOPIC; waiting for the run (at most $TIMEOUT s)"

WAIT_ARGS=()
[ "$DJANGO_PATCH" = accept ] || WAIT_ARGS=(--sent)
set +e
python3 "$STANDIN" wait "$RUNS" "$ETL_RUN_ID" "$TIMEOUT" "${WAIT_ARGS[@]}" >"$LOGS/final-status.json"
waited=$?
set -e
heard_at=$(date +%s.%N)
if [ "$waited" != 0 ]; then
    cat "$LOGS/final-status.json" >&2
    echo "--- $LOGS/dispatcher.log" >&2; tail -40 "$LOGS/dispatcher.log" >&2
    for n in $(seq "$WORKERS"); do
        echo "--- $LOGS/worker-$n.log" >&2; tail -10 "$LOGS/worker-$n.log" >&2
    done
    if [ "$waited" = 1 ]; then fail "run $ETL_RUN_ID failed"; fi
    fail "run $ETL_RUN_ID: no final status within $TIMEOUT s"
fi
# When the run ended: its finished_at in the dispatcher's state store (the same clock), which
# does not wait on Django; and when Django heard it (the stand-in's record of the final PATCH).
run_seconds=$(python3 - "$DIR/state.db" "etl-$ETL_RUN_ID" "$published_at" <<'PY'
import datetime, sqlite3, sys
row = sqlite3.connect(sys.argv[1]).execute(
    "SELECT finished_at FROM shardflow_runs WHERE job_key = ? AND finished_at IS NOT NULL "
    "ORDER BY finished_at DESC LIMIT 1", (sys.argv[2],)).fetchone()
if row is None:
    sys.exit("the state store has no finished run of this job")
finished = datetime.datetime.fromisoformat(row[0].replace("Z", "+00:00")).timestamp()
print(f"{finished - float(sys.argv[3]):.1f}")
PY
) || fail "reading the run's end from $DIR/state.db"
say "run $ETL_RUN_ID completed in $run_seconds s (from the job message to the run's end in the state store); the final status reached the Django stand-in after $(python3 -c "print(f'{$heard_at - $published_at:.1f}')") s"
if [ "$DJANGO_PATCH" = accept ]; then
    say "the run as Django holds it:"
else
    say "Django is down for updates (DJANGO_STANDIN_PATCH=$DJANGO_PATCH): what the dispatcher sent, which Django did not take:"
fi
cat "$LOGS/final-status.json"
for n in $(seq "$WORKERS"); do
    say "worker-$n extracted $(grep -c 'shard extracted' "$LOGS/worker-$n.log" || true) shard(s)"
done
# Peak resident memory of each process so far (VmHWM), as the kernel counts it.
peaks=()
for i in "${!PIDS[@]}"; do
    [ "${NAMES[$i]}" = django-standin ] && continue
    hwm=$(awk '/^VmHWM:/ {print int($2 / 1024)}' "/proc/${PIDS[$i]}/status" 2>/dev/null || true)
    peaks+=("${NAMES[$i]} ${hwm:-?} MB")
done
say "peak RSS: $(IFS=,; echo "${peaks[*]}" | sed 's/,/, /g')"

# --- What landed in BigQuery. ----------------------------------------------------------------
SQL="SELECT COUNT(*) AS n FROM \`$PROJECT.$DATASET.$DEST_TABLE\`"
BODY=$(python3 -c 'import json, sys; print(json.dumps({"query": sys.argv[1], "useLegacySql": False}))' "$SQL")
# jobs.query: useLegacySql "The default value is true", so standard SQL is asked for.
QUERY_URL="$BQ/projects/$PROJECT/queries"
BQ_ROWS=$(curl -sS -X POST -H 'content-type: application/json' --data-binary "$BODY" "$QUERY_URL" \
    | python3 -c 'import json, sys; a = json.load(sys.stdin); print(a["rows"][0]["f"][0]["v"]) if "rows" in a else sys.exit(f"BigQuery answered {a}")') \
    || fail "counting $PROJECT.$DATASET.$DEST_TABLE in BigQuery"
ROWS_LOADED=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("rows_loaded"))' "$LOGS/final-status.json")
say "loaded into BigQuery (emulator $BIGQUERY_EMULATOR_HOST): project $PROJECT, dataset $DATASET, table $DEST_TABLE"
say "rows: $BQ_ROWS in BigQuery $PROJECT.$DATASET.$DEST_TABLE, $PG_ROWS in PostgreSQL $SOURCE_SCHEMA.$SOURCE_TABLE, rows_loaded $ROWS_LOADED"
say "query it (the emulators keep running after this script):"
q="'" escaped="'\\''"   # the body in single quotes, a quote in it as '\''
printf "curl -s -X POST -H 'content-type: application/json' -d '%s' %s\n" "${BODY//$q/$escaped}" "$QUERY_URL"
[ "$BQ_ROWS" = "$PG_ROWS" ] || fail "BigQuery holds $BQ_ROWS rows, PostgreSQL $PG_ROWS"
[ "$ROWS_LOADED" = "$PG_ROWS" ] || fail "the run reported rows_loaded $ROWS_LOADED, PostgreSQL holds $PG_ROWS"
say "passed"
