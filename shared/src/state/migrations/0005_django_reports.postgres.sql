-- Version 5: each run's final status for Django, recorded before its job message is acked
-- and sent by the reporter until Django accepts it (or it is given up): a dispatcher that
-- dies before telling Django leaves the report here for the next one.
CREATE TABLE IF NOT EXISTS shardflow_django_reports (
    etl_run_id      BIGINT PRIMARY KEY,
    body            TEXT NOT NULL,
    recorded_at     TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error      TEXT,
    delivered_at    TEXT,
    given_up_at     TEXT
);
CREATE INDEX IF NOT EXISTS shardflow_django_reports_due
    ON shardflow_django_reports (next_attempt_at)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
