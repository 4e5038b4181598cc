//! The source conformance suite: one set of cases, run through the whole pipeline against
//! PostgreSQL and MariaDB. A catalog load of a sharded table, incremental runs that load every
//! row exactly once, merges that keep each key's latest version, and bad inputs that get a
//! named error at once and move nothing. Each backend gives the suite its SQL dialect (`Db`);
//! the assertions are the same for both.

mod common;

use std::time::{Duration, Instant};

use common::{content_checksum, exact_options as options, read_table, scratch, table_listing};
use serde_json::json;
use shardflow::plan::imbalance;
use shardflow::retry::RetryPolicy;
use shardflow::spec::JobSpec;
use shardflow::state::RunStatus;
use shardflow_dispatcher::{plan_job, run_job};

/// A fresh namespace (a PostgreSQL schema, a MySQL database) on one of the test servers.
enum Db {
    Postgres {
        client: tokio_postgres::Client,
        ns: common::Scoped,
    },
    MySql {
        conn: tokio::sync::Mutex<sqlx::MySqlConnection>,
        ns: common::Scoped,
    },
}

/// The statements of the suite that differ between the dialects.
enum Sql {
    /// `events (id, at, note)`, with one row before the historical start and one without a
    /// time, which no incremental run loads.
    CreateEvents,
    /// Events `from..=to`, event `n` at `n` minutes and a microsecond after 2024-01-01 UTC.
    AddEvents {
        from: i64,
        to: i64,
    },
    DropUnloadableEvents,
    /// `accounts (id, region, balance, updated_at NOT NULL)` with 30,000 rows, row `i` updated
    /// at 2024-01-01 plus `i` seconds, and `nokey`, a table without a primary key.
    CreateAccounts,
    /// Every sixth account changes (on 2024-02-01) and 2,000 new ones arrive (2024-02-02).
    ChangeAccounts,
    /// Accounts 1..=100 change with a time before the latest watermark (committed late).
    LateAccountChanges,
    /// `t (id, name, v)`.
    CreateSmallTable,
}

impl Db {
    async fn postgres(name: &str) -> Db {
        let client = common::pg().await;
        let ns = common::fresh_schema(&client, name).await;
        Db::Postgres { client, ns }
    }

    async fn mysql(name: &str) -> Db {
        let mut conn = common::my::my().await;
        let ns = common::my::fresh_database(&mut conn, name).await;
        Db::MySql {
            conn: tokio::sync::Mutex::new(conn),
            ns,
        }
    }

