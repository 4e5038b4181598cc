//! The `dispatcher` binary: `plan` prints a job's plan and moves no data; `run` plans, runs the
//! shards on N in-process workers over the embedded queue, loads the destination once, and
//! prints the run report as the last line of stdout.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use shardflow::plan::DEFAULT_SHARD_ROWS;
use shardflow::queue::embedded::EmbeddedOptions;
use shardflow::retry::RetryPolicy;
use shardflow::spec::{JobConfig, JobSpec};
use shardflow::telemetry::{self, LogFormat};
use shardflow_dispatcher::{
    DEFAULT_BATCH_ROWS, PlanOptions, RunOptions, RunReport, plan_job, run_job,
};

#[derive(Parser)]
#[command(
    name = "dispatcher",
    version,
    about = "shardflow dispatcher: plans a table into equal-row shards, runs them on workers, loads the result once"
)]
struct Cli {
    /// Log format: `text` for people, `json` for Cloud Logging (severity, message,
    /// data_source_id, etl_run_id). Logs go to stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
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
        /// Destination directory: the table is the Parquet files under `<dest>/<dest_table_name>/`.
        #[arg(long, default_value = "./warehouse")]
        dest: PathBuf,
        /// Staging directory for the workers' Parquet parts (removed after the run).
        /// Defaults to `<dest>/_staging`.
        #[arg(long)]
        staging: Option<PathBuf>,
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
        /// Fault injection for testing: the embedded queue delivers every message twice, as
        /// Pub/Sub may. The result must not change.
        #[arg(long, env = "SHARDFLOW_DUPLICATE_DELIVERIES")]
        duplicate_deliveries: bool,
    },
}

/// The job file, as a job config or as a job message with the config inline.
fn read_job(path: &Path) -> Result<(JobSpec, Option<i64>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read job file {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("invalid job config: not valid JSON: {e}"))?;
    let (config_value, etl_run_id, data_source_id) = match value.get("config") {
        Some(config) => (
            config.clone(),
            value.get("etl_run_id").and_then(serde_json::Value::as_i64),
            value
                .get("data_source_id")
                .and_then(serde_json::Value::as_i64),
        ),
        None => (value, None, None),
    };
    let mut config: JobConfig = serde_json::from_value(config_value)
        .map_err(|e| format!("invalid job config: not a job config: {e}"))?;
    if config.data_source_id.is_none() {
        config.data_source_id = data_source_id;
    }
    let spec = JobSpec::validate(config).map_err(|e| e.to_string())?;
    Ok((spec, etl_run_id))
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
        Command::Plan(args) => {
            let (spec, _) = match read_job(&args.job) {
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
        Command::Run {
            plan,
            workers,
            dest,
            staging,
            state,
            batch_size,
            etl_run_id,
            ack_deadline,
            max_delivery_attempts,
            no_progress: _,
            duplicate_deliveries,
        } => {
            let report = match read_job(&plan.job) {
                Err(e) => RunReport {
                    status: "failed".into(),
                    etl_run_id,
                    error_message: Some(e),
                    ..Default::default()
                },
                Ok((spec, message_run_id)) => {
                    let opts = RunOptions {
                        plan: PlanOptions {
                            shard_rows: plan.shard_rows,
                            workers: Some(workers),
                            exact_count: plan.exact_count,
                            retry,
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
                        queue: EmbeddedOptions {
                            duplicate_every_message: duplicate_deliveries,
                        },
                    };
                    run_job(spec, opts).await
                }
            };
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            if report.status == "completed" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
