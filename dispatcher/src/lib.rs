//! The dispatcher: validate a job, estimate and plan its shards, record the run, publish the
//! shards, track their results (idempotent by shard id), and when every shard is in, load the
//! table ONCE, verify the counts, clean staging and report.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use serde::Serialize;
use shardflow::messages::{self, ShardResult, ShardTask, StagedFile, WIRE_VERSION};
use shardflow::plan::{self, Mode};
use shardflow::queue::embedded::{EmbeddedOptions, EmbeddedQueue};
use shardflow::queue::{DeadLetterPolicy, Message, Queue, SubscriptionConfig, Topology};
use shardflow::retry::RetryPolicy;
use shardflow::source::pg_binary;
use shardflow::source::postgres::{self, PgConnector};
use shardflow::source::{ShardBounds, SourceColumn};
use shardflow::spec::{JobSpec, LoadType, ProcessingMode, SourceType};
use shardflow::staging::Staging;
use shardflow::state::sqlite::SqliteStateStore;
use shardflow::state::{NewRun, NewShard, Recorded, RunStatus, StateStore};
use shardflow::warehouse::parquet_dir::ParquetDirWarehouse;
use shardflow::warehouse::{LoadRequest, Warehouse, WriteMode};
use shardflow::{Error, Result};
use shardflow_worker::{RunRegistry, Worker, WorkerSettings};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub mod progress;

/// Rows per Arrow batch when `ETL_BATCH_SIZE` is not set (the seed's default).
pub const DEFAULT_BATCH_ROWS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub shard_rows: u64,
    /// Workers known to be running the shards (embedded `run`): the shard count is rounded up
    /// to a multiple of it. None for a fleet whose size the autoscaler decides.
    pub workers: Option<usize>,
    pub exact_count: bool,
    pub retry: RetryPolicy,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            shard_rows: plan::DEFAULT_SHARD_ROWS,
            workers: None,
            exact_count: false,
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedColumn {
    pub name: String,
    pub source_type: String,
    pub arrow_type: String,
    pub nullable: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedShard {
    pub shard_id: String,
    pub estimated_rows: u64,
    pub bounds: ShardBounds,
}

/// A plan, as `dispatcher plan` prints it. Holds no secret.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub data_source_id: Option<i64>,
    pub source: String,
    pub dest_table: String,
    pub load_type: LoadType,
    pub estimated_rows: u64,
    pub estimate_source: String,
    pub processing_mode: ProcessingMode,
    pub row_count_threshold: u64,
    pub mode: Mode,
    pub mode_reason: String,
    pub shard_rows_target: u64,
    pub split_method: String,
    pub split_column: Option<String>,
    pub columns: Vec<PlannedColumn>,
    pub shards: Vec<PlannedShard>,
    #[serde(skip)]
    pub source_columns: Vec<SourceColumn>,
}

fn shard_id(index: usize) -> String {
    format!("s{index:05}")
}

fn check_supported(spec: &JobSpec) -> Result<()> {
    if spec.source_type != SourceType::Postgresql {
        return Err(Error::Source(format!(
            "source_type {:?} is not supported by this build yet (PostgreSQL is)",
            spec.source_type
        )));
    }
    if spec.load_type != LoadType::Catalog {
        return Err(Error::Source(
            "load_type \"transactional\" is not supported by this build yet (catalog is)".into(),
        ));
    }
    Ok(())
}