    fn backend(&self) -> &'static str {
        match self {
            Db::Postgres { .. } => "postgres",
            Db::MySql { .. } => "mysql",
        }
    }

    fn ns(&self) -> &str {
        match self {
            Db::Postgres { ns, .. } | Db::MySql { ns, .. } => ns.as_str(),
        }
    }

    fn job(&self, table: &str, extra: serde_json::Value) -> JobSpec {
        match self {
            Db::Postgres { .. } => common::job(self.ns(), table, table, extra),
            Db::MySql { .. } => common::my::job(self.ns(), table, table, extra),
        }
    }

    fn job_json(&self, table: &str) -> serde_json::Value {
        match self {
            Db::Postgres { .. } => common::job_json(self.ns(), table, table, json!({})),
            Db::MySql { .. } => common::my::job_json(self.ns(), table, table, json!({})),
        }
    }

    async fn run(&self, statement: Sql) {
        let sql = self.sql(statement);
        match self {
            Db::Postgres { client, .. } => client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            Db::MySql { conn, .. } => common::my::exec(&mut *conn.lock().await, &sql).await,
        }
    }

    /// Row count, per-column checks and every value of the destination equal the source's,
    /// computed by the server itself.
    async fn assert_same_content(&self, table: &str, dest: &std::path::Path, key: &str) {
        match self {
            Db::Postgres { client, .. } => {
                common::assert_same_content(client, self.ns(), table, dest, key).await
            }
            Db::MySql { conn, .. } => {
                common::my::assert_same_content(
                    &mut *conn.lock().await,
                    self.ns(),
                    table,
                    dest,
                    key,
                )
                .await
            }
        }
    }

    fn sql(&self, statement: Sql) -> String {
        let ns = self.ns();
        let postgres = matches!(self, Db::Postgres { .. });
        match (statement, postgres) {
            (Sql::CreateEvents, true) => format!(
                "CREATE TABLE {ns}.events (id bigint PRIMARY KEY, at timestamptz, note text);
                 INSERT INTO {ns}.events VALUES (-1, '2023-12-31 23:59:59.999999+00', 'too old'),
                                                (-2, NULL, 'no time');"
            ),
            (Sql::CreateEvents, false) => format!(
                "SET SESSION time_zone = '+00:00';
                 CREATE TABLE {ns}.events (id bigint PRIMARY KEY, at timestamp(6) NULL,
                                           note varchar(40));
                 INSERT INTO {ns}.events VALUES (-1, '2023-12-31 23:59:59.999999', 'too old'),
                                                (-2, NULL, 'no time');"
            ),
            (Sql::AddEvents { from, to }, true) => format!(
                "INSERT INTO {ns}.events
                 SELECT i, timestamptz '2024-01-01 00:00:00+00' + i * interval '1 minute'
                           + interval '0.000001 second',
                        'event ' || i || CASE WHEN i % 5 = 0 THEN ' ✓' ELSE '' END
                 FROM generate_series({from}, {to}) AS i"
            ),
            (Sql::AddEvents { from, to }, false) => format!(
                "SET SESSION time_zone = '+00:00';
                 INSERT INTO {ns}.events
                 SELECT seq, TIMESTAMP('2024-01-01 00:00:00.000001') + INTERVAL seq MINUTE,
                        CONCAT('event ', seq, IF(seq % 5 = 0, ' ✓', ''))
                 FROM seq_{from}_to_{to}"
            ),
            (Sql::DropUnloadableEvents, _) => format!("DELETE FROM {ns}.events WHERE id < 0"),
            (Sql::CreateAccounts, true) => format!(
                "CREATE TABLE {ns}.accounts (id bigint PRIMARY KEY, region text,
                                             balance numeric(12,2), updated_at timestamp NOT NULL);
                 INSERT INTO {ns}.accounts
                 SELECT i, CASE WHEN i % 7 = 0 THEN NULL ELSE 'r' || i % 3 END, i * 1.25,
                        timestamp '2024-01-01' + i * interval '1 second'
                 FROM generate_series(1, 30000) i;
                 CREATE TABLE {ns}.nokey (id bigint, updated_at timestamp);"
            ),
            // An unsigned key: its watermark and cuts compare as numbers past 2^63 too.
            (Sql::CreateAccounts, false) => format!(
                "CREATE TABLE {ns}.accounts (id bigint unsigned PRIMARY KEY, region varchar(10),
                                             balance decimal(12,2), updated_at datetime(6) NOT NULL);
                 INSERT INTO {ns}.accounts
                 SELECT seq, IF(seq % 7 = 0, NULL, CONCAT('r', seq % 3)), seq * 1.25,
                        TIMESTAMP('2024-01-01') + INTERVAL seq SECOND
                 FROM seq_1_to_30000;
                 CREATE TABLE {ns}.nokey (id bigint, updated_at datetime(6));"
            ),
            (Sql::ChangeAccounts, true) => format!(
                "UPDATE {ns}.accounts SET balance = balance + 1000, region = 'moved',
                        updated_at = timestamp '2024-02-01' + id * interval '1 millisecond'
                 WHERE id % 6 = 0;
                 INSERT INTO {ns}.accounts
                 SELECT i, 'new', i, timestamp '2024-02-02' + i * interval '1 millisecond'
                 FROM generate_series(30001, 32000) i;"
            ),
            (Sql::ChangeAccounts, false) => format!(
                "UPDATE {ns}.accounts SET balance = balance + 1000, region = 'moved',
                        updated_at = TIMESTAMP('2024-02-01') + INTERVAL id * 1000 MICROSECOND
                 WHERE id % 6 = 0;
                 INSERT INTO {ns}.accounts
                 SELECT seq, 'new', seq, TIMESTAMP('2024-02-02') + INTERVAL seq * 1000 MICROSECOND
                 FROM seq_30001_to_32000;"
            ),
            (Sql::LateAccountChanges, true) => format!(
                "UPDATE {ns}.accounts SET balance = -1,
                        updated_at = timestamp '2024-02-02' + 31000 * interval '1 millisecond'
                 WHERE id BETWEEN 1 AND 100"
            ),
            (Sql::LateAccountChanges, false) => format!(
                "UPDATE {ns}.accounts SET balance = -1,
                        updated_at = TIMESTAMP('2024-02-02') + INTERVAL 31000000 MICROSECOND
                 WHERE id BETWEEN 1 AND 100"
            ),
            (Sql::CreateSmallTable, true) => format!(
                "CREATE TABLE {ns}.t (id int PRIMARY KEY, name text, v text);
                 INSERT INTO {ns}.t VALUES (1, 'a', 'b');"
            ),
            (Sql::CreateSmallTable, false) => format!(
                "CREATE TABLE {ns}.t (id int PRIMARY KEY, name varchar(10), v varchar(10));
                 INSERT INTO {ns}.t VALUES (1, 'a', 'b');"
            ),
        }
    }
}

