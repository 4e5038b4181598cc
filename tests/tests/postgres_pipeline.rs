//! PostgreSQL → planned shards → workers → Parquet table, against the running PostgreSQL.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, TimeUnit, TimestampMicrosecondType,
};
use common::*;
use serde_json::json;
use shardflow::plan::{fit_to_workers, imbalance, shard_count};
use shardflow::queue::embedded::EmbeddedOptions;
use shardflow::retry::RetryPolicy;
use shardflow::state::RunStatus;
use shardflow_dispatcher::{PlanOptions, QueueChoice, RunOptions, plan_job, run_job};

/// Options with an exact count, so shard counts do not depend on ANALYZE's sampling.
fn exact(dir: &std::path::Path, shard_rows: u64) -> RunOptions {
    let mut o = options(dir, shard_rows);
    o.plan.exact_count = true;
    o
}

fn options(dir: &std::path::Path, shard_rows: u64) -> RunOptions {
    RunOptions {
        plan: PlanOptions {
            shard_rows,
            workers: None,
            exact_count: false,
            retry: RetryPolicy::none(),
            warehouse_loads_gcs: false,
            ..Default::default()
        },
        workers: 2,
        dest: dir.join("warehouse").display().to_string(),
        staging: None,
        state_url: format!("sqlite://{}", dir.join("state.db").display()),
        ..Default::default()
    }
}

/// Every supported type, NULLs in every nullable column.
const WIDE_COLUMNS: &str = "
    id bigint PRIMARY KEY, small smallint, num integer, amount numeric(12,2), ratio real,
    score double precision, flag boolean, name text, code varchar(20), country char(5),
    day date, created timestamp, paid timestamptz, ref uuid, doc json, attrs jsonb, blob bytea,
    big numeric";

/// Creates `schema.table` with every supported type and `rows` rows, NULLs in every nullable
/// column, keyed by `key_expr` over `i`, and analyses it.
async fn create_wide_table(
    pg: &tokio_postgres::Client,
    schema: &str,
    table: &str,
    rows: u64,
    key_expr: &str,
    primary_key: bool,
) {
    let columns = if primary_key {
        WIDE_COLUMNS.to_string()
    } else {
        WIDE_COLUMNS.replace("id bigint PRIMARY KEY", "id bigint")
    };
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.{table} ({columns});
         INSERT INTO {schema}.{table} {} FROM generate_series(1, {rows}) AS i;
         ANALYZE {schema}.{table};",
        wide_select(key_expr)
    ))
    .await
    .unwrap();
}

