//! Bad configs through the binary (issue 18, points 7 and 8): every failing path of
//! `dispatcher run` (a bad host, a bad password, connection URLs, malformed fields) gets an
//! error that names its field or its cause, and no output of it (the report on stdout, the
//! debug log on stderr, the retry warnings) holds any value of `connection_params`: a sentinel
//! password is grepped in all of it. The passwords are checked by servers that check them:
//! the suite's password PostgreSQL and its TLS MariaDB.

mod common;

use serde_json::{Value, json};

const SENTINEL: &str = "S3ntinel-pw-7c1e";

struct Outcome {
    /// The run's scratch directory (its warehouse under `warehouse/`).
    dir: std::path::PathBuf,
    code: Option<i32>,
    report: Value,
    output: String,
}

fn run(name: &str, config: Value) -> Outcome {
    let dir = common::scratch(&format!("bad-config-{name}"));
    let job_file = dir.join("job.json");
    std::fs::write(&job_file, config.to_string()).unwrap();
    let out = common::dispatcher_run(&dir, &job_file, &["--no-progress"])
        // One retry, at once: the warning is written, the test stays quick.
        .env("ETL_MAX_RETRIES", "1")
        .env("ETL_RETRY_DELAY", "0")
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("{name}: no report on stdout:\n{stdout}\n{stderr}"));
    Outcome {
        dir,
        code: out.status.code(),
        report,
        output: format!("{stdout}\n{stderr}"),
    }
}

fn pg_config(connection_params: Value) -> Value {
    json!({
        "data_source_id": 45, "source_type": "postgresql",
        "connection_params": connection_params,
        "source_table_name": "t", "schema_name": "public", "dest_table_name": "t",
        "load_type": "catalog", "processing_mode": "standard"})
}

fn error_of(outcome: &Outcome) -> String {
    outcome.report["error_message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn failing_configs_name_the_cause_and_never_show_a_connection_value() {
    let (_admin, pg_port) = common::pg_with_passwords().await;
    let my_port: u16 = common::env_or_fail("SHARDFLOW_TEST_MARIADB_TLS_PORT")
        .parse()
        .unwrap();
    let pg_url = format!("postgresql://postgres:{SENTINEL}@127.0.0.1:{pg_port}/postgres");
    // A port nothing listens on: bound, then let go.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cases: Vec<(&str, Value, String)> = vec![
        (
            "closed-port",
            pg_config(json!({"host": "127.0.0.1", "port": closed, "database": "d",
                             "username": "u", "password": SENTINEL})),
            format!(
                "cannot connect to PostgreSQL at 127.0.0.1:{closed}/d: connection refused \
                 (nothing listens there)"
            ),
        ),
        (
            "mysql-closed-port",
            json!({
                "data_source_id": 46, "source_type": "mysql",
                "connection_params": {"host": "127.0.0.1", "port": closed, "database": "test",
                                      "username": "root", "password": SENTINEL},
                "source_table_name": "t", "dest_table_name": "t",
                "load_type": "catalog", "processing_mode": "standard"}),
            format!(
                "cannot connect to MySQL at 127.0.0.1:{closed}/test: connection refused \
                 (nothing listens there)"
            ),
        ),
        (
            "bad-host",
            pg_config(
                json!({"host": "no-such-host.invalid", "port": 5432, "database": "d",
                             "username": "u", "password": SENTINEL}),
            ),
            "cannot connect to PostgreSQL at no-such-host.invalid:5432/d".into(),
        ),
        (
            "bad-password",
            pg_config(
                json!({"host": "127.0.0.1", "port": pg_port, "database": "postgres",
                             "username": "postgres", "password": SENTINEL}),
            ),
            "password authentication failed for user \"postgres\"".into(),
        ),
        (
            "url",
            pg_config(json!(pg_url)),
            format!(
                "cannot connect to PostgreSQL at 127.0.0.1:{pg_port}/postgres: password \
                 authentication failed for user \"postgres\""
            ),
        ),
        (
            "url-with-query",
            pg_config(json!(format!("{pg_url}?sslmode=require"))),
            format!(
                "TLS to PostgreSQL at 127.0.0.1:{pg_port}/postgres failed: the server does \
                 not offer TLS"
            ),
        ),
        (
            "url-unreadable",
            pg_config(json!(format!(
                "postgresql://postgres:{SENTINEL}@[::1/postgres"
            ))),
            "connection_params is text but not a connection URL".into(),
        ),
        (
            "url-in-host",
            pg_config(json!({"host": pg_url, "password": SENTINEL})),
            "connection_params.host holds a connection URL or credentials".into(),
        ),
        (
            "key-value-string",
            pg_config(json!(format!("host=127.0.0.1 password={SENTINEL}"))),
            "connection_params is text but not a connection URL".into(),
        ),
        (
            "negative-port",
            pg_config(json!({"host": "127.0.0.1", "port": -1, "password": SENTINEL})),
            "connection_params.port: must be a port number from 1 to 65535".into(),
        ),
        (
            "text-port",
            pg_config(json!({"host": "127.0.0.1", "port": "fifty", "password": SENTINEL})),
            "connection_params.port: must be a port number from 1 to 65535".into(),
        ),
        (
            "username-object",
            pg_config(json!({"username": {"name": SENTINEL}, "password": SENTINEL})),
            "connection_params.username must be text".into(),
        ),
        (
            "params-a-number",
            pg_config(json!(5432)),
            "connection_params must be an object or a connection URL".into(),
        ),
        (
            "mysql-bad-password",
            json!({
                "data_source_id": 46, "source_type": "mysql",
                "connection_params": format!(
                    "mysql://shardflow:{SENTINEL}@127.0.0.1:{my_port}/test?ssl_mode=REQUIRED"),
                "source_table_name": "t", "dest_table_name": "t",
                "load_type": "catalog", "processing_mode": "standard"}),
            "Access denied for user 'shardflow'".into(),
        ),
    ];
    for (name, config, expected) in cases {
        let outcome = run(name, config);
        assert_eq!(outcome.code, Some(1), "{name}: {}", outcome.output);
        assert_eq!(outcome.report["status"], "failed", "{name}");
        let error = error_of(&outcome);
        assert!(error.contains(&expected), "{name}: {error}");
        assert!(
            !outcome.output.contains(SENTINEL),
            "{name}: the password is in the output:\n{}",
            outcome.output
        );
        if name == "bad-host" {
            // Transient: retried once, and the warning says so without the password either.
            assert!(
                outcome
                    .output
                    .contains("connect to PostgreSQL failed; retrying"),
                "{name}: {}",
                outcome.output
            );
        }
    }
}

