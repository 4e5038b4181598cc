//! The embedded state store: a SQLite file (sqlx), WAL mode, schema in `sqlite.sql`.

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

use super::{
    NewRun, NewShard, Recorded, RunRecord, RunStatus, ShardRecord, StateStore, success_parts,
};
use crate::messages::{ShardOutcome, ShardResult};
use crate::{Error, Result};

const SCHEMA: &str = include_str!("sqlite.sql");

pub struct SqliteStateStore {
    pool: SqlitePool,
}

impl SqliteStateStore {
    /// Opens (creating if needed) `sqlite://PATH` or `sqlite::memory:`.
    pub async fn open(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::State(format!("bad state store URL {url:?}: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            // One writer keeps SQLite's locking simple; the store is not on the hot path.
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|e| Error::State(format!("cannot open {url}: {e}")))?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(SqliteStateStore { pool })
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

#[async_trait]
impl StateStore for SqliteStateStore {
    async fn create_run(&self, run: &NewRun, shards: &[NewShard]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO runs (run_id, data_source_id, etl_run_id, dest_table, status, mode, plan_json, started_at)
             VALUES (?, ?, ?, ?, 'running', ?, ?, ?) ON CONFLICT (run_id) DO NOTHING",
        )
        .bind(&run.run_id)
        .bind(run.data_source_id)
        .bind(run.etl_run_id)
        .bind(&run.dest_table)
        .bind(&run.mode)
        .bind(&run.plan_json)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        for s in shards {
            sqlx::query(
                "INSERT INTO shards (run_id, shard_id, shard_index, estimated_rows, bounds_json, status)
                 VALUES (?, ?, ?, ?, ?, 'pending') ON CONFLICT (run_id, shard_id) DO NOTHING",
            )
            .bind(&run.run_id)
            .bind(&s.shard_id)
            .bind(s.shard_index as i64)
            .bind(s.estimated_rows as i64)
            .bind(serde_json::to_string(&s.bounds)?)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn record_result(&self, result: &ShardResult) -> Result<Recorded> {
        let changed = match success_parts(result) {
            Some((rows, bytes, files)) => sqlx::query(
                "UPDATE shards SET status = 'succeeded', rows = ?, bytes = ?, files_json = ?,
                        attempts = attempts + 1, error = NULL
                 WHERE run_id = ? AND shard_id = ? AND status = 'pending'",
            )
            .bind(rows as i64)
            .bind(bytes as i64)
            .bind(serde_json::to_string(files)?)
            .bind(&result.run_id)
            .bind(&result.shard_id)
            .execute(&self.pool)
            .await?
            .rows_affected(),
            None => {
                let ShardOutcome::Failed { error } = &result.outcome else {
                    unreachable!("success_parts is None only for failures")
                };
                sqlx::query(
                    "UPDATE shards SET attempts = attempts + 1, error = ?
                     WHERE run_id = ? AND shard_id = ? AND status = 'pending'",
                )
                .bind(error)
                .bind(&result.run_id)
                .bind(&result.shard_id)
                .execute(&self.pool)
                .await?
                .rows_affected()
            }
        };
        Ok(match (changed, success_parts(result).is_some()) {
            (0, _) => Recorded::Duplicate,
            (_, true) => Recorded::Succeeded,
            (_, false) => Recorded::FailedAttempt,
        })
    }

    async fn fail_shard(&self, run_id: &str, shard_id: &str, error: &str) -> Result<bool> {
        let changed = sqlx::query(
            "UPDATE shards SET status = 'failed', error = ? WHERE run_id = ? AND shard_id = ? AND status = 'pending'",
        )
        .bind(error)
        .bind(run_id)
        .bind(shard_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed > 0)
    }

    async fn shards(&self, run_id: &str) -> Result<Vec<ShardRecord>> {
        let rows = sqlx::query(
            "SELECT shard_id, shard_index, estimated_rows, status, rows, files_json, attempts, error
             FROM shards WHERE run_id = ? ORDER BY shard_index",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let files: Option<String> = r.try_get("files_json")?;
                Ok(ShardRecord {
                    shard_id: r.try_get("shard_id")?,
                    shard_index: r.try_get::<i64, _>("shard_index")? as u32,
                    estimated_rows: r.try_get::<i64, _>("estimated_rows")? as u64,
                    status: r.try_get("status")?,
                    rows: r.try_get::<Option<i64>, _>("rows")?.map(|v| v as u64),
                    files: match files {
                        Some(f) => serde_json::from_str(&f)?,
                        None => Vec::new(),
                    },
                    attempts: r.try_get::<i64, _>("attempts")? as u32,
                    error: r.try_get("error")?,
                })
            })
            .collect()
    }

    async fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        rows_extracted: u64,
        rows_loaded: u64,
        error_message: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE runs SET status = ?, finished_at = ?, rows_extracted = ?, rows_loaded = ?, error_message = ?
             WHERE run_id = ?",
        )
        .bind(status.as_str())
        .bind(now())
        .bind(rows_extracted as i64)
        .bind(rows_loaded as i64)
        .bind(error_message)
        .bind(run_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        let row = sqlx::query(
            "SELECT run_id, status, rows_extracted, rows_loaded, error_message FROM runs WHERE run_id = ?",
        )
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(RunRecord {
                run_id: r.try_get("run_id")?,
                status: r.try_get("status")?,
                rows_extracted: r
                    .try_get::<Option<i64>, _>("rows_extracted")?
                    .map(|v| v as u64),
                rows_loaded: r
                    .try_get::<Option<i64>, _>("rows_loaded")?
                    .map(|v| v as u64),
                error_message: r.try_get("error_message")?,
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_passes_the_state_store_suite() {
        let dir = std::env::temp_dir().join(format!("shardflow-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("state.db").display());
        let store = SqliteStateStore::open(&url).await.unwrap();
        super::super::conformance::results_are_idempotent_by_shard(&store).await;
        // The file survives a reopen with its data.
        drop(store);
        let store = SqliteStateStore::open(&url).await.unwrap();
        assert_eq!(store.shards("run-1").await.unwrap().len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
