//! The dispatcher: validate a job, estimate and plan its shards, record the run, publish the
//! shards, track their results (idempotent by shard id), and when every shard is in, load the
//! table ONCE, verify the counts, clean staging and report.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Serialize;
use shardflow::metrics::Metrics;
use shardflow::plan::{self, Mode};
use shardflow::queue::embedded::{EmbeddedOptions, EmbeddedQueue};
use shardflow::queue::pubsub::{PubSubOptions, PubSubQueue};
use shardflow::queue::{DeadLetterPolicy, Queue, SubscriptionConfig, Topology};
use shardflow::retry::RetryPolicy;
use shardflow::seal::SealKey;
use shardflow::source::{
    Estimate, PlannedWindow, ShardBounds, SourceColumn, Split, Window, WindowBounds,
};
use shardflow::spec::{JobSpec, LoadType, ProcessingMode, SourceType};
use shardflow::staging::Staging;
use shardflow::state::sql::SqlStateStore;
use shardflow::state::{RunStatus, StateStore};
use shardflow::warehouse::Warehouse;
use shardflow::warehouse::bigquery;
use shardflow::warehouse::parquet_dir::{DEFAULT_VERSION_GRACE, ParquetDirWarehouse};
use shardflow::{Error, Result};
use shardflow_worker::{RunRegistry, Worker, WorkerSettings};
use tokio_util::sync::CancellationToken;

pub mod engine;
pub mod files;
pub mod gc;
pub mod progress;
pub mod report;
pub mod serve;

pub use engine::{Engine, EngineSettings, RunEvents, RunJob, RunObserver, RunOutcome};

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
    /// The warehouse loads gs:// source files itself (BigQuery): a GCS file job it can read
    /// as is takes the fast path.
    pub warehouse_loads_gcs: bool,
    /// The warehouse's location (a BigQuery dataset's): source files it loads itself must be in
    /// a bucket there.
    pub warehouse_location: Option<String>,
    /// How the warehouse names each source column (BigQuery renames what it cannot take).
    pub column_names: fn(&[String]) -> Vec<String>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            shard_rows: plan::DEFAULT_SHARD_ROWS,
            workers: None,
            exact_count: false,
            retry: RetryPolicy::default(),
            warehouse_loads_gcs: false,
            warehouse_location: None,
            column_names: shardflow::warehouse::names_as_they_are,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedColumn {
    pub name: String,
    pub source_type: String,
    pub arrow_type: String,
    pub nullable: bool,
    /// The destination's name for it, when the warehouse cannot take the source's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_name: Option<String>,
}

/// A source column the warehouse holds under another name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RenamedColumn {
    pub source: String,
    pub destination: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedShard {
    pub shard_id: String,
    pub estimated_rows: u64,
    /// The bounds in words (`502130 <= order_id < 994064`): lower inclusive, upper exclusive.
    pub reads: String,
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
    /// The destination's name for each of `source_columns`, in order.
    #[serde(skip)]
    pub destination_names: Vec<String>,
    /// The columns the destination holds under another name (the warehouse's naming rule).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub renamed_columns: Vec<RenamedColumn>,
    /// For a transactional load: the rows this run reads. `None` with no shard at all when
    /// the window is empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// For a transactional load: the watermark of the load before, which the window starts
    /// after (the greater of `last_sync_value` and the one the state store recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumes_after: Option<String>,
    /// For a merge: the columns that identify a row in the destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merge_keys: Vec<String>,
    /// For a file job: which files the run reads and where its columns came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<files::FilesPlan>,
    /// What the run's report should say about the plan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Plan {
    /// The destination's name of a source column (itself when not renamed, or not read).
    pub fn destination_name<'a>(&'a self, source: &'a str) -> &'a str {
        self.source_columns
            .iter()
            .zip(&self.destination_names)
            .find(|(c, _)| c.name == source)
            .map_or(source, |(_, d)| d.as_str())
    }
}

