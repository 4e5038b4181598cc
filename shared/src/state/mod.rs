//! The state store: runs, their shards, and each shard's result. Recording a result is
//! idempotent by shard id: the first success wins and a duplicate changes nothing. A run has
//! an owner (the dispatcher driving it) with a heartbeat, so a restarted or another dispatcher
//! can take over a run whose owner went quiet, and never one that is alive.

pub mod migrate;
pub mod sql;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::messages::{ShardOutcome, ShardResult, StagedFile};
use crate::source::ShardBounds;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Where every run starts.
    #[default]
    Running,
    Completed,
    Failed,
    /// Its dispatcher went quiet and another took the job over as a new run: not the job's
    /// outcome, which is that of the run after it.
    Superseded,
    /// Its owner went quiet and no job continued it; the sweep closed it and removed its
    /// scratch. A later delivery of its job starts a new run, as after `Superseded`.
    Abandoned,
}

/// A shard of a run: waiting for its result, or settled by its first result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardStatus {
    Pending,
    Succeeded,
    Failed,
}

impl ShardStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            ShardStatus::Pending => "pending",
            ShardStatus::Succeeded => "succeeded",
            ShardStatus::Failed => "failed",
        }
    }
}

/// A status as the store keeps it (its serde name, which `as_str` gives too), read back; text
/// it does not know is an error, never a guess.
pub(crate) fn parse_status<T: serde::de::DeserializeOwned>(
    what: &str,
    text: &str,
) -> crate::Result<T> {
    serde_json::from_value(serde_json::Value::String(text.to_string()))
        .map_err(|_| crate::Error::State(format!("unknown {what} status {text:?}")))
}

impl RunStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Superseded => "superseded",
            RunStatus::Abandoned => "abandoned",
        }
    }
}

#[derive(Clone, Debug)]
pub struct NewRun {
    pub run_id: String,
    pub job_key: String,
    pub data_source_id: Option<i64>,
    pub etl_run_id: Option<i64>,
    pub dest_table: String,
    pub mode: String,
    pub plan_json: String,
    pub owner: String,
    /// For an incremental load, its stream (source -> destination): while one run of a
    /// stream is running, no other may start.
    pub stream_key: Option<String>,
    /// The stream's recorded watermark that planning started from: the run is not created
    /// when a load of the stream committed since (its window would overlap that load).
    pub stream_watermark: Option<String>,
}

/// What `create_run` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    Created,
    /// The run exists already (another dispatcher created it a moment ago).
    RunExists,
    /// Another run of the same incremental stream is running.
    StreamBusy {
        run_id: String,
    },
    /// A load of the stream committed after the run was planned: plan again.
    StreamMoved {
        watermark: Option<String>,
    },
}

#[derive(Clone, Debug)]
pub struct NewShard {
    pub shard_id: String,
    pub shard_index: u32,
    pub estimated_rows: u64,
    pub bounds: ShardBounds,
    /// The encoded shard message (no secret in it), republished when a run is resumed.
    pub task_json: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ShardRecord {
    pub shard_id: String,
    pub shard_index: u32,
    pub estimated_rows: u64,
    pub status: ShardStatus,
    pub rows: Option<u64>,
    pub files: Vec<StagedFile>,
    /// From the success: the content checksum, the parts' schema, the timestamp maximum.
    pub checksum: Option<String>,
    /// The Arrow schema as JSON, decoded only by the finalisation that checks it (the run's
    /// owner rereads its shards on every result).
    pub schema_json: Option<String>,
    pub max_value: Option<String>,
    /// File shards: rows read from each file of the shard.
    pub source_rows: Vec<u64>,
    pub attempts: u32,
    pub error: Option<String>,
    pub task_json: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    pub run_id: String,
    pub job_key: String,
    pub data_source_id: Option<i64>,
    pub etl_run_id: Option<i64>,
    pub owner: String,
    /// When the owner last said it was alive (fixed-width UTC text).
    pub heartbeat_at: String,
    pub status: RunStatus,
    pub rows_extracted: Option<u64>,
    pub rows_loaded: Option<u64>,
    pub checksum: Option<String>,
    pub watermark: Option<String>,
    pub error_message: Option<String>,
    /// The plan as recorded (a taken-over run's window is read from it).
    pub plan_json: String,
    /// An incremental load's stream (see `NewRun`).
    pub stream_key: Option<String>,
}

/// How a run ended, as recorded by `finish_run`.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEnd {
    pub status: RunStatus,
    pub rows_extracted: u64,
    pub rows_loaded: u64,
    /// The combined content checksum of the loaded rows.
    pub checksum: Option<String>,
    /// The largest timestamp-column value loaded; recorded only with the committed load.
    /// A file stream's position is the run id of its last load.
    pub watermark: Option<String>,
    pub error_message: Option<String>,
    /// The files the committed load read, recorded in the same transaction as the run's end.
    pub processed_files: Vec<ProcessedFile>,
}

