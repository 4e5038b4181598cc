//! The warehouse: ONE load per table per run from the staged Parquet parts. A catalog load
//! replaces the table atomically; a transactional load appends, a merge upserts by key, each
//! all-or-nothing.

pub mod bigquery;
#[cfg(test)]
mod conformance;
pub mod parquet_dir;

use async_trait::async_trait;
use serde::Serialize;

use crate::Result;
use crate::messages::StagedFile;
use crate::staging::Staging;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Readers see the old table or the new one, never a mix; a failed load leaves the old.
    Replace,
    Append,
    /// Each staged row replaces the table's row with the same `merge_keys` (or is inserted);
    /// of staged rows sharing a key, the one with the greatest `latest_by` wins. Applying the
    /// same parts twice leaves the table as once.
    Merge,
}

pub struct LoadRequest<'a> {
    pub table: &'a str,
    /// The Arrow schema every part has (field metadata `shardflow.source_type` says what the
    /// source type was), from which a missing table is created.
    pub schema: &'a arrow::datatypes::Schema,
    pub run_id: &'a str,
    /// What makes the load idempotent: the run id for a replace; for an append, the job key,
    /// so that no attempt of a job appends its rows twice.
    pub load_key: &'a str,
    /// Every staged part, in shard order.
    pub parts: &'a [StagedFile],
    pub staging: &'a Staging,
    pub mode: WriteMode,
    /// The rows the workers reported; the load fails if the table would hold a different count.
    pub expected_rows: u64,
    /// Merge: the columns that identify a row.
    pub merge_keys: &'a [String],
    /// Merge: the column whose greatest value picks a key's latest staged row.
    pub latest_by: Option<&'a str>,
    /// Columns the table lacks are added (nullable), and the table's columns the parts lack
    /// load as NULL (`schema_policy: "add_columns"`); otherwise any difference fails the load.
    pub allow_new_columns: bool,
}

/// Refuses a table whose columns (names case-insensitive, as in BigQuery; types) differ from
/// the staged ones, unless `allow_new_columns` and no column changed type. Columns are
/// `(name, type)`; order is not compared.
pub fn check_columns(
    table: &str,
    existing: &[(String, String)],
    staged: &[(String, String)],
    allow_new_columns: bool,
) -> Result<()> {
    use std::collections::BTreeMap;
    let by_key = |columns: &[(String, String)]| -> BTreeMap<String, (String, String)> {
        columns
            .iter()
            .map(|(name, ty)| (name.to_lowercase(), (name.clone(), ty.clone())))
            .collect()
    };
    let (old, new) = (by_key(existing), by_key(staged));
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for (key, (name, ty)) in &new {
        match old.get(key) {
            None => added.push(format!("{name} {ty}")),
            Some((_, was)) if was != ty => changed.push(format!("{name} {was} -> {ty}")),
            Some(_) => {}
        }
    }
    let removed: Vec<String> = old
        .iter()
        .filter(|(key, _)| !new.contains_key(*key))
        .map(|(_, (name, ty))| format!("{name} {ty}"))
        .collect();
    if changed.is_empty() && (allow_new_columns || (added.is_empty() && removed.is_empty())) {
        return Ok(());
    }
    let mut parts = Vec::new();
    for (label, list) in [
        ("added", &added),
        ("removed", &removed),
        ("changed", &changed),
    ] {
        if !list.is_empty() {
            parts.push(format!("{label}: {}", list.join(", ")));
        }
    }
    Err(crate::Error::Warehouse(format!(
        "schema drift: table {table} exists with other columns than the staged parts ({}); \
         nothing was loaded",
        parts.join("; ")
    )))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadOutcome {
    /// Rows appended or written; for a merge, the distinct keys it inserted or replaced.
    pub rows_loaded: u64,
    pub files: usize,
    /// Where the table lives, for the report.
    pub location: String,
    /// When the warehouse read source files itself (`load_source_files`): what the job that
    /// committed read, and when.
    pub source_read: Option<SourceRead>,
}

/// The source files a committed load job read: its URIs, and its start and end in
/// milliseconds since the epoch (a file rewritten in between may have been read in either
/// version). The job may be an earlier attempt's, found by its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceRead {
    pub uris: Vec<String>,
    pub started_ms: i64,
    pub ended_ms: i64,
}

