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
    status          TEXT NOT NULL,            -- running | completed | failed | superseded
    mode            TEXT NOT NULL,
    plan_json       TEXT NOT NULL,            -- the plan, with no secret in it
    owner           TEXT NOT NULL,            -- the dispatcher driving the run
    heartbeat_at    TEXT NOT NULL,            -- RFC 3339 UTC, fixed width: compares as text
    started_at      TEXT NOT NULL,
    finished_at     TEXT,
    rows_extracted  BIGINT,
    rows_loaded     BIGINT,
    checksum        TEXT,                     -- combined content checksum of the loaded rows
    watermark       TEXT,                     -- largest timestamp-column value loaded
    stream_key      TEXT,                     -- an incremental load's source -> destination; one runs at a time
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
    checksum        TEXT,                     -- the worker's content checksum
    schema_json     TEXT,                     -- the Arrow schema of the staged parts
    max_value       TEXT,                     -- the shard's largest timestamp-column value
    source_rows_json TEXT,                    -- file shards: rows read from each file
    attempts        BIGINT NOT NULL DEFAULT 0,
    error           TEXT,
    PRIMARY KEY (run_id, shard_id)
);

-- Columns added after the first release of this schema.
ALTER TABLE shardflow_runs ADD COLUMN IF NOT EXISTS checksum TEXT;
ALTER TABLE shardflow_runs ADD COLUMN IF NOT EXISTS watermark TEXT;
ALTER TABLE shardflow_runs ADD COLUMN IF NOT EXISTS stream_key TEXT;
ALTER TABLE shardflow_shards ADD COLUMN IF NOT EXISTS checksum TEXT;
ALTER TABLE shardflow_shards ADD COLUMN IF NOT EXISTS source_rows_json TEXT;

-- The files each committed load of a file stream read; a file whose version (generation or
-- ETag) is here is not read again by the stream.
CREATE TABLE IF NOT EXISTS shardflow_processed_files (
    stream_key      TEXT NOT NULL,
    path            TEXT NOT NULL,
    version         TEXT NOT NULL,
    size            BIGINT NOT NULL,
    last_modified   TEXT NOT NULL,
    rows_loaded     BIGINT,
    run_id          TEXT NOT NULL,
    processed_at    TEXT NOT NULL,
    PRIMARY KEY (stream_key, path, version)
);
ALTER TABLE shardflow_processed_files ALTER COLUMN rows_loaded DROP NOT NULL;
ALTER TABLE shardflow_shards ADD COLUMN IF NOT EXISTS schema_json TEXT;
ALTER TABLE shardflow_shards ADD COLUMN IF NOT EXISTS max_value TEXT;

CREATE INDEX IF NOT EXISTS shardflow_runs_by_job ON shardflow_runs (job_key, started_at);
-- Two runs of one incremental stream at once would read the same window twice.
CREATE UNIQUE INDEX IF NOT EXISTS shardflow_one_running_stream ON shardflow_runs (stream_key)
    WHERE status = 'running';
CREATE INDEX IF NOT EXISTS shardflow_runs_by_stream ON shardflow_runs (stream_key, finished_at);
COMMIT;
