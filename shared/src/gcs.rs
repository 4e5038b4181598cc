//! An `ObjectStore` over the GCS JSON API: media and resumable uploads, `alt=media` downloads,
//! paged listing, delete and rewrite. object_store's own GCS client speaks the XML API, which
//! no GCS emulator accepts; the JSON API is what real GCS, fake-gcs-server and
//! gcp-storage-emulator all serve, so the code the tests run is the code production runs.
//! Only the base URL and the credentials differ (`STORAGE_EMULATOR_HOST`: anonymous).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream};
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{
    Attributes, CopyMode, CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload,
    ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode, PutMultipartOptions, PutOptions,
    PutPayload, PutResult, UploadPart,
};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use tokio::sync::watch;

const STORE: &str = "GCS";
const PRODUCTION_BASE: &str = "https://storage.googleapis.com";

/// The Cloud Storage this process reaches with its own identity: the emulator named by
/// `STORAGE_EMULATOR_HOST`, else Google's.
pub fn default_base() -> String {
    crate::staging::storage_emulator_url().unwrap_or_else(|| PRODUCTION_BASE.to_string())
}
const READ_WRITE_SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";
/// Resumable uploads take chunks in multiples of 256 KiB, but for the last.
const CHUNK_ALIGN: usize = 256 * 1024;
/// Transient failures (429, 5xx, a dropped connection) are retried this many times.
const RETRIES: usize = 4;
/// Deletes of a run's staging go out this many at a time.
const DELETE_CONCURRENCY: usize = 16;

/// How requests are authorised.
#[derive(Clone)]
pub enum GcsAuth {
    /// No credentials: an emulator.
    Anonymous,
    /// Google credentials (ADC, a service account key, workload identity).
    Google(google_cloud_auth::credentials::Credentials),
}

impl fmt::Debug for GcsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GcsAuth::Anonymous => "Anonymous",
            GcsAuth::Google(_) => "Google",
        })
    }
}

#[derive(Clone, Debug)]
pub struct GcsStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    /// `https://storage.googleapis.com` or an emulator's URL, without a trailing slash.
    base: String,
    bucket: String,
    auth: GcsAuth,
}

impl fmt::Display for GcsStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GcsStore(gs://{})", self.inner.bucket)
    }
}

impl GcsStore {
    pub fn new(base: &str, bucket: &str, auth: GcsAuth) -> Self {
        GcsStore {
            inner: Arc::new(Inner {
                http: reqwest::Client::new(),
                base: base.trim_end_matches('/').to_string(),
                bucket: bucket.to_string(),
                auth,
            }),
        }
    }

    /// The emulator named by `STORAGE_EMULATOR_HOST`, else real GCS with the platform's
    /// default credentials (ADC, workload identity).
    pub fn from_env(bucket: &str) -> object_store::Result<Self> {
        if let Some(base) = crate::staging::storage_emulator_url() {
            return Ok(Self::new(&base, bucket, GcsAuth::Anonymous));
        }
        let credentials = google_cloud_auth::credentials::Builder::default()
            .with_scopes([READ_WRITE_SCOPE])
            .build()
            .map_err(|e| generic(format!("no Google credentials for GCS: {e}")))?;
        Ok(Self::new(
            PRODUCTION_BASE,
            bucket,
            GcsAuth::Google(credentials),
        ))
    }

    pub fn bucket(&self) -> &str {
        &self.inner.bucket
    }
}

