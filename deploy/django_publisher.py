"""Django-side trigger for shardflow: publish one job message to Pub/Sub topic ``etl-jobs``.

Drop this module into the Django app (e.g. ``ml_platform/shardflow.py``); it needs only
``google-cloud-pubsub`` (``pip install google-cloud-pubsub``). It replaces the old
"execute the Cloud Run job" call.

Message: JSON ``{"data_source_id": 123, "etl_run_id": 456}`` (plus ``"config": {...}`` only when
a config is passed), attributes ``data_source_id`` and ``etl_run_id``. The dispatcher fetches
the job config from ``GET {DJANGO_API_URL}/api/etl/job-config/{data_source_id}/`` and PATCHes
``/api/etl/runs/{etl_run_id}/update/`` as the old runner did.

In production publish ids only: an inline config carries ``connection_params`` (the database
password) inside the Pub/Sub message. Inline config is for local runs against the emulators.

Environment: ``GCP_PROJECT_ID`` (required); ``PUBSUB_EMULATOR_HOST`` is honoured by the client
library itself (no credentials needed then); ``SHARDFLOW_JOBS_TOPIC`` overrides ``etl-jobs``.
Credentials: Application Default Credentials of a service account holding
``roles/pubsub.publisher`` on ``etl-jobs`` (see deploy/iam.sh).

Where to call it: in the view that creates the ETLRun ("Run Now"), after the row is committed,
so the dispatcher never reports on a run Django cannot see yet::

    from django.db import transaction
    from ml_platform.shardflow import trigger_etl_run

    def api_etl_run_now(request, data_source_id):
        data_source = get_object_or_404(DataSource, pk=data_source_id)
        etl_run = ETLRun.objects.create(data_source=data_source, status="pending")
        transaction.on_commit(lambda: trigger_etl_run(data_source.id, etl_run.id))
        return JsonResponse({"etl_run_id": etl_run.id, "status": "pending"}, status=202)

(``transaction.on_commit`` runs the publish after commit and drops its return value; call
``trigger_etl_run`` directly when you want the message id and are outside a transaction.
If the publish raises, mark the run failed so it does not stay "pending".)

Manual test::

    export GCP_PROJECT_ID=test-proj PUBSUB_EMULATOR_HOST=127.0.0.1:8085
    python deploy/django_publisher.py 123 456                     # ids only
    python deploy/django_publisher.py 123 456 examples/sample_job.json   # config inline
"""

from __future__ import annotations

import functools
import json
import os
import sys

from google.cloud import pubsub_v1

PUBLISH_TIMEOUT_SECONDS = 30


@functools.lru_cache(maxsize=1)
def _publisher() -> pubsub_v1.PublisherClient:
    # One client per process (it holds a gRPC channel and batching threads). Created lazily so
    # a pre-forking server (gunicorn --preload) gets one per worker, not one shared across fork.
    return pubsub_v1.PublisherClient()


def trigger_etl_run(data_source_id: int, etl_run_id: int, config: dict | None = None) -> str:
    """Publish a shardflow job message to ``etl-jobs`` and return the Pub/Sub message id.

    Blocks until Pub/Sub has accepted the message (at most PUBLISH_TIMEOUT_SECONDS) and raises
    on failure, so the caller knows the run was really queued.
    """
    project_id = os.environ["GCP_PROJECT_ID"]
    topic = os.environ.get("SHARDFLOW_JOBS_TOPIC", "etl-jobs")
    payload: dict = {"data_source_id": int(data_source_id), "etl_run_id": int(etl_run_id)}
    if config is not None:
        payload["config"] = config
    client = _publisher()
    future = client.publish(
        client.topic_path(project_id, topic),
        json.dumps(payload, separators=(",", ":")).encode("utf-8"),
        # Attribute values must be strings.
        data_source_id=str(int(data_source_id)),
        etl_run_id=str(int(etl_run_id)),
    )
    return future.result(timeout=PUBLISH_TIMEOUT_SECONDS)


def _main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(
            f"usage: {argv[0]} DATA_SOURCE_ID ETL_RUN_ID [CONFIG_JSON_FILE]\n"
            "  CONFIG_JSON_FILE: a job config (sent inline) or a whole job message whose\n"
            '  "config" is sent inline. Needs GCP_PROJECT_ID (and PUBSUB_EMULATOR_HOST for the emulator).',
            file=sys.stderr,
        )
        return 2
    config = None
    if len(argv) == 4:
        with open(argv[3], encoding="utf-8") as f:
            config = json.load(f)
        config = config.get("config", config)  # accept a job message file as well
    message_id = trigger_etl_run(int(argv[1]), int(argv[2]), config)
    print(message_id)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
