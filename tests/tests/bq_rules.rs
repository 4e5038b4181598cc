//! The strict rules layer, live: requests real BigQuery refuses and bqemulator accepts are
//! refused by the layer in front of it, in BigQuery's own shapes (a failed job, a 400, a 409),
//! and the emulator gaps it bridges behave as BigQuery does. The rules themselves have unit
//! tests in `tests/src/bq_rules/tests.rs`.

mod common;

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use serde_json::{Value, json};

const PROJECT: &str = common::BIGQUERY_PROJECT;

struct Layer {
    bq: String,
    gcs: String,
    http: reqwest::Client,
    dataset: String,
    bucket: String,
}

impl Layer {
    async fn new(location: &str) -> Layer {
        let bq = common::bigquery_host().await;
        let gcs = common::env_or_fail("STORAGE_EMULATOR_HOST");
        let id = uuid::Uuid::new_v4().simple().to_string();
        let layer = Layer {
            bq,
            gcs,
            http: reqwest::Client::new(),
            dataset: format!("rules_{}", &id[..12]),
            bucket: format!("rules-{}", &id[..12]),
        };
        let (status, body) = layer
            .post(
                "datasets",
                json!({"datasetReference": {"projectId": PROJECT, "datasetId": layer.dataset}, "location": location}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let created = layer
            .http
            .post(format!("{}/storage/v1/b?project={PROJECT}", layer.gcs))
            .json(&json!({"name": layer.bucket}))
            .send()
            .await
            .unwrap();
        assert!(created.status().is_success());
        layer
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/bigquery/v2/projects/{PROJECT}/{path}", self.bq))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}/bigquery/v2/projects/{PROJECT}/{path}", self.bq))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    fn table_ref(&self, table: &str) -> Value {
        json!({"projectId": PROJECT, "datasetId": self.dataset, "tableId": table})
    }

    async fn create_table(&self, table: &str, fields: Value) -> (u16, Value) {
        self.post(
            &format!("datasets/{}/tables", self.dataset),
            json!({"tableReference": self.table_ref(table), "schema": {"fields": fields}}),
        )
        .await
    }

    async fn upload(&self, name: &str, bytes: Vec<u8>) -> String {
        let r = self
            .http
            .post(format!(
                "{}/upload/storage/v1/b/{}/o?uploadType=media&name={name}",
                self.gcs, self.bucket
            ))
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        format!("gs://{}/{name}", self.bucket)
    }

    /// A job id of this test's own (job ids are unique per project, and bqemulator keeps its
    /// jobs between runs of the suite).
    fn job_id(&self, name: &str) -> String {
        format!("{}_{name}", self.dataset)
    }

    /// Inserts job `name`; returns the HTTP status and the job (or error) the layer answered.
    async fn job(&self, name: &str, configuration: Value) -> (u16, Value) {
        self.post(
            "jobs",
            json!({"jobReference": {"projectId": PROJECT, "jobId": self.job_id(name)}, "configuration": configuration}),
        )
        .await
    }

    async fn rows(&self, table: &str) -> Vec<Vec<Option<String>>> {
        common::bigquery_rows(&format!(
            "SELECT * FROM `{PROJECT}.{}.{table}` ORDER BY 1",
            self.dataset
        ))
        .await
    }
}

fn parquet(columns: &[(&str, &[&str])]) -> Vec<u8> {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, _)| Field::new(*name, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let arrays = columns
        .iter()
        .map(|(_, values)| Arc::new(StringArray::from(values.to_vec())) as _)
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

fn id_parquet(ids: &[i64]) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from(ids.to_vec()))],
    )
    .unwrap();
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