#[tokio::test]
async fn typos_are_warned_about_and_names_too_long_for_the_destination_are_refused_first() {
    let pg = common::pg().await;
    let schema = common::fresh_schema(&pg, "bad_cfg").await;
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.t (id int PRIMARY KEY, at timestamp);
         INSERT INTO {schema}.t VALUES (1, '2024-01-01'), (2, '2024-01-02');"
    ))
    .await
    .unwrap();
    // `load_typ`: the catalog load runs, and the report says what was ignored and why.
    let mut typo = common::job_json(&schema, "t", "t", json!({"processing_mode": "standard"}));
    typo["load_typ"] = "transactional".into();
    typo["timestamp_colum"] = "at".into();
    typo["wizard_step"] = 3.into();
    let outcome = run("typo", typo);
    assert_eq!(outcome.code, Some(0), "{}", outcome.output);
    assert_eq!(outcome.report["rows_loaded"], 2);
    common::assert_same_content(&pg, &schema, "t", &outcome.dir.join("warehouse/t"), "id").await;
    assert_eq!(
        outcome.report["warnings"],
        json!([
            "unknown field \"load_typ\" ignored (did you mean load_type?)",
            "unknown field \"timestamp_colum\" ignored (did you mean timestamp_column?)",
            "unknown field \"wizard_step\" ignored",
        ])
    );
    // A name the Parquet directory cannot hold: refused before a row is read.
    let long = "t".repeat(200);
    let outcome = run(
        "long-name",
        common::job_json(&schema, "t", &long, json!({"processing_mode": "standard"})),
    );
    assert_eq!(outcome.code, Some(1));
    assert_eq!(
        error_of(&outcome),
        "warehouse: dest_table_name is 200 bytes long; a Parquet directory warehouse takes at most 150 \
         (it is a directory name, with room for the run's build directory)"
    );
    assert_eq!(outcome.report["rows_extracted"], 0);
    pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
