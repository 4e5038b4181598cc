//! The `dispatcher` binary: `plan` prints a job's plan and moves no data; `run` runs one job
//! (on in-process workers over the embedded queue, or on the fleet over Pub/Sub), loads the
//! destination once, and prints the run report as the last line of stdout; `serve` pulls job
//! messages from Pub/Sub and reports to Django; `pubsub-setup` creates topics and
//! subscriptions.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use shardflow::django::DjangoClient;
use shardflow::messages::JobMessage;
use shardflow::plan::DEFAULT_SHARD_ROWS;
use shardflow::queue::embedded::EmbeddedOptions;
use shardflow::queue::pubsub::{PubSubOptions, PubSubQueue};
use shardflow::queue::{DeadLetterPolicy, SubscriptionConfig, Topology};
use shardflow::retry::RetryPolicy;
use shardflow::seal::SealKey;
use shardflow::spec::{JobConfig, JobSpec};
use shardflow::state::RunStatus;
use shardflow::telemetry::{self, LogFormat};
use shardflow::warehouse::parquet_dir::DEFAULT_VERSION_GRACE;
use shardflow_dispatcher::report::ReporterSettings;
use shardflow_dispatcher::serve::{ServeSettings, serve};
use shardflow_dispatcher::{
    DEFAULT_BATCH_ROWS, EngineSettings, PlanOptions, QueueChoice, RunOptions, RunReport, plan_job,
    run_job,
};

/// The environment `dispatcher serve` reads besides its flags' own variables.
const SERVE_ENV_HELP: &str = "Environment (besides each flag's own variable):
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
struct Cli {
    /// Log format: `text` for people, `json` for Cloud Logging (severity, message,
    /// data_source_id, etl_run_id). Logs go to stderr.
    #[arg(long, global = true, env = "SHARDFLOW_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log level (DEBUG, INFO, WARNING, ERROR) or a tracing filter directive.
    #[arg(long, global = true, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct PlanArgs {
    /// The job: the job-config JSON Django serves, or a job message
    /// `{"data_source_id": …, "etl_run_id": …, "config": {…}}`.
    #[arg(long)]
    job: PathBuf,
    /// Target rows per shard when the job is sharded.
    #[arg(long, default_value_t = DEFAULT_SHARD_ROWS)]
    shard_rows: u64,
    /// Count the rows exactly with COUNT(*) (scans the table) instead of estimating.
    #[arg(long)]
    exact_count: bool,
}

#[derive(Subcommand)]
enum Command {
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
struct GraceArgs {
    /// Seconds a replaced version of a directory destination's table stays readable by
    /// readers that resolved the table's link before the swap (removed by the first load of
    /// the table or sweep after that).
    #[arg(long, env = "SHARDFLOW_VERSION_GRACE_SECS", default_value_t = DEFAULT_VERSION_GRACE.as_secs())]
    version_grace_secs: u64,
}

impl GraceArgs {
    fn grace(&self) -> Duration {
        Duration::from_secs(self.version_grace_secs)
    }
}

/// Topic and subscription names.
#[derive(Args, Clone, Debug)]
struct TopologyArgs {
    #[arg(long, env = "SHARDFLOW_JOBS_TOPIC", default_value = "etl-jobs")]
    jobs_topic: String,
    #[arg(
        long,
        env = "SHARDFLOW_JOBS_SUBSCRIPTION",
        default_value = "etl-jobs-dispatcher"
    )]
    jobs_subscription: String,
    #[arg(long, env = "SHARDFLOW_SHARDS_TOPIC", default_value = "etl-shards")]
    shards_topic: String,
    #[arg(
        long,
        env = "SHARDFLOW_SHARDS_SUBSCRIPTION",
        default_value = "etl-shards-workers"
    )]
    shards_subscription: String,
    #[arg(
        long,
        env = "SHARDFLOW_RESULTS_TOPIC",
        default_value = "etl-shard-results"
    )]
    results_topic: String,
    #[arg(
        long,
        env = "SHARDFLOW_RESULTS_SUBSCRIPTION",
        default_value = "etl-shard-results-dispatcher"
    )]
    results_subscription: String,
    #[arg(
        long,
        env = "SHARDFLOW_DEAD_LETTER_TOPIC",
        default_value = "etl-shards-dead-letter"
    )]
    dead_letter_topic: String,
    #[arg(
        long,
        env = "SHARDFLOW_DEAD_LETTER_SUBSCRIPTION",
        default_value = "etl-shards-dead-letter-dispatcher"
    )]
    dead_letter_subscription: String,
}

