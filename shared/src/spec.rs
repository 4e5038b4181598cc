//! The job spec: the job-config JSON the Django app serves (and Cloud Scheduler or Django may
//! inline in a job message), parsed with serde and validated into typed form.
//!
//! Parsing keeps the Django field names and accepts what Django sends (numbers as strings,
//! nulls for absent values, fields we do not use yet). Validation collects every problem, each
//! naming its field, so a bad job is fixed in one round trip. Secrets are wrapped in [`Secret`],
//! which never prints or serialises its content.

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

/// A column of `bigquery_schema` as the Django wizard stores it.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct BigQueryField {
    pub name: String,
    #[serde(alias = "type")]
    pub bigquery_type: String,
    #[serde(default)]
    pub bigquery_mode: Option<String>,
}

/// The job-config JSON exactly as Django serves it. Use [`JobSpec::from_json`] to get a
/// validated spec.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct JobConfig {
    #[serde(default)]
    pub data_source_id: Option<i64>,
    #[serde(default)]
    pub source_type: Option<String>,
    #[serde(default)]
    pub connection_params: ConnectionParams,
    #[serde(default)]
    pub source_table_name: Option<String>,
    #[serde(default)]
    pub schema_name: Option<String>,
    #[serde(default)]
    pub dest_table_name: Option<String>,
    #[serde(default)]
    pub load_type: Option<String>,
    #[serde(default)]
    pub timestamp_column: Option<String>,
    #[serde(default)]
    pub selected_columns: Option<Vec<String>>,
    #[serde(default)]
    pub merge_keys: Option<Vec<String>>,
    /// Seconds (a number) or `"<n> seconds|minutes|hours|days"`.
    #[serde(default)]
    pub lookback: Option<serde_json::Value>,
    #[serde(default)]
    pub last_sync_value: Option<serde_json::Value>,
    #[serde(default)]
    pub historical_start_date: Option<String>,
    #[serde(default)]
    pub processing_mode: Option<String>,
    #[serde(default)]
    pub row_count_threshold: Option<NumberOrString>,
    #[serde(default)]
    pub is_file_based: Option<bool>,
    #[serde(default)]
    pub file_path_prefix: Option<String>,
    #[serde(default)]
    pub file_pattern: Option<String>,
    #[serde(default)]
    pub file_format: Option<String>,
    #[serde(default)]
    pub file_format_options: Option<serde_json::Value>,
    #[serde(default)]
    pub load_latest_only: Option<bool>,
    #[serde(default)]
    pub schema_fingerprint: Option<String>,
    #[serde(default)]
    pub bigquery_schema: Option<Vec<BigQueryField>>,
    /// File sources: what a run does when the files' columns differ from the job's schema.
    #[serde(default)]
    pub schema_policy: Option<String>,
    /// Fields shardflow does not know, kept to warn about: a typo'd `load_typ` would otherwise
    /// run a catalog load without a word.
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// The fields of [`JobConfig`], to tell a typo from a field that is not ours.
const KNOWN_FIELDS: [&str; 24] = [
    "data_source_id",
    "source_type",
    "connection_params",
    "source_table_name",
    "schema_name",
    "dest_table_name",
    "load_type",
    "timestamp_column",
    "selected_columns",
    "merge_keys",
    "lookback",
    "last_sync_value",
    "historical_start_date",
    "processing_mode",
    "row_count_threshold",
    "is_file_based",
    "file_path_prefix",
    "file_pattern",
    "file_format",
    "file_format_options",
    "load_latest_only",
    "schema_fingerprint",
    "bigquery_schema",
    "schema_policy",
];

