#!/usr/bin/env bash
# Cloud Scheduler jobs that trigger shardflow runs on a cron, by publishing a job message to
# Pub/Sub topic etl-jobs. Idempotent: an existing Scheduler job is updated, a missing one created.
#
#   GCP_PROJECT_ID=my-project SCHEDULER_LOCATION=europe-central2 bash deploy/scheduler.sh
#
# or, for one data source:
#
#   source deploy/scheduler.sh --functions-only
#   schedule_etl 123 "0 2 * * *" Europe/Warsaw
#
# A scheduled message carries only data_source_id: {"data_source_id": 123}. The dispatcher
# fetches the job config from Django, and the run gets its own id (no etl_run_id), so no PATCH
# is sent to Django for scheduled runs; follow them in the logs and metrics. To have Django
# track scheduled runs, let Django create the ETLRun and publish instead (deploy/django_publisher.py).
#
# Cloud Scheduler publishes as its service agent
# (service-PROJECT_NUMBER@gcp-sa-cloudscheduler.iam.gserviceaccount.com), which needs
# roles/pubsub.publisher on etl-jobs: deploy/iam.sh grants it.

# schedule_etl DATA_SOURCE_ID "CRON (5 fields)" [TIME_ZONE]
schedule_etl() {
    local data_source_id=$1 cron=$2 tz=${3:-${SCHEDULER_TIME_ZONE:-Etc/UTC}}
    local project=${GCP_PROJECT_ID:?set GCP_PROJECT_ID}
    local location=${SCHEDULER_LOCATION:?set SCHEDULER_LOCATION (e.g. europe-central2)}
    local topic=${SHARDFLOW_JOBS_TOPIC:-etl-jobs}
    local name="shardflow-etl-${data_source_id}"
    local body="{\"data_source_id\": ${data_source_id}}"

    if ! [[ "$data_source_id" =~ ^[0-9]+$ ]]; then
        echo "scheduler: data_source_id must be an integer, got '$data_source_id'" >&2
        return 2
    fi
    local -a fields
    read -r -a fields <<<"$cron"
    if [ "${#fields[@]}" -ne 5 ]; then
        echo "scheduler: '$cron' is not a 5-field cron (minute hour day-of-month month day-of-week)" >&2
        return 2
    fi

    if gcloud scheduler jobs describe "$name" --project="$project" --location="$location" \
        >/dev/null 2>&1; then
        gcloud scheduler jobs update pubsub "$name" --project="$project" --location="$location" \
            --quiet \
            --schedule="$cron" --time-zone="$tz" --topic="$topic" \
            --message-body="$body" --update-attributes="data_source_id=${data_source_id}" \
            --description="shardflow: load data source ${data_source_id}" >/dev/null || return 1
        echo "scheduler job $name: updated ($cron, $tz)"
    else
        gcloud scheduler jobs create pubsub "$name" --project="$project" --location="$location" \
            --quiet \
            --schedule="$cron" --time-zone="$tz" --topic="$topic" \
            --message-body="$body" --attributes="data_source_id=${data_source_id}" \
            --description="shardflow: load data source ${data_source_id}" >/dev/null || return 1
        echo "scheduler job $name: created ($cron, $tz)"
    fi
}

# unschedule_etl DATA_SOURCE_ID  (no error when it does not exist)
unschedule_etl() {
    local name="shardflow-etl-$1"
    if gcloud scheduler jobs describe "$name" --project="${GCP_PROJECT_ID:?}" \
        --location="${SCHEDULER_LOCATION:?}" >/dev/null 2>&1; then
        gcloud scheduler jobs delete "$name" --project="$GCP_PROJECT_ID" \
            --location="$SCHEDULER_LOCATION" --quiet || return 1
    fi
}

# Sourced with --functions-only: define the functions, leave the caller's shell options alone.
if [ "${1:-}" = "--functions-only" ]; then
    # shellcheck disable=SC2317  # exit is reached when the script is executed, not sourced
    return 0 2>/dev/null || exit 0
fi
set -euo pipefail

# Examples: edit to taste. Run one now with
#   gcloud scheduler jobs run shardflow-etl-123 --location="$SCHEDULER_LOCATION"
schedule_etl 123 "0 2 * * *" "Europe/Warsaw"    # daily at 02:00 Warsaw time
schedule_etl 124 "15 * * * *" "Etc/UTC"         # hourly at :15
schedule_etl 125 "30 6 * * 1" "Europe/Warsaw"   # Mondays at 06:30
