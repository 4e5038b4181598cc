//! Secrets by reference: a `connection_params` value `secretmanager://projects/P/secrets/S/
//! versions/V` is read from Secret Manager by the process that connects, when it connects, so a
//! job config need carry no password. The value is kept in memory for the connector's life (a
//! run's shard), and never printed.
//!
//! The request is Secret Manager's `versions.access`: `GET https://secretmanager.googleapis.com
//! /v1/{name=projects/*/secrets/*/versions/*}:access`, answered with `{"name": …, "payload":
//! {"data": <base64>, "dataCrc32c": …}}`. `SHARDFLOW_SECRET_MANAGER_ENDPOINT` points it at a
//! stand-in (the tests'), which is asked without credentials.

use base64::Engine as _;

use crate::{Error, Result};

const SCHEME: &str = "secretmanager://";
const PRODUCTION_ENDPOINT: &str = "https://secretmanager.googleapis.com";
pub const ENDPOINT_ENV: &str = "SHARDFLOW_SECRET_MANAGER_ENDPOINT";
/// `versions.access` needs `roles/secretmanager.secretAccessor`; the token's scope is
/// cloud-platform, as for the other Google APIs.
const OAUTH_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Whether a value names a secret rather than being one.
pub fn is_reference(value: &str) -> bool {
    value.starts_with(SCHEME)
}

/// The resource name of a reference, checked to be `projects/P/secrets/S/versions/V` with
/// plain segments (it goes into a URL path).
fn resource_name(reference: &str) -> Result<&str> {
    let name = reference.strip_prefix(SCHEME).unwrap_or(reference);
    let parts: Vec<&str> = name.split('/').collect();
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let shaped = parts.len() == 6
        && parts[0] == "projects"
        && parts[2] == "secrets"
        && parts[4] == "versions"
        && [parts[1], parts[3], parts[5]].iter().all(|s| plain(s));
    if !shaped {
        return Err(Error::Spec(crate::spec::SpecError::single(
            "connection_params",
            "a secretmanager:// reference must be secretmanager://projects/P/secrets/S/versions/V",
        )));
    }
    Ok(name)
}

/// Reads the secret a reference names.
pub async fn resolve(reference: &str) -> Result<String> {
    let endpoint = std::env::var(ENDPOINT_ENV).ok();
    resolve_at(reference, endpoint.as_deref()).await
}

/// Reads the secret from Secret Manager at `endpoint` (a stand-in, asked without
/// credentials), or from the production endpoint with Google credentials when `None`.
async fn resolve_at(reference: &str, endpoint: Option<&str>) -> Result<String> {
    let name = resource_name(reference)?;
    let base = endpoint.unwrap_or(PRODUCTION_ENDPOINT);
    let peer = format!("Secret Manager at {base}");
    let mut request = reqwest::Client::new().get(format!("{base}/v1/{name}:access"));
    if endpoint.is_none() {
        let credentials = google_cloud_auth::credentials::Builder::default()
            .with_scopes([OAUTH_SCOPE])
            .build_access_token_credentials()
            .map_err(|e| Error::Source(format!("no Google credentials for Secret Manager: {e}")))?;
        let token = credentials
            .access_token()
            .await
            .map_err(|e| Error::Database(format!("a token for Secret Manager: {e}")))?;
        request = request.bearer_auth(token.token);
    }
    let response = request.send().await.map_err(|e| {
        Error::Database(format!(
            "reading secret {name} from {peer}: {}",
            crate::net::cause(&e)
        ))
    })?;
    let status = response.status();
    if !status.is_success() {
        let why = match status.as_u16() {
            404 => "no such secret or version".to_string(),
            403 => "permission denied: the identity that connects needs \
                    roles/secretmanager.secretAccessor on it"
                .to_string(),
            _ => {
                let body = response.text().await.unwrap_or_default();
                match crate::net::first_line(&body) {
                    first if first.is_empty() => format!("answered {status}"),
                    first => format!("answered {status}: {first}"),
                }
            }
        };
        let text = format!("reading secret {name} from {peer}: {why}");
        // Not found or not allowed: the same answer every time.
        return Err(if matches!(status.as_u16(), 400 | 403 | 404) {
            Error::Source(text)
        } else {
            Error::Database(text)
        });
    }
    let body: serde_json::Value = response.json().await.map_err(|e| {
        Error::Database(format!(
            "reading secret {name} from {peer}: {}",
            crate::net::cause(&e)
        ))
    })?;
    let data = body["payload"]["data"].as_str().ok_or_else(|| {
        Error::Source(format!(
            "Secret Manager's answer for {name} has no payload.data"
        ))
    })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| Error::Source(format!("the secret {name} is not base64 in the answer")))?;
    String::from_utf8(bytes)
        .map_err(|_| Error::Source(format!("the secret {name} is not UTF-8 text")))
}

