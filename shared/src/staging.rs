//! Staging: where workers leave Parquet parts for the dispatcher's one load per run.
//! An `object_store` behind it: a local directory (the embedded default) or a GCS bucket and
//! prefix (`gs://bucket/prefix`, over the GCS JSON API; `STORAGE_EMULATOR_HOST` points it at an
//! emulator).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt as _;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;

use crate::gcs::GcsStore;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Staging {
    store: Arc<dyn ObjectStore>,
    /// The directory behind the store, when it is local.
    local_root: Option<PathBuf>,
    /// The bucket behind the store, when it is GCS.
    gcs: Option<GcsStore>,
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
            gcs: None,
        })
    }

    /// `gs://bucket/prefix` or a local directory (a path or `file://` URL).
    pub fn from_url(url: &str) -> Result<Self> {
        match url.strip_prefix("gs://") {
            Some(rest) => Self::on_gcs(rest),
            None => Self::local(Path::new(url.strip_prefix("file://").unwrap_or(url))),
        }
    }

    fn on_gcs(bucket_and_prefix: &str) -> Result<Self> {
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
        let gcs = GcsStore::from_env(bucket)?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(gcs.clone())
        } else {
            Arc::new(PrefixStore::new(gcs.clone(), prefix))
        };
        Ok(Staging {
            store,
            local_root: None,
            gcs: Some(gcs),
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

    /// The GCS bucket behind the store, when staging is on GCS.
    pub fn gcs_bucket(&self) -> Option<&GcsStore> {
        self.gcs.as_ref()
    }

    /// The file behind a staged path, for a local store.
    pub fn local_path(&self, path: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| root.join(path))
    }

    /// The runs that have something staged: the first level of the store, one folder a run.
    /// A staging location belongs to one state store: the sweep removes every run's folder
    /// that store does not list as running.
    pub async fn staged_runs(&self) -> Result<Vec<String>> {
        if let Some(root) = &self.local_root {
            let mut runs = Vec::new();
            let entries = match std::fs::read_dir(root) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(runs),
                Err(e) => return Err(Error::Staging(format!("{}: {e}", root.display()))),
            };
            for entry in entries {
                let entry =
                    entry.map_err(|e| Error::Staging(format!("{}: {e}", root.display())))?;
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    runs.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
            runs.sort();
            return Ok(runs);
        }
        let listing = self.store.list_with_delimiter(None).await?;
        let mut runs: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        runs.sort();
        Ok(runs)
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

/// Against the GCS emulator: built with `service-tests` (tests/run.sh), failing when it is absent.
#[cfg(all(test, feature = "service-tests"))]
mod tests {
    use super::*;
    use crate::gcs::tests::{emulator_bucket, read_raw};
    use object_store::path::Path as ObjectPath;
    use object_store::{ObjectStoreExt as _, PutPayload};

    /// `gs://` staging goes to the emulator over the JSON API: what it writes, the emulator
    /// serves to anyone (bqemulator's loads included), and a run's removal leaves the others.
    #[tokio::test]
    async fn gcs_staging_writes_lists_reads_and_removes_a_run() {
        let bucket = emulator_bucket().await;
        let staging = Staging::from_url(&format!("gs://{bucket}/stage/")).unwrap();
        assert_eq!(
            staging.uri("r1/s00000/part-00000.parquet"),
            format!("gs://{bucket}/stage/r1/s00000/part-00000.parquet")
        );
        assert!(staging.local_path("r1").is_none(), "no local shortcut");
        // A part above BufWriter's multipart threshold, and two small ones.
        let big: Vec<u8> = (0..12 * 1024 * 1024 + 7u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut writer = object_store::buffered::BufWriter::new(
            staging.store().clone(),
            ObjectPath::from("r1/s00000/part-00000.parquet"),
        );
        use tokio::io::AsyncWriteExt;
        writer.write_all(&big).await.unwrap();
        writer.shutdown().await.unwrap();
        for (path, body) in [
            ("r1/s00001/part-00000.parquet", "small"),
            ("r2/s00000/part-00000.parquet", "other run"),
        ] {
            staging
                .store()
                .put(
                    &ObjectPath::from(path),
                    PutPayload::from_static(body.as_bytes()),
                )
                .await
                .unwrap();
        }
        // The emulator holds the objects under the prefix, as any GCS client sees them.
        let raw = read_raw(&bucket, "stage/r1/s00000/part-00000.parquet")
            .await
            .expect("the big part is in the bucket");
        assert!(
            raw == big,
            "the big part is stored intact ({} bytes)",
            raw.len()
        );
        assert_eq!(
            read_raw(&bucket, "stage/r1/s00001/part-00000.parquet")
                .await
                .as_deref(),
            Some(b"small".as_slice())
        );
        let read = staging
            .store()
            .get(&ObjectPath::from("r1/s00000/part-00000.parquet"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(
            read.as_ref() == big.as_slice(),
            "the big part reads back intact"
        );

        // One folder a run, under the prefix only (the sweep's view).
        assert_eq!(staging.staged_runs().await.unwrap(), vec!["r1", "r2"]);
        staging.remove_run("r1").await.unwrap();
        assert_eq!(staging.staged_runs().await.unwrap(), vec!["r2"]);
        use futures::TryStreamExt;
        let left: Vec<String> = staging
            .store()
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(left, vec!["r2/s00000/part-00000.parquet".to_string()]);
        assert_eq!(
            read_raw(&bucket, "stage/r1/s00001/part-00000.parquet").await,
            None
        );
        // Removing again is fine.
        staging.remove_run("r1").await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_staging_bucket_is_named() {
        // Only the emulator's address is needed: the bucket is never created.
        let _ = emulator_bucket().await;
        let staging = Staging::from_url("gs://no-such-staging-bucket/runs").unwrap();
        let err = staging
            .store()
            .put(
                &ObjectPath::from("r/s/part.parquet"),
                PutPayload::from_static(b"x"),
            )
            .await
            .unwrap_err();
        let text = Error::from(err).to_string();
        assert!(
            text.starts_with(
                "staging: Generic GCS error: bucket gs://no-such-staging-bucket does not exist"
            ) && text.contains("runs/r/s/part.parquet")
                && text.contains("404"),
            "{text}"
        );
    }
}
