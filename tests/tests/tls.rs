//! TLS to the databases (issue 17), against the machine's own PostgreSQL, which serves TLS with
//! a self-signed certificate for `localhost` (`ssl_cert_file`, Debian's snakeoil): each
//! `sslmode` loads exactly or fails with a named, permanent error, and the session is shown
//! to be encrypted in `pg_stat_ssl`.

mod common;

use std::path::{Path, PathBuf};

use shardflow::retry::RetryPolicy;
use shardflow::source::postgres::PgConnector;
use shardflow::state::RunStatus;
use shardflow_dispatcher::{PlanOptions, RunOptions, run_job};

/// The certificate the test server presents, read from the server itself.
async fn server_certificate() -> PathBuf {
    let client = common::pg().await;
    let row = client
        .query_one(
            "SELECT current_setting('ssl'), current_setting('ssl_cert_file')",
            &[],
        )
        .await
        .expect("read the server's TLS settings");
    let (ssl, file): (String, String) = (row.get(0), row.get(1));
    assert_eq!(
        ssl, "on",
        "the test PostgreSQL serves no TLS (ssl = {ssl}); these tests need its default \
         self-signed certificate (ssl = on)"
    );
    let path = PathBuf::from(file);
    assert!(path.exists(), "{} is not readable here", path.display());
    path
}

/// Another CA, which did not sign the server's certificate (made with the openssl CLI).
fn other_ca(dir: &Path) -> PathBuf {
    let (cert, key) = (dir.join("other-ca.pem"), dir.join("other-ca.key"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not-the-server-ca", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl command (apt install openssl)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    cert
}

fn job(host: &str, schema: &str, tls: serde_json::Value) -> shardflow::spec::JobSpec {
    let mut json = common::job_json(schema, "t", "t", serde_json::json!({}));
    json["connection_params"]["host"] = host.into();
    if let (Some(params), Some(tls)) = (json["connection_params"].as_object_mut(), tls.as_object())
    {
        for (k, v) in tls {
            params.insert(k.clone(), v.clone());
        }
    }
    shardflow::spec::JobSpec::from_json(&json.to_string()).expect("a valid job")
}

fn options(dir: &Path) -> RunOptions {
    RunOptions {
        plan: PlanOptions {
            shard_rows: 400,
            retry: RetryPolicy::none(),
            ..Default::default()
        },
        workers: 2,
        dest: dir.join("warehouse").display().to_string(),
        state_url: format!("sqlite://{}", dir.join("state.db").display()),
        max_delivery_attempts: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn postgres_sources_load_over_tls_in_every_sslmode_and_name_what_fails() {
    let root = server_certificate().await;
    let dir = common::scratch("tls-postgres");
    let client = common::pg().await;
    let schema = common::fresh_schema(&client, "tls_pg").await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {schema}.t (id bigint PRIMARY KEY, name text, at timestamptz);
             INSERT INTO {schema}.t SELECT g, 'row ' || g, '2024-01-01'::timestamptz + g * interval '1 minute'
             FROM generate_series(1, 1000) g;"
        ))
        .await
        .unwrap();
    let root_pem = std::fs::read_to_string(&root).unwrap();
    let root_path = root.display().to_string();
    let loads = [
        ("127.0.0.1", serde_json::json!({"sslmode": "require"})),
        (
            "127.0.0.1",
            serde_json::json!({"sslmode": "verify-ca", "sslrootcert": root_path}),
        ),
        // The PEM inline in connection_params, as Django may hold it.
        (
            "localhost",
            serde_json::json!({"sslmode": "verify-full", "sslrootcert": root_pem}),
        ),
        ("127.0.0.1", serde_json::json!({})),
    ];
    for (host, tls) in loads {
        let spec = job(host, &schema, tls.clone());
        // The connection a worker makes is encrypted (or, by default, preferred so).
        let connector = PgConnector::from_spec(&spec, RetryPolicy::none()).unwrap();
        let session = connector.connect().await.unwrap();
        let row = session
            .query_one(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        let (ssl, version): (bool, Option<String>) = (row.get(0), row.get(1));
        assert!(ssl, "{tls}: the session is not encrypted");
        assert!(version.is_some_and(|v| v.starts_with("TLSv1.")), "{tls}");
        let report = run_job(spec, options(&dir)).await;
        assert_eq!(
            report.status,
            RunStatus::Completed,
            "{tls}: {:?}",
            report.error_message
        );
        common::assert_same_content(&client, &schema, "t", &dir.join("warehouse/t"), "id").await;
    }

    // What fails, named, at once (a retry policy of five attempts is not used up).
    let other = other_ca(&dir).display().to_string();
    let failures = [
        (
            "127.0.0.1",
            serde_json::json!({"sslmode": "verify-ca", "sslrootcert": other}),
            "the server's certificate is not signed by a trusted CA (sslrootcert, ssl_ca)",
        ),
        (
            "127.0.0.1",
            serde_json::json!({"sslmode": "verify-full", "sslrootcert": root_path}),
            "the server's certificate does not name this host (verify-full, VERIFY_IDENTITY)",
        ),
    ];
    for (host, tls, why) in failures {
        let spec = job(host, &schema, tls.clone());
        let connector = PgConnector::from_spec(&spec, RetryPolicy::default()).unwrap();
        let started = std::time::Instant::now();
        let err = connector.connect().await.unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{tls}: retried ({err})"
        );
        assert!(err.is_deterministic(), "{tls}: {err:?}");
        assert_eq!(
            err.to_string(),
            format!("TLS to PostgreSQL at {host}:5432/test failed: {why}"),
            "{tls}"
        );
        assert!(!err.to_string().contains("pw-never-shown"));
        let report = run_job(spec, options(&dir)).await;
        assert_eq!(report.status, RunStatus::Failed);
        assert!(
            report
                .error_message
                .as_deref()
                .unwrap_or_default()
                .contains(why),
            "{tls}: {:?}",
            report.error_message
        );
    }
}

/// A server that answers PostgreSQL's SSLRequest with `N` (no TLS), as one with `ssl = off`
/// does: a protocol peer of two bytes, since the machine's server offers TLS.
#[tokio::test]
async fn a_server_without_tls_is_refused_when_sslmode_requires_it() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 8];
            if socket.read_exact(&mut request).await.is_ok() {
                // 8 bytes: length 8, code 80877103 (the SSLRequest).
                assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47]);
                let _ = socket.write_all(b"N").await;
            }
        }
    });
    let mut json = common::job_json("public", "t", "t", serde_json::json!({}));
    json["connection_params"]["port"] = port.into();
    json["connection_params"]["sslmode"] = "require".into();
    let spec = shardflow::spec::JobSpec::from_json(&json.to_string()).unwrap();
    let err = PgConnector::from_spec(&spec, RetryPolicy::default())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(err.is_deterministic(), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "TLS to PostgreSQL at 127.0.0.1:{port}/test failed: the server does not offer TLS, \
             which the ssl mode requires"
        )
    );
}

