//! Secrets by reference (issue 17): a password, or a TLS key, certificate or CA, given as
//! `secretmanager://projects/P/secrets/S/versions/V` is read from Secret Manager by the process
//! that connects. No Secret Manager emulator exists: a local HTTP stand-in answers
//! `versions.access` in the REST API's shape, and records what it was asked. The secrets open
//! the suite's TLS MariaDB and its password-checking PostgreSQL (the machine's PostgreSQL trusts
//! every local connection, so a password proves nothing there).

mod common;

use base64::Engine as _;
use shardflow::retry::RetryPolicy;
use shardflow::source::mysql::MySqlConnector;
use shardflow::source::postgres::PgConnector;

/// Serves `GET /v1/projects/p/secrets/S/versions/V:access` for the secrets given.
async fn secret_manager(
    secrets: &[(&str, String)],
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<common::StubRequest>>>,
) {
    let secrets: Vec<(String, String)> = secrets
        .iter()
        .map(|(n, v)| (format!("GET /v1/projects/p/secrets/{n}:access"), v.clone()))
        .collect();
    common::http_stub(
        move |request| match secrets.iter().find(|(line, _)| *line == request.line) {
            Some((line, value)) => (
                200,
                serde_json::json!({
                    "name": line.trim_start_matches("GET /v1/").trim_end_matches(":access"),
                    "payload": {"data": base64::engine::general_purpose::STANDARD.encode(value)},
                })
                .to_string(),
            ),
            None => (
                404,
                r#"{"error": {"code": 404, "status": "NOT_FOUND"}}"#.to_string(),
            ),
        },
    )
    .await
}

fn asked(log: &std::sync::Mutex<Vec<common::StubRequest>>) -> Vec<String> {
    log.lock().unwrap().iter().map(|r| r.line.clone()).collect()
}