/// What the state store knows about an incremental stream, beyond the job config.
#[derive(Clone, Debug, Default)]
pub struct StreamState {
    /// The window of a run this one takes over: it is read again exactly, so a load that
    /// committed before its dispatcher died is not followed by a wider window.
    pub inherited_window: Option<Window>,
    /// The watermark recorded with the stream's last committed load: a `last_sync_value`
    /// older than it (Django missed the final report, or a scheduled job has no run to
    /// report to) must not read those rows again.
    pub recorded_watermark: Option<String>,
    /// A file stream: the files its committed loads read.
    pub processed_files: Vec<shardflow::state::ProcessedFile>,
    /// A file stream's run this one takes over: the files it selected (their URIs). Only
    /// those are read again: its append may have committed under the job's load key, and a
    /// file listed since would be recorded as loaded with it without being in it.
    pub inherited_files: Option<Vec<String>>,
}

/// The columns a merge matches rows on: `merge_keys`, else the primary key; each must be read.
fn merge_keys(
    spec: &JobSpec,
    primary_key: &[String],
    read: &[SourceColumn],
) -> Result<Vec<String>> {
    let keys = match &spec.merge_keys {
        Some(keys) => keys.clone(),
        None if primary_key.is_empty() => {
            return Err(Error::Spec(shardflow::spec::SpecError::single(
                "merge_keys",
                format!(
                    "{} has no primary key: name the columns that identify a row",
                    spec.qualified_table()
                ),
            )));
        }
        None => primary_key.to_vec(),
    };
    let unread: Vec<&str> = keys
        .iter()
        .filter(|k| !read.iter().any(|c| &c.name == *k))
        .map(String::as_str)
        .collect();
    if !unread.is_empty() {
        return Err(Error::Spec(shardflow::spec::SpecError::single(
            "merge_keys",
            format!(
                "{} must be among the columns read from {} (a column of the table, in \
                 selected_columns when those are given)",
                unread.join(", "),
                spec.qualified_table()
            ),
        )));
    }
    Ok(keys)
}

fn shard_id(index: usize) -> String {
    format!("s{index:05}")
}

pub(crate) fn check_supported(spec: &JobSpec) -> Result<()> {
    if spec.source_type.is_file_source() != spec.files.is_some() {
        return Err(Error::Source(format!(
            "source_type {:?} {} file settings (file_format, file_pattern)",
            spec.source_type,
            if spec.files.is_some() {
                "reads no files, and the job has"
            } else {
                "reads files, and the job has no"
            }
        )));
    }
    Ok(())
}

/// Plans a job: checks the table and columns exist, estimates without scanning, picks the
/// mode, and cuts equal-row shards. Moves no data.
pub async fn plan_job(spec: &JobSpec, opts: &PlanOptions) -> Result<Plan> {
    plan_job_in_stream(spec, opts, &StreamState::default()).await
}

/// What the source database says of the job's table: the columns read, the rows and their
/// cut, and for an incremental load its window.
struct Survey {
    columns: Vec<SourceColumn>,
    merge_keys: Vec<String>,
    estimate: Estimate,
    split: Split,
    window: Option<Window>,
    resumes_after: Option<String>,
    /// What the report should say about the plan (rows no window takes).
    warnings: Vec<String>,
}

/// The columns to read, checked, and a merge's keys.
fn columns_and_keys(
    spec: &JobSpec,
    table_columns: &[SourceColumn],
    primary_key: &[String],
) -> Result<(Vec<SourceColumn>, Vec<String>)> {
    let columns = shardflow::source::project(table_columns, &spec.qualified_table(), spec)?;
    if columns.is_empty() {
        return Err(Error::Source(format!(
            "{} has no columns to read",
            spec.qualified_table()
        )));
    }
    let merge_keys = match spec.load_type {
        LoadType::Merge => merge_keys(spec, primary_key, &columns)?,
        _ => Vec::new(),
    };
    Ok((columns, merge_keys))
}