impl TopologyArgs {
    fn topology(&self) -> Topology {
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
struct ServeArgs {
    /// Google Cloud project (Pub/Sub, and BigQuery unless --dest says otherwise).
    #[arg(long, env = "GCP_PROJECT_ID")]
    project: String,
    /// BigQuery dataset of the destination tables.
    #[arg(long, env = "BIGQUERY_DATASET", default_value = "raw_data")]
    dataset: String,
    /// Destination; defaults to `bigquery://<project>/<dataset>`. A directory is accepted
    /// for a single-machine setup.
    #[arg(long, env = "SHARDFLOW_DEST")]
    dest: Option<String>,
    /// Staging the workers write to: `gs://bucket/prefix`.
    #[arg(long, env = "SHARDFLOW_STAGING")]
    staging: String,
    /// State store: `postgres://…` for several dispatcher replicas, or `sqlite://FILE`.
    #[arg(
        long,
        env = "SHARDFLOW_STATE",
        default_value = "sqlite://./shardflow-state.db"
    )]
    state: String,
    /// Runs driven at once.
    #[arg(long, env = "SHARDFLOW_MAX_RUNS", default_value_t = 8)]
    max_runs: usize,
    /// Port of /metrics and /healthz.
    #[arg(long, env = "SHARDFLOW_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
    /// Address to serve /metrics and /healthz on.
    #[arg(long, env = "SHARDFLOW_METRICS_HOST", default_value = "0.0.0.0")]
    metrics_host: String,
    /// Target rows per shard.
    #[arg(long, env = "SHARDFLOW_SHARD_ROWS", default_value_t = DEFAULT_SHARD_ROWS)]
    shard_rows: u64,
    /// Rows per Arrow batch in the workers.
    #[arg(long, env = "ETL_BATCH_SIZE", default_value_t = DEFAULT_BATCH_ROWS)]
    batch_size: usize,
    /// Seconds between the heartbeats of a run's owner.
    #[arg(long, env = "SHARDFLOW_HEARTBEAT_SECS", default_value_t = 5)]
    heartbeat_secs: u64,
    /// Seconds of silence after which another dispatcher takes a run over.
    #[arg(long, env = "SHARDFLOW_STALE_AFTER_SECS", default_value_t = 30)]
    stale_after_secs: u64,
    /// Seconds to let runs finish after SIGTERM before leaving them to another dispatcher.
    #[arg(long, env = "SHARDFLOW_DRAIN_SECS", default_value_t = 60)]
    drain_secs: u64,
    /// Seconds before handing back a job that another live dispatcher is running.
    #[arg(long, env = "SHARDFLOW_BUSY_BACKOFF_SECS", default_value_t = 10)]
    busy_backoff_secs: u64,
    /// Seconds each lease extension of a job message lasts (10 to 600): a dispatcher that
    /// dies has its jobs redelivered to another within about this long.
    #[arg(long, env = "SHARDFLOW_LEASE_SECS", default_value_t = 60)]
    lease_secs: u64,
    /// Seconds between sweeps of what dead runs left (0: never; `dispatcher gc` still can).
    #[arg(long, env = "SHARDFLOW_GC_INTERVAL_SECS", default_value_t = 300)]
    gc_interval_secs: u64,
    /// Seconds a run's final status is resent to Django until it is accepted; then it is
    /// given up with a logged error (a 4xx answer gives it up at once).
    #[arg(long, env = "SHARDFLOW_REPORT_GIVE_UP_SECS", default_value_t = 86400)]
    report_give_up_secs: u64,
    #[command(flatten)]
    grace: GraceArgs,
    #[command(flatten)]
    topology: TopologyArgs,
}

#[derive(Args, Clone, Debug)]
struct SetupArgs {
    #[arg(long, env = "GCP_PROJECT_ID")]
    project: String,
    /// Deliveries of a shard before it goes to the dead-letter topic (5 to 100).
    #[arg(long, env = "SHARDFLOW_MAX_DELIVERY_ATTEMPTS", default_value_t = 5)]
    max_delivery_attempts: u32,
    /// Pub/Sub's wait before redelivering a failed shard grows from this...
    #[arg(long, env = "SHARDFLOW_RETRY_MIN_BACKOFF_SECS", default_value_t = 10)]
    retry_min_backoff_secs: u64,
    /// ...to this.
    #[arg(long, env = "SHARDFLOW_RETRY_MAX_BACKOFF_SECS", default_value_t = 600)]
    retry_max_backoff_secs: u64,
    /// Ack deadline of the shards subscription (workers extend it while they run).
    #[arg(long, env = "SHARDFLOW_ACK_DEADLINE_SECS", default_value_t = 60)]
    ack_deadline_secs: u64,
    /// Ack deadline of the jobs subscription (the dispatcher extends it while a run goes).
    #[arg(long, env = "SHARDFLOW_JOBS_ACK_DEADLINE_SECS", default_value_t = 600)]
    jobs_ack_deadline_secs: u64,
    #[command(flatten)]
    topology: TopologyArgs,
}

