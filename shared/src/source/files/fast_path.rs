//! The fast path: whether BigQuery can load a job's files where they lie, in one load job, as
//! the workers would have read them; and if not, why.

use crate::source::files::schema::DetectedSchema;
use crate::source::files::{self, FileInfo, FileLocation};
use crate::spec::{Compression, FileFormat, JobSpec, Load, SourceType, TextEncoding};
use crate::warehouse::NativeFormat;

/// BigQuery's limit for one gzip-compressed CSV or JSON file.
pub(super) const BIGQUERY_MAX_GZIP_BYTES: u64 = 4 << 30;

/// The fast path: one load job over the source URIs.
#[derive(Clone, Debug)]
pub struct DirectLoad {
    pub format: NativeFormat,
    pub uris: Vec<String>,
    pub files: Vec<FileInfo>,
}

/// A Parquet column BigQuery would read differently from the workers: nanoseconds (it
/// truncates them; the workers refuse to) and unsigned integers (the workers widen them).
pub(super) fn needs_conversion(arrow_type: &str) -> bool {
    use arrow_schema::{DataType, TimeUnit};
    match arrow_type.parse::<DataType>() {
        Ok(
            DataType::Timestamp(TimeUnit::Nanosecond, _) | DataType::Time64(TimeUnit::Nanosecond),
        ) => true,
        Ok(t) => t.is_unsigned_integer() || t.is_nested(),
        // A type this code cannot name is left to the workers.
        Err(_) => true,
    }
}

/// The time formats BigQuery's JSON reader takes for a column of `job_type` (loading JSON
/// from Cloud Storage: "values in DATE columns must use the dash (-) separator and the date
/// must be in the following format: YYYY-MM-DD"; "values in TIMESTAMP columns must use a dash
/// (-) or slash (/) separator for the date portion of the timestamp, and the date must be in
/// one of the following formats: YYYY-MM-DD (year-month-day) or YYYY/MM/DD (year/month/day).
/// The hh:mm:ss (hour-minute-second) portion of the timestamp must use a colon (:)
/// separator").
pub(super) fn bigquery_reads_time(format: &str, job_type: &str) -> bool {
    let rest = format.strip_suffix("%z").unwrap_or(format);
    let rest = rest.strip_suffix(".%f").unwrap_or(rest);
    match job_type {
        "DATE" => rest == "%Y-%m-%d",
        _ => matches!(
            rest,
            "%Y-%m-%d"
                | "%Y-%m-%d %H:%M:%S"
                | "%Y-%m-%dT%H:%M:%S"
                | "%Y/%m/%d"
                | "%Y/%m/%d %H:%M:%S"
        ),
    }
}

/// What a JSON column's values are as JSON (arrow's inference), where BigQuery reads them as
/// they are: the type pandas' rules give it may differ (`true` with a null is FLOAT64,
/// numeric text INT64), and then only the workers convert them.
pub(super) fn json_reads_as(arrow_type: &str) -> Option<&'static str> {
    Some(match arrow_type {
        "Int64" => "INT64",
        "Float64" => "FLOAT64",
        "Boolean" => "BOOL",
        "Utf8" => "STRING",
        _ => return None,
    })
}

