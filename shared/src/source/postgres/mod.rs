//! PostgreSQL: catalog lookups, row estimates without scanning, equal-row key ranges from
//! `pg_stats` or a `TABLESAMPLE`, one exported snapshot per run, and shard extraction with
//! `COPY (SELECT …) TO STDOUT (FORMAT binary)` decoded straight into Arrow.
//!
//! Identifiers are always quoted; values (shard bounds) are bound as parameters through
//! `set_config` and read back with `current_setting`, because COPY takes no parameters.

pub mod binary;

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

/// How to reach the source database. Holds the password; Debug prints no secret.
#[derive(Clone)]
pub struct PgConnector {
    config: tokio_postgres::Config,
    retry: RetryPolicy,
    /// TLS as `sslmode` asks (`source::tls`), built when first connecting if a secret field of it is
    /// a `secretmanager://` reference, else at once (so a bad setting fails the spec).
    tls: std::sync::Arc<tokio::sync::OnceCell<(tokio_postgres_rustls::MakeRustlsConnect, SslMode)>>,
    tls_params: crate::secrets::SecretParams,
    login: crate::iam_login::Login,
}

impl std::fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnector")
            .field("host", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

impl PgConnector {
    pub fn from_spec(spec: &JobSpec, retry: RetryPolicy) -> Result<Self> {
        use crate::iam_login;
        let c = &spec.connection;
        let host = c.host.as_deref().unwrap_or("localhost");
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(spec.port(5432))
            .dbname(c.database.as_deref().unwrap_or_default())
            .user(c.username.as_deref().unwrap_or_default())
            .application_name("shardflow")
            .connect_timeout(Duration::from_secs(15))
            .keepalives_idle(Duration::from_secs(30));
        let mut tls_params = crate::secrets::SecretParams::new(&c.other)?;
        let login = iam_login::Login::from_params(iam_login::Engine::Postgres, c, &tls_params)?;
        if let iam_login::Login::IamToken { user } = &login {
            config.user(user);
            let modes = &iam_login::POSTGRES_TLS;
            let given = tls_params.given(modes.field);
            if let Some(mode) =
                iam_login::tls_for_token(modes, host, modes.field, given.as_deref())?
            {
                tls_params = tls_params.with(modes.field, mode);
            }
        }
        if let Some(password) = login.given_password() {
            config.password(password);
        }
        let tls = std::sync::Arc::new(tokio::sync::OnceCell::new());
        if !tls_params.has_references() {
            let built = Self::build_tls(&|k| tls_params.given(k))?;
            config.ssl_mode(built.1.transport());
            let _ = tls.set(built);
        }
        Ok(PgConnector {
            config,
            retry,
            tls,
            tls_params,
            login,
        })
    }

    fn build_tls(
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(tokio_postgres_rustls::MakeRustlsConnect, SslMode)> {
        let tls = PgTls::from_params(get)?;
        Ok((tls.connector()?, tls.mode))
    }

    fn describe_target(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "?".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{host}:{port}/{}",
            self.config.get_dbname().unwrap_or_default()
        )
    }

    /// Opens a connection, retrying transient failures by the retry policy.
    pub async fn connect(&self) -> Result<Client> {
        let target = self.describe_target();
        // Secret fields by reference are read from Secret Manager, once for this connector.
        let (tls, mode) = self
            .tls
            .get_or_try_init(|| async {
                let resolved = self.tls_params.resolve().await?;
                Self::build_tls(&|k| resolved.get(k).cloned())
            })
            .await?
            .clone();
        let mut config = self.config.clone();
        config.ssl_mode(mode.transport());
        self.retry
            .run("connect to PostgreSQL", || async {
                let mut config = config.clone();
                // A secret by reference (read once), or the identity's token, fresh each
                // attempt: the credentials refresh it before it expires.
                if let Some(password) = self.login.fetched_password().await? {
                    config.password(password);
                }
                let connected = match config.connect(tls.clone()).await {
                    // libpq's prefer and allow: a server whose TLS cannot be spoken is reached
                    // without it (its certificate was not going to be checked either).
                    Err(e)
                        if matches!(mode, SslMode::Prefer | SslMode::Allow)
                            && tls_failure(&pg_text(&e)).is_some() =>
                    {
                        tracing::warn!(%target, error = %pg_text(&e), "TLS failed under sslmode prefer; connecting without TLS");
                        let mut plain = config.clone();
                        plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
                        plain.connect(tls.clone()).await
                    }
                    other => other,
                };
                let (client, connection) = connected.map_err(|e| {
                    // A certificate that does not verify, or no TLS where it is required:
                    // the same answer every time.
                    if let Some(why) = tls_failure(&pg_text(&e)) {
                        return Error::Source(format!(
                            "TLS to PostgreSQL at {target} failed: {why}"
                        ));
                    }
                    let text = format!("cannot connect to PostgreSQL at {target}: {}", pg_text(&e));
                    match (e.as_db_error(), &self.login) {
                        // 28P01 invalid_password, 28000 invalid_authorization_specification.
                        (Some(db), crate::iam_login::Login::IamToken { user })
                            if db.code().code().starts_with("28") =>
                        {
                            crate::iam_login::refused(user, &target, db.message())
                        }
                        // Wrong credentials or database: the same answer every time.
                        (Some(db), _) if crate::error::refuses_the_job(db.code().code()) => {
                            Error::Source(format!("the source database refused the job: {text}"))
                        }
                        _ => Error::Database(text),
                    }
                })?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "PostgreSQL connection closed");
                    }
                });
                Ok(client)
            })
            .await
    }
}

