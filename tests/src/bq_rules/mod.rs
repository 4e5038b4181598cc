//! The strict rules layer: what real BigQuery refuses and bqemulator accepts, checked on every
//! request the suite sends to the emulator. The suite's `BIGQUERY_EMULATOR_HOST` points at the
//! `bq-rules` proxy (`proxy.rs`), which evaluates these rules, answers a refused request the
//! way BigQuery would (a failed job, a 400 or a 409), and forwards the rest to bqemulator.
//!
//! One rule per documented limit; each quotes the documentation it enforces (the quotes are
//! from docs.cloud.google.com as of 2026-08). The rules are pure functions of the request and
//! of what the proxy looked up ([`LoadFacts`]), so each has a unit test without a server.
//!
//! Rules marked *emulator fidelity* refuse what BigQuery would accept but bqemulator would do
//! something else with (for example match Parquet columns by position where BigQuery matches
//! by name): a test must not pass on an emulator result that means something else.

pub mod proxy;

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

/// What a refusal looks like on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `jobs.insert` succeeds and the job is DONE with `status.errorResult`: how BigQuery
    /// reports a load, query or copy it cannot run.
    FailedJob,
    /// HTTP 400 `invalid` on the request itself.
    Invalid,
    /// HTTP 409 `duplicate`.
    Duplicate,
}

/// One request refused by one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The rule's name, e.g. `load.parquet.json_column`.
    pub rule: &'static str,
    pub answer: Answer,
    pub message: String,
}

impl Refusal {
    fn job(rule: &'static str, message: String) -> Self {
        Refusal {
            rule,
            answer: Answer::FailedJob,
            message,
        }
    }

    fn invalid(rule: &'static str, message: String) -> Self {
        Refusal {
            rule,
            answer: Answer::Invalid,
            message,
        }
    }

    /// The text BigQuery's error carries: the message, then which rule of the layer said it.
    pub fn text(&self) -> String {
        format!("{} [shardflow rules layer: {}]", self.message, self.rule)
    }
}

