//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`), kept here so the fuzzer and the
//! corpus regression test (`shared/tests/fuzz_corpus.rs`) run the very same code. Each function
//! takes any bytes and must never panic, hang or allocate without bound: an error returned by
//! the code under test is a fine answer, a panic here is a bug (a broken property panics on
//! purpose, naming what differed).
//!
//! Input layouts (the first bytes configure the run, the rest is the data):
//! - [`job_spec`]: the job-config JSON as it is.
//! - [`pg_copy`]: `[column set, split hi, split lo, chunking, batch rows]` then the COPY stream.
//! - [`csv_reader`]: `[flags, batch rows, read chunk, types]` then the file.
//! - [`json_reader`]: `[flags, batch rows, read chunk, types]` then the file.

use std::sync::{Arc, Mutex};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use tokio::io::AsyncBufRead;

use crate::Result;
use crate::source::files::schema::{self as file_schema, DetectedColumn};
use crate::source::files::{self, BatchSink};
use crate::source::postgres::binary::{CopyDecoder, oid};
use crate::source::{SourceColumn, arrow_schema};
use crate::spec::{
    Compression, ConnectionParams, FileOptions, JobConfig, JobSpec, SourceType, TextEncoding,
};

// ---------------------------------------------------------------------------------------------
// Job spec
// ---------------------------------------------------------------------------------------------

/// What a validation came to, comparable: the spec's Debug form (which hides secrets), or the
/// problems.
fn outcome(result: &std::result::Result<JobSpec, crate::spec::SpecError>) -> String {
    match result {
        Ok(spec) => format!("ok {spec:?}"),
        Err(e) => format!("err {:?}", e.problems),
    }
}

/// `JobSpec::from_json` on any text, with the properties that matter:
/// - validating is deterministic, and `from_json` is `validate` of the parsed config;
/// - the dispatcher validates an inline config from a `serde_json::Value` and hands the workers
///   that value's text, which they validate again: both must come to the same spec (or the same
///   problems);
/// - a valid spec is consistent (a file job has its `files`, a table job its table);
/// - no secret of `connection_params` shows in an error, a warning or the spec's Debug form.
pub fn job_spec(data: &[u8]) {
    // The Django client parses the body as bytes.
    let from_bytes = serde_json::from_slice::<JobConfig>(data).map(JobSpec::validate);
    let Ok(text) = std::str::from_utf8(data) else {
        // serde_json skips the strings of ignored fields without checking their UTF-8, so such
        // a config may still parse.
        if let Ok(Ok(spec)) = &from_bytes {
            check_spec(spec);
        }
        return;
    };
    let first = JobSpec::from_json(text);
    let again = JobSpec::from_json(text);
    assert_eq!(
        outcome(&first),
        outcome(&again),
        "validation is not deterministic"
    );
    match &from_bytes {
        Ok(validated) => assert_eq!(outcome(&first), outcome(validated), "bytes and text differ"),
        Err(_) => assert!(
            first.is_err(),
            "bytes failed to parse where the text parsed"
        ),
    }
    if let Ok(spec) = &first {
        check_spec(spec);
    }

    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let worker_text = value.to_string();
    // Without its `float_roundtrip` feature serde_json may read a float back one ulp off:
    // then the worker's config differs from the dispatcher's in that float, through
    // serde_json, not through shardflow. Such inputs skip the comparison.
    if serde_json::from_str::<serde_json::Value>(&worker_text)
        .ok()
        .as_ref()
        != Some(&value)
    {
        return;
    }
    // The dispatcher's path (from the value) and the worker's (from the value's text).
    let dispatcher = serde_json::from_value::<JobConfig>(value.clone());
    let worker = serde_json::from_str::<JobConfig>(&worker_text);
    match (dispatcher, worker) {
        (Ok(d), Ok(w)) => {
            let (d, w) = (JobSpec::validate(d), JobSpec::validate(w));
            assert_eq!(
                outcome(&d),
                outcome(&w),
                "the dispatcher and the worker validate the same config differently"
            );
            check_secrets(&value, &d);
        }
        (Err(_), Err(_)) => {}
        (d, w) => panic!(
            "the config parses from a value: {}, from its text: {}",
            d.is_ok(),
            w.is_ok()
        ),
    }
    if let Some(params) = value.get("connection_params") {
        let direct = ConnectionParams::from_value(params.clone());
        if let (Ok(spec), Ok(params)) = (&first, &direct) {
            assert_eq!(
                format!("{:?}", spec.connection),
                format!("{params:?}"),
                "connection_params read alone differ from the job's"
            );
        }
    }
}