/// The ISO watermark of event `n`.
fn event_time(n: i64) -> String {
    let at = chrono::DateTime::parse_from_rfc3339("2024-01-01T00:00:00.000001Z").unwrap()
        + chrono::Duration::minutes(n);
    at.to_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A catalog load cuts the table into equal-row shards and loads exactly the source's rows.
async fn a_sharded_catalog_load_is_the_source_exactly(db: Db) {
    db.run(Sql::CreateAccounts).await;
    let dir = scratch(&format!("sources-catalog-{}", db.backend()));
    let report = run_job(db.job("accounts", json!({})), options(&dir, 7_500)).await;
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
    assert_eq!((report.rows_loaded, report.shards), (30_000, 4));
    assert!(
        imbalance(&report.shard_rows) <= 1.2,
        "{:?}",
        report.shard_rows
    );
    let table = dir.join("warehouse/accounts");
    db.assert_same_content("accounts", &table, "id").await;
    assert_eq!(
        report.checksum.as_deref(),
        Some(content_checksum(&read_table(&table)).as_str())
    );
}

async fn incremental_runs_load_every_row_exactly_once(db: Db) {
    db.run(Sql::CreateEvents).await;
    db.run(Sql::AddEvents {
        from: 1,
        to: 40_000,
    })
    .await;
    let dir = scratch(&format!("sources-incremental-{}", db.backend()));
    let table = dir.join("warehouse/events");
    let job = |last: Option<&str>| {
        db.job(
            "events",
            json!({"load_type": "transactional", "timestamp_column": "at",
                   "historical_start_date": "2024-01-01", "last_sync_value": last}),
        )
    };
    let run = |last: Option<String>, etl_run_id: i64| {
        let mut opts = options(&dir, 10_000);
        opts.etl_run_id = Some(etl_run_id);
        run_job(job(last.as_deref()), opts)
    };

    // 1: from the historical start, cut into shards of the window.
    let first = run(None, 1).await;
    assert_eq!(first.status, RunStatus::Completed, "{first:?}");
    assert_eq!((first.rows_loaded, first.shards), (40_000, 4));
    assert!(
        imbalance(&first.shard_rows) <= 1.2,
        "{:?}",
        first.shard_rows
    );
    assert_eq!(
        first.watermark.as_deref(),
        Some(event_time(40_000).as_str())
    );
    let plan = plan_job(
        &job(first.watermark.as_deref()),
        &options(&dir, 10_000).plan,
    )
    .await
    .unwrap();
    assert_eq!(plan.estimated_rows, 0, "nothing new after run 1");

    // 2: the table grew; only the new rows come.
    db.run(Sql::AddEvents {
        from: 40_001,
        to: 52_000,
    })
    .await;
    let second = run(first.watermark.clone(), 2).await;
    assert_eq!(second.status, RunStatus::Completed, "{second:?}");
    assert_eq!(second.rows_loaded, 12_000);
    assert_eq!(
        second.watermark.as_deref(),
        Some(event_time(52_000).as_str())
    );

    // 3: an empty window completes, loads nothing, leaves the table and the watermark.
    let before = table_listing(&table);
    let third = run(second.watermark.clone(), 3).await;
    assert_eq!(third.status, RunStatus::Completed, "{third:?}");
    assert_eq!((third.rows_loaded, third.shards), (0, 0));
    assert_eq!(third.watermark, second.watermark);
    assert_eq!(table_listing(&table), before);

    // 4: rows committed while the run goes wait for the next run.
    db.run(Sql::AddEvents {
        from: 52_001,
        to: 60_000,
    })
    .await;
    let state = shardflow::state::sql::SqlStateStore::open(&format!(
        "sqlite://{}",
        dir.join("state.db").display()
    ))
    .await
    .unwrap();
    let fourth = run(second.watermark.clone(), 4);
    let watch = async {
        let start = Instant::now();
        while shardflow::state::StateStore::run(&state, "etl-4.1")
            .await
            .unwrap()
            .is_none()
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "run 4 never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        db.run(Sql::AddEvents {
            from: 60_001,
            to: 61_000,
        })
        .await;
    };
    let (fourth, ()) = tokio::join!(fourth, watch);
    assert_eq!(fourth.status, RunStatus::Completed, "{fourth:?}");
    assert_eq!(fourth.rows_loaded, 8_000);
    let fifth = run(fourth.watermark.clone(), 5).await;
    assert_eq!(fifth.rows_loaded, 1_000, "{fifth:?}");

    // Every row from the historical start is in the table exactly once, and the runs'
    // checksums add up to the table's.
    db.run(Sql::DropUnloadableEvents).await;
    db.assert_same_content("events", &table, "id").await;
    let runs = [&first, &second, &third, &fourth, &fifth];
    let combined =
        shardflow::digest::combine_checksums(runs.iter().map(|r| r.checksum.as_deref().unwrap()))
            .unwrap();
    assert_eq!(combined, content_checksum(&read_table(&table)));

    // A watermark that is not a value of the column is a named error, before any data moves.
    let bad = run(Some("yesterday-ish".into()), 6).await;
    assert_eq!(bad.status, RunStatus::Failed);
    assert!(
        bad.error_message
            .as_deref()
            .unwrap()
            .contains("last_sync_value: \"yesterday-ish\" is not a value of \"at\""),
        "{bad:?}"
    );
}

