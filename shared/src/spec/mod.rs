//! The job spec: the job-config JSON the Django app serves (and Cloud Scheduler or Django may
//! inline in a job message), parsed with serde and validated into typed form.
//!
//! Parsing keeps the Django field names and accepts what Django sends (numbers as strings,
//! nulls for absent values, fields we do not use yet). Validation collects every problem, each
//! naming its field, so a bad job is fixed in one round trip. Secrets are wrapped in [`Secret`],
//! which never prints or serialises its content.

mod config;
mod connection;
mod files;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use self::config::*;
pub use self::connection::*;
pub use self::files::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceType {
    Postgresql,
    Mysql,
    Gcs,
    S3,
    AzureBlob,
    Local,
}

impl SourceType {
    const NAMES: &'static str = "postgresql, mysql, gcs, s3, azure_blob, local";

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "postgresql" | "postgres" => SourceType::Postgresql,
            "mysql" | "mariadb" => SourceType::Mysql,
            "gcs" => SourceType::Gcs,
            "s3" => SourceType::S3,
            "azure_blob" => SourceType::AzureBlob,
            "local" => SourceType::Local,
            _ => return None,
        })
    }

    /// The schema a table job reads when it names none: PostgreSQL's `public`; MySQL's
    /// schemas are its databases.
    fn default_schema(self, database: Option<&str>) -> String {
        match self {
            SourceType::Postgresql => "public".to_string(),
            SourceType::Mysql
            | SourceType::Gcs
            | SourceType::S3
            | SourceType::AzureBlob
            | SourceType::Local => database.unwrap_or_default().to_string(),
        }
    }

    pub fn is_file_source(self) -> bool {
        matches!(
            self,
            SourceType::Gcs | SourceType::S3 | SourceType::AzureBlob | SourceType::Local
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadType {
    /// Full snapshot: the destination is replaced atomically.
    Catalog,
    /// Incremental: rows newer than `last_sync_value` are appended.
    Transactional,
    /// Incremental upsert: rows changed since `last_sync_value` replace the destination's
    /// rows of the same `merge_keys`; new keys are inserted.
    Merge,
}

impl LoadType {
    /// Reads a window of `timestamp_column` rather than the whole table.
    pub fn is_incremental(self) -> bool {
        matches!(self, LoadType::Transactional | LoadType::Merge)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingMode {
    /// Shard when the estimate reaches `row_count_threshold`.
    Auto,
    /// Always one shard.
    Standard,
    /// Always sharded across the fleet (the name Django uses).
    Dataflow,
}

pub const DEFAULT_ROW_COUNT_THRESHOLD: u64 = 1_000_000;

/// `lookback`: a number of seconds, or `"<n> <unit>"` with unit seconds, minutes, hours or
/// days (singular or plural); null, 0 or "" mean none.
pub fn parse_lookback(value: &serde_json::Value) -> Result<Option<std::time::Duration>, String> {
    let seconds = match value {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("must be a whole number of seconds >= 0, got {n}"))?,
        serde_json::Value::String(text) if text.trim().is_empty() => return Ok(None),
        serde_json::Value::String(text) => {
            let bad =
                || format!("\"{text}\" is not like \"6 hours\" (seconds, minutes, hours or days)");
            let mut words = text.split_whitespace();
            let (Some(n), unit, None) = (words.next(), words.next(), words.next()) else {
                return Err(bad());
            };
            let n: u64 = n.parse().map_err(|_| bad())?;
            let scale = match unit.map(|u| u.to_ascii_lowercase()) {
                None => 1,
                Some(u) => match u.trim_end_matches('s') {
                    "second" | "sec" => 1,
                    "minute" | "min" => 60,
                    "hour" => 3600,
                    "day" => 86_400,
                    _ => return Err(bad()),
                },
            };
            n.checked_mul(scale).ok_or_else(bad)?
        }
        other => {
            return Err(format!(
                "must be seconds or text like \"6 hours\", got {other}"
            ));
        }
    };
    Ok((seconds > 0).then(|| std::time::Duration::from_secs(seconds)))
}

/// A validated job: what it reads, how it loads, and the fleet settings. [`JobSpec::validate`]
/// builds one shape per load type (a table's incremental loads have their column window, a file
/// job's increment is its new files, merges read tables), so the stages match on `load` rather
/// than re-check fields; the connectors still refuse a spec of the wrong source.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub data_source_id: Option<i64>,
    pub source_type: SourceType,
    pub connection: ConnectionParams,
    pub source: SourceSpec,
    pub dest_table_name: String,
    pub load: Load,
    /// `None` means every column of the table (or of the files).
    pub selected_columns: Option<Vec<String>>,
    pub processing_mode: ProcessingMode,
    pub row_count_threshold: u64,
    /// What the config says that shardflow ignores (unknown fields), for the run's report.
    pub warnings: Vec<String>,
}

/// What a job reads: one table of a database, or the files under a prefix.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceSpec {
    Table(TableRef),
    Files(FileSpec),
}

/// A table of a database source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRef {
    /// `public` when absent for PostgreSQL, the database for MySQL.
    pub schema: String,
    pub table: String,
}

