//! Requests to the JSON API: URLs, retries of what is transient, errors naming the
//! endpoint, the resources it answers with, and the calls the store is built on.

use super::*;

impl Inner {
    /// `{base}/{segments…}`, each segment percent-encoded whole (an object name's `/` too,
    /// as the JSON API wants).
    pub(super) fn url(&self, segments: &[&str]) -> object_store::Result<Url> {
        let mut url = Url::parse(&self.base)
            .map_err(|e| generic(format!("bad GCS base URL {}: {e}", self.base)))?;
        url.path_segments_mut()
            .map_err(|()| generic(format!("bad GCS base URL {}", self.base)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    pub(super) fn object_url(&self, location: &Path) -> object_store::Result<Url> {
        self.url(&["storage", "v1", "b", &self.bucket, "o", location.as_ref()])
    }

    pub(super) fn upload_url(&self) -> object_store::Result<Url> {
        self.url(&["upload", "storage", "v1", "b", &self.bucket, "o"])
    }

    /// An upload answered 404: the bucket is what is missing, not the object.
    pub(super) fn missing_bucket(&self, e: object_store::Error) -> object_store::Error {
        match e {
            object_store::Error::NotFound { path, source } => generic(format!(
                "bucket gs://{} does not exist or is not visible to these credentials \
                 (writing {path}): {source}",
                self.bucket
            )),
            e => e,
        }
    }

    pub(super) async fn request(
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
    pub(super) async fn send<F, Fut>(
        &self,
        path: &str,
        build: F,
    ) -> object_store::Result<reqwest::Response>
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

pub(super) fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(8))
        .with_max_times(RETRIES)
        .with_jitter()
}

/// One request's failure, before it becomes an `object_store::Error`.
#[derive(Debug)]
pub(super) enum Attempt {
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
    pub(super) fn transport(e: reqwest::Error) -> Self {
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

    pub(super) fn is_transient(&self) -> bool {
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

    pub(super) fn into_error(self, path: &str) -> object_store::Error {
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
pub(super) fn excerpt(body: &str) -> &str {
    let body = body.trim();
    match body.char_indices().nth(300) {
        Some((at, _)) => &body[..at],
        None => body,
    }
}

pub(super) fn generic(text: String) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: text.into(),
    }
}

/// The object resource fields we read.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ObjectResource {
    pub(super) name: String,
    /// The JSON API sends int64 as strings.
    #[serde(default)]
    pub(super) size: Option<String>,
    #[serde(default)]
    pub(super) updated: Option<String>,
    #[serde(default)]
    pub(super) time_created: Option<String>,
    #[serde(default)]
    pub(super) etag: Option<String>,
    #[serde(default)]
    pub(super) generation: Option<String>,
}

impl ObjectResource {
    pub(super) fn meta(&self) -> object_store::Result<ObjectMeta> {
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

    pub(super) fn put_result(&self) -> PutResult {
        PutResult {
            e_tag: self.etag.clone(),
            version: self.generation.clone(),
            extensions: Default::default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ObjectList {
    #[serde(default)]
    pub(super) items: Vec<ObjectResource>,
    #[serde(default)]
    pub(super) prefixes: Vec<String>,
    #[serde(default)]
    pub(super) next_page_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RewriteResponse {
    pub(super) done: bool,
    #[serde(default)]
    pub(super) rewrite_token: Option<String>,
}

pub(super) async fn json<T: serde::de::DeserializeOwned>(
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
pub(super) fn put_preconditions(
    mode: &PutMode,
) -> object_store::Result<Vec<(&'static str, String)>> {
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
pub(super) fn range_header(
    range: &GetRange,
    size: u64,
) -> object_store::Result<(String, Range<u64>)> {
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

    pub(super) async fn metadata(&self, location: &Path) -> object_store::Result<ObjectMeta> {
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

    pub(super) async fn delete_one(&self, location: &Path) -> object_store::Result<()> {
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
    pub(super) async fn list_page(
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