/// How an incremental window was cut, for the plan.
fn window_split(
    planned: PlannedWindow,
    column: &str,
) -> (Estimate, Split, Option<Window>, Option<String>, Vec<String>) {
    let PlannedWindow {
        window,
        after,
        rows,
        beyond,
        shards,
    } = planned;
    let warnings = match beyond {
        0 => Vec::new(),
        n => vec![format!(
            "{n} row{} of timestamp_column {column:?} {} infinity (or NaN), past the end of \
             every incremental window: an incremental load never takes {}; a catalog load does",
            if n == 1 { "" } else { "s" },
            if n == 1 { "is" } else { "are" },
            if n == 1 { "it" } else { "them" },
        )],
    };
    let method = match (&window, shards.len()) {
        (None, _) => "none (the window is empty)",
        (Some(_), 1) => "none",
        (Some(_), _) => "window quantiles",
    };
    let split = Split {
        method: method.into(),
        column: (shards.len() > 1).then(|| column.to_string()),
        shards,
    };
    let estimate = Estimate {
        rows,
        source: "count(*) over the window".into(),
    };
    (estimate, split, window, after, warnings)
}

fn warn_if_behind(spec: &JobSpec, stream: &StreamState, after: &Option<String>) {
    let told = spec.last_sync_value.as_ref().and_then(sync_value_text);
    if stream.inherited_window.is_none() && *after != told {
        tracing::warn!(
            last_sync_value = ?told,
            recorded = ?after,
            "last_sync_value is older than the watermark of this stream's last committed \
             load; the window starts after the recorded one"
        );
    }
}

/// The columns, rows and cut of a table source (PostgreSQL, MySQL).
async fn survey_table(
    spec: &JobSpec,
    opts: &PlanOptions,
    stream: &StreamState,
    wanted: &(dyn Fn(u64) -> usize + Send + Sync),
) -> Result<Survey> {
    let mut table = shardflow::source::survey_table(spec, opts.retry.clone()).await?;
    let (columns, merge_keys) = columns_and_keys(spec, table.columns(), table.primary_key())?;
    let (estimate, split, window, resumes_after, warnings) =
        match (spec.load_type, &spec.timestamp_column) {
            (LoadType::Transactional | LoadType::Merge, Some(column)) => {
                let bounds = window_bounds(spec, stream);
                let planned = table.plan_window(column, bounds, wanted).await?;
                let cut = window_split(planned, column);
                warn_if_behind(spec, stream, &cut.3);
                cut
            }
            _ => {
                let estimate = table.estimate(opts.exact_count).await?;
                let split = table.split(estimate.rows, wanted(estimate.rows)).await?;
                (estimate, split, None, None, Vec::new())
            }
        };
    Ok(Survey {
        columns,
        merge_keys,
        estimate,
        split,
        window,
        resumes_after,
        warnings,
    })
}

