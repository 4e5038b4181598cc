//! Helpers shared by the end-to-end tests: a real PostgreSQL connection, job specs, reading
//! the destination back, and per-column digests computed the same way on both sides.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Decimal256Type, Float32Type, Float64Type, Int8Type,
    Int16Type, Int32Type, Int64Type, TimestampMicrosecondType, UInt64Type,
};
use md5::{Digest, Md5};
use shardflow::spec::JobSpec;
use tokio_postgres::{Client, NoTls};

pub const PG_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// A connection to the test database, or a failure that says what to start.
pub async fn pg() -> Client {
    match tokio_postgres::connect(PG_URL, NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client
        }
        Err(e) => panic!(
            "PostgreSQL is not reachable at 127.0.0.1:5432 ({e}); start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` or run tests/run.sh"
        ),
    }
}

/// The machine's PostgreSQL as its superuser, on a database no test makes or drops.
pub const PG_ADMIN_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// A fresh schema for one test, so tests can run in parallel; dropped with what it holds when
/// the returned name goes out of scope (the end of the test, or its panic).
pub async fn fresh_schema(client: &Client, name: &str) -> Scoped {
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name};"
        ))
        .await
        .expect("create schema");
    Scoped::new(name, DropOnExit::pg_schema(PG_URL, name))
}

/// The URL of the suite's own PostgreSQL that checks passwords, as its superuser.
pub fn pg_with_passwords_url() -> String {
    let port = env_or_fail("SHARDFLOW_TEST_PG_PASSWORD_PORT");
    format!("postgres://postgres:pg-test-password@127.0.0.1:{port}/postgres")
}

/// The URL of the suite's own MariaDB with TLS, as its user with every privilege.
pub fn mariadb_tls_url() -> String {
    let port = env_or_fail("SHARDFLOW_TEST_MARIADB_TLS_PORT");
    format!("mysql://shardflow:tls-test-password@127.0.0.1:{port}/test")
}

/// A name a test made on a database server (a schema, a database), used as a `&str`, and the
/// guard that drops what it names when it goes out of scope.
#[must_use = "what it names is dropped as soon as it goes out of scope"]
pub struct Scoped {
    name: String,
    _drop: DropOnExit,
}

