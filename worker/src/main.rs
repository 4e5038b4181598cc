//! The `worker` binary. `run-shard` runs one shard message against a job file and prints the
//! result, the same code path the fleet's shard loop runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use clap::{Parser, Subcommand};
use shardflow::messages::{self, ShardTask};
use shardflow::queue::embedded::EmbeddedQueue;
use shardflow::retry::RetryPolicy;
use shardflow::spec::JobSpec;
use shardflow::staging::Staging;
use shardflow::telemetry::{self, LogFormat};
use shardflow_worker::{RunRegistry, Worker, WorkerSettings};

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "shardflow worker: extracts shards to Parquet"
)]
struct Cli {
    /// Log format: `text` for people, `json` for Cloud Logging.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log level (DEBUG, INFO, WARNING, ERROR) or a tracing filter directive.
    #[arg(long, global = true, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Extract one shard: read the shard message and job config from files, write the Parquet
    /// parts to a staging directory, print the shard result as JSON.
    RunShard {
        /// The job config JSON (as Django serves it) the shard belongs to.
        #[arg(long)]
        job: PathBuf,
        /// The shard message JSON (as the dispatcher publishes it).
        #[arg(long)]
        shard: PathBuf,
        /// Staging directory; parts go to `<dir>/<run_id>/<shard_id>/part-NNNNN.parquet`.
        #[arg(long, default_value = "./warehouse/_staging")]
        staging: PathBuf,
    },
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
            let files = worker.process(&task).await?;
            println!("{}", serde_json::to_string(&files)?);
            Ok(())
        }
    }
}
