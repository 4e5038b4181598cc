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
            // run/shard/part-00000.parquet -> <run>-<shard>-part-00000.parquet: unique per run,
            // and for an append prefixed by the job key, so a later attempt can tell.
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

fn read_batches(path: &Path, columns: Option<&[String]>) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Warehouse(format!("cannot open {}: {e}", path.display())))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let builder = match columns {
        None => builder,
        Some(names) => {
            let schema = builder.parquet_schema();
            let indices: Vec<usize> = names
                .iter()
                .map(|n| {
                    schema
                        .columns()
                        .iter()
                        .position(|c| c.name() == n)
                        .ok_or_else(|| {
                            Error::Warehouse(format!(
                                "{} has no column {n:?} to merge on",
                                path.display()
                            ))
                        })
                })
                .collect::<Result<_>>()?;
            let mask = parquet::arrow::ProjectionMask::leaves(schema, indices);
            builder.with_projection(mask)
        }
    };
    let reader = builder.build()?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// Row-encodes the key columns (named in `keys`) of a batch: equal keys, equal bytes.
fn key_rows(converter: &RowConverter, batch: &RecordBatch, keys: &[String]) -> Result<Rows> {
    let columns = keys
        .iter()
        .map(|k| {
            batch.column_by_name(k).cloned().ok_or_else(|| {
                Error::Warehouse(format!("a staged part has no merge key column {k:?}"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(converter.convert_columns(&columns)?)
}

fn write_file(path: &Path, schema: SchemaRef, batches: &[RecordBatch]) -> Result<u64> {
    let file = std::fs::File::create(path)
        .map_err(|e| Error::Warehouse(format!("cannot create {}: {e}", path.display())))?;
    let props = crate::parquet_sink::properties(&crate::parquet_sink::PartOptions::default())?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
    let mut rows = 0;
    for b in batches {
        rows += b.num_rows() as u64;
        writer.write(b)?;
    }
    writer.close()?;
    Ok(rows)
}

/// The staged row that holds a key's latest version so far.
struct Winner {
    /// The row encoding of its `latest_by` value; None without one.
    rank: Option<Box<[u8]>>,
    part: usize,
    row: usize,
}

/// The merge: the latest staged row of each key replaces the table's rows of that key (in
/// files rewritten without them); files holding no staged key are linked as they are.
fn merge_into(req: &LoadRequest<'_>, live: &Path, build: &Path) -> Result<LoadOutcome> {
    if req.merge_keys.is_empty() {
        return Err(Error::Warehouse(format!(
            "a merge into {} needs merge keys",
            req.table
        )));
    }
    let key_fields = req
        .merge_keys
        .iter()
        .map(|k| {
            req.schema
                .field_with_name(k)
                .map(|f| SortField::new(f.data_type().clone()))
                .map_err(|_| {
                    Error::Warehouse(format!("no merge key column {k:?} in {}", req.table))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let keys = RowConverter::new(key_fields)?;
    let order = match req.latest_by {
        Some(c) => Some(RowConverter::new(vec![SortField::new(
            req.schema
                .field_with_name(c)
                .map_err(|_| Error::Warehouse(format!("no column {c:?} to order a merge by")))?
                .data_type()
                .clone(),
        )])?),
        None => None,
    };

    // The winner of each key among the staged rows: the greatest `latest_by` (nulls lose),
    // the later part on a tie. Only the key and order columns are read for this.
    let staged: Vec<PathBuf> = req
        .parts
        .iter()
        .map(|part| {
            req.staging.local_path(&part.path).ok_or_else(|| {
                Error::Warehouse(
                    "the Parquet directory warehouse loads from local staging only".into(),
                )
            })
        })
        .collect::<Result<_>>()?;
    let mut probe: Vec<String> = req.merge_keys.to_vec();
    if let Some(c) = req.latest_by
        && !probe.iter().any(|k| k == c)
    {
        probe.push(c.to_string());
    }
    // Keys and ranks as their row encodings: byte order is the values' order, and a lookup
    // by `&[u8]` costs no allocation per row.
    let mut part_rows: Vec<usize> = Vec::with_capacity(staged.len());
    let mut winners: HashMap<Box<[u8]>, Winner> = HashMap::new();
    for (p, path) in staged.iter().enumerate() {
        let mut offset = 0;
        for batch in read_batches(path, Some(&probe))?.1 {
            let rows = key_rows(&keys, &batch, req.merge_keys)?;
            let ordering = match (&order, req.latest_by) {
                (Some(converter), Some(c)) => {
                    let column = batch.column_by_name(c).cloned().ok_or_else(|| {
                        Error::Warehouse(format!("a staged part has no column {c:?}"))
                    })?;
                    Some(converter.convert_columns(&[column])?)
                }
                _ => None,
            };
            for i in 0..batch.num_rows() {
                let rank: Option<&[u8]> = ordering.as_ref().map(|o| o.row(i).data());
                let beats = |w: &Winner| rank >= w.rank.as_deref();
                let key = rows.row(i).data();
                match winners.get_mut(key) {
                    Some(w) if !beats(w) => {}
                    Some(w) => {
                        w.rank = rank.map(Into::into);
                        (w.part, w.row) = (p, offset + i);
                    }
                    None => {
                        winners.insert(
                            key.into(),
                            Winner {
                                rank: rank.map(Into::into),
                                part: p,
                                row: offset + i,
                            },
                        );
                    }
                }
            }
            offset += batch.num_rows();
        }
        part_rows.push(offset);
    }
    let staged_rows: u64 = part_rows.iter().map(|n| *n as u64).sum();
    if staged_rows != req.expected_rows {
        return Err(Error::Warehouse(format!(
            "staged parts hold {staged_rows} rows but the workers reported {}; table {} left as it was",
            req.expected_rows, req.table
        )));
    }
    let mut keep: Vec<Vec<bool>> = part_rows.iter().map(|n| vec![false; *n]).collect();
    for w in winners.values() {
        keep[w.part][w.row] = true;
    }

    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut files = 0usize;
    let mut kept_rows = 0u64;
    if live.exists() {
        for (n, f) in table_files(live)?.into_iter().enumerate() {
            let name = f.file_name().map(|n| n.to_os_string()).unwrap_or_default();
            let (_, key_batches) = read_batches(&f, Some(req.merge_keys))?;
            let mut hit = false;
            for batch in &key_batches {
                let rows = key_rows(&keys, batch, req.merge_keys)?;
                if (0..batch.num_rows()).any(|i| winners.contains_key(rows.row(i).data())) {
                    hit = true;
                    break;
                }
            }
            if !hit {
                link_or_copy(&f, &build.join(name))?;
                kept_rows += parquet_rows(&f)?;
                files += 1;
                continue;
            }
            let (schema, batches) = read_batches(&f, None)?;
            let mut remaining = Vec::with_capacity(batches.len());
            for batch in &batches {
                let rows = key_rows(&keys, batch, req.merge_keys)?;
                let mask: BooleanArray = (0..batch.num_rows())
                    .map(|i| Some(!winners.contains_key(rows.row(i).data())))
                    .collect();
                let rest = filter_record_batch(batch, &mask)?;
                if rest.num_rows() > 0 {
                    remaining.push(rest);
                }
            }
            if !remaining.is_empty() {
                kept_rows += write_file(
                    &build.join(format!("{}-{tag}-kept-{n:05}.parquet", req.run_id)),
                    schema,
                    &remaining,
                )?;
                files += 1;
            }
        }
    }
    // Staged parts whose every row wins are linked; the others are written without the
    // rows that lost to a later version of their key.
    let mut merged = 0u64;
    for (p, (path, keep)) in staged.iter().zip(keep).enumerate() {
        let won = keep.iter().filter(|k| **k).count() as u64;
        if won == 0 {
            continue;
        }
        let to = build.join(format!("{}-{tag}-merged-{p:05}.parquet", req.run_id));
        if won == keep.len() as u64 {
            link_or_copy(path, &to)?;
        } else {
            let (schema, batches) = read_batches(path, None)?;
            let mut offset = 0;
            let mut rest = Vec::with_capacity(batches.len());
            for batch in &batches {
                let mask = BooleanArray::from(keep[offset..offset + batch.num_rows()].to_vec());
                offset += batch.num_rows();
                rest.push(filter_record_batch(batch, &mask)?);
            }
            write_file(&to, schema, &rest)?;
        }
        merged += won;
        files += 1;
    }
    // What the new version holds, read back from its footers.
    let mut total = 0;
    for f in table_files(build)? {
        total += parquet_rows(&f)?;
    }
    if total != kept_rows + merged || merged != winners.len() as u64 {
        return Err(Error::Warehouse(format!(
            "the merged version of {} holds {total} rows, not {kept_rows} kept plus {} merged; \
             table left as it was",
            req.table,
            winners.len()
        )));
    }
    Ok(LoadOutcome {
        rows_loaded: merged,
        files,
        location: live.display().to_string(),
        source_read: None,
    })
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
mod tests {
    use super::*;
    use crate::messages::StagedFile;
    use crate::parquet_sink::{PartOptions, write_parts};
    use crate::staging::Staging;
    use arrow::array::{Array, ArrayRef, AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use std::sync::Arc;

    /// A fresh directory per test, read back as any Parquet reader would: every file of the
    /// table's current version, a column the file lacks read as NULL.
    async fn fixture() -> crate::warehouse::conformance::Fixture {
        let root =
            std::env::temp_dir().join(format!("shardflow-suite-{}", uuid::Uuid::new_v4().simple()));
        let staging = Staging::local(&root.join("stage")).unwrap();
        let warehouse = Arc::new(ParquetDirWarehouse::new(root.join("wh")).unwrap());
        let tables = root.join("wh");
        crate::warehouse::conformance::Fixture {
            warehouse,
            staging,
            read: Box::new(move |table, columns| {
                let dir = tables.join(table);
                Box::pin(async move { read_back(&dir, &columns) })
            }),
        }
    }

    fn read_back(dir: &Path, columns: &[String]) -> crate::warehouse::conformance::Rows {
        let mut rows = Vec::new();
        for file in table_files(dir).unwrap() {
            for batch in read_batches(&file, None).unwrap().1 {
                let text: Vec<Option<ArrayRef>> = columns
                    .iter()
                    .map(|c| {
                        batch
                            .column_by_name(c)
                            .map(|a| arrow::compute::cast(a, &DataType::Utf8).unwrap())
                    })
                    .collect();
                for i in 0..batch.num_rows() {
                    rows.push(
                        text.iter()
                            .map(|a| {
                                let a = a.as_ref()?.as_string::<i32>();
                                a.is_valid(i).then(|| a.value(i).to_string())
                            })
                            .collect::<Vec<_>>(),
                    );
                }
            }
        }
        rows.sort_by_key(|r: &Vec<Option<String>>| {
            r[0].as_deref().and_then(|id| id.parse::<i64>().ok())
        });
        rows
    }

    crate::warehouse::conformance::warehouse_conformance_suite!(super::fixture);

    #[tokio::test]
    async fn parts_without_a_table_column_load_null_under_add_columns() {
        crate::warehouse::conformance::parts_without_a_table_column_load_null_under_add_columns(
            fixture().await,
        )
        .await;
    }

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
            Field::new("at", DataType::Int64, true),
        ]))
    }

    /// One staged part per list of (id, v, at) rows.
    async fn stage(
        staging: &Staging,
        run: &str,
        parts: &[&[(i64, &str, Option<i64>)]],
    ) -> Vec<StagedFile> {
        let mut staged = Vec::new();
        for (n, rows) in parts.iter().enumerate() {
            let batch = RecordBatch::try_new(
                schema(),
                vec![
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
                    Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.2))),
                ],
            )
            .unwrap();
            let stream: crate::source::BatchStream =
                Box::pin(futures::stream::iter(vec![Ok(batch)]));
            let shard = format!("s{n}");
            staged.extend(
                write_parts(
                    staging.store(),
                    run,
                    &shard,
                    schema(),
                    stream,
                    &PartOptions::default(),
                    |_| Ok(()),
                )
                .await
                .unwrap(),
            );
        }
        staged
    }

    /// The table's rows as (id, v), in id order.
    fn rows(dir: &Path) -> Vec<(i64, String)> {
        let mut out = Vec::new();
        for f in table_files(dir).unwrap() {
            for b in read_batches(&f, None).unwrap().1 {
                let ids = b.column(0).as_primitive::<Int64Type>();
                let vs = b.column(1).as_string::<i32>();
                out.extend((0..b.num_rows()).map(|i| (ids.value(i), vs.value(i).to_string())));
            }
        }
        out.sort();
        out
    }

    fn names(dir: &Path) -> Vec<String> {
        table_files(dir)
            .unwrap()
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    fn replace<'a>(
        schema: &'a arrow::datatypes::Schema,
        staging: &'a Staging,
        run_id: &'a str,
        parts: &'a [StagedFile],
        expected_rows: u64,
    ) -> LoadRequest<'a> {
        LoadRequest {
            table: "t",
            schema,
            run_id,
            load_key: run_id,
            parts,
            staging,
            mode: WriteMode::Replace,
            expected_rows,
            merge_keys: &[],
            latest_by: None,
            allow_new_columns: false,
        }
    }

    /// A reader that resolves the table's link once reads one whole version to the end while
    /// swaps go on; replaced versions go once their grace period is over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_pinned_a_version_reads_it_whole_through_repeated_swaps() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let root =
            std::env::temp_dir().join(format!("shardflow-pin-{}", uuid::Uuid::new_v4().simple()));
        let staging = Staging::local(&root.join("stage")).unwrap();
        let wh = ParquetDirWarehouse::new(root.join("wh"))
            .unwrap()
            .with_version_grace(Duration::from_secs(60));
        let schema = schema();
        // Version k: k + 2 rows over two parts, each row saying how many rows its version has.
        let version = |k: usize| -> Vec<Vec<(i64, String, Option<i64>)>> {
            let n = k + 2;
            let rows: Vec<_> = (0..n as i64).map(|i| (i, format!("n={n}"), None)).collect();
            vec![rows[..1].to_vec(), rows[1..].to_vec()]
        };
        let stage_version = |k: usize| {
            let staging = staging.clone();
            async move {
                let parts = version(k);
                let parts: Vec<Vec<(i64, &str, Option<i64>)>> = parts
                    .iter()
                    .map(|p| p.iter().map(|(i, v, a)| (*i, v.as_str(), *a)).collect())
                    .collect();
                let refs: Vec<&[(i64, &str, Option<i64>)]> =
                    parts.iter().map(|p| p.as_slice()).collect();
                stage(&staging, &format!("r{k}"), &refs).await
            }
        };
        let first = stage_version(0).await;
        wh.load(replace(&schema, &staging, "r0", &first, 2))
            .await
            .unwrap();

        let table = wh.table_dir("t");
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let reader = {
            let (stop, reads, table) = (stop.clone(), reads.clone(), table.clone());
            std::thread::spawn(move || -> std::result::Result<(), String> {
                let mut pause = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let pinned = std::fs::canonicalize(&table).map_err(|e| e.to_string())?;
                    let files = table_files(&pinned).map_err(|e| e.to_string())?;
                    // Long enough for swaps to happen between the listing and the reading.
                    pause = (pause + 7) % 40;
                    std::thread::sleep(Duration::from_millis(pause));
                    let mut tags = Vec::new();
                    for f in &files {
                        let (_, batches) =
                            read_batches(f, None).map_err(|e| format!("{}: {e}", f.display()))?;
                        for b in batches {
                            let v = b.column(1).as_string::<i32>();
                            tags.extend((0..b.num_rows()).map(|i| v.value(i).to_string()));
                        }
                    }
                    let whole = format!("n={}", tags.len());
                    if tags.is_empty() || tags.iter().any(|t| *t != whole) {
                        return Err(format!("read a mix or a part: {tags:?}"));
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        };
        const SWAPS: usize = 30;
        for k in 1..=SWAPS {
            let parts = stage_version(k).await;
            let run = format!("r{k}");
            wh.load(replace(&schema, &staging, &run, &parts, k as u64 + 2))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap().unwrap();
        assert!(
            reads.load(Ordering::Relaxed) >= 5,
            "the reader read too rarely to tell"
        );
        assert_eq!(rows(&table).len(), SWAPS + 2);
        // Every replaced version is still there, in its grace period, and none is a leftover
        // the sweep may take yet.
        let leftovers = wh.leftovers().await.unwrap();
        assert_eq!(leftovers.len(), SWAPS, "{leftovers:?}");
        let nothing_running = std::collections::HashSet::new();
        assert!(
            leftovers
                .iter()
                .all(|l| l.run_id.is_none() && !l.removable(&nothing_running, SystemTime::now()))
        );
        // With the grace period over, the next load removes them: only the table is left.
        let wh = ParquetDirWarehouse::new(root.join("wh"))
            .unwrap()
            .with_version_grace(Duration::ZERO);
        let last = stage_version(SWAPS + 1).await;
        let run = format!("r{}", SWAPS + 1);
        wh.load(replace(&schema, &staging, &run, &last, SWAPS as u64 + 3))
            .await
            .unwrap();
        assert_eq!(wh.leftovers().await.unwrap(), vec![]);
        let versions: Vec<_> = std::fs::read_dir(root.join("wh").join(VERSIONS_DIR).join("t"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(versions, vec![std::fs::canonicalize(&table).unwrap()]);
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A table made before versions (a plain directory) becomes a link at its first load;
    /// a killed run's scratch is listed under its run, and nothing else can be removed.
    #[tokio::test]
    async fn leftovers_name_their_runs_and_a_plain_table_directory_is_taken_over() {
        let root =
            std::env::temp_dir().join(format!("shardflow-left-{}", uuid::Uuid::new_v4().simple()));
        let staging = Staging::local(&root.join("stage")).unwrap();
        let wh = ParquetDirWarehouse::new(root.join("wh")).unwrap();
        let schema = schema();
        let old = stage(&staging, "r0", &[&[(1, "old", None)]]).await;
        let table = wh.table_dir("t");
        std::fs::create_dir_all(&table).unwrap();
        std::fs::copy(
            staging.local_path(&old[0].path).unwrap(),
            table.join("legacy.parquet"),
        )
        .unwrap();
        let new = stage(&staging, "r1", &[&[(1, "new", None), (2, "new", None)]]).await;
        wh.load(replace(&schema, &staging, "r1", &new, 2))
            .await
            .unwrap();
        assert!(
            std::fs::symlink_metadata(&table)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(rows(&table), vec![(1, "new".into()), (2, "new".into())]);
        assert_eq!(
            wh.leftovers().await.unwrap(),
            vec![],
            "the plain directory is gone"
        );

        // What a run killed mid-load leaves, and a build directory of a release before versions.
        let half = root
            .join("wh")
            .join(VERSIONS_DIR)
            .join("t")
            .join("0000000000001-dead.1");
        std::fs::create_dir_all(&half).unwrap();
        std::fs::write(half.join("part.parquet"), b"half").unwrap();
        std::os::unix::fs::symlink(
            ".shardflow-versions/t/0000000000001-dead.1",
            root.join("wh/.shardflow-link-dead.1"),
        )
        .unwrap();
        std::fs::create_dir_all(root.join("wh/.shardflow-t-cli-x.1")).unwrap();
        let mut found = wh.leftovers().await.unwrap();
        found.sort_by(|a, b| a.location.cmp(&b.location));
        let runs: Vec<_> = found.iter().map(|l| l.run_id.clone()).collect();
        assert_eq!(
            runs,
            vec![Some("dead.1".into()), None, Some("dead.1".into())],
            "{found:?}"
        );
        let running: std::collections::HashSet<String> = ["dead.1".to_string()].into();
        assert!(
            found
                .iter()
                .all(|l| !l.removable(&running, SystemTime::now())),
            "running: kept"
        );
        for l in &found {
            if l.removable(&Default::default(), SystemTime::now()) {
                wh.remove_leftover(l).await.unwrap();
            }
        }
        // The old build directory waits its grace period (its run cannot be told); the rest went.
        let left: Vec<_> = wh
            .leftovers()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.location)
            .collect();
        assert_eq!(
            left,
            vec![root.join("wh/.shardflow-t-cli-x.1").display().to_string()]
        );
        assert!(!half.exists());
        assert_eq!(rows(&table).len(), 2, "the table is untouched");
        let err = wh
            .remove_leftover(&Leftover {
                run_id: None,
                location: table.display().to_string(),
                keep_until: None,
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a leftover of this warehouse"), "{err}");
        assert_eq!(rows(&table).len(), 2);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[tokio::test]
    async fn merge_keeps_the_latest_staged_row_of_each_key_and_links_untouched_files() {
        let root =
            std::env::temp_dir().join(format!("shardflow-merge-{}", uuid::Uuid::new_v4().simple()));
        let staging = Staging::local(&root.join("stage")).unwrap();
        let wh = ParquetDirWarehouse::new(root.join("wh")).unwrap();
        let schema = schema();
        let keys = ["id".to_string()];
        let request = |run_id: &'static str, parts, mode, expected_rows| LoadRequest {
            table: "t",
            schema: &schema,
            run_id,
            load_key: run_id,
            parts,
            staging: &staging,
            mode,
            expected_rows,
            merge_keys: &keys,
            latest_by: Some("at"),
            allow_new_columns: false,
        };

        let base = stage(
            &staging,
            "r1",
            &[
                &[
                    (1, "old", Some(0)),
                    (2, "old", Some(0)),
                    (3, "old", Some(0)),
                ],
                &[(5, "old", Some(0)), (6, "old", Some(0))],
            ],
        )
        .await;
        wh.load(request("r1", &base, WriteMode::Replace, 5))
            .await
            .unwrap();
        let untouched = "r1-s1-part-00000.parquet".to_string();
        assert!(names(&wh.table_dir("t")).contains(&untouched));

        // Key 2 three times: the greatest `at` wins, the later part on a tie. Key 7: a
        // value beats a NULL. Key 8 is new.
        let changes = stage(
            &staging,
            "r2",
            &[
                &[(2, "x", Some(5)), (2, "y", Some(9)), (7, "null", None)],
                &[(2, "z", Some(9)), (7, "m", Some(1)), (8, "new", None)],
            ],
        )
        .await;
        let outcome = wh
            .load(request("r2", &changes, WriteMode::Merge, 6))
            .await
            .unwrap();
        assert_eq!(outcome.rows_loaded, 3, "keys 2, 7 and 8");
        let want: Vec<(i64, String)> = [
            (1, "old"),
            (2, "z"),
            (3, "old"),
            (5, "old"),
            (6, "old"),
            (7, "m"),
            (8, "new"),
        ]
        .iter()
        .map(|(i, v)| (*i, v.to_string()))
        .collect();
        assert_eq!(rows(&wh.table_dir("t")), want);
        // The file without a staged key is the same file; the other was rewritten.
        let after = names(&wh.table_dir("t"));
        assert!(after.contains(&untouched), "{after:?}");
        assert!(
            !after.contains(&"r1-s0-part-00000.parquet".to_string()),
            "{after:?}"
        );

        // The same merge again changes nothing; a wrong count is refused.
        wh.load(request("r2", &changes, WriteMode::Merge, 6))
            .await
            .unwrap();
        assert_eq!(rows(&wh.table_dir("t")), want);
        let err = wh
            .load(request("r3", &changes, WriteMode::Merge, 7))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hold 6 rows but the workers reported 7"),
            "{err}"
        );
        assert_eq!(rows(&wh.table_dir("t")), want);
        let _ = std::fs::remove_dir_all(&root);
    }
}