async fn merge_runs_keep_the_latest_version_of_each_key(db: Db) {
    db.run(Sql::CreateAccounts).await;
    let dir = scratch(&format!("sources-merge-{}", db.backend()));
    let table = dir.join("warehouse/accounts");
    let merge_job = |last: Option<&str>, lookback: Option<&str>| {
        db.job(
            "accounts",
            json!({"load_type": "merge", "timestamp_column": "updated_at",
                   "last_sync_value": last, "lookback": lookback}),
        )
    };
    let run = |spec, etl_run_id: i64| {
        let mut opts = options(&dir, 10_000);
        opts.etl_run_id = Some(etl_run_id);
        run_job(spec, opts)
    };

    // 1: every row, in four shards (a multiple of the two workers); the merge keys default to
    // the primary key.
    let first = run(merge_job(None, None), 1).await;
    assert_eq!(first.status, RunStatus::Completed, "{first:?}");
    assert_eq!((first.rows_loaded, first.shards), (30_000, 4));
    assert_eq!(first.watermark.as_deref(), Some("2024-01-01T08:20:00"));
    db.assert_same_content("accounts", &table, "id").await;

    // 2: 5,000 rows change and 2,000 are new: only those are read, and the table holds each
    // key once, in its new version.
    db.run(Sql::ChangeAccounts).await;
    let second = run(merge_job(first.watermark.as_deref(), None), 2).await;
    assert_eq!(second.status, RunStatus::Completed, "{second:?}");
    assert_eq!(second.rows_loaded, 7_000);
    db.assert_same_content("accounts", &table, "id").await;

    // 3: rows committed late with times before the watermark are missed without a lookback...
    db.run(Sql::LateAccountChanges).await;
    let third = run(merge_job(second.watermark.as_deref(), None), 3).await;
    assert_eq!((third.status, third.rows_loaded), (RunStatus::Completed, 0));
    let stale = read_table(&table);
    assert_eq!(
        stale.iter().map(|b| b.num_rows()).sum::<usize>(),
        32_000,
        "still every key once"
    );

    // ...and merged by the next run with a lookback reaching back to them; the rows of the
    // lookback that were loaded before are merged again, unchanged.
    let fourth = run(merge_job(second.watermark.as_deref(), Some("2 seconds")), 4).await;
    assert_eq!(fourth.status, RunStatus::Completed, "{fourth:?}");
    // The 100 late rows plus the 2,000 rows of the two seconds before the watermark.
    assert_eq!(fourth.rows_loaded, 2_100);
    assert_eq!(fourth.watermark, second.watermark);
    db.assert_same_content("accounts", &table, "id").await;

    // A table without a primary key needs merge_keys, named before any data moves.
    let no_key = run(
        db.job(
            "nokey",
            json!({"load_type": "merge", "timestamp_column": "updated_at"}),
        ),
        5,
    )
    .await;
    assert_eq!(no_key.status, RunStatus::Failed);
    let ns = db.ns();
    assert!(
        no_key
            .error_message
            .as_deref()
            .unwrap()
            .contains(&format!("merge_keys: {ns}.nokey has no primary key")),
        "{no_key:?}"
    );
    assert!(!dir.join("warehouse/nokey").exists());
}