/// Every rule the layer enforces, with the documentation's words; `GET /rules` lists them.
pub const RULES: &[(&str, &str)] = &[
    (
        "job.id.format",
        "JobReference.jobId: \"The ID must contain only letters (a-z, A-Z), numbers (0-9), \
         underscores (_), or dashes (-). The maximum length is 1,024 characters.\"",
    ),
    (
        "job.id.duplicate",
        "Error messages, duplicate (409): \"This error returns when trying to create a job, \
         dataset, or table that already exists.\" (bqemulator runs the job again)",
    ),
    (
        "job.location.dataset",
        "Locations: \"BigQuery returns an error if the specified location does not match the \
         location of the datasets in the request.\"",
    ),
    (
        "load.source_uris.max",
        "Quotas, load jobs: \"A job configuration can have up to 10,000 source URIs.\"",
    ),
    (
        "load.source_uris.wildcard",
        "JobConfigurationLoad.sourceUris: \"Each URI can contain one '*' wildcard character and \
         it must come after the 'bucket' name.\"",
    ),
    (
        "load.source_uris.generation",
        "Batch loading: \"If you include a generation number in the Cloud Storage URI, then the \
         load job fails.\"",
    ),
    (
        "load.compression.mixed",
        "Loading CSV / JSON data: \"You cannot include both compressed and uncompressed files in \
         the same load job.\"",
    ),
    (
        "load.compression.gzip_only",
        "Batch loading: \"gzip is the only supported file compression type for CSV and JSON files \
         when loading data into BigQuery.\"",
    ),
    (
        "load.compression.gzip_size",
        "Quotas, load jobs: \"The size limit for a compressed CSV file is 4 GB.\" / \"The size \
         limit for a compressed ndJSON file is 4 GB.\"",
    ),
    (
        "load.location.colocated",
        "Loading data from Cloud Storage: \"the dataset that contains the table must be in the \
         same regional or multi-regional location as the Cloud Storage bucket\"; \"the Cloud \
         Storage bucket must be in the same region or contained in the same multi-region as the \
         dataset\" (a region inside it loads at a data transfer charge)",
    ),
    (
        "load.write_disposition.values",
        "JobConfigurationLoad.writeDisposition: WRITE_TRUNCATE, WRITE_TRUNCATE_DATA, \
         WRITE_APPEND, WRITE_EMPTY",
    ),
    (
        "load.write_truncate.schema",
        "JobConfigurationLoad.schemaUpdateOptions: \"For normal tables, WRITE_TRUNCATE will always \
         overwrite the schema\"; WRITE_TRUNCATE_DATA: \"BigQuery overwrites the data, but keeps \
         the constraints and schema of the existing table.\"",
    ),
    (
        "load.json_column.format",
        "Working with JSON data: \"If you use a batch load job to ingest JSON data into a table, \
         the source data must be in CSV, Avro, or JSON format. Other batch load formats are not \
         supported.\"",
    ),
    (
        "load.parquet.decimal_target_types",
        "JobConfigurationLoad.decimalTargetTypes: \"In the order of NUMERIC, BIGNUMERIC, and \
         STRING, a type is picked if it is in the specified list and if it supports the precision \
         and the scale. [...] Defaults to [\\\"NUMERIC\\\", \\\"STRING\\\"] for ORC and \
         [\\\"NUMERIC\\\"] for the other file formats.\"",
    ),
    (
        "load.parquet.unsigned",
        "Parquet conversions: INT64 with UINT_64 loads as INT64; \"In the case of UINT_64, an \
         error will be returned if the unsigned value exceeds the maximum INTEGER value of \
         9,223,372,036,854,775,807.\"",
    ),
    (
        "load.parquet.nanoseconds",
        "Parquet conversions lists TIMESTAMP and TIME in MILLIS and MICROS only: \"Other \
         combinations of Parquet types and converted types are not supported.\"",
    ),
    (
        "load.parquet.column_names",
        "TableFieldSchema.name: \"The name must contain only letters (a-z, A-Z), numbers (0-9), \
         or underscores (_), and must start with a letter or underscore.\" Parquet: \"You cannot \
         load Parquet files containing columns that have a period (.) in the column name.\" \
         (flexible names depend on the project's columnNameCharacterMap)",
    ),
    (
        "load.parquet.case_collision",
        "Parquet: \"Column names from Parquet files are treated as case-insensitive when loaded \
         into BigQuery. Identical case-insensitive names will cause collisions.\"",
    ),
    (
        "load.parquet.required",
        "Managing table schemas: \"When appending data from Avro, ORC, or Parquet files, relax \
         columns to NULL in your schema [...] Set the --schema_update_option flag to \
         ALLOW_FIELD_RELAXATION\"",
    ),
    (
        "load.parquet.by_position",
        "emulator fidelity: BigQuery matches Parquet columns to the table's by name; bqemulator \
         by position (INSERT ... SELECT *), so a file whose columns are in another order would \
         load other columns here",
    ),
    (
        "query.destination_table",
        "emulator fidelity: bqemulator writes nothing for a query job's destinationTable; write \
         with DML instead",
    ),
    (
        "copy.write_disposition.values",
        "JobConfigurationTableCopy.writeDisposition lists WRITE_TRUNCATE, WRITE_APPEND and \
         WRITE_EMPTY (not WRITE_TRUNCATE_DATA); \"The default value is WRITE_EMPTY.\"",
    ),
    (
        "copy.write_truncate.schema",
        "JobConfigurationTableCopy.writeDisposition: \"WRITE_TRUNCATE: If the table already \
         exists, BigQuery overwrites the table data and uses the schema and table constraints \
         from the source table.\"",
    ),
    (
        "copy.by_position",
        "emulator fidelity: bqemulator copies into an existing table by position",
    ),
    (
        "table.column_names",
        "Column names: \"A column name can contain letters (a-z, A-Z), numbers (0-9), or \
         underscores (_), and it must start with a letter or underscore. [...] Column names have \
         a maximum length of 300 characters. Column names can't use any of the following \
         prefixes: _TABLE_, _FILE_, _PARTITION, _ROW_TIMESTAMP, __ROOT__, _COLIDENTIFIER, \
         _CHANGE_SEQUENCE_NUMBER, _CHANGE_TYPE, _CHANGE_TIMESTAMP\"",
    ),
    (
        "table.duplicate_columns",
        "Column names: \"Duplicate column names are not allowed even if the case differs.\"",
    ),
    (
        "table.column_count",
        "Quotas: \"A table can have up to 10,000 columns.\"",
    ),
    (
        "table.description_length",
        "Quotas: \"Maximum length of a column description — 1,024 characters\"",
    ),
    (
        "dataset.location",
        "shardflow's own rule: a dataset is created only where BIGQUERY_LOCATION says (\"The \
         dataset location can only be set at creation time.\"), never in the default",
    ),
];

