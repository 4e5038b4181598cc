//! The run engine both modes share: `dispatcher run` (embedded queue, in-process workers) and
//! `dispatcher serve` (Pub/Sub, a fleet of workers) drive runs through this same code.
//!
//! Shard results are recorded in the state store by whichever dispatcher pulls them
//! (idempotent by shard id), so replicas can share one results subscription; the dispatcher
//! that owns a run (heartbeat in the state store) watches its shards there, loads once when
//! all are in, and finishes the run. A job whose owner went quiet (killed, restarted) is
//! taken over: the stale run is closed as superseded and the job runs again as a new run
//! under a fresh snapshot, so no shard mixes two snapshots and nothing loads twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_schema::{DataType, Schema};
use async_trait::async_trait;
use shardflow::messages::{self, ShardOutcome, ShardResult, ShardTask, StagedFile, WIRE_VERSION};
use shardflow::metrics::Metrics;
use shardflow::queue::{DEAD_LETTER_COUNT_ATTRIBUTE, Message, Queue, Topology};
use shardflow::seal::{SEAL_KEY_ENV, SealKey};
use shardflow::source::files::{FileInfo, FileLocation};
use shardflow::source::{ShardBounds, Window};
use shardflow::spec::{JobSpec, LoadType, SchemaPolicy};
use shardflow::staging::Staging;
use shardflow::state::{
    Created, NewRun, NewShard, Recorded, RunEnd, RunRecord, RunStatus, ShardRecord, ShardStatus,
    StateStore,
};
use shardflow::warehouse::{LoadRequest, SourceFilesLoad, Warehouse, WriteMode};
use shardflow::{Error, Result};
use shardflow::{digest, fault};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Plan, PlanOptions, RunReport, StreamState, plan_job_in_stream};

#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub plan: PlanOptions,
    pub batch_rows: usize,
    /// How often the owner of a run says it is alive.
    pub heartbeat: Duration,
    /// A run whose owner has been quiet this long is taken over.
    pub stale_after: Duration,
    /// How often the owner rereads its shards when no result came through this process.
    pub poll: Duration,
    /// Seals configs that workers cannot fetch from Django (`SHARDFLOW_SEAL_KEY`).
    pub seal_key: Option<SealKey>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            plan: PlanOptions::default(),
            batch_rows: crate::DEFAULT_BATCH_ROWS,
            heartbeat: Duration::from_secs(5),
            stale_after: Duration::from_secs(30),
            poll: Duration::from_secs(2),
            seal_key: None,
        }
    }
}

/// Wakes the owner of a run when something about it was recorded.
#[derive(Default)]
pub struct RunEvents {
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
    /// Set when the machinery under every run broke (an in-process worker died).
    fatal: Mutex<Option<String>>,
    /// Results ignored as duplicates, by run (for the report).
    duplicates: Mutex<HashMap<String, u64>>,
}

impl RunEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watch(&self, run_id: &str) -> Arc<Notify> {
        self.lock().entry(run_id.to_string()).or_default().clone()
    }

    fn forget(&self, run_id: &str) {
        self.lock().remove(run_id);
        self.duplicates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(run_id);
    }

    fn count_duplicate(&self, run_id: &str) {
        *self
            .duplicates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(run_id.to_string())
            .or_default() += 1;
    }

    fn duplicates(&self, run_id: &str) -> u64 {
        self.duplicates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(run_id)
            .copied()
            .unwrap_or(0)
    }

    pub fn poke(&self, run_id: &str) {
        if let Some(n) = self.lock().get(run_id) {
            n.notify_one();
        }
    }

    /// Fails every run this process drives.
    pub fn fail_all(&self, why: String) {
        *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        for n in self.lock().values() {
            n.notify_one();
        }
    }

    fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Told as a run goes, for a progress bar or Django.
#[async_trait]
pub trait RunObserver: Send + Sync {
    async fn planned(&self, _run_id: &str, _estimated_rows: u64, _shards: usize) {}
    async fn shard_done(&self, _done: usize, _total: usize, _rows_so_far: u64) {}
}

pub struct NoObserver;
impl RunObserver for NoObserver {}

/// One job to run: its key says which job message it came from.
#[derive(Clone)]
pub struct RunJob {
    /// `etl-<etl_run_id>`, `sched-<data_source_id>-<message_id>`, or a fresh id from the CLI.
    pub job_key: String,
    pub spec: Arc<JobSpec>,
    pub etl_run_id: Option<i64>,
    /// The config's JSON when it did not come from Django (inline in the job message, or a
    /// job file run on the fleet): remote workers can only get it sealed.
    pub own_config: Option<Arc<String>>,
}

pub enum RunOutcome {
    /// This call ran the job to its end.
    Finished(RunReport),
    /// The job had already finished (a redelivered or duplicated job message).
    AlreadyFinished(RunReport),
    /// Another dispatcher is alive and driving this job, or (for an incremental load)
    /// another run of the same stream is running: try again later.
    OwnedElsewhere { run_id: String, owner: String },
}

/// A run recorded with its shards, ready to publish.
struct RecordedRun {
    plan: Plan,
    /// The snapshot its shards read, held until the last one has.
    snapshot: Option<shardflow::source::SnapshotHold>,
    tasks: Vec<ShardTask>,
    /// The column whose maximum the shards report.
    timestamp_column: Option<String>,
}

/// What planning and recording a run came to.
enum Planned {
    Created(Box<RecordedRun>),
    Exists,
    Busy(String),
    Moved(Option<String>),
}

/// How `drive` left a run.
enum Drove {
    /// Ran to its end (the report says how).
    Ended,
    /// Another dispatcher took the run over, or created it a moment before us.
    TakenOver,
    /// Another run of the stream is running; this one was not created.
    StreamBusy { run_id: String },
}