/// The suite's own MariaDB with TLS (`tests/emulators.sh` starts it on 3307 with a test CA;
/// the machine's shared server serves none).
fn mariadb_tls() -> (u16, String) {
    let port = common::env_or_fail("SHARDFLOW_TEST_MARIADB_TLS_PORT");
    let ca = common::env_or_fail("SHARDFLOW_TEST_MARIADB_TLS_CA");
    (port.parse().expect("a port"), ca)
}

fn mysql_job(host: &str, port: u16, tls: serde_json::Value) -> shardflow::spec::JobSpec {
    mysql_job_in("tls_my", host, port, tls)
}

fn mysql_job_in(
    database: &str,
    host: &str,
    port: u16,
    tls: serde_json::Value,
) -> shardflow::spec::JobSpec {
    let mut json = common::my::job_json(database, "t", "t", serde_json::json!({}));
    let params = json["connection_params"].as_object_mut().unwrap();
    params.insert("host".into(), host.into());
    params.insert("port".into(), port.into());
    params.insert("username".into(), "shardflow".into());
    params.insert("password".into(), "tls-test-password".into());
    for (k, v) in tls.as_object().into_iter().flatten() {
        params.insert(k.clone(), v.clone());
    }
    shardflow::spec::JobSpec::from_json(&json.to_string()).expect("a valid job")
}

