//! The embedded warehouse: a table is the set of Parquet files under `ROOT/<table>/`; files and
//! folders whose names start with `_` or `.` are not part of it.
//!
//! Each version of a table is a directory `ROOT/.shardflow-versions/<table>/<ms>-<run_id>/`,
//! and `ROOT/<table>` is a symbolic link to the current one. A load builds the new version
//! (hard links to the staged parts, and for an append to the current files too), checks its row
//! count against the workers' reports, then swaps it in by exchanging a new link with the old
//! one (`renameat2(RENAME_EXCHANGE)`): a reader that lists `ROOT/<table>/` sees the old set of
//! files or the new set, never a mix, and a run that fails or is killed before the swap leaves
//! the old table untouched.
//!
//! The version a swap replaced stays where it is for the grace period (`version_grace`): a
//! reader that resolved the link once (`realpath ROOT/<table>`) reads that version to the end
//! even while swaps go on. After the grace period the next load of the table, or
//! `dispatcher gc`, removes it. What a killed run left (a half-built version, a link) is removed
//! by the sweep once the state store says the run is not running (`leftovers`).
//!
//! A merge builds the same way: files that hold none of the staged keys are linked, files that
//! hold some are rewritten without those rows, and the staged rows (the latest of each key) are
//! written as new files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{BooleanArray, RecordBatch, RecordBatchReader};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use async_trait::async_trait;

use super::{Leftover, LoadOutcome, LoadRequest, Warehouse, WriteMode};
use crate::{Error, Result};

mod merge;

use self::merge::*;

pub struct ParquetDirWarehouse {
    root: PathBuf,
    version_grace: Duration,
}

/// How long a replaced version stays readable by default: longer than a reader takes to read
/// a table it listed, short enough that a table rewritten every few minutes keeps a few.
pub const DEFAULT_VERSION_GRACE: Duration = Duration::from_secs(600);

/// Under `ROOT`: every table's versions, one folder per table.
pub const VERSIONS_DIR: &str = ".shardflow-versions";
/// In a replaced version: when it stopped being the table (milliseconds since the epoch).
const RETIRED_MARKER: &str = "_shardflow_retired_at";
/// Scratch entries directly under `ROOT` start with this (the link a swap puts in place, and
/// the build directories of releases before versions).
const SCRATCH_PREFIX: &str = ".shardflow-";
const LINK_PREFIX: &str = ".shardflow-link-";

impl ParquetDirWarehouse {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::Warehouse(format!("cannot create {}: {e}", root.display())))?;
        Ok(ParquetDirWarehouse {
            root,
            version_grace: DEFAULT_VERSION_GRACE,
        })
    }

    /// How long a replaced version stays readable (see the module's documentation).
    pub fn with_version_grace(mut self, grace: Duration) -> Self {
        self.version_grace = grace;
        self
    }

    /// The table as readers name it: a link to its current version.
    pub fn table_dir(&self, table: &str) -> PathBuf {
        self.root.join(table)
    }

    fn versions_of(&self, table: &str) -> PathBuf {
        self.root.join(VERSIONS_DIR).join(table)
    }

    /// The version directory the table's link names now; None without a table, or for a
    /// table made before versions (a plain directory).
    fn live_version(&self, table: &str) -> Option<PathBuf> {
        let target = std::fs::read_link(self.table_dir(table)).ok()?;
        Some(self.root.join(target))
    }
}

fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// A file's Arrow columns as `check_columns` compares them, from its footer.
fn parquet_columns(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Warehouse(format!("cannot open {}: {e}", path.display())))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?;
    Ok(named_types(builder.schema()))
}