/// The stream an incremental load belongs to: its source and destination. Its runs go one at
/// a time and each starts after the watermark the one before recorded.
pub fn stream_key(spec: &JobSpec) -> Option<String> {
    // A file job's runs go one at a time too: each reads the files the one before did not.
    if let Some(files) = &spec.files {
        let source = match spec.data_source_id {
            Some(id) => format!("ds{id}"),
            None => {
                let bucket = shardflow::source::files::bucket_param(spec).unwrap_or_default();
                format!(
                    "{:?}:{bucket}:{}{}",
                    spec.source_type, files.path_prefix, files.pattern
                )
            }
        };
        return Some(format!("{source}->{}", spec.dest_table_name));
    }
    spec.load_type.is_incremental().then(|| {
        let source = match spec.data_source_id {
            Some(id) => format!("ds{id}"),
            None => spec.qualified_table(),
        };
        format!("{source}->{}", spec.dest_table_name)
    })
}

/// The window recorded in a run's plan, if it had one.
fn window_of(plan_json: &str) -> Option<Window> {
    let plan: serde_json::Value = serde_json::from_str(plan_json).ok()?;
    serde_json::from_value(plan.get("window")?.clone()).ok()
}

/// The files a file job's recorded plan selected (their URIs), if it was one.
fn files_of(plan_json: &str) -> Option<Vec<String>> {
    let plan: serde_json::Value = serde_json::from_str(plan_json).ok()?;
    serde_json::from_value(plan.get("files")?.get("selected")?.clone()).ok()
}

pub struct Engine {
    pub queue: Arc<dyn Queue>,
    pub state: Arc<dyn StateStore>,
    pub staging: Staging,
    pub warehouse: Arc<dyn Warehouse>,
    pub topology: Topology,
    /// This dispatcher's identity in the state store.
    pub owner: String,
    pub events: Arc<RunEvents>,
    pub metrics: Arc<Metrics>,
    pub settings: EngineSettings,
}

fn report_of(record: &RunRecord, spec: &JobSpec, etl_run_id: Option<i64>) -> RunReport {
    RunReport {
        status: record.status,
        run_id: record.run_id.clone(),
        data_source_id: spec.data_source_id,
        etl_run_id,
        dest_table: spec.dest_table_name.clone(),
        rows_extracted: record.rows_extracted.unwrap_or(0),
        rows_loaded: record.rows_loaded.unwrap_or(0),
        error_message: record.error_message.clone(),
        ..Default::default()
    }
}

