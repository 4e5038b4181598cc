-- shardflow state store, SQLite flavour. Idempotent: run on every open.
CREATE TABLE IF NOT EXISTS runs (
    run_id          TEXT PRIMARY KEY,
    data_source_id  INTEGER,
    etl_run_id      INTEGER,
    dest_table      TEXT NOT NULL,
    status          TEXT NOT NULL,            -- running | completed | failed
    mode            TEXT NOT NULL,
    plan_json       TEXT NOT NULL,            -- the plan, with no secret in it
    started_at      TEXT NOT NULL,
    finished_at     TEXT,
    rows_extracted  INTEGER,
    rows_loaded     INTEGER,
    error_message   TEXT
);

CREATE TABLE IF NOT EXISTS shards (
    run_id          TEXT NOT NULL REFERENCES runs(run_id),
    shard_id        TEXT NOT NULL,
    shard_index     INTEGER NOT NULL,
    estimated_rows  INTEGER NOT NULL,
    bounds_json     TEXT NOT NULL,
    status          TEXT NOT NULL,            -- pending | succeeded | failed
    rows            INTEGER,
    bytes           INTEGER,
    files_json      TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    PRIMARY KEY (run_id, shard_id)
);