impl Scoped {
    pub fn new(name: &str, guard: DropOnExit) -> Scoped {
        Scoped {
            name: name.to_string(),
            _drop: guard,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl std::ops::Deref for Scoped {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl AsRef<str> for Scoped {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for Scoped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl std::fmt::Debug for Scoped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.name, f)
    }
}

/// What a test made on a database server that outlives the test unless dropped.
#[derive(Clone, Debug)]
enum Made {
    PgSchema(String),
    /// `schema.table`.
    PgTable(String),
    PgDatabase(String),
    /// A role, with what it owns and the privileges it holds in the guard's database.
    PgRole(String),
    MyDatabase(String),
    /// `'user'@'host'`, quoted as MySQL writes it.
    MyUser(String),
}

/// Drops one thing a test made on a database server when the guard goes: at the end of the
/// test, or while the test unwinds from a failure, so a run leaves PostgreSQL and MariaDB as it
/// found them. `tests/run.sh` checks that after the run, and drops what a test binary killed
/// outright could not. Drop cannot be async: the statements run on a thread of their own with
/// a runtime of its own, waited for (bounded by lock and statement timeouts).
#[must_use = "what it names is dropped as soon as the guard is"]
pub struct DropOnExit {
    url: String,
    made: Made,
}

impl DropOnExit {
    /// A schema in the database of `url` (a tokio-postgres URL), dropped with what it holds.
    pub fn pg_schema(url: &str, name: &str) -> DropOnExit {
        Self::new(url, Made::PgSchema(name.into()))
    }

    /// A table (`schema.table`) in the database of `url`.
    pub fn pg_table(url: &str, name: &str) -> DropOnExit {
        Self::new(url, Made::PgTable(name.into()))
    }

    /// A database of the server at `url` (connected to another database of it), dropped with
    /// the sessions still on it.
    pub fn pg_database(url: &str, name: &str) -> DropOnExit {
        Self::new(url, Made::PgDatabase(name.into()))
    }

    /// A role of the server at `url`, after what it owns and its grants in that database.
    pub fn pg_role(url: &str, name: &str) -> DropOnExit {
        Self::new(url, Made::PgRole(name.into()))
    }

    /// A database of the MySQL/MariaDB server at `url` (a sqlx URL).
    pub fn mysql_database(url: &str, name: &str) -> DropOnExit {
        Self::new(url, Made::MyDatabase(name.into()))
    }

    /// A user of the MySQL/MariaDB server at `url`, written `'name'@'host'`.
    pub fn mysql_user(url: &str, user: &str) -> DropOnExit {
        Self::new(url, Made::MyUser(user.into()))
    }

    fn new(url: &str, made: Made) -> DropOnExit {
        DropOnExit {
            url: url.into(),
            made,
        }
    }
}

impl Drop for DropOnExit {
    fn drop(&mut self) {
        let (url, made) = (self.url.clone(), self.made.clone());
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(90),
                    drop_made(&url, &made),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err("timed out after 90 s".to_string()),
                }
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the cleanup thread panicked".into()));
        if let Err(e) = outcome {
            // Never a panic here: it may run while the test unwinds, which would abort.
            eprintln!(
                "cleanup: could not drop {:?} ({e}); tests/run.sh reports it and drops it after the run",
                self.made
            );
        }
    }
}

fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn my_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

async fn drop_made(url: &str, made: &Made) -> Result<(), String> {
    match made {
        Made::MyDatabase(_) | Made::MyUser(_) => drop_in_mysql(url, made).await,
        _ => drop_in_postgres(url, made).await,
    }
}

async fn drop_in_postgres(url: &str, made: &Made) -> Result<(), String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    tokio::spawn(connection);
    // A session of the test still holding a lock (a child process left running by a failed
    // assertion) would make the DROP wait forever: wait a while, then end those sessions.
    client
        .batch_execute("SET lock_timeout = '5s'; SET statement_timeout = '60s'")
        .await
        .map_err(|e| e.to_string())?;
    let statement = match made {
        Made::PgSchema(name) => format!("DROP SCHEMA IF EXISTS {} CASCADE", pg_ident(name)),
        Made::PgTable(name) => {
            let quoted: Vec<String> = name.split('.').map(pg_ident).collect();
            format!("DROP TABLE IF EXISTS {} CASCADE", quoted.join("."))
        }
        Made::PgDatabase(name) => {
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", pg_ident(name))
        }
        Made::PgRole(name) => {
            let quoted = pg_ident(name).replace('\'', "''");
            format!(
                "DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{}') THEN
                   EXECUTE 'DROP OWNED BY {quoted}'; EXECUTE 'DROP ROLE {quoted}'; END IF; END $$",
                name.replace('\'', "''")
            )
        }
        _ => unreachable!(),
    };
    let first = client.batch_execute(&statement).await;
    let Err(first) = first else { return Ok(()) };
    let Made::PgSchema(name) = made else {
        return Err(first.to_string());
    };
    client
        .execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
             JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND l.pid <> pg_backend_pid()",
            &[name],
        )
        .await
        .map_err(|e| format!("{first}; then ending the sessions holding locks: {e}"))?;
    client
        .batch_execute(&statement)
        .await
        .map_err(|e| format!("{first}; then, with the lock holders ended: {e}"))
}

