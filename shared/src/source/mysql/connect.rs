//! Connecting to MySQL or MariaDB (TLS as the job asks), and what a server error means for
//! the job: refused (the same answer every time) or worth another try.

use super::*;

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
        crate::source::tls::install_crypto_provider();
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
                        if let Some(why) = crate::source::tls::tls_failure(&chain) {
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
pub(super) fn with_tls(
    options: MySqlConnectOptions,
    get: impl Fn(&str) -> Option<String>,
) -> Result<(MySqlConnectOptions, bool)> {
    use crate::source::tls::{pem_bytes, spec_error};
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
pub(super) fn refuses_the_job(number: u16) -> bool {
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
