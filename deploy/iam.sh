#!/usr/bin/env bash
# Service accounts and least-privilege IAM for shardflow on GKE with Workload Identity.
# Idempotent (service accounts are created once; IAM bindings are set, not appended twice).
# Run AFTER deploy/pubsub-setup.sh: the grants are on individual topics and subscriptions.
#
#   GCP_PROJECT_ID=my-project SHARDFLOW_STAGING=gs://my-bucket/shardflow \
#   DJANGO_SERVICE_ACCOUNT=django-app@my-project.iam.gserviceaccount.com \
#   bash deploy/iam.sh
#
# Environment:
#   GCP_PROJECT_ID            required
#   SHARDFLOW_STAGING         required, gs://BUCKET[/prefix]: the staging bucket (must exist)
#   BIGQUERY_DATASET          destination dataset (default raw_data; must exist)
#   BIGQUERY_LOCATION         the dataset's location, e.g. EU or europe-central2 (optional; used
#                             to run the dataset-level GRANT there)
#   DJANGO_SERVICE_ACCOUNT    e-mail of the identity the Django app publishes as (optional;
#                             skipped when unset)
#   DISPATCHER_RUNS_PUBSUB_SETUP=1   give the dispatcher roles/pubsub.editor so that
#                             `dispatcher pubsub-setup` can create topics and subscriptions;
#                             default: roles/pubsub.viewer only (it can check, not create)
#   K8S_NAMESPACE             default shardflow (must match k8s/namespace.yaml)
#   CLOUDSQL_PROJECTS         space-separated projects whose Cloud SQL instances are sources
#                             (optional): roles/cloudsql.client and roles/cloudsql.instanceUser
#                             there for both identities (the Auth Proxy sidecar, IAM logins)
#   SOURCE_SECRETS            space-separated projects/P/secrets/S that job configs name as
#                             secretmanager:// references (optional): secretAccessor on each
#   SHARDFLOW_*_TOPIC / SHARDFLOW_*_SUBSCRIPTION   name overrides, as in pubsub-setup.sh
#
# Who gets what (and why):
#   shardflow-dispatcher
#     roles/pubsub.subscriber  on etl-jobs-dispatcher, etl-shard-results-dispatcher,
#                              etl-shards-dead-letter-dispatcher   (pull + ack its inputs)
#     roles/pubsub.publisher   on etl-shards                       (one message per shard)
#     roles/pubsub.viewer      on the project (or roles/pubsub.editor, see above)
#     roles/bigquery.jobUser   on the project                      (load jobs; jobs.get first)
#     roles/bigquery.dataEditor on the dataset                     (create / replace tables)
#     roles/storage.objectAdmin on the staging bucket              (the load job reads staging as
#                              the dispatcher's identity; it deletes staging after the load)
#     roles/storage.legacyBucketReader on the staging bucket       (storage.buckets.get: its location)
#   shardflow-worker
#     roles/pubsub.subscriber  on etl-shards-workers               (pull, extend lease, ack, nack)
#     roles/pubsub.publisher   on etl-shard-results                (report each shard)
#     roles/storage.objectAdmin on the staging bucket              (write parts; an upload retried
#                              after its first try completed unseen rewrites it: needs delete)
#   both, with CLOUDSQL_PROJECTS (each project)      (both connect: the dispatcher plans, the
#                                                     workers extract)
#     roles/cloudsql.client    (Cloud SQL: "a predefined role that contains the necessary
#                              Cloud SQL IAM permission cloudsql.instances.connect. You need
#                              this permission to login to a database instance with the Cloud
#                              SQL Auth Proxy")
#     roles/cloudsql.instanceUser ("contains the necessary Cloud SQL IAM permission
#                              cloudsql.instances.login. You need this permission to login to a
#                              database instance with IAM database authentication":
#                              "enable_iam_auth", or the proxy's --auto-iam-authn)
#   both, with SOURCE_SECRETS (each secret)
#     roles/secretmanager.secretAccessor  (a password or TLS key by secretmanager:// reference,
#                              read by whichever process connects; gcloud takes SECRET as the
#                              "ID of the secret or fully qualified identifier for the secret")
#   Cloud Scheduler service agent, Django's service account
#     roles/pubsub.publisher   on etl-jobs
#   custom-metrics-stackdriver-adapter (KSA in namespace custom-metrics)
#     roles/monitoring.viewer  on the project                      (worker HPA on the backlog)
#
# No identity gets database credentials from IAM: the source password reaches the dispatcher
# and workers only through Django's job-config API (Bearer ETL_API_TOKEN, from the Kubernetes
# Secret), never through Pub/Sub shard or result messages.
set -euo pipefail