async fn drop_in_mysql(url: &str, made: &Made) -> Result<(), String> {
    use sqlx::Connection as _;
    let mut conn = sqlx::MySqlConnection::connect(url)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    let run = async |conn: &mut sqlx::MySqlConnection, sql: String| {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };
    run(&mut conn, "SET SESSION lock_wait_timeout = 5".into()).await?;
    let statement = match made {
        Made::MyDatabase(name) => format!("DROP DATABASE IF EXISTS {}", my_ident(name)),
        Made::MyUser(user) => format!("DROP USER IF EXISTS {user}"),
        _ => unreachable!(),
    };
    let Err(first) = run(&mut conn, statement.clone()).await else {
        return Ok(());
    };
    let Made::MyDatabase(name) = made else {
        return Err(first);
    };
    // The sessions using the database hold the metadata locks the DROP waits for.
    let ids: Vec<u64> = sqlx::query_scalar(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = ? AND ID <> CONNECTION_ID()",
    )
    .bind(name)
    .fetch_all(&mut conn)
    .await
    .map_err(|e| format!("{first}; then listing the sessions on it: {e}"))?;
    for id in ids {
        let _ = run(&mut conn, format!("KILL {id}")).await;
    }
    run(&mut conn, statement)
        .await
        .map_err(|e| format!("{first}; then, with its sessions ended: {e}"))
}

/// A scratch directory under the target dir, emptied first.
/// A `dispatcher run` in process with two workers, its table, staging and state store in
/// `dir`: exact counts (shard counts do not depend on sampling) and no retry of the source.
pub fn exact_options(dir: &Path, shard_rows: u64) -> shardflow_dispatcher::RunOptions {
    shardflow_dispatcher::RunOptions {
        plan: shardflow_dispatcher::PlanOptions {
            shard_rows,
            exact_count: true,
            retry: shardflow::retry::RetryPolicy::none(),
            ..Default::default()
        },
        workers: 2,
        dest: dir.join("warehouse").display().to_string(),
        staging: None,
        state_url: format!("sqlite://{}", dir.join("state.db").display()),
        ..Default::default()
    }
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/e2e")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The one folder of the suite's logs: `target/test-logs` (`SHARDFLOW_TEST_LOGS` when set, as
/// `tests/emulators.sh` prints it), made if missing.
pub fn test_logs() -> PathBuf {
    let dir = std::env::var_os("SHARDFLOW_TEST_LOGS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-logs"));
    std::fs::create_dir_all(&dir).expect("the test-logs folder");
    dir
}

pub fn job_json(
    schema: &str,
    table: &str,
    dest_table: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let v = serde_json::json!({
        "data_source_id": 42,
        "source_type": "postgresql",
        "connection_params": {"host": "127.0.0.1", "port": 5432, "database": "test",
                              "username": "postgres", "password": "pw-never-shown-81f3"},
        "source_table_name": table,
        "schema_name": schema,
        "dest_table_name": dest_table,
        "load_type": "catalog",
        "processing_mode": "dataflow"
    });
    with_fields(v, extra)
}

/// `base` with the fields of `extra` set over it.
pub fn with_fields(mut base: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(obj), Some(more)) = (base.as_object_mut(), extra.as_object()) {
        for (k, val) in more {
            obj.insert(k.clone(), val.clone());
        }
    }
    base
}

pub fn job(schema: &str, table: &str, dest_table: &str, extra: serde_json::Value) -> JobSpec {
    JobSpec::from_json(&job_json(schema, table, dest_table, extra).to_string()).expect("valid job")
}

/// Every record batch of a destination table (the Parquet files that are part of it).
pub fn read_table(dir: &Path) -> Vec<RecordBatch> {
    let files = shardflow::warehouse::parquet_dir::table_files(dir).expect("table dir");
    let mut out = Vec::new();
    for f in files {
        let file = std::fs::File::open(&f).expect("open part");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("parquet")
            .build()
            .expect("reader");
        for b in reader {
            out.push(b.expect("batch"));
        }
    }
    out
}

