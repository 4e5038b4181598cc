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
        let url = if prefix.is_empty() {
            format!("gs://{bucket}")
        } else {
            format!("gs://{bucket}/{prefix}")
        };
        if storage_emulator_url().is_some() {
            let root = emulator_directory().ok_or_else(|| {
                Error::Staging(
                    "STORAGE_EMULATOR_HOST is set but SHARDFLOW_GCS_ROOT is not: name the GCS \
                     emulator's backing directory (tests/emulators.sh prints it)"
                        .into(),
                )
            })?;
            // Neither GCS emulator accepts the XML API object_store speaks (fake-gcs-server
            // routes `PUT /bucket/object` to signed-URL uploads and has no XML list or
            // delete; gcp-storage-emulator refuses percent-encoded paths and multipart
            // uploads). Against an emulator the parts go straight into its backing directory,
            // which is where bqemulator reads `gs://` URIs from.
            let mut staging = Self::local(&root.join(bucket).join(prefix))?;
            staging.url = url;
            return Ok(staging);
        }
        let store: Arc<dyn ObjectStore> = Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .build()?,
        );
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            store
        } else {
            Arc::new(PrefixStore::new(store, prefix))
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

/// The GCS emulator's backing directory (`SHARDFLOW_GCS_ROOT`, holding `bucket/object`).
fn emulator_directory() -> Option<PathBuf> {
    std::env::var_os("SHARDFLOW_GCS_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
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

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::path::Path as ObjectPath;
    use object_store::{ObjectStoreExt as _, PutPayload};

    /// A bucket on the GCS emulator; fails (never skips) when the emulator is not set up.
    pub async fn emulator_bucket() -> String {
        let Some(base) = storage_emulator_url() else {
            panic!(
                "STORAGE_EMULATOR_HOST is not set: start the emulators with \
                 eval \"$(bash tests/emulators.sh start)\""
            );
        };
        let bucket = format!("staging-{}", uuid::Uuid::new_v4().simple());
        let status = reqwest::Client::new()
            .post(format!("{base}/storage/v1/b?project=test-proj"))
            .json(&serde_json::json!({ "name": bucket }))
            .send()
            .await
            .expect("GCS emulator answers")
            .status();
        assert!(status.is_success(), "creating bucket {bucket}: {status}");
        bucket
    }

    /// Against the emulators, `gs://` staging lands in the directory bqemulator loads from.
    #[tokio::test]
    async fn gcs_staging_writes_lists_reads_and_removes_a_run() {
        let bucket = emulator_bucket().await;
        let staging = Staging::from_url(&format!("gs://{bucket}/stage/")).unwrap();
        assert_eq!(
            staging.uri("r1/s00000/part-00000.parquet"),
            format!("gs://{bucket}/stage/r1/s00000/part-00000.parquet")
        );
        // A part above object_store's multipart threshold, and a small one.
        let big: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut writer = object_store::buffered::BufWriter::new(
            staging.store().clone(),
            ObjectPath::from("r1/s00000/part-00000.parquet"),
        );
        use tokio::io::AsyncWriteExt;
        writer.write_all(&big).await.unwrap();
        writer.shutdown().await.unwrap();
        staging
            .store()
            .put(
                &ObjectPath::from("r1/s00001/part-00000.parquet"),
                PutPayload::from_static(b"small"),
            )
            .await
            .unwrap();
        staging
            .store()
            .put(
                &ObjectPath::from("r2/s00000/part-00000.parquet"),
                PutPayload::from_static(b"other run"),
            )
            .await
            .unwrap();
        let root = std::env::var("SHARDFLOW_GCS_ROOT").expect(
            "SHARDFLOW_GCS_ROOT (printed by tests/emulators.sh) names the emulator's directory",
        );
        assert!(
            PathBuf::from(&root)
                .join(&bucket)
                .join("stage/r1/s00001/part-00000.parquet")
                .is_file()
        );
        let read = staging
            .store()
            .get(&ObjectPath::from("r1/s00000/part-00000.parquet"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(read.len(), big.len());
        assert!(
            read.as_ref() == big.as_slice(),
            "the big part reads back intact"
        );

        staging.remove_run("r1").await.unwrap();
        use futures::TryStreamExt;
        let left: Vec<String> = staging
            .store()
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(left, vec!["r2/s00000/part-00000.parquet".to_string()]);
        // Removing again is fine.
        staging.remove_run("r1").await.unwrap();
    }
}
