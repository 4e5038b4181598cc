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

mod client;
mod store;
#[cfg(test)]
pub(crate) mod tests;
mod upload;

use self::client::*;
pub use self::client::{BucketInfo, ObjectVersion};
use self::upload::*;

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