/// A source file a committed load read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessedFile {
    pub stream_key: String,
    pub path: String,
    pub size: u64,
    /// The generation or ETag the file had: a file rewritten since is new again.
    pub version: String,
    pub last_modified: String,
    /// None when BigQuery loaded several files in one job (the fast path) and counted only
    /// their total.
    pub rows: Option<u64>,
    pub run_id: String,
}

impl RunEnd {
    pub fn failed(error_message: impl Into<String>) -> Self {
        Self::ended(RunStatus::Failed, error_message)
    }

    pub fn superseded(why: impl Into<String>) -> Self {
        Self::ended(RunStatus::Superseded, why)
    }

    pub fn abandoned(why: impl Into<String>) -> Self {
        Self::ended(RunStatus::Abandoned, why)
    }

    fn ended(status: RunStatus, error_message: impl Into<String>) -> Self {
        RunEnd {
            status,
            rows_extracted: 0,
            rows_loaded: 0,
            checksum: None,
            watermark: None,
            error_message: Some(error_message.into()),
            processed_files: Vec::new(),
        }
    }
}

/// A run's final status for Django, recorded before the job message is acked and sent until
/// Django accepts it (`dispatcher::report`).
#[derive(Clone, Debug, PartialEq)]
pub struct PendingReport {
    pub etl_run_id: i64,
    /// The PATCH body (a `RunUpdate` as JSON).
    pub body: String,
    /// When it was recorded (fixed-width UTC text): the give-up time counts from here.
    pub recorded_at: String,
    /// Attempts so far, this one included.
    pub attempts: u32,
}

