//! Cloud SQL IAM database authentication (issue 17): with `enable_iam_auth` the connector logs in
//! with its identity's access token as the password. The token comes from google-cloud-auth's
//! metadata-server credentials, pointed by `GCE_METADATA_HOST` (the variable the library and
//! Google's other clients honour) at a local stand-in of the metadata server's token endpoint.
//! The databases are the suite's own that check passwords: the TLS MariaDB and the password
//! PostgreSQL, whose IAM-named users have the token as their password, as Cloud SQL would check it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardflow::retry::RetryPolicy;
use shardflow::source::mysql::MySqlConnector;
use shardflow::source::postgres::PgConnector;
use shardflow::spec::JobSpec;

const SERVICE_ACCOUNT: &str = "iam-loader@proj.iam.gserviceaccount.com";
const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// The metadata server's token endpoint: hands out `tokens` in order (the last one stays), as
/// `{"access_token", "expires_in", "token_type"}`, only to requests with `Metadata-Flavor: Google`.
async fn metadata_server(
    tokens: Arc<Mutex<Vec<(&'static str, u64)>>>,
) -> (String, Arc<Mutex<Vec<common::StubRequest>>>) {
    common::http_stub(move |request| {
        let flavored = request
            .headers
            .get("metadata-flavor")
            .is_some_and(|v| v == "Google");
        if !request.line.starts_with(&format!("GET {TOKEN_PATH}")) || !flavored {
            return (404, "not found".to_string());
        }
        let mut tokens = tokens.lock().unwrap();
        let (token, expires_in) = if tokens.len() > 1 {
            tokens.remove(0)
        } else {
            tokens[0]
        };
        (
            200,
            serde_json::json!({"access_token": token, "expires_in": expires_in,
                               "token_type": "Bearer"})
            .to_string(),
        )
    })
    .await
}

fn spec(source_type: &str, port: u16, database: &str, extra: serde_json::Value) -> JobSpec {
    let mut params = serde_json::json!({
        "host": "127.0.0.1", "port": port, "database": database,
        "username": SERVICE_ACCOUNT, "enable_iam_auth": true});
    for (k, v) in extra.as_object().unwrap() {
        params[k] = v.clone();
    }
    let json = serde_json::json!({
        "data_source_id": 44, "source_type": source_type, "connection_params": params,
        "source_table_name": "t", "schema_name": "public", "dest_table_name": "t",
        "load_type": "catalog", "processing_mode": "dataflow"});
    JobSpec::from_json(&json.to_string()).expect("a valid job")
}

async fn mysql_user(connector: &MySqlConnector) -> Result<(String, String), String> {
    let mut conn = connector.connect().await.map_err(|e| e.to_string())?;
    let user: (String,) = sqlx::query_as("SELECT CURRENT_USER()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let cipher: (String, String) = sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    Ok((user.0, cipher.1))
}

async fn pg_user(connector: &PgConnector) -> Result<String, String> {
    let client = connector.connect().await.map_err(|e| e.to_string())?;
    Ok(client
        .query_one("SELECT current_user", &[])
        .await
        .unwrap()
        .get(0))
}

#[tokio::test]
async fn iam_logins_use_the_identitys_token_refresh_it_and_name_a_refusal() {
    let my_port: u16 = common::env_or_fail("SHARDFLOW_TEST_MARIADB_TLS_PORT")
        .parse()
        .unwrap();
    let my_admin_url = format!("mysql://shardflow:tls-test-password@127.0.0.1:{my_port}/test");
    let mut my_admin = <sqlx::MySqlConnection as sqlx::Connection>::connect(&my_admin_url)
        .await
        .expect("the TLS MariaDB answers");
    let (pg_admin, pg_port) = common::pg_with_passwords().await;
    let set_passwords = async |my: &mut sqlx::MySqlConnection, password: &str| {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE USER IF NOT EXISTS 'iam-loader'@'%';
             ALTER USER 'iam-loader'@'%' IDENTIFIED BY '{password}'"
        )))
        .execute(&mut *my)
        .await
        .unwrap();
        pg_admin
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'iam-loader@proj.iam')
                   THEN CREATE ROLE \"iam-loader@proj.iam\" LOGIN; END IF; END $$;
                 ALTER ROLE \"iam-loader@proj.iam\" PASSWORD '{password}'"
            ))
            .await
            .unwrap();
    };
    set_passwords(&mut my_admin, "tok-one").await;
    // Dropped at the end; these guards drop them when the test fails first.
    let _drop_user = common::DropOnExit::mysql_user(&my_admin_url, "'iam-loader'@'%'");
    let _drop_role =
        common::DropOnExit::pg_role(&common::pg_with_passwords_url(), "iam-loader@proj.iam");

    // The first token expires in 245 s: inside the credentials' 240 s refresh slack after 5 s,
    // so they fetch the next one then, long before the first expires.
    let tokens = Arc::new(Mutex::new(vec![("tok-one", 245), ("tok-two", 3600)]));
    let (endpoint, asked) = metadata_server(tokens).await;
    // The only test of this binary: nothing else reads the environment meanwhile. No ADC file
    // may be found first (GOOGLE_APPLICATION_CREDENTIALS, ~/.config/gcloud).
    let home = common::scratch("iam-home");
    unsafe {
        std::env::set_var("GCE_METADATA_HOST", endpoint.trim_start_matches("http://"));
        std::env::remove_var("GOOGLE_APPLICATION_CREDENTIALS");
        std::env::set_var("HOME", &home);
    }

    let mysql = MySqlConnector::from_spec(
        &spec(
            "mysql",
            my_port,
            "information_schema",
            serde_json::json!({"ssl_mode": "REQUIRED"}),
        ),
        RetryPolicy::none(),
    )
    .unwrap();
    let postgres = PgConnector::from_spec(
        &spec("postgresql", pg_port, "postgres", serde_json::json!({})),
        RetryPolicy::none(),
    )
    .unwrap();
    assert!(!format!("{mysql:?}{postgres:?}").contains("tok-"));
    // Cloud SQL's user names: MySQL's without @…, PostgreSQL's without .gserviceaccount.com.
    let (user, cipher) = mysql_user(&mysql).await.expect("the token opens MySQL");
    assert_eq!(user, "iam-loader@%");
    assert!(!cipher.is_empty(), "the token crossed TLS");
    assert_eq!(
        pg_user(&postgres)
            .await
            .expect("the token opens PostgreSQL"),
        "iam-loader@proj.iam"
    );
    let first = asked.lock().unwrap().len();
    assert_eq!(first, 1, "one token for both connections");
    let request = asked.lock().unwrap()[0].line.clone();
    assert_eq!(
        request,
        format!(
            "GET {TOKEN_PATH}?scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fsqlservice.login"
        )
    );

    // Refreshed before expiry: the databases now take only the second token.
    set_passwords(&mut my_admin, "tok-two").await;
    let started = Instant::now();
    while asked.lock().unwrap().len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the credentials never refreshed the token"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(mysql_user(&mysql).await.unwrap().0, "iam-loader@%");
    assert_eq!(pg_user(&postgres).await.unwrap(), "iam-loader@proj.iam");

    // A token the server does not take (expired, revoked): named, permanent, at once.
    set_passwords(&mut my_admin, "a-token-nobody-has").await;
    for (connect, target) in [
        (
            Box::pin(async {
                MySqlConnector::from_spec(
                    &spec(
                        "mysql",
                        my_port,
                        "information_schema",
                        serde_json::json!({"ssl_mode": "REQUIRED"}),
                    ),
                    RetryPolicy::default(),
                )
                .unwrap()
                .connect()
                .await
                .map(drop)
            }) as std::pin::Pin<Box<dyn Future<Output = shardflow::Result<()>>>>,
            format!("iam-loader at 127.0.0.1:{my_port}/information_schema"),
        ),
        (
            Box::pin(async {
                PgConnector::from_spec(
                    &spec("postgresql", pg_port, "postgres", serde_json::json!({})),
                    RetryPolicy::default(),
                )
                .unwrap()
                .connect()
                .await
                .map(drop)
            }),
            format!("iam-loader@proj.iam at 127.0.0.1:{pg_port}/postgres"),
        ),
    ] {
        let started = Instant::now();
        let err = connect.await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "not retried");
        assert!(err.is_deterministic(), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "IAM database authentication as {target} was refused ("
            )),
            "{text}"
        );
        assert!(
            text.contains("an expired or revoked token")
                && text.contains("roles/cloudsql.instanceUser"),
            "{text}"
        );
        assert!(!text.contains("tok-two"), "{text}");
    }

    // The token is a cleartext password: a remote host without TLS, or with a password too, is
    // refused before anything is sent.
    for (source_type, extra, field) in [
        (
            "mysql",
            serde_json::json!({"host": "db.example.com", "ssl_mode": "PREFERRED"}),
            "connection_params.ssl_mode",
        ),
        (
            "postgresql",
            serde_json::json!({"host": "db.example.com", "sslmode": "prefer"}),
            "connection_params.sslmode",
        ),
        (
            "postgresql",
            serde_json::json!({"password": "hunter2"}),
            "connection_params.password",
        ),
    ] {
        let spec = spec(source_type, 1, "d", extra);
        let err = match source_type {
            "mysql" => MySqlConnector::from_spec(&spec, RetryPolicy::none()).map(drop),
            _ => PgConnector::from_spec(&spec, RetryPolicy::none()).map(drop),
        }
        .unwrap_err()
        .to_string();
        assert!(err.contains(field), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    sqlx::raw_sql("DROP USER 'iam-loader'@'%'")
        .execute(&mut my_admin)
        .await
        .unwrap();
    pg_admin
        .batch_execute("DROP ROLE \"iam-loader@proj.iam\"")
        .await
        .unwrap();
}
