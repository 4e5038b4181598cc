//! PostgreSQL into BigQuery (bqemulator behind the strict rules layer) with what real BigQuery
//! is strict about: json and jsonb columns (no Parquet load fills a JSON column), numeric(50,20)
//! (BIGNUMERIC, which needs `decimalTargetTypes`), timestamptz, and column names BigQuery
//! cannot take (case-colliding, spaces, a leading digit). Catalog, transactional and merge
//! loads, every value compared with what PostgreSQL holds (BIGNUMERIC digit for digit: the
//! rules layer keeps its exact text, which bqemulator cannot hold as a number).

mod common;

use common::*;
use serde_json::{Value, json};
use shardflow::retry::RetryPolicy;
use shardflow::state::RunStatus;
use shardflow_dispatcher::{PlanOptions, RunOptions, RunReport, plan_job, run_job};

const PROJECT: &str = common::BIGQUERY_PROJECT;

async fn staging_bucket() -> String {
    let gcs = env_or_fail("STORAGE_EMULATOR_HOST");
    let bucket = format!("bqp-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let created = reqwest::Client::new()
        .post(format!("{gcs}/storage/v1/b?project={PROJECT}"))
        .json(&json!({ "name": bucket }))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    bucket
}

fn options(dataset: &str, bucket: &str, dir: &std::path::Path) -> RunOptions {
    RunOptions {
        plan: PlanOptions {
            shard_rows: 3,
            retry: RetryPolicy::none(),
            ..Default::default()
        },
        workers: 2,
        dest: format!("bigquery://{PROJECT}/{dataset}"),
        staging: Some(format!("gs://{bucket}/staging")),
        state_url: format!("sqlite://{}", dir.join("state.db").display()),
        ..Default::default()
    }
}

const COLUMNS: &str = r#"id bigint PRIMARY KEY, "Amount" numeric(12,2), amount numeric(12,2),
    "order id" text, "1st" integer, doc jsonb, js json, big numeric(50,20), seen timestamptz NOT NULL"#;

/// Rows `from..to`: JSON with nesting, unicode, numbers and nulls; 50-digit numerics.
fn insert(schema: &str, from: i64, to: i64, tag: &str) -> String {
    format!(
        r#"INSERT INTO {schema}.t SELECT i, i * 1.25, -i * 0.5, '{tag} ' || i || CASE WHEN i % 3 = 0 THEN ' ü😀' ELSE '' END,
             CASE WHEN i % 4 = 0 THEN NULL ELSE i END,
             CASE WHEN i % 5 = 0 THEN NULL ELSE jsonb_build_object('i', i, 'tag', '{tag}', 'nested', jsonb_build_array(1, 'two', NULL, 3.5), 'ü', true) END,
             CASE WHEN i % 6 = 0 THEN NULL ELSE json_build_object('n', i::bigint * 1000000007, 'f', 0.25) END,
             CASE WHEN i % 7 = 0 THEN NULL ELSE ('123456789012345678901234567' || i || '.12345678901234567890')::numeric(50,20) * (CASE WHEN i % 2 = 0 THEN 1 ELSE -1 END) END,
             timestamptz '2024-03-01 12:00:00.123456+00' + i * interval '1 hour'
           FROM generate_series({from}, {to} - 1) i
           ON CONFLICT (id) DO UPDATE SET "order id" = EXCLUDED."order id", doc = EXCLUDED.doc, seen = EXCLUDED.seen"#
    )
}

/// One row as both sides render it: (id, Amount, amount, order id, 1st, doc, js, big, seen).
type Row = (
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<Value>,
    Option<Value>,
    Option<String>,
    String,
);

async fn source_rows(schema: &str) -> Vec<Row> {
    let pg = pg().await;
    pg.query(
        &format!(
            r#"SELECT id, "Amount"::text, amount::text, "order id", "1st"::text, doc::text, js::text,
                      big::text, to_char(seen AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')
               FROM {schema}.t ORDER BY id"#
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let json = |i: usize| r.get::<_, Option<String>>(i).map(|t| serde_json::from_str(&t).unwrap());
        (
            r.get(0),
            decimal(&r.get::<_, String>(1)),
            decimal(&r.get::<_, String>(2)),
            r.get(3),
            r.get(4),
            json(5),
            json(6),
            r.get::<_, Option<String>>(7).map(|t| decimal(&t)),
            r.get(8),
        )
    })
    .collect()
}

/// Decimal text without trailing zeros (BigQuery prints NUMERIC with its scale).
fn decimal(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

async fn destination_rows(dataset: &str) -> Vec<Row> {
    common::bigquery_rows(&format!(
        "SELECT id, CAST(Amount AS STRING), CAST(amount_2 AS STRING), order_id, CAST(_1st AS STRING), \
         TO_JSON_STRING(doc), TO_JSON_STRING(js), CAST(big AS STRING), \
         FORMAT_TIMESTAMP('%Y-%m-%dT%H:%M:%E6S', seen) FROM `{PROJECT}.{dataset}.t` ORDER BY id"
    ))
    .await
    .into_iter()
    .map(|r| {
        let json = |i: usize| r[i].as_deref().map(|t| serde_json::from_str(t).unwrap());
        (
            r[0].as_deref().unwrap().parse().unwrap(),
            decimal(r[1].as_deref().unwrap()),
            decimal(r[2].as_deref().unwrap()),
            r[3].clone(),
            r[4].clone(),
            json(5),
            json(6),
            r[7].as_deref().map(decimal),
            r[8].clone().unwrap(),
        )
    })
    .collect()
}

/// The destination holds exactly the source's rows, every value.
async fn assert_same(schema: &str, dataset: &str) {
    let (source, dest) = (source_rows(schema).await, destination_rows(dataset).await);
    assert_eq!(dest.len(), source.len(), "row count");
    for (s, d) in source.iter().zip(&dest) {
        assert_eq!(d, s, "row {}", s.0);
    }
}

fn ok(report: &RunReport) {
    assert_eq!(report.status, RunStatus::Completed, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_types_and_odd_names_load_into_bigquery_exactly() {
    let pg = pg().await;
    let schema = fresh_schema(&pg, "bq_strict").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.t ({COLUMNS}); {}; ANALYZE {schema}.t;",
        insert(&schema, 1, 12, "first")
    ))
    .await
    .unwrap();
    let bucket = staging_bucket().await;
    let dataset = format!(
        "bq_strict_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let dir = scratch("bq-strict");
    let job = |extra: Value| common::job(&schema, "t", "t", extra);

    // The plan names every rename, by one rule.
    let mut plan_opts = options(&dataset, &bucket, &dir).plan;
    plan_opts.column_names = shardflow::warehouse::bigquery::names::bigquery_column_names;
    let plan = plan_job(&job(json!({})), &plan_opts).await.unwrap();
    let plan_json = serde_json::to_value(&plan).unwrap();
    let renamed = json!([
        {"source": "amount", "destination": "amount_2"},
        {"source": "order id", "destination": "order_id"},
        {"source": "1st", "destination": "_1st"},
    ]);
    assert_eq!(plan_json["renamed_columns"], renamed, "{plan_json}");

    // Catalog, twice: each run replaces the table, whose schema BigQuery keeps.
    for _ in 0..2 {
        let report = run_job(job(json!({})), options(&dataset, &bucket, &dir)).await;
        ok(&report);
        assert_eq!(report.rows_loaded, 11);
        assert_eq!(
            serde_json::to_value(&report.renamed_columns).unwrap(),
            renamed
        );
        assert_same(&schema, &dataset).await;
    }
    let table = common::bigquery_rows(&format!(
        "SELECT column_name, data_type FROM `{PROJECT}.{dataset}.INFORMATION_SCHEMA.COLUMNS` \
         WHERE table_name = 't' ORDER BY ordinal_position"
    ))
    .await;
    let columns: Vec<(String, String)> = table
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "id", "Amount", "amount_2", "order_id", "_1st", "doc", "js", "big", "seen"
        ]
    );

    // Transactional: rows after the watermark are appended once.
    pg.batch_execute(&insert(&schema, 12, 16, "later"))
        .await
        .unwrap();
    // Django's last_sync_value: the newest `seen` the catalog runs loaded (row 11).
    let incremental = json!({"load_type": "transactional", "timestamp_column": "seen",
                             "last_sync_value": "2024-03-01 23:00:00.123456+00"});
    let report = run_job(job(incremental.clone()), options(&dataset, &bucket, &dir)).await;
    ok(&report);
    assert_eq!(report.rows_loaded, 4);
    assert_same(&schema, &dataset).await;
    let report = run_job(job(incremental), options(&dataset, &bucket, &dir)).await;
    ok(&report);
    assert_eq!(report.rows_loaded, 0);

    // Merge: changed rows replace theirs, new ones are inserted, JSON parsed on the way.
    pg.batch_execute(&format!(
        "{}; {};",
        insert(&schema, 3, 6, "changed")
            .replace("timestamptz '2024-03-01", "timestamptz '2025-03-01"),
        insert(&schema, 16, 18, "new")
            .replace("timestamptz '2024-03-01", "timestamptz '2025-03-01"),
    ))
    .await
    .unwrap();
    let merge = json!({"load_type": "merge", "timestamp_column": "seen"});
    let report = run_job(job(merge), options(&dataset, &bucket, &dir)).await;
    ok(&report);
    assert_eq!(report.rows_loaded, 5);
    assert_same(&schema, &dataset).await;
}