/// Creates whatever is missing; prints one line per resource.
async fn pubsub_setup(args: SetupArgs) -> shardflow::Result<()> {
    let queue = PubSubQueue::connect(PubSubOptions::from_env(&args.project)).await?;
    let t = args.topology.topology();
    for topic in [
        &t.jobs_topic,
        &t.shards_topic,
        &t.results_topic,
        &t.dead_letter_topic,
    ] {
        let created = queue.ensure_topic(topic).await?;
        println!(
            "topic {topic}: {}",
            if created { "created" } else { "exists" }
        );
    }
    let plain = |topic: &str, secs: u64| SubscriptionConfig {
        topic: topic.to_string(),
        ack_deadline: Duration::from_secs(secs),
        dead_letter: None,
    };
    let subscriptions = [
        (
            &t.jobs_subscription,
            plain(&t.jobs_topic, args.jobs_ack_deadline_secs),
        ),
        (
            &t.shards_subscription,
            SubscriptionConfig {
                topic: t.shards_topic.clone(),
                ack_deadline: Duration::from_secs(args.ack_deadline_secs),
                dead_letter: Some(DeadLetterPolicy {
                    retry_backoff: (
                        Duration::from_secs(args.retry_min_backoff_secs),
                        Duration::from_secs(
                            args.retry_max_backoff_secs.max(args.retry_min_backoff_secs),
                        ),
                    ),
                    ..DeadLetterPolicy::new(&t.dead_letter_topic, args.max_delivery_attempts)
                }),
            },
        ),
        (&t.results_subscription, plain(&t.results_topic, 60)),
        (&t.dead_letter_subscription, plain(&t.dead_letter_topic, 60)),
    ];
    for (name, config) in subscriptions {
        let created = queue.ensure_subscription(name, &config).await?;
        println!(
            "subscription {name}: {}",
            if created { "created" } else { "exists" }
        );
    }
    Ok(())
}

/// The job file, as a job config or as a job message with the config inline.
/// Also returns the config's JSON, for sealing when the run goes to the fleet.
fn read_job(path: &Path) -> Result<(JobSpec, Option<i64>, String), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read job file {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("invalid job config: not valid JSON: {e}"))?;
    // A job message (its config inline) is read as `serve` reads one; else a bare config.
    let message: JobMessage = if value.get("config").is_some() {
        serde_json::from_value(value).map_err(|e| format!("malformed job message: {e}"))?
    } else {
        JobMessage {
            config: Some(value),
            ..Default::default()
        }
    };
    let config_json = message
        .config
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_default();
    let config: JobConfig = match message.inline_config() {
        Some(config) => config.map_err(|e| e.to_string())?,
        None => return Err("invalid job config: no config".into()),
    };
    let spec = JobSpec::validate(config).map_err(|e| e.to_string())?;
    Ok((spec, message.etl_run_id, config_json))
}

