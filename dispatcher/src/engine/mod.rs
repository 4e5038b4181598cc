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
use shardflow::spec::{JobSpec, Load, SchemaPolicy};
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

mod load;
mod results;
mod streams;
#[cfg(test)]
mod tests;

pub use self::streams::stream_key;
use self::streams::*;

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
        let recorded = self.state.run(&run_id).await?;
        // Failed before this dispatcher recorded the run, while another recorded it (a
        // duplicate of the job handled at once), or after another claimed it: the run, its
        // staging and its report are that dispatcher's, and it is alive.
        if let Some(error) = &report.error_message
            && let Some(run) = &recorded
            && run.owner != self.owner
        {
            tracing::warn!(%error, owner = %run.owner, "failed, but the run is another dispatcher's; left to it");
            return Ok(RunOutcome::OwnedElsewhere {
                run_id,
                owner: run.owner.clone(),
            });
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
        if recorded.is_some() {
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
        self.metrics.run_finished(status);
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
            if spec.files().is_some() {
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
                    if let (Some(key), Some(_)) = (&stream_key, spec.files()) {
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
            warehouse_location: if spec.files().is_some() && self.warehouse.loads_gcs_files() {
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
            .timestamp_column()
            .filter(|c| plan.source_columns.iter().any(|s| s.name == *c))
            .map(str::to_string);
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
                // A file shard names its files in its bounds; its table is empty.
                schema_name: spec.table().map(|t| t.schema.clone()).unwrap_or_default(),
                table_name: spec.table().map(|t| t.table.clone()).unwrap_or_default(),
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

/// The attempt number at the end of a run id (`<job key>.<n>`).
fn attempt_of(run_id: &str) -> u32 {
    run_id
        .rsplit_once('.')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(1)
}
