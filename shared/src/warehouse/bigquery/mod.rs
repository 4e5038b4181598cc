//! The BigQuery warehouse: ONE load per table per run over the Parquet parts staged on GCS,
//! with deterministic job ids that are looked up (`jobs.get`) before every insert, so a retried
//! or redelivered finalisation never loads twice. Every request keeps to a documented rule of
//! the real service (quoted where it is made); the test suite's rules layer
//! (`tests/src/bq_rules`) refuses what BigQuery would refuse.
//!
//! # Type map
//!
//! A missing table is created from the workers' Arrow schema with this map, and no other
//! ([`bigquery_type`]); `source_type` is the field metadata `shardflow.source_type`.
//!
//! | Arrow type                                         | source_type     | BigQuery type |
//! |----------------------------------------------------|-----------------|---------------|
//! | Boolean                                            |                 | BOOL          |
//! | Int8, Int16, Int32, Int64, UInt8, UInt16, UInt32   |                 | INT64         |
//! | Float32, Float64                                   |                 | FLOAT64       |
//! | Utf8, LargeUtf8                                    | `json`, `jsonb` | JSON          |
//! | Utf8, LargeUtf8                                    | anything else   | STRING        |
//! | Binary, LargeBinary                                |                 | BYTES         |
//! | Date32                                             |                 | DATE          |
//! | Timestamp(_, None)                                 |                 | DATETIME      |
//! | Timestamp(_, Some(tz))                             |                 | TIMESTAMP     |
//! | Time64(_)                                          |                 | TIME          |
//! | Decimal32/64/128/256(p, s), 0 ≤ s ≤ 9, p − s ≤ 29  |                 | NUMERIC       |
//! | Decimal32/64/128/256(p, s), 0 ≤ s ≤ 38, p − s ≤ 38 |                 | BIGNUMERIC    |
//! | UInt64, any other decimal, any other type          |                 | error naming the column |
//!
//! UInt64 is refused: Parquet's UINT_64 loads only as INT64 ("In the case of UINT_64, an error
//! will be returned if the unsigned value exceeds the maximum INTEGER value"), so sources stage
//! unsigned 64-bit integers as decimal(20, 0), which loads as NUMERIC. Every Parquet load names
//! `decimalTargetTypes: ["NUMERIC", "BIGNUMERIC"]`, which picks exactly the column above ("In
//! the order of NUMERIC, BIGNUMERIC, and STRING, a type is picked if it is in the specified
//! list and if it supports the precision and the scale"; the default, `["NUMERIC"]`, would
//! load a BIGNUMERIC column as NUMERIC).
//!
//! A nullable field is `NULLABLE`, any other `REQUIRED`. An existing table must have the same
//! set of column names and types, and no REQUIRED column the source may leave NULL, or the load
//! is refused before any job runs (schema drift). Its schema is never rewritten: descriptions,
//! modes and constraints stay. Source column names BigQuery cannot take are renamed by the
//! rule in [`names`].
//!
//! # Loads
//!
//! Job ids are [`job_id`]: `shardflow_{run}_{table}_{step}_{digest}`, the digest covering the
//! dataset too, since job ids are unique per project. Which jobs a run takes is
//! [`routes::route`]:
//!
//! - **direct** (a replace or an append of at most [`BigQueryWarehouse::max_uris_per_job`]
//!   parts, BigQuery's limit being "A job configuration can have up to 10,000 source URIs", and
//!   no JSON column): one load job (step `load`) straight into the table, `WRITE_TRUNCATE_DATA`
//!   for a replace ("BigQuery overwrites the data, but keeps the constraints and schema of the
//!   existing table"; `WRITE_TRUNCATE` "will always overwrite the schema") or `WRITE_APPEND`,
//!   `CREATE_NEVER`. Loads are free.
//! - **staged copy** (an append of more parts, no JSON column): load jobs (steps `stage00000`,
//!   …) into the staging table `{table}__shardflow_{run}`, a count check of it, ONE copy job
//!   (step `copy`, `WRITE_APPEND`) into the table, then the staging table is dropped. Free.
//! - **staged SQL** (a merge, a table with a JSON column, a replace of more parts): the parts
//!   load into the staging table (JSON columns as STRING: "If you use a batch load job to ingest
//!   JSON data into a table, the source data must be in CSV, Avro, or JSON format"), are
//!   counted, and ONE query job (step `merge`, `sql`) moves them with `PARSE_JSON` applied: a
//!   `MERGE`, an `INSERT … SELECT`, or for a replace a transaction of `DELETE` and `INSERT`
//!   ("Transactions guarantee ACID properties and support snapshot isolation"). It is billed as
//!   DML: the staging table's bytes, and for a replace's `DELETE` and a merge the
//!   destination's too. A copy job cannot replace: its `WRITE_TRUNCATE`
//!   "uses the schema and table constraints from the source table", and it has no
//!   `WRITE_TRUNCATE_DATA`.
//!
//! A mismatch found on the staging table leaves the destination untouched.
//!
//! Every job is looked up before it is inserted: a job that exists (and writes the same table)
//! is waited for and its outcome used. A job that FAILED changed nothing (BigQuery jobs are
//! atomic) and its id can never be reused, so the next attempt takes `{id}_retry1`,
//! `{id}_retry2`, …; the whole chain is looked up each time, so a successful attempt is never
//! repeated.
//!
//! # Location
//!
//! Jobs run in the dataset's location ("The location of every dataset involved in the request
//! [...] must match the location of the job"). A missing dataset is created only in
//! `BIGQUERY_LOCATION` ("The dataset location can only be set at creation time"), never in the
//! default; the staging bucket must be where the dataset is ("the dataset that contains the
//! table must be in the same regional or multi-regional location as the Cloud Storage bucket"),
//! checked with `buckets.get` before anything moves.
//!
//! # Verifying the count
//!
//! The count comes from `SELECT COUNT(*)` (free on BigQuery: answered from metadata), which the
//! emulator answers exactly too. A replace must leave exactly `expected_rows` in the table (a
//! direct replace is checked after its job has committed; in steps, before the final job). For
//! an append, the count taken just before the job was inserted travels with the job as the
//! label `shardflow_rows_before`, so a retried call that finds the job already done still
//! checks `after − before`; an `INSERT` reports its own rows (`numDmlAffectedRows`). Not used,
//! because bqemulator 1.4 gets them wrong: `statistics.load.outputRows` (it reports the table's
//! total, not the rows the job added) and `tables.get numRows` (not updated by a copy into an
//! existing table).

pub mod names;
pub mod routes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arrow::datatypes::{DataType, Field, Schema};
use async_trait::async_trait;
use gcp_bigquery_client::Client;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::client_builder::ClientBuilder;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::dataset::Dataset;
use gcp_bigquery_client::model::field_type::FieldType;
use gcp_bigquery_client::model::get_query_results_parameters::GetQueryResultsParameters;
use gcp_bigquery_client::model::job::Job;
use gcp_bigquery_client::model::job_configuration::JobConfiguration;
use gcp_bigquery_client::model::job_configuration_load::JobConfigurationLoad;
use gcp_bigquery_client::model::job_configuration_query::JobConfigurationQuery;
use gcp_bigquery_client::model::job_configuration_table_copy::JobConfigurationTableCopy;
use gcp_bigquery_client::model::job_reference::JobReference;
use gcp_bigquery_client::model::query_request::QueryRequest;
use gcp_bigquery_client::model::query_response::QueryResponse;
use gcp_bigquery_client::model::table::Table;
use gcp_bigquery_client::model::table_field_schema::TableFieldSchema;
use gcp_bigquery_client::model::table_reference::TableReference;
use gcp_bigquery_client::model::table_schema::TableSchema;
use md5::{Digest, Md5};

