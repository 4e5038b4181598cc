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
//! emulator answers exactly too. Before any job, the parts' own row counts must add up to
//! `expected_rows`. A replace must leave exactly `expected_rows` in the table (a direct replace
//! is checked after its job has committed; in steps, before the final job). For
//! an append, the count taken just before the job was inserted travels with the job as the
//! label `shardflow_rows_before`, so a retried call that finds the job already done still
//! checks `after − before`; an `INSERT` reports its own rows (`numDmlAffectedRows`). Not used,
//! because bqemulator 1.4 gets them wrong: `statistics.load.outputRows` (it reports the table's
//! total, not the rows the job added) and `tables.get numRows` (not updated by a copy into an
//! existing table).

mod catalog;
mod fast_path;
mod jobs;
mod load;
pub mod names;
pub mod routes;
mod staged_sql;
mod types;

use self::jobs::*;
pub use self::jobs::{job_id, staging_table_name};
use self::types::*;
pub use self::types::{
    bigquery_field, bigquery_schema, bigquery_type, check_modes, staging_columns,
};

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
use crate::source::SOURCE_TYPE_KEY;
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
        // Before any job: parts that do not add up to the reported rows (one listed twice, one
        // missing) load nothing. A direct load is counted again only after it has committed.
        let staged: u64 = req.parts.iter().map(|p| p.rows).sum();
        if staged != req.expected_rows {
            return Err(Error::Warehouse(format!(
                "the {} staged parts hold {staged} rows but the workers reported {}; table \
                 {full} left as it was",
                req.parts.len(),
                req.expected_rows
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
        self.load_files_in_place(req).await
    }
}

#[cfg(test)]
mod tests;
