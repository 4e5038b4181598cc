//! `connection_params` and the secrets in them: read by hand so no error quotes a value.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A password, token or key. `Debug`, `Display` and `Serialize` all print `***`. Any JSON
/// value is taken: a service-account key may arrive as an object rather than as its text.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Secret::from_json(serde_json::Value::deserialize(d)?))
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// As the deserializer takes it: text as it is, null as empty, anything else as its JSON.
    pub fn from_json(value: serde_json::Value) -> Self {
        Secret(match value {
            serde_json::Value::String(text) => text,
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        })
    }
    /// The clear text, for handing to a driver. Never format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A number Django may send as `5432` or `"5432"`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum NumberOrString {
    Number(u64),
    Text(String),
}

impl NumberOrString {
    /// Any number or text, kept for `JobSpec::validate` to check and name its field (serde's
    /// untagged enum said only "data did not match any variant" for `-1`); `None` for
    /// anything else.
    fn from_json(value: serde_json::Value) -> Option<Self> {
        match value {
            serde_json::Value::Number(n) => Some(match n.as_u64() {
                Some(n) => NumberOrString::Number(n),
                None => NumberOrString::Text(n.to_string()),
            }),
            serde_json::Value::String(text) => Some(NumberOrString::Text(text)),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for NumberOrString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        NumberOrString::from_json(serde_json::Value::deserialize(d)?)
            .ok_or_else(|| serde::de::Error::custom("must be a whole number (or its text)"))
    }
}

/// `connection_params` as Django stores them: an object, or a connection URL
/// (`postgresql://user:password@host:port/database?sslmode=require`, `mysql://…`). Keys we do
/// not model (TLS settings, file credentials and the like) are kept in `other`; every value
/// there is treated as a secret. Read by hand, not by serde's derive: serde's errors quote the
/// value they could not take, and a value here may be a password.
#[derive(Clone, Default, Serialize)]
pub struct ConnectionParams {
    pub host: Option<String>,
    pub port: Option<NumberOrString>,
    pub database: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Secret>,
}

impl<'de> Deserialize<'de> for ConnectionParams {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ConnectionParams::from_value(serde_json::Value::deserialize(d)?)
            .map_err(serde::de::Error::custom)
    }
}

impl ConnectionParams {
    /// The params from their JSON; an error names the field and never quotes a value.
    pub fn from_value(value: serde_json::Value) -> Result<Self, String> {
        use serde_json::Value;
        let map = match value {
            Value::Null => return Ok(Self::default()),
            Value::String(url) => return Self::from_url(&url),
            Value::Object(map) => map,
            _ => {
                return Err("connection_params must be an object or a connection URL".into());
            }
        };
        let text = |field: &str, value: Value| match value {
            Value::Null => Ok(None),
            Value::String(t) => Ok(Some(t)),
            Value::Number(n) => Ok(Some(n.to_string())),
            _ => Err(format!("connection_params.{field} must be text")),
        };
        let mut params = Self::default();
        for (field, value) in map {
            match field.as_str() {
                "host" => params.host = text("host", value)?,
                "database" => params.database = text("database", value)?,
                "username" | "user" => params.username = text(&field, value)?,
                // Checked with the other fields in `JobSpec::validate`.
                "port" if value.is_null() => params.port = None,
                "port" => {
                    params.port =
                        Some(NumberOrString::from_json(value).ok_or(
                            "connection_params.port must be a port number from 1 to 65535",
                        )?);
                }
                "password" => params.password = Some(Secret::from_json(value)),
                _ => {
                    params.other.insert(field, Secret::from_json(value));
                }
            }
        }
        // A URL where a host name belongs would be printed as the host in every error.
        if params
            .host
            .as_deref()
            .is_some_and(|h| h.contains("://") || h.contains('@'))
        {
            return Err(
                "connection_params.host holds a connection URL or credentials: give the \
                        URL as connection_params itself, or host, port, database, username and \
                        password as their own fields"
                    .into(),
            );
        }
        Ok(params)
    }

    /// `scheme://user:password@host:port/database?key=value`, percent-encoded as URLs are.
    fn from_url(url: &str) -> Result<Self, String> {
        const PROBLEM: &str = "connection_params is text but not a connection URL \
                               (postgresql://user:password@host:port/database, mysql://…)";
        let parsed = reqwest::Url::parse(url).map_err(|_| PROBLEM)?;
        if !matches!(
            parsed.scheme(),
            "postgres" | "postgresql" | "mysql" | "mariadb"
        ) {
            return Err(PROBLEM.into());
        }
        let decoded = |part: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| "connection_params: the URL's percent-encoding is not UTF-8")
        };
        let mut params = Self {
            host: parsed
                .host_str()
                .map(|h| h.trim_matches(['[', ']']).to_string()),
            port: parsed.port().map(|p| NumberOrString::Number(p.into())),
            ..Self::default()
        };
        if !parsed.username().is_empty() {
            params.username = Some(decoded(parsed.username())?);
        }
        if let Some(password) = parsed.password() {
            params.password = Some(Secret::new(decoded(password)?));
        }
        let database = decoded(parsed.path().trim_start_matches('/'))?;
        if !database.is_empty() {
            params.database = Some(database);
        }
        for (key, value) in parsed.query_pairs() {
            params
                .other
                .insert(key.into_owned(), Secret::new(value.into_owned()));
        }
        Ok(params)
    }
}

impl fmt::Debug for ConnectionParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("other", &self.other.keys().collect::<Vec<_>>())
            .finish()
    }
}
