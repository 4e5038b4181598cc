//! Staging: where workers leave Parquet parts for the dispatcher's one load per run.
//! An `object_store` behind it; the embedded default is a local directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt as _;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;

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
