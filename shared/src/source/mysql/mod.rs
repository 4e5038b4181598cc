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

pub mod types;

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

/// Quotes an identifier: always backticks, embedded backticks doubled.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// How a key or window value is compared and bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    Int { unsigned: bool },
    Text,
    Date,
    Datetime,
    Timestamp,
}

/// The kinds shardflow cuts key ranges on; anything else is refused.
pub fn key_kind(type_name: &str) -> Option<ValueKind> {
    let t = parse_column_type(type_name);
    Some(match t.base {
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => ValueKind::Int {
            unsigned: t.unsigned,
        },
        "char" | "varchar" => ValueKind::Text,
        "date" => ValueKind::Date,
        "datetime" => ValueKind::Datetime,
        "timestamp" => ValueKind::Timestamp,
        _ => return None,
    })
}

/// The kinds an incremental window can be drawn on.
fn window_kind(column: &str, type_name: &str) -> Result<ValueKind> {
    match key_kind(type_name) {
        Some(kind) if kind != ValueKind::Text => Ok(kind),
        _ => Err(Error::Spec(SpecError::single(
            "timestamp_column",
            format!(
                "{column:?} is {type_name}; an incremental load needs a date, datetime, timestamp or integer column"
            ),
        ))),
    }
}

/// A value in the one text form shardflow binds and compares: integers in decimal, dates as
/// `YYYY-MM-DD`, datetimes and timestamps as `YYYY-MM-DD HH:MM:SS.ffffff` (timestamps in UTC,
/// the session's zone). Accepts the ISO 8601 forms a watermark is reported in.
pub fn normalize(kind: ValueKind, text: &str) -> std::result::Result<String, String> {
    let text = text.trim();
    match kind {
        ValueKind::Int { unsigned: false } => text
            .parse::<i64>()
            .map(|v| v.to_string())
            .map_err(|_| "not a signed 64-bit integer".into()),
        ValueKind::Int { unsigned: true } => text
            .parse::<u64>()
            .map(|v| v.to_string())
            .map_err(|_| "not an unsigned 64-bit integer".into()),
        ValueKind::Text => Ok(text.to_string()),
        ValueKind::Date => {
            let at = parse_instant(text, false)?;
            if at.time() != chrono::NaiveTime::MIN {
                return Err("has a time of day, and the column is a date".into());
            }
            Ok(at.date().format("%Y-%m-%d").to_string())
        }
        ValueKind::Datetime => Ok(format_datetime(parse_instant(text, false)?)),
        ValueKind::Timestamp => Ok(format_datetime(parse_instant(text, true)?)),
    }
}

fn format_datetime(at: chrono::NaiveDateTime) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// A date or date-time, naive or with an offset (converted to UTC when `zoned`; a DATETIME
/// has no zone, so only a zero offset is taken for it).
fn parse_instant(text: &str, zoned: bool) -> std::result::Result<chrono::NaiveDateTime, String> {
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(at) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(at);
        }
    }
    if let Ok(day) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_time(chrono::NaiveTime::MIN));
    }
    let zoned_text = text.replacen(' ', "T", 1).replace("Z", "+00:00");
    for format in ["%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(at) = chrono::DateTime::parse_from_str(&zoned_text, format) {
            if !zoned && at.offset().local_minus_utc() != 0 {
                return Err("has a UTC offset, and a DATETIME has no time zone".into());
            }
            return Ok(at.naive_utc());
        }
    }
    Err("not a date or date-time (YYYY-MM-DD[THH:MM:SS[.ffffff]][+HH:MM])".into())
}

/// A value bound to a statement in its column's own type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    Int(i64),
    UInt(u64),
    Text(String),
}

fn bound(kind: ValueKind, value: &str) -> Result<Bound> {
    let bad = |why: String| Error::Message(format!("bound value {value:?}: {why}"));
    Ok(match kind {
        ValueKind::Int { unsigned: false } => Bound::Int(
            value
                .parse()
                .map_err(|_| bad("not a signed integer".into()))?,
        ),
        ValueKind::Int { unsigned: true } => Bound::UInt(
            value
                .parse()
                .map_err(|_| bad("not an unsigned integer".into()))?,
        ),
        ValueKind::Text => Bound::Text(value.to_string()),
        kind => Bound::Text(normalize(kind, value).map_err(bad)?),
    })
}

fn bind_all<'q>(
    mut query: Query<'q, MySql, MySqlArguments>,
    values: &[Bound],
) -> Query<'q, MySql, MySqlArguments> {
    for v in values {
        query = match v {
            Bound::Int(i) => query.bind(*i),
            Bound::UInt(u) => query.bind(*u),
            Bound::Text(t) => query.bind(t.clone()),
        };
    }
    query
}