#[tokio::test]
async fn secrets_by_reference_are_read_from_secret_manager_when_connecting() {
    let port: u16 = common::env_or_fail("SHARDFLOW_TEST_MARIADB_TLS_PORT")
        .parse()
        .unwrap();
    let ca_pem = std::fs::read_to_string(common::env_or_fail("SHARDFLOW_TEST_MARIADB_TLS_CA"))
        .expect("the TLS MariaDB's CA");
    let (pg_admin, pg_port) = common::pg_with_passwords().await;
    pg_admin
        .batch_execute(
            "DROP ROLE IF EXISTS secret_reader;
             CREATE ROLE secret_reader LOGIN PASSWORD 'pg-secret-by-reference'",
        )
        .await
        .unwrap();
    // Dropped below; this guard drops it when the test fails first.
    let _drop_role = common::DropOnExit::pg_role(&common::pg_with_passwords_url(), "secret_reader");
    let (endpoint, log) = secret_manager(&[
        ("db-pass/versions/3", "tls-test-password".to_string()),
        ("server-ca/versions/1", ca_pem),
        (
            "pg-pass/versions/latest",
            "pg-secret-by-reference".to_string(),
        ),
    ])
    .await;
    // The only test of this binary: nothing else reads the environment meanwhile.
    unsafe { std::env::set_var(shardflow::secrets::ENDPOINT_ENV, &endpoint) };
    let job = |params: serde_json::Value| {
        let mut json = common::my::job_json("test", "t", "t", serde_json::json!({}));
        let given = json["connection_params"].as_object_mut().unwrap();
        given.insert("port".into(), port.into());
        given.insert("username".into(), "shardflow".into());
        for (k, v) in params.as_object().unwrap() {
            given.insert(k.clone(), v.clone());
        }
        shardflow::spec::JobSpec::from_json(&json.to_string()).unwrap()
    };

    // The config carries no password, only where it is; the connection opens with the secret.
    let spec = job(serde_json::json!({
        "password": "secretmanager://projects/p/secrets/db-pass/versions/3"}));
    let connector = MySqlConnector::from_spec(&spec, RetryPolicy::none()).unwrap();
    assert!(!format!("{connector:?}").contains("tls-test-password"));
    let mut conn = connector
        .connect()
        .await
        .expect("the secret opens the database");
    let user: String = sqlx::Row::get(
        &sqlx::query("SELECT CURRENT_USER()")
            .fetch_one(&mut conn)
            .await
            .unwrap(),
        0,
    );
    assert_eq!(user, "shardflow@%");
    // Read once, however often the connector connects, and however many connectors of the
    // process (a worker's shards of a run) name it.
    drop(connector.connect().await.unwrap());
    drop(
        MySqlConnector::from_spec(&spec, RetryPolicy::none())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    assert_eq!(
        asked(&log),
        ["GET /v1/projects/p/secrets/db-pass/versions/3:access"]
    );

    // The TLS material by reference too: VERIFY_CA against a CA read from Secret Manager.
    let spec = job(serde_json::json!({
        "host": "localhost",
        "password": "secretmanager://projects/p/secrets/db-pass/versions/3",
        "ssl_mode": "VERIFY_CA",
        "ssl_ca": "secretmanager://projects/p/secrets/server-ca/versions/1"}));
    let mut conn = MySqlConnector::from_spec(&spec, RetryPolicy::none())
        .unwrap()
        .connect()
        .await
        .expect("the CA from Secret Manager verifies the server");
    let cipher: (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(!cipher.1.is_empty(), "the session is encrypted");
    assert!(asked(&log).contains(&"GET /v1/projects/p/secrets/server-ca/versions/1:access".into()));

    // PostgreSQL: a server that checks the password, given by reference.
    let mut pg_json = common::job_json("public", "t", "t", serde_json::json!({}));
    pg_json["connection_params"] = serde_json::json!({
        "host": "127.0.0.1", "port": pg_port, "database": "postgres",
        "username": "secret_reader",
        "password": "secretmanager://projects/p/secrets/pg-pass/versions/latest"});
    let pg_spec = shardflow::spec::JobSpec::from_json(&pg_json.to_string()).unwrap();
    let client = PgConnector::from_spec(&pg_spec, RetryPolicy::none())
        .unwrap()
        .connect()
        .await
        .expect("the secret opens PostgreSQL");
    let row = client.query_one("SELECT current_user", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "secret_reader");
    // Without the secret the same server refuses: the password was checked.
    pg_json["connection_params"]["password"] = "not-the-password".into();
    let wrong = shardflow::spec::JobSpec::from_json(&pg_json.to_string()).unwrap();
    let err = PgConnector::from_spec(&wrong, RetryPolicy::none())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(err.is_deterministic(), "{err:?}");
    assert!(!err.to_string().contains("not-the-password"), "{err}");

    // A version that does not exist: named, at once, and nothing of the secret in it.
    let missing = job(serde_json::json!({
        "password": "secretmanager://projects/p/secrets/db-pass/versions/9"}));
    let started = std::time::Instant::now();
    let err = MySqlConnector::from_spec(&missing, RetryPolicy::default())
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    assert!(err.is_deterministic(), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "reading secret projects/p/secrets/db-pass/versions/9 from Secret Manager at \
             {endpoint}: no such secret or version"
        )
    );
    // A malformed reference, or one in a field that is not a secret, fails before any request.
    let before = asked(&log).len();
    let err = MySqlConnector::from_spec(
        &job(serde_json::json!({"password": "secretmanager://db-pass"})),
        RetryPolicy::none(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("must be secretmanager://projects/P/secrets/S/versions/V"),
        "{err}"
    );
    let err = MySqlConnector::from_spec(
        &job(serde_json::json!({
            "ssl_mode": "secretmanager://projects/p/secrets/db-pass/versions/3"})),
        RetryPolicy::none(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("connection_params.ssl_mode") && err.contains("may be a secretmanager://"),
        "{err}"
    );
    assert_eq!(asked(&log).len(), before);
    pg_admin
        .batch_execute("DROP ROLE secret_reader")
        .await
        .unwrap();
}
