//! One `dispatcher run`: the queue, state store, staging and warehouse it wires up, its
//! in-process workers, the engine that runs the job, and the report it prints last.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Serialize;
use shardflow::metrics::Metrics;
use shardflow::plan::Mode;
use shardflow::queue::embedded::{EmbeddedOptions, EmbeddedQueue};
use shardflow::queue::pubsub::{PubSubOptions, PubSubQueue};
use shardflow::queue::{DeadLetterPolicy, Queue, SubscriptionConfig, Topology};
use shardflow::seal::SealKey;
use shardflow::spec::JobSpec;
use shardflow::staging::Staging;
use shardflow::state::sql::SqlStateStore;
use shardflow::state::{RunStatus, StateStore};
use shardflow::warehouse::Warehouse;
use shardflow::warehouse::bigquery;
use shardflow::warehouse::parquet_dir::{DEFAULT_VERSION_GRACE, ParquetDirWarehouse};
use shardflow::{Error, Result};
use shardflow_worker::{RunRegistry, Worker, WorkerSettings};
use tokio_util::sync::CancellationToken;

use crate::{
    DEFAULT_BATCH_ROWS, Engine, EngineSettings, PlanOptions, RenamedColumn, RunEvents, RunJob,
    RunObserver, RunOutcome, progress,
};

/// Which queue carries the shards.
#[derive(Clone, Debug)]
pub enum QueueChoice {
    /// In process, with `workers` in-process workers.
    Embedded(EmbeddedOptions),
    /// Google Pub/Sub (the emulator when `PUBSUB_EMULATOR_HOST` is set); a fleet of
    /// `worker serve` processes runs the shards.
    PubSub { project: String },
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub plan: PlanOptions,
    pub workers: usize,
    /// A directory for the Parquet-table warehouse, or `bigquery://PROJECT/DATASET`.
    pub dest: String,
    /// Staging URL (directory or `gs://bucket/prefix`); defaults to `<dest>/_staging` for a
    /// directory destination.
    pub staging: Option<String>,
    pub state_url: String,
    pub batch_rows: usize,
    pub etl_run_id: Option<i64>,
    pub show_progress: bool,
    /// How long a shard's lease lasts before it is redelivered (extended while it runs).
    pub ack_deadline: Duration,
    /// Deliveries of a failing shard before it is dead-lettered and the run fails.
    pub max_delivery_attempts: u32,
    pub queue: QueueChoice,
    pub topology: Topology,
    /// The job config's JSON as read; on the fleet it travels sealed (`SHARDFLOW_SEAL_KEY`).
    pub config_json: Option<String>,
    /// How often this run's owner says it is alive, and how long a silent owner of another run
    /// of the same stream keeps it.
    pub heartbeat: Duration,
    pub stale_after: Duration,
    /// How long a replaced version of a Parquet directory table stays readable.
    pub version_grace: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            plan: PlanOptions::default(),
            workers: 2,
            dest: "./warehouse".into(),
            staging: None,
            state_url: "sqlite://./shardflow-state.db".into(),
            batch_rows: DEFAULT_BATCH_ROWS,
            etl_run_id: None,
            show_progress: false,
            ack_deadline: Duration::from_secs(60),
            max_delivery_attempts: 5,
            queue: QueueChoice::Embedded(EmbeddedOptions::default()),
            topology: Topology::default(),
            config_json: None,
            heartbeat: Duration::from_secs(5),
            stale_after: Duration::from_secs(30),
            version_grace: DEFAULT_VERSION_GRACE,
        }
    }
}

/// The run report: the last line `dispatcher run` prints, and what Django's PATCH carries.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    pub status: RunStatus,
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
    /// Order-independent checksum of the loaded rows' content (the sum of the shards').
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// The largest value of the timestamp column among the loaded rows (ISO 8601).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// A file job: the files the run loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_loaded: Option<usize>,
    /// Source columns the destination holds under another name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renamed_columns: Vec<RenamedColumn>,
    /// What went wrong without failing the run, for a person to look at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// A file job: what the state store records once the load committed.
    #[serde(skip)]
    pub processed_files: Vec<shardflow::state::ProcessedFile>,
    pub duration_seconds: f64,
    /// Results for shards that had already reported (redeliveries); ignored by design.
    pub duplicate_results_ignored: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// Runs one job end to end and waits: on the embedded backends with in-process workers, or
