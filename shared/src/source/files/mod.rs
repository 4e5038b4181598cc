//! File sources: GCS, S3, Azure Blob and local files, read through `object_store`. Listing
//! matches `file_pattern` on the file name under `file_path_prefix` (recursively), newest
//! first; a shard reads its files as streams (CSV and JSON lines through arrow's push
//! decoders, Parquet by row group), decompressing `.gz` and `.zst` on the way, so no file is
//! ever held in memory whatever its size.

pub mod pandas;
pub mod plan;
pub mod schema;

use std::io;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use chrono::{DateTime, Utc};
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt as _};
use serde::{Deserialize, Serialize};

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;

use super::{BatchStream, ShardBounds, SourceColumn, receiver_stream};
use crate::gcs::{GcsAuth, GcsStore};
use crate::messages::ShardTask;
use crate::spec::{
    Compression, FileFormat, FileOptions, FileSpec, JobSpec, SourceType, TextEncoding,
};
use crate::{Error, Result};

/// How much of a file detection and drift checks read (the seed read 5 MB too).
pub const SAMPLE_BYTES: usize = 5 * 1024 * 1024;
/// Bytes read from the store per read call.
const READ_CHUNK: usize = 256 * 1024;

/// A file the listing found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The object's path in its bucket or container (relative to the base for `local`).
    pub path: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
    pub e_tag: Option<String>,
    /// The GCS generation (or S3/Azure version id when versioning is on).
    pub version: Option<String>,
}

impl FileInfo {
    /// What says "this content": the generation when the store has one, else the ETag.
    pub fn version_key(&self) -> String {
        self.version
            .clone()
            .or_else(|| self.e_tag.clone())
            .unwrap_or_else(|| format!("{}@{}", self.size, self.last_modified.timestamp_micros()))
    }
}

/// One file of a shard: the whole file, or a range of its Parquet row groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePart {
    pub file: FileInfo,
    /// Parquet row groups `first..end`; None reads the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_groups: Option<(usize, usize)>,
    /// The file's own column names in order (CSV: its header), mapped by name onto the
    /// job's columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
}

/// Where a file job's files live: a store, and the path every listing starts from.
pub struct FileLocation {
    store: Arc<dyn ObjectStore>,
    /// The bucket or container, for a cloud store.
    bucket: Option<String>,
    /// The job reaches the store with credentials (or an endpoint) of its own, not the
    /// platform's.
    own_access: bool,
    /// The endpoint `connection_params` names, if any.
    endpoint: Option<String>,
    /// `gs://bucket`, `s3://bucket`, `az://container` or `file://<base>`: prefixes URIs.
    root: String,
    /// `file_path_prefix` inside the store (no leading slash).
    prefix: String,
    pattern: globset::GlobMatcher,
    pub spec: FileSpec,
}

/// Connection parameter names each setting is read from, first found wins.
const BUCKET_KEYS: &[&str] = &[
    "bucket",
    "bucket_name",
    "bucket_path",
    "container",
    "container_name",
];

/// Connection parameters that give a job its own way into its store.
const OWN_ACCESS_KEYS: &[&str] = &[
    "endpoint",
    "endpoint_url",
    "service_account_json",
    "service_account_key",
    "credentials_json",
    "credentials",
    "aws_access_key_id",
    "connection_string",
    "account_key",
    "sas_token",
];

/// The bucket or container `connection_params` name, if any.
pub fn bucket_param(spec: &JobSpec) -> Option<&str> {
    param(spec, BUCKET_KEYS)
}

fn param<'a>(spec: &'a JobSpec, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .filter_map(|k| spec.connection.other.get(*k))
        .map(|s| s.expose().trim())
        .find(|s| !s.is_empty())
}

/// The URL schemes each source type's locations may be written with.
fn schemes(source: SourceType) -> &'static [&'static str] {
    match source {
        SourceType::Gcs => &["gs"],
        SourceType::S3 => &["s3", "s3a"],
        SourceType::AzureBlob => &["az", "azure", "abfs", "abfss", "wasb", "wasbs"],
        _ => &["file"],
    }
}

/// Splits the job's bucket (from `connection_params` or a `gs://`-style prefix) from the path
/// inside it. The bucket parameter may itself be a URL with a base path (`gs://b/exports`).
pub fn split_location(
    source: SourceType,
    bucket_param: Option<&str>,
    prefix: &str,
) -> Result<(String, String)> {
    let parse = |text: &str| -> Result<Option<(String, String)>> {
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(None);
        };
        if !schemes(source).contains(&scheme) {
            return Err(Error::Spec(crate::spec::SpecError::single(
                "file_path_prefix",
                format!(
                    "{text:?} is a {scheme}:// location, and source_type {source:?} reads {}",
                    schemes(source)
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            )));
        }
        // abfss://container@account.dfs.core.windows.net/path names the container first.
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket = bucket.split('@').next().unwrap_or(bucket);
        Ok(Some((bucket.to_string(), path.to_string())))
    };
    let from_prefix = parse(prefix)?;
    let from_param = match bucket_param {
        None => None,
        Some(b) => Some(parse(b)?.unwrap_or((b.trim_matches('/').to_string(), String::new()))),
    };
    let join = |base: &str, rest: &str| -> String {
        match (base.trim_matches('/'), rest.trim_start_matches('/')) {
            ("", rest) => rest.to_string(),
            (base, "") => format!("{base}/"),
            (base, rest) => format!("{base}/{rest}"),
        }
    };
    match (from_param, from_prefix) {
        (Some((b1, _)), Some((b2, _))) if b1 != b2 => {
            Err(Error::Spec(crate::spec::SpecError::single(
                "file_path_prefix",
                format!("names bucket {b2:?}, and connection_params names {b1:?}"),
            )))
        }
        (_, Some((bucket, path))) => Ok((bucket, path)),
        (Some((bucket, base)), None) => Ok((bucket, join(&base, prefix))),
        (None, None) => Err(Error::Spec(crate::spec::SpecError::single(
            "connection_params.bucket",
            "is required: name the bucket (or container) there or in file_path_prefix \
             (gs://bucket/path/, s3://bucket/path/, az://container/path/)",
        ))),
    }
}