/// How to reach the source database. Holds the password; Debug prints no secret.
#[derive(Clone)]
pub struct MySqlConnector {
    /// Everything but TLS and a password by reference.
    options: MySqlConnectOptions,
    target: String,
    retry: RetryPolicy,
    /// The options with TLS as `ssl_mode` asks, and whether it is PREFERRED (a server whose TLS
    /// cannot be spoken is then reached without it); built when first connecting if a secret
    /// field of it is a `secretmanager://` reference, else at once.
    tls: std::sync::Arc<tokio::sync::OnceCell<(MySqlConnectOptions, bool)>>,
    tls_params: crate::secrets::SecretParams,
    login: crate::iam_login::Login,
}

impl std::fmt::Debug for MySqlConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlConnector")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl MySqlConnector {
    pub fn from_spec(spec: &JobSpec, retry: RetryPolicy) -> Result<Self> {
        use crate::iam_login;
        let c = &spec.connection;
        let host = c.host.as_deref().unwrap_or("localhost");
        let port = spec.port(3306);
        let database = c.database.as_deref().unwrap_or_default();
        let mut options = MySqlConnectOptions::new()
            .host(host)
            .port(port)
            .username(c.username.as_deref().unwrap_or_default())
            .charset("utf8mb4")
            // Timestamps are read and bound in UTC; the server's sql_mode stays as it is.
            .timezone(Some("+00:00".to_string()))
            .pipes_as_concat(false)
            .no_engine_substitution(false)
            // A shard's SELECT runs for minutes by design; sqlx would log each as slow.
            .disable_statement_logging();
        if !database.is_empty() {
            options = options.database(database);
        }
        let mut tls_params = crate::secrets::SecretParams::new(&c.other)?;
        let login = iam_login::Login::from_params(iam_login::Engine::MySql, c, &tls_params)?;
        if let iam_login::Login::IamToken { user } = &login {
            // Cloud SQL asks for the token through mysql_clear_password; over TLS only.
            options = options.username(user).enable_cleartext_plugin(true);
            // `with_tls` reads `ssl_mode`, else its alias `sslmode`.
            let modes = &iam_login::MYSQL_TLS;
            let field = if tls_params.contains(modes.field) {
                modes.field
            } else {
                "sslmode"
            };
            let given = tls_params.given(field);
            if let Some(mode) = iam_login::tls_for_token(modes, host, field, given.as_deref())? {
                tls_params = tls_params.with(modes.field, mode);
            }
        }
        // An empty password is no password: MySQL tells "using password: YES" apart.
        if let Some(password) = login.given_password() {
            options = options.password(&password);
        }
        let tls = std::sync::Arc::new(tokio::sync::OnceCell::new());
        if !tls_params.has_references() {
            let _ = tls.set(with_tls(options.clone(), |k| tls_params.given(k))?);
        }
        Ok(MySqlConnector {
            options,
            target: format!("{host}:{port}/{database}"),
            retry,
            tls,
            tls_params,
            login,
        })
    }

    /// Opens a connection, retrying transient failures by the retry policy.
    pub async fn connect(&self) -> Result<MySqlConnection> {
        super::tls::install_crypto_provider();
        // Secret fields by reference are read from Secret Manager, once for this connector.
        let (options, tls_preferred) = self
            .tls
            .get_or_try_init(|| async {
                let resolved = self.tls_params.resolve().await?;
                with_tls(self.options.clone(), |k| resolved.get(k).cloned())
            })
            .await?
            .clone();
        self.retry
            .run("connect to MySQL", || async {
                let mut options = options.clone();
                // A secret by reference (read once), or the identity's token, fresh each
                // attempt: the credentials refresh it before it expires.
                if let Some(password) = self.login.fetched_password().await? {
                    options = options.password(&password);
                }
                let connected = match MySqlConnection::connect_with(&options).await {
                    Err(sqlx::Error::Tls(e)) if tls_preferred => {
                        tracing::warn!(target = %self.target, error = %e, "TLS failed under ssl_mode PREFERRED; connecting without TLS");
                        let plain = options.clone().ssl_mode(MySqlSslMode::Disabled);
                        MySqlConnection::connect_with(&plain).await
                    }
                    other => other,
                };
                connected.map_err(|e| {
                        // A certificate that does not verify, or no TLS where it is
                        // required: the same answer every time.
                        let mut chain = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(cause) = source {
                            chain = format!("{chain}: {cause}");
                            source = cause.source();
                        }
                        if let Some(why) = super::tls::tls_failure(&chain) {
                            tracing::debug!(error = %chain, "TLS to MySQL failed");
                            return Error::Source(format!(
                                "TLS to MySQL at {} failed: {why}",
                                self.target
                            ));
                        }
                        // 1045 access denied: the token was not taken.
                        if let (crate::iam_login::Login::IamToken { user }, sqlx::Error::Database(db)) = (&self.login, &e)
                            && let Some(my) = db.try_downcast_ref::<MySqlDatabaseError>()
                            && my.number() == 1045
                        {
                            return crate::iam_login::refused(user, &self.target, &format!("{} ({})", my.message(), my.number()));
                        }
                        let cause = crate::net::io_cause(&e).unwrap_or_else(|| e.to_string());
                        let text = format!("cannot connect to MySQL at {}: {cause}", self.target);
                        match source_error(e) {
                            Error::Source(_) => Error::Source(format!(
                                "the source database refused the job: {text}"
                            )),
                            _ => Error::Database(text),
                        }
                    })
            })
            .await
    }
}