/// A failed job as BigQuery reports it: DONE, with the rule's reason.
fn assert_failed(answer: &(u16, Value), rule: &str, says: &str) {
    let (status, job) = answer;
    assert_eq!(*status, 200, "{job}");
    assert_eq!(job["status"]["state"], "DONE", "{job}");
    let message = job["status"]["errorResult"]["message"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(job["status"]["errorResult"]["reason"], "invalid", "{job}");
    assert!(message.contains(says), "{message}");
    assert!(
        message.contains(&format!("[shardflow rules layer: {rule}]")),
        "{message}"
    );
}

#[tokio::test]
async fn loads_real_bigquery_refuses_are_refused_here() {
    let layer = Layer::new("US").await;
    let (status, body) = layer
        .create_table("docs", json!([{"name": "doc", "type": "JSON"}]))
        .await;
    assert_eq!(status, 200, "{body}");
    let uri = layer
        .upload("docs/part.parquet", parquet(&[("doc", &["{\"a\": 1}"])]))
        .await;
    let load = json!({"load": {
        "sourceUris": [uri], "sourceFormat": "PARQUET",
        "destinationTable": layer.table_ref("docs"), "writeDisposition": "WRITE_APPEND",
    }});
    // bqemulator would parse the string into the JSON column; BigQuery refuses the format.
    let refused = layer.job("json_from_parquet", load.clone()).await;
    assert_failed(
        &refused,
        "load.json_column.format",
        "Unsupported field type JSON for column doc",
    );
    // jobs.get answers with the same failed job, and nothing was loaded.
    let (_, again) = layer
        .get(&format!("jobs/{}", layer.job_id("json_from_parquet")))
        .await;
    assert_eq!(again["status"], refused.1["status"]);
    assert!(layer.rows("docs").await.is_empty());

    // The same rows as CSV fill the JSON column.
    let csv = layer
        .upload("docs/part.csv", b"doc\n\"{\"\"a\"\": 1}\"\n".to_vec())
        .await;
    let (status, job) = layer
        .job(
            "json_from_csv",
            json!({"load": {"sourceUris": [csv], "sourceFormat": "CSV", "skipLeadingRows": 1,
                "destinationTable": layer.table_ref("docs"), "writeDisposition": "WRITE_APPEND"}}),
        )
        .await;
    assert_eq!(status, 200, "{job}");
    assert!(job["status"]["errorResult"].is_null(), "{job}");
    assert_eq!(layer.rows("docs").await.len(), 1);

    // A job id is used once: BigQuery answers 409 where bqemulator would run it again.
    let (status, body) = layer
        .job(
            "json_from_csv",
            json!({"load": {"sourceUris": [csv], "sourceFormat": "CSV",
        "destinationTable": layer.table_ref("docs"), "writeDisposition": "WRITE_APPEND"}}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["errors"][0]["reason"], "duplicate");
    let message = body["error"]["message"].as_str().unwrap();
    let want = format!(
        "Already Exists: Job test-proj:US.{}",
        layer.job_id("json_from_csv")
    );
    assert!(message.starts_with(&want), "{message}");
    assert_eq!(layer.rows("docs").await.len(), 1);
    let (status, _) = layer
        .job("bad id!", json!({"query": {"query": "SELECT 1"}}))
        .await;
    assert_eq!(status, 400);

    // Compressed and plain files in one job.
    let plain = layer.upload("mixed/a.csv", b"1\n".to_vec()).await;
    let packed = layer.upload("mixed/b.csv.gz", gzip(b"2\n").await).await;
    let (status, body) = layer
        .create_table("ids", json!([{"name": "id", "type": "INT64"}]))
        .await;
    assert_eq!(status, 200, "{body}");
    let mixed = layer
        .job(
            "mixed",
            json!({"load": {"sourceUris": [plain, packed], "sourceFormat": "CSV",
            "destinationTable": layer.table_ref("ids")}}),
        )
        .await;
    assert_failed(
        &mixed,
        "load.compression.mixed",
        "mixes 1 gzip-compressed and 1 uncompressed files",
    );

    // decimal(50,20) under the default decimalTargetTypes into a BIGNUMERIC column.
    let (status, body) = layer
        .create_table("wide", json!([{"name": "big", "type": "BIGNUMERIC"}]))
        .await;
    assert_eq!(status, 200, "{body}");
    // The emulator cannot hold BIGNUMERIC; the layer reports the type asked for.
    let (_, table) = layer
        .get(&format!("datasets/{}/tables/wide", layer.dataset))
        .await;
    assert_eq!(
        table["schema"]["fields"][0]["type"], "BIGNUMERIC",
        "{table}"
    );
    let decimal = {
        use arrow::array::Decimal256Array;
        use arrow::datatypes::i256;
        let schema = Arc::new(Schema::new(vec![Field::new(
            "big",
            DataType::Decimal256(50, 20),
            true,
        )]));
        let values = Decimal256Array::from(vec![i256::from_i128(1)])
            .with_precision_and_scale(50, 20)
            .unwrap();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(values)]).unwrap();
        let mut out = Vec::new();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        layer.upload("wide/part.parquet", out).await
    };
    let default_targets = layer
        .job(
            "wide_default",
            json!({"load": {"sourceUris": [decimal.clone()], "sourceFormat": "PARQUET",
            "destinationTable": layer.table_ref("wide")}}),
        )
        .await;
    assert_failed(
        &default_targets,
        "load.parquet.decimal_target_types",
        "loads it as NUMERIC, not the table's BIGNUMERIC",
    );
    let (status, job) = layer
        .job("wide_targets", json!({"load": {"sourceUris": [decimal], "sourceFormat": "PARQUET",
            "decimalTargetTypes": ["NUMERIC", "BIGNUMERIC"], "destinationTable": layer.table_ref("wide")}}))
        .await;
    assert_eq!(status, 200);
    assert!(job["status"]["errorResult"].is_null(), "{job}");
}

async fn gzip(bytes: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let mut encoder = async_compression::tokio::write::GzipEncoder::new(Vec::new());
    encoder.write_all(bytes).await.unwrap();
    encoder.shutdown().await.unwrap();
    encoder.into_inner()
}