/// How a run's rows reach the destination, with what each way needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Load {
    /// The destination is replaced atomically by what the source holds now.
    Catalog {
        /// `timestamp_column` on a catalog job: only the reported `watermark` is its maximum.
        watermark_column: Option<String>,
    },
    /// What the window holds is appended.
    Append { window: Window },
    /// What the window holds replaces the destination's rows of the same key (the latest
    /// `window.column` wins); new keys are inserted. Table sources only.
    Merge {
        window: ColumnWindow,
        /// The columns that identify a row; `None` means the source's primary key.
        keys: Option<Vec<String>>,
        /// How far before the watermark a run reads again (late-arriving rows).
        lookback: Option<std::time::Duration>,
    },
}

/// Which rows an incremental run takes.
#[derive(Clone, Debug, PartialEq)]
pub enum Window {
    /// The rows of a table whose column moved past the watermark.
    Column(ColumnWindow),
    /// The files the stream has not loaded yet.
    NewFiles {
        /// `timestamp_column` on a file job: only the reported `watermark` is its maximum.
        watermark_column: Option<String>,
    },
}

/// `timestamp_column > last_sync_value` (or `>= historical_start_date` on a first run).
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnWindow {
    pub column: String,
    /// The watermark Django sent; the greater of it and the recorded one is used.
    pub last_sync_value: Option<serde_json::Value>,
    pub historical_start_date: Option<String>,
}

impl Load {
    /// The Django name of this way of loading.
    pub fn kind(&self) -> LoadType {
        match self {
            Load::Catalog { .. } => LoadType::Catalog,
            Load::Append { .. } => LoadType::Transactional,
            Load::Merge { .. } => LoadType::Merge,
        }
    }

    /// The column window an incremental table load reads.
    pub fn column_window(&self) -> Option<&ColumnWindow> {
        match self {
            Load::Append {
                window: Window::Column(window),
            }
            | Load::Merge { window, .. } => Some(window),
            Load::Catalog { .. }
            | Load::Append {
                window: Window::NewFiles { .. },
            } => None,
        }
    }

    /// How far before the watermark a merge reads again; an append never does.
    pub fn lookback(&self) -> Option<std::time::Duration> {
        match self {
            Load::Merge { lookback, .. } => *lookback,
            Load::Catalog { .. } | Load::Append { .. } => None,
        }
    }

    /// The job's `timestamp_column`: the window's column, or the one only reported.
    pub fn timestamp_column(&self) -> Option<&str> {
        match self {
            Load::Catalog { watermark_column }
            | Load::Append {
                window: Window::NewFiles { watermark_column },
            } => watermark_column.as_deref(),
            Load::Append {
                window: Window::Column(window),
            }
            | Load::Merge { window, .. } => Some(&window.column),
        }
    }
}

/// One problem with one field of the job config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: String,
    pub problem: String,
}

/// Everything wrong with a job config, each problem naming its field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub problems: Vec<FieldProblem>,
}

impl SpecError {
    pub fn single(field: &str, problem: impl Into<String>) -> Self {
        SpecError {
            problems: vec![FieldProblem {
                field: field.to_string(),
                problem: problem.into(),
            }],
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid job config: ")?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            // Problems that start with the field's own name read as a sentence already.
            if p.problem.starts_with(&p.field) {
                f.write_str(&p.problem)?;
            } else {
                write!(f, "{}: {}", p.field, p.problem)?;
            }
        }
        Ok(())
    }
}

impl JobSpec {
    pub fn table(&self) -> Option<&TableRef> {
        match &self.source {
            SourceSpec::Table(table) => Some(table),
            SourceSpec::Files(_) => None,
        }
    }

    pub fn files(&self) -> Option<&FileSpec> {
        match &self.source {
            SourceSpec::Files(files) => Some(files),
            SourceSpec::Table(_) => None,
        }
    }

    /// The job's `timestamp_column`, whatever it is used for.
    pub fn timestamp_column(&self) -> Option<&str> {
        self.load.timestamp_column()
    }

    /// `schema.table` (or the files' prefix and pattern) for messages.
    pub fn qualified_table(&self) -> String {
        match &self.source {
            SourceSpec::Table(t) => format!("{}.{}", t.schema, t.table),
            SourceSpec::Files(f) => format!("{}{}", f.path_prefix, f.pattern),
        }
    }

    pub fn port(&self, default: u16) -> u16 {
        match &self.connection.port {
            Some(NumberOrString::Number(p)) => u16::try_from(*p).unwrap_or(default),
            Some(NumberOrString::Text(p)) => p.trim().parse().unwrap_or(default),
            None => default,
        }
    }
}