/// TLS as `connection_params` asks, with MySQL's names: `ssl_mode` (or `sslmode`) `DISABLED`,
/// `PREFERRED` (the default, as MySQL's clients: TLS when the server offers it, unverified),
/// `REQUIRED` (TLS or no connection, unverified), `VERIFY_CA` (the chain must lead to `ssl_ca`),
/// `VERIFY_IDENTITY` (and the certificate must name the host); `ssl_ca`, `ssl_cert` and
/// `ssl_key` are a file path or the PEM itself. Through sqlx's rustls.
fn with_tls(
    options: MySqlConnectOptions,
    get: impl Fn(&str) -> Option<String>,
) -> Result<(MySqlConnectOptions, bool)> {
    use super::tls::{pem_bytes, spec_error};
    let given = get("ssl_mode").or_else(|| get("sslmode"));
    let mode = match given.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("PREFERRED" | "PREFER") => MySqlSslMode::Preferred,
        Some("DISABLED" | "DISABLE") => MySqlSslMode::Disabled,
        Some("REQUIRED" | "REQUIRE") => MySqlSslMode::Required,
        Some("VERIFY_CA" | "VERIFY-CA") => MySqlSslMode::VerifyCa,
        Some("VERIFY_IDENTITY" | "VERIFY-FULL") => MySqlSslMode::VerifyIdentity,
        Some(_) => {
            return Err(spec_error(
                "ssl_mode",
                format!(
                    "{:?} is not one of DISABLED, PREFERRED, REQUIRED, VERIFY_CA, \
                     VERIFY_IDENTITY",
                    given.unwrap_or_default()
                ),
            ));
        }
    };
    // VERIFY_CA without a CA of the job's own would take any publicly signed certificate.
    if matches!(mode, MySqlSslMode::VerifyCa) && get("ssl_ca").is_none() {
        return Err(spec_error(
            "ssl_ca",
            "is needed with ssl_mode VERIFY_CA: without the server's CA, any certificate a \
             public CA signed would be taken (VERIFY_IDENTITY checks the host name instead)",
        ));
    }
    let preferred = matches!(mode, MySqlSslMode::Preferred);
    let mut options = options.ssl_mode(mode);
    if let Some(ca) = get("ssl_ca") {
        options = options.ssl_ca_from_pem(pem_bytes("ssl_ca", &ca)?);
    }
    match (get("ssl_cert"), get("ssl_key")) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            options = options
                .ssl_client_cert_from_pem(pem_bytes("ssl_cert", &cert)?)
                .ssl_client_key_from_pem(pem_bytes("ssl_key", &key)?);
        }
        (Some(_), None) => return Err(spec_error("ssl_key", "is needed with ssl_cert")),
        (None, Some(_)) => return Err(spec_error("ssl_cert", "is needed with ssl_key")),
    }
    Ok((options, preferred))
}

/// Server error numbers that say the job itself is wrong (credentials, a missing database,
/// table or column, a missing privilege): the same answer every time, so not retried.
fn refuses_the_job(number: u16) -> bool {
    matches!(
        number,
        1044 | 1045 | 1049 | 1054 | 1142 | 1143 | 1146 | 1227 | 1698
    )
}