/// Plans a job: checks the table and columns exist, estimates without scanning, picks the
/// mode, and cuts equal-row shards. Moves no data.
pub async fn plan_job(spec: &JobSpec, opts: &PlanOptions) -> Result<Plan> {
    check_supported(spec)?;
    let connector = PgConnector::from_spec(spec, opts.retry.clone())?;
    let client = connector.connect().await?;
    let info = postgres::describe(&client, &spec.schema_name, &spec.table_name).await?;
    let columns = info.project(spec)?;
    if columns.is_empty() {
        return Err(Error::Source(format!(
            "{} has no columns to read",
            spec.qualified_table()
        )));
    }
    let estimate = postgres::estimate(&client, &info, opts.exact_count).await?;
    let (mode, mode_reason) = plan::choose_mode(
        spec.processing_mode,
        estimate.rows,
        spec.row_count_threshold,
    );
    let wanted = match mode {
        Mode::Standard => 1,
        Mode::Sharded => plan::fit_to_workers(
            plan::shard_count(estimate.rows, opts.shard_rows),
            opts.workers.unwrap_or(1),
        ),
    };
    let split = postgres::split(&client, &info, estimate.rows, wanted).await?;
    Ok(Plan {
        data_source_id: spec.data_source_id,
        source: spec.qualified_table(),
        dest_table: spec.dest_table_name.clone(),
        load_type: spec.load_type,
        estimated_rows: estimate.rows,
        estimate_source: estimate.source,
        processing_mode: spec.processing_mode,
        row_count_threshold: spec.row_count_threshold,
        mode,
        mode_reason,
        shard_rows_target: opts.shard_rows,
        split_method: split.method,
        split_column: split.column,
        columns: columns
            .iter()
            .map(|c| PlannedColumn {
                name: c.name.clone(),
                source_type: pg_binary::source_type_label(c),
                arrow_type: pg_binary::decoding_for(c).data_type().to_string(),
                nullable: c.nullable,
            })
            .collect(),
        shards: split
            .shards
            .into_iter()
            .enumerate()
            .map(|(i, (bounds, estimated_rows))| PlannedShard {
                shard_id: shard_id(i),
                estimated_rows,
                bounds,
            })
            .collect(),
        source_columns: columns,
    })
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub plan: PlanOptions,
    pub workers: usize,
    pub dest: PathBuf,
    /// Defaults to `<dest>/_staging`.
    pub staging: Option<PathBuf>,
    pub state_url: String,
    pub batch_rows: usize,
    pub etl_run_id: Option<i64>,
    pub show_progress: bool,
    /// How long a shard's lease lasts before it is redelivered (extended while it runs).
    pub ack_deadline: Duration,
    /// Deliveries of a failing shard before it is dead-lettered and the run fails.
    pub max_delivery_attempts: u32,
    pub queue: EmbeddedOptions,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            plan: PlanOptions::default(),
            workers: 2,
            dest: PathBuf::from("./warehouse"),
            staging: None,
            state_url: "sqlite://./shardflow-state.db".into(),
            batch_rows: DEFAULT_BATCH_ROWS,
            etl_run_id: None,
            show_progress: false,
            ack_deadline: Duration::from_secs(60),
            max_delivery_attempts: 5,
            queue: EmbeddedOptions::default(),
        }
    }
}

/// The run report: the last line `dispatcher run` prints, and what Django's PATCH carries.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    pub status: String,
    pub run_id: String,
    pub data_source_id: Option<i64>,
    pub etl_run_id: Option<i64>,
    pub dest_table: String,
    pub destination: Option<String>,
    pub mode: Option<Mode>,
    pub estimated_rows: Option<u64>,
    pub shards: usize,
    /// Rows each shard extracted, in plan order.
    pub shard_rows: Vec<u64>,
    pub rows_extracted: u64,
    pub rows_loaded: u64,
    pub duration_seconds: f64,
    /// Results for shards that had already reported (redeliveries); ignored by design.
    pub duplicate_results_ignored: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// Runs a job end to end on the embedded backends. Never panics on bad input: every failure
/// becomes a `failed` report with the reason.
pub async fn run_job(spec: JobSpec, opts: RunOptions) -> RunReport {
    let started = Instant::now();
    let run_id = uuid::Uuid::now_v7().to_string();
    let mut report = RunReport {
        status: RunStatus::Running.as_str().into(),
        run_id: run_id.clone(),
        data_source_id: spec.data_source_id,
        etl_run_id: opts.etl_run_id,
        dest_table: spec.dest_table_name.clone(),
        ..Default::default()
    };
    let span = tracing::info_span!(
        "run",
        run_id = %run_id,
        data_source_id = spec.data_source_id,
        etl_run_id = opts.etl_run_id
    );
    let outcome = execute(&spec, &opts, &mut report)
        .instrument(span.clone())
        .await;
    report.duration_seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    let _g = span.enter();
    match outcome {
        Ok(()) => {
            report.status = RunStatus::Completed.as_str().into();
            tracing::info!(
                rows_loaded = report.rows_loaded,
                seconds = report.duration_seconds,
                "run completed"
            );
        }
        Err(e) => {
            report.status = RunStatus::Failed.as_str().into();
            report.error_message = Some(e.to_string());
            tracing::error!(error = %e, "run failed");
        }
    }
    report
}

struct RunContext {
    state: Arc<dyn StateStore>,
    staging: Staging,
    queue: EmbeddedQueue,
    topology: Topology,
    shutdown: CancellationToken,
    workers: tokio::task::JoinSet<Result<()>>,
    /// Rows the workers have extracted so far, for the progress bar.
    rows: Arc<AtomicU64>,
}

