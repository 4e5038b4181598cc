//! The state store on SQL: SQLite (the embedded default, one file) or PostgreSQL (for a fleet
//! of dispatchers), through sqlx's `Any` driver. The queries are shared (`$n` placeholders
//! work in both); each backend's schema is built by the versioned migrations of `migrate`.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor as _, Row};

use super::{
    Created, NewRun, NewShard, PendingReport, ProcessedFile, Recorded, ReportAttempt, ReportState,
    RunEnd, RunRecord, ShardRecord, StateStore, success,
};
use crate::messages::{ShardOutcome, ShardResult};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

pub struct SqlStateStore {
    pool: AnyPool,
}

/// Which backend a state URL names.
fn backend_of(url: &str) -> Result<Backend> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(Error::State(format!(
            "state store URL must start with sqlite:// or postgres://, got {:?}",
            redact_url(url)
        )))
    }
}

/// The URL without its password, for errors and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl SqlStateStore {
    /// Opens (creating if needed) `sqlite://PATH`, `sqlite::memory:` or `postgres://…`.
    pub async fn open(url: &str) -> Result<Self> {
        // A PostgreSQL starting beside the fleet gets this long to accept connections.
        Self::open_waiting(url, Duration::from_secs(30)).await
    }

    async fn open_waiting(url: &str, patience: Duration) -> Result<Self> {
        sqlx::any::install_default_drivers();
        crate::source::tls::install_crypto_provider();
        let backend = backend_of(url)?;
        let (url, max) = match backend {
            // One writer keeps SQLite's locking simple; the store is not on the hot path.
            Backend::Sqlite if url.contains('?') || url.contains(":memory:") => {
                (url.to_string(), 1)
            }
            Backend::Sqlite => (format!("{url}?mode=rwc"), 1),
            Backend::Postgres => (url.to_string(), 8),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(patience)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute("PRAGMA busy_timeout = 30000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            // The pool retried a refused connection until `patience` ran out and says only
            // "pool timed out": one more connection, outside it, gives the cause.
            Err(sqlx::Error::PoolTimedOut) => {
                // Bounded too: a host that drops packets would hold it for the OS's timeout.
                let direct = <sqlx::AnyConnection as sqlx::Connection>::connect(&url);
                let cause = match tokio::time::timeout(patience, direct).await {
                    Ok(Err(e)) => crate::net::io_cause(&e).unwrap_or_else(|| e.to_string()),
                    Ok(Ok(_)) | Err(_) => "no connection within the time allowed".to_string(),
                };
                return Err(Error::State(format!(
                    "cannot open state store {}: {cause} (for {} s)",
                    redact_url(&url),
                    patience.as_secs()
                )));
            }
            Err(e) => {
                let cause = crate::net::io_cause(&e).unwrap_or_else(|| e.to_string());
                return Err(Error::State(format!(
                    "cannot open state store {}: {cause}",
                    redact_url(&url)
                )));
            }
        };
        super::migrate::migrate(&pool, backend).await?;
        Ok(SqlStateStore { pool })
    }
}

/// The run columns `run_record` reads, with a static tail (no SQL is built at run time).
macro_rules! select_runs {
    ($tail:literal) => {
        concat!(
            "SELECT run_id, job_key, data_source_id, etl_run_id, owner, heartbeat_at, status, rows_extracted,
                    rows_loaded, checksum, watermark, error_message, plan_json, stream_key
             FROM shardflow_runs ",
            $tail
        )
    };
}

/// Fixed-width UTC time, so that text comparison is time comparison in both backends.
fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// `t` moved `by` later (or earlier), saturating at the ends of chrono's range.
fn shifted(
    t: chrono::DateTime<chrono::Utc>,
    by: Duration,
    later: bool,
) -> chrono::DateTime<chrono::Utc> {
    let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
    let moved = if later {
        t.checked_add_signed(by)
    } else {
        t.checked_sub_signed(by)
    };
    moved.unwrap_or(if later {
        chrono::DateTime::<chrono::Utc>::MAX_UTC
    } else {
        chrono::DateTime::<chrono::Utc>::MIN_UTC
    })
}

/// sqlx errors as the state store reports them: always the store's, never a source's (the
/// MySQL connector maps its own sqlx errors with `mysql::source_error`).
fn state_error(e: sqlx::Error) -> Error {
    Error::State(e.to_string())
}

