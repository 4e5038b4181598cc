//! The state store: runs, their shards, and each shard's result. Recording a result is
//! idempotent by shard id: the first success wins and a duplicate changes nothing.

pub mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::messages::{ShardOutcome, ShardResult, StagedFile};
use crate::source::ShardBounds;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Completed,
    Failed,
}

impl RunStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug)]
pub struct NewRun {
    pub run_id: String,
    pub data_source_id: Option<i64>,
    pub etl_run_id: Option<i64>,
    pub dest_table: String,
    pub mode: String,
    pub plan_json: String,
}

#[derive(Clone, Debug)]
pub struct NewShard {
    pub shard_id: String,
    pub shard_index: u32,
    pub estimated_rows: u64,
    pub bounds: ShardBounds,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ShardRecord {
    pub shard_id: String,
    pub shard_index: u32,
    pub estimated_rows: u64,
    pub status: String,
    pub rows: Option<u64>,
    pub files: Vec<StagedFile>,
    pub attempts: u32,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    pub run_id: String,
    pub status: String,
    pub rows_extracted: Option<u64>,
    pub rows_loaded: Option<u64>,
    pub error_message: Option<String>,
}

/// What recording a shard result did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The first success for this shard.
    Succeeded,
    /// A failed attempt, noted; the shard stays pending (it will be retried or dead-lettered).
    FailedAttempt,
    /// The shard already had a success (or is terminally failed): nothing changed.
    Duplicate,
}

#[async_trait]
pub trait StateStore: Send + Sync {
    async fn create_run(&self, run: &NewRun, shards: &[NewShard]) -> Result<()>;
    async fn record_result(&self, result: &ShardResult) -> Result<Recorded>;
    /// Marks a shard failed for good (dead-lettered); false when it had already succeeded.
    async fn fail_shard(&self, run_id: &str, shard_id: &str, error: &str) -> Result<bool>;
    async fn shards(&self, run_id: &str) -> Result<Vec<ShardRecord>>;
    async fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        rows_extracted: u64,
        rows_loaded: u64,
        error_message: Option<&str>,
    ) -> Result<()>;
    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>>;
}

/// The rows and files of a success, for storing.
pub(crate) fn success_parts(result: &ShardResult) -> Option<(u64, u64, &[StagedFile])> {
    match &result.outcome {
        ShardOutcome::Succeeded {
            rows, bytes, files, ..
        } => Some((*rows, *bytes, files.as_slice())),
        ShardOutcome::Failed { .. } => None,
    }
}

#[cfg(test)]
mod conformance {
    //! One suite, run against every backend.
    use super::*;
    use crate::messages::WIRE_VERSION;

    pub fn result(shard: &str, outcome: ShardOutcome) -> ShardResult {
        ShardResult {
            version: WIRE_VERSION,
            run_id: "run-1".into(),
            shard_id: shard.into(),
            delivery_attempt: 1,
            worker_id: "w".into(),
            outcome,
        }
    }

    pub fn success(rows: u64) -> ShardOutcome {
        ShardOutcome::Succeeded {
            rows,
            bytes: 10,
            files: vec![StagedFile {
                path: "run-1/s/part-00000.parquet".into(),
                rows,
                bytes: 10,
            }],
            seconds: 0.5,
        }
    }

    pub async fn results_are_idempotent_by_shard(store: &dyn StateStore) {
        let shards: Vec<NewShard> = (0..2)
            .map(|i| NewShard {
                shard_id: format!("s{i}"),
                shard_index: i,
                estimated_rows: 100,
                bounds: ShardBounds::Whole,
            })
            .collect();
        let run = NewRun {
            run_id: "run-1".into(),
            data_source_id: Some(7),
            etl_run_id: None,
            dest_table: "t".into(),
            mode: "sharded".into(),
            plan_json: "{}".into(),
        };
        store.create_run(&run, &shards).await.unwrap();
        // Creating the same run again (a redelivered job) is not an error and changes nothing.
        store.create_run(&run, &shards).await.unwrap();

        let failed = result(
            "s0",
            ShardOutcome::Failed {
                error: "boom".into(),
            },
        );
        assert_eq!(
            store.record_result(&failed).await.unwrap(),
            Recorded::FailedAttempt
        );
        assert_eq!(
            store
                .record_result(&result("s0", success(5)))
                .await
                .unwrap(),
            Recorded::Succeeded
        );
        assert_eq!(
            store
                .record_result(&result("s0", success(99)))
                .await
                .unwrap(),
            Recorded::Duplicate
        );
        assert_eq!(
            store.record_result(&failed).await.unwrap(),
            Recorded::Duplicate
        );

        let records = store.shards("run-1").await.unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].status, "succeeded");
        assert_eq!(records[0].rows, Some(5), "the first success wins");
        assert_eq!(records[0].attempts, 2);
        assert_eq!(records[0].files.len(), 1);
        assert_eq!(records[1].status, "pending");

        assert!(
            store
                .fail_shard("run-1", "s1", "dead-lettered")
                .await
                .unwrap()
        );
        assert!(!store.fail_shard("run-1", "s0", "late").await.unwrap());
        assert_eq!(
            store
                .record_result(&result("s1", success(1)))
                .await
                .unwrap(),
            Recorded::Duplicate
        );

        store
            .finish_run("run-1", RunStatus::Failed, 5, 0, Some("shard s1 failed"))
            .await
            .unwrap();
        let r = store.run("run-1").await.unwrap().unwrap();
        assert_eq!(r.status, "failed");
        assert_eq!(r.error_message.as_deref(), Some("shard s1 failed"));
        assert_eq!(store.run("nope").await.unwrap(), None);
    }
}
