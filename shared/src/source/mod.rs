//! Source connectors: what a table looks like, how many rows it holds, where to cut it, and
//! reading one shard of it as a stream of Arrow `RecordBatch`es.

pub mod files;
pub mod mysql;
pub mod postgres;
pub mod tls;

use std::pin::Pin;

use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::spec::{JobSpec, SourceType};
use crate::{Error, Result};

/// The Arrow schema a job's columns are extracted as: each source has its own type map.
/// Every field carries its source type (`shardflow.source_type`) for the warehouses.
pub fn arrow_schema(source: SourceType, columns: &[SourceColumn]) -> SchemaRef {
    let fields: Vec<Field> = columns
        .iter()
        .map(|c| {
            let (label, data_type) = column_types(source, c);
            let metadata: std::collections::HashMap<String, String> =
                [(SOURCE_TYPE_KEY.to_string(), label)].into();
            Field::new(&c.name, data_type, c.nullable).with_metadata(metadata)
        })
        .collect();
    std::sync::Arc::new(arrow::datatypes::Schema::new(fields))
}

/// Field metadata key carrying the source type, so a warehouse can pick JSON, NUMERIC etc.
pub const SOURCE_TYPE_KEY: &str = "shardflow.source_type";

/// Field metadata naming the source column a staged field was renamed from.
pub const SOURCE_NAME_KEY: &str = "shardflow.source_name";

/// The schema of the staged parts: the extracted one with each field named as the
/// destination's column (`destination_names`, in column order; empty: as in the source). A
/// renamed field keeps its source name in `shardflow.source_name`.
pub fn staged_schema(
    source: SourceType,
    columns: &[SourceColumn],
    destination_names: &[String],
) -> SchemaRef {
    let schema = arrow_schema(source, columns);
    if destination_names.len() != columns.len()
        || schema
            .fields()
            .iter()
            .zip(destination_names)
            .all(|(f, n)| f.name() == n)
    {
        return schema;
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(destination_names)
        .map(|(f, name)| {
            if f.name() == name {
                return f.as_ref().clone();
            }
            let mut metadata = f.metadata().clone();
            metadata.insert(SOURCE_NAME_KEY.to_string(), f.name().clone());
            f.as_ref().clone().with_name(name).with_metadata(metadata)
        })
        .collect();
    std::sync::Arc::new(arrow::datatypes::Schema::new(fields))
}

/// The batches of a stream under `schema`: the same columns, named as it names them.
pub fn renamed(stream: BatchStream, schema: SchemaRef) -> BatchStream {
    use futures::StreamExt as _;
    Box::pin(stream.map(move |batch| {
        let batch = batch?;
        if batch.schema().fields() == schema.fields() {
            return Ok(batch);
        }
        Ok(RecordBatch::try_new(
            schema.clone(),
            batch.columns().to_vec(),
        )?)
    }))
}

/// A column's source type as people read it, and the Arrow type it is extracted as.
pub fn column_types(source: SourceType, column: &SourceColumn) -> (String, DataType) {
    of_type(source).column_types(column)
}

// --- The connector seam. --------------------------------------------------------------------

/// A source connector as the pipeline uses it: the type map, planning, the snapshot a run's
/// shards share, and one shard's rows as Arrow batches. One unit struct per connector folder
/// (`postgres::PostgresSource`, `mysql::MySqlSource`, `files::FileSource`); `open` picks it.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// A column's source type as people read it, and the Arrow type it is extracted as.
    fn column_types(&self, column: &SourceColumn) -> (String, DataType);

    /// What planning needs: a table described by the source, or the files listed and
    /// grouped. `stream` is what the state store knows of the job's incremental stream.
    async fn survey(
        &self,
        spec: &JobSpec,
        opts: &crate::plan::PlanOptions,
        stream: &crate::plan::StreamState,
    ) -> Result<SourceSurvey>;

    /// One snapshot every shard of a run reads, held until dropped; None where the source
    /// cannot share one between connections (then each shard reads in its own).
    async fn hold_snapshot(
        &self,
        _spec: &JobSpec,
        _retry: crate::retry::RetryPolicy,
    ) -> Result<Option<SnapshotHold>> {
        Ok(None)
    }

    /// One shard's rows, with at most `in_flight` batches decoded ahead of the reader.
    async fn extract(
        &self,
        spec: &JobSpec,
        task: &crate::messages::ShardTask,
        retry: crate::retry::RetryPolicy,
        in_flight: usize,
    ) -> Result<Extraction>;
}