/// A sqlx error from the source, as transient (`Database`) or not (`Source`).
pub fn source_error(e: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &e
        && let Some(my) = db.try_downcast_ref::<MySqlDatabaseError>()
    {
        let text = format!("{} ({})", my.message(), my.number());
        return if refuses_the_job(my.number()) {
            Error::Source(text)
        } else {
            Error::Database(text)
        };
    }
    Error::Database(e.to_string())
}

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
        let mut conn = MySqlConnector::from_spec(spec, retry)?.connect().await?;
        let info = describe(&mut conn, &spec.schema_name, &spec.table_name).await?;
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

/// Looks the table up; a missing table is named with the database it was looked for in.
pub async fn describe(conn: &mut MySqlConnection, schema: &str, table: &str) -> Result<TableInfo> {
    let row = sqlx::query(TABLE_SQL)
        .bind(schema)
        .bind(table)
        .fetch_optional(&mut *conn)
        .await
        .map_err(source_error)?;
    let Some(row) = row else {
        return Err(Error::Source(format!(
            "table {schema}.{table} not found in MySQL"
        )));
    };
    let table_type = text(&row, 0)?.unwrap_or_default();
    let table_rows: Option<u64> = row.try_get(1).map_err(source_error)?;
    let json_checks: Vec<String> = match sqlx::query(JSON_CHECKS_SQL)
        .bind(schema)
        .bind(table)
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows
            .iter()
            .filter_map(|r| text(r, 0).ok().flatten())
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut columns = Vec::new();
    let mut collations = HashMap::new();
    for r in sqlx::query(COLUMNS_SQL)
        .bind(schema)
        .bind(table)
        .fetch_all(&mut *conn)
        .await
        .map_err(source_error)?
    {
        let name = text(&r, 0)?.unwrap_or_default();
        let mut type_name = text(&r, 1)?.unwrap_or_default();
        let is_json = json_checks
            .iter()
            .any(|c| c.contains(&format!("json_valid({})", quote_ident(&name))));
        if type_name == "longtext" && is_json {
            type_name = "json".into();
        }
        if let (Some(charset), Some(collation)) = (text(&r, 3)?, text(&r, 4)?) {
            collations.insert(name.clone(), (charset, collation));
        }
        columns.push(SourceColumn {
            name,
            type_oid: 0,
            type_name,
            typmod: -1,
            nullable: text(&r, 2)?.as_deref() != Some("NO"),
        });
    }
    let mut indexes: Vec<(String, Vec<String>, bool)> = Vec::new();
    for r in sqlx::query(INDEXES_SQL)
        .bind(schema)
        .bind(table)
        .fetch_all(&mut *conn)
        .await
        .map_err(source_error)?
    {
        let (index, column) = (text(&r, 0)?.unwrap_or_default(), text(&r, 1)?);
        let unique = r.try_get::<i64, _>(2).map_err(source_error)? == 0;
        match indexes.last_mut() {
            Some((name, cols, _)) if *name == index => cols.extend(column),
            _ => indexes.push((index, column.into_iter().collect(), unique)),
        }
    }
    let column = |name: &str| columns.iter().find(|c| c.name == name);
    let primary_key = indexes
        .iter()
        .find(|(name, ..)| name == "PRIMARY")
        .map(|(_, cols, _)| cols.clone())
        .unwrap_or_default();
    let split_key = indexes
        .iter()
        .filter(|(_, cols, unique)| {
            *unique && cols.iter().all(|c| column(c).is_some_and(|c| !c.nullable))
        })
        .filter_map(|(_, cols, _)| cols.first().and_then(|c| column(c)))
        .find(|c| {
            matches!(
                key_kind(&c.type_name),
                Some(ValueKind::Int { .. } | ValueKind::Text)
            )
        })
        .cloned();
    Ok(TableInfo {
        schema: schema.to_string(),
        table: table.to_string(),
        table_type,
        table_rows,
        columns,
        split_key,
        primary_key,
        collations,
    })
}

/// Reads a count that the server may send as a signed or unsigned integer, a decimal or text.
fn count_at(row: &MySqlRow, i: usize) -> Result<u64> {
    if let Ok(v) = row.try_get::<Option<u64>, _>(i) {
        return Ok(v.unwrap_or(0));
    }
    if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
        return Ok(v.unwrap_or(0).max(0) as u64);
    }
    let text = text(row, i)?.unwrap_or_default();
    Ok(text.parse::<f64>().map(|f| f.max(0.0) as u64).unwrap_or(0))
}

