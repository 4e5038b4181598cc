//! The BigQuery warehouse: ONE load job per table per run over the Parquet parts staged on GCS,
//! with deterministic job ids that are looked up (`jobs.get`) before every insert, so a retried
//! or redelivered finalisation never loads twice.
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
//! | UInt64                                             |                 | NUMERIC       |
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
//! | any other decimal, any other type                  |                 | error naming the column |
//!
//! A nullable field is `NULLABLE`, any other `REQUIRED`. An existing table must have the same
//! set of column names and types, or the load is refused before any job runs (schema drift).
//!
//! # Loads
//!
//! Job ids are [`job_id`]: `shardflow_{run}_{table}_{step}_{digest}`, the digest covering the
//! dataset too, since job ids are unique per project.
//!
//! Up to [`BigQueryWarehouse::max_uris_per_job`] parts (BigQuery's limit is 10,000 URIs per
//! job): one load job (step `load`) straight into the table, `WRITE_TRUNCATE` for a replace
//! (atomic in BigQuery) or `WRITE_APPEND`, `CREATE_NEVER`.
//!
//! More parts: load jobs (steps `stage00000`, `stage00001`, …) of at most that many URIs into
//! the staging table `{table}__shardflow_{run}` (the first truncates it, the rest append), a
//! count check of the staging table, then ONE copy job (step `copy`) into the table (truncate or
//! append), then the staging table is dropped. A mismatch found on the staging table leaves the
//! destination untouched.
//!
//! Every job is looked up before it is inserted: a job that exists (and writes the same table)
//! is waited for and its outcome used. A job that FAILED changed nothing (BigQuery jobs are
//! atomic) and its id can never be reused, so the next attempt takes `{id}_retry1`,
//! `{id}_retry2`, …; the whole chain is looked up each time, so a successful attempt is never
//! repeated.
//!
//! # Verifying the count
//!
//! The count comes from `SELECT COUNT(*)` (free on BigQuery: answered from metadata), which the
//! emulator answers exactly too. A replace must leave exactly `expected_rows` in the table (a
//! direct replace is checked after its job has committed; in steps, before the copy). For an
//! append, the count taken just before the job was inserted travels with the job as the label
//! `shardflow_rows_before`, so a retried call that finds the job already done still checks
//! `after − before`. Not used, because bqemulator 1.4 gets them wrong:
//! `statistics.load.outputRows` (it reports the table's total, not the rows the job added) and
//! `tables.get numRows` (not updated by a copy into an existing table).

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
use crate::{Error, Result};

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
    /// Source URIs per load job. Above it, parts are loaded into a staging table in steps and
    /// copied into the table once.
    pub max_uris_per_job: usize,
    /// How long to wait for one job (or one count query) to finish.
    pub job_timeout: Duration,
}

/// The emulator needs no credentials; it ignores the empty bearer token.
#[derive(Clone)]
struct Anonymous;

#[async_trait]
impl Authenticator for Anonymous {
    async fn access_token(&self) -> std::result::Result<String, BQError> {
        Ok(String::new())
    }
}

impl BigQueryWarehouse {
    /// A client for `project`, loading into `dataset`: the emulator at `BIGQUERY_EMULATOR_HOST`
    /// (anonymous) when it is set, else BigQuery with application default credentials.
    pub async fn connect(project: &str, dataset: &str) -> Result<Self> {
        check_project(project)?;
        check_dataset(dataset)?;
        let mut builder = ClientBuilder::new();
        let client = match bigquery_emulator_url() {
            Some(base) => {
                builder
                    .with_v2_base_url(format!("{base}/bigquery/v2"))
                    .build_from_authenticator(Arc::new(Anonymous))
                    .await
            }
            None => builder.build_from_application_default_credentials().await,
        }
        .map_err(|e| {
            Error::Warehouse(format!(
                "cannot create a BigQuery client for project {project}: {}",
                describe(&e)
            ))
        })?;
        Self::from_client(client, project, dataset)
    }

