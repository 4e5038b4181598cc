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

/// Header names made distinct as pandas' CSV reader makes them ("Duplicate columns will be
/// specified as 'X', 'X.1', …'X.N'", skipping a name the header already has), the same
/// steps, so a stored fingerprint matches: `id,name,name` reads as `id`, `name`, `name.1`.
pub fn dedup_names(names: &[String]) -> Vec<String> {
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(names.len());
    for original in names {
        let mut name = original.clone();
        let mut seen = counts.get(&name).copied().unwrap_or(0);
        while seen > 0 {
            counts.insert(original.clone(), seen + 1);
            name = format!("{original}.{seen}");
            seen = if names.contains(&name) {
                seen + 1
            } else {
                counts.get(&name).copied().unwrap_or(0)
            };
        }
        counts.insert(name.clone(), seen + 1);
        out.push(name);
    }
    out
}

/// A CSV's header as pandas names it: an empty name is `Unnamed: <position>`, repeated names
/// get `.1`, `.2` (see `dedup_names`).
pub fn pandas_header(names: &[String]) -> Vec<String> {
    let named: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            if n.is_empty() {
                format!("Unnamed: {i}")
            } else {
                n.clone()
            }
        })
        .collect();
    dedup_names(&named)
}

/// The file's columns as text, named as pandas names them.
pub fn csv_text_schema(
    sample: &[u8],
    options: &crate::spec::FileOptions,
    uri: &str,
) -> Result<SchemaRef> {
    let format = files::csv_format(options);
    let (schema, _) = format
        .infer_schema(Cursor::new(sample), Some(1))
        .map_err(|e| files::csv_error(uri, &e))?;
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    Ok(Arc::new(Schema::new(
        pandas_header(&names)
            .into_iter()
            .map(|name| Field::new(name, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    )))
}

/// Detects a CSV sample's columns by pandas' `read_csv` rules and the seed's type mapping
/// (`pandas::csv_column_kind`).
pub(crate) fn sample_csv(
    sample: &[u8],
    options: &crate::spec::FileOptions,
    uri: &str,
) -> Result<(Vec<DetectedColumn>, u64)> {
    let schema = csv_text_schema(sample, options, uri)?;
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_format(files::csv_format(options))
        .build(Cursor::new(sample))
        .map_err(|e| files::csv_error(uri, &e))?;
    let batches: Vec<RecordBatch> = reader
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| files::csv_error(uri, &e))?;
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    let batch = concat(&schema, &batches, uri)?;
    let empty = arrow::array::StringArray::from(Vec::<Option<&str>>::new());
    let columns = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let text = batch
                .as_ref()
                .and_then(|b| {
                    b.column(i)
                        .as_any()
                        .downcast_ref::<arrow::array::StringArray>()
                })
                .unwrap_or(&empty);
            text_column(field.name(), text)
        })
        .collect();
    Ok((columns, rows))
}

/// A text column described as the seed described it: pandas' dtype, the BigQuery type it
/// maps to, the first five present values.
fn text_column(name: &str, text: &arrow::array::StringArray) -> DetectedColumn {
    use super::pandas::{self, ColumnKind};
    let fields = (0..text.len()).map(|r| if text.is_null(r) { "" } else { text.value(r) });
    let missing = pandas::is_na;
    let kind = pandas::csv_column_kind(fields.clone());
    let all_missing = fields.clone().all(missing);
    let dates_only = kind == ColumnKind::Datetime
        && pandas::DatetimeRule::for_column(fields.clone().filter(|f| !missing(f))).is_some_and(
            |rule| {
                let today = chrono::Utc::now().date_naive();
                fields.clone().filter(|f| !missing(f)).all(|f| {
                    rule.parse(f, today).is_ok_and(|t| {
                        t.local.time() == chrono::NaiveTime::MIN && t.offset_seconds.is_none()
                    })
                })
            },
        );
    DetectedColumn {
        name: name.to_string(),
        dtype: kind.dtype().to_string(),
        arrow_type: if all_missing && text.len() > 0 {
            "Null".into()
        } else if dates_only {
            "Date32".into()
        } else {
            kind.dtype().to_string()
        },
        bigquery_type: kind.bigquery_type().to_string(),
        bigquery_mode: "NULLABLE".into(),
        sample_values: fields
            .clone()
            .filter(|f| !missing(f))
            .take(5)
            .map(str::to_string)
            .collect(),
        nullable: fields.clone().any(missing) || text.is_empty(),
    }
}

/// The keys of the sampled objects in the order they first appear.
fn key_order(lines: &[u8]) -> Vec<String> {
    /// One object's keys, in order; the values are skipped.
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(key);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(Visitor)
        }
    }
    let mut order: Vec<String> = Vec::new();
    for line in lines.split(|&b| b == b'\n') {
        if let Ok(Keys(keys)) = serde_json::from_slice::<Keys>(line) {
            for key in keys {
                if !order.contains(&key) {
                    order.push(key);
                }
            }
        }
    }
    order
}