/// The connector of the job's source: the one place that matches on the source type.
pub fn open(spec: &JobSpec) -> &'static dyn Source {
    of_type(spec.source_type)
}

fn of_type(source: SourceType) -> &'static dyn Source {
    match source {
        SourceType::Postgresql => &postgres::PostgresSource,
        SourceType::Mysql => &mysql::MySqlSource,
        SourceType::Gcs | SourceType::S3 | SourceType::AzureBlob | SourceType::Local => {
            &files::FileSource
        }
    }
}

/// What a source gives planning.
pub enum SourceSurvey {
    /// A table, described on one connection, to estimate and cut.
    Table(Box<dyn TableSurvey>),
    /// Files listed, checked against the job's columns and grouped into shards.
    Files(Box<files::plan::FileSurvey>),
}

/// A snapshot exported for the shards of a run, valid while this holds its connection.
pub struct SnapshotHold {
    /// What each shard task carries to read in it.
    pub id: String,
    /// The connection whose transaction keeps the snapshot alive.
    _connection: Box<dyn Send + Sync>,
}

impl SnapshotHold {
    pub fn new(id: String, connection: impl Send + Sync + 'static) -> Self {
        SnapshotHold {
            id,
            _connection: Box::new(connection),
        }
    }
}

/// One shard's extraction.
pub struct Extraction {
    pub batches: BatchStream,
    /// File sources: the rows each file of the shard gave, filled in as `batches` is read.
    pub file_rows: Option<files::FileRowCounts>,
}

/// A column as the source catalog describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceColumn {
    pub name: String,
    /// PostgreSQL type OID (domains resolved to their base type); 0 for MySQL.
    pub type_oid: u32,
    /// PostgreSQL: the type's name without modifiers, as `format_type(oid, NULL)` prints it.
    /// MySQL: the lower-case `COLUMN_TYPE` (`bigint(20) unsigned`, `decimal(65,30)`).
    pub type_name: String,
    /// The type modifier (`numeric(p,s)`, `varchar(n)`), -1 when none.
    pub typmod: i32,
    pub nullable: bool,
}

/// The table a table source's job reads. `open` sends a connector only jobs of its source
/// type, and validation gives every such job a table; an Err here is a wiring bug.
pub(crate) fn table_of(spec: &JobSpec) -> Result<&crate::spec::TableRef> {
    spec.table().ok_or_else(|| {
        Error::Source(format!(
            "source_type {:?} reads a table, and the job names files",
            spec.source_type
        ))
    })
}

/// The columns the job reads (`selected`, else all), in table order, checking every name it
/// gives: the selected ones and `required` (a table job's timestamp_column, which need not be
/// among them).
pub fn project<'a>(
    columns: &[SourceColumn],
    table: &str,
    selected: Option<&'a [String]>,
    required: Option<&'a str>,
) -> Result<Vec<SourceColumn>> {
    let mut missing: Vec<&str> = Vec::new();
    let mut check = |name: &'a str| {
        if !columns.iter().any(|c| c.name == name) {
            missing.push(name);
        }
    };
    if let Some(selected) = selected {
        selected.iter().for_each(|c| check(c));
    }
    if let Some(required) = required {
        check(required);
    }
    if !missing.is_empty() {
        let available: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        return Err(Error::Source(format!(
            "column{} {} not found in {} (columns: {})",
            if missing.len() > 1 { "s" } else { "" },
            missing
                .iter()
                .map(|m| format!("\"{m}\""))
                .collect::<Vec<_>>()
                .join(", "),
            table,
            available.join(", ")
        )));
    }
    Ok(match selected {
        None => columns.to_vec(),
        Some(selected) => columns
            .iter()
            .filter(|c| selected.contains(&c.name))
            .cloned()
            .collect(),
    })
}