fn wide_select(key_expr: &str) -> String {
    format!(
        "SELECT {key_expr},
           CASE WHEN i % 7 = 1 THEN NULL ELSE (i % 30000 - 15000)::smallint END,
           CASE WHEN i % 7 = 2 THEN NULL ELSE i * 3 END,
           CASE WHEN i % 7 = 3 THEN NULL ELSE round((i % 100000) / 7.0 - 5000, 2) END,
           CASE WHEN i % 7 = 4 THEN NULL ELSE (i % 1000) / 3.0 END,
           CASE WHEN i % 7 = 5 THEN NULL ELSE i / 7.0 END,
           CASE WHEN i % 7 = 6 THEN NULL ELSE i % 2 = 0 END,
           CASE WHEN i % 11 = 0 THEN NULL WHEN i % 11 = 1 THEN '' ELSE 'name ' || i || ' ✓🦀' END,
           CASE WHEN i % 13 = 0 THEN NULL ELSE 'c' || (i % 977) END,
           CASE WHEN i % 17 = 0 THEN NULL ELSE left(md5(i::text), 1 + i % 5) END,
           CASE WHEN i % 19 = 0 THEN NULL ELSE date '1990-01-01' + (i % 20000) END,
           CASE WHEN i % 23 = 0 THEN NULL ELSE timestamp '2001-02-03 04:05:06.789012' + i * interval '1.000001 second' END,
           CASE WHEN i % 29 = 0 THEN NULL ELSE timestamptz '2020-01-01 00:00:00+02' + i * interval '7.5 seconds' END,
           CASE WHEN i % 31 = 0 THEN NULL ELSE md5('u' || i)::uuid END,
           CASE WHEN i % 37 = 0 THEN NULL ELSE ('{{\"n\": ' || i || ',  \"k\": \"v\"}}')::json END,
           CASE WHEN i % 41 = 0 THEN NULL ELSE jsonb_build_object('i', i, 'a', jsonb_build_array(i % 3, 'x')) END,
           CASE WHEN i % 43 = 0 THEN NULL WHEN i % 43 = 1 THEN ''::bytea ELSE decode(md5(i::text), 'hex') END,
           CASE WHEN i % 47 = 0 THEN NULL ELSE (i::numeric * 1000000000000000000000 + 1) / 1024 END"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_skewed_rows_shard_evenly_and_load_exactly() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_skewed").await;
    // 90% of the keys are dense (1..900k), the rest spread over nine orders of magnitude.
    let skewed_key = "CASE WHEN i <= 900000 THEN i::bigint ELSE (i::bigint - 900000) * 10000000 + 5000000000 END";
    create_wide_table(&pg, &schema, "orders", 1_000_000, skewed_key, true).await;

    let spec = job(&schema, "orders", "orders", json!({}));
    let dir = scratch("skewed");

    // The estimate, without a scan, is within 10% of the truth after ANALYZE.
    let plan = plan_job(&spec, &options(&dir, 100_000).plan).await.unwrap();
    let truth = count(&pg, &schema, "orders").await as f64;
    let error = (plan.estimated_rows as f64 - truth).abs() / truth;
    assert!(error <= 0.10, "estimate {} vs {truth}", plan.estimated_rows);
    assert!(
        plan.estimate_source.starts_with("pg_class.reltuples"),
        "{}",
        plan.estimate_source
    );
    assert_eq!(plan.split_column.as_deref(), Some("id"));
    // 10 shards, or 11 when ANALYZE's estimate lands a little above a million.
    let planned = shard_count(plan.estimated_rows, 100_000);
    assert!((10..=11).contains(&planned), "{planned}");
    assert_eq!(plan.shards.len(), planned);

    let report = run_job(spec, options(&dir, 100_000)).await;
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
    // The run knows its 2 workers and rounds the shard count up to a multiple of them.
    assert_eq!(report.shards, fit_to_workers(planned, 2));
    assert_eq!(report.shard_rows.len(), report.shards);
    assert_eq!(report.rows_extracted, 1_000_000);
    assert_eq!(report.rows_loaded, 1_000_000);
    let balance = imbalance(&report.shard_rows);
    assert!(
        balance <= 1.5,
        "largest shard is {balance:.2}x the mean: {:?}",
        report.shard_rows
    );
    assert_same_content(&pg, &schema, "orders", &dir.join("warehouse/orders"), "id").await;
    // Staging is gone after success.
    let staging = dir.join("warehouse/_staging").join(&report.run_id);
    assert!(
        !staging.exists(),
        "staging left behind at {}",
        staging.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_without_a_key_is_cut_into_ctid_ranges() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_keyless").await;
    create_wide_table(&pg, &schema, "events", 200_000, "i::bigint", false).await;
    let spec = job(
        &schema,
        "events",
        "events",
        json!({"timestamp_column": "created"}),
    );
    let dir = scratch("keyless");
    let plan = plan_job(&spec, &exact(&dir, 40_000).plan).await.unwrap();
    assert_eq!(
        (plan.estimated_rows, plan.estimate_source.as_str()),
        (200_000, "count(*)")
    );
    assert_eq!(plan.split_method, "ctid");
    assert_eq!(plan.shards.len(), 5);
    let report = run_job(spec, exact(&dir, 40_000)).await;
    assert_eq!(report.shards, 6, "5 rounded up for 2 workers");
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
    assert_eq!(report.rows_loaded, 200_000);
    assert!(
        imbalance(&report.shard_rows) <= 1.5,
        "{:?}",
        report.shard_rows
    );
    assert_same_content(&pg, &schema, "events", &dir.join("warehouse/events"), "id").await;

    // The run's checksum is that of the rows in the destination, and the watermark is the
    // source's largest `created`.
    let loaded = read_table(&dir.join("warehouse/events"));
    assert_eq!(
        report.checksum.as_deref(),
        Some(content_checksum(&loaded).as_str())
    );
    let newest: String = pg
        .query_one(
            &format!(
                "SELECT to_char(max(created), 'YYYY-MM-DD\"T\"HH24:MI:SS.US') FROM {schema}.events"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(report.watermark.as_deref(), Some(newest.as_str()));

    // One shard instead of six: the same checksum and watermark.
    let single_dir = scratch("keyless-single");
    let single = run_job(
        job(
            &schema,
            "events",
            "events",
            json!({"timestamp_column": "created"}),
        ),
        exact(&single_dir, 1_000_000),
    )
    .await;
    assert_eq!(single.status, RunStatus::Completed, "{single:?}");
    assert_eq!(single.shards, 1);
    assert_eq!(
        (single.checksum, single.watermark),
        (report.checksum, report.watermark)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_uuid_key_is_cut_by_rank() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_uuid").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.docs (id uuid PRIMARY KEY, n integer, body text);
         INSERT INTO {schema}.docs SELECT md5('doc' || i)::uuid, i,
                CASE WHEN i % 9 = 0 THEN NULL ELSE repeat('x', i % 50) END
         FROM generate_series(1, 200000) AS i;
         ANALYZE {schema}.docs;"
    ))
    .await
    .unwrap();
    let spec = job(&schema, "docs", "docs", json!({}));
    let dir = scratch("uuid");
    let plan = plan_job(&spec, &exact(&dir, 25_000).plan).await.unwrap();
    assert_eq!(plan.split_column.as_deref(), Some("id"));
    assert!(
        matches!(plan.split_method.as_str(), "histogram" | "sample"),
        "{}",
        plan.split_method
    );
    assert_eq!(plan.shards.len(), 8);
    let report = run_job(spec, exact(&dir, 25_000)).await;
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
    assert_eq!(report.shards, 8);
    assert_eq!(report.rows_loaded, 200_000);
    assert!(
        imbalance(&report.shard_rows) <= 1.5,
        "{:?}",
        report.shard_rows
    );
    assert_same_content(&pg, &schema, "docs", &dir.join("warehouse/docs"), "id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_shard_delivered_twice_still_loads_each_row_once() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_dupes").await;
    create_wide_table(&pg, &schema, "t", 100_000, "i::bigint", true).await;
    let dir = scratch("dupes");
    let mut opts = exact(&dir, 25_000);
    opts.queue = QueueChoice::Embedded(EmbeddedOptions {
        duplicate_every_message: true,
    });
    let report = run_job(job(&schema, "t", "t", json!({})), opts).await;
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
    assert_eq!(report.shards, 4);
    // Each shard ran twice and reported twice; the second result of each was ignored.
    assert!(report.duplicate_results_ignored >= 1, "{report:?}");
    assert_eq!(report.rows_loaded, 100_000);
    assert_same_content(&pg, &schema, "t", &dir.join("warehouse/t"), "id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_run_leaves_the_old_table_and_a_rerun_completes() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_kill").await;
    create_wide_table(&pg, &schema, "t", 400_000, "i::bigint", true).await;
    let dir = scratch("kill");
    let table_dir = dir.join("warehouse/t");
    let first = run_job(job(&schema, "t", "t", json!({})), options(&dir, 50_000)).await;
    assert_eq!(first.status, RunStatus::Completed, "{first:?}");
    let before = table_listing(&table_dir);
    let old_checks = destination_checks(&read_table(&table_dir), "id");

    // The source changes, then a run starts and is killed with SIGKILL mid-way.
    pg.batch_execute(&format!(
        "UPDATE {schema}.t SET name = 'changed' WHERE id % 3 = 0"
    ))
    .await
    .unwrap();
    let job_file = dir.join("job.json");
    std::fs::write(
        &job_file,
        job_json(&schema, "t", "t", json!({})).to_string(),
    )
    .unwrap();
    // Wait until it has staged at least one part, then kill it.
    kill_once_it_staged(
        &dir,
        dispatcher_run(
            &dir,
            &job_file,
            &["--workers", "1", "--shard-rows", "50000", "--no-progress"],
        ),
        Duration::ZERO,
    )
    .await;
    assert_eq!(
        table_listing(&table_dir),
        before,
        "the killed run changed the table's files"
    );
    assert_eq!(
        destination_checks(&read_table(&table_dir), "id"),
        old_checks
    );

    let rerun = run_job(job(&schema, "t", "t", json!({})), options(&dir, 50_000)).await;
    assert_eq!(rerun.status, RunStatus::Completed, "{rerun:?}");
    assert_same_content(&pg, &schema, "t", &table_dir, "id").await;
}

/// A `dispatcher run` of an incremental stream killed mid-way leaves its run `running`. The
/// next run names who holds the stream and until when; once the dead owner's heartbeat is
/// stale, the next run takes the stream over, and every row arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_incremental_run_is_taken_over_once_its_owner_is_stale() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_kill_stream").await;
    create_events(&pg, &schema, 300_000).await;
    let dir = scratch("kill-stream");
    let job_file = dir.join("job.json");
    let config = job_json(
        &schema,
        "events",
        "events",
        json!({"load_type": "transactional", "timestamp_column": "at",
               "historical_start_date": "2024-01-01"}),
    );
    std::fs::write(&job_file, config.to_string()).unwrap();
    let run = || {
        dispatcher_run(
            &dir,
            &job_file,
            &[
                "--workers",
                "1",
                "--shard-rows",
                "50000",
                "--no-progress",
                "--heartbeat-secs",
                "1",
                "--stale-after-secs",
                "4",
            ],
        )
    };
    let report_of = |out: &std::process::Output| -> serde_json::Value {
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
    };
    kill_once_it_staged(&dir, run(), Duration::ZERO).await;

    // At once: the dead run still holds the stream, and the refusal says until when.
    let held = run().output().unwrap();
    assert_eq!(held.status.code(), Some(1));
    let why = report_of(&held)["error_message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("for another job of the same incremental stream (last heartbeat ")
            && why.contains("the stream is taken over if no heartbeat comes by "),
        "{why}"
    );

    // Once the dead owner is stale: taken over, every row once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let taken = run().output().unwrap();
    let report = report_of(&taken);
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["rows_loaded"], 300_000);
    let table = dir.join("warehouse/events");
    assert_same_content(&pg, &schema, "events", &table, "id").await;

    // The stream goes on from there: the new rows only.
    add_events(&pg, &schema, 300_001, 300_010).await;
    let next = report_of(&run().output().unwrap());
    assert_eq!(next["status"], "completed", "{next}");
    assert_eq!(next["rows_loaded"], 10);
    assert_same_content(&pg, &schema, "events", &table, "id").await;
}

/// Bytes under `dir`, each file once however many links name it; links are not followed.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![dir.to_path_buf()];
    let mut bytes = 0;
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if meta.is_dir() {
                todo.push(entry.path());
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                bytes += meta.len();
            }
        }
    }
    bytes
}