#[tokio::test]
async fn mysql_sources_load_over_tls_in_every_ssl_mode_and_name_what_fails() {
    use md5::Digest as _;
    use shardflow::source::mysql::MySqlConnector;
    use sqlx::Row as _;
    let (port, ca) = mariadb_tls();
    let dir = common::scratch("tls-mysql");
    let setup = mysql_job_in(
        "test",
        "127.0.0.1",
        port,
        serde_json::json!({"ssl_mode": "REQUIRED"}),
    );
    let mut conn = MySqlConnector::from_spec(&setup, RetryPolicy::none())
        .unwrap()
        .connect()
        .await
        .expect("the TLS MariaDB answers (bash tests/emulators.sh start)");
    let _drop_tls_my = common::DropOnExit::mysql_database(&common::mariadb_tls_url(), "tls_my");
    common::my::exec(
        &mut conn,
        "DROP DATABASE IF EXISTS tls_my; CREATE DATABASE tls_my;
         CREATE TABLE tls_my.t (id bigint PRIMARY KEY, name varchar(40), at datetime(6));
         INSERT INTO tls_my.t SELECT seq, CONCAT('row ', seq), '2024-01-01' + INTERVAL seq MINUTE
         FROM seq_1_to_1000;",
    )
    .await;
    common::my::exec(&mut conn, "SET SESSION group_concat_max_len = 1000000").await;
    let source: (i64, String) = {
        let row =
            sqlx::query("SELECT COUNT(*), MD5(GROUP_CONCAT(id, name ORDER BY id)) FROM tls_my.t")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        (row.get(0), row.get(1))
    };
    let ca_pem = std::fs::read_to_string(&ca).unwrap();
    let loads = [
        ("127.0.0.1", serde_json::json!({"ssl_mode": "REQUIRED"})),
        (
            "127.0.0.1",
            serde_json::json!({"ssl_mode": "VERIFY_CA", "ssl_ca": ca}),
        ),
        (
            "localhost",
            serde_json::json!({"ssl_mode": "VERIFY_IDENTITY", "ssl_ca": ca_pem}),
        ),
        ("127.0.0.1", serde_json::json!({})),
    ];
    for (host, tls) in loads {
        let spec = mysql_job(host, port, tls.clone());
        let mut session = MySqlConnector::from_spec(&spec, RetryPolicy::none())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let cipher: String = sqlx::query("SHOW SESSION STATUS LIKE 'Ssl_version'")
            .fetch_one(&mut session)
            .await
            .unwrap()
            .get(1);
        assert!(
            cipher.starts_with("TLSv1."),
            "{tls}: the session is not encrypted ({cipher:?})"
        );
        let report = run_job(spec, options(&dir)).await;
        assert_eq!(
            report.status,
            RunStatus::Completed,
            "{tls}: {:?}",
            report.error_message
        );
        // Every row, in id order, as the source holds it.
        let batches = common::read_table(&dir.join("warehouse/t"));
        let mut rows: Vec<(i64, String)> = Vec::new();
        for b in &batches {
            let ids =
                arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(b.column(0));
            let names = arrow::array::AsArray::as_string::<i32>(b.column(1));
            rows.extend((0..b.num_rows()).map(|r| (ids.value(r), names.value(r).to_string())));
        }
        rows.sort();
        let text: String = rows
            .iter()
            .map(|(id, name)| format!("{id}{name}"))
            .collect::<Vec<_>>()
            .join(",");
        let digest = format!("{:x}", md5::Md5::digest(text.as_bytes()));
        assert_eq!((rows.len() as i64, digest), source.clone(), "{tls}");
    }

    let other = other_ca(&dir).display().to_string();
    let failures = [
        (
            "127.0.0.1",
            port,
            serde_json::json!({"ssl_mode": "VERIFY_CA", "ssl_ca": other}),
            "the server's certificate is not signed by a trusted CA (sslrootcert, ssl_ca)",
        ),
        (
            "127.0.0.1",
            port,
            serde_json::json!({"ssl_mode": "VERIFY_IDENTITY", "ssl_ca": ca}),
            "the server's certificate does not name this host (verify-full, VERIFY_IDENTITY)",
        ),
        // The machine's shared MariaDB serves no TLS.
        (
            "127.0.0.1",
            3306,
            serde_json::json!({"ssl_mode": "REQUIRED"}),
            "the server does not offer TLS, which the ssl mode requires",
        ),
    ];
    for (host, port, tls, why) in failures {
        let spec = mysql_job(host, port, tls.clone());
        let started = std::time::Instant::now();
        let err = MySqlConnector::from_spec(&spec, RetryPolicy::default())
            .unwrap()
            .connect()
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{tls}: retried ({err})"
        );
        assert!(err.is_deterministic(), "{tls}: {err:?}");
        assert_eq!(
            err.to_string(),
            format!("TLS to MySQL at {host}:{port}/tls_my failed: {why}"),
            "{tls}"
        );
        assert!(!err.to_string().contains("tls-test-password"));
    }
}
