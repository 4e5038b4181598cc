//! File sources end to end: local files and S3 (moto) through the embedded pipeline into the
//! Parquet warehouse, every value compared; formats, compressions, delimiters, encodings,
//! headers; a malformed line; schema drift; incremental pickup with a rewritten file; and the
//! list-files / detect-schema commands.

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::util::display::array_value_to_string;
use common::{env_or_fail, read_table, scratch, table_listing};
use md5::{Digest as _, Md5};
use shardflow::retry::RetryPolicy;
use shardflow::spec::JobSpec;
use shardflow::state::RunStatus;
use shardflow_dispatcher::{PlanOptions, RunOptions, RunReport, run_job};
use tokio::io::AsyncReadExt as _;

/// id, amount, name, at (ISO, UTC).
type Row = (i64, Option<f64>, Option<&'static str>, Option<&'static str>);

const ROWS: &[Row] = &[
    (1, Some(1.5), Some("café"), Some("2024-01-01T10:00:00")),
    (
        2,
        Some(-2.25),
        Some("comma, \"quoted\""),
        Some("2024-01-02T00:00:00"),
    ),
    (3, None, None, None),
    (
        4,
        Some(1e-7),
        Some("four bytes 😀"),
        Some("1999-12-31T23:59:59.123456"),
    ),
    (5, Some(0.0), Some("plain"), Some("2038-01-19T03:14:08")),
];

/// The rows without characters latin-1 cannot hold.
fn latin1_rows() -> Vec<Row> {
    ROWS.iter().copied().filter(|r| r.0 != 4).collect()
}

fn expected(rows: &[Row]) -> Vec<String> {
    let mut out: Vec<String> = rows
        .iter()
        .map(|(id, amount, name, at)| {
            format!(
                "{id}|{}|{}|{}",
                // As arrow prints them: what the loaded table holds, value for value.
                amount.map_or("NULL".into(), |a| array_value_to_string(
                    &Float64Array::from(vec![a]),
                    0
                )
                .unwrap()),
                name.unwrap_or("NULL"),
                at.map_or("NULL".into(), |t| format!("{t}Z"))
            )
        })
        .collect();
    out.sort();
    out
}

/// A time as exporters write a column of them (pandas' `to_csv`, say): every value with the
/// same six fraction digits. pandas reads a column of times in its first value's format only,
/// so a mix of `10:00:00` and `23:59:59.123456` would be text to it, and to detection.
fn exported(at: &str) -> String {
    if at.contains('.') {
        at.to_string()
    } else {
        format!("{at}.000000")
    }
}

fn csv(rows: &[Row], delimiter: char, header: bool) -> String {
    let quote = |s: &str| {
        if s.contains([delimiter, '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = String::new();
    if header {
        out.push_str(&["id", "amount", "name", "at"].join(&delimiter.to_string()));
        out.push('\n');
    }
    for (id, amount, name, at) in rows {
        let fields = [
            id.to_string(),
            amount.map(|a| a.to_string()).unwrap_or_default(),
            name.map(quote).unwrap_or_default(),
            at.map(exported).unwrap_or_default(),
        ];
        out.push_str(&fields.join(&delimiter.to_string()));
        out.push('\n');
    }
    out
}

fn json_values(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .map(|(id, amount, name, at)| {
            // The id as text, as BigQuery asks of integers in JSON ("pass it as a string to
            // avoid data corruption"); read_json makes it int64 all the same.
            serde_json::json!({"id": id.to_string(), "amount": amount, "name": name, "at": at.map(|t| format!("{}Z", exported(t)))})
                .to_string()
        })
        .collect()
}

fn jsonl(rows: &[Row]) -> String {
    json_values(rows).join("\n") + "\n"
}

fn parquet(rows: &[Row], compression: parquet::basic::Compression) -> Vec<u8> {
    parquet_in(rows, compression, TimeUnit::Nanosecond)
}

/// The rows as Parquet, `at` in `unit`.
fn parquet_in(rows: &[Row], compression: parquet::basic::Compression, unit: TimeUnit) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int32, false),
        Field::new("amount", DataType::Float64, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("at", DataType::Timestamp(unit, Some("+00:00".into())), true),
    ]));
    let micros = |t: &str| {
        chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f")
            .unwrap()
            .and_utc()
            .timestamp_micros()
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(arrow::array::Int32Array::from_iter_values(
                rows.iter().map(|r| r.0 as i32),
            )),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2))),
            arrow::compute::cast(
                &arrow::array::TimestampNanosecondArray::from_iter(
                    rows.iter().map(|r| r.3.map(|t| micros(t) * 1000)),
                )
                .with_timezone("+00:00"),
                schema.field(3).data_type(),
            )
            .unwrap(),
        ],
    )
    .unwrap();
    let mut out = Vec::new();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(compression)
        .set_max_row_group_row_count(Some(2))
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

async fn compress(bytes: &[u8], kind: &str) -> Vec<u8> {
    let mut out = Vec::new();
    match kind {
        "gz" => {
            async_compression::tokio::bufread::GzipEncoder::new(bytes)
                .read_to_end(&mut out)
                .await
                .unwrap();
        }
        "zst" => {
            async_compression::tokio::bufread::ZstdEncoder::new(bytes)
                .read_to_end(&mut out)
                .await
                .unwrap();
        }
        _ => out.extend_from_slice(bytes),
    }
    out
}

fn options(dir: &Path) -> RunOptions {
    RunOptions {
        plan: PlanOptions {
            shard_rows: 2,
            workers: None,
            exact_count: false,
            retry: RetryPolicy::none(),
            warehouse_loads_gcs: false,
            ..Default::default()
        },
        workers: 2,
        dest: dir.join("warehouse").display().to_string(),
        state_url: format!("sqlite://{}", dir.join("state.db").display()),
        batch_rows: 2,
        max_delivery_attempts: 1,
        ..Default::default()
    }
}

fn local_job(files: &Path, pattern: &str, format: &str, extra: serde_json::Value) -> JobSpec {
    let base = serde_json::json!({
        "source_type": "local",
        "dest_table_name": "loaded",
        "file_path_prefix": format!("{}/", files.display()),
        "file_pattern": pattern,
        "file_format": format,
        "load_type": "transactional",
        "load_latest_only": false,
        "processing_mode": "dataflow",
    });
    JobSpec::from_json(&common::with_fields(base, extra).to_string()).expect("valid job")
}

/// Every loaded row as `id|amount|name|at`, sorted; columns by position.
fn loaded(dir: &Path) -> Vec<String> {
    let batches = read_table(&dir.join("warehouse/loaded"));
    let mut out = Vec::new();
    for b in &batches {
        let b = printable(b);
        // By name where the columns have theirs (JSON's come in key order); by position
        // for a CSV without a header.
        let order: Vec<usize> = match ["id", "amount", "name", "at"]
            .iter()
            .map(|n| b.schema().index_of(n).ok())
            .collect::<Option<Vec<usize>>>()
        {
            Some(order) => order,
            None => (0..b.num_columns()).collect(),
        };
        for row in 0..b.num_rows() {
            let line: Vec<String> = order.iter().map(|&i| cell_text(b.column(i), row)).collect();
            out.push(line.join("|"));
        }
    }
    out.sort();
    out
}

/// The batch with its zoned timestamps in `+00:00`, which arrow prints with a `Z`.
fn printable(batch: &RecordBatch) -> RecordBatch {
    let columns = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Timestamp(unit, Some(_)) => {
                arrow::compute::cast(c, &DataType::Timestamp(*unit, Some("+00:00".into()))).unwrap()
            }
            _ => c.clone(),
        })
        .collect();
    let fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .zip(&columns)
        .map(|(f, c): (_, &arrow::array::ArrayRef)| {
            Field::new(f.name(), c.data_type().clone(), f.is_nullable())
        })
        .collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
}

