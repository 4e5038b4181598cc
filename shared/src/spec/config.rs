//! The job config as Django sends it, field for field, before validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

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
