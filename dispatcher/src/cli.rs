//! The command line: each subcommand, its flags and the environment variables they read.

use super::*;

/// The environment `dispatcher serve` reads besides its flags' own variables.
pub(super) const SERVE_ENV_HELP: &str = "Environment (besides each flag's own variable):
  DJANGO_API_URL        Django's base URL: job configs by data source, and run statuses
                        (unset: only inline configs run, and nothing is reported)
  ETL_API_TOKEN         the bearer token for Django (a warning when DJANGO_API_URL is set
                        without it)
  SHARDFLOW_SEAL_KEY    64 hex digits, the same on the workers: seals inline configs for them
  PUBSUB_EMULATOR_HOST  host:port of the Pub/Sub emulator instead of Google's service
  STORAGE_EMULATOR_HOST the GCS emulator's URL instead of Google's service
  BIGQUERY_EMULATOR_HOST the BigQuery emulator's URL instead of Google's service
  BIGQUERY_LOCATION     where load and query jobs run (default: the dataset's location)
  ETL_MAX_RETRIES, ETL_RETRY_DELAY  retries of transient errors (default 3, from 5 s)";

#[derive(Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "shardflow dispatcher: plans a table into equal-row shards, runs them on workers, loads the result once"
)]
pub(super) struct Cli {
    /// Log format: `text` for people, `json` for Cloud Logging (severity, message,
    /// data_source_id, etl_run_id). Logs go to stderr.
    #[arg(long, global = true, env = "SHARDFLOW_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub(super) log_format: String,
    /// Log level (DEBUG, INFO, WARNING, ERROR) or a tracing filter directive.
    #[arg(long, global = true, env = "LOG_LEVEL", default_value = "info")]
    pub(super) log_level: String,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Args, Clone)]
pub(super) struct PlanArgs {
    /// The job: the job-config JSON Django serves, or a job message
    /// `{"data_source_id": …, "etl_run_id": …, "config": {…}}`.
    #[arg(long)]
    pub(super) job: PathBuf,
    /// Target rows per shard when the job is sharded.
    #[arg(long, default_value_t = DEFAULT_SHARD_ROWS)]
    pub(super) shard_rows: u64,
    /// Count the rows exactly with COUNT(*) (scans the table) instead of estimating.
    #[arg(long)]
    pub(super) exact_count: bool,
}