impl Inner {
    /// `{base}/{segments…}`, each segment percent-encoded whole (an object name's `/` too,
    /// as the JSON API wants).
    fn url(&self, segments: &[&str]) -> object_store::Result<Url> {
        let mut url = Url::parse(&self.base)
            .map_err(|e| generic(format!("bad GCS base URL {}: {e}", self.base)))?;
        url.path_segments_mut()
            .map_err(|()| generic(format!("bad GCS base URL {}", self.base)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn object_url(&self, location: &Path) -> object_store::Result<Url> {
        self.url(&["storage", "v1", "b", &self.bucket, "o", location.as_ref()])
    }

    fn upload_url(&self) -> object_store::Result<Url> {
        self.url(&["upload", "storage", "v1", "b", &self.bucket, "o"])
    }

    /// An upload answered 404: the bucket is what is missing, not the object.
    fn missing_bucket(&self, e: object_store::Error) -> object_store::Error {
        match e {
            object_store::Error::NotFound { path, source } => generic(format!(
                "bucket gs://{} does not exist or is not visible to these credentials \
                 (writing {path}): {source}",
                self.bucket
            )),
            e => e,
        }
    }

    async fn request(
        &self,
        method: Method,
        url: Url,
    ) -> object_store::Result<reqwest::RequestBuilder> {
        let mut request = self.http.request(method, url);
        if let GcsAuth::Google(credentials) = &self.auth {
            let headers = match credentials
                .headers(hyper::http::Extensions::new())
                .await
                .map_err(|e| object_store::Error::Unauthenticated {
                    path: format!("gs://{}", self.bucket),
                    source: Box::new(e),
                })? {
                google_cloud_auth::credentials::CacheableResource::New { data, .. } => data,
                google_cloud_auth::credentials::CacheableResource::NotModified => {
                    return Err(generic("GCS credentials returned no headers".into()));
                }
            };
            request = request.headers(headers);
        }
        Ok(request)
    }

    /// Sends a request built by `build`, retrying transient failures; any other non-success
    /// status becomes the matching `object_store` error for `path`.
    async fn send<F, Fut>(&self, path: &str, build: F) -> object_store::Result<reqwest::Response>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = object_store::Result<reqwest::RequestBuilder>>,
    {
        let attempt = || async {
            let response = build().await?.send().await.map_err(Attempt::transport)?;
            let status = response.status();
            if status.is_success() || status == StatusCode::PERMANENT_REDIRECT {
                return Ok(response);
            }
            let body = response.text().await.unwrap_or_default();
            Err(Attempt::Status(status, body))
        };
        attempt
            .retry(backoff())
            .when(Attempt::is_transient)
            .notify(
                |e, delay| tracing::warn!(error = %e, ?delay, path, "GCS request failed; retrying"),
            )
            .await
            .map_err(|e| e.into_error(path))
    }
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(8))
        .with_max_times(RETRIES)
        .with_jitter()
}

/// One request's failure, before it becomes an `object_store::Error`.
#[derive(Debug)]
enum Attempt {
    Status(StatusCode, String),
    Transport(String, bool),
    Store(object_store::Error),
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attempt::Status(status, body) => write!(f, "HTTP {status}: {}", excerpt(body)),
            Attempt::Transport(text, _) => f.write_str(text),
            Attempt::Store(e) => e.fmt(f),
        }
    }
}

impl From<object_store::Error> for Attempt {
    fn from(e: object_store::Error) -> Self {
        Attempt::Store(e)
    }
}

impl Attempt {
    fn transport(e: reqwest::Error) -> Self {
        // A request that never got an answer may be retried; a malformed one may not.
        let transient = e.is_connect() || e.is_timeout() || e.is_request() || e.is_body();
        // The peer (scheme, host and port: the path is the object's, named by the caller)
        // and the cause, not reqwest's "error sending request for url (…)".
        let peer = e
            .url()
            .map(|url| format!("GCS at {}", url.origin().ascii_serialization()))
            .unwrap_or_else(|| "GCS".into());
        Attempt::Transport(format!("{peer}: {}", crate::net::cause(&e)), transient)
    }

    fn is_transient(&self) -> bool {
        match self {
            Attempt::Status(status, _) => {
                *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || status.is_server_error()
            }
            Attempt::Transport(_, transient) => *transient,
            Attempt::Store(_) => false,
        }
    }

    fn into_error(self, path: &str) -> object_store::Error {
        let (status, text) = match self {
            Attempt::Store(e) => return e,
            Attempt::Transport(text, _) => return generic(format!("{path}: {text}")),
            Attempt::Status(status, body) => (status, format!("HTTP {status}: {}", excerpt(&body))),
        };
        let path = path.to_string();
        let source = text.into();
        match status {
            StatusCode::NOT_FOUND => object_store::Error::NotFound { path, source },
            StatusCode::PRECONDITION_FAILED => object_store::Error::Precondition { path, source },
            StatusCode::NOT_MODIFIED => object_store::Error::NotModified { path, source },
            StatusCode::UNAUTHORIZED => object_store::Error::Unauthenticated { path, source },
            StatusCode::FORBIDDEN => object_store::Error::PermissionDenied { path, source },
            _ => object_store::Error::Generic {
                store: STORE,
                source: format!("{path}: {source}").into(),
            },
        }
    }
}

/// The start of an error body: GCS answers with JSON or HTML that can be long.
fn excerpt(body: &str) -> &str {
    let body = body.trim();
    match body.char_indices().nth(300) {
        Some((at, _)) => &body[..at],
        None => body,
    }
}

fn generic(text: String) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: text.into(),
    }
}