/// The order-independent content checksum of these batches, as the workers compute it.
pub fn content_checksum(batches: &[RecordBatch]) -> String {
    let Some(first) = batches.first() else {
        return shardflow::digest::EMPTY_CHECKSUM.to_string();
    };
    let mut digest = shardflow::digest::ContentDigest::new(&first.schema(), None).expect("digest");
    for b in batches {
        digest.update(b).expect("digest update");
    }
    digest.finish().expect("digest").checksum
}

/// The files of a table and their sizes, to show a table did not change.
/// An Int32 column of a Parquet table, sorted: which rows it holds, each as often as it does.
pub fn sorted_i32s(dir: &Path, column: &str) -> Vec<i32> {
    let mut values: Vec<i32> = read_table(dir)
        .iter()
        .flat_map(|b| {
            b.column_by_name(column)
                .unwrap_or_else(|| panic!("no column {column}"))
                .as_primitive::<arrow::datatypes::Int32Type>()
                .values()
                .to_vec()
        })
        .collect();
    values.sort();
    values
}

pub fn table_listing(dir: &Path) -> Vec<(String, u64)> {
    shardflow::warehouse::parquet_dir::table_files(dir)
        .expect("table dir")
        .into_iter()
        .map(|p| {
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p.file_name().unwrap().to_string_lossy().into_owned(), len)
        })
        .collect()
}

/// What both sides agree on for one column: non-NULL count, sum (for numbers), and an MD5 over
/// every value in key order, each value in a canonical text form.
#[derive(Debug, PartialEq)]
pub struct ColumnCheck {
    pub column: String,
    pub non_null: i64,
    pub sum: Option<String>,
    pub digest: String,
}

/// The canonical text of a value in SQL, matching `canonical_arrow` below.
fn canonical_sql(col: &str, pg_type: &str) -> String {
    let c = format!("\"{col}\"");
    match pg_type {
        "real" => format!("encode(float4send({c}), 'hex')"),
        "double precision" => format!("encode(float8send({c}), 'hex')"),
        "boolean" => format!("CASE WHEN {c} THEN 't' ELSE 'f' END"),
        // ±infinity load as the ends of BigQuery's ranges (README, Types).
        "date" => format!(
            "CASE WHEN {c} = 'infinity' THEN '2932896' WHEN {c} = '-infinity' THEN '-719162'
             ELSE ({c} - date '1970-01-01')::text END"
        ),
        "timestamp without time zone" | "timestamp with time zone" => format!(
            "CASE WHEN {c} = 'infinity' THEN '253402300799999999'
             WHEN {c} = '-infinity' THEN '-62135596800000000'
             ELSE (extract(epoch from {c}) * 1000000)::bigint::text END"
        ),
        "bytea" => format!("encode({c}, 'hex')"),
        // The type's output function: keeps char(n) padding, jsonb's normal form, numeric scale.
        _ => format!("format('%s', {c})"),
    }
}

fn summable(pg_type: &str) -> bool {
    matches!(pg_type, "smallint" | "integer" | "bigint") || pg_type.starts_with("numeric(")
}

