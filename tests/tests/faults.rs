//! The fault-injection suite (issue 18, point 10): `dispatcher run` is killed with SIGKILL at
//! each named step of a run (`SHARDFLOW_FAULT=<step>:kill`, read by debug builds only) for a
//! catalog, a transactional, a merge and a file job; the source changes before and after each
//! kill; the next runs must leave each source row in the destination exactly once (row count
//! and a content digest of every column), and no run `running`.

mod common;

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use common::*;
use serde_json::json;
use shardflow::fault::STEPS;
use shardflow::state::StateStore as _;

/// Small shards of small batches: every step is reached in every run (a shard of one batch
/// has no half-written moment), and the runs stay quick.
const FLAGS: [&str; 13] = [
    "--workers",
    "2",
    "--shard-rows",
    "4000",
    "--batch-size",
    "1000",
    "--no-progress",
    "--heartbeat-secs",
    "1",
    "--stale-after-secs",
    "2",
    "--version-grace-secs",
    "0",
];

struct Scenario {
    dir: PathBuf,
    job_file: PathBuf,
}

impl Scenario {
    fn new(name: &str, job: serde_json::Value) -> Self {
        let dir = scratch(name);
        let job_file = dir.join("job.json");
        std::fs::write(&job_file, job.to_string()).unwrap();
        Scenario { dir, job_file }
    }

    fn run(&self, fault: Option<&str>) -> Output {
        let mut command = Command::new(dispatcher_bin());
        command.args(dispatcher_run_args(&self.dir, &self.job_file, &FLAGS));
        match fault {
            Some(f) => command.env(shardflow::fault::FAULT_ENV, f),
            None => command.env_remove(shardflow::fault::FAULT_ENV),
        };
        command.output().expect("run the dispatcher")
    }