/// Estimates the table's rows without scanning it: InnoDB's `TABLE_ROWS`, `EXPLAIN` for a
/// view; `COUNT(*)` only when asked for.
pub async fn estimate(
    conn: &mut MySqlConnection,
    info: &TableInfo,
    exact: bool,
) -> Result<Estimate> {
    if exact {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {}",
            info.qualified()
        )))
        .fetch_one(&mut *conn)
        .await
        .map_err(source_error)?;
        return Ok(Estimate {
            rows: count_at(&row, 0)?,
            source: "count(*)".into(),
        });
    }
    if let Some(rows) = info.table_rows
        && info.table_type != "VIEW"
    {
        return Ok(Estimate {
            rows,
            source: "information_schema.TABLES.TABLE_ROWS (InnoDB's estimate; ANALYZE TABLE refreshes it)".into(),
        });
    }
    let plan = sqlx::query(AssertSqlSafe(format!(
        "EXPLAIN SELECT * FROM {}",
        info.qualified()
    )))
    .fetch_all(&mut *conn)
    .await
    .map_err(source_error)?;
    let mut rows = 0;
    for r in &plan {
        let i = r
            .columns()
            .iter()
            .position(|c| sqlx::Column::name(c) == "rows")
            .ok_or_else(|| Error::Database("EXPLAIN returned no rows column".into()))?;
        rows = rows.max(count_at(r, i)?);
    }
    Ok(Estimate {
        rows,
        source: "EXPLAIN".into(),
    })
}

/// Integer keys whose span is at most this many times the rows are cut by value: rows are
/// spread evenly enough over a dense key (an auto-increment id, even with deletions).
const DENSE_KEY_SPAN: u128 = 2;

/// Cuts the table into `shards` ranges of about equal row count: by value over a dense
/// integer key (no read at all), else from every n-th key read in index order (MySQL has no
/// block sampling; only the key column crosses the wire). No usable key: one shard.
pub async fn split(
    conn: &mut MySqlConnection,
    info: &TableInfo,
    estimated_rows: u64,
    shards: usize,
) -> Result<Split> {
    let whole = |why: &str| Split {
        method: why.to_string(),
        column: None,
        shards: vec![(ShardBounds::Whole, estimated_rows)],
    };
    if shards <= 1 {
        return Ok(whole("none"));
    }
    let Some(key) = &info.split_key else {
        return Ok(whole(
            "none (no primary key or unique NOT NULL key of an integer or string type)",
        ));
    };
    let Some(kind) = key_kind(&key.type_name) else {
        return Ok(whole("none"));
    };
    let k = quote_ident(&key.name);
    let t = info.qualified();
    if let ValueKind::Int { .. } = kind {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT CAST(MIN({k}) AS CHAR), CAST(MAX({k}) AS CHAR) FROM {t}"
        )))
        .fetch_one(&mut *conn)
        .await
        .map_err(source_error)?;
        let (Some(min), Some(max)) = (text(&row, 0)?, text(&row, 1)?) else {
            return Ok(whole("none (the table is empty)"));
        };
        let (Ok(min), Ok(max)) = (min.parse::<i128>(), max.parse::<i128>()) else {
            return Err(Error::Database(format!("MIN/MAX of {k} are not integers")));
        };
        let span = (max - min) as u128 + 1;
        if span >= shards as u128 && span <= DENSE_KEY_SPAN * u128::from(estimated_rows.max(1)) {
            let cuts: Vec<Cut> = (1..shards)
                .map(|i| Cut {
                    value: (min + (span * i as u128 / shards as u128) as i128).to_string(),
                    rank: i as f64 / shards as f64,
                })
                .collect();
            return Ok(Split {
                method: "key span (dense integer key)".into(),
                column: Some(key.name.clone()),
                shards: plan::key_ranges(key, &cuts, estimated_rows),
            });
        }
    }
    let stride = (estimated_rows / (shards as u64 * 1_000)).max(1);
    let (points, _) = every_nth(
        conn,
        format!("SELECT CAST({k} AS CHAR) FROM {t} WHERE {k} IS NOT NULL ORDER BY {k}"),
        &[],
        stride,
    )
    .await?;
    if points.len() <= 2 * shards {
        return Ok(whole("none (too few keys to cut)"));
    }
    let cuts = check_ascending(conn, info, key, plan::equal_rank_cuts(&points, shards)).await?;
    Ok(Split {
        method: "key scan".into(),
        column: Some(key.name.clone()),
        shards: plan::key_ranges(key, &cuts, estimated_rows),
    })
}