fn pg_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => {
            if let Some(cause) = crate::net::io_cause(e) {
                return cause;
            }
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            text
        }
    }
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

    /// The columns the job reads, in table order, checking every name the job gives.
    pub fn project(&self, spec: &JobSpec) -> Result<Vec<SourceColumn>> {
        super::project(
            &self.columns,
            &format!("{}.{}", self.schema, self.table),
            spec,
        )
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

/// Looks the table up; a missing table is named with the database it was looked for in.
pub async fn describe(client: &Client, schema: &str, table: &str) -> Result<TableInfo> {
    let row = client.query_opt(TABLE_SQL, &[&schema, &table]).await?;
    let Some(row) = row else {
        let db: String = client
            .query_one("SELECT current_database()", &[])
            .await?
            .get(0);
        return Err(Error::Source(format!(
            "table {schema}.{table} not found in database \"{db}\""
        )));
    };
    let oid: u32 = row.get(0);
    let columns: Vec<SourceColumn> = client
        .query(COLUMNS_SQL, &[&oid])
        .await?
        .iter()
        .map(|r| SourceColumn {
            name: r.get(0),
            type_oid: r.get(1),
            type_name: r.get(2),
            typmod: r.get(3),
            nullable: r.get(4),
        })
        .collect();
    let mut split_key = None;
    for r in client.query(KEY_SQL, &[&oid]).await? {
        let name: String = r.get(0);
        if let Some(c) = columns.iter().find(|c| c.name == name)
            && cast_type(&c.type_name).is_some()
        {
            split_key = Some(c.clone());
            break;
        }
    }
    let primary_key = client
        .query(PRIMARY_KEY_SQL, &[&oid])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(TableInfo {
        schema: schema.to_string(),
        table: table.to_string(),
        oid,
        relkind: row.get(1),
        relpages: row.get(2),
        reltuples: row.get(3),
        pages_now: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
        columns,
        split_key,
        primary_key,
    })
}

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
        let client = PgConnector::from_spec(spec, retry)?.connect().await?;
        let info = describe(&client, &spec.schema_name, &spec.table_name).await?;
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

/// Estimates the table's rows without scanning it: `pg_class.reltuples` scaled to the current
/// size as the planner does, `EXPLAIN` when the table was never analysed; `COUNT(*)` only when
/// asked for.
pub async fn estimate(client: &Client, info: &TableInfo, exact: bool) -> Result<Estimate> {
    if exact {
        let sql = format!("SELECT count(*) FROM {}", info.qualified());
        let n: i64 = client.query_one(&sql, &[]).await?.get(0);
        return Ok(Estimate {
            rows: n.max(0) as u64,
            source: "count(*)".into(),
        });
    }
    let heap = matches!(info.relkind.as_str(), "r" | "m");
    if heap && info.reltuples >= 0.0 {
        if info.pages_now == 0 {
            return Ok(Estimate {
                rows: 0,
                source: "pg_class: the table has no pages".into(),
            });
        }
        if info.relpages > 0 {
            let density = info.reltuples as f64 / info.relpages as f64;
            return Ok(Estimate {
                rows: (density * info.pages_now as f64).round() as u64,
                source: "pg_class.reltuples scaled to the current size".into(),
            });
        }
    }
    let sql = format!("EXPLAIN (FORMAT JSON) SELECT * FROM {}", info.qualified());
    let plan: serde_json::Value = {
        let text: String = client
            .simple_query(&sql)
            .await?
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| Error::Database("EXPLAIN returned no plan".into()))?;
        serde_json::from_str(&text)?
    };
    let rows = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap_or(0.0);
    Ok(Estimate {
        rows: rows.round() as u64,
        source: "EXPLAIN (the table has no statistics yet; ANALYZE improves the estimate)".into(),
    })
}