/// What killed runs leave is swept (issue 18, debris): after runs killed at several moments,
/// the next run closes them as `abandoned` and removes their staged parts and half-built
/// versions, so the destination stays within 1.2x of the table; `dispatcher gc` does the same
/// without a run, and says what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_killed_runs_leave_is_swept_and_their_runs_are_closed() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_debris").await;
    create_wide_table(&pg, &schema, "t", 120_000, "i::bigint", true).await;
    let dir = scratch("debris");
    let job_file = dir.join("job.json");
    std::fs::write(
        &job_file,
        job_json(&schema, "t", "t", json!({"processing_mode": "dataflow"})).to_string(),
    )
    .unwrap();
    let flags = [
        "--workers",
        "2",
        "--shard-rows",
        "10000",
        "--no-progress",
        "--heartbeat-secs",
        "1",
        "--stale-after-secs",
        "2",
        "--version-grace-secs",
        "0",
    ];
    let run = || dispatcher_run(&dir, &job_file, &flags);
    let warehouse = dir.join("warehouse");
    let table = warehouse.join("t");
    let first = run().output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // Killed once a part is staged, and at later moments of extraction.
    const KILLS: usize = 6;
    for kill in 0..KILLS {
        // A later moment each time: more parts staged (or the run already done).
        kill_once_it_staged(&dir, run(), Duration::from_millis(100 * kill as u64)).await;
    }
    let littered = disk_bytes(&warehouse);
    let table_bytes: u64 = table_listing(&table).iter().map(|f| f.1).sum();
    assert!(
        littered as f64 > 1.2 * table_bytes as f64,
        "the kills left too little to tell ({littered} bytes for a {table_bytes}-byte table)"
    );
    // Past the dead owners' staleness, the next run sweeps before it starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let last = run().output().unwrap();
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    assert_same_content(&pg, &schema, "t", &table, "id").await;
    let table_bytes: u64 = table_listing(&table).iter().map(|f| f.1).sum();
    let swept = disk_bytes(&warehouse);
    assert!(
        swept as f64 <= 1.2 * table_bytes as f64,
        "{swept} bytes on disk for a {table_bytes}-byte table: {:?}",
        walk(&warehouse)
    );
    let state = shardflow::state::sql::SqlStateStore::open(&format!(
        "sqlite://{}",
        dir.join("state.db").display()
    ))
    .await
    .unwrap();
    use shardflow::state::StateStore as _;
    assert_eq!(
        state.running_runs().await.unwrap(),
        vec![],
        "no run is left running"
    );
    let statuses = sqlx_statuses(&dir).await;
    assert_eq!(
        statuses,
        vec![
            ("abandoned".to_string(), KILLS as i64),
            ("completed".to_string(), 2)
        ],
        "each killed run is closed as abandoned"
    );

    // `dispatcher gc`, with no run: one more killed run, swept and reported.
    kill_once_it_staged(&dir, run(), Duration::ZERO).await;
    assert!(disk_bytes(&warehouse) > swept, "the kill left parts");
    let gc = |stale: &str| {
        let out = Command::new(dispatcher_bin())
            .args(["gc", "--dest"])
            .arg(&warehouse)
            .arg("--state")
            .arg(format!("sqlite://{}", dir.join("state.db").display()))
            .args(["--stale-after-secs", stale, "--version-grace-secs", "0"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // While its owner could still be alive, nothing of it goes.
    let early = gc("3600");
    assert_eq!(early["abandoned_runs"], json!([]), "{early}");
    assert_eq!(early["staging_removed"], json!([]), "{early}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = gc("2");
    let abandoned = report["abandoned_runs"].as_array().unwrap();
    assert_eq!(abandoned.len(), 1, "{report}");
    assert_eq!(report["staging_removed"], json!(abandoned), "{report}");
    assert_eq!(report["errors"], json!([]), "{report}");
    assert!(disk_bytes(&warehouse) as f64 <= 1.2 * table_bytes as f64);
    assert_same_content(&pg, &schema, "t", &table, "id").await;
    // Nothing left to do.
    let again = gc("2");
    assert_eq!(
        (
            &again["abandoned_runs"],
            &again["staging_removed"],
            &again["warehouse_removed"]
        ),
        (&json!([]), &json!([]), &json!([])),
        "{again}"
    );
}

/// Starts a `dispatcher run`, waits until it staged a part of its own (other runs' parts may
/// be there), then `after` more, and kills it with SIGKILL.
async fn kill_once_it_staged(dir: &std::path::Path, mut run: Command, after: Duration) {
    let staging = dir.join("warehouse/_staging");
    let runs_in = |staging: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(staging)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    let before = runs_in(&staging);
    let mut child = run
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !runs_in(&staging).iter().any(|r| {
        !before.contains(r)
            && walk(r)
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == "parquet"))
    }) {
        assert!(Instant::now() < deadline, "the run never staged a part");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(after).await;
    let _ = child.kill();
    child.wait().unwrap();
}

/// How many runs the dispatcher's SQLite state store holds in each status.
async fn sqlx_statuses(dir: &std::path::Path) -> Vec<(String, i64)> {
    use sqlx::Row as _;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", dir.join("state.db").display()))
        .await
        .unwrap();
    sqlx::query("SELECT status, COUNT(*) AS n FROM shardflow_runs GROUP BY status ORDER BY status")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<String, _>("status"), r.get::<i64, _>("n")))
        .collect()
}