/// Each refusal names what is wrong, comes at once (not after the retries a transient error
/// gets) and creates no table.
async fn bad_inputs_get_named_errors_at_once_and_move_nothing(db: Db) {
    db.run(Sql::CreateSmallTable).await;
    let dir = scratch(&format!("sources-bad-{}", db.backend()));
    let ns = db.ns().to_string();
    let fails = |spec: JobSpec, why: String| {
        let dir = dir.clone();
        async move {
            let started = Instant::now();
            let mut opts = options(&dir, 1_000);
            // Retries that would take 20 s if the refusal were retried.
            opts.plan.retry = RetryPolicy {
                max_retries: 2,
                initial_delay: Duration::from_secs(10),
            };
            let report = run_job(spec, opts).await;
            assert_eq!(report.status, RunStatus::Failed, "{report:?}");
            let message = report.error_message.unwrap_or_default();
            assert!(message.contains(&why), "{message:?} should say {why:?}");
            assert!(!message.contains("pw-never-shown-81f3"), "{message}");
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "{why}: refused at once, not retried"
            );
        }
    };
    fails(
        db.job("nope", json!({})),
        format!("table {ns}.nope not found in "),
    )
    .await;
    fails(
        db.job("t", json!({"selected_columns": ["id", "nmae", "gone"]})),
        format!("columns \"nmae\", \"gone\" not found in {ns}.t (columns: id, name, v)"),
    )
    .await;
    fails(
        db.job(
            "t",
            json!({"load_type": "catalog", "timestamp_column": "updated_at"}),
        ),
        format!("column \"updated_at\" not found in {ns}.t (columns: id, name, v)"),
    )
    .await;
    let mut wrong = db.job_json("t");
    wrong["connection_params"]["username"] = json!("nobody_here");
    wrong["connection_params"]["password"] = json!("pw-never-shown-81f3");
    fails(
        JobSpec::from_json(&wrong.to_string()).unwrap(),
        "the source database refused the job: cannot connect to ".into(),
    )
    .await;
    assert!(!dir.join("warehouse/t").exists());
    assert!(!dir.join("warehouse/nope").exists());
}

/// Runs every case against a backend: `$db` is an async fn giving a fresh `Db` by name.
macro_rules! source_conformance_suite {
    ($backend:ident, $db:path) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_sharded_catalog_load_is_the_source_exactly() {
                super::a_sharded_catalog_load_is_the_source_exactly($db("sf_src_catalog").await)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn incremental_runs_load_every_row_exactly_once() {
                super::incremental_runs_load_every_row_exactly_once($db("sf_src_incr").await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn merge_runs_keep_the_latest_version_of_each_key() {
                super::merge_runs_keep_the_latest_version_of_each_key($db("sf_src_merge").await)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bad_inputs_get_named_errors_at_once_and_move_nothing() {
                super::bad_inputs_get_named_errors_at_once_and_move_nothing(
                    $db("sf_src_bad").await,
                )
                .await;
            }
        }
    };
}

source_conformance_suite!(postgres, Db::postgres);
source_conformance_suite!(mysql, Db::mysql);
