//! The fleet end to end: `dispatcher serve` and `worker serve` processes on Google's Pub/Sub
//! emulator, staging in the GCS emulator's bucket, bqemulator as the warehouse, PostgreSQL as
//! source and state store, and a stub of the Django API that records every call. Each test
//! has its own topics, bucket, dataset and state database, so they run side by side.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env_or_fail, fresh_schema, job_json, pg};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use serde_json::{Value, json};
use shardflow::queue::pubsub::{PubSubOptions, PubSubQueue};
use shardflow::queue::{Message, Queue};
use shardflow::retry::RetryPolicy;
use shardflow::state::RunStatus;
use shardflow_dispatcher::{PlanOptions, RunOptions, RunReport, run_job};

const PROJECT: &str = common::BIGQUERY_PROJECT;

fn bin(name: &str) -> std::path::PathBuf {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/debug/{name}"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first",
        path.display()
    );
    path
}

/// The Django API stub: serves job configs by data source, records every request.
#[derive(Clone, Default)]
struct Django {
    configs: Arc<Mutex<HashMap<i64, Value>>>,
    calls: Arc<Mutex<Vec<(String, String, Value)>>>,
    /// While set, every PATCH is answered 503 (and not counted as heard).
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Django {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let me = me.clone();
                            async move { Ok::<_, Infallible>(me.handle(req).await) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let authorized = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some("Bearer test-token");
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if method == "PATCH" && self.down.load(std::sync::atomic::Ordering::SeqCst) {
            let mut r = Response::new(Full::new(Bytes::from("Django is down for this test")));
            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
            return r;
        }
        self.calls
            .lock()
            .unwrap()
            .push((method.clone(), path.clone(), body));
        let respond = |status: u16, body: Value| {
            let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
            r
        };
        if !authorized {
            return respond(401, json!({"detail": "bad token"}));
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["api", "etl", "job-config", id]) => {
                let id: i64 = id.parse().unwrap_or(-1);
                match self.configs.lock().unwrap().get(&id) {
                    Some(c) => respond(200, c.clone()),
                    None => respond(404, json!({"detail": "Not found."})),
                }
            }
            ("PATCH", ["api", "etl", "runs", _, "update"]) => respond(200, json!({"ok": true})),
            _ => respond(404, json!({"detail": "no route"})),
        }
    }