/// The documented quote of a rule, for messages.
pub fn quote(rule: &str) -> &'static str {
    RULES
        .iter()
        .find(|(name, _)| *name == rule)
        .map_or("", |(_, text)| text)
}

// ---------------------------------------------------------------------------------------------
// Facts the proxy looks up for a request
// ---------------------------------------------------------------------------------------------

/// A column of an existing table, as `tables.get` returns it (type folded to standard SQL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableColumn {
    pub name: String,
    pub ty: String,
    pub mode: String,
    pub description: Option<String>,
}

impl TableColumn {
    pub fn from_json(field: &Value) -> Self {
        let text = |key: &str| field.get(key).and_then(Value::as_str).map(str::to_string);
        TableColumn {
            name: text("name").unwrap_or_default(),
            ty: standard_type(&text("type").unwrap_or_default()).to_string(),
            mode: text("mode").unwrap_or_else(|| "NULLABLE".into()),
            description: text("description").filter(|d| !d.is_empty()),
        }
    }
}

/// `tables.get`'s legacy type names as standard SQL.
pub fn standard_type(ty: &str) -> &str {
    match ty {
        "INTEGER" => "INT64",
        "FLOAT" => "FLOAT64",
        "BOOLEAN" => "BOOL",
        "RECORD" => "STRUCT",
        other => other,
    }
}

/// What a Parquet column's footer says, as far as the rules care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParquetKind {
    Decimal {
        precision: i32,
        scale: i32,
    },
    UnsignedInt64,
    /// TIMESTAMP or TIME in nanoseconds.
    Nanoseconds,
    /// BYTE_ARRAY annotated STRING, ENUM or JSON.
    Text,
    /// A type BigQuery converts to exactly one column type (given here).
    Other(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParquetColumn {
    pub name: String,
    pub nullable: bool,
    pub kind: ParquetKind,
}

impl ParquetColumn {
    /// The BigQuery type a WRITE_TRUNCATE load would give this column (decimals by the job's
    /// target types).
    fn loads_as(&self, targets: &[String]) -> String {
        match &self.kind {
            ParquetKind::Decimal { precision, scale } => {
                decimal_target(*precision, *scale, targets).0.to_string()
            }
            ParquetKind::UnsignedInt64 => "INT64".into(),
            ParquetKind::Nanoseconds => "unsupported".into(),
            ParquetKind::Text => "STRING".into(),
            ParquetKind::Other(ty) => (*ty).into(),
        }
    }
}

/// One source file of a load, as the proxy found it in the GCS emulator's storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    pub uri: String,
    pub size: u64,
    pub compression: FileCompression,
    /// The footer's columns, for a Parquet file.
    pub parquet: Option<Vec<ParquetColumn>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileCompression {
    None,
    Gzip,
    /// Another whole-file compression (zstd, bzip2, ...), found by its magic bytes.
    Other(&'static str),
}

/// What the proxy looked up for a load job.
#[derive(Clone, Debug, Default)]
pub struct LoadFacts {
    /// The destination dataset's location, when the dataset exists.
    pub dataset_location: Option<String>,
    /// Bucket name → its location, for the buckets the URIs name.
    pub bucket_locations: BTreeMap<String, String>,
    /// The destination table's columns, when it exists.
    pub table: Option<Vec<TableColumn>>,
    /// Every file the URIs match.
    pub files: Vec<SourceFile>,
}

/// What the proxy looked up for a copy job.
#[derive(Clone, Debug, Default)]
pub struct CopyFacts {
    pub source: Option<Vec<TableColumn>>,
    pub destination: Option<Vec<TableColumn>>,
}

// ---------------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------------

/// `job.id.format`.
pub fn check_job_id(id: &str) -> Option<Refusal> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (!ok).then(|| {
        Refusal::invalid(
            "job.id.format",
            format!(
                "Invalid job ID \"{}\". Job IDs must be alphanumeric (plus underscores and \
                 dashes) and must be at most 1024 characters long.",
                id.chars().take(80).collect::<String>()
            ),
        )
    })
}

/// `job.id.duplicate`: the answer BigQuery gives a second insert of an existing job id.
pub fn duplicate_job(project: &str, location: &str, id: &str) -> Refusal {
    Refusal {
        rule: "job.id.duplicate",
        answer: Answer::Duplicate,
        message: format!("Already Exists: Job {project}:{location}.{id}"),
    }
}

/// `job.location.dataset`: a job that names a location runs there, and the datasets it writes
/// must be in it.
pub fn check_job_location(
    job_location: Option<&str>,
    dataset_location: Option<&str>,
) -> Option<Refusal> {
    let (job, dataset) = (job_location?, dataset_location?);
    (!job.eq_ignore_ascii_case(dataset)).then(|| {
        Refusal::invalid(
            "job.location.dataset",
            format!("Cannot run a job in location {job}: the destination dataset is in {dataset}"),
        )
    })
}

fn text<'a>(config: &'a Value, key: &str) -> Option<&'a str> {
    config.get(key).and_then(Value::as_str)
}

