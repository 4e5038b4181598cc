#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: start the services the tests need, build
# once into one target directory, run every test once.
set -euo pipefail
cd "$(dirname "$0")/.."

# PostgreSQL 15 on 127.0.0.1:5432 (trust auth) is part of this machine; start it if it stopped.
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "tests/run.sh: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "tests/run.sh: PostgreSQL is not answering on 127.0.0.1:5432; start it with" >&2
  echo "  pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
  exit 1
fi

# MariaDB on 127.0.0.1:3306 (root, no password) is part of this machine too; start it if it stopped.
if ! mysqladmin -h 127.0.0.1 -P 3306 -u root --silent ping >/dev/null 2>&1; then
  echo "tests/run.sh: starting MariaDB"
  service mariadb start >/dev/null 2>&1 || (mysqld_safe >/dev/null 2>&1 &)
  for _ in $(seq 1 30); do mysqladmin -h 127.0.0.1 -P 3306 -u root --silent ping >/dev/null 2>&1 && break; sleep 1; done
fi
if ! mysqladmin -h 127.0.0.1 -P 3306 -u root --silent ping >/dev/null 2>&1; then
  echo "tests/run.sh: MariaDB is not answering on 127.0.0.1:3306; start it with" >&2
  echo "  service mariadb start" >&2
  exit 1
fi

# The Pub/Sub emulator, the GCS emulator and bqemulator (installed into target/emulators on
# first use), and after the build the rules layer in front of bqemulator; the fleet tests read
# their addresses from the environment.
emulators_env="$(mktemp)"
if ! bash tests/emulators.sh start >"$emulators_env" </dev/null; then
  echo "tests/run.sh: the emulators did not start (see target/emulators/*.log)" >&2
  exit 1
fi
# shellcheck disable=SC1090
. "$emulators_env"
# Stop what this run started (SHARDFLOW_KEEP_EMULATORS=1 keeps them for the next run).
if [ -z "${SHARDFLOW_KEEP_EMULATORS:-}" ]; then
  trap 'bash tests/emulators.sh stop' EXIT
fi

cargo fmt --all --check
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
# One build of everything (the end-to-end tests also run the dispatcher binary).
cargo build --locked --workspace --bins --tests
# Every BigQuery request of the suite goes through the strict rules layer just built.
bash tests/emulators.sh rules >"$emulators_env"
# shellcheck disable=SC1090
. "$emulators_env"
rm -f "$emulators_env"
export SHARDFLOW_DISPATCHER_BIN="$target_dir/debug/dispatcher"
log="$(mktemp)"
status=0
# --no-fail-fast: one failing test binary does not hide the others' results.
cargo test --locked --no-fail-fast --workspace --lib --bins --tests 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite (cargo's last line is that of whichever crate ran last).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "shardflow: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
