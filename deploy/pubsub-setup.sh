#!/usr/bin/env bash
# Creates shardflow's Pub/Sub topics and subscriptions. Idempotent: run it as often as you like;
# what exists is updated to the settings below, what is missing is created.
#
#   GCP_PROJECT_ID=my-project bash deploy/pubsub-setup.sh
#
#   topic                    subscription                        pulled by    ack deadline
#   etl-jobs                 etl-jobs-dispatcher                 dispatcher   600 s
#   etl-shards               etl-shards-workers                  workers       60 s (+ dead letter, retry policy)
#   etl-shard-results        etl-shard-results-dispatcher        dispatcher    60 s
#   etl-shards-dead-letter   etl-shards-dead-letter-dispatcher   dispatcher    60 s
#
# `dispatcher pubsub-setup` does the same from the binary (same names, same settings, same
# environment overrides), e.g. as a Kubernetes Job or against the emulator. Two differences:
# the binary only creates what is missing (this script also brings existing subscriptions back
# to these settings), and only this script grants the Pub/Sub service agent what dead-lettering
# needs (that takes IAM admin rights).
#
# Environment (all optional except GCP_PROJECT_ID):
#   SHARDFLOW_JOBS_TOPIC, SHARDFLOW_JOBS_SUBSCRIPTION, SHARDFLOW_SHARDS_TOPIC,
#   SHARDFLOW_SHARDS_SUBSCRIPTION, SHARDFLOW_RESULTS_TOPIC, SHARDFLOW_RESULTS_SUBSCRIPTION,
#   SHARDFLOW_DEAD_LETTER_TOPIC, SHARDFLOW_DEAD_LETTER_SUBSCRIPTION   names (defaults above)
#   MAX_DELIVERY_ATTEMPTS (or SHARDFLOW_MAX_DELIVERY_ATTEMPTS)  deliveries of a failing shard
#                                 before it is dead-lettered and its run fails (5..100, default 5)
#   SHARDFLOW_ACK_DEADLINE_SECS   ack deadline of etl-shards-workers (default 60; workers extend
#                                 the lease every SHARDFLOW_LEASE_SECS while a shard runs)
#   SHARDFLOW_JOBS_ACK_DEADLINE_SECS  ack deadline of etl-jobs-dispatcher (default 600)
#   PUBSUB_EMULATOR_HOST          when set, talk to the emulator and skip the IAM steps
set -euo pipefail

PROJECT_ID=${GCP_PROJECT_ID:?set GCP_PROJECT_ID}

# shellcheck source=deploy/names.sh
. "$(dirname "$0")/names.sh"
MAX_DELIVERY_ATTEMPTS=${MAX_DELIVERY_ATTEMPTS:-${SHARDFLOW_MAX_DELIVERY_ATTEMPTS:-5}}
SHARDS_ACK_DEADLINE=${SHARDFLOW_ACK_DEADLINE_SECS:-60}
JOBS_ACK_DEADLINE=${SHARDFLOW_JOBS_ACK_DEADLINE_SECS:-600}

if ! [[ "$MAX_DELIVERY_ATTEMPTS" =~ ^[0-9]+$ ]] || ((MAX_DELIVERY_ATTEMPTS < 5 || MAX_DELIVERY_ATTEMPTS > 100)); then
    echo "pubsub-setup: MAX_DELIVERY_ATTEMPTS must be 5..100 (Pub/Sub's range), got $MAX_DELIVERY_ATTEMPTS" >&2
    exit 2
fi
for deadline in "$SHARDS_ACK_DEADLINE" "$JOBS_ACK_DEADLINE"; do
    if ! [[ "$deadline" =~ ^[0-9]+$ ]] || ((deadline < 10 || deadline > 600)); then
        echo "pubsub-setup: ack deadlines must be 10..600 seconds, got $deadline" >&2
        exit 2
    fi
done