impl FileLocation {
    /// Opens the job's store with the credentials in `connection_params`, else the platform's
    /// (ADC, instance profile, managed identity). Secrets go to the client, never to a log.
    pub fn open(spec: &JobSpec) -> Result<FileLocation> {
        let files = spec
            .files
            .clone()
            .ok_or_else(|| Error::Source("this job reads no files".into()))?;
        let pattern = globset::Glob::new(&files.pattern)
            .map_err(|e| Error::Source(format!("file_pattern {:?}: {}", files.pattern, e.kind())))?
            .compile_matcher();
        let mut bucket_name = None;
        let (store, root, prefix): (Arc<dyn ObjectStore>, String, String) = match spec.source_type {
            SourceType::Local => {
                let (base, prefix) = local_root(
                    param(spec, &["base_path", "root", "path"]).unwrap_or(""),
                    files.path_prefix.trim_start_matches("file://"),
                )?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&base)
                    .map_err(|e| Error::Source(format!("local base {base:?}: {e}")))?;
                (
                    Arc::new(store),
                    format!("file://{}", base.trim_end_matches('/')),
                    prefix,
                )
            }
            cloud @ (SourceType::Gcs | SourceType::S3 | SourceType::AzureBlob) => {
                let (bucket, prefix) =
                    split_location(cloud, bucket_param(spec), &files.path_prefix)?;
                let store: Arc<dyn ObjectStore> = match cloud {
                    SourceType::Gcs => Arc::new(gcs_store(spec, &bucket)?),
                    SourceType::S3 => Arc::new(s3_store(spec, &bucket)?),
                    _ => Arc::new(azure_store(spec, &bucket)?),
                };
                bucket_name = Some(bucket.clone());
                (store, format!("{}://{bucket}", schemes(cloud)[0]), prefix)
            }
            other => return Err(Error::Source(format!("{other:?} is not a file source"))),
        };
        Ok(FileLocation {
            store,
            bucket: bucket_name,
            own_access: param(spec, OWN_ACCESS_KEYS).is_some(),
            endpoint: param(spec, &["endpoint", "endpoint_url"]).map(str::to_string),
            root,
            prefix,
            pattern,
            spec: files,
        })
    }

    /// The bucket or container of a cloud store.
    pub fn bucket(&self) -> Option<&str> {
        self.bucket.as_deref()
    }

    /// The endpoint the job reaches its store at, when `connection_params` names one.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Whether the job reaches its files with credentials or an endpoint of its own, so that
    /// what the platform's identity may read says nothing of them.
    pub fn own_access(&self) -> bool {
        self.own_access
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The file's URI as people (and error messages) name it.
    pub fn uri(&self, path: &str) -> String {
        format!("{}/{path}", self.root)
    }

    /// `gs://bucket` etc.: the part of a URI before the object path.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The URI of `file_path_prefix`: where the job's files are.
    pub fn prefix_uri(&self) -> String {
        format!("{}/{}", self.root, self.prefix)
    }

    /// Every file under the prefix (recursively) whose name matches the pattern, newest first.
    pub async fn list(&self) -> Result<Vec<FileInfo>> {
        // object_store lists whole path segments; a prefix that ends inside a name
        // (`data/tx_2024`) lists its folder and keeps what starts with it, as GCS does.
        let (folder, starts_with) = match self.prefix.rsplit_once('/') {
            _ if self.prefix.is_empty() => (None, String::new()),
            Some((folder, "")) => (Some(folder.to_string()), String::new()),
            Some((folder, _)) => (Some(folder.to_string()), self.prefix.clone()),
            None => (None, self.prefix.clone()),
        };
        let folder = folder.map(Path::from);
        let metas: Vec<ObjectMeta> = self
            .store
            .list(folder.as_ref())
            .try_collect()
            .await
            .map_err(|e| store_error(format!("listing {}/{}", self.root, self.prefix), e))?;
        let mut files: Vec<FileInfo> = metas
            .into_iter()
            .filter(|m| m.location.as_ref().starts_with(&starts_with))
            .filter(|m| {
                m.location
                    .filename()
                    .is_some_and(|name| self.pattern.is_match(name))
            })
            .map(|m| FileInfo {
                path: m.location.to_string(),
                size: m.size,
                last_modified: m.last_modified,
                e_tag: m.e_tag,
                version: m.version,
            })
            .collect();
        files.sort_by(|a, b| {
            b.last_modified
                .cmp(&a.last_modified)
                .then_with(|| b.path.cmp(&a.path))
        });
        Ok(files)
    }

    /// The file's bytes, decompressed, as they were when listed: a file rewritten since is an
    /// error (its new content is picked up by the next run).
    pub async fn open_text(&self, file: &FileInfo) -> Result<Box<dyn AsyncBufRead + Send + Unpin>> {
        let path = Path::from(file.path.as_str());
        let options = GetOptions {
            version: file.version.clone(),
            if_match: if file.version.is_none() {
                file.e_tag.clone()
            } else {
                None
            },
            ..Default::default()
        };
        let got = self
            .store
            .get_opts(&path, options)
            .await
            .map_err(|e| self.read_error(file, e))?;
        let uri = self.uri(&file.path);
        let bytes = got
            .into_stream()
            .map_err(move |e| io::Error::other(format!("reading {uri}: {e}")));
        let raw = BufReader::with_capacity(READ_CHUNK, tokio_util::io::StreamReader::new(bytes));
        Ok(
            match compression_of(self.spec.options.compression, &file.path) {
                Compression::Gzip => {
                    let mut decoder = GzipDecoder::new(raw);
                    decoder.multiple_members(true);
                    Box::new(BufReader::with_capacity(READ_CHUNK, decoder))
                }
                Compression::Zstd => {
                    let mut decoder = ZstdDecoder::new(raw);
                    decoder.multiple_members(true);
                    Box::new(BufReader::with_capacity(READ_CHUNK, decoder))
                }
                Compression::None | Compression::Auto => Box::new(raw),
            },
        )
    }

    /// Checks the file is still the one listed (Parquet is read by ranges, which do not pin).
    pub async fn check_unchanged(&self, file: &FileInfo) -> Result<()> {
        let now = self.current(file).await?;
        if now.version_key() != file.version_key() || now.size != file.size {
            return Err(self.changed(file));
        }
        Ok(())
    }

    /// The file as it is now (its live generation).
    pub async fn current(&self, file: &FileInfo) -> Result<FileInfo> {
        let meta = self
            .store
            .head(&Path::from(file.path.as_str()))
            .await
            .map_err(|e| self.read_error(file, e))?;
        Ok(FileInfo {
            path: file.path.clone(),
            size: meta.size,
            last_modified: meta.last_modified,
            e_tag: meta.e_tag,
            version: meta.version,
        })
    }

    fn changed(&self, file: &FileInfo) -> Error {
        Error::Source(format!(
            "{} changed after the run was planned; the run reads nothing of it and its new \
             content is loaded by the next run",
            self.uri(&file.path)
        ))
    }

    fn read_error(&self, file: &FileInfo, e: object_store::Error) -> Error {
        match e {
            object_store::Error::Precondition { .. } | object_store::Error::NotModified { .. } => {
                self.changed(file)
            }
            object_store::Error::NotFound { .. } => Error::Source(format!(
                "{} was deleted after the run was planned",
                self.uri(&file.path)
            )),
            other => store_error(format!("reading {}", self.uri(&file.path)), other),
        }
    }
}

