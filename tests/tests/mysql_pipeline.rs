//! MySQL/MariaDB → planned shards → workers → Parquet table, against the running MariaDB.

mod common;

use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type};
use arrow::util::display::array_value_to_string;
use common::my::*;
use common::{content_checksum, exact_options as options, read_table, scratch};
use serde_json::json;
use shardflow::plan::imbalance;
use shardflow::retry::RetryPolicy;
use shardflow::state::RunStatus;
use shardflow_dispatcher::{plan_job, run_job};

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
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
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
        assert_eq!(report.status, RunStatus::Completed, "{table}: {report:?}");
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
        assert_eq!(
            first.status,
            RunStatus::Completed,
            "{column_type}: {first:?}"
        );
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
            assert_eq!(report.status, RunStatus::Failed, "{report:?}");
            let message = report.error_message.unwrap_or_default();
            assert!(message.contains(why), "{message:?} should say {why:?}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{why}: refused at once, not retried"
            );
        }
    };
    // Missing tables and columns, and refused credentials: the source suite (sources.rs).
    fails(
        job(&db, "t", "t", json!({"load_type": "transactional", "timestamp_column": "name"})),
        "timestamp_column: \"name\" is varchar(10); an incremental load needs a date, datetime, timestamp or integer column",
    )
    .await;
    assert!(!dir.join("warehouse/t").exists());
}