/// What a swap publishes is on disk first (issue 18, durability): traced with strace, every
/// file of the new version is fsynced, then the directory naming them and the one naming
/// that, before the exchange of links that makes it the table; the root is fsynced after it.
#[tokio::test]
async fn a_swap_publishes_only_what_is_on_disk() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_fsync").await;
    create_wide_table(&pg, &schema, "t", 20_000, "i::bigint", true).await;
    let dir = scratch("fsync");
    let job_file = dir.join("job.json");
    std::fs::write(
        &job_file,
        job_json(&schema, "t", "t", json!({"processing_mode": "dataflow"})).to_string(),
    )
    .unwrap();
    let traced = |name: &str, job_file: &std::path::Path| {
        let trace = dir.join(name);
        let status = Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-y",
                "-e",
                "trace=fsync,rename,renameat,renameat2",
                "-o",
            ])
            .arg(&trace)
            .arg(dispatcher_bin())
            .args(dispatcher_run_args(
                &dir,
                job_file,
                &["--shard-rows", "5000", "--no-progress"],
            ))
            .stdout(Stdio::null())
            .status()
            .expect("strace (Debian's strace package) runs the dispatcher");
        assert!(status.success());
        std::fs::read_to_string(trace).unwrap()
    };
    let exchange_in = |trace: &str| {
        trace
            .lines()
            .position(|l| l.contains("renameat2(") && l.contains("RENAME_EXCHANGE"))
            .unwrap_or_else(|| panic!("no exchange in:\n{trace}"))
    };
    let synced_before = |lines: &[&str], exchange: usize, table: &str, name: &str| {
        lines[..exchange].iter().any(|l| {
            l.contains("fsync(")
                && l.contains(&format!("/.shardflow-versions/{table}/"))
                && l.contains(&format!("/{name}>"))
        })
    };
    traced("first.trace", &job_file);
    // The second load replaces the table: the exchange of two links to versions.
    let trace = traced("second.trace", &job_file);
    let lines: Vec<&str> = trace.lines().collect();
    let exchange = exchange_in(&trace);
    let table = dir.join("warehouse/t");
    let files = table_listing(&table);
    assert!(files.len() >= 4, "{files:?}");
    for (name, _) in &files {
        assert!(
            synced_before(&lines, exchange, "t", name),
            "{name} was not fsynced before the exchange:\n{trace}"
        );
    }
    let version = table.canonicalize().unwrap();
    let dir_synced = |dir: &std::path::Path| {
        let fd = format!("<{}>", dir.display());
        lines[..exchange]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&fd))
    };
    assert!(
        version
            .parent()
            .is_some_and(|p| p.ends_with(".shardflow-versions/t")),
        "{version:?}"
    );
    assert!(
        dir_synced(&version),
        "the new version's directory was not fsynced:\n{trace}"
    );
    assert!(
        dir_synced(version.parent().unwrap()),
        "the directory naming the new version was not fsynced:\n{trace}"
    );
    // strace shows the kernel's path: no `..`.
    let root = format!(
        "<{}>",
        dir.join("warehouse").canonicalize().unwrap().display()
    );
    assert!(
        lines[exchange..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&root)),
        "the root was not fsynced after the exchange:\n{trace}"
    );
    assert_same_content(&pg, &schema, "t", &table, "id").await;

    // An append links the table's files again: only its own new parts are fsynced.
    create_events(&pg, &schema, 10_000).await;
    let events_job = dir.join("events.json");
    std::fs::write(
        &events_job,
        job_json(
            &schema,
            "events",
            "events",
            json!({"load_type": "transactional", "timestamp_column": "at",
                   "processing_mode": "dataflow"}),
        )
        .to_string(),
    )
    .unwrap();
    traced("append-1.trace", &events_job);
    let events = dir.join("warehouse/events");
    let before: Vec<String> = table_listing(&events).into_iter().map(|f| f.0).collect();
    add_events(&pg, &schema, 10_001, 12_000).await;
    let trace = traced("append-2.trace", &events_job);
    let lines: Vec<&str> = trace.lines().collect();
    let exchange = exchange_in(&trace);
    let after: Vec<String> = table_listing(&events).into_iter().map(|f| f.0).collect();
    let added: Vec<&String> = after.iter().filter(|f| !before.contains(f)).collect();
    assert!(
        !added.is_empty() && !before.is_empty(),
        "{before:?} {after:?}"
    );
    for name in &added {
        assert!(
            synced_before(&lines, exchange, "events", name),
            "{name} was not fsynced:\n{trace}"
        );
    }
    for name in &before {
        assert!(
            !synced_before(&lines, exchange, "events", name),
            "{name} was already durable, yet fsynced again:\n{trace}"
        );
    }
    assert_same_content(&pg, &schema, "events", &events, "id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_with_exact_values() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_types").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.types ({WIDE_COLUMNS});
         INSERT INTO {schema}.types VALUES
         (1, -32768, -2147483648, -9999999999.99, -3.4028235e38, -1.7976931348623157e308, true,
          '', '', 'ab', '0001-01-01', '0001-01-01 00:00:00', '1970-01-01 00:00:00+00',
          '00000000-0000-0000-0000-000000000000', '{{\"b\": 1,   \"a\": [1, 2]}}', '{{\"b\": 1, \"a\": [1, 2]}}',
          '\\x', '-0.000000000000000000000000000001'),
         (2, 32767, 2147483647, 9999999999.99, 'NaN', 'Infinity', false,
          'quote''s \"🦀\" \\ tab\t end', 'héllo', 'abcde', '9999-12-31', '2024-02-29 23:59:59.999999',
          '2024-06-30 23:59:59.999999-07:30', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '[]', '{{}}',
          '\\x00ff10', '123456789012345678901234567890123456789012.5'),
         (3, 0, 0, -0.01, '-0', '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'NaN'),
         (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
         INSERT INTO {schema}.types (id, day, created, paid) VALUES
         (5, 'infinity', 'infinity', 'infinity'), (6, '-infinity', '-infinity', '-infinity');"
    ))
    .await
    .unwrap();
    let dir = scratch("types");
    let report = run_job(
        job(
            &schema,
            "types",
            "types",
            json!({"processing_mode": "standard"}),
        ),
        options(&dir, 1_000),
    )
    .await;
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
    let batches = read_table(&dir.join("warehouse/types"));
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let b = arrow::compute::take_record_batch(
        &b,
        &arrow::compute::sort_to_indices(b.column(0), None, None).unwrap(),
    )
    .unwrap();
    let schema_ref = b.schema();
    let types: Vec<(&str, &DataType)> = schema_ref
        .fields()
        .iter()
        .map(|f| (f.name().as_str(), f.data_type()))
        .collect();
    assert_eq!(
        types,
        vec![
            ("id", &DataType::Int64),
            ("small", &DataType::Int16),
            ("num", &DataType::Int32),
            ("amount", &DataType::Decimal128(12, 2)),
            ("ratio", &DataType::Float32),
            ("score", &DataType::Float64),
            ("flag", &DataType::Boolean),
            ("name", &DataType::Utf8),
            ("code", &DataType::Utf8),
            ("country", &DataType::Utf8),
            ("day", &DataType::Date32),
            ("created", &DataType::Timestamp(TimeUnit::Microsecond, None)),
            (
                "paid",
                &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            ),
            ("ref", &DataType::Utf8),
            ("doc", &DataType::Utf8),
            ("attrs", &DataType::Utf8),
            ("blob", &DataType::Binary),
            ("big", &DataType::Utf8),
        ]
    );
    let meta = |name: &str| {
        schema_ref
            .field_with_name(name)
            .unwrap()
            .metadata()
            .get("shardflow.source_type")
            .cloned()
    };
    assert_eq!(meta("amount").as_deref(), Some("numeric(12,2)"));
    assert_eq!(meta("attrs").as_deref(), Some("jsonb"));
    assert_eq!(meta("big").as_deref(), Some("numeric"));

    let col = |name: &str| b.column_by_name(name).unwrap().clone();
    assert_eq!(
        col("small").as_primitive::<Int16Type>().values().to_vec()[..3],
        [-32768, 32767, 0]
    );
    assert_eq!(
        col("num").as_primitive::<Int32Type>().values().to_vec()[..3],
        [i32::MIN, i32::MAX, 0]
    );
    let amount = col("amount");
    let amount = amount.as_primitive::<Decimal128Type>();
    assert_eq!(
        (amount.value(0), amount.value(1), amount.value(2)),
        (-999_999_999_999, 999_999_999_999, -1)
    );
    let ratio = col("ratio");
    let ratio = ratio.as_primitive::<Float32Type>();
    assert_eq!(ratio.value(0), -3.402_823_5e38);
    assert!(ratio.value(1).is_nan());
    assert_eq!(ratio.value(2).to_bits(), (-0.0f32).to_bits());
    let score = col("score");
    let score = score.as_primitive::<Float64Type>();
    assert_eq!(
        (score.value(0), score.value(1), score.value(2)),
        (-f64::MAX, f64::INFINITY, f64::NEG_INFINITY)
    );
    let flag = col("flag");
    assert_eq!(
        (
            flag.as_boolean().value(0),
            flag.as_boolean().value(1),
            flag.is_null(2)
        ),
        (true, false, true)
    );
    let text = |name: &str, i: usize| col(name).as_string::<i32>().value(i).to_string();
    assert_eq!(text("name", 0), "");
    assert_eq!(text("name", 1), "quote's \"🦀\" \\ tab\t end");
    assert_eq!(text("code", 1), "héllo");
    assert_eq!(
        (text("country", 0), text("country", 1)),
        ("ab   ".to_string(), "abcde".to_string())
    );
    let day = col("day");
    let day = day.as_primitive::<Date32Type>();
    assert_eq!((day.value(0), day.value(1)), (-719_162, 2_932_896));
    let created = col("created");
    let created = created.as_primitive::<TimestampMicrosecondType>();
    assert_eq!(
        (created.value(0), created.value(1)),
        (-62_135_596_800_000_000, 1_709_251_199_999_999)
    );
    let paid = col("paid");
    let paid = paid.as_primitive::<TimestampMicrosecondType>();
    assert_eq!((paid.value(0), paid.value(1)), (0, 1_719_818_999_999_999));
    // ±infinity: the ends of BigQuery's ranges (9999-12-31 23:59:59.999999, 0001-01-01).
    assert_eq!((day.value(4), day.value(5)), (2_932_896, -719_162));
    for at in [created, paid] {
        assert_eq!(
            (at.value(4), at.value(5)),
            (253_402_300_799_999_999, -62_135_596_800_000_000)
        );
    }
    assert_eq!(text("ref", 0), "00000000-0000-0000-0000-000000000000");
    assert_eq!(text("ref", 1), "ffffffff-ffff-ffff-ffff-ffffffffffff");
    assert_eq!(
        text("doc", 0),
        "{\"b\": 1,   \"a\": [1, 2]}",
        "json keeps its text"
    );
    assert_eq!(
        text("attrs", 0),
        "{\"a\": [1, 2], \"b\": 1}",
        "jsonb in its normal form"
    );
    let blob = col("blob");
    assert_eq!(
        (
            blob.as_binary::<i32>().value(0),
            blob.as_binary::<i32>().value(1)
        ),
        (&[][..], &[0x00, 0xff, 0x10][..])
    );
    assert_eq!(text("big", 0), "-0.000000000000000000000000000001");
    assert_eq!(
        text("big", 1),
        "123456789012345678901234567890123456789012.5"
    );
    assert_eq!(text("big", 2), "NaN");
    // Row 4: NULL in every nullable column.
    for (i, c) in b.columns().iter().enumerate().skip(1) {
        assert!(
            c.is_null(3),
            "column {} of the all-NULL row",
            schema_ref.field(i).name()
        );
    }
    assert_eq!(
        col("id").as_primitive::<Int64Type>().values().to_vec(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_same_content(&pg, &schema, "types", &dir.join("warehouse/types"), "id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_named_errors_and_move_nothing() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_bad").await;
    pg.batch_execute(&format!("CREATE TABLE {schema}.t (id int PRIMARY KEY, v text); INSERT INTO {schema}.t VALUES (1, 'a');"))
        .await
        .unwrap();
    let dir = scratch("bad");

    // Missing tables and columns, and refused credentials: the source suite (sources.rs).
    // NaN has no DECIMAL value: the shard fails naming the column, nothing is loaded.
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.prices (id int PRIMARY KEY, price numeric(10,2));
         INSERT INTO {schema}.prices VALUES (1, 1.50), (2, 'NaN'), (3, NULL);"
    ))
    .await
    .unwrap();
    let mut opts = options(&dir, 10);
    opts.max_delivery_attempts = 1;
    let nan = run_job(job(&schema, "prices", "prices", json!({})), opts).await;
    assert_eq!(nan.status, RunStatus::Failed, "{nan:?}");
    assert!(
        nan.error_message
            .as_deref()
            .unwrap()
            .contains("decoding price: numeric NaN cannot be stored in a DECIMAL column"),
        "{nan:?}"
    );
    assert!(!dir.join("warehouse/prices").exists());
    assert!(
        !dir.join("warehouse/t").exists(),
        "a failed run created the table"
    );

    // Through the binary: a spec error is the report's error_message and the exit code is 1;
    // the password is in no output.
    let job_file = dir.join("bad.json");
    let mut bad = job_json(
        &schema,
        "t",
        "t",
        json!({"load_type": "transactional", "processing_mode": "turbo"}),
    );
    bad["source_type"] = "oracle".into();
    std::fs::write(&job_file, bad.to_string()).unwrap();
    let out = dispatcher_run(&dir, &job_file, &["--no-progress"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "failed");
    assert_eq!(
        last["error_message"],
        "invalid job config: source_type \"oracle\" is not supported (expected one of: postgresql, mysql, gcs, s3, azure_blob, local); \
         load_type \"transactional\" needs timestamp_column; \
         processing_mode \"turbo\" is not supported (expected auto, standard or dataflow)"
    );
    let all_output = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!all_output.contains("pw-never-shown-81f3"));
}

