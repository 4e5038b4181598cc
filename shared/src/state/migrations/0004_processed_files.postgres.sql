-- Version 4: the files each committed load of a file stream read; a file whose version
-- (generation or ETag) is here is not read again by the stream.
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
-- An unversioned store of a few hours' history had it NOT NULL (a load over several files
-- does not know each file's rows).
ALTER TABLE shardflow_processed_files ALTER COLUMN rows_loaded DROP NOT NULL;