/// How a warehouse reads source files where they lie, without a worker converting them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum NativeFormat {
    Csv {
        delimiter: char,
        quote: char,
        skip_leading_rows: u32,
        /// `UTF-8` or `ISO-8859-1`, as BigQuery names them.
        encoding: &'static str,
    },
    JsonLines,
    Parquet,
}

/// One load of source files straight into the table (the fast path).
pub struct SourceFilesLoad<'a> {
    pub table: &'a str,
    /// The columns, in the files' order, from which a missing table is created.
    pub schema: &'a arrow::datatypes::Schema,
    /// As in `LoadRequest`: the run id for a replace, the job key for an append.
    pub load_key: &'a str,
    pub uris: &'a [String],
    pub format: NativeFormat,
    /// Replace or Append.
    pub mode: WriteMode,
}

/// Something a load left outside the tables: a replaced version still in its grace period, or
/// the scratch of a run (a half-built version, a link) that was killed or failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Leftover {
    /// The run whose scratch it is; None when no run's state decides (a replaced version).
    pub run_id: Option<String>,
    /// Where it is, as `remove_leftover` takes it back.
    pub location: String,
    /// Not removed before this time (a replaced version's readers may still read it).
    #[serde(skip)]
    pub keep_until: Option<std::time::SystemTime>,
}

impl Leftover {
    /// Whether the sweep may remove it now: no running run of the state store owns it, and
    /// its grace period, if it has one, is over.
    pub fn removable(
        &self,
        running: &std::collections::HashSet<String>,
        now: std::time::SystemTime,
    ) -> bool {
        self.run_id
            .as_ref()
            .is_none_or(|run| !running.contains(run))
            && self.keep_until.is_none_or(|until| until <= now)
    }
}

/// Column names as they are: a warehouse that takes any name.
pub fn names_as_they_are(names: &[String]) -> Vec<String> {
    names.to_vec()
}

#[async_trait]
pub trait Warehouse: Send + Sync {
    /// Refuses, before any data moves, a table name this warehouse cannot hold.
    fn check_table_name(&self, table: &str) -> Result<()>;
    /// The rule that names the destination's column for each source column, in order: a
    /// deterministic, collision-free mapping of names the warehouse cannot take.
    fn column_names(&self) -> fn(&[String]) -> Vec<String> {
        names_as_they_are
    }
    /// Where the warehouse's data lives (a BigQuery dataset's location), when it has one;
    /// source files it loads itself must be there.
    async fn location(&self) -> Result<Option<String>> {
        Ok(None)
    }
    async fn load(&self, request: LoadRequest<'_>) -> Result<LoadOutcome>;
    /// Whether `load_source_files` reads `gs://` URIs itself (BigQuery does).
    fn loads_gcs_files(&self) -> bool {
        false
    }
    /// What loads left behind (see `Leftover`). The sweep lists these before it asks the state
    /// store which runs are running, so a run that starts in between keeps its scratch.
    async fn leftovers(&self) -> Result<Vec<Leftover>> {
        Ok(Vec::new())
    }
    async fn remove_leftover(&self, leftover: &Leftover) -> Result<()> {
        Err(crate::Error::Warehouse(format!(
            "this warehouse leaves nothing to remove ({})",
            leftover.location
        )))
    }
    async fn load_source_files(&self, request: SourceFilesLoad<'_>) -> Result<LoadOutcome> {
        Err(crate::Error::Warehouse(format!(
            "this warehouse cannot load {} source files into {} itself",
            request.uris.len(),
            request.table
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::Leftover;
    use std::collections::HashSet;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_leftover_goes_when_its_run_is_not_running_and_its_grace_is_over() {
        let now = SystemTime::now();
        let running: HashSet<String> = ["live.1".to_string()].into();
        let of = |run: Option<&str>, keep: Option<SystemTime>| Leftover {
            run_id: run.map(str::to_string),
            location: "x".into(),
            keep_until: keep,
        };
        assert!(!of(Some("live.1"), None).removable(&running, now));
        assert!(of(Some("dead.1"), None).removable(&running, now));
        let later = now + Duration::from_secs(1);
        assert!(!of(None, Some(later)).removable(&running, now));
        assert!(of(None, Some(now)).removable(&running, now));
        assert!(!of(Some("dead.1"), Some(later)).removable(&running, now));
        assert!(!of(Some("live.1"), Some(now)).removable(&running, later));
    }
}