    fn completed(&self, why: &str) {
        let out = self.run(None);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| {
                panic!(
                    "{why}: {e}: {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert_eq!(report["status"], "completed", "{why}: {report}");
    }

    /// Killed at `step`: the process must die by SIGKILL there, or the step was never
    /// reached and the scenario tests nothing.
    fn killed_at(&self, step: &str) {
        let out = self.run(Some(&format!("{step}:kill")));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(9),
            "the run was not killed at {step} (exit {:?}):\n{stderr}",
            out.status
        );
        assert!(
            stderr.contains(&format!("injected fault: kill at {step}")),
            "{stderr}"
        );
    }

    fn table(&self, name: &str) -> PathBuf {
        self.dir.join("warehouse").join(name)
    }

    async fn nothing_left_running(&self, step: &str) {
        let state = shardflow::state::sql::SqlStateStore::open(&format!(
            "sqlite://{}",
            self.dir.join("state.db").display()
        ))
        .await
        .unwrap();
        let running = state.running_runs().await.unwrap();
        assert!(running.is_empty(), "after a kill at {step}: {running:?}");
    }
}

/// For each step: the source changes, a run is killed there, the source changes again, and
/// once the dead owner is stale two runs follow (the one that cleans up or takes over, and
/// the next, which must find nothing left to do twice).
async fn each_step(
    scenario: &Scenario,
    mut change: impl AsyncFnMut(usize),
    mut check: impl AsyncFnMut(&str),
) {
    scenario.completed("the first run");
    check("the first run").await;
    for (n, step) in STEPS.iter().enumerate() {
        let step = step.name();
        change(2 * n).await;
        scenario.killed_at(step);
        change(2 * n + 1).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        scenario.completed(&format!("the run after a kill at {step}"));
        scenario.completed(&format!("the second run after a kill at {step}"));
        check(step).await;
        scenario.nothing_left_running(step).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_load_killed_at_each_step_loads_each_row_once() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "fault_catalog").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.items (id bigint PRIMARY KEY, v text, at timestamptz);
         INSERT INTO {schema}.items
         SELECT i, 'item ' || i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 second'
         FROM generate_series(1, 12000) i;
         ANALYZE {schema}.items;"
    ))
    .await
    .unwrap();
    let scenario = Scenario::new(
        "fault-catalog",
        job_json(
            &schema,
            "items",
            "items",
            json!({"processing_mode": "dataflow"}),
        ),
    );
    let table = scenario.table("items");
    each_step(
        &scenario,
        async |n| {
            // Rows come, go and change between every two runs.
            let base = 20_000 + 1000 * n as i64;
            pg.batch_execute(&format!(
                "INSERT INTO {schema}.items
                 SELECT i, 'new ' || i, now() FROM generate_series({base}, {base} + 499) i;
                 DELETE FROM {schema}.items WHERE id % 97 = {};
                 UPDATE {schema}.items SET v = v || '+' WHERE id % 89 = {};",
                n % 97,
                n % 89
            ))
            .await
            .unwrap();
        },
        async |_| assert_same_content(&pg, &schema, "items", &table, "id").await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_load_killed_at_each_step_appends_each_row_once() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "fault_append").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.events (id bigint PRIMARY KEY, at timestamptz, note text);
         INSERT INTO {schema}.events
         SELECT i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute', 'event ' || i
         FROM generate_series(1, 12000) i;"
    ))
    .await
    .unwrap();
    let scenario = Scenario::new(
        "fault-append",
        job_json(
            &schema,
            "events",
            "events",
            json!({"load_type": "transactional", "timestamp_column": "at",
                   "historical_start_date": "2024-01-01", "processing_mode": "dataflow"}),
        ),
    );
    let table = scenario.table("events");
    each_step(
        &scenario,
        async |n| {
            // New events only, later than every earlier one.
            let from = 12_001 + 3000 * n as i64;
            pg.batch_execute(&format!(
                "INSERT INTO {schema}.events
                 SELECT i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute',
                        'event ' || i
                 FROM generate_series({from}, {from} + 2999) i;"
            ))
            .await
            .unwrap();
        },
        async |_| assert_same_content(&pg, &schema, "events", &table, "id").await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_load_killed_at_each_step_keeps_each_key_once_at_its_latest() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "fault_merge").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.accounts (id bigint PRIMARY KEY, balance numeric(12,2),
                                         updated_at timestamp NOT NULL);
         INSERT INTO {schema}.accounts
         SELECT i, i * 1.25, timestamp '2024-01-01' + i * interval '1 second'
         FROM generate_series(1, 12000) i;"
    ))
    .await
    .unwrap();
    let scenario = Scenario::new(
        "fault-merge",
        job_json(
            &schema,
            "accounts",
            "accounts",
            json!({"load_type": "merge", "timestamp_column": "updated_at",
                   "processing_mode": "dataflow"}),
        ),
    );
    let table = scenario.table("accounts");
    each_step(
        &scenario,
        async |n| {
            // Some keys change (later than every earlier change), some are new.
            let at = format!("timestamp '2025-01-01' + interval '{n} hour'");
            let from = 20_000 + 1000 * n as i64;
            pg.batch_execute(&format!(
                "UPDATE {schema}.accounts SET balance = balance + 1, updated_at = {at}
                 WHERE id % 13 = {};
                 INSERT INTO {schema}.accounts
                 SELECT i, i, {at} FROM generate_series({from}, {from} + 299) i;",
                n % 13
            ))
            .await
            .unwrap();
        },
        async |_| assert_same_content(&pg, &schema, "accounts", &table, "id").await,
    )
    .await;
}

/// `id,name` lines of a file's rows.
fn csv_rows(first: i64, count: i64) -> String {
    let mut out = String::from("id,name\n");
    for id in first..first + count {
        out.push_str(&format!("{id},\"name, {id}\"\n"));
    }
    out
}