fn check_spec(spec: &JobSpec) {
    assert!(spec.row_count_threshold >= 1);
    assert!(!spec.dest_table_name.trim().is_empty());
    assert_eq!(
        spec.files().is_some(),
        spec.source_type.is_file_source(),
        "a valid file job without its files (or a table job with files)"
    );
    if let Some(table) = spec.table() {
        assert!(!table.table.trim().is_empty());
    }
    // A merge reads a table; a file job's increment is its new files.
    match (&spec.source, &spec.load) {
        (crate::spec::SourceSpec::Files(_), crate::spec::Load::Merge { .. }) => {
            panic!("a valid file job that merges")
        }
        (
            crate::spec::SourceSpec::Files(_),
            crate::spec::Load::Append {
                window: crate::spec::Window::Column(_),
            },
        ) => panic!("a valid file job with a column window"),
        (
            crate::spec::SourceSpec::Table(_),
            crate::spec::Load::Append {
                window: crate::spec::Window::NewFiles { .. },
            },
        ) => panic!("a valid table job whose window is new files"),
        _ => {}
    }
    let _ = spec.port(5432);
    let _ = spec.qualified_table();
}

/// Every string of a JSON value (keys too), for telling a secret from text given elsewhere.
fn strings<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.push(k);
                strings(v, out);
            }
        }
        _ => {}
    }
}