use super::{LoadOutcome, LoadRequest, NativeFormat, SourceFilesLoad, Warehouse, WriteMode};
use crate::source::pg_binary::SOURCE_TYPE_KEY;
use crate::staging::Staging;
use crate::{Error, Result};
pub use routes::{Route, SqlColumn, merge_sql, quoted};

/// The `decimalTargetTypes` of every Parquet load: each decimal loads as the type map's column.
pub const DECIMAL_TARGET_TYPES: [&str; 2] = ["NUMERIC", "BIGNUMERIC"];
/// BigQuery takes at most this many source URIs in one load job.
pub const DEFAULT_MAX_URIS_PER_JOB: usize = 10_000;
/// BigQuery's limit for job ids and table names.
const MAX_ID_LEN: usize = 1024;
/// Room left after a job id's base for `_retryN`.
const MAX_JOB_BASE_LEN: usize = MAX_ID_LEN - 16;
/// Attempts of one job (after failures) before giving up.
const MAX_ATTEMPTS: u32 = 10;
/// Job label holding the destination's row count just before the job was inserted.
const ROWS_BEFORE_LABEL: &str = "shardflow_rows_before";
/// Marks staging tables; refused in destination names so the two never meet.
const STAGING_MARK: &str = "__shardflow_";
/// An abandoned staging table removes itself after this long.
const STAGING_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct BigQueryWarehouse {
    client: Client,
    project: String,
    dataset: String,
    /// Where a missing dataset is created (`BIGQUERY_LOCATION`); None: it is not created.
    pub create_in: Option<String>,
    /// Source URIs per load job. Above it, parts are loaded into a staging table in steps and
    /// copied into the table once.
    pub max_uris_per_job: usize,
    /// How long to wait for one job (or one count query) to finish.
    pub job_timeout: Duration,
    /// Bucket → location, as `buckets.get` said once.
    bucket_locations: tokio::sync::Mutex<HashMap<String, String>>,
}

/// The OAuth scope of shardflow's BigQuery token. A load job reads its gs:// sources as the
/// identity that runs it, so the token must be good for Cloud Storage as well as BigQuery
/// (`jobs.insert` accepts `https://www.googleapis.com/auth/cloud-platform` among its scopes).
pub const OAUTH_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The emulator needs no credentials; it ignores the empty bearer token.
#[derive(Clone)]
struct Anonymous;

#[async_trait]
impl Authenticator for Anonymous {
    async fn access_token(&self) -> std::result::Result<String, BQError> {
        Ok(String::new())
    }
}

/// Google credentials (ADC, workload identity, a key file) with [`OAUTH_SCOPE`].
#[derive(Clone)]
struct GoogleCredentials(google_cloud_auth::credentials::AccessTokenCredentials);

#[async_trait]
impl Authenticator for GoogleCredentials {
    async fn access_token(&self) -> std::result::Result<String, BQError> {
        self.0.access_token().await.map(|t| t.token).map_err(|e| {
            BQError::InvalidApplicationDefaultCredentialsAuthenticator(std::io::Error::other(
                e.to_string(),
            ))
        })
    }
}

/// `BIGQUERY_LOCATION`, when set and not blank.
pub fn configured_location() -> Option<String> {
    std::env::var("BIGQUERY_LOCATION")
        .ok()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

impl BigQueryWarehouse {
    /// A client for `project`, loading into `dataset`: the emulator at `BIGQUERY_EMULATOR_HOST`
    /// (anonymous) when it is set, else BigQuery with application default credentials scoped
    /// to [`OAUTH_SCOPE`]. A missing dataset is created in `BIGQUERY_LOCATION`, or not at all.
    pub async fn connect(project: &str, dataset: &str) -> Result<Self> {
        check_project(project)?;
        check_dataset(dataset)?;
        let failed = |why: String| {
            Error::Warehouse(format!(
                "cannot create a BigQuery client for project {project}: {why}"
            ))
        };
        let (base, auth): (Option<String>, Arc<dyn Authenticator>) = match bigquery_emulator_url() {
            Some(base) => (Some(format!("{base}/bigquery/v2")), Arc::new(Anonymous)),
            None => {
                let credentials = google_cloud_auth::credentials::Builder::default()
                    .with_scopes([OAUTH_SCOPE])
                    .build_access_token_credentials()
                    .map_err(|e| failed(format!("no Google credentials: {e}")))?;
                (None, Arc::new(GoogleCredentials(credentials)))
            }
        };
        let mut builder = ClientBuilder::new();
        if let Some(base) = base {
            builder.with_v2_base_url(base);
        }
        let client = builder
            .build_from_authenticator(auth)
            .await
            .map_err(|e| failed(describe(&e)))?;
        let mut warehouse = Self::from_client(client, project, dataset)?;
        warehouse.create_in = configured_location();
        Ok(warehouse)
    }

    /// Wraps a client built elsewhere (other credentials, a custom HTTP client).
    pub fn from_client(client: Client, project: &str, dataset: &str) -> Result<Self> {
        check_project(project)?;
        check_dataset(dataset)?;
        Ok(BigQueryWarehouse {
            client,
            project: project.to_string(),
            dataset: dataset.to_string(),
            create_in: None,
            max_uris_per_job: DEFAULT_MAX_URIS_PER_JOB,
            job_timeout: Duration::from_secs(6 * 3600),
            bucket_locations: tokio::sync::Mutex::default(),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    /// `project.dataset.table`, as BigQuery names a table.
    fn full_name(&self, table: &str) -> String {
        format!("{}.{}.{table}", self.project, self.dataset)
    }

    fn table_ref(&self, table: &str) -> TableReference {
        TableReference::new(&self.project, &self.dataset, table)
    }
}

/// The emulator's base URL from `BIGQUERY_EMULATOR_HOST`, when it is set.
pub fn bigquery_emulator_url() -> Option<String> {
    emulator_base_url(&std::env::var("BIGQUERY_EMULATOR_HOST").ok()?)
}

/// `127.0.0.1:9050` or `http://127.0.0.1:9050/` → `http://127.0.0.1:9050`; blank → None.
pub fn emulator_base_url(host: &str) -> Option<String> {
    let host = host.trim().trim_end_matches('/');
    if host.is_empty() {
        None
    } else if host.contains("://") {
        Some(host.to_string())
    } else {
        Some(format!("http://{host}"))
    }
}

/// `bigquery://PROJECT/DATASET` → (project, dataset).
pub fn parse_bigquery_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| Error::Warehouse(format!("warehouse URL {url:?} {why}"));
    let rest = url
        .strip_prefix("bigquery://")
        .ok_or_else(|| bad("does not start with bigquery://"))?;
    let (project, dataset) = rest
        .trim_end_matches('/')
        .split_once('/')
        .ok_or_else(|| bad("is not bigquery://PROJECT/DATASET"))?;
    check_project(project)?;
    check_dataset(dataset)?;
    Ok((project.to_string(), dataset.to_string()))
}

/// Project ids are lowercase letters, digits and dashes, or `domain.com:project`. Only what
/// could break a quoted `project.dataset.table` is refused here; BigQuery checks the rest.
fn check_project(project: &str) -> Result<()> {
    let ok = !project.is_empty()
        && project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(Error::Warehouse(format!(
            "BigQuery project id {project:?} must be letters, digits, '-', '.' or ':'"
        )))
    }
}

fn check_dataset(dataset: &str) -> Result<()> {
    let ok = !dataset.is_empty()
        && dataset.len() <= MAX_ID_LEN
        && dataset
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Warehouse(format!(
            "BigQuery dataset {dataset:?} must be 1 to {MAX_ID_LEN} letters, digits or underscores"
        )))
    }
}