/// PostgreSQL's timestamps reach 294276 AD; Arrow's microseconds since 1970 end in 294247. A
/// later value is refused naming its column, never wrapped to a year around -290,000.
#[tokio::test]
async fn timestamps_past_arrows_range_are_refused_naming_the_column() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_far").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.t (id int PRIMARY KEY, at timestamp, atz timestamptz);
         INSERT INTO {schema}.t VALUES (1, '294247-01-10 04:00:54.775807', '2024-01-01Z'),
                                       (2, '2024-01-01', '2024-01-01Z');"
    ))
    .await
    .unwrap();
    let dir = scratch("far");
    let spec = || job(&schema, "t", "t", json!({"processing_mode": "standard"}));
    // The last microsecond Arrow holds loads exactly.
    let report = run_job(spec(), options(&dir, 10)).await;
    assert_eq!(
        report.status,
        RunStatus::Completed,
        "{:?}",
        report.error_message
    );
    let at: Vec<i64> = read_table(&dir.join("warehouse/t"))
        .iter()
        .flat_map(|b| {
            b.column_by_name("at")
                .unwrap()
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .iter()
                .flatten()
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(at.contains(&i64::MAX), "{at:?}");
    for (column, value) in [
        ("at", "294247-01-10 04:00:54.775808"),
        ("atz", "294276-12-31 23:59:59Z"),
    ] {
        pg.batch_execute(&format!(
            "UPDATE {schema}.t SET at = '2024-01-01', atz = '2024-01-01Z' WHERE id = 2;
             UPDATE {schema}.t SET {column} = '{value}' WHERE id = 2"
        ))
        .await
        .unwrap();
        let refused = run_job(spec(), options(&dir, 10)).await;
        assert_eq!(refused.status, RunStatus::Failed);
        let why = refused.error_message.unwrap();
        assert!(
            why.contains(&format!(
                "{column}: timestamp is after 294247-01-10T04:00:54.775807, past what Arrow's \
                 microsecond timestamps can hold"
            )),
            "{why}"
        );
    }
    // The refused runs changed nothing: the table holds the first load.
    let rows: usize = read_table(&dir.join("warehouse/t"))
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(rows, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reports_last_and_logs_for_cloud_logging() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_cli").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.t (id int PRIMARY KEY, v text);
         INSERT INTO {schema}.t SELECT i, 'v' || i FROM generate_series(1, 5000) i; ANALYZE {schema}.t;"
    ))
    .await
    .unwrap();
    let dir = scratch("cli");
    let job_file = dir.join("message.json");
    // A job message as Django publishes it, with the config inline.
    let message = json!({"data_source_id": 42, "etl_run_id": 456, "config": job_json(&schema, "t", "t", json!({}))});
    std::fs::write(&job_file, message.to_string()).unwrap();
    let out = dispatcher_run(
        &dir,
        &job_file,
        &["--log-format", "json", "--shard-rows", "1000"],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["status"], "completed");
    assert_eq!(report["mode"], "sharded");
    assert_eq!(report["etl_run_id"], 456);
    assert_eq!(report["rows_extracted"], 5000);
    assert_eq!(report["rows_loaded"], 5000);
    assert_eq!(
        report["shard_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        5000
    );
    assert!(report["duration_seconds"].as_f64().unwrap() > 0.0);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    let done = lines
        .iter()
        .find(|l| l["message"] == "run completed")
        .expect("a completion line");
    assert_eq!(done["severity"], "INFO");
    assert_eq!(done["data_source_id"], 42);
    assert_eq!(done["etl_run_id"], 456);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "shard extracted" && l["shard_id"].is_string())
    );
    assert!(!format!("{stdout}{stderr}").contains("pw-never-shown-81f3"));
    assert_same_content(&pg, &schema, "t", &dir.join("warehouse/t"), "id").await;

    // --help explains every flag of every subcommand.
    for sub in ["plan", "run"] {
        let help = Command::new(dispatcher_bin())
            .args([sub, "--help"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&help.stdout);
        for flag in ["--job", "--shard-rows", "--exact-count"] {
            assert!(text.contains(flag), "{sub} --help lacks {flag}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_timestamp_numeric_and_char_keys_are_cut_from_a_sample() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_sample").await;
    // Skewed keys of three types; 40 shards need finer cuts than a 100-bucket histogram gives.
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.by_text (k text PRIMARY KEY, v int);
         INSERT INTO {schema}.by_text SELECT CASE WHEN i % 10 = 0 THEN 'z' || md5(i::text) ELSE 'a' || lpad(i::text, 7, '0') END, i
         FROM generate_series(1, 80000) i;
         CREATE TABLE {schema}.by_time (k timestamptz PRIMARY KEY, v int);
         INSERT INTO {schema}.by_time SELECT CASE WHEN i <= 72000 THEN timestamptz '2024-01-01' + i * interval '1 second'
                                                  ELSE timestamptz '1990-01-01' + i * interval '1 day' END, i
         FROM generate_series(1, 80000) i;
         CREATE TABLE {schema}.by_num (k numeric(20,4) PRIMARY KEY, v int);
         INSERT INTO {schema}.by_num SELECT CASE WHEN i <= 72000 THEN i / 1000.0 ELSE i * 1000000.5 END, i
         FROM generate_series(1, 80000) i;
         CREATE TABLE {schema}.by_char (k char(12) PRIMARY KEY, v int);
         INSERT INTO {schema}.by_char SELECT CASE WHEN i % 10 = 0 THEN 'z' || left(md5(i::text), 8) ELSE 'a' || i END, i
         FROM generate_series(1, 80000) i;
         ANALYZE {schema}.by_text; ANALYZE {schema}.by_time; ANALYZE {schema}.by_num; ANALYZE {schema}.by_char;"
    ))
    .await
    .unwrap();
    for table in ["by_text", "by_time", "by_num", "by_char"] {
        let spec = job(&schema, table, table, json!({}));
        let dir = scratch(&format!("sample-{table}"));
        let plan = plan_job(&spec, &exact(&dir, 2_000).plan).await.unwrap();
        assert_eq!(plan.split_method, "sample", "{table}");
        assert_eq!(plan.split_column.as_deref(), Some("k"));
        assert_eq!(plan.shards.len(), 40, "{table}");
        let report = run_job(spec, exact(&dir, 2_000)).await;
        assert_eq!(report.status, RunStatus::Completed, "{table}: {report:?}");
        assert_eq!(report.rows_loaded, 80_000, "{table}");
        let balance = imbalance(&report.shard_rows);
        assert!(
            balance <= 1.5,
            "{table}: {balance:.2} {:?}",
            report.shard_rows
        );
        assert_same_content(
            &pg,
            &schema,
            table,
            &dir.join(format!("warehouse/{table}")),
            "k",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_shard_reads_the_same_snapshot_while_the_table_changes() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_snapshot").await;
    create_wide_table(&pg, &schema, "t", 200_000, "i::bigint", true).await;
    let before = source_checks(&pg, &schema, "t", "id").await;
    let dir = scratch("snapshot");
    let mut opts = exact(&dir, 10_000);
    opts.workers = 1;
    let run = tokio::spawn(run_job(job(&schema, "t", "t", json!({})), opts));

    // Once the first shard is staged, change rows in every later shard and add new ones.
    let staging = dir.join("warehouse/_staging");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !walk(&staging)
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "parquet"))
    {
        assert!(
            Instant::now() < deadline && !run.is_finished(),
            "the run never staged a part"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pg.batch_execute(&format!(
        "UPDATE {schema}.t SET name = 'changed during the run', num = -1 WHERE id % 10 = 0;
         DELETE FROM {schema}.t WHERE id % 10 = 5;
         INSERT INTO {schema}.t (id, name) SELECT 10000000 + i, 'late' FROM generate_series(1, 1000) i;"
    ))
    .await
    .unwrap();
    let report = run.await.unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
    assert!(report.shards >= 20);
    // The destination is the table as it was when the run started: every shard, including
    // those extracted after the changes, read the run's one snapshot.
    assert_eq!(report.rows_loaded, 200_000);
    let after = destination_checks(&read_table(&dir.join("warehouse/t")), "id");
    assert_eq!(after, before);
    assert_ne!(
        source_checks(&pg, &schema, "t", "id").await,
        before,
        "the source did change"
    );
}

#[tokio::test]
async fn cuts_out_of_key_order_are_refused_before_any_data_moves() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_cuts").await;
    pg.batch_execute(&format!("CREATE TABLE {schema}.t (id bigint PRIMARY KEY)"))
        .await
        .unwrap();
    let info = shardflow::source::postgres::describe(&pg, &schema, "t")
        .await
        .unwrap();
    let key = info.split_key.clone().unwrap();
    let cut = |v: &str| shardflow::plan::Cut {
        value: v.into(),
        rank: 0.5,
    };
    // In text order "10" < "9"; in the key's order that would make overlapping ranges.
    let err = shardflow::source::postgres::check_ascending(&pg, &key, &[cut("10"), cut("9")])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the shard cuts on id are not in ascending order (1 out of place); refusing to plan overlapping ranges"
    );
    shardflow::source::postgres::check_ascending(&pg, &key, &[cut("9"), cut("10")])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_gets_a_progress_bar_with_rows_shards_and_rate() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_tty").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.t (id int PRIMARY KEY, v text);
         INSERT INTO {schema}.t SELECT i, repeat('v', 200) FROM generate_series(1, 300000) i; ANALYZE {schema}.t;"
    ))
    .await
    .unwrap();
    let dir = scratch("tty");
    let job_file = dir.join("job.json");
    std::fs::write(
        &job_file,
        job_json(&schema, "t", "t", json!({})).to_string(),
    )
    .unwrap();
    let mut args = vec![dispatcher_bin().display().to_string()];
    args.extend(dispatcher_run_args(
        &dir,
        &job_file,
        &["--shard-rows", "20000"],
    ));
    let command = args.join(" ");
    // `script` runs the dispatcher on a pseudo-terminal, as a person's shell would.
    let typescript = dir.join("typescript");
    let status = Command::new("script")
        .arg("-qec")
        .arg(&command)
        .arg(&typescript)
        .stdout(Stdio::null())
        .status()
        .expect("`script` (util-linux) runs the dispatcher on a pseudo-terminal");
    assert!(status.success());
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).replace('\r', "\n");
    let bar = screen
        .lines()
        .find(|l| l.contains("rows/s") && l.contains("shards ") && l.contains("/~"))
        .unwrap_or_else(|| panic!("no progress bar in:\n{screen}"));
    assert!(bar.contains("rows ·"), "{bar}");
    assert!(
        screen.contains("\"status\":\"completed\""),
        "the report is printed after the bar"
    );
    assert!(
        !screen.contains("INFO"),
        "info lines stay off the terminal while the bar is drawn"
    );
}