/// Which rows of the source one shard reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ShardBounds {
    /// The whole table.
    Whole,
    /// `lower <= column < upper`; either side may be open. Values are the key's text form,
    /// bound as parameters when the shard runs. The first range also takes NULL keys.
    KeyRange {
        column: String,
        key_type: String,
        lower: Option<String>,
        upper: Option<String>,
        include_nulls: bool,
    },
    /// Heap pages `first_block <= block < end_block` (open-ended when `end_block` is None).
    CtidRange {
        first_block: u64,
        end_block: Option<u64>,
    },
    /// Source files (or row groups of one), read in this order.
    Files { files: Vec<files::FilePart> },
}

impl ShardBounds {
    /// The rows a shard reads, for a person reading a plan: which bound is inclusive, which
    /// exclusive, which open, and where NULL keys go.
    pub fn describe(&self) -> String {
        match self {
            ShardBounds::Whole => "every row".into(),
            ShardBounds::KeyRange {
                column,
                lower,
                upper,
                include_nulls,
                ..
            } => {
                let range = match (lower, upper) {
                    (None, None) => return "every row".into(),
                    (Some(l), None) => format!("{column} >= {l}"),
                    (None, Some(u)) => format!("{column} < {u}"),
                    (Some(l), Some(u)) => format!("{l} <= {column} < {u}"),
                };
                if *include_nulls {
                    format!("{range}, or {column} IS NULL")
                } else {
                    range
                }
            }
            ShardBounds::CtidRange {
                first_block,
                end_block: Some(end),
            } => format!("heap pages {first_block} <= block < {end}"),
            ShardBounds::CtidRange {
                first_block,
                end_block: None,
            } => format!("heap pages from block {first_block} on"),
            ShardBounds::Files { files } => match files.as_slice() {
                [one] => match one.row_groups {
                    Some((first, end)) => {
                        format!("row groups {first} <= group < {end} of {}", one.file.path)
                    }
                    None => one.file.path.clone(),
                },
                many => format!("{} files", many.len()),
            },
        }
    }
}

/// The rows of an incremental load: `column` after the value loaded last (or from the
/// historical start), through the high-water mark captured when the run was planned. Values
/// are the column's text form, cast back in SQL to the column's type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub column: String,
    pub column_type: String,
    /// Exclusive lower bound: the watermark of the last load.
    pub after: Option<String>,
    /// Inclusive lower bound (`historical_start_date`), used when there is no watermark.
    pub from: Option<String>,
    /// Inclusive upper bound: the high-water mark.
    pub through: String,
}

// --- What planning decides, for every connector. ------------------------------------------

/// A row estimate and where it came from.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Estimate {
    pub rows: u64,
    pub source: String,
}

/// The shards of a table and how they were cut.
#[derive(Clone, Debug)]
pub struct Split {
    /// `none`, `histogram`, `sample`, `ctid` or a file grouping.
    pub method: String,
    pub column: Option<String>,
    pub shards: Vec<(ShardBounds, u64)>,
}

/// Where an incremental window starts and ends, before planning resolves it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowBounds {
    /// Exclusive lower bounds: the greatest one wins (Django's `last_sync_value` and the
    /// watermark the state store recorded with the stream's last load).
    pub after: Vec<String>,
    /// Inclusive lower bound (`historical_start_date`) when there is no `after`.
    pub from: Option<String>,
    /// A high-water mark fixed beforehand (a taken-over run reads its window again); else
    /// `max(column)` now.
    pub through: Option<String>,
    /// Merge mode: the window starts this long before `after` (a date or timestamp column).
    pub lookback: Option<std::time::Duration>,
}

/// What planning an incremental window decided.
#[derive(Clone, Debug)]
pub struct PlannedWindow {
    /// None when the window is empty.
    pub window: Option<Window>,
    /// The exclusive lower bound it resolved to (the watermark loaded last).
    pub after: Option<String>,
    pub rows: u64,
    /// Rows above the lower bound but past every window's end (`infinity`, numeric `NaN`): an
    /// incremental load never takes them.
    pub beyond: u64,
    pub shards: Vec<(ShardBounds, u64)>,
}

