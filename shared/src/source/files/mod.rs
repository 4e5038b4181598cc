//! File sources: GCS, S3, Azure Blob and local files, read through `object_store`. Listing
//! matches `file_pattern` on the file name under `file_path_prefix` (recursively), newest
//! first; a shard reads its files as streams (CSV and JSON lines through arrow's push
//! decoders, Parquet by row group), decompressing `.gz` and `.zst` on the way, so no file is
//! ever held in memory whatever its size.

mod csv_text;
mod fast_path;
mod json_text;
mod location;
pub mod pandas;
pub mod plan;
mod read;
pub mod schema;

pub use self::csv_text::*;
pub(crate) use self::json_text::*;
pub use self::location::*;
pub use self::read::*;

use std::io;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use chrono::{DateTime, Utc};
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt as _};
use serde::{Deserialize, Serialize};

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;

use super::{BatchStream, ShardBounds, SourceColumn, receiver_stream};
use crate::gcs::{GcsAuth, GcsStore};
use crate::messages::ShardTask;
use crate::spec::{
    Compression, FileFormat, FileOptions, FileSpec, JobSpec, SourceType, TextEncoding,
};
use crate::{Error, Result};

/// How much of a file detection and drift checks read (the seed read 5 MB too).
pub const SAMPLE_BYTES: usize = 5 * 1024 * 1024;
/// Bytes read from the store per read call.
const READ_CHUNK: usize = 256 * 1024;

/// A file the listing found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The object's path in its bucket or container (relative to the base for `local`).
    pub path: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
    pub e_tag: Option<String>,
    /// The GCS generation (or S3/Azure version id when versioning is on).
    pub version: Option<String>,
}

impl FileInfo {
    /// What says "this content": the generation when the store has one, else the ETag.
    pub fn version_key(&self) -> String {
        self.version
            .clone()
            .or_else(|| self.e_tag.clone())
            .unwrap_or_else(|| format!("{}@{}", self.size, self.last_modified.timestamp_micros()))
    }
}

/// One file of a shard: the whole file, or a range of its Parquet row groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePart {
    pub file: FileInfo,
    /// Parquet row groups `first..end`; None reads the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_groups: Option<(usize, usize)>,
    /// The file's own column names in order (CSV: its header), mapped by name onto the
    /// job's columns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Reading a shard
// ---------------------------------------------------------------------------------------------

/// Rows read per file of a shard, in the shard's file order, filled in as the stream goes.
pub type FileRowCounts = Arc<Mutex<Vec<u64>>>;

/// The file connector (GCS, S3, Azure Blob, local): files listed and grouped by `plan`, each
/// shard's files read as streams.
pub struct FileSource;

#[async_trait::async_trait]
impl super::Source for FileSource {
    /// A file column's type is the BigQuery type it loads as; JSON keeps its label so the
    /// warehouse makes it a JSON column.
    fn column_types(&self, column: &SourceColumn) -> (String, DataType) {
        (
            column.type_name.to_ascii_lowercase(),
            schema::arrow_type_of(&column.type_name).unwrap_or(DataType::Utf8),
        )
    }

    async fn survey(
        &self,
        spec: &JobSpec,
        opts: &crate::plan::PlanOptions,
        stream: &crate::plan::StreamState,
    ) -> Result<super::SourceSurvey> {
        let survey = plan::survey_files(spec, opts, stream).await?;
        Ok(super::SourceSurvey::Files(Box::new(survey)))
    }

    async fn extract(
        &self,
        spec: &JobSpec,
        task: &ShardTask,
        _retry: crate::retry::RetryPolicy,
        in_flight: usize,
    ) -> Result<super::Extraction> {
        let (batches, counts) = extract(spec, task, in_flight).await?;
        Ok(super::Extraction {
            batches,
            file_rows: Some(counts),
        })
    }
}

#[cfg(test)]
mod tests {

    fn unclosed(input: &[u8], chunks: usize) -> Option<u64> {
        let mut scan = QuoteScan::new(b',', b'"');
        let size = input.len().div_ceil(chunks.max(1)).max(1);
        for chunk in input.chunks(size) {
            scan.feed(chunk);
        }
        scan.unclosed_since()
    }

    #[test]
    fn an_open_quoted_field_at_the_end_is_found_with_its_line() {
        for chunks in [1, 2, 5, 64] {
            // Quoted newlines, doubled quotes, a quote inside an unquoted value: all closed.
            let fine = b"id,name\n1,\"two\nlines\"\n2,\"say \"\"hi\"\"\"\n3,5\" screen\n4,\"\"\r\n";
            assert_eq!(unclosed(fine, chunks), None, "{chunks}");
            assert_eq!(
                unclosed(b"id,name\n1,ok\n2,\"abc\n3,def\n", chunks),
                Some(3)
            );
            assert_eq!(unclosed(b"id,name\n1,\"abc", chunks), Some(2));
            // A closing quote followed by more text is not an open field.
            assert_eq!(unclosed(b"a,\"b\"c\n", chunks), None);
            // A doubled quote at the very end leaves the field open.
            assert_eq!(unclosed(b"a,\"b\"\"", chunks), Some(1));
            // A lone `\r` ends a line for the decoder: the quote after it opens a field.
            assert_eq!(unclosed(b"a\r\"x\n2\n3\n", chunks), Some(1));
        }
    }

    use super::*;