/// One value as arrow prints it, `NULL` for null.
fn cell_text(column: &arrow::array::ArrayRef, row: usize) -> String {
    if column.is_null(row) {
        return "NULL".to_string();
    }
    array_value_to_string(column, row).unwrap()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn ok(report: &RunReport) {
    assert_eq!(
        report.status,
        RunStatus::Completed,
        "{:?}",
        report.error_message
    );
}

fn bigquery_schema() -> serde_json::Value {
    serde_json::json!([
        {"name": "id", "bigquery_type": "INT64", "bigquery_mode": "NULLABLE"},
        {"name": "amount", "bigquery_type": "FLOAT64", "bigquery_mode": "NULLABLE"},
        {"name": "name", "bigquery_type": "STRING", "bigquery_mode": "NULLABLE"},
        {"name": "at", "bigquery_type": "TIMESTAMP", "bigquery_mode": "NULLABLE"}
    ])
}

#[tokio::test]
async fn every_format_compression_delimiter_and_encoding_loads_exactly() {
    // name, file, format, bytes, file_format_options, rows it holds
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        Vec<u8>,
        serde_json::Value,
        Vec<Row>,
    );
    let cases: Vec<Case> = vec![
        (
            "csv-comma",
            "d.csv",
            "csv",
            csv(ROWS, ',', true).into_bytes(),
            serde_json::json!({}),
            ROWS.to_vec(),
        ),
        (
            "csv-pipe",
            "d.csv",
            "csv",
            csv(ROWS, '|', true).into_bytes(),
            serde_json::json!({"delimiter": "|"}),
            ROWS.to_vec(),
        ),
        (
            "csv-tab",
            "d.tsv",
            "csv",
            csv(ROWS, '\t', true).into_bytes(),
            serde_json::json!({"delimiter": "\\t"}),
            ROWS.to_vec(),
        ),
        (
            "csv-semicolon",
            "d.csv",
            "csv",
            csv(ROWS, ';', true).into_bytes(),
            serde_json::json!({"delimiter": ";"}),
            ROWS.to_vec(),
        ),
        (
            "csv-no-header",
            "d.csv",
            "csv",
            csv(ROWS, ',', false).into_bytes(),
            serde_json::json!({"has_header": false}),
            ROWS.to_vec(),
        ),
        (
            "csv-latin1",
            "d.csv",
            "csv",
            csv(&latin1_rows(), ',', true)
                .chars()
                .map(|c| c as u32 as u8)
                .collect(),
            serde_json::json!({"encoding": "latin-1"}),
            latin1_rows(),
        ),
        (
            "csv-iso-8859-1",
            "d.csv",
            "csv",
            csv(&latin1_rows(), ',', true)
                .chars()
                .map(|c| c as u32 as u8)
                .collect(),
            serde_json::json!({"encoding": "iso-8859-1"}),
            latin1_rows(),
        ),
        (
            "jsonl",
            "d.jsonl",
            "json",
            (json_values(ROWS).join("\n") + "\n").into_bytes(),
            serde_json::json!({}),
            ROWS.to_vec(),
        ),
        (
            "json-array",
            "d.json",
            "json",
            format!("[\n{}\n]", json_values(ROWS).join(",\n")).into_bytes(),
            serde_json::json!({}),
            ROWS.to_vec(),
        ),
        (
            "parquet-snappy",
            "d.parquet",
            "parquet",
            parquet(ROWS, parquet::basic::Compression::SNAPPY),
            serde_json::json!({}),
            ROWS.to_vec(),
        ),
        (
            "parquet-zstd",
            "d.parquet",
            "parquet",
            parquet(ROWS, parquet::basic::Compression::ZSTD(Default::default())),
            serde_json::json!({}),
            ROWS.to_vec(),
        ),
        (
            "parquet-plain",
            "d.parquet",
            "parquet",
            parquet(ROWS, parquet::basic::Compression::UNCOMPRESSED),
            serde_json::json!({}),
            ROWS.to_vec(),
        ),
    ];
    for (name, file, format, bytes, file_options, rows) in cases {
        let compressions: &[&str] = if format == "parquet" {
            &[""]
        } else {
            &["", "gz", "zst"]
        };
        for &kind in compressions {
            let dir = scratch(&format!("files-{name}-{kind}"));
            let path = if kind.is_empty() {
                dir.join("in").join(file)
            } else {
                dir.join("in").join(format!("{file}.{kind}"))
            };
            write(&path, &compress(&bytes, kind).await);
            let job = local_job(
                &dir.join("in"),
                "d.*",
                format,
                serde_json::json!({"file_format_options": file_options}),
            );
            let report = run_job(job, options(&dir)).await;
            ok(&report);
            assert_eq!(report.rows_loaded, rows.len() as u64, "{name} {kind}");
            assert_eq!(report.files_loaded, Some(1), "{name} {kind}");
            assert_eq!(loaded(&dir), expected(&rows), "{name} {kind}");
        }
    }
}

#[tokio::test]
async fn many_files_in_subfolders_group_into_shards_and_load_once_each() {
    let dir = scratch("files-many");
    let mut all = Vec::new();
    for i in 0..7i64 {
        let rows: Vec<Row> = ROWS.iter().map(|r| (r.0 + 10 * i, r.1, r.2, r.3)).collect();
        let sub = if i % 2 == 0 { "a" } else { "b/c" };
        write(
            &dir.join(format!("in/{sub}/part_{i}.csv")),
            csv(&rows, ',', true).as_bytes(),
        );
        all.extend(rows);
    }
    // Not matched: another name, and a file outside the prefix.
    write(&dir.join("in/a/other.csv"), b"id\n999\n");
    write(
        &dir.join("elsewhere/part_9.csv"),
        csv(ROWS, ',', true).as_bytes(),
    );
    let job = local_job(&dir.join("in"), "part_*.csv", "csv", serde_json::json!({}));
    let mut opts = options(&dir);
    opts.plan.shard_rows = 12;
    let report = run_job(job, opts).await;
    ok(&report);
    assert_eq!(report.files_loaded, Some(7));
    assert_eq!(report.rows_loaded, 35);
    // 5 rows a file, 12 rows a shard: files are grouped three to a shard.
    assert_eq!(report.shard_rows, vec![15, 15, 5]);
    assert_eq!(loaded(&dir), expected(&all));
}