/// The warning for a field shardflow ignores, naming the known field it most resembles.
pub fn unknown_field_warning(field: &str) -> String {
    let closest = KNOWN_FIELDS
        .iter()
        .map(|known| (strsim::jaro_winkler(field, known), *known))
        .filter(|(score, _)| *score >= 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match closest {
        Some((_, known)) => format!("unknown field {field:?} ignored (did you mean {known}?)"),
        None => format!("unknown field {field:?} ignored"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceType {
    Postgresql,
    Mysql,
    Gcs,
    S3,
    AzureBlob,
    Local,
}

impl SourceType {
    const NAMES: &'static str = "postgresql, mysql, gcs, s3, azure_blob, local";

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "postgresql" | "postgres" => SourceType::Postgresql,
            "mysql" | "mariadb" => SourceType::Mysql,
            "gcs" => SourceType::Gcs,
            "s3" => SourceType::S3,
            "azure_blob" => SourceType::AzureBlob,
            "local" => SourceType::Local,
            _ => return None,
        })
    }

    pub fn is_file_source(self) -> bool {
        matches!(
            self,
            SourceType::Gcs | SourceType::S3 | SourceType::AzureBlob | SourceType::Local
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadType {
    /// Full snapshot: the destination is replaced atomically.
    Catalog,
    /// Incremental: rows newer than `last_sync_value` are appended.
    Transactional,
    /// Incremental upsert: rows changed since `last_sync_value` replace the destination's
    /// rows of the same `merge_keys`; new keys are inserted.
    Merge,
}

impl LoadType {
    /// Reads a window of `timestamp_column` rather than the whole table.
    pub fn is_incremental(self) -> bool {
        matches!(self, LoadType::Transactional | LoadType::Merge)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingMode {
    /// Shard when the estimate reaches `row_count_threshold`.
    Auto,
    /// Always one shard.
    Standard,
    /// Always sharded across the fleet (the name Django uses).
    Dataflow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    Csv,
    Parquet,
    Json,
}

/// Where the file source finds its files and how it reads them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileSpec {
    pub path_prefix: String,
    pub pattern: String,
    pub format: FileFormat,
    pub options: FileOptions,
    pub load_latest_only: bool,
    pub schema_fingerprint: Option<String>,
    pub bigquery_schema: Option<Vec<BigQueryField>>,
    pub schema_policy: SchemaPolicy,
}

/// What a run does when a file's columns differ from the job's schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaPolicy {
    /// Fail before loading anything, naming the added, removed and changed columns.
    Fail,
    /// New columns are added to the destination (nullable); removed ones load as NULL.
    AddColumns,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextEncoding {
    Utf8,
    /// ISO-8859-1 (`latin-1`, `latin1`, `iso-8859-1`): every byte is the code point.
    Latin1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// From the file name: `.gz` is gzip, `.zst` zstd, anything else plain.
    Auto,
    None,
    Gzip,
    Zstd,
}

/// `file_format_options`, checked. CSV takes `delimiter` (`,` `|` `\t` `;`), `quote`,
/// `has_header` and `encoding`; every format takes `compression`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOptions {
    pub delimiter: u8,
    pub quote: u8,
    pub has_header: bool,
    pub encoding: TextEncoding,
    pub compression: Compression,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            delimiter: b',',
            quote: b'"',
            has_header: true,
            encoding: TextEncoding::Utf8,
            compression: Compression::Auto,
        }
    }
}

impl FileOptions {
    /// Reads `file_format_options`; each problem names its option.
    pub fn from_json(value: &serde_json::Value) -> Result<FileOptions, Vec<String>> {
        let mut options = FileOptions::default();
        let mut problems = Vec::new();
        let serde_json::Value::Object(map) = value else {
            if value.is_null() {
                return Ok(options);
            }
            return Err(vec![format!("must be an object, got {value}")]);
        };
        let text = |key: &str| map.get(key).and_then(|v| v.as_str());
        if let Some(d) = text("delimiter") {
            match d {
                "," | "|" | ";" => options.delimiter = d.as_bytes()[0],
                "\t" | "\\t" | "tab" => options.delimiter = b'\t',
                other => problems.push(format!(
                    "delimiter {other:?} is not supported (expected \",\", \"|\", \"\\t\" or \";\")"
                )),
            }
        }
        if let Some(q) = text("quote") {
            match q.as_bytes() {
                [b] if b.is_ascii() => options.quote = *b,
                _ => problems.push(format!("quote {q:?} must be one ASCII character")),
            }
        }
        match map.get("has_header") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Bool(b)) => options.has_header = *b,
            Some(serde_json::Value::String(s)) if s == "true" || s == "false" => {
                options.has_header = s == "true"
            }
            Some(other) => problems.push(format!("has_header must be true or false, got {other}")),
        }
        if let Some(e) = text("encoding") {
            match e.to_ascii_lowercase().replace('_', "-").as_str() {
                "utf-8" | "utf8" => options.encoding = TextEncoding::Utf8,
                "latin-1" | "latin1" | "iso-8859-1" | "iso8859-1" => {
                    options.encoding = TextEncoding::Latin1
                }
                _ => problems.push(format!(
                    "encoding {e:?} is not supported (expected utf-8, latin-1 or iso-8859-1)"
                )),
            }
        }
        if let Some(c) = text("compression") {
            options.compression = match c.to_ascii_lowercase().as_str() {
                "" | "auto" => Compression::Auto,
                "none" => Compression::None,
                "gzip" | "gz" => Compression::Gzip,
                "zstd" | "zst" => Compression::Zstd,
                _ => {
                    problems.push(format!(
                        "compression {c:?} is not supported (expected auto, none, gzip or zstd)"
                    ));
                    Compression::Auto
                }
            };
        }
        if problems.is_empty() {
            Ok(options)
        } else {
            Err(problems)
        }
    }
}