fn now() -> String {
    timestamp(chrono::Utc::now())
}

fn pending_report(row: &AnyRow) -> Result<PendingReport> {
    Ok(PendingReport {
        etl_run_id: row.try_get("etl_run_id").map_err(state_error)?,
        body: row.try_get("body").map_err(state_error)?,
        recorded_at: row.try_get("recorded_at").map_err(state_error)?,
        attempts: row
            .try_get::<i64, _>("attempts")
            .map_err(state_error)?
            .max(0) as u32,
    })
}

fn opt_u64(row: &AnyRow, column: &str) -> Result<Option<u64>> {
    Ok(row
        .try_get::<Option<i64>, _>(column)
        .map_err(state_error)?
        .map(|v| v as u64))
}

#[async_trait]
impl StateStore for SqlStateStore {
    async fn create_run(&self, run: &NewRun, shards: &[NewShard]) -> Result<Created> {
        if let Some(conflict) = self.stream_conflict(run).await? {
            return Ok(conflict);
        }
        let mut tx = self.pool.begin().await.map_err(state_error)?;
        let now = now();
        let inserted = sqlx::query(
            "INSERT INTO shardflow_runs (run_id, job_key, data_source_id, etl_run_id, dest_table,
                                         status, mode, plan_json, owner, heartbeat_at, started_at,
                                         stream_key)
             VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, $8, $9, $9, $10)
             ON CONFLICT (run_id) DO NOTHING",
        )
        .bind(&run.run_id)
        .bind(&run.job_key)
        .bind(run.data_source_id)
        .bind(run.etl_run_id)
        .bind(&run.dest_table)
        .bind(&run.mode)
        .bind(&run.plan_json)
        .bind(&run.owner)
        .bind(&now)
        .bind(&run.stream_key)
        .execute(&mut *tx)
        .await;
        let inserted = match inserted {
            Ok(done) => done.rows_affected() > 0,
            // Between the check and the insert, either this very run was created (a job
            // message delivered twice and handled at once: `ON CONFLICT (run_id)` absorbs
            // only a conflict its pre-check sees, and an insert that passed it raises on the
            // one-running-run-per-stream index once the other commits) or another run of the
            // stream was.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                tx.rollback().await.map_err(state_error)?;
                if self.run(&run.run_id).await?.is_some() {
                    return Ok(Created::RunExists);
                }
                return match self.stream_conflict(run).await? {
                    Some(conflict) => Ok(conflict),
                    None => Err(Error::State(format!("creating run {}: {e}", run.run_id))),
                };
            }
            Err(e) => return Err(state_error(e)),
        };
        if !inserted {
            tx.rollback().await.map_err(state_error)?;
            return Ok(Created::RunExists);
        }
        for s in shards {
            sqlx::query(
                "INSERT INTO shardflow_shards (run_id, shard_id, shard_index, estimated_rows,
                                               bounds_json, task_json, status)
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending')",
            )
            .bind(&run.run_id)
            .bind(&s.shard_id)
            .bind(s.shard_index as i64)
            .bind(s.estimated_rows as i64)
            .bind(serde_json::to_string(&s.bounds)?)
            .bind(&s.task_json)
            .execute(&mut *tx)
            .await
            .map_err(state_error)?;
        }
        tx.commit().await.map_err(state_error)?;
        Ok(Created::Created)
    }

    async fn claim_run(&self, run_id: &str, owner: &str, stale_after: Duration) -> Result<bool> {
        let stale = chrono::Utc::now()
            - chrono::Duration::from_std(stale_after)
                .map_err(|e| Error::State(format!("stale_after {stale_after:?}: {e}")))?;
        let claimed = sqlx::query(
            "UPDATE shardflow_runs SET owner = $1, heartbeat_at = $2
             WHERE run_id = $3 AND status = 'running' AND owner <> $1 AND heartbeat_at < $4",
        )
        .bind(owner)
        .bind(now())
        .bind(run_id)
        .bind(timestamp(stale))
        .execute(&self.pool)
        .await
        .map_err(state_error)?
        .rows_affected();
        Ok(claimed > 0)
    }

    async fn heartbeat(&self, run_id: &str, owner: &str) -> Result<bool> {
        let alive = sqlx::query(
            "UPDATE shardflow_runs SET heartbeat_at = $1
             WHERE run_id = $2 AND owner = $3 AND status = 'running'",
        )
        .bind(now())
        .bind(run_id)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(state_error)?
        .rows_affected();
        Ok(alive > 0)
    }

    async fn record_result(&self, result: &ShardResult) -> Result<Recorded> {
        let changed = match success(result) {
            Some(ok) => sqlx::query(
                "UPDATE shardflow_shards SET status = 'succeeded', rows = $1, bytes = $2,
                        files_json = $3, checksum = $4, schema_json = $5, max_value = $6,
                        source_rows_json = $9, attempts = attempts + 1, error = NULL
                 WHERE run_id = $7 AND shard_id = $8 AND status = 'pending'",
            )
            .bind(ok.rows as i64)
            .bind(ok.bytes as i64)
            .bind(serde_json::to_string(ok.files)?)
            .bind(ok.checksum)
            .bind(serde_json::to_string(ok.schema)?)
            .bind(ok.max_value)
            .bind(&result.run_id)
            .bind(&result.shard_id)
            .bind(
                (!ok.source_rows.is_empty())
                    .then(|| serde_json::to_string(ok.source_rows))
                    .transpose()?,
            )
            .execute(&self.pool)
            .await
            .map_err(state_error)?
            .rows_affected(),
            None => {
                let error = match &result.outcome {
                    ShardOutcome::Failed { error, .. } => error.as_str(),
                    ShardOutcome::Succeeded { .. } => "",
                };
                sqlx::query(
                    "UPDATE shardflow_shards SET attempts = attempts + 1, error = $1
                     WHERE run_id = $2 AND shard_id = $3 AND status = 'pending'",
                )
                .bind(error)
                .bind(&result.run_id)
                .bind(&result.shard_id)
                .execute(&self.pool)
                .await
                .map_err(state_error)?
                .rows_affected()
            }
        };
        Ok(match (changed, success(result).is_some()) {
            (0, _) => Recorded::Duplicate,
            (_, true) => Recorded::Succeeded,
            (_, false) => Recorded::FailedAttempt,
        })
    }

    async fn fail_shard(&self, run_id: &str, shard_id: &str, error: &str) -> Result<bool> {
        let changed = sqlx::query(
            "UPDATE shardflow_shards SET status = 'failed', error = $1
             WHERE run_id = $2 AND shard_id = $3 AND status = 'pending'",
        )
        .bind(error)
        .bind(run_id)
        .bind(shard_id)
        .execute(&self.pool)
        .await
        .map_err(state_error)?
        .rows_affected();
        Ok(changed > 0)
    }

    async fn shards(&self, run_id: &str) -> Result<Vec<ShardRecord>> {
        let rows = sqlx::query(
            "SELECT shard_id, shard_index, estimated_rows, status, rows, files_json, checksum,
                    schema_json, max_value, source_rows_json, attempts, error, task_json
             FROM shardflow_shards WHERE run_id = $1 ORDER BY shard_index",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await
        .map_err(state_error)?;
        rows.iter()
            .map(|r| {
                let files: Option<String> = r.try_get("files_json").map_err(state_error)?;
                let source_rows: Option<String> =
                    r.try_get("source_rows_json").map_err(state_error)?;
                Ok(ShardRecord {
                    shard_id: r.try_get("shard_id").map_err(state_error)?,
                    shard_index: r.try_get::<i64, _>("shard_index").map_err(state_error)? as u32,
                    estimated_rows: r.try_get::<i64, _>("estimated_rows").map_err(state_error)?
                        as u64,
                    status: super::parse_status(
                        "shard",
                        &r.try_get::<String, _>("status").map_err(state_error)?,
                    )?,
                    rows: opt_u64(r, "rows")?,
                    files: match files {
                        Some(f) => serde_json::from_str(&f)?,
                        None => Vec::new(),
                    },
                    checksum: r.try_get("checksum").map_err(state_error)?,
                    schema_json: r.try_get("schema_json").map_err(state_error)?,
                    max_value: r.try_get("max_value").map_err(state_error)?,
                    source_rows: match source_rows {
                        Some(rows) => serde_json::from_str(&rows)?,
                        None => Vec::new(),
                    },
                    attempts: r.try_get::<i64, _>("attempts").map_err(state_error)? as u32,
                    error: r.try_get("error").map_err(state_error)?,
                    task_json: r.try_get("task_json").map_err(state_error)?,
                })
            })
            .collect()
    }

    async fn finish_run(&self, run_id: &str, end: &RunEnd) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(state_error)?;
        let now = now();
        for f in &end.processed_files {
            sqlx::query(
                "INSERT INTO shardflow_processed_files (stream_key, path, version, size,
                        last_modified, rows_loaded, run_id, processed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (stream_key, path, version) DO NOTHING",
            )
            .bind(&f.stream_key)
            .bind(&f.path)
            .bind(&f.version)
            .bind(f.size as i64)
            .bind(&f.last_modified)
            .bind(f.rows.map(|r| r as i64))
            .bind(&f.run_id)
            .bind(&now)
            .execute(&mut *tx)
            .await
            .map_err(state_error)?;
        }
        sqlx::query(
            "UPDATE shardflow_runs SET status = $1, finished_at = $2, rows_extracted = $3,
                    rows_loaded = $4, checksum = $5, watermark = $6, error_message = $7
             WHERE run_id = $8",
        )
        .bind(end.status.as_str())
        .bind(&now)
        .bind(end.rows_extracted as i64)
        .bind(end.rows_loaded as i64)
        .bind(end.checksum.as_deref())
        .bind(end.watermark.as_deref())
        .bind(end.error_message.as_deref())
        .bind(run_id)
        .execute(&mut *tx)
        .await
        .map_err(state_error)?;
        tx.commit().await.map_err(state_error)?;
        Ok(())
    }

    async fn processed_files(&self, stream_key: &str) -> Result<Vec<ProcessedFile>> {
        let rows = sqlx::query(
            "SELECT stream_key, path, version, size, last_modified, rows_loaded, run_id
             FROM shardflow_processed_files WHERE stream_key = $1 ORDER BY path, version",
        )
        .bind(stream_key)
        .fetch_all(&self.pool)
        .await
        .map_err(state_error)?;
        rows.iter()
            .map(|r| {
                Ok(ProcessedFile {
                    stream_key: r.try_get("stream_key").map_err(state_error)?,
                    path: r.try_get("path").map_err(state_error)?,
                    version: r.try_get("version").map_err(state_error)?,
                    size: r.try_get::<i64, _>("size").map_err(state_error)? as u64,
                    last_modified: r.try_get("last_modified").map_err(state_error)?,
                    rows: r
                        .try_get::<Option<i64>, _>("rows_loaded")
                        .map_err(state_error)?
                        .map(|n| n as u64),
                    run_id: r.try_get("run_id").map_err(state_error)?,
                })
            })
            .collect()
    }

    async fn record_report(&self, etl_run_id: i64, body: &str) -> Result<bool> {
        let now = now();
        let inserted = sqlx::query(
            "INSERT INTO shardflow_django_reports (etl_run_id, body, recorded_at, next_attempt_at)
             VALUES ($1, $2, $3, $3)
             ON CONFLICT (etl_run_id) DO NOTHING",
        )
        .bind(etl_run_id)
        .bind(body)
        .bind(&now)
        .execute(&self.pool)
        .await
        .map_err(state_error)?
        .rows_affected();
        Ok(inserted > 0)
    }

    async fn claim_due_reports(&self, claim_for: Duration) -> Result<Vec<PendingReport>> {
        let now = chrono::Utc::now();
        let until = shifted(now, claim_for, true);
        // One statement: under PostgreSQL's READ COMMITTED a concurrent claim of the same row
        // waits for this one and then finds `next_attempt_at` in the future.
        let rows = sqlx::query(
            "UPDATE shardflow_django_reports SET next_attempt_at = $1, attempts = attempts + 1
             WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= $2
             RETURNING etl_run_id, body, recorded_at, attempts",
        )
        .bind(timestamp(until))
        .bind(timestamp(now))
        .fetch_all(&self.pool)
        .await
        .map_err(state_error)?;
        rows.iter().map(pending_report).collect()
    }

    async fn report_attempted(&self, etl_run_id: i64, attempt: &ReportAttempt) -> Result<()> {
        let query = match attempt {
            ReportAttempt::Delivered => sqlx::query(
                "UPDATE shardflow_django_reports SET delivered_at = $1, last_error = NULL
                 WHERE etl_run_id = $2",
            )
            .bind(now())
            .bind(etl_run_id),
            ReportAttempt::RetryAfter { delay, error } => {
                let at = shifted(chrono::Utc::now(), *delay, true);
                sqlx::query(
                    "UPDATE shardflow_django_reports SET next_attempt_at = $1, last_error = $2
                     WHERE etl_run_id = $3",
                )
                .bind(timestamp(at))
                .bind(error.clone())
                .bind(etl_run_id)
            }
            ReportAttempt::GaveUp { error } => sqlx::query(
                "UPDATE shardflow_django_reports SET given_up_at = $1, last_error = $2
                 WHERE etl_run_id = $3",
            )
            .bind(now())
            .bind(error.clone())
            .bind(etl_run_id),
        };
        query.execute(&self.pool).await.map_err(state_error)?;
        Ok(())
    }

    async fn prune_reports(&self, older_than: Duration) -> Result<u64> {
        let before = shifted(chrono::Utc::now(), older_than, false);
        let deleted = sqlx::query(
            "DELETE FROM shardflow_django_reports
             WHERE (delivered_at IS NOT NULL OR given_up_at IS NOT NULL) AND recorded_at <= $1",
        )
        .bind(timestamp(before))
        .execute(&self.pool)
        .await
        .map_err(state_error)?
        .rows_affected();
        Ok(deleted)
    }

    async fn report(&self, etl_run_id: i64) -> Result<Option<(PendingReport, ReportState)>> {
        let row = sqlx::query(
            "SELECT etl_run_id, body, recorded_at, attempts, delivered_at, given_up_at
             FROM shardflow_django_reports WHERE etl_run_id = $1",
        )
        .bind(etl_run_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(state_error)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let state = if row
            .try_get::<Option<String>, _>("delivered_at")
            .map_err(state_error)?
            .is_some()
        {
            ReportState::Delivered
        } else if row
            .try_get::<Option<String>, _>("given_up_at")
            .map_err(state_error)?
            .is_some()
        {
            ReportState::GaveUp
        } else {
            ReportState::Pending
        };
        Ok(Some((pending_report(&row)?, state)))
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        let row = sqlx::query(select_runs!("WHERE run_id = $1"))
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(state_error)?;
        row.as_ref().map(run_record).transpose()
    }

    async fn latest_run(&self, job_key: &str) -> Result<Option<RunRecord>> {
        let row = sqlx::query(select_runs!(
            "WHERE job_key = $1 ORDER BY started_at DESC, run_id DESC LIMIT 1"
        ))
        .bind(job_key)
        .fetch_optional(&self.pool)
        .await
        .map_err(state_error)?;
        row.as_ref().map(run_record).transpose()
    }

    async fn latest_stream_run(&self, stream_key: &str) -> Result<Option<RunRecord>> {
        let row = sqlx::query(select_runs!(
            "WHERE stream_key = $1 ORDER BY started_at DESC, run_id DESC LIMIT 1"
        ))
        .bind(stream_key)
        .fetch_optional(&self.pool)
        .await
        .map_err(state_error)?;
        row.as_ref().map(run_record).transpose()
    }

    async fn running_runs(&self) -> Result<Vec<RunRecord>> {
        sqlx::query(select_runs!(
            "WHERE status = 'running' ORDER BY started_at, run_id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(state_error)?
        .iter()
        .map(run_record)
        .collect()
    }

    async fn stream_watermark(&self, stream_key: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT watermark FROM shardflow_runs
             WHERE stream_key = $1 AND status = 'completed' AND watermark IS NOT NULL
             ORDER BY finished_at DESC, run_id DESC LIMIT 1",
        )
        .bind(stream_key)
        .fetch_optional(&self.pool)
        .await
        .map_err(state_error)?)
    }
}

