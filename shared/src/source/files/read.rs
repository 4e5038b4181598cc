//! Reading a shard's files: each part as a stream (decompressed, transcoded), decoded
//! by arrow's CSV and JSON push decoders or read as Parquet, and conformed to the job's columns.

use super::*;

/// Reads a shard's files, one after the other, as batches of the task's columns.
pub async fn extract(
    spec: &JobSpec,
    task: &ShardTask,
    in_flight: usize,
) -> Result<(BatchStream, FileRowCounts)> {
    let ShardBounds::Files { files } = &task.bounds else {
        return Err(Error::Source(format!(
            "shard {} of a file job names no files",
            task.shard_id
        )));
    };
    let location = Arc::new(FileLocation::open(spec)?);
    let schema = crate::source::arrow_schema(spec.source_type, &task.columns);
    let counts: FileRowCounts = Arc::new(Mutex::new(vec![0; files.len()]));
    let (tx, rx) = mpsc::channel(in_flight.max(1));
    let (files, batch_rows, job_counts) = (files.clone(), task.batch_rows.max(1), counts.clone());
    tokio::spawn(async move {
        for (i, part) in files.iter().enumerate() {
            let sink = BatchSink {
                tx: &tx,
                counts: &job_counts,
                index: i,
                target: &schema,
            };
            let read = read_part(&location, part, batch_rows, &sink).await;
            if let Err(e) = read {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    });
    Ok((receiver_stream(rx), counts))
}

/// Where a file's batches go: conformed to the job's columns, counted, sent.
pub(crate) struct BatchSink<'a> {
    pub(crate) tx: &'a mpsc::Sender<Result<RecordBatch>>,
    pub(crate) counts: &'a FileRowCounts,
    pub(crate) index: usize,
    pub(crate) target: &'a SchemaRef,
}

impl BatchSink<'_> {
    /// False when the reader hung up (the shard failed downstream).
    pub(super) async fn send(&self, batch: RecordBatch, uri: &str) -> Result<bool> {
        let batch = conform(batch, self.target, uri)?;
        if let Some(n) = self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(self.index)
        {
            *n += batch.num_rows() as u64;
        }
        Ok(self.tx.send(Ok(batch)).await.is_ok())
    }
}

pub(super) async fn read_part(
    location: &FileLocation,
    part: &FilePart,
    batch_rows: usize,
    sink: &BatchSink<'_>,
) -> Result<()> {
    let uri = location.uri(&part.file.path);
    match location.spec.format {
        FileFormat::Parquet => read_parquet(location, part, batch_rows, sink, &uri).await,
        FileFormat::Csv => {
            let text = location.open_text(&part.file).await?;
            // The file's columns in its own order, typed as the job's where they match.
            let names: Vec<String> = if part.columns.is_empty() {
                sink.target
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect()
            } else {
                part.columns.clone()
            };
            // Decoded as text, then converted by pandas' rules (`pandas::ColumnReader`), as
            // the seed read the file; a column the job does not load stays text.
            let file_schema = Arc::new(Schema::new(
                names
                    .iter()
                    .map(|n| {
                        let target = match sink.target.field_with_name(n) {
                            Ok(f) => f.data_type().clone(),
                            Err(_) => DataType::Utf8,
                        };
                        Field::new(n, target, true)
                    })
                    .collect::<Vec<_>>(),
            ));
            read_csv(
                text,
                file_schema,
                &location.spec.options,
                batch_rows,
                sink,
                &uri,
            )
            .await
        }
        FileFormat::Json => {
            let text = location.open_text(&part.file).await?;
            let schema = Arc::new(Schema::new(
                sink.target
                    .fields()
                    .iter()
                    .map(|f| parse_field(f))
                    .collect::<Vec<_>>(),
            ));
            read_json(
                text,
                schema,
                location.spec.options.encoding,
                batch_rows,
                sink,
                &uri,
            )
            .await
        }
    }
}

/// The field a text decoder parses a column as: nullable, and a UTC timestamp as offset
/// `+00:00` (arrow parses named zones only with chrono-tz; the cast back is metadata only).
pub(crate) fn parse_field(field: &Field) -> Field {
    let data_type = match field.data_type() {
        DataType::Timestamp(unit, Some(_)) => DataType::Timestamp(*unit, Some("+00:00".into())),
        other => other.clone(),
    };
    Field::new(field.name(), data_type, true)
}