/// Whether a Cloud Storage location may feed a dataset's: the same location, or one inside
/// the dataset's multi-region ("the Cloud Storage bucket must be in the same region or
/// contained in the same multi-region as the dataset"; the US multi-region holds the `us-*`
/// regions and NAM4, the EU one the EU's `europe-*` regions (not London, europe-west2, nor
/// Zurich, europe-west6) and EUR4). Loads from another region of the multi-region than
/// us-central1 or europe-west4 incur data transfer charges, but load.
pub fn colocated(dataset: &str, bucket: &str) -> bool {
    let (dataset, bucket) = (dataset.to_ascii_lowercase(), bucket.to_ascii_lowercase());
    dataset == bucket
        || match dataset.as_str() {
            "us" => bucket.starts_with("us-") || bucket == "nam4",
            "eu" => {
                (bucket.starts_with("europe-")
                    && !matches!(bucket.as_str(), "europe-west2" | "europe-west6"))
                    || bucket == "eur4"
            }
            _ => false,
        }
}

// ---------------------------------------------------------------------------------------------
// The type map
// ---------------------------------------------------------------------------------------------

/// The BigQuery type and mode of one Arrow field, per the map at the top of this file.
pub fn bigquery_type(field: &Field) -> Result<(&'static str, &'static str)> {
    let (ty, mode) = map_field(field)?;
    Ok((type_name(&ty), mode))
}

/// The BigQuery column for one Arrow field.
pub fn bigquery_field(field: &Field) -> Result<TableFieldSchema> {
    let (ty, mode) = map_field(field)?;
    let mut column = TableFieldSchema::new(field.name(), ty);
    column.mode = Some(mode.to_string());
    Ok(column)
}

/// The BigQuery columns for a whole Arrow schema.
pub fn bigquery_schema(schema: &Schema) -> Result<Vec<TableFieldSchema>> {
    schema.fields().iter().map(|f| bigquery_field(f)).collect()
}

/// The columns of a staging table: the parts as they are, a JSON column as the STRING a
/// Parquet part fills ("If you use a batch load job to ingest JSON data into a table, the source
/// data must be in CSV, Avro, or JSON format").
pub fn staging_columns(columns: &[TableFieldSchema]) -> Vec<TableFieldSchema> {
    columns
        .iter()
        .map(|c| match c.r#type {
            FieldType::Json => TableFieldSchema {
                r#type: FieldType::String,
                ..c.clone()
            },
            _ => c.clone(),
        })
        .collect()
}

fn map_field(field: &Field) -> Result<(FieldType, &'static str)> {
    let name = field.name();
    let is_json = matches!(
        field.metadata().get(SOURCE_TYPE_KEY).map(String::as_str),
        Some("json" | "jsonb")
    );
    let ty = match field.data_type() {
        DataType::Boolean => FieldType::Bool,
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => FieldType::Int64,
        // Parquet's UINT_64 loads as INT64 only, failing past 2^63 - 1: sources stage these as
        // decimal(20, 0).
        DataType::UInt64 => {
            return Err(Error::Warehouse(format!(
                "column {name:?}: unsigned 64-bit integers are staged as decimal(20, 0) for \
                 BigQuery (a Parquet UINT_64 loads only as INT64); this part holds UInt64"
            )));
        }
        DataType::Float32 | DataType::Float64 => FieldType::Float64,
        DataType::Utf8 | DataType::LargeUtf8 if is_json => FieldType::Json,
        DataType::Utf8 | DataType::LargeUtf8 => FieldType::String,
        DataType::Binary | DataType::LargeBinary => FieldType::Bytes,
        DataType::Date32 => FieldType::Date,
        DataType::Timestamp(_, None) => FieldType::Datetime,
        DataType::Timestamp(_, Some(_)) => FieldType::Timestamp,
        DataType::Time64(_) => FieldType::Time,
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => decimal_type(name, *p, *s)?,
        other => {
            return Err(Error::Warehouse(format!(
                "column {name:?}: Arrow type {other} has no BigQuery type in shardflow's type map"
            )));
        }
    };
    let mode = if field.is_nullable() {
        "NULLABLE"
    } else {
        "REQUIRED"
    };
    Ok((ty, mode))
}

/// NUMERIC is decimal(38, 9) and BIGNUMERIC decimal(76.76, 38): a decimal fits when both its
/// scale and its integer digits do. A negative scale cannot be written to Parquet.
fn decimal_type(name: &str, precision: u8, scale: i8) -> Result<FieldType> {
    let (p, s) = (i32::from(precision), i32::from(scale));
    if (0..=9).contains(&s) && p - s <= 29 {
        Ok(FieldType::Numeric)
    } else if (0..=38).contains(&s) && p - s <= 38 {
        Ok(FieldType::Bignumeric)
    } else {
        Err(Error::Warehouse(format!(
            "column {name:?}: decimal({p}, {s}) has no exact BigQuery type (NUMERIC takes a \
             scale up to 9 and 29 integer digits, BIGNUMERIC a scale up to 38 and 38 integer digits)"
        )))
    }
}

/// The standard SQL name of a column type; legacy aliases (INTEGER, FLOAT, BOOLEAN, RECORD),
/// which `tables.get` returns, fold into it.
fn type_name(ty: &FieldType) -> &'static str {
    match ty {
        FieldType::String => "STRING",
        FieldType::Bytes => "BYTES",
        FieldType::Integer | FieldType::Int64 => "INT64",
        FieldType::Float | FieldType::Float64 => "FLOAT64",
        FieldType::Numeric => "NUMERIC",
        FieldType::Bignumeric => "BIGNUMERIC",
        FieldType::Boolean | FieldType::Bool => "BOOL",
        FieldType::Timestamp => "TIMESTAMP",
        FieldType::Date => "DATE",
        FieldType::Time => "TIME",
        FieldType::Datetime => "DATETIME",
        FieldType::Record | FieldType::Struct => "STRUCT",
        FieldType::Geography => "GEOGRAPHY",
        FieldType::Json => "JSON",
        FieldType::Interval => "INTERVAL",
    }
}

/// Refuses a table with a REQUIRED column the staged rows may leave NULL: BigQuery would
/// refuse the load ("When appending data from Avro, ORC, or Parquet files, relax columns to
/// NULL in your schema [...] ALLOW_FIELD_RELAXATION"), and relaxing it would change the
/// table's schema behind its owner's back.
pub fn check_modes(
    table: &str,
    existing: &[TableFieldSchema],
    staged: &[TableFieldSchema],
) -> Result<()> {
    let required = |f: &TableFieldSchema| f.mode.as_deref() == Some("REQUIRED");
    let problems: Vec<String> = existing
        .iter()
        .filter(|f| required(f))
        .filter_map(
            |f| match staged.iter().find(|s| s.name.eq_ignore_ascii_case(&f.name)) {
                None => Some(format!("{} (the source has no such column)", f.name)),
                Some(s) if !required(s) => Some(format!("{} (nullable in the source)", f.name)),
                Some(_) => None,
            },
        )
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::Warehouse(format!(
        "table {table} has REQUIRED columns the source may leave NULL: {}; make them NULLABLE \
         in BigQuery (ALTER TABLE … ALTER COLUMN … DROP NOT NULL) or NOT NULL in the source; \
         nothing was loaded",
        problems.join(", ")
    )))
}