/// over Pub/Sub with the fleet. Never panics on bad input: every failure becomes a `failed`
/// report with the reason.
pub async fn run_job(spec: JobSpec, opts: RunOptions) -> RunReport {
    let failed = |e: Error| RunReport {
        status: RunStatus::Failed,
        data_source_id: spec.data_source_id,
        etl_run_id: opts.etl_run_id,
        dest_table: spec.dest_table_name.clone(),
        error_message: Some(e.to_string()),
        warnings: spec.warnings.clone(),
        ..Default::default()
    };
    let mut fleet = match Fleet::start(&spec, &opts).await {
        Ok(f) => f,
        Err(e) => return failed(e),
    };
    let job = RunJob {
        job_key: shardflow::messages::job_key(
            opts.etl_run_id,
            spec.data_source_id,
            shardflow::messages::JobOrigin::Command,
        ),
        spec: Arc::new(spec.clone()),
        etl_run_id: opts.etl_run_id,
        // In-process workers share the registry; remote ones need the config sealed.
        own_config: match opts.queue {
            QueueChoice::Embedded(_) => None,
            QueueChoice::PubSub { .. } => opts.config_json.clone().map(Arc::new),
        },
    };
    let observer = ProgressObserver {
        show: opts.show_progress,
        rows: fleet.rows.clone(),
        bar: std::sync::Mutex::new(None),
    };
    // What killed runs before this one left, gone before it adds its own.
    fleet.engine.sweep().await;
    let outcome = fleet.engine.run(&job, &observer).await;
    observer.finish();
    fleet.stop().await;
    match outcome {
        Ok(RunOutcome::Finished(report)) | Ok(RunOutcome::AlreadyFinished(report)) => report,
        Ok(RunOutcome::OwnedElsewhere { run_id, owner }) => failed(Error::Other(format!(
            "run {run_id} of this job is being driven by {owner}"
        ))),
        Err(e) => failed(e),
    }
}

/// The backends of one `dispatcher run`, with its in-process workers when embedded.
pub(crate) struct Fleet {
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    /// Rows the in-process workers have extracted so far, for the progress bar.
    rows: Arc<AtomicU64>,
}

/// The warehouse a destination URL names; a directory's replaced table versions stay
/// readable for `version_grace`.
pub async fn open_warehouse(dest: &str, version_grace: Duration) -> Result<Arc<dyn Warehouse>> {
    if dest.starts_with("bigquery://") {
        let (project, dataset) = bigquery::parse_bigquery_url(dest)?;
        Ok(Arc::new(
            bigquery::BigQueryWarehouse::connect(&project, &dataset).await?,
        ))
    } else {
        Ok(Arc::new(
            ParquetDirWarehouse::new(PathBuf::from(dest))?.with_version_grace(version_grace),
        ))
    }
}

/// The staging a run uses: the URL given, or `<dest>/_staging` for a directory destination.
pub fn open_staging(staging: Option<&str>, dest: &str) -> Result<Staging> {
    match (staging, dest.starts_with("bigquery://")) {
        (Some(url), _) => Staging::from_url(url),
        (None, false) => Staging::local(&PathBuf::from(dest).join("_staging")),
        (None, true) => Err(Error::Other(
            "a BigQuery destination needs --staging gs://bucket/prefix".into(),
        )),
    }
}