/// How long a process keeps a secret it read: a run's shards on one worker (and the
/// dispatcher's planning) ask Secret Manager once, not once per connection, and a rotated
/// `versions/latest` is seen within this time. Failures are not kept.
const CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(600);

async fn cached_resolve(reference: &str) -> Result<String> {
    type Cache = std::collections::HashMap<String, (String, std::time::Instant)>;
    static CACHE: std::sync::LazyLock<std::sync::Mutex<Cache>> =
        std::sync::LazyLock::new(Default::default);
    let fresh = |cache: &Cache| {
        cache
            .get(reference)
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(value, _)| value.clone())
    };
    if let Some(value) = CACHE.lock().ok().and_then(|c| fresh(&c)) {
        return Ok(value);
    }
    let value = resolve(reference).await?;
    if let Ok(mut cache) = CACHE.lock() {
        cache.insert(
            reference.to_string(),
            (value.clone(), std::time::Instant::now()),
        );
    }
    Ok(value)
}

/// The `connection_params` fields that may be a `secretmanager://` reference: the password and
/// the TLS material, PostgreSQL's and MySQL's names (a client key is as secret as a password;
/// its certificate and the CA travel with it). Any other field holding a reference is refused:
/// a host or a database name read from Secret Manager would be a surprise, not a feature.
pub const SECRET_FIELDS: [&str; 7] = [
    "password",
    "sslkey",
    "sslcert",
    "sslrootcert",
    "ssl_key",
    "ssl_cert",
    "ssl_ca",
];

/// The extra `connection_params` of a source (its TLS settings), any secret field of which may
/// be a reference. The references are read together, once, when the connector first connects.
#[derive(Clone, Debug, Default)]
pub struct SecretParams {
    values: std::collections::BTreeMap<String, LazySecret>,
}

impl SecretParams {
    pub fn new(params: &std::collections::BTreeMap<String, crate::spec::Secret>) -> Result<Self> {
        let mut values = std::collections::BTreeMap::new();
        for (field, value) in params {
            let value = value.expose();
            if is_reference(value) && !SECRET_FIELDS.contains(&field.as_str()) {
                return Err(Error::Spec(crate::spec::SpecError::single(
                    &format!("connection_params.{field}"),
                    format!(
                        "only {} may be a secretmanager:// reference",
                        SECRET_FIELDS.join(", ")
                    ),
                )));
            }
            values.insert(field.clone(), LazySecret::new(value)?);
        }
        Ok(Self { values })
    }

    /// Whether any value must be read from Secret Manager before it can be used.
    pub fn has_references(&self) -> bool {
        self.values.values().any(LazySecret::is_reference)
    }

    /// A value given in the config itself (a reference is not its value: `None`).
    pub fn given(&self, field: &str) -> Option<String> {
        self.values
            .get(field)
            .filter(|v| !v.is_reference())
            .map(|v| v.value.clone())
    }

    /// The same, with one field set to a value of the connector's choosing.
    pub fn with(mut self, field: &str, value: &str) -> Self {
        self.values.insert(
            field.to_string(),
            LazySecret {
                value: value.to_string(),
                resolved: Default::default(),
            },
        );
        self
    }

    /// Whether the field is set at all, as a value or a reference.
    pub fn contains(&self, field: &str) -> bool {
        self.values.contains_key(field)
    }

    /// Every value, references read from Secret Manager.
    pub async fn resolve(&self) -> Result<std::collections::BTreeMap<String, String>> {
        let mut resolved = std::collections::BTreeMap::new();
        for (field, value) in &self.values {
            resolved.insert(field.clone(), value.get().await?);
        }
        Ok(resolved)
    }
}

