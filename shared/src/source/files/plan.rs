//! Planning a file job: list the matching files, leave out those the stream has loaded,
//! pick the newest or all, check each file's columns against the job's schema, estimate, and
//! group the files (or split a large Parquet file by row groups) into shards. Also what
//! `list-files` and `detect-schema` print.

use std::collections::HashSet;

use crate::plan::{self, FileEstimate, Mode};
use crate::source::files::schema::{self as file_schema, DetectedSchema};
use crate::source::files::{self, FileInfo, FileLocation, FilePart};
use crate::source::{Estimate, Split};
use crate::source::{ShardBounds, SourceColumn};
use crate::spec::{JobSpec, Load, SchemaPolicy, SourceType};
use crate::warehouse::NativeFormat;
use crate::{Error, Result};
use serde::Serialize;

use crate::plan::{PlanOptions, StreamState};

pub use super::fast_path::*;

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
    /// `direct`: BigQuery loads the files where they lie, no worker reads them; `workers`:
    /// workers read, check and convert them to Parquet.
    pub load_path: &'static str,
    pub load_path_reason: String,
    /// The direct load, when `load_path` is `direct`.
    #[serde(skip)]
    pub direct: Option<DirectLoad>,
}

/// A file job's survey: columns, estimate and shards.
pub struct FileSurvey {
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
        "no file under {} matches {:?}",
        location.prefix_uri(),
        location.spec.pattern
    ))
}

/// A transactional job appends what it loads: a file it loaded before whose content has
/// changed since (a new generation or ETag) would add its earlier rows a second time. Such a
/// run fails before anything moves, naming each file with what was loaded of it.
fn refuse_rewritten(
    location: &FileLocation,
    selected: &[&FileInfo],
    processed: &[crate::state::ProcessedFile],
) -> Result<()> {
    let rewritten: Vec<String> = selected
        .iter()
        .filter_map(|f| {
            // The most recent load of it (the store lists by path and version, not by time).
            let before = processed
                .iter()
                .filter(|p| p.path == f.path)
                .max_by(|a, b| a.last_modified.cmp(&b.last_modified))?;
            let rows = before
                .rows
                .map_or("its rows".to_string(), |n| format!("{n} rows"));
            Some(format!(
                "{} ({rows} loaded by run {} from version {} of {} bytes; now version {} of {} \
                 bytes)",
                location.uri(&f.path),
                before.run_id,
                before.version,
                before.size,
                f.version_key(),
                f.size
            ))
        })
        .collect();
    if rewritten.is_empty() {
        return Ok(());
    }
    Err(Error::Source(format!(
        "rewritten since a transactional run loaded them: {}. Appending them again would add \
         the rows loaded before a second time, so nothing was loaded: give new content a new \
         file name, or load the stream with load_type \"catalog\" (the table is then the files \
         as they are)",
        rewritten.join("; ")
    )))
}