#[tokio::test]
async fn schemas_and_names_are_kept_as_bigquery_keeps_them() {
    let layer = Layer::new("US").await;
    // Names BigQuery refuses, which bqemulator would create.
    for (fields, rule) in [
        (
            json!([{"name": "Amount", "type": "INT64"}, {"name": "amount", "type": "INT64"}]),
            "table.duplicate_columns",
        ),
        (
            json!([{"name": "order id", "type": "INT64"}]),
            "table.column_names",
        ),
        (
            json!([{"name": "_PARTITIONTIME", "type": "INT64"}]),
            "table.column_names",
        ),
    ] {
        let (status, body) = layer.create_table("names", fields).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(rule),
            "{body}"
        );
    }
    // A dataset without a location (it would land in the US by default).
    let (status, body) = layer
        .post("datasets", json!({"datasetReference": {"projectId": PROJECT, "datasetId": format!("{}_x", layer.dataset)}}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[shardflow rules layer: dataset.location]")
    );

    // WRITE_TRUNCATE would overwrite the owner's schema (here: drop a description);
    // WRITE_TRUNCATE_DATA keeps it, and the layer runs it as the truncate it means.
    let (status, body) = layer
        .create_table(
            "owned",
            json!([{"name": "id", "type": "INT64", "description": "the key"}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let first = layer.upload("owned/1.parquet", id_parquet(&[1, 2])).await;
    let second = layer.upload("owned/2.parquet", id_parquet(&[3])).await;
    let load = |uri: &str, disposition: &str| {
        json!({"load": {"sourceUris": [uri], "sourceFormat": "PARQUET", "writeDisposition": disposition,
            "destinationTable": layer.table_ref("owned")}})
    };
    let (status, job) = layer.job("owned_1", load(&first, "WRITE_APPEND")).await;
    assert!(
        status == 200 && job["status"]["errorResult"].is_null(),
        "{job}"
    );
    let truncate = layer.job("owned_2", load(&second, "WRITE_TRUNCATE")).await;
    assert_failed(
        &truncate,
        "load.write_truncate.schema",
        "loses the description of id",
    );
    let (status, job) = layer
        .job("owned_3", load(&second, "WRITE_TRUNCATE_DATA"))
        .await;
    assert!(
        status == 200 && job["status"]["errorResult"].is_null(),
        "{job}"
    );
    // jobs.get shows the disposition the client asked for.
    assert_eq!(
        job["configuration"]["load"]["writeDisposition"], "WRITE_TRUNCATE_DATA",
        "{job}"
    );
    let (_, got) = layer
        .get(&format!("jobs/{}", layer.job_id("owned_3")))
        .await;
    assert_eq!(
        got["configuration"]["load"]["writeDisposition"], "WRITE_TRUNCATE_DATA",
        "{got}"
    );
    assert_eq!(layer.rows("owned").await, vec![vec![Some("3".to_string())]]);
    let (_, table) = layer
        .get(&format!("datasets/{}/tables/owned", layer.dataset))
        .await;
    assert_eq!(table["schema"]["fields"][0]["description"], "the key");

    // Parquet columns in another order than the table's: BigQuery matches names, bqemulator
    // positions, so the layer refuses what would load other columns here.
    let (status, body) = layer
        .create_table(
            "pairs",
            json!([{"name": "a", "type": "STRING"}, {"name": "b", "type": "STRING"}]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let swapped = layer
        .upload("pairs/p.parquet", parquet(&[("b", &["B"]), ("a", &["A"])]))
        .await;
    let refused = layer
        .job(
            "pairs",
            json!({"load": {"sourceUris": [swapped], "sourceFormat": "PARQUET",
            "destinationTable": layer.table_ref("pairs")}}),
        )
        .await;
    assert_failed(
        &refused,
        "load.parquet.by_position",
        "would load them by position",
    );

    // A query writing to a destination table: bqemulator writes nothing.
    let refused = layer
        .job("query_dest", json!({"query": {"query": "SELECT 'x' AS a, 'y' AS b", "useLegacySql": false,
            "destinationTable": layer.table_ref("pairs"), "writeDisposition": "WRITE_TRUNCATE_DATA"}}))
        .await;
    assert_failed(
        &refused,
        "query.destination_table",
        "would write nothing on bqemulator",
    );
}

#[tokio::test]
async fn a_bucket_outside_the_datasets_location_is_not_loaded() {
    // fake-gcs-server puts every bucket in US-CENTRAL1.
    let layer = Layer::new("EU").await;
    let (status, body) = layer
        .create_table("ids", json!([{"name": "id", "type": "INT64"}]))
        .await;
    assert_eq!(status, 200, "{body}");
    let uri = layer.upload("ids.parquet", id_parquet(&[1])).await;
    let refused = layer
        .job(
            "far",
            json!({"load": {"sourceUris": [uri], "sourceFormat": "PARQUET",
            "destinationTable": layer.table_ref("ids")}}),
        )
        .await;
    assert_failed(
        &refused,
        "load.location.colocated",
        &format!(
            "gs://{} is in US-CENTRAL1, destination dataset is in EU",
            layer.bucket
        ),
    );
    assert!(layer.rows("ids").await.is_empty());
}