/// Planning a table source (PostgreSQL, MySQL): one connection, the table described once,
/// then its estimate, its cut into shards, or an incremental window's cut.
#[async_trait::async_trait]
pub trait TableSurvey: Send {
    /// Every column of the table, in table order.
    fn columns(&self) -> &[SourceColumn];
    /// The primary key's columns in key order; empty without one.
    fn primary_key(&self) -> &[String];
    /// The table's rows without a scan, or counted when `exact`.
    async fn estimate(&mut self, exact: bool) -> Result<Estimate>;
    /// `shards` ranges of about `estimated_rows / shards` rows each.
    async fn split(&mut self, estimated_rows: u64, shards: usize) -> Result<Split>;
    /// The window of an incremental load on `column`, counted exactly and cut into
    /// `shards(rows)` ranges.
    async fn plan_window(
        &mut self,
        column: &str,
        bounds: WindowBounds,
        shards: &(dyn Fn(u64) -> usize + Send + Sync),
    ) -> Result<PlannedWindow>;
}

/// A stream of Arrow batches from one shard.
pub type BatchStream = Pin<Box<dyn Stream<Item = Result<RecordBatch>> + Send>>;

/// The batches an extraction task sends, as a stream.
pub(crate) fn receiver_stream(rx: tokio::sync::mpsc::Receiver<Result<RecordBatch>>) -> BatchStream {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Quotes an identifier for SQL: always quoted, embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_bounds_say_which_side_is_inclusive() {
        let range = |lower: Option<&str>, upper: Option<&str>, include_nulls| {
            ShardBounds::KeyRange {
                column: "order_id".into(),
                key_type: "bigint".into(),
                lower: lower.map(str::to_string),
                upper: upper.map(str::to_string),
                include_nulls,
            }
            .describe()
        };
        assert_eq!(
            range(None, Some("502130"), true),
            "order_id < 502130, or order_id IS NULL"
        );
        assert_eq!(
            range(Some("502130"), Some("994064"), false),
            "502130 <= order_id < 994064"
        );
        assert_eq!(range(Some("1498541"), None, false), "order_id >= 1498541");
        assert_eq!(range(None, None, false), "every row");
        let pages = ShardBounds::CtidRange {
            first_block: 0,
            end_block: Some(4425),
        };
        assert_eq!(pages.describe(), "heap pages 0 <= block < 4425");
        let rest = ShardBounds::CtidRange {
            first_block: 4425,
            end_block: None,
        };
        assert_eq!(rest.describe(), "heap pages from block 4425 on");
    }

    #[test]
    fn staged_schemas_carry_the_destination_names() {
        let column = |name: &str| SourceColumn {
            name: name.into(),
            type_oid: 23,
            type_name: "integer".into(),
            typmod: -1,
            nullable: true,
        };
        let columns = [column("id"), column("order id")];
        let same = staged_schema(SourceType::Postgresql, &columns, &[]);
        assert_eq!(same, arrow_schema(SourceType::Postgresql, &columns));
        let staged = staged_schema(
            SourceType::Postgresql,
            &columns,
            &["id".into(), "order_id".into()],
        );
        assert_eq!(staged.field(0), same.field(0));
        let renamed_field = staged.field(1);
        assert_eq!(renamed_field.name(), "order_id");
        assert_eq!(renamed_field.data_type(), &DataType::Int32);
        assert_eq!(
            renamed_field
                .metadata()
                .get(SOURCE_NAME_KEY)
                .map(String::as_str),
            Some("order id")
        );
        assert_eq!(
            renamed_field
                .metadata()
                .get(SOURCE_TYPE_KEY)
                .map(String::as_str),
            Some("integer")
        );
    }

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("id"), "\"id\"");
        assert_eq!(quote_ident("we\"ird; DROP"), "\"we\"\"ird; DROP\"");
    }
}
