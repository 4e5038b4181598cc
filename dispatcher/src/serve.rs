//! `dispatcher serve`: pulls job messages as Django and Cloud Scheduler publish them, runs
//! several jobs at once on the fleet, and reports each run to Django.
//!
//! A job message is acked only when its run has ended (the Pub/Sub client keeps its lease
//! alive meanwhile), so a dispatcher that dies leaves its jobs to be redelivered, and the
//! next dispatcher takes them over from the state store. A duplicate of a job that is still
//! running elsewhere is handed back after a pause until that run ends; a duplicate of an
//! ended job is acked without running it again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use shardflow::django::{DjangoClient, RunUpdate};
use shardflow::messages::{JobMessage, JobOrigin};
use shardflow::metrics::{self, Metrics};
use shardflow::queue::pubsub::{PubSubOptions, PubSubQueue};
use shardflow::queue::{Delivery, Queue, Topology};
use shardflow::spec::{JobConfig, JobSpec};
use shardflow::staging::Staging;
use shardflow::state::RunStatus;
use shardflow::state::sql::SqlStateStore;
use shardflow::{Error, Result};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::{Engine, EngineSettings, RunEvents, RunJob, RunObserver, RunOutcome};
use crate::report::{Reporter, ReporterSettings};
use crate::{RunReport, open_warehouse};

#[derive(Clone, Debug)]
pub struct ServeSettings {
    pub project: String,
    pub topology: Topology,
    /// `bigquery://PROJECT/DATASET` or a directory.
    pub dest: String,
    /// `gs://bucket/prefix` (or a directory shared with the workers).
    pub staging: String,
    pub state_url: String,
    /// Runs driven at once.
    pub max_runs: usize,
    pub metrics_addr: SocketAddr,
    pub engine: EngineSettings,
    /// How long a dispatcher that was told to stop waits for its runs before leaving them to
    /// be taken over.
    pub drain: Duration,
    /// Pause before handing back a job that another live dispatcher is running.
    pub busy_backoff: Duration,
    /// Each lease extension of a job message: how soon a dead dispatcher's job comes back.
    pub lease: Duration,
    pub owner: String,
    /// How often to sweep what dead runs left (zero: never).
    pub gc_interval: Duration,
    /// How long a replaced version of a directory destination's table stays readable.
    pub version_grace: Duration,
    /// How run statuses reach Django (off the runs' path).
    pub reporting: ReporterSettings,
}

/// What to do with a job message after handling it.
enum Settle {
    Ack,
    /// Hand it back: it will be redelivered (after the pause for a busy job).
    Retry {
        pause: Duration,
    },
}

pub async fn serve(
    settings: ServeSettings,
    django: Option<DjangoClient>,
    shutdown: CancellationToken,
) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let stop_http = CancellationToken::new();
    let bound = metrics::serve(settings.metrics_addr, metrics.clone(), stop_http.clone()).await?;
    tracing::info!(%bound, "serving /metrics and /healthz");

    let mut options = PubSubOptions::from_env(&settings.project);
    options.lease_extension = settings.lease;
    let queue = PubSubQueue::connect(options).await?;
    let engine = Arc::new(Engine {
        queue: Arc::new(queue.clone()),
        state: Arc::new(SqlStateStore::open(&settings.state_url).await?),
        staging: Staging::from_url(&settings.staging)?,
        warehouse: open_warehouse(&settings.dest, settings.version_grace).await?,
        topology: settings.topology.clone(),
        owner: settings.owner.clone(),
        events: Arc::new(RunEvents::default()),
        metrics,
        settings: settings.engine.clone(),
    });
    let consumers_stop = CancellationToken::new();
    let mut consumers = tokio::task::JoinSet::new();
    consumers.spawn(engine.clone().record_results(consumers_stop.clone()));
    consumers.spawn(engine.clone().record_dead_letters(consumers_stop.clone()));
    if !settings.gc_interval.is_zero() {
        let (engine, stop, every) = (engine.clone(), consumers_stop.clone(), settings.gc_interval);
        consumers.spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = ticks.tick() => { engine.sweep().await; }
                }
            }
        });
    }

    let reporter = django
        .clone()
        .map(|d| Reporter::new(d, engine.state.clone(), settings.reporting.clone()));
    if let Some(reporter) = &reporter {
        let (reporter, stop) = (reporter.clone(), consumers_stop.clone());
        consumers.spawn(async move {
            reporter.serve(stop, Duration::from_secs(10)).await;
            Ok(())
        });
    }

    let mut jobs = queue
        .subscribe(
            &settings.topology.jobs_subscription,
            settings.max_runs.max(1),
        )
        .await?;
    let django = django.map(Arc::new);
    let mut running = tokio::task::JoinSet::new();
    tracing::info!(
        subscription = %settings.topology.jobs_subscription,
        max_runs = settings.max_runs,
        "dispatcher serving"
    );
    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            delivery = jobs.next() => {
                let delivery = match delivery {
                    Ok(d) => d,
                    Err(e) => break Err(e),
                };
                let (engine, pause) = (engine.clone(), settings.busy_backoff);
                let django = Django { config: django.clone(), reporter: reporter.clone() };
                running.spawn(async move {
                    let settle = handle_job(&engine, &django, &delivery, pause).await;
                    let settled = match settle {
                        Settle::Ack => delivery.ack().await,
                        Settle::Retry { pause } => {
                            tokio::time::sleep(pause).await;
                            delivery.nack().await
                        }
                    };
                    if let Err(e) = settled {
                        tracing::warn!(error = %e, "could not settle a job message");
                    }
                });
            }
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a job task panicked; its message will be redelivered");
                }
            }
            Some(done) = consumers.join_next() => {
                let why = match done {
                    Ok(Ok(())) => "stopped".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                break Err(Error::Other(format!("a result consumer stopped: {why}")));
            }
        }
    };
    jobs.close();
    if !running.is_empty() {
        tracing::info!(
            runs = running.len(),
            seconds = settings.drain.as_secs(),
            "draining runs"
        );
        let drained = tokio::time::timeout(settings.drain, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("runs still going; their jobs will be taken over by another dispatcher");
            running.abort_all();
        }
    }
    consumers_stop.cancel();
    while consumers.join_next().await.is_some() {}
    stop_http.cancel();
    outcome
}