async fn execute(spec: &JobSpec, opts: &RunOptions, report: &mut RunReport) -> Result<()> {
    let warehouse = ParquetDirWarehouse::new(&opts.dest)?;
    warehouse.check_table_name(&spec.dest_table_name)?;
    let plan_opts = PlanOptions {
        workers: Some(opts.workers),
        ..opts.plan.clone()
    };
    let plan = plan_job(spec, &plan_opts).await?;
    report.mode = Some(plan.mode);
    report.estimated_rows = Some(plan.estimated_rows);
    report.shards = plan.shards.len();
    tracing::info!(
        estimated_rows = plan.estimated_rows,
        shards = plan.shards.len(),
        mode = ?plan.mode,
        split = %plan.split_method,
        "planned"
    );

    // One snapshot for every shard, held open until the last shard has read it.
    let connector = PgConnector::from_spec(spec, opts.plan.retry.clone())?;
    let snapshot = if plan.shards.len() > 1 {
        Some(postgres::export_snapshot(&connector).await?)
    } else {
        None
    };

    let state: Arc<dyn StateStore> = Arc::new(SqliteStateStore::open(&opts.state_url).await?);
    let new_shards: Vec<NewShard> = plan
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| NewShard {
            shard_id: s.shard_id.clone(),
            shard_index: i as u32,
            estimated_rows: s.estimated_rows,
            bounds: s.bounds.clone(),
        })
        .collect();
    state
        .create_run(
            &NewRun {
                run_id: report.run_id.clone(),
                data_source_id: spec.data_source_id,
                etl_run_id: opts.etl_run_id,
                dest_table: spec.dest_table_name.clone(),
                mode: format!("{:?}", plan.mode).to_lowercase(),
                plan_json: serde_json::to_string(&plan)?,
            },
            &new_shards,
        )
        .await?;

    let staging = Staging::local(
        &opts
            .staging
            .clone()
            .unwrap_or_else(|| opts.dest.join("_staging")),
    )?;
    let mut ctx = start_fleet(spec, opts, &report.run_id, state.clone(), staging)?;
    let outcome = drive(
        spec,
        opts,
        &plan,
        snapshot.as_ref().map(|s| s.id.clone()),
        &mut ctx,
        &warehouse,
        report,
    )
    .await;
    drop(snapshot);
    ctx.shutdown.cancel();
    while let Some(done) = ctx.workers.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "worker stopped with an error");
        }
    }
    // Staging is removed whatever happened: a failed run is rerun from the source.
    if let Err(e) = ctx.staging.remove_run(&report.run_id).await {
        tracing::warn!(error = %e, "could not clean staging");
    }
    let (status, error) = match &outcome {
        Ok(()) => (RunStatus::Completed, None),
        Err(e) => (RunStatus::Failed, Some(e.to_string())),
    };
    state
        .finish_run(
            &report.run_id,
            status,
            report.rows_extracted,
            report.rows_loaded,
            error.as_deref(),
        )
        .await?;
    outcome
}

/// The embedded queue with Pub/Sub's topology, and N workers on it.
fn start_fleet(
    spec: &JobSpec,
    opts: &RunOptions,
    run_id: &str,
    state: Arc<dyn StateStore>,
    staging: Staging,
) -> Result<RunContext> {
    let topology = Topology::default();
    let queue = EmbeddedQueue::new(opts.queue);
    queue.create_subscription(
        &topology.shards_subscription,
        SubscriptionConfig {
            topic: topology.shards_topic.clone(),
            ack_deadline: opts.ack_deadline,
            dead_letter: Some(DeadLetterPolicy::new(
                &topology.dead_letter_topic,
                opts.max_delivery_attempts,
            )),
        },
    );
    for (sub, topic) in [
        (&topology.results_subscription, &topology.results_topic),
        (
            &topology.dead_letter_subscription,
            &topology.dead_letter_topic,
        ),
    ] {
        queue.create_subscription(
            sub,
            SubscriptionConfig {
                topic: topic.clone(),
                ack_deadline: Duration::from_secs(60),
                dead_letter: None,
            },
        );
    }
    let registry = Arc::new(RunRegistry::default());
    registry.register(run_id, Arc::new(spec.clone()));
    let shutdown = CancellationToken::new();
    let mut workers = tokio::task::JoinSet::new();
    let rows = Arc::new(AtomicU64::new(0));
    for i in 0..opts.workers.max(1) {
        let worker = Worker::new(
            Arc::new(queue.clone()),
            registry.clone(),
            staging.clone(),
            WorkerSettings {
                worker_id: format!("embedded-{i}"),
                topology: topology.clone(),
                lease: opts.ack_deadline,
                retry: opts.plan.retry.clone(),
                ..Default::default()
            },
            rows.clone(),
        );
        let token = shutdown.clone();
        workers.spawn(async move { worker.serve(token).await });
    }
    Ok(RunContext {
        state,
        staging,
        queue,
        topology,
        shutdown,
        workers,
        rows,
    })
}