/// The object resource fields we read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectResource {
    name: String,
    /// The JSON API sends int64 as strings.
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    updated: Option<String>,
    #[serde(default)]
    time_created: Option<String>,
    #[serde(default)]
    etag: Option<String>,
    #[serde(default)]
    generation: Option<String>,
}

impl ObjectResource {
    fn meta(&self) -> object_store::Result<ObjectMeta> {
        let size = match self.size.as_deref() {
            Some(s) => s
                .parse()
                .map_err(|_| generic(format!("{}: size \"{s}\" is not a number", self.name)))?,
            None => 0,
        };
        let stamp = self.updated.as_deref().or(self.time_created.as_deref());
        let last_modified = match stamp {
            Some(s) => DateTime::parse_from_rfc3339(s)
                .map_err(|e| generic(format!("{}: updated \"{s}\": {e}", self.name)))?
                .with_timezone(&Utc),
            None => DateTime::<Utc>::UNIX_EPOCH,
        };
        Ok(ObjectMeta {
            location: Path::parse(&self.name)?,
            last_modified,
            size,
            e_tag: self.etag.clone(),
            version: self.generation.clone(),
        })
    }

    fn put_result(&self) -> PutResult {
        PutResult {
            e_tag: self.etag.clone(),
            version: self.generation.clone(),
            extensions: Default::default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectList {
    #[serde(default)]
    items: Vec<ObjectResource>,
    #[serde(default)]
    prefixes: Vec<String>,
    #[serde(default)]
    next_page_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RewriteResponse {
    done: bool,
    #[serde(default)]
    rewrite_token: Option<String>,
}

async fn json<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    path: &str,
) -> object_store::Result<T> {
    let body = response.bytes().await.map_err(|e| {
        generic(format!(
            "{path}: reading the answer: {}",
            crate::net::cause(&e)
        ))
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        generic(format!(
            "{path}: unexpected answer from GCS ({e}): {}",
            excerpt(&String::from_utf8_lossy(&body))
        ))
    })
}

/// The preconditions of a write, as JSON API query parameters.
fn put_preconditions(mode: &PutMode) -> object_store::Result<Vec<(&'static str, String)>> {
    Ok(match mode {
        PutMode::Overwrite => Vec::new(),
        PutMode::Create => vec![("ifGenerationMatch", "0".to_string())],
        PutMode::Update(version) => {
            let generation = version.version.clone().ok_or_else(|| {
                generic("a conditional GCS update needs the object's generation".into())
            })?;
            vec![("ifGenerationMatch", generation)]
        }
    })
}

/// A `Range` header for a download, and the byte range it yields of an object of `size`.
fn range_header(range: &GetRange, size: u64) -> object_store::Result<(String, Range<u64>)> {
    let bytes = range
        .as_range(size)
        .map_err(|e| generic(format!("invalid range {range}: {e}")))?;
    Ok((
        format!("bytes={}-{}", bytes.start, bytes.end.saturating_sub(1)),
        bytes,
    ))
}

/// What `buckets.get` says of a bucket's place.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BucketInfo {
    /// `US`, `EU`, `US-CENTRAL1`, `NAM4`, …
    pub location: String,
    /// `multi-region`, `dual-region` or `region`.
    #[serde(default)]
    pub location_type: Option<String>,
}

/// One live generation of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectVersion {
    pub generation: String,
    pub size: u64,
    /// When this generation was written (`timeCreated`: each generation is a new object).
    pub time_created: DateTime<Utc>,
}

impl GcsStore {
    /// `buckets.get`: where the bucket is. Needs `storage.buckets.get`.
    pub async fn bucket_info(&self) -> object_store::Result<BucketInfo> {
        let inner = &self.inner;
        let url = inner.url(&["storage", "v1", "b", &inner.bucket])?;
        let what = format!("gs://{}", inner.bucket);
        let response = inner
            .send(&what, || inner.request(Method::GET, url.clone()))
            .await?;
        json::<BucketInfo>(response, &what).await
    }

    /// The live generation of an object (`objects.get`, metadata only).
    pub async fn object_version(&self, location: &Path) -> object_store::Result<ObjectVersion> {
        let inner = &self.inner;
        let url = inner.object_url(location)?;
        let response = inner
            .send(location.as_ref(), || {
                inner.request(Method::GET, url.clone())
            })
            .await?;
        let resource = json::<ObjectResource>(response, location.as_ref()).await?;
        let meta = resource.meta()?;
        let created = resource.time_created.as_deref().unwrap_or_default();
        Ok(ObjectVersion {
            generation: meta
                .version
                .clone()
                .ok_or_else(|| generic(format!("{location}: GCS reported no generation")))?,
            size: meta.size,
            time_created: DateTime::parse_from_rfc3339(created)
                .map_err(|e| generic(format!("{location}: timeCreated \"{created}\": {e}")))?
                .with_timezone(&Utc),
        })
    }