#[derive(Subcommand)]
pub(super) enum Command {
    /// Print the plan as JSON: estimate and its source, mode and why, split column, shards
    /// with their bounds and estimated rows. Moves no data.
    Plan(PlanArgs),
    /// Run the job on the embedded defaults and print the run report as the last stdout line.
    /// Exits 0 only when the run completed.
    Run {
        #[command(flatten)]
        plan: PlanArgs,
        /// Workers to run in-process (the same code the `worker` binary runs).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Destination: a directory (the table is the Parquet files under
        /// `<dest>/<dest_table_name>/`) or `bigquery://PROJECT/DATASET`.
        #[arg(long, default_value = "./warehouse")]
        dest: String,
        /// Staging for the workers' Parquet parts (removed after the run): a directory or
        /// `gs://bucket/prefix`. Defaults to `<dest>/_staging` for a directory destination.
        #[arg(long, env = "SHARDFLOW_STAGING")]
        staging: Option<String>,
        /// `embedded`: in-process queue and workers. `pubsub`: publish the shards to Pub/Sub
        /// for a fleet of `worker serve` processes and wait for their results.
        #[arg(long, env = "SHARDFLOW_QUEUE", default_value = "embedded", value_parser = ["embedded", "pubsub"])]
        queue: String,
        /// Google Cloud project of the Pub/Sub topics (with `--queue pubsub`).
        #[arg(long, env = "GCP_PROJECT_ID", default_value = "")]
        project: String,
        #[command(flatten)]
        topology: TopologyArgs,
        /// State store URL (runs, shards, results).
        #[arg(
            long,
            env = "SHARDFLOW_STATE",
            default_value = "sqlite://./shardflow-state.db"
        )]
        state: String,
        /// Rows per Arrow batch: with the in-flight batches, this bounds each worker's memory.
        #[arg(long, env = "ETL_BATCH_SIZE", default_value_t = DEFAULT_BATCH_ROWS)]
        batch_size: usize,
        /// Django's run id, when the job message did not carry one.
        #[arg(long)]
        etl_run_id: Option<i64>,
        /// Seconds a shard's lease lasts before it is redelivered (workers extend it while
        /// they run).
        #[arg(long, default_value_t = 60)]
        ack_deadline: u64,
        /// Deliveries of a failing shard before it is dead-lettered and the run fails.
        #[arg(long, default_value_t = 5)]
        max_delivery_attempts: u32,
        /// Never draw a progress bar (it is drawn only when stderr is a terminal anyway).
        #[arg(long)]
        no_progress: bool,
        /// Seconds between the heartbeats of the run's owner (this process).
        #[arg(long, env = "SHARDFLOW_HEARTBEAT_SECS", default_value_t = 5)]
        heartbeat_secs: u64,
        /// Seconds of silence after which a run of the same incremental stream (a killed
        /// `dispatcher run`, a dead dispatcher) is taken over.
        #[arg(long, env = "SHARDFLOW_STALE_AFTER_SECS", default_value_t = 30)]
        stale_after_secs: u64,
        #[command(flatten)]
        grace: GraceArgs,
        /// Fault injection for testing: the embedded queue delivers every message twice, as
        /// Pub/Sub may. The result must not change.
        #[arg(long, env = "SHARDFLOW_DUPLICATE_DELIVERIES")]
        duplicate_deliveries: bool,
    },
    /// Pull job messages from Pub/Sub, run them on the fleet, report each run to Django.
    /// Every flag also reads the environment variable it names.
    #[command(after_help = SERVE_ENV_HELP)]
    Serve(Box<ServeArgs>),
    /// Create the topics and subscriptions (with the dead-letter policy) that are missing.
    /// Idempotent.
    PubsubSetup(SetupArgs),
    /// Remove what dead runs left: close runs whose owner went quiet (and that no stream's
    /// next job will continue) as `abandoned`, remove the staged parts of every run that is not
    /// running, and the warehouse's half-built and expired table versions. Prints what it did
    /// as JSON. `dispatcher run` does the same before each run, `dispatcher serve` every
    /// `--gc-interval-secs`.
    Gc {
        /// Destination, as for `run`.
        #[arg(long, default_value = "./warehouse")]
        dest: String,
        /// Staging, as for `run`.
        #[arg(long, env = "SHARDFLOW_STAGING")]
        staging: Option<String>,
        #[arg(
            long,
            env = "SHARDFLOW_STATE",
            default_value = "sqlite://./shardflow-state.db"
        )]
        state: String,
        /// Seconds of silence after which a run's owner is taken for dead.
        #[arg(long, env = "SHARDFLOW_STALE_AFTER_SECS", default_value_t = 30)]
        stale_after_secs: u64,
        #[command(flatten)]
        grace: GraceArgs,
    },
    /// A file job's matching files, newest first, as JSON (Django's list-files response).
    ListFiles {
        #[arg(long)]
        job: PathBuf,
    },
    /// The columns of a file job's newest file, with BigQuery types, sample values and the
    /// schema fingerprint, as JSON (Django's detect-file-schema response).
    DetectSchema {
        #[arg(long)]
        job: PathBuf,
    },
}

#[derive(Args, Clone, Debug)]
pub(super) struct GraceArgs {
    /// Seconds a replaced version of a directory destination's table stays readable by
    /// readers that resolved the table's link before the swap (removed by the first load of
    /// the table or sweep after that).
    #[arg(long, env = "SHARDFLOW_VERSION_GRACE_SECS", default_value_t = DEFAULT_VERSION_GRACE.as_secs())]
    pub(super) version_grace_secs: u64,
}