pub async fn survey_files(
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
    // A catalog job replaces the table with the files as they are: every matching file (or
    // the newest with load_latest_only), loaded before or not. Other jobs append what they
    // have not loaded.
    let replaces = matches!(spec.load, Load::Catalog { .. });
    let fresh: Vec<&FileInfo> = listed
        .iter()
        .filter(|f| replaces || !loaded.contains(&(f.path.as_str(), f.version_key().as_str())))
        .filter(|f| {
            stream
                .inherited_files
                .as_ref()
                .is_none_or(|uris| uris.contains(&location.uri(&f.path)))
        })
        .collect();
    let spec_files = &location.spec;
    // Newest first as listed; read oldest first.
    let mut selected: Vec<&FileInfo> = if spec_files.load_latest_only {
        fresh.iter().take(1).copied().collect()
    } else {
        fresh.clone()
    };
    selected.reverse();
    if let Load::Append { .. } = spec.load {
        refuse_rewritten(&location, &selected, &stream.processed_files)?;
    }

    let mut detected: Vec<DetectedSchema> = Vec::with_capacity(selected.len());
    for (i, file) in selected.iter().enumerate() {
        let budget = if i + 1 == selected.len() {
            files::SAMPLE_BYTES
        } else {
            CHECK_BYTES
        };
        detected.push(file_schema::detect(&location, file, budget).await?);
    }

    // An empty file (no bytes, no header) holds no rows and says nothing of the columns: it
    // takes no part in the schema or the drift check. A catalog job whose files are all empty
    // fails rather than replace the table with nothing (a truncated upload must not empty it).
    let with_columns: Vec<&DetectedSchema> =
        detected.iter().filter(|d| !d.columns.is_empty()).collect();
    if replaces && !detected.is_empty() && with_columns.is_empty() {
        let empty: Vec<String> = detected.iter().map(|d| location.uri(&d.file)).collect();
        return Err(Error::Source(format!(
            "every file of this catalog job is empty ({}): loading them would replace the table \
             with nothing, so nothing was loaded",
            empty.join(", ")
        )));
    }
    let (mut columns, schema_from) = match (&spec_files.bigquery_schema, with_columns.last()) {
        (Some(fields), _) => (
            file_schema::columns_from_bigquery_schema(fields)?,
            "bigquery_schema".to_string(),
        ),
        (None, Some(newest)) => {
            let others: Vec<&[file_schema::DetectedColumn]> = with_columns
                [..with_columns.len() - 1]
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
    for d in &with_columns {
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
        let text = spec_files.format != crate::spec::FileFormat::Parquet;
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

    let mut fast = native_format(
        spec,
        opts.warehouse_loads_gcs,
        &selected.iter().copied().zip(&detected).collect::<Vec<_>>(),
        &columns,
        !added_columns.is_empty(),
    );
    if fast.is_ok() {
        let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
        let destination_names = (opts.column_names)(&names);
        let access = if location.bucket().is_some() && spec.source_type == SourceType::Gcs {
            direct_access(&location, &selected, opts.warehouse_location.clone()).await
        } else {
            DirectAccess {
                bucket_location: Err("the files are in no GCS bucket".into()),
                warehouse_location: None,
                unreadable: None,
            }
        };
        if let Some(why) =
            direct_load_problem(spec, &selected, &columns, &destination_names, &access)
        {
            fast = Err(why);
        }
    }
    let (load_path, load_path_reason, direct) = match fast {
        Ok(format) => (
            "direct",
            format!(
                "BigQuery loads the {} files from GCS itself ({}); no worker reads them",
                selected.len(),
                match &format {
                    NativeFormat::Csv { .. } =>
                        "CSV with the job's delimiter, quote, header and encoding",
                    NativeFormat::JsonLines => "JSON lines",
                    NativeFormat::Parquet => "Parquet",
                }
            ),
            Some(DirectLoad {
                format,
                uris: selected.iter().map(|f| location.uri(&f.path)).collect(),
                files: selected.iter().map(|f| (*f).clone()).collect(),
            }),
        ),
        Err(why) => ("workers", why, None),
    };

    let estimates: Vec<FileEstimate> = detected
        .iter()
        .map(|d| FileEstimate {
            rows: d.estimated_rows,
            row_groups: d.row_groups.clone(),
        })
        .collect();
    let total: u64 = estimates.iter().map(|e| e.rows).sum();
    let (mode, _) = plan::choose_mode(spec.processing_mode, total, spec.row_count_threshold);
    // No columns at all (every file empty, no bigquery_schema): nothing to read.
    let groups = if direct.is_some() || columns.is_empty() {
        Vec::new()
    } else {
        plan::file_shards(&estimates, opts.shard_rows, mode == Mode::Standard)
    };
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
    let exact = matches!(spec_files.format, crate::spec::FileFormat::Parquet);
    let fingerprint =
        file_schema::fingerprint(columns.iter().map(|(n, t)| (n.as_str(), t.as_str())));
    // selected_columns: a subset of the files' columns, each checked (a file job's
    // timestamp_column only names the reported watermark; it need not be among them).
    let file_columns = files::source_columns(&columns);
    let columns = if spec.selected_columns.is_some() {
        crate::source::project(
            &file_columns,
            &format!("the files under {}", location.prefix_uri()),
            spec.selected_columns.as_deref(),
            None,
        )?
    } else {
        file_columns
    };
    Ok(FileSurvey {
        columns,
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
                _ if direct.is_some() => "none (one BigQuery load job over the files)".into(),
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
            load_path,
            load_path_reason,
            direct,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::files::schema::DetectedColumn;

    fn job(source_type: &str, format: &str, options: serde_json::Value) -> JobSpec {
        JobSpec::from_json(
            &serde_json::json!({
                "source_type": source_type, "dest_table_name": "t", "load_type": "transactional",
                "connection_params": {"bucket": "b"}, "file_path_prefix": "in/",
                "file_pattern": "*", "file_format": format, "file_format_options": options,
            })
            .to_string(),
        )
        .unwrap()
    }

    fn file(path: &str) -> FileInfo {
        FileInfo {
            path: path.into(),
            size: 10,
            last_modified: chrono::Utc::now(),
            e_tag: None,
            version: Some("1".into()),
        }
    }

    fn detected(names: &[(&str, &str)], json_array: bool) -> DetectedSchema {
        DetectedSchema {
            file: "f".into(),
            columns: names
                .iter()
                .map(|(name, arrow_type)| DetectedColumn {
                    name: name.to_string(),
                    dtype: arrow_type.to_string(),
                    arrow_type: arrow_type.to_string(),
                    bigquery_type: "STRING".into(),
                    bigquery_mode: "NULLABLE".into(),
                    sample_values: Vec::new(),
                    nullable: true,
                })
                .collect(),
            total_rows: 1,
            schema_fingerprint: String::new(),
            file_size: 10,
            estimated_rows: 1,
            row_groups: Vec::new(),
            json_array,
        }
    }

    fn columns(names: &[&str]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), "STRING".to_string()))
            .collect()
    }

    #[test]
    fn the_fast_path_needs_gcs_bigquery_and_files_bigquery_reads_as_the_workers_do() {
        let ab = [("a", "Utf8"), ("b", "Int64")];
        let table = columns(&["a", "b"]);
        let decide = |spec: &JobSpec, path: &str, d: &DetectedSchema, bigquery: bool| {
            native_format(spec, bigquery, &[(&file(path), d)], &table, false)
        };
        let csv = job(
            "gcs",
            "csv",
            serde_json::json!({"delimiter": "|", "encoding": "latin-1"}),
        );
        assert_eq!(
            decide(&csv, "in/x.csv.gz", &detected(&ab, false), true).unwrap_err(),
            "BigQuery's CSV reader is not pandas': it keeps missing-value markers such as NA as \
             text and reads other date formats, so the workers read CSV files"
        );
        let json = job("gcs", "json", serde_json::json!({}));
        // The table's columns are STRING: JSON text loads as it is.
        let text_ab = [("a", "Utf8"), ("b", "Utf8")];
        assert_eq!(
            decide(&json, "in/x.json.gz", &detected(&text_ab, false), true),
            Ok(NativeFormat::JsonLines)
        );
        assert_eq!(
            decide(&json, "in/x.json", &detected(&text_ab, false), false).unwrap_err(),
            "the warehouse is not BigQuery"
        );
        assert_eq!(
            decide(
                &job("s3", "json", serde_json::json!({})),
                "in/x.json",
                &detected(&text_ab, false),
                true
            )
            .unwrap_err(),
            "the files are on S3; BigQuery loads only gs:// files itself"
        );
        assert_eq!(
            decide(&json, "in/x.json.zst", &detected(&text_ab, false), true).unwrap_err(),
            "in/x.json.zst is zstd-compressed, which BigQuery does not read"
        );
        // JSON keys are matched by name: a subset in any order, not a key the table lacks.
        assert_eq!(
            decide(&json, "in/x.json", &detected(&[("b", "Utf8")], false), true),
            Ok(NativeFormat::JsonLines)
        );
        assert_eq!(
            decide(
                &json,
                "in/x.json",
                &detected(&[("c", "Int64")], false),
                true
            )
            .unwrap_err(),
            "in/x.json has columns [c], not the table's [a, b] in that order; the workers match \
             them by name"
        );
        // A value pandas' rules convert (a boolean into FLOAT64, text into INT64): workers.
        let mut flags = detected(&[("a", "Boolean")], false);
        flags.columns[0].bigquery_type = "FLOAT64".into();
        let floats = vec![("a".to_string(), "FLOAT64".to_string())];
        assert_eq!(
            native_format(&json, true, &[(&file("in/x.json"), &flags)], &floats, false)
                .unwrap_err(),
            "in/x.json column a holds Boolean JSON values that load as FLOAT64 only by pandas' \
             conversions; the workers make them"
        );
        // Integers: as JSON numbers BigQuery may corrupt them past 2^53; as text they load.
        let ints = vec![("a".to_string(), "INT64".to_string())];
        let numbers = detected(&[("a", "Int64")], false);
        assert_eq!(
            native_format(&json, true, &[(&file("in/x.json"), &numbers)], &ints, false)
                .unwrap_err(),
            "in/x.json column a holds integers as JSON numbers, which BigQuery may corrupt past \
             2^53 (it asks for them as strings); the workers read them exactly"
        );
        let mut text = detected(&[("a", "Utf8")], false);
        text.columns[0].sample_values = vec!["1".into(), "-90071992547409930".into()];
        assert!(native_format(&json, true, &[(&file("in/x.json"), &text)], &ints, false).is_ok());
        text.columns[0].sample_values.push("1.5".into());
        assert!(native_format(&json, true, &[(&file("in/x.json"), &text)], &ints, false).is_err());
        // Times only in the forms BigQuery reads (seconds included).
        let timed = vec![("a".to_string(), "TIMESTAMP".to_string())];
        let mut at = detected(&[("a", "Utf8")], false);
        at.columns[0].sample_values = vec!["2024-01-01T10:00:00Z".into(), "Jan 1 2000".into()];
        assert_eq!(
            native_format(&json, true, &[(&file("in/x.json"), &at)], &timed, false).unwrap_err(),
            "in/x.json column a holds times such as \"Jan 1 2000\", which BigQuery does not \
             read; the workers read them as pandas does"
        );
        at.columns[0].sample_values.pop();
        assert!(native_format(&json, true, &[(&file("in/x.json"), &at)], &timed, false).is_ok());
        at.columns[0].sample_values = vec!["2020-01-01T10:00".into()];
        assert!(native_format(&json, true, &[(&file("in/x.json"), &at)], &timed, false).is_err());
        // YYYY/MM/DD for a TIMESTAMP, not for a DATE.
        at.columns[0].sample_values = vec!["2020/01/01 10:00:00".into()];
        assert!(native_format(&json, true, &[(&file("in/x.json"), &at)], &timed, false).is_ok());
        let dated = vec![("a".to_string(), "DATE".to_string())];
        at.columns[0].sample_values = vec!["2020/01/01".into()];
        assert!(native_format(&json, true, &[(&file("in/x.json"), &at)], &dated, false).is_err());
        assert_eq!(
            decide(&json, "in/x.json", &detected(&text_ab, true), true).unwrap_err(),
            "in/x.json is a JSON array; BigQuery loads JSON lines only"
        );
        let parquet = job("gcs", "parquet", serde_json::json!({}));
        assert_eq!(
            decide(&parquet, "in/x.parquet", &detected(&ab, false), true),
            Ok(NativeFormat::Parquet)
        );
        assert_eq!(
            decide(
                &parquet,
                "in/x.parquet",
                &detected(&[("a", "Utf8"), ("b", "UInt64")], false),
                true
            )
            .unwrap_err(),
            "in/x.parquet column b is UInt64, which the workers convert checking for loss"
        );
        assert_eq!(
            native_format(
                &csv,
                true,
                &[(&file("in/x.csv"), &detected(&ab, false))],
                &table,
                true
            )
            .unwrap_err(),
            "columns were added under schema_policy \"add_columns\"; the workers load the files \
             that lack them with NULLs"
        );
    }

    #[test]
    fn a_direct_load_needs_one_job_one_compression_names_and_a_readable_colocated_bucket() {
        let ok_access = DirectAccess {
            bucket_location: Ok("US-CENTRAL1".into()),
            warehouse_location: Some("US".into()),
            unreadable: None,
        };
        let names =
            |cols: &[(String, String)]| cols.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let table = columns(&["a", "b"]);
        let csv = job("gcs", "csv", serde_json::json!({}));
        let (a, b) = (file("in/a.csv"), file("in/b.csv"));
        let check = |spec: &JobSpec,
                     files: &[&FileInfo],
                     cols: &[(String, String)],
                     dest: &[String],
                     access: &DirectAccess| {
            direct_load_problem(spec, files, cols, dest, access)
        };
        assert_eq!(
            check(&csv, &[&a, &b], &table, &names(&table), &ok_access),
            None
        );
        let mut merge = csv.clone();
        // Validation refuses a file merge; the rule holds for any spec that reaches here.
        merge.load = Load::Merge {
            window: crate::spec::ColumnWindow {
                column: "b".into(),
                last_sync_value: None,
                historical_start_date: None,
            },
            keys: None,
            lookback: None,
        };
        assert_eq!(
            check(&merge, &[&a], &table, &names(&table), &ok_access).unwrap(),
            "a merge replaces rows by key, which a load job cannot; the workers stage the files \
             for one MERGE"
        );

        let many: Vec<FileInfo> = (0..10_001).map(|i| file(&format!("in/{i}.csv"))).collect();
        let many_refs: Vec<&FileInfo> = many.iter().collect();
        assert_eq!(
            check(&csv, &many_refs, &table, &names(&table), &ok_access).unwrap(),
            "10001 files are more than one BigQuery load job takes (10000)"
        );
        assert!(
            check(
                &csv,
                &many_refs[..10_000],
                &table,
                &names(&table),
                &ok_access
            )
            .is_none()
        );

        let gz = file("in/c.csv.gz");
        assert_eq!(
            check(&csv, &[&a, &gz], &table, &names(&table), &ok_access).unwrap(),
            "in/c.csv.gz is gzip-compressed and in/a.csv is not; BigQuery takes one or the other in a load job"
        );

        // A renamed column: CSV loads by position, JSON and Parquet by name.
        let odd = vec![("order id".to_string(), "STRING".to_string())];
        let renamed = vec!["order_id".to_string()];
        assert_eq!(check(&csv, &[&a], &odd, &renamed, &ok_access), None);
        let json = job("gcs", "json", serde_json::json!({}));
        assert!(
            check(&json, &[&a], &odd, &renamed, &ok_access)
                .unwrap()
                .contains("loads as \"order_id\"")
        );

        let parquet = job("gcs", "parquet", serde_json::json!({}));
        let doc = vec![("doc".to_string(), "JSON".to_string())];
        assert_eq!(
            check(&parquet, &[&a], &doc, &names(&doc), &ok_access).unwrap(),
            "column doc is JSON, which BigQuery does not load from Parquet; the workers stage it for a conversion"
        );
        assert_eq!(check(&json, &[&a], &doc, &names(&doc), &ok_access), None);

        let elsewhere = DirectAccess {
            warehouse_location: Some("EU".into()),
            ..ok_access.clone()
        };
        assert_eq!(
            check(&csv, &[&a], &table, &names(&table), &elsewhere).unwrap(),
            "the bucket is in US-CENTRAL1 and the dataset in EU; BigQuery loads only from a bucket in the dataset's location"
        );
        let hidden = DirectAccess {
            bucket_location: Err("cannot read bucket".into()),
            ..ok_access.clone()
        };
        assert_eq!(
            check(&csv, &[&a], &table, &names(&table), &hidden).unwrap(),
            "cannot read bucket"
        );
        let unreadable = DirectAccess {
            unreadable: Some("no objects.get".into()),
            ..ok_access.clone()
        };
        assert_eq!(
            check(&csv, &[&a], &table, &names(&table), &unreadable).unwrap(),
            "no objects.get"
        );
        // An unknown dataset location (a plan made without a warehouse) is not held against it.
        let unknown = DirectAccess {
            warehouse_location: None,
            ..ok_access
        };
        assert_eq!(check(&csv, &[&a], &table, &names(&table), &unknown), None);
    }
}