/// How an attempt to deliver a report went.
#[derive(Clone, Debug, PartialEq)]
pub enum ReportAttempt {
    Delivered,
    /// Not delivered; try again after this long.
    RetryAfter {
        delay: Duration,
        error: String,
    },
    /// Never to be delivered (Django refused it, or it failed for too long).
    GaveUp {
        error: String,
    },
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
    /// Records a new run and its shards, unless the run exists or another run of its stream
    /// is running (then nothing changes).
    async fn create_run(&self, run: &NewRun, shards: &[NewShard]) -> Result<Created>;
    /// Makes `owner` the owner of a running run whose owner (another dispatcher) has not
    /// beaten for `stale_after`. False when its owner is alive, is `owner` itself (a
    /// duplicate job inside one dispatcher), or the run ended.
    async fn claim_run(&self, run_id: &str, owner: &str, stale_after: Duration) -> Result<bool>;
    /// The owner is alive; false when the run is no longer its own (taken over or ended).
    async fn heartbeat(&self, run_id: &str, owner: &str) -> Result<bool>;
    async fn record_result(&self, result: &ShardResult) -> Result<Recorded>;
    /// Marks a shard failed for good (dead-lettered); false when it had already succeeded.
    async fn fail_shard(&self, run_id: &str, shard_id: &str, error: &str) -> Result<bool>;
    async fn shards(&self, run_id: &str) -> Result<Vec<ShardRecord>>;
    async fn finish_run(&self, run_id: &str, end: &RunEnd) -> Result<()>;
    async fn run(&self, run_id: &str) -> Result<Option<RunRecord>>;
    /// The newest run of a job key.
    async fn latest_run(&self, job_key: &str) -> Result<Option<RunRecord>>;
    /// Every run whose status is `running`, oldest first.
    async fn running_runs(&self) -> Result<Vec<RunRecord>>;
    /// The newest run of an incremental stream.
    async fn latest_stream_run(&self, stream_key: &str) -> Result<Option<RunRecord>>;
    /// The watermark recorded with the newest completed load of an incremental stream.
    async fn stream_watermark(&self, stream_key: &str) -> Result<Option<String>>;
    /// Every file the committed loads of a file stream read.
    async fn processed_files(&self, stream_key: &str) -> Result<Vec<ProcessedFile>>;
    /// Records a run's final report for Django unless one is recorded for that Django run
    /// already (the first is the run's outcome; a redelivered job reports it no differently).
    /// True when this call recorded it.
    async fn record_report(&self, etl_run_id: i64, body: &str) -> Result<bool>;
    /// The reports due for an attempt, each claimed for `claim_for` (another dispatcher of
    /// the store does not take it meanwhile) and its attempts counted.
    async fn claim_due_reports(&self, claim_for: Duration) -> Result<Vec<PendingReport>>;
    async fn report_attempted(&self, etl_run_id: i64, attempt: &ReportAttempt) -> Result<()>;
    /// Delivered or given-up reports recorded longer ago than `older_than` are deleted.
    async fn prune_reports(&self, older_than: Duration) -> Result<u64>;
    /// A report as recorded, and whether it is delivered, given up or neither.
    async fn report(&self, etl_run_id: i64) -> Result<Option<(PendingReport, ReportState)>>;
}

/// Where a recorded report stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportState {
    Pending,
    Delivered,
    GaveUp,
}

/// What a success stores.
pub(crate) struct Success<'a> {
    pub rows: u64,
    pub bytes: u64,
    pub files: &'a [StagedFile],
    pub checksum: &'a str,
    pub schema: &'a arrow_schema::Schema,
    pub max_value: Option<&'a str>,
    pub source_rows: &'a [u64],
}

pub(crate) fn success(result: &ShardResult) -> Option<Success<'_>> {
    match &result.outcome {
        ShardOutcome::Succeeded {
            rows,
            bytes,
            files,
            checksum,
            schema,
            max_value,
            source_rows,
            ..
        } => Some(Success {
            source_rows,
            rows: *rows,
            bytes: *bytes,
            files,
            checksum,
            schema,
            max_value: max_value.as_deref(),
        }),
        ShardOutcome::Failed { .. } => None,
    }
}

#[cfg(test)]
pub(crate) mod conformance {
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

