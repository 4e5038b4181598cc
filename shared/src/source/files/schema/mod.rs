//! What a file holds: its columns with BigQuery types inferred from a sample (Parquet: read
//! from the footer, exact), the seed's schema fingerprint, row estimates, and the drift between
//! a file and the job's schema.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use md5::{Digest as _, Md5};
use object_store::path::Path;
use serde::Serialize;

use super::{self as files, FileInfo, FileLocation};
use crate::spec::{BigQueryField, FileFormat};
use crate::{Error, Result};

mod csv;
mod json;

pub(crate) use self::csv::sample_csv;
pub use self::csv::{csv_text_schema, dedup_names, pandas_header};
pub(crate) use self::json::sample_json;

/// The seed's estimates when a sample says nothing: rows per MB of CSV and of JSON.
pub const CSV_ROWS_PER_MB: u64 = 20_000;
pub const JSON_ROWS_PER_MB: u64 = 10_000;
/// A compressed file's size times this is taken as its text's: the sample reads decompressed
/// bytes and cannot tell how many compressed bytes they came from.
const ASSUMED_COMPRESSION_RATIO: u64 = 5;

/// A column as `detect-schema` reports it (the Django endpoint's shape).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DetectedColumn {
    pub name: String,
    /// The type as the seed reported it: pandas' dtype for CSV and JSON (`int64`, `float64`,
    /// `bool`, `object`), the Arrow type for Parquet.
    #[serde(rename = "type")]
    pub dtype: String,
    /// The Arrow type the sample decoded as: `Null` when every sampled value was missing,
    /// `Date32` for text that is all dates without a time.
    #[serde(skip)]
    pub arrow_type: String,
    pub bigquery_type: String,
    pub bigquery_mode: String,
    pub sample_values: Vec<String>,
    pub nullable: bool,
}

/// A file's columns and what the sample says of its rows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DetectedSchema {
    pub file: String,
    pub columns: Vec<DetectedColumn>,
    /// Rows in the sample (Parquet: in the file, exactly).
    pub total_rows: u64,
    pub schema_fingerprint: String,
    pub file_size: u64,
    /// Rows in the whole file: exact for Parquet, else the sample's rows per byte times the
    /// file's size.
    #[serde(skip)]
    pub estimated_rows: u64,
    /// Parquet: rows per row group.
    #[serde(skip)]
    pub row_groups: Vec<u64>,
    /// JSON: the file is one top-level array rather than JSON lines.
    #[serde(skip)]
    pub json_array: bool,
}

/// MD5 hex of `name:TYPE|name:TYPE|…`, exactly as the seed computes it.
pub fn fingerprint<'a>(columns: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let text = columns
        .into_iter()
        .map(|(name, ty)| format!("{name}:{ty}"))
        .collect::<Vec<_>>()
        .join("|");
    hex::encode(Md5::digest(text.as_bytes()))
}

/// The standard name of a BigQuery type, legacy aliases folded; None for a type file sources
/// do not load.
pub fn canonical_type(name: &str) -> Option<&'static str> {
    Some(match name.trim().to_ascii_uppercase().as_str() {
        "INT64" | "INTEGER" | "INT" | "BIGINT" | "SMALLINT" => "INT64",
        "FLOAT64" | "FLOAT" => "FLOAT64",
        "BOOL" | "BOOLEAN" => "BOOL",
        "STRING" => "STRING",
        "BYTES" => "BYTES",
        "TIMESTAMP" => "TIMESTAMP",
        "DATE" => "DATE",
        "DATETIME" => "DATETIME",
        "TIME" => "TIME",
        "NUMERIC" | "DECIMAL" => "NUMERIC",
        "BIGNUMERIC" | "BIGDECIMAL" => "BIGNUMERIC",
        "JSON" => "JSON",
        _ => return None,
    })
}