impl GraceArgs {
    pub(super) fn grace(&self) -> Duration {
        Duration::from_secs(self.version_grace_secs)
    }
}

/// Topic and subscription names.
#[derive(Args, Clone, Debug)]
pub(super) struct TopologyArgs {
    #[arg(long, env = "SHARDFLOW_JOBS_TOPIC", default_value = "etl-jobs")]
    pub(super) jobs_topic: String,
    #[arg(
        long,
        env = "SHARDFLOW_JOBS_SUBSCRIPTION",
        default_value = "etl-jobs-dispatcher"
    )]
    pub(super) jobs_subscription: String,
    #[arg(long, env = "SHARDFLOW_SHARDS_TOPIC", default_value = "etl-shards")]
    pub(super) shards_topic: String,
    #[arg(
        long,
        env = "SHARDFLOW_SHARDS_SUBSCRIPTION",
        default_value = "etl-shards-workers"
    )]
    pub(super) shards_subscription: String,
    #[arg(
        long,
        env = "SHARDFLOW_RESULTS_TOPIC",
        default_value = "etl-shard-results"
    )]
    pub(super) results_topic: String,
    #[arg(
        long,
        env = "SHARDFLOW_RESULTS_SUBSCRIPTION",
        default_value = "etl-shard-results-dispatcher"
    )]
    pub(super) results_subscription: String,
    #[arg(
        long,
        env = "SHARDFLOW_DEAD_LETTER_TOPIC",
        default_value = "etl-shards-dead-letter"
    )]
    pub(super) dead_letter_topic: String,
    #[arg(
        long,
        env = "SHARDFLOW_DEAD_LETTER_SUBSCRIPTION",
        default_value = "etl-shards-dead-letter-dispatcher"
    )]
    pub(super) dead_letter_subscription: String,
}