/// The table a `{projectId, datasetId, tableId}` reference names, as `project.dataset.table`.
pub fn table_name(reference: &Value) -> Option<String> {
    Some(format!(
        "{}.{}.{}",
        text(reference, "projectId")?,
        text(reference, "datasetId")?,
        text(reference, "tableId")?
    ))
}

/// Every rule of a load job (`configuration.load`); the refusals in the order BigQuery would
/// meet them.
pub fn check_load(load: &Value, facts: &LoadFacts) -> Vec<Refusal> {
    let mut out = Vec::new();
    let format = text(load, "sourceFormat").unwrap_or("CSV");
    let uris: Vec<&str> = load
        .get("sourceUris")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let table = load
        .get("destinationTable")
        .and_then(table_name)
        .unwrap_or_else(|| "(no table)".into());

    if uris.len() > 10_000 {
        out.push(Refusal::job(
            "load.source_uris.max",
            format!(
                "Too many source URIs: {} (a job configuration can have up to 10,000 source URIs)",
                uris.len()
            ),
        ));
    }
    for uri in &uris {
        let object = uri.strip_prefix("gs://").and_then(|r| r.split_once('/'));
        let wildcards = uri.matches('*').count();
        if wildcards > 1 || object.is_some_and(|(bucket, _)| bucket.contains('*')) {
            out.push(Refusal::job(
                "load.source_uris.wildcard",
                format!(
                    "Invalid source URI {uri}: one '*' wildcard at most, and only after the bucket name"
                ),
            ));
        }
        if object.is_some_and(|(_, name)| name.contains('#')) {
            out.push(Refusal::job(
                "load.source_uris.generation",
                format!(
                    "Invalid source URI {uri}: BigQuery does not load a Cloud Storage generation"
                ),
            ));
        }
    }

    let text_format = matches!(format, "CSV" | "NEWLINE_DELIMITED_JSON");
    if text_format {
        out.extend(check_compression(&facts.files));
    }
    out.extend(check_location(facts));
    out.extend(check_write_disposition(load, &table));

    let table_columns = facts.table.as_deref();
    if let Some(columns) = table_columns
        && !matches!(format, "CSV" | "NEWLINE_DELIMITED_JSON" | "AVRO")
        && let Some(json) = columns.iter().find(|c| c.ty == "JSON")
    {
        out.push(Refusal::job(
            "load.json_column.format",
            format!(
                "Unsupported field type JSON for column {} of {table} in a {format} load: JSON \
                 columns load from CSV, Avro or newline-delimited JSON only",
                json.name
            ),
        ));
    }
    if format == "PARQUET" {
        out.extend(check_parquet(load, facts, &table));
    }
    out
}

