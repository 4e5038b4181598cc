//! The shard loop: receive a shard, keep its lease alive, extract it to Arrow, write Parquet
//! parts to staging, publish the result, then ack (or nack on failure so it is retried and,
//! after the subscription's attempts, dead-lettered). The dispatcher runs this same code
//! in-process for `dispatcher run`; the `worker` binary runs it on its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shardflow::digest::{ContentDigest, Digest};
use shardflow::django::DjangoClient;
use shardflow::messages::{self, ShardOutcome, ShardResult, ShardTask, StagedFile, WIRE_VERSION};
use shardflow::metrics::Metrics;
use shardflow::parquet_sink::{PartOptions, write_parts};
use shardflow::queue::{Delivery, Message, Queue, Topology};
use shardflow::retry::RetryPolicy;
use shardflow::seal::{SEAL_KEY_ENV, SealKey};
use shardflow::source::Extraction;
use shardflow::spec::JobSpec;
use shardflow::staging::Staging;
use shardflow::{Error, Result};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Finds the job config for a shard (connection details never travel in shard messages).
#[async_trait]
pub trait JobResolver: Send + Sync {
    async fn job_for(&self, task: &ShardTask) -> Result<Arc<JobSpec>>;
}

/// The in-process resolver: the dispatcher registers each run's spec here, or one spec for
/// every run (a `dispatcher run` process runs one job).
#[derive(Default)]
pub struct RunRegistry {
    runs: Mutex<HashMap<String, Arc<JobSpec>>>,
}

/// The registry key that stands for any run.
const ANY_RUN: &str = "*";

impl RunRegistry {
    pub fn register(&self, run_id: &str, spec: Arc<JobSpec>) {
        self.lock().insert(run_id.to_string(), spec);
    }

