-- Version 3 (after adding runs.stream_key): one running run per incremental stream.
-- Two runs of one incremental stream at once would read the same window twice.
CREATE UNIQUE INDEX IF NOT EXISTS shardflow_one_running_stream ON shardflow_runs (stream_key)
    WHERE status = 'running';
CREATE INDEX IF NOT EXISTS shardflow_runs_by_stream ON shardflow_runs (stream_key, finished_at);