/// Secrets odd enough not to occur by chance in a message (8 characters or more, a digit and
/// an upper-case letter among them) and given nowhere else in the config must not show in
/// its error, its warnings or its spec's Debug form.
fn check_secrets(
    value: &serde_json::Value,
    result: &std::result::Result<JobSpec, crate::spec::SpecError>,
) {
    let Some(given) = value.get("connection_params") else {
        return;
    };
    let Ok(params) = ConnectionParams::from_value(given.clone()) else {
        return;
    };
    // What is not secret: the rest of the config, and the params that are shown.
    let mut elsewhere: Vec<&str> = Vec::new();
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            elsewhere.push(k);
            if k != "connection_params" {
                strings(v, &mut elsewhere);
            }
        }
    }
    if let serde_json::Value::Object(map) = given {
        elsewhere.extend(map.keys().map(String::as_str));
    }
    elsewhere.extend(params.other.keys().map(String::as_str));
    elsewhere.extend(
        [&params.host, &params.database, &params.username]
            .into_iter()
            .flatten()
            .map(String::as_str),
    );
    let shown = match result {
        Ok(spec) => format!("{spec:?} {:?}", spec.warnings),
        Err(e) => e.to_string(),
    };
    let secrets = params
        .password
        .iter()
        .chain(params.other.values())
        .map(|s| s.expose());
    for secret in secrets {
        let distinctive = secret.len() >= 8
            && secret.chars().any(|c| c.is_ascii_digit())
            && secret.chars().any(|c| c.is_ascii_uppercase())
            && !elsewhere.iter().any(|text| text.contains(secret));
        assert!(
            !distinctive || !shown.contains(secret),
            "a connection_params secret shows in {shown:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL binary COPY
// ---------------------------------------------------------------------------------------------

fn column(name: &str, type_oid: u32, type_name: &str, typmod: i32) -> SourceColumn {
    SourceColumn {
        name: name.into(),
        type_oid,
        type_name: type_name.into(),
        typmod,
        nullable: true,
    }
}

/// `numeric(p,s)` as PostgreSQL's type modifier.
fn numeric_typmod(precision: i32, scale: i32) -> i32 {
    ((precision << 16) | (scale & 0x7ff)) + 4
}

const INTERVAL: u32 = 1186;
const INT4_ARRAY: u32 = 1007;

/// One column of every decoding, in the order of the seed `fuzz/corpus/pg_copy/all_types`
/// (`fuzz/README.md` has the query that made it).
pub fn pg_all_columns() -> Vec<SourceColumn> {
    vec![
        column("b", oid::BOOL, "boolean", -1),
        column("i2", oid::INT2, "smallint", -1),
        column("i4", oid::INT4, "integer", -1),
        column("i8", oid::INT8, "bigint", -1),
        column("f4", oid::FLOAT4, "real", -1),
        column("f8", oid::FLOAT8, "double precision", -1),
        column("n12", oid::NUMERIC, "numeric", numeric_typmod(12, 2)),
        column("n50", oid::NUMERIC, "numeric", numeric_typmod(50, 10)),
        column("n", oid::NUMERIC, "numeric", -1),
        column("t", oid::TEXT, "text", -1),
        column("vc", oid::VARCHAR, "character varying", 14),
        column("j", oid::JSON, "json", -1),
        column("jb", oid::JSONB, "jsonb", -1),
        column("u", oid::UUID, "uuid", -1),
        column("by", oid::BYTEA, "bytea", -1),
        column("d", oid::DATE, "date", -1),
        column("ts", oid::TIMESTAMP, "timestamp without time zone", -1),
        column("tz", oid::TIMESTAMPTZ, "timestamp with time zone", -1),
        column("tm", oid::TIME, "time without time zone", -1),
        column("m", oid::MONEY, "money", -1),
        column("iv", INTERVAL, "interval", -1),
        column("arr", INT4_ARRAY, "integer[]", -1),
    ]
}

/// The column sets the first input byte picks from: every decoding at once, a few small
/// mixes, no columns, then each column of [`pg_all_columns`] alone (so short inputs reach
/// every decoder).
pub fn pg_column_sets() -> Vec<Vec<SourceColumn>> {
    let all = pg_all_columns();
    let not_null = |mut c: SourceColumn| {
        c.nullable = false;
        c
    };
    let mut sets = vec![
        all.clone(),
        vec![
            column("id", oid::INT8, "bigint", -1),
            column("name", oid::TEXT, "text", -1),
        ],
        vec![
            column("n38", oid::NUMERIC, "numeric", numeric_typmod(38, 0)),
            column("n76", oid::NUMERIC, "numeric", numeric_typmod(76, 38)),
            column("neg", oid::NUMERIC, "numeric", numeric_typmod(5, -2)),
            column("n1", oid::NUMERIC, "numeric", numeric_typmod(1, 0)),
            column("n38s", oid::NUMERIC, "numeric", numeric_typmod(38, 38)),
        ],
        vec![
            not_null(column("id", oid::INT4, "integer", -1)),
            not_null(column("day", oid::DATE, "date", -1)),
            column("at", oid::TIMESTAMPTZ, "timestamp with time zone", -1),
            column("tm", oid::TIME, "time without time zone", -1),
        ],
        Vec::new(),
    ];
    sets.extend(all.into_iter().map(|c| vec![c]));
    sets
}

/// What decoding a COPY stream came to: the rows (all batches concatenated) or the error.
#[derive(Debug, PartialEq)]
enum Decoded {
    Rows(Option<RecordBatch>),
    Failed(String),
}

/// Decodes `chunks` as the PostgreSQL source does: push each, take a batch whenever one is
/// full, check the end, take the rest.
fn decode_copy<'a>(
    columns: &[SourceColumn],
    batch_rows: usize,
    chunks: impl Iterator<Item = &'a [u8]>,
) -> Decoded {
    let run = || -> Result<Option<RecordBatch>> {
        let mut decoder = CopyDecoder::new(columns, batch_rows)?;
        let schema = decoder.schema();
        let mut batches = Vec::new();
        for chunk in chunks {
            decoder.push(chunk)?;
            if decoder.batch_full()
                && let Some(batch) = decoder.take_batch()?
            {
                batches.push(batch);
            }
        }
        decoder.finish()?;
        batches.extend(decoder.take_batch()?);
        for batch in &batches {
            assert_eq!(batch.schema(), schema, "a batch has another schema");
            assert!(batch.num_rows() > 0, "an empty batch was taken");
        }
        if batches.is_empty() {
            return Ok(None);
        }
        Ok(Some(arrow::compute::concat_batches(&schema, &batches)?))
    };
    match run() {
        Ok(rows) => Decoded::Rows(rows),
        Err(e) => Decoded::Failed(e.to_string()),
    }
}

/// The binary COPY decoder on any stream, for a column set the input picks: it never panics,
/// and where the stream is cut into chunks does not change what it decodes to (the same rows,
/// or the same error).
pub fn pg_copy(data: &[u8]) {
    let Some((&[set, split_hi, split_lo, chunking, batch], stream)) = data.split_first_chunk()
    else {
        return;
    };
    let sets = pg_column_sets();
    let columns = &sets[set as usize % sets.len()];
    let batch_rows = 1 + batch as usize % 8;
    let whole = decode_copy(columns, batch_rows, std::iter::once(stream));
    let split = u16::from_be_bytes([split_hi, split_lo]) as usize % (stream.len() + 1);
    let (head, tail) = stream.split_at(split);
    let two = decode_copy(columns, batch_rows, [head, tail].into_iter());
    assert_same(&whole, &two, || format!("splitting the stream at {split}"));
    let size = 1 + chunking as usize % 16;
    let small = decode_copy(columns, batch_rows, stream.chunks(size));
    assert_same(&whole, &small, || {
        format!("reading the stream {size} bytes at a time")
    });
}

/// Two decodings of one stream agree: the same rows, or both failed the same way. A batch
/// that cannot be built (`arrow:`, a NULL in a NOT NULL column) is found when the batch is
/// taken, which chunking moves: where one failed that way the other only has to fail too.
fn assert_same(a: &Decoded, b: &Decoded, how: impl Fn() -> String) {
    match (a, b) {
        (Decoded::Failed(x), Decoded::Failed(y))
            if x == y || x.starts_with("arrow:") || y.starts_with("arrow:") => {}
        _ => assert_eq!(a, b, "{} changed what the stream decodes to", how()),
    }
}

// ---------------------------------------------------------------------------------------------
// CSV and JSON files
// ---------------------------------------------------------------------------------------------

/// The BigQuery types a job may give a file column (`types` picks from these).
const FILE_TYPES: [&str; 12] = [
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
    "JSON",
];

const URI: &str = "file:///fuzz/input";

/// The async readers run on a current-thread runtime, one per thread, made once.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| rt.block_on(future))
}

