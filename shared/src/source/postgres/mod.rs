//! PostgreSQL: catalog lookups, row estimates without scanning, equal-row key ranges from
//! `pg_stats` or a `TABLESAMPLE`, one exported snapshot per run, and shard extraction with
//! `COPY (SELECT …) TO STDOUT (FORMAT binary)` decoded straight into Arrow.
//!
//! Identifiers are always quoted; values (shard bounds) are bound as parameters through
//! `set_config` and read back with `current_setting`, because COPY takes no parameters.

pub mod binary;
mod connect;
mod errors;
mod extract;
mod survey;

pub use self::connect::PgConnector;
use self::connect::*;
pub use self::extract::{BoundSettings, copy_statement, export_snapshot, extract};
use self::survey::*;
pub use self::survey::{check_ascending, describe, estimate, plan_window, split};

use std::time::Duration;

use futures::StreamExt;
use tokio_postgres::Client;

use self::binary::{CopyDecoder, select_item};
use super::tls::{PgTls, SslMode, tls_failure};
use super::{
    BatchStream, Estimate, Extraction, PlannedWindow, ShardBounds, SnapshotHold, Source,
    SourceColumn, SourceSurvey, Split, Window, WindowBounds, quote_ident, receiver_stream,
};
use crate::messages::ShardTask;
use crate::plan::{self, Cut};
use crate::retry::RetryPolicy;
use crate::spec::JobSpec;
use crate::{Error, Result};

/// The key types shardflow cuts into ranges, and the type each one's text form is cast back to
/// in SQL. Anything else is refused, so a shard message can never put other SQL in the cast.
/// `character` alone means char(1), which would truncate the bounds; `bpchar` has no length.
fn cast_type(key_type: &str) -> Option<&'static str> {
    Some(match key_type {
        "smallint" => "smallint",
        "integer" => "integer",
        "bigint" => "bigint",
        "numeric" => "numeric",
        "date" => "date",
        "timestamp without time zone" => "timestamp without time zone",
        "timestamp with time zone" => "timestamp with time zone",
        "text" => "text",
        "character varying" => "character varying",
        "character" => "bpchar",
        "uuid" => "uuid",
        _ => return None,
    })
}

/// What the catalog says about a table.
#[derive(Clone, Debug)]
pub struct TableInfo {
    pub schema: String,
    pub table: String,
    pub oid: u32,
    /// `r` table, `p` partitioned, `v` view, `m` materialised view, `f` foreign.
    pub relkind: String,
    pub relpages: i32,
    pub reltuples: f32,
    /// Heap pages now, from the relation size.
    pub pages_now: u64,
    /// Every column of the table, in order.
    pub columns: Vec<SourceColumn>,
    /// The column shards are cut on: first column of the primary key or of a unique NOT NULL
    /// index, when its type can be cut into ranges.
    pub split_key: Option<SourceColumn>,
    /// The primary key's columns in key order; empty without one.
    pub primary_key: Vec<String>,
}

impl TableInfo {
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

const TABLE_SQL: &str = "
SELECT c.oid, c.relkind::text, c.relpages, c.reltuples,
       CASE WHEN c.relkind IN ('r', 'm', 't')
            THEN pg_relation_size(c.oid) / current_setting('block_size')::bigint ELSE 0 END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')";

const COLUMNS_SQL: &str = "
SELECT a.attname::text,
       CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END,
       format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END, NULL),
       CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END,
       NOT a.attnotnull
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum";

const KEY_SQL: &str = "
SELECT a.attname::text
FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = $1 AND i.indisvalid AND i.indpred IS NULL
  AND (i.indisprimary OR (i.indisunique AND a.attnotnull))
ORDER BY i.indisprimary DESC, i.indnatts, i.indexrelid";

const PRIMARY_KEY_SQL: &str = "
SELECT a.attname::text
FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, ord), pg_attribute a
WHERE i.indrelid = $1 AND i.indisprimary AND a.attrelid = i.indrelid AND a.attnum = k.attnum
ORDER BY k.ord";