/// The Arrow type a column of a BigQuery type is loaded as (the warehouse maps it back to the
/// same BigQuery type).
pub fn arrow_type_of(bigquery_type: &str) -> Option<DataType> {
    Some(match canonical_type(bigquery_type)? {
        "INT64" => DataType::Int64,
        "FLOAT64" => DataType::Float64,
        "BOOL" => DataType::Boolean,
        "STRING" | "JSON" => DataType::Utf8,
        "BYTES" => DataType::Binary,
        "TIMESTAMP" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        "DATE" => DataType::Date32,
        "DATETIME" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "TIME" => DataType::Time64(TimeUnit::Microsecond),
        "NUMERIC" => DataType::Decimal128(38, 9),
        "BIGNUMERIC" => DataType::Decimal256(76, 38),
        _ => return None,
    })
}

/// The BigQuery type detection gives a sampled CSV or JSON column, by the seed's rules:
/// integers INT64, floats FLOAT64, booleans BOOL, dates and times TIMESTAMP, the rest STRING.
/// None for nested JSON (objects, arrays).
fn text_bigquery_type(inferred: &DataType) -> Option<&'static str> {
    Some(match inferred {
        DataType::Int64 => "INT64",
        // Only integers past INT64 in JSON (see `wide_integer_keys`).
        DataType::Decimal128(_, 0) => "NUMERIC",
        DataType::Float64 => "FLOAT64",
        DataType::Boolean => "BOOL",
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _) => "TIMESTAMP",
        DataType::Null | DataType::Utf8 => "STRING",
        _ => return None,
    })
}

/// Whether values detected as `found` load into a column of `expected` type without loss:
/// the same type, an empty (all-NULL) sample, integers into FLOAT64 or NUMERIC, anything
/// textual into STRING, a date into TIMESTAMP or DATETIME.
pub fn loads_as(found_arrow: &str, found: &str, expected: &str) -> bool {
    if found == expected || found_arrow == "Null" {
        return true;
    }
    match (found, expected) {
        ("INT64", "FLOAT64" | "NUMERIC" | "BIGNUMERIC" | "STRING") => true,
        ("FLOAT64" | "BOOL" | "TIMESTAMP" | "DATE", "STRING") => true,
        ("TIMESTAMP", "DATETIME") => true,
        // Detection calls dates TIMESTAMP (the seed's rule): only a sample of dates is a DATE.
        ("TIMESTAMP", "DATE") => found_arrow == "Date32",
        _ => false,
    }
}

/// The columns a job loads and what a file holds, compared: added, removed and changed
/// columns, each described.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Drift {
    pub added: Vec<(String, String)>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.added.is_empty() {
            let list: Vec<String> = self.added.iter().map(|(n, t)| format!("{n} {t}")).collect();
            parts.push(format!("added: {}", list.join(", ")));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed: {}", self.removed.join(", ")));
        }
        if !self.changed.is_empty() {
            parts.push(format!("changed: {}", self.changed.join(", ")));
        }
        parts.join("; ")
    }
}

/// Compares a file's detected columns with the job's (name, BigQuery type) list. In a text
/// file (`text`), a column sampled as STRING where the job has another type is left to the
/// load: a value that does not parse fails it naming its file and line, which says more.
pub fn drift(expected: &[(String, String)], found: &[DetectedColumn], text: bool) -> Drift {
    let mut d = Drift::default();
    for c in found {
        match expected.iter().find(|(n, _)| *n == c.name) {
            None => d.added.push((c.name.clone(), c.bigquery_type.clone())),
            Some((_, ty))
                if !loads_as(&c.arrow_type, &c.bigquery_type, ty)
                    && (!text || c.bigquery_type != "STRING") =>
            {
                d.changed
                    .push(format!("{} {ty} -> {}", c.name, c.bigquery_type))
            }
            Some(_) => {}
        }
    }
    for (name, _) in expected {
        if !found.iter().any(|c| &c.name == name) {
            d.removed.push(name.clone());
        }
    }
    d
}

