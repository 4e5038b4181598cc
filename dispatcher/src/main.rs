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

mod cli;

use self::cli::*;

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