/// Pinned for the extraction transaction: ISO date output, ISO 8601 intervals
/// (`P1Y2M3DT4H5M6S`), floats printed exactly. Only output forms: the DateStyle order and the
/// TimeZone stay the role's, because they also read the window's bound values, which the
/// planner read under the role's settings.
const TEXT_FORM_SETTINGS: [(&str, &str); 3] = [
    ("DateStyle", "ISO"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
];

/// `TableSurvey` on PostgreSQL: a connection and the table as `describe` found it.
/// The PostgreSQL connector: one snapshot exported per run, shards read by binary COPY.
pub struct PostgresSource;

#[async_trait::async_trait]
impl Source for PostgresSource {
    fn column_types(&self, column: &SourceColumn) -> (String, arrow::datatypes::DataType) {
        (
            binary::source_type_label(column),
            binary::decoding_for(column).data_type(),
        )
    }

    async fn survey(
        &self,
        spec: &JobSpec,
        opts: &crate::plan::PlanOptions,
        _stream: &crate::plan::StreamState,
    ) -> Result<SourceSurvey> {
        let survey = PgSurvey::open(spec, opts.retry.clone()).await?;
        Ok(SourceSurvey::Table(Box::new(survey)))
    }

    async fn hold_snapshot(
        &self,
        spec: &JobSpec,
        retry: RetryPolicy,
    ) -> Result<Option<SnapshotHold>> {
        let connector = PgConnector::from_spec(spec, retry)?;
        Ok(Some(export_snapshot(&connector).await?))
    }

    async fn extract(
        &self,
        spec: &JobSpec,
        task: &ShardTask,
        retry: RetryPolicy,
        in_flight: usize,
    ) -> Result<Extraction> {
        let connector = PgConnector::from_spec(spec, retry)?;
        Ok(Extraction {
            batches: extract(&connector, task, in_flight).await?,
            file_rows: None,
        })
    }
}

pub struct PgSurvey {
    client: Client,
    info: TableInfo,
}

impl PgSurvey {
    pub async fn open(spec: &JobSpec, retry: RetryPolicy) -> Result<Self> {
        let table = super::table_of(spec)?;
        let client = PgConnector::from_spec(spec, retry)?.connect().await?;
        let info = describe(&client, &table.schema, &table.table).await?;
        Ok(PgSurvey { client, info })
    }
}

#[async_trait::async_trait]
impl super::TableSurvey for PgSurvey {
    fn columns(&self) -> &[SourceColumn] {
        &self.info.columns
    }

    fn primary_key(&self) -> &[String] {
        &self.info.primary_key
    }

    async fn estimate(&mut self, exact: bool) -> Result<Estimate> {
        estimate(&self.client, &self.info, exact).await
    }

    async fn split(&mut self, estimated_rows: u64, shards: usize) -> Result<Split> {
        split(&self.client, &self.info, estimated_rows, shards).await
    }

    async fn plan_window(
        &mut self,
        column: &str,
        bounds: WindowBounds,
        shards: &(dyn Fn(u64) -> usize + Send + Sync),
    ) -> Result<PlannedWindow> {
        plan_window(&self.client, &self.info, column, bounds, shards).await
    }
}

#[cfg(test)]
mod tests {
    use super::extract::valid_snapshot_id;
    use super::*;

    fn task(bounds: ShardBounds) -> ShardTask {
        ShardTask {
            version: 1,
            run_id: "r".into(),
            shard_id: "s0000".into(),
            shard_index: 0,
            data_source_id: None,
            etl_run_id: None,
            schema_name: "pub\"lic".into(),
            table_name: "t".into(),
            columns: vec![
                SourceColumn {
                    name: "id".into(),
                    type_oid: 20,
                    type_name: "bigint".into(),
                    typmod: -1,
                    nullable: false,
                },
                SourceColumn {
                    name: "span".into(),
                    type_oid: 1186,
                    type_name: "interval".into(),
                    typmod: -1,
                    nullable: true,
                },
            ],
            destination_names: Vec::new(),
            bounds,
            snapshot: None,
            batch_rows: 10,
            timestamp_column: None,
            window: None,
            sealed_config: None,
        }
    }

    #[test]
    fn copy_statement_quotes_names_and_binds_bounds() {
        let (sql, settings) = copy_statement(&task(ShardBounds::KeyRange {
            column: "id".into(),
            key_type: "bigint".into(),
            lower: Some("10".into()),
            upper: Some("20'; DROP TABLE t; --".into()),
            include_nulls: true,
        }))
        .unwrap();
        assert_eq!(
            sql,
            "COPY (SELECT \"id\", \"span\"::text FROM \"pub\"\"lic\".\"t\" WHERE ((\"id\" >= current_setting('shardflow.lower')::bigint AND \"id\" < current_setting('shardflow.upper')::bigint) OR \"id\" IS NULL)) TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            settings,
            vec![
                ("shardflow.lower", "10".to_string()),
                ("shardflow.upper", "20'; DROP TABLE t; --".to_string())
            ]
        );
    }

    #[test]
    fn an_incremental_window_bounds_every_shard() {
        let mut t = task(ShardBounds::KeyRange {
            column: "at".into(),
            key_type: "timestamp with time zone".into(),
            lower: Some("2024-01-02 00:00:00+00".into()),
            upper: None,
            include_nulls: false,
        });
        t.window = Some(Window {
            column: "at".into(),
            column_type: "timestamp with time zone".into(),
            after: Some("2024-01-01T00:00:00Z".into()),
            from: Some("2023-01-01".into()),
            through: "2024-02-01 00:00:00+00".into(),
        });
        let (sql, settings) = copy_statement(&t).unwrap();
        assert!(
            sql.ends_with(
                "WHERE (\"at\" >= current_setting('shardflow.lower')::timestamp with time zone) \
                 AND (\"at\" > current_setting('shardflow.after')::timestamp with time zone) \
                 AND (\"at\" <= current_setting('shardflow.through')::timestamp with time zone)) \
                 TO STDOUT (FORMAT binary)"
            ),
            "{sql}"
        );
        let names: Vec<&str> = settings.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["shardflow.lower", "shardflow.after", "shardflow.through"]
        );
        // The historical start applies only without a watermark.
        t.window.as_mut().unwrap().after = None;
        let (sql, _) = copy_statement(&t).unwrap();
        assert!(
            sql.contains("\"at\" >= current_setting('shardflow.from')"),
            "{sql}"
        );
        t.window.as_mut().unwrap().column_type = "text".into();
        assert_eq!(
            copy_statement(&t).unwrap_err().to_string(),
            "invalid job config: timestamp_column: \"at\" is text; an incremental load needs a date, timestamp or number column"
        );
    }

    #[test]
    fn copy_statement_for_ctid_and_whole() {
        let (sql, settings) = copy_statement(&task(ShardBounds::CtidRange {
            first_block: 5,
            end_block: None,
        }))
        .unwrap();
        assert!(
            sql.ends_with(
                "WHERE (ctid >= current_setting('shardflow.lower')::tid)) TO STDOUT (FORMAT binary)"
            ),
            "{sql}"
        );
        assert_eq!(settings, vec![("shardflow.lower", "(5,0)".to_string())]);
        let (sql, ..) = copy_statement(&task(ShardBounds::Whole)).unwrap();
        assert!(!sql.contains("WHERE"));
    }

    #[test]
    fn char_keys_are_cast_without_truncation() {
        let (sql, ..) = copy_statement(&task(ShardBounds::KeyRange {
            column: "id".into(),
            key_type: "character".into(),
            lower: Some("abc".into()),
            upper: None,
            include_nulls: false,
        }))
        .unwrap();
        assert!(
            sql.contains("current_setting('shardflow.lower')::bpchar"),
            "{sql}"
        );
    }

    #[test]
    fn unknown_key_types_are_refused() {
        let err = copy_statement(&task(ShardBounds::KeyRange {
            column: "id".into(),
            key_type: "bigint; DROP".into(),
            lower: None,
            upper: Some("1".into()),
            include_nulls: false,
        }))
        .unwrap_err();
        assert!(err.to_string().contains("is not one shardflow cuts on"));
    }

    #[test]
    fn snapshot_ids_are_checked() {
        assert!(valid_snapshot_id("00000003-0000001B-1"));
        assert!(!valid_snapshot_id("1'; DROP"));
    }
}
