//! The embedded warehouse: a table is the set of Parquet files under `ROOT/<table>/`; files and
//! folders whose names start with `_` or `.` are not part of it.
//!
//! A load builds the new version of the table in `ROOT/.shardflow-<table>-<run_id>/` (hard
//! links to the staged parts, and for an append to the current files too), checks its row count
//! against the workers' reports, then swaps it in with one `renameat2(RENAME_EXCHANGE)`: a
//! reader that lists the directory sees the old set of files or the new set, never a mix, and a
//! run that fails or is killed before the swap leaves the old table untouched.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{LoadOutcome, LoadRequest, Warehouse, WriteMode};
use crate::{Error, Result};

pub struct ParquetDirWarehouse {
    root: PathBuf,
}

impl ParquetDirWarehouse {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::Warehouse(format!("cannot create {}: {e}", root.display())))?;
        Ok(ParquetDirWarehouse { root })
    }

    pub fn table_dir(&self, table: &str) -> PathBuf {
        self.root.join(table)
    }
}

/// Whether a file in a table directory belongs to the table.
pub fn is_table_file(name: &str) -> bool {
    !name.starts_with('_') && !name.starts_with('.') && name.ends_with(".parquet")
}

/// The table's files, sorted by name.
pub fn table_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && is_table_file(&entry.file_name().to_string_lossy()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

fn parquet_rows(path: &Path) -> Result<u64> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Warehouse(format!("cannot open {}: {e}", path.display())))?;
    let reader = parquet::file::reader::SerializedFileReader::new(file)?;
    use parquet::file::reader::FileReader;
    Ok(reader.metadata().file_metadata().num_rows().max(0) as u64)
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::hard_link(from, to)
        .or_else(|_| std::fs::copy(from, to).map(|_| ()))
        .map_err(|e| {
            Error::Warehouse(format!(
                "cannot place {} at {}: {e}",
                from.display(),
                to.display()
            ))
        })
}

/// Swaps two directories in one step.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "atomic directory exchange needs Linux renameat2",
    ))
}

impl ParquetDirWarehouse {
    fn load_blocking(&self, req: &LoadRequest<'_>) -> Result<LoadOutcome> {
        let live = self.table_dir(req.table);
        let build = self
            .root
            .join(format!(".shardflow-{}-{}", req.table, req.run_id));
        if build.exists() {
            std::fs::remove_dir_all(&build)?;
        }
        std::fs::create_dir_all(&build)?;
        let outcome = self.fill_and_swap(req, &live, &build);
        // On success `build` holds the previous version; on failure, the half-built one.
        let _ = std::fs::remove_dir_all(&build);
        outcome
    }

    fn fill_and_swap(
        &self,
        req: &LoadRequest<'_>,
        live: &Path,
        build: &Path,
    ) -> Result<LoadOutcome> {
        let mut rows = 0u64;
        let mut files = 0usize;
        if req.mode == WriteMode::Append
            && let Some(done) = appended_before(live, req.load_key)?
        {
            // An earlier attempt of this job appended and died before saying so: its rows
            // are in the table; appending again would double them.
            return Ok(done);
        }
        if req.mode == WriteMode::Append && live.exists() {
            for f in table_files(live)? {
                let name = f.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                link_or_copy(&f, &build.join(name))?;
                rows += parquet_rows(&f)?;
                files += 1;
            }
        }
        let existing = rows;
        for part in req.parts {
            let from = req.staging.local_path(&part.path).ok_or_else(|| {
                Error::Warehouse(
                    "the Parquet directory warehouse loads from local staging only".into(),
                )
            })?;
            // run/shard/part-00000.parquet -> <run>-<shard>-part-00000.parquet: unique per run,
            // and for an append prefixed by the job key, so a later attempt can tell.
            let name = match req.mode {
                WriteMode::Replace => part.path.replace('/', "-"),
                WriteMode::Append => format!("{}@{}", req.load_key, part.path.replace('/', "-")),
            };
            let to = build.join(&name);
            link_or_copy(&from, &to)?;
            rows += parquet_rows(&to)?;
            files += 1;
        }
        let loaded = rows - existing;
        if loaded != req.expected_rows {
            return Err(Error::Warehouse(format!(
                "staged parts hold {loaded} rows but the workers reported {}; table {} left as it was",
                req.expected_rows, req.table
            )));
        }
        sync_dir(build)?;
        if live.exists() {
            exchange(build, live).map_err(|e| {
                Error::Warehouse(format!(
                    "cannot swap in the new version of {}: {e}",
                    req.table
                ))
            })?;
        } else {
            std::fs::rename(build, live)?;
        }
        sync_dir(&self.root)?;
        Ok(LoadOutcome {
            rows_loaded: loaded,
            files,
            location: live.display().to_string(),
        })
    }
}

/// What an earlier append under `load_key` put in the table, if one committed.
fn appended_before(live: &Path, load_key: &str) -> Result<Option<LoadOutcome>> {
    if !live.exists() {
        return Ok(None);
    }
    let prefix = format!("{load_key}@");
    let mut rows = 0;
    let mut files = 0;
    for f in table_files(live)? {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(&prefix) {
            rows += parquet_rows(&f)?;
            files += 1;
        }
    }
    Ok((files > 0).then(|| LoadOutcome {
        rows_loaded: rows,
        files,
        location: live.display().to_string(),
    }))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[async_trait]
impl Warehouse for ParquetDirWarehouse {
    fn check_table_name(&self, table: &str) -> Result<()> {
        if table.starts_with('_') || table.starts_with('.') {
            return Err(Error::Warehouse(format!(
                "dest_table_name \"{table}\" cannot start with '_' or '.' in a Parquet directory warehouse (such names are not tables)"
            )));
        }
        Ok(())
    }

    async fn load(&self, request: LoadRequest<'_>) -> Result<LoadOutcome> {
        self.check_table_name(request.table)?;
        // A handful of links, footer reads and one rename, once per run: cheap enough to run
        // on the dispatcher's task.
        self.load_blocking(&request)
    }
}