fn check_compression(files: &[SourceFile]) -> Vec<Refusal> {
    let mut out = Vec::new();
    for f in files {
        if let FileCompression::Other(kind) = f.compression {
            out.push(Refusal::job(
                "load.compression.gzip_only",
                format!(
                    "{} is {kind}-compressed; CSV and JSON files load plain or gzip only",
                    f.uri
                ),
            ));
        }
        if f.compression == FileCompression::Gzip && f.size > 4 << 30 {
            out.push(Refusal::job(
                "load.compression.gzip_size",
                format!(
                    "{} is a gzip file of {} bytes; the limit for a compressed file is 4 GB",
                    f.uri, f.size
                ),
            ));
        }
    }
    let gzip = files
        .iter()
        .filter(|f| f.compression == FileCompression::Gzip)
        .count();
    let plain = files
        .iter()
        .filter(|f| f.compression == FileCompression::None)
        .count();
    if gzip > 0 && plain > 0 {
        out.push(Refusal::job(
            "load.compression.mixed",
            format!(
                "The load mixes {gzip} gzip-compressed and {plain} uncompressed files; BigQuery \
                 does not load both in one job"
            ),
        ));
    }
    out
}

/// Whether a bucket location may feed a dataset location: the same, or inside the dataset's
/// multi-region (the `us-*` regions and NAM4 for US; the EU's `europe-*` regions, not
/// europe-west2 or europe-west6, and EUR4 for EU).
pub fn colocated(dataset: &str, bucket: &str) -> bool {
    let (dataset, bucket) = (dataset.to_ascii_lowercase(), bucket.to_ascii_lowercase());
    if dataset == bucket {
        return true;
    }
    match dataset.as_str() {
        "us" => bucket.starts_with("us-") || bucket == "nam4",
        "eu" => {
            bucket == "eur4"
                || (bucket.starts_with("europe-")
                    && bucket != "europe-west2"
                    && bucket != "europe-west6")
        }
        _ => false,
    }
}

fn check_location(facts: &LoadFacts) -> Vec<Refusal> {
    let Some(dataset) = &facts.dataset_location else {
        return Vec::new();
    };
    facts
        .bucket_locations
        .iter()
        .filter(|(_, location)| !colocated(dataset, location))
        .map(|(bucket, location)| {
            Refusal::job(
                "load.location.colocated",
                format!(
                    "Cannot read and write in different locations: source: gs://{bucket} is in \
                     {location}, destination dataset is in {dataset}"
                ),
            )
        })
        .collect()
}

const LOAD_DISPOSITIONS: &[&str] = &[
    "WRITE_TRUNCATE",
    "WRITE_TRUNCATE_DATA",
    "WRITE_APPEND",
    "WRITE_EMPTY",
];

fn check_write_disposition(load: &Value, table: &str) -> Vec<Refusal> {
    match text(load, "writeDisposition") {
        Some(d) if !LOAD_DISPOSITIONS.contains(&d) => vec![Refusal::job(
            "load.write_disposition.values",
            format!("Invalid write disposition {d} for a load into {table}"),
        )],
        _ => Vec::new(),
    }
}

/// The type `decimalTargetTypes` picks for decimal(p, s), and whether it holds every value:
/// NUMERIC, BIGNUMERIC, STRING in that order, the first listed that supports p and s, else
/// the widest listed.
pub fn decimal_target(precision: i32, scale: i32, targets: &[String]) -> (&'static str, bool) {
    let fits_numeric = (0..=9).contains(&scale) && precision - scale <= 29;
    let fits_bignumeric = (0..=38).contains(&scale) && precision - scale <= 38;
    let listed = |t: &str| targets.iter().any(|x| x == t);
    let order = [
        ("NUMERIC", fits_numeric),
        ("BIGNUMERIC", fits_bignumeric),
        ("STRING", true),
    ];
    if let Some((ty, _)) = order.iter().find(|(ty, fits)| listed(ty) && *fits) {
        return (ty, true);
    }
    // None fits: the widest listed one, which fails on a value past its range.
    let widest = order
        .iter()
        .rev()
        .find(|(ty, _)| listed(ty))
        .map_or("NUMERIC", |(ty, _)| *ty);
    (widest, false)
}