impl SqlStateStore {
    /// Why `run` may not start in its stream now: another of its runs is running, or a load
    /// committed since it was planned. Checked in this order, so a run that was running a
    /// moment ago and just committed is seen by the second check.
    async fn stream_conflict(&self, run: &NewRun) -> Result<Option<Created>> {
        let Some(stream) = &run.stream_key else {
            return Ok(None);
        };
        let other: Option<String> = sqlx::query_scalar(
            "SELECT run_id FROM shardflow_runs
             WHERE stream_key = $1 AND status = 'running' AND run_id <> $2 LIMIT 1",
        )
        .bind(stream)
        .bind(&run.run_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(state_error)?;
        if let Some(run_id) = other {
            return Ok(Some(Created::StreamBusy { run_id }));
        }
        let recorded = self.stream_watermark(stream).await?;
        Ok(
            (recorded != run.stream_watermark).then_some(Created::StreamMoved {
                watermark: recorded,
            }),
        )
    }
}

fn run_record(r: &AnyRow) -> Result<RunRecord> {
    Ok(RunRecord {
        run_id: r.try_get("run_id").map_err(state_error)?,
        job_key: r.try_get("job_key").map_err(state_error)?,
        data_source_id: r.try_get("data_source_id").map_err(state_error)?,
        etl_run_id: r.try_get("etl_run_id").map_err(state_error)?,
        owner: r.try_get("owner").map_err(state_error)?,
        heartbeat_at: r.try_get("heartbeat_at").map_err(state_error)?,
        status: super::parse_status(
            "run",
            &r.try_get::<String, _>("status").map_err(state_error)?,
        )?,
        rows_extracted: opt_u64(r, "rows_extracted")?,
        rows_loaded: opt_u64(r, "rows_loaded")?,
        checksum: r.try_get("checksum").map_err(state_error)?,
        watermark: r.try_get("watermark").map_err(state_error)?,
        error_message: r.try_get("error_message").map_err(state_error)?,
        plan_json: r.try_get("plan_json").map_err(state_error)?,
        stream_key: r.try_get("stream_key").map_err(state_error)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::conformance;
    use crate::state::{RunStatus, ShardStatus};

    #[test]
    fn stored_statuses_read_back_and_unknown_ones_are_refused() {
        for status in [
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Superseded,
            RunStatus::Abandoned,
        ] {
            assert_eq!(
                crate::state::parse_status::<RunStatus>("run", status.as_str()).unwrap(),
                status
            );
        }
        for status in [
            ShardStatus::Pending,
            ShardStatus::Succeeded,
            ShardStatus::Failed,
        ] {
            assert_eq!(
                crate::state::parse_status::<ShardStatus>("shard", status.as_str()).unwrap(),
                status
            );
        }
        let err = crate::state::parse_status::<RunStatus>("run", "Running").unwrap_err();
        assert_eq!(
            err.to_string(),
            "state store: unknown run status \"Running\""
        );
    }

    #[tokio::test]
    async fn an_unreachable_postgres_store_is_named_with_the_cause() {
        let port = crate::net::closed_port();
        let url = format!("postgres://shardflow:pw@127.0.0.1:{port}/state");
        let err = SqlStateStore::open_waiting(&url, Duration::from_secs(1))
            .await
            .err()
            .expect("nothing listens there");
        assert_eq!(
            err.to_string(),
            format!(
                "state store: cannot open state store postgres://shardflow:***@127.0.0.1:{port}/state: \
                 connection refused (nothing listens there) (for 1 s)"
            )
        );
    }

    #[tokio::test]
    async fn sqlite_passes_the_state_store_suite() {
        let dir = std::env::temp_dir().join(format!("shardflow-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("state.db").display());
        let store = SqlStateStore::open(&url).await.unwrap();
        conformance::run_all(&store).await;
        // The file survives a reopen with its data.
        drop(store);
        let store = SqlStateStore::open(&url).await.unwrap();
        assert_eq!(store.shards("run-1").await.unwrap().len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(feature = "service-tests")]
    #[tokio::test]
    async fn postgres_passes_the_state_store_suite() {
        // A fresh database per run of the test, so the suite's fixed run ids never collide.
        let admin = std::env::var("SHARDFLOW_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let db = format!("shardflow_state_{}", uuid::Uuid::new_v4().simple());
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed (start it): {e}"));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&pool)
            .await
            .unwrap();
        let url = format!("{}/{db}", admin.rsplit_once('/').unwrap().0);
        let store = SqlStateStore::open(&url).await.unwrap();
        // Opening again (a second replica) is fine.
        let _second = SqlStateStore::open(&url).await.unwrap();
        conformance::run_all(&store).await;
        drop((store, _second));
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {db} WITH (FORCE)"
        )))
        .execute(&pool)
        .await
        .unwrap();
    }

    /// The stores made before schemas were versioned: as first released, and as last shipped.
    const UNVERSIONED: [(&str, &str, &str); 2] = [
        (
            "506d605",
            include_str!("testdata/unversioned_506d605.sqlite.sql"),
            include_str!("testdata/unversioned_506d605.postgres.sql"),
        ),
        (
            "b617157",
            include_str!("testdata/unversioned_b617157.sqlite.sql"),
            include_str!("testdata/unversioned_b617157.postgres.sql"),
        ),
    ];

    /// A run and a shard as the first release wrote them (its columns only).
    const FIRST_RELEASE_ROWS: &str = "
        INSERT INTO shardflow_runs (run_id, job_key, data_source_id, etl_run_id, dest_table,
            status, mode, plan_json, owner, heartbeat_at, started_at, finished_at,
            rows_extracted, rows_loaded, error_message)
        VALUES ('old-run.1', 'old-run', 7, 41, 'orders', 'completed', 'catalog', '{}',
            'dispatcher-a', '2026-11-22T10:00:00.000000Z', '2026-11-22T09:59:00.000000Z',
            '2026-11-22T10:00:01.000000Z', 1500, 1500, NULL);
        INSERT INTO shardflow_shards (run_id, shard_id, shard_index, estimated_rows,
            bounds_json, task_json, status, rows, bytes, files_json, attempts)
        VALUES ('old-run.1', 's0', 0, 1500, '{}', '{}', 'succeeded', 1500, 4096, '[]', 1);";

    /// (table, column, type, nullable, default) of every shardflow table, as the catalog says.
    async fn columns(pool: &AnyPool, backend: Backend) -> Vec<(String, String, String, String)> {
        let sql = match backend {
            Backend::Sqlite => {
                "SELECT m.name AS t, p.name AS c, p.type AS ty,
                        CAST(p.\"notnull\" AS TEXT) AS n
                 FROM sqlite_master m, pragma_table_info(m.name) p
                 WHERE m.type = 'table' AND m.name LIKE 'shardflow%'
                 ORDER BY 1, 2"
            }
            Backend::Postgres => {
                "SELECT table_name::text AS t, column_name::text AS c, data_type::text AS ty,
                        is_nullable::text AS n
                 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name LIKE 'shardflow%'
                 ORDER BY 1, 2"
            }
        };
        sqlx::query(sql)
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>("t"),
                    r.get::<String, _>("c"),
                    r.get::<String, _>("ty").to_uppercase(),
                    r.get::<String, _>("n"),
                )
            })
            .collect()
    }

    async fn indexes(pool: &AnyPool, backend: Backend) -> Vec<String> {
        let sql = match backend {
            Backend::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'shardflow%'
                 ORDER BY 1"
            }
            Backend::Postgres => {
                "SELECT indexname::text AS name FROM pg_indexes
                 WHERE schemaname = current_schema() AND indexname LIKE 'shardflow%' ORDER BY 1"
            }
        };
        sqlx::query(sql)
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>("name"))
            .collect()
    }