/// Column checks computed by PostgreSQL over the source, ordered by `key`.
pub async fn source_checks(
    client: &Client,
    schema: &str,
    table: &str,
    key: &str,
) -> Vec<ColumnCheck> {
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
             WHERE a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass
               AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .expect("columns");
    let mut out = Vec::new();
    for row in cols {
        let name: String = row.get(0);
        let ty: String = row.get(1);
        let canon = canonical_sql(&name, &ty);
        let sum = if summable(&ty) {
            format!("sum(\"{name}\")::text")
        } else {
            "NULL::text".into()
        };
        let sql = format!(
            "SELECT count(\"{name}\"), {sum},
                    md5(string_agg(CASE WHEN \"{name}\" IS NULL THEN 'N' ELSE octet_length({canon})::text || ':' || {canon} END, ',' ORDER BY \"{key}\"))
             FROM \"{schema}\".\"{table}\""
        );
        let r = client.query_one(&sql, &[]).await.expect("checks");
        out.push(ColumnCheck {
            column: name,
            non_null: r.get(0),
            sum: r.get(1),
            digest: r.get::<_, Option<String>>(2).unwrap_or_default(),
        });
    }
    out
}

fn canonical_arrow(a: &dyn Array, i: usize) -> String {
    match a.data_type() {
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).to_string(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).to_string(),
        DataType::Decimal256(..) => a.as_primitive::<Decimal256Type>().value_as_string(i),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::Float32 => hex::encode(a.as_primitive::<Float32Type>().value(i).to_be_bytes()),
        DataType::Float64 => hex::encode(a.as_primitive::<Float64Type>().value(i).to_be_bytes()),
        DataType::Decimal128(..) => a.as_primitive::<Decimal128Type>().value_as_string(i),
        DataType::Boolean => if a.as_boolean().value(i) { "t" } else { "f" }.to_string(),
        DataType::Utf8 => a.as_string::<i32>().value(i).to_string(),
        DataType::Binary => hex::encode(a.as_binary::<i32>().value(i)),
        DataType::Date32 => a.as_primitive::<Date32Type>().value(i).to_string(),
        DataType::Timestamp(..) => a
            .as_primitive::<TimestampMicrosecondType>()
            .value(i)
            .to_string(),
        other => panic!("no canonical form for {other}"),
    }
}

fn arrow_sum(a: &dyn Array) -> Option<String> {
    let total: i128 = match a.data_type() {
        DataType::Int8 => a
            .as_primitive::<Int8Type>()
            .iter()
            .flatten()
            .map(i128::from)
            .sum(),
        DataType::UInt64 => a
            .as_primitive::<UInt64Type>()
            .iter()
            .flatten()
            .map(i128::from)
            .sum(),
        DataType::Int16 => a
            .as_primitive::<Int16Type>()
            .iter()
            .flatten()
            .map(i128::from)
            .sum(),
        DataType::Int32 => a
            .as_primitive::<Int32Type>()
            .iter()
            .flatten()
            .map(i128::from)
            .sum(),
        DataType::Int64 => a
            .as_primitive::<Int64Type>()
            .iter()
            .flatten()
            .map(i128::from)
            .sum(),
        DataType::Decimal128(_, s) => {
            let sum: i128 = a.as_primitive::<Decimal128Type>().iter().flatten().sum();
            return (a.null_count() < a.len()).then(|| {
                arrow::array::Decimal128Array::from(vec![sum])
                    .with_precision_and_scale(38, *s)
                    .unwrap()
                    .value_as_string(0)
            });
        }
        _ => return None,
    };
    (a.null_count() < a.len()).then(|| total.to_string())
}

/// The same checks over the destination's batches, rows put in `key` order first.
pub fn destination_checks(batches: &[RecordBatch], key: &str) -> Vec<ColumnCheck> {
    let batch = arrow::compute::concat_batches(&batches[0].schema(), batches).expect("concat");
    let key_col = batch.column_by_name(key).expect("key column");
    let order = arrow::compute::sort_to_indices(key_col, None, None).expect("sort");
    let batch = arrow::compute::take_record_batch(&batch, &order).expect("take");
    batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, col)| {
            let mut md5 = Md5::new();
            for i in 0..col.len() {
                if i > 0 {
                    md5.update(b",");
                }
                if col.is_null(i) {
                    md5.update(b"N");
                } else {
                    let v = canonical_arrow(col.as_ref(), i);
                    md5.update(format!("{}:{v}", v.len()).as_bytes());
                }
            }
            ColumnCheck {
                column: field.name().clone(),
                non_null: (col.len() - col.null_count()) as i64,
                sum: arrow_sum(col.as_ref()),
                digest: hex::encode(md5.finalize()),
            }
        })
        .collect()
}

pub async fn count(client: &Client, schema: &str, table: &str) -> i64 {
    client
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".\"{table}\""),
            &[],
        )
        .await
        .expect("count")
        .get(0)
}