/// Every `stride`-th value (and the last) of a one-column query, in its order, and the rows.
async fn every_nth(
    conn: &mut MySqlConnection,
    sql: String,
    binds: &[Bound],
    stride: u64,
) -> Result<(Vec<String>, u64)> {
    let query = bind_all(sqlx::query(AssertSqlSafe(sql)), binds);
    let mut rows = query.fetch(&mut *conn);
    let mut points = Vec::new();
    let mut n = 0u64;
    let mut last = None;
    while let Some(row) = rows.next().await {
        let row = row.map_err(source_error)?;
        if n.is_multiple_of(stride) {
            points.push(text(&row, 0)?.unwrap_or_default());
            last = None;
        } else {
            last = Some(row);
        }
        n += 1;
    }
    if let Some(row) = last {
        points.push(text(&row, 0)?.unwrap_or_default());
    }
    Ok((points, n))
}

/// Overlapping ranges would load rows twice: the server compares neighbouring cuts in the
/// key's own collation; cuts equal under it (`a` and `A`) are merged, descending ones refused.
pub async fn check_ascending(
    conn: &mut MySqlConnection,
    info: &TableInfo,
    key: &SourceColumn,
    cuts: Vec<Cut>,
) -> Result<Vec<Cut>> {
    let kind = key_kind(&key.type_name)
        .ok_or_else(|| Error::Source(format!("cannot cut on key type {}", key.type_name)))?;
    let mut kept: Vec<Cut> = Vec::with_capacity(cuts.len());
    for cut in cuts {
        let Some(prev) = kept.last() else {
            kept.push(cut);
            continue;
        };
        let order = match kind {
            ValueKind::Int { .. } => {
                let parse = |v: &str| {
                    v.parse::<i128>()
                        .map_err(|_| Error::Source(format!("cut {v:?} is not an integer")))
                };
                parse(&prev.value)?.cmp(&parse(&cut.value)?)
            }
            ValueKind::Text => {
                let (charset, collation) = info
                    .collations
                    .get(&key.name)
                    .ok_or_else(|| Error::Source(format!("no collation known for {}", key.name)))?;
                let safe = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !safe(charset) || !safe(collation) {
                    return Err(Error::Source(format!(
                        "unexpected collation {charset}/{collation}"
                    )));
                }
                let v = format!("CAST(? AS CHAR CHARACTER SET {charset}) COLLATE {collation}");
                let row = sqlx::query(AssertSqlSafe(format!("SELECT STRCMP({v}, {v})")))
                    .bind(prev.value.clone())
                    .bind(cut.value.clone())
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(source_error)?;
                let c: i64 = row.try_get(0).map_err(source_error)?;
                c.cmp(&0)
            }
            _ => prev.value.cmp(&cut.value),
        };
        match order {
            std::cmp::Ordering::Less => kept.push(cut),
            std::cmp::Ordering::Equal => {}
            std::cmp::Ordering::Greater => {
                return Err(Error::Source(format!(
                    "the shard cuts on {} are not in ascending order ({:?} before {:?}); refusing to plan overlapping ranges",
                    key.name, prev.value, cut.value
                )));
            }
        }
    }
    Ok(kept)
}