# Subscriptions never expire for inactivity (the default is 31 days without a subscriber).
UPDATE_EXPIRY=(--expiration-period=never)
if [ -n "${PUBSUB_EMULATOR_HOST:-}" ]; then
    # gcloud does not read PUBSUB_EMULATOR_HOST itself; point its Pub/Sub endpoint there. It
    # still wants a credential, which the emulator ignores.
    export CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB="http://${PUBSUB_EMULATOR_HOST}/"
    if [ -z "${CLOUDSDK_AUTH_ACCESS_TOKEN_FILE:-}" ] \
        && [ -z "$(gcloud auth list --filter=status:ACTIVE --format='value(account)' 2>/dev/null)" ]; then
        token_file=$(mktemp)
        trap 'rm -f "$token_file"' EXIT
        echo emulator >"$token_file"
        export CLOUDSDK_AUTH_ACCESS_TOKEN_FILE=$token_file
    fi
    # The emulator refuses to update an expiration policy (it sets one on create).
    UPDATE_EXPIRY=()
    echo "pubsub-setup: using the emulator at $PUBSUB_EMULATOR_HOST (IAM steps skipped)" >&2
fi

g() { gcloud --project="$PROJECT_ID" --quiet "$@"; }

ensure_topic() {
    local topic=$1
    if g pubsub topics describe "$topic" >/dev/null 2>&1; then
        echo "topic $topic: exists"
    else
        g pubsub topics create "$topic" >/dev/null
        echo "topic $topic: created"
    fi
}

# ensure_subscription NAME TOPIC ACK_DEADLINE [extra flags valid for both create and update]
ensure_subscription() {
    local sub=$1 topic=$2 ack=$3
    shift 3
    if g pubsub subscriptions describe "$sub" >/dev/null 2>&1; then
        local bound
        bound=$(g pubsub subscriptions describe "$sub" --format='value(topic)')
        if [ "${bound##*/}" != "$topic" ]; then
            echo "pubsub-setup: subscription $sub exists but is attached to $bound, not $topic;" \
                "delete it or choose another name" >&2
            exit 1
        fi
        g pubsub subscriptions update "$sub" --ack-deadline="$ack" \
            ${UPDATE_EXPIRY[@]+"${UPDATE_EXPIRY[@]}"} "$@" >/dev/null
        echo "subscription $sub: exists, settings updated"
    else
        g pubsub subscriptions create "$sub" --topic="$topic" --ack-deadline="$ack" \
            --expiration-period=never "$@" >/dev/null
        echo "subscription $sub: created"
    fi
}

ensure_topic "$JOBS_TOPIC"
ensure_topic "$SHARDS_TOPIC"
ensure_topic "$RESULTS_TOPIC"
ensure_topic "$DEAD_TOPIC"

# A job message is held (lease extended) while the dispatcher validates and plans the run.
ensure_subscription "$JOBS_SUB" "$JOBS_TOPIC" "$JOBS_ACK_DEADLINE"
# A shard is retried with backoff and dead-lettered after MAX_DELIVERY_ATTEMPTS deliveries.
ensure_subscription "$SHARDS_SUB" "$SHARDS_TOPIC" "$SHARDS_ACK_DEADLINE" \
    --dead-letter-topic="$DEAD_TOPIC" \
    --max-delivery-attempts="$MAX_DELIVERY_ATTEMPTS" \
    --min-retry-delay=10s \
    --max-retry-delay=600s
ensure_subscription "$RESULTS_SUB" "$RESULTS_TOPIC" 60
ensure_subscription "$DEAD_SUB" "$DEAD_TOPIC" 60

if [ -n "${PUBSUB_EMULATOR_HOST:-}" ]; then
    exit 0
fi

# Dead-lettering is done by the Pub/Sub service agent: it must be able to publish to the
# dead-letter topic and to ack (subscriber) on the source subscription. Without these grants,
# failing shards are redelivered forever instead of failing their run.
PROJECT_NUMBER=$(gcloud projects describe "$PROJECT_ID" --format='value(projectNumber)')
PUBSUB_AGENT="serviceAccount:service-${PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"
g pubsub topics add-iam-policy-binding "$DEAD_TOPIC" \
    --member="$PUBSUB_AGENT" --role=roles/pubsub.publisher >/dev/null
echo "topic $DEAD_TOPIC: Pub/Sub service agent can publish"
g pubsub subscriptions add-iam-policy-binding "$SHARDS_SUB" \
    --member="$PUBSUB_AGENT" --role=roles/pubsub.subscriber >/dev/null
echo "subscription $SHARDS_SUB: Pub/Sub service agent can ack"
