//! The `worker` binary. `serve` pulls shards from Pub/Sub until SIGTERM (then stops pulling,
//! finishes the shards in hand, and exits); `run-shard` runs one shard message against a job
//! file and prints the result, the same code path the fleet's shard loop runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shardflow::django::DjangoClient;
use shardflow::messages::{self, ShardTask};
use shardflow::metrics::{self, Metrics};
use shardflow::queue::Topology;
use shardflow::queue::embedded::EmbeddedQueue;
use shardflow::queue::pubsub::{PubSubOptions, PubSubQueue};
use shardflow::retry::RetryPolicy;
use shardflow::seal::SealKey;
use shardflow::spec::JobSpec;
use shardflow::staging::Staging;
use shardflow::telemetry::{self, LogFormat};
use shardflow_worker::{
    DjangoJobResolver, NoDjangoResolver, RunRegistry, SealedConfigResolver, Worker, WorkerSettings,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "shardflow worker: extracts shards to Parquet"
)]
struct Cli {
    /// Log format: `text` for people, `json` for Cloud Logging.
    #[arg(long, global = true, env = "SHARDFLOW_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log level (DEBUG, INFO, WARNING, ERROR) or a tracing filter directive.
    #[arg(long, global = true, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

/// The environment `worker serve` reads besides its flags' own variables.
const WORKER_ENV_HELP: &str = "Environment (besides each flag's own variable):
  DJANGO_API_URL       Django's base URL, for shards whose config is named by data source
                       (not needed when every job's config is inline and sealed)
  ETL_API_TOKEN        the bearer token for Django (a warning when DJANGO_API_URL is set
                       without it)
  SHARDFLOW_SEAL_KEY   64 hex digits, the same as the dispatcher's: opens sealed inline configs
  PUBSUB_EMULATOR_HOST host:port of the Pub/Sub emulator instead of Google's service
  STORAGE_EMULATOR_HOST the GCS emulator's URL instead of Google's service
  ETL_MAX_RETRIES, ETL_RETRY_DELAY  retries of transient errors (default 3, from 5 s)";

#[derive(Subcommand)]
enum Command {
    /// Pull shards from Pub/Sub, extract them to Parquet in staging, publish each result, ack.
    /// A shard's job config travels sealed in it (an inline config) or is fetched from Django
    /// by data source. Every flag also reads the environment variable it names.
    #[command(after_help = WORKER_ENV_HELP)]
    Serve(ServeArgs),
    /// Extract one shard: read the shard message and job config from files, write the Parquet
    /// parts to a staging directory, print the shard result as JSON.
    RunShard {
        /// The job config JSON (as Django serves it) the shard belongs to.
        #[arg(long)]
        job: PathBuf,
        /// The shard message JSON (as the dispatcher publishes it).
        #[arg(long)]
        shard: PathBuf,
        /// Staging directory; parts go to `<dir>/<run_id>/<shard_id>/<extraction>/part-NNNNN.parquet`.
        #[arg(long, default_value = "./warehouse/_staging")]
        staging: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Google Cloud project of the Pub/Sub subscription and topics.
    #[arg(long, env = "GCP_PROJECT_ID")]
    project: String,
    #[arg(
        long,
        env = "SHARDFLOW_SHARDS_SUBSCRIPTION",
        default_value = "etl-shards-workers"
    )]
    subscription: String,
    #[arg(
        long,
        env = "SHARDFLOW_RESULTS_TOPIC",
        default_value = "etl-shard-results"
    )]
    results_topic: String,
    /// Where Parquet parts go: `gs://bucket/prefix` (or a directory shared with the
    /// dispatcher).
    #[arg(long, env = "SHARDFLOW_STAGING")]
    staging: String,
    /// Shards extracted at once (default: the number of cores).
    #[arg(long, env = "SHARDFLOW_MAX_OUTSTANDING")]
    max_outstanding: Option<usize>,
    /// Seconds each lease extension lasts: a worker that dies has its shards redelivered
    /// after at most this long (10 to 600).
    #[arg(long, env = "SHARDFLOW_LEASE_SECS", default_value_t = 60)]
    lease_secs: u64,
    /// Port of /metrics and /healthz.
    #[arg(long, env = "SHARDFLOW_METRICS_PORT", default_value_t = 9090)]
    metrics_port: u16,
    #[arg(long, env = "SHARDFLOW_METRICS_HOST", default_value = "0.0.0.0")]
    metrics_host: String,
    /// Seconds a job config fetched from Django is reused.
    #[arg(long, env = "SHARDFLOW_CONFIG_CACHE_SECS", default_value_t = 60)]
    config_cache_secs: u64,
}

