//! Secrets by reference (issue 17): a password `secretmanager://projects/P/secrets/S/versions/V`
//! is read from Secret Manager by the process that connects. No Secret Manager emulator exists:
//! a local HTTP stand-in answers `versions.access` in the REST API's shape, and records what it
//! was asked. The secret opens the suite's TLS MariaDB, whose user has a password (the
//! machine's PostgreSQL trusts every local connection, so a password proves nothing there).

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use shardflow::retry::RetryPolicy;
use shardflow::source::mysql::MySqlConnector;

/// Serves `GET /v1/projects/p/secrets/S/versions/V:access` for the secrets given.
async fn secret_manager(secrets: &[(&str, &str)]) -> (String, Arc<Mutex<Vec<String>>>) {
    let secrets: Vec<(String, String)> = secrets
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = asked.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (secrets, log) = (secrets.clone(), log.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| {
                        let (secrets, log) = (secrets.clone(), log.clone());
                        async move {
                            let line = format!("{} {}", req.method(), req.uri().path());
                            log.lock().unwrap().push(line.clone());
                            let found = secrets.iter().find(|(name, _)| {
                                line == format!("GET /v1/projects/p/secrets/{name}:access")
                            });
                            let response = match found {
                            Some((name, value)) => Response::new(Full::new(Bytes::from(
                                serde_json::json!({
                                    "name": format!("projects/123/secrets/{name}"),
                                    "payload": {"data": base64::engine::general_purpose::STANDARD.encode(value)},
                                })
                                .to_string(),
                            ))),
                            None => Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from(
                                    r#"{"error": {"code": 404, "status": "NOT_FOUND"}}"#,
                                )))
                                .unwrap(),
                        };
                            Ok::<_, Infallible>(response)
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

#[tokio::test]
async fn a_password_by_reference_is_read_from_secret_manager_when_connecting() {
    let port: u16 = common::env_or_fail("SHARDFLOW_TEST_MARIADB_TLS_PORT")
        .parse()
        .unwrap();
    let (endpoint, asked) = secret_manager(&[("db-pass/versions/3", "tls-test-password")]).await;
    // The only test of this binary: nothing else reads the environment meanwhile.
    unsafe { std::env::set_var(shardflow::secrets::ENDPOINT_ENV, &endpoint) };
    let job = |password: &str| {
        let mut json = common::my::job_json("test", "t", "t", serde_json::json!({}));
        let params = json["connection_params"].as_object_mut().unwrap();
        params.insert("port".into(), port.into());
        params.insert("username".into(), "shardflow".into());
        params.insert("password".into(), password.into());
        shardflow::spec::JobSpec::from_json(&json.to_string()).unwrap()
    };

    // The config carries no password, only where it is; the connection opens with the secret.
    let spec = job("secretmanager://projects/p/secrets/db-pass/versions/3");
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
    // Read once for the connector, however often it connects.
    drop(connector.connect().await.unwrap());
    assert_eq!(
        asked.lock().unwrap().as_slice(),
        ["GET /v1/projects/p/secrets/db-pass/versions/3:access"]
    );

    // A version that does not exist: named, at once, and nothing of the secret in it.
    let missing = job("secretmanager://projects/p/secrets/db-pass/versions/9");
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
        "reading secret projects/p/secrets/db-pass/versions/9 from Secret Manager: no such \
         secret or version"
    );
    // A malformed reference fails before any request.
    let err = MySqlConnector::from_spec(&job("secretmanager://db-pass"), RetryPolicy::none())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("must be secretmanager://projects/P/secrets/S/versions/V"),
        "{err}"
    );
    assert_eq!(asked.lock().unwrap().len(), 2);
}