    /// Wraps a client built elsewhere (other credentials, a custom HTTP client).
    pub fn from_client(client: Client, project: &str, dataset: &str) -> Result<Self> {
        check_project(project)?;
        check_dataset(dataset)?;
        Ok(BigQueryWarehouse {
            client,
            project: project.to_string(),
            dataset: dataset.to_string(),
            max_uris_per_job: DEFAULT_MAX_URIS_PER_JOB,
            job_timeout: Duration::from_secs(6 * 3600),
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
        // 20 digits: more than INT64 holds, exact in NUMERIC.
        DataType::UInt64 => FieldType::Numeric,
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

fn write_disposition(mode: WriteMode) -> &'static str {
    match mode {
        WriteMode::Replace => "WRITE_TRUNCATE",
        // A merge never loads into the table itself; its staging table is appended to.
        WriteMode::Append | WriteMode::Merge => "WRITE_APPEND",
    }
}

/// A column name as a GoogleSQL quoted identifier.
fn quoted(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// The one statement of a merge: of the staged rows sharing a key, the one with the greatest
/// `latest_by` (any one without it) replaces the table's rows of that key, or is inserted.
/// Keys match with `IS NOT DISTINCT FROM`, so a NULL key part is a value like any other.
pub fn merge_sql(
    target: &str,
    staged: &str,
    columns: &[String],
    keys: &[String],
    latest_by: Option<&str>,
) -> String {
    let partition = keys
        .iter()
        .map(|k| quoted(k))
        .collect::<Vec<_>>()
        .join(", ");
    let order = latest_by.map_or("1".to_string(), |c| format!("{} DESC", quoted(c)));
    let on = keys
        .iter()
        .map(|k| format!("T.{0} IS NOT DISTINCT FROM S.{0}", quoted(k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| !keys.contains(c))
        .map(|c| format!("{0} = S.{0}", quoted(c)))
        .collect();
    let matched = if updates.is_empty() {
        String::new()
    } else {
        format!(" WHEN MATCHED THEN UPDATE SET {}", updates.join(", "))
    };
    let names = columns.iter().map(|c| quoted(c)).collect::<Vec<_>>();
    let values = columns
        .iter()
        .map(|c| format!("S.{}", quoted(c)))
        .collect::<Vec<_>>();
    format!(
        "MERGE `{target}` AS T USING (SELECT * FROM `{staged}` WHERE TRUE QUALIFY ROW_NUMBER() \
         OVER (PARTITION BY {partition} ORDER BY {order}) = 1) AS S ON {on}{matched} \
         WHEN NOT MATCHED THEN INSERT ({}) VALUES ({})",
        names.join(", "),
        values.join(", ")
    )
}

/// Whether a job is already there to be waited for, or which id the next attempt takes.
enum Lookup {
    Existing(String, Box<Job>),
    Free(String),
}

impl BigQueryWarehouse {
    /// Creates the dataset when missing; returns its location, which jobs need.
    async fn ensure_dataset(&self) -> Result<Option<String>> {
        let what = || format!("dataset {}.{}", self.project, self.dataset);
        match self
            .client
            .dataset()
            .get(&self.project, &self.dataset)
            .await
        {
            Ok(dataset) => return Ok(dataset.location),
            Err(e) if http_status(&e) == Some(404) => {}
            Err(e) => return Err(bq_error(format!("cannot read {}", what()))(e)),
        }
        let created = self
            .client
            .dataset()
            .create(Dataset::new(&self.project, &self.dataset))
            .await;
        match created {
            Ok(dataset) => Ok(dataset.location),
            // Someone else created it meanwhile.
            Err(e) if http_status(&e) == Some(409) => self
                .client
                .dataset()
                .get(&self.project, &self.dataset)
                .await
                .map(|d| d.location)
                .map_err(bq_error(format!("cannot read {}", what()))),
            Err(e) => Err(bq_error(format!("cannot create {}", what()))(e)),
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
            NativeFormat::Parquet => load.source_format = Some("PARQUET".into()),
        }
        JobConfiguration {
            load: Some(load),
            ..Default::default()
        }
    }

    fn load_job(&self, table: &str, uris: &[String], disposition: &str) -> JobConfiguration {
        JobConfiguration {
            load: Some(JobConfigurationLoad {
                source_uris: Some(uris.to_vec()),
                source_format: Some("PARQUET".into()),
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
    /// checks it holds the rows the workers reported.
    async fn stage_parts(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
        staging: &str,
    ) -> Result<()> {
        let expires = SystemTime::now() + STAGING_TTL;
        self.ensure_table(staging, columns, Some(expires), false, location)
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
            let disposition = if n == 0 {
                "WRITE_TRUNCATE"
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

    /// A merge: every part into a staging table, then one MERGE statement (a query job under
    /// the job's id, so a retried run waits for it rather than merging again), then the
    /// staging table is dropped. Returns the rows the MERGE inserted or updated.
    async fn load_merge(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
    ) -> Result<u64> {
        if req.merge_keys.is_empty() {
            return Err(Error::Warehouse(format!(
                "a merge into {} needs merge keys",
                self.full_name(req.table)
            )));
        }
        let (staging, merge_base) = self
            .stage_for(req, uris, columns, location, "merge")
            .await?;
        let names: Vec<String> = req
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let sql = merge_sql(
            &self.full_name(req.table),
            &self.full_name(&staging),
            &names,
            req.merge_keys,
            req.latest_by,
        );
        let what = format!(
            "merge of {} into {} on {}",
            self.full_name(&staging),
            self.full_name(req.table),
            req.merge_keys.join(", ")
        );
        let config = JobConfiguration {
            query: Some(JobConfigurationQuery {
                query: sql,
                use_legacy_sql: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let job = self
            .run_job(&merge_base, &what, location, config, None)
            .await?;
        self.drop_staging(&staging).await;
        job.statistics
            .as_ref()
            .and_then(|s| s.query.as_ref())
            .and_then(|q| q.num_dml_affected_rows.as_deref())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::Warehouse(format!(
                    "BigQuery job {} ({what}) reported no affected rows",
                    job_name(&job)
                ))
            })
    }

    /// More parts: load steps into a staging table, check it, one copy, drop it.
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
                write_disposition: Some(write_disposition(req.mode).into()),
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
        let location = self.ensure_dataset().await?;
        let location = location.as_deref();
        self.ensure_table(req.table, &columns, None, req.allow_new_columns, location)
            .await?;
        let uris: Vec<String> = req.parts.iter().map(|p| req.staging.uri(&p.path)).collect();
        let rows_loaded = if req.mode == WriteMode::Merge {
            self.load_merge(&req, &uris, &columns, location).await?
        } else if uris.len() <= self.max_uris_per_job {
            self.load_direct(&req, &uris, location).await?
        } else {
            self.load_in_steps(&req, &uris, &columns, location).await?
        };
        Ok(LoadOutcome {
            rows_loaded,
            files: uris.len(),
            location: full,
        })
    }

    fn loads_gcs_files(&self) -> bool {
        true
    }

    async fn load_source_files(&self, req: SourceFilesLoad<'_>) -> Result<LoadOutcome> {
        self.check_table_name(req.table)?;
        let full = self.full_name(req.table);
        if let Some(other) = req.uris.iter().find(|u| !u.starts_with("gs://")) {
            return Err(Error::Warehouse(format!(
                "BigQuery loads source files from gs:// only, not {other}; table {full} not loaded"
            )));
        }
        let columns = bigquery_schema(req.schema)?;
        let location = self.ensure_dataset().await?;
        let location = location.as_deref();
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::TimeUnit;

    fn nullable(dt: DataType) -> Field {
        Field::new("c", dt, true)
    }

    fn with_source_type(dt: DataType, source_type: &str) -> Field {
        nullable(dt).with_metadata(HashMap::from([(
            SOURCE_TYPE_KEY.to_string(),
            source_type.to_string(),
        )]))
    }

    #[test]
    fn type_map_every_entry() {
        let tz = Some("UTC".into());
        let cases = [
            (nullable(DataType::Boolean), "BOOL"),
            (nullable(DataType::Int8), "INT64"),
            (nullable(DataType::Int16), "INT64"),
            (nullable(DataType::Int32), "INT64"),
            (nullable(DataType::Int64), "INT64"),
            (nullable(DataType::UInt8), "INT64"),
            (nullable(DataType::UInt16), "INT64"),
            (nullable(DataType::UInt32), "INT64"),
            (nullable(DataType::UInt64), "NUMERIC"),
            (nullable(DataType::Float32), "FLOAT64"),
            (nullable(DataType::Float64), "FLOAT64"),
            (nullable(DataType::Utf8), "STRING"),
            (nullable(DataType::LargeUtf8), "STRING"),
            (with_source_type(DataType::Utf8, "uuid"), "STRING"),
            (with_source_type(DataType::Utf8, "numeric"), "STRING"),
            (with_source_type(DataType::Utf8, "json"), "JSON"),
            (with_source_type(DataType::Utf8, "jsonb"), "JSON"),
            (with_source_type(DataType::LargeUtf8, "json"), "JSON"),
            (with_source_type(DataType::LargeUtf8, "jsonb"), "JSON"),
            (nullable(DataType::Binary), "BYTES"),
            (nullable(DataType::LargeBinary), "BYTES"),
            (nullable(DataType::Date32), "DATE"),
            (
                nullable(DataType::Timestamp(TimeUnit::Microsecond, None)),
                "DATETIME",
            ),
            (
                nullable(DataType::Timestamp(TimeUnit::Millisecond, None)),
                "DATETIME",
            ),
            (
                nullable(DataType::Timestamp(TimeUnit::Microsecond, tz.clone())),
                "TIMESTAMP",
            ),
            (
                nullable(DataType::Timestamp(
                    TimeUnit::Nanosecond,
                    Some("+02:00".into()),
                )),
                "TIMESTAMP",
            ),
            (nullable(DataType::Time64(TimeUnit::Microsecond)), "TIME"),
            (nullable(DataType::Time64(TimeUnit::Nanosecond)), "TIME"),
            (nullable(DataType::Decimal128(12, 2)), "NUMERIC"),
            (nullable(DataType::Decimal32(9, 2)), "NUMERIC"),
            (nullable(DataType::Decimal64(18, 4)), "NUMERIC"),
            (nullable(DataType::Decimal256(20, 0)), "NUMERIC"),
            (nullable(DataType::Decimal128(38, 10)), "BIGNUMERIC"),
            (nullable(DataType::Decimal256(48, 10)), "BIGNUMERIC"),
            (nullable(DataType::Decimal256(76, 38)), "BIGNUMERIC"),
        ];
        for (field, want) in cases {
            assert_eq!(
                bigquery_type(&field).unwrap(),
                (want, "NULLABLE"),
                "{} {:?}",
                field.data_type(),
                field.metadata()
            );
        }
    }

    #[test]
    fn decimal_bounds() {
        let ty = |p, s| bigquery_type(&nullable(DataType::Decimal256(p, s))).map(|t| t.0);
        // NUMERIC: scale <= 9 and <= 29 integer digits.
        assert_eq!(ty(38, 9).unwrap(), "NUMERIC");
        assert_eq!(ty(29, 0).unwrap(), "NUMERIC");
        assert_eq!(ty(30, 0).unwrap(), "BIGNUMERIC");
        assert_eq!(ty(20, 10).unwrap(), "BIGNUMERIC");
        // BIGNUMERIC: scale <= 38 and <= 38 integer digits.
        assert_eq!(ty(38, 0).unwrap(), "BIGNUMERIC");
        assert_eq!(ty(76, 38).unwrap(), "BIGNUMERIC");
        for (p, s) in [(39, 0), (76, 37), (40, 39), (10, -2)] {
            let err = ty(p, s).unwrap_err().to_string();
            assert!(
                err.contains("column \"c\"") && err.contains("no exact BigQuery type"),
                "decimal({p},{s}): {err}"
            );
        }
    }

    #[test]
    fn unmapped_types_name_the_column() {
        for dt in [
            DataType::Null,
            DataType::Float16,
            DataType::Date64,
            DataType::Time32(TimeUnit::Second),
            DataType::Utf8View,
            DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
        ] {
            let field = Field::new("weird", dt.clone(), true);
            let err = bigquery_type(&field).unwrap_err().to_string();
            assert!(
                err.starts_with("warehouse: column \"weird\": Arrow type"),
                "{dt}: {err}"
            );
        }
    }

    #[test]
    fn nullability_sets_the_mode() {
        let required = Field::new("id", DataType::Int64, false);
        assert_eq!(bigquery_type(&required).unwrap(), ("INT64", "REQUIRED"));
        let column = bigquery_field(&required).unwrap();
        assert_eq!(column.name, "id");
        assert_eq!(column.mode.as_deref(), Some("REQUIRED"));
        assert_eq!(type_name(&column.r#type), "INT64");
        // What goes on the wire is the standard SQL name.
        let doc = bigquery_field(&with_source_type(DataType::Utf8, "jsonb")).unwrap();
        assert_eq!(
            serde_json::to_value(&doc).unwrap(),
            serde_json::json!({"name": "c", "type": "JSON", "mode": "NULLABLE"})
        );
    }

    #[test]
    fn legacy_type_names_fold() {
        for (legacy, standard) in [
            ("INTEGER", "INT64"),
            ("FLOAT", "FLOAT64"),
            ("BOOLEAN", "BOOL"),
            ("RECORD", "STRUCT"),
            ("BIGNUMERIC", "BIGNUMERIC"),
        ] {
            let ty: FieldType = serde_json::from_value(serde_json::json!(legacy)).unwrap();
            assert_eq!(type_name(&ty), standard);
        }
    }

    fn column(name: &str, ty: FieldType) -> TableFieldSchema {
        TableFieldSchema::new(name, ty)
    }

    #[test]
    fn schema_drift_names_the_columns() {
        let existing = [
            column("id", FieldType::Integer),
            column("Name", FieldType::String),
            column("gone", FieldType::Date),
            column("amount", FieldType::Numeric),
        ];
        let same = [
            column("amount", FieldType::Numeric),
            column("id", FieldType::Int64),
            column("name", FieldType::String),
            column("gone", FieldType::Date),
        ];
        let check = |staged: &[TableFieldSchema], allow| {
            super::super::check_columns(
                "p.d.t",
                &named_types(&existing),
                &named_types(staged),
                allow,
            )
        };
        check(&same, false).unwrap();
        let staged = [
            column("id", FieldType::Int64),
            column("name", FieldType::String),
            column("amount", FieldType::Bignumeric),
            column("extra", FieldType::Json),
        ];
        let err = check(&staged, true).unwrap_err().to_string();
        assert_eq!(
            err,
            "warehouse: schema drift: table p.d.t exists with other columns than the staged \
             parts (added: extra JSON; removed: gone DATE; changed: amount NUMERIC -> BIGNUMERIC); \
             nothing was loaded"
        );
        // schema_policy "add_columns": new columns are added, missing ones load as NULL.
        let widened = [
            column("id", FieldType::Int64),
            column("name", FieldType::String),
            column("amount", FieldType::Numeric),
            column("extra", FieldType::Json),
        ];
        check(&widened, true).unwrap();
        assert_eq!(
            check(&widened, false).unwrap_err().to_string(),
            "warehouse: schema drift: table p.d.t exists with other columns than the staged \
             parts (added: extra JSON; removed: gone DATE); nothing was loaded"
        );
    }

    #[test]
    fn bigquery_url() {
        assert_eq!(
            parse_bigquery_url("bigquery://test-proj/raw_data").unwrap(),
            ("test-proj".to_string(), "raw_data".to_string())
        );
        assert_eq!(
            parse_bigquery_url("bigquery://example.com:proj/raw_data/").unwrap(),
            ("example.com:proj".to_string(), "raw_data".to_string())
        );
        for bad in [
            "bq://p/d",
            "bigquery://p",
            "bigquery:///d",
            "bigquery://p/",
            "bigquery://p/d-x",
            "bigquery://p/d/e",
            "bigquery://p`x/d",
        ] {
            let err = parse_bigquery_url(bad).unwrap_err().to_string();
            assert!(err.starts_with("warehouse: "), "{bad}: {err}");
        }
    }

    #[test]
    fn emulator_host_with_or_without_scheme() {
        for (host, want) in [
            ("127.0.0.1:9050", Some("http://127.0.0.1:9050")),
            ("http://127.0.0.1:9050", Some("http://127.0.0.1:9050")),
            ("http://127.0.0.1:9050/", Some("http://127.0.0.1:9050")),
            ("https://bq.local", Some("https://bq.local")),
            ("  ", None),
        ] {
            assert_eq!(emulator_base_url(host).as_deref(), want, "{host:?}");
        }
    }

    #[test]
    fn job_ids_are_deterministic_and_clean() {
        let id = job_id("raw_data", "run-42", "orders", "load");
        assert!(id.starts_with("shardflow_run-42_orders_load_"), "{id}");
        assert_eq!(id.len(), "shardflow_run-42_orders_load_".len() + 12);
        assert_eq!(id, job_id("raw_data", "run-42", "orders", "load"));
        let valid = |id: &str| {
            id.len() <= MAX_ID_LEN
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        // Every input tells ids apart: the dataset (job ids are per project), the run, the
        // table, the step, and names that clean or split alike.
        let others = [
            job_id("other", "run-42", "orders", "load"),
            job_id("raw_data", "run-43", "orders", "load"),
            job_id("raw_data", "run-42", "orders2", "load"),
            job_id("raw_data", "run-42", "orders", "copy"),
            job_id("raw_data", "run/42", "orders", "load"),
            job_id("raw_data", "run", "42_orders", "load"),
        ];
        for other in &others {
            assert!(valid(other), "{other}");
            assert_ne!(&id, other);
        }
        assert!(
            job_id("d", "2024/01/02 é", "orders", "stage00002")
                .starts_with("shardflow_2024_01_02___orders_stage00002_")
        );
        // Long names are cut, leaving room for the retry suffix.
        let long = job_id("d", &"r".repeat(900), &"t".repeat(1024), "copy");
        assert!(long.len() <= MAX_JOB_BASE_LEN, "{}", long.len());
        assert!(valid(&attempt_id(&long, MAX_ATTEMPTS)));
        assert_ne!(
            long,
            job_id("d", &"r".repeat(900), &"t".repeat(1023), "copy")
        );
        assert_eq!(attempt_id("x", 0), "x");
        assert_eq!(attempt_id("x", 2), "x_retry2");
    }

    #[test]
    fn a_job_under_our_id_must_write_our_table() {
        let load = |dataset: &str| JobConfiguration {
            load: Some(JobConfigurationLoad {
                destination_table: Some(TableReference::new("p", dataset, "t")),
                ..Default::default()
            }),
            ..Default::default()
        };
        let job = |dataset: &str| Job {
            job_reference: Some(JobReference {
                job_id: Some("j".into()),
                ..Default::default()
            }),
            configuration: Some(load(dataset)),
            ..Default::default()
        };
        check_destination(&job("d"), &load("d")).unwrap();
        assert_eq!(
            check_destination(&job("e"), &load("d"))
                .unwrap_err()
                .to_string(),
            "warehouse: BigQuery job j already exists but writes p.e.t, not p.d.t; not using it"
        );
    }

    #[test]
    fn staging_table_names() {
        assert_eq!(staging_table_name("orders", "42"), "orders__shardflow_42");
        let s = staging_table_name("orders", "run-42");
        assert!(s.starts_with("orders__shardflow_run_42_"), "{s}");
        assert_ne!(s, staging_table_name("orders", "run_42"));
        let long = staging_table_name(&"t".repeat(1024), "42");
        assert!(long.len() <= MAX_ID_LEN);
    }

    async fn offline_warehouse() -> BigQueryWarehouse {
        let client = ClientBuilder::new()
            .with_v2_base_url("http://127.0.0.1:9/bigquery/v2".into())
            .build_from_authenticator(Arc::new(Anonymous))
            .await
            .unwrap();
        BigQueryWarehouse::from_client(client, "p", "d").unwrap()
    }

    #[tokio::test]
    async fn table_names() {
        let wh = offline_warehouse().await;
        wh.check_table_name("orders_2024-01").unwrap();
        for bad in ["", "a.b", "a`b", "naïve", "x__shardflow_1"] {
            assert!(wh.check_table_name(bad).is_err(), "{bad:?}");
        }
        assert!(wh.check_table_name(&"t".repeat(1025)).is_err());
    }

    // -----------------------------------------------------------------------------------------
    // Against bqemulator and fake-gcs-server (tests/emulators.sh)
    // -----------------------------------------------------------------------------------------

    // `&[0..4]` is one shard holding ids 0 to 3, not a list of ids.
    #[allow(clippy::single_range_in_vec_init)]
    mod emulated {
        use std::ops::Range;

        use arrow::array::{
            ArrayRef, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float64Array,
            Int64Array, StringArray, TimestampMicrosecondArray,
        };
        use arrow::datatypes::SchemaRef;
        use arrow::record_batch::RecordBatch;
        use object_store::ObjectStoreExt;
        use serde_json::Value;

        use super::*;
        use crate::gcs::tests::emulator_bucket;
        use crate::messages::StagedFile;
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
        }

        /// A fresh bucket and dataset, so tests run in parallel.
        async fn setup() -> Env {
            let project = require_emulators();
            let id = uuid::Uuid::new_v4().simple().to_string();
            let bucket = emulator_bucket().await;
            let staging = Staging::from_url(&format!("gs://{bucket}/stage")).unwrap();
            let wh = BigQueryWarehouse::connect(&project, &format!("sf_test_{id}"))
                .await
                .unwrap();
            Env {
                wh,
                staging,
                schema: test_schema(),
            }
        }

        fn test_schema() -> SchemaRef {
            let jsonb = HashMap::from([(SOURCE_TYPE_KEY.to_string(), "jsonb".to_string())]);
            let utc = Some("UTC".into());
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
                Field::new("doc", DataType::Utf8, true).with_metadata(jsonb),
                Field::new("amount", DataType::Decimal128(12, 2), true),
                Field::new(
                    "seen_local",
                    DataType::Timestamp(TimeUnit::Microsecond, None),
                    true,
                ),
                Field::new(
                    "seen_utc",
                    DataType::Timestamp(TimeUnit::Microsecond, utc),
                    true,
                ),
                Field::new("day", DataType::Date32, true),
                Field::new("ok", DataType::Boolean, true),
                Field::new("score", DataType::Float64, true),
                Field::new("raw", DataType::Binary, true),
            ]))
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
                        (i % 4 != 3)
                            .then_some(if i % 2 == 0 { 1 } else { -1 } * (i * 100 + 5) as i128)
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
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(ids.clone())),
                Arc::new(name),
                Arc::new(doc),
                Arc::new(amount),
                Arc::new(seen_local),
                Arc::new(seen_utc),
                Arc::new(day),
                Arc::new(ok),
                Arc::new(score),
                Arc::new(raw),
            ];
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
            let response = env
                .wh
                .client()
                .job()
                .query(env.wh.project(), QueryRequest::new(sql))
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
            let day =
                chrono::NaiveDate::from_ymd_opt(2024, 1, 2).unwrap() + chrono::Days::new(i as u64);
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

        const READ_BACK: &str = "SELECT id, name, TO_JSON_STRING(doc), CAST(amount * 100 AS INT64), \
             CAST(seen_local AS STRING), CAST(seen_utc AS STRING), day, ok, score, TO_BASE64(raw)";

        async fn read_back(env: &Env, table: &str) -> Vec<Vec<Value>> {
            let full = env.wh.full_name(table);
            query(env, &format!("{READ_BACK} FROM `{full}` ORDER BY id")).await
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
            let env = setup().await;
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
            .map(|(n, t, m)| (n.to_string(), t, m.to_string()));
            assert_eq!(columns, want);
            let rows = read_back(&env, "people").await;
            assert_eq!(rows, (0..7).map(expected_row).collect::<Vec<_>>());
            // JSON is stored as JSON, not as text.
            let full = env.wh.full_name("people");
            let tags = query(
                &env,
                &format!("SELECT JSON_VALUE(doc, '$.tags[1]') FROM `{full}` WHERE id = 3"),
            )
            .await;
            assert_eq!(tags, vec![vec![text("b")]]);
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
                (2..7).map(expected_row).collect::<Vec<_>>()
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
                (0..7).map(expected_row).collect::<Vec<_>>()
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
            columns[1] = Arc::new(ids.clone().map(|i| Some(name(i))).collect::<StringArray>());
            if let Some(day) = day {
                columns[6] = Arc::new(ids.map(|_| Some(day)).collect::<Date32Array>());
            }
            RecordBatch::try_new(schema.clone(), columns).unwrap()
        }

        /// Stages one real Parquet part per batch at the workers' paths, written as the
        /// workers write them: through `Staging`'s store, over the GCS JSON API.
        async fn stage_batches(env: &Env, run: &str, batches: Vec<RecordBatch>) -> Vec<StagedFile> {
            let mut parts = Vec::new();
            for (n, b) in batches.into_iter().enumerate() {
                let stream: crate::source::BatchStream =
                    Box::pin(futures::stream::iter(vec![Ok(b)]));
                parts.extend(
                    write_parts(
                        env.staging.store(),
                        run,
                        &format!("shard-{n}"),
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

        #[test]
        fn merge_statement() {
            let columns = ["id", "re`gion", "v", "at"].map(String::from);
            let keys = ["id", "re`gion"].map(String::from);
            assert_eq!(
                merge_sql("p.d.t", "p.d.s", &columns, &keys, Some("at")),
                "MERGE `p.d.t` AS T USING (SELECT * FROM `p.d.s` WHERE TRUE QUALIFY ROW_NUMBER() \
                 OVER (PARTITION BY `id`, `re\\`gion` ORDER BY `at` DESC) = 1) AS S ON \
                 T.`id` IS NOT DISTINCT FROM S.`id` AND T.`re\\`gion` IS NOT DISTINCT FROM S.`re\\`gion` \
                 WHEN MATCHED THEN UPDATE SET `v` = S.`v`, `at` = S.`at` \
                 WHEN NOT MATCHED THEN INSERT (`id`, `re\\`gion`, `v`, `at`) VALUES (S.`id`, S.`re\\`gion`, S.`v`, S.`at`)"
            );
            // Only keys: nothing to update, new keys are inserted.
            let sql = merge_sql("p.d.t", "p.d.s", &keys, &keys, None);
            assert!(!sql.contains("WHEN MATCHED"), "{sql}");
            assert!(sql.contains("ORDER BY 1"), "{sql}");
        }

        #[tokio::test]
        async fn merge_replaces_changed_keys_with_their_latest_row_once() {
            let env = setup().await;
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
            let mut want: Vec<Vec<Value>> = (0..7).map(expected_row).collect();
            for (i, row) in want.iter_mut().enumerate().skip(3) {
                row[1] = text(format!("v2 {i}"));
            }
            assert_eq!(read_back(&env, "people").await, want);
            // The staging table is gone; the same merge again finds its job and changes nothing.
            let staging = staging_table_name("people", "r2");
            assert!(env.wh.get_table(&staging).await.unwrap().is_none());
            assert_eq!(env.wh.load(merge(&changes)).await.unwrap(), outcome);
            assert_eq!(read_back(&env, "people").await, want);
            // A merge whose parts hold other counts than reported touches nothing.
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
                (0..7).map(expected_row).collect::<Vec<_>>()
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
                    "WRITE_TRUNCATE"
                } else {
                    "WRITE_APPEND"
                };
                assert_eq!(load.write_disposition.as_deref(), Some(want));
            }
            assert!(job(&env, "r1", "big", "stage00003").await.is_none());
            assert!(job(&env, "r1", "big", "load").await.is_none());
            let copy = job(&env, "r1", "big", "copy").await.unwrap();
            assert_eq!(job_state(&copy), "DONE");
            let copy = copy.configuration.unwrap().copy.unwrap();
            assert_eq!(copy.source_table.unwrap().table_id, staging);
            assert_eq!(copy.destination_table.unwrap().table_id, "big");
            assert_eq!(copy.write_disposition.as_deref(), Some("WRITE_TRUNCATE"));
            assert!(env.wh.get_table(&staging).await.unwrap().is_none());

            // Retried after the staging table is gone: the copy is found, nothing runs again.
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
            let parts = stage(&env, "r1", &[0..4]).await;
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

            let more = stage(&env, "r2", &[4..6]).await;
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
            let steps = stage(&env, "r3", &[0..1, 1..3]).await;
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
            let err = env
                .wh
                .load(request(&env, "people", "r1", &parts, WriteMode::Replace, 5))
                .await
                .unwrap_err()
                .to_string();
            let id = job_id(env.wh.dataset(), "r1", "people", "load");
            let prefix = format!(
                "warehouse: BigQuery job {id} (load of 2 parts into {}) failed: invalid: ",
                env.wh.full_name("people")
            );
            assert!(err.starts_with(&prefix), "{err}");
            assert!(err.contains(&damaged), "{err}");

            // Fixed and retried: the failed id stays failed, the next attempt loads once. (A
            // replace, because bqemulator keeps the rows of the parts before a bad one, where
            // BigQuery's failed job changes nothing.)
            let fixed = stage(&env, "r1", &[0..2, 2..5]).await;
            assert_eq!(fixed[1].path, damaged);
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
    }
}