/// Asserts the destination equals the source: row count, per-column counts and sums, and
/// every value (digest in key order).
pub async fn assert_same_content(
    client: &Client,
    schema: &str,
    table: &str,
    dest: &Path,
    key: &str,
) {
    let rows = count(client, schema, table).await;
    let source = source_checks(client, schema, table, key).await;
    assert_matches_source(rows, &source, dest, key);
}

/// Asserts the destination table holds `source_rows` rows whose column checks, in `key`
/// order, are the source's.
pub fn assert_matches_source(source_rows: i64, source: &[ColumnCheck], dest: &Path, key: &str) {
    let batches = read_table(dest);
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows as i64, source_rows, "row count");
    let destination = destination_checks(&batches, key);
    assert_eq!(source.len(), destination.len(), "column count");
    for (s, d) in source.iter().zip(&destination) {
        assert_eq!(
            s, d,
            "column {} differs between source and destination",
            s.column
        );
    }
}

/// The arguments of `dispatcher run` on a job file, with its destination and state store in
/// `dir`, followed by `extra`.
pub fn dispatcher_run_args(dir: &Path, job_file: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "run".to_string(),
        "--job".into(),
        job_file.display().to_string(),
        "--dest".into(),
        dir.join("warehouse").display().to_string(),
        "--state".into(),
        format!("sqlite://{}", dir.join("state.db").display()),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `dispatcher run` as a command, ready to spawn.
pub fn dispatcher_run(dir: &Path, job_file: &Path, extra: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(dispatcher_bin());
    command.args(dispatcher_run_args(dir, job_file, extra));
    command
}

/// What a dispatcher command (`detect-schema`, `list-files`, …) prints, as JSON.
pub fn dispatcher_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(dispatcher_bin())
        .args(args)
        .output()
        .expect("run the dispatcher");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Every file under `dir` (links to directories followed).
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The dispatcher binary, built by `cargo build --bins` (tests/run.sh does it first).
pub fn dispatcher_bin() -> PathBuf {
    let path = std::env::var_os("SHARDFLOW_DISPATCHER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/dispatcher")
        });
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --bins` (tests/run.sh does) or set SHARDFLOW_DISPATCHER_BIN",
        path.display()
    );
    path
}

/// MySQL/MariaDB: the test server, a fresh database per test, and the same column checks
/// computed by the server.
/// An emulator's address from the environment `tests/emulators.sh` prints.
pub fn env_or_fail(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the emulators with eval \"$(bash tests/emulators.sh start)\" \
             (tests/run.sh does it)"
        )
    })
}

/// The project the emulators serve.
pub const BIGQUERY_PROJECT: &str = "test-proj";

/// `BIGQUERY_EMULATOR_HOST`, checked to be the strict rules layer in front of bqemulator (a
/// load real BigQuery would refuse must fail the suite), never bqemulator itself.
pub async fn bigquery_host() -> String {
    let bq = env_or_fail("BIGQUERY_EMULATOR_HOST");
    let answer = reqwest::get(format!("{bq}/rules")).await;
    let marked = answer
        .as_ref()
        .ok()
        .and_then(|r| r.headers().get("x-shardflow-rules"))
        .is_some();
    assert!(
        marked,
        "BIGQUERY_EMULATOR_HOST={bq} is not the strict rules layer ({answer:?}): build, then \
         start it with `bash tests/emulators.sh rules` (tests/run.sh does both)"
    );
    bq
}

/// A query's rows from bqemulator, each cell as the REST API sends it.
pub async fn bigquery_rows(sql: &str) -> Vec<Vec<Option<String>>> {
    let bq = bigquery_host().await;
    let response: serde_json::Value = reqwest::Client::new()
        .post(format!(
            "{bq}/bigquery/v2/projects/{BIGQUERY_PROJECT}/queries"
        ))
        .json(&serde_json::json!({"query": sql, "useLegacySql": false, "maxResults": 1_000_000}))
        .send()
        .await
        .expect("bqemulator answers")
        .json()
        .await
        .expect("a JSON answer");
    assert!(
        response.get("error").is_none() && response.get("errors").is_none(),
        "{sql}: {response}"
    );
    let rows = response["rows"].as_array().cloned().unwrap_or_default();
    rows.iter()
        .map(|r| {
            r["f"]
                .as_array()
                .expect("cells")
                .iter()
                .map(|c| c["v"].as_str().map(str::to_string))
                .collect()
        })
        .collect()
}

pub mod my {
    use super::*;
    use sqlx::mysql::MySqlConnection;
    use sqlx::{AssertSqlSafe, Connection, Row};

    pub const MY_URL: &str = "mysql://root@127.0.0.1:3306/test";

    /// A connection to the test server, or a failure that says what to start.
    pub async fn my() -> MySqlConnection {
        match MySqlConnection::connect(MY_URL).await {
            Ok(c) => c,
            Err(e) => panic!(
                "MariaDB is not reachable at 127.0.0.1:3306 as root ({e}); start it with \
                 `service mariadb start` (or `mysqld_safe &`) or run tests/run.sh"
            ),
        }
    }

    pub async fn exec(conn: &mut MySqlConnection, sql: &str) {
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A fresh database (MySQL's schema) on the test server ([`MY_URL`]'s) for one test, so
    /// tests can run in parallel; dropped when the returned name goes out of scope.
    pub async fn fresh_database(conn: &mut MySqlConnection, name: &str) -> Scoped {
        exec(
            conn,
            &format!(
                "DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name} CHARACTER SET utf8mb4"
            ),
        )
        .await;
        Scoped::new(name, DropOnExit::mysql_database(MY_URL, name))
    }

    pub fn job_json(
        database: &str,
        table: &str,
        dest_table: &str,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let v = serde_json::json!({
            "data_source_id": 43,
            "source_type": "mysql",
            "connection_params": {"host": "127.0.0.1", "port": 3306, "database": database,
                                  "username": "root", "password": ""},
            "source_table_name": table,
            "dest_table_name": dest_table,
            "load_type": "catalog",
            "processing_mode": "dataflow"
        });
        with_fields(v, extra)
    }

    pub fn job(database: &str, table: &str, dest_table: &str, extra: serde_json::Value) -> JobSpec {
        JobSpec::from_json(&job_json(database, table, dest_table, extra).to_string())
            .expect("valid job")
    }

    /// The canonical text of a value in MySQL, matching `canonical_arrow`.
    fn canonical(col: &str, data_type: &str, column_type: &str) -> String {
        let c = format!("`{col}`");
        match data_type {
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
                format!("LOWER(HEX({c}))")
            }
            "date" => format!("CAST(DATEDIFF({c}, '1970-01-01') AS CHAR)"),
            "datetime" | "timestamp" => {
                format!("CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', {c}) AS CHAR)")
            }
            "bit" if column_type == "bit(1)" => format!("IF({c}, 't', 'f')"),
            "float" | "double" => panic!("no canonical MySQL form for {data_type} {col}"),
            _ => format!("CAST({c} AS CHAR)"),
        }
    }

    /// Column checks computed by the server over the source, ordered by `key`.
    pub async fn source_checks(
        conn: &mut MySqlConnection,
        database: &str,
        table: &str,
        key: &str,
    ) -> Vec<ColumnCheck> {
        exec(
            conn,
            "SET SESSION group_concat_max_len = 1073741824, time_zone = '+00:00'",
        )
        .await;
        let cols = sqlx::query(
            "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR)
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?
             ORDER BY ORDINAL_POSITION",
        )
        .bind(database)
        .bind(table)
        .fetch_all(&mut *conn)
        .await
        .expect("columns");
        let mut out = Vec::new();
        for row in cols {
            let name: String = row.get(0);
            let data_type: String = row.get(1);
            let column_type: String = row.get(2);
            let canon = canonical(&name, &data_type, &column_type);
            // Arrow sums integers and Decimal128 (precision <= 38) columns.
            let precision: Option<u32> = column_type
                .strip_prefix("decimal(")
                .and_then(|rest| rest.split(',').next())
                .and_then(|p| p.parse().ok());
            let summable = matches!(
                data_type.as_str(),
                "tinyint" | "smallint" | "mediumint" | "int" | "bigint"
            ) || precision.is_some_and(|p| p <= 38);
            let sum = if summable {
                format!("CAST(SUM(`{name}`) AS CHAR)")
            } else {
                "CAST(NULL AS CHAR)".into()
            };
            let sql = format!(
                "SELECT COUNT(`{name}`), {sum},
                        MD5(GROUP_CONCAT(IF(`{name}` IS NULL, 'N', CONCAT(LENGTH({canon}), ':', {canon}))
                                         ORDER BY `{key}` SEPARATOR ','))
                 FROM `{database}`.`{table}`"
            );
            let r = sqlx::query(AssertSqlSafe(sql))
                .fetch_one(&mut *conn)
                .await
                .expect("checks");
            out.push(ColumnCheck {
                column: name,
                non_null: r.get(0),
                sum: r.get(1),
                digest: r.get::<Option<String>, _>(2).unwrap_or_default(),
            });
        }
        out
    }

    pub async fn count(conn: &mut MySqlConnection, database: &str, table: &str) -> i64 {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM `{database}`.`{table}`"
        )))
        .fetch_one(&mut *conn)
        .await
        .expect("count")
        .get(0)
    }

    /// Asserts the destination equals the source: row count, per-column counts and sums, and
    /// every value (digest in key order).
    pub async fn assert_same_content(
        conn: &mut MySqlConnection,
        database: &str,
        table: &str,
        dest: &Path,
        key: &str,
    ) {
        let rows = count(conn, database, table).await;
        let source = source_checks(conn, database, table, key).await;
        assert_matches_source(rows, &source, dest, key);
    }
}

/// What a request to [`http_stub`] was: `"GET /path?query"` and its headers.
pub struct StubRequest {
    pub line: String,
    pub headers: hyper::HeaderMap,
}

/// A local HTTP/1 server for the Google APIs that have no emulator (Secret Manager, the
/// metadata server): `answer` gives each request its status and body; every request is kept.
pub async fn http_stub<F>(answer: F) -> (String, Arc<Mutex<Vec<StubRequest>>>)
where
    F: Fn(&StubRequest) -> (u16, String) + Send + Sync + 'static,
{
    let asked = Arc::new(Mutex::new(Vec::new()));
    let answer = Arc::new(answer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = asked.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (answer, log) = (answer.clone(), log.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (answer, log) = (answer.clone(), log.clone());
                        async move {
                            let target = req.uri().path_and_query().map_or("", |p| p.as_str());
                            let request = StubRequest {
                                line: format!("{} {target}", req.method()),
                                headers: req.headers().clone(),
                            };
                            let (status, body) = answer(&request);
                            log.lock().unwrap().push(request);
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), asked)
}

/// The suite's own PostgreSQL that checks passwords (`tests/emulators.sh` starts it; the
/// machine's trusts every local connection), as its superuser.
pub async fn pg_with_passwords() -> (Client, u16) {
    let port: u16 = env_or_fail("SHARDFLOW_TEST_PG_PASSWORD_PORT")
        .parse()
        .expect("a port");
    let url = format!("postgres://postgres:pg-test-password@127.0.0.1:{port}/postgres");
    match tokio_postgres::connect(&url, NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            (client, port)
        }
        Err(e) => panic!(
            "the password PostgreSQL on 127.0.0.1:{port} does not answer ({e}): start it with \
             bash tests/emulators.sh start"
        ),
    }
}