/// A transactional job on `schema.events` from `last_sync_value`, as Django would send it.
fn incremental_job(schema: &str, last_sync_value: Option<&str>) -> shardflow::spec::JobSpec {
    job(
        schema,
        "events",
        "events",
        json!({"load_type": "transactional", "timestamp_column": "at",
               "historical_start_date": "2024-01-01", "last_sync_value": last_sync_value}),
    )
}

/// The ISO watermark of event `n` (`add_events` puts it `n` minutes after the start).
fn event_time(n: i64) -> String {
    let at = chrono::DateTime::parse_from_rfc3339("2024-01-01T00:00:00.000001Z").unwrap()
        + chrono::Duration::minutes(n);
    at.to_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// `schema.events` with events 1..=rows.
async fn create_events(pg: &tokio_postgres::Client, schema: &str, rows: i64) {
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.events (id bigint PRIMARY KEY, at timestamptz, note text)"
    ))
    .await
    .unwrap();
    add_events(pg, schema, 1, rows).await;
}

async fn add_events(pg: &tokio_postgres::Client, schema: &str, from: i64, to: i64) {
    pg.batch_execute(&format!(
        "INSERT INTO {schema}.events
         SELECT i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute' + interval '0.000001 second',
                'event ' || i || CASE WHEN i % 5 = 0 THEN ' ✓' ELSE '' END
         FROM generate_series({from}, {to}) AS i"
    ))
    .await
    .unwrap();
}

