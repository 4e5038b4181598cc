//! MySQL/MariaDB → planned shards → workers → Parquet table, against the running MariaDB.

mod common;

use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type};
use arrow::util::display::array_value_to_string;
use common::my::*;
use common::{content_checksum, read_table, scratch, table_listing};
use serde_json::json;
use shardflow::plan::imbalance;
use shardflow::retry::RetryPolicy;
use shardflow_dispatcher::{PlanOptions, RunOptions, plan_job, run_job};

fn options(dir: &std::path::Path, shard_rows: u64) -> RunOptions {
    RunOptions {
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
        staging: None,
        state_url: format!("sqlite://{}", dir.join("state.db").display()),
        ..Default::default()
    }
}

/// One batch of the whole table, rows in `key` order.
fn sorted_table(dir: &std::path::Path, key: &str) -> RecordBatch {
    let batches = read_table(dir);
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let order =
        arrow::compute::sort_to_indices(batch.column_by_name(key).unwrap(), None, None).unwrap();
    arrow::compute::take_record_batch(&batch, &order).unwrap()
}

fn text(batch: &RecordBatch, column: &str, row: usize) -> String {
    let c = batch
        .column_by_name(column)
        .unwrap_or_else(|| panic!("{column}"));
    if c.is_null(row) {
        return "NULL".into();
    }
    // This build names zones by offset only.
    let c = match c.data_type() {
        DataType::Timestamp(unit, Some(_)) => {
            arrow::compute::cast(c, &DataType::Timestamp(*unit, Some("+00:00".into()))).unwrap()
        }
        _ => c.clone(),
    };
    array_value_to_string(&c, row).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mysql_type_matrix_round_trips_exactly() {
    let mut conn = my().await;
    let db = fresh_database(&mut conn, "sf_types").await;
    exec(
        &mut conn,
        &format!(
            "SET SESSION sql_mode = '', time_zone = '+00:00';
             CREATE TABLE {db}.m (
               id int PRIMARY KEY,
               ti tinyint, tiu tinyint unsigned, si smallint, siu smallint unsigned,
               mi mediumint, miu mediumint unsigned, i int, iu int unsigned, bi bigint,
               biu bigint unsigned, flag bool, b1 bit(1), b12 bit(12), b64 bit(64), y year,
               d65 decimal(65,30), d12 decimal(12,2), f float, db double,
               c char(5), vc varchar(40), tx text, bl blob, bin binary(4), vb varbinary(8),
               dt date, dtm datetime(6), ts timestamp(6) NULL, tm time(6), js json,
               en enum('small','large'), st set('a','b','c'));
             INSERT INTO {db}.m VALUES
             (1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
              -9223372036854775808, 18446744073709551615, 1, b'1', b'111111111111',
              b'1111111111111111111111111111111111111111111111111111111111111111', 2155,
              '99999999999999999999999999999999999.999999999999999999999999999999',
              '-9999999999.99', 3.4028235e38, 1.7976931348623157e308,
              'ab', '😀 4-byte ✓', '', x'00ff', x'01', x'', '9999-12-31',
              '1000-01-01 00:00:00.000001', '2038-01-19 03:14:07.999999', '-838:59:59.000000',
              '{{\"a\": [1, 2.5, null], \"s\": \"😀\"}}', 'large', 'a,c'),
             (2, 127, 0, 32767, 0, 8388607, 0, 2147483647, 0, 9223372036854775807, 0, 2, b'0',
              b'0', b'0', 1901, '-0.000000000000000000000000000001', '0.00', -1.17549435e-38,
              4.9406564584124654e-324, '', '', 'long text', '', x'00000000', x'00',
              '0000-00-00', '0000-00-00 00:00:00', '1970-01-01 00:00:01', '838:59:59', '[]',
              'small', ''),
             (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, NULL);"
        ),
    )
    .await;
    let dir = scratch("mysql_types");
    let spec = job(&db, "m", "m", json!({}));
    let plan = plan_job(&spec, &options(&dir, 1_000).plan).await.unwrap();
    let types: Vec<(&str, &str, &str)> = plan
        .columns
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.source_type.as_str(),
                c.arrow_type.as_str(),
            )
        })
        .collect();
    for want in [
        ("ti", "tinyint", "Int8"),
        ("flag", "tinyint(1)", "Int8"),
        ("tiu", "tinyint unsigned", "Int16"),
        ("siu", "smallint unsigned", "Int32"),
        ("iu", "int unsigned", "Int64"),
        ("biu", "bigint unsigned", "Decimal128(20, 0)"),
        ("b1", "bit(1)", "Boolean"),
        ("b64", "bit(64)", "Decimal128(20, 0)"),
        ("d65", "decimal(65,30)", "Decimal256(65, 30)"),
        ("d12", "decimal(12,2)", "Decimal128(12, 2)"),
        ("js", "json", "Utf8"),
        ("en", "enum", "Utf8"),
        ("dtm", "datetime(6)", "Timestamp(µs)"),
        ("ts", "timestamp(6)", "Timestamp(µs, \"UTC\")"),
        ("tm", "time(6)", "Utf8"),
    ] {
        assert!(types.contains(&want), "{want:?} not in {types:?}");
    }

    let report = run_job(spec, options(&dir, 1_000)).await;
    assert_eq!(report.status, "completed", "{report:?}");
    assert_eq!(report.rows_loaded, 3);
    let t = sorted_table(&dir.join("warehouse/m"), "id");
    assert_eq!(
        t.schema().field_with_name("d65").unwrap().data_type(),
        &DataType::Decimal256(65, 30)
    );
    let row = |r: usize| -> Vec<(String, String)> {
        t.schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), text(&t, f.name(), r)))
            .filter(|(name, _)| !matches!(name.as_str(), "f" | "db"))
            .collect()
    };
    let expect = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        row(0),
        expect(&[
            ("id", "1"),
            ("ti", "-128"),
            ("tiu", "255"),
            ("si", "-32768"),
            ("siu", "65535"),
            ("mi", "-8388608"),
            ("miu", "16777215"),
            ("i", "-2147483648"),
            ("iu", "4294967295"),
            ("bi", "-9223372036854775808"),
            ("biu", "18446744073709551615"),
            ("flag", "1"),
            ("b1", "true"),
            ("b12", "4095"),
            ("b64", "18446744073709551615"),
            ("y", "2155"),
            (
                "d65",
                "99999999999999999999999999999999999.999999999999999999999999999999"
            ),
            ("d12", "-9999999999.99"),
            ("c", "ab"),
            ("vc", "😀 4-byte ✓"),
            ("tx", ""),
            ("bl", "00ff"),
            ("bin", "01000000"),
            ("vb", ""),
            ("dt", "9999-12-31"),
            ("dtm", "1000-01-01T00:00:00.000001"),
            ("ts", "2038-01-19T03:14:07.999999Z"),
            ("tm", "-838:59:59.000000"),
            ("js", "{\"a\": [1, 2.5, null], \"s\": \"😀\"}"),
            ("en", "large"),
            ("st", "a,c"),
        ])
    );
    assert_eq!(
        row(1),
        expect(&[
            ("id", "2"),
            ("ti", "127"),
            ("tiu", "0"),
            ("si", "32767"),
            ("siu", "0"),
            ("mi", "8388607"),
            ("miu", "0"),
            ("i", "2147483647"),
            ("iu", "0"),
            ("bi", "9223372036854775807"),
            ("biu", "0"),
            // bool is tinyint(1), which holds 2: kept as the number it is.
            ("flag", "2"),
            ("b1", "false"),
            ("b12", "0"),
            ("b64", "0"),
            ("y", "1901"),
            ("d65", "-0.000000000000000000000000000001"),
            ("d12", "0.00"),
            ("c", ""),
            ("vc", ""),
            ("tx", "long text"),
            ("bl", ""),
            ("bin", "00000000"),
            ("vb", "00"),
            // Zero dates have no calendar value: NULL (and a warning with their count).
            ("dt", "NULL"),
            ("dtm", "NULL"),
            ("ts", "1970-01-01T00:00:01Z"),
            ("tm", "838:59:59.000000"),
            ("js", "[]"),
            ("en", "small"),
            ("st", ""),
        ])
    );
    for (name, value) in row(2) {
        assert_eq!(value, if name == "id" { "3" } else { "NULL" }, "{name}");
    }
    // Floats bit for bit: the largest float and double, the smallest normal float, the
    // smallest subnormal double.
    let f = t.column_by_name("f").unwrap().as_primitive::<Float32Type>();
    let d = t
        .column_by_name("db")
        .unwrap()
        .as_primitive::<Float64Type>();
    assert_eq!(f.value(0).to_bits(), f32::MAX.to_bits());
    assert_eq!(d.value(0).to_bits(), f64::MAX.to_bits());
    assert_eq!(f.value(1).to_bits(), (-f32::MIN_POSITIVE).to_bits());
    assert_eq!(d.value(1).to_bits(), 1);
    assert!(f.is_null(2) && d.is_null(2));
    // The run's checksum is that of the table as written.
    assert_eq!(
        report.checksum.as_deref(),
        Some(content_checksum(&read_table(&dir.join("warehouse/m"))).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn integer_unsigned_and_string_keys_shard_evenly_and_load_exactly() {
    let mut conn = my().await;
    let db = fresh_database(&mut conn, "sf_shards").await;
    exec(
        &mut conn,
        &format!(
            "SET SESSION time_zone = '+00:00';
             CREATE TABLE {db}.orders (id bigint PRIMARY KEY, customer int, amount decimal(12,2),
               note varchar(60), created datetime(6), paid timestamp(6) NULL, day date,
               raw varbinary(16));
             INSERT INTO {db}.orders
             SELECT seq, IF(seq % 10 = 0, NULL, seq % 977), seq * 1.25,
                    IF(seq % 7 = 0, NULL, CONCAT('order ', seq, IF(seq % 5 = 0, ' 😀', ''))),
                    TIMESTAMP('2020-01-01') + INTERVAL seq SECOND + INTERVAL seq MICROSECOND,
                    IF(seq % 3 = 0, NULL, TIMESTAMP('2021-06-01') + INTERVAL seq MINUTE),
                    DATE('2000-01-01') + INTERVAL seq % 9000 DAY, UNHEX(HEX(seq))
             FROM seq_1_to_60000;
             -- Sparse unsigned keys up to the largest bigint unsigned.
             CREATE TABLE {db}.big (id bigint unsigned PRIMARY KEY, v int);
             INSERT INTO {db}.big SELECT 18446744073709551615 - seq * 1000, seq FROM seq_0_to_19999;
             INSERT INTO {db}.big VALUES (0, -1), (1, -2), (2, -3);
             -- A string key in a case-insensitive collation: 'k-…' and 'K-…' interleave.
             CREATE TABLE {db}.tags (code varchar(20) PRIMARY KEY, n int);
             INSERT INTO {db}.tags SELECT CONCAT(IF(seq % 2, 'k', 'K'), '-', seq), seq FROM seq_1_to_30000;
             CREATE TABLE {db}.heap (a int, b text);
             INSERT INTO {db}.heap SELECT seq, CONCAT('row ', seq) FROM seq_1_to_5000;"
        ),
    )
    .await;
    let dir = scratch("mysql_shards");
    for (table, key, rows, shard_rows, shards, method) in [
        (
            "orders",
            "id",
            60_000,
            10_000,
            6,
            "key span (dense integer key)",
        ),
        ("big", "id", 20_003, 5_001, 4, "key scan"),
        // Compared in `n` order: Rust and the collation sort `k-…` and `K-…` differently.
        ("tags", "n", 30_000, 5_000, 6, "key scan"),
        (
            "heap",
            "a",
            5_000,
            1_000,
            1,
            "none (no primary key or unique NOT NULL key of an integer or string type)",
        ),
    ] {
        let spec = job(&db, table, table, json!({}));
        let plan = plan_job(&spec, &options(&dir, shard_rows).plan)
            .await
            .unwrap();
        assert_eq!(plan.split_method, method, "{table}");
        assert_eq!(plan.shards.len(), shards, "{table}");
        let report = run_job(spec, options(&dir, shard_rows)).await;
        assert_eq!(report.status, "completed", "{table}: {report:?}");
        assert_eq!(report.rows_loaded, rows, "{table}");
        assert_eq!(report.shards, shards, "{table}");
        assert!(
            imbalance(&report.shard_rows) <= 1.5,
            "{table}: shards {:?}",
            report.shard_rows
        );
        assert_same_content(
            &mut conn,
            &db,
            table,
            &dir.join("warehouse").join(table),
            key,
        )
        .await;
    }
}

fn event_job(db: &str, last_sync_value: Option<&str>) -> shardflow::spec::JobSpec {
    job(
        db,
        "events",
        "events",
        json!({"load_type": "transactional", "timestamp_column": "at",
               "historical_start_date": "2024-01-01", "last_sync_value": last_sync_value}),
    )
}

/// The ISO watermark of event `n`, `n` minutes and a microsecond after the start.
fn event_time(n: i64) -> String {
    let at = chrono::DateTime::parse_from_rfc3339("2024-01-01T00:00:00.000001Z").unwrap()
        + chrono::Duration::minutes(n);
    at.to_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

async fn add_events(conn: &mut sqlx::MySqlConnection, db: &str, from: i64, to: i64) {
    exec(
        conn,
        &format!(
            "SET SESSION time_zone = '+00:00';
             INSERT INTO {db}.events
             SELECT seq, TIMESTAMP('2024-01-01 00:00:00.000001') + INTERVAL seq MINUTE,
                    CONCAT('event ', seq, IF(seq % 5 = 0, ' ✓', ''))
             FROM seq_{from}_to_{to}"
        ),
    )
    .await;
}

/// The watermark compares in the window column's own type for every type MySQL windows take
/// (an unsigned bigint's text would put 9e17 after 1.5e19): over three runs, every row once.
#[tokio::test]
async fn mysql_watermarks_compare_in_the_columns_type() {
    let mut conn = my().await;
    let db = fresh_database(&mut conn, "sf_marks").await;
    let cases = [
        ("int", "i"),
        (
            "bigint unsigned",
            "CAST(i AS UNSIGNED) * 100000000000000000",
        ),
        ("date", "DATE '2024-01-01' + INTERVAL i DAY"),
        (
            "datetime(6)",
            "TIMESTAMP '2024-01-01 00:00:00' + INTERVAL i * 7 HOUR",
        ),
        (
            "timestamp(6)",
            "TIMESTAMP '2024-01-01 00:00:00' + INTERVAL i MINUTE",
        ),
    ];
    for (n, (column_type, value)) in cases.into_iter().enumerate() {
        let table = format!("w{n}");
        let insert = |from: i32, to: i32| {
            format!(
                "INSERT INTO {db}.{table} SELECT i, {value} FROM
                 (SELECT a.n * 10 + b.n + 1 AS i FROM
                  (SELECT 0 n UNION SELECT 1 UNION SELECT 2 UNION SELECT 3 UNION SELECT 4 UNION
                   SELECT 5 UNION SELECT 6 UNION SELECT 7 UNION SELECT 8 UNION SELECT 9
                   UNION SELECT 10 UNION SELECT 11 UNION SELECT 12 UNION SELECT 13 UNION
                   SELECT 14 UNION SELECT 15) a,
                  (SELECT 0 n UNION SELECT 1 UNION SELECT 2 UNION SELECT 3 UNION SELECT 4 UNION
                   SELECT 5 UNION SELECT 6 UNION SELECT 7 UNION SELECT 8 UNION SELECT 9) b) s
                 WHERE i BETWEEN {from} AND {to}"
            )
        };
        exec(
            &mut conn,
            &format!(
                "SET SESSION time_zone = '+00:00';
                 CREATE TABLE {db}.{table} (id int PRIMARY KEY, w {column_type} NULL);
                 {};",
                insert(1, 150)
            ),
        )
        .await;
        let dir = scratch(&format!("mysql-marks-{n}"));
        let spec = || {
            job(
                &db,
                &table,
                &table,
                json!({"load_type": "transactional", "timestamp_column": "w",
                       "processing_mode": "dataflow"}),
            )
        };
        let first = run_job(spec(), options(&dir, 40)).await;
        assert_eq!(first.status, "completed", "{column_type}: {first:?}");
        assert_eq!(first.rows_loaded, 150, "{column_type}");
        let second = run_job(spec(), options(&dir, 40)).await;
        assert_eq!(second.rows_loaded, 0, "{column_type}: {second:?}");
        assert_eq!(second.watermark, first.watermark, "{column_type}");
        exec(
            &mut conn,
            &format!("SET SESSION time_zone = '+00:00'; {};", insert(151, 160)),
        )
        .await;
        let third = run_job(spec(), options(&dir, 40)).await;
        assert_eq!(third.rows_loaded, 10, "{column_type}: {third:?}");
        let ids = common::sorted_i32s(&dir.join(format!("warehouse/{table}")), "id");
        assert_eq!(
            ids,
            (1..=160).collect::<Vec<i32>>(),
            "{column_type}: each row once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_incremental_runs_load_every_row_exactly_once() {
    let mut conn = my().await;
    let db = fresh_database(&mut conn, "sf_incremental").await;
    exec(
        &mut conn,
        &format!(
            "SET SESSION time_zone = '+00:00';
             CREATE TABLE {db}.events (id bigint PRIMARY KEY, at timestamp(6) NULL, note varchar(40));
             -- Before historical_start_date, and without a timestamp: never loaded.
             INSERT INTO {db}.events VALUES (-1, '2023-12-31 23:59:59.999999', 'too old'),
                                            (-2, NULL, 'no time');"
        ),
    )
    .await;
    add_events(&mut conn, &db, 1, 40_000).await;
    let dir = scratch("mysql_incremental");
    let table = dir.join("warehouse/events");
    let run = |last: Option<String>, etl_run_id: i64| {
        let mut opts = options(&dir, 10_000);
        opts.etl_run_id = Some(etl_run_id);
        run_job(event_job(&db, last.as_deref()), opts)
    };

    // 1: from the historical start, cut into shards of the window.
    let first = run(None, 1).await;
    assert_eq!(first.status, "completed", "{first:?}");
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
        &event_job(&db, first.watermark.as_deref()),
        &options(&dir, 10_000).plan,
    )
    .await
    .unwrap();
    assert_eq!(plan.estimated_rows, 0, "nothing new after run 1");

    // 2: the table grew; only the new rows come.
    add_events(&mut conn, &db, 40_001, 52_000).await;
    let second = run(first.watermark.clone(), 2).await;
    assert_eq!(second.status, "completed", "{second:?}");
    assert_eq!(second.rows_loaded, 12_000);
    assert_eq!(
        second.watermark.as_deref(),
        Some(event_time(52_000).as_str())
    );

    // 3: an empty window completes, loads nothing, leaves the table and the watermark.
    let before = table_listing(&table);
    let third = run(second.watermark.clone(), 3).await;
    assert_eq!(third.status, "completed", "{third:?}");
    assert_eq!((third.rows_loaded, third.shards), (0, 0));
    assert_eq!(third.watermark, second.watermark);
    assert_eq!(table_listing(&table), before);

    // 4: rows committed while the run goes wait for the next run.
    add_events(&mut conn, &db, 52_001, 60_000).await;
    let state = shardflow::state::sql::SqlStateStore::open(&format!(
        "sqlite://{}",
        dir.join("state.db").display()
    ))
    .await
    .unwrap();
    let fourth = tokio::spawn(run(second.watermark.clone(), 4));
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
    add_events(&mut conn, &db, 60_001, 61_000).await;
    let fourth = fourth.await.unwrap();
    assert_eq!(fourth.status, "completed", "{fourth:?}");
    assert_eq!(fourth.rows_loaded, 8_000);
    let fifth = run(fourth.watermark.clone(), 5).await;
    assert_eq!(fifth.rows_loaded, 1_000, "{fifth:?}");

    // Every row from the historical start is in the table exactly once, and the runs'
    // checksums add up to the table's.
    exec(&mut conn, &format!("DELETE FROM {db}.events WHERE id < 0")).await;
    assert_same_content(&mut conn, &db, "events", &table, "id").await;
    let runs = [&first, &second, &third, &fourth, &fifth];
    let combined =
        shardflow::digest::combine_checksums(runs.iter().map(|r| r.checksum.as_deref().unwrap()))
            .unwrap();
    assert_eq!(combined, content_checksum(&read_table(&table)));

    // A watermark that is not a value of the column is a named error, before any data moves.
    let bad = run(Some("yesterday-ish".into()), 6).await;
    assert_eq!(bad.status, "failed");
    assert!(
        bad.error_message
            .as_deref()
            .unwrap()
            .contains("last_sync_value: \"yesterday-ish\" is not a value of \"at\""),
        "{bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_merge_runs_keep_the_latest_version_of_each_key() {
    let mut conn = my().await;
    let db = fresh_database(&mut conn, "sf_merge").await;
    exec(
        &mut conn,
        &format!(
            "CREATE TABLE {db}.accounts (id bigint unsigned PRIMARY KEY, region varchar(10),
               balance decimal(12,2), updated_at datetime(6) NOT NULL);
             INSERT INTO {db}.accounts
             SELECT seq, IF(seq % 7 = 0, NULL, CONCAT('r', seq % 3)), seq * 1.25,
                    TIMESTAMP('2024-01-01') + INTERVAL seq SECOND
             FROM seq_1_to_30000;"
        ),
    )
    .await;
    let dir = scratch("mysql_merge");
    let table = dir.join("warehouse/accounts");
    let merge_job = |last: Option<&str>, lookback: Option<&str>| {
        job(
            &db,
            "accounts",
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

    // 1: every row, in four shards; the merge keys default to the primary key.
    let first = run(merge_job(None, None), 1).await;
    assert_eq!(first.status, "completed", "{first:?}");
    assert_eq!((first.rows_loaded, first.shards), (30_000, 4));
    assert_eq!(first.watermark.as_deref(), Some("2024-01-01T08:20:00"));
    assert_same_content(&mut conn, &db, "accounts", &table, "id").await;

    // 2: 5,000 rows change and 2,000 are new: only those are read, and the table holds each
    // key once, in its new version.
    exec(
        &mut conn,
        &format!(
            "UPDATE {db}.accounts SET balance = balance + 1000, region = 'moved',
                    updated_at = TIMESTAMP('2024-02-01') + INTERVAL id * 1000 MICROSECOND
             WHERE id % 6 = 0;
             INSERT INTO {db}.accounts
             SELECT seq, 'new', seq, TIMESTAMP('2024-02-02') + INTERVAL seq * 1000 MICROSECOND
             FROM seq_30001_to_32000;"
        ),
    )
    .await;
    let second = run(merge_job(first.watermark.as_deref(), None), 2).await;
    assert_eq!(second.status, "completed", "{second:?}");
    assert_eq!(second.rows_loaded, 7_000);
    assert_same_content(&mut conn, &db, "accounts", &table, "id").await;

    // 3: late rows with timestamps before the watermark are merged by a run whose lookback
    // reaches back to them.
    exec(
        &mut conn,
        &format!(
            "UPDATE {db}.accounts SET balance = -1,
                    updated_at = TIMESTAMP('2024-02-02') + INTERVAL 31000000 MICROSECOND
             WHERE id BETWEEN 1 AND 100"
        ),
    )
    .await;
    let third = run(merge_job(second.watermark.as_deref(), Some("2 seconds")), 3).await;
    assert_eq!(third.status, "completed", "{third:?}");
    // The 100 late rows plus the 2,000 rows of the two seconds before the watermark.
    assert_eq!(third.rows_loaded, 2_100);
    assert_eq!(third.watermark, second.watermark);
    assert_same_content(&mut conn, &db, "accounts", &table, "id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_bad_inputs_get_named_errors_and_move_nothing() {
    let mut conn = my().await;
    let db = fresh_database(&mut conn, "sf_errors").await;
    exec(
        &mut conn,
        &format!("CREATE TABLE {db}.t (id int PRIMARY KEY, name varchar(10), v varchar(10));"),
    )
    .await;
    let dir = scratch("mysql_errors");
    let fails = |spec, why: &'static str| {
        let dir = dir.clone();
        async move {
            let started = Instant::now();
            let mut opts = options(&dir, 1_000);
            opts.plan.retry = RetryPolicy::default();
            let report = run_job(spec, opts).await;
            assert_eq!(report.status, "failed", "{report:?}");
            let message = report.error_message.unwrap_or_default();
            assert!(message.contains(why), "{message:?} should say {why:?}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{why}: refused at once, not retried"
            );
        }
    };
    fails(
        job(&db, "nope", "nope", json!({})),
        "table sf_errors.nope not found in MySQL",
    )
    .await;
    fails(
        job(&db, "t", "t", json!({"selected_columns": ["id", "nmae"]})),
        "column \"nmae\" not found in sf_errors.t (columns: id, name, v)",
    )
    .await;
    fails(
        job(&db, "t", "t", json!({"load_type": "transactional", "timestamp_column": "name"})),
        "timestamp_column: \"name\" is varchar(10); an incremental load needs a date, datetime, timestamp or integer column",
    )
    .await;
    let mut wrong = job_json(&db, "t", "t", json!({}));
    wrong["connection_params"]["username"] = json!("nobody_here");
    wrong["connection_params"]["password"] = json!("pw-never-shown-81f3");
    let spec = shardflow::spec::JobSpec::from_json(&wrong.to_string()).unwrap();
    fails(
        spec,
        "the source database refused the job: cannot connect to MySQL at 127.0.0.1:3306/sf_errors",
    )
    .await;
    assert!(!dir.join("warehouse/t").exists());
    assert!(!dir.join("warehouse/nope").exists());
}