pub const DEFAULT_ROW_COUNT_THRESHOLD: u64 = 1_000_000;

/// `lookback`: a number of seconds, or `"<n> <unit>"` with unit seconds, minutes, hours or
/// days (singular or plural); null, 0 or "" mean none.
pub fn parse_lookback(value: &serde_json::Value) -> Result<Option<std::time::Duration>, String> {
    let seconds = match value {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("must be a whole number of seconds >= 0, got {n}"))?,
        serde_json::Value::String(text) if text.trim().is_empty() => return Ok(None),
        serde_json::Value::String(text) => {
            let bad =
                || format!("\"{text}\" is not like \"6 hours\" (seconds, minutes, hours or days)");
            let mut words = text.split_whitespace();
            let (Some(n), unit, None) = (words.next(), words.next(), words.next()) else {
                return Err(bad());
            };
            let n: u64 = n.parse().map_err(|_| bad())?;
            let scale = match unit.map(|u| u.to_ascii_lowercase()) {
                None => 1,
                Some(u) => match u.trim_end_matches('s') {
                    "second" | "sec" => 1,
                    "minute" | "min" => 60,
                    "hour" => 3600,
                    "day" => 86_400,
                    _ => return Err(bad()),
                },
            };
            n.checked_mul(scale).ok_or_else(bad)?
        }
        other => {
            return Err(format!(
                "must be seconds or text like \"6 hours\", got {other}"
            ));
        }
    };
    Ok((seconds > 0).then(|| std::time::Duration::from_secs(seconds)))
}

/// A validated job.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub data_source_id: Option<i64>,
    pub source_type: SourceType,
    pub connection: ConnectionParams,
    /// Source schema (`public` when absent for PostgreSQL).
    pub schema_name: String,
    /// Source table; empty for file sources.
    pub table_name: String,
    pub dest_table_name: String,
    pub load_type: LoadType,
    pub timestamp_column: Option<String>,
    /// `None` means every column of the table.
    pub selected_columns: Option<Vec<String>>,
    /// Merge mode: the columns that identify a row; `None` means the source's primary key.
    pub merge_keys: Option<Vec<String>>,
    /// Merge mode: how far before the watermark a run reads again (late-arriving rows).
    pub lookback: Option<std::time::Duration>,
    pub last_sync_value: Option<serde_json::Value>,
    pub historical_start_date: Option<String>,
    pub processing_mode: ProcessingMode,
    pub row_count_threshold: u64,
    pub files: Option<FileSpec>,
    /// What the config says that shardflow ignores (unknown fields), for the run's report.
    pub warnings: Vec<String>,
}

/// One problem with one field of the job config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: String,
    pub problem: String,
}

/// Everything wrong with a job config, each problem naming its field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub problems: Vec<FieldProblem>,
}