/// `plan_job` for a run whose incremental stream the state store knows.
pub async fn plan_job_in_stream(
    spec: &JobSpec,
    opts: &PlanOptions,
    stream: &StreamState,
) -> Result<Plan> {
    check_supported(spec)?;
    let wanted =
        |rows: u64| match plan::choose_mode(spec.processing_mode, rows, spec.row_count_threshold).0
        {
            Mode::Standard => 1,
            Mode::Sharded => plan::fit_to_workers(
                plan::shard_count(rows, opts.shard_rows),
                opts.workers.unwrap_or(1),
            ),
        };
    let mut files_plan = None;
    let Survey {
        columns,
        merge_keys,
        estimate,
        split,
        window,
        resumes_after,
        warnings,
    } = match spec.source_type {
        SourceType::Mysql | SourceType::Postgresql => {
            survey_table(spec, opts, stream, &wanted).await?
        }
        SourceType::Gcs | SourceType::S3 | SourceType::AzureBlob | SourceType::Local => {
            let survey = files::survey_files(spec, opts, stream).await?;
            files_plan = Some(survey.files);
            Survey {
                columns: survey.columns,
                merge_keys: Vec::new(),
                estimate: survey.estimate,
                split: survey.split,
                window: None,
                resumes_after: None,
                warnings: Vec::new(),
            }
        }
    };
    let (mode, mode_reason) = plan::choose_mode(
        spec.processing_mode,
        estimate.rows,
        spec.row_count_threshold,
    );
    let source_names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    let destination_names = (opts.column_names)(&source_names);
    let renamed_columns: Vec<RenamedColumn> = source_names
        .iter()
        .zip(&destination_names)
        .filter(|(s, d)| s != d)
        .map(|(s, d)| RenamedColumn {
            source: s.clone(),
            destination: d.clone(),
        })
        .collect();
    Ok(Plan {
        data_source_id: spec.data_source_id,
        source: match &files_plan {
            Some(_) => format!(
                "{:?} files {}{}",
                spec.source_type,
                spec.files.as_ref().map_or("", |f| f.path_prefix.as_str()),
                spec.files.as_ref().map_or("", |f| f.pattern.as_str())
            ),
            None => spec.qualified_table(),
        },
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
            .zip(&destination_names)
            .map(|(c, destination)| {
                let (source_type, arrow_type) =
                    shardflow::source::column_types(spec.source_type, c);
                PlannedColumn {
                    name: c.name.clone(),
                    source_type,
                    arrow_type: arrow_type.to_string(),
                    nullable: c.nullable,
                    destination_name: (destination != &c.name).then(|| destination.clone()),
                }
            })
            .collect(),
        shards: split
            .shards
            .into_iter()
            .enumerate()
            .map(|(i, (bounds, estimated_rows))| PlannedShard {
                shard_id: shard_id(i),
                estimated_rows,
                reads: bounds.describe(),
                bounds,
            })
            .collect(),
        source_columns: columns,
        destination_names,
        renamed_columns,
        window,
        resumes_after,
        merge_keys,
        files: files_plan,
        warnings,
    })
}

/// The bounds of a transactional run's window: a taken-over run's own, or after the greater
/// of `last_sync_value` and the recorded watermark (else from `historical_start_date`).
fn window_bounds(spec: &JobSpec, stream: &StreamState) -> WindowBounds {
    if let Some(w) = &stream.inherited_window {
        return WindowBounds {
            after: w.after.iter().cloned().collect(),
            from: w.from.clone(),
            through: Some(w.through.clone()),
            // The inherited window already starts where the lookback put it.
            lookback: None,
        };
    }
    let told = spec.last_sync_value.as_ref().and_then(sync_value_text);
    WindowBounds {
        after: told
            .into_iter()
            .chain(stream.recorded_watermark.clone())
            .collect(),
        from: spec.historical_start_date.clone(),
        through: None,
        lookback: spec.lookback,
    }
}

/// `last_sync_value` as the text PostgreSQL casts back: a JSON string as is, a number as
/// written; null or an empty string mean no watermark yet.
pub(crate) fn sync_value_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

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
        status: RunStatus::Failed.as_str().into(),
        data_source_id: spec.data_source_id,
        etl_run_id: opts.etl_run_id,
        dest_table: spec.dest_table_name.clone(),
        error_message: Some(e.to_string()),
        warnings: spec.warnings.clone(),
        ..Default::default()
    };
    if let Err(e) = check_supported(&spec) {
        return failed(e);
    }
    let mut fleet = match Fleet::start(&spec, &opts).await {
        Ok(f) => f,
        Err(e) => return failed(e),
    };
    let job = RunJob {
        job_key: opts
            .etl_run_id
            .map(|id| format!("etl-{id}"))
            .unwrap_or_else(|| format!("cli-{}", uuid::Uuid::now_v7())),
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
struct Fleet {
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
enum ConsumerKind {
    Results,
    DeadLetters,
}

/// The embedded queue with Pub/Sub's topology.
fn embedded_queue(
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
struct ProgressObserver {
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