/// A store's error, as the job's own fault (a missing object, a refused credential: the same
/// every time) or the store's (a connection, a 5xx past the client's retries: redelivered).
fn store_error(context: String, e: object_store::Error) -> Error {
    use object_store::Error as E;
    match e {
        E::NotFound { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::UnknownConfigurationKey { .. } => Error::Source(format!("{context}: {e}")),
        other => Error::SourceRead(format!("{context}: {other}")),
    }
}

/// An error from reading a file's bytes: bytes that do not decompress are the file's fault,
/// anything else (the connection under the stream) may pass.
fn read_io_error(uri: &str, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::InvalidData => Error::Source(format!("{uri}: {e}")),
        _ => Error::SourceRead(format!("{uri}: {e}")),
    }
}

/// A Parquet reader's error: the store's (wrapped as `External`) may pass, a malformed file
/// does not.
pub(crate) fn parquet_error(context: String, e: parquet::errors::ParquetError) -> Error {
    match e {
        parquet::errors::ParquetError::External(_) => Error::SourceRead(format!("{context}: {e}")),
        _ => Error::Source(format!("{context}: {e}")),
    }
}

/// A local job's store root and the prefix inside it: `base_path` with a relative prefix, else
/// `/` with the prefix made absolute and `..` resolved (object_store paths have no `..`).
fn local_root(base: &str, prefix: &str) -> Result<(String, String)> {
    if !base.is_empty() && !prefix.starts_with('/') {
        return Ok((base.to_string(), prefix.to_string()));
    }
    let absolute = std::path::absolute(if prefix.is_empty() { "." } else { prefix })
        .map_err(|e| Error::Source(format!("file_path_prefix {prefix:?}: {e}")))?;
    let mut normal = std::path::PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    let folder = prefix.ends_with('/') || prefix.is_empty();
    let text = normal.to_string_lossy();
    Ok((
        "/".to_string(),
        format!(
            "{}{}",
            text.trim_start_matches('/'),
            if folder { "/" } else { "" }
        ),
    ))
}

/// The compression a file is read with: the option, or its name's extension.
pub fn compression_of(option: Compression, path: &str) -> Compression {
    match option {
        Compression::Auto if path.ends_with(".gz") || path.ends_with(".gzip") => Compression::Gzip,
        Compression::Auto if path.ends_with(".zst") || path.ends_with(".zstd") => Compression::Zstd,
        Compression::Auto => Compression::None,
        other => other,
    }
}

fn gcs_store(spec: &JobSpec, bucket: &str) -> Result<GcsStore> {
    if let Some(endpoint) = param(spec, &["endpoint", "endpoint_url"]) {
        return Ok(GcsStore::new(endpoint, bucket, GcsAuth::Anonymous));
    }
    if let Some(key) = param(
        spec,
        &[
            "service_account_json",
            "service_account_key",
            "credentials_json",
            "credentials",
        ],
    ) {
        let key: serde_json::Value = serde_json::from_str(key).map_err(|e| {
            Error::Source(format!(
                "connection_params: the service-account key is not JSON ({})",
                json_error_kind(&e)
            ))
        })?;
        let credentials = google_cloud_auth::credentials::service_account::Builder::new(key)
            .with_access_specifier(
                google_cloud_auth::credentials::service_account::AccessSpecifier::from_scopes([
                    "https://www.googleapis.com/auth/devstorage.read_only",
                ]),
            )
            .build()
            .map_err(|e| Error::Source(format!("the service-account key is not usable: {e}")))?;
        return Ok(GcsStore::new(
            "https://storage.googleapis.com",
            bucket,
            GcsAuth::Google(credentials),
        ));
    }
    GcsStore::from_env(bucket).map_err(|e| Error::Source(e.to_string()))
}

/// The kind of a JSON error without its position or content (a key must not leak).
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Eof => "truncated",
    }
}