/// The columns as `check_columns` compares them.
fn named_types(fields: &[TableFieldSchema]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|f| (f.name.clone(), type_name(&f.r#type).to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

fn short_digest(parts: &[&str]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    hex::encode(hasher.finalize())[..12].to_string()
}

/// Replaces every character `keep` refuses with `_`.
fn clean(raw: &str, keep: impl Fn(char) -> bool) -> String {
    raw.chars().map(|c| if keep(c) { c } else { '_' }).collect()
}

/// A cleaned (ASCII) name cut to fit `max` bytes with `_{digest}` after it.
fn with_digest(name: &str, max: usize, digest: &str) -> String {
    let keep = max.saturating_sub(digest.len() + 1).min(name.len());
    format!("{}_{digest}", &name[..keep])
}

/// The deterministic id of one job of a run's load of a table:
/// `shardflow_{run}_{table}_{step}_{digest}`, in `[A-Za-z0-9_-]`. Job ids are unique per
/// project, not per dataset, so the digest of (dataset, run, table, step) keeps apart loads into
/// other datasets and names that cleaning, cutting or an ambiguous `_` would make alike; the
/// readable part is for people reading the job list.
pub fn job_id(dataset: &str, run_id: &str, table: &str, step: &str) -> String {
    let readable = clean(&format!("shardflow_{run_id}_{table}_{step}"), |c| {
        c.is_ascii_alphanumeric() || c == '_' || c == '-'
    });
    with_digest(
        &readable,
        MAX_JOB_BASE_LEN,
        &short_digest(&[dataset, run_id, table, step]),
    )
}

/// The id of attempt `n` of a job (0 is the job itself).
fn attempt_id(base: &str, n: u32) -> String {
    if n == 0 {
        base.to_string()
    } else {
        format!("{base}_retry{n}")
    }
}

/// The staging table of a run's load of `table` in steps: `{table}__shardflow_{run}`.
pub fn staging_table_name(table: &str, run_id: &str) -> String {
    let raw = format!("{table}{STAGING_MARK}{run_id}");
    let run = clean(run_id, |c| c.is_ascii_alphanumeric() || c == '_');
    let name = format!("{table}{STAGING_MARK}{run}");
    if name == raw && name.len() <= MAX_ID_LEN {
        name
    } else {
        with_digest(&name, MAX_ID_LEN, &short_digest(&[table, run_id]))
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to BigQuery
// ---------------------------------------------------------------------------------------------

fn http_status(e: &BQError) -> Option<i64> {
    match e {
        BQError::ResponseError { error } => Some(error.error.code),
        _ => None,
    }
}

fn describe(e: &BQError) -> String {
    match e {
        BQError::ResponseError { error } => {
            format!("HTTP {}: {}", error.error.code, error.error.message)
        }
        // No answer: the peer and the cause, not "error sending request for url (…)". (The
        // client's reqwest is another version than ours: the cause is read off the chain.)
        BQError::RequestError(e) => {
            let cause = crate::net::io_cause(e).unwrap_or_else(|| {
                if e.is_timeout() {
                    "timed out waiting for an answer".into()
                } else {
                    e.to_string()
                }
            });
            match e.url() {
                Some(url) => format!(
                    "BigQuery at {}: {cause}",
                    url.origin().ascii_serialization()
                ),
                None => format!("BigQuery: {cause}"),
            }
        }
        other => other.to_string(),
    }
}

fn bq_error(what: impl std::fmt::Display) -> impl FnOnce(BQError) -> Error {
    move |e| Error::Warehouse(format!("{what}: {}", describe(&e)))
}

/// What a failed job reported, or None when it succeeded (or is not done).
fn job_failure(job: &Job) -> Option<String> {
    let status = job.status.as_ref()?;
    let first = status.error_result.as_ref()?;
    let mut text = format!(
        "{}: {}",
        first.reason.as_deref().unwrap_or("error"),
        first.message.as_deref().unwrap_or("(no message)")
    );
    if let Some(location) = &first.location {
        text.push_str(&format!(" (at {location})"));
    }
    // `errors` repeats the first and may add detail, e.g. one entry per bad file.
    let more: Vec<&str> = status
        .errors
        .iter()
        .flatten()
        .filter_map(|e| e.message.as_deref())
        .filter(|m| Some(*m) != first.message.as_deref())
        .take(3)
        .collect();
    if !more.is_empty() {
        text.push_str(&format!("; also: {}", more.join("; ")));
    }
    Some(text)
}

fn job_state(job: &Job) -> &str {
    job.status
        .as_ref()
        .and_then(|s| s.state.as_deref())
        .unwrap_or("PENDING")
}

fn job_name(job: &Job) -> &str {
    job.job_reference
        .as_ref()
        .and_then(|r| r.job_id.as_deref())
        .unwrap_or("(no id)")
}

/// What a load job read and when it ran (ms since the epoch), as it says of itself.
fn source_read(job: &Job) -> Option<super::SourceRead> {
    let stats = job.statistics.as_ref()?;
    let ms = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<i64>().ok());
    let uris = job
        .configuration
        .as_ref()?
        .load
        .as_ref()?
        .source_uris
        .clone()?;
    Some(super::SourceRead {
        uris,
        started_ms: ms(&stats.start_time)?,
        ended_ms: ms(&stats.end_time)?,
    })
}

/// The destination's count before the job ran, from its label.
fn rows_before(job: &Job) -> Result<u64> {
    job.configuration
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .and_then(|labels| labels.get(ROWS_BEFORE_LABEL))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::Warehouse(format!(
                "BigQuery job {} has no {ROWS_BEFORE_LABEL} label, so the rows it appended cannot be counted",
                job_name(job)
            ))
        })
}

/// The table a load or copy job writes.
fn destination(configuration: Option<&JobConfiguration>) -> Option<&TableReference> {
    let configuration = configuration?;
    configuration
        .load
        .as_ref()
        .and_then(|l| l.destination_table.as_ref())
        .or_else(|| {
            configuration
                .copy
                .as_ref()
                .and_then(|c| c.destination_table.as_ref())
        })
}

fn table_text(table: Option<&TableReference>) -> String {
    table.map_or("no table".into(), |t| {
        format!("{}.{}.{}", t.project_id, t.dataset_id, t.table_id)
    })
}

/// A job found under our id must be ours: one writing the table we would write.
fn check_destination(job: &Job, ours: &JobConfiguration) -> Result<()> {
    let theirs = table_text(destination(job.configuration.as_ref()));
    let ours = table_text(destination(Some(ours)));
    if theirs == ours {
        Ok(())
    } else {
        Err(Error::Warehouse(format!(
            "BigQuery job {} already exists but writes {theirs}, not {ours}; not using it",
            job_name(job)
        )))
    }
}

/// A load's write disposition. A replace keeps the table's schema: "WRITE_TRUNCATE_DATA: If
/// the table already exists, BigQuery overwrites the data, but keeps the constraints and schema
/// of the existing table" (WRITE_TRUNCATE "uses the schema from the load job").
fn write_disposition(mode: WriteMode) -> &'static str {
    match mode {
        WriteMode::Replace => "WRITE_TRUNCATE_DATA",
        // A merge never loads into the table itself; its staging table is appended to.
        WriteMode::Append | WriteMode::Merge => "WRITE_APPEND",
    }
}

/// Whether a job is already there to be waited for, or which id the next attempt takes.
enum Lookup {
    Existing(String, Box<Job>),
    Free(String),
}

impl BigQueryWarehouse {
    /// The dataset's location, which every job runs in. A missing dataset is created in
    /// `create_in`, or the load fails before anything moves; one that `create_in` places
    /// elsewhere is refused ("After a dataset is created, its location cannot be changed").
    async fn ensure_dataset(&self) -> Result<String> {
        self.ensure_dataset_for(None).await
    }

    /// `ensure_dataset`, checking first (before a missing dataset is created) that BigQuery
    /// loads from `staging`'s bucket into the dataset's location.
    async fn ensure_dataset_for(&self, staging: Option<&Staging>) -> Result<String> {
        let what = || format!("dataset {}.{}", self.project, self.dataset);
        let get = || async {
            match self
                .client
                .dataset()
                .get(&self.project, &self.dataset)
                .await
            {
                Ok(dataset) => Ok(Some(dataset)),
                Err(e) if http_status(&e) == Some(404) => Ok(None),
                Err(e) => Err(bq_error(format!("cannot read {}", what()))(e)),
            }
        };
        let dataset = match get().await? {
            Some(dataset) => dataset,
            None => {
                let Some(location) = &self.create_in else {
                    return Err(Error::Warehouse(format!(
                        "{} does not exist: create it where the data must live, or set \
                         BIGQUERY_LOCATION (e.g. US, EU, europe-west1) for shardflow to create it \
                         there; nothing was loaded",
                        what()
                    )));
                };
                if let Some(staging) = staging {
                    self.check_bucket_location(staging, location).await?;
                }
                tracing::info!(dataset = %what(), %location, "creating the dataset");
                let created = self
                    .client
                    .dataset()
                    .create(Dataset::new(&self.project, &self.dataset).location(location))
                    .await;
                match created {
                    Ok(dataset) => dataset,
                    // Someone else created it meanwhile.
                    Err(e) if http_status(&e) == Some(409) => get().await?.ok_or_else(|| {
                        Error::Warehouse(format!("{} exists and vanished", what()))
                    })?,
                    Err(e) => return Err(bq_error(format!("cannot create {}", what()))(e)),
                }
            }
        };
        let location = dataset.location.ok_or_else(|| {
            Error::Warehouse(format!("BigQuery reports no location for {}", what()))
        })?;
        if let Some(want) = &self.create_in
            && !want.eq_ignore_ascii_case(&location)
        {
            return Err(Error::Warehouse(format!(
                "{} is in {location}, but BIGQUERY_LOCATION is {want}; a dataset's location \
                 cannot change: fix BIGQUERY_LOCATION or load into another dataset",
                what()
            )));
        }
        if let Some(staging) = staging {
            self.check_bucket_location(staging, &location).await?;
        }
        Ok(location)
    }

    /// Refuses, before any job runs, a staging bucket BigQuery would not load from into this
    /// dataset: "the dataset that contains the table must be in the same regional or
    /// multi-regional location as the Cloud Storage bucket".
    async fn check_bucket_location(&self, staging: &Staging, dataset_location: &str) -> Result<()> {
        let Some(gcs) = staging.gcs_bucket() else {
            return Ok(());
        };
        let bucket = gcs.bucket().to_string();
        let mut known = self.bucket_locations.lock().await;
        let location = match known.get(&bucket) {
            Some(l) => l.clone(),
            None => {
                let info = gcs.bucket_info().await.map_err(|e| {
                    Error::Warehouse(format!(
                        "cannot read the location of staging bucket gs://{bucket} \
                         (storage.buckets.get): {e}"
                    ))
                })?;
                known.insert(bucket.clone(), info.location.clone());
                info.location
            }
        };
        if colocated(dataset_location, &location) {
            Ok(())
        } else {
            Err(Error::Warehouse(format!(
                "staging bucket gs://{bucket} is in {location} and dataset {}.{} in \
                 {dataset_location}: BigQuery loads only from a bucket in the dataset's location; \
                 use a staging bucket there; nothing was loaded",
                self.project, self.dataset
            )))
        }
    }

    async fn get_table(&self, table: &str) -> Result<Option<Table>> {
        match self
            .client
            .table()
            .get(&self.project, &self.dataset, table, None)
            .await
        {
            Ok(t) => Ok(Some(t)),
            Err(e) if http_status(&e) == Some(404) => Ok(None),
            Err(e) => Err(bq_error(format!(
                "cannot read table {}",
                self.full_name(table)
            ))(e)),
        }
    }

    /// Creates the table when missing; refuses one whose columns differ.
    async fn ensure_table(
        &self,
        table: &str,
        columns: &[TableFieldSchema],
        expires: Option<SystemTime>,
        allow_new_columns: bool,
        location: Option<&str>,
    ) -> Result<()> {
        let full = self.full_name(table);
        let existing = match self.get_table(table).await? {
            Some(t) => t,
            None => {
                let mut new = Table::new(
                    &self.project,
                    &self.dataset,
                    table,
                    TableSchema::new(columns.to_vec()),
                );
                if let Some(at) = expires {
                    new = new.expiration_time(at);
                }
                match self.client.table().create(new).await {
                    Ok(_) => return Ok(()),
                    Err(e) if http_status(&e) == Some(409) => {
                        self.get_table(table).await?.ok_or_else(|| {
                            Error::Warehouse(format!("table {full} exists and vanished"))
                        })?
                    }
                    Err(e) => return Err(bq_error(format!("cannot create table {full}"))(e)),
                }
            }
        };
        let fields = existing.schema.fields.unwrap_or_default();
        super::check_columns(
            &full,
            &named_types(&fields),
            &named_types(columns),
            allow_new_columns,
        )?;
        check_modes(&full, &fields, columns)?;
        let new: Vec<&TableFieldSchema> = columns
            .iter()
            .filter(|c| !fields.iter().any(|f| f.name.eq_ignore_ascii_case(&c.name)))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        // schema_policy "add_columns": the new columns are added before the load, by DDL
        // rather than the load's ALLOW_FIELD_ADDITION, which a staging table's copy job lacks
        // and bqemulator ignores. If the load then fails, they stay, empty.
        let added: Vec<String> = new
            .iter()
            .map(|c| {
                format!(
                    "ADD COLUMN IF NOT EXISTS {} {}",
                    quoted(&c.name),
                    type_name(&c.r#type)
                )
            })
            .collect();
        let names: Vec<&str> = new.iter().map(|c| c.name.as_str()).collect();
        tracing::info!(table = %full, columns = ?names, "adding columns");
        // One job per table version and column set: a retry waits for it instead of adding
        // twice.
        let base = job_id(
            &self.dataset,
            existing.creation_time.as_deref().unwrap_or("0"),
            table,
            &format!("add_{}", names.join("_")),
        );
        let config = JobConfiguration {
            query: Some(JobConfigurationQuery {
                query: format!("ALTER TABLE {} {}", quoted(&full), added.join(", ")),
                use_legacy_sql: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let what = format!("adding columns {} to {full}", names.join(", "));
        self.run_job(&base, &what, location, config, None).await?;
        Ok(())
    }

    async fn get_job(&self, id: &str, location: Option<&str>) -> Result<Option<Job>> {
        match self.client.job().get_job(&self.project, id, location).await {
            Ok(job) => Ok(Some(job)),
            Err(e) if http_status(&e) == Some(404) => Ok(None),
            Err(e) => Err(bq_error(format!("cannot look up BigQuery job {id}"))(e)),
        }
    }

    /// Walks the attempts of job `base`: the first that is running or succeeded is waited for
    /// instead of inserting anything; failed ones are skipped (they changed nothing).
    async fn lookup(&self, base: &str, location: Option<&str>) -> Result<Lookup> {
        let mut last_failure = String::new();
        for n in 0..MAX_ATTEMPTS {
            let id = attempt_id(base, n);
            match self.get_job(&id, location).await? {
                None => return Ok(Lookup::Free(id)),
                Some(job) => match job_failure(&job) {
                    None => return Ok(Lookup::Existing(id, Box::new(job))),
                    Some(failure) => {
                        tracing::warn!(job = %id, %failure, "an earlier attempt failed; trying the next id");
                        last_failure = failure;
                    }
                },
            }
        }
        Err(Error::Warehouse(format!(
            "BigQuery job {base} failed {MAX_ATTEMPTS} times; the last attempt said: {last_failure}"
        )))
    }

    async fn insert_job(
        &self,
        id: &str,
        configuration: JobConfiguration,
        location: Option<&str>,
        what: &str,
    ) -> Result<Job> {
        let job = Job {
            job_reference: Some(JobReference {
                job_id: Some(id.to_string()),
                location: location.map(str::to_string),
                project_id: Some(self.project.clone()),
            }),
            configuration: Some(configuration),
            ..Default::default()
        };
        let ours = job.configuration.clone().unwrap_or_default();
        match self.client.job().insert(&self.project, job).await {
            Ok(job) => Ok(job),
            // Another dispatcher inserted it between our lookup and our insert: use theirs.
            Err(e) if http_status(&e) == Some(409) => {
                let theirs = self.get_job(id, location).await?.ok_or_else(|| {
                    Error::Warehouse(format!(
                        "BigQuery job {id} ({what}) was refused as a duplicate but cannot be found"
                    ))
                })?;
                check_destination(&theirs, &ours)?;
                Ok(theirs)
            }
            Err(e) => Err(bq_error(format!("cannot start BigQuery job {id} ({what})"))(e)),
        }
    }

    /// Polls until the job is DONE; its error, if any, becomes ours.
    async fn wait(
        &self,
        id: &str,
        mut job: Job,
        location: Option<&str>,
        what: &str,
    ) -> Result<Job> {
        let deadline = Instant::now() + self.job_timeout;
        let mut pause = Duration::from_millis(200);
        while job_state(&job) != "DONE" {
            if Instant::now() >= deadline {
                return Err(Error::Warehouse(format!(
                    "BigQuery job {id} ({what}) is still {} after {}s",
                    job_state(&job),
                    self.job_timeout.as_secs()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            job = self.get_job(id, location).await?.ok_or_else(|| {
                Error::Warehouse(format!("BigQuery job {id} ({what}) disappeared"))
            })?;
        }
        match job_failure(&job) {
            None => Ok(job),
            Some(failure) => Err(Error::Warehouse(format!(
                "BigQuery job {id} ({what}) failed: {failure}"
            ))),
        }
    }

    /// Runs job `base` once across calls: waits for an attempt that exists, else inserts the
    /// next. With `count_before`, the table's count is taken first and labels the job.
    async fn run_job(
        &self,
        base: &str,
        what: &str,
        location: Option<&str>,
        mut configuration: JobConfiguration,
        count_before: Option<&str>,
    ) -> Result<Job> {
        let (id, job) = match self.lookup(base, location).await? {
            Lookup::Existing(id, job) => {
                check_destination(&job, &configuration)?;
                tracing::info!(job = %id, what, "job already inserted; waiting for it");
                (id, *job)
            }
            Lookup::Free(id) => {
                if let Some(table) = count_before {
                    let before = self.count_rows(table, location).await?;
                    configuration.labels = Some(HashMap::from([(
                        ROWS_BEFORE_LABEL.to_string(),
                        before.to_string(),
                    )]));
                }
                tracing::info!(job = %id, what, "inserting job");
                let job = self.insert_job(&id, configuration, location, what).await?;
                (id, job)
            }
        };
        self.wait(&id, job, location, what).await
    }

    /// `SELECT COUNT(*)`: exact on BigQuery (from metadata, no bytes billed) and the emulator.
    async fn count_rows(&self, table: &str, location: Option<&str>) -> Result<u64> {
        let full = self.full_name(table);
        // Every part of the name was checked to hold no backtick, so the quoting holds.
        let mut request = QueryRequest::new(format!("SELECT COUNT(*) FROM `{full}`"));
        request.location = location.map(str::to_string);
        request.use_query_cache = Some(false);
        request.timeout_ms = Some(30_000);
        let failed = || format!("cannot count the rows of {full}");
        let mut response = self
            .client
            .job()
            .query(&self.project, request)
            .await
            .map_err(bq_error(failed()))?;
        let deadline = Instant::now() + self.job_timeout;
        // A slow query answers before it is done; ask for its results until it is.
        while !response.job_complete.unwrap_or(false) {
            let id = response
                .job_reference
                .as_ref()
                .and_then(|r| r.job_id.clone())
                .ok_or_else(|| Error::Warehouse(format!("{}: no job to wait for", failed())))?;
            if Instant::now() >= deadline {
                return Err(Error::Warehouse(format!(
                    "{}: query job {id} not done after {}s",
                    failed(),
                    self.job_timeout.as_secs()
                )));
            }
            let parameters = GetQueryResultsParameters {
                location: location.map(str::to_string),
                timeout_ms: Some(10_000),
                ..Default::default()
            };
            response = QueryResponse::from(
                self.client
                    .job()
                    .get_query_results(&self.project, &id, parameters)
                    .await
                    .map_err(bq_error(failed()))?,
            );
        }
        if let Some(error) = response.errors.as_ref().and_then(|e| e.first()) {
            return Err(Error::Warehouse(format!(
                "{}: {}",
                failed(),
                error.message.as_deref().unwrap_or("query failed")
            )));
        }
        let cell = response
            .rows
            .as_ref()
            .and_then(|rows| rows.first())
            .and_then(|row| row.columns.as_ref())
            .and_then(|columns| columns.first())
            .and_then(|cell| cell.value.as_ref());
        // The REST API sends INT64 as a JSON string.
        match cell {
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            _ => None,
        }
        .ok_or_else(|| Error::Warehouse(format!("{}: unexpected answer {cell:?}", failed())))
    }

    /// A load of source files as they lie: BigQuery parses them into the table's columns,
    /// by position for CSV and by name for JSON lines and Parquet.
    fn source_files_job(
        &self,
        table: &str,
        uris: &[String],
        format: &NativeFormat,
        mode: WriteMode,
    ) -> JobConfiguration {
        let mut load = JobConfigurationLoad {
            source_uris: Some(uris.to_vec()),
            destination_table: Some(self.table_ref(table)),
            write_disposition: Some(write_disposition(mode).into()),
            create_disposition: Some("CREATE_NEVER".into()),
            // One bad record fails the job, naming the file and the position.
            max_bad_records: Some(0),
            ..Default::default()
        };
        match format {
            NativeFormat::Csv {
                delimiter,
                quote,
                skip_leading_rows,
                encoding,
            } => {
                load.source_format = Some("CSV".into());
                load.field_delimiter = Some(delimiter.to_string());
                load.quote = Some(quote.to_string());
                load.skip_leading_rows = Some(*skip_leading_rows as i32);
                load.encoding = Some((*encoding).into());
                // The workers' reader accepts line breaks inside quotes; so must this path.
                load.allow_quoted_newlines = Some(true);
            }
            NativeFormat::JsonLines => load.source_format = Some("NEWLINE_DELIMITED_JSON".into()),
            NativeFormat::Parquet => {
                load.source_format = Some("PARQUET".into());
                load.decimal_target_types = Some(DECIMAL_TARGET_TYPES.map(String::from).to_vec());
            }
        }
        JobConfiguration {
            load: Some(load),
            ..Default::default()
        }
    }

    /// A load of staged Parquet parts. `decimalTargetTypes` makes each decimal the column the
    /// type map created: "In the order of NUMERIC, BIGNUMERIC, and STRING, a type is picked if
    /// it is in the specified list and if it supports the precision and the scale" (the
    /// default, `["NUMERIC"]`, would put a decimal(50, 20) into NUMERIC and fail).
    fn load_job(&self, table: &str, uris: &[String], disposition: &str) -> JobConfiguration {
        JobConfiguration {
            load: Some(JobConfigurationLoad {
                source_uris: Some(uris.to_vec()),
                source_format: Some("PARQUET".into()),
                decimal_target_types: Some(DECIMAL_TARGET_TYPES.map(String::from).to_vec()),
                destination_table: Some(self.table_ref(table)),
                write_disposition: Some(disposition.into()),
                // The table was created from the run's schema; a load must not invent one.
                create_disposition: Some("CREATE_NEVER".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Checks the count against the workers' and returns the rows the job added.
    async fn verify(
        &self,
        req: &LoadRequest<'_>,
        job: &Job,
        location: Option<&str>,
    ) -> Result<u64> {
        let after = self.count_rows(req.table, location).await?;
        let loaded = match req.mode {
            WriteMode::Replace => after,
            WriteMode::Append | WriteMode::Merge => {
                let before = rows_before(job)?;
                after.checked_sub(before).ok_or_else(|| {
                    Error::Warehouse(format!(
                        "table {} shrank from {before} to {after} rows around BigQuery job {}",
                        self.full_name(req.table),
                        job_name(job)
                    ))
                })?
            }
        };
        if loaded != req.expected_rows {
            return Err(Error::Warehouse(format!(
                "table {} received {loaded} rows from BigQuery job {}, but the workers reported {}",
                self.full_name(req.table),
                job_name(job),
                req.expected_rows
            )));
        }
        Ok(loaded)
    }

    /// Up to `max_uris_per_job` parts: one load job into the table.
    async fn load_direct(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        location: Option<&str>,
    ) -> Result<u64> {
        let base = job_id(&self.dataset, req.load_key, req.table, "load");
        let what = format!(
            "load of {} parts into {}",
            uris.len(),
            self.full_name(req.table)
        );
        let config = self.load_job(req.table, uris, write_disposition(req.mode));
        let append = (req.mode == WriteMode::Append).then_some(req.table);
        let job = self.run_job(&base, &what, location, config, append).await?;
        self.verify(req, &job, location).await
    }

    /// Loads every part into a fresh staging table, in steps of `max_uris_per_job`, and
    /// checks it holds the rows the workers reported. The staging table holds the parts as
    /// they are: JSON columns as the STRING a Parquet part can fill.
    async fn stage_parts(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
        staging: &str,
    ) -> Result<()> {
        let expires = SystemTime::now() + STAGING_TTL;
        let staged = staging_columns(columns);
        self.ensure_table(staging, &staged, Some(expires), false, location)
            .await?;
        let steps = uris.chunks(self.max_uris_per_job.max(1));
        let count = steps.len();
        for (n, chunk) in steps.enumerate() {
            let base = job_id(
                &self.dataset,
                req.run_id,
                req.table,
                &format!("stage{n:05}"),
            );
            let what = format!(
                "step {} of {count}: {} parts into staging table {}",
                n + 1,
                chunk.len(),
                self.full_name(staging)
            );
            // The first step empties a staging table an earlier attempt may have filled.
            let disposition = if n == 0 {
                "WRITE_TRUNCATE_DATA"
            } else {
                "WRITE_APPEND"
            };
            let config = self.load_job(staging, chunk, disposition);
            self.run_job(&base, &what, location, config, None).await?;
        }
        let staged = self.count_rows(staging, location).await?;
        if staged != req.expected_rows {
            return Err(Error::Warehouse(format!(
                "staging table {} received {staged} rows from {count} load jobs, but the \
                 workers reported {}; table {} left as it was",
                self.full_name(staging),
                req.expected_rows,
                self.full_name(req.table)
            )));
        }
        Ok(())
    }

    /// Stages the parts for the job `step` that moves them on, unless that job was already
    /// inserted: a retried run must not look for a staging table that is dropped once the job
    /// is done. Returns the staging table and the job's base id.
    async fn stage_for(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
        step: &str,
    ) -> Result<(String, String)> {
        let staging = staging_table_name(req.table, req.run_id);
        let base = job_id(&self.dataset, req.load_key, req.table, step);
        if !matches!(self.lookup(&base, location).await?, Lookup::Existing(..)) {
            self.stage_parts(req, uris, columns, location, &staging)
                .await?;
        }
        Ok((staging, base))
    }

    /// Drops a staging table once what it fed has committed; one left behind expires.
    async fn drop_staging(&self, staging: &str) {
        if let Err(e) = self
            .client
            .table()
            .delete(&self.project, &self.dataset, staging)
            .await
            && http_status(&e) != Some(404)
        {
            tracing::warn!(table = %self.full_name(staging), error = %describe(&e), "cannot drop the staging table");
        }
    }

    /// Every part into a staging table, then ONE query job under the job's id (so a retried
    /// run waits for it rather than running it again) that moves the rows into the table with
    /// their JSON parsed: a MERGE, an INSERT, or a transaction that deletes and inserts. Then
    /// the staging table is dropped. Returns the rows loaded (for a merge, those it inserted or
    /// updated).
    async fn load_sql(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
    ) -> Result<u64> {
        let full = self.full_name(req.table);
        let json: Vec<&str> = columns
            .iter()
            .filter(|c| matches!(c.r#type, FieldType::Json))
            .map(|c| c.name.as_str())
            .collect();
        if req.mode == WriteMode::Merge {
            if req.merge_keys.is_empty() {
                return Err(Error::Warehouse(format!(
                    "a merge into {full} needs merge keys"
                )));
            }
            let ordering = req
                .merge_keys
                .iter()
                .map(String::as_str)
                .chain(req.latest_by);
            if let Some(bad) = ordering.into_iter().find(|k| json.contains(k)) {
                return Err(Error::Warehouse(format!(
                    "column {bad} of {full} is JSON, which BigQuery cannot compare: it cannot be a \
                     merge key or the timestamp_column of a merge"
                )));
            }
        }
        let step = if req.mode == WriteMode::Merge {
            "merge"
        } else {
            "sql"
        };
        let (staging, base) = self.stage_for(req, uris, columns, location, step).await?;
        let sql_columns: Vec<SqlColumn> = columns
            .iter()
            .map(|c| SqlColumn {
                name: c.name.clone(),
                json: matches!(c.r#type, FieldType::Json),
            })
            .collect();
        let staged = self.full_name(&staging);
        let (sql, what) = match req.mode {
            WriteMode::Merge => (
                merge_sql(&full, &staged, &sql_columns, req.merge_keys, req.latest_by),
                format!(
                    "merge of {staged} into {full} on {}",
                    req.merge_keys.join(", ")
                ),
            ),
            WriteMode::Append => (
                routes::append_sql(&full, &staged, &sql_columns),
                format!("insert of {staged} into {full}"),
            ),
            WriteMode::Replace => (
                routes::replace_sql(&full, &staged, &sql_columns),
                format!("replace of {full}'s rows by {staged}"),
            ),
        };
        let config = JobConfiguration {
            query: Some(JobConfigurationQuery {
                query: sql,
                use_legacy_sql: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let job = self.run_job(&base, &what, location, config, None).await?;
        let affected = job
            .statistics
            .as_ref()
            .and_then(|s| s.query.as_ref())
            .and_then(|q| q.num_dml_affected_rows.as_deref())
            .and_then(|n| n.parse::<u64>().ok());
        let loaded = match (req.mode, affected) {
            (WriteMode::Replace, _) => {
                let after = self.count_rows(req.table, location).await?;
                (after == req.expected_rows).then_some(after).ok_or_else(|| {
                    Error::Warehouse(format!(
                        "table {full} holds {after} rows after BigQuery job {}, but the workers \
                         reported {}",
                        job_name(&job),
                        req.expected_rows
                    ))
                })?
            }
            (WriteMode::Append, Some(n)) if n != req.expected_rows => {
                return Err(Error::Warehouse(format!(
                    "BigQuery job {} ({what}) inserted {n} rows, but the workers reported {}",
                    job_name(&job),
                    req.expected_rows
                )));
            }
            (_, Some(n)) => n,
            (_, None) => {
                return Err(Error::Warehouse(format!(
                    "BigQuery job {} ({what}) reported no affected rows",
                    job_name(&job)
                )));
            }
        };
        self.drop_staging(&staging).await;
        Ok(loaded)
    }

    /// More parts than one load job takes, appended: load steps into a staging table, check
    /// it, one copy (`WRITE_APPEND` keeps the table's schema), drop it.
    async fn load_in_steps(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
    ) -> Result<u64> {
        let (staging, copy_base) = self.stage_for(req, uris, columns, location, "copy").await?;
        let what = format!(
            "copy of {} into {}",
            self.full_name(&staging),
            self.full_name(req.table)
        );
        let config = JobConfiguration {
            copy: Some(JobConfigurationTableCopy {
                source_table: Some(self.table_ref(&staging)),
                destination_table: Some(self.table_ref(req.table)),
                write_disposition: Some("WRITE_APPEND".into()),
                create_disposition: Some("CREATE_NEVER".into()),
                operation_type: Some("COPY".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let append = (req.mode == WriteMode::Append).then_some(req.table);
        let job = self
            .run_job(&copy_base, &what, location, config, append)
            .await?;
        let loaded = self.verify(req, &job, location).await?;
        self.drop_staging(&staging).await;
        Ok(loaded)
    }
}

#[async_trait]
impl Warehouse for BigQueryWarehouse {
    fn check_table_name(&self, table: &str) -> Result<()> {
        let ok = !table.is_empty()
            && table.len() <= MAX_ID_LEN
            && table
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            return Err(Error::Warehouse(format!(
                "dest_table_name {table:?} must be 1 to {MAX_ID_LEN} letters, digits, '_' or '-' for BigQuery"
            )));
        }
        if table.contains(STAGING_MARK) {
            return Err(Error::Warehouse(format!(
                "dest_table_name {table:?} cannot contain {STAGING_MARK:?}, which marks shardflow's staging tables"
            )));
        }
        Ok(())
    }

    async fn load(&self, req: LoadRequest<'_>) -> Result<LoadOutcome> {
        self.check_table_name(req.table)?;
        let full = self.full_name(req.table);
        if !req.staging.url().starts_with("gs://") {
            return Err(Error::Warehouse(format!(
                "BigQuery loads from gs:// only, but staging is {}; table {full} not loaded",
                req.staging.url()
            )));
        }
        if req.parts.is_empty() {
            return Err(Error::Warehouse(format!(
                "run {} staged no parts for table {full}",
                req.run_id
            )));
        }
        // Before anything moves: a type without a BigQuery column fails the run here.
        let columns = bigquery_schema(req.schema)?;
        let location = self.ensure_dataset_for(Some(req.staging)).await?;
        let location = Some(location.as_str());
        self.ensure_table(req.table, &columns, None, req.allow_new_columns, location)
            .await?;
        let uris: Vec<String> = req.parts.iter().map(|p| req.staging.uri(&p.path)).collect();
        let json_columns = columns.iter().any(|c| matches!(c.r#type, FieldType::Json));
        let route = routes::route(req.mode, uris.len(), self.max_uris_per_job, json_columns);
        tracing::info!(table = %full, parts = uris.len(), ?route, "loading");
        let rows_loaded = match route {
            Route::Direct => self.load_direct(&req, &uris, location).await?,
            Route::StagedCopy => self.load_in_steps(&req, &uris, &columns, location).await?,
            Route::StagedSql => self.load_sql(&req, &uris, &columns, location).await?,
        };
        Ok(LoadOutcome {
            rows_loaded,
            files: uris.len(),
            location: full,
            source_read: None,
        })
    }

    fn loads_gcs_files(&self) -> bool {
        true
    }

    fn column_names(&self) -> fn(&[String]) -> Vec<String> {
        names::bigquery_column_names
    }

    /// The dataset's location, or the one it will be created in; None when neither is known.
    async fn location(&self) -> Result<Option<String>> {
        match self
            .client
            .dataset()
            .get(&self.project, &self.dataset)
            .await
        {
            Ok(dataset) => Ok(dataset.location),
            Err(e) if http_status(&e) == Some(404) => Ok(self.create_in.clone()),
            Err(e) => Err(bq_error(format!(
                "cannot read dataset {}.{}",
                self.project, self.dataset
            ))(e)),
        }
    }

    async fn load_source_files(&self, req: SourceFilesLoad<'_>) -> Result<LoadOutcome> {
        self.check_table_name(req.table)?;
        let full = self.full_name(req.table);
        if let Some(other) = req.uris.iter().find(|u| !u.starts_with("gs://")) {
            return Err(Error::Warehouse(format!(
                "BigQuery loads source files from gs:// only, not {other}; table {full} not loaded"
            )));
        }
        if req.uris.len() > self.max_uris_per_job {
            return Err(Error::Warehouse(format!(
                "{} source files are more than one BigQuery load job takes ({}); table {full} \
                 not loaded",
                req.uris.len(),
                self.max_uris_per_job
            )));
        }
        let columns = bigquery_schema(req.schema)?;
        let location = self.ensure_dataset().await?;
        let location = Some(location.as_str());
        self.ensure_table(req.table, &columns, None, false, location)
            .await?;
        let base = job_id(&self.dataset, req.load_key, req.table, "files");
        let what = format!("load of {} source files into {full}", req.uris.len());
        let config = self.source_files_job(req.table, req.uris, &req.format, req.mode);
        let append = (req.mode == WriteMode::Append).then_some(req.table);
        let job = self.run_job(&base, &what, location, config, append).await?;
        let after = self.count_rows(req.table, location).await?;
        let loaded = match req.mode {
            WriteMode::Replace => after,
            WriteMode::Append | WriteMode::Merge => {
                let before = rows_before(&job)?;
                after.checked_sub(before).ok_or_else(|| {
                    Error::Warehouse(format!(
                        "table {full} shrank from {before} to {after} rows around BigQuery job {}",
                        job_name(&job)
                    ))
                })?
            }
        };
        // No worker counted these rows. The table cannot have gained more than the job read
        // (more means another writer appended meanwhile). bqemulator reports the table's
        // total as the job's output rows, hence no equality check.
        let reported = job
            .statistics
            .as_ref()
            .and_then(|s| s.load.as_ref())
            .and_then(|l| l.output_rows.as_ref())
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(reported) = reported
            && reported < loaded
        {
            return Err(Error::Warehouse(format!(
                "table {full} gained {loaded} rows, but BigQuery job {} read only {reported} from \
                 the source files: another writer appended meanwhile",
                job_name(&job)
            )));
        }
        Ok(LoadOutcome {
            rows_loaded: loaded,
            files: req.uris.len(),
            location: full,
            source_read: source_read(&job),
        })
    }
}

#[cfg(test)]
mod tests;