/// The file's bytes as a text stream: all at once (`chunk` None), or `chunk` bytes a read.
fn text_stream(file: &[u8], chunk: Option<usize>) -> Box<dyn AsyncBufRead + Send + Unpin> {
    let cursor = std::io::Cursor::new(file.to_vec());
    match chunk {
        None => Box::new(cursor),
        Some(n) => Box::new(tokio::io::BufReader::with_capacity(n, cursor)),
    }
}

/// The head of the file as detection reads it (transcoded), and whether that is all of it.
fn sample(file: &[u8], encoding: TextEncoding) -> (Vec<u8>, bool) {
    block_on(async {
        let mut text = text_stream(file, None);
        files::read_head(text.as_mut(), encoding, files::SAMPLE_BYTES, URI).await
    })
    .expect("an in-memory stream reads")
}

/// What reading a file came to: the batches sent, then the error if it failed.
#[derive(Debug, PartialEq)]
struct Read {
    batches: Vec<RecordBatch>,
    error: Option<String>,
    counted: u64,
}

/// Runs a reader with a sink whose batches are collected, as `files::extract` does.
fn read_with_sink<F>(target: &SchemaRef, read: F) -> Read
where
    F: for<'a> AsyncFnOnce(&'a BatchSink<'a>) -> Result<()>,
{
    block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let counts: files::FileRowCounts = Arc::new(Mutex::new(vec![0]));
        let reading = async {
            let tx = tx;
            let sink = BatchSink {
                tx: &tx,
                counts: &counts,
                index: 0,
                target,
            };
            read(&sink).await
        };
        let collecting = async {
            let mut batches = Vec::new();
            while let Some(batch) = rx.recv().await {
                batches.push(batch.expect("the sink sends only batches"));
            }
            batches
        };
        let (result, batches) = tokio::join!(reading, collecting);
        let counted = counts.lock().map(|c| c[0]).unwrap_or_default();
        Read {
            batches,
            error: result.err().map(|e| comparable_error(&e.to_string())),
            counted,
        }
    })
}

/// An error as the chunked and whole reads must agree on. arrow-csv's "incorrect number of
/// fields for line L, expected E got M" says "got more than M" with the fields it had
/// buffered when it noticed, which depends on the read size (found by the fuzzer): what
/// follows "got" is dropped.
fn comparable_error(text: &str) -> String {
    match text.find("incorrect number of fields") {
        Some(at) => match text[at..].find(" got ") {
            Some(got) => format!("{} got …", &text[..at + got]),
            None => text.to_string(),
        },
        None => text.to_string(),
    }
}

