//! Source connectors: what a table looks like, how many rows it holds, where to cut it, and
//! reading one shard of it as a stream of Arrow `RecordBatch`es.

pub mod file_schema;
pub mod files;
pub mod mysql;
pub mod mysql_types;
pub mod pandas;
pub mod pg_binary;
pub mod pg_tls;
pub mod postgres;

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
                [(pg_binary::SOURCE_TYPE_KEY.to_string(), label)].into();
            Field::new(&c.name, data_type, c.nullable).with_metadata(metadata)
        })
        .collect();
    std::sync::Arc::new(arrow::datatypes::Schema::new(fields))
}

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
    match source {
        SourceType::Mysql => (
            mysql_types::source_type_label(column),
            mysql_types::decoding_for(column).data_type(),
        ),
        // A file column's type is the BigQuery type it loads as; JSON keeps its label so the
        // warehouse makes it a JSON column.
        SourceType::Gcs | SourceType::S3 | SourceType::AzureBlob | SourceType::Local => (
            column.type_name.to_ascii_lowercase(),
            file_schema::arrow_type_of(&column.type_name).unwrap_or(DataType::Utf8),
        ),
        _ => (
            pg_binary::source_type_label(column),
            pg_binary::decoding_for(column).data_type(),
        ),
    }
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

/// The columns the job reads, in table order, checking every name the job gives.
pub fn project<'a>(
    columns: &[SourceColumn],
    table: &str,
    spec: &'a JobSpec,
) -> Result<Vec<SourceColumn>> {
    let mut missing: Vec<&str> = Vec::new();
    let mut check = |name: &'a str| {
        if !columns.iter().any(|c| c.name == name) {
            missing.push(name);
        }
    };
    if let Some(selected) = &spec.selected_columns {
        selected.iter().for_each(|c| check(c));
    }
    if let Some(ts) = &spec.timestamp_column {
        check(ts);
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
    Ok(match &spec.selected_columns {
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
                .get(pg_binary::SOURCE_TYPE_KEY)
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