fn named_types(schema: &arrow::datatypes::Schema) -> Vec<(String, String)> {
    schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().to_string()))
        .collect()
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
        let versions = self.versions_of(req.table);
        std::fs::create_dir_all(&versions)?;
        // A new name for every attempt, so no attempt touches a version a reader may hold.
        let build = versions.join(format!(
            "{:013}-{}",
            millis_since_epoch(SystemTime::now()),
            req.run_id
        ));
        if build.exists() {
            std::fs::remove_dir_all(&build)?;
        }
        std::fs::create_dir(&build)?;
        let outcome = self.fill_and_swap(req, &live, &build);
        if outcome.is_err() && self.live_version(req.table).as_deref() != Some(build.as_path()) {
            let _ = std::fs::remove_dir_all(&build);
        }
        if outcome.is_ok()
            && let Err(e) = self.expire_versions(req.table)
        {
            tracing::warn!(table = req.table, error = %e, "could not remove expired versions");
        }
        outcome
    }

    /// Removes the table's replaced versions whose grace period is over.
    fn expire_versions(&self, table: &str) -> Result<()> {
        let now = SystemTime::now();
        for leftover in self.table_leftovers(table)? {
            if leftover.run_id.is_none() && leftover.keep_until.is_some_and(|until| until <= now) {
                remove_entry(Path::new(&leftover.location))?;
            }
        }
        Ok(())
    }

    /// A table's versions that are not its current one: replaced (kept until their grace
    /// period ends, whatever their run's state) or never published (their run's).
    fn table_leftovers(&self, table: &str) -> Result<Vec<Leftover>> {
        let live = self.live_version(table);
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.versions_of(table)) else {
            return Ok(out);
        };
        for entry in entries {
            let path = entry?.path();
            if Some(&path) == live.as_ref() {
                continue;
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let retired_at = std::fs::read_to_string(path.join(RETIRED_MARKER))
                .ok()
                .and_then(|ms| ms.trim().parse::<u64>().ok())
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
            out.push(match retired_at {
                Some(at) => Leftover {
                    run_id: None,
                    location: path.display().to_string(),
                    keep_until: Some(at + self.version_grace),
                },
                None => Leftover {
                    run_id: name.split_once('-').map(|(_, run)| run.to_string()),
                    location: path.display().to_string(),
                    keep_until: None,
                },
            });
        }
        Ok(out)
    }

    fn leftovers_blocking(&self) -> Result<Vec<Leftover>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == VERSIONS_DIR || !name.starts_with(SCRATCH_PREFIX) {
                continue;
            }
            let path = entry.path().display().to_string();
            out.push(match name.strip_prefix(LINK_PREFIX) {
                // The link a swap was about to put in place, or the one it took out.
                Some(run) => Leftover {
                    run_id: Some(run.to_string()),
                    location: path,
                    keep_until: None,
                },
                // `.shardflow-<table>-<run>` of a release before versions: the run cannot be
                // told from the table, so it goes once it is a grace period old.
                None => Leftover {
                    run_id: None,
                    location: path,
                    keep_until: entry
                        .metadata()?
                        .modified()
                        .ok()
                        .map(|at| at + self.version_grace),
                },
            });
        }
        if let Ok(tables) = std::fs::read_dir(self.root.join(VERSIONS_DIR)) {
            for table in tables {
                let table = table?.file_name().to_string_lossy().into_owned();
                out.extend(self.table_leftovers(&table)?);
            }
        }
        Ok(out)
    }

    fn fill_and_swap(
        &self,
        req: &LoadRequest<'_>,
        live: &Path,
        build: &Path,
    ) -> Result<LoadOutcome> {
        if req.mode == WriteMode::Merge {
            let outcome = merge_into(req, live, build)?;
            self.swap_in(build, live, req)?;
            return Ok(outcome);
        }
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
            // The table's columns: every file's, as files written under schema_policy
            // "add_columns" may differ.
            let mut columns: Vec<(String, String)> = Vec::new();
            for f in table_files(live)? {
                let name = f.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                link_or_copy(&f, &build.join(name))?;
                rows += parquet_rows(&f)?;
                files += 1;
                for column in parquet_columns(&f)? {
                    if !columns
                        .iter()
                        .any(|(n, _)| n.eq_ignore_ascii_case(&column.0))
                    {
                        columns.push(column);
                    }
                }
            }
            if files > 0 {
                super::check_columns(
                    &live.display().to_string(),
                    &columns,
                    &named_types(req.schema),
                    req.allow_new_columns,
                )?;
            }
        }
        let existing = rows;
        for part in req.parts {
            let from = req.staging.local_path(&part.path).ok_or_else(|| {
                Error::Warehouse(
                    "the Parquet directory warehouse loads from local staging only".into(),
                )
            })?;
            // run/shard/extraction/part-00000.parquet -> run-shard-extraction-part-00000.parquet:
            // unique per run, and for an append prefixed by the job key, so a later attempt
            // can tell.
            let name = match req.mode {
                WriteMode::Replace | WriteMode::Merge => part.path.replace('/', "-"),
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
        self.swap_in(build, live, req)?;
        Ok(LoadOutcome {
            rows_loaded: loaded,
            files,
            location: live.display().to_string(),
            source_read: None,
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
        source_read: None,
    }))
}