/// The whole read and the chunked one agree: the same batches and the same end. Except that
/// arrow-csv finds a record with too many fields while decoding it, which a read size can
/// move past another error (an open quote swallowing the rest of the file, found by the
/// fuzzer): where one of the
/// reads failed on a field count, both must fail, one's batches a prefix of the other's.
fn assert_same_read(whole: &Read, chunked: &Read, chunk: usize) {
    let field_count = |r: &Read| {
        r.error
            .as_ref()
            .is_some_and(|e| e.contains("incorrect number of fields"))
    };
    if whole != chunked
        && whole.error.is_some()
        && chunked.error.is_some()
        && (field_count(whole) || field_count(chunked))
    {
        let n = whole.batches.len().min(chunked.batches.len());
        assert_eq!(
            whole.batches[..n],
            chunked.batches[..n],
            "reading the file {chunk} bytes at a time changed its batches"
        );
        return;
    }
    assert_eq!(
        whole, chunked,
        "reading the file {chunk} bytes at a time changed it"
    );
}

/// The file read all at once and `chunk` bytes at a time: both well formed, the same, and
/// (when it succeeds) as many rows as detection counted.
fn compare_reads(
    read: impl Fn(Option<usize>) -> Read,
    target: &SchemaRef,
    batch_rows: usize,
    chunk: usize,
    detected_rows: Option<u64>,
) {
    let all_at_once = read(None);
    let rows = check_read(&all_at_once, target, batch_rows);
    let in_chunks = read(Some(chunk));
    check_read(&in_chunks, target, batch_rows);
    assert_same_read(&all_at_once, &in_chunks, chunk);
    if let (Some(detected_rows), None) = (detected_rows, &all_at_once.error) {
        assert_eq!(
            rows, detected_rows,
            "detection and the read count other rows"
        );
    }
}

/// Properties of any read: every batch has the job's columns, holds 1 to `batch_rows` rows,
/// and the per-file count is the rows sent.
fn check_read(read: &Read, target: &SchemaRef, batch_rows: usize) -> u64 {
    let mut rows = 0;
    for batch in &read.batches {
        assert_eq!(&batch.schema(), target, "a batch without the job's columns");
        assert!(
            (1..=batch_rows).contains(&batch.num_rows()),
            "a batch of {} rows (batch size {batch_rows})",
            batch.num_rows()
        );
        rows += batch.num_rows() as u64;
    }
    assert_eq!(
        read.counted, rows,
        "the file's row count is not the rows it sent"
    );
    rows
}

/// The job's columns for a file: detected ones with their detected types (`types` 0), or
/// with types the input picks, as a job whose `bigquery_schema` says otherwise would have.
fn job_columns(
    names: &[String],
    detected: Option<&[DetectedColumn]>,
    types: u8,
) -> Vec<(String, String)> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let ty = match detected {
                Some(columns) if types == 0 => columns[i].bigquery_type.clone(),
                _ => FILE_TYPES[(i + types as usize) % FILE_TYPES.len()].to_string(),
            };
            (name.clone(), ty)
        })
        .collect()
}

/// Properties of detection: names distinct, every type one the job can load, the seed's
/// fingerprint computable.
fn check_detected(columns: &[DetectedColumn]) {
    let mut names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    let count = names.len();
    names.dedup();
    assert_eq!(names.len(), count, "detection gave two columns one name");
    for c in columns {
        assert!(
            file_schema::canonical_type(&c.bigquery_type).is_some(),
            "detected type {:?} is not one a file job loads",
            c.bigquery_type
        );
        assert!(c.sample_values.len() <= 5);
    }
    let _ = file_schema::fingerprint(
        columns
            .iter()
            .map(|c| (c.name.as_str(), c.bigquery_type.as_str())),
    );
}