/// The watermark compares in the window column's own type (an unconstrained numeric's text
/// would put "99" after "150"), and `infinity` (or numeric `NaN`) never reopens a window: over
/// three runs of each window type, every row is appended once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermarks_compare_in_the_columns_type_and_infinity_never_reopens_a_window() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_marks").await;
    // (type, the value of row i, values past every window, values before every window)
    let cases: [(&str, &str, &[&str], &[&str]); 7] = [
        (
            "numeric",
            "i::numeric",
            &["'NaN'", "'Infinity'"],
            &["'-Infinity'"],
        ),
        ("numeric(10,2)", "i / 4.0", &[], &[]),
        ("integer", "i", &[], &[]),
        ("bigint", "i::bigint * 1000000007", &[], &[]),
        (
            "date",
            "date '2024-01-01' + i",
            &["'infinity'"],
            &["'-infinity'"],
        ),
        (
            "timestamp",
            "timestamp '2024-01-01' + i * interval '1 hour'",
            &["'infinity'"],
            &["'-infinity'"],
        ),
        (
            "timestamptz",
            "timestamptz '2024-01-01 00:00+00' + i * interval '1 minute'",
            &["'infinity'"],
            &[],
        ),
    ];
    for (n, (column_type, value, beyond, before)) in cases.into_iter().enumerate() {
        let table = format!("w{n}");
        let specials: Vec<String> = beyond
            .iter()
            .chain(before)
            .enumerate()
            .map(|(k, v)| format!("({}, {v})", 1_000 + k))
            .collect();
        pg.batch_execute(&format!(
            "CREATE TABLE {schema}.{table} (id int PRIMARY KEY, w {column_type});
             INSERT INTO {schema}.{table} SELECT i, {value} FROM generate_series(1, 150) i;
             {}",
            if specials.is_empty() {
                String::new()
            } else {
                format!(
                    "INSERT INTO {schema}.{table} VALUES {};",
                    specials.join(", ")
                )
            }
        ))
        .await
        .unwrap();
        let dir = scratch(&format!("marks-{n}"));
        let spec = || {
            job(
                &schema,
                &table,
                &table,
                json!({"load_type": "transactional", "timestamp_column": "w",
                       "processing_mode": "dataflow"}),
            )
        };
        // 1: the open first window takes everything finite, and what lies before it.
        let first = run_job(spec(), options(&dir, 40)).await;
        assert_eq!(
            first.status,
            RunStatus::Completed,
            "{column_type}: {first:?}"
        );
        assert_eq!(
            first.rows_loaded,
            150 + before.len() as u64,
            "{column_type}"
        );
        let warned = match beyond.len() {
            0 => vec![],
            1 => vec![
                "1 row of timestamp_column \"w\" is infinity (or NaN), past the end of every \
                 incremental window: an incremental load never takes it; a catalog load does"
                    .to_string(),
            ],
            k => vec![format!(
                "{k} rows of timestamp_column \"w\" are infinity (or NaN), past the end of \
                 every incremental window: an incremental load never takes them; a catalog \
                 load does"
            )],
        };
        assert_eq!(first.warnings, warned, "{column_type}");
        // 2: nothing new, nothing again (the recorded watermark bounds it).
        let second = run_job(spec(), options(&dir, 40)).await;
        assert_eq!(
            second.status,
            RunStatus::Completed,
            "{column_type}: {second:?}"
        );
        assert_eq!(second.rows_loaded, 0, "{column_type}: {second:?}");
        assert_eq!(second.watermark, first.watermark, "{column_type}");
        // 3: ten new rows, those only.
        pg.batch_execute(&format!(
            "INSERT INTO {schema}.{table} SELECT i, {value} FROM generate_series(151, 160) i"
        ))
        .await
        .unwrap();
        let third = run_job(spec(), options(&dir, 40)).await;
        assert_eq!(third.rows_loaded, 10, "{column_type}: {third:?}");
        let ids = common::sorted_i32s(&dir.join(format!("warehouse/{table}")), "id");
        let mut expected: Vec<i32> = (1..=160).collect();
        expected.extend((0..before.len()).map(|k| 1_000 + (beyond.len() + k) as i32));
        expected.sort();
        assert_eq!(ids, expected, "{column_type}: each row once");
    }
}