/// (id, name) of every row of the table, sorted.
fn table_rows(dir: &Path) -> Vec<(i64, String)> {
    let mut rows = Vec::new();
    for batch in read_table(dir) {
        let ids = batch
            .column_by_name("id")
            .expect("id column")
            .as_primitive::<Int64Type>();
        let names = batch.column_by_name("name").expect("name column");
        let names = arrow::compute::cast(names, &arrow::datatypes::DataType::Utf8).unwrap();
        let names = names.as_string::<i32>();
        for i in 0..batch.num_rows() {
            rows.push((ids.value(i), names.value(i).to_string()));
        }
    }
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_stream_killed_at_each_step_loads_each_file_once() {
    let dir = scratch("fault-files-in");
    let files = dir.join("in");
    std::fs::create_dir_all(&files).unwrap();
    const ROWS: i64 = 3000;
    let mut written = 0i64;
    let add_file = |written: &mut i64| {
        let first = *written * ROWS;
        std::fs::write(
            files.join(format!("part-{:03}.csv", *written)),
            csv_rows(first, ROWS),
        )
        .unwrap();
        *written += 1;
    };
    for _ in 0..3 {
        add_file(&mut written);
    }
    let scenario = Scenario::new(
        "fault-files",
        json!({
            "source_type": "local", "dest_table_name": "loaded",
            "file_path_prefix": format!("{}/", files.display()), "file_pattern": "*.csv",
            "file_format": "csv", "load_type": "transactional", "load_latest_only": false,
            "processing_mode": "dataflow",
            "bigquery_schema": [
                {"name": "id", "bigquery_type": "INT64", "bigquery_mode": "NULLABLE"},
                {"name": "name", "bigquery_type": "STRING", "bigquery_mode": "NULLABLE"}
            ]
        }),
    );
    let table = scenario.table("loaded");
    let written = std::cell::Cell::new(written);
    each_step(
        &scenario,
        async |_| {
            let mut n = written.get();
            add_file(&mut n);
            written.set(n);
        },
        async |step| {
            let want: Vec<(i64, String)> = (0..written.get() * ROWS)
                .map(|id| (id, format!("name, {id}")))
                .collect();
            let got = table_rows(&table);
            assert_eq!(got.len(), want.len(), "rows after a kill at {step}");
            assert!(got == want, "content after a kill at {step}");
        },
    )
    .await;
}

/// Risk (issue 18, point 9): a superseded run whose append committed, and which nothing
/// continued yet (its taker died, or another job of the stream got in first), must not have
/// its window read again under another job's key. The next job of the stream continues it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_run_that_nothing_continued_is_continued_not_read_again() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "fault_orphan").await;
    let add = |from: i64, to: i64| {
        format!(
            "INSERT INTO {schema}.events
             SELECT i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute', 'event ' || i
             FROM generate_series({from}, {to}) i;"
        )
    };
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.events (id bigint PRIMARY KEY, at timestamptz, note text); {}",
        add(1, 8000)
    ))
    .await
    .unwrap();
    let scenario = Scenario::new(
        "fault-orphan",
        job_json(
            &schema,
            "events",
            "events",
            json!({"load_type": "transactional", "timestamp_column": "at",
                   "historical_start_date": "2024-01-01", "processing_mode": "dataflow"}),
        ),
    );
    let table = scenario.table("events");
    scenario.completed("the first run");
    pg.batch_execute(&add(8001, 12000)).await.unwrap();
    // Its append commits, then it dies; a dispatcher that took it over died before
    // continuing it: the run is superseded and the stream's newest.
    scenario.killed_at("load_committed");
    let db = format!("sqlite://{}", scenario.dir.join("state.db").display());
    sqlx::any::install_default_drivers();
    let state = sqlx::AnyPool::connect(&db).await.unwrap();
    let dead: String = sqlx::query_scalar(
        "UPDATE shardflow_runs SET status = 'superseded', error_message = 'superseded: test'
         WHERE status = 'running' RETURNING job_key",
    )
    .fetch_one(&state)
    .await
    .unwrap();
    pg.batch_execute(&add(12001, 13000)).await.unwrap();

    let out = scenario.run(None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(report["status"], "completed", "{report}");
    assert!(
        report["run_id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{dead}.")),
        "continued under the dead run's key: {report}"
    );
    // Its committed append is not made again; the rows after its window wait for the next.
    assert_eq!(
        read_table(&table)
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>(),
        12000
    );
    scenario.completed("the next run");
    assert_same_content(&pg, &schema, "events", &table, "id").await;
}

/// Risk (issue 18, point 9): a shard delivered again after its run ended (Pub/Sub may) is
/// extracted and staged by a worker, and nobody loads it; the sweep removes its parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_duplicate_shard_leaves_parts_the_sweep_removes() {
    let ended = an_ended_one_shard_run("late").await;
    let (scenario, run_id) = (&ended.scenario, &ended.run_id);
    let staging = scenario.dir.join("warehouse/_staging");
    assert!(walk(&staging).is_empty(), "the run cleaned its staging");
    run_shard(&ended.config, &ended.shard, &staging);
    assert!(
        walk(&staging.join(run_id))
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "parquet")),
        "the late delivery staged parts"
    );
    let gc = Command::new(dispatcher_bin())
        .args(["gc", "--dest"])
        .arg(scenario.dir.join("warehouse"))
        .arg("--state")
        .arg(&ended.db)
        .output()
        .unwrap();
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert_eq!(report["staging_removed"], json!([run_id]), "{report}");
    assert!(walk(&staging).is_empty());
    assert_same_content(
        &ended.pg,
        &ended.schema,
        "items",
        &scenario.table("items"),
        "id",
    )
    .await;
}

