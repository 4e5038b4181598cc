//! Where a file job's files live: the store (GCS, S3, Azure Blob, local disk) its
//! connection parameters open, listing by prefix and pattern, and reading a file's head.

use super::*;

/// Where a file job's files live: a store, and the path every listing starts from.
pub struct FileLocation {
    pub(super) store: Arc<dyn ObjectStore>,
    /// The bucket or container, for a cloud store.
    pub(super) bucket: Option<String>,
    /// The job reaches the store with credentials (or an endpoint) of its own, not the
    /// platform's.
    pub(super) own_access: bool,
    /// The endpoint `connection_params` names, if any.
    pub(super) endpoint: Option<String>,
    /// `gs://bucket`, `s3://bucket`, `az://container` or `file://<base>`: prefixes URIs.
    pub(super) root: String,
    /// `file_path_prefix` inside the store (no leading slash).
    pub(super) prefix: String,
    pub(super) pattern: globset::GlobMatcher,
    pub spec: FileSpec,
}

/// Connection parameter names each setting is read from, first found wins.
pub(super) const BUCKET_KEYS: &[&str] = &[
    "bucket",
    "bucket_name",
    "bucket_path",
    "container",
    "container_name",
];

/// Connection parameters that give a job its own way into its store.
pub(super) const OWN_ACCESS_KEYS: &[&str] = &[
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

pub(super) fn param<'a>(spec: &'a JobSpec, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .filter_map(|k| spec.connection.other.get(*k))
        .map(|s| s.expose().trim())
        .find(|s| !s.is_empty())
}

/// The URL schemes each source type's locations may be written with.
pub(super) fn schemes(source: SourceType) -> &'static [&'static str] {
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
            .files()
            .cloned()
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

    pub(super) fn changed(&self, file: &FileInfo) -> Error {
        Error::Source(format!(
            "{} changed after the run was planned; the run reads nothing of it and its new \
             content is loaded by the next run",
            self.uri(&file.path)
        ))
    }

    pub(super) fn read_error(&self, file: &FileInfo, e: object_store::Error) -> Error {
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
pub(super) fn store_error(context: String, e: object_store::Error) -> Error {
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
pub(super) fn read_io_error(uri: &str, e: std::io::Error) -> Error {
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
pub(super) fn local_root(base: &str, prefix: &str) -> Result<(String, String)> {
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

pub(super) fn gcs_store(spec: &JobSpec, bucket: &str) -> Result<GcsStore> {
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
pub(super) fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Eof => "truncated",
    }
}

pub(super) fn s3_store(spec: &JobSpec, bucket: &str) -> Result<object_store::aws::AmazonS3> {
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

pub(super) fn azure_store(
    spec: &JobSpec,
    container: &str,
) -> Result<object_store::azure::MicrosoftAzure> {
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