/// A dispatcher that died after its append committed, and before it recorded the run, leaves
/// a running run behind. The job's next attempt takes it over and reads exactly its window
/// again: the append is not repeated, and the watermark reported is that window's, not that
/// of a wider window planned now. A `last_sync_value` that Django never saw advance (a missed
/// report, or a scheduled job with no run to report to) starts after the recorded watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_taken_over_incremental_run_rereads_its_window_and_stale_sync_values_read_nothing_twice()
{
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_takeover").await;
    create_events(&pg, &schema, 10_000).await;
    // The state store on PostgreSQL, so the test can play the dead dispatcher's part.
    let state_db = format!("state_{}", schema.replace('.', "_"));
    for statement in [
        format!("DROP DATABASE IF EXISTS {state_db} WITH (FORCE)"),
        format!("CREATE DATABASE {state_db}"),
    ] {
        pg.batch_execute(&statement).await.unwrap();
    }
    let _drop_state_db = common::DropOnExit::pg_database(common::PG_ADMIN_URL, &state_db);
    let (state, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 user=postgres dbname={state_db}"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let dir = scratch("takeover");
    let table = dir.join("warehouse/events");
    let run = |last: Option<String>, etl_run_id: i64| {
        let mut opts = exact(&dir, 1_000);
        opts.state_url = format!("postgres://postgres@127.0.0.1:5432/{state_db}");
        opts.etl_run_id = Some(etl_run_id);
        run_job(incremental_job(&schema, last.as_deref()), opts)
    };
    let newest = event_time;

    let first = run(None, 1).await;
    assert_eq!(
        (first.status.as_str(), first.rows_loaded),
        ("completed", 10_000)
    );
    let w1 = first.watermark.clone();

    add_events(&pg, &schema, 10_001, 12_000).await;
    let second = run(w1.clone(), 2).await;
    assert_eq!(
        (second.status.as_str(), second.rows_loaded),
        ("completed", 2_000)
    );
    assert_eq!(second.watermark.as_deref(), Some(newest(12_000).as_str()));
    // Its dispatcher "died" after the append committed: the run is still running, quiet.
    state
        .batch_execute(
            "UPDATE shardflow_runs SET status = 'running', finished_at = NULL, watermark = NULL,
                    heartbeat_at = '2000-01-01T00:00:00.000000Z', owner = 'dead-dispatcher'
             WHERE run_id = 'etl-2.1'",
        )
        .await
        .unwrap();
    let files_before = table_listing(&table);

    // More rows arrive; the job message is redelivered with the same last_sync_value.
    add_events(&pg, &schema, 12_001, 15_000).await;
    let again = run(w1.clone(), 2).await;
    assert_eq!(again.status, RunStatus::Completed, "{again:?}");
    assert_eq!(again.run_id, "etl-2.2");
    assert_eq!(
        again.rows_loaded, 2_000,
        "the earlier append, not a second one"
    );
    assert_eq!(
        again.watermark.as_deref(),
        Some(newest(12_000).as_str()),
        "the taken-over window's watermark, so rows 12001.. are not skipped"
    );
    assert_eq!(
        table_listing(&table),
        files_before,
        "nothing appended twice"
    );
    let statuses: Vec<(String, String)> = state
        .query(
            "SELECT run_id, status FROM shardflow_runs WHERE job_key = 'etl-2' ORDER BY run_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        statuses,
        [
            ("etl-2.1".to_string(), "superseded".to_string()),
            ("etl-2.2".to_string(), "completed".to_string())
        ]
    );

    // Django never heard of run 2: it sends run 1's watermark again. The window starts after
    // the watermark run 2 recorded.
    let third = run(w1.clone(), 3).await;
    assert_eq!(
        (third.status.as_str(), third.rows_loaded),
        ("completed", 3_000),
        "{third:?}"
    );
    assert_eq!(third.watermark.as_deref(), Some(newest(15_000).as_str()));
    // A scheduled job has no last_sync_value at all: nothing is read twice either.
    let fourth = run(None, 4).await;
    assert_eq!(
        (fourth.status.as_str(), fourth.rows_loaded),
        ("completed", 0),
        "{fourth:?}"
    );
    assert_eq!(fourth.watermark, third.watermark);

    assert_same_content(&pg, &schema, "events", &table, "id").await;
}

/// A role or database that does not exist is the job's mistake: the run fails at once with
/// the server's reason, without the retries a dead database gets.
#[tokio::test]
async fn wrong_credentials_fail_at_once_with_the_servers_reason() {
    let dir = scratch("credentials");
    for (field, value, reason) in [
        (
            "username",
            "no_such_role_sf",
            "role \"no_such_role_sf\" does not exist",
        ),
        (
            "database",
            "no_such_db_sf",
            "database \"no_such_db_sf\" does not exist",
        ),
    ] {
        let mut config = job_json("public", "t", "t", json!({}));
        config["connection_params"][field] = json!(value);
        let spec = shardflow::spec::JobSpec::from_json(&config.to_string()).unwrap();
        let mut opts = options(&dir, 10_000);
        // Retries that would take 20 s if the refusal were retried.
        opts.plan.retry = RetryPolicy {
            max_retries: 2,
            initial_delay: Duration::from_secs(10),
        };
        let started = Instant::now();
        let report = run_job(spec, opts).await;
        assert_eq!(report.status, RunStatus::Failed);
        let error = report.error_message.unwrap_or_default();
        assert!(
            error.starts_with(
                "the source database refused the job: cannot connect to PostgreSQL at 127.0.0.1:5432/"
            ) && error.ends_with(reason),
            "{error}"
        );
        assert!(!error.contains("pw-never-shown"), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "retried: {error}"
        );
    }
}

/// The types read as text (arrays, enums, intervals, network addresses, timetz) come out in
/// the form the extraction pins whatever the server's defaults; time is native; money is its
/// exact amount; domains are their base type. Exact values, NULLs, empty arrays and strings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrays_enums_intervals_and_other_types_round_trip_exactly() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "e2e_more_types").await;
    pg.batch_execute(&format!(
        "CREATE TYPE {schema}.mood AS ENUM ('sad', 'ok', 'happy 😀');
         CREATE DOMAIN {schema}.positive AS integer CHECK (VALUE > 0);
         CREATE DOMAIN {schema}.label AS varchar(10);
         CREATE TABLE {schema}.more (
             id int PRIMARY KEY, ints int[], texts text[], floats float8[], mood {schema}.mood,
             span interval, t time, ttz timetz, addr inet, net cidr, price money,
             pos {schema}.positive, lbl {schema}.label, stamps timestamptz[], grid int[][]);
         INSERT INTO {schema}.more VALUES
         (1, '{{1,NULL,-2147483648}}', '{{\"a,b\",\"quote\\\"s\",🦀,NULL,\"\"}}',
          '{{0.1,1e308,-0,NaN,-Infinity,4.9e-324}}', 'happy 😀',
          '1 year 2 months 3 days 04:05:06.789', '23:59:59.999999', '01:02:03.5+05:30',
          '192.168.0.1/24', '10.0.0.0/8', '-92233720368547758.08', 2147483647, 'ten chars!',
          '{{\"2024-01-01 00:00:00+02\",NULL}}', '{{{{1,2}},{{3,4}}}}'),
         (2, '{{}}', '{{}}', '{{}}', 'sad', '-1 days -00:00:00.000001', '00:00:00', '00:00:00-12',
          '::1', '2001:db8::/32', '0.01', 1, '', '{{}}', '{{}}'),
         (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);"
    ))
    .await
    .unwrap();
    // A role whose defaults would change every text form if the extraction did not pin them
    // (a role of its own, so no other test sees these settings).
    let role = format!("{schema}_reader");
    pg.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role};
         CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA {schema} TO {role};
         GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};
         ALTER ROLE {role} SET IntervalStyle = 'sql_standard';
         ALTER ROLE {role} SET extra_float_digits = -3;
         ALTER ROLE {role} SET TimeZone = 'America/New_York';
         ALTER ROLE {role} SET DateStyle = 'SQL, DMY';"
    ))
    .await
    .unwrap();
    let _drop_role = common::DropOnExit::pg_role(common::PG_URL, &role);
    let more_job = || {
        job(
            &schema,
            "more",
            "more",
            json!({"processing_mode": "standard",
                   "connection_params": {"host": "127.0.0.1", "port": 5432, "database": "test",
                                         "username": role, "password": "unused"}}),
        )
    };
    let dir = scratch("more_types");
    let report = run_job(more_job(), exact(&dir, 10_000)).await;
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
    assert_eq!(report.rows_loaded, 3);

    let batches = read_table(&dir.join("warehouse/more"));
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let b = arrow::compute::take_record_batch(
        &b,
        &arrow::compute::sort_to_indices(b.column(0), None, None).unwrap(),
    )
    .unwrap();
    let texts = |name: &str| -> Vec<Option<String>> {
        let column = b.column_by_name(name).unwrap();
        assert_eq!(column.data_type(), &DataType::Utf8, "{name}");
        column
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect()
    };
    let some = |a: &str, b: &str| vec![Some(a.to_string()), Some(b.to_string()), None];
    assert_eq!(texts("ints"), some("{1,NULL,-2147483648}", "{}"));
    assert_eq!(
        texts("texts"),
        some(r#"{"a,b","quote\"s",🦀,NULL,""}"#, "{}")
    );
    assert_eq!(
        texts("floats"),
        some("{0.1,1e+308,-0,NaN,-Infinity,5e-324}", "{}")
    );
    assert_eq!(texts("mood"), some("happy 😀", "sad"));
    assert_eq!(texts("span"), some("P1Y2M3DT4H5M6.789S", "P-1DT-0.000001S"));
    assert_eq!(texts("ttz"), some("01:02:03.5+05:30", "00:00:00-12"));
    // inet::text always shows the mask.
    assert_eq!(texts("addr"), some("192.168.0.1/24", "::1/128"));
    assert_eq!(texts("net"), some("10.0.0.0/8", "2001:db8::/32"));
    assert_eq!(texts("price"), some("-92233720368547758.08", "0.01"));
    assert_eq!(texts("lbl"), some("ten chars!", ""));
    assert_eq!(
        texts("stamps"),
        // ISO output; the offset is the role's time zone's (which also reads bound values).
        some(r#"{"2023-12-31 17:00:00-05",NULL}"#, "{}")
    );
    assert_eq!(texts("grid"), some("{{1,2},{3,4}}", "{}"));

    let t = b.column_by_name("t").unwrap();
    assert_eq!(t.data_type(), &DataType::Time64(TimeUnit::Microsecond));
    let t: Vec<Option<i64>> = t
        .as_primitive::<arrow::datatypes::Time64MicrosecondType>()
        .iter()
        .collect();
    assert_eq!(t, vec![Some(86_399_999_999), Some(0), None]);
    let pos = b.column_by_name("pos").unwrap();
    assert_eq!(
        pos.data_type(),
        &DataType::Int32,
        "a domain is its base type"
    );
    let pos: Vec<Option<i32>> = pos.as_primitive::<Int32Type>().iter().collect();
    assert_eq!(pos, vec![Some(2_147_483_647), Some(1), None]);
    // The source types travel in the field metadata.
    let source_type = |name: &str| {
        b.schema()
            .field_with_name(name)
            .unwrap()
            .metadata()
            .get("shardflow.source_type")
            .cloned()
    };
    assert_eq!(source_type("ints").as_deref(), Some("integer[]"));
    assert_eq!(source_type("price").as_deref(), Some("money"));

    // 24:00:00 is a PostgreSQL time and no BigQuery TIME: refused, naming the column.
    pg.batch_execute(&format!(
        "UPDATE {schema}.more SET t = '24:00:00' WHERE id = 2"
    ))
    .await
    .unwrap();
    let refused = run_job(more_job(), exact(&dir, 10_000)).await;
    assert_eq!(refused.status, RunStatus::Failed);
    let why = refused.error_message.unwrap();
    assert!(
        why.contains("t: time is 24:00:00, which Arrow Time64 and BigQuery TIME cannot hold"),
        "{why}"
    );
}
