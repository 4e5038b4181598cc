//! Planning a file job: list the matching files, leave out those the stream has loaded,
//! pick the newest or all, check each file's columns against the job's schema, estimate, and
//! group the files (or split a large Parquet file by row groups) into shards. Also what
//! `list-files` and `detect-schema` print.

use std::collections::HashSet;

use serde::Serialize;
use shardflow::plan::{self, FileEstimate, Mode};
use shardflow::source::file_schema::{self, DetectedSchema};
use shardflow::source::files::{self, FileInfo, FileLocation, FilePart};
use shardflow::source::postgres::{Estimate, Split};
use shardflow::source::{ShardBounds, SourceColumn};
use shardflow::spec::{JobSpec, SchemaPolicy};
use shardflow::{Error, Result};

use crate::{PlanOptions, StreamState};

/// Bytes of each file past the newest one that the drift check reads.
const CHECK_BYTES: usize = 256 * 1024;

/// What the plan says about the files.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FilesPlan {
    /// Files matching the prefix and pattern.
    pub listed: usize,
    /// Of those, files this stream loaded before (same generation or ETag).
    pub already_loaded: usize,
    /// Files this run reads, oldest first.
    pub selected: Vec<String>,
    pub load_latest_only: bool,
    /// Where the columns came from: `bigquery_schema`, or detection from a file.
    pub schema_from: String,
    /// The seed's fingerprint of the columns loaded.
    pub schema_fingerprint: String,
    /// Columns added to the destination under `schema_policy: "add_columns"`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub added_columns: Vec<String>,
}

/// A file job's survey: columns, estimate and shards.
pub(crate) struct FileSurvey {
    pub columns: Vec<SourceColumn>,
    pub estimate: Estimate,
    pub split: Split,
    pub files: FilesPlan,
}

/// `list-files`: the Django endpoint's response.
#[derive(Serialize)]
pub struct FileListing {
    pub status: &'static str,
    pub files: Vec<ListedFile>,
    pub count: usize,
    pub prefix: String,
    pub pattern: String,
}

#[derive(Serialize)]
pub struct ListedFile {
    pub name: String,
    pub size: u64,
    /// `YYYY-MM-DD HH:MM:SS` UTC, as the seed prints it.
    pub last_modified: String,
}

pub async fn list_files(spec: &JobSpec) -> Result<FileListing> {
    let location = FileLocation::open(spec)?;
    let files = location.list().await?;
    Ok(FileListing {
        status: "success",
        count: files.len(),
        files: files
            .into_iter()
            .map(|f| ListedFile {
                name: f.path,
                size: f.size,
                last_modified: f.last_modified.format("%Y-%m-%d %H:%M:%S").to_string(),
            })
            .collect(),
        prefix: location.spec.path_prefix.clone(),
        pattern: location.spec.pattern.clone(),
    })
}

/// `detect-schema`: the newest matching file's columns, as the Django endpoint answers.
pub async fn detect_schema(spec: &JobSpec) -> Result<serde_json::Value> {
    let location = FileLocation::open(spec)?;
    let files = location.list().await?;
    let newest = files.first().ok_or_else(|| no_files(&location))?;
    let detected = file_schema::detect(&location, newest, files::SAMPLE_BYTES).await?;
    let mut value = serde_json::to_value(&detected)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("status".into(), "success".into());
    }
    Ok(value)
}

fn no_files(location: &FileLocation) -> Error {
    Error::Source(format!(
        "no file under {}/{} matches {:?}",
        location.root(),
        location
            .spec
            .path_prefix
            .trim_start_matches(location.root()),
        location.spec.pattern
    ))
}

