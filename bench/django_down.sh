#!/usr/bin/env bash
# Benchmark: a fleet run with Django down for updates against the same run with Django up
# (issue 19: reporting never slows a run; target: down <= 1.2 x up).
#
# Each round runs the whole local fleet (deploy/local-fleet.sh: the emulators, the Django
# stand-in, `dispatcher serve`, two `worker serve`, release binaries) three times over the same
# table, in turn:
#   up     the stand-in takes every PATCH;
#   503    it answers every PATCH 503 Service Unavailable;
#   hang   it reads every PATCH and never answers (the worst case: each try waits for its
#          timeout).
# Job configs are served in all three, so the run starts the same way. The figure is the time
# from publishing the job message to the run's end as the dispatcher's state store records it
# (the data loaded and counted, the final status recorded for Django, the job message about
# to be acked); each run's BigQuery row count is checked against PostgreSQL by local-fleet.sh
# itself. Also shown: when the final status first reached the stand-in (with Django hanging,
# the dispatcher waits for the progress PATCH in flight to time out first, so that a stale
# "running" can never land after "completed").
#
#   bench/django_down.sh [ROWS] [ROUNDS]     (default 2,000,000 rows, 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-2000000}"
rounds="${2:-3}"
out=bench/out/django_down
mkdir -p "$out"
rm -f "$out"/*.log "$out"/times.tsv

cargo build --release --locked --bins -p shardflow-dispatcher -p shardflow-worker
# The strict BigQuery rules layer in front of bqemulator, as the suite runs it.
cargo build --locked -p shardflow-tests --bin bq-rules

create_rows=$rows
modes=(up 503 hang)
for round in $(seq "$rounds"); do
    # The order turns each round, so no mode always runs first (after the table was made,
    # or after the previous fleet's shutdown).
    shift_by=$(( (round - 1) % 3 ))
    for mode in "${modes[@]:$shift_by}" "${modes[@]:0:$shift_by}"; do
        patch=$mode
        [ "$mode" = up ] && patch=accept
        log="$out/$mode-$round.log"
        # The table is made by the first run only; the others load it as it is.
        if ! LOCAL_FLEET_ROWS=$create_rows LOCAL_FLEET_DJANGO_PATCH=$patch \
            LOCAL_FLEET_DIR="$PWD/target/bench-django-down" SHARDFLOW_BIN_DIR="$PWD/target/release" \
            LOG_LEVEL=info bash deploy/local-fleet.sh >"$log" 2>&1; then
            tail -30 "$log" >&2
            echo "django_down: the $mode run of round $round failed (log: $log)" >&2
            exit 1
        fi
        create_rows=0
        seconds=$(sed -n 's/^local-fleet: run [0-9]* completed in \([0-9.]*\) s.*/\1/p' "$log")
        heard=$(sed -n 's/.*reached the Django stand-in after \([0-9.]*\) s.*/\1/p' "$log")
        peak=$(sed -n 's/^local-fleet: peak RSS: //p' "$log")
        [ -n "$seconds" ] || { echo "django_down: no run time in $log" >&2; exit 1; }
        printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$seconds" "$heard" "$peak" >>"$out/times.tsv"
        printf 'round %s  %-4s  run %6.1f s   final status at the stand-in %6.1f s   peak RSS %s\n' \
            "$round" "$mode" "$seconds" "$heard" "$peak"
    done
done

python3 - "$out/times.tsv" "$rows" <<'PY'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    _, mode, seconds, _, _ = line.rstrip("\n").split("\t")
    times.setdefault(mode, []).append(float(seconds))
median = {mode: statistics.median(values) for mode, values in times.items()}
print(f"rows {int(sys.argv[2]):,}, {len(times['up'])} rounds; median seconds from the job message to the run's end:")
for mode in ("up", "503", "hang"):
    values = ", ".join(f"{v:.1f}" for v in times[mode])
    print(f"  Django {mode:<4}  {median[mode]:6.1f} s   ({values})")
worst = 0.0
for mode in ("503", "hang"):
    ratio = median[mode] / median["up"]
    worst = max(worst, ratio)
    print(f"  {mode} / up   {ratio:.2f}  (target <= 1.2)")
sys.exit(0 if worst <= 1.2 else 1)
PY