async fn serve(args: ServeArgs) -> shardflow::Result<()> {
    let retry = RetryPolicy::from_env()?;
    // Django is needed only for shards whose config is named by data source; a sealed
    // config travels in the shard itself.
    let django = DjangoClient::from_env(retry.clone())?;
    if django.is_none() {
        tracing::info!(
            "DJANGO_API_URL is not set: this worker takes only shards that carry a sealed config"
        );
    }
    let metrics_registry = Arc::new(Metrics::new());
    let stop_http = CancellationToken::new();
    let addr = format!("{}:{}", args.metrics_host, args.metrics_port)
        .parse()
        .map_err(|e| shardflow::Error::Other(format!("bad metrics address: {e}")))?;
    let bound = metrics::serve(addr, metrics_registry.clone(), stop_http.clone()).await?;
    let lease = Duration::from_secs(args.lease_secs.clamp(10, 600));
    let mut options = PubSubOptions::from_env(&args.project);
    options.lease_extension = lease;
    let queue = PubSubQueue::connect(options).await?;
    let max_outstanding = args.max_outstanding.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let settings = WorkerSettings {
        worker_id: format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()),
            std::process::id()
        ),
        topology: Topology {
            shards_subscription: args.subscription,
            results_topic: args.results_topic,
            ..Topology::default()
        },
        max_outstanding,
        lease,
        retry,
        ..Default::default()
    };
    tracing::info!(%bound, max_outstanding, worker_id = %settings.worker_id, "worker serving");
    let worker = Worker::new(
        Arc::new(queue),
        Arc::new(SealedConfigResolver {
            key: SealKey::from_env()?,
            otherwise: match django {
                Some(django) => Arc::new(DjangoJobResolver::new(
                    django,
                    Duration::from_secs(args.config_cache_secs),
                )),
                None => Arc::new(NoDjangoResolver),
            },
        }),
        Staging::from_url(&args.staging)?,
        settings,
        Arc::new(AtomicU64::new(0)),
    )
    .with_metrics(metrics_registry);
    let shutdown = telemetry::shutdown_on_signal("no new shards");
    let outcome = worker.serve(shutdown).await;
    stop_http.cancel();
    tracing::info!("worker stopped");
    outcome
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = if cli.log_format == "json" {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    telemetry::init(format, &cli.log_level.replace("WARNING", "warn"));
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> shardflow::Result<()> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::RunShard {
            job,
            shard,
            staging,
        } => {
            let spec = JobSpec::from_json(&std::fs::read_to_string(&job)?)?;
            let task: ShardTask = messages::decode("shard message", &std::fs::read(&shard)?)?;
            let registry = Arc::new(RunRegistry::default());
            registry.register(&task.run_id, Arc::new(spec));
            let settings = WorkerSettings {
                retry: RetryPolicy::from_env()?,
                ..Default::default()
            };
            let worker = Worker::new(
                Arc::new(EmbeddedQueue::default()),
                registry,
                Staging::local(&staging)?,
                settings,
                Arc::new(AtomicU64::new(0)),
            );
            let extracted = worker.process(&task).await?;
            let out = serde_json::json!({
                "files": extracted.files,
                "checksum": extracted.digest.checksum,
                "max_value": extracted.digest.max_value,
                "schema": extracted.schema,
            });
            println!("{out}");
            Ok(())
        }
    }
}
