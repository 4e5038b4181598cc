//! Source connectors: what a table looks like, how many rows it holds, where to cut it, and
//! reading one shard of it as a stream of Arrow `RecordBatch`es.

pub mod pg_binary;
pub mod postgres;

use std::pin::Pin;

use arrow::record_batch::RecordBatch;
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::Result;

/// A column as the source catalog describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceColumn {
    pub name: String,
    /// PostgreSQL type OID (domains resolved to their base type).
    pub type_oid: u32,
    /// The type's name without modifiers, as `format_type(oid, NULL)` prints it.
    pub type_name: String,
    /// The type modifier (`numeric(p,s)`, `varchar(n)`), -1 when none.
    pub typmod: i32,
    pub nullable: bool,
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

/// Quotes an identifier for SQL: always quoted, embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("id"), "\"id\"");
        assert_eq!(quote_ident("we\"ird; DROP"), "\"we\"\"ird; DROP\"");
    }
}