impl SpecError {
    pub fn single(field: &str, problem: impl Into<String>) -> Self {
        SpecError {
            problems: vec![FieldProblem {
                field: field.to_string(),
                problem: problem.into(),
            }],
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid job config: ")?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            // Problems that start with the field's own name read as a sentence already.
            if p.problem.starts_with(&p.field) {
                f.write_str(&p.problem)?;
            } else {
                write!(f, "{}: {}", p.field, p.problem)?;
            }
        }
        Ok(())
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl JobSpec {
    /// Parses and validates a job config. Syntax errors keep serde's position; every semantic
    /// problem is listed by field.
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        let config: JobConfig = serde_json::from_str(text)
            .map_err(|e| SpecError::single("job config", format!("not valid job JSON: {e}")))?;
        JobSpec::validate(config)
    }

    pub fn validate(config: JobConfig) -> Result<JobSpec, SpecError> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, text: String| {
            problems.push(FieldProblem {
                field: field.to_string(),
                problem: text,
            })
        };

        let source_type = match non_empty(&config.source_type) {
            None => {
                problem("source_type", "is required".into());
                None
            }
            Some(name) => match SourceType::parse(name) {
                Some(t) => Some(t),
                None => {
                    problem(
                        "source_type",
                        format!(
                            "source_type \"{name}\" is not supported (expected one of: {})",
                            SourceType::NAMES
                        ),
                    );
                    None
                }
            },
        };

        let load_type = match config.load_type.as_deref().map(str::trim) {
            None | Some("") | Some("catalog") => Some(LoadType::Catalog),
            Some("transactional") => Some(LoadType::Transactional),
            Some("merge") => Some(LoadType::Merge),
            Some(other) => {
                problem(
                    "load_type",
                    format!(
                        "load_type \"{other}\" is not supported (expected catalog, transactional or merge)"
                    ),
                );
                None
            }
        };
        let timestamp_column = non_empty(&config.timestamp_column).map(str::to_string);
        // A file job's increment is the files not loaded yet, not a column.
        let reads_files = config.is_file_based.unwrap_or(false)
            || source_type.is_some_and(SourceType::is_file_source);
        if let Some(lt @ (LoadType::Transactional | LoadType::Merge)) = load_type
            && timestamp_column.is_none()
            && !reads_files
        {
            let name = if lt == LoadType::Merge {
                "merge"
            } else {
                "transactional"
            };
            problem(
                "load_type",
                format!("load_type \"{name}\" needs timestamp_column"),
            );
        }
        let merge_keys = match &config.merge_keys {
            None => None,
            Some(keys) if keys.is_empty() => None,
            Some(keys) => {
                if load_type != Some(LoadType::Merge) {
                    problem("merge_keys", "is only used with load_type \"merge\"".into());
                }
                for (i, k) in keys.iter().enumerate() {
                    if k.trim().is_empty() {
                        problem("merge_keys", "contains an empty column name".into());
                    } else if keys[..i].contains(k) {
                        problem("merge_keys", format!("lists \"{k}\" twice"));
                    }
                }
                Some(keys.clone())
            }
        };
        let lookback = match config.lookback.as_ref().map(parse_lookback) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(d))) => {
                if load_type != Some(LoadType::Merge) {
                    problem(
                        "lookback",
                        "needs load_type \"merge\": an append would load the rows it reads again twice"
                            .into(),
                    );
                }
                Some(d)
            }
            Some(Err(why)) => {
                problem("lookback", why);
                None
            }
        };

        let processing_mode = match config.processing_mode.as_deref().map(str::trim) {
            None | Some("") | Some("auto") => Some(ProcessingMode::Auto),
            Some("standard") => Some(ProcessingMode::Standard),
            Some("dataflow") => Some(ProcessingMode::Dataflow),
            Some(other) => {
                problem(
                    "processing_mode",
                    format!(
                        "processing_mode \"{other}\" is not supported (expected auto, standard or dataflow)"
                    ),
                );
                None
            }
        };

        let row_count_threshold = match &config.row_count_threshold {
            None => DEFAULT_ROW_COUNT_THRESHOLD,
            Some(NumberOrString::Number(n)) => *n,
            Some(NumberOrString::Text(t)) => t.trim().parse().unwrap_or_else(|_| {
                problem(
                    "row_count_threshold",
                    format!("must be a whole number, got \"{t}\""),
                );
                DEFAULT_ROW_COUNT_THRESHOLD
            }),
        };
        if row_count_threshold == 0 {
            problem("row_count_threshold", "must be at least 1".into());
        }

        let dest_table_name = match non_empty(&config.dest_table_name) {
            None => {
                problem("dest_table_name", "is required".into());
                String::new()
            }
            Some(name) => {
                if let Err(why) = check_dest_table_name(name) {
                    problem("dest_table_name", why);
                }
                name.to_string()
            }
        };

        let selected_columns = match &config.selected_columns {
            None => None,
            Some(cols) if cols.is_empty() => None,
            Some(cols) => {
                let mut seen = std::collections::BTreeSet::new();
                for c in cols {
                    if c.trim().is_empty() {
                        problem("selected_columns", "contains an empty column name".into());
                    } else if !seen.insert(c.as_str()) {
                        problem("selected_columns", format!("lists \"{c}\" twice"));
                    }
                }
                Some(cols.clone())
            }
        };

        let is_file_based = config.is_file_based.unwrap_or(false)
            || source_type.is_some_and(SourceType::is_file_source);
        let mut files = None;
        let mut table_name = String::new();
        if is_file_based {
            let format = match config.file_format.as_deref().map(str::trim) {
                Some("csv") => Some(FileFormat::Csv),
                Some("parquet") => Some(FileFormat::Parquet),
                Some("json") | Some("jsonl") => Some(FileFormat::Json),
                None | Some("") => {
                    problem("file_format", "is required for file sources".into());
                    None
                }
                Some(other) => {
                    problem(
                        "file_format",
                        format!(
                            "file_format \"{other}\" is not supported (expected csv, parquet or json)"
                        ),
                    );
                    None
                }
            };
            let pattern = non_empty(&config.file_pattern);
            match pattern {
                None => problem("file_pattern", "is required for file sources".into()),
                Some(p) => {
                    if let Err(e) = globset::Glob::new(p) {
                        problem("file_pattern", format!("{p:?} is not a glob: {}", e.kind()));
                    }
                }
            }
            let options = match FileOptions::from_json(
                config
                    .file_format_options
                    .as_ref()
                    .unwrap_or(&serde_json::Value::Null),
            ) {
                Ok(o) => Some(o),
                Err(why) => {
                    why.into_iter()
                        .for_each(|w| problem("file_format_options", w));
                    None
                }
            };
            let schema_policy = match config.schema_policy.as_deref().map(str::trim) {
                None | Some("") | Some("fail") => Some(SchemaPolicy::Fail),
                Some("add_columns") => Some(SchemaPolicy::AddColumns),
                Some(other) => {
                    problem(
                        "schema_policy",
                        format!(
                            "schema_policy \"{other}\" is not supported (expected fail or add_columns)"
                        ),
                    );
                    None
                }
            };
            if source_type.is_some_and(|t| !t.is_file_source()) {
                problem(
                    "is_file_based",
                    "file jobs need source_type gcs, s3, azure_blob or local".into(),
                );
            }
            if matches!(load_type, Some(LoadType::Merge)) {
                problem(
                    "load_type",
                    "merge is not supported for file sources (catalog or transactional)".into(),
                );
            }
            if let (Some(format), Some(pattern), Some(options), Some(schema_policy)) =
                (format, pattern, options, schema_policy)
            {
                files = Some(FileSpec {
                    path_prefix: config.file_path_prefix.clone().unwrap_or_default(),
                    pattern: pattern.to_string(),
                    format,
                    options,
                    load_latest_only: config.load_latest_only.unwrap_or(true),
                    schema_fingerprint: non_empty(&config.schema_fingerprint).map(str::to_string),
                    bigquery_schema: config.bigquery_schema.clone().filter(|s| !s.is_empty()),
                    schema_policy,
                });
            }
        } else {
            match non_empty(&config.source_table_name) {
                None => problem("source_table_name", "is required".into()),
                Some(t) => table_name = t.to_string(),
            }
            let params = &config.connection_params;
            if non_empty(&params.host).is_none() {
                problem("connection_params.host", "is required".into());
            }
            if non_empty(&params.database).is_none() {
                problem("connection_params.database", "is required".into());
            }
            if non_empty(&params.username).is_none() {
                problem("connection_params.username", "is required".into());
            }
            // The value is not quoted: connection_params values stay out of every message.
            let port_ok = match &params.port {
                None => true,
                Some(NumberOrString::Number(p)) => (1..=65535).contains(p),
                Some(NumberOrString::Text(p)) => p.trim().parse::<u16>().is_ok_and(|p| p > 0),
            };
            if !port_ok {
                problem(
                    "connection_params.port",
                    "must be a port number from 1 to 65535".into(),
                );
            }
        }

        if !problems.is_empty() {
            return Err(SpecError { problems });
        }
        // Every Option below is Some when no problem was recorded.
        let (Some(source_type), Some(load_type), Some(processing_mode)) =
            (source_type, load_type, processing_mode)
        else {
            return Err(SpecError::single("job config", "incomplete"));
        };
        let schema_name = non_empty(&config.schema_name)
            .map(str::to_string)
            .unwrap_or_else(|| match source_type {
                SourceType::Postgresql => "public".to_string(),
                _ => config
                    .connection_params
                    .database
                    .clone()
                    .unwrap_or_default(),
            });
        Ok(JobSpec {
            data_source_id: config.data_source_id,
            source_type,
            connection: config.connection_params,
            schema_name,
            table_name,
            dest_table_name,
            load_type,
            timestamp_column,
            selected_columns,
            merge_keys,
            lookback,
            last_sync_value: config.last_sync_value,
            historical_start_date: non_empty(&config.historical_start_date).map(str::to_string),
            processing_mode,
            row_count_threshold,
            files,
            warnings: config
                .unknown
                .keys()
                .map(|field| unknown_field_warning(field))
                .collect(),
        })
    }

    /// `schema.table` for messages.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.schema_name, self.table_name)
    }

    pub fn port(&self, default: u16) -> u16 {
        match &self.connection.port {
            Some(NumberOrString::Number(p)) => u16::try_from(*p).unwrap_or(default),
            Some(NumberOrString::Text(p)) => p.trim().parse().unwrap_or(default),
            None => default,
        }
    }
}

