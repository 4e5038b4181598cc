#!/usr/bin/env bash
# The whole test suite, as the README and CI run it: start the services the tests need, build
# once into one target directory, run every test once; then check the run left PostgreSQL and
# MariaDB as it found them, and say how long each test binary took and how big target/ is.
set -euo pipefail
cd "$(dirname "$0")/.."

# Nothing of a run is written outside the repository: temporary files (std::env::temp_dir,
# mktemp) go to target/test-tmp, emptied first, and every log to target/test-logs (the tests'
# own, cargo test's output as cargo-test.log, the emulators': tests/emulators.sh).
logs="${SHARDFLOW_TEST_LOGS:-$PWD/target/test-logs}"
export SHARDFLOW_TEST_LOGS="$logs"
tmp="$PWD/target/test-tmp"
rm -rf "$tmp"
mkdir -p "$tmp" "$logs"
# The last run's test logs go (the emulators' stay: those emulators may still be running).
rm -f "$logs"/e2e-*.log "$logs/cargo-test.log"

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
emulators_env="$(mktemp -p "$tmp")"
if ! bash tests/emulators.sh start >"$emulators_env" </dev/null; then
  echo "tests/run.sh: the emulators did not start (see $logs/emulator-*.log)" >&2
  exit 1
fi
# shellcheck disable=SC1090
. "$emulators_env"
# Stop what this run started (SHARDFLOW_KEEP_EMULATORS=1 keeps them for the next run).
if [ -z "${SHARDFLOW_KEEP_EMULATORS:-}" ]; then
  trap 'bash tests/emulators.sh stop' EXIT
fi

# (Only now: the services started above are not to keep their temporary files here.)
export TMPDIR="$tmp"
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
log="$logs/cargo-test.log"
status=0
# What PostgreSQL and MariaDB hold before the tests: the run must leave them so.
inventory="$TMPDIR/inventory"
mkdir -p "$inventory"
bash tests/emulators.sh inventory >"$inventory/before"
started=$SECONDS
# --no-fail-fast: one failing test binary does not hide the others' results.
cargo test --locked --no-fail-fast --workspace --lib --bins --tests 2>&1 | tee "$log" || status=$?
test_seconds=$((SECONDS - started))

# What the tests left in PostgreSQL and MariaDB (each drops what it makes, also when it fails),
# then what is still there once tests/emulators.sh clean dropped the names the suite uses.
bash tests/emulators.sh inventory >"$inventory/after-tests"
# The lines of $1 not in $2, those inside a database or schema also listed left out (counted).
new_in() {
  LC_ALL=C comm -13 "$2" "$1" | awk '
    { line[NR] = $0; server[NR] = $1; kind[NR] = $2; name[NR] = $3; listed[$1 " " $2 " " $3] = 1 }
    END {
      for (i = 1; i <= NR; i++) {
        n = split(name[i], part, ".")
        parent = ""
        if (kind[i] != "database" && kind[i] != "role" && kind[i] != "user" && n > 1) {
          if ((server[i] " database " part[1]) in listed) parent = server[i] " database " part[1]
          else if (kind[i] != "schema" && n > 2 && (server[i] " schema " part[1] "." part[2]) in listed)
            parent = server[i] " schema " part[1] "." part[2]
        }
        if (parent != "") inside[parent]++; else shown[i] = 1
      }
      for (i = 1; i <= NR; i++) if (i in shown) {
        extra = (line[i] in inside) ? sprintf(" (with %d more in it)", inside[line[i]]) : ""
        print "  " line[i] extra
      }
    }'
}
left="$(new_in "$inventory/after-tests" "$inventory/before")"
if [ -n "$left" ]; then
  echo "tests/run.sh: the tests left these behind in PostgreSQL/MariaDB (dropped below):"
  echo "$left"
  status=1
fi
if ! bash tests/emulators.sh clean; then
  echo "tests/run.sh: tests/emulators.sh clean could not drop all of it (above)"
  status=1
fi
bash tests/emulators.sh inventory >"$inventory/after"
still="$(new_in "$inventory/after" "$inventory/before")"
gone="$(new_in "$inventory/before" "$inventory/after")"

# The closing lines: the time of each test binary (cargo prints "Running <source> (<binary>)",
# then its "test result: … finished in <s>s"), the size of target/, what the servers were left
# with, and one line for the whole suite (cargo's last line is that of whichever crate ran last).
echo "tests/run.sh: time per test binary (cargo test took ${test_seconds} s in all):"
awk '
  function record(result) { printf "%s\t%s\t%s\n", secs, binary " (" source ")", result }
  /^ +Running / {
    if (binary != "" && !done) { secs = "?"; record("no test result: it did not finish") }
    source = $0; sub(/^ +Running /, "", source); sub(/ \(.*$/, "", source)
    binary = $0; sub(/^.*\(/, "", binary); sub(/\)$/, "", binary); sub(/^.*\//, "", binary)
    sub(/-[0-9a-f]+$/, "", binary)
    done = 0
  }
  /^test result:/ && binary != "" && !done {
    secs = $0; sub(/^.*finished in /, "", secs); sub(/s$/, "", secs)
    passed = failed = 0
    for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) passed = $i; if ($(i+1) ~ /^failed/) failed = $i }
    record(passed " passed, " failed " failed")
    done = 1
  }
  END { if (binary != "" && !done) { secs = "?"; record("no test result: it did not finish") } }
' "$log" | sort -t "$(printf '\t')" -k1,1gr | awk -F '\t' '{ printf "  %8s s  %-58s %s\n", $1, $2, $3 }'
# (du once: each entry of target/ and the total.)
du -shc "$PWD/target"/* 2>/dev/null | sort -rh | awk '
  $2 == "total" { total = $1; next }
  { n = split($2, p, "/"); parts = parts (parts == "" ? "" : ", ") p[n] " " $1 }
  END { printf "tests/run.sh: target/ holds %s (%s)\n", total, parts }'
if [ -n "$gone" ]; then
  echo "tests/run.sh: gone since the run began (an earlier run's leftovers, dropped by the tests or the clean-up):"
  echo "$gone"
fi
if [ -n "$still" ]; then
  echo "tests/run.sh: PostgreSQL/MariaDB are not as the run found them; still there:"
  echo "$still"
  echo "  (a name tests/emulators.sh clean does not know: the test that makes it should drop it)"
  status=1
else
  echo "tests/run.sh: PostgreSQL and MariaDB are as the run found them$([ -z "$gone" ] || echo ", less the leftovers above") ($(wc -l <"$inventory/before") databases, schemas, tables, roles and users compared; logs in $logs)"
fi
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "shardflow: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