/// Keys inferred as floats whose sampled values are all integers, one of them past INT64:
/// arrow infers those as Float64, which would round them.
fn wide_integer_keys(lines: &[u8], inferred: &Schema) -> std::collections::HashSet<String> {
    let floats: Vec<&str> = inferred
        .fields()
        .iter()
        .filter(|f| f.data_type() == &DataType::Float64)
        .map(|f| f.name().as_str())
        .collect();
    let mut integral: std::collections::HashMap<&str, (bool, bool)> =
        floats.iter().map(|k| (*k, (true, false))).collect();
    if floats.is_empty() {
        return Default::default();
    }
    for line in lines.split(|&b| b == b'\n') {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(line) else {
            continue;
        };
        for (key, seen) in integral.iter_mut() {
            match object.get(*key) {
                Some(serde_json::Value::Number(n)) if n.is_i64() => {}
                Some(serde_json::Value::Number(n)) if n.is_u64() => seen.1 = true,
                None | Some(serde_json::Value::Null) => {}
                Some(_) => seen.0 = false,
            }
        }
    }
    integral
        .into_iter()
        .filter(|(_, (all_integers, past_int64))| *all_integers && *past_int64)
        .map(|(key, _)| key.to_string())
        .collect()
}

/// Where a sample stops being JSON lines, for the error: "line 3: expected value at column 7".
/// A top-level array counts elements, its lines having been rejoined.
fn first_bad_json_line(lines: &[u8], sample: &[u8]) -> Option<String> {
    let unit = match sample.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => "element",
        _ => "line",
    };
    // Numbered as the reader numbers them (`files::read_json`), so both errors agree.
    for (index, line) in lines.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(line) {
            Err(e) => {
                // serde counts within the one line it was given: keep only the column.
                let why = e.to_string();
                let why = match why.split_once(" at line 1 column ") {
                    Some((what, column)) => format!("{what} at column {column}"),
                    None => why,
                };
                return Some(format!("{unit} {number}: not JSON: {why}"));
            }
            Ok(v) if !v.is_object() => {
                return Some(format!(
                    "{unit} {number}: a JSON {} where an object (one row) belongs",
                    json_kind(&v)
                ));
            }
            Ok(_) => {}
        }
    }
    None
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

