//! Cloud SQL IAM database authentication: with `"enable_iam_auth": true` in `connection_params`
//! the process that connects logs in as its own Google identity (the pod's Workload Identity),
//! an OAuth 2.0 access token as the password, and no password is configured anywhere.
//!
//! Cloud SQL's rules (cloud.google.com/sql/docs/postgres/iam-logins, .../mysql/iam-logins):
//! "When you log in as a database user with manual IAM database authentication, you use your
//! email address as the username and the access token as the password"; for PostgreSQL, "for a
//! service account, this is the service account's email without the .gserviceaccount.com domain
//! suffix"; for MySQL, "for a service account, this is the service account's email address
//! without the @project-id.iam.gserviceaccount.com suffix" (and a user's email without the @ and
//! domain). The account needs `roles/cloudsql.instanceUser` (`cloudsql.instances.login`).
//! "IAM database authentication uses OAuth 2.0 access tokens, which are short-lived and only
//! valid for one hour": the token is checked at login only, so a connection outlives it; each
//! new connection takes the credentials' current token, which google-cloud-auth refreshes four
//! minutes before it expires (its `NORMAL_REFRESH_SLACK`).
//!
//! The token is scoped to `sqlservice.login`, the scope Google's Cloud SQL connectors request
//! for logins, so a token the database side ever leaked would open no other API.

use std::sync::OnceLock;
use std::time::Duration;

use crate::{Error, Result};

/// The `connection_params` field that asks for IAM database authentication (the name Google's
/// Cloud SQL connectors give the option).
pub const PARAM: &str = "enable_iam_auth";
/// The OAuth scope of a Cloud SQL login token.
pub const LOGIN_SCOPE: &str = "https://www.googleapis.com/auth/sqlservice.login";
/// How long to wait for a token before the connection attempt fails (and is retried).
const TOKEN_WAIT: Duration = Duration::from_secs(20);

/// The database a login is for: the user-name rules differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    MySql,
}

/// How a source connector proves who it is.
#[derive(Clone, Debug)]
pub enum Login {
    /// The password (empty: none), or a `secretmanager://` reference read when connecting.
    Password(crate::secrets::LazySecret),
    /// IAM database authentication as `user`, Cloud SQL's name for the account.
    IamToken { user: String },
}

impl Login {
    /// The login `connection_params` asks for: a password, or with `enable_iam_auth` (which
    /// must come without one) the identity's token.
    pub fn from_params(
        engine: Engine,
        connection: &crate::spec::ConnectionParams,
        params: &crate::secrets::SecretParams,
    ) -> Result<Self> {
        let password = connection.password.as_ref().map(|p| p.expose());
        if !wanted(params.given(PARAM).as_deref())? {
            return Ok(Login::Password(crate::secrets::LazySecret::new(
                password.unwrap_or_default(),
            )?));
        }
        if password.is_some_and(|p| !p.is_empty()) {
            return Err(spec_error(
                "password",
                "must be absent with enable_iam_auth: the access token is the password",
            ));
        }
        let user = database_user(engine, connection.username.as_deref().unwrap_or_default())?;
        Ok(Login::IamToken { user })
    }

    /// A password given in the config itself (not by reference, not empty).
    pub fn given_password(&self) -> Option<String> {
        match self {
            Login::Password(p) if !p.is_reference() => {
                Some(p.value().to_string()).filter(|p| !p.is_empty())
            }
            _ => None,
        }
    }

    /// The password to log in with now, when it is not in the config: read from Secret
    /// Manager (once), or the identity's current token (each attempt).
    pub async fn fetched_password(&self) -> Result<Option<String>> {
        match self {
            Login::Password(p) if p.is_reference() => Ok(Some(p.get().await?)),
            Login::Password(_) => Ok(None),
            Login::IamToken { .. } => Ok(Some(login_token().await?)),
        }
    }
}

/// Whether `connection_params` asks for IAM database authentication (a JSON boolean, or its
/// text as forms deliver it).
pub fn wanted(value: Option<&str>) -> Result<bool> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("false" | "0" | "") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(_) => Err(spec_error(PARAM, "must be true or false")),
    }
}

