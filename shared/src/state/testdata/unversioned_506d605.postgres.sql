-- shardflow state store, PostgreSQL flavour. Idempotent: run on every open; the advisory
-- lock keeps dispatcher replicas that start together from racing on CREATE TABLE.
BEGIN;
SELECT pg_advisory_xact_lock(7283517);

CREATE TABLE IF NOT EXISTS shardflow_runs (
    run_id          TEXT PRIMARY KEY,
    job_key         TEXT NOT NULL,            -- the job message's identity; a restart makes a new run of the same key
    data_source_id  BIGINT,
    etl_run_id      BIGINT,
    dest_table      TEXT NOT NULL,
    status          TEXT NOT NULL,            -- running | completed | failed
    mode            TEXT NOT NULL,
    plan_json       TEXT NOT NULL,            -- the plan, with no secret in it
    owner           TEXT NOT NULL,            -- the dispatcher driving the run
    heartbeat_at    TEXT NOT NULL,            -- RFC 3339 UTC, fixed width: compares as text
    started_at      TEXT NOT NULL,
    finished_at     TEXT,
    rows_extracted  BIGINT,
    rows_loaded     BIGINT,
    error_message   TEXT
);

CREATE TABLE IF NOT EXISTS shardflow_shards (
    run_id          TEXT NOT NULL REFERENCES shardflow_runs(run_id),
    shard_id        TEXT NOT NULL,
    shard_index     BIGINT NOT NULL,
    estimated_rows  BIGINT NOT NULL,
    bounds_json     TEXT NOT NULL,
    task_json       TEXT NOT NULL,            -- the shard message, republished on resume
    status          TEXT NOT NULL,            -- pending | succeeded | failed
    rows            BIGINT,
    bytes           BIGINT,
    files_json      TEXT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    error           TEXT,
    PRIMARY KEY (run_id, shard_id)
);

CREATE INDEX IF NOT EXISTS shardflow_runs_by_job ON shardflow_runs (job_key, started_at);
COMMIT;