pub(crate) fn sample_json(sample: &[u8], uri: &str) -> Result<(Vec<DetectedColumn>, u64)> {
    let lines = files::json_lines(sample);
    let (inferred, _) =
        arrow::json::reader::infer_json_schema(Cursor::new(&lines), None).map_err(|e| {
            match first_bad_json_line(&lines, sample) {
                Some(at) => Error::Source(format!("{uri}, {at}")),
                None => Error::Source(format!("{uri}: not JSON lines: {e}")),
            }
        })?;
    for f in inferred.fields() {
        if text_bigquery_type(f.data_type()).is_none() {
            return Err(Error::Source(format!(
                "{uri}: column {:?} holds nested JSON ({}); file sources load flat objects only",
                f.name(),
                f.data_type()
            )));
        }
    }
    // Inference sorts the keys; the columns follow the objects' own order instead.
    let order = key_order(&lines);
    let wide = wide_integer_keys(&lines, &inferred);
    let mut fields: Vec<_> = inferred
        .fields()
        .iter()
        .map(|f| {
            if wide.contains(f.name()) {
                // Integers past INT64 (up to 2^64 - 1) are exact in NUMERIC, not floats.
                Arc::new(
                    f.as_ref()
                        .clone()
                        .with_data_type(DataType::Decimal128(20, 0)),
                )
            } else {
                f.clone()
            }
        })
        .collect();
    fields.sort_by_key(|f| {
        order
            .iter()
            .position(|k| k == f.name())
            .unwrap_or(usize::MAX)
    });
    let schema = Arc::new(Schema::new(fields));
    // Mixed numbers and text infer as text: read the numbers as their text too.
    let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
        .with_coerce_primitive(true)
        .build_decoder()
        .map_err(|e| Error::Source(format!("{uri}: {e}")))?;
    let mut batches = Vec::new();
    for line in lines.split_inclusive(|&b| b == b'\n') {
        decoder
            .decode(line)
            .map_err(|e| Error::Source(format!("{uri}: {e}")))?;
        if decoder.len() >= 8192 {
            batches.extend(
                decoder
                    .flush()
                    .map_err(|e| Error::Source(format!("{uri}: {e}")))?,
            );
        }
    }
    batches.extend(
        decoder
            .flush()
            .map_err(|e| Error::Source(format!("{uri}: {e}")))?,
    );
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    let batch = concat(&schema, &batches, uri)?;
    let objects: Vec<serde_json::Map<String, serde_json::Value>> = lines
        .split(|&b| b == b'\n')
        .filter_map(|line| match serde_json::from_slice(line) {
            Ok(serde_json::Value::Object(o)) => Some(o),
            _ => None,
        })
        .collect();
    let mut columns = describe_columns(batch.as_ref(), &schema, |f| {
        Ok(text_bigquery_type(f.data_type())
            .unwrap_or("STRING")
            .to_string())
    })?;
    // The types pandas' read_json gives (numeric text is a number, a missing integer makes
    // floats), which the seed's fingerprints record.
    for column in &mut columns {
        let values = objects.iter().map(|o| o.get(&column.name));
        if let Some(kind) = super::pandas::json_column_kind(values) {
            column.dtype = kind.dtype().to_string();
            column.bigquery_type = kind.bigquery_type().to_string();
        }
    }
    Ok((columns, rows))
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
mod tests {

    #[test]
    fn json_integers_past_int64_are_not_taken_for_floats() {
        let lines = b"{\"a\": 18446744073709551615, \"b\": 1.5, \"c\": 1}\n{\"a\": 1, \"b\": 18446744073709551615, \"c\": null}\n";
        let schema = Schema::new(vec![
            Field::new("a", DataType::Float64, true),
            Field::new("b", DataType::Float64, true),
            Field::new("c", DataType::Int64, true),
        ]);
        let wide = wide_integer_keys(lines, &schema);
        // a: integers, one past INT64; b: a real float among them; c: inferred an integer.
        assert_eq!(wide, ["a".to_string()].into_iter().collect());
        let (columns, rows) = sample_json(lines, "file:///x.json").unwrap();
        assert_eq!(rows, 2);
        let types: Vec<(&str, &str)> = columns
            .iter()
            .map(|c| (c.name.as_str(), c.bigquery_type.as_str()))
            .collect();
        // c: an integer and a null are float64 to read_json, as to the seed.
        assert_eq!(
            types,
            [("a", "NUMERIC"), ("b", "FLOAT64"), ("c", "FLOAT64")]
        );
    }

    #[test]
    fn json_errors_name_the_line_that_is_not_an_object() {
        let err = |sample: &[u8]| {
            sample_json(sample, "gs://b/x.json")
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(b"{\"a\": 1}\n\n{\"a\": 2}\n{\"a\": 3,, }\n{\"a\": 4}\n"),
            "gs://b/x.json, line 4: not JSON: key must be a string at column 9"
        );
        assert_eq!(
            err(b"{\"a\": 1}\n[1, 2]\n"),
            "gs://b/x.json, line 2: a JSON array where an object (one row) belongs"
        );
        // In a top-level array the count is of elements, whatever the lines.
        assert_eq!(
            err(b"[\n  {\"a\": 1},\n  {\"a\":\n    2},\n  7\n]\n"),
            "gs://b/x.json, element 3: a JSON number where an object (one row) belongs"
        );
    }

    #[test]
    fn repeated_header_names_are_made_distinct_as_pandas_does() {
        let names =
            |list: &[&str]| dedup_names(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // What pandas' read_csv gives for each header (pandas 3.1, C engine).
        assert_eq!(names(&["id", "name", "name"]), ["id", "name", "name.1"]);
        assert_eq!(names(&["a", "a", "a", "b"]), ["a", "a.1", "a.2", "b"]);
        assert_eq!(names(&["a", "a", "a.1"]), ["a", "a.2", "a.1"]);
        assert_eq!(names(&["a.1", "a", "a"]), ["a.1", "a", "a.2"]);
        assert_eq!(names(&["a", "a.1", "a", "a"]), ["a", "a.1", "a.2", "a.3"]);
        assert_eq!(
            names(&["x", "x", "x.1", "x.2", "x"]),
            ["x", "x.3", "x.1", "x.2", "x.4"]
        );
        assert_eq!(
            names(&["b.1", "b", "b", "b.1"]),
            ["b.1", "b", "b.2", "b.1.1"]
        );
    }

    use super::*;

    #[test]
    fn fingerprints_are_the_seeds() {
        // hashlib.md5("id:INT64|amount:FLOAT64".encode()).hexdigest()
        assert_eq!(
            fingerprint([("id", "INT64"), ("amount", "FLOAT64")]),
            "d71a31d8764a032d1ceab178643b3e98"
        );
    }

    #[test]
    fn types_fold_and_map() {
        assert_eq!(canonical_type("integer"), Some("INT64"));
        assert_eq!(canonical_type("FLOAT"), Some("FLOAT64"));
        assert_eq!(canonical_type("BOOLEAN"), Some("BOOL"));
        assert_eq!(canonical_type("RECORD"), None);
        assert_eq!(
            arrow_type_of("TIMESTAMP"),
            Some(DataType::Timestamp(
                TimeUnit::Microsecond,
                Some("UTC".into())
            ))
        );
        assert_eq!(arrow_type_of("NUMERIC"), Some(DataType::Decimal128(38, 9)));
        for ty in [
            "INT64",
            "FLOAT64",
            "BOOL",
            "STRING",
            "BYTES",
            "TIMESTAMP",
            "DATE",
            "DATETIME",
            "TIME",
            "NUMERIC",
            "BIGNUMERIC",
        ] {
            let field = Field::new("c", arrow_type_of(ty).unwrap(), true);
            assert_eq!(
                crate::warehouse::bigquery::bigquery_type(&field).unwrap().0,
                ty
            );
        }
    }

    fn found(name: &str, arrow: &str, bq: &str) -> DetectedColumn {
        DetectedColumn {
            name: name.into(),
            dtype: arrow.into(),
            arrow_type: arrow.into(),
            bigquery_type: bq.into(),
            bigquery_mode: "NULLABLE".into(),
            sample_values: vec![],
            nullable: true,
        }
    }

    #[test]
    fn what_loads_as_what() {
        assert!(loads_as("Int64", "INT64", "FLOAT64"));
        assert!(!loads_as("Float64", "FLOAT64", "INT64"));
        assert!(loads_as("Null", "STRING", "INT64"));
        assert!(loads_as("Date32", "TIMESTAMP", "DATE"));
        assert!(!loads_as("Timestamp(s)", "TIMESTAMP", "DATE"));
        assert!(loads_as("Timestamp(s)", "TIMESTAMP", "DATETIME"));
        assert!(!loads_as("Utf8", "STRING", "BOOL"));
    }

    #[test]
    fn json_columns_follow_the_objects_key_order() {
        let sample = br#"{"zeta": 1, "alpha": "a", "mid": true}
{"zeta": 2, "later": 1.5, "alpha": "b"}
"#;
        let (columns, rows) = sample_json(sample, "mem://x.json").unwrap();
        let named: Vec<(&str, &str)> = columns
            .iter()
            .map(|c| (c.name.as_str(), c.bigquery_type.as_str()))
            .collect();
        assert_eq!(
            named,
            [
                ("zeta", "INT64"),
                ("alpha", "STRING"),
                // true and a missing key: read_json makes that float64 (1.0, NaN).
                ("mid", "FLOAT64"),
                ("later", "FLOAT64")
            ]
        );
        assert_eq!(rows, 2);
    }

    #[test]
    fn detected_columns_widen_across_files() {
        let newest = vec![
            found("id", "Int64", "INT64"),
            found("amount", "Int64", "INT64"),
            found("note", "Null", "STRING"),
            found("flag", "Boolean", "BOOL"),
        ];
        let older = vec![
            found("id", "Int64", "INT64"),
            found("amount", "Float64", "FLOAT64"),
            found("note", "Utf8", "STRING"),
            found("flag", "Utf8", "STRING"),
        ];
        let unified = unify(&newest, &[&older]);
        let text: Vec<String> = unified.iter().map(|(n, t)| format!("{n}:{t}")).collect();
        // BOOL against STRING stays as detected: that difference is drift.
        assert_eq!(
            text,
            vec!["id:INT64", "amount:FLOAT64", "note:STRING", "flag:BOOL"]
        );
    }

    #[test]
    fn drift_names_added_removed_and_changed_columns() {
        let expected = vec![
            ("id".to_string(), "INT64".to_string()),
            ("amount".to_string(), "FLOAT64".to_string()),
            ("note".to_string(), "STRING".to_string()),
            ("at".to_string(), "TIMESTAMP".to_string()),
        ];
        // Integers load as FLOAT64, anything as STRING, an empty column as anything.
        let same = vec![
            found("id", "Int64", "INT64"),
            found("amount", "Int64", "INT64"),
            found("note", "Int64", "INT64"),
            found("at", "Null", "STRING"),
        ];
        assert!(drift(&expected, &same, true).is_empty());
        let other = vec![
            found("id", "Utf8", "STRING"),
            found("amount", "Float64", "FLOAT64"),
            found("extra", "Boolean", "BOOL"),
        ];
        let d = drift(&expected, &other, false);
        assert_eq!(
            d.describe(),
            "added: extra BOOL; removed: note, at; changed: id INT64 -> STRING"
        );
        // Text that does not parse fails the load on its line instead.
        assert_eq!(
            drift(&expected, &other, true).describe(),
            "added: extra BOOL; removed: note, at"
        );
    }
}