impl Engine {
    /// Records shard results from the results subscription until `shutdown`.
    pub async fn record_results(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        let mut results = self
            .queue
            .subscribe(&self.topology.results_subscription, 256)
            .await?;
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                d = results.next() => d?,
            };
            let result: ShardResult = match messages::decode("shard result", &delivery.message.data)
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "dropping an undecodable shard result");
                    delivery.ack().await?;
                    continue;
                }
            };
            match self.record_result(&result).await {
                Ok(recorded) => {
                    if recorded == Recorded::Duplicate {
                        tracing::debug!(run_id = %result.run_id, shard_id = %result.shard_id, "duplicate shard result ignored");
                        self.events.count_duplicate(&result.run_id);
                    }
                    self.events.poke(&result.run_id);
                    delivery.ack().await?;
                }
                Err(e) => {
                    // Not recorded: let it come back rather than lose it.
                    tracing::warn!(error = %e, "could not record a shard result; it will be redelivered");
                    delivery.nack().await?;
                }
            }
        }
    }

    /// Records one result; a permanent failure (the worker acked the shard, which will not
    /// come back) fails the shard at once, so its run fails without waiting for a dead letter.
    async fn record_result(&self, result: &ShardResult) -> Result<Recorded> {
        let recorded = self.state.record_result(result).await?;
        if let ShardOutcome::Failed {
            error,
            permanent: true,
        } = &result.outcome
            && recorded == Recorded::FailedAttempt
        {
            let why = format!("shard {} failed: {error}", result.shard_id);
            self.state
                .fail_shard(&result.run_id, &result.shard_id, &why)
                .await?;
        }
        Ok(recorded)
    }

    /// Marks dead-lettered shards failed until `shutdown`; their run then fails with the reason.
    pub async fn record_dead_letters(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        let mut dead = self
            .queue
            .subscribe(&self.topology.dead_letter_subscription, 64)
            .await?;
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                d = dead.next() => d?,
            };
            let task: ShardTask =
                match messages::decode("dead-lettered shard", &delivery.message.data) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(error = %e, "dropping an undecodable dead letter");
                        delivery.ack().await?;
                        continue;
                    }
                };
            let attempts = delivery
                .message
                .attributes
                .get(DEAD_LETTER_COUNT_ATTRIBUTE)
                .cloned()
                .unwrap_or_else(|| "several".into());
            let last_error = self
                .last_error(&task)
                .await?
                .unwrap_or_else(|| "no error was reported".into());
            let why = format!(
                "shard {} failed after {attempts} attempts: {last_error}",
                task.shard_id
            );
            self.state
                .fail_shard(&task.run_id, &task.shard_id, &why)
                .await?;
            self.events.poke(&task.run_id);
            delivery.ack().await?;
        }
    }

    /// The error a dead-lettered shard's last attempt reported. The worker publishes it before
    /// it nacks, but the dead letter can overtake it on the other subscription, so this waits
    /// a little for it to be recorded.
    async fn last_error(&self, task: &ShardTask) -> Result<Option<String>> {
        let started = Instant::now();
        loop {
            let error = self
                .state
                .shards(&task.run_id)
                .await?
                .into_iter()
                .find(|s| s.shard_id == task.shard_id)
                .and_then(|s| s.error);
            if error.is_some() || started.elapsed() > Duration::from_secs(5) {
                return Ok(error);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Another run of a job's stream is running. When its owner has been silent for
    /// `stale_after` (a killed `dispatcher run`, a dead dispatcher), the run becomes ours and is
    /// superseded; its record comes back so the job can continue it. `None`: its owner is alive.
    async fn take_over_stream(&self, other: &str) -> Result<Option<RunRecord>> {
        let Some(record) = self.state.run(other).await? else {
            return Ok(None);
        };
        if !self
            .state
            .claim_run(other, &self.owner, self.settings.stale_after)
            .await?
        {
            return Ok(None);
        }
        let why = format!(
            "superseded: its owner {} went quiet (last heartbeat {}) and {} took its stream over",
            record.owner, record.heartbeat_at, self.owner
        );
        tracing::warn!(run_id = %other, "{why}");
        self.state
            .finish_run(other, &RunEnd::superseded(why))
            .await?;
        if let Err(e) = self.staging.remove_run(other).await {
            tracing::warn!(error = %e, "could not clean the superseded run's staging");
        }
        Ok(Some(record))
    }

    /// The stream's newest run, when it is another job's and was superseded or abandoned:
    /// nothing continues it yet (a continuation shares its job key and is newer), so its
    /// committed append is in no watermark. A new window would read its rows again.
    async fn orphaned_stream_run(&self, job: &RunJob) -> Result<Option<RunRecord>> {
        let Some(key) = stream_key(&job.spec) else {
            return Ok(None);
        };
        Ok(self.state.latest_stream_run(&key).await?.filter(|r| {
            r.job_key != job.job_key
                && (r.status == RunStatus::Superseded || r.status == RunStatus::Abandoned)
        }))
    }

    /// Who holds a stream's running run, and until when it is theirs if they fall silent.
    async fn stream_holder(&self, other: &str) -> Result<String> {
        let Some(record) = self.state.run(other).await? else {
            return Ok("another job of the same incremental stream (it has just ended)".into());
        };
        let deadline = chrono::DateTime::parse_from_rfc3339(&record.heartbeat_at)
            .ok()
            .and_then(|at| {
                let stale = chrono::Duration::from_std(self.settings.stale_after).ok()?;
                Some(
                    (at + stale)
                        .to_utc()
                        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                        .to_string(),
                )
            });
        Ok(format!(
            "{} for another job of the same incremental stream (last heartbeat {}; the stream \
             is taken over if no heartbeat comes by {})",
            record.owner,
            record.heartbeat_at,
            deadline
                .as_deref()
                .unwrap_or("a heartbeat's staleness later")
        ))
    }

    /// Removes what dead runs left (see `gc`); a failure is logged, never the job's.
    pub async fn sweep(&self) -> Option<crate::gc::SweepReport> {
        let sweeper = crate::gc::Sweeper {
            state: self.state.as_ref(),
            staging: &self.staging,
            warehouse: self.warehouse.as_ref(),
            owner: &self.owner,
            stale_after: self.settings.stale_after,
        };
        match sweeper.sweep().await {
            Ok(report) => {
                if report != crate::gc::SweepReport::default() {
                    tracing::info!(?report, "swept what dead runs left");
                }
                Some(report)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not sweep what dead runs left");
                None
            }
        }
    }

    /// Runs a job to its end, unless it already ended or another live dispatcher drives it.
    pub async fn run(&self, job: &RunJob, observer: &dyn RunObserver) -> Result<RunOutcome> {
        let mut stream = StreamState::default();
        let attempt = match self.state.latest_run(&job.job_key).await? {
            Some(r) if r.status == RunStatus::Superseded || r.status == RunStatus::Abandoned => {
                // Taken over earlier, but its successor could not start (its stream was
                // busy), or closed by the sweep: start it now, on that run's window.
                stream.inherited_window = window_of(&r.plan_json);
                stream.inherited_files = files_of(&r.plan_json);
                attempt_of(&r.run_id) + 1
            }
            Some(r) if r.status != RunStatus::Running => {
                return Ok(RunOutcome::AlreadyFinished(report_of(
                    &r,
                    &job.spec,
                    job.etl_run_id,
                )));
            }
            Some(r) => {
                if !self
                    .state
                    .claim_run(&r.run_id, &self.owner, self.settings.stale_after)
                    .await?
                {
                    return Ok(RunOutcome::OwnedElsewhere {
                        run_id: r.run_id,
                        owner: r.owner,
                    });
                }
                // Ours now: its snapshot died with its owner, so run the job again.
                let why = format!(
                    "superseded: dispatcher {} went quiet and {} restarted the job",
                    r.owner, self.owner
                );
                tracing::warn!(run_id = %r.run_id, "{why}");
                self.state
                    .finish_run(&r.run_id, &RunEnd::superseded(why))
                    .await?;
                if let Err(e) = self.staging.remove_run(&r.run_id).await {
                    tracing::warn!(error = %e, "could not clean the superseded run's staging");
                }
                // Its append may have committed before it died: read exactly its window
                // again, so the watermark reported is that of the rows it appended.
                stream.inherited_window = window_of(&r.plan_json);
                stream.inherited_files = files_of(&r.plan_json);
                attempt_of(&r.run_id) + 1
            }
            None => 1,
        };
        if let Some(orphan) = self.orphaned_stream_run(job).await? {
            // Its append may have committed: continue it (its key, its window) instead of
            // reading its window again under a new key.
            tracing::warn!(run_id = %orphan.run_id, "the stream's last run was superseded and nothing continued it yet; continuing it");
            let adopted = RunJob {
                job_key: orphan.job_key,
                ..job.clone()
            };
            return Box::pin(self.run(&adopted, observer)).await;
        }
        let run_id = format!("{}.{attempt}", job.job_key);
        let span = tracing::info_span!(
            "run",
            run_id = %run_id,
            data_source_id = job.spec.data_source_id,
            etl_run_id = job.etl_run_id
        );
        let started = Instant::now();
        let mut report = RunReport {
            status: RunStatus::Running,
            run_id: run_id.clone(),
            data_source_id: job.spec.data_source_id,
            etl_run_id: job.etl_run_id,
            dest_table: job.spec.dest_table_name.clone(),
            // What the config says that is ignored (a typo'd field), first in the report.
            warnings: job.spec.warnings.clone(),
            ..Default::default()
        };
        for warning in &job.spec.warnings {
            tracing::warn!(parent: &span, "{warning}");
        }
        let outcome = self
            .drive(job, &run_id, stream, observer, &mut report)
            .instrument(span.clone())
            .await;
        report.duplicate_results_ignored = self.events.duplicates(&run_id);
        self.events.forget(&run_id);
        let _g = span.enter();
        report.duration_seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        match outcome {
            Ok(Drove::Ended) => {}
            Ok(Drove::TakenOver) => {
                // Lost the run to another dispatcher mid-way; it finishes the job.
                return Ok(RunOutcome::OwnedElsewhere {
                    run_id,
                    owner: "another dispatcher".into(),
                });
            }
            Ok(Drove::StreamBusy { run_id: other }) => {
                drop(_g);
                return match self.take_over_stream(&other).await? {
                    // Continue the dead run's job: its key, its window, its load key, so an
                    // append it committed before dying is not made twice.
                    Some(dead) => {
                        let adopted = RunJob {
                            job_key: dead.job_key,
                            ..job.clone()
                        };
                        Box::pin(self.run(&adopted, observer)).await
                    }
                    _ => {
                        let holder = self.stream_holder(&other).await?;
                        tracing::info!(running = %other, "another run of this incremental stream is running; waiting for it");
                        Ok(RunOutcome::OwnedElsewhere {
                            run_id: other,
                            owner: holder,
                        })
                    }
                };
            }
            Err(e) => {
                report.error_message = Some(e.to_string());
            }
        }
        // Staging is removed whatever happened: a failed run is rerun from the source.
        if let Err(e) = self.staging.remove_run(&run_id).await {
            tracing::warn!(error = %e, "could not clean staging");
        }
        let status = if report.error_message.is_none() {
            RunStatus::Completed
        } else {
            RunStatus::Failed
        };
        report.status = status;
        if self.state.run(&run_id).await?.is_some() {
            self.state
                .finish_run(
                    &run_id,
                    &RunEnd {
                        status,
                        rows_extracted: report.rows_extracted,
                        rows_loaded: report.rows_loaded,
                        checksum: report.checksum.clone(),
                        // A file stream's position moves with each load that read files.
                        watermark: report.watermark.clone().or_else(|| {
                            (status == RunStatus::Completed && !report.processed_files.is_empty())
                                .then(|| run_id.clone())
                        }),
                        error_message: report.error_message.clone(),
                        processed_files: if status == RunStatus::Completed {
                            report.processed_files.clone()
                        } else {
                            Vec::new()
                        },
                    },
                )
                .await?;
        }
        fault::point(fault::Step::StateCommitted)?;
        self.metrics.run_finished(status.as_str());
        match &report.error_message {
            None => tracing::info!(
                rows_loaded = report.rows_loaded,
                seconds = report.duration_seconds,
                "run completed"
            ),
            Some(e) => tracing::error!(error = %e, "run failed"),
        }
        Ok(RunOutcome::Finished(report))
    }

    /// Plans (again while a load of its stream commits meanwhile), records, publishes, waits
    /// for every shard, loads.
    async fn drive(
        &self,
        job: &RunJob,
        run_id: &str,
        mut stream: StreamState,
        observer: &dyn RunObserver,
        report: &mut RunReport,
    ) -> Result<Drove> {
        let spec = &job.spec;
        self.warehouse.check_table_name(&spec.dest_table_name)?;
        let stream_key = stream_key(spec);
        if let Some(key) = &stream_key {
            stream.recorded_watermark = self.state.stream_watermark(key).await?;
            if spec.files.is_some() {
                stream.processed_files = self.state.processed_files(key).await?;
            }
        }
        let mut replans = 0;
        let RecordedRun {
            plan,
            snapshot,
            tasks,
            timestamp_column,
        } = loop {
            let planned = self
                .plan_and_record(job, run_id, &stream, &stream_key)
                .await?;
            match planned {
                Planned::Created(run) => {
                    fault::point(fault::Step::Planned)?;
                    break *run;
                }
                Planned::Exists => return Ok(Drove::TakenOver),
                Planned::Busy(run_id) => return Ok(Drove::StreamBusy { run_id }),
                Planned::Moved(_) if stream.inherited_window.is_some() => {
                    // Another job of the stream loaded after this job's earlier attempt. A new
                    // window under this job's key could meet that attempt's committed append
                    // and be skipped as already appended: fail, and advance nothing.
                    return Err(Error::Other(
                        "another load of this incremental stream committed after this job's \
                         earlier attempt died; the job is not run again under a new window \
                         (the next job of the stream starts after the recorded watermark)"
                            .into(),
                    ));
                }
                Planned::Moved(watermark) if replans < 3 => {
                    // A load of the stream committed while this run was planned: the
                    // window starts after it now.
                    replans += 1;
                    tracing::info!(
                        ?watermark,
                        "the stream's last load committed meanwhile; planning again"
                    );
                    stream.recorded_watermark = watermark;
                    if let (Some(key), Some(_)) = (&stream_key, &spec.files) {
                        stream.processed_files = self.state.processed_files(key).await?;
                    }
                }
                Planned::Moved(_) => {
                    return Err(Error::Other(
                        "the incremental stream kept moving while this run was planned".into(),
                    ));
                }
            }
        };
        report.mode = Some(plan.mode);
        report.estimated_rows = Some(plan.estimated_rows);
        report.shards = plan.shards.len();
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
            report.warnings.push(warning.clone());
        }
        let wake = self.events.watch(run_id);
        observer
            .planned(run_id, plan.estimated_rows, tasks.len())
            .await;
        if let Some(direct) = plan.files.as_ref().and_then(|f| f.direct.as_ref()) {
            fault::point(fault::Step::LoadStarted)?;
            self.load_source_files(job, run_id, &plan, direct, report)
                .await?;
            return Ok(Drove::Ended);
        }
        for task in &tasks {
            self.queue
                .publish(
                    &self.topology.shards_topic,
                    Message::new(messages::encode(task)?).with_attribute("run_id", run_id),
                )
                .await?;
        }
        fault::point(fault::Step::ShardsPublished)?;

        if !self.wait_for_shards(run_id, &wake, observer).await? {
            return Ok(Drove::TakenOver);
        }
        drop(snapshot);

        if tasks.is_empty() {
            // An empty incremental window: nothing to load, the destination stays as it is,
            // and the watermark stays where it was.
            report.watermark = plan.resumes_after.clone();
            report.checksum = Some(digest::EMPTY_CHECKSUM.into());
            report.files_loaded = plan.files.as_ref().map(|_| 0);
            return Ok(Drove::Ended);
        }
        fault::point(fault::Step::LoadStarted)?;
        self.load(job, run_id, &plan, timestamp_column.as_deref(), report)
            .await?;
        Ok(Drove::Ended)
    }

    /// Plans the run and records it with its shards, unless its stream says otherwise.
    async fn plan_and_record(
        &self,
        job: &RunJob,
        run_id: &str,
        stream: &StreamState,
        stream_key: &Option<String>,
    ) -> Result<Planned> {
        let spec = &job.spec;
        let opts = PlanOptions {
            warehouse_loads_gcs: self.warehouse.loads_gcs_files(),
            // Only a file job's direct load needs it; a database job does not ask.
            warehouse_location: if spec.files.is_some() && self.warehouse.loads_gcs_files() {
                self.warehouse.location().await?
            } else {
                None
            },
            column_names: self.warehouse.column_names(),
            ..self.settings.plan.clone()
        };
        let plan = plan_job_in_stream(spec, &opts, stream).await?;
        tracing::info!(
            estimated_rows = plan.estimated_rows,
            shards = plan.shards.len(),
            mode = ?plan.mode,
            split = %plan.split_method,
            "planned"
        );
        // One snapshot for every shard, held open until the last shard has read it.
        // MySQL cannot share a snapshot between connections: each shard takes its own.
        let snapshot = if plan.shards.len() > 1 {
            shardflow::source::open(spec)
                .hold_snapshot(spec, self.settings.plan.retry.clone())
                .await?
        } else {
            None
        };
        // The maximum is reported only for a column the shards extract.
        let timestamp_column = spec
            .timestamp_column
            .clone()
            .filter(|c| plan.source_columns.iter().any(|s| &s.name == c));
        let sealed_config = config_for_workers(
            job.own_config.as_deref(),
            self.settings.seal_key.as_ref(),
            run_id,
        )?;
        let tasks: Vec<ShardTask> = plan
            .shards
            .iter()
            .enumerate()
            .map(|(i, shard)| ShardTask {
                version: WIRE_VERSION,
                run_id: run_id.to_string(),
                shard_id: shard.shard_id.clone(),
                shard_index: i as u32,
                data_source_id: spec.data_source_id,
                etl_run_id: job.etl_run_id,
                schema_name: spec.schema_name.clone(),
                table_name: spec.table_name.clone(),
                columns: plan.source_columns.clone(),
                destination_names: plan.destination_names.clone(),
                bounds: shard.bounds.clone(),
                snapshot: snapshot.as_ref().map(|s| s.id.clone()),
                batch_rows: self.settings.batch_rows,
                timestamp_column: timestamp_column.clone(),
                window: plan.window.clone(),
                sealed_config: sealed_config.clone(),
            })
            .collect();
        let mut new_shards = Vec::with_capacity(tasks.len());
        for (task, shard) in tasks.iter().zip(&plan.shards) {
            new_shards.push(NewShard {
                shard_id: task.shard_id.clone(),
                shard_index: task.shard_index,
                estimated_rows: shard.estimated_rows,
                bounds: shard.bounds.clone(),
                task_json: String::from_utf8(messages::encode(task)?)
                    .map_err(|e| Error::Other(format!("shard message is not UTF-8: {e}")))?,
            });
        }
        let created = self
            .state
            .create_run(
                &NewRun {
                    run_id: run_id.to_string(),
                    job_key: job.job_key.clone(),
                    data_source_id: spec.data_source_id,
                    etl_run_id: job.etl_run_id,
                    dest_table: spec.dest_table_name.clone(),
                    mode: format!("{:?}", plan.mode).to_lowercase(),
                    plan_json: serde_json::to_string(&plan)?,
                    owner: self.owner.clone(),
                    stream_key: stream_key.clone(),
                    stream_watermark: stream.recorded_watermark.clone(),
                },
                &new_shards,
            )
            .await?;
        Ok(match created {
            Created::Created => Planned::Created(Box::new(RecordedRun {
                plan,
                snapshot,
                tasks,
                timestamp_column,
            })),
            Created::RunExists => Planned::Exists,
            Created::StreamBusy { run_id } => Planned::Busy(run_id),
            Created::StreamMoved { watermark } => Planned::Moved(watermark),
        })
    }

    /// Every shard is in: gathers the parts in plan order and loads them once.
    async fn load(
        &self,
        job: &RunJob,
        run_id: &str,
        plan: &Plan,
        timestamp_column: Option<&str>,
        report: &mut RunReport,
    ) -> Result<()> {
        let spec = &job.spec;
        let records = self.state.shards(run_id).await?;
        let mut parts: Vec<StagedFile> = Vec::new();
        for r in &records {
            report.shard_rows.push(r.rows.unwrap_or(0));
            parts.extend(r.files.iter().cloned());
        }
        report.rows_extracted = report.shard_rows.iter().sum();
        let schema = shardflow::source::staged_schema(
            spec.source_type,
            &plan.source_columns,
            &plan.destination_names,
        );
        let destination = |name: &str| plan.destination_name(name).to_string();
        let staged_timestamp = timestamp_column.map(destination);
        let summary = summarize_shards(&records, &schema, staged_timestamp.as_deref())?;
        let merge_keys: Vec<String> = plan.merge_keys.iter().map(|k| destination(k)).collect();
        let latest_by = spec.timestamp_column.as_deref().map(destination);
        report.renamed_columns = plan.renamed_columns.clone();
        let mode = match spec.load_type {
            LoadType::Catalog => WriteMode::Replace,
            LoadType::Transactional => WriteMode::Append,
            LoadType::Merge => WriteMode::Merge,
        };
        let outcome = self
            .warehouse
            .load(LoadRequest {
                table: &spec.dest_table_name,
                schema: &schema,
                run_id,
                load_key: match mode {
                    WriteMode::Replace => run_id,
                    // No attempt of the job may append twice (nor need merge twice).
                    WriteMode::Append | WriteMode::Merge => &job.job_key,
                },
                parts: &parts,
                staging: &self.staging,
                mode,
                expected_rows: report.rows_extracted,
                merge_keys: &merge_keys,
                latest_by: latest_by.as_deref(),
                allow_new_columns: spec
                    .files
                    .as_ref()
                    .is_some_and(|f| f.schema_policy == SchemaPolicy::AddColumns),
            })
            .await?;
        fault::point(fault::Step::LoadCommitted)?;
        report.rows_loaded = outcome.rows_loaded;
        report.destination = Some(outcome.location);
        report.checksum = Some(summary.checksum);
        // The largest value loaded; the planned high-water mark when the column is not
        // extracted (it bounds what was read, in the same snapshot).
        report.watermark = summary
            .watermark
            .or_else(|| plan.window.as_ref().map(|w| w.through.clone()));
        if plan.files.is_some() {
            report.processed_files = processed_files(&records, run_id, stream_key(spec))?;
            report.files_loaded = Some(report.processed_files.len());
        }
        Ok(())
    }

    /// The fast path: the warehouse loads the source files itself, in one job.
    async fn load_source_files(
        &self,
        job: &RunJob,
        run_id: &str,
        plan: &Plan,
        direct: &shardflow::source::files::plan::DirectLoad,
        report: &mut RunReport,
    ) -> Result<()> {
        let spec = &job.spec;
        let schema = shardflow::source::staged_schema(
            spec.source_type,
            &plan.source_columns,
            &plan.destination_names,
        );
        report.renamed_columns = plan.renamed_columns.clone();
        let mode = match spec.load_type {
            LoadType::Catalog => WriteMode::Replace,
            LoadType::Transactional => WriteMode::Append,
            // The planner sends merges to the workers: one load job cannot match keys.
            LoadType::Merge => {
                return Err(Error::Other(
                    "a merge file job cannot be loaded by one load job over the files".into(),
                ));
            }
        };
        // BigQuery reads the files at load time and cannot pin a generation ("If you include a
        // generation number in the Cloud Storage URI, then the load job fails"): a file
        // rewritten since planning fails the run before anything moves.
        let location = FileLocation::open(spec)?;
        for files in direct.files.chunks(FILE_CHECKS_AT_ONCE) {
            futures::future::try_join_all(files.iter().map(|f| location.check_unchanged(f)))
                .await?;
        }
        let checked_at = chrono::Utc::now().timestamp_millis();
        let outcome = self
            .warehouse
            .load_source_files(SourceFilesLoad {
                table: &spec.dest_table_name,
                schema: &schema,
                load_key: match mode {
                    WriteMode::Replace => run_id,
                    _ => &job.job_key,
                },
                uris: &direct.uris,
                format: direct.format.clone(),
                mode,
            })
            .await?;
        fault::point(fault::Step::LoadCommitted)?;
        report.rows_extracted = outcome.rows_loaded;
        report.rows_loaded = outcome.rows_loaded;
        report.destination = Some(outcome.location);
        let stream_key = stream_key(spec).unwrap_or_default();
        let read = outcome.source_read.as_ref();
        // The job that committed may be an earlier attempt's, which read other files: only
        // those it read are recorded.
        let read_files: Vec<&FileInfo> = direct
            .files
            .iter()
            .filter(|f| read.is_none_or(|r| r.uris.contains(&location.uri(&f.path))))
            .collect();
        // One job counts only the total: a single file's rows are known, several files' not.
        let rows = (read_files.len() == 1).then_some(outcome.rows_loaded);
        let mut now: Vec<FileInfo> = Vec::with_capacity(read_files.len());
        for files in read_files.chunks(FILE_CHECKS_AT_ONCE) {
            let current =
                futures::future::join_all(files.iter().map(|f| location.current(f))).await;
            for (planned, current) in files.iter().zip(current) {
                // The job succeeded, so it read the file: one gone (or unreadable) now was
                // read as planned, and the load that committed must still be recorded.
                now.push(current.unwrap_or_else(|e| {
                    tracing::warn!(file = %location.uri(&planned.path), error = %e, "cannot look at the file after its load; taken as planned");
                    (*planned).clone()
                }));
            }
        }
        // A file rewritten around the job is recorded in the version the job read, when that
        // can be told.
        let window = read.map(|r| (r.started_ms, r.ended_ms));
        let mut loaded = Vec::with_capacity(read_files.len());
        for (planned, now) in read_files.into_iter().zip(now) {
            match read_version(planned, &now, window, checked_at) {
                ReadVersion::Planned => loaded.push(planned.clone()),
                ReadVersion::Current => {
                    if now.version_key() != planned.version_key() {
                        tracing::warn!(file = %location.uri(&planned.path), "rewritten before BigQuery read it; recorded in its new version");
                    }
                    loaded.push(now);
                }
                ReadVersion::NotRead => {
                    tracing::info!(file = %location.uri(&planned.path), "rewritten after an earlier attempt's load read it; its new version loads next");
                }
                ReadVersion::Unknown => {
                    let warning = format!(
                        "{} was rewritten while BigQuery's load job read it: the table holds its \
                         old or its new rows, which cannot be told; it is not recorded as loaded, \
                         so the next run loads its new version",
                        location.uri(&planned.path)
                    );
                    tracing::error!("{warning}");
                    report.warnings.push(warning);
                }
            }
        }
        report.processed_files = loaded
            .iter()
            .map(|f| shardflow::state::ProcessedFile {
                stream_key: stream_key.clone(),
                path: f.path.clone(),
                size: f.size,
                version: f.version_key(),
                last_modified: f.last_modified.to_rfc3339(),
                rows,
                run_id: run_id.to_string(),
            })
            .collect();
        report.files_loaded = Some(report.processed_files.len());
        Ok(())
    }

    /// Until every shard succeeded (Ok(true)), one failed for good (Err), or the run was
    /// taken over (Ok(false)).
    async fn wait_for_shards(
        &self,
        run_id: &str,
        wake: &Notify,
        observer: &dyn RunObserver,
    ) -> Result<bool> {
        let mut last_done = 0usize;
        let mut last_beat = Instant::now();
        loop {
            if let Some(why) = self.events.fatal() {
                return Err(Error::Other(why));
            }
            let shards = self.state.shards(run_id).await?;
            if let Some(failed) = shards.iter().find(|s| s.status == ShardStatus::Failed) {
                return Err(Error::Other(
                    failed
                        .error
                        .clone()
                        .unwrap_or_else(|| format!("shard {} failed", failed.shard_id)),
                ));
            }
            let done = shards
                .iter()
                .filter(|s| s.status == ShardStatus::Succeeded)
                .count();
            if done != last_done {
                last_done = done;
                let rows = shards.iter().filter_map(|s| s.rows).sum();
                observer.shard_done(done, shards.len(), rows).await;
            }
            if done == shards.len() {
                return Ok(true);
            }
            if last_beat.elapsed() >= self.settings.heartbeat {
                if !self.state.heartbeat(run_id, &self.owner).await? {
                    tracing::warn!("another dispatcher took this run over");
                    return Ok(false);
                }
                last_beat = Instant::now();
            }
            let _ = tokio::time::timeout(self.settings.poll, wake.notified()).await;
        }
    }
}

/// The sealed config for the run's shards: none when the workers fetch it from Django (or
/// share this process's registry); refused when it cannot reach them without its secrets in
/// clear text.
fn config_for_workers(
    own_config: Option<&String>,
    key: Option<&SealKey>,
    run_id: &str,
) -> Result<Option<String>> {
    match (own_config, key) {
        (None, _) => Ok(None),
        (Some(config), Some(key)) => Ok(Some(key.seal(config.as_bytes(), run_id)?)),
        (Some(_), None) => Err(Error::Message(format!(
            "this job's config did not come from Django, so the workers can only receive it \
             sealed: set {SEAL_KEY_ENV} (64 hex digits, the same on the dispatcher and the \
             workers), or publish the job with data_source_id alone"
        ))),
    }
}

/// What the shards of a finished extraction say together.
#[derive(Debug, PartialEq)]
struct ShardSummary {
    checksum: String,
    watermark: Option<String>,
}

/// Checks every shard staged the planned schema (parts of another shape must never reach
/// the load), and combines the shards' checksums and timestamp maxima.
fn summarize_shards(
    records: &[ShardRecord],
    expected: &Schema,
    timestamp_column: Option<&str>,
) -> Result<ShardSummary> {
    let mut checksums = Vec::with_capacity(records.len());
    let mut maxima = Vec::new();
    // Shards almost always report the same JSON: decode and compare each distinct text once.
    let mut checked: Option<&str> = None;
    for r in records {
        let (Some(checksum), Some(schema_json)) = (&r.checksum, &r.schema_json) else {
            return Err(Error::Other(format!(
                "shard {} reported no checksum or schema",
                r.shard_id
            )));
        };
        if checked != Some(schema_json.as_str()) {
            let schema: Schema = serde_json::from_str(schema_json).map_err(|e| {
                Error::Other(format!(
                    "shard {} reported an unreadable schema: {e}",
                    r.shard_id
                ))
            })?;
            if schema.fields() != expected.fields() {
                return Err(Error::Other(format!(
                    "shard {} staged columns [{}], the plan expects [{}]",
                    r.shard_id,
                    describe_fields(&schema),
                    describe_fields(expected)
                )));
            }
            checked = Some(schema_json);
        }
        checksums.push(checksum.as_str());
        maxima.extend(r.max_value.clone());
    }
    let watermark = match timestamp_column {
        Some(column) => {
            let field = expected.field_with_name(column).map_err(|_| {
                Error::Other(format!("timestamp_column {column:?} is not extracted"))
            })?;
            match field.data_type() {
                // An unconstrained numeric travels as its text, whose order is not the
                // number's ("99" > "150"): the planned high-water mark, which PostgreSQL
                // took in the column's own type, is the watermark instead.
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => None,
                data_type => digest::max_of(&maxima, data_type)?,
            }
        }
        None => None,
    };
    Ok(ShardSummary {
        checksum: digest::combine_checksums(checksums)?,
        watermark,
    })
}

/// Source files checked (HEAD requests) at once around a direct load.
const FILE_CHECKS_AT_ONCE: usize = 16;

/// Which version of a source file the committed load job read, the file being `now` after
/// it. The job ran over `window` (ms since the epoch); this attempt checked the files were
/// as planned at `checked_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadVersion {
    /// The version planned.
    Planned,
    /// The live one, written before the job started.
    Current,
    /// An older one than the live version, which it does not name: the job is an earlier
    /// attempt's and the file was rewritten after it ended.
    NotRead,
    /// Written while the job ran, or no time to tell by.
    Unknown,
}