/// A plain column name: letters, digits, underscores, not starting with a digit.
pub fn is_plain_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_parquet(load: &Value, facts: &LoadFacts, table: &str) -> Vec<Refusal> {
    let mut out = Vec::new();
    let targets: Vec<String> = match load.get("decimalTargetTypes").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        None => vec!["NUMERIC".into()],
    };
    let relaxation = load
        .get("schemaUpdateOptions")
        .and_then(Value::as_array)
        .is_some_and(|o| {
            o.iter()
                .any(|v| v.as_str() == Some("ALLOW_FIELD_RELAXATION"))
        });
    let truncate = text(load, "writeDisposition") == Some("WRITE_TRUNCATE");
    for file in &facts.files {
        let Some(columns) = &file.parquet else {
            continue;
        };
        let mut seen = HashSet::new();
        for c in columns {
            if !is_plain_name(&c.name) || c.name.len() > 300 {
                out.push(Refusal::job(
                    "load.parquet.column_names",
                    format!(
                        "Invalid field name \"{}\" in {}. Fields must contain only letters, \
                         numbers, and underscores, start with a letter or underscore, and be at \
                         most 300 characters long.",
                        c.name, file.uri
                    ),
                ));
            }
            if !seen.insert(c.name.to_lowercase()) {
                out.push(Refusal::job(
                    "load.parquet.case_collision",
                    format!(
                        "Duplicate column names in {}: \"{}\" collides with another column when \
                         case is ignored",
                        file.uri, c.name
                    ),
                ));
            }
            if c.kind == ParquetKind::Nanoseconds {
                out.push(Refusal::job(
                    "load.parquet.nanoseconds",
                    format!(
                        "Unsupported Parquet type for column {} in {}: nanosecond TIMESTAMP or TIME",
                        c.name, file.uri
                    ),
                ));
            }
            let dest = facts
                .table
                .as_deref()
                .and_then(|t| t.iter().find(|d| d.name.eq_ignore_ascii_case(&c.name)));
            if let ParquetKind::Decimal { precision, scale } = c.kind {
                let (picked, fits) = decimal_target(precision, scale, &targets);
                let column_type = dest.map(|d| d.ty.as_str());
                if !fits || column_type.is_some_and(|ty| ty != picked) {
                    out.push(Refusal::job(
                        "load.parquet.decimal_target_types",
                        format!(
                            "Column {} of {} is decimal({precision},{scale}); decimalTargetTypes \
                             {targets:?} loads it as {picked}{}",
                            c.name,
                            file.uri,
                            match column_type {
                                Some(ty) if ty != picked => format!(", not the table's {ty}"),
                                _ => ", which cannot hold every value of it".into(),
                            }
                        ),
                    ));
                }
            }
            if c.kind == ParquetKind::UnsignedInt64
                && let Some(d) = dest
                && d.ty != "INT64"
            {
                out.push(Refusal::job(
                    "load.parquet.unsigned",
                    format!(
                        "Column {} of {} is an unsigned 64-bit integer, which loads as INT64, not \
                         as the table's {}",
                        c.name, file.uri, d.ty
                    ),
                ));
            }
            if c.nullable
                && !relaxation
                && let Some(d) = dest
                && d.mode == "REQUIRED"
            {
                out.push(Refusal::job(
                    "load.parquet.required",
                    format!(
                        "Provided Schema does not match Table {table}. Field {} has changed mode \
                         from REQUIRED to NULLABLE",
                        d.name
                    ),
                ));
            }
        }
        if let Some(existing) = facts.table.as_deref() {
            let file_names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
            let table_names: Vec<&str> = existing.iter().map(|c| c.name.as_str()).collect();
            if !file_names
                .iter()
                .map(|n| n.to_lowercase())
                .eq(table_names.iter().map(|n| n.to_lowercase()))
            {
                out.push(Refusal::job(
                    "load.parquet.by_position",
                    format!(
                        "{} has columns [{}] where {table} has [{}]: bqemulator would load them \
                         by position, BigQuery by name",
                        file.uri,
                        file_names.join(", "),
                        table_names.join(", ")
                    ),
                ));
            }
            if truncate {
                let derived: Vec<(String, String, String)> = columns
                    .iter()
                    .map(|c| {
                        let mode = if c.nullable { "NULLABLE" } else { "REQUIRED" };
                        (
                            c.name.to_lowercase(),
                            c.loads_as(&targets),
                            mode.to_string(),
                        )
                    })
                    .collect();
                out.extend(check_truncated_schema(
                    "load.write_truncate.schema",
                    table,
                    existing,
                    &derived,
                    &file.uri,
                ));
            }
        }
    }
    out
}

