//! Writes a shard's batch stream as zstd Parquet parts of bounded size to staging, at the
//! deterministic paths `{run_id}/{shard_id}/part-{n:05}.parquet`. Row groups are closed by
//! encoded size, so memory stays bounded whatever the row width.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
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

fn properties(opts: &PartOptions) -> Result<WriterProperties> {
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(opts.zstd_level)?))
        .set_max_row_group_row_count(Some(1 << 20))
        .build())
}

struct OpenPart {
    writer: AsyncArrowWriter<BufWriter>,
    path: String,
    rows: u64,
}

/// Writes every batch; always at least one part, so an empty shard still carries its schema.
/// `on_batch` hears each batch's row count (for progress).
pub async fn write_parts(
    store: &Arc<dyn ObjectStore>,
    run_id: &str,
    shard_id: &str,
    schema: SchemaRef,
    mut batches: BatchStream,
    opts: &PartOptions,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<StagedFile>> {
    let props = properties(opts)?;
    let open = |n: usize| -> Result<OpenPart> {
        let path = staging_part_path(run_id, shard_id, n);
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
        on_batch(batch.num_rows());
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