/// A secret that may be a reference, read once for the connector that holds it.
#[derive(Clone, Default)]
pub struct LazySecret {
    value: String,
    resolved: std::sync::Arc<tokio::sync::OnceCell<String>>,
}

impl std::fmt::Debug for LazySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LazySecret(***)")
    }
}

impl LazySecret {
    pub fn new(value: &str) -> Result<Self> {
        if is_reference(value) {
            resource_name(value)?;
        }
        Ok(Self {
            value: value.to_string(),
            resolved: Default::default(),
        })
    }

    pub fn is_reference(&self) -> bool {
        is_reference(&self.value)
    }

    /// The value as given: the secret itself, or the reference.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The secret: the value itself, or what Secret Manager holds under it (asked once per
    /// process and `CACHE_TTL`; the connector keeps what it first got).
    pub async fn get(&self) -> Result<String> {
        if !self.is_reference() {
            return Ok(self.value.clone());
        }
        self.resolved
            .get_or_try_init(|| cached_resolve(&self.value))
            .await
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_checked_before_any_request() {
        assert!(is_reference(
            "secretmanager://projects/p/secrets/s/versions/1"
        ));
        assert!(!is_reference("hunter2"));
        assert_eq!(
            resource_name("secretmanager://projects/p-1/secrets/db_pass/versions/latest").unwrap(),
            "projects/p-1/secrets/db_pass/versions/latest"
        );
        for bad in [
            "secretmanager://projects/p/secrets/s",
            "secretmanager://projects/p/secrets/s/versions/1/../x",
            "secretmanager://projects/p/secrets/s?x/versions/1",
        ] {
            let err = LazySecret::new(bad).unwrap_err().to_string();
            assert!(
                err.contains("secretmanager://projects/P/secrets/S/versions/V"),
                "{err}"
            );
            assert!(
                !err.contains("../x") && !err.contains("?x"),
                "the value is not in the error: {err}"
            );
        }
    }

    #[test]
    fn only_secret_fields_may_be_references() {
        let params = |field: &str, value: &str| {
            std::collections::BTreeMap::from([(field.to_string(), crate::spec::Secret::new(value))])
        };
        let reference = "secretmanager://projects/p/secrets/client-key/versions/2";
        let tls = SecretParams::new(&params("sslkey", reference)).unwrap();
        assert!(tls.has_references());
        assert!(tls.contains("sslkey"));
        assert_eq!(tls.given("sslkey"), None, "a reference is not the key");
        let plain = SecretParams::new(&params("sslmode", "require")).unwrap();
        assert!(!plain.has_references());
        assert_eq!(plain.given("sslmode").as_deref(), Some("require"));
        let err = SecretParams::new(&params("sslmode", reference))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("connection_params.sslmode")
                && err.contains(
                    "only password, sslkey, sslcert, sslrootcert, ssl_key, ssl_cert, ssl_ca may be"
                ),
            "{err}"
        );
    }

    const REFERENCE: &str = "secretmanager://projects/p/secrets/s/versions/1";

    #[tokio::test]
    async fn an_unreachable_secret_manager_is_named_with_the_cause() {
        let port = crate::net::closed_port();
        let base = format!("http://127.0.0.1:{port}");
        let err = resolve_at(REFERENCE, Some(&base)).await.unwrap_err();
        assert!(
            !err.is_deterministic(),
            "a peer that is not there may come back: {err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "source database error: reading secret projects/p/secrets/s/versions/1 from \
                 Secret Manager at {base}: connection refused (nothing listens there)"
            )
        );
    }

    #[tokio::test]
    async fn a_failing_answer_gives_its_status_and_first_line() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let serve = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await.unwrap();
            let body = "\n  quota exceeded for secretmanager.googleapis.com\nmore detail\n";
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(answer.as_bytes()).await.unwrap();
        });
        let err = resolve_at(REFERENCE, Some(&base)).await.unwrap_err();
        serve.await.unwrap();
        assert!(!err.is_deterministic(), "a 503 may pass: {err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "source database error: reading secret projects/p/secrets/s/versions/1 from \
                 Secret Manager at {base}: answered 503 Service Unavailable: quota exceeded \
                 for secretmanager.googleapis.com"
            )
        );
    }
}