/// The values the system we replace read with pandas: its missing-value markers are NULL in
/// every column, its float spellings are floats, and times in the formats `to_datetime` reads
/// load into the job's TIMESTAMP.
#[tokio::test]
async fn pandas_markers_floats_and_time_formats_load_as_the_seed_read_them() {
    let dir = scratch("files-pandas-values");
    write(
        &dir.join("in/a.csv"),
        b"id,amount,name,at\n1,NA,N/A,Jan 31 2024\n2,-inf,NULL,Feb 1 2024\n3,1e3,None,\n4,nan,x,Dec 31 1999\n",
    );
    let extra = serde_json::json!({"bigquery_schema": bigquery_schema()});
    let report = run_job(
        local_job(&dir.join("in"), "*.csv", "csv", extra),
        options(&dir),
    )
    .await;
    ok(&report);
    assert_eq!(
        loaded(&dir),
        [
            "1|NULL|NULL|2024-01-31T00:00:00Z",
            "2|-inf|NULL|2024-02-01T00:00:00Z",
            "3|1000.0|NULL|NULL",
            "4|NULL|x|1999-12-31T00:00:00Z"
        ]
    );
    // Detection agrees: the markers are missing values, so the integers stay INT64, the
    // floats FLOAT64, and the dates TIMESTAMP (pandas' dtypes object and float64).
    let job_file = dir.join("job.json");
    let config = serde_json::json!({
        "source_type": "local", "dest_table_name": "t",
        "file_path_prefix": format!("{}/in/", dir.display()), "file_pattern": "*.csv",
        "file_format": "csv"
    });
    std::fs::write(&job_file, config.to_string()).unwrap();
    let schema = dispatcher(&["detect-schema", "--job", job_file.to_str().unwrap()]);
    let described: Vec<String> = schema["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}:{}:{}",
                c["name"].as_str().unwrap(),
                c["type"].as_str().unwrap(),
                c["bigquery_type"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        described,
        [
            "id:int64:INT64",
            "amount:float64:FLOAT64",
            "name:object:STRING",
            "at:object:TIMESTAMP"
        ]
    );
}

#[tokio::test]
async fn a_malformed_line_fails_the_run_naming_file_and_line_and_loads_nothing() {
    let dir = scratch("files-malformed");
    let good = csv(ROWS, ',', true);
    write(&dir.join("in/a_good.csv"), good.as_bytes());
    let bad = "id,amount,name,at\n1,1.5,x,2024-01-01\n2,2.5,y,2024-01-02\n3,abc,z,2024-01-03\n";
    write(&dir.join("in/b_bad.csv"), bad.as_bytes());
    let extra = serde_json::json!({"bigquery_schema": bigquery_schema()});
    let job = local_job(&dir.join("in"), "*.csv", "csv", extra.clone());
    let report = run_job(job.clone(), options(&dir)).await;
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error_message.unwrap();
    let uri = format!(
        "file://{}/in/b_bad.csv",
        dir.canonicalize().unwrap().display()
    );
    assert!(
        error.ends_with(&format!(
            "{uri}, line 4: column \"amount\": \"abc\" is not a number (FLOAT64)"
        )),
        "{error}"
    );
    assert!(!dir.join("warehouse/loaded").exists(), "nothing loaded");

    // A time in another format than the column's first value (pandas' rule): named.
    write(
        &dir.join("in/b_bad.csv"),
        b"id,amount,name,at\n1,1.5,x,01/31/2024\n2,2.5,y,2024-02-01\n",
    );
    let error = run_job(job.clone(), options(&dir))
        .await
        .error_message
        .unwrap();
    assert!(
        error.ends_with(&format!(
            "{uri}, line 3: column \"at\": \"2024-02-01\" does not match: the format %m/%d/%Y \
             of the column's first value"
        )),
        "{error}"
    );
    assert!(!dir.join("warehouse/loaded").exists(), "nothing loaded");

    // A row with a missing field.
    write(
        &dir.join("in/b_bad.csv"),
        b"id,amount,name,at\n1,1.5,x,2024-01-01\n2,2.5\n",
    );
    let report = run_job(job.clone(), options(&dir)).await;
    let error = report.error_message.unwrap();
    // Found by the schema check's sample, or by the load: either way file and line.
    assert!(
        error.contains(&format!("{uri}, line 3: ")) && error.contains("line 3"),
        "{error}"
    );
    // An unclosed quote: the following lines would be swallowed into one value.
    write(
        &dir.join("in/b_bad.csv"),
        b"id,amount,name,at\n1,1.5,x,2024-01-01\n2,2.5,y,\"2024-01-02\n3,3.5,z,2024-01-03\n",
    );
    let report = run_job(job.clone(), options(&dir)).await;
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error_message.unwrap();
    assert!(
        error.ends_with(&format!(
            "{uri}, line 3: a quoted field opens here and is not closed before the end of the file"
        )),
        "{error}"
    );
    assert!(!dir.join("warehouse/loaded").exists(), "nothing loaded");
    // UTF-8 declared, latin-1 bytes.
    write(
        &dir.join("in/b_bad.csv"),
        b"id,amount,name,at\n1,1.5,caf\xe9,2024-01-01\n",
    );
    let report = run_job(job.clone(), options(&dir)).await;
    let error = report.error_message.unwrap();
    assert!(
        error.contains(&uri) && error.contains("invalid UTF-8"),
        "{error}"
    );
    // JSON lines: the line of the bad value.
    write(
        &dir.join("in/c.jsonl"),
        br#"{"id": 1, "amount": 1.5, "name": "a", "at": null}
{"id": 2, "amount": 2.5, "name": "b", "at": null}
{"id": "x", "amount": 3.5, "name": "c", "at": null}
"#,
    );
    let json = local_job(&dir.join("in"), "c.jsonl", "json", extra.clone());
    let report = run_job(json, options(&dir)).await;
    let error = report.error_message.unwrap();
    let json_uri = format!(
        "file://{}/in/c.jsonl",
        dir.canonicalize().unwrap().display()
    );
    assert!(error.contains(&format!("{json_uri}, line 3: ")), "{error}");
    assert!(!dir.join("warehouse/loaded").exists(), "nothing loaded");

    // Fixed: the failed runs recorded nothing, so every file loads now.
    std::fs::remove_file(dir.join("in/c.jsonl")).unwrap();
    write(
        &dir.join("in/b_bad.csv"),
        csv(&ROWS[..2], ',', true).as_bytes(),
    );
    let report = run_job(job, options(&dir)).await;
    ok(&report);
    assert_eq!(report.files_loaded, Some(2));
    let mut want = ROWS.to_vec();
    want.extend_from_slice(&ROWS[..2]);
    assert_eq!(loaded(&dir), expected(&want));
}

#[tokio::test]
async fn schema_drift_fails_before_loading_and_names_the_columns() {
    let dir = scratch("files-drift");
    write(&dir.join("in/a.csv"), csv(ROWS, ',', true).as_bytes());
    write(
        &dir.join("in/b.csv"),
        b"id,amount,extra,at\n9,true,x,2024-01-01\n",
    );
    let job = local_job(
        &dir.join("in"),
        "*.csv",
        "csv",
        serde_json::json!({"bigquery_schema": bigquery_schema()}),
    );
    let report = run_job(job, options(&dir)).await;
    let uri = format!("file://{}/in/b.csv", dir.canonicalize().unwrap().display());
    assert_eq!(
        report.error_message.as_deref(),
        Some(
            format!(
                "schema drift in {uri}: added: extra STRING; removed: name; changed: amount \
                 FLOAT64 -> BOOL; nothing was loaded (schema_policy \"add_columns\" adds new \
                 columns and loads removed ones as NULL)"
            )
            .as_str()
        )
    );
    assert!(!dir.join("warehouse/loaded").exists());

    // Without bigquery_schema, the stored fingerprint is what the files must match.
    let fingerprint = hex::encode(Md5::digest(
        b"id:INT64|amount:FLOAT64|name:STRING|at:TIMESTAMP",
    ));
    let job = local_job(
        &dir.join("in"),
        "b.csv",
        "csv",
        serde_json::json!({"schema_fingerprint": fingerprint}),
    );
    let report = run_job(job, options(&dir)).await;
    let error = report.error_message.unwrap();
    assert!(
        error.starts_with(&format!(
            "schema drift: {uri} has columns [id:INT64|amount:BOOL|extra:STRING|at:TIMESTAMP]"
        )) && error.contains(&fingerprint),
        "{error}"
    );
    let job = local_job(
        &dir.join("in"),
        "a.csv",
        "csv",
        serde_json::json!({"schema_fingerprint": fingerprint}),
    );
    ok(&run_job(job, options(&dir)).await);
    assert_eq!(loaded(&dir), expected(ROWS));
}

#[tokio::test]
async fn incremental_runs_pick_up_new_and_rewritten_files_once() {
    let dir = scratch("files-incremental");
    let rows =
        |from: i64| -> Vec<Row> { ROWS.iter().map(|r| (r.0 + from, r.1, r.2, r.3)).collect() };
    let put = |name: &str, from: i64| {
        write(
            &dir.join("in").join(name),
            csv(&rows(from), ',', true).as_bytes(),
        );
    };
    let job = |latest_only: bool| {
        local_job(
            &dir.join("in"),
            "tx_*.csv",
            "csv",
            serde_json::json!({"load_latest_only": latest_only, "bigquery_schema": bigquery_schema()}),
        )
    };
    put("tx_1.csv", 0);
    put("tx_2.csv", 100);
    // Run 1: both files.
    let report = run_job(job(false), options(&dir)).await;
    ok(&report);
    assert_eq!((report.files_loaded, report.rows_loaded), (Some(2), 10));
    let mut want = [rows(0), rows(100)].concat();
    assert_eq!(loaded(&dir), expected(&want));
    // Run 2: nothing new; the table is untouched.
    let before = table_listing(&dir.join("warehouse/loaded"));
    let report = run_job(job(false), options(&dir)).await;
    ok(&report);
    assert_eq!((report.files_loaded, report.rows_loaded), (Some(0), 0));
    assert_eq!(table_listing(&dir.join("warehouse/loaded")), before);
    // Run 3: a new file, and tx_1 rewritten with new content. Appending tx_1 again would add
    // its first rows a second time: the run fails naming it, and nothing moves.
    std::thread::sleep(std::time::Duration::from_millis(20));
    put("tx_3.csv", 200);
    put("tx_1.csv", 300);
    let report = run_job(job(false), options(&dir)).await;
    assert_eq!(report.status, RunStatus::Failed);
    let error = report.error_message.unwrap();
    let uri = format!(
        "file://{}/in/tx_1.csv",
        dir.canonicalize().unwrap().display()
    );
    assert!(
        error.starts_with(&format!(
            "rewritten since a transactional run loaded them: {uri} (5 rows loaded by run "
        )) && error.ends_with(
            "Appending them again would add the rows loaded before a second time, so nothing \
             was loaded: give new content a new file name, or load the stream with load_type \
             \"catalog\" (the table is then the files as they are)"
        ),
        "{error}"
    );
    assert_eq!(table_listing(&dir.join("warehouse/loaded")), before);
    // The new content under a new name loads, with the new file; tx_2 does not.
    std::fs::rename(dir.join("in/tx_1.csv"), dir.join("in/tx_1b.csv")).unwrap();
    let report = run_job(job(false), options(&dir)).await;
    ok(&report);
    assert_eq!((report.files_loaded, report.rows_loaded), (Some(2), 10));
    want.extend(rows(200));
    want.extend(rows(300));
    assert_eq!(loaded(&dir), expected(&want));
    // load_latest_only: the newest unprocessed file only, then the next.
    std::thread::sleep(std::time::Duration::from_millis(20));
    put("tx_4.csv", 400);
    std::thread::sleep(std::time::Duration::from_millis(20));
    put("tx_5.csv", 500);
    let report = run_job(job(true), options(&dir)).await;
    ok(&report);
    assert_eq!(report.files_loaded, Some(1));
    want.extend(rows(500));
    assert_eq!(loaded(&dir), expected(&want));
    let report = run_job(job(true), options(&dir)).await;
    assert_eq!(report.files_loaded, Some(1));
    want.extend(rows(400));
    assert_eq!(loaded(&dir), expected(&want));
}

#[tokio::test]
async fn a_catalog_file_job_replaces_the_table_with_every_file_or_the_newest() {
    let dir = scratch("files-catalog");
    let rows =
        |from: i64| -> Vec<Row> { ROWS.iter().map(|r| (r.0 + from, r.1, r.2, r.3)).collect() };
    let put = |name: &str, from: i64| {
        write(
            &dir.join("in").join(name),
            csv(&rows(from), ',', true).as_bytes(),
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let job = |latest_only: bool| {
        local_job(
            &dir.join("in"),
            "tx_*.csv",
            "csv",
            serde_json::json!({"load_type": "catalog", "load_latest_only": latest_only,
                               "bigquery_schema": bigquery_schema()}),
        )
    };
    put("tx_1.csv", 0);
    put("tx_2.csv", 100);
    let report = run_job(job(false), options(&dir)).await;
    ok(&report);
    assert_eq!((report.files_loaded, report.rows_loaded), (Some(2), 10));
    assert_eq!(loaded(&dir), expected(&[rows(0), rows(100)].concat()));
    // A new file: the table is replaced with all three, the earlier files' rows kept.
    put("tx_3.csv", 200);
    let report = run_job(job(false), options(&dir)).await;
    ok(&report);
    assert_eq!((report.files_loaded, report.rows_loaded), (Some(3), 15));
    assert_eq!(
        loaded(&dir),
        expected(&[rows(0), rows(100), rows(200)].concat())
    );
    // Nothing new: the same snapshot again, not an empty table.
    let report = run_job(job(false), options(&dir)).await;
    ok(&report);
    assert_eq!(report.rows_loaded, 15);
    assert_eq!(
        loaded(&dir),
        expected(&[rows(0), rows(100), rows(200)].concat())
    );
    // load_latest_only: the table is the newest file, and stays it when nothing changes.
    for _ in 0..2 {
        let report = run_job(job(true), options(&dir)).await;
        ok(&report);
        assert_eq!((report.files_loaded, report.rows_loaded), (Some(1), 5));
        assert_eq!(loaded(&dir), expected(&rows(200)));
    }
}

#[tokio::test]
async fn an_empty_file_loads_no_rows_and_never_a_table_without_columns() {
    for load_type in ["catalog", "transactional"] {
        let dir = scratch(&format!("files-empty-{load_type}"));
        let job = || {
            local_job(
                &dir.join("in"),
                "tx_*.csv",
                "csv",
                serde_json::json!({"load_type": load_type}),
            )
        };
        write(&dir.join("in/tx_1.csv"), b"");
        let report = run_job(job(), options(&dir)).await;
        if load_type == "catalog" {
            // A truncated export must not empty the table.
            assert_eq!(report.status, RunStatus::Failed);
            let error = report.error_message.unwrap_or_default();
            assert!(
                error.starts_with("every file of this catalog job is empty (file://")
                    && error.ends_with("tx_1.csv): loading them would replace the table with nothing, so nothing was loaded"),
                "{error}"
            );
        } else {
            ok(&report);
            assert_eq!((report.rows_loaded, report.shards), (0, 0));
        }
        assert!(
            !dir.join("warehouse/loaded").exists(),
            "no table is written"
        );
        // With a file that has content, the empty one adds no rows and no drift.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write(&dir.join("in/tx_2.csv"), csv(ROWS, ',', true).as_bytes());
        let report = run_job(job(), options(&dir)).await;
        ok(&report);
        assert_eq!(report.rows_loaded, ROWS.len() as u64);
        assert_eq!(loaded(&dir), expected(ROWS));
    }
}

#[tokio::test]
async fn repeated_header_names_load_each_columns_own_values_under_pandas_names() {
    let dir = scratch("files-duplicate-header");
    write(
        &dir.join("in/tx_1.csv"),
        b"id,name,name,name.1\n1,a,b,c\n2,d,e,f\n",
    );
    let job = local_job(&dir.join("in"), "tx_*.csv", "csv", serde_json::json!({}));
    let report = run_job(job, options(&dir)).await;
    ok(&report);
    let batches = read_table(&dir.join("warehouse/loaded"));
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let schema = batch.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    // pandas reads this header as id, name, name.2, name.1 (the Django fingerprint's names).
    assert_eq!(names, ["id", "name", "name.2", "name.1"]);
    let mut rows: Vec<String> = (0..batch.num_rows())
        .map(|r| {
            (0..4)
                .map(|c| cell_text(batch.column(c), r))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    rows.sort();
    assert_eq!(rows, ["1|a|b|c", "2|d|e|f"]);
}

#[tokio::test]
async fn a_pretty_printed_json_array_loads_and_keeps_integers_past_2_53_exact() {
    let dir = scratch("files-pretty-json");
    write(
        &dir.join("in/tx_1.json"),
        b"[\n  {\n    \"id\": 9007199254740993,\n    \"name\": \"two\\nlines\",\n    \"n\": 1.5\n  },\n  {\n    \"id\": -9223372036854775808,\n    \"name\": null,\n    \"n\": 2\n  }\n]\n",
    );
    let job = local_job(&dir.join("in"), "tx_*.json", "json", serde_json::json!({}));
    let report = run_job(job, options(&dir)).await;
    ok(&report);
    assert_eq!(report.rows_loaded, 2);
    let batches = read_table(&dir.join("warehouse/loaded"));
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let ids = batch.column_by_name("id").unwrap();
    assert_eq!(ids.data_type(), &DataType::Int64, "exact, not a float");
    let mut rows: Vec<String> = (0..batch.num_rows())
        .map(|r| {
            ["id", "name", "n"]
                .iter()
                .map(|c| cell_text(batch.column_by_name(c).unwrap(), r))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            "-9223372036854775808|NULL|2.0",
            "9007199254740993|two\nlines|1.5"
        ]
    );

    // Past INT64 (to 2^64 - 1), integers load as NUMERIC, exactly, never as floats.
    let dir = scratch("files-wide-json");
    write(
        &dir.join("in/tx_1.json"),
        b"{\"id\": 18446744073709551615, \"v\": 1}\n{\"id\": 2, \"v\": 2}\n",
    );
    let job = local_job(&dir.join("in"), "tx_*.json", "json", serde_json::json!({}));
    let report = run_job(job, options(&dir)).await;
    ok(&report);
    let batches = read_table(&dir.join("warehouse/loaded"));
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let ids = batch.column_by_name("id").unwrap();
    assert!(
        matches!(ids.data_type(), DataType::Decimal128(_, _)),
        "{}",
        ids.data_type()
    );
    let mut values: Vec<String> = (0..batch.num_rows()).map(|r| cell_text(ids, r)).collect();
    values.sort();
    assert_eq!(values, ["18446744073709551615.000000000", "2.000000000"]);
}

fn dispatcher(args: &[&str]) -> serde_json::Value {
    common::dispatcher_json(args)
}

#[tokio::test]
async fn list_files_and_detect_schema_print_what_django_expects() {
    let dir = scratch("files-commands");
    write(
        &dir.join("in/old/tx_2024-01-01.csv"),
        csv(ROWS, ',', true).as_bytes(),
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(
        &dir.join("in/tx_2024-01-02.csv"),
        csv(&ROWS[..3], ',', true).as_bytes(),
    );
    write(&dir.join("in/notes.txt"), b"x");
    let job_file = dir.join("job.json");
    let config = serde_json::json!({
        "source_type": "local", "dest_table_name": "t",
        "file_path_prefix": format!("{}/in/", dir.display()), "file_pattern": "tx_*.csv",
        "file_format": "csv", "file_format_options": {"delimiter": ",", "encoding": "utf-8", "has_header": true}
    });
    std::fs::write(&job_file, config.to_string()).unwrap();
    let job = job_file.to_str().unwrap();
    let listing = dispatcher(&["list-files", "--job", job]);
    assert_eq!(listing["status"], "success");
    assert_eq!(listing["count"], 2);
    let names: Vec<&str> = listing["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(
        names[0].ends_with("in/tx_2024-01-02.csv")
            && names[1].ends_with("in/old/tx_2024-01-01.csv"),
        "{names:?}"
    );
    assert_eq!(
        listing["files"][0]["size"],
        csv(&ROWS[..3], ',', true).len()
    );
    let modified = listing["files"][0]["last_modified"].as_str().unwrap();
    assert!(
        chrono::NaiveDateTime::parse_from_str(modified, "%Y-%m-%d %H:%M:%S").is_ok(),
        "{modified}"
    );
    assert_eq!(listing["pattern"], "tx_*.csv");

    // The newest file: rows 1-3.
    let schema = dispatcher(&["detect-schema", "--job", job]);
    assert_eq!(schema["status"], "success");
    assert_eq!(schema["total_rows"], 3);
    let columns = schema["columns"].as_array().unwrap();
    let described: Vec<String> = columns
        .iter()
        .map(|c| {
            format!(
                "{}:{}:{}:{}",
                c["name"].as_str().unwrap(),
                c["bigquery_type"].as_str().unwrap(),
                c["bigquery_mode"].as_str().unwrap(),
                c["nullable"]
            )
        })
        .collect();
    assert_eq!(
        described,
        vec![
            "id:INT64:NULLABLE:false",
            "amount:FLOAT64:NULLABLE:true",
            "name:STRING:NULLABLE:true",
            "at:TIMESTAMP:NULLABLE:true"
        ]
    );
    assert_eq!(
        columns[0]["sample_values"],
        serde_json::json!(["1", "2", "3"])
    );
    assert_eq!(
        columns[2]["sample_values"],
        serde_json::json!(["café", "comma, \"quoted\""])
    );
    assert_eq!(
        schema["schema_fingerprint"],
        hex::encode(Md5::digest(
            b"id:INT64|amount:FLOAT64|name:STRING|at:TIMESTAMP"
        ))
    );

    // Parquet: from the footer, exactly.
    write(
        &dir.join("p/x.parquet"),
        &parquet(ROWS, parquet::basic::Compression::SNAPPY),
    );
    let config = serde_json::json!({
        "source_type": "local", "dest_table_name": "t",
        "file_path_prefix": format!("{}/p/", dir.display()), "file_pattern": "*.parquet",
        "file_format": "parquet"
    });
    std::fs::write(&job_file, config.to_string()).unwrap();
    let schema = dispatcher(&["detect-schema", "--job", job]);
    assert_eq!(schema["total_rows"], 5);
    let types: Vec<&str> = schema["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["bigquery_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["INT64", "FLOAT64", "STRING", "TIMESTAMP"]);
    assert_eq!(schema["columns"][0]["nullable"], false);

    // No match: a named error, as JSON too.
    let config = serde_json::json!({
        "source_type": "local", "dest_table_name": "t",
        "file_path_prefix": format!("{}/p/", dir.display()), "file_pattern": "*.csv", "file_format": "csv"
    });
    std::fs::write(&job_file, config.to_string()).unwrap();
    let answer = dispatcher(&["detect-schema", "--job", job]);
    assert_eq!(answer["status"], "error");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("matches \"*.csv\""),
        "{answer}"
    );
}

#[tokio::test]
async fn s3_files_load_through_moto() {
    use object_store::{ObjectStoreExt as _, PutPayload};
    let endpoint = env_or_fail("SHARDFLOW_TEST_S3_ENDPOINT");
    let bucket = format!("sf-{}", uuid::Uuid::new_v4().simple());
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("moto answers");
    assert!(
        created.status().is_success(),
        "create bucket: {}",
        created.status()
    );
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    let gz = compress(csv(ROWS, ',', true).as_bytes(), "gz").await;
    store
        .put(&"drops/2024/tx_1.csv.gz".into(), PutPayload::from(gz))
        .await
        .unwrap();
    store
        .put(
            &"drops/tx_2.parquet".into(),
            PutPayload::from(parquet(&ROWS[..2], parquet::basic::Compression::SNAPPY)),
        )
        .await
        .unwrap();
    let dir = scratch("files-s3");
    let job = |pattern: &str, format: &str| {
        let config = serde_json::json!({
            "source_type": "s3", "dest_table_name": "loaded", "load_type": "transactional",
            "connection_params": {"bucket": format!("s3://{bucket}"), "endpoint_url": endpoint,
                "aws_access_key_id": "test", "aws_secret_access_key": "secret-never-shown-9a1",
                "region": "us-east-1"},
            "file_path_prefix": "drops/", "file_pattern": pattern, "file_format": format,
            "load_latest_only": false
        });
        JobSpec::from_json(&config.to_string()).unwrap()
    };
    let listing = shardflow::source::files::plan::list_files(&job("tx_*", "csv"))
        .await
        .unwrap();
    let names: Vec<&str> = listing.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"drops/2024/tx_1.csv.gz"), "{names:?}");
    let report = run_job(job("*.csv.gz", "csv"), options(&dir)).await;
    ok(&report);
    assert!(!format!("{report:?}").contains("secret-never-shown"));
    let report = run_job(job("*.parquet", "parquet"), options(&dir)).await;
    ok(&report);
    let mut want = ROWS.to_vec();
    want.extend_from_slice(&ROWS[..2]);
    assert_eq!(loaded(&dir), expected(&want));
    // Run again: nothing new.
    let report = run_job(job("*.parquet", "parquet"), options(&dir)).await;
    assert_eq!(report.files_loaded, Some(0));
}

/// A new bucket in fake-gcs-server holding `files`.
async fn gcs_bucket_with(files: &[(&str, Vec<u8>)]) -> String {
    let gcs = env_or_fail("STORAGE_EMULATOR_HOST");
    let bucket = format!("src-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let client = reqwest::Client::new();
    let created = client
        .post(format!("{gcs}/storage/v1/b"))
        .json(&serde_json::json!({ "name": bucket }))
        .send()
        .await
        .expect("fake-gcs-server answers");
    assert!(
        created.status().is_success(),
        "create bucket: {}",
        created.status()
    );
    for (name, bytes) in files {
        gcs_put(&bucket, name, bytes.clone()).await;
    }
    bucket
}

async fn gcs_put(bucket: &str, name: &str, bytes: Vec<u8>) {
    let gcs = env_or_fail("STORAGE_EMULATOR_HOST");
    let put = reqwest::Client::new()
        .post(format!("{gcs}/upload/storage/v1/b/{bucket}/o"))
        .query(&[("uploadType", "media"), ("name", name)])
        .body(bytes)
        .send()
        .await
        .expect("fake-gcs-server answers");
    assert!(put.status().is_success(), "upload {name}: {}", put.status());
}

fn gcs_job(bucket: &str, pattern: &str, format: &str, extra: serde_json::Value) -> JobSpec {
    let base = serde_json::json!({
        "source_type": "gcs", "dest_table_name": "loaded", "load_type": "transactional",
        "connection_params": {"bucket": bucket, "endpoint": env_or_fail("STORAGE_EMULATOR_HOST")},
        "file_path_prefix": "drops/", "file_pattern": pattern, "file_format": format,
        "load_latest_only": false, "processing_mode": "dataflow",
    });
    JobSpec::from_json(&common::with_fields(base, extra).to_string()).expect("valid job")
}

/// What the plan says of a file job's path for a BigQuery warehouse.
async fn planned_path(spec: &JobSpec) -> (String, String) {
    let opts = PlanOptions {
        warehouse_loads_gcs: true,
        ..PlanOptions::default()
    };
    let plan = shardflow_dispatcher::plan_job(spec, &opts)
        .await
        .expect("plan");
    let files = plan.files.expect("a file plan");
    (files.load_path.to_string(), files.load_path_reason)
}

#[tokio::test]
async fn gcs_files_load_through_fake_gcs_server_by_workers() {
    let bucket = gcs_bucket_with(&[
        (
            "drops/2024/tx_1.csv.gz",
            compress(csv(ROWS, ';', true).as_bytes(), "gz").await,
        ),
        (
            "drops/tx_2.parquet",
            parquet(&ROWS[..2], parquet::basic::Compression::LZ4_RAW),
        ),
        (
            "drops/tx_3.jsonl.zst",
            compress(json_values(&ROWS[2..]).join("\n").as_bytes(), "zst").await,
        ),
        ("elsewhere/tx_9.csv", csv(ROWS, ',', true).into_bytes()),
    ])
    .await;
    let dir = scratch("files-gcs");
    let csv_job = gcs_job(
        &bucket,
        "*.csv.gz",
        "csv",
        serde_json::json!({"file_format_options": {"delimiter": ";"}}),
    );
    ok(&run_job(csv_job, options(&dir)).await);
    ok(&run_job(
        gcs_job(&bucket, "*.parquet", "parquet", serde_json::json!({})),
        options(&dir),
    )
    .await);
    ok(&run_job(
        gcs_job(&bucket, "*.jsonl.zst", "json", serde_json::json!({})),
        options(&dir),
    )
    .await);
    let mut want = ROWS.to_vec();
    want.extend_from_slice(&ROWS[..2]);
    want.extend_from_slice(&ROWS[2..]);
    assert_eq!(loaded(&dir), expected(&want));
    // Even for BigQuery, these go through the workers, and the plan says why.
    let (path, why) = planned_path(&gcs_job(
        &bucket,
        "*.parquet",
        "parquet",
        serde_json::json!({}),
    ))
    .await;
    assert_eq!(
        (path.as_str(), why.as_str()),
        (
            "workers",
            "drops/tx_2.parquet column at is Timestamp(ns, \"+00:00\"), which the workers convert checking for loss"
        )
    );
    let (path, why) = planned_path(&gcs_job(
        &bucket,
        "*.jsonl.zst",
        "json",
        serde_json::json!({}),
    ))
    .await;
    assert_eq!(
        (path.as_str(), why.as_str()),
        (
            "workers",
            "drops/tx_3.jsonl.zst is zstd-compressed, which BigQuery does not read"
        )
    );
}

#[tokio::test]
async fn gcs_json_files_load_into_bigquery_directly_without_workers_and_csv_never() {
    let bucket = gcs_bucket_with(&[
        (
            "drops/tx_1.jsonl.gz",
            compress(jsonl(&ROWS[..3]).as_bytes(), "gz").await,
        ),
        (
            "drops/tx_2.jsonl.gz",
            compress(jsonl(&ROWS[3..]).as_bytes(), "gz").await,
        ),
    ])
    .await;
    let dataset = format!("ds_fast{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let dir = scratch("files-fast");
    let run = |spec: JobSpec| {
        let dest = format!("bigquery://{}/{dataset}", common::BIGQUERY_PROJECT);
        let mut opts = options(&dir);
        opts.dest = dest;
        opts.staging = Some(format!("gs://{bucket}/staging"));
        run_job(spec, opts)
    };
    let job = || {
        gcs_job(
            &bucket,
            "tx_*",
            "json",
            serde_json::json!({"bigquery_schema": bigquery_schema()}),
        )
    };
    let (path, why) = planned_path(&job()).await;
    assert_eq!(
        (path.as_str(), why.as_str()),
        (
            "direct",
            "BigQuery loads the 2 files from GCS itself (JSON lines); no worker reads them"
        )
    );
    // CSV never: BigQuery's parser is not pandas'.
    gcs_put(
        &bucket,
        "csv/tx_1.csv",
        csv(&ROWS[..3], '|', true).into_bytes(),
    )
    .await;
    let csv_job = gcs_job(
        &bucket,
        "tx_*",
        "csv",
        serde_json::json!({"file_path_prefix": "csv/", "file_format_options": {"delimiter": "|"}, "bigquery_schema": bigquery_schema()}),
    );
    let (path, why) = planned_path(&csv_job).await;
    assert_eq!(
        (path.as_str(), why.as_str()),
        (
            "workers",
            "BigQuery's CSV reader is not pandas': it keeps missing-value markers such as NA as text and reads other date formats, so the workers read CSV files"
        )
    );
    // Into a dataset elsewhere than the bucket (fake-gcs-server's are in US-CENTRAL1), the
    // workers read the files.
    let opts = PlanOptions {
        warehouse_loads_gcs: true,
        warehouse_location: Some("EU".into()),
        ..PlanOptions::default()
    };
    let plan = shardflow_dispatcher::plan_job(&job(), &opts).await.unwrap();
    let files = plan.files.unwrap();
    assert_eq!(
        (files.load_path, files.load_path_reason.as_str()),
        (
            "workers",
            "the bucket is in US-CENTRAL1 and the dataset in EU; BigQuery loads only from a bucket in the dataset's location"
        )
    );
    let report = run(job()).await;
    ok(&report);
    assert_eq!(
        (report.shards, report.files_loaded, report.rows_loaded),
        (0, Some(2), 5)
    );
    assert_eq!(rows_in_bigquery(&dataset, "loaded").await, ROWS_IN_BIGQUERY);

    // A new file: the next run appends it alone; then nothing is new.
    gcs_put(&bucket, "drops/tx_3.jsonl", jsonl(&ROWS[..1]).into_bytes()).await;
    let report = run(job()).await;
    ok(&report);
    assert_eq!((report.files_loaded, report.rows_loaded), (Some(1), 1));
    let report = run(job()).await;
    ok(&report);
    assert_eq!((report.files_loaded, report.rows_loaded), (Some(0), 0));
    let mut all = vec![ROWS_IN_BIGQUERY[0]];
    all.extend(ROWS_IN_BIGQUERY);
    assert_eq!(rows_in_bigquery(&dataset, "loaded").await, all);

    // A plain and a gzip file together: BigQuery takes one compression per load job ("You
    // cannot include both compressed and uncompressed files in the same load job"), so the
    // workers read them.
    gcs_put(&bucket, "drops/tx_4.jsonl", jsonl(&ROWS[1..2]).into_bytes()).await;
    gcs_put(
        &bucket,
        "drops/tx_5.jsonl.gz",
        compress(jsonl(&ROWS[2..3]).as_bytes(), "gz").await,
    )
    .await;
    // (A plan made outside the stream sees every file, loaded or not.)
    let (path, why) = planned_path(&job()).await;
    assert_eq!(
        (path.as_str(), why.as_str()),
        (
            "workers",
            "drops/tx_1.jsonl.gz is gzip-compressed and drops/tx_3.jsonl is not; BigQuery takes one or the other in a load job"
        )
    );
    let report = run(job()).await;
    ok(&report);
    assert_eq!((report.files_loaded, report.rows_loaded), (Some(2), 2));
    assert!(report.shards >= 1, "{report:?}");
    let mut all = all.clone();
    all.extend([ROWS_IN_BIGQUERY[1], ROWS_IN_BIGQUERY[2]]);
    all.sort_by_key(|row| row.split('|').next().unwrap().parse::<i64>().unwrap());
    assert_eq!(rows_in_bigquery(&dataset, "loaded").await, all);
}

#[tokio::test]
async fn a_file_rewritten_while_bigquery_loads_it_is_recorded_in_the_version_it_read() {
    // BigQuery reads gs:// files when its load job runs and cannot pin a generation. The rules
    // layer's test hook rewrites the file just before bqemulator runs the job (the job reads
    // the new version) or just after (it read the old one).
    for when in ["before", "after"] {
        let bucket = gcs_bucket_with(&[("drops/tx_1.jsonl", jsonl(&ROWS[..2]).into_bytes())]).await;
        let dataset = format!("ds_rw{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let dir = scratch(&format!("files-rewrite-{when}"));
        let run = |spec: JobSpec| {
            let mut opts = options(&dir);
            opts.dest = format!("bigquery://{}/{dataset}", common::BIGQUERY_PROJECT);
            opts.staging = Some(format!("gs://{bucket}/staging"));
            run_job(spec, opts)
        };
        let job = || {
            gcs_job(
                &bucket,
                "tx_*",
                "json",
                serde_json::json!({"bigquery_schema": bigquery_schema()}),
            )
        };
        let bq = common::bigquery_host().await;
        let hooked = reqwest::Client::new()
            .post(format!("{bq}/rules/rewrite-during-load"))
            .json(&serde_json::json!({
                "uri": format!("gs://{bucket}/drops/tx_1.jsonl"),
                "content": jsonl(&ROWS[2..4]),
                "when": when,
            }))
            .send()
            .await
            .unwrap();
        assert!(hooked.status().is_success());
        let report = run(job()).await;
        ok(&report);
        assert_eq!(report.shards, 0, "the fast path: {report:?}");
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
        let again = run(job()).await;
        if when == "before" {
            ok(&again);
            // The job read the new version, which is recorded: nothing is loaded again.
            assert_eq!(
                rows_in_bigquery(&dataset, "loaded").await,
                ROWS_IN_BIGQUERY[2..4]
            );
            assert_eq!(again.files_loaded, Some(0));
        } else {
            // It read the planned version, which is recorded: the new content is a rewrite of
            // a loaded file, which a transactional job refuses rather than append twice.
            assert_eq!(again.status, RunStatus::Failed);
            let error = again.error_message.unwrap_or_default();
            assert!(
                error.starts_with(&format!(
                    "rewritten since a transactional run loaded them: gs://{bucket}/drops/tx_1.jsonl (2 rows loaded by run "
                )),
                "{error}"
            );
            assert_eq!(
                rows_in_bigquery(&dataset, "loaded").await,
                ROWS_IN_BIGQUERY[..2]
            );
        }
    }
}

/// `ROWS` as `rows_in_bigquery` reads them back.
const ROWS_IN_BIGQUERY: [&str; 5] = [
    "1|1.5|café|2024-01-01T10:00:00.000000",
    "2|-2.25|comma, \"quoted\"|2024-01-02T00:00:00.000000",
    "3|NULL|NULL|NULL",
    "4|0.0000001|four bytes 😀|1999-12-31T23:59:59.123456",
    "5|0|plain|2038-01-19T03:14:08.000000",
];

/// `id|amount|name|at` of a bqemulator table, by id.
async fn rows_in_bigquery(dataset: &str, table: &str) -> Vec<String> {
    let select = format!(
        "SELECT id, amount, name, FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%E6S', `at`) \
         FROM `{}.{dataset}.{table}` ORDER BY id",
        common::BIGQUERY_PROJECT
    );
    bigquery_lines(&select, Some(1)).await
}

/// A bqemulator query's rows as `a|b|…`, NULL for null; the `float_column` printed as a
/// number (BigQuery prints 1.0E-7, the emulator 1e-07).
async fn bigquery_lines(sql: &str, float_column: Option<usize>) -> Vec<String> {
    common::bigquery_rows(sql)
        .await
        .into_iter()
        .map(|r| {
            r.into_iter()
                .enumerate()
                .map(|(i, c)| match c {
                    None => "NULL".to_string(),
                    Some(v) if Some(i) == float_column => {
                        v.parse::<f64>().expect("a FLOAT64").to_string()
                    }
                    Some(v) => v,
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

#[tokio::test]
async fn gcs_json_lines_and_parquet_load_into_bigquery_directly() {
    let bucket = gcs_bucket_with(&[
        (
            "drops/j/tx_1.jsonl",
            json_values(ROWS).join("\n").into_bytes(),
        ),
        (
            "drops/p/tx_1.parquet",
            parquet_in(
                ROWS,
                parquet::basic::Compression::SNAPPY,
                TimeUnit::Microsecond,
            ),
        ),
    ])
    .await;
    let dataset = format!(
        "ds_fastjp{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let dir = scratch("files-fast-json-parquet");
    let cases = [
        ("j", "json", "loaded_json", "JSON lines"),
        ("p", "parquet", "loaded_parquet", "Parquet"),
    ];
    for (folder, format, table, how) in cases {
        let job = gcs_job(
            &bucket,
            "tx_*",
            format,
            serde_json::json!({"file_path_prefix": format!("drops/{folder}/"), "dest_table_name": table}),
        );
        let (path, why) = planned_path(&job).await;
        assert_eq!(
            (path.as_str(), why.as_str()),
            (
                "direct",
                format!("BigQuery loads the 1 files from GCS itself ({how}); no worker reads them")
                    .as_str()
            )
        );
        let mut opts = options(&dir);
        opts.dest = format!("bigquery://{}/{dataset}", common::BIGQUERY_PROJECT);
        opts.staging = Some(format!("gs://{bucket}/staging"));
        let report = run_job(job, opts).await;
        ok(&report);
        assert_eq!(
            (report.shards, report.files_loaded, report.rows_loaded),
            (0, Some(1), 5)
        );
        assert_eq!(
            rows_in_bigquery(&dataset, table).await,
            ROWS_IN_BIGQUERY,
            "{format}"
        );
    }
}

/// Creates a container in azurite, signing the request with the emulator's well-known key
/// (object_store reads and writes blobs but creates no containers).
async fn azurite_container(endpoint: &str, container: &str) {
    use base64::Engine as _;
    use hmac::{KeyInit as _, Mac as _};
    const ACCOUNT: &str = "devstoreaccount1";
    let key = base64::engine::general_purpose::STANDARD
        .decode(AZURITE_KEY)
        .unwrap();
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-08-06";
    // Verb, eleven empty standard headers, the x-ms headers, the resource.
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container"
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{container}?restype=container"))
        .header("x-ms-date", date)
        .header("x-ms-version", version)
        .header("content-length", "0")
        .header("authorization", format!("SharedKey {ACCOUNT}:{signature}"))
        .send()
        .await
        .expect("azurite answers");
    assert!(
        created.status().is_success(),
        "create container: {}",
        created.status()
    );
}

/// The development storage account's published key, which azurite accepts.
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[tokio::test]
async fn azure_blobs_load_through_azurite() {
    use object_store::{ObjectStoreExt as _, PutPayload};
    let endpoint = env_or_fail("SHARDFLOW_TEST_AZURE_ENDPOINT");
    let container = format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    azurite_container(&endpoint, &container).await;
    let store = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account("devstoreaccount1")
        .with_access_key(AZURITE_KEY)
        .with_container_name(&container)
        .with_endpoint(endpoint.clone())
        .with_allow_http(true)
        .build()
        .unwrap();
    store
        .put(
            &"drops/a/tx_1.csv".into(),
            PutPayload::from(csv(&ROWS[..3], '\t', true).into_bytes()),
        )
        .await
        .unwrap();
    store
        .put(
            &"drops/tx_2.csv.zst".into(),
            PutPayload::from(compress(csv(&ROWS[3..], '\t', true).as_bytes(), "zst").await),
        )
        .await
        .unwrap();
    let connection_string = format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"
    );
    let config = serde_json::json!({
        "source_type": "azure_blob", "dest_table_name": "loaded", "load_type": "transactional",
        "connection_params": {"container": container, "connection_string": connection_string},
        "file_path_prefix": "drops/", "file_pattern": "tx_*", "file_format": "csv",
        "file_format_options": {"delimiter": "\t"}, "load_latest_only": false
    });
    let spec = JobSpec::from_json(&config.to_string()).unwrap();
    let dir = scratch("files-azure");
    let report = run_job(spec.clone(), options(&dir)).await;
    ok(&report);
    assert_eq!(report.files_loaded, Some(2));
    assert!(!format!("{report:?}").contains(AZURITE_KEY));
    assert_eq!(loaded(&dir), expected(ROWS));
    let report = run_job(spec, options(&dir)).await;
    ok(&report);
    assert_eq!(report.files_loaded, Some(0));
    assert_eq!(
        loaded(&dir),
        expected(ROWS),
        "the empty run left the table as it was"
    );
}

/// `id|name|note|at` of every row of the Parquet table, by column name (NULL where a file
/// lacks the column), sorted by id.
fn loaded_by_name(dir: &Path) -> Vec<String> {
    let mut out: Vec<(i64, String)> = Vec::new();
    for b in read_table(&dir.join("warehouse/loaded")) {
        let b = printable(&b);
        for row in 0..b.num_rows() {
            let cell = |name: &str| match b.column_by_name(name) {
                Some(c) => cell_text(c, row),
                None => "NULL".to_string(),
            };
            let id = cell("id");
            out.push((
                id.parse().unwrap(),
                format!("{id}|{}|{}|{}", cell("name"), cell("note"), cell("at")),
            ));
        }
    }
    out.sort();
    out.into_iter().map(|(_, r)| r).collect()
}

#[tokio::test]
async fn add_columns_widens_the_table_and_loads_missing_columns_as_null() {
    // Each warehouse: where it is, and how its rows read back.
    let dataset = format!("ds_add{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bucket = gcs_bucket_with(&[]).await;
    for bigquery in [false, true] {
        let dir = scratch(&format!("files-add-columns-{bigquery}"));
        let run = |policy: &str| {
            let mut opts = options(&dir);
            if bigquery {
                opts.dest = format!("bigquery://{}/{dataset}", common::BIGQUERY_PROJECT);
                opts.staging = Some(format!("gs://{bucket}/staging"));
            }
            let job = local_job(
                &dir.join("in"),
                "*.csv",
                "csv",
                serde_json::json!({"bigquery_schema": bigquery_schema(), "schema_policy": policy}),
            );
            run_job(job, opts)
        };
        let rows = || async {
            if !bigquery {
                return loaded_by_name(&dir);
            }
            let table = format!("`{}.{dataset}.loaded`", common::BIGQUERY_PROJECT);
            bigquery_lines(
                &format!(
                    "SELECT id, name, note, FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%SZ', `at`) FROM {table} ORDER BY id"
                ),
                None,
            )
            .await
        };
        write(&dir.join("in/a.csv"), csv(&ROWS[..2], ',', true).as_bytes());
        ok(&run("add_columns").await);
        // A new file brings `note` and lacks `at`.
        write(
            &dir.join("in/b.csv"),
            b"id,amount,name,note\n7,2.5,seven,hello\n",
        );
        let refused = run("fail").await;
        let uri = format!("file://{}/in/b.csv", dir.canonicalize().unwrap().display());
        assert_eq!(
            refused.error_message.unwrap_or_default(),
            format!(
                "schema drift in {uri}: added: note STRING; removed: at; nothing was loaded \
                 (schema_policy \"add_columns\" adds new columns and loads removed ones as NULL)"
            ),
            "bigquery: {bigquery}"
        );
        let widened = run("add_columns").await;
        ok(&widened);
        assert_eq!((widened.files_loaded, widened.rows_loaded), (Some(1), 1));
        let widened_rows = [
            "1|café|NULL|2024-01-01T10:00:00Z",
            "2|comma, \"quoted\"|NULL|2024-01-02T00:00:00Z",
            "7|seven|hello|NULL",
        ];
        assert_eq!(rows().await, widened_rows, "bigquery: {bigquery}");
        // A column that changes type is refused under either policy.
        write(
            &dir.join("in/c.csv"),
            b"id,amount,name,note\n8,true,eight,x\n",
        );
        let changed = run("add_columns").await;
        assert!(
            changed
                .error_message
                .as_deref()
                .is_some_and(|e| e.contains("changed: amount FLOAT64 -> BOOL")),
            "{changed:?}"
        );
        assert_eq!(rows().await, widened_rows, "nothing loaded");
    }
}

/// Rows of the generated large file.
const BIG_ROWS: u64 = 22_000_000;

/// The generator both the test and `bench/files_load.sh` use: row n is
/// `n,{n % 100000}.{n % 100},customer n of the generated file with some text,2024-MM-DDTHH:MM:SS`.
fn generate_big_csv(path: &Path, rows: u64) {
    let script = format!(
        r#"BEGIN {{ print "id,amount,name,at";
          for (n = 0; n < {rows}; n++)
            printf "%d,%d.%02d,customer %d of the generated file with some text,2024-%02d-%02dT%02d:%02d:%02d\n",
                   n, n % 100000, n % 100, n, n % 12 + 1, n % 28 + 1, n % 24, n % 60, n % 60 }}"#
    );
    let file = std::fs::File::create(path).unwrap();
    let status = std::process::Command::new("awk")
        .arg(script)
        .stdout(file)
        .status()
        .expect("awk");
    assert!(status.success());
}

/// Runs the dispatcher binary, sampling its peak resident memory (VmHWM) until it exits.
fn run_measuring_peak_rss(args: &[String]) -> (serde_json::Value, u64) {
    use std::io::Read as _;
    let mut child = std::process::Command::new(common::dispatcher_bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run the dispatcher");
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_file)
            && let Some(kb) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak_kb = peak_kb.max(kb);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let report = stdout.lines().last().unwrap_or_default();
    (
        serde_json::from_str(report).unwrap_or_else(|e| panic!("{e}: {stdout}")),
        peak_kb * 1024,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_gigabyte_file_streams_through_in_bounded_memory() {
    let dir = scratch("files-big");
    let file = dir.join("in/big.csv");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    generate_big_csv(&file, BIG_ROWS);
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size > 2_000_000_000, "{size} bytes");
    let job = dir.join("job.json");
    std::fs::write(
        &job,
        serde_json::json!({
            "source_type": "local", "dest_table_name": "loaded", "load_type": "catalog",
            "file_path_prefix": format!("{}/", dir.join("in").display()), "file_pattern": "*.csv",
            "file_format": "csv", "processing_mode": "dataflow", "load_latest_only": false
        })
        .to_string(),
    )
    .unwrap();
    let args = common::dispatcher_run_args(&dir, &job, &["--no-progress"]);
    let (report, peak) = tokio::task::spawn_blocking(move || run_measuring_peak_rss(&args))
        .await
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["rows_loaded"], BIG_ROWS, "{report}");
    // Bounded: a fraction of the file, whatever its size.
    assert!(
        peak < 300 << 20,
        "peak RSS {} MB for a {} MB file",
        peak >> 20,
        size >> 20
    );

    // Every row back, each value as the generator wrote it.
    let mut seen = 0u64;
    let mut id_sum = 0u64;
    for path in
        shardflow::warehouse::parquet_dir::table_files(&dir.join("warehouse/loaded")).unwrap()
    {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&path).unwrap(),
        )
        .unwrap()
        .with_batch_size(65_536)
        .build()
        .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            use arrow::array::AsArray as _;
            let ids = batch
                .column(0)
                .as_primitive::<arrow::datatypes::Int64Type>();
            let amounts = batch
                .column(1)
                .as_primitive::<arrow::datatypes::Float64Type>();
            let names = batch.column(2).as_string::<i32>();
            let ats = batch
                .column(3)
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            for i in 0..batch.num_rows() {
                let n = ids.value(i) as u64;
                // In cents: the nearest double to a 2-decimal value below 1e7, times 100,
                // rounds back to the integer exactly.
                let cents = (amounts.value(i) * 100.0).round() as u64;
                let at =
                    chrono::NaiveDate::from_ymd_opt(2024, (n % 12 + 1) as u32, (n % 28 + 1) as u32)
                        .unwrap()
                        .and_hms_opt((n % 24) as u32, (n % 60) as u32, (n % 60) as u32)
                        .unwrap()
                        .and_utc()
                        .timestamp_micros();
                assert_eq!(
                    (cents, ats.value(i)),
                    ((n % 100_000) * 100 + n % 100, at),
                    "row {n}"
                );
                if n.is_multiple_of(1000) {
                    assert_eq!(
                        names.value(i),
                        format!("customer {n} of the generated file with some text")
                    );
                }
                id_sum += n;
            }
            seen += batch.num_rows() as u64;
        }
    }
    assert_eq!((seen, id_sum), (BIG_ROWS, BIG_ROWS * (BIG_ROWS - 1) / 2));
}

#[tokio::test]
async fn selected_columns_load_only_those_columns_of_the_files() {
    let dir = scratch("files-selected");
    write(&dir.join("in/a.csv"), csv(ROWS, ',', true).as_bytes());
    let job = |selected: serde_json::Value| {
        local_job(
            &dir.join("in"),
            "*.csv",
            "csv",
            serde_json::json!({"selected_columns": selected, "timestamp_column": "not_a_column"}),
        )
    };
    let missing = run_job(job(serde_json::json!(["name", "nope"])), options(&dir)).await;
    let prefix = format!("file://{}/in/", dir.canonicalize().unwrap().display());
    assert_eq!(
        missing.error_message.as_deref(),
        Some(format!("column \"nope\" not found in the files under {prefix} (columns: id, amount, name, at)").as_str())
    );
    ok(&run_job(job(serde_json::json!(["name", "id"])), options(&dir)).await);
    let batches = read_table(&dir.join("warehouse/loaded"));
    let mut rows: Vec<String> = Vec::new();
    for b in &batches {
        let names: Vec<&str> = b
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, ["id", "name"]);
        for i in 0..b.num_rows() {
            rows.push(format!(
                "{}|{}",
                array_value_to_string(b.column(0), i).unwrap(),
                array_value_to_string(b.column(1), i).unwrap()
            ));
        }
    }
    rows.sort();
    let mut want: Vec<String> = ROWS
        .iter()
        .map(|r| format!("{}|{}", r.0, r.2.unwrap_or("")))
        .collect();
    want.sort();
    assert_eq!(rows, want);
}