/// The database user name Cloud SQL gives an IAM account, from the email (a name already in
/// that form is kept).
pub fn database_user(engine: Engine, username: &str) -> Result<String> {
    let username = username.trim();
    if username.is_empty() {
        return Err(spec_error(
            "username",
            "is needed with enable_iam_auth: the IAM account's email (a service account's, or \
             its database user name)",
        ));
    }
    Ok(match engine {
        Engine::Postgres => username
            .strip_suffix(".gserviceaccount.com")
            .unwrap_or(username)
            .to_string(),
        Engine::MySql => username
            .split_once('@')
            .map_or(username, |(name, _)| name)
            .to_string(),
    })
}

/// Whether the token may cross this hop without TLS. It travels as a cleartext password (MySQL's
/// `mysql_clear_password`, PostgreSQL's password message), so it needs TLS, except to a local
/// port: the Cloud SQL Auth Proxy's, which encrypts onward.
pub fn plaintext_allowed(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A database's TLS modes, as a token login sees them.
pub struct TlsModes {
    /// The field a default is set in.
    pub field: &'static str,
    /// What a token login uses when the config names no mode.
    pub default: &'static str,
    /// The modes that may connect without TLS (compared ignoring case).
    pub plain: &'static [&'static str],
    /// The modes a token login takes, for the error.
    pub allowed: &'static str,
}

pub const POSTGRES_TLS: TlsModes = TlsModes {
    field: "sslmode",
    default: "require",
    plain: &["disable", "allow", "prefer"],
    allowed: "require, verify-ca or verify-full",
};

pub const MYSQL_TLS: TlsModes = TlsModes {
    field: "ssl_mode",
    default: "REQUIRED",
    plain: &["DISABLED", "DISABLE", "PREFERRED", "PREFER"],
    allowed: "REQUIRED, VERIFY_CA or VERIFY_IDENTITY",
};

/// The TLS mode a token login needs on the hop to `host`, given the mode the config names in
/// `field` (if any): `Some(default)` to set, `None` to keep what is given (or TLS optional on
/// a local hop), an error for a mode that could send the token in clear.
pub fn tls_for_token(
    modes: &TlsModes,
    host: &str,
    field: &str,
    given: Option<&str>,
) -> Result<Option<&'static str>> {
    if plaintext_allowed(host) {
        return Ok(None);
    }
    match given {
        None => Ok(Some(modes.default)),
        Some(mode) if modes.plain.iter().any(|p| p.eq_ignore_ascii_case(mode)) => Err(spec_error(
            field,
            &format!(
                "{mode:?} could send the IAM access token in clear: with enable_iam_auth it \
                 must be {} (or the host a local Cloud SQL Auth Proxy port)",
                modes.allowed
            ),
        )),
        Some(_) => Ok(None),
    }
}

/// What a refused IAM login means, for the error that names the host.
pub fn refused(user: &str, target: &str, server_says: &str) -> Error {
    Error::Source(format!(
        "IAM database authentication as {user} at {target} was refused ({server_says}): the \
         access token was not accepted: an expired or revoked token, an account without \
         roles/cloudsql.instanceUser, a user name that is not the account's database user, or an \
         instance without the cloudsql.iam_authentication flag"
    ))
}