    /// The PATCH bodies Django received for a run, in order.
    fn patches(&self, etl_run_id: i64) -> Vec<Value> {
        let path = format!("/api/etl/runs/{etl_run_id}/update/");
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p, _)| m == "PATCH" && *p == path)
            .map(|(_, _, b)| b.clone())
            .collect()
    }

    /// Waits for the final status of a run: the run as Django holds it once a PATCH said
    /// `completed` or `failed`, every PATCH applied in order (a PATCH is a partial update:
    /// the fields it omits keep their values).
    async fn final_status(&self, etl_run_id: i64, within: Duration) -> Value {
        let start = Instant::now();
        loop {
            let patches = self.patches(etl_run_id);
            if patches
                .iter()
                .any(|b| b["status"] == "completed" || b["status"] == "failed")
            {
                let mut run = serde_json::Map::new();
                for patch in patches {
                    if let Value::Object(fields) = patch {
                        run.extend(fields);
                    }
                }
                return Value::Object(run);
            }
            assert!(
                start.elapsed() < within,
                "Django heard no final status for run {etl_run_id} within {within:?}; heard {:?}",
                self.patches(etl_run_id)
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// One fleet: its own topics, bucket, dataset and state database, plus the processes.
struct Fleet {
    id: String,
    django: Django,
    env: Vec<(String, String)>,
    dataset: String,
    /// The processes, with the binary each runs.
    children: Vec<(&'static str, Child)>,
    queue: PubSubQueue,
    /// The test (its thread) whose source schemas go with this fleet ([`source_table`]).
    test: std::thread::ThreadId,
    /// Drops the state database once the processes are gone (fields drop after `drop`).
    _state_db: common::DropOnExit,
}

impl Fleet {
    /// The objects left in the fleet's staging bucket, as the GCS emulator lists them.
    async fn staged_objects(&self) -> Vec<String> {
        let gcs = env_or_fail("STORAGE_EMULATOR_HOST");
        let response = reqwest::get(format!("{gcs}/storage/v1/b/stage-{}/o", self.id))
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "listing: {}",
            response.status()
        );
        let listing: Value = response.json().await.unwrap();
        listing["items"]
            .as_array()
            .map(|items| items.iter().map(|i| i["name"].to_string()).collect())
            .unwrap_or_default()
    }

    async fn start(name: &str, workers: usize, extra_env: &[(&str, &str)]) -> Fleet {
        let pubsub = env_or_fail("PUBSUB_EMULATOR_HOST");
        let gcs = env_or_fail("STORAGE_EMULATOR_HOST");
        let bq = common::bigquery_host().await;
        let id = format!("{name}{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let django = Django::default();
        let django_url = django.start().await;
        // A state database of its own.
        let admin = pg().await;
        admin
            .batch_execute(&format!("CREATE DATABASE state_{id}"))
            .await
            .unwrap();
        let state_db =
            common::DropOnExit::pg_database(common::PG_ADMIN_URL, &format!("state_{id}"));
        let dataset = format!("ds_{id}");
        let mut env: Vec<(String, String)> = vec![
            ("PUBSUB_EMULATOR_HOST", pubsub.as_str()),
            ("STORAGE_EMULATOR_HOST", gcs.as_str()),
            ("BIGQUERY_EMULATOR_HOST", bq.as_str()),
            // The emulator's buckets are in US-CENTRAL1, which a US dataset loads from.
            ("BIGQUERY_LOCATION", "US"),
            ("GCP_PROJECT_ID", PROJECT),
            ("DJANGO_API_URL", django_url.as_str()),
            ("ETL_API_TOKEN", "test-token"),
            ("BIGQUERY_DATASET", dataset.as_str()),
            ("ETL_MAX_RETRIES", "1"),
            ("ETL_RETRY_DELAY", "0.2"),
            ("SHARDFLOW_METRICS_PORT", "0"),
            ("SHARDFLOW_METRICS_HOST", "127.0.0.1"),
            ("SHARDFLOW_LEASE_SECS", "10"),
            ("SHARDFLOW_HEARTBEAT_SECS", "1"),
            ("SHARDFLOW_STALE_AFTER_SECS", "4"),
            ("SHARDFLOW_BUSY_BACKOFF_SECS", "2"),
            ("SHARDFLOW_RETRY_MIN_BACKOFF_SECS", "1"),
            ("SHARDFLOW_RETRY_MAX_BACKOFF_SECS", "2"),
            ("SHARDFLOW_SHARD_ROWS", "10000"),
            ("SHARDFLOW_MAX_OUTSTANDING", "2"),
            (
                "SHARDFLOW_SEAL_KEY",
                "5ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea1",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // The staging bucket exists beforehand, as in production; workers write to it over
        // the GCS JSON API and bqemulator loads from what the emulator stored.
        let created = reqwest::Client::new()
            .post(format!("{gcs}/storage/v1/b?project={PROJECT}"))
            .json(&json!({ "name": format!("stage-{id}") }))
            .send()
            .await
            .unwrap();
        assert!(
            created.status().is_success(),
            "bucket: {}",
            created.status()
        );
        env.push(("SHARDFLOW_STAGING".into(), format!("gs://stage-{id}/runs")));
        // The state store over TLS, verified: the server's own certificate names localhost.
        let server_certificate: String = admin
            .query_one("SELECT current_setting('ssl_cert_file')", &[])
            .await
            .unwrap()
            .get(0);
        env.push((
            "SHARDFLOW_STATE".into(),
            format!(
                "postgres://postgres@localhost:5432/state_{id}?sslmode=verify-full&sslrootcert={server_certificate}"
            ),
        ));
        for (topic, default) in [
            ("JOBS_TOPIC", "etl-jobs"),
            ("JOBS_SUBSCRIPTION", "etl-jobs-dispatcher"),
            ("SHARDS_TOPIC", "etl-shards"),
            ("SHARDS_SUBSCRIPTION", "etl-shards-workers"),
            ("RESULTS_TOPIC", "etl-shard-results"),
            ("RESULTS_SUBSCRIPTION", "etl-shard-results-dispatcher"),
            ("DEAD_LETTER_TOPIC", "etl-shards-dead-letter"),
            (
                "DEAD_LETTER_SUBSCRIPTION",
                "etl-shards-dead-letter-dispatcher",
            ),
        ] {
            env.push((format!("SHARDFLOW_{topic}"), format!("{default}-{id}")));
        }
        for (k, v) in extra_env {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
        let setup = Command::new(bin("dispatcher"))
            .arg("pubsub-setup")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            setup.status.success(),
            "pubsub-setup: {}",
            String::from_utf8_lossy(&setup.stderr)
        );
        let mut options = PubSubOptions::from_env(PROJECT);
        options.lease_extension = Duration::from_secs(10);
        let queue = PubSubQueue::connect(options).await.unwrap();
        let mut fleet = Fleet {
            id,
            django,
            env,
            dataset,
            children: Vec::new(),
            queue,
            test: std::thread::current().id(),
            _state_db: state_db,
        };
        fleet.spawn_dispatcher();
        for _ in 0..workers {
            fleet.spawn_worker();
        }
        fleet
    }

    fn env(&self, name: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    fn spawn(&mut self, binary: &'static str) -> usize {
        self.spawn_with(binary, &[])
    }

    fn spawn_with(&mut self, binary: &'static str, extra: &[(&str, &str)]) -> usize {
        let log = std::fs::File::create(common::test_logs().join(format!(
            "e2e-{}-{binary}-{}.log",
            self.id,
            self.children.len()
        )))
        .unwrap();
        let child = Command::new(bin(binary))
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push((binary, child));
        self.children.len() - 1
    }

    fn spawn_dispatcher(&mut self) -> usize {
        self.spawn("dispatcher")
    }

    fn spawn_worker(&mut self) -> usize {
        self.spawn("worker")
    }

    fn kill(&mut self, index: usize) {
        let _ = self.children[index].1.kill();
        let _ = self.children[index].1.wait();
    }

    /// A connection to this fleet's state database.
    async fn state(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(
            &format!("host=127.0.0.1 user=postgres dbname=state_{}", self.id),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Publishes `{"data_source_id"}` alone, as a Cloud Scheduler job does.
    async fn publish_scheduled(&self, data_source_id: i64) {
        let body = json!({ "data_source_id": data_source_id });
        self.publish("SHARDFLOW_JOBS_TOPIC", Message::new(body.to_string()))
            .await;
    }

    /// Publishes a job message the way Django does.
    async fn publish_job(&self, data_source_id: i64, etl_run_id: i64) {
        let body = json!({"data_source_id": data_source_id, "etl_run_id": etl_run_id});
        let message = Message::new(body.to_string())
            .with_attribute("data_source_id", data_source_id.to_string())
            .with_attribute("etl_run_id", etl_run_id.to_string());
        self.publish("SHARDFLOW_JOBS_TOPIC", message).await;
    }

    /// Publishes to this fleet's topic named by the variable `topic_var`.
    async fn publish(&self, topic_var: &str, message: Message) {
        self.queue
            .publish(&self.env(topic_var), message)
            .await
            .unwrap();
    }

    fn serve_config(&self, data_source_id: i64, config: Value) {
        self.django
            .configs
            .lock()
            .unwrap()
            .insert(data_source_id, config);
    }

    /// Runs a query on bqemulator and returns its rows as arrays of strings.
    async fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        common::bigquery_rows(sql).await
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The source schemas of this fleet's test, now that nothing reads them.
        let mine: Vec<common::Scoped> = {
            let mut sources = SOURCES.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, others) = std::mem::take(&mut *sources)
                .into_iter()
                .partition(|(test, _)| *test == self.test);
            *sources = others;
            mine.into_iter().map(|(_, schema)| schema).collect()
        };
        drop(mine);
    }
}

/// The source schemas [`source_table`] made, by the test (thread) that made them: each is
/// dropped when that test's [`Fleet`] is, at the end of the test or when it fails.
static SOURCES: Mutex<Vec<(std::thread::ThreadId, common::Scoped)>> = Mutex::new(Vec::new());

/// A source table: `rows` rows with an id key, text, a decimal and a timestamp, in a fresh
/// schema that goes with the test's fleet.
async fn source_table(schema: &str, rows: i64) {
    let pg = pg().await;
    let made = fresh_schema(&pg, schema).await;
    SOURCES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((std::thread::current().id(), made));
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.t (id bigint PRIMARY KEY, name text, amount numeric(12,2), \
         seen timestamptz);
         INSERT INTO {schema}.t SELECT i, 'name-' || i || CASE WHEN i % 7 = 0 THEN ' ü😀' ELSE '' END,
                (i * 1.25)::numeric(12,2), timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute'
         FROM generate_series(1, {rows}) i;
         ANALYZE {schema}.t;"
    ))
    .await
    .unwrap();
}

/// (count, md5 of "id|name" lines in id order, sum of amount) from PostgreSQL.
async fn source_digest(schema: &str) -> (i64, String, String) {
    let pg = pg().await;
    let row = pg
        .query_one(
            &format!(
                "SELECT count(*), md5(string_agg(id || '|' || coalesce(name, ''), E'\\n' ORDER BY id)), \
                 sum(amount)::text FROM {schema}.t"
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// The same digest from BigQuery, computed here from the rows it returns.
async fn destination_digest(fleet: &Fleet, table: &str) -> (i64, String, String) {
    let t = format!("`{PROJECT}.{}.{table}`", fleet.dataset);
    let rows = fleet
        .query(&format!("SELECT id, name FROM {t} ORDER BY id"))
        .await;
    let text = rows
        .iter()
        .map(|r| {
            format!(
                "{}|{}",
                r[0].clone().unwrap_or_default(),
                r[1].clone().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let sum = fleet
        .query(&format!("SELECT CAST(SUM(amount) AS STRING) FROM {t}"))
        .await;
    let sum = sum[0][0].clone().unwrap_or_default();
    // BigQuery prints NUMERIC with its full scale; PostgreSQL with the column's.
    let sum = normalize_decimal(&sum);
    (
        rows.len() as i64,
        format!("{:x}", md5::Md5::digest(text.as_bytes())),
        sum,
    )
}

fn normalize_decimal(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

use md5::Digest as _;

async fn assert_loaded_exactly(fleet: &Fleet, schema: &str, table: &str) {
    let (count, digest, sum) = source_digest(schema).await;
    let (bq_count, bq_digest, bq_sum) = destination_digest(fleet, table).await;
    assert_eq!(bq_count, count, "row count");
    assert_eq!(bq_digest, digest, "content digest of id|name in id order");
    assert_eq!(bq_sum, normalize_decimal(&sum), "sum of amount");
}

fn config(schema: &str, dest: &str) -> Value {
    job_json(schema, "t", dest, json!({}))
}

fn assert_completed(status: &Value, rows: u64) {
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["rows_extracted"], rows, "{status}");
    assert_eq!(status["rows_loaded"], rows, "{status}");
    assert!(
        status["duration_seconds"].as_f64().unwrap() > 0.0,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_from_django_load_bigquery_exactly_and_report_back() {
    // Two dispatcher replicas share the job and result subscriptions and the state store.
    let mut fleet = Fleet::start("main", 2, &[]).await;
    fleet.spawn_dispatcher();
    source_table("fleet_a", 30_000).await;
    source_table("fleet_b", 12_000).await;
    let mut with_watermark = config("fleet_a", "table_a");
    with_watermark["timestamp_column"] = json!("seen");
    fleet.serve_config(101, with_watermark);
    fleet.serve_config(102, config("fleet_b", "table_b"));

    // Two jobs at once, and the first one published twice.
    fleet.publish_job(101, 5001).await;
    fleet.publish_job(102, 5002).await;
    fleet.publish_job(101, 5001).await;

    let a = fleet
        .django
        .final_status(5001, Duration::from_secs(240))
        .await;
    let b = fleet
        .django
        .final_status(5002, Duration::from_secs(240))
        .await;
    assert_completed(&a, 30_000);
    assert_completed(&b, 12_000);
    assert_loaded_exactly(&fleet, "fleet_a", "table_a").await;
    assert_loaded_exactly(&fleet, "fleet_b", "table_b").await;
    // The high-water mark of `seen` went to Django with `completed`: row 30000's minute.
    assert_eq!(a["watermark"], "2024-01-21T20:00:00Z", "{a}");
    assert_eq!(b.get("watermark"), None, "{b}");

    // The workers' content checksum, combined over the fleet's shards, is the one an
    // embedded run of the same table computes with another cut: same rows, same content.
    let fleet_checksum = fleet
        .state()
        .await
        .query_one(
            "SELECT checksum FROM shardflow_runs WHERE etl_run_id = 5001 AND status = 'completed'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    let embedded = embedded_run("fleet_a", json!({"timestamp_column": "seen"}), 1_000_000).await;
    assert_eq!(embedded.status, RunStatus::Completed, "{embedded:?}");
    assert_eq!(embedded.shards, 1);
    assert_eq!(embedded.checksum.as_deref(), Some(fleet_checksum.as_str()));
    assert_eq!(embedded.watermark.as_deref(), a["watermark"].as_str());

    // Django heard running (with progress) before completed, and the duplicate job message
    // did not run the job again: one load job for the run.
    let patches = fleet.django.patches(5001);
    assert_eq!(patches[0]["status"], "running", "{patches:?}");
    assert!(
        patches
            .iter()
            .any(|p| p["status"] == "running" && p["shards_completed"].as_u64() > Some(0)),
        "{patches:?}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Still exactly the source after the duplicate had its chance to run.
    assert_loaded_exactly(&fleet, "fleet_a", "table_a").await;
    let started = fleet
        .django
        .patches(5001)
        .iter()
        .filter(|p| p["status"] == "running" && p["shards_completed"] == 0)
        .count();
    assert_eq!(started, 1, "the job started once");

    // The runs' staged parts were removed once their loads committed.
    assert_eq!(fleet.staged_objects().await, Vec::<String>::new());

    // Both replicas are still up.
    for (binary, child) in fleet.children.iter_mut() {
        assert_eq!(child.try_wait().unwrap(), None, "a {binary} exited");
    }
    // Their state-store sessions are encrypted (SHARDFLOW_STATE's sslmode=verify-full).
    let sessions = pg()
        .await
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = $1",
            &[&format!("state_{}", fleet.id)],
        )
        .await
        .unwrap();
    let (count, encrypted): (i64, Option<bool>) = (sessions.get(0), sessions.get(1));
    assert!(
        count > 0 && encrypted == Some(true),
        "{count} state-store sessions, all encrypted: {encrypted:?}"
    );

    // SIGTERM: workers stop pulling, drain, and exit cleanly.
    fleet.kill_all_workers_gracefully().await;
}

/// The table `schema.t` run through the embedded pipeline into a scratch Parquet table.
async fn embedded_run(schema: &str, extra: Value, shard_rows: u64) -> RunReport {
    let dir = common::scratch(&format!("fleet-embedded-{schema}"));
    let options = RunOptions {
        plan: PlanOptions {
            shard_rows,
            workers: None,
            exact_count: true,
            retry: RetryPolicy::none(),
            warehouse_loads_gcs: false,
            ..Default::default()
        },
        workers: 2,
        dest: dir.join("warehouse").display().to_string(),
        state_url: format!("sqlite://{}", dir.join("state.db").display()),
        ..Default::default()
    };
    run_job(common::job(schema, "t", "t", extra), options).await
}

/// With Django answering 503 to every PATCH, a run is not held up: it ends in the state store
/// and its job message is acked while Django is down (no PATCH awaited, no retry inline), its
/// final status stays recorded, and Django hears it once it is back, exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_ends_while_django_is_down_and_django_hears_it_when_back() {
    let fleet = Fleet::start("down", 1, &[]).await;
    source_table("fleet_down", 20_000).await;
    fleet
        .django
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let inline = json!({"etl_run_id": 9101, "config": config("fleet_down", "table_d")});
    fleet
        .publish("SHARDFLOW_JOBS_TOPIC", Message::new(inline.to_string()))
        .await;
    let state = fleet.state().await;
    let start = Instant::now();
    loop {
        let row = state
            .query_opt(
                "SELECT r.status, d.delivered_at FROM shardflow_runs r
                 JOIN shardflow_django_reports d USING (etl_run_id)
                 WHERE r.etl_run_id = 9101 AND r.status <> 'running'",
                &[],
            )
            .await
            // The dispatcher may not have made its tables yet.
            .unwrap_or(None);
        if let Some(row) = row {
            assert_eq!(row.get::<_, String>(0), "completed");
            assert_eq!(
                row.get::<_, Option<String>>(1),
                None,
                "delivered while Django is down"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run did not end while Django was down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_loaded_exactly(&fleet, "fleet_down", "table_d").await;
    assert!(fleet.django.patches(9101).is_empty(), "Django was down");
    // The report is retried (2 s, 4 s, …) until Django answers again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet
        .django
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let status = fleet
        .django
        .final_status(9101, Duration::from_secs(60))
        .await;
    assert_completed(&status, 20_000);
    let finals: Vec<Value> = fleet
        .django
        .patches(9101)
        .into_iter()
        .filter(|p| p["status"] != "running")
        .collect();
    assert_eq!(finals.len(), 1, "one final status: {finals:?}");
    let delivered: Option<String> = state
        .query_one(
            "SELECT delivered_at FROM shardflow_django_reports WHERE etl_run_id = 9101",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(delivered.is_some(), "the state store records the delivery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduled_and_inline_jobs_run_without_django_run_ids_or_configs() {
    let fleet = Fleet::start("sched", 1, &[]).await;
    source_table("fleet_sched", 15_000).await;
    source_table("fleet_inline", 20_000).await;
    fleet.serve_config(601, config("fleet_sched", "table_s"));
    fleet.publish_scheduled(601).await;
    // A job whose config exists only in the message (Django does not know its data source):
    // the workers get it sealed for the run, and its password never rests in clear text.
    let inline = json!({"etl_run_id": 9001, "config": config("fleet_inline", "table_i")});
    fleet
        .publish("SHARDFLOW_JOBS_TOPIC", Message::new(inline.to_string()))
        .await;
    let status = fleet
        .django
        .final_status(9001, Duration::from_secs(180))
        .await;
    assert_completed(&status, 20_000);
    assert_loaded_exactly(&fleet, "fleet_inline", "table_i").await;
    let tasks = fleet
        .state()
        .await
        .query(
            "SELECT s.task_json FROM shardflow_shards s JOIN shardflow_runs r USING (run_id)
             WHERE r.etl_run_id = 9001",
            &[],
        )
        .await
        .unwrap();
    assert!(tasks.len() > 1, "{} shards", tasks.len());
    for t in &tasks {
        let task: String = t.get(0);
        assert!(task.contains("\"sealed_config\""), "{task}");
        assert!(!task.contains("pw-never-shown"), "{task}");
    }

    // The run gets its own key from the message, and ends in the state store.
    let state = fleet.state().await;
    let start = Instant::now();
    let (job_key, status, rows, etl_run_id) = loop {
        let row = state
            .query_opt(
                "SELECT job_key, status, rows_loaded, etl_run_id FROM shardflow_runs
                 WHERE data_source_id = 601 AND status <> 'running'",
                &[],
            )
            .await
            .unwrap_or(None);
        if let Some(r) = row {
            break (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, Option<i64>>(2),
                r.get::<_, Option<i64>>(3),
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the scheduled run never ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(job_key.starts_with("sched-601-"), "{job_key}");
    assert_eq!(
        (status.as_str(), rows, etl_run_id),
        ("completed", Some(15_000), None)
    );
    assert_loaded_exactly(&fleet, "fleet_sched", "table_s").await;
    // Django was asked for the scheduled job's config and told nothing of its run; the
    // inline job's config was never fetched.
    let calls = fleet.django.calls.lock().unwrap().clone();
    assert!(
        calls
            .iter()
            .any(|(method, path, _)| method == "GET" && path.ends_with("/job-config/601/")),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .all(|(method, path, _)| method == "GET" || path.contains("/runs/9001/")),
        "no PATCH for a run Django did not create: {calls:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|(_, path, _)| path.contains("/job-config/42/")),
        "{calls:?}"
    );
}

impl Fleet {
    /// SIGTERM to every worker: each drains and exits 0.
    async fn kill_all_workers_gracefully(&mut self) -> Vec<i32> {
        let mut codes = Vec::new();
        for (_, c) in self.children.iter_mut().filter(|(b, _)| *b == "worker") {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let status = c.wait().unwrap();
            codes.push(status.code().unwrap_or(-1));
        }
        assert!(
            codes.iter().all(|c| *c == 0),
            "workers exit cleanly on SIGTERM: {codes:?}"
        );
        codes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_workers_and_a_restarted_dispatcher_still_load_exactly_once() {
    // Small batches and many shards make the run long enough to kill things in the middle.
    let mut fleet = Fleet::start(
        "kill",
        2,
        &[("ETL_BATCH_SIZE", "500"), ("SHARDFLOW_SHARD_ROWS", "20000")],
    )
    .await;
    source_table("fleet_kill", 200_000).await;
    fleet.serve_config(201, config("fleet_kill", "table_k"));
    fleet.publish_job(201, 6001).await;

    // As soon as the first shard result is recorded (the others are still being extracted),
    // SIGKILL a worker and the dispatcher.
    let state = fleet.state().await;
    let start = Instant::now();
    loop {
        let counts = state
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FROM shardflow_shards",
                &[],
            )
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .unwrap_or((0, 0));
        if counts.0 > 0 {
            assert!(
                counts.0 < counts.1,
                "every shard finished before the kill: {counts:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no shard finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.kill(1);
    fleet.kill(0);
    fleet.spawn_worker();
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.spawn_dispatcher();

    let status = fleet
        .django
        .final_status(6001, Duration::from_secs(240))
        .await;
    assert_completed(&status, 200_000);
    assert_loaded_exactly(&fleet, "fleet_kill", "table_k").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_reach_django_with_the_reason() {
    let fleet = Fleet::start("fail", 1, &[]).await;
    // A shard that always fails: a date PostgreSQL has and BigQuery cannot hold.
    let pg = pg().await;
    let _poison = fresh_schema(&pg, "fleet_poison").await;
    pg.batch_execute(
        "CREATE TABLE fleet_poison.t (id bigint PRIMARY KEY, d numeric(10,2));
         INSERT INTO fleet_poison.t SELECT i, 1.5 FROM generate_series(1, 30000) i;
         UPDATE fleet_poison.t SET d = 'NaN' WHERE id = 25000;
         ANALYZE fleet_poison.t;
         CREATE MATERIALIZED VIEW fleet_poison.never_refreshed AS SELECT * FROM fleet_poison.t
             WITH NO DATA;",
    )
    .await
    .unwrap();
    fleet.serve_config(301, config("fleet_poison", "table_p"));
    fleet.publish_job(301, 7001).await;
    // A materialized view created WITH NO DATA: PostgreSQL refuses to read it (55000).
    fleet.serve_config(
        304,
        job_json("fleet_poison", "never_refreshed", "table_mv", json!({})),
    );
    fleet.publish_job(304, 7004).await;
    // A JSON file whose column is a number through the detection sample (5 MB) and a string
    // on one line after it.
    let files = common::scratch("fleet-mixed-json");
    let mut lines = String::new();
    for i in 1..=240_000 {
        lines.push_str(&format!("{{\"id\": {i}, \"amount\": {i}}}\n"));
    }
    lines.push_str("{\"id\": 240001, \"amount\": \"twelve\"}\n");
    assert!(lines.len() > 5 * 1024 * 1024, "past the sample");
    std::fs::write(files.join("mixed.jsonl"), &lines).unwrap();
    let mixed_uri = format!(
        "file://{}/mixed.jsonl",
        files.canonicalize().unwrap().display()
    );
    fleet.serve_config(
        305,
        json!({
            "data_source_id": 305,
            "source_type": "local",
            "dest_table_name": "table_mixed",
            "file_path_prefix": format!("{}/", files.display()),
            "file_pattern": "mixed.jsonl",
            "file_format": "json",
            "load_type": "transactional",
            "load_latest_only": false,
            "processing_mode": "dataflow",
        }),
    );
    fleet.publish_job(305, 7005).await;
    // A dead database: nothing listens on port 1.
    let mut dead = config("fleet_poison", "table_d");
    dead["connection_params"]["port"] = json!(1);
    fleet.serve_config(302, dead);
    fleet.publish_job(302, 7002).await;
    // A data source Django does not know.
    fleet.publish_job(303, 7003).await;

    let poisoned = fleet
        .django
        .final_status(7001, Duration::from_secs(240))
        .await;
    assert_eq!(poisoned["status"], "failed", "{poisoned}");
    let why = poisoned["error_message"].as_str().unwrap();
    // The same bytes fail the same way every time: one attempt, not five.
    assert!(
        why.starts_with("shard s0")
            && why
                .contains(" failed: decoding d: numeric NaN cannot be stored in a DECIMAL column"),
        "{why}"
    );
    let state = fleet.state().await;
    let attempts = |etl_run_id: i64| {
        let state = &state;
        async move {
            let rows = state
                .query(
                    "SELECT s.attempts, s.status FROM shardflow_shards s
                     JOIN shardflow_runs r USING (run_id)
                     WHERE r.etl_run_id = $1 AND s.status <> 'succeeded'",
                    &[&etl_run_id],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
        }
    };
    let failed = attempts(7001).await;
    assert!(
        failed.contains(&(1, "failed".to_string())),
        "the poisoned shard ran once: {failed:?}"
    );

    let never_refreshed = fleet
        .django
        .final_status(7004, Duration::from_secs(120))
        .await;
    assert_eq!(never_refreshed["status"], "failed", "{never_refreshed}");
    let why = never_refreshed["error_message"].as_str().unwrap();
    assert!(
        why.contains("the source database refused the job")
            && why.contains("materialized view \"never_refreshed\" has not been populated")
            && !why.contains("attempts"),
        "{why}"
    );
    assert!(attempts(7004).await.iter().all(|(n, _)| *n <= 1));

    let mixed = fleet
        .django
        .final_status(7005, Duration::from_secs(120))
        .await;
    assert_eq!(mixed["status"], "failed", "{mixed}");
    let why = mixed["error_message"].as_str().unwrap();
    assert!(
        why.contains(&format!("{mixed_uri}, line 240001: ")) && !why.contains("attempts"),
        "{why}"
    );
    assert_eq!(attempts(7005).await, [(1, "failed".to_string())]);

    let dead = fleet
        .django
        .final_status(7002, Duration::from_secs(120))
        .await;
    assert_eq!(dead["status"], "failed", "{dead}");
    let why = dead["error_message"].as_str().unwrap();
    assert!(
        why.contains("source database error") && why.contains("gave up after 1 retries"),
        "{why}"
    );
    assert!(
        !why.contains("pw-never-shown"),
        "no secret in errors: {why}"
    );

    let unknown = fleet
        .django
        .final_status(7003, Duration::from_secs(120))
        .await;
    assert_eq!(unknown["status"], "failed", "{unknown}");
    assert!(
        unknown["error_message"].as_str().unwrap().contains("404"),
        "{unknown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_shard_delivered_twice_loads_each_row_once() {
    let fleet = Fleet::start("dup", 2, &[("ETL_BATCH_SIZE", "1000")]).await;
    source_table("fleet_dup", 60_000).await;
    fleet.serve_config(401, config("fleet_dup", "table_dup"));
    fleet.publish_job(401, 8001).await;

    // As soon as the run has published its shards, publish every one of them again.
    let state = fleet.state().await;
    let start = Instant::now();
    let tasks = loop {
        let rows = state
            .query("SELECT task_json FROM shardflow_shards", &[])
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if !rows.is_empty() {
            break rows;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no shards recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(tasks.len() >= 6, "{} shards", tasks.len());
    for task in &tasks {
        fleet
            .publish("SHARDFLOW_SHARDS_TOPIC", Message::new(task.clone()))
            .await;
    }
    let status = fleet
        .django
        .final_status(8001, Duration::from_secs(240))
        .await;
    assert_completed(&status, 60_000);
    assert_loaded_exactly(&fleet, "fleet_dup", "table_dup").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dispatcher_run_with_the_pubsub_queue_uses_the_fleet_and_waits() {
    let mut fleet = Fleet::start("cli", 2, &[]).await;
    fleet.kill(0); // no `dispatcher serve`: the CLI drives this run itself
    source_table("fleet_cli", 25_000).await;
    let mut config = config("fleet_cli", "table_cli");
    config["data_source_id"] = json!(501);
    fleet.serve_config(501, config.clone());
    let job_file = common::scratch("fleet-cli-job").join("job.json");
    std::fs::write(&job_file, config.to_string()).unwrap();
    let output = Command::new(bin("dispatcher"))
        .args(["run", "--queue", "pubsub", "--shard-rows", "10000", "--job"])
        .arg(&job_file)
        .arg("--dest")
        .arg(format!("bigquery://{PROJECT}/{}", fleet.dataset))
        .envs(fleet.env.iter().map(|(k, v)| (k, v)))
        .env(
            "SHARDFLOW_STATE",
            format!("postgres://postgres@127.0.0.1:5432/state_{}", fleet.id),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap();
    assert!(
        output.status.success(),
        "{report} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(report["rows_loaded"], 25_000, "{report}");
    assert!(report["shards"].as_u64() > Some(1), "{report}");
    assert_loaded_exactly(&fleet, "fleet_cli", "table_cli").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactional_jobs_append_each_window_to_bigquery_once() {
    let fleet = Fleet::start("inc", 2, &[]).await;
    source_table("fleet_inc", 25_000).await;
    let mut config = config("fleet_inc", "table_inc");
    config["load_type"] = json!("transactional");
    config["timestamp_column"] = json!("seen");
    config["historical_start_date"] = json!("2024-01-01");
    fleet.serve_config(701, config.clone());
    fleet.publish_job(701, 11001).await;
    let first = fleet
        .django
        .final_status(11001, Duration::from_secs(180))
        .await;
    assert_completed(&first, 25_000);
    // Row 25000's minute after 2024-01-01.
    assert_eq!(first["watermark"], "2024-01-18T08:40:00Z", "{first}");

    // The table grows; Django stores the watermark as last_sync_value for the next run.
    pg().await
        .batch_execute(
            "INSERT INTO fleet_inc.t SELECT i, 'name-' || i, (i * 1.25)::numeric(12,2),
                    timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute'
             FROM generate_series(25001, 31000) i",
        )
        .await
        .unwrap();
    config["last_sync_value"] = first["watermark"].clone();
    fleet.serve_config(701, config);
    fleet.publish_job(701, 11002).await;
    fleet.publish_job(701, 11002).await;
    let second = fleet
        .django
        .final_status(11002, Duration::from_secs(180))
        .await;
    assert_completed(&second, 6_000);
    assert_eq!(second["watermark"], "2024-01-22T12:40:00Z", "{second}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Both windows appended once, the duplicate job message changed nothing.
    assert_loaded_exactly(&fleet, "fleet_inc", "table_inc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_jobs_upsert_changed_rows_into_bigquery() {
    let fleet = Fleet::start("merge", 2, &[]).await;
    source_table("fleet_merge", 20_000).await;
    let mut config = config("fleet_merge", "table_m");
    config["load_type"] = json!("merge");
    config["timestamp_column"] = json!("seen");
    fleet.serve_config(801, config.clone());
    fleet.publish_job(801, 12001).await;
    let first = fleet
        .django
        .final_status(12001, Duration::from_secs(180))
        .await;
    assert_completed(&first, 20_000);
    assert_loaded_exactly(&fleet, "fleet_merge", "table_m").await;

    // 3,000 rows change (moved past the watermark), 1,000 are new.
    pg().await
        .batch_execute(
            "UPDATE fleet_merge.t SET name = 'renamed-' || id, amount = amount + 7,
                    seen = timestamptz '2025-01-01 00:00:00+00' + id * interval '1 second'
             WHERE id % 20 < 3;
             INSERT INTO fleet_merge.t SELECT i, 'late-' || i, i, timestamptz '2025-02-01 00:00:00+00'
             FROM generate_series(20001, 21000) i",
        )
        .await
        .unwrap();
    config["last_sync_value"] = first["watermark"].clone();
    fleet.serve_config(801, config);
    fleet.publish_job(801, 12002).await;
    let second = fleet
        .django
        .final_status(12002, Duration::from_secs(180))
        .await;
    // 3,000 updated and 1,000 inserted by one MERGE; each key once, in its new version.
    assert_completed(&second, 4_000);
    assert_eq!(second["watermark"], "2025-02-01T00:00:00Z", "{second}");
    assert_loaded_exactly(&fleet, "fleet_merge", "table_m").await;
    // The merge's staging table is gone.
    let tables = fleet
        .query(&format!(
            "SELECT table_name FROM `{PROJECT}.{}.INFORMATION_SCHEMA.TABLES`",
            fleet.dataset
        ))
        .await;
    assert_eq!(tables, vec![vec![Some("table_m".to_string())]]);
}

/// A MySQL table: unsigned keys, 4-byte text, decimals, timestamps. (No decimal(65,30):
/// bqemulator cannot create a BIGNUMERIC column, DuckDB's decimals stop at 38 digits.)
async fn mysql_table(db: &str, from: u64, to: u64) {
    let mut conn = common::my::my().await;
    common::my::exec(
        &mut conn,
        &format!(
            "SET SESSION time_zone = '+00:00';
             CREATE TABLE IF NOT EXISTS {db}.t (id bigint unsigned PRIMARY KEY, name varchar(40),
               amount decimal(12,2), seen timestamp(6) NULL, big bigint unsigned,
               precise decimal(38,9));
             INSERT INTO {db}.t
             SELECT seq, CONCAT('name-', seq, IF(seq % 7 = 0, ' ü😀', '')), seq * 1.25,
                    TIMESTAMP('2024-01-01') + INTERVAL seq MINUTE, 18446744073709551615 - seq,
                    CONCAT(seq, LPAD(seq, 18, '0'), '.', LPAD(seq, 9, '0'))
             FROM seq_{from}_to_{to};"
        ),
    )
    .await;
}

/// (count, md5 of "id|name" lines in id order, sum of amount) from MySQL.
async fn mysql_digest(db: &str) -> (i64, String, String) {
    use sqlx::Row;
    let mut conn = common::my::my().await;
    common::my::exec(&mut conn, "SET SESSION group_concat_max_len = 1073741824").await;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*), MD5(GROUP_CONCAT(CONCAT(id, '|', COALESCE(name, '')) ORDER BY id SEPARATOR '\\n')),
                CAST(SUM(amount) AS CHAR) FROM {db}.t"
    )))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_jobs_load_and_merge_into_bigquery_exactly() {
    let fleet = Fleet::start("mysql", 2, &[]).await;
    let mut conn = common::my::my().await;
    let db = common::my::fresh_database(&mut conn, "sf_fleet").await;
    mysql_table(&db, 1, 24_000).await;
    let mut config = common::my::job_json(&db, "t", "table_my", json!({}));
    config["load_type"] = json!("merge");
    config["timestamp_column"] = json!("seen");
    fleet.serve_config(901, config.clone());
    fleet.publish_job(901, 13001).await;
    let first = fleet
        .django
        .final_status(13001, Duration::from_secs(180))
        .await;
    assert_completed(&first, 24_000);
    let shards: i64 = fleet
        .state()
        .await
        .query_one(
            "SELECT count(*) FROM shardflow_shards s JOIN shardflow_runs r USING (run_id)
             WHERE r.etl_run_id = 13001",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shards, 3, "24,000 rows in shards of 10,000");
    assert_eq!(first["watermark"], "2024-01-17T16:00:00Z", "{first}");
    let check = || async {
        let (count, digest, sum) = mysql_digest(&db).await;
        // The id is NUMERIC (bigint unsigned), which bqemulator prints with nine decimals.
        let t = format!("`{PROJECT}.{}.table_my`", fleet.dataset);
        let rows = fleet
            .query(&format!("SELECT id, name FROM {t} ORDER BY id"))
            .await;
        let text = rows
            .iter()
            .map(|r| {
                let id = normalize_decimal(r[0].as_deref().unwrap_or_default());
                format!("{id}|{}", r[1].clone().unwrap_or_default())
            })
            .collect::<Vec<_>>()
            .join("\n");
        let bq_digest = format!("{:x}", md5::Md5::digest(text.as_bytes()));
        assert_eq!(
            (rows.len() as i64, bq_digest),
            (count, digest),
            "rows, id|name in id order"
        );
        let bq_sum = fleet
            .query(&format!("SELECT CAST(SUM(amount) AS STRING) FROM {t}"))
            .await;
        let bq_sum = normalize_decimal(&bq_sum[0][0].clone().unwrap_or_default());
        assert_eq!(bq_sum, normalize_decimal(&sum), "sum of amount");
        // bigint unsigned and decimal(38,9) arrive whole (NUMERIC).
        let exact: Vec<String> = fleet
            .query(&format!("SELECT big, precise FROM {t} WHERE id = 7"))
            .await
            .concat()
            .into_iter()
            .map(|v| normalize_decimal(&v.unwrap_or_default()))
            .collect();
        assert_eq!(
            exact,
            ["18446744073709551608", "7000000000000000007.000000007"]
        );
    };
    check().await;

    // 2,400 rows change (moved past the watermark) and 1,000 are new: one MERGE.
    common::my::exec(
        &mut conn,
        &format!(
            "SET SESSION time_zone = '+00:00';
             UPDATE {db}.t SET name = CONCAT('renamed-', id), amount = amount + 7,
                    seen = TIMESTAMP('2025-01-01') + INTERVAL id SECOND
             WHERE id % 10 = 3;"
        ),
    )
    .await;
    mysql_table(&db, 24_001, 25_000).await;
    config["last_sync_value"] = first["watermark"].clone();
    fleet.serve_config(901, config);
    fleet.publish_job(901, 13002).await;
    let second = fleet
        .django
        .final_status(13002, Duration::from_secs(180))
        .await;
    assert_completed(&second, 3_400);
    assert_eq!(second["watermark"], "2025-01-01T06:39:53Z", "{second}");
    check().await;
}

/// The `id|name` rows of a BigQuery table, by id.
async fn id_name_rows(fleet: &Fleet, table: &str) -> Vec<String> {
    fleet
        .query(&format!(
            "SELECT id, name FROM `{PROJECT}.{}.{table}` ORDER BY id",
            fleet.dataset
        ))
        .await
        .into_iter()
        .map(|r| {
            format!(
                "{}|{}",
                r[0].clone().unwrap_or_default(),
                r[1].clone().unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_jobs_run_on_the_fleet_and_load_each_file_once() {
    let fleet = Fleet::start("files", 2, &[]).await;
    let gcs = env_or_fail("STORAGE_EMULATOR_HOST");
    let bucket = format!("stage-{}", fleet.id);
    let put = |name: String, body: Vec<u8>| {
        let url = format!("{gcs}/upload/storage/v1/b/{bucket}/o");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .query(&[("uploadType", "media"), ("name", name.as_str())])
                .body(body)
                .send()
                .await
                .unwrap();
            assert!(
                response.status().is_success(),
                "{name}: {}",
                response.status()
            );
        }
    };
    let csv = |from: u32, to: u32| {
        let mut text = "id,name\n".to_string();
        for i in from..=to {
            text.push_str(&format!("{i},name {i}\n"));
        }
        text
    };
    // zstd files: BigQuery cannot read them, the workers do (three files, three shards).
    for (n, (from, to)) in [(1, 1000), (1001, 2500), (2501, 3000)]
        .into_iter()
        .enumerate()
    {
        let mut packed = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(
            &mut async_compression::tokio::bufread::ZstdEncoder::new(csv(from, to).as_bytes()),
            &mut packed,
        )
        .await
        .unwrap();
        put(format!("drops/z/part_{n}.csv.zst"), packed).await;
    }
    // Plain CSV: BigQuery loads it itself.
    put("drops/plain/part_0.csv".into(), csv(1, 700).into_bytes()).await;
    let config = |folder: &str, dest: &str| {
        json!({
            "source_type": "gcs", "dest_table_name": dest, "load_type": "transactional",
            "connection_params": {"bucket": bucket, "endpoint": gcs},
            "file_path_prefix": format!("drops/{folder}/"), "file_pattern": "part_*",
            "file_format": "csv", "load_latest_only": false, "processing_mode": "dataflow",
            "bigquery_schema": [
                {"name": "id", "bigquery_type": "INT64", "bigquery_mode": "NULLABLE"},
                {"name": "name", "bigquery_type": "STRING", "bigquery_mode": "NULLABLE"}
            ]
        })
    };
    fleet.serve_config(401, config("z", "files_z"));
    fleet.serve_config(402, config("plain", "files_plain"));
    fleet.publish_job(401, 14001).await;
    fleet.publish_job(402, 14002).await;
    let z = fleet
        .django
        .final_status(14001, Duration::from_secs(240))
        .await;
    let plain = fleet
        .django
        .final_status(14002, Duration::from_secs(240))
        .await;
    assert_completed(&z, 3000);
    assert_completed(&plain, 700);
    assert_eq!(
        (z["files_loaded"].as_u64(), plain["files_loaded"].as_u64()),
        (Some(3), Some(1))
    );
    let want = |to: u32| {
        (1..=to)
            .map(|i| format!("{i}|name {i}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(id_name_rows(&fleet, "files_z").await, want(3000));
    assert_eq!(id_name_rows(&fleet, "files_plain").await, want(700));

    // The state store (PostgreSQL here) knows the files: a new file alone is loaded next,
    // then nothing.
    put("drops/plain/part_1.csv".into(), csv(701, 900).into_bytes()).await;
    fleet.publish_job(402, 14003).await;
    fleet.publish_job(401, 14004).await;
    let next = fleet
        .django
        .final_status(14003, Duration::from_secs(240))
        .await;
    let again = fleet
        .django
        .final_status(14004, Duration::from_secs(240))
        .await;
    assert_completed(&next, 200);
    assert_eq!(next["files_loaded"].as_u64(), Some(1), "{next}");
    assert_eq!(
        (again["status"].as_str(), again["files_loaded"].as_u64()),
        (Some("completed"), Some(0)),
        "{again}"
    );
    assert_eq!(id_name_rows(&fleet, "files_plain").await, want(900));
    assert_eq!(id_name_rows(&fleet, "files_z").await, want(3000));
    // Each file once, with its rows; the direct loads of one file each know theirs.
    let recorded: Vec<(String, Option<i64>)> = fleet
        .state()
        .await
        .query(
            "SELECT path, rows_loaded FROM shardflow_processed_files ORDER BY path",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let file = |path: &str, rows: i64| (path.to_string(), Some(rows));
    assert_eq!(
        recorded,
        [
            file("drops/plain/part_0.csv", 700),
            file("drops/plain/part_1.csv", 200),
            file("drops/z/part_0.csv.zst", 1000),
            file("drops/z/part_1.csv.zst", 1500),
            file("drops/z/part_2.csv.zst", 500),
        ]
    );
}

/// The fault-injection suite on the fleet (issue 18, point 10): for each named step a
/// dispatcher or a worker reaches, the fleet is restarted with `SHARDFLOW_FAULT=<step>:kill`,
/// the source changes (`change(n)`; change 0 before the first run) and the job is published; once the process that reached the step is
/// dead the fleet is restarted without the fault. Django must hear the run completed and
/// BigQuery hold each source row once (`check`).
async fn fleet_killed_at_each_step(
    name: &str,
    job: impl Fn(&Fleet) -> Value,
    steps: &[shardflow::fault::Step],
    mut change: impl AsyncFnMut(&Fleet, usize),
    mut after_kill: impl AsyncFnMut(&Fleet, usize),
    mut check: impl AsyncFnMut(&Fleet, &str),
) {
    use std::os::unix::process::ExitStatusExt as _;
    let mut fleet = Fleet::start(name, 2, &[("ETL_BATCH_SIZE", "1000")]).await;
    fleet.serve_config(801, job(&fleet));
    change(&fleet, 0).await;
    fleet.publish_job(801, 12000).await;
    let first = fleet
        .django
        .final_status(12000, Duration::from_secs(180))
        .await;
    assert_eq!(first["status"], "completed", "{first}");
    check(&fleet, "the first run").await;
    for (n, step) in steps.iter().enumerate() {
        // Change 0 was made before the first run.
        let n = n + 1;
        let step = step.name();
        let etl_run_id = 12000 + n as i64;
        for i in 0..fleet.children.len() {
            fleet.kill(i);
        }
        let fault = format!("{step}:kill");
        let armed = [(shardflow::fault::FAULT_ENV, fault.as_str())];
        let first_armed = fleet.children.len();
        fleet.spawn_with("dispatcher", &armed);
        fleet.spawn_with("worker", &armed);
        fleet.spawn_with("worker", &armed);
        change(&fleet, n).await;
        fleet.publish_job(801, etl_run_id).await;
        // Until a process reached the step and died of it.
        let start = Instant::now();
        let killed = loop {
            let dead = (first_armed..fleet.children.len()).find_map(|i| {
                let status = fleet.children[i].1.try_wait().ok().flatten()?;
                Some((fleet.children[i].0, status))
            });
            if let Some(dead) = dead {
                break dead;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no process was killed at {step}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(killed.1.signal(), Some(9), "{step}: {killed:?}");
        for i in first_armed..fleet.children.len() {
            fleet.kill(i);
        }
        after_kill(&fleet, n).await;
        fleet.spawn_dispatcher();
        fleet.spawn_worker();
        fleet.spawn_worker();
        let status = fleet
            .django
            .final_status(etl_run_id, Duration::from_secs(240))
            .await;
        assert_eq!(
            status["status"], "completed",
            "after a kill at {step}: {status}"
        );
        check(&fleet, step).await;
    }
    // And the job after: what came after the last kill.
    let last = 12001 + steps.len() as i64;
    fleet.publish_job(801, last).await;
    let status = fleet
        .django
        .final_status(last, Duration::from_secs(240))
        .await;
    assert_eq!(status["status"], "completed", "{status}");
    check(&fleet, AFTER_EVERY_KILL).await;
}

/// What `check` is told after the job that follows the last kill.
const AFTER_EVERY_KILL: &str = "the job after every kill";

/// Every step the fleet reaches with workers: the Parquet warehouse's swap is not on its
/// path (BigQuery commits the load).
fn fleet_steps() -> Vec<shardflow::fault::Step> {
    shardflow::fault::STEPS
        .into_iter()
        .filter(|s| *s != shardflow::fault::Step::Swap)
        .collect()
}

async fn add_rows(schema: &str, from: i64, count: i64) {
    pg().await
        .batch_execute(&format!(
            "INSERT INTO {schema}.t SELECT i, 'name-' || i, (i * 1.25)::numeric(12,2),
                    timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute'
             FROM generate_series({from}, {}) i",
            from + count - 1
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_killed_at_each_step_appends_each_row_once() {
    source_table("fleet_fault", 8_000).await;
    let mut job = config("fleet_fault", "table_fault");
    job["load_type"] = json!("transactional");
    job["timestamp_column"] = json!("seen");
    job["historical_start_date"] = json!("2024-01-01");
    fleet_killed_at_each_step(
        "fault",
        |_| job.clone(),
        &fleet_steps(),
        async |_, n| add_rows("fleet_fault", 8_001 + 3000 * n as i64, 3000).await,
        async |_, _| {},
        async |fleet, _| assert_loaded_exactly(fleet, "fleet_fault", "table_fault").await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_killed_at_each_step_replaces_the_table_with_each_row_once() {
    source_table("fleet_fault_cat", 8_000).await;
    fleet_killed_at_each_step(
        "faultcat",
        |_| config("fleet_fault_cat", "table_fault_cat"),
        &fleet_steps(),
        async |_, n| {
            add_rows("fleet_fault_cat", 20_001 + 1000 * n as i64, 1000).await;
            pg().await
                .batch_execute(&format!(
                    "DELETE FROM fleet_fault_cat.t WHERE id % 53 = {n};
                     UPDATE fleet_fault_cat.t SET name = name || '+' WHERE id % 41 = {n};"
                ))
                .await
                .unwrap();
        },
        async |_, _| {},
        async |fleet, _| assert_loaded_exactly(fleet, "fleet_fault_cat", "table_fault_cat").await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_killed_at_each_step_merges_each_key_once() {
    source_table("fleet_fault_merge", 8_000).await;
    let mut job = config("fleet_fault_merge", "table_fault_merge");
    job["load_type"] = json!("merge");
    job["timestamp_column"] = json!("seen");
    fleet_killed_at_each_step(
        "faultmerge",
        |_| job.clone(),
        &fleet_steps(),
        async |_, n| {
            // Changed keys move past every earlier change; new keys come after them.
            pg().await
                .batch_execute(&format!(
                    "UPDATE fleet_fault_merge.t SET name = 'renamed-{n}-' || id, amount = amount + 1,
                            seen = timestamptz '2025-01-01 00:00:00+00' + interval '{n} hour'
                     WHERE id % 17 = {n};
                     INSERT INTO fleet_fault_merge.t SELECT i, 'late-' || i, i,
                            timestamptz '2025-01-01 00:00:00+00' + interval '{n} hour'
                     FROM generate_series({}, {}) i",
                    20_001 + 500 * n,
                    20_500 + 500 * n
                ))
                .await
                .unwrap();
        },
        async |_, _| {},
        async |fleet, _| assert_loaded_exactly(fleet, "fleet_fault_merge", "table_fault_merge").await,
    )
    .await;
}

/// A file stream BigQuery loads itself (the fast path: no workers, one load job).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_killed_at_each_step_of_a_direct_file_load_loads_each_file_once() {
    use shardflow::fault::Step;
    let gcs = env_or_fail("STORAGE_EMULATOR_HOST");
    // File n holds ids 1000n to 1000n + 999; the files live in the fleet's own bucket.
    let put = async |fleet: &Fleet, n: usize| {
        let mut text = "id,name\n".to_string();
        for i in 1000 * n..1000 * (n + 1) {
            text.push_str(&format!("{i},name {i}\n"));
        }
        let response = reqwest::Client::new()
            .post(format!("{gcs}/upload/storage/v1/b/stage-{}/o", fleet.id))
            .query(&[
                ("uploadType", "media"),
                ("name", &format!("drops/part_{n:03}.csv")),
            ])
            .body(text)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    };
    let files = std::cell::Cell::new(0usize);
    let late = std::cell::Cell::new(0usize);
    let job = |fleet: &Fleet| {
        json!({
            "source_type": "gcs", "dest_table_name": "files_fault", "load_type": "transactional",
            "connection_params": {"bucket": format!("stage-{}", fleet.id), "endpoint": gcs},
            "file_path_prefix": "drops/", "file_pattern": "part_*",
            "file_format": "csv", "load_latest_only": false, "processing_mode": "dataflow",
            "bigquery_schema": [
                {"name": "id", "bigquery_type": "INT64", "bigquery_mode": "NULLABLE"},
                {"name": "name", "bigquery_type": "STRING", "bigquery_mode": "NULLABLE"}
            ]
        })
    };
    let steps = [
        Step::Planned,
        Step::LoadStarted,
        Step::LoadCommitted,
        Step::StateCommitted,
        Step::ReportSent,
    ];
    fleet_killed_at_each_step(
        "faultfiles",
        job,
        &steps,
        async |fleet, _| {
            put(fleet, files.get()).await;
            files.set(files.get() + 1);
        },
        // A file listed after the kill: the run that continues the dead one reads only what
        // that one selected (its load may have committed), so this file waits for the next.
        async |fleet, _| {
            put(fleet, files.get()).await;
            files.set(files.get() + 1);
            late.set(1);
        },
        async |fleet, step| {
            let loaded = if step == AFTER_EVERY_KILL {
                files.get()
            } else {
                files.get() - late.get()
            };
            let want: Vec<String> = (0..1000 * loaded)
                .map(|i| format!("{i}|name {i}"))
                .collect();
            let got = id_name_rows(fleet, "files_fault").await;
            assert_eq!(got.len(), want.len(), "rows after a kill at {step}");
            assert!(got == want, "content after a kill at {step}");
        },
    )
    .await;
}