impl TopologyArgs {
    pub(super) fn topology(&self) -> Topology {
        Topology {
            jobs_topic: self.jobs_topic.clone(),
            jobs_subscription: self.jobs_subscription.clone(),
            shards_topic: self.shards_topic.clone(),
            shards_subscription: self.shards_subscription.clone(),
            results_topic: self.results_topic.clone(),
            results_subscription: self.results_subscription.clone(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            dead_letter_subscription: self.dead_letter_subscription.clone(),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub(super) struct ServeArgs {
    /// Google Cloud project (Pub/Sub, and BigQuery unless --dest says otherwise).
    #[arg(long, env = "GCP_PROJECT_ID")]
    pub(super) project: String,
    /// BigQuery dataset of the destination tables.
    #[arg(long, env = "BIGQUERY_DATASET", default_value = "raw_data")]
    pub(super) dataset: String,
    /// Destination; defaults to `bigquery://<project>/<dataset>`. A directory is accepted
    /// for a single-machine setup.
    #[arg(long, env = "SHARDFLOW_DEST")]
    pub(super) dest: Option<String>,
    /// Staging the workers write to: `gs://bucket/prefix`.
    #[arg(long, env = "SHARDFLOW_STAGING")]
    pub(super) staging: String,
    /// State store: `postgres://…` for several dispatcher replicas, or `sqlite://FILE`.
    #[arg(
        long,
        env = "SHARDFLOW_STATE",
        default_value = "sqlite://./shardflow-state.db"
    )]
    pub(super) state: String,
    /// Runs driven at once.
    #[arg(long, env = "SHARDFLOW_MAX_RUNS", default_value_t = 8)]
    pub(super) max_runs: usize,
    /// Port of /metrics and /healthz.
    #[arg(long, env = "SHARDFLOW_METRICS_PORT", default_value_t = 9090)]
    pub(super) metrics_port: u16,
    /// Address to serve /metrics and /healthz on.
    #[arg(long, env = "SHARDFLOW_METRICS_HOST", default_value = "0.0.0.0")]
    pub(super) metrics_host: String,
    /// Target rows per shard.
    #[arg(long, env = "SHARDFLOW_SHARD_ROWS", default_value_t = DEFAULT_SHARD_ROWS)]
    pub(super) shard_rows: u64,
    /// Rows per Arrow batch in the workers.
    #[arg(long, env = "ETL_BATCH_SIZE", default_value_t = DEFAULT_BATCH_ROWS)]
    pub(super) batch_size: usize,
    /// Seconds between the heartbeats of a run's owner.
    #[arg(long, env = "SHARDFLOW_HEARTBEAT_SECS", default_value_t = 5)]
    pub(super) heartbeat_secs: u64,
    /// Seconds of silence after which another dispatcher takes a run over.
    #[arg(long, env = "SHARDFLOW_STALE_AFTER_SECS", default_value_t = 30)]
    pub(super) stale_after_secs: u64,
    /// Seconds to let runs finish after SIGTERM before leaving them to another dispatcher.
    #[arg(long, env = "SHARDFLOW_DRAIN_SECS", default_value_t = 60)]
    pub(super) drain_secs: u64,
    /// Seconds before handing back a job that another live dispatcher is running.
    #[arg(long, env = "SHARDFLOW_BUSY_BACKOFF_SECS", default_value_t = 10)]
    pub(super) busy_backoff_secs: u64,
    /// Seconds each lease extension of a job message lasts (10 to 600): a dispatcher that
    /// dies has its jobs redelivered to another within about this long.
    #[arg(long, env = "SHARDFLOW_LEASE_SECS", default_value_t = 60)]
    pub(super) lease_secs: u64,
    /// Seconds between sweeps of what dead runs left (0: never; `dispatcher gc` still can).
    #[arg(long, env = "SHARDFLOW_GC_INTERVAL_SECS", default_value_t = 300)]
    pub(super) gc_interval_secs: u64,
    /// Seconds a run's final status is resent to Django until it is accepted; then it is
    /// given up with a logged error (a 4xx answer gives it up at once).
    #[arg(long, env = "SHARDFLOW_REPORT_GIVE_UP_SECS", default_value_t = 86400)]
    pub(super) report_give_up_secs: u64,
    #[command(flatten)]
    pub(super) grace: GraceArgs,
    #[command(flatten)]
    pub(super) topology: TopologyArgs,
}

#[derive(Args, Clone, Debug)]
pub(super) struct SetupArgs {
    #[arg(long, env = "GCP_PROJECT_ID")]
    pub(super) project: String,
    /// Deliveries of a shard before it goes to the dead-letter topic (5 to 100).
    #[arg(long, env = "SHARDFLOW_MAX_DELIVERY_ATTEMPTS", default_value_t = 5)]
    pub(super) max_delivery_attempts: u32,
    /// Pub/Sub's wait before redelivering a failed shard grows from this...
    #[arg(long, env = "SHARDFLOW_RETRY_MIN_BACKOFF_SECS", default_value_t = 10)]
    pub(super) retry_min_backoff_secs: u64,
    /// ...to this.
    #[arg(long, env = "SHARDFLOW_RETRY_MAX_BACKOFF_SECS", default_value_t = 600)]
    pub(super) retry_max_backoff_secs: u64,
    /// Ack deadline of the shards subscription (workers extend it while they run).
    #[arg(long, env = "SHARDFLOW_ACK_DEADLINE_SECS", default_value_t = 60)]
    pub(super) ack_deadline_secs: u64,
    /// Ack deadline of the jobs subscription (the dispatcher extends it while a run goes).
    #[arg(long, env = "SHARDFLOW_JOBS_ACK_DEADLINE_SECS", default_value_t = 600)]
    pub(super) jobs_ack_deadline_secs: u64,
    #[command(flatten)]
    pub(super) topology: TopologyArgs,
}