/// Django as a job sees it: where its config comes from, and where its statuses go.
struct Django {
    config: Option<Arc<DjangoClient>>,
    reporter: Option<Arc<Reporter>>,
}

async fn handle_job(
    engine: &Engine,
    django: &Django,
    delivery: &Delivery,
    busy_pause: Duration,
) -> Settle {
    let message: JobMessage = match serde_json::from_slice(&delivery.message.data) {
        Ok(m) => m,
        Err(e) => {
            // It will never parse; say so once and drop it.
            let etl_run_id = serde_json::from_slice::<serde_json::Value>(&delivery.message.data)
                .ok()
                .and_then(|v| v.get("etl_run_id").and_then(serde_json::Value::as_i64));
            let why = format!("malformed job message: {e}");
            tracing::error!(message_id = %delivery.message_id, "{why}");
            report_failure(django, etl_run_id, &why).await;
            return Settle::Ack;
        }
    };
    let key = message.job_key(JobOrigin::Message {
        id: &delivery.message_id,
    });
    let span = tracing::info_span!(
        "job",
        job_key = %key,
        data_source_id = message.data_source_id,
        etl_run_id = message.etl_run_id
    );
    run_message(engine, django, message, key, busy_pause)
        .instrument(span)
        .await
}

/// Resolves, runs and reports one parsed job message.
async fn run_message(
    engine: &Engine,
    django: &Django,
    message: JobMessage,
    key: String,
    busy_pause: Duration,
) -> Settle {
    let spec = match resolve(django.config.as_deref(), &message).await {
        Ok(spec) => spec,
        Err(e) if e.is_transient() => {
            tracing::warn!(job_key = %key, error = %e, "job config unavailable; will retry");
            return Settle::Retry { pause: busy_pause };
        }
        Err(e) => {
            tracing::error!(job_key = %key, error = %e, "job refused");
            report_failure(django, message.etl_run_id, &e.to_string()).await;
            return Settle::Ack;
        }
    };
    let job = RunJob {
        job_key: key.clone(),
        spec: Arc::new(spec),
        etl_run_id: message.etl_run_id,
        own_config: message.config.as_ref().map(|c| Arc::new(c.to_string())),
    };
    let observer = DjangoObserver {
        reporter: django.reporter.as_ref(),
        etl_run_id: message.etl_run_id,
    };
    match engine.run(&job, &observer).await {
        Ok(RunOutcome::Finished(report)) => {
            if let Err(e) = report_final(django, &report).await {
                // The job message comes back, finds the run ended and records it then.
                tracing::warn!(job_key = %key, error = %e, "could not record the final status for Django; job message handed back");
                return Settle::Retry { pause: busy_pause };
            }
            if let Err(e) = shardflow::fault::point(shardflow::fault::Step::ReportSent) {
                tracing::warn!(job_key = %key, error = %e, "job message handed back");
                return Settle::Retry { pause: busy_pause };
            }
            Settle::Ack
        }
        Ok(RunOutcome::AlreadyFinished(report)) => {
            tracing::info!(job_key = %key, run_id = %report.run_id, status = report.status.as_str(), "duplicate job message: the job already ran");
            // Its dispatcher may have died between recording the end and telling Django: the
            // ended status again, with what the state store knows of it, leaves no run hanging.
            match report_ended_again(django, &report).await {
                Ok(()) => Settle::Ack,
                Err(e) => {
                    tracing::warn!(job_key = %key, error = %e, "could not record the final status for Django; job message handed back");
                    Settle::Retry { pause: busy_pause }
                }
            }
        }
        Ok(RunOutcome::OwnedElsewhere { run_id, owner }) => {
            tracing::info!(job_key = %key, %run_id, %owner, "job is running on another dispatcher");
            Settle::Retry { pause: busy_pause }
        }
        Err(e) => {
            tracing::warn!(job_key = %key, error = %e, "job could not be driven; will retry");
            Settle::Retry { pause: busy_pause }
        }
    }
}

