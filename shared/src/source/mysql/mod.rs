//! MySQL and MariaDB: catalog lookups in `information_schema`, row estimates without a scan,
//! equal-row key ranges, incremental windows, and shard extraction through a prepared
//! statement (binary protocol) decoded straight into Arrow.
//!
//! Each shard reads in its own `START TRANSACTION WITH CONSISTENT SNAPSHOT`: MySQL cannot
//! share one snapshot between connections, so the shards of a run see the table at slightly
//! different moments. Key ranges are disjoint, so a row is read twice or missed only if its
//! key changes while the run starts its shards; an incremental window is bounded above by the
//! high-water mark fixed at planning, so rows committed during the run wait for the next one.
//!
//! Identifiers are quoted with backticks; values are always bound as parameters.

mod connect;
mod extract;
mod survey;
pub mod types;
mod values;

pub use self::connect::{MySqlConnector, source_error};
pub use self::extract::{extract, select_statement};
pub use self::survey::{check_ascending, describe, estimate, plan_window, split};
use self::values::*;
pub use self::values::{Bound, ValueKind, key_kind, normalize, quote_ident};

use std::collections::HashMap;

use futures::StreamExt;
use sqlx::mysql::{
    MySql, MySqlArguments, MySqlConnectOptions, MySqlConnection, MySqlDatabaseError, MySqlRow,
    MySqlSslMode,
};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};

use self::types::{RowDecoder, parse_column_type};
use super::{BatchStream, ShardBounds, SourceColumn, Window, receiver_stream};
use super::{Estimate, Extraction, PlannedWindow, Source, SourceSurvey, Split, WindowBounds};
use crate::messages::ShardTask;
use crate::plan::{self, Cut};
use crate::retry::RetryPolicy;
use crate::spec::{JobSpec, SpecError};
use crate::{Error, Result};

/// What the catalog says about a table.
#[derive(Clone, Debug)]
pub struct TableInfo {
    pub schema: String,
    pub table: String,
    /// `BASE TABLE`, `VIEW`, `SYSTEM VERSIONED`, ...
    pub table_type: String,
    /// InnoDB's estimate (`information_schema.TABLES.TABLE_ROWS`); None for views.
    pub table_rows: Option<u64>,
    pub columns: Vec<SourceColumn>,
    /// The first column of the primary key or of a unique index on NOT NULL columns, when
    /// its type can be cut into ranges.
    pub split_key: Option<SourceColumn>,
    /// The primary key's columns in key order; empty without one.
    pub primary_key: Vec<String>,
    /// Character set and collation of each text column.
    collations: HashMap<String, (String, String)>,
}

impl TableInfo {
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

const TABLE_SQL: &str = "
SELECT CAST(TABLE_TYPE AS CHAR), CAST(TABLE_ROWS AS UNSIGNED)
FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?";

const COLUMNS_SQL: &str = "
SELECT CAST(COLUMN_NAME AS CHAR), CAST(LOWER(COLUMN_TYPE) AS CHAR), CAST(IS_NULLABLE AS CHAR),
       CAST(CHARACTER_SET_NAME AS CHAR), CAST(COLLATION_NAME AS CHAR)
FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?
ORDER BY ORDINAL_POSITION";

const INDEXES_SQL: &str = "
SELECT CAST(INDEX_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), CAST(NON_UNIQUE AS SIGNED)
FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?
ORDER BY INDEX_NAME <> 'PRIMARY', INDEX_NAME, SEQ_IN_INDEX";

/// MariaDB's JSON is a longtext with a `json_valid` check (MySQL 8 has no TABLE_NAME here).
const JSON_CHECKS_SQL: &str = "
SELECT CAST(CHECK_CLAUSE AS CHAR) FROM information_schema.CHECK_CONSTRAINTS
WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?";

fn text(row: &MySqlRow, i: usize) -> Result<Option<String>> {
    row.try_get::<Option<String>, _>(i).map_err(source_error)
}

/// The MySQL and MariaDB connector. No snapshot is shared: each shard reads in its own.
pub struct MySqlSource;

#[async_trait::async_trait]
impl Source for MySqlSource {
    fn column_types(&self, column: &SourceColumn) -> (String, arrow::datatypes::DataType) {
        (
            types::source_type_label(column),
            types::decoding_for(column).data_type(),
        )
    }

    async fn survey(
        &self,
        spec: &JobSpec,
        opts: &crate::plan::PlanOptions,
        _stream: &crate::plan::StreamState,
    ) -> Result<SourceSurvey> {
        let survey = MySqlSurvey::open(spec, opts.retry.clone()).await?;
        Ok(SourceSurvey::Table(Box::new(survey)))
    }

    async fn extract(
        &self,
        spec: &JobSpec,
        task: &ShardTask,
        retry: RetryPolicy,
        in_flight: usize,
    ) -> Result<Extraction> {
        let connector = MySqlConnector::from_spec(spec, retry)?;
        Ok(Extraction {
            batches: extract(&connector, task, in_flight).await?,
            file_rows: None,
        })
    }
}

/// `TableSurvey` on MySQL: a connection and the table as `describe` found it.
pub struct MySqlSurvey {
    conn: MySqlConnection,
    info: TableInfo,
}

impl MySqlSurvey {
    pub async fn open(spec: &JobSpec, retry: RetryPolicy) -> Result<Self> {
        let table = super::table_of(spec)?;
        let mut conn = MySqlConnector::from_spec(spec, retry)?.connect().await?;
        let info = describe(&mut conn, &table.schema, &table.table).await?;
        Ok(MySqlSurvey { conn, info })
    }
}

#[async_trait::async_trait]
impl super::TableSurvey for MySqlSurvey {
    fn columns(&self) -> &[SourceColumn] {
        &self.info.columns
    }

