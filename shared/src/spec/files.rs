//! A file source's settings: where its files are and how they are read.

use serde::{Deserialize, Serialize};

use super::BigQueryField;

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
