//! Against bqemulator behind the strict rules layer and fake-gcs-server (tests/emulators.sh):
//! built with `service-tests`, failing when they are absent.

// `&[0..4]` is one shard holding ids 0 to 3, not a list of ids.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;

use arrow::array::{
    ArrayRef, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int64Array,
    StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use object_store::ObjectStoreExt;
use serde_json::Value;

use super::*;
use crate::gcs::tests::emulator_bucket;
use crate::messages::{StagedFile, extraction_prefix, new_extraction_id};
use crate::parquet_sink::{PartOptions, write_parts};
use crate::staging::Staging;

const START: &str = "start the emulators: eval \"$(bash tests/emulators.sh start)\"";

/// Fails, never skips, when the emulators are not there.
fn require_emulators() -> String {
    for var in ["BIGQUERY_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"] {
        if std::env::var(var).map_or(true, |v| v.trim().is_empty()) {
            panic!("{var} is not set: {START}");
        }
    }
    std::env::var("GCP_PROJECT_ID").unwrap_or_else(|_| "test-proj".into())
}

struct Env {
    wh: BigQueryWarehouse,
    staging: Staging,
    schema: SchemaRef,
    /// The table has the jsonb column `doc` (staged SQL), or none (direct loads).
    json: bool,
}

/// A fresh bucket and dataset, so tests run in parallel.
/// Fails unless BIGQUERY_EMULATOR_HOST is the strict rules layer, not bqemulator itself:
/// a load real BigQuery would refuse must fail here too.
pub(crate) async fn require_rules_layer() {
    let host = std::env::var("BIGQUERY_EMULATOR_HOST").unwrap_or_default();
    let base = emulator_base_url(&host).unwrap_or_default();
    let answer = reqwest::get(format!("{base}/rules")).await;
    let marked = answer
        .as_ref()
        .ok()
        .and_then(|r| r.headers().get("x-shardflow-rules"))
        .is_some();
    assert!(
        marked,
        "BIGQUERY_EMULATOR_HOST={host} is not the strict rules layer ({answer:?}): build, \
         then start it with `bash tests/emulators.sh rules` (tests/run.sh does both)"
    );
}

async fn setup() -> Env {
    setup_with(false).await
}

/// The warehouse suite's fixture: a fresh dataset and bucket, read back with queries.
async fn fixture() -> crate::warehouse::conformance::Fixture {
    let Env { wh, staging, .. } = setup().await;
    let wh = Arc::new(wh);
    let reader = wh.clone();
    crate::warehouse::conformance::Fixture {
        warehouse: wh,
        staging,
        read: Box::new(move |table, columns| {
            let wh = reader.clone();
            Box::pin(async move {
                let full = wh.full_name(&table);
                let select: Vec<String> = columns
                    .iter()
                    .map(|c| format!("CAST({c} AS STRING)"))
                    .collect();
                let sql = format!("SELECT {} FROM `{full}` ORDER BY id", select.join(", "));
                rows_of(&wh, &sql)
                    .await
                    .into_iter()
                    .map(|row| {
                        row.into_iter()
                            .map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .collect()
            })
        }),
    }
}

crate::warehouse::conformance::warehouse_conformance_suite!(super::fixture);

async fn setup_with(json: bool) -> Env {
    let project = require_emulators();
    require_rules_layer().await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let bucket = emulator_bucket().await;
    let staging = Staging::from_url(&format!("gs://{bucket}/stage")).unwrap();
    let mut wh = BigQueryWarehouse::connect(&project, &format!("sf_test_{id}"))
        .await
        .unwrap();
    // bqemulator's buckets are in US-CENTRAL1, which a US dataset loads from.
    wh.create_in = Some("US".into());
    Env {
        wh,
        staging,
        schema: test_schema(json),
        json,
    }
}

/// Every type of the map, with a jsonb `doc` when `json`.
fn test_schema(json: bool) -> SchemaRef {
    let jsonb = HashMap::from([(SOURCE_TYPE_KEY.to_string(), "jsonb".to_string())]);
    let utc = Some("UTC".into());
    let doc = json.then(|| Field::new("doc", DataType::Utf8, true).with_metadata(jsonb));
    Arc::new(Schema::new(
        [
            Some(Field::new("id", DataType::Int64, false)),
            Some(Field::new("name", DataType::Utf8, true)),
            doc,
            Some(Field::new("amount", DataType::Decimal128(12, 2), true)),
            Some(Field::new(
                "seen_local",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            )),
            Some(Field::new(
                "seen_utc",
                DataType::Timestamp(TimeUnit::Microsecond, utc),
                true,
            )),
            Some(Field::new("day", DataType::Date32, true)),
            Some(Field::new("ok", DataType::Boolean, true)),
            Some(Field::new("score", DataType::Float64, true)),
            Some(Field::new("raw", DataType::Binary, true)),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>(),
    ))
}

/// 2024-01-02 03:04:05.123456 UTC.
const BASE_MICROS: i64 = 1_704_164_645_123_456;
/// 2024-01-02.
const BASE_DAY: i32 = 19_724;

fn batch(schema: &SchemaRef, ids: Range<i64>) -> RecordBatch {
    let ids: Vec<i64> = ids.collect();
    let each = |f: &dyn Fn(i64) -> bool| ids.iter().map(|&i| f(i)).collect::<Vec<_>>();
    let name: StringArray = ids
        .iter()
        .map(|&i| (i % 3 != 1).then(|| format!("name {i}")))
        .collect();
    let doc: StringArray = ids
        .iter()
        .map(|&i| (i % 3 != 2).then(|| format!(r#"{{"id": {i}, "tags": ["a", "b"]}}"#)))
        .collect();
    let amount = Decimal128Array::from(
        ids.iter()
            .map(|&i| {
                (i % 4 != 3).then_some(if i % 2 == 0 { 1 } else { -1 } * (i * 100 + 5) as i128)
            })
            .collect::<Vec<_>>(),
    )
    .with_precision_and_scale(12, 2)
    .unwrap();
    let micros = |i: i64| (i % 5 != 4).then_some(BASE_MICROS + i * 3_600_000_000);
    let seen_local: TimestampMicrosecondArray = ids.iter().map(|&i| micros(i)).collect();
    let seen_utc =
        TimestampMicrosecondArray::from(ids.iter().map(|&i| micros(i)).collect::<Vec<_>>())
            .with_timezone("UTC");
    let day: Date32Array = ids.iter().map(|&i| Some(BASE_DAY + i as i32)).collect();
    let ok = BooleanArray::from(each(&|i| i % 2 == 0));
    let score: Float64Array = ids
        .iter()
        .map(|&i| (i % 6 != 5).then_some(i as f64 + 0.5))
        .collect();
    let raw: BinaryArray = ids
        .iter()
        .map(|&i| (i % 7 != 6).then(|| vec![i as u8, 0, 255]))
        .collect();
    let all: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(Int64Array::from(ids.clone()))),
        ("name", Arc::new(name)),
        ("doc", Arc::new(doc)),
        ("amount", Arc::new(amount)),
        ("seen_local", Arc::new(seen_local)),
        ("seen_utc", Arc::new(seen_utc)),
        ("day", Arc::new(day)),
        ("ok", Arc::new(ok)),
        ("score", Arc::new(score)),
        ("raw", Arc::new(raw)),
    ];
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| all.iter().find(|(n, _)| n == f.name()).unwrap().1.clone())
        .collect();
    RecordBatch::try_new(schema.clone(), columns).unwrap()
}

/// Stages `batch` rows of each range as one shard.
async fn stage(env: &Env, run: &str, shards: &[Range<i64>]) -> Vec<StagedFile> {
    let batches = shards
        .iter()
        .map(|ids| batch(&env.schema, ids.clone()))
        .collect();
    stage_batches(env, run, batches).await
}

fn request<'a>(
    env: &'a Env,
    table: &'a str,
    run_id: &'a str,
    parts: &'a [StagedFile],
    mode: WriteMode,
    expected_rows: u64,
) -> LoadRequest<'a> {
    LoadRequest {
        table,
        schema: &env.schema,
        run_id,
        load_key: run_id,
        parts,
        staging: &env.staging,
        mode,
        expected_rows,
        merge_keys: &[],
        latest_by: None,
        allow_new_columns: false,
    }
}

async fn query(env: &Env, sql: &str) -> Vec<Vec<Value>> {
    rows_of(&env.wh, sql).await
}

async fn rows_of(wh: &BigQueryWarehouse, sql: &str) -> Vec<Vec<Value>> {
    let response = wh
        .client()
        .job()
        .query(wh.project(), QueryRequest::new(sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    assert_eq!(response.job_complete, Some(true), "{sql}");
    response
        .rows
        .unwrap_or_default()
        .into_iter()
        .map(|row| {
            row.columns
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.value.unwrap_or(Value::Null))
                .collect()
        })
        .collect()
}

/// The error a load that must fail gives.
async fn refused(env: &Env, req: LoadRequest<'_>) -> String {
    env.wh.load(req).await.unwrap_err().to_string()
}

async fn count(env: &Env, table: &str) -> u64 {
    env.wh.count_rows(table, None).await.unwrap()
}

async fn job(env: &Env, run: &str, table: &str, step: &str) -> Option<Job> {
    let id = job_id(env.wh.dataset(), run, table, step);
    env.wh.get_job(&id, None).await.unwrap()
}

fn text(v: impl ToString) -> Value {
    Value::String(v.to_string())
}

/// What `batch` wrote for `id`, as `READ_BACK` selects it (the same renderings as
/// BigQuery's; NUMERIC is compared in cents because the emulator pads its scale).
fn expected_row(i: i64) -> Vec<Value> {
    let or_null = |keep: bool, v: Value| if keep { v } else { Value::Null };
    let sign = if i % 2 == 0 { 1 } else { -1 };
    let hours = chrono::DateTime::from_timestamp_micros(BASE_MICROS + i * 3_600_000_000)
        .unwrap()
        .naive_utc()
        .format("%Y-%m-%d %H:%M:%S%.6f")
        .to_string();
    let day = chrono::NaiveDate::from_ymd_opt(2024, 1, 2).unwrap() + chrono::Days::new(i as u64);
    let raw = match i {
        0 => "AAD/",
        1 => "AQD/",
        2 => "AgD/",
        3 => "AwD/",
        4 => "BAD/",
        5 => "BQD/",
        6 => "BgD/",
        _ => panic!("no base64 written down for {i}"),
    };
    vec![
        text(i),
        or_null(i % 3 != 1, text(format!("name {i}"))),
        or_null(
            i % 3 != 2,
            text(format!(r#"{{"id":{i},"tags":["a","b"]}}"#)),
        ),
        or_null(i % 4 != 3, text(sign * (i * 100 + 5))),
        or_null(i % 5 != 4, text(&hours)),
        or_null(i % 5 != 4, text(format!("{hours}+00"))),
        text(day.format("%Y-%m-%d")),
        text(i % 2 == 0),
        or_null(i % 6 != 5, text(format!("{}.5", i))),
        or_null(i % 7 != 6, text(raw)),
    ]
}

/// `expected_row` as `env`'s table holds it (without `doc` when it has none).
fn expected(env: &Env, i: i64) -> Vec<Value> {
    let mut row = expected_row(i);
    if !env.json {
        row.remove(2);
    }
    row
}

async fn read_back(env: &Env, table: &str) -> Vec<Vec<Value>> {
    let full = env.wh.full_name(table);
    let doc = if env.json {
        " TO_JSON_STRING(doc),"
    } else {
        ""
    };
    let sql = format!(
        "SELECT id, name,{doc} CAST(amount * 100 AS INT64), CAST(seen_local AS STRING), \
         CAST(seen_utc AS STRING), day, ok, score, TO_BASE64(raw) FROM `{full}` ORDER BY id"
    );
    query(env, &sql).await
}

async fn ids_of(env: &Env, table: &str) -> Vec<i64> {
    ids(env, table).await
}

async fn ids(env: &Env, table: &str) -> Vec<i64> {
    let full = env.wh.full_name(table);
    query(env, &format!("SELECT id FROM `{full}` ORDER BY id"))
        .await
        .into_iter()
        .map(|row| row[0].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn replace_load_reads_back_exact_rows() {
    // Directly into the table, and (with a JSON column) through a staging table.
    for json in [false, true] {
        let env = setup_with(json).await;
        let parts = stage(&env, "r1", &[0..3, 3..7]).await;
        let outcome = env
            .wh
            .load(request(&env, "people", "r1", &parts, WriteMode::Replace, 7))
            .await
            .unwrap();
        assert_eq!(
            outcome,
            LoadOutcome {
                rows_loaded: 7,
                files: 2,
                location: env.wh.full_name("people"),
                source_read: None,
            }
        );
        // The table was created from the type map.
        let table = env.wh.get_table("people").await.unwrap().unwrap();
        let columns: Vec<(String, &str, String)> = table
            .schema
            .fields
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f.name.clone(),
                    type_name(&f.r#type),
                    f.mode.clone().unwrap_or_default(),
                )
            })
            .collect();
        let want = [
            ("id", "INT64", "REQUIRED"),
            ("name", "STRING", "NULLABLE"),
            ("doc", "JSON", "NULLABLE"),
            ("amount", "NUMERIC", "NULLABLE"),
            ("seen_local", "DATETIME", "NULLABLE"),
            ("seen_utc", "TIMESTAMP", "NULLABLE"),
            ("day", "DATE", "NULLABLE"),
            ("ok", "BOOL", "NULLABLE"),
            ("score", "FLOAT64", "NULLABLE"),
            ("raw", "BYTES", "NULLABLE"),
        ]
        .into_iter()
        .filter(|(n, _, _)| json || *n != "doc")
        .map(|(n, t, m)| (n.to_string(), t, m.to_string()))
        .collect::<Vec<_>>();
        assert_eq!(columns, want);
        let rows = read_back(&env, "people").await;
        assert_eq!(rows, (0..7).map(|i| expected(&env, i)).collect::<Vec<_>>());
        if !json {
            continue;
        }
        // JSON is stored as JSON, not as text.
        let full = env.wh.full_name("people");
        let tags = query(
            &env,
            &format!("SELECT JSON_VALUE(doc, '$.tags[1]') FROM `{full}` WHERE id = 3"),
        )
        .await;
        assert_eq!(tags, vec![vec![text("b")]]);
    }
}

#[tokio::test]
async fn replace_again_holds_only_the_new_run() {
    let env = setup().await;
    let first = stage(&env, "r1", &[0..5]).await;
    env.wh
        .load(request(&env, "people", "r1", &first, WriteMode::Replace, 5))
        .await
        .unwrap();
    let second = stage(&env, "r2", &[2..4, 4..7]).await;
    let outcome = env
        .wh
        .load(request(
            &env,
            "people",
            "r2",
            &second,
            WriteMode::Replace,
            5,
        ))
        .await
        .unwrap();
    assert_eq!(outcome.rows_loaded, 5);
    assert_eq!(ids(&env, "people").await, vec![2, 3, 4, 5, 6]);
    assert_eq!(
        read_back(&env, "people").await,
        (2..7).map(|i| expected(&env, i)).collect::<Vec<_>>()
    );
    // The same run again finds its job and changes nothing.
    let again = env
        .wh
        .load(request(
            &env,
            "people",
            "r2",
            &second,
            WriteMode::Replace,
            5,
        ))
        .await
        .unwrap();
    assert_eq!(again, outcome);
    assert_eq!(count(&env, "people").await, 5);
}

#[tokio::test]
async fn append_same_run_twice_appends_once() {
    let env = setup().await;
    let base = stage(&env, "r1", &[0..4]).await;
    env.wh
        .load(request(&env, "events", "r1", &base, WriteMode::Replace, 4))
        .await
        .unwrap();
    let more = stage(&env, "r2", &[4..5, 5..7]).await;
    let first = env
        .wh
        .load(request(&env, "events", "r2", &more, WriteMode::Append, 3))
        .await
        .unwrap();
    assert_eq!(first.rows_loaded, 3);
    assert_eq!(count(&env, "events").await, 7);
    // A redelivered finalisation: the job is found (the emulator would run a second
    // insert with the same id again), nothing is appended, the same outcome comes back.
    let second = env
        .wh
        .load(request(&env, "events", "r2", &more, WriteMode::Append, 3))
        .await
        .unwrap();
    assert_eq!(second, first);
    assert_eq!(count(&env, "events").await, 7);
    assert_eq!(ids(&env, "events").await, (0..7).collect::<Vec<_>>());
    assert_eq!(
        read_back(&env, "events").await,
        (0..7).map(|i| expected(&env, i)).collect::<Vec<_>>()
    );
    let load = job(&env, "r2", "events", "load").await.unwrap();
    assert_eq!(rows_before(&load).unwrap(), 4);
    let retry = attempt_id(&job_id(env.wh.dataset(), "r2", "events", "load"), 1);
    assert!(env.wh.get_job(&retry, None).await.unwrap().is_none());
}

/// `batch` with every name replaced by `name(id)` and, when given, every day by `day`.
fn changed(
    schema: &SchemaRef,
    ids: Range<i64>,
    name: impl Fn(i64) -> String,
    day: Option<i32>,
) -> RecordBatch {
    let original = batch(schema, ids.clone());
    let mut columns = original.columns().to_vec();
    let at = |column: &str| schema.index_of(column).unwrap();
    columns[at("name")] = Arc::new(ids.clone().map(|i| Some(name(i))).collect::<StringArray>());
    if let Some(day) = day {
        columns[at("day")] = Arc::new(ids.map(|_| Some(day)).collect::<Date32Array>());
    }
    RecordBatch::try_new(schema.clone(), columns).unwrap()
}

/// Stages one real Parquet part per batch at the workers' paths, written as the
/// workers write them: through `Staging`'s store, over the GCS JSON API.
async fn stage_batches(env: &Env, run: &str, batches: Vec<RecordBatch>) -> Vec<StagedFile> {
    let mut parts = Vec::new();
    for (n, b) in batches.into_iter().enumerate() {
        let stream: crate::source::BatchStream = Box::pin(futures::stream::iter(vec![Ok(b)]));
        parts.extend(
            write_parts(
                env.staging.store(),
                &extraction_prefix(run, &format!("shard-{n}"), &new_extraction_id()),
                env.schema.clone(),
                stream,
                &PartOptions::default(),
                |_| Ok(()),
            )
            .await
            .unwrap(),
        );
    }
    parts
}

#[tokio::test]
async fn merge_replaces_changed_keys_with_their_latest_row_once() {
    let env = setup_with(true).await;
    let base = stage(&env, "r1", &[0..5]).await;
    env.wh
        .load(request(&env, "people", "r1", &base, WriteMode::Replace, 5))
        .await
        .unwrap();
    // Keys 3 and 4 changed, 5 and 6 are new; key 6 is also staged in an older
    // version (an earlier day), which must lose.
    let v2 = |i| format!("v2 {i}");
    let changes = stage_batches(
        &env,
        "r2",
        vec![
            changed(&env.schema, 3..5, v2, None),
            changed(&env.schema, 6..7, |_| "stale".into(), Some(BASE_DAY)),
            changed(&env.schema, 5..7, v2, None),
        ],
    )
    .await;
    let keys = ["id".to_string()];
    let merge = |parts| LoadRequest {
        merge_keys: &keys,
        latest_by: Some("day"),
        allow_new_columns: false,
        ..request(&env, "people", "r2", parts, WriteMode::Merge, 5)
    };
    let outcome = env.wh.load(merge(&changes)).await.unwrap();
    // Two rows updated, two inserted.
    assert_eq!(outcome.rows_loaded, 4);
    let mut want: Vec<Vec<Value>> = (0..7).map(|i| expected(&env, i)).collect();
    for (i, row) in want.iter_mut().enumerate().skip(3) {
        row[1] = text(format!("v2 {i}"));
    }
    assert_eq!(read_back(&env, "people").await, want);
    // The staging table is gone; the same merge again finds its job and changes nothing.
    let staging = staging_table_name("people", "r2");
    assert!(env.wh.get_table(&staging).await.unwrap().is_none());
    assert_eq!(env.wh.load(merge(&changes)).await.unwrap(), outcome);
    assert_eq!(read_back(&env, "people").await, want);
    // A merge whose parts hold other counts than reported touches nothing: found before
    // any job when their own counts say so, else on the staging table.
    let err = env
        .wh
        .load(LoadRequest {
            load_key: "r3",
            run_id: "r3",
            expected_rows: 9,
            ..merge(&changes)
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hold 5 rows") && err.contains("reported 9"),
        "{err}"
    );
    let mut overstated = changes.clone();
    overstated[0].rows += 4;
    let err = env
        .wh
        .load(LoadRequest {
            load_key: "r3",
            run_id: "r3",
            expected_rows: 9,
            ..merge(&overstated)
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("received 5 rows") && err.contains("reported 9"),
        "{err}"
    );
    assert_eq!(read_back(&env, "people").await, want);
}

#[tokio::test]
async fn time_and_text_forms_load_exactly() {
    let mut env = setup().await;
    env.schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("t", DataType::Time64(TimeUnit::Microsecond), true),
        Field::new("ints", DataType::Utf8, true).with_metadata(HashMap::from([(
            SOURCE_TYPE_KEY.to_string(),
            "integer[]".to_string(),
        )])),
    ]));
    let rows = RecordBatch::try_new(
        env.schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(arrow::array::Time64MicrosecondArray::from(vec![
                Some(86_399_999_999),
                Some(0),
                None,
            ])),
            Arc::new(StringArray::from(vec![
                Some("{1,NULL,3}"),
                Some("{}"),
                None,
            ])),
        ],
    )
    .unwrap();
    let parts = stage_batches(&env, "r1", vec![rows]).await;
    env.wh
        .load(request(&env, "timed", "r1", &parts, WriteMode::Replace, 3))
        .await
        .unwrap();
    let full = env.wh.full_name("timed");
    let got = query(
        &env,
        &format!("SELECT id, CAST(t AS STRING), ints FROM `{full}` ORDER BY id"),
    )
    .await;
    assert_eq!(
        got,
        vec![
            vec![text(1), text("23:59:59.999999"), text("{1,NULL,3}")],
            vec![text(2), text("00:00:00"), text("{}")],
            vec![text(3), Value::Null, Value::Null],
        ]
    );
    let table = env.wh.get_table("timed").await.unwrap().unwrap();
    let types: Vec<&str> = table
        .schema
        .fields
        .unwrap()
        .iter()
        .map(|f| type_name(&f.r#type))
        .collect();
    assert_eq!(types, ["INT64", "TIME", "STRING"]);
}

#[tokio::test]
async fn many_parts_load_in_steps_then_one_copy() {
    let mut env = setup().await;
    env.wh.max_uris_per_job = 2;
    // An older version of the table, loaded directly.
    let old = stage(&env, "r0", &[0..2]).await;
    env.wh
        .load(request(&env, "big", "r0", &old, WriteMode::Replace, 2))
        .await
        .unwrap();
    assert!(job(&env, "r0", "big", "load").await.is_some());

    let shards = [0..1, 1..3, 3..4, 4..6, 6..7];
    let parts = stage(&env, "r1", &shards).await;
    assert_eq!(parts.len(), 5);
    let outcome = env
        .wh
        .load(request(&env, "big", "r1", &parts, WriteMode::Replace, 7))
        .await
        .unwrap();
    assert_eq!((outcome.rows_loaded, outcome.files), (7, 5));
    assert_eq!(
        read_back(&env, "big").await,
        (0..7).map(|i| expected(&env, i)).collect::<Vec<_>>()
    );

    // Three load steps into the staging table, one copy, no direct load.
    let staging = staging_table_name("big", "r1");
    for (n, uris) in [(0, 2), (1, 2), (2, 1)] {
        let step = job(&env, "r1", "big", &format!("stage{n:05}"))
            .await
            .unwrap();
        let load = step.configuration.unwrap().load.unwrap();
        assert_eq!(load.source_uris.unwrap().len(), uris);
        assert_eq!(load.destination_table.unwrap().table_id, staging);
        let want = if n == 0 {
            "WRITE_TRUNCATE_DATA"
        } else {
            "WRITE_APPEND"
        };
        assert_eq!(load.write_disposition.as_deref(), Some(want));
        assert_eq!(
            load.decimal_target_types,
            Some(vec!["NUMERIC".to_string(), "BIGNUMERIC".to_string()])
        );
    }
    assert!(job(&env, "r1", "big", "stage00003").await.is_none());
    assert!(job(&env, "r1", "big", "load").await.is_none());
    // A replace ends with one transaction, not a copy (whose WRITE_TRUNCATE would take the
    // staging table's schema).
    assert!(job(&env, "r1", "big", "copy").await.is_none());
    let sql = job(&env, "r1", "big", "sql").await.unwrap();
    assert_eq!(job_state(&sql), "DONE");
    assert!(env.wh.get_table(&staging).await.unwrap().is_none());

    // Retried after the staging table is gone: the job is found, nothing runs again.
    let again = env
        .wh
        .load(request(&env, "big", "r1", &parts, WriteMode::Replace, 7))
        .await
        .unwrap();
    assert_eq!(again, outcome);
    assert_eq!(count(&env, "big").await, 7);

    // Appending in steps copies with WRITE_APPEND, once.
    let more = stage(&env, "r2", &[0..1, 1..2, 2..3]).await;
    for _ in 0..2 {
        let appended = env
            .wh
            .load(request(&env, "big", "r2", &more, WriteMode::Append, 3))
            .await
            .unwrap();
        assert_eq!(appended.rows_loaded, 3);
        assert_eq!(count(&env, "big").await, 10);
    }
    let copy = job(&env, "r2", "big", "copy").await.unwrap();
    assert_eq!(rows_before(&copy).unwrap(), 7);
    let copy = copy.configuration.unwrap().copy.unwrap();
    assert_eq!(copy.write_disposition.as_deref(), Some("WRITE_APPEND"));
    assert!(
        env.wh
            .get_table(&staging_table_name("big", "r2"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn wrong_expected_rows_is_reported() {
    let mut env = setup().await;
    let full = env.wh.full_name("people");
    // Parts that do not add up to the reported rows: refused before any job.
    let parts = stage(&env, "r0", &[0..4]).await;
    let err = refused(
        &env,
        request(&env, "people", "r0", &parts, WriteMode::Replace, 5),
    )
    .await;
    assert_eq!(
        err,
        format!(
            "warehouse: the 1 staged parts hold 4 rows but the workers reported 5; table \
             {full} left as it was"
        )
    );
    assert!(job(&env, "r0", "people", "load").await.is_none());

    // A part whose file holds fewer rows than it says (4, not 5): a direct load finds it
    // once its job has committed.
    let mut parts = stage(&env, "r1", &[0..4]).await;
    parts[0].rows = 5;
    let err = env
        .wh
        .load(request(&env, "people", "r1", &parts, WriteMode::Replace, 5))
        .await
        .unwrap_err();
    let id = job_id(env.wh.dataset(), "r1", "people", "load");
    assert_eq!(
        err.to_string(),
        format!(
            "warehouse: table {full} received 4 rows from BigQuery job {id}, but the workers reported 5"
        )
    );

    let mut more = stage(&env, "r2", &[4..6]).await;
    more[0].rows = 3;
    let err = env
        .wh
        .load(request(&env, "people", "r2", &more, WriteMode::Append, 3))
        .await
        .unwrap_err();
    let id = job_id(env.wh.dataset(), "r2", "people", "load");
    assert_eq!(
        err.to_string(),
        format!(
            "warehouse: table {full} received 2 rows from BigQuery job {id}, but the workers reported 3"
        )
    );
    assert_eq!(count(&env, "people").await, 6);

    // In steps, the staging table is checked before the copy: the table is untouched.
    env.wh.max_uris_per_job = 1;
    let mut steps = stage(&env, "r3", &[0..1, 1..3]).await;
    steps[1].rows = 3;
    let err = env
        .wh
        .load(request(&env, "people", "r3", &steps, WriteMode::Replace, 4))
        .await
        .unwrap_err();
    let staging = env.wh.full_name(&staging_table_name("people", "r3"));
    assert_eq!(
        err.to_string(),
        format!(
            "warehouse: staging table {staging} received 3 rows from 2 load jobs, but the \
             workers reported 4; table {full} left as it was"
        )
    );
    assert_eq!(count(&env, "people").await, 6);
    assert!(job(&env, "r3", "people", "copy").await.is_none());
}

#[tokio::test]
async fn drifted_schema_is_refused() {
    let mut env = setup().await;
    let parts = stage(&env, "r1", &[0..2]).await;
    env.wh
        .load(request(&env, "people", "r1", &parts, WriteMode::Replace, 2))
        .await
        .unwrap();
    // The source lost `raw`, gained `extra` and `score` became text.
    let drifted: Vec<Field> = env
        .schema
        .fields()
        .iter()
        .filter(|f| f.name() != "raw")
        .map(|f| match f.name().as_str() {
            "score" => Field::new("score", DataType::Utf8, true),
            _ => f.as_ref().clone(),
        })
        .chain([Field::new("extra", DataType::Int32, true)])
        .collect();
    env.schema = Arc::new(Schema::new(drifted));
    let parts = [StagedFile {
        path: "r2/shard-0/part-00000.parquet".into(),
        rows: 2,
        bytes: 1,
    }];
    let err = env
        .wh
        .load(request(&env, "people", "r2", &parts, WriteMode::Append, 2))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "warehouse: schema drift: table {} exists with other columns than the staged \
             parts (added: extra INT64; removed: raw BYTES; changed: score FLOAT64 -> STRING); \
             nothing was loaded",
            env.wh.full_name("people")
        )
    );
    assert!(job(&env, "r2", "people", "load").await.is_none());
    assert_eq!(count(&env, "people").await, 2);
}

#[tokio::test]
async fn json_columns_arrive_as_json_through_a_staging_table_and_one_statement() {
    let env = setup_with(true).await;
    let parts = stage(&env, "r1", &[0..3, 3..7]).await;
    let outcome = env
        .wh
        .load(request(&env, "docs", "r1", &parts, WriteMode::Replace, 7))
        .await
        .unwrap();
    assert_eq!(outcome.rows_loaded, 7);
    assert_eq!(
        read_back(&env, "docs").await,
        (0..7).map(|i| expected(&env, i)).collect::<Vec<_>>()
    );
    // The column is JSON, and holds JSON (not a string of it).
    let table = env.wh.get_table("docs").await.unwrap().unwrap();
    let doc = table
        .schema
        .fields
        .unwrap()
        .into_iter()
        .find(|f| f.name == "doc")
        .unwrap();
    assert_eq!(type_name(&doc.r#type), "JSON");
    let full = env.wh.full_name("docs");
    let ids = query(
        &env,
        &format!("SELECT JSON_VALUE(doc, '$.id') FROM `{full}` ORDER BY id"),
    )
    .await;
    assert_eq!(ids[0], vec![text(0)]);
    // No load into the table itself: the parts went to a staging table (JSON as STRING),
    // then one transaction replaced the rows; the staging table is gone.
    assert!(job(&env, "r1", "docs", "load").await.is_none());
    let step = job(&env, "r1", "docs", "stage00000").await.unwrap();
    let load = step.configuration.unwrap().load.unwrap();
    assert_eq!(
        load.destination_table.unwrap().table_id,
        staging_table_name("docs", "r1")
    );
    let sql = job(&env, "r1", "docs", "sql").await.unwrap();
    assert_eq!(job_state(&sql), "DONE");
    assert!(
        env.wh
            .get_table(&staging_table_name("docs", "r1"))
            .await
            .unwrap()
            .is_none()
    );

    // A second replace holds only its rows; done again, it changes nothing.
    let newer = stage(&env, "r2", &[2..7]).await;
    for _ in 0..2 {
        env.wh
            .load(request(&env, "docs", "r2", &newer, WriteMode::Replace, 5))
            .await
            .unwrap();
        assert_eq!(ids_of(&env, "docs").await, (2..7).collect::<Vec<_>>());
    }
    // An append inserts its rows once, however often it is finalised.
    let more = stage(&env, "r3", &[0..2]).await;
    for _ in 0..2 {
        let appended = env
            .wh
            .load(request(&env, "docs", "r3", &more, WriteMode::Append, 2))
            .await
            .unwrap();
        assert_eq!(appended.rows_loaded, 2);
        assert_eq!(ids_of(&env, "docs").await, [0, 1, 2, 3, 4, 5, 6]);
    }
    assert_eq!(
        read_back(&env, "docs").await,
        (0..7).map(|i| expected(&env, i)).collect::<Vec<_>>()
    );
    // A count that does not match loads nothing.
    let err = refused(
        &env,
        request(&env, "docs", "r4", &more, WriteMode::Append, 3),
    )
    .await;
    assert!(
        err.contains("hold 2 rows") && err.contains("reported 3"),
        "{err}"
    );
    assert_eq!(count(&env, "docs").await, 7);
}

#[tokio::test]
async fn a_table_made_by_its_owner_keeps_its_schema_and_its_required_columns_are_checked() {
    let env = setup().await;
    // The owner's table: the staged columns, with descriptions and `id` REQUIRED.
    let mut columns = bigquery_schema(&env.schema).unwrap();
    for c in &mut columns {
        c.description = Some(format!("what {} means", c.name));
    }
    let location = env.wh.ensure_dataset().await.unwrap();
    env.wh
        .client()
        .table()
        .create(Table::new(
            env.wh.project(),
            env.wh.dataset(),
            "owned",
            TableSchema::new(columns.clone()),
        ))
        .await
        .unwrap();
    let parts = stage(&env, "r1", &[0..4]).await;
    for run in ["r1", "r2"] {
        env.wh
            .load(request(&env, "owned", run, &parts, WriteMode::Replace, 4))
            .await
            .unwrap();
    }
    assert_eq!(
        read_back(&env, "owned").await,
        (0..4).map(|i| expected(&env, i)).collect::<Vec<_>>()
    );
    let kept = env
        .wh
        .get_table("owned")
        .await
        .unwrap()
        .unwrap()
        .schema
        .fields
        .unwrap();
    let descriptions: Vec<Option<String>> = kept.iter().map(|f| f.description.clone()).collect();
    assert_eq!(
        descriptions,
        columns
            .iter()
            .map(|c| c.description.clone())
            .collect::<Vec<_>>()
    );
    let load = job(&env, "r2", "owned", "load")
        .await
        .unwrap()
        .configuration
        .unwrap()
        .load
        .unwrap();
    assert_eq!(
        load.write_disposition.as_deref(),
        Some("WRITE_TRUNCATE_DATA")
    );
    assert!(!location.is_empty());

    // A REQUIRED column the source may leave NULL: refused before any job runs.
    let mut required = bigquery_schema(&env.schema).unwrap();
    required[1].mode = Some("REQUIRED".into());
    env.wh
        .client()
        .table()
        .create(Table::new(
            env.wh.project(),
            env.wh.dataset(),
            "strict",
            TableSchema::new(required),
        ))
        .await
        .unwrap();
    let err = refused(
        &env,
        request(&env, "strict", "r3", &parts, WriteMode::Append, 4),
    )
    .await;
    assert!(
        err.contains(
            "has REQUIRED columns the source may leave NULL: name (nullable in the source)"
        ),
        "{err}"
    );
    assert!(job(&env, "r3", "strict", "load").await.is_none());
    assert_eq!(count(&env, "strict").await, 0);
}

#[tokio::test]
async fn datasets_are_made_only_where_configured_and_staging_must_be_there_too() {
    let mut env = setup().await;
    let parts = stage(&env, "r1", &[0..2]).await;
    // No BIGQUERY_LOCATION: a missing dataset is an error naming the setting.
    env.wh.create_in = None;
    let err = refused(
        &env,
        request(&env, "t", "r1", &parts, WriteMode::Replace, 2),
    )
    .await;
    assert!(
        err.contains(
            "does not exist: create it where the data must live, or set BIGQUERY_LOCATION"
        ),
        "{err}"
    );
    assert!(env.wh.location().await.unwrap().is_none());
    // Created in the configured location, which is where jobs run from then on.
    env.wh.create_in = Some("EU".into());
    assert_eq!(env.wh.location().await.unwrap().as_deref(), Some("EU"));
    let err = refused(
        &env,
        request(&env, "t", "r1", &parts, WriteMode::Replace, 2),
    )
    .await;
    // The emulator's buckets are in US-CENTRAL1: not where an EU dataset loads from.
    assert!(
        err.contains("is in US-CENTRAL1 and dataset")
            && err.contains("in EU: BigQuery loads only from a bucket in the dataset's location"),
        "{err}"
    );
    assert!(job(&env, "r1", "t", "load").await.is_none());
    // Nothing was created for a load that could not run.
    env.wh.create_in = None;
    assert!(env.wh.location().await.unwrap().is_none());
    // A dataset elsewhere than BIGQUERY_LOCATION says is refused: its location is fixed.
    env.wh
        .client()
        .dataset()
        .create(Dataset::new(env.wh.project(), env.wh.dataset()).location("EU"))
        .await
        .unwrap();
    env.wh.create_in = Some("US".into());
    let err = refused(
        &env,
        request(&env, "t", "r1", &parts, WriteMode::Replace, 2),
    )
    .await;
    assert!(
        err.contains("is in EU, but BIGQUERY_LOCATION is US"),
        "{err}"
    );
    // Where it says US, the dataset is made there and the load runs.
    let mut elsewhere = setup().await;
    elsewhere.wh.create_in = Some("US".into());
    let parts = stage(&elsewhere, "r2", &[0..2]).await;
    let loaded = elsewhere
        .wh
        .load(request(
            &elsewhere,
            "t",
            "r2",
            &parts,
            WriteMode::Replace,
            2,
        ))
        .await
        .unwrap();
    assert_eq!(loaded.rows_loaded, 2);
    assert_eq!(
        elsewhere.wh.location().await.unwrap().as_deref(),
        Some("US")
    );
}

#[tokio::test]
async fn bignumeric_columns_load_with_their_decimal_target_types() {
    let mut env = setup().await;
    env.schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("big", DataType::Decimal256(50, 20), true),
        Field::new("u", DataType::Decimal128(20, 0), true),
    ]));
    let big = arrow::array::Decimal256Array::from(vec![
        arrow::datatypes::i256::from_string("12345678901234567890123456789012345678901234567890"),
        None,
    ])
    .with_precision_and_scale(50, 20)
    .unwrap();
    let u = Decimal128Array::from(vec![Some(i128::from(u64::MAX)), Some(0)])
        .with_precision_and_scale(20, 0)
        .unwrap();
    let rows = RecordBatch::try_new(
        env.schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![1, 2])),
            Arc::new(big),
            Arc::new(u),
        ],
    )
    .unwrap();
    let parts = stage_batches(&env, "r1", vec![rows]).await;
    env.wh
        .load(request(&env, "wide", "r1", &parts, WriteMode::Replace, 2))
        .await
        .unwrap();
    let table = env.wh.get_table("wide").await.unwrap().unwrap();
    let types: Vec<&str> = table
        .schema
        .fields
        .unwrap()
        .iter()
        .map(|f| type_name(&f.r#type))
        .collect();
    assert_eq!(types, ["INT64", "BIGNUMERIC", "NUMERIC"]);
    let load = job(&env, "r1", "wide", "load")
        .await
        .unwrap()
        .configuration
        .unwrap()
        .load
        .unwrap();
    assert_eq!(
        load.decimal_target_types,
        Some(vec!["NUMERIC".into(), "BIGNUMERIC".into()])
    );
    // The rules layer keeps BIGNUMERIC's exact text (bqemulator cannot hold the number).
    let full = env.wh.full_name("wide");
    let got = query(
        &env,
        &format!("SELECT CAST(big AS STRING) FROM `{full}` ORDER BY id"),
    )
    .await;
    assert_eq!(
        got,
        vec![
            vec![text("123456789012345678901234567890.12345678901234567890")],
            vec![Value::Null]
        ]
    );
    let got: Vec<String> = query(
        &env,
        &format!("SELECT CAST(u AS STRING) FROM `{full}` ORDER BY id"),
    )
    .await
    .into_iter()
    // The emulator pads NUMERIC to its full scale.
    .map(|row| {
        row[0]
            .as_str()
            .unwrap()
            .trim_end_matches(".000000000")
            .to_string()
    })
    .collect();
    assert_eq!(got, ["18446744073709551615", "0"]);
}

#[tokio::test]
async fn failed_job_is_reported_then_retried_under_a_new_id() {
    let env = setup().await;
    let parts = stage(&env, "r1", &[0..2, 2..5]).await;
    // The second part is damaged after the workers reported it.
    let damaged = parts[1].path.clone();
    env.staging
        .store()
        .put(
            &object_store::path::Path::from(damaged.as_str()),
            object_store::PutPayload::from_static(b"not parquet"),
        )
        .await
        .unwrap();
    let err = refused(
        &env,
        request(&env, "people", "r1", &parts, WriteMode::Replace, 5),
    )
    .await;
    let id = job_id(env.wh.dataset(), "r1", "people", "load");
    let prefix = format!(
        "warehouse: BigQuery job {id} (load of 2 parts into {}) failed: invalid: ",
        env.wh.full_name("people")
    );
    assert!(err.starts_with(&prefix), "{err}");
    assert!(err.contains(&damaged), "{err}");

    // Staged again (a new extraction, so new parts beside the damaged one) and retried: the
    // failed id stays failed, the next attempt loads once. (A replace, because bqemulator
    // keeps the rows of the parts before a bad one, where BigQuery's failed job changes
    // nothing.)
    let fixed = stage(&env, "r1", &[0..2, 2..5]).await;
    let outcome = env
        .wh
        .load(request(&env, "people", "r1", &fixed, WriteMode::Replace, 5))
        .await
        .unwrap();
    assert_eq!(outcome.rows_loaded, 5);
    let retry = attempt_id(&id, 1);
    let job = env.wh.get_job(&retry, None).await.unwrap().unwrap();
    assert!(job_failure(&job).is_none());
    assert!(job_failure(&env.wh.get_job(&id, None).await.unwrap().unwrap()).is_some());
    let again = env
        .wh
        .load(request(&env, "people", "r1", &fixed, WriteMode::Replace, 5))
        .await
        .unwrap();
    assert_eq!(again, outcome);
    assert_eq!(count(&env, "people").await, 5);
    assert!(
        env.wh
            .get_job(&attempt_id(&id, 2), None)
            .await
            .unwrap()
            .is_none()
    );
}