/// The window of an incremental load, its exact row count, and its cut into `shards` ranges
/// of about equal rows (every n-th value of the window column, read in order).
pub async fn plan_window(
    conn: &mut MySqlConnection,
    info: &TableInfo,
    column: &str,
    bounds: WindowBounds,
    shards: impl Fn(u64) -> usize,
) -> Result<PlannedWindow> {
    let col = info
        .columns
        .iter()
        .find(|c| c.name == column)
        .ok_or_else(|| {
            Error::Spec(SpecError::single(
                "timestamp_column",
                format!("{column:?} is not a column of {}", info.qualified()),
            ))
        })?;
    let kind = window_kind(column, &col.type_name)?;
    let value_of = |value: &str, field: &str| {
        normalize(kind, value).map_err(|why| {
            Error::Spec(SpecError::single(
                field,
                format!(
                    "{value:?} is not a value of {column:?} ({}): {why}",
                    col.type_name
                ),
            ))
        })
    };
    // The greatest candidate, compared in the column's type, bounds the window; the
    // watermark keeps the form it was reported in.
    let mut after: Option<(String, String)> = None;
    for value in &bounds.after {
        let normal = value_of(value, "last_sync_value")?;
        let greater = match &after {
            None => true,
            Some((_, best)) => compare(kind, &normal, best) == std::cmp::Ordering::Greater,
        };
        if greater {
            after = Some((value.clone(), normal));
        }
    }
    let start_after = match (&after, bounds.lookback) {
        (Some((_, normal)), Some(lookback)) => {
            if matches!(kind, ValueKind::Int { .. }) {
                return Err(Error::Spec(SpecError::single(
                    "lookback",
                    format!(
                        "needs a date, datetime or timestamp timestamp_column; {column:?} is {}",
                        col.type_name
                    ),
                )));
            }
            let at = parse_instant(normal, true).map_err(Error::Message)?;
            let earlier =
                at - chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::MAX);
            Some(normalize(kind, &format_datetime(earlier)).or_else(|_| {
                // A date column: the day the instant falls on.
                Ok::<_, Error>(earlier.date().format("%Y-%m-%d").to_string())
            })?)
        }
        (after, _) => after.as_ref().map(|(_, n)| n.clone()),
    };
    let from = bounds
        .from
        .as_deref()
        .map(|v| value_of(v, "historical_start_date"))
        .transpose()?;
    let c = quote_ident(column);
    let table = info.qualified();
    let (lower_sql, lower): (String, Vec<Bound>) = match (&start_after, &from) {
        (Some(v), _) => (format!("{c} > ?"), vec![bound(kind, v)?]),
        (None, Some(v)) => (format!("{c} >= ?"), vec![bound(kind, v)?]),
        (None, None) => (format!("{c} IS NOT NULL"), Vec::new()),
    };
    let through = match bounds.through {
        Some(fixed) => Some(value_of(&fixed, "last_sync_value")?),
        None => {
            let row = bind_all(
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT CAST(MAX({c}) AS CHAR) FROM {table} WHERE {lower_sql}"
                ))),
                &lower,
            )
            .fetch_one(&mut *conn)
            .await
            .map_err(source_error)?;
            text(&row, 0)?
                .map(|v| normalize(kind, &v).map_err(Error::Message))
                .transpose()?
        }
    };
    let resumes_after = after.map(|(told, _)| told);
    let Some(through) = through else {
        return Ok(PlannedWindow {
            window: None,
            after: resumes_after,
            rows: 0,
            // MySQL's dates and decimals have no infinities.
            beyond: 0,
            shards: Vec::new(),
        });
    };
    let window_sql = format!("{lower_sql} AND {c} <= ?");
    let mut binds = lower.clone();
    binds.push(bound(kind, &through)?);
    let row = bind_all(
        sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {table} WHERE {window_sql}"
        ))),
        &binds,
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(source_error)?;
    let rows = count_at(&row, 0)?;
    let wanted = shards(rows);
    let window = Window {
        column: column.to_string(),
        column_type: col.type_name.clone(),
        after: start_after,
        from,
        through,
    };
    let planned = |shards| PlannedWindow {
        window: Some(window.clone()),
        after: resumes_after.clone(),
        rows,
        beyond: 0,
        shards,
    };
    if wanted <= 1 {
        return Ok(planned(vec![(ShardBounds::Whole, rows)]));
    }
    let stride = (rows / (wanted as u64 * 1_000)).max(1);
    let (points, _) = every_nth(
        conn,
        format!("SELECT CAST({c} AS CHAR) FROM {table} WHERE {window_sql} ORDER BY {c}"),
        &binds,
        stride,
    )
    .await?;
    let mut cuts = plan::equal_rank_cuts(&points, wanted);
    for cut in &mut cuts {
        cut.value = normalize(kind, &cut.value).map_err(Error::Message)?;
    }
    cuts.dedup_by(|a, b| a.value == b.value);
    let key = SourceColumn {
        nullable: false,
        ..col.clone()
    };
    Ok(planned(plan::key_ranges(&key, &cuts, rows)))
}

/// Two normalized values of one kind in the column's order.
fn compare(kind: ValueKind, a: &str, b: &str) -> std::cmp::Ordering {
    match kind {
        ValueKind::Int { .. } => match (a.parse::<i128>(), b.parse::<i128>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        },
        // Fixed-width ISO forms sort as they read.
        _ => a.cmp(b),
    }
}