/// Cuts the table into `shards` ranges of about equal row count.
pub async fn split(
    client: &Client,
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
    let heap = matches!(info.relkind.as_str(), "r" | "m");
    if let Some(key) = &info.split_key {
        // Equi-depth histogram: fine enough when it has a few buckets per shard.
        let bounds: Option<Vec<String>> = client
            .query_opt(
                "SELECT histogram_bounds::text::text[] FROM pg_stats
                 WHERE schemaname = $1 AND tablename = $2 AND attname = $3
                 ORDER BY inherited LIMIT 1",
                &[&info.schema, &info.table, &key.name],
            )
            .await?
            .and_then(|r| r.get(0));
        if let Some(bounds) = bounds.filter(|b| b.len() > 4 * shards) {
            let cuts = plan::equal_rank_cuts(&bounds, shards);
            check_ascending(client, key, &cuts).await?;
            return Ok(Split {
                method: "histogram".into(),
                column: Some(key.name.clone()),
                shards: plan::key_ranges(key, &cuts, estimated_rows),
            });
        }
        // A block sample: many blocks so that clustered keys still give even ranks.
        let target = (shards as u64 * 2_000).clamp(100_000, 2_000_000);
        let percent = if estimated_rows == 0 {
            100.0
        } else {
            (target as f64 * 100.0 / estimated_rows as f64).clamp(0.000_1, 100.0)
        };
        // The alias matters: ORDER BY a bare name prefers an output column, and sorting the
        // text form would put 10 before 9 and give overlapping ranges.
        let sql = format!(
            "SELECT {k}::text AS cut FROM {t} TABLESAMPLE SYSTEM ($1) REPEATABLE (17) \
             WHERE {k} IS NOT NULL ORDER BY {t}.{k}",
            k = quote_ident(&key.name),
            t = info.qualified()
        );
        let sample: Vec<String> = client
            .query(&sql, &[&(percent as f32)])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if sample.len() > 2 * shards {
            let cuts = plan::equal_rank_cuts(&sample, shards);
            check_ascending(client, key, &cuts).await?;
            return Ok(Split {
                method: "sample".into(),
                column: Some(key.name.clone()),
                shards: plan::key_ranges(key, &cuts, estimated_rows),
            });
        }
    }
    if heap {
        return Ok(Split {
            method: "ctid".into(),
            column: None,
            shards: plan::ctid_ranges(info.pages_now, shards, estimated_rows),
        });
    }
    Ok(whole("none (no usable key and not a plain table)"))
}

/// Overlapping key ranges would load rows twice, so before any shard runs PostgreSQL itself
/// confirms that the cuts are strictly ascending in the key's own type and collation.
pub async fn check_ascending(
    client: &Client,
    key: &SourceColumn,
    cuts: &[plan::Cut],
) -> Result<()> {
    let Some(ty) = cast_type(&key.type_name) else {
        return Err(Error::Source(format!(
            "cannot cut on key type {}",
            key.type_name
        )));
    };
    let values: Vec<&str> = cuts.iter().map(|c| c.value.as_str()).collect();
    let sql = format!(
        "SELECT count(*) FROM (
           SELECT v::{ty} AS v, lag(v::{ty}) OVER (ORDER BY n) AS prev
           FROM unnest($1::text[]) WITH ORDINALITY AS u(v, n)) s
         WHERE prev >= v",
    );
    let out_of_order: i64 = client.query_one(&sql, &[&values]).await?.get(0);
    if out_of_order > 0 {
        return Err(Error::Source(format!(
            "the shard cuts on {} are not in ascending order ({out_of_order} out of place); refusing to plan overlapping ranges",
            key.name
        )));
    }
    Ok(())
}

/// A transaction holding an exported snapshot open; every shard of the run imports it.
/// Dropping the hold ends the transaction and releases the snapshot.
pub async fn export_snapshot(connector: &PgConnector) -> Result<SnapshotHold> {
    let client = connector.connect().await?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let id: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await?
        .get(0);
    Ok(SnapshotHold::new(id, client))
}