fn read_version(
    planned: &FileInfo,
    now: &FileInfo,
    window: Option<(i64, i64)>,
    checked_at: i64,
) -> ReadVersion {
    let unchanged = now.version_key() == planned.version_key();
    let written = now.last_modified.timestamp_millis();
    match window {
        None if unchanged => ReadVersion::Planned,
        None => ReadVersion::Unknown,
        // This attempt's job: it started after the files were checked as planned.
        Some((start, end)) if start >= checked_at => {
            if unchanged || written > end {
                ReadVersion::Planned
            } else if written < start {
                ReadVersion::Current
            } else {
                ReadVersion::Unknown
            }
        }
        // An earlier attempt's job, found by its id: only the times tell what it read.
        Some((start, _)) if written < start => ReadVersion::Current,
        Some((_, end)) if written > end => ReadVersion::NotRead,
        Some(_) => ReadVersion::Unknown,
    }
}

fn describe_fields(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The files a file run's shards read, with the rows each gave, for the state store.
fn processed_files(
    records: &[ShardRecord],
    run_id: &str,
    stream_key: Option<String>,
) -> Result<Vec<shardflow::state::ProcessedFile>> {
    let stream_key = stream_key.unwrap_or_default();
    // A Parquet file split by row groups is in several shards: add its rows up.
    let mut by_file: Vec<shardflow::state::ProcessedFile> = Vec::new();
    for r in records {
        let task: ShardTask = messages::decode("recorded shard", r.task_json.as_bytes())?;
        let ShardBounds::Files { files } = &task.bounds else {
            continue;
        };
        for (i, part) in files.iter().enumerate() {
            let rows = r.source_rows.get(i).copied().unwrap_or(0);
            match by_file.iter_mut().find(|p| p.path == part.file.path) {
                Some(p) => p.rows = Some(p.rows.unwrap_or(0) + rows),
                None => by_file.push(shardflow::state::ProcessedFile {
                    stream_key: stream_key.clone(),
                    path: part.file.path.clone(),
                    size: part.file.size,
                    version: part.file.version_key(),
                    last_modified: part.file.last_modified.to_rfc3339(),
                    rows: Some(rows),
                    run_id: run_id.to_string(),
                }),
            }
        }
    }
    Ok(by_file)
}

/// The attempt number at the end of a run id (`<job key>.<n>`).
fn attempt_of(run_id: &str) -> u32 {
    run_id
        .rsplit_once('.')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(shard: &str, schema: &Schema, checksum: &str, max: Option<&str>) -> ShardRecord {
        ShardRecord {
            shard_id: shard.into(),
            shard_index: 0,
            estimated_rows: 0,
            status: ShardStatus::Succeeded,
            rows: Some(1),
            files: Vec::new(),
            checksum: Some(checksum.into()),
            schema_json: Some(serde_json::to_string(schema).unwrap()),
            max_value: max.map(str::to_string),
            source_rows: Vec::new(),
            attempts: 1,
            error: None,
            task_json: String::new(),
        }
    }

    #[test]
    fn shards_combine_into_a_checksum_and_watermark() {
        use arrow_schema::{DataType, Field};
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("day", DataType::Date32, true),
        ]);
        let records = vec![
            record("s0", &schema, "0000000000000001", Some("2024-01-09")),
            record("s1", &schema, "0000000000000010", None),
            record("s2", &schema, "0000000000000100", Some("2024-01-10")),
        ];
        assert_eq!(
            summarize_shards(&records, &schema, Some("day")).unwrap(),
            ShardSummary {
                checksum: "0000000000000111".into(),
                watermark: Some("2024-01-10".into()),
            }
        );
        assert_eq!(
            summarize_shards(&records, &schema, None).unwrap().watermark,
            None
        );

        let drifted = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("day", DataType::Utf8, true),
        ]);
        let mut bad = records.clone();
        bad[1] = record("s1", &drifted, "0000000000000010", None);
        assert_eq!(
            summarize_shards(&bad, &schema, None)
                .unwrap_err()
                .to_string(),
            "shard s1 staged columns [id Int64, day Utf8], the plan expects [id Int64, day Date32]"
        );
        bad[1].checksum = None;
        assert_eq!(
            summarize_shards(&bad, &schema, None)
                .unwrap_err()
                .to_string(),
            "shard s1 reported no checksum or schema"
        );
    }

    #[test]
    fn own_configs_travel_sealed_or_not_at_all() {
        let config = r#"{"connection_params": {"password": "pw"}}"#.to_string();
        let key = SealKey::from_hex(&"ab".repeat(32)).unwrap();
        assert_eq!(config_for_workers(None, None, "r.1").unwrap(), None);
        assert_eq!(config_for_workers(None, Some(&key), "r.1").unwrap(), None);
        let sealed = config_for_workers(Some(&config), Some(&key), "r.1")
            .unwrap()
            .unwrap();
        assert_eq!(key.open(&sealed, "r.1").unwrap(), config.as_bytes());
        assert_eq!(
            config_for_workers(Some(&config), None, "r.1")
                .unwrap_err()
                .to_string(),
            "message: this job's config did not come from Django, so the workers can only \
             receive it sealed: set SHARDFLOW_SEAL_KEY (64 hex digits, the same on the \
             dispatcher and the workers), or publish the job with data_source_id alone"
        );
    }

    #[test]
    fn a_recorded_file_plan_names_the_files_a_takeover_reads_again() {
        let plan = r#"{"source":"s","files":{"listed":3,"selected":["file:///in/a.csv","file:///in/b.csv"]}}"#;
        assert_eq!(
            files_of(plan),
            Some(vec![
                "file:///in/a.csv".to_string(),
                "file:///in/b.csv".to_string()
            ])
        );
        assert_eq!(files_of(r#"{"source":"s","window":{}}"#), None);
        assert_eq!(files_of("not json"), None);
    }

    #[test]
    fn run_ids_count_attempts() {
        assert_eq!(attempt_of("etl-7.1"), 1);
        assert_eq!(attempt_of("etl-7.12"), 12);
        assert_eq!(attempt_of("sched-3-99.2"), 2);
        assert_eq!(attempt_of("odd"), 1);
    }

    #[test]
    fn a_rewritten_file_is_recorded_in_the_version_the_load_read() {
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap();
        let version = |generation: &str, written: i64| FileInfo {
            path: "in/a.csv".into(),
            size: 10,
            last_modified: at(written),
            e_tag: None,
            version: Some(generation.into()),
        };
        let planned = version("1", 100);
        let window = Some((1_000, 2_000));
        // This attempt's job (it started after the check at 900).
        let ours = |now: &FileInfo| read_version(&planned, now, window, 900);
        assert_eq!(ours(&planned), ReadVersion::Planned);
        // Rewritten after the job ended: the job read the planned version.
        assert_eq!(ours(&version("2", 2_001)), ReadVersion::Planned);
        // Before it started (after the check): the new one.
        assert_eq!(ours(&version("2", 950)), ReadVersion::Current);
        // While it ran, or with no window to tell: either.
        for written in [1_000, 1_500, 2_000] {
            assert_eq!(ours(&version("2", written)), ReadVersion::Unknown);
        }
        assert_eq!(
            read_version(&planned, &version("2", 5), None, 900),
            ReadVersion::Unknown
        );
        assert_eq!(
            read_version(&planned, &planned, None, 900),
            ReadVersion::Planned
        );
        // An earlier attempt's job (it ran before this attempt's check at 5,000): only the times
        // tell, even for the version planned now.
        let earlier = |now: &FileInfo| read_version(now, now, window, 5_000);
        assert_eq!(earlier(&version("1", 100)), ReadVersion::Current);
        assert_eq!(earlier(&version("2", 3_000)), ReadVersion::NotRead);
        assert_eq!(earlier(&version("2", 1_500)), ReadVersion::Unknown);
    }
}