/// The CSV reader and detection on any file. Flags: bit 0 no header, bit 1 latin-1, bits 2-3
/// the delimiter (`,` `|` tab `;`), bit 4 `'` quotes; then the batch size, the read size, and
/// the job's types (0: as detected).
pub fn csv_reader(data: &[u8]) {
    let Some((&[flags, batch, chunk, types], file)) = data.split_first_chunk() else {
        return;
    };
    let options = FileOptions {
        delimiter: [b',', b'|', b'\t', b';'][(flags >> 2) as usize & 3],
        quote: if flags & 0x10 != 0 { b'\'' } else { b'"' },
        has_header: flags & 1 == 0,
        encoding: if flags & 2 != 0 {
            TextEncoding::Latin1
        } else {
            TextEncoding::Utf8
        },
        compression: Compression::None,
    };
    let batch_rows = 1 + batch as usize % 16;
    let chunk = 1 + chunk as usize;

    // Detection, as `file_schema::detect` reads a file that fits its budget.
    let (text, whole) = sample(file, options.encoding);
    assert!(whole && text.len() >= file.len(), "the sample lost bytes");
    let detected = file_schema::sample_csv(&text, &options, URI);
    if let Ok((columns, _)) = &detected {
        check_detected(columns);
    }
    // The file's columns as the dispatcher records them (its header), typed as the job's.
    let names: Vec<String> = match &detected {
        Ok((columns, _)) => columns.iter().map(|c| c.name.clone()).collect(),
        Err(_) => (0..1 + types as usize % 4)
            .map(|i| format!("c{i}"))
            .collect(),
    };
    let detected_columns = detected.as_ref().ok().map(|(c, _)| c.as_slice());
    let job = job_columns(&names, detected_columns, types);
    let target = arrow_schema(SourceType::Local, &files::source_columns(&job));
    // As `files::read_part` builds it for a CSV file.
    let file_schema: SchemaRef = Arc::new(Schema::new(
        names
            .iter()
            .map(|n| {
                let data_type = match target.field_with_name(n) {
                    Ok(f) => f.data_type().clone(),
                    Err(_) => DataType::Utf8,
                };
                Field::new(n, data_type, true)
            })
            .collect::<Vec<_>>(),
    ));
    let read = |chunk| {
        read_with_sink(&target, async |sink| {
            files::read_csv(
                text_stream(file, chunk),
                file_schema.clone(),
                &options,
                batch_rows,
                sink,
                URI,
            )
            .await
        })
    };
    let detected_rows = detected.as_ref().ok().map(|(_, rows)| *rows);
    compare_reads(read, &target, batch_rows, chunk, detected_rows);
}

/// The JSON reader and detection on any file (JSON lines or one array). Flags: bit 1
/// latin-1; then the batch size, the read size, and the job's types (0: as detected).
pub fn json_reader(data: &[u8]) {
    let Some((&[flags, batch, chunk, types], file)) = data.split_first_chunk() else {
        return;
    };
    let encoding = if flags & 2 != 0 {
        TextEncoding::Latin1
    } else {
        TextEncoding::Utf8
    };
    let batch_rows = 1 + batch as usize % 16;
    let chunk = 1 + chunk as usize;

    let (text, whole) = sample(file, encoding);
    assert!(whole && text.len() >= file.len(), "the sample lost bytes");
    let detected = file_schema::sample_json(&text, URI);
    if let Ok((columns, _)) = &detected {
        check_detected(columns);
    }
    let names: Vec<String> = match &detected {
        Ok((columns, _)) => columns.iter().map(|c| c.name.clone()).collect(),
        // Keys of the first object, else a few likely ones.
        Err(_) => text
            .split(|&b| b == b'\n')
            .find_map(|line| {
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(line).ok()
            })
            .map(|object| object.keys().cloned().collect())
            .unwrap_or_else(|| vec!["a".into(), "b".into()]),
    };
    let detected_columns = detected.as_ref().ok().map(|(c, _)| c.as_slice());
    let job = job_columns(&names, detected_columns, types);
    let target = arrow_schema(SourceType::Local, &files::source_columns(&job));
    // As `files::read_part` builds it for a JSON file.
    let schema: SchemaRef = Arc::new(Schema::new(
        target
            .fields()
            .iter()
            .map(|f| files::parse_field(f))
            .collect::<Vec<_>>(),
    ));
    let read = |chunk| {
        read_with_sink(&target, async |sink| {
            files::read_json(
                text_stream(file, chunk),
                schema.clone(),
                encoding,
                batch_rows,
                sink,
                URI,
            )
            .await
        })
    };
    let detected_rows = detected.as_ref().ok().map(|(_, rows)| *rows);
    compare_reads(read, &target, batch_rows, chunk, detected_rows);
}