/// The columns of a job with no `bigquery_schema`: the newest file's, each widened where an
/// older file's sample says more (integers in one file and floats in another are FLOAT64; a
/// column empty in one sample takes the other's type). Other differences stay drift.
pub fn unify(newest: &[DetectedColumn], others: &[&[DetectedColumn]]) -> Vec<(String, String)> {
    let mut columns: Vec<(String, String, bool)> = newest
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                c.bigquery_type.clone(),
                c.arrow_type == "Null",
            )
        })
        .collect();
    for file in others {
        for found in file.iter() {
            let Some(col) = columns.iter_mut().find(|c| c.0 == found.name) else {
                continue;
            };
            if found.arrow_type == "Null" {
                continue;
            }
            if col.2 {
                (col.1, col.2) = (found.bigquery_type.clone(), false);
            } else if matches!(
                (col.1.as_str(), found.bigquery_type.as_str()),
                ("INT64", "FLOAT64") | ("FLOAT64", "INT64")
            ) {
                col.1 = "FLOAT64".into();
            }
        }
    }
    columns.into_iter().map(|(n, t, _)| (n, t)).collect()
}

/// The job's columns from `bigquery_schema`, types checked.
pub fn columns_from_bigquery_schema(fields: &[BigQueryField]) -> Result<Vec<(String, String)>> {
    fields
        .iter()
        .map(|f| match canonical_type(&f.bigquery_type) {
            Some(t) => Ok((f.name.clone(), t.to_string())),
            None => Err(Error::Spec(crate::spec::SpecError::single(
                "bigquery_schema",
                format!(
                    "column {:?} has type {:?}, which file sources do not load (INT64, FLOAT64, \
                     BOOL, STRING, BYTES, TIMESTAMP, DATE, DATETIME, TIME, NUMERIC, BIGNUMERIC, JSON)",
                    f.name, f.bigquery_type
                ),
            ))),
        })
        .collect()
}

/// Detects a file's columns from its first `budget` bytes (Parquet: its footer and first rows).
pub async fn detect(
    location: &FileLocation,
    file: &FileInfo,
    budget: usize,
) -> Result<DetectedSchema> {
    let uri = location.uri(&file.path);
    let spec = &location.spec;
    let mut json_array = false;
    let (columns, total_rows, estimated_rows, row_groups) = match spec.format {
        FileFormat::Parquet => detect_parquet(location, file, &uri).await?,
        FileFormat::Csv | FileFormat::Json => {
            let mut text = location.open_text(file).await?;
            let (mut sample, whole) =
                files::read_head(text.as_mut(), spec.options.encoding, budget, &uri).await?;
            json_array = spec.format == FileFormat::Json
                && sample.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
            if !whole {
                // Only whole records: cut after the last newline.
                let keep = sample
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                sample.truncate(keep);
            }
            let (columns, rows) = match spec.format {
                FileFormat::Csv => sample_csv(&sample, &spec.options, &uri)?,
                _ => sample_json(&sample, &uri)?,
            };
            let estimated = if whole {
                rows
            } else if rows > 0 && !sample.is_empty() {
                // Rows per sampled byte, over the file's (decompressed) size: a compressed
                // file's ratio is unknown, so count it as the seed's rule would.
                match files::compression_of(spec.options.compression, &file.path) {
                    crate::spec::Compression::None | crate::spec::Compression::Auto => {
                        ((rows as f64 / sample.len() as f64) * file.size as f64) as u64
                    }
                    _ => per_mb_rule(spec.format, file.size * ASSUMED_COMPRESSION_RATIO),
                }
            } else {
                per_mb_rule(spec.format, file.size)
            };
            (columns, rows, estimated, Vec::new())
        }
    };
    let schema_fingerprint = fingerprint(
        columns
            .iter()
            .map(|c| (c.name.as_str(), c.bigquery_type.as_str())),
    );
    Ok(DetectedSchema {
        file: file.path.clone(),
        columns,
        total_rows,
        schema_fingerprint,
        file_size: file.size,
        estimated_rows,
        row_groups,
        json_array,
    })
}