    #[test]
    fn locations_come_from_the_bucket_or_the_prefix() {
        assert_eq!(
            split_location(SourceType::Gcs, Some("gs://b"), "data/tx/").unwrap(),
            ("b".into(), "data/tx/".into())
        );
        assert_eq!(
            split_location(SourceType::Gcs, Some("b"), "").unwrap(),
            ("b".into(), "".into())
        );
        assert_eq!(
            split_location(SourceType::Gcs, Some("gs://b/exports"), "daily/").unwrap(),
            ("b".into(), "exports/daily/".into())
        );
        assert_eq!(
            split_location(SourceType::S3, None, "s3://bk/in/x_").unwrap(),
            ("bk".into(), "in/x_".into())
        );
        assert_eq!(
            split_location(
                SourceType::AzureBlob,
                None,
                "abfss://c@acct.dfs.core.windows.net/p/"
            )
            .unwrap(),
            ("c".into(), "p/".into())
        );
        let err = split_location(SourceType::S3, None, "gs://b/x").unwrap_err();
        assert!(
            err.to_string()
                .contains("is a gs:// location, and source_type S3 reads s3:// or s3a://"),
            "{err}"
        );
        let err = split_location(SourceType::Gcs, Some("a"), "gs://b/").unwrap_err();
        assert!(
            err.to_string()
                .contains("names bucket \"b\", and connection_params names \"a\""),
            "{err}"
        );
        let err = split_location(SourceType::Gcs, None, "data/").unwrap_err();
        assert!(
            err.to_string().contains("connection_params.bucket"),
            "{err}"
        );
    }

    #[test]
    fn compression_follows_the_name_unless_told() {
        assert_eq!(
            compression_of(Compression::Auto, "a/b.csv.gz"),
            Compression::Gzip
        );
        assert_eq!(
            compression_of(Compression::Auto, "b.jsonl.zst"),
            Compression::Zstd
        );
        assert_eq!(
            compression_of(Compression::Auto, "b.csv"),
            Compression::None
        );
        assert_eq!(
            compression_of(Compression::None, "b.csv.gz"),
            Compression::None
        );
        assert_eq!(
            compression_of(Compression::Gzip, "b.csv"),
            Compression::Gzip
        );
    }

    #[test]
    fn latin1_becomes_utf8() {
        let mut out = Vec::new();
        transcode(b"caf\xe9 \xff", TextEncoding::Latin1, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "café ÿ");
    }

    #[test]
    fn pretty_printed_json_arrays_come_out_one_element_a_line() {
        let text = b"[\n  {\n    \"id\": 1,\n    \"name\": \"a\\nb\",\n    \"tags\": [\n      1,\n      2\n    ]\n  },\n  {\"id\": 2}\n]\n";
        let lines = json_lines(text);
        let lines: Vec<serde_json::Value> = lines
            .split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                serde_json::json!({"id": 1, "name": "a\nb", "tags": [1, 2]}),
                serde_json::json!({"id": 2}),
            ]
        );
    }

    #[test]
    fn json_arrays_unwrap_into_lines_across_chunks() {
        let text = br#" [ {"a": [1, 2], "s": "x,]\"y"},
          {"a": [], "s": "{"} ] "#;
        let mut whole = Vec::new();
        ArrayUnwrapper::default().feed(text, &mut whole);
        let mut parts = Vec::new();
        let mut u = ArrayUnwrapper::default();
        for chunk in text.chunks(3) {
            u.feed(chunk, &mut parts);
        }
        assert_eq!(whole, parts);
        let lines: Vec<&str> = std::str::from_utf8(&whole)
            .unwrap()
            .lines()
            .map(str::trim)
            .collect();
        assert_eq!(
            lines,
            vec![r#"{"a": [1, 2], "s": "x,]\"y"}"#, r#"{"a": [], "s": "{"}"#]
        );
        let mut plain = Vec::new();
        ArrayUnwrapper::default().feed(b"{\"a\":1}\n{\"a\":2}\n", &mut plain);
        assert_eq!(plain, b"{\"a\":1}\n{\"a\":2}\n");
    }

    #[test]
    fn csv_errors_name_the_line() {
        let e = arrow::error::ArrowError::CsvError(
            "incorrect number of fields for line 3, expected 2 got 1".into(),
        );
        assert_eq!(
            csv_error("gs://b/x.csv", &e).to_string(),
            "gs://b/x.csv, line 3: incorrect number of fields for line 3, expected 2 got 1"
        );
        let e = arrow::error::ArrowError::ParseError(
            "Error while parsing value 'abc' as type 'Int64' for column 1 at line 4. Row data: '[4,abc]'".into(),
        );
        assert_eq!(
            csv_error("gs://b/x.csv", &e).to_string(),
            "gs://b/x.csv, line 5: cannot parse value 'abc' as type 'Int64' for column 1"
        );
        // A timestamp on the third line of the file (the header is record 0).
        let e = arrow::error::ArrowError::ParseError(
            "Error parsing column 1 at line 2: Parser error: Error parsing timestamp from 'notadate': timestamp must contain at least 10 characters".into(),
        );
        assert_eq!(
            csv_error("gs://b/x.csv", &e).to_string(),
            "gs://b/x.csv, line 3: column 1: Error parsing timestamp from 'notadate': timestamp \
             must contain at least 10 characters"
        );
    }
}