impl Fleet {
    async fn start(spec: &JobSpec, opts: &RunOptions) -> Result<Self> {
        let warehouse = open_warehouse(&opts.dest, opts.version_grace).await?;
        let staging = open_staging(opts.staging.as_deref(), &opts.dest)?;
        let state: Arc<dyn StateStore> = Arc::new(SqlStateStore::open(&opts.state_url).await?);
        let topology = opts.topology.clone();
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let rows = Arc::new(AtomicU64::new(0));
        let events = Arc::new(RunEvents::default());
        let queue: Arc<dyn Queue> = match &opts.queue {
            QueueChoice::Embedded(options) => {
                let queue = embedded_queue(*options, &topology, opts);
                let registry = Arc::new(RunRegistry::default());
                registry.register_any(Arc::new(spec.clone()));
                let mut workers = tokio::task::JoinSet::new();
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
                // A worker that stops before the run ends fails the run (it would hang).
                let (events, token) = (events.clone(), shutdown.clone());
                tasks.spawn(async move {
                    while let Some(done) = workers.join_next().await {
                        if token.is_cancelled() {
                            continue;
                        }
                        let why = match done {
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => e.to_string(),
                            Ok(Ok(())) => "stopped".into(),
                        };
                        events.fail_all(format!("a worker stopped before the run finished: {why}"));
                    }
                });
                Arc::new(queue)
            }
            QueueChoice::PubSub { project } => {
                let mut options = PubSubOptions::from_env(project);
                options.lease_extension = opts
                    .ack_deadline
                    .clamp(Duration::from_secs(10), Duration::from_secs(600));
                Arc::new(PubSubQueue::connect(options).await?)
            }
        };
        let engine = Arc::new(Engine {
            queue,
            state,
            staging,
            warehouse,
            topology,
            owner: format!("cli-{}", uuid::Uuid::new_v4().simple()),
            events: events.clone(),
            metrics: Arc::new(Metrics::new()),
            settings: EngineSettings {
                plan: PlanOptions {
                    workers: match opts.queue {
                        QueueChoice::Embedded(_) => Some(opts.workers),
                        QueueChoice::PubSub { .. } => opts.plan.workers,
                    },
                    ..opts.plan.clone()
                },
                batch_rows: opts.batch_rows,
                heartbeat: opts.heartbeat,
                stale_after: opts.stale_after,
                seal_key: match opts.queue {
                    QueueChoice::Embedded(_) => None,
                    QueueChoice::PubSub { .. } => SealKey::from_env()?,
                },
                ..Default::default()
            },
        });
        for consumer in [ConsumerKind::Results, ConsumerKind::DeadLetters] {
            let (engine, token, events) = (engine.clone(), shutdown.clone(), events.clone());
            tasks.spawn(async move {
                let outcome = match consumer {
                    ConsumerKind::Results => engine.record_results(token).await,
                    ConsumerKind::DeadLetters => engine.record_dead_letters(token).await,
                };
                if let Err(e) = outcome {
                    events.fail_all(format!("the {consumer:?} consumer stopped: {e}"));
                }
            });
        }
        Ok(Fleet {
            engine,
            shutdown,
            tasks,
            rows,
        })
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum ConsumerKind {
    Results,
    DeadLetters,
}

/// The embedded queue with Pub/Sub's topology.
pub(crate) fn embedded_queue(
    options: EmbeddedOptions,
    topology: &Topology,
    opts: &RunOptions,
) -> EmbeddedQueue {
    let queue = EmbeddedQueue::new(options);
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
    queue
}

/// The progress bar, fed by the engine.
pub(crate) struct ProgressObserver {
    show: bool,
    rows: Arc<AtomicU64>,
    bar: std::sync::Mutex<Option<progress::Progress>>,
}

impl ProgressObserver {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<progress::Progress>> {
        self.bar.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self) {
        if let Some(bar) = self.lock().take() {
            bar.finish();
        }
    }
}

#[async_trait::async_trait]
impl RunObserver for ProgressObserver {
    async fn planned(&self, _run_id: &str, estimated_rows: u64, shards: usize) {
        *self.lock() = Some(progress::Progress::start(
            self.show,
            estimated_rows,
            shards,
            self.rows.clone(),
        ));
    }

    async fn shard_done(&self, done: usize, _total: usize, _rows: u64) {
        if let Some(bar) = self.lock().as_ref() {
            bar.shard_done(done);
        }
    }
}