/// Appends `chunk` to `out` as UTF-8.
pub(super) fn transcode(chunk: &[u8], encoding: TextEncoding, out: &mut Vec<u8>) {
    match encoding {
        TextEncoding::Utf8 => out.extend_from_slice(chunk),
        // ISO-8859-1: each byte is the code point of the same number.
        TextEncoding::Latin1 => {
            for &b in chunk {
                if b < 0x80 {
                    out.push(b);
                } else {
                    out.push(0xC0 | (b >> 6));
                    out.push(0x80 | (b & 0x3F));
                }
            }
        }
    }
}

/// Reads the next chunk of a text stream, transcoded; false at the end.
pub(super) async fn fill(
    reader: &mut (dyn AsyncBufRead + Send + Unpin),
    encoding: TextEncoding,
    pending: &mut Vec<u8>,
    uri: &str,
) -> Result<bool> {
    let n = {
        let chunk = reader.fill_buf().await.map_err(|e| read_io_error(uri, e))?;
        transcode(chunk, encoding, pending);
        chunk.len()
    };
    reader.consume(n);
    Ok(n > 0)
}

pub(crate) fn csv_format(options: &FileOptions) -> arrow::csv::reader::Format {
    arrow::csv::reader::Format::default()
        .with_header(options.has_header)
        .with_delimiter(options.delimiter)
        .with_quote(options.quote)
}