/// A completed run of one shard over a 3,000-row table, and that shard's task and job as
/// `worker run-shard` takes them: a delivery of the shard that comes again.
struct EndedShard {
    pg: tokio_postgres::Client,
    schema: Scoped,
    scenario: Scenario,
    /// The run's state store.
    db: String,
    run_id: String,
    shard: PathBuf,
    config: PathBuf,
}

async fn an_ended_one_shard_run(name: &str) -> EndedShard {
    let pg = pg().await;
    let schema = fresh_schema(&pg, &format!("fault_{name}")).await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.items (id bigint PRIMARY KEY, v text);
         INSERT INTO {schema}.items SELECT i, 'item ' || i FROM generate_series(1, 3000) i;"
    ))
    .await
    .unwrap();
    let job = job_json(&schema, "items", "items", json!({}));
    let scenario = Scenario::new(&format!("fault-{name}"), job.clone());
    scenario.completed("the run");
    let db = format!("sqlite://{}", scenario.dir.join("state.db").display());
    sqlx::any::install_default_drivers();
    let state = sqlx::AnyPool::connect(&db).await.unwrap();
    let (run_id, task): (String, String) =
        sqlx::query_as("SELECT run_id, task_json FROM shardflow_shards")
            .fetch_one(&state)
            .await
            .unwrap();
    let shard = scenario.dir.join("shard.json");
    std::fs::write(&shard, task).unwrap();
    let config = scenario.dir.join("config.json");
    std::fs::write(&config, job.to_string()).unwrap();
    EndedShard {
        pg,
        schema,
        scenario,
        db,
        run_id,
        shard,
        config,
    }
}

/// `worker run-shard`: one extraction of `shard` into `staging`; what it printed (the files
/// and the content checksum of the rows it read).
fn run_shard(config: &Path, shard: &Path, staging: &Path) -> serde_json::Value {
    let worker = dispatcher_bin().with_file_name("worker");
    let out = Command::new(&worker)
        .args(["run-shard", "--job"])
        .arg(config)
        .arg("--shard")
        .arg(shard)
        .arg("--staging")
        .arg(staging)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", worker.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

/// Risk: a shard delivered twice (Pub/Sub delivers at least once; a lease can lapse mid-shard)
/// is extracted twice, and a source without one snapshot for both reads (MySQL's consistent
/// snapshot is per connection; a file can be rewritten) gives the second extraction other rows.
/// If it wrote over the parts the first result names, the load would read rows no result
/// counted. Each extraction writes its own parts: the first ones stay byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_extraction_of_a_shard_never_rewrites_the_parts_of_the_first() {
    let ended = an_ended_one_shard_run("twice").await;
    let (pg, schema) = (&ended.pg, &ended.schema);
    let staging = ended.scenario.dir.join("twice-staging");
    let paths = |printed: &serde_json::Value| -> Vec<String> {
        printed["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap().to_string())
            .collect()
    };

    let first = run_shard(&ended.config, &ended.shard, &staging);
    let first_paths = paths(&first);
    assert!(!first_paths.is_empty(), "{first}");
    let first_bytes: Vec<Vec<u8>> = first_paths
        .iter()
        .map(|p| std::fs::read(staging.join(p)).unwrap())
        .collect();
    pg.batch_execute(&format!(
        "UPDATE {schema}.items SET v = 'changed ' || id;
         INSERT INTO {schema}.items SELECT i, 'new ' || i FROM generate_series(3001, 3500) i;"
    ))
    .await
    .unwrap();
    let second = run_shard(&ended.config, &ended.shard, &staging);
    assert_ne!(
        first["checksum"], second["checksum"],
        "the second extraction read other rows (the premise of this test)"
    );
    let second_paths = paths(&second);
    assert!(
        second_paths.iter().all(|p| !first_paths.contains(p)),
        "{first_paths:?} {second_paths:?}"
    );
    for (path, bytes) in first_paths.iter().zip(&first_bytes) {
        assert!(
            std::fs::read(staging.join(path)).unwrap() == *bytes,
            "{path} was rewritten by the second extraction"
        );
    }
}
