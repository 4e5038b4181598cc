//! Staging: where workers leave Parquet parts for the dispatcher's one load per run.
//! An `object_store` behind it: a local directory (the embedded default) or a GCS bucket and
//! prefix (`gs://bucket/prefix`; `STORAGE_EMULATOR_HOST` points it at an emulator).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt as _;
use object_store::ObjectStore;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Staging {
    store: Arc<dyn ObjectStore>,
    /// The directory behind the store, when it is local.
    local_root: Option<PathBuf>,
    url: String,
}

impl Staging {
    pub fn local(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Staging(format!("cannot create {}: {e}", dir.display())))?;
        let root = dir
            .canonicalize()
            .map_err(|e| Error::Staging(format!("{}: {e}", dir.display())))?;
        let store = LocalFileSystem::new_with_prefix(&root)?;
        Ok(Staging {
            store: Arc::new(store),
            url: format!("file://{}", root.display()),
            local_root: Some(root),
        })
    }

    /// `gs://bucket/prefix` or a local directory (a path or `file://` URL).
    pub fn from_url(url: &str) -> Result<Self> {
        match url.strip_prefix("gs://") {
            Some(rest) => Self::gcs(rest),
            None => Self::local(Path::new(url.strip_prefix("file://").unwrap_or(url))),
        }
    }

    fn gcs(bucket_and_prefix: &str) -> Result<Self> {
        let (bucket, prefix) = bucket_and_prefix
            .split_once('/')
            .unwrap_or((bucket_and_prefix, ""));
        let prefix = prefix.trim_matches('/');
        if bucket.is_empty() {
            return Err(Error::Staging(format!(
                "staging URL gs://{bucket_and_prefix} names no bucket"
            )));
        }
        let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
        if let Some(base_url) = storage_emulator_url() {
            builder = builder
                .with_base_url(&base_url)
                .with_skip_signature(true)
                .with_client_options(object_store::ClientOptions::new().with_allow_http(true));
        }
        let store: Arc<dyn ObjectStore> = Arc::new(builder.build()?);
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            store
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        };
        let url = if prefix.is_empty() {
            format!("gs://{bucket}")
        } else {
            format!("gs://{bucket}/{prefix}")
        };
        Ok(Staging {
            store,
            local_root: None,
            url,
        })
    }

    /// The full URI of a staged path (`gs://bucket/prefix/run/shard/part-00000.parquet`), as
    /// a warehouse load names it.
    pub fn uri(&self, path: &str) -> String {
        format!("{}/{path}", self.url)
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The file behind a staged path, for a local store.
    pub fn local_path(&self, path: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| root.join(path))
    }

    /// Removes everything a run staged.
    pub async fn remove_run(&self, run_id: &str) -> Result<()> {
        if let Some(root) = &self.local_root {
            let dir = root.join(run_id);
            return match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::Staging(format!(
                    "cannot remove {}: {e}",
                    dir.display()
                ))),
            };
        }
        use futures::TryStreamExt;
        // Listing a missing prefix yields nothing, so this is idempotent too.
        let prefix = object_store::path::Path::from(run_id);
        let paths = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .boxed();
        self.store
            .delete_stream(paths)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }
}

/// The GCS emulator's base URL from `STORAGE_EMULATOR_HOST` (with or without a scheme).
pub fn storage_emulator_url() -> Option<String> {
    let host = std::env::var("STORAGE_EMULATOR_HOST").ok()?;
    let host = host.trim().trim_end_matches('/');
    if host.is_empty() {
        return None;
    }
    Some(if host.contains("://") {
        host.to_string()
    } else {
        format!("http://{host}")
    })
}