/// Runs a file command on the job file and prints its JSON; errors go to stderr as
/// `{"status": "error", "message": …}` too, so a caller reading stdout sees them.
async fn file_command<F, Fut>(job: &Path, command: F) -> ExitCode
where
    F: FnOnce(JobSpec) -> Fut,
    Fut: std::future::Future<Output = shardflow::Result<serde_json::Value>>,
{
    let spec = match read_job(job) {
        Ok((spec, _, _)) => spec,
        Err(e) => {
            println!("{}", serde_json::json!({"status": "error", "message": e}));
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match command(spec).await {
        Ok(value) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"status": "error", "message": e.to_string()})
            );
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = if cli.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let progress_bar = matches!(
        &cli.command,
        Command::Run {
            no_progress: false,
            ..
        }
    ) && format == LogFormat::Text
        && std::io::stderr().is_terminal();
    // The bar says what info lines would; keep the terminal to the bar and to warnings.
    let level =
        if progress_bar && std::env::var_os("LOG_LEVEL").is_none() && cli.log_level == "info" {
            "warn".to_string()
        } else {
            cli.log_level.replace("WARNING", "warn")
        };
    telemetry::init(format, &level);
    let retry = match RetryPolicy::from_env() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Gc {
            dest,
            staging,
            state,
            stale_after_secs,
            grace,
        } => {
            let swept = shardflow_dispatcher::gc::collect(
                &dest,
                staging.as_deref(),
                &state,
                Duration::from_secs(stale_after_secs.max(2)),
                grace.grace(),
            )
            .await;
            match swept {
                Ok(report) => {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    if report.errors.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ListFiles { job } => {
            file_command(&job, |spec| async move {
                Ok(serde_json::to_value(
                    shardflow::source::files::plan::list_files(&spec).await?,
                )?)
            })
            .await
        }
        Command::DetectSchema { job } => {
            file_command(&job, |spec| async move {
                shardflow::source::files::plan::detect_schema(&spec).await
            })
            .await
        }
        Command::Plan(args) => {
            let (spec, _, _) = match read_job(&args.job) {
                Ok(j) => j,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = PlanOptions {
                shard_rows: args.shard_rows,
                workers: None,
                exact_count: args.exact_count,
                retry,
                // The plan a fleet run makes: its warehouse, BigQuery, loads GCS files itself
                // and renames the columns it cannot take (its location is not known here).
                warehouse_loads_gcs: true,
                column_names: shardflow::warehouse::bigquery::names::bigquery_column_names,
                ..Default::default()
            };
            match plan_job(&spec, &opts).await {
                Ok(plan) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&plan).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::PubsubSetup(args) => match pubsub_setup(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve(args) => {
            let django = match DjangoClient::from_env(retry.clone()) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if django.is_none() {
                tracing::warn!(
                    "DJANGO_API_URL is not set: only jobs with an inline config can run, and no run is reported"
                );
            }
            let metrics_addr = match format!("{}:{}", args.metrics_host, args.metrics_port).parse()
            {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("error: bad metrics address: {e}");
                    return ExitCode::from(2);
                }
            };
            let seal_key = match SealKey::from_env() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let settings = ServeSettings {
                dest: args
                    .dest
                    .clone()
                    .unwrap_or_else(|| format!("bigquery://{}/{}", args.project, args.dataset)),
                project: args.project.clone(),
                topology: args.topology.topology(),
                staging: args.staging.clone(),
                state_url: args.state.clone(),
                max_runs: args.max_runs,
                metrics_addr,
                engine: EngineSettings {
                    plan: PlanOptions {
                        shard_rows: args.shard_rows,
                        workers: None,
                        exact_count: false,
                        retry,
                        // The engine asks its warehouse.
                        warehouse_loads_gcs: false,
                        ..Default::default()
                    },
                    batch_rows: args.batch_size,
                    heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
                    stale_after: Duration::from_secs(args.stale_after_secs.max(2)),
                    seal_key,
                    ..Default::default()
                },
                drain: Duration::from_secs(args.drain_secs),
                busy_backoff: Duration::from_secs(args.busy_backoff_secs),
                lease: Duration::from_secs(args.lease_secs.clamp(10, 600)),
                gc_interval: Duration::from_secs(args.gc_interval_secs),
                version_grace: args.grace.grace(),
                reporting: ReporterSettings {
                    give_up_after: Duration::from_secs(args.report_give_up_secs),
                    ..ReporterSettings::default()
                },
                owner: format!(
                    "{}-{}",
                    std::env::var("HOSTNAME").unwrap_or_else(|_| "dispatcher".into()),
                    std::process::id()
                ),
            };
            match serve(
                settings,
                django,
                telemetry::shutdown_on_signal("no new jobs"),
            )
            .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "dispatcher stopped");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run {
            plan,
            workers,
            dest,
            staging,
            queue,
            project,
            topology,
            state,
            batch_size,
            etl_run_id,
            ack_deadline,
            max_delivery_attempts,
            no_progress: _,
            heartbeat_secs,
            stale_after_secs,
            grace,
            duplicate_deliveries,
        } => {
            let report = match read_job(&plan.job) {
                Err(e) => RunReport {
                    status: RunStatus::Failed,
                    etl_run_id,
                    error_message: Some(e),
                    ..Default::default()
                },
                Ok((spec, message_run_id, config_json)) => {
                    let opts = RunOptions {
                        plan: PlanOptions {
                            shard_rows: plan.shard_rows,
                            workers: Some(workers),
                            exact_count: plan.exact_count,
                            retry,
                            // The engine asks its warehouse.
                            warehouse_loads_gcs: false,
                            ..Default::default()
                        },
                        workers,
                        dest,
                        staging,
                        state_url: state,
                        batch_rows: batch_size,
                        etl_run_id: etl_run_id.or(message_run_id),
                        show_progress: progress_bar,
                        ack_deadline: std::time::Duration::from_secs(ack_deadline.max(1)),
                        max_delivery_attempts: max_delivery_attempts.max(1),
                        queue: if queue == "pubsub" {
                            QueueChoice::PubSub { project }
                        } else {
                            QueueChoice::Embedded(EmbeddedOptions {
                                duplicate_every_message: duplicate_deliveries,
                            })
                        },
                        topology: topology.topology(),
                        config_json: Some(config_json),
                        heartbeat: std::time::Duration::from_secs(heartbeat_secs.max(1)),
                        stale_after: std::time::Duration::from_secs(stale_after_secs.max(2)),
                        version_grace: grace.grace(),
                    };
                    run_job(spec, opts).await
                }
            };
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            if shardflow::fault::point(shardflow::fault::Step::ReportSent).is_err() {
                return ExitCode::FAILURE;
            }
            if report.status == RunStatus::Completed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