/// The settings a shard's COPY reads its bound values from (`current_setting`): COPY takes no
/// parameters, and values must never be pasted into SQL.
pub type BoundSettings = Vec<(&'static str, String)>;

/// The COPY statement for a shard and the bound values it reads through `current_setting`.
pub fn copy_statement(task: &ShardTask) -> Result<(String, BoundSettings)> {
    let columns: Vec<String> = task.columns.iter().map(select_item).collect();
    let mut sql = format!(
        "COPY (SELECT {} FROM {}.{}",
        columns.join(", "),
        quote_ident(&task.schema_name),
        quote_ident(&task.table_name)
    );
    let mut conditions: Vec<String> = Vec::new();
    let mut settings: BoundSettings = Vec::new();
    let (lower, upper) = match &task.bounds {
        ShardBounds::Whole => (None, None),
        ShardBounds::KeyRange {
            column,
            key_type,
            lower,
            upper,
            include_nulls,
        } => {
            let key_type = cast_type(key_type).ok_or_else(|| {
                Error::Message(format!(
                    "shard key type \"{key_type}\" is not one shardflow cuts on"
                ))
            })?;
            let k = quote_ident(column);
            let mut conds = Vec::new();
            if lower.is_some() {
                conds.push(format!(
                    "{k} >= current_setting('shardflow.lower')::{key_type}"
                ));
            }
            if upper.is_some() {
                conds.push(format!(
                    "{k} < current_setting('shardflow.upper')::{key_type}"
                ));
            }
            if !conds.is_empty() {
                let range = conds.join(" AND ");
                if *include_nulls {
                    conditions.push(format!("({range}) OR {k} IS NULL"));
                } else {
                    conditions.push(range);
                }
            }
            (lower.clone(), upper.clone())
        }
        ShardBounds::CtidRange {
            first_block,
            end_block,
        } => {
            conditions.push("ctid >= current_setting('shardflow.lower')::tid".into());
            if end_block.is_some() {
                conditions.push("ctid < current_setting('shardflow.upper')::tid".into());
            }
            (
                Some(format!("({first_block},0)")),
                end_block.map(|b| format!("({b},0)")),
            )
        }
        ShardBounds::Files { .. } => {
            return Err(Error::Message(
                "a file shard names files; this job reads PostgreSQL".into(),
            ));
        }
    };
    settings.extend(lower.map(|v| ("shardflow.lower", v)));
    settings.extend(upper.map(|v| ("shardflow.upper", v)));
    if let Some(w) = &task.window {
        let t = window_type(&w.column, &w.column_type)?;
        let c = quote_ident(&w.column);
        if let Some(after) = &w.after {
            conditions.push(format!("{c} > current_setting('shardflow.after')::{t}"));
            settings.push(("shardflow.after", after.clone()));
        } else if let Some(from) = &w.from {
            conditions.push(format!("{c} >= current_setting('shardflow.from')::{t}"));
            settings.push(("shardflow.from", from.clone()));
        }
        conditions.push(format!("{c} <= current_setting('shardflow.through')::{t}"));
        settings.push(("shardflow.through", w.through.clone()));
    }
    if !conditions.is_empty() {
        let all: Vec<String> = conditions.iter().map(|c| format!("({c})")).collect();
        sql.push_str(" WHERE ");
        sql.push_str(&all.join(" AND "));
    }
    sql.push_str(") TO STDOUT (FORMAT binary)");
    Ok((sql, settings))
}

/// The types an incremental window can be drawn on, cast as `cast_type` casts keys.
fn window_type(column: &str, column_type: &str) -> Result<&'static str> {
    match column_type {
        "smallint"
        | "integer"
        | "bigint"
        | "numeric"
        | "date"
        | "timestamp without time zone"
        | "timestamp with time zone" => cast_type(column_type).ok_or_else(|| {
            Error::Message(format!("no cast for timestamp_column type {column_type}"))
        }),
        other => Err(Error::Spec(crate::spec::SpecError::single(
            "timestamp_column",
            format!(
                "{column:?} is {other}; an incremental load needs a date, timestamp or number column"
            ),
        ))),
    }
}