    fn schema() -> arrow_schema::Schema {
        use arrow_schema::{DataType, Field, TimeUnit};
        arrow_schema::Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ])
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
            checksum: format!("{rows:016x}"),
            schema: schema(),
            max_value: Some(format!("2024-01-0{}T00:00:00+00:00", rows % 9 + 1)),
            source_rows: vec![rows],
        }
    }

    pub async fn results_are_idempotent_by_shard(store: &dyn StateStore) {
        let shards: Vec<NewShard> = (0..2)
            .map(|i| NewShard {
                shard_id: format!("s{i}"),
                shard_index: i,
                estimated_rows: 100,
                bounds: ShardBounds::Whole,
                task_json: format!("{{\"shard\":{i}}}"),
            })
            .collect();
        let run = NewRun {
            run_id: "run-1".into(),
            job_key: "job-1".into(),
            data_source_id: Some(7),
            etl_run_id: None,
            dest_table: "t".into(),
            mode: "sharded".into(),
            plan_json: "{}".into(),
            owner: "dispatcher-a".into(),
            stream_key: None,
            stream_watermark: None,
        };
        assert_eq!(
            store.create_run(&run, &shards).await.unwrap(),
            Created::Created
        );
        // Creating the same run again (a redelivered job) changes nothing and says so.
        assert_eq!(
            store.create_run(&run, &[]).await.unwrap(),
            Created::RunExists
        );

        let failed = result(
            "s0",
            ShardOutcome::Failed {
                error: "boom".into(),
                permanent: false,
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
        assert_eq!(records[0].status, ShardStatus::Succeeded);
        assert_eq!(records[0].rows, Some(5), "the first success wins");
        assert_eq!(records[0].attempts, 2);
        assert_eq!(records[0].files.len(), 1);
        assert_eq!(records[0].checksum.as_deref(), Some("0000000000000005"));
        let stored: arrow_schema::Schema =
            serde_json::from_str(records[0].schema_json.as_deref().unwrap()).unwrap();
        assert_eq!(stored, schema());
        assert_eq!(
            records[0].max_value.as_deref(),
            Some("2024-01-06T00:00:00+00:00")
        );
        assert_eq!(
            (
                records[1].checksum.as_ref(),
                records[1].schema_json.as_ref()
            ),
            (None, None)
        );
        assert_eq!(records[1].status, ShardStatus::Pending);
        assert_eq!(records[1].task_json, "{\"shard\":1}");

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
            .finish_run("run-1", &RunEnd::failed("shard s1 failed"))
            .await
            .unwrap();
        let r = store.run("run-1").await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Failed);
        assert_eq!(r.error_message.as_deref(), Some("shard s1 failed"));
        assert_eq!((r.checksum, r.watermark), (None, None));
        assert_eq!((r.data_source_id, r.etl_run_id), (Some(7), None));
        assert_eq!(store.run("nope").await.unwrap(), None);
    }

    pub async fn only_a_quiet_owner_loses_its_run(store: &dyn StateStore) {
        let run = NewRun {
            run_id: "run-2".into(),
            job_key: "job-2".into(),
            data_source_id: Some(8),
            etl_run_id: Some(80),
            dest_table: "t".into(),
            mode: "standard".into(),
            plan_json: "{}".into(),
            owner: "a".into(),
            stream_key: None,
            stream_watermark: None,
        };
        assert_eq!(store.create_run(&run, &[]).await.unwrap(), Created::Created);
        let long = Duration::from_secs(3600);
        assert!(store.heartbeat("run-2", "a").await.unwrap());
        assert!(
            !store.claim_run("run-2", "a", Duration::ZERO).await.unwrap(),
            "its own"
        );
        assert!(
            !store.claim_run("run-2", "b", long).await.unwrap(),
            "a is alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            store
                .claim_run("run-2", "b", Duration::from_millis(10))
                .await
                .unwrap()
        );
        assert!(!store.heartbeat("run-2", "a").await.unwrap(), "a lost it");
        assert_eq!(store.run("run-2").await.unwrap().unwrap().owner, "b");
        let end = RunEnd {
            status: RunStatus::Completed,
            rows_extracted: 3,
            rows_loaded: 3,
            checksum: Some("00000000000000ff".into()),
            watermark: Some("2024-05-01T00:00:00+00:00".into()),
            error_message: None,
            processed_files: vec![
                ProcessedFile {
                    stream_key: "files->t".into(),
                    path: "in/a.csv".into(),
                    size: 10,
                    version: "17".into(),
                    last_modified: "2024-05-01T00:00:00+00:00".into(),
                    rows: Some(3),
                    run_id: "run-2".into(),
                },
                ProcessedFile {
                    stream_key: "files->t".into(),
                    path: "in/b.csv".into(),
                    size: 20,
                    version: "18".into(),
                    last_modified: "2024-05-01T00:00:00+00:00".into(),
                    rows: None,
                    run_id: "run-2".into(),
                },
            ],
        };
        assert!(store.processed_files("files->t").await.unwrap().is_empty());
        store.finish_run("run-2", &end).await.unwrap();
        // Recorded with the run's end, once however often it is finished.
        store.finish_run("run-2", &end).await.unwrap();
        assert_eq!(
            store.processed_files("files->t").await.unwrap(),
            end.processed_files
        );
        assert!(store.processed_files("other->t").await.unwrap().is_empty());
        let r = store.run("run-2").await.unwrap().unwrap();
        assert_eq!(
            (r.status.as_str(), r.rows_loaded, r.checksum, r.watermark),
            ("completed", Some(3), end.checksum, end.watermark)
        );
        assert!(!store.claim_run("run-2", "b", long).await.unwrap(), "ended");
        assert!(!store.heartbeat("run-2", "b").await.unwrap());

        // A second run of the same job is the latest.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let again = NewRun {
            run_id: "run-3".into(),
            ..run
        };
        assert_eq!(
            store.create_run(&again, &[]).await.unwrap(),
            Created::Created
        );
        let latest = store.latest_run("job-2").await.unwrap().unwrap();
        assert_eq!(
            (latest.run_id.as_str(), latest.status.as_str()),
            ("run-3", "running")
        );
        assert_eq!(store.latest_run("job-x").await.unwrap(), None);
    }

    /// One run of an incremental stream at a time; its watermark is that of its newest
    /// completed load.
    pub async fn incremental_streams_run_one_at_a_time(store: &dyn StateStore) {
        let stream = Some("ds9:events".to_string());
        let run = |id: &str, job: &str, seen: Option<&str>| NewRun {
            run_id: id.into(),
            job_key: job.into(),
            data_source_id: Some(9),
            etl_run_id: None,
            dest_table: "events".into(),
            mode: "standard".into(),
            plan_json: "{}".into(),
            owner: "a".into(),
            stream_key: stream.clone(),
            stream_watermark: seen.map(str::to_string),
        };
        let key = stream.as_deref().unwrap();
        assert_eq!(store.stream_watermark(key).await.unwrap(), None);
        assert_eq!(
            store
                .create_run(&run("inc-1.1", "inc-1", None), &[])
                .await
                .unwrap(),
            Created::Created
        );
        // Another job of the same stream waits for it; a job of another stream does not.
        assert_eq!(
            store
                .create_run(&run("inc-2.1", "inc-2", None), &[])
                .await
                .unwrap(),
            Created::StreamBusy {
                run_id: "inc-1.1".into()
            }
        );
        assert_eq!(
            store.run("inc-2.1").await.unwrap(),
            None,
            "nothing recorded"
        );
        let other = NewRun {
            stream_key: Some("ds10:events".into()),
            ..run("inc-3.1", "inc-3", None)
        };
        assert_eq!(
            store.create_run(&other, &[]).await.unwrap(),
            Created::Created
        );
        let done = |watermark: Option<&str>| RunEnd {
            status: RunStatus::Completed,
            rows_extracted: 1,
            rows_loaded: 1,
            checksum: None,
            watermark: watermark.map(str::to_string),
            error_message: None,
            processed_files: Vec::new(),
        };
        store
            .finish_run("inc-1.1", &done(Some("2024-05-01T00:00:00Z")))
            .await
            .unwrap();
        assert_eq!(
            store.stream_watermark(key).await.unwrap().as_deref(),
            Some("2024-05-01T00:00:00Z")
        );
        // The stream is free again, but a run planned before that load committed would read
        // its rows again: it is refused, and created once planned from the new watermark.
        assert_eq!(
            store
                .create_run(&run("inc-2.1", "inc-2", None), &[])
                .await
                .unwrap(),
            Created::StreamMoved {
                watermark: Some("2024-05-01T00:00:00Z".into())
            }
        );
        assert_eq!(
            store
                .create_run(&run("inc-2.1", "inc-2", Some("2024-05-01T00:00:00Z")), &[])
                .await
                .unwrap(),
            Created::Created
        );
        // A failed run records no watermark.
        store
            .finish_run("inc-2.1", &RunEnd::failed("boom"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store
                .create_run(&run("inc-4.1", "inc-4", Some("2024-05-01T00:00:00Z")), &[])
                .await
                .unwrap(),
            Created::Created
        );
        store
            .finish_run("inc-4.1", &done(Some("2024-06-01T00:00:00Z")))
            .await
            .unwrap();
        assert_eq!(
            store.stream_watermark(key).await.unwrap().as_deref(),
            Some("2024-06-01T00:00:00Z")
        );
        assert_eq!(store.stream_watermark("ds10:events").await.unwrap(), None);
    }

    /// A job message delivered twice and handled by two dispatchers at once creates its run
    /// once: the other creation sees the run, not an error (which would report the job failed
    /// to Django while the first creation loads it).
    pub async fn a_run_created_twice_at_once_exists_once(store: &dyn StateStore) {
        // The window between the stream check and the insert is narrow: forty rounds met it
        // within two runs of the suite against PostgreSQL before the fix.
        for round in 0..40 {
            let run = NewRun {
                run_id: format!("twice-{round}.1"),
                job_key: format!("twice-{round}"),
                data_source_id: Some(11),
                etl_run_id: None,
                dest_table: "orders".into(),
                mode: "standard".into(),
                plan_json: "{}".into(),
                owner: "a".into(),
                stream_key: Some("ds11:orders".into()),
                stream_watermark: None,
            };
            let shard = NewShard {
                shard_id: "s0".into(),
                shard_index: 0,
                estimated_rows: 10,
                bounds: ShardBounds::Whole,
                task_json: "{}".into(),
            };
            let shards = std::slice::from_ref(&shard);
            let outcomes: Vec<Created> =
                futures::future::join_all((0..6).map(|_| store.create_run(&run, shards)))
                    .await
                    .into_iter()
                    .map(|created| created.unwrap())
                    .collect();
            let created = outcomes.iter().filter(|c| **c == Created::Created).count();
            let existed = outcomes
                .iter()
                .filter(|c| **c == Created::RunExists)
                .count();
            assert_eq!((created, existed), (1, 5), "round {round}: {outcomes:?}");
            assert_eq!(store.shards(&run.run_id).await.unwrap().len(), 1);
            // Failed, so the stream's watermark stays unset for the next round.
            store
                .finish_run(&run.run_id, &RunEnd::failed("next round"))
                .await
                .unwrap();
        }
    }

    /// The sweep's view: running runs with their streams; an abandoned run is not one, and
    /// frees its stream.
    pub async fn running_runs_are_listed_until_abandoned(store: &dyn StateStore) {
        let run = |id: &str, stream: Option<&str>| NewRun {
            run_id: id.into(),
            job_key: id.into(),
            data_source_id: None,
            etl_run_id: None,
            dest_table: "t".into(),
            mode: "standard".into(),
            plan_json: "{}".into(),
            owner: "a".into(),
            stream_key: stream.map(str::to_string),
            stream_watermark: None,
        };
        for (id, stream) in [("sweep-1", None), ("sweep-2", Some("ds11:events"))] {
            assert_eq!(
                store.create_run(&run(id, stream), &[]).await.unwrap(),
                Created::Created
            );
        }
        let mine = |runs: Vec<RunRecord>| -> Vec<(String, RunStatus, Option<String>)> {
            runs.into_iter()
                .filter(|r| r.run_id.starts_with("sweep-"))
                .map(|r| (r.run_id, r.status, r.stream_key))
                .collect()
        };
        let running = store.running_runs().await.unwrap();
        assert!(
            running.iter().all(|r| r.status == RunStatus::Running),
            "{running:?}"
        );
        assert_eq!(
            mine(running),
            vec![
                ("sweep-1".into(), RunStatus::Running, None),
                (
                    "sweep-2".into(),
                    RunStatus::Running,
                    Some("ds11:events".into())
                ),
            ]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            store
                .claim_run("sweep-2", "sweeper", Duration::from_millis(10))
                .await
                .unwrap()
        );
        store
            .finish_run(
                "sweep-2",
                &RunEnd::abandoned("abandoned: its owner a went quiet"),
            )
            .await
            .unwrap();
        assert_eq!(
            mine(store.running_runs().await.unwrap()),
            vec![("sweep-1".into(), RunStatus::Running, None)]
        );
        assert_eq!(
            store.run("sweep-2").await.unwrap().unwrap().status,
            RunStatus::Abandoned
        );
        let latest = store
            .latest_stream_run("ds11:events")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (latest.run_id.as_str(), latest.status.as_str()),
            ("sweep-2", "abandoned")
        );
        assert_eq!(store.latest_stream_run("ds12:none").await.unwrap(), None);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store
                .create_run(&run("sweep-3", Some("ds11:events")), &[])
                .await
                .unwrap(),
            Created::Created,
            "the stream is free again"
        );
        let latest = store
            .latest_stream_run("ds11:events")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(latest.run_id, "sweep-3");
    }

    /// A report is recorded once, claimed by one taker at a time, retried when due, and
    /// gone from the due list once delivered or given up.
    pub async fn reports_are_sent_until_delivered_or_given_up(store: &dyn StateStore) {
        let claim = Duration::from_secs(60);
        assert!(
            store
                .record_report(901, r#"{"status":"completed"}"#)
                .await
                .unwrap()
        );
        assert!(
            !store
                .record_report(901, r#"{"status":"failed"}"#)
                .await
                .unwrap(),
            "the first report of a Django run stands"
        );
        assert!(
            store
                .record_report(902, r#"{"status":"failed"}"#)
                .await
                .unwrap()
        );
        let mut due = store.claim_due_reports(claim).await.unwrap();
        due.sort_by_key(|r| r.etl_run_id);
        let ids: Vec<i64> = due.iter().map(|r| r.etl_run_id).collect();
        assert_eq!(ids, [901, 902]);
        assert_eq!(due[0].body, r#"{"status":"completed"}"#);
        assert_eq!(due[0].attempts, 1);
        assert!(
            store.claim_due_reports(claim).await.unwrap().is_empty(),
            "a claimed report is not due again while its claim lasts"
        );
        store
            .report_attempted(901, &ReportAttempt::Delivered)
            .await
            .unwrap();
        store
            .report_attempted(
                902,
                &ReportAttempt::RetryAfter {
                    delay: Duration::ZERO,
                    error: "connection refused".into(),
                },
            )
            .await
            .unwrap();
        let again = store.claim_due_reports(claim).await.unwrap();
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!((again[0].etl_run_id, again[0].attempts), (902, 2));
        store
            .report_attempted(
                902,
                &ReportAttempt::GaveUp {
                    error: "answered 404".into(),
                },
            )
            .await
            .unwrap();
        assert!(store.claim_due_reports(claim).await.unwrap().is_empty());
        assert_eq!(
            store.report(901).await.unwrap().map(|(_, s)| s),
            Some(ReportState::Delivered)
        );
        assert_eq!(
            store.report(902).await.unwrap().map(|(_, s)| s),
            Some(ReportState::GaveUp)
        );
        assert_eq!(store.report(903).await.unwrap(), None);
        assert_eq!(
            store
                .prune_reports(Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        assert_eq!(store.prune_reports(Duration::ZERO).await.unwrap(), 2);
        assert_eq!(store.report(901).await.unwrap(), None);
    }

    pub async fn run_all(store: &dyn StateStore) {
        results_are_idempotent_by_shard(store).await;
        only_a_quiet_owner_loses_its_run(store).await;
        incremental_streams_run_one_at_a_time(store).await;
        a_run_created_twice_at_once_exists_once(store).await;
        running_runs_are_listed_until_abandoned(store).await;
        reports_are_sent_until_delivered_or_given_up(store).await;
    }
}
