//! Writes a shard's batch stream as zstd Parquet parts of bounded size to staging, at
//! `{run_id}/{shard_id}/{extraction}/part-{n:05}.parquet` (`messages::extraction_prefix` says
//! why each extraction has its own directory). Row groups are closed by
//! encoded size, so memory stays bounded whatever the row width.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::Result;
use crate::messages::{StagedFile, staging_part_path};
use crate::source::BatchStream;

#[derive(Clone, Debug)]
pub struct PartOptions {
    /// A part is closed once it holds about this many bytes.
    pub max_part_bytes: usize,
    /// A row group is closed once its encoded, buffered size reaches this.
    pub row_group_bytes: usize,
    pub zstd_level: i32,
}

impl Default for PartOptions {
    fn default() -> Self {
        PartOptions {
            max_part_bytes: 256 << 20,
            row_group_bytes: 32 << 20,
            zstd_level: 1,
        }
    }
}

pub(crate) fn properties(opts: &PartOptions) -> Result<WriterProperties> {
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(opts.zstd_level)?))
        // Dictionary building was a quarter of the worker's CPU and buys little after zstd;
        // high-cardinality columns (keys, timestamps, text) fall back from it anyway.
        .set_dictionary_enabled(false)
        .set_max_row_group_row_count(Some(1 << 20))
        .build())
}

struct OpenPart {
    writer: AsyncArrowWriter<BufWriter>,
    path: String,
    rows: u64,
}

/// Writes every batch; always at least one part, so an empty shard still carries its schema.
/// `on_batch` sees each batch before it is written (progress, the content digest); its error
/// stops the shard.
pub async fn write_parts(
    store: &Arc<dyn ObjectStore>,
    extraction_prefix: &str,
    schema: SchemaRef,
    mut batches: BatchStream,
    opts: &PartOptions,
    mut on_batch: impl FnMut(&RecordBatch) -> Result<()>,
) -> Result<Vec<StagedFile>> {
    let props = properties(opts)?;
    let open = |n: usize| -> Result<OpenPart> {
        let path = staging_part_path(extraction_prefix, n);
        let sink = BufWriter::new(store.clone(), Path::from(path.as_str()));
        let writer = AsyncArrowWriter::try_new(sink, schema.clone(), Some(props.clone()))?;
        Ok(OpenPart {
            writer,
            path,
            rows: 0,
        })
    };
    let mut files = Vec::new();
    let mut part = open(0)?;
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        on_batch(&batch)?;
        part.writer.write(&batch).await?;
        part.rows += batch.num_rows() as u64;
        if part.writer.in_progress_size() >= opts.row_group_bytes {
            part.writer.flush().await?;
        }
        if part.writer.bytes_written() + part.writer.in_progress_size() >= opts.max_part_bytes {
            let next = open(files.len() + 1)?;
            files.push(close(std::mem::replace(&mut part, next)).await?);
        }
    }
    files.push(close(part).await?);
    Ok(files)
}

async fn close(mut part: OpenPart) -> Result<StagedFile> {
    part.writer.finish().await?;
    let bytes = part.writer.bytes_written() as u64;
    drop(part.writer);
    Ok(StagedFile {
        path: part.path,
        rows: part.rows,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    fn row_text(i: i64) -> String {
        format!("row {i} {}", "x".repeat((i % 97) as usize))
    }

    fn batches(schema: SchemaRef, count: usize, rows: i64) -> BatchStream {
        let items: Vec<Result<RecordBatch>> = (0..count as i64)
            .map(|b| {
                let ids: Vec<i64> = (b * rows..(b + 1) * rows).collect();
                let text: Vec<String> = ids
                    .iter()
                    .map(|i| format!("row {i} {}", "x".repeat((i % 97) as usize)))
                    .collect();
                Ok(RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(Int64Array::from(ids)),
                        Arc::new(StringArray::from(text)),
                    ],
                )?)
            })
            .collect();
        Box::pin(futures::stream::iter(items))
    }

    /// Every row of a staged part, read back: (id, text).
    async fn read_part(store: &Arc<dyn ObjectStore>, path: &str) -> Vec<(i64, String)> {
        use arrow::array::AsArray;
        use arrow::datatypes::Int64Type;
        let bytes = store
            .get(&Path::from(path))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        let mut rows = Vec::new();
        for batch in reader {
            let batch = batch.unwrap();
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let text = batch.column(1).as_string::<i32>();
            rows.extend((0..batch.num_rows()).map(|i| (ids.value(i), text.value(i).to_string())));
        }
        rows
    }

    #[tokio::test]
    async fn parts_are_bounded_and_deterministic() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("text", DataType::Utf8, false),
        ]));
        let opts = PartOptions {
            max_part_bytes: 200_000,
            row_group_bytes: 50_000,
            ..Default::default()
        };
        let mut seen = 0;
        let files = write_parts(
            &store,
            "run/s00001/e1",
            schema.clone(),
            batches(schema.clone(), 40, 5_000),
            &opts,
            |b| {
                seen += b.num_rows();
                Ok(())
            },
        )
        .await
        .unwrap();
        assert_eq!(seen, 200_000);
        assert!(
            files.len() > 2,
            "expected several parts, got {}",
            files.len()
        );
        let mut read_back = Vec::new();
        for (n, f) in files.iter().enumerate() {
            assert_eq!(f.path, format!("run/s00001/e1/part-{n:05}.parquet"));
            // A part closes at the first batch that takes it past the limit.
            assert!(f.bytes < 2 * opts.max_part_bytes as u64, "{f:?}");
            let rows = read_part(&store, &f.path).await;
            assert_eq!(rows.len() as u64, f.rows);
            read_back.extend(rows);
        }
        // Every row, in order, with its content, across the parts.
        let expected: Vec<(i64, String)> = (0..200_000).map(|i| (i, row_text(i))).collect();
        assert_eq!(read_back, expected);

        // An empty shard still writes one part, so the schema travels.
        let empty = write_parts(
            &store,
            "run/s00002/e1",
            schema.clone(),
            batches(schema, 0, 0),
            &opts,
            |_| Ok(()),
        )
        .await
        .unwrap();
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].rows, 0);
        assert!(read_part(&store, &empty[0].path).await.is_empty());
    }
}