/// The seed's rows-per-MB rule.
pub fn per_mb_rule(format: FileFormat, bytes: u64) -> u64 {
    let per_mb = match format {
        FileFormat::Json => JSON_ROWS_PER_MB,
        _ => CSV_ROWS_PER_MB,
    };
    (bytes as f64 / (1024.0 * 1024.0) * per_mb as f64).ceil() as u64
}

fn describe_columns(
    batch: Option<&RecordBatch>,
    schema: &Schema,
    bigquery_type: impl Fn(&Field) -> Result<String>,
) -> Result<Vec<DetectedColumn>> {
    let options = FormatOptions::default();
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let (samples, nullable) = match batch {
                None => (Vec::new(), true),
                Some(b) => {
                    let column = b.column(i);
                    let formatter = ArrayFormatter::try_new(column.as_ref(), &options)
                        .map_err(|e| Error::Source(e.to_string()))?;
                    let samples = (0..column.len())
                        .filter(|&r| column.is_valid(r))
                        .take(5)
                        .map(|r| formatter.value(r).to_string())
                        .collect();
                    (
                        samples,
                        column.null_count() > 0 || field.is_nullable() && b.num_rows() == 0,
                    )
                }
            };
            Ok(DetectedColumn {
                name: field.name().clone(),
                dtype: field.data_type().to_string(),
                arrow_type: field.data_type().to_string(),
                bigquery_type: bigquery_type(field)?,
                bigquery_mode: "NULLABLE".into(),
                sample_values: samples,
                nullable,
            })
        })
        .collect()
}

fn concat(schema: &SchemaRef, batches: &[RecordBatch], uri: &str) -> Result<Option<RecordBatch>> {
    if batches.is_empty() {
        return Ok(None);
    }
    arrow::compute::concat_batches(schema, batches)
        .map(Some)
        .map_err(|e| Error::Source(format!("{uri}: {e}")))
}

#[allow(deprecated)]
async fn detect_parquet(
    location: &FileLocation,
    file: &FileInfo,
    uri: &str,
) -> Result<(Vec<DetectedColumn>, u64, u64, Vec<u64>)> {
    use futures::StreamExt as _;
    use parquet::arrow::ParquetRecordBatchStreamBuilder;
    use parquet::arrow::async_reader::ParquetObjectReader;
    let reader = ParquetObjectReader::new(location.store().clone(), Path::from(file.path.as_str()))
        .with_file_size(file.size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| files::parquet_error(format!("{uri}: not a readable Parquet file"), e))?;
    let metadata = builder.metadata().clone();
    let rows = metadata.file_metadata().num_rows().max(0) as u64;
    let groups: Vec<u64> = metadata
        .row_groups()
        .iter()
        .map(|g| g.num_rows().max(0) as u64)
        .collect();
    let schema = builder.schema().clone();
    let mut stream = builder
        .with_batch_size(5)
        .with_row_groups(if groups.is_empty() { vec![] } else { vec![0] })
        .build()
        .map_err(|e| Error::Source(format!("{uri}: {e}")))?;
    let first = match stream.next().await {
        Some(b) => Some(b.map_err(|e| files::parquet_error(uri.to_string(), e))?),
        None => None,
    };
    let columns = describe_columns(first.as_ref(), &schema, |f| {
        crate::warehouse::bigquery::bigquery_type(f)
            .map(|(t, _)| t.to_string())
            .map_err(|e| Error::Source(format!("{uri}: {e}")))
    })?;
    // The footer says whether a column may hold NULLs.
    let columns = columns
        .into_iter()
        .zip(schema.fields())
        .map(|(mut c, f)| {
            c.nullable = f.is_nullable();
            c
        })
        .collect();
    Ok((columns, rows, rows, groups))
}

#[cfg(test)]
mod tests;