/// Whether BigQuery can load these files as they lie with the same result the workers would
/// give: same columns in the same order, options it supports, nothing to convert. Err says
/// why the workers read them instead.
pub fn native_format(
    spec: &JobSpec,
    warehouse_loads_gcs: bool,
    files: &[(&FileInfo, &DetectedSchema)],
    columns: &[(String, String)],
    added_columns: bool,
) -> std::result::Result<NativeFormat, String> {
    let Some(f) = spec.files() else {
        return Err("not a file job".into());
    };
    if files.is_empty() {
        return Err("no new file".into());
    }
    if spec.source_type != SourceType::Gcs {
        return Err(format!(
            "the files are on {:?}; BigQuery loads only gs:// files itself",
            spec.source_type
        ));
    }
    if !warehouse_loads_gcs {
        return Err("the warehouse is not BigQuery".into());
    }
    if spec.selected_columns.is_some() {
        return Err(
            "selected_columns picks some of the files' columns; the workers project them".into(),
        );
    }
    if added_columns {
        return Err(
            "columns were added under schema_policy \"add_columns\"; the workers load the files \
             that lack them with NULLs"
                .into(),
        );
    }
    if f.format == FileFormat::Csv {
        // BigQuery's CSV parser keeps pandas' missing-value markers ("NA", "null", …) as text
        // and reads only ISO dates; the values Django's schema was detected for are pandas'.
        return Err(
            "BigQuery's CSV reader is not pandas': it keeps missing-value markers such as NA as \
             text and reads other date formats, so the workers read CSV files"
                .into(),
        );
    }
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    for (file, detected) in files {
        // JSON times BigQuery reads are year-first ("YYYY-MM-DD[( |T)HH:MM:SS[.F]][zone]");
        // other formats pandas reads are read by the workers.
        if let Some((column, value)) = detected.columns.iter().find_map(|c| {
            let (_, t) = columns.iter().find(|(n, t)| {
                n == &c.name && matches!(t.as_str(), "TIMESTAMP" | "DATETIME" | "DATE")
            })?;
            let foreign = c.sample_values.iter().find(|v| {
                !v.is_empty()
                    && !crate::source::files::pandas::guess_format(v)
                        .is_some_and(|f| bigquery_reads_time(&f, t))
            })?;
            Some((&c.name, foreign))
        }) {
            return Err(format!(
                "{} column {column} holds times such as {value:?}, which BigQuery does not read; \
                 the workers read them as pandas does",
                file.path
            ));
        }
        if f.format == FileFormat::Json
            && let Some((c, job_type)) = detected.columns.iter().find_map(|c| {
                let (_, t) = columns.iter().find(|(n, _)| n == &c.name)?;
                let as_json = json_reads_as(&c.arrow_type)?;
                // Integers as JSON numbers do not go to BigQuery as they are: "If you use the
                // BigQuery API to load an integer outside the range of [-2^53+1, 2^53-1] ...
                // into an integer (INT64) column, pass it as a string to avoid data
                // corruption", and a sample cannot tell that no later value is. As text
                // ("id": "1") they load exactly.
                let integer_text = as_json == "STRING"
                    && matches!(t.as_str(), "INT64" | "NUMERIC" | "BIGNUMERIC")
                    && c.sample_values.iter().all(|v| {
                        let digits = v.strip_prefix('-').unwrap_or(v);
                        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
                    });
                let same = (as_json == t && t != "INT64")
                    // Into FLOAT64 an integer becomes the nearest double, as in pandas.
                    || (as_json == "INT64" && t == "FLOAT64")
                    || integer_text
                    || (as_json == "STRING"
                        && matches!(t.as_str(), "TIMESTAMP" | "DATETIME" | "DATE"));
                (!same).then_some((c, t))
            })
        {
            return Err(if c.arrow_type == "Int64" {
                format!(
                    "{} column {} holds integers as JSON numbers, which BigQuery may corrupt past \
                     2^53 (it asks for them as strings); the workers read them exactly",
                    file.path, c.name
                )
            } else {
                format!(
                    "{} column {} holds {} JSON values that load as {job_type} only by pandas' \
                     conversions; the workers make them",
                    file.path, c.name, c.arrow_type
                )
            });
        }
        let path = &file.path;
        match files::compression_of(f.options.compression, path) {
            Compression::Zstd => {
                return Err(format!(
                    "{path} is zstd-compressed, which BigQuery does not read"
                ));
            }
            Compression::Gzip if file.size > BIGQUERY_MAX_GZIP_BYTES => {
                return Err(format!("{path} is a gzip file over 4 GB, BigQuery's limit"));
            }
            _ => {}
        }
        if detected.json_array {
            return Err(format!(
                "{path} is a JSON array; BigQuery loads JSON lines only"
            ));
        }
        if detected.columns.is_empty() {
            return Err(format!("{path} is empty; the workers read it as no rows"));
        }
        let found: Vec<&str> = detected.columns.iter().map(|c| c.name.as_str()).collect();
        let same = match f.format {
            // Without a header, columns are positional on both paths.
            FileFormat::Csv if !f.options.has_header => found.len() == names.len(),
            // BigQuery matches JSON keys by name; a key the table lacks would fail the load.
            FileFormat::Json => found.iter().all(|n| names.contains(n)),
            FileFormat::Csv | FileFormat::Parquet => found == names,
        };
        if !same {
            return Err(format!(
                "{path} has columns [{}], not the table's [{}] in that order; the workers match \
                 them by name",
                found.join(", "),
                names.join(", ")
            ));
        }
        if f.format == FileFormat::Parquet
            && let Some(c) = detected
                .columns
                .iter()
                .find(|c| needs_conversion(&c.arrow_type))
        {
            return Err(format!(
                "{path} column {} is {}, which the workers convert checking for loss",
                c.name, c.arrow_type
            ));
        }
    }
    Ok(match f.format {
        FileFormat::Csv => NativeFormat::Csv {
            delimiter: f.options.delimiter as char,
            quote: f.options.quote as char,
            skip_leading_rows: u32::from(f.options.has_header),
            encoding: match f.options.encoding {
                TextEncoding::Utf8 => "UTF-8",
                TextEncoding::Latin1 => "ISO-8859-1",
            },
        },
        FileFormat::Json => NativeFormat::JsonLines,
        FileFormat::Parquet => NativeFormat::Parquet,
    })
}

/// What the dispatcher's own identity found of the bucket a direct load would read: BigQuery
/// reads the files as the identity that runs the load job ("If you are loading data from
/// Cloud Storage, you also need IAM permissions to access the bucket that contains your data":
/// `storage.buckets.get`, `storage.objects.get`), which is the dispatcher's, not the job's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectAccess {
    /// The bucket's location (`buckets.get`), or why the dispatcher could not read it.
    pub bucket_location: std::result::Result<String, String>,
    /// The warehouse's (the dataset's) location, when known.
    pub warehouse_location: Option<String>,
    /// Why the dispatcher's identity cannot read the files, when it cannot.
    pub unreadable: Option<String>,
}