/// The window of an incremental load, its exact row count, and its cut into `shards` ranges
/// of the window column with about equal rows. `None` when the window holds no row (and no
/// high-water mark was fixed). The resolved exclusive lower bound comes back either way.
pub async fn plan_window(
    client: &Client,
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
            Error::Spec(crate::spec::SpecError::single(
                "timestamp_column",
                format!("{column:?} is not a column of {}", info.qualified()),
            ))
        })?;
    let t = window_type(column, &col.type_name)?;
    let c = quote_ident(column);
    let table = info.qualified();
    let bad_value = |value: String, field: &str, e: tokio_postgres::Error| {
        Error::Spec(crate::spec::SpecError::single(
            field,
            format!(
                "{value:?} is not a value of {column:?} ({}): {}",
                col.type_name,
                pg_text(&e)
            ),
        ))
    };
    // Each candidate must be a value of the column (named alone when it is not)...
    for value in &bounds.after {
        client
            .query_one(&format!("SELECT $1::text::{t}"), &[value])
            .await
            .map_err(|e| bad_value(value.clone(), "last_sync_value", e))?;
    }
    // ...and the greatest, compared in the column's type, bounds the window.
    let after: Option<String> = match bounds.after.len() {
        0 => None,
        1 => bounds.after.first().cloned(),
        _ => client
            .query_one(
                // The candidate itself, not PostgreSQL's text of it: the watermark keeps
                // the ISO form it was reported in.
                &format!("SELECT v FROM unnest($1::text[]) v ORDER BY v::{t} DESC LIMIT 1"),
                &[&bounds.after],
            )
            .await
            .map_err(|e| bad_value(bounds.after.join(", "), "last_sync_value", e))?
            .get(0),
    };
    // The window's own lower bound: `after` less the lookback. `after` itself stays what the
    // run resumes after (the watermark an empty window reports).
    let start_after = match (&after, bounds.lookback) {
        (Some(v), Some(lookback)) => {
            if !matches!(
                col.type_name.as_str(),
                "date" | "timestamp without time zone" | "timestamp with time zone"
            ) {
                return Err(Error::Spec(crate::spec::SpecError::single(
                    "lookback",
                    format!(
                        "needs a date or timestamp timestamp_column; {column:?} is {}",
                        col.type_name
                    ),
                )));
            }
            let seconds = lookback.as_secs_f64();
            let earlier: String = client
                .query_one(
                    &format!("SELECT ($1::text::{t} - make_interval(secs => $2))::{t}::text"),
                    &[v, &seconds],
                )
                .await
                .map_err(|e| bad_value(v.clone(), "last_sync_value", e))?
                .get(0);
            Some(earlier)
        }
        (after, _) => after.clone(),
    };
    let from = bounds.from;
    let (lower_sql, lower) = match (&start_after, &from) {
        (Some(v), _) => (format!("{c} > $1::text::{t}"), Some(v.clone())),
        (None, Some(v)) => (format!("{c} >= $1::text::{t}"), Some(v.clone())),
        (None, None) => (format!("($1::text IS NULL AND {c} IS NOT NULL)"), None),
    };
    let bad_bound = |e| {
        let field = if after.is_some() {
            "last_sync_value"
        } else {
            "historical_start_date"
        };
        bad_value(lower.clone().unwrap_or_default(), field, e)
    };
    // The high-water mark is the greatest finite value: `infinity` (and numeric `NaN`, which
    // PostgreSQL sorts above every number) would be a watermark no later row ever passes, or,
    // clamped into Arrow's range, one the same row passes again on every run.
    let finite = match col.type_name.as_str() {
        "date" | "timestamp without time zone" | "timestamp with time zone" => {
            format!("isfinite({c})")
        }
        "numeric" => format!("{c}::text NOT IN ('NaN', 'Infinity', '-Infinity')"),
        _ => "true".to_string(),
    };
    let through: Option<String> = match bounds.through {
        Some(fixed) => Some(fixed),
        None => client
            .query_one(
                &format!(
                    "SELECT (max({c}) FILTER (WHERE {finite}))::text FROM {table} WHERE {lower_sql}"
                ),
                &[&lower],
            )
            .await
            .map_err(bad_bound)?
            .get(0),
    };
    let Some(through) = through else {
        let beyond: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE {lower_sql} AND NOT ({finite})"),
                &[&lower],
            )
            .await
            .map_err(bad_bound)?
            .get(0);
        return Ok(PlannedWindow {
            window: None,
            after,
            rows: 0,
            beyond: beyond.max(0) as u64,
            shards: Vec::new(),
        });
    };
    let window_sql = format!("{lower_sql} AND {c} <= $2::text::{t}");
    // One scan: the window's rows, and those past its end that no window takes (`infinity`,
    // `NaN`; not rows committed since, which the next run takes).
    let counted = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE {c} <= $2::text::{t}),
                        count(*) FILTER (WHERE {c} > $2::text::{t} AND NOT ({finite}))
                 FROM {table} WHERE {lower_sql}"
            ),
            &[&lower, &through],
        )
        .await
        .map_err(bad_bound)?;
    let rows = counted.get::<_, i64>(0).max(0) as u64;
    let beyond = counted.get::<_, i64>(1).max(0) as u64;
    let wanted = shards(rows);
    let window = Window {
        column: column.to_string(),
        column_type: col.type_name.clone(),
        after: start_after.clone(),
        from,
        through: through.clone(),
    };
    let planned = |shards| PlannedWindow {
        window: Some(window.clone()),
        after: after.clone(),
        rows,
        beyond,
        shards,
    };
    if wanted <= 1 {
        return Ok(planned(vec![(ShardBounds::Whole, rows)]));
    }
    // Exact quantiles of the window column over the window's rows: equal-row ranges.
    let fractions: Vec<f64> = (1..wanted).map(|i| i as f64 / wanted as f64).collect();
    let cuts: Vec<String> = client
        .query_one(
            &format!(
                "SELECT (percentile_disc($3::float8[]) WITHIN GROUP (ORDER BY {c}))::text[] \
                 FROM {table} WHERE {window_sql}"
            ),
            &[&lower, &through, &fractions],
        )
        .await?
        .get(0);
    let mut points: Vec<Cut> = Vec::new();
    for (i, value) in cuts.into_iter().enumerate() {
        if points.last().is_some_and(|p| p.value == value) {
            continue;
        }
        points.push(Cut {
            value,
            rank: fractions[i],
        });
    }
    let key = SourceColumn {
        nullable: false,
        ..col.clone()
    };
    Ok(planned(crate::plan::key_ranges(&key, &points, rows)))
}