/// BigQuery table names allow letters, digits, underscores and (with care) dashes and spaces;
/// shardflow also uses the name as a directory, so separators and dot names are refused.
fn check_dest_table_name(name: &str) -> Result<(), String> {
    if name.len() > 1024 {
        return Err("is longer than 1024 characters".into());
    }
    if name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(format!(
            "\"{name}\" is not a table name (no slashes, NUL or dot names)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "source_type": "postgresql",
            "connection_params": {"host": "db", "port": 5432, "database": "d", "username": "u", "password": "hunter2"},
            "source_table_name": "transactions",
            "schema_name": "public",
            "dest_table_name": "bq_transactions",
            "load_type": "catalog",
            "selected_columns": []
        })
    }

    fn parse(v: serde_json::Value) -> Result<JobSpec, SpecError> {
        JobSpec::from_json(&v.to_string())
    }

    #[test]
    fn seed_example_parses_with_every_field() {
        // The example from the ETL runner seed, plus the file and mode fields.
        let text = r#"{
          "source_type": "postgresql",
          "connection_params": {"host": "db.example.com", "port": "5432", "database": "mydb",
                                "username": "user", "password": "pass"},
          "source_table_name": "transactions", "schema_name": "public",
          "dest_table_name": "bq_transactions", "load_type": "transactional",
          "timestamp_column": "created_at", "selected_columns": ["id", "amount", "created_at"],
          "last_sync_value": "2024-01-01T00:00:00", "historical_start_date": "2023-01-01",
          "processing_mode": "dataflow", "row_count_threshold": 500000,
          "is_file_based": false, "file_path_prefix": "", "file_pattern": "", "file_format": "",
          "file_format_options": {}, "load_latest_only": true, "schema_fingerprint": "",
          "bigquery_schema": [{"name": "id", "bigquery_type": "INT64", "bigquery_mode": "REQUIRED"}]
        }"#;
        let spec = JobSpec::from_json(text).unwrap();
        assert_eq!(spec.source_type, SourceType::Postgresql);
        assert_eq!(spec.load_type, LoadType::Transactional);
        assert_eq!(spec.timestamp_column.as_deref(), Some("created_at"));
        assert_eq!(spec.processing_mode, ProcessingMode::Dataflow);
        assert_eq!(spec.row_count_threshold, 500_000);
        assert_eq!(spec.port(1), 5432);
        assert_eq!(
            spec.selected_columns,
            Some(vec!["id".into(), "amount".into(), "created_at".into()])
        );
        assert_eq!(spec.historical_start_date.as_deref(), Some("2023-01-01"));
        assert_eq!(spec.connection.password.as_ref().unwrap().expose(), "pass");
        assert!(spec.files.is_none());
    }

    #[test]
    fn defaults_apply() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("load_type");
        v.as_object_mut().unwrap().remove("schema_name");
        let spec = parse(v).unwrap();
        assert_eq!(spec.load_type, LoadType::Catalog);
        assert_eq!(spec.processing_mode, ProcessingMode::Auto);
        assert_eq!(spec.row_count_threshold, DEFAULT_ROW_COUNT_THRESHOLD);
        assert_eq!(spec.schema_name, "public");
        assert_eq!(
            spec.selected_columns, None,
            "empty selected_columns means all"
        );
    }

    #[test]
    fn transactional_needs_timestamp_column() {
        let mut v = base();
        v["load_type"] = "transactional".into();
        let err = parse(v).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid job config: load_type \"transactional\" needs timestamp_column"
        );
    }

    #[test]
    fn merge_takes_keys_and_a_lookback() {
        let mut v = base();
        v["load_type"] = "merge".into();
        assert_eq!(
            parse(v.clone()).unwrap_err().to_string(),
            "invalid job config: load_type \"merge\" needs timestamp_column"
        );
        v["timestamp_column"] = "updated_at".into();
        let spec = parse(v.clone()).unwrap();
        assert_eq!(spec.load_type, LoadType::Merge);
        assert!(spec.load_type.is_incremental());
        assert_eq!((spec.merge_keys, spec.lookback), (None, None));
        v["merge_keys"] = serde_json::json!(["region", "id"]);
        v["lookback"] = "2 hours".into();
        let spec = parse(v.clone()).unwrap();
        assert_eq!(spec.merge_keys, Some(vec!["region".into(), "id".into()]));
        assert_eq!(spec.lookback, Some(std::time::Duration::from_secs(7200)));

        v["merge_keys"] = serde_json::json!(["id", "id"]);
        v["lookback"] = "2 fortnights".into();
        let err = parse(v.clone()).unwrap_err().to_string();
        assert!(err.contains("merge_keys: lists \"id\" twice"), "{err}");
        assert!(
            err.contains("\"2 fortnights\" is not like \"6 hours\""),
            "{err}"
        );
        // A lookback would append rows twice; merge keys mean nothing to an append.
        v["load_type"] = "transactional".into();
        v["merge_keys"] = serde_json::json!(["id"]);
        v["lookback"] = 60.into();
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.contains("merge_keys: is only used with load_type \"merge\"")
                && err.contains("lookback: needs load_type \"merge\""),
            "{err}"
        );
    }

    #[test]
    fn lookback_forms() {
        use serde_json::json;
        let secs = |v: serde_json::Value| parse_lookback(&v).map(|d| d.map(|d| d.as_secs()));
        assert_eq!(secs(json!(90)), Ok(Some(90)));
        assert_eq!(secs(json!("90")), Ok(Some(90)));
        assert_eq!(secs(json!("1 day")), Ok(Some(86_400)));
        assert_eq!(secs(json!("3 Minutes")), Ok(Some(180)));
        assert_eq!(secs(json!("12 hours")), Ok(Some(43_200)));
        assert_eq!(secs(json!(0)), Ok(None));
        assert_eq!(secs(json!("")), Ok(None));
        assert_eq!(secs(json!(null)), Ok(None));
        assert!(secs(json!(-5)).is_err());
        assert!(secs(json!(1.5)).is_err());
        assert!(secs(json!("1 hour ago")).is_err());
        assert!(secs(json!([1])).is_err());
    }

    #[test]
    fn unknown_source_type_and_mode_are_named() {
        let mut v = base();
        v["source_type"] = "oracle".into();
        v["processing_mode"] = "turbo".into();
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.contains("source_type \"oracle\" is not supported (expected one of: postgresql, mysql, gcs, s3, azure_blob, local)"),
            "{err}"
        );
        assert!(
            err.contains(
                "processing_mode \"turbo\" is not supported (expected auto, standard or dataflow)"
            ),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_listed_by_field() {
        let v = serde_json::json!({"source_type": "postgresql", "load_type": "weekly"});
        let err = parse(v).unwrap_err();
        let fields: Vec<_> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "load_type",
                "dest_table_name",
                "source_table_name",
                "connection_params.host",
                "connection_params.database",
                "connection_params.username"
            ]
        );
    }

    #[test]
    fn connection_urls_become_fields() {
        let params = ConnectionParams::from_value(serde_json::json!(
            "postgresql://ana%40corp:p%2Fss%3Aword@[::1]:6432/sales%20db?sslmode=verify-full&sslrootcert=%2Fca.pem"
        ))
        .unwrap();
        assert_eq!(params.host.as_deref(), Some("::1"));
        assert_eq!(params.port, Some(NumberOrString::Number(6432)));
        assert_eq!(params.username.as_deref(), Some("ana@corp"));
        assert_eq!(
            params.password.as_ref().map(Secret::expose),
            Some("p/ss:word")
        );
        assert_eq!(params.database.as_deref(), Some("sales db"));
        assert_eq!(params.other["sslmode"].expose(), "verify-full");
        assert_eq!(params.other["sslrootcert"].expose(), "/ca.pem");
        let mysql = ConnectionParams::from_value(serde_json::json!("mysql://root@db")).unwrap();
        assert_eq!(
            (mysql.host.as_deref(), mysql.port, mysql.password.is_none()),
            (Some("db"), None, true)
        );
        for bad in [
            "http://u:hunter2@h/db",
            "postgresql://u:hunter2@[h/db",
            "host=h password=hunter2",
            "postgresql://u:%FF%FE@h/db",
        ] {
            let err = ConnectionParams::from_value(serde_json::json!(bad)).unwrap_err();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.starts_with("connection_params"), "{err}");
        }
    }

    #[test]
    fn unknown_fields_are_warned_about_with_the_field_they_resemble() {
        let mut v = base();
        v["load_typ"] = "transactional".into();
        v["dest_tabel_name"] = "x".into();
        v["created_by"] = "ana".into();
        let spec = parse(v).unwrap();
        assert_eq!(
            spec.warnings,
            [
                "unknown field \"created_by\" ignored",
                "unknown field \"dest_tabel_name\" ignored (did you mean dest_table_name?)",
                "unknown field \"load_typ\" ignored (did you mean load_type?)",
            ]
        );
        assert!(parse(base()).unwrap().warnings.is_empty());
    }

    #[test]
    fn bad_threshold_port_and_columns() {
        let mut v = base();
        v["row_count_threshold"] = (-1).into();
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.contains("row_count_threshold: must be a whole number, got \"-1\""),
            "the field is named: {err}"
        );
        let mut v = base();
        v["row_count_threshold"] = "lots".into();
        v["connection_params"]["port"] = "abc".into();
        v["selected_columns"] = serde_json::json!(["id", "id"]);
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.contains("row_count_threshold: must be a whole number, got \"lots\""),
            "{err}"
        );
        assert!(
            err.contains("connection_params.port: must be a port number from 1 to 65535"),
            "{err}"
        );
        assert!(!err.contains("abc"), "no connection value is quoted: {err}");
        assert!(
            err.contains("selected_columns: lists \"id\" twice"),
            "{err}"
        );
    }

    #[test]
    fn file_jobs_need_format_and_pattern() {
        let v = serde_json::json!({"source_type": "gcs", "dest_table_name": "t", "file_format": "xlsx"});
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.contains("file_format \"xlsx\" is not supported"),
            "{err}"
        );
        assert!(
            err.contains("file_pattern: is required for file sources"),
            "{err}"
        );
        let ok = serde_json::json!({"source_type": "gcs", "dest_table_name": "t", "file_format": "csv",
            "file_pattern": "transactions_*.csv", "file_path_prefix": "data/", "schema_fingerprint": "abc"});
        let files = parse(ok).unwrap().files.unwrap();
        assert_eq!(files.format, FileFormat::Csv);
        assert!(files.load_latest_only);
        assert_eq!(files.schema_fingerprint.as_deref(), Some("abc"));
    }

    #[test]
    fn secrets_never_print() {
        let mut v = base();
        v["connection_params"]["service_account_json"] = "{\"private_key\": \"KEY-123\"}".into();
        let spec = parse(v).unwrap();
        let debug = format!("{spec:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("KEY-123"),
            "{debug}"
        );
        let json = serde_json::to_string(&spec.connection).unwrap();
        assert!(
            !json.contains("hunter2") && !json.contains("KEY-123"),
            "{json}"
        );
        assert_eq!(format!("{}", Secret::new("x")), "***");
        // A parse error quotes the input position, not its content.
        let err =
            JobSpec::from_json("{\"connection_params\": {\"password\": \"hunter2\"").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn dest_table_name_cannot_escape_the_destination() {
        let mut v = base();
        v["dest_table_name"] = "../etc".into();
        assert!(
            parse(v)
                .unwrap_err()
                .to_string()
                .contains("is not a table name")
        );
    }
}