/// The validated spec: the inline config, or Django's for the data source.
async fn resolve(django: Option<&DjangoClient>, message: &JobMessage) -> Result<JobSpec> {
    let mut config: JobConfig = match (message.inline_config(), message.data_source_id) {
        (Some(inline), _) => inline?,
        (None, Some(id)) => match django {
            Some(d) => d.job_config(id).await?,
            None => {
                return Err(Error::Other(format!(
                    "job for data source {id} has no inline config and DJANGO_API_URL is not set"
                )));
            }
        },
        (None, None) => {
            return Err(Error::Other(
                "job message has neither data_source_id nor config".into(),
            ));
        }
    };
    // Workers fetch the config by the id the message named, so the shards must carry it.
    if message.data_source_id.is_some() {
        config.data_source_id = message.data_source_id;
    }
    Ok(JobSpec::validate(config)?)
}

async fn report_failure(django: &Django, etl_run_id: Option<i64>, why: &str) {
    let update = RunUpdate {
        status: RunStatus::Failed,
        error_message: Some(why.to_string()),
        rows_extracted: Some(0),
        rows_loaded: Some(0),
        ..Default::default()
    };
    if let Err(e) = record_final(django, etl_run_id, &update).await {
        tracing::error!(error = %e, etl_run_id, "could not record the refusal for Django");
    }
}

/// Records a final status for the reporter to send; nothing without Django or a Django run.
async fn record_final(django: &Django, etl_run_id: Option<i64>, update: &RunUpdate) -> Result<()> {
    let (Some(reporter), Some(id)) = (&django.reporter, etl_run_id) else {
        return Ok(());
    };
    if !reporter.record_final(id, update).await? {
        tracing::info!(
            etl_run_id = id,
            "a final status of this Django run was recorded already; it stands"
        );
    }
    Ok(())
}

async fn report_final(django: &Django, report: &RunReport) -> Result<()> {
    let update = RunUpdate {
        status: report.status,
        rows_extracted: Some(report.rows_extracted),
        rows_loaded: Some(report.rows_loaded),
        duration_seconds: Some(report.duration_seconds),
        error_message: report.error_message.clone(),
        watermark: report.watermark.clone(),
        files_loaded: report.files_loaded,
        warnings: report.warnings.clone(),
        ..Default::default()
    };
    record_final(django, report.etl_run_id, &update).await
}

/// An ended run's status once more, from the state store, for a dispatcher that died between
/// recording the run's end and recording its report: only the fields the store records (the
/// duration is not). A report recorded already stands.
async fn report_ended_again(django: &Django, report: &RunReport) -> Result<()> {
    let update = RunUpdate {
        status: report.status,
        rows_extracted: Some(report.rows_extracted),
        rows_loaded: Some(report.rows_loaded),
        error_message: report.error_message.clone(),
        ..Default::default()
    };
    record_final(django, report.etl_run_id, &update).await
}

/// Queues `running`, then progress as shards finish, for the reporter (never waits on it).
struct DjangoObserver<'a> {
    reporter: Option<&'a Arc<Reporter>>,
    etl_run_id: Option<i64>,
}

impl DjangoObserver<'_> {
    async fn send(&self, update: RunUpdate) {
        if let (Some(reporter), Some(id)) = (self.reporter, self.etl_run_id) {
            reporter.progress(id, update);
        }
    }
}

#[async_trait]
impl RunObserver for DjangoObserver<'_> {
    async fn planned(&self, _run_id: &str, _estimated_rows: u64, shards: usize) {
        self.send(RunUpdate {
            status: RunStatus::Running,
            shards_completed: Some(0),
            shards_total: Some(shards),
            ..Default::default()
        })
        .await;
    }

    async fn shard_done(&self, done: usize, total: usize, rows_so_far: u64) {
        self.send(RunUpdate {
            status: RunStatus::Running,
            rows_extracted: Some(rows_so_far),
            shards_completed: Some(done),
            shards_total: Some(total),
            ..Default::default()
        })
        .await;
    }
}