fn valid_snapshot_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Reads one shard as Arrow batches. The COPY runs in its own task and hands batches over a
/// channel of `in_flight` slots, so decoding overlaps Parquet encoding and memory stays at
/// `in_flight` batches whatever the shard's size.
pub async fn extract(
    connector: &PgConnector,
    task: &ShardTask,
    in_flight: usize,
) -> Result<BatchStream> {
    let (sql, settings) = copy_statement(task)?;
    let client = connector.connect().await?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    if let Some(snapshot) = &task.snapshot {
        if !valid_snapshot_id(snapshot) {
            return Err(Error::Message(format!(
                "snapshot id {snapshot:?} is malformed"
            )));
        }
        client
            .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
            .await
            .map_err(|e| {
                Error::Database(format!(
                    "cannot import the run's snapshot {snapshot} (the dispatcher that exported it may have stopped): {}",
                    pg_text(&e)
                ))
            })?;
    }
    // Every bound value in one round trip, with the settings that fix the text form of the
    // types read as text, whatever the server's or the role's defaults.
    let (names, values): (Vec<&str>, Vec<&str>) = settings
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .chain(TEXT_FORM_SETTINGS.iter().copied())
        .unzip();
    client
        .query(
            "SELECT set_config(name, value, true) FROM unnest($1::text[], $2::text[]) AS s(name, value)",
            &[&names, &values],
        )
        .await?;
    let mut decoder = CopyDecoder::new(&task.columns, task.batch_rows)?;
    let copy = client.copy_out(sql.as_str()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(in_flight.max(1));
    tokio::spawn(async move {
        let outcome: Result<()> = async {
            let mut copy = std::pin::pin!(copy);
            while let Some(chunk) = copy.next().await {
                decoder.push(&chunk?)?;
                if decoder.batch_full()
                    && let Some(batch) = decoder.take_batch()?
                    && tx.send(Ok(batch)).await.is_err()
                {
                    return Ok(()); // the reader went away; dropping the client cancels COPY
                }
            }
            decoder.finish()?;
            if let Some(batch) = decoder.take_batch()? {
                let _ = tx.send(Ok(batch)).await;
            }
            client.batch_execute("COMMIT").await?;
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            let _ = tx.send(Err(e)).await;
        }
    });
    Ok(receiver_stream(rx))
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