PROJECT_ID=${GCP_PROJECT_ID:?set GCP_PROJECT_ID}
STAGING=${SHARDFLOW_STAGING:?set SHARDFLOW_STAGING to gs://BUCKET[/prefix]}
case "$STAGING" in
    gs://?*) ;;
    *) echo "iam: SHARDFLOW_STAGING must be gs://BUCKET[/prefix], got $STAGING" >&2; exit 2 ;;
esac
BUCKET=${STAGING#gs://}
BUCKET=${BUCKET%%/*}
DATASET=${BIGQUERY_DATASET:-raw_data}
NAMESPACE=${K8S_NAMESPACE:-shardflow}

# shellcheck source=deploy/names.sh
. "$(dirname "$0")/names.sh"

DISPATCHER_SA="shardflow-dispatcher@${PROJECT_ID}.iam.gserviceaccount.com"
WORKER_SA="shardflow-worker@${PROJECT_ID}.iam.gserviceaccount.com"
PROJECT_NUMBER=$(gcloud projects describe "$PROJECT_ID" --format='value(projectNumber)')
SCHEDULER_AGENT="service-${PROJECT_NUMBER}@gcp-sa-cloudscheduler.iam.gserviceaccount.com"

g() { gcloud --project="$PROJECT_ID" --quiet "$@" >/dev/null; }

ensure_sa() {
    local name=$1 display=$2 email="$1@${PROJECT_ID}.iam.gserviceaccount.com"
    if gcloud iam service-accounts describe "$email" --project="$PROJECT_ID" >/dev/null 2>&1; then
        echo "service account $email: exists"
    else
        g iam service-accounts create "$name" --display-name="$display"
        echo "service account $email: created"
    fi
}

project_role() {   # MEMBER ROLE
    g projects add-iam-policy-binding "$PROJECT_ID" --member="$1" --role="$2" --condition=None
    echo "project $PROJECT_ID: $2 -> $1"
}
topic_role() {     # TOPIC MEMBER ROLE
    g pubsub topics add-iam-policy-binding "$1" --member="$2" --role="$3"
    echo "topic $1: $3 -> $2"
}
sub_role() {       # SUBSCRIPTION MEMBER ROLE
    g pubsub subscriptions add-iam-policy-binding "$1" --member="$2" --role="$3"
    echo "subscription $1: $3 -> $2"
}
bucket_role() {    # MEMBER ROLE
    g storage buckets add-iam-policy-binding "gs://$BUCKET" --member="$1" --role="$2"
    echo "bucket gs://$BUCKET: $2 -> $1"
}
dataset_role() {   # SA_EMAIL ROLE   (dataset-level, via BigQuery DCL; idempotent)
    local -a location=()
    if [ -n "${BIGQUERY_LOCATION:-}" ]; then location=(--location="$BIGQUERY_LOCATION"); fi
    bq --project_id="$PROJECT_ID" ${location[@]+"${location[@]}"} --quiet query --nouse_legacy_sql \
        "GRANT \`$2\` ON SCHEMA \`${PROJECT_ID}.${DATASET}\` TO \"serviceAccount:$1\"" >/dev/null
    echo "dataset ${PROJECT_ID}.${DATASET}: $2 -> serviceAccount:$1"
}
workload_identity() {   # SA_EMAIL KSA_NAME
    g iam service-accounts add-iam-policy-binding "$1" --role=roles/iam.workloadIdentityUser \
        --member="serviceAccount:${PROJECT_ID}.svc.id.goog[${NAMESPACE}/$2]"
    echo "service account $1: usable by KSA ${NAMESPACE}/$2"
}

# --- service accounts --------------------------------------------------------------------
ensure_sa shardflow-dispatcher "shardflow dispatcher"
ensure_sa shardflow-worker "shardflow worker"
# A freshly created service account can take a few seconds to be visible to IAM policy calls.
sleep "${IAM_PROPAGATION_WAIT:-5}"

# --- dispatcher --------------------------------------------------------------------------
D="serviceAccount:$DISPATCHER_SA"
sub_role "$JOBS_SUB" "$D" roles/pubsub.subscriber
sub_role "$RESULTS_SUB" "$D" roles/pubsub.subscriber
sub_role "$DEAD_SUB" "$D" roles/pubsub.subscriber
topic_role "$SHARDS_TOPIC" "$D" roles/pubsub.publisher
if [ "${DISPATCHER_RUNS_PUBSUB_SETUP:-0}" = 1 ]; then
    project_role "$D" roles/pubsub.editor
else
    project_role "$D" roles/pubsub.viewer
fi
project_role "$D" roles/bigquery.jobUser
dataset_role "$DISPATCHER_SA" roles/bigquery.dataEditor
bucket_role "$D" roles/storage.objectAdmin
# storage.buckets.get: before a load, the dispatcher checks the staging bucket is in the
# dataset's location (BigQuery loads only from a bucket there).
bucket_role "$D" roles/storage.legacyBucketReader

# --- worker ------------------------------------------------------------------------------
W="serviceAccount:$WORKER_SA"
sub_role "$SHARDS_SUB" "$W" roles/pubsub.subscriber
topic_role "$RESULTS_TOPIC" "$W" roles/pubsub.publisher
bucket_role "$W" roles/storage.objectAdmin

# --- sources on Cloud SQL, secrets by reference (optional) ---------------------------------
for project in ${CLOUDSQL_PROJECTS:-}; do
    for member in "$D" "$W"; do
        for role in roles/cloudsql.client roles/cloudsql.instanceUser; do
            g projects add-iam-policy-binding "$project" --member="$member" --role="$role" --condition=None
            echo "project $project: $role -> $member"
        done
    done
done
for secret in ${SOURCE_SECRETS:-}; do
    case "$secret" in
        projects/?*/secrets/?*) ;;
        *) echo "iam: SOURCE_SECRETS entries are projects/P/secrets/S, got $secret" >&2; exit 2 ;;
    esac
    for member in "$D" "$W"; do
        g secrets add-iam-policy-binding "$secret" --member="$member" \
            --role=roles/secretmanager.secretAccessor
        echo "secret $secret: roles/secretmanager.secretAccessor -> $member"
    done
done

# --- Workload Identity: KSAs in k8s/serviceaccounts.yaml act as the GSAs ----------------
workload_identity "$DISPATCHER_SA" shardflow-dispatcher
workload_identity "$WORKER_SA" shardflow-worker

# --- who may trigger runs ----------------------------------------------------------------
topic_role "$JOBS_TOPIC" "serviceAccount:$SCHEDULER_AGENT" roles/pubsub.publisher
if [ -n "${DJANGO_SERVICE_ACCOUNT:-}" ]; then
    topic_role "$JOBS_TOPIC" "serviceAccount:$DJANGO_SERVICE_ACCOUNT" roles/pubsub.publisher
else
    echo "iam: DJANGO_SERVICE_ACCOUNT unset; grant Django's identity roles/pubsub.publisher on $JOBS_TOPIC yourself" >&2
fi

# --- the worker HPA reads the Pub/Sub backlog through the Custom Metrics Stackdriver Adapter --
project_role "principal://iam.googleapis.com/projects/${PROJECT_NUMBER}/locations/global/workloadIdentityPools/${PROJECT_ID}.svc.id.goog/subject/ns/custom-metrics/sa/custom-metrics-stackdriver-adapter" \
    roles/monitoring.viewer