    async fn metadata(&self, location: &Path) -> object_store::Result<ObjectMeta> {
        let inner = &self.inner;
        let url = inner.object_url(location)?;
        let response = inner
            .send(location.as_ref(), || {
                inner.request(Method::GET, url.clone())
            })
            .await?;
        json::<ObjectResource>(response, location.as_ref())
            .await?
            .meta()
    }

    async fn delete_one(&self, location: &Path) -> object_store::Result<()> {
        let inner = &self.inner;
        let url = inner.object_url(location)?;
        match inner
            .send(location.as_ref(), || {
                inner.request(Method::DELETE, url.clone())
            })
            .await
        {
            Ok(_) => Ok(()),
            // A retried delete whose first attempt went through finds nothing: that is done.
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One page of a listing.
    async fn list_page(
        &self,
        prefix: Option<&Path>,
        delimiter: bool,
        page_token: Option<&str>,
    ) -> object_store::Result<ObjectList> {
        let inner = &self.inner;
        let mut url = inner.url(&["storage", "v1", "b", &inner.bucket, "o"])?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(prefix) = prefix.filter(|p| !p.as_ref().is_empty()) {
                query.append_pair("prefix", &format!("{prefix}/"));
            }
            if delimiter {
                query.append_pair("delimiter", "/");
            }
            if let Some(token) = page_token {
                query.append_pair("pageToken", token);
            }
        }
        let what = format!(
            "gs://{}/{}",
            inner.bucket,
            prefix.map(|p| p.as_ref()).unwrap_or("")
        );
        let response = inner
            .send(&what, || inner.request(Method::GET, url.clone()))
            .await?;
        json(response, &what).await
    }
}

#[async_trait]
impl ObjectStore for GcsStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let inner = &self.inner;
        let mut url = inner.upload_url()?;
        url.query_pairs_mut()
            .append_pair("uploadType", "media")
            .append_pair("name", location.as_ref())
            .extend_pairs(put_preconditions(&opts.mode)?);
        let body = Bytes::from(payload);
        let response = inner
            .send(location.as_ref(), || async {
                Ok(inner
                    .request(Method::POST, url.clone())
                    .await?
                    .header("content-type", "application/octet-stream")
                    .body(body.clone()))
            })
            .await
            .map_err(|e| match (e, &opts.mode) {
                (object_store::Error::Precondition { path, source }, PutMode::Create) => {
                    object_store::Error::AlreadyExists { path, source }
                }
                (e, _) => inner.missing_bucket(e),
            })?;
        Ok(json::<ObjectResource>(response, location.as_ref())
            .await?
            .put_result())
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = &self.inner;
        let mut url = inner.upload_url()?;
        url.query_pairs_mut()
            .append_pair("uploadType", "resumable")
            .append_pair("name", location.as_ref());
        let response = inner
            .send(location.as_ref(), || async {
                Ok(inner
                    .request(Method::POST, url.clone())
                    .await?
                    .header("x-upload-content-type", "application/octet-stream")
                    .header("content-length", "0"))
            })
            .await
            .map_err(|e| inner.missing_bucket(e))?;
        let session = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Url::parse(v).ok())
            .ok_or_else(|| {
                generic(format!(
                    "{location}: GCS started a resumable upload without a session URL"
                ))
            })?;
        let (committed, _) = watch::channel(Committed::Upto(0));
        Ok(Box::new(ResumableUpload {
            session: Arc::new(Session {
                store: self.clone(),
                url: session,
                path: location.to_string(),
                committed,
            }),
            carry: BytesMut::new(),
            assigned: 0,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        // The metadata first: it checks the preconditions and pins the generation, so the
        // bytes read are those of the object described even if it is replaced meanwhile.
        let meta = self.metadata(location).await?;
        options.check_preconditions(&meta)?;
        if let Some(version) = &options.version
            && meta.version.as_ref() != Some(version)
        {
            return Err(object_store::Error::NotFound {
                path: location.to_string(),
                source: format!("generation {version} is not the live one").into(),
            });
        }
        let (header, range) = match &options.range {
            Some(range) => {
                let (header, bytes) = range_header(range, meta.size)?;
                (Some(header), bytes)
            }
            None => (None, 0..meta.size),
        };
        if options.head || range.is_empty() {
            return Ok(GetResult {
                payload: GetResultPayload::Stream(stream::empty().boxed()),
                meta,
                range,
                attributes: Attributes::default(),
                extensions: Default::default(),
            });
        }
        let inner = &self.inner;
        let mut url = inner.object_url(location)?;
        url.query_pairs_mut().append_pair("alt", "media");
        if let Some(generation) = &meta.version {
            url.query_pairs_mut().append_pair("generation", generation);
        }
        let response = inner
            .send(location.as_ref(), || async {
                let request = inner.request(Method::GET, url.clone()).await?;
                Ok(match &header {
                    Some(h) => request.header("range", h.as_str()),
                    None => request,
                })
            })
            .await?;
        let path = location.to_string();
        let body = stream::try_unfold(response, move |mut response| {
            let path = path.clone();
            async move {
                match response.chunk().await {
                    Ok(Some(chunk)) => Ok(Some((chunk, response))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(generic(format!("{path}: reading: {e}"))),
                }
            }
        });
        Ok(GetResult {
            payload: GetResultPayload::Stream(body.boxed()),
            meta,
            range,
            attributes: Attributes::default(),
            extensions: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let store = self.clone();
        locations
            .map(move |location| {
                let store = store.clone();
                async move {
                    let location = location?;
                    store.delete_one(&location).await?;
                    Ok(location)
                }
            })
            .buffered(DELETE_CONCURRENCY)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let store = self.clone();
        let prefix = prefix.cloned();
        // (next page token, done) — the first page has no token.
        stream::try_unfold((None::<String>, false), move |(token, done)| {
            let store = store.clone();
            let prefix = prefix.clone();
            async move {
                if done {
                    return Ok::<_, object_store::Error>(None);
                }
                let page = store
                    .list_page(prefix.as_ref(), false, token.as_deref())
                    .await?;
                let metas = page
                    .items
                    .iter()
                    .map(ObjectResource::meta)
                    .collect::<object_store::Result<Vec<_>>>()?;
                let done = page.next_page_token.is_none();
                Ok(Some((
                    stream::iter(metas.into_iter().map(Ok)),
                    (page.next_page_token, done),
                )))
            }
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let mut result = ListResult {
            common_prefixes: Vec::new(),
            objects: Vec::new(),
            extensions: Default::default(),
        };
        let mut token = None;
        loop {
            let page = self.list_page(prefix, true, token.as_deref()).await?;
            for item in &page.items {
                result.objects.push(item.meta()?);
            }
            for p in &page.prefixes {
                result
                    .common_prefixes
                    .push(Path::parse(p.trim_end_matches('/'))?);
            }
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => return Ok(result),
            }
        }
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let inner = &self.inner;
        let bucket = inner.bucket.as_str();
        let mut token: Option<String> = None;
        // A rewrite of a large object may take several calls, each resuming with its token.
        loop {
            let mut url = inner.url(&[
                "storage",
                "v1",
                "b",
                bucket,
                "o",
                from.as_ref(),
                "rewriteTo",
                "b",
                bucket,
                "o",
                to.as_ref(),
            ])?;
            {
                let mut query = url.query_pairs_mut();
                if options.mode == CopyMode::Create {
                    query.append_pair("ifGenerationMatch", "0");
                }
                if let Some(t) = &token {
                    query.append_pair("rewriteToken", t);
                }
            }
            let response = inner
                .send(from.as_ref(), || async {
                    Ok(inner
                        .request(Method::POST, url.clone())
                        .await?
                        .header("content-length", "0"))
                })
                .await
                .map_err(|e| match e {
                    object_store::Error::Precondition { source, .. } => {
                        object_store::Error::AlreadyExists {
                            path: to.to_string(),
                            source,
                        }
                    }
                    e => e,
                })?;
            let answer: RewriteResponse = json(response, from.as_ref()).await?;
            if answer.done {
                return Ok(());
            }
            token = Some(answer.rewrite_token.ok_or_else(|| {
                generic(format!(
                    "{from}: an unfinished rewrite came without a token"
                ))
            })?);
        }
    }
}

/// How far a resumable upload's bytes have been accepted, shared by the chunk uploads so they
/// go out in order (object_store runs an upload's parts concurrently; GCS takes them in order).
#[derive(Clone, Debug, PartialEq)]
enum Committed {
    Upto(u64),
    Failed(String),
}

#[derive(Debug)]
struct Session {
    store: GcsStore,
    url: Url,
    path: String,
    committed: watch::Sender<Committed>,
}

impl Session {
    /// Waits for every byte before `offset` to be accepted.
    async fn wait_for(&self, offset: u64) -> object_store::Result<()> {
        let mut rx = self.committed.subscribe();
        let state = rx
            .wait_for(|c| matches!(c, Committed::Failed(_)) || *c == Committed::Upto(offset))
            .await
            .map_err(|_| generic(format!("{}: upload abandoned", self.path)))?
            .clone();
        match state {
            Committed::Failed(why) => Err(generic(format!(
                "{}: an earlier chunk of this upload failed: {why}",
                self.path
            ))),
            Committed::Upto(_) => Ok(()),
        }
    }

    /// Sends `chunk` at `offset` (the last one when `total` is known), resuming from what GCS
    /// says it kept when a request fails midway. The object resource when the upload is done.
    async fn send_chunk(
        &self,
        offset: u64,
        chunk: Bytes,
        total: Option<u64>,
    ) -> object_store::Result<Option<ObjectResource>> {
        let end = offset + chunk.len() as u64;
        let mut from = offset;
        let mut failures = 0usize;
        loop {
            let range = match (from < end, total) {
                (true, Some(total)) => format!("bytes {from}-{}/{total}", end - 1),
                (true, None) => format!("bytes {from}-{}/*", end - 1),
                (false, Some(total)) => format!("bytes */{total}"),
                (false, None) => return Ok(None),
            };
            let body = chunk.slice((from - offset) as usize..);
            let sent = self
                .store
                .inner
                .request(Method::PUT, self.url.clone())
                .await?
                .header("content-range", range)
                .body(body)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) if failures < RETRIES => {
                    failures += 1;
                    tracing::warn!(error = %e, path = self.path, "GCS chunk upload failed; resuming");
                    tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                    from = self.accepted_after_failure(from).await?.max(offset);
                    continue;
                }
                Err(e) => return Err(generic(format!("{}: uploading: {e}", self.path))),
            };
            let status = response.status();
            if status == StatusCode::PERMANENT_REDIRECT {
                // 308 Resume Incomplete: GCS kept bytes 0..=N.
                let kept = kept_bytes(response.headers());
                if total.is_none() && kept >= end {
                    return Ok(None);
                }
                // GCS kept less than was sent (or the last chunk did not finish): resend the rest.
                if failures >= RETRIES {
                    return Err(generic(format!(
                        "{}: GCS holds {kept} of {} bytes after {RETRIES} resends",
                        self.path,
                        total.unwrap_or(end)
                    )));
                }
                failures += 1;
                from = kept.clamp(offset, end);
                continue;
            }
            if status.is_success() {
                return json(response, &self.path).await.map(Some);
            }
            let body = response.text().await.unwrap_or_default();
            let attempt = Attempt::Status(status, body);
            if attempt.is_transient() && failures < RETRIES {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                from = self.accepted_after_failure(from).await?.max(offset);
                continue;
            }
            return Err(attempt.into_error(&self.path));
        }
    }

    /// After a failed chunk request: how many bytes GCS holds (a status query).
    async fn accepted_after_failure(&self, fallback: u64) -> object_store::Result<u64> {
        let answer = self
            .store
            .inner
            .request(Method::PUT, self.url.clone())
            .await?
            .header("content-range", "bytes */*")
            .header("content-length", "0")
            .send()
            .await;
        Ok(match answer {
            Ok(r) if r.status() == StatusCode::PERMANENT_REDIRECT => kept_bytes(r.headers()),
            _ => fallback,
        })
    }
}

/// The `Range: bytes=0-N` of a 308 answer, as the count of bytes kept (0 when absent).
fn kept_bytes(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes=0-"))
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(0, |last| last + 1)
}

/// An object uploaded in chunks through a resumable session.
#[derive(Debug)]
struct ResumableUpload {
    session: Arc<Session>,
    /// Bytes not yet sent: the tail of the parts that does not fill a 256 KiB multiple.
    carry: BytesMut,
    /// Bytes handed to chunk uploads so far.
    assigned: u64,
}

#[async_trait]
impl MultipartUpload for ResumableUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        for bytes in &data {
            self.carry.extend_from_slice(bytes);
        }
        let ready = self.carry.len() / CHUNK_ALIGN * CHUNK_ALIGN;
        if ready == 0 {
            return Box::pin(futures::future::ready(Ok(())));
        }
        let chunk = self.carry.split_to(ready).freeze();
        let offset = self.assigned;
        self.assigned += ready as u64;
        let session = self.session.clone();
        Box::pin(async move {
            session.wait_for(offset).await?;
            match session.send_chunk(offset, chunk, None).await {
                Ok(_) => {
                    session
                        .committed
                        .send_replace(Committed::Upto(offset + ready as u64));
                    Ok(())
                }
                Err(e) => {
                    session
                        .committed
                        .send_replace(Committed::Failed(e.to_string()));
                    Err(e)
                }
            }
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let session = self.session.clone();
        session.wait_for(self.assigned).await?;
        let last = std::mem::take(&mut self.carry).freeze();
        let total = self.assigned + last.len() as u64;
        let object = session
            .send_chunk(self.assigned, last, Some(total))
            .await?
            .ok_or_else(|| generic(format!("{}: GCS did not finish the upload", session.path)))?;
        Ok(object.put_result())
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        // GCS cancels a session on DELETE (answering 499); nothing was written.
        let _ = self
            .session
            .store
            .inner
            .request(Method::DELETE, self.session.url.clone())
            .await?
            .send()
            .await;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use object_store::ObjectStoreExt as _;

    const START: &str = "start the emulators with eval \"$(bash tests/emulators.sh start)\"";

    /// A new bucket on the GCS emulator; fails (never skips) when the emulator is not there.
    pub(crate) async fn emulator_bucket() -> String {
        let Some(base) = crate::staging::storage_emulator_url() else {
            panic!("STORAGE_EMULATOR_HOST is not set: {START}");
        };
        let bucket = format!("sf-{}", uuid::Uuid::new_v4().simple());
        let project = std::env::var("GCP_PROJECT_ID").unwrap_or_else(|_| "test-proj".into());
        let response = reqwest::Client::new()
            .post(format!("{base}/storage/v1/b?project={project}"))
            .json(&serde_json::json!({ "name": bucket }))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("the GCS emulator at {base} does not answer ({e}): {START}")
            });
        assert!(
            response.status().is_success(),
            "creating bucket {bucket}: {}",
            response.status()
        );
        bucket
    }

    /// An object's bytes as a plain HTTP client downloads them, or None when it is absent.
    pub(crate) async fn read_raw(bucket: &str, name: &str) -> Option<Vec<u8>> {
        let base = crate::staging::storage_emulator_url().expect("STORAGE_EMULATOR_HOST");
        let store = GcsStore::new(&base, bucket, GcsAuth::Anonymous);
        let mut url = store.inner.object_url(&Path::from(name)).unwrap();
        url.query_pairs_mut().append_pair("alt", "media");
        let response = reqwest::get(url).await.unwrap();
        match response.status() {
            StatusCode::NOT_FOUND => None,
            s if s.is_success() => Some(response.bytes().await.unwrap().to_vec()),
            s => panic!("downloading {name}: {s}"),
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 249) as u8 ^ seed).collect()
    }

    /// A GCS that does not answer is named (scheme, host, port) with the cause, after the
    /// retries a transient failure gets.
    #[tokio::test]
    async fn an_unreachable_gcs_is_named_with_the_cause() {
        let port = crate::net::closed_port();
        let store = GcsStore::new(&format!("http://127.0.0.1:{port}"), "b", GcsAuth::Anonymous);
        let err = store
            .head(&Path::from("run/part-00000.parquet"))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "run/part-00000.parquet: GCS at http://127.0.0.1:{port}: connection refused \
                 (nothing listens there)"
            )),
            "{text}"
        );
    }

    /// Every operation the pipeline uses, against the emulator over the JSON API.
    #[tokio::test]
    async fn the_json_api_store_round_trips_against_the_emulator() {
        let bucket = emulator_bucket().await;
        let store = GcsStore::from_env(&bucket).unwrap();

        // Small objects, names with spaces and unicode.
        let odd = Path::from("dir a/ünï cödé 🚀.bin");
        store
            .put(&odd, PutPayload::from(pattern(1000, 1)))
            .await
            .unwrap();
        let got = store.get(&odd).await.unwrap();
        assert_eq!(got.meta.size, 1000);
        assert_eq!(got.meta.location, odd);
        assert!(got.meta.version.is_some(), "the generation is the version");
        assert_eq!(
            got.bytes().await.unwrap().as_ref(),
            pattern(1000, 1).as_slice()
        );
        assert_eq!(
            store.get_range(&odd, 10..20).await.unwrap().as_ref(),
            &pattern(1000, 1)[10..20]
        );
        assert_eq!(store.head(&odd).await.unwrap().size, 1000);

        // Resumable uploads: parts that are not 256 KiB multiples, run concurrently by
        // object_store, must land in order; an empty upload is an empty object.
        for (name, part_sizes) in [
            ("big/a.bin", vec![300_000, 1, 700_000, 262_144, 5]),
            ("big/b.bin", vec![3 * 262_144]),
            ("big/empty.bin", vec![]),
        ] {
            let mut upload = store.put_multipart(&Path::from(name)).await.unwrap();
            let mut expected = Vec::new();
            let mut pending = Vec::new();
            for (i, size) in part_sizes.iter().enumerate() {
                let part = pattern(*size, i as u8);
                expected.extend_from_slice(&part);
                pending.push(tokio::spawn(upload.put_part(PutPayload::from(part))));
            }
            // Parts finish in any order.
            for p in pending.into_iter().rev() {
                p.await.unwrap().unwrap();
            }
            upload.complete().await.unwrap();
            let read = store
                .get(&Path::from(name))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert!(
                read.as_ref() == expected.as_slice(),
                "{name}: {} bytes back",
                read.len()
            );
            assert_eq!(read_raw(&bucket, name).await, Some(expected));
        }

        // Listing: recursive and by level.
        use futures::TryStreamExt;
        let mut all: Vec<String> = store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        all.sort();
        assert_eq!(
            all,
            ["big/a.bin", "big/b.bin", "big/empty.bin", odd.as_ref()]
        );
        let under_big: Vec<(String, u64)> = store
            .list(Some(&Path::from("big")))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(under_big.len(), 3);
        assert!(under_big.contains(&("big/empty.bin".to_string(), 0)));
        let top = store.list_with_delimiter(None).await.unwrap();
        assert!(top.objects.is_empty());
        let mut prefixes: Vec<String> = top.common_prefixes.iter().map(|p| p.to_string()).collect();
        prefixes.sort();
        assert_eq!(prefixes, ["big", "dir a"]);

        // Copy, then delete; a missing object is NotFound.
        store
            .copy(&Path::from("big/b.bin"), &Path::from("copy/b.bin"))
            .await
            .unwrap();
        assert_eq!(
            read_raw(&bucket, "copy/b.bin").await,
            Some(pattern(3 * 262_144, 0))
        );
        store.delete(&Path::from("copy/b.bin")).await.unwrap();
        assert_eq!(read_raw(&bucket, "copy/b.bin").await, None);
        match store.get(&Path::from("copy/b.bin")).await {
            Err(object_store::Error::NotFound { path, .. }) => assert_eq!(path, "copy/b.bin"),
            other => panic!("expected NotFound, got {other:?}"),
        }
        // Deleting what is gone is not an error (a retried delete).
        store.delete(&Path::from("copy/b.bin")).await.unwrap();
    }

    #[test]
    fn object_names_are_one_encoded_path_segment() {
        let store = GcsStore::new("http://127.0.0.1:9023/", "b", GcsAuth::Anonymous);
        let url = store
            .inner
            .object_url(&Path::from("run 1/s00000/part-00000.parquet"))
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9023/storage/v1/b/b/o/run%201%2Fs00000%2Fpart-00000.parquet"
        );
        assert_eq!(
            store.inner.upload_url().unwrap().as_str(),
            "http://127.0.0.1:9023/upload/storage/v1/b/b/o"
        );
    }

    #[test]
    fn resume_offsets_come_from_the_range_header() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(kept_bytes(&headers), 0);
        headers.insert("range", "bytes=0-262143".parse().unwrap());
        assert_eq!(kept_bytes(&headers), 262_144);
    }

    #[test]
    fn download_ranges_are_inclusive_http_ranges() {
        let (header, range) = range_header(&GetRange::Bounded(10..20), 100).unwrap();
        assert_eq!((header.as_str(), range), ("bytes=10-19", 10..20));
        let (header, range) = range_header(&GetRange::Suffix(5), 100).unwrap();
        assert_eq!((header.as_str(), range), ("bytes=95-99", 95..100));
        let (header, range) = range_header(&GetRange::Offset(90), 100).unwrap();
        assert_eq!((header.as_str(), range), ("bytes=90-99", 90..100));
        assert!(range_header(&GetRange::Offset(200), 100).is_err());
    }

    #[test]
    fn writes_map_their_mode_to_generation_preconditions() {
        assert!(put_preconditions(&PutMode::Overwrite).unwrap().is_empty());
        assert_eq!(
            put_preconditions(&PutMode::Create).unwrap(),
            vec![("ifGenerationMatch", "0".to_string())]
        );
        let update = PutMode::Update(object_store::UpdateVersion {
            e_tag: None,
            version: Some("17".into()),
        });
        assert_eq!(
            put_preconditions(&update).unwrap(),
            vec![("ifGenerationMatch", "17".to_string())]
        );
    }
}