/// A batch of text columns converted to `schema`'s types, each by its column's reader; a value
/// that does not convert fails naming where it is (`place` of its row), its column and itself.
pub(super) fn convert_text(
    batch: RecordBatch,
    schema: &SchemaRef,
    readers: &mut [pandas::ColumnReader],
    today: chrono::NaiveDate,
    place: impl Fn(usize) -> String,
) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .zip(readers.iter_mut())
        .map(|((column, field), reader)| {
            // JSON decodes all but its time columns as their own types.
            if column.data_type() == field.data_type() && !reader.na_markers {
                return Ok(column.clone());
            }
            let text = column
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .ok_or_else(|| {
                    Error::Source(format!("column {:?} was not read as text", field.name()))
                })?;
            reader.convert(text, field.data_type(), today).map_err(|u| {
                Error::Source(format!(
                    "{}: column {:?}: {:?} {}",
                    place(u.row),
                    field.name(),
                    u.value,
                    u.why
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| Error::Source(e.to_string()))
}

pub(crate) async fn read_csv(
    mut text: Box<dyn AsyncBufRead + Send + Unpin>,
    file_schema: SchemaRef,
    options: &FileOptions,
    batch_rows: usize,
    sink: &BatchSink<'_>,
    uri: &str,
) -> Result<()> {
    let text_schema = Arc::new(Schema::new(
        file_schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let mut decoder = arrow::csv::ReaderBuilder::new(text_schema)
        .with_format(csv_format(options))
        .with_batch_size(batch_rows)
        .build_decoder();
    let mut readers: Vec<pandas::ColumnReader> = file_schema
        .fields()
        .iter()
        .map(|_| pandas::ColumnReader::new(true))
        .collect();
    let today = chrono::Utc::now().date_naive();
    // Records before the batch, the header included: the file's line of a row, where no
    // quoted field spans lines.
    let mut records_before = u64::from(options.has_header);
    let mut pending: Vec<u8> = Vec::with_capacity(READ_CHUNK * 2);
    let mut at_end = false;
    let mut quotes = QuoteScan::new(options.delimiter, options.quote);
    loop {
        if pending.is_empty() && !at_end {
            at_end = !fill(text.as_mut(), options.encoding, &mut pending, uri).await?;
            quotes.feed(&pending);
        }
        let finished = at_end && pending.is_empty();
        // The decoder ends an open quoted field at the end of input as if it were closed,
        // having swallowed every line after its opening quote: refuse the file instead.
        if finished && let Some(line) = quotes.unclosed_since() {
            return Err(Error::Source(format!(
                "{uri}, line {line}: a quoted field opens here and is not closed before the end \
                 of the file"
            )));
        }
        // Once the input ended this decodes nothing, which tells the decoder so: a last
        // record without a newline is complete then.
        let used = decoder.decode(&pending).map_err(|e| csv_error(uri, &e))?;
        pending.drain(..used);
        let finished = at_end && pending.is_empty();
        if decoder.capacity() == 0 || finished {
            if let Some(batch) = decoder.flush().map_err(|e| csv_error(uri, &e))? {
                let rows = batch.num_rows() as u64;
                let batch = convert_text(batch, &file_schema, &mut readers, today, |row| {
                    format!("{uri}, line {}", records_before + row as u64 + 1)
                })?;
                records_before += rows;
                if !sink.send(batch, uri).await? {
                    return Ok(());
                }
            }
            if finished {
                return Ok(());
            }
        }
    }
}

// ParquetObjectReader is deprecated in favour of a hand-written AsyncFileReader; it still
// reads exactly the ranges it needs, which is all this wants.
#[allow(deprecated)]
pub(super) async fn read_parquet(
    location: &FileLocation,
    part: &FilePart,
    batch_rows: usize,
    sink: &BatchSink<'_>,
    uri: &str,
) -> Result<()> {
    use parquet::arrow::ParquetRecordBatchStreamBuilder;
    use parquet::arrow::async_reader::ParquetObjectReader;
    location.check_unchanged(&part.file).await?;
    let reader = ParquetObjectReader::new(
        location.store().clone(),
        Path::from(part.file.path.as_str()),
    )
    .with_file_size(part.file.size);
    let mut builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| parquet_error(format!("{uri}: not a readable Parquet file"), e))?
        .with_batch_size(batch_rows);
    if let Some((first, end)) = part.row_groups {
        builder = builder.with_row_groups((first..end).collect());
    }
    let mut stream = builder
        .build()
        .map_err(|e| Error::Source(format!("{uri}: {e}")))?;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| parquet_error(uri.to_string(), e))?;
        if !sink.send(batch, uri).await? {
            return Ok(());
        }
    }
    Ok(())
}

/// A file's batch as the job's columns: matched by name, cast losslessly to the job's type,
/// NULL where the file lacks a column.
pub fn conform(batch: RecordBatch, target: &SchemaRef, uri: &str) -> Result<RecordBatch> {
    let rows = batch.num_rows();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for field in target.fields() {
        let column = match batch.column_by_name(field.name()) {
            None => new_null_array(field.data_type(), rows),
            Some(c) if c.data_type() == field.data_type() => c.clone(),
            Some(c) => cast_exactly(c, field, uri)?,
        };
        columns.push(column);
    }
    RecordBatch::try_new(target.clone(), columns).map_err(|e| Error::Source(format!("{uri}: {e}")))
}

/// Casts a column, refusing any value the cast would change (an overflow, a nanosecond BigQuery
/// cannot hold) rather than truncating it.
pub(super) fn cast_exactly(column: &ArrayRef, field: &Field, uri: &str) -> Result<ArrayRef> {
    use arrow::compute::{CastOptions, cast_with_options};
    let name = field.name();
    if let (
        DataType::Timestamp(TimeUnit::Nanosecond, _),
        DataType::Timestamp(TimeUnit::Microsecond, _),
    ) = (column.data_type(), field.data_type())
    {
        let nanos = arrow::compute::cast(column, &DataType::Int64)
            .map_err(|e| Error::Source(format!("{uri}: column {name:?}: {e}")))?;
        let nanos = nanos
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .ok_or_else(|| Error::Source(format!("{uri}: column {name:?}: not a timestamp")))?;
        if let Some(v) = nanos.iter().flatten().find(|v| v % 1000 != 0) {
            return Err(Error::Source(format!(
                "{uri}: column {name:?} holds a timestamp with nanoseconds ({v} ns since the \
                 epoch); BigQuery keeps microseconds, and shardflow does not round"
            )));
        }
    }
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    cast_with_options(column, field.data_type(), &options).map_err(|e| {
        Error::Source(format!(
            "{uri}: column {name:?} ({}) does not load as {}: {e}",
            column.data_type(),
            field.data_type()
        ))
    })
}

/// The column list of a file job, for shard messages.
pub fn source_columns(columns: &[(String, String)]) -> Vec<SourceColumn> {
    columns
        .iter()
        .map(|(name, bigquery_type)| SourceColumn {
            name: name.clone(),
            type_oid: 0,
            type_name: bigquery_type.clone(),
            typmod: -1,
            nullable: true,
        })
        .collect()
}

/// Reads at most `limit` bytes of a text stream (transcoded), and whether the file ended.
pub async fn read_head(
    reader: &mut (dyn AsyncBufRead + Send + Unpin),
    encoding: TextEncoding,
    limit: usize,
    uri: &str,
) -> Result<(Vec<u8>, bool)> {
    let mut out = Vec::with_capacity(limit.min(READ_CHUNK * 4));
    while out.len() < limit {
        if !fill(reader, encoding, &mut out, uri).await? {
            return Ok((out, true));
        }
    }
    Ok((out, false))
}