fn s3_store(spec: &JobSpec, bucket: &str) -> Result<object_store::aws::AmazonS3> {
    let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(region) = param(spec, &["region", "aws_region", "region_name"]) {
        builder = builder.with_region(region);
    }
    if let Some(id) = param(spec, &["aws_access_key_id", "access_key_id", "access_key"]) {
        builder = builder.with_access_key_id(id);
    }
    if let Some(secret) = param(
        spec,
        &["aws_secret_access_key", "secret_access_key", "secret_key"],
    ) {
        builder = builder.with_secret_access_key(secret);
    }
    if let Some(token) = param(spec, &["aws_session_token", "session_token"]) {
        builder = builder.with_token(token);
    }
    if let Some(endpoint) = param(spec, &["endpoint_url", "endpoint"]) {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    builder
        .build()
        .map_err(|e| Error::Source(format!("S3 bucket {bucket}: {e}")))
}

/// An Azure connection string's settings (`AccountName=…;AccountKey=…;BlobEndpoint=…`).
pub fn parse_connection_string(text: &str) -> std::collections::BTreeMap<String, String> {
    text.split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

fn azure_store(spec: &JobSpec, container: &str) -> Result<object_store::azure::MicrosoftAzure> {
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    let mut builder = MicrosoftAzureBuilder::from_env().with_container_name(container);
    let mut endpoint = param(spec, &["endpoint", "blob_endpoint"]).map(str::to_string);
    if let Some(text) = param(spec, &["connection_string", "azure_connection_string"]) {
        let settings = parse_connection_string(text);
        if settings.get("usedevelopmentstorage").map(String::as_str) == Some("true") {
            builder = builder.with_use_emulator(true);
        }
        if let Some(account) = settings.get("accountname") {
            builder = builder.with_account(account);
        }
        if let Some(key) = settings.get("accountkey") {
            builder = builder.with_access_key(key);
        }
        if let Some(sas) = settings.get("sharedaccesssignature") {
            builder = builder.with_config(AzureConfigKey::SasKey, sas);
        }
        if let Some(blob) = settings.get("blobendpoint") {
            endpoint = Some(blob.clone());
        }
    }
    if let Some(account) = param(spec, &["account_name", "storage_account", "account"]) {
        builder = builder.with_account(account);
    }
    if let Some(key) = param(spec, &["account_key", "access_key"]) {
        builder = builder.with_access_key(key);
    }
    if let Some(sas) = param(spec, &["sas_token", "sas"]) {
        builder = builder.with_config(AzureConfigKey::SasKey, sas.trim_start_matches('?'));
    }
    if let Some(endpoint) = endpoint {
        builder = builder
            .with_allow_http(endpoint.starts_with("http://"))
            .with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    builder
        .build()
        .map_err(|e| Error::Source(format!("Azure container {container}: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Reading a shard
// ---------------------------------------------------------------------------------------------

/// Rows read per file of a shard, in the shard's file order, filled in as the stream goes.
pub type FileRowCounts = Arc<Mutex<Vec<u64>>>;

/// The file connector (GCS, S3, Azure Blob, local): files listed and grouped by `plan`, each
/// shard's files read as streams.
pub struct FileSource;

#[async_trait::async_trait]
impl super::Source for FileSource {
    /// A file column's type is the BigQuery type it loads as; JSON keeps its label so the
    /// warehouse makes it a JSON column.
    fn column_types(&self, column: &SourceColumn) -> (String, DataType) {
        (
            column.type_name.to_ascii_lowercase(),
            schema::arrow_type_of(&column.type_name).unwrap_or(DataType::Utf8),
        )
    }

    async fn survey(
        &self,
        spec: &JobSpec,
        opts: &crate::plan::PlanOptions,
        stream: &crate::plan::StreamState,
    ) -> Result<super::SourceSurvey> {
        let survey = plan::survey_files(spec, opts, stream).await?;
        Ok(super::SourceSurvey::Files(Box::new(survey)))
    }

    async fn extract(
        &self,
        spec: &JobSpec,
        task: &ShardTask,
        _retry: crate::retry::RetryPolicy,
        in_flight: usize,
    ) -> Result<super::Extraction> {
        let (batches, counts) = extract(spec, task, in_flight).await?;
        Ok(super::Extraction {
            batches,
            file_rows: Some(counts),
        })
    }
}

/// Reads a shard's files, one after the other, as batches of the task's columns.
pub async fn extract(
    spec: &JobSpec,
    task: &ShardTask,
    in_flight: usize,
) -> Result<(BatchStream, FileRowCounts)> {
    let ShardBounds::Files { files } = &task.bounds else {
        return Err(Error::Source(format!(
            "shard {} of a file job names no files",
            task.shard_id
        )));
    };
    let location = Arc::new(FileLocation::open(spec)?);
    let schema = super::arrow_schema(spec.source_type, &task.columns);
    let counts: FileRowCounts = Arc::new(Mutex::new(vec![0; files.len()]));
    let (tx, rx) = mpsc::channel(in_flight.max(1));
    let (files, batch_rows, job_counts) = (files.clone(), task.batch_rows.max(1), counts.clone());
    tokio::spawn(async move {
        for (i, part) in files.iter().enumerate() {
            let sink = BatchSink {
                tx: &tx,
                counts: &job_counts,
                index: i,
                target: &schema,
            };
            let read = read_part(&location, part, batch_rows, &sink).await;
            if let Err(e) = read {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    });
    Ok((receiver_stream(rx), counts))
}

/// Where a file's batches go: conformed to the job's columns, counted, sent.
pub(crate) struct BatchSink<'a> {
    pub(crate) tx: &'a mpsc::Sender<Result<RecordBatch>>,
    pub(crate) counts: &'a FileRowCounts,
    pub(crate) index: usize,
    pub(crate) target: &'a SchemaRef,
}

impl BatchSink<'_> {
    /// False when the reader hung up (the shard failed downstream).
    async fn send(&self, batch: RecordBatch, uri: &str) -> Result<bool> {
        let batch = conform(batch, self.target, uri)?;
        if let Some(n) = self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(self.index)
        {
            *n += batch.num_rows() as u64;
        }
        Ok(self.tx.send(Ok(batch)).await.is_ok())
    }
}

async fn read_part(
    location: &FileLocation,
    part: &FilePart,
    batch_rows: usize,
    sink: &BatchSink<'_>,
) -> Result<()> {
    let uri = location.uri(&part.file.path);
    match location.spec.format {
        FileFormat::Parquet => read_parquet(location, part, batch_rows, sink, &uri).await,
        FileFormat::Csv => {
            let text = location.open_text(&part.file).await?;
            // The file's columns in its own order, typed as the job's where they match.
            let names: Vec<String> = if part.columns.is_empty() {
                sink.target
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect()
            } else {
                part.columns.clone()
            };
            // Decoded as text, then converted by pandas' rules (`pandas::ColumnReader`), as
            // the seed read the file; a column the job does not load stays text.
            let file_schema = Arc::new(Schema::new(
                names
                    .iter()
                    .map(|n| {
                        let target = match sink.target.field_with_name(n) {
                            Ok(f) => f.data_type().clone(),
                            Err(_) => DataType::Utf8,
                        };
                        Field::new(n, target, true)
                    })
                    .collect::<Vec<_>>(),
            ));
            read_csv(
                text,
                file_schema,
                &location.spec.options,
                batch_rows,
                sink,
                &uri,
            )
            .await
        }
        FileFormat::Json => {
            let text = location.open_text(&part.file).await?;
            let schema = Arc::new(Schema::new(
                sink.target
                    .fields()
                    .iter()
                    .map(|f| parse_field(f))
                    .collect::<Vec<_>>(),
            ));
            read_json(
                text,
                schema,
                location.spec.options.encoding,
                batch_rows,
                sink,
                &uri,
            )
            .await
        }
    }
}

/// The field a text decoder parses a column as: nullable, and a UTC timestamp as offset
/// `+00:00` (arrow parses named zones only with chrono-tz; the cast back is metadata only).
pub(crate) fn parse_field(field: &Field) -> Field {
    let data_type = match field.data_type() {
        DataType::Timestamp(unit, Some(_)) => DataType::Timestamp(*unit, Some("+00:00".into())),
        other => other.clone(),
    };
    Field::new(field.name(), data_type, true)
}

/// Appends `chunk` to `out` as UTF-8.
fn transcode(chunk: &[u8], encoding: TextEncoding, out: &mut Vec<u8>) {
    match encoding {
        TextEncoding::Utf8 => out.extend_from_slice(chunk),
        // ISO-8859-1: each byte is the code point of the same number.
        TextEncoding::Latin1 => {
            for &b in chunk {
                if b < 0x80 {
                    out.push(b);
                } else {
                    out.push(0xC0 | (b >> 6));
                    out.push(0x80 | (b & 0x3F));
                }
            }
        }
    }
}

/// Reads the next chunk of a text stream, transcoded; false at the end.
async fn fill(
    reader: &mut (dyn AsyncBufRead + Send + Unpin),
    encoding: TextEncoding,
    pending: &mut Vec<u8>,
    uri: &str,
) -> Result<bool> {
    let n = {
        let chunk = reader.fill_buf().await.map_err(|e| read_io_error(uri, e))?;
        transcode(chunk, encoding, pending);
        chunk.len()
    };
    reader.consume(n);
    Ok(n > 0)
}

pub(crate) fn csv_format(options: &FileOptions) -> arrow::csv::reader::Format {
    arrow::csv::reader::Format::default()
        .with_header(options.has_header)
        .with_delimiter(options.delimiter)
        .with_quote(options.quote)
}

/// A batch of text columns converted to `schema`'s types, each by its column's reader; a value
/// that does not convert fails naming where it is (`place` of its row), its column and itself.
fn convert_text(
    batch: RecordBatch,
    schema: &SchemaRef,
    readers: &mut [pandas::ColumnReader],
    today: chrono::NaiveDate,
    place: impl Fn(usize) -> String,
) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .zip(readers.iter_mut())
        .map(|((column, field), reader)| {
            // JSON decodes all but its time columns as their own types.
            if column.data_type() == field.data_type() && !reader.na_markers {
                return Ok(column.clone());
            }
            let text = column
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .ok_or_else(|| {
                    Error::Source(format!("column {:?} was not read as text", field.name()))
                })?;
            reader.convert(text, field.data_type(), today).map_err(|u| {
                Error::Source(format!(
                    "{}: column {:?}: {:?} {}",
                    place(u.row),
                    field.name(),
                    u.value,
                    u.why
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| Error::Source(e.to_string()))
}

pub(crate) async fn read_csv(
    mut text: Box<dyn AsyncBufRead + Send + Unpin>,
    file_schema: SchemaRef,
    options: &FileOptions,
    batch_rows: usize,
    sink: &BatchSink<'_>,
    uri: &str,
) -> Result<()> {
    let text_schema = Arc::new(Schema::new(
        file_schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let mut decoder = arrow::csv::ReaderBuilder::new(text_schema)
        .with_format(csv_format(options))
        .with_batch_size(batch_rows)
        .build_decoder();
    let mut readers: Vec<pandas::ColumnReader> = file_schema
        .fields()
        .iter()
        .map(|_| pandas::ColumnReader::new(true))
        .collect();
    let today = chrono::Utc::now().date_naive();
    // Records before the batch, the header included: the file's line of a row, where no
    // quoted field spans lines.
    let mut records_before = u64::from(options.has_header);
    let mut pending: Vec<u8> = Vec::with_capacity(READ_CHUNK * 2);
    let mut at_end = false;
    let mut quotes = QuoteScan::new(options.delimiter, options.quote);
    loop {
        if pending.is_empty() && !at_end {
            at_end = !fill(text.as_mut(), options.encoding, &mut pending, uri).await?;
            quotes.feed(&pending);
        }
        let finished = at_end && pending.is_empty();
        // The decoder ends an open quoted field at the end of input as if it were closed,
        // having swallowed every line after its opening quote: refuse the file instead.
        if finished && let Some(line) = quotes.unclosed_since() {
            return Err(Error::Source(format!(
                "{uri}, line {line}: a quoted field opens here and is not closed before the end \
                 of the file"
            )));
        }
        // Once the input ended this decodes nothing, which tells the decoder so: a last
        // record without a newline is complete then.
        let used = decoder.decode(&pending).map_err(|e| csv_error(uri, &e))?;
        pending.drain(..used);
        let finished = at_end && pending.is_empty();
        if decoder.capacity() == 0 || finished {
            if let Some(batch) = decoder.flush().map_err(|e| csv_error(uri, &e))? {
                let rows = batch.num_rows() as u64;
                let batch = convert_text(batch, &file_schema, &mut readers, today, |row| {
                    format!("{uri}, line {}", records_before + row as u64 + 1)
                })?;
                records_before += rows;
                if !sink.send(batch, uri).await? {
                    return Ok(());
                }
            }
            if finished {
                return Ok(());
            }
        }
    }
}

/// Follows CSV quoting as the decoder reads it (a quote opens a quoted field only at the
/// start of a field; `""` inside one is a quote; elsewhere a quote is a character), to tell
/// whether the input ended inside a quoted field, and on which line that field opened. It
/// stops only at quotes; line ends are counted once per chunk.
#[derive(Debug)]
struct QuoteScan {
    delimiter: u8,
    quote: u8,
    state: QuoteState,
    /// The byte before the next one fed; None at the start of the input.
    last: Option<u8>,
    /// Lines seen so far, counted from 1 (the header included).
    line: u64,
    opened_on: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QuoteState {
    Outside,
    Quoted,
    /// A quote inside a quoted field: it closes the field, or with a second quote is one.
    QuoteInQuoted,
}

/// Line ends in `bytes`, counted in blocks of 255 into a byte so the compiler vectorises the
/// loop (about ten times a search per line, or a count into a wide integer).
fn line_ends(bytes: &[u8]) -> u64 {
    bytes
        .chunks(255)
        .map(|block| {
            let ends = block
                .iter()
                .fold(0u8, |n, &b| n.wrapping_add(u8::from(b == b'\n')));
            u64::from(ends)
        })
        .sum()
}

impl QuoteScan {
    fn new(delimiter: u8, quote: u8) -> Self {
        QuoteScan {
            delimiter,
            quote,
            state: QuoteState::Outside,
            last: None,
            line: 1,
            opened_on: 0,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        use QuoteState::*;
        let Some(&final_byte) = bytes.last() else {
            return;
        };
        let mut from = 0;
        if self.state == QuoteInQuoted {
            // A second quote is a quote in the value; anything else follows a closed field.
            if bytes[0] == self.quote {
                self.state = Quoted;
                from = 1;
            } else {
                self.state = Outside;
            }
        }
        // Where in `bytes` the field open at the end (if any) opened, when it opened here.
        let mut opened_here = None;
        let mut last_quote = None;
        for found in memchr::memchr_iter(self.quote, &bytes[from..]) {
            let at = from + found;
            if self.state == QuoteInQuoted {
                if last_quote == Some(at - 1) {
                    self.state = Quoted;
                    last_quote = Some(at);
                    continue;
                }
                self.state = Outside;
            }
            let previous = if at > 0 {
                Some(bytes[at - 1])
            } else {
                self.last
            };
            self.state = match self.state {
                Quoted => QuoteInQuoted,
                // A quote opens a field at the start of the input, a line or a field. The
                // decoder (csv_core) ends a line at a lone `\r` too.
                _ if previous.is_none_or(|b| b == self.delimiter || b == b'\n' || b == b'\r') => {
                    opened_here = Some(at);
                    Quoted
                }
                // Inside an unquoted value a quote is a character.
                other => other,
            };
            last_quote = Some(at);
        }
        // A closing quote followed by more bytes here closed its field.
        if self.state == QuoteInQuoted && last_quote != Some(bytes.len() - 1) {
            self.state = Outside;
        }
        // Lines are counted once a chunk; an opening line only for a field still open.
        if let Some(opened) = opened_here
            && self.state != Outside
        {
            self.opened_on = self.line + line_ends(&bytes[..opened]);
        }
        self.line += line_ends(bytes);
        self.last = Some(final_byte);
    }

    /// The line the open quoted field started on, when the input so far ends inside one.
    fn unclosed_since(&self) -> Option<u64> {
        (self.state == QuoteState::Quoted).then_some(self.opened_on)
    }
}

/// An arrow CSV error as "file, line N: what" (lines counted from 1, the header included).
/// Arrow counts records from 0 in value errors and from 1 in field-count errors.
pub fn csv_error(uri: &str, e: &arrow::error::ArrowError) -> Error {
    let text = e.to_string();
    let text = text
        .trim_start_matches("Csv error: ")
        .trim_start_matches("Parser error: ");
    let number_after = |marker: &str| -> Option<(usize, usize)> {
        let at = text.find(marker)? + marker.len();
        let digits: String = text[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((digits.parse().ok()?, at + digits.len()))
    };
    if let Some((line, _)) = number_after("for line ") {
        // "incorrect number of fields for line 3, expected 2 got 1"
        return Error::Source(format!("{uri}, line {line}: {text}"));
    }
    if let (Some(start), Some((line, _))) = (
        text.find("Error while parsing value "),
        number_after(" at line "),
    ) {
        // "Error while parsing value 'x' as type 'Int64' for column 2 at line 5. Row data: …"
        let what = &text[start + "Error while parsing value ".len()..];
        let what = what.split(" at line ").next().unwrap_or(what);
        return Error::Source(format!(
            "{uri}, line {}: cannot parse value {what}",
            line + 1
        ));
    }
    if let (Some(rest), Some((line, end))) = (
        text.strip_prefix("Error parsing column "),
        number_after(" at line "),
    ) {
        // "Error parsing column 1 at line 2: Parser error: …": the decoder counts records from
        // 0, the header included.
        let column = rest.split(' ').next().unwrap_or("?");
        let why = text[end..]
            .trim_start_matches(": ")
            .trim_start_matches("Parser error: ");
        return Error::Source(format!("{uri}, line {}: column {column}: {why}", line + 1));
    }
    if let Some((line, _)) = number_after(" at line ") {
        // Inference (the csv crate) counts lines from 1.
        return Error::Source(format!("{uri}, line {line}: {text}"));
    }
    Error::Source(format!("{uri}: {text}"))
}

/// Turns a top-level JSON array (`[{…}, {…}]`) into one value per line, as a stream.
#[derive(Default)]
struct ArrayUnwrapper {
    started: bool,
    is_array: bool,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl ArrayUnwrapper {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        if !self.started {
            let skip = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
            rest = &rest[skip..];
            if rest.is_empty() {
                return;
            }
            self.started = true;
            self.is_array = rest[0] == b'[';
            if self.is_array {
                rest = &rest[1..];
            }
        }
        if !self.is_array {
            out.extend_from_slice(rest);
            return;
        }
        for &b in rest {
            if self.in_string {
                out.push(b);
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    out.push(b);
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    out.push(b);
                }
                b'}' | b']' if self.depth > 0 => {
                    self.depth -= 1;
                    out.push(b);
                }
                // The closing bracket of the array itself.
                b']' => {}
                b',' if self.depth == 0 => out.push(b'\n'),
                b'\n' | b'\r' if self.depth == 0 => {}
                // A pretty-printed element spans lines: outside strings a line end is only
                // whitespace, so each element comes out on one line.
                b'\n' | b'\r' => out.push(b' '),
                _ => out.push(b),
            }
        }
    }
}

pub(crate) async fn read_json(
    mut text: Box<dyn AsyncBufRead + Send + Unpin>,
    schema: SchemaRef,
    encoding: TextEncoding,
    batch_rows: usize,
    sink: &BatchSink<'_>,
    uri: &str,
) -> Result<()> {
    // Time and number columns are decoded as text and read by pandas' rules, as `read_json`
    // and the seed's `to_datetime` read them (numeric text and booleans are numbers, `true`
    // 1); numbers meant as text are text.
    let decode_schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(_, _)
                | DataType::Date32
                | DataType::Time64(_)
                | DataType::Int64
                | DataType::Float64 => Field::new(f.name(), DataType::Utf8, true),
                _ => f.as_ref().clone(),
            })
            .collect::<Vec<_>>(),
    ));
    let mut readers: Vec<pandas::ColumnReader> = schema
        .fields()
        .iter()
        .map(|_| pandas::ColumnReader::new(false))
        .collect();
    let today = chrono::Utc::now().date_naive();
    let mut batch_lines: Vec<usize> = Vec::new();
    let build = || {
        arrow::json::ReaderBuilder::new(decode_schema.clone())
            .with_coerce_primitive(true)
            .with_batch_size(batch_rows)
            .build_decoder()
            .map_err(|e| Error::Source(format!("{uri}: {e}")))
    };
    let mut decoder = build()?;
    let mut unwrapper = ArrayUnwrapper::default();
    let mut raw = Vec::with_capacity(READ_CHUNK);
    let mut lines: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // The current batch's lines, kept to find a bad value's line when the batch fails.
    let mut batch_text: Vec<u8> = Vec::new();
    let mut batch_first_line = 1usize;
    let mut line = 0usize;
    let mut at_end = false;
    while !at_end {
        raw.clear();
        at_end = !fill(text.as_mut(), encoding, &mut raw, uri).await?;
        unwrapper.feed(&raw, &mut lines);
        if at_end && !lines.is_empty() && lines.last() != Some(&b'\n') {
            lines.push(b'\n');
        }
        let mut start = 0;
        while let Some(nl) = lines[start..].iter().position(|&b| b == b'\n') {
            let one = &lines[start..start + nl + 1];
            start += nl + 1;
            line += 1;
            if one.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            decoder
                .decode(one)
                .map_err(|e| Error::Source(format!("{uri}, {} {line}: {e}", unit(&unwrapper))))?;
            if decoder.has_partial_record() {
                return Err(Error::Source(format!(
                    "{uri}, {} {line}: not one complete JSON value on the line",
                    unit(&unwrapper)
                )));
            }
            if batch_text.is_empty() {
                batch_first_line = line;
            }
            batch_text.extend_from_slice(one);
            batch_lines.push(line);
            if decoder.len() >= batch_rows {
                let batch = flush_json(
                    &mut decoder,
                    &batch_text,
                    batch_first_line,
                    &build,
                    uri,
                    &unwrapper,
                )?;
                batch_text.clear();
                if let Some(batch) = batch {
                    let place = |row| json_place(uri, &unwrapper, &batch_lines, row, line);
                    let batch = convert_text(batch, &schema, &mut readers, today, place)?;
                    if !sink.send(batch, uri).await? {
                        return Ok(());
                    }
                }
                batch_lines.clear();
            }
        }
        lines.drain(..start);
    }
    if let Some(batch) = flush_json(
        &mut decoder,
        &batch_text,
        batch_first_line,
        &build,
        uri,
        &unwrapper,
    )? {
        let place = |row| json_place(uri, &unwrapper, &batch_lines, row, line);
        let batch = convert_text(batch, &schema, &mut readers, today, place)?;
        sink.send(batch, uri).await?;
    }
    Ok(())
}

/// Where a batch's row is: its line (or array element), as the reader numbered them.
fn json_place(
    uri: &str,
    unwrapper: &ArrayUnwrapper,
    lines: &[usize],
    row: usize,
    last: usize,
) -> String {
    let at = lines.get(row).copied().unwrap_or(last);
    format!("{uri}, {} {at}", unit(unwrapper))
}

fn unit(unwrapper: &ArrayUnwrapper) -> &'static str {
    if unwrapper.is_array {
        "element"
    } else {
        "line"
    }
}

/// Flushes a JSON batch; when a value does not fit its column, decodes the batch's lines one
/// by one to name the line.
fn flush_json(
    decoder: &mut arrow::json::reader::Decoder,
    batch_text: &[u8],
    first_line: usize,
    build: &dyn Fn() -> Result<arrow::json::reader::Decoder>,
    uri: &str,
    unwrapper: &ArrayUnwrapper,
) -> Result<Option<RecordBatch>> {
    match decoder.flush() {
        Ok(batch) => Ok(batch),
        Err(e) => {
            let mut line = first_line;
            for one in batch_text.split_inclusive(|&b| b == b'\n') {
                if one.iter().all(u8::is_ascii_whitespace) {
                    line += 1;
                    continue;
                }
                let mut single = build()?;
                let failed = single.decode(one).and_then(|_| single.flush());
                if let Err(e) = failed {
                    return Err(Error::Source(format!(
                        "{uri}, {} {line}: {e}",
                        unit(unwrapper)
                    )));
                }
                line += 1;
            }
            Err(Error::Source(format!("{uri}: {e}")))
        }
    }
}

// ParquetObjectReader is deprecated in favour of a hand-written AsyncFileReader; it still
// reads exactly the ranges it needs, which is all this wants.
#[allow(deprecated)]
async fn read_parquet(
    location: &FileLocation,
    part: &FilePart,
    batch_rows: usize,
    sink: &BatchSink<'_>,
    uri: &str,
) -> Result<()> {
    use parquet::arrow::ParquetRecordBatchStreamBuilder;
    use parquet::arrow::async_reader::ParquetObjectReader;
    location.check_unchanged(&part.file).await?;
    let reader = ParquetObjectReader::new(
        location.store().clone(),
        Path::from(part.file.path.as_str()),
    )
    .with_file_size(part.file.size);
    let mut builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| parquet_error(format!("{uri}: not a readable Parquet file"), e))?
        .with_batch_size(batch_rows);
    if let Some((first, end)) = part.row_groups {
        builder = builder.with_row_groups((first..end).collect());
    }
    let mut stream = builder
        .build()
        .map_err(|e| Error::Source(format!("{uri}: {e}")))?;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| parquet_error(uri.to_string(), e))?;
        if !sink.send(batch, uri).await? {
            return Ok(());
        }
    }
    Ok(())
}

/// A file's batch as the job's columns: matched by name, cast losslessly to the job's type,
/// NULL where the file lacks a column.
pub fn conform(batch: RecordBatch, target: &SchemaRef, uri: &str) -> Result<RecordBatch> {
    let rows = batch.num_rows();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        let column = match batch.column_by_name(field.name()) {
            None => new_null_array(field.data_type(), rows),
            Some(c) if c.data_type() == field.data_type() => c.clone(),
            Some(c) => cast_exactly(c, field, uri)?,
        };
        columns.push(column);
    }
    RecordBatch::try_new(target.clone(), columns).map_err(|e| Error::Source(format!("{uri}: {e}")))
}

/// Casts a column, refusing any value the cast would change (an overflow, a nanosecond BigQuery
/// cannot hold) rather than truncating it.
fn cast_exactly(column: &ArrayRef, field: &Field, uri: &str) -> Result<ArrayRef> {
    use arrow::compute::{CastOptions, cast_with_options};
    let name = field.name();
    if let (
        DataType::Timestamp(TimeUnit::Nanosecond, _),
        DataType::Timestamp(TimeUnit::Microsecond, _),
    ) = (column.data_type(), field.data_type())
    {
        let nanos = arrow::compute::cast(column, &DataType::Int64)
            .map_err(|e| Error::Source(format!("{uri}: column {name:?}: {e}")))?;
        let nanos = nanos
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .ok_or_else(|| Error::Source(format!("{uri}: column {name:?}: not a timestamp")))?;
        if let Some(v) = nanos.iter().flatten().find(|v| v % 1000 != 0) {
            return Err(Error::Source(format!(
                "{uri}: column {name:?} holds a timestamp with nanoseconds ({v} ns since the \
                 epoch); BigQuery keeps microseconds, and shardflow does not round"
            )));
        }
    }
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    cast_with_options(column, field.data_type(), &options).map_err(|e| {
        Error::Source(format!(
            "{uri}: column {name:?} ({}) does not load as {}: {e}",
            column.data_type(),
            field.data_type()
        ))
    })
}

/// The column list of a file job, for shard messages.
pub fn source_columns(columns: &[(String, String)]) -> Vec<SourceColumn> {
    columns
        .iter()
        .map(|(name, bigquery_type)| SourceColumn {
            name: name.clone(),
            type_oid: 0,
            type_name: bigquery_type.clone(),
            typmod: -1,
            nullable: true,
        })
        .collect()
}

/// Reads at most `limit` bytes of a text stream (transcoded), and whether the file ended.
pub async fn read_head(
    reader: &mut (dyn AsyncBufRead + Send + Unpin),
    encoding: TextEncoding,
    limit: usize,
    uri: &str,
) -> Result<(Vec<u8>, bool)> {
    let mut out = Vec::with_capacity(limit.min(READ_CHUNK * 4));
    while out.len() < limit {
        if !fill(reader, encoding, &mut out, uri).await? {
            return Ok((out, true));
        }
    }
    Ok((out, false))
}

/// A JSON sample as one value per line (a top-level array unwrapped).
pub(crate) fn json_lines(sample: &[u8]) -> Vec<u8> {
    let mut unwrapper = ArrayUnwrapper::default();
    let mut out = Vec::with_capacity(sample.len());
    unwrapper.feed(sample, &mut out);
    out
}

#[cfg(test)]
mod tests {

    fn unclosed(input: &[u8], chunks: usize) -> Option<u64> {
        let mut scan = QuoteScan::new(b',', b'"');
        let size = input.len().div_ceil(chunks.max(1)).max(1);
        for chunk in input.chunks(size) {
            scan.feed(chunk);
        }
        scan.unclosed_since()
    }

    #[test]
    fn an_open_quoted_field_at_the_end_is_found_with_its_line() {
        for chunks in [1, 2, 5, 64] {
            // Quoted newlines, doubled quotes, a quote inside an unquoted value: all closed.
            let fine = b"id,name\n1,\"two\nlines\"\n2,\"say \"\"hi\"\"\"\n3,5\" screen\n4,\"\"\r\n";
            assert_eq!(unclosed(fine, chunks), None, "{chunks}");
            assert_eq!(
                unclosed(b"id,name\n1,ok\n2,\"abc\n3,def\n", chunks),
                Some(3)
            );
            assert_eq!(unclosed(b"id,name\n1,\"abc", chunks), Some(2));
            // A closing quote followed by more text is not an open field.
            assert_eq!(unclosed(b"a,\"b\"c\n", chunks), None);
            // A doubled quote at the very end leaves the field open.
            assert_eq!(unclosed(b"a,\"b\"\"", chunks), Some(1));
            // A lone `\r` ends a line for the decoder: the quote after it opens a field.
            assert_eq!(unclosed(b"a\r\"x\n2\n3\n", chunks), Some(1));
        }
    }

    use super::*;

    #[test]
    fn locations_come_from_the_bucket_or_the_prefix() {
        assert_eq!(
            split_location(SourceType::Gcs, Some("gs://b"), "data/tx/").unwrap(),
            ("b".into(), "data/tx/".into())
        );
        assert_eq!(
            split_location(SourceType::Gcs, Some("b"), "").unwrap(),
            ("b".into(), "".into())
        );
        assert_eq!(
            split_location(SourceType::Gcs, Some("gs://b/exports"), "daily/").unwrap(),
            ("b".into(), "exports/daily/".into())
        );
        assert_eq!(
            split_location(SourceType::S3, None, "s3://bk/in/x_").unwrap(),
            ("bk".into(), "in/x_".into())
        );
        assert_eq!(
            split_location(
                SourceType::AzureBlob,
                None,
                "abfss://c@acct.dfs.core.windows.net/p/"
            )
            .unwrap(),
            ("c".into(), "p/".into())
        );
        let err = split_location(SourceType::S3, None, "gs://b/x").unwrap_err();
        assert!(
            err.to_string()
                .contains("is a gs:// location, and source_type S3 reads s3:// or s3a://"),
            "{err}"
        );
        let err = split_location(SourceType::Gcs, Some("a"), "gs://b/").unwrap_err();
        assert!(
            err.to_string()
                .contains("names bucket \"b\", and connection_params names \"a\""),
            "{err}"
        );
        let err = split_location(SourceType::Gcs, None, "data/").unwrap_err();
        assert!(
            err.to_string().contains("connection_params.bucket"),
            "{err}"
        );
    }

    #[test]
    fn compression_follows_the_name_unless_told() {
        assert_eq!(
            compression_of(Compression::Auto, "a/b.csv.gz"),
            Compression::Gzip
        );
        assert_eq!(
            compression_of(Compression::Auto, "b.jsonl.zst"),
            Compression::Zstd
        );
        assert_eq!(
            compression_of(Compression::Auto, "b.csv"),
            Compression::None
        );
        assert_eq!(
            compression_of(Compression::None, "b.csv.gz"),
            Compression::None
        );
        assert_eq!(
            compression_of(Compression::Gzip, "b.csv"),
            Compression::Gzip
        );
    }

    #[test]
    fn latin1_becomes_utf8() {
        let mut out = Vec::new();
        transcode(b"caf\xe9 \xff", TextEncoding::Latin1, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "café ÿ");
    }

    #[test]
    fn pretty_printed_json_arrays_come_out_one_element_a_line() {
        let text = b"[\n  {\n    \"id\": 1,\n    \"name\": \"a\\nb\",\n    \"tags\": [\n      1,\n      2\n    ]\n  },\n  {\"id\": 2}\n]\n";
        let lines = json_lines(text);
        let lines: Vec<serde_json::Value> = lines
            .split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                serde_json::json!({"id": 1, "name": "a\nb", "tags": [1, 2]}),
                serde_json::json!({"id": 2}),
            ]
        );
    }

    #[test]
    fn json_arrays_unwrap_into_lines_across_chunks() {
        let text = br#" [ {"a": [1, 2], "s": "x,]\"y"},
          {"a": [], "s": "{"} ] "#;
        let mut whole = Vec::new();
        ArrayUnwrapper::default().feed(text, &mut whole);
        let mut parts = Vec::new();
        let mut u = ArrayUnwrapper::default();
        for chunk in text.chunks(3) {
            u.feed(chunk, &mut parts);
        }
        assert_eq!(whole, parts);
        let lines: Vec<&str> = std::str::from_utf8(&whole)
            .unwrap()
            .lines()
            .map(str::trim)
            .collect();
        assert_eq!(
            lines,
            vec![r#"{"a": [1, 2], "s": "x,]\"y"}"#, r#"{"a": [], "s": "{"}"#]
        );
        let mut plain = Vec::new();
        ArrayUnwrapper::default().feed(b"{\"a\":1}\n{\"a\":2}\n", &mut plain);
        assert_eq!(plain, b"{\"a\":1}\n{\"a\":2}\n");
    }

    #[test]
    fn csv_errors_name_the_line() {
        let e = arrow::error::ArrowError::CsvError(
            "incorrect number of fields for line 3, expected 2 got 1".into(),
        );
        assert_eq!(
            csv_error("gs://b/x.csv", &e).to_string(),
            "gs://b/x.csv, line 3: incorrect number of fields for line 3, expected 2 got 1"
        );
        let e = arrow::error::ArrowError::ParseError(
            "Error while parsing value 'abc' as type 'Int64' for column 1 at line 4. Row data: '[4,abc]'".into(),
        );
        assert_eq!(
            csv_error("gs://b/x.csv", &e).to_string(),
            "gs://b/x.csv, line 5: cannot parse value 'abc' as type 'Int64' for column 1"
        );
        // A timestamp on the third line of the file (the header is record 0).
        let e = arrow::error::ArrowError::ParseError(
            "Error parsing column 1 at line 2: Parser error: Error parsing timestamp from 'notadate': timestamp must contain at least 10 characters".into(),
        );
        assert_eq!(
            csv_error("gs://b/x.csv", &e).to_string(),
            "gs://b/x.csv, line 3: column 1: Error parsing timestamp from 'notadate': timestamp \
             must contain at least 10 characters"
        );
    }
}
