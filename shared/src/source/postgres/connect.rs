//! Connecting to PostgreSQL: password or IAM login, TLS as `sslmode` asks, retries on what
//! a retry can fix, and errors that say which it was.

use super::*;

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

    pub(super) fn build_tls(
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(tokio_postgres_rustls::MakeRustlsConnect, SslMode)> {
        let tls = PgTls::from_params(get)?;
        Ok((tls.connector()?, tls.mode))
    }

    pub(super) fn describe_target(&self) -> String {
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
                        (Some(db), _) if errors::refuses_the_job(db.code().code()) => {
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

pub(super) fn pg_text(e: &tokio_postgres::Error) -> String {
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