/// WRITE_TRUNCATE replaces an existing table's schema with `incoming`: refused when that
/// drops or retypes a column, or loses a description.
fn check_truncated_schema(
    rule: &'static str,
    table: &str,
    existing: &[TableColumn],
    incoming: &[(String, String, String)],
    from: &str,
) -> Option<Refusal> {
    let mut changes = Vec::new();
    for column in existing {
        match incoming
            .iter()
            .find(|(n, _, _)| *n == column.name.to_lowercase())
        {
            None => changes.push(format!("drops column {}", column.name)),
            Some((_, ty, mode)) => {
                if *ty != column.ty {
                    changes.push(format!(
                        "changes {} from {} to {ty}",
                        column.name, column.ty
                    ));
                }
                if *mode != column.mode {
                    changes.push(format!(
                        "changes the mode of {} from {} to {mode}",
                        column.name, column.mode
                    ));
                }
                if column.description.is_some() {
                    changes.push(format!("loses the description of {}", column.name));
                }
            }
        }
    }
    (!changes.is_empty()).then(|| {
        Refusal::job(
            rule,
            format!(
                "WRITE_TRUNCATE from {from} would overwrite the schema of {table}: it {}; \
                 WRITE_TRUNCATE_DATA keeps the table's schema",
                changes.join(", ")
            ),
        )
    })
}

/// A query job: bqemulator ignores `destinationTable`, so a job that uses it is refused.
pub fn check_query(query: &Value) -> Vec<Refusal> {
    match query.get("destinationTable").and_then(table_name) {
        Some(table) => vec![Refusal::job(
            "query.destination_table",
            format!(
                "A query job writing its result to {table} (destinationTable, {}) would write \
                 nothing on bqemulator",
                text(query, "writeDisposition").unwrap_or("WRITE_EMPTY")
            ),
        )],
        None => Vec::new(),
    }
}

const COPY_DISPOSITIONS: &[&str] = &["WRITE_TRUNCATE", "WRITE_APPEND", "WRITE_EMPTY"];