/// Beyond reading the files as the workers would, what a direct load needs: at most 10,000
/// URIs ("A job configuration can have up to 10,000 source URIs"), one compression ("You
/// cannot include both compressed and uncompressed files in the same load job"), columns
/// BigQuery matches by name keeping their names, no JSON column from Parquet ("the source
/// data must be in CSV, Avro, or JSON format"), a bucket in the dataset's location ("the
/// dataset that contains the table must be in the same regional or multi-regional location as
/// the Cloud Storage bucket") that the dispatcher's identity can read. Some says why not.
pub fn direct_load_problem(
    spec: &JobSpec,
    files: &[&FileInfo],
    columns: &[(String, String)],
    destination_names: &[String],
    access: &DirectAccess,
) -> Option<String> {
    let f = spec.files()?;
    if let Load::Merge { .. } = spec.load {
        return Some(
            "a merge replaces rows by key, which a load job cannot; the workers stage the files \
             for one MERGE"
                .into(),
        );
    }
    let max = crate::warehouse::bigquery::DEFAULT_MAX_URIS_PER_JOB;
    if files.len() > max {
        return Some(format!(
            "{} files are more than one BigQuery load job takes ({max})",
            files.len()
        ));
    }
    let gzip = |file: &FileInfo| {
        files::compression_of(f.options.compression, &file.path) == Compression::Gzip
    };
    let packed = files.iter().find(|x| gzip(x));
    let plain = files.iter().find(|x| !gzip(x));
    if let (Some(packed), Some(plain)) = (packed, plain) {
        return Some(format!(
            "{} is gzip-compressed and {} is not; BigQuery takes one or the other in a load job",
            packed.path, plain.path
        ));
    }
    if f.format != FileFormat::Csv
        && let Some(((source, _), destination)) = columns
            .iter()
            .zip(destination_names)
            .find(|((source, _), destination)| source != *destination)
    {
        return Some(format!(
            "column {source:?} loads as {destination:?} (BigQuery cannot take its name), and \
             BigQuery matches {} columns by name; the workers rename it",
            if f.format == FileFormat::Json {
                "JSON"
            } else {
                "Parquet"
            }
        ));
    }
    if f.format == FileFormat::Parquet
        && let Some((name, _)) = columns
            .iter()
            .find(|(_, ty)| ty.eq_ignore_ascii_case("JSON"))
    {
        return Some(format!(
            "column {name} is JSON, which BigQuery does not load from Parquet; the workers \
             stage it for a conversion"
        ));
    }
    let bucket = match &access.bucket_location {
        Ok(location) => location,
        Err(why) => return Some(why.clone()),
    };
    if let Some(dataset) = &access.warehouse_location
        && !crate::warehouse::bigquery::colocated(dataset, bucket)
    {
        return Some(format!(
            "the bucket is in {bucket} and the dataset in {dataset}; BigQuery loads only from a \
             bucket in the dataset's location"
        ));
    }
    access.unreadable.clone()
}

/// Asks, as the dispatcher's own identity, where the bucket is and (for a job that reaches its
/// files with credentials of its own) whether it may read them.
pub(super) async fn direct_access(
    location: &FileLocation,
    files: &[&FileInfo],
    warehouse_location: Option<String>,
) -> DirectAccess {
    let mut access = DirectAccess {
        bucket_location: Err("the files are in no bucket".into()),
        warehouse_location,
        unreadable: None,
    };
    let Some(bucket) = location.bucket() else {
        return access;
    };
    let own_base = crate::gcs::default_base();
    if location
        .endpoint()
        .is_some_and(|e| e.trim_end_matches('/') != own_base.trim_end_matches('/'))
    {
        access.bucket_location = Err(
            "the job reads its files at an endpoint of its own (connection_params.endpoint), \
             not in the Cloud Storage BigQuery reads"
                .into(),
        );
        return access;
    }
    let own = match crate::gcs::GcsStore::from_env(bucket) {
        Ok(store) => store,
        Err(e) => {
            access.bucket_location = Err(format!(
                "the dispatcher has no GCS credentials of its own: {e}"
            ));
            return access;
        }
    };
    access.bucket_location = own.bucket_info().await.map(|b| b.location).map_err(|e| {
        format!(
            "the dispatcher's identity cannot read bucket gs://{bucket} (storage.buckets.get), \
             which the load job would need: {e}"
        )
    });
    if location.own_access()
        && let Some(first) = files.first()
        && let Err(e) = own
            .object_version(&object_store::path::Path::from(first.path.as_str()))
            .await
    {
        access.unreadable = Some(format!(
            "the job reads its files with credentials of its own, and the dispatcher's identity, \
             which the load job would read them as, cannot read gs://{bucket}/{} \
             (storage.objects.get): {e}",
            first.path
        ));
    }
    access
}