    fn primary_key(&self) -> &[String] {
        &self.info.primary_key
    }

    async fn estimate(&mut self, exact: bool) -> Result<Estimate> {
        estimate(&mut self.conn, &self.info, exact).await
    }

    async fn split(&mut self, estimated_rows: u64, shards: usize) -> Result<Split> {
        split(&mut self.conn, &self.info, estimated_rows, shards).await
    }

    async fn plan_window(
        &mut self,
        column: &str,
        bounds: WindowBounds,
        shards: &(dyn Fn(u64) -> usize + Send + Sync),
    ) -> Result<PlannedWindow> {
        plan_window(&mut self.conn, &self.info, column, bounds, shards).await
    }
}

#[cfg(test)]
mod tests {
    use super::connect::refuses_the_job;
    use super::*;

    fn task(bounds: ShardBounds) -> ShardTask {
        ShardTask {
            version: 1,
            run_id: "r".into(),
            shard_id: "s0000".into(),
            shard_index: 0,
            data_source_id: None,
            etl_run_id: None,
            schema_name: "sh`op".into(),
            table_name: "t".into(),
            columns: vec![SourceColumn {
                name: "id".into(),
                type_oid: 0,
                type_name: "bigint(20) unsigned".into(),
                typmod: -1,
                nullable: false,
            }],
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
    fn shard_statements_quote_names_and_bind_typed_values() {
        let (sql, binds) = select_statement(&task(ShardBounds::KeyRange {
            column: "id".into(),
            key_type: "bigint(20) unsigned".into(),
            lower: Some("10".into()),
            upper: Some("18446744073709551615".into()),
            include_nulls: true,
        }))
        .unwrap();
        assert_eq!(
            sql,
            "SELECT `id` FROM `sh``op`.`t` WHERE ((`id` >= ? AND `id` < ?) OR `id` IS NULL)"
        );
        assert_eq!(binds, vec![Bound::UInt(10), Bound::UInt(u64::MAX)]);
        let err = select_statement(&task(ShardBounds::KeyRange {
            column: "id".into(),
            key_type: "bigint".into(),
            lower: Some("1; DROP TABLE t".into()),
            upper: None,
            include_nulls: false,
        }))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "message: bound value \"1; DROP TABLE t\": not a signed integer"
        );
        let err = select_statement(&task(ShardBounds::KeyRange {
            column: "id".into(),
            key_type: "blob".into(),
            lower: None,
            upper: Some("x".into()),
            include_nulls: false,
        }))
        .unwrap_err();
        assert!(
            err.to_string().contains("is not one shardflow cuts on"),
            "{err}"
        );
    }

    #[test]
    fn a_window_bounds_every_shard_in_utc() {
        let mut t = task(ShardBounds::Whole);
        t.window = Some(Window {
            column: "at".into(),
            column_type: "timestamp(6)".into(),
            after: Some("2024-01-01T10:00:00.5+02:00".into()),
            from: None,
            through: "2024-02-01 00:00:00".into(),
        });
        let (sql, binds) = select_statement(&t).unwrap();
        assert!(sql.ends_with("WHERE (`at` > ?) AND (`at` <= ?)"), "{sql}");
        assert_eq!(
            binds,
            vec![
                Bound::Text("2024-01-01 08:00:00.500000".into()),
                Bound::Text("2024-02-01 00:00:00.000000".into())
            ]
        );
        t.window.as_mut().unwrap().column_type = "varchar(10)".into();
        assert_eq!(
            select_statement(&t).unwrap_err().to_string(),
            "invalid job config: timestamp_column: \"at\" is varchar(10); an incremental load needs a date, datetime, timestamp or integer column"
        );
    }

    #[test]
    fn values_are_normalized_in_their_column_type() {
        assert_eq!(
            normalize(ValueKind::Date, "2024-03-01").unwrap(),
            "2024-03-01"
        );
        assert_eq!(
            normalize(ValueKind::Date, "2024-03-01T10:00:00").unwrap_err(),
            "has a time of day, and the column is a date"
        );
        assert_eq!(
            normalize(ValueKind::Datetime, "2024-03-01T10:00:00.123").unwrap(),
            "2024-03-01 10:00:00.123000"
        );
        assert_eq!(
            normalize(ValueKind::Datetime, "2024-03-01T10:00:00+01:00").unwrap_err(),
            "has a UTC offset, and a DATETIME has no time zone"
        );
        assert_eq!(
            normalize(ValueKind::Timestamp, "2024-03-01T10:00:00Z").unwrap(),
            "2024-03-01 10:00:00.000000"
        );
        assert_eq!(
            normalize(ValueKind::Int { unsigned: true }, "18446744073709551615").unwrap(),
            "18446744073709551615"
        );
        assert!(normalize(ValueKind::Int { unsigned: false }, "1e3").is_err());
        assert_eq!(
            compare(ValueKind::Int { unsigned: false }, "9", "10"),
            std::cmp::Ordering::Less
        );
    }

    #[test]
    fn only_credential_and_missing_object_errors_refuse_the_job() {
        for n in [1045, 1049, 1146, 1054, 1142] {
            assert!(refuses_the_job(n), "{n}");
        }
        // Too many connections, lock wait timeout, deadlock, server gone: retried.
        for n in [1040, 1205, 1213, 2006] {
            assert!(!refuses_the_job(n), "{n}");
        }
    }
}