    async fn ledger(pool: &AnyPool) -> Vec<i64> {
        sqlx::query_scalar("SELECT version FROM shardflow_schema_migrations ORDER BY version")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    /// Each unversioned store upgrades in place to the schema a new store gets, keeps its
    /// rows, passes the suite, and is not migrated again; a store newer than the build is
    /// refused. `url_of(name)` makes an empty store.
    async fn unversioned_stores_upgrade_in_place(
        backend: Backend,
        url_of: &dyn Fn(&str) -> String,
        raw: &dyn Fn(&str) -> AnyPool,
    ) {
        let fresh_url = url_of("fresh");
        let fresh = SqlStateStore::open(&fresh_url).await.unwrap();
        let want_columns = columns(&fresh.pool, backend).await;
        let want_indexes = indexes(&fresh.pool, backend).await;
        let latest = super::super::migrate::latest_version();
        assert_eq!(ledger(&fresh.pool).await, (1..=latest).collect::<Vec<_>>());
        assert!(
            want_columns
                .iter()
                .any(|(t, c, _, _)| t == "shardflow_runs" && c == "stream_key"),
            "{want_columns:?}"
        );
        for (commit, sqlite, postgres) in UNVERSIONED {
            let url = url_of(commit);
            let pool = raw(&url);
            let schema = match backend {
                Backend::Sqlite => sqlite,
                Backend::Postgres => postgres,
            };
            sqlx::raw_sql(sqlx::AssertSqlSafe(schema))
                .execute(&pool)
                .await
                .unwrap();
            sqlx::raw_sql(FIRST_RELEASE_ROWS)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;

            let store = SqlStateStore::open(&url).await.unwrap();
            assert_eq!(
                columns(&store.pool, backend).await,
                want_columns,
                "{commit}"
            );
            assert_eq!(
                indexes(&store.pool, backend).await,
                want_indexes,
                "{commit}"
            );
            assert_eq!(ledger(&store.pool).await, (1..=latest).collect::<Vec<_>>());
            let old = store
                .run("old-run.1")
                .await
                .unwrap()
                .expect("the old run is kept");
            assert_eq!(
                (
                    old.status.as_str(),
                    old.rows_loaded,
                    old.etl_run_id,
                    old.checksum
                ),
                ("completed", Some(1500), Some(41), None),
                "{commit}"
            );
            let shards = store.shards("old-run.1").await.unwrap();
            assert_eq!((shards.len(), shards[0].rows), (1, Some(1500)), "{commit}");
            conformance::run_all(&store).await;
            drop(store);
            // Opened again: nothing to apply, nothing lost.
            let again = SqlStateStore::open(&url).await.unwrap();
            assert_eq!(ledger(&again.pool).await, (1..=latest).collect::<Vec<_>>());
            assert_eq!(again.shards("run-1").await.unwrap().len(), 2, "{commit}");
            // A store upgraded by a newer shardflow is refused, not misread.
            sqlx::query(
                "INSERT INTO shardflow_schema_migrations VALUES ($1, 'from the future', 'f', 'now')",
            )
            .bind(latest + 1)
            .execute(&again.pool)
            .await
            .unwrap();
            drop(again);
            let refused = SqlStateStore::open(&url)
                .await
                .err()
                .expect("refused")
                .to_string();
            assert!(
                refused.contains(&format!(
                    "schema is at version {}, newer than this shardflow knows (version {latest})",
                    latest + 1
                )),
                "{refused}"
            );
        }
    }

    fn lazy_pool(url: &str) -> AnyPool {
        sqlx::any::install_default_drivers();
        AnyPoolOptions::new()
            .max_connections(1)
            .connect_lazy(url)
            .unwrap()
    }

    #[tokio::test]
    async fn unversioned_sqlite_stores_upgrade_in_place() {
        let dir = std::env::temp_dir().join(format!("shardflow-upgrade-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url_of = |name: &str| format!("sqlite://{}?mode=rwc", dir.join(name).display());
        unversioned_stores_upgrade_in_place(Backend::Sqlite, &url_of, &lazy_pool).await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(feature = "service-tests")]
    #[tokio::test]
    async fn unversioned_postgres_stores_upgrade_in_place() {
        let admin = std::env::var("SHARDFLOW_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let admin_pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed (start it): {e}"));
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let mut dbs = Vec::new();
        for name in ["fresh", "506d605", "b617157"] {
            let db = format!("shardflow_upgrade_{name}_{tag}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
                .execute(&admin_pool)
                .await
                .unwrap();
            dbs.push(db);
        }
        let base = admin.rsplit_once('/').unwrap().0.to_string();
        let url_of = |name: &str| format!("{base}/shardflow_upgrade_{name}_{tag}");
        unversioned_stores_upgrade_in_place(Backend::Postgres, &url_of, &lazy_pool).await;
        for db in dbs {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {db} WITH (FORCE)"
            )))
            .execute(&admin_pool)
            .await
            .unwrap();
        }
    }

    #[test]
    fn urls_are_redacted_and_checked() {
        assert_eq!(
            redact_url("postgres://etl:s3cret@db:5432/state"),
            "postgres://etl:***@db:5432/state"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
        let err = backend_of("mysql://u:pw@h/db").unwrap_err().to_string();
        assert!(
            err.contains("mysql://u:***@h/db") && !err.contains("pw"),
            "{err}"
        );
    }

    #[test]
    fn timestamps_compare_as_text() {
        use chrono::TimeZone;
        let a = timestamp(chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap());
        let b = timestamp(
            chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
                + chrono::Duration::microseconds(1),
        );
        assert_eq!(a, "2026-01-02T03:04:05.000000Z");
        assert!(a < b);
    }
}