pub(crate) async fn survey_files(
    spec: &JobSpec,
    opts: &PlanOptions,
    stream: &StreamState,
) -> Result<FileSurvey> {
    let location = FileLocation::open(spec)?;
    let listed = location.list().await?;
    let loaded: HashSet<(&str, &str)> = stream
        .processed_files
        .iter()
        .map(|p| (p.path.as_str(), p.version.as_str()))
        .collect();
    let fresh: Vec<&FileInfo> = listed
        .iter()
        .filter(|f| !loaded.contains(&(f.path.as_str(), f.version_key().as_str())))
        .collect();
    let spec_files = &location.spec;
    // Newest first as listed; read oldest first.
    let mut selected: Vec<&FileInfo> = if spec_files.load_latest_only {
        fresh.iter().take(1).copied().collect()
    } else {
        fresh.clone()
    };
    selected.reverse();

    let mut detected: Vec<DetectedSchema> = Vec::with_capacity(selected.len());
    for (i, file) in selected.iter().enumerate() {
        let budget = if i + 1 == selected.len() {
            files::SAMPLE_BYTES
        } else {
            CHECK_BYTES
        };
        detected.push(file_schema::detect(&location, file, budget).await?);
    }

    let (mut columns, schema_from) = match (&spec_files.bigquery_schema, detected.last()) {
        (Some(fields), _) => (
            file_schema::columns_from_bigquery_schema(fields)?,
            "bigquery_schema".to_string(),
        ),
        (None, Some(newest)) => {
            let others: Vec<&[file_schema::DetectedColumn]> = detected[..detected.len() - 1]
                .iter()
                .map(|d| d.columns.as_slice())
                .collect();
            (
                file_schema::unify(&newest.columns, &others),
                format!("detected from {}", location.uri(&newest.file)),
            )
        }
        (None, None) => (Vec::new(), "no file to read".to_string()),
    };
    let mut added_columns = Vec::new();
    for d in &detected {
        let uri = location.uri(&d.file);
        if spec_files.bigquery_schema.is_none()
            && let Some(expected) = &spec_files.schema_fingerprint
            && spec_files.schema_policy == SchemaPolicy::Fail
            && &d.schema_fingerprint != expected
        {
            return Err(Error::Source(format!(
                "schema drift: {uri} has columns [{}] (fingerprint {}), the job's schema_fingerprint \
                 is {expected}; nothing was loaded",
                d.columns
                    .iter()
                    .map(|c| format!("{}:{}", c.name, c.bigquery_type))
                    .collect::<Vec<_>>()
                    .join("|"),
                d.schema_fingerprint
            )));
        }
        let text = spec_files.format != shardflow::spec::FileFormat::Parquet;
        let drift = file_schema::drift(&columns, &d.columns, text);
        let refused = match spec_files.schema_policy {
            SchemaPolicy::Fail => !drift.is_empty(),
            SchemaPolicy::AddColumns => !drift.changed.is_empty(),
        };
        if refused {
            return Err(Error::Source(format!(
                "schema drift in {uri}: {}; nothing was loaded (schema_policy \"add_columns\" adds \
                 new columns and loads removed ones as NULL)",
                drift.describe()
            )));
        }
        for (name, ty) in drift.added {
            added_columns.push(format!("{name} {ty}"));
            columns.push((name, ty));
        }
    }

    let estimates: Vec<FileEstimate> = detected
        .iter()
        .map(|d| FileEstimate {
            rows: d.estimated_rows,
            row_groups: d.row_groups.clone(),
        })
        .collect();
    let total: u64 = estimates.iter().map(|e| e.rows).sum();
    let (mode, _) = plan::choose_mode(spec.processing_mode, total, spec.row_count_threshold);
    let groups = plan::file_shards(&estimates, opts.shard_rows, mode == Mode::Standard);
    let shards: Vec<(ShardBounds, u64)> = groups
        .into_iter()
        .map(|group| {
            let rows = group.iter().map(|s| s.rows).sum();
            let files = group
                .into_iter()
                .map(|s| FilePart {
                    file: selected[s.file].clone(),
                    row_groups: s.row_groups,
                    columns: detected[s.file]
                        .columns
                        .iter()
                        .map(|c| c.name.clone())
                        .collect(),
                })
                .collect();
            (ShardBounds::Files { files }, rows)
        })
        .collect();
    let exact = matches!(spec_files.format, shardflow::spec::FileFormat::Parquet);
    let fingerprint =
        file_schema::fingerprint(columns.iter().map(|(n, t)| (n.as_str(), t.as_str())));
    Ok(FileSurvey {
        columns: files::source_columns(&columns),
        estimate: Estimate {
            rows: total,
            source: if exact {
                "Parquet footers (exact)".into()
            } else {
                "rows per byte of a sample of each file, times its size".into()
            },
        },
        split: Split {
            method: match shards.len() {
                0 => "none (no new file)".into(),
                1 => "none".into(),
                _ => "files (small files grouped, large Parquet files by row groups)".into(),
            },
            column: None,
            shards,
        },
        files: FilesPlan {
            listed: listed.len(),
            already_loaded: listed.len() - fresh.len(),
            selected: selected.iter().map(|f| location.uri(&f.path)).collect(),
            load_latest_only: spec_files.load_latest_only,
            schema_from,
            schema_fingerprint: fingerprint,
            added_columns,
        },
    })
}