/// The connecting identity's current login token.
pub async fn login_token() -> Result<String> {
    static CREDENTIALS: OnceLock<
        std::result::Result<google_cloud_auth::credentials::AccessTokenCredentials, String>,
    > = OnceLock::new();
    // Built once per process: its token cache refreshes in the background.
    let credentials = CREDENTIALS
        .get_or_init(|| {
            google_cloud_auth::credentials::Builder::default()
                .with_scopes([LOGIN_SCOPE])
                .build_access_token_credentials()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| {
            Error::Source(format!(
                "enable_iam_auth: no Google credentials to log in with: {e}"
            ))
        })?;
    match tokio::time::timeout(TOKEN_WAIT, credentials.access_token()).await {
        Ok(Ok(token)) => Ok(token.token),
        Ok(Err(e)) if !e.is_transient() => Err(Error::Source(format!(
            "enable_iam_auth: the identity's access token could not be had: {e}"
        ))),
        Ok(Err(e)) => Err(Error::Database(format!(
            "enable_iam_auth: getting an access token: {e}"
        ))),
        Err(_) => Err(Error::Database(format!(
            "enable_iam_auth: no access token from the metadata server within {}s",
            TOKEN_WAIT.as_secs()
        ))),
    }
}

fn spec_error(field: &str, problem: &str) -> Error {
    Error::Spec(crate::spec::SpecError::single(
        &format!("connection_params.{field}"),
        problem,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_users_follow_cloud_sql_naming() {
        let sa = "loader@my-proj.iam.gserviceaccount.com";
        assert_eq!(
            database_user(Engine::Postgres, sa).unwrap(),
            "loader@my-proj.iam"
        );
        assert_eq!(database_user(Engine::MySql, sa).unwrap(), "loader");
        // A user account: PostgreSQL keeps the email, MySQL the part before the @.
        assert_eq!(
            database_user(Engine::Postgres, "ana@example.com").unwrap(),
            "ana@example.com"
        );
        assert_eq!(
            database_user(Engine::MySql, "ana@example.com").unwrap(),
            "ana"
        );
        // Already the database user name: kept.
        assert_eq!(
            database_user(Engine::Postgres, "loader@my-proj.iam").unwrap(),
            "loader@my-proj.iam"
        );
        assert_eq!(database_user(Engine::MySql, "loader").unwrap(), "loader");
        let err = database_user(Engine::MySql, " ").unwrap_err().to_string();
        assert!(err.contains("connection_params.username"), "{err}");
    }

    #[test]
    fn the_flag_is_a_boolean() {
        assert!(!wanted(None).unwrap());
        assert!(wanted(Some("true")).unwrap());
        assert!(wanted(Some("True")).unwrap());
        assert!(!wanted(Some("false")).unwrap());
        let err = wanted(Some("yes please")).unwrap_err().to_string();
        assert!(err.contains("connection_params.enable_iam_auth"), "{err}");
        assert!(!err.contains("please"), "{err}");
    }

    #[test]
    fn token_logins_need_tls_off_the_local_host() {
        let remote = "10.0.0.5";
        assert_eq!(
            tls_for_token(&POSTGRES_TLS, remote, "sslmode", None).unwrap(),
            Some("require")
        );
        assert_eq!(
            tls_for_token(&MYSQL_TLS, remote, "ssl_mode", None).unwrap(),
            Some("REQUIRED")
        );
        assert_eq!(
            tls_for_token(&POSTGRES_TLS, remote, "sslmode", Some("verify-full")).unwrap(),
            None
        );
        for (modes, field, plain) in [
            (&POSTGRES_TLS, "sslmode", "prefer"),
            (&MYSQL_TLS, "sslmode", "preferred"),
            (&MYSQL_TLS, "ssl_mode", "DISABLED"),
        ] {
            let err = tls_for_token(modes, remote, field, Some(plain))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("connection_params.{field}")) && err.contains(modes.allowed),
                "{err}"
            );
        }
        // The Auth Proxy's local port: the config's mode (even none) stands.
        assert_eq!(
            tls_for_token(&POSTGRES_TLS, "127.0.0.1", "sslmode", Some("disable")).unwrap(),
            None
        );
        assert_eq!(
            tls_for_token(&MYSQL_TLS, "localhost", "ssl_mode", None).unwrap(),
            None
        );
    }

    #[test]
    fn only_local_hops_may_carry_the_token_in_clear() {
        for local in ["localhost", "127.0.0.1", "::1", "[::1]", "127.0.0.2"] {
            assert!(plaintext_allowed(local), "{local}");
        }
        for remote in [
            "10.0.0.3",
            "db.example.com",
            "34.1.2.3",
            "localhost.example.com",
        ] {
            assert!(!plaintext_allowed(remote), "{remote}");
        }
    }
}