/// Publishes the shards, collects results until every shard is in (or one is dead), loads.
async fn drive(
    spec: &JobSpec,
    opts: &RunOptions,
    plan: &Plan,
    snapshot: Option<String>,
    ctx: &mut RunContext,
    warehouse: &dyn Warehouse,
    report: &mut RunReport,
) -> Result<()> {
    let run_id = report.run_id.clone();
    let mut results = ctx
        .queue
        .subscribe(&ctx.topology.results_subscription, 1024)
        .await?;
    let mut dead = ctx
        .queue
        .subscribe(&ctx.topology.dead_letter_subscription, 1024)
        .await?;
    for (i, shard) in plan.shards.iter().enumerate() {
        let task = ShardTask {
            version: WIRE_VERSION,
            run_id: run_id.clone(),
            shard_id: shard.shard_id.clone(),
            shard_index: i as u32,
            data_source_id: spec.data_source_id,
            etl_run_id: opts.etl_run_id,
            schema_name: spec.schema_name.clone(),
            table_name: spec.table_name.clone(),
            columns: plan.source_columns.clone(),
            bounds: shard.bounds.clone(),
            snapshot: snapshot.clone(),
            batch_rows: opts.batch_rows,
        };
        ctx.queue
            .publish(
                &ctx.topology.shards_topic,
                Message::new(messages::encode(&task)?).with_attribute("run_id", &run_id),
            )
            .await?;
    }

    let total = plan.shards.len();
    let bar = progress::Progress::start(
        opts.show_progress,
        plan.estimated_rows,
        total,
        ctx.rows.clone(),
    );
    let mut done = 0usize;
    while done < total {
        tokio::select! {
            delivery = results.next() => {
                let delivery = delivery?;
                let result: ShardResult = match messages::decode("shard result", &delivery.message.data) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "dropping an undecodable shard result");
                        delivery.ack().await?;
                        continue;
                    }
                };
                if result.run_id != run_id {
                    delivery.ack().await?;
                    continue;
                }
                match ctx.state.record_result(&result).await? {
                    Recorded::Succeeded => {
                        done += 1;
                        bar.shard_done(done);
                    }
                    Recorded::Duplicate => report.duplicate_results_ignored += 1,
                    Recorded::FailedAttempt => {}
                }
                delivery.ack().await?;
            }
            delivery = dead.next() => {
                let delivery = delivery?;
                let task: ShardTask = messages::decode("dead-lettered shard", &delivery.message.data)?;
                let attempts = delivery_attempts(&delivery.message);
                delivery.ack().await?;
                if task.run_id != run_id {
                    continue;
                }
                let last_error = ctx
                    .state
                    .shards(&run_id)
                    .await?
                    .into_iter()
                    .find(|s| s.shard_id == task.shard_id)
                    .and_then(|s| s.error)
                    .unwrap_or_else(|| "no error was reported".into());
                let why = format!(
                    "shard {} failed after {attempts} attempts: {last_error}",
                    task.shard_id
                );
                if ctx.state.fail_shard(&run_id, &task.shard_id, &why).await? {
                    bar.finish();
                    return Err(Error::Other(why));
                }
            }
            stopped = ctx.workers.join_next() => {
                let why = match stopped {
                    Some(Ok(Err(e))) => e.to_string(),
                    Some(Err(e)) => e.to_string(),
                    _ => "stopped".into(),
                };
                bar.finish();
                return Err(Error::Other(format!("a worker stopped before the run finished: {why}")));
            }
        }
    }
    bar.finish();

    // Every shard is in: gather the parts in plan order and load them once.
    let records = ctx.state.shards(&run_id).await?;
    let mut parts: Vec<StagedFile> = Vec::new();
    for r in &records {
        report.shard_rows.push(r.rows.unwrap_or(0));
        parts.extend(r.files.iter().cloned());
    }
    report.rows_extracted = report.shard_rows.iter().sum();
    let schema = pg_binary::arrow_schema(&plan.source_columns);
    let outcome = warehouse
        .load(LoadRequest {
            table: &spec.dest_table_name,
            schema: &schema,
            run_id: &run_id,
            parts: &parts,
            staging: &ctx.staging,
            mode: WriteMode::Replace,
            expected_rows: report.rows_extracted,
        })
        .await?;
    report.rows_loaded = outcome.rows_loaded;
    report.destination = Some(outcome.location);
    Ok(())
}

fn delivery_attempts(message: &Message) -> String {
    message
        .attributes
        .get(shardflow::queue::DEAD_LETTER_COUNT_ATTRIBUTE)
        .cloned()
        .unwrap_or_else(|| "several".into())
}