pub fn check_copy(copy: &Value, facts: &CopyFacts) -> Vec<Refusal> {
    let mut out = Vec::new();
    let table = copy
        .get("destinationTable")
        .and_then(table_name)
        .unwrap_or_else(|| "(no table)".into());
    let disposition = text(copy, "writeDisposition").unwrap_or("WRITE_EMPTY");
    if !COPY_DISPOSITIONS.contains(&disposition) {
        out.push(Refusal::job(
            "copy.write_disposition.values",
            format!("Invalid write disposition {disposition} for a copy into {table}"),
        ));
    }
    if let (Some(source), Some(dest)) = (&facts.source, &facts.destination) {
        if disposition == "WRITE_TRUNCATE" {
            let incoming: Vec<(String, String, String)> = source
                .iter()
                .map(|c| (c.name.to_lowercase(), c.ty.clone(), c.mode.clone()))
                .collect();
            // A copy takes the source's descriptions too: only those it would lose count.
            let dest_losing: Vec<TableColumn> = dest
                .iter()
                .map(|d| TableColumn {
                    description: d.description.clone().filter(|text| {
                        !source.iter().any(|s| {
                            s.name.eq_ignore_ascii_case(&d.name)
                                && s.description.as_ref() == Some(text)
                        })
                    }),
                    ..d.clone()
                })
                .collect();
            out.extend(check_truncated_schema(
                "copy.write_truncate.schema",
                &table,
                &dest_losing,
                &incoming,
                "the copy's source",
            ));
        }
        let names = |t: &[TableColumn]| t.iter().map(|c| c.name.to_lowercase()).collect::<Vec<_>>();
        if names(source) != names(dest) {
            out.push(Refusal::job(
                "copy.by_position",
                format!(
                    "The copy's source has columns [{}] where {table} has [{}]: bqemulator copies \
                     by position",
                    names(source).join(", "),
                    names(dest).join(", ")
                ),
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tables and datasets
// ---------------------------------------------------------------------------------------------

const RESERVED_PREFIXES: &[&str] = &[
    "_TABLE_",
    "_FILE_",
    "_PARTITION",
    "_ROW_TIMESTAMP",
    "__ROOT__",
    "_COLIDENTIFIER",
    "_CHANGE_SEQUENCE_NUMBER",
    "_CHANGE_TYPE",
    "_CHANGE_TIMESTAMP",
];

/// Why BigQuery refuses a column name, if it does.
pub fn column_name_problem(name: &str) -> Option<String> {
    if !is_plain_name(name) {
        return Some(format!(
            "Invalid field name \"{name}\". Fields must contain only letters, numbers, and \
             underscores, start with a letter or underscore"
        ));
    }
    if name.len() > 300 {
        return Some(format!(
            "Invalid field name \"{}…\": longer than 300 characters",
            &name[..40]
        ));
    }
    let upper = name.to_ascii_uppercase();
    RESERVED_PREFIXES
        .iter()
        .find(|p| upper.starts_with(*p))
        .map(|p| format!("Invalid field name \"{name}\": the prefix {p} is reserved"))
}

/// `tables.insert`: names, duplicates (case-insensitive), column count, description length.
pub fn check_table(table: &Value) -> Vec<Refusal> {
    let mut out = Vec::new();
    let fields: Vec<&Value> = table
        .pointer("/schema/fields")
        .and_then(Value::as_array)
        .map(|f| f.iter().collect())
        .unwrap_or_default();
    if fields.len() > 10_000 {
        out.push(Refusal::invalid(
            "table.column_count",
            format!(
                "Too many columns: {} (a table can have up to 10,000)",
                fields.len()
            ),
        ));
    }
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for field in fields {
        let column = TableColumn::from_json(field);
        if let Some(problem) = column_name_problem(&column.name) {
            out.push(Refusal::invalid("table.column_names", problem));
        }
        if let Some(first) = seen.insert(column.name.to_lowercase(), column.name.clone()) {
            out.push(Refusal::invalid(
                "table.duplicate_columns",
                format!(
                    "Field {} already exists in schema (as {first}): column names are \
                     case-insensitive",
                    column.name
                ),
            ));
        }
        if column
            .description
            .as_ref()
            .is_some_and(|d| d.chars().count() > 1024)
        {
            out.push(Refusal::invalid(
                "table.description_length",
                format!(
                    "The description of column {} is longer than 1,024 characters",
                    column.name
                ),
            ));
        }
    }
    out
}

/// `datasets.insert` must say where.
pub fn check_dataset(dataset: &Value) -> Option<Refusal> {
    let located = text(dataset, "location").is_some_and(|l| !l.trim().is_empty());
    (!located).then(|| {
        Refusal::invalid(
            "dataset.location",
            format!(
                "Dataset {} is created without a location (it would land in the default, US): \
                 shardflow creates datasets only in BIGQUERY_LOCATION",
                dataset
                    .pointer("/datasetReference/datasetId")
                    .and_then(Value::as_str)
                    .unwrap_or("(unnamed)")
            ),
        )
    })
}

#[cfg(test)]
mod tests;