impl ParquetDirWarehouse {
    /// Makes the built version the table in one step: a link to it replaces the table's link
    /// (or, once, the plain directory of a table made before versions).
    fn swap_in(&self, build: &Path, live: &Path, req: &LoadRequest<'_>) -> Result<()> {
        let table = req.table;
        // Durable before visible: a power loss after the exchange must not leave the table's
        // names pointing at data still in the page cache (truncated or empty files). The
        // files first, then the directory that names them and the one that names it, then the
        // exchange, then its parent. Files the table already holds (linked again by an append
        // or a merge) were made durable by the load that published them.
        sync_files(&unpublished(build, live)?)?;
        sync_dir(build)?;
        if let Some(versions) = build.parent() {
            sync_dir(versions)?;
        }
        let target = build.strip_prefix(&self.root).map_err(|_| {
            Error::Warehouse(format!(
                "version {} is outside the warehouse",
                build.display()
            ))
        })?;
        let link = self.root.join(format!("{LINK_PREFIX}{}", req.run_id));
        remove_entry(&link)?;
        std::os::unix::fs::symlink(target, &link)?;
        if std::fs::symlink_metadata(live).is_ok() {
            if let Some(previous) = self.live_version(table) {
                // Before the exchange: its grace period starts when readers can no longer
                // reach it through the table's name. (If the exchange fails, the marker in
                // the still-current version means nothing: the current one is never removed.)
                std::fs::write(
                    previous.join(RETIRED_MARKER),
                    millis_since_epoch(SystemTime::now()).to_string(),
                )?;
            }
            crate::fault::point(crate::fault::Step::Swap)?;
            exchange(&link, live).map_err(|e| {
                Error::Warehouse(format!("cannot swap in the new version of {table}: {e}"))
            })?;
            // `link` now holds the old link, or the directory of a table made before
            // versions: no reader could pin that one, so it goes now.
            remove_entry(&link)?;
        } else {
            crate::fault::point(crate::fault::Step::Swap)?;
            std::fs::rename(&link, live)?;
        }
        sync_dir(&self.root)
    }
}

/// Removes a file, a link (not what it names) or a directory tree; absent is fine.
fn remove_entry(path: &Path) -> Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    removed.map_err(|e| Error::Warehouse(format!("cannot remove {}: {e}", path.display())))
}

/// The files of `build` that are not the very file (same inode) under the same name in `live`.
fn unpublished(build: &Path, live: &Path) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut new = Vec::new();
    for file in table_files(build)? {
        let published = match (file.file_name(), std::fs::metadata(&file)) {
            (Some(name), Ok(built)) => std::fs::metadata(live.join(name))
                .is_ok_and(|old| (old.dev(), old.ino()) == (built.dev(), built.ino())),
            _ => false,
        };
        if !published {
            new.push(file);
        }
    }
    Ok(new)
}

/// fsync each file, a few at a time: the device takes concurrent flushes better than a queue
/// of one, and the files of a version are independent.
fn sync_files(files: &[PathBuf]) -> Result<()> {
    const AT_ONCE: usize = 4;
    let chunk = files.len().div_ceil(AT_ONCE).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|some| {
                scope.spawn(move || -> std::io::Result<()> {
                    for f in some {
                        std::fs::File::open(f)?.sync_all()?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| Error::Warehouse("a file sync thread panicked".into()))??;
        }
        Ok(())
    })
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The longest table name a Parquet directory warehouse takes, in bytes.
pub const MAX_TABLE_NAME_BYTES: usize = 150;

#[async_trait]
impl Warehouse for ParquetDirWarehouse {
    fn check_table_name(&self, table: &str) -> Result<()> {
        if table.starts_with('_') || table.starts_with('.') {
            return Err(Error::Warehouse(format!(
                "dest_table_name \"{table}\" cannot start with '_' or '.' in a Parquet directory warehouse (such names are not tables)"
            )));
        }
        // The table's build directory `.shardflow-<table>-<run id>` must fit a file name
        // (255 bytes on Linux and macOS); the rest is left to the run id.
        if table.len() > MAX_TABLE_NAME_BYTES {
            return Err(Error::Warehouse(format!(
                "dest_table_name is {} bytes long; a Parquet directory warehouse takes at most \
                 {MAX_TABLE_NAME_BYTES} (it is a directory name, with room for the run's \
                 build directory)",
                table.len()
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

    async fn leftovers(&self) -> Result<Vec<Leftover>> {
        self.leftovers_blocking()
    }

    async fn remove_leftover(&self, leftover: &Leftover) -> Result<()> {
        let path = Path::new(&leftover.location);
        // Only what `leftovers` names: entries of this warehouse's scratch space.
        let ours = path.strip_prefix(&self.root).is_ok_and(|rest| {
            rest.components().next().is_some_and(|first| {
                first
                    .as_os_str()
                    .to_string_lossy()
                    .starts_with(SCRATCH_PREFIX)
            })
        });
        if !ours {
            return Err(Error::Warehouse(format!(
                "{} is not a leftover of this warehouse",
                leftover.location
            )));
        }
        remove_entry(path)
    }
}

#[cfg(test)]
mod tests;