/// The SELECT of one shard and its bound values.
pub fn select_statement(task: &ShardTask) -> Result<(String, Vec<Bound>)> {
    let columns: Vec<String> = task.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let mut sql = format!(
        "SELECT {} FROM {}.{}",
        columns.join(", "),
        quote_ident(&task.schema_name),
        quote_ident(&task.table_name)
    );
    let mut conditions: Vec<String> = Vec::new();
    let mut binds: Vec<Bound> = Vec::new();
    match &task.bounds {
        ShardBounds::Whole => {}
        ShardBounds::KeyRange {
            column,
            key_type,
            lower,
            upper,
            include_nulls,
        } => {
            let kind = key_kind(key_type).ok_or_else(|| {
                Error::Message(format!(
                    "shard key type \"{key_type}\" is not one shardflow cuts on"
                ))
            })?;
            let k = quote_ident(column);
            let mut range = Vec::new();
            if let Some(v) = lower {
                range.push(format!("{k} >= ?"));
                binds.push(bound(kind, v)?);
            }
            if let Some(v) = upper {
                range.push(format!("{k} < ?"));
                binds.push(bound(kind, v)?);
            }
            if !range.is_empty() {
                let range = range.join(" AND ");
                conditions.push(if *include_nulls {
                    format!("({range}) OR {k} IS NULL")
                } else {
                    range
                });
            }
        }
        ShardBounds::CtidRange { .. } => {
            return Err(Error::Message(
                "a ctid range is a PostgreSQL shard; this job reads MySQL".into(),
            ));
        }
        ShardBounds::Files { .. } => {
            return Err(Error::Message(
                "a file shard names files; this job reads MySQL".into(),
            ));
        }
    }
    if let Some(w) = &task.window {
        let kind = window_kind(&w.column, &w.column_type)?;
        let c = quote_ident(&w.column);
        if let Some(after) = &w.after {
            conditions.push(format!("{c} > ?"));
            binds.push(bound(kind, after)?);
        } else if let Some(from) = &w.from {
            conditions.push(format!("{c} >= ?"));
            binds.push(bound(kind, from)?);
        }
        conditions.push(format!("{c} <= ?"));
        binds.push(bound(kind, &w.through)?);
    }
    if !conditions.is_empty() {
        let all: Vec<String> = conditions.iter().map(|c| format!("({c})")).collect();
        sql.push_str(" WHERE ");
        sql.push_str(&all.join(" AND "));
    }
    Ok((sql, binds))
}

/// Reads one shard as Arrow batches, in its own consistent snapshot. The rows are decoded in
/// their own task and handed over a channel of `in_flight` batches, so decoding overlaps
/// Parquet encoding and memory stays at `in_flight` batches whatever the shard's size.
pub async fn extract(
    connector: &MySqlConnector,
    task: &ShardTask,
    in_flight: usize,
) -> Result<BatchStream> {
    let (sql, binds) = select_statement(task)?;
    let mut conn = connector.connect().await?;
    // A slow Parquet writer must not make the server give up on a stalled send.
    for statement in [
        "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET SESSION net_write_timeout = 3600",
        "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY",
    ] {
        sqlx::raw_sql(statement)
            .execute(&mut conn)
            .await
            .map_err(source_error)?;
    }
    let mut decoder = RowDecoder::new(&task.columns, task.batch_rows);
    let width = task.columns.len();
    let (tx, rx) = tokio::sync::mpsc::channel(in_flight.max(1));
    let shard = task.shard_id.clone();
    tokio::spawn(async move {
        let outcome: Result<()> = async {
            {
                let query = bind_all(sqlx::query(AssertSqlSafe(sql)), &binds);
                let mut rows = query.fetch(&mut conn);
                while let Some(row) = rows.next().await {
                    let row = row.map_err(source_error)?;
                    if row.len() != width {
                        return Err(Error::Message(format!(
                            "the source sent {} of the {width} columns asked for",
                            row.len()
                        )));
                    }
                    decoder.push_row((0..width).map(|i| raw(&row, i)))?;
                    if decoder.batch_full()
                        && let Some(batch) = decoder.take_batch()?
                        && tx.send(Ok(batch)).await.is_err()
                    {
                        return Ok(()); // the reader went away; dropping the connection ends it
                    }
                }
            }
            if let Some(batch) = decoder.take_batch()? {
                let _ = tx.send(Ok(batch)).await;
            }
            sqlx::raw_sql("COMMIT")
                .execute(&mut conn)
                .await
                .map_err(source_error)?;
            for (column, n) in decoder.zero_dates() {
                tracing::warn!(shard = %shard, column, zero_dates = n, "zero dates read as NULL");
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            let _ = tx.send(Err(e)).await;
        }
    });
    Ok(receiver_stream(rx))
}

/// Column `i`'s bytes as the server sent them; `None` only for SQL NULL (a zero date comes
/// through, and the decoder tells it apart). `i` is below the row's width, checked per row.
fn raw(row: &MySqlRow, i: usize) -> Option<&[u8]> {
    let value = row.try_get_raw(i).ok()?;
    <&[u8] as sqlx::Decode<'_, MySql>>::decode(value).ok()
}

#[cfg(test)]
mod tests {
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