    pub fn register_any(&self, spec: Arc<JobSpec>) {
        self.register(ANY_RUN, spec);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<JobSpec>>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl JobResolver for RunRegistry {
    async fn job_for(&self, task: &ShardTask) -> Result<Arc<JobSpec>> {
        let runs = self.lock();
        runs.get(&task.run_id)
            .or_else(|| runs.get(ANY_RUN))
            .cloned()
            .ok_or_else(|| {
                Error::Message(format!("run {} is not known to this worker", task.run_id))
            })
    }
}

/// The fleet's resolver: the job config from Django by data source, cached briefly so a
/// run's shards do not each ask.
pub struct DjangoJobResolver {
    django: DjangoClient,
    ttl: Duration,
    cache: tokio::sync::Mutex<HashMap<i64, (Instant, Arc<JobSpec>)>>,
}

impl DjangoJobResolver {
    pub fn new(django: DjangoClient, ttl: Duration) -> Self {
        DjangoJobResolver {
            django,
            ttl,
            cache: tokio::sync::Mutex::default(),
        }
    }
}

#[async_trait]
impl JobResolver for DjangoJobResolver {
    async fn job_for(&self, task: &ShardTask) -> Result<Arc<JobSpec>> {
        let Some(id) = task.data_source_id else {
            return Err(Error::Message(format!(
                "shard {} of run {} names no data_source_id, so its job config cannot be fetched",
                task.shard_id, task.run_id
            )));
        };
        let mut cache = self.cache.lock().await;
        if let Some((at, spec)) = cache.get(&id)
            && at.elapsed() < self.ttl
        {
            return Ok(spec.clone());
        }
        let spec = Arc::new(JobSpec::validate(self.django.job_config(id).await?)?);
        cache.insert(id, (Instant::now(), spec.clone()));
        Ok(spec)
    }
}

/// A worker started without `DJANGO_API_URL`: a shard whose config must be fetched from
/// Django fails at once, saying what to set (retrying would not make the variable appear).
pub struct NoDjangoResolver;

#[async_trait]
impl JobResolver for NoDjangoResolver {
    async fn job_for(&self, task: &ShardTask) -> Result<Arc<JobSpec>> {
        Err(Error::Message(format!(
            "shard {} of run {} carries no sealed config, and this worker has no DJANGO_API_URL \
             to fetch data source {}'s config from: set DJANGO_API_URL on the workers, or \
             SHARDFLOW_SEAL_KEY on the dispatcher and the workers for inline configs",
            task.shard_id,
            task.run_id,
            task.data_source_id
                .map_or_else(|| "(none)".to_string(), |id| id.to_string())
        )))
    }
}

/// A shard's staged parts and what the worker says of their rows.
#[derive(Debug)]
pub struct Extracted {
    pub files: Vec<StagedFile>,
    pub digest: Digest,
    pub schema: arrow_schema::Schema,
    /// File shards: rows read from each source file.
    pub source_rows: Vec<u64>,
}

/// A shard that carries its run's sealed config is opened with the shared key; any other
/// goes to `otherwise`.
pub struct SealedConfigResolver {
    pub key: Option<SealKey>,
    pub otherwise: Arc<dyn JobResolver>,
}

#[async_trait]
impl JobResolver for SealedConfigResolver {
    async fn job_for(&self, task: &ShardTask) -> Result<Arc<JobSpec>> {
        let Some(sealed) = &task.sealed_config else {
            return self.otherwise.job_for(task).await;
        };
        let Some(key) = &self.key else {
            return Err(Error::Message(format!(
                "shard {} of run {} carries a sealed job config and this worker has no {SEAL_KEY_ENV}",
                task.shard_id, task.run_id
            )));
        };
        let json = key.open(sealed, &task.run_id)?;
        let text = String::from_utf8(json)
            .map_err(|_| Error::Message("the sealed job config is not UTF-8".into()))?;
        Ok(Arc::new(JobSpec::from_json(&text)?))
    }
}

#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub worker_id: String,
    pub topology: Topology,
    /// Shards this worker runs at once.
    pub max_outstanding: usize,
    /// How long each lease extension lasts; extended every third of it.
    pub lease: Duration,
    /// Arrow batches between the decoder and the Parquet writer.
    pub in_flight_batches: usize,
    pub parts: PartOptions,
    pub retry: RetryPolicy,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            worker_id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            topology: Topology::default(),
            max_outstanding: 1,
            lease: Duration::from_secs(60),
            in_flight_batches: 2,
            parts: PartOptions::default(),
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Clone)]
pub struct Worker {
    queue: Arc<dyn Queue>,
    jobs: Arc<dyn JobResolver>,
    staging: Staging,
    settings: Arc<WorkerSettings>,
    /// Rows extracted so far, for progress display.
    rows: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

impl Worker {
    pub fn new(
        queue: Arc<dyn Queue>,
        jobs: Arc<dyn JobResolver>,
        staging: Staging,
        settings: WorkerSettings,
        rows: Arc<AtomicU64>,
    ) -> Self {
        Worker {
            queue,
            jobs,
            staging,
            settings: Arc::new(settings),
            rows,
            metrics: Arc::new(Metrics::new()),
        }
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Pulls and runs shards until `shutdown`; then stops pulling and lets in-flight shards
    /// finish (their results are published and acked as usual).
    pub async fn serve(&self, shutdown: CancellationToken) -> Result<()> {
        let s = &self.settings;
        let mut subscription = self
            .queue
            .subscribe(&s.topology.shards_subscription, s.max_outstanding)
            .await?;
        let mut running = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                delivery = subscription.next() => {
                    let delivery = match delivery {
                        Ok(d) => d,
                        Err(e) => {
                            // Let the shards in hand finish before reporting the broken queue.
                            while running.join_next().await.is_some() {}
                            return Err(e);
                        }
                    };
                    let worker = self.clone();
                    running.spawn(async move { worker.handle(delivery).await });
                }
                Some(done) = running.join_next(), if !running.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "a shard task panicked; its lease will run out and it will be redelivered");
                    }
                }
            }
        }
        // Stop pulling; the shards in hand finish, publish and ack as usual.
        subscription.close();
        if !running.is_empty() {
            tracing::info!(shards = running.len(), "draining in-flight shards");
        }
        while running.join_next().await.is_some() {}
        Ok(())
    }

    /// Runs one delivery to the end: result published, then acked or nacked.
    async fn handle(&self, delivery: Delivery) {
        let task: ShardTask = match messages::decode("shard message", &delivery.message.data) {
            Ok(t) => t,
            Err(e) => {
                // It will never decode; nacking sends it to the dead-letter topic in the end.
                tracing::error!(error = %e, message_id = %delivery.message_id, "undecodable shard message");
                let _ = delivery.nack().await;
                return;
            }
        };
        let span = tracing::info_span!(
            "shard",
            run_id = %task.run_id,
            shard_id = %task.shard_id,
            data_source_id = task.data_source_id,
            etl_run_id = task.etl_run_id,
            attempt = delivery.delivery_attempt,
        );
        async {
            let started = Instant::now();
            self.metrics.shards_in_flight.inc();
            let work = self.process(&task);
            tokio::pin!(work);
            let mut keep_alive = tokio::time::interval(self.settings.lease / 3);
            keep_alive.tick().await;
            let outcome = loop {
                tokio::select! {
                    outcome = &mut work => break outcome,
                    _ = keep_alive.tick() => {
                        if let Err(e) = delivery.extend(self.settings.lease).await {
                            tracing::warn!(error = %e, "could not extend the lease");
                        }
                    }
                }
            };
            self.metrics.shards_in_flight.dec();
            let outcome = match outcome {
                Ok(Extracted {
                    files,
                    digest,
                    schema,
                    source_rows,
                }) => {
                    let rows = files.iter().map(|f| f.rows).sum();
                    let bytes = files.iter().map(|f| f.bytes).sum();
                    let seconds = started.elapsed().as_secs_f64();
                    tracing::info!(rows, bytes, seconds, "shard extracted");
                    self.metrics.rows.inc_by(rows);
                    self.metrics.bytes.inc_by(bytes);
                    self.metrics.shard_seconds.observe(seconds);
                    ShardOutcome::Succeeded {
                        rows,
                        bytes,
                        files,
                        seconds,
                        checksum: digest.checksum,
                        schema,
                        max_value: digest.max_value,
                        source_rows,
                    }
                }
                Err(e) => {
                    self.metrics.shard_failures.inc();
                    let permanent = e.is_deterministic();
                    tracing::warn!(error = %e, permanent, "shard failed");
                    ShardOutcome::Failed {
                        error: e.to_string(),
                        permanent,
                    }
                }
            };
            // A permanent failure is settled like a success: redelivering it repeats it.
            let settles = matches!(
                outcome,
                ShardOutcome::Succeeded { .. }
                    | ShardOutcome::Failed {
                        permanent: true,
                        ..
                    }
            );
            let result = ShardResult {
                version: WIRE_VERSION,
                run_id: task.run_id.clone(),
                shard_id: task.shard_id.clone(),
                delivery_attempt: delivery.delivery_attempt,
                worker_id: self.settings.worker_id.clone(),
                outcome,
            };
            let published = match messages::encode(&result) {
                Ok(body) => self
                    .queue
                    .publish(
                        &self.settings.topology.results_topic,
                        Message::new(body).with_attribute("run_id", &task.run_id),
                    )
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            let published = published
                .and_then(|()| shardflow::fault::point(shardflow::fault::Step::ResultPublished));
            // Ack only once the result is safely published; otherwise let it run again.
            let settled = match (published, settles) {
                (Ok(()), true) => delivery.ack().await,
                (Ok(()), false) => delivery.nack().await,
                (Err(e), _) => {
                    tracing::error!(error = %e, "could not publish the shard result; nacking");
                    delivery.nack().await
                }
            };
            if let Err(e) = settled {
                tracing::warn!(error = %e, "could not settle the delivery; it will be redelivered");
            }
        }
        .instrument(span)
        .await
    }

    /// Extracts one shard to staged Parquet parts.
    pub async fn process(&self, task: &ShardTask) -> Result<Extracted> {
        let job = self.jobs.job_for(task).await?;
        let Extraction {
            batches: stream,
            file_rows,
        } = shardflow::source::open(&job)
            .extract(
                &job,
                task,
                self.settings.retry.clone(),
                self.settings.in_flight_batches,
            )
            .await?;
        // The parts carry the destination's column names; the digest reads the same columns.
        let schema = shardflow::source::staged_schema(
            job.source_type,
            &task.columns,
            &task.destination_names,
        );
        let extracted = shardflow::source::arrow_schema(job.source_type, &task.columns);
        let mut digest = ContentDigest::new(&extracted, task.timestamp_column.as_deref())?;
        let rows = self.rows.clone();
        let mut batches_seen = 0u32;
        // Beside, never over, the parts of any other extraction of this shard.
        let prefix = messages::extraction_prefix(
            &task.run_id,
            &task.shard_id,
            &messages::new_extraction_id(),
        );
        let files = write_parts(
            self.staging.store(),
            &prefix,
            schema.clone(),
            shardflow::source::renamed(stream, schema.clone()),
            &self.settings.parts,
            |batch| {
                // The first batch is in the part; the rest of the shard is not.
                batches_seen += 1;
                if batches_seen == 2 {
                    shardflow::fault::point(shardflow::fault::Step::ShardHalfWritten)?;
                }
                rows.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
                digest.update(batch)
            },
        )
        .await?;
        let source_rows = file_rows
            .map(|counts| counts.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default();
        Ok(Extracted {
            files,
            digest: digest.finish()?,
            schema: schema.as_ref().clone(),
            source_rows,
        })
    }
}
