//! JSON files as one value per line: a top-level array unwrapped as a stream, and where
//! a decoding error stands.

use super::*;

/// Turns a top-level JSON array (`[{…}, {…}]`) into one value per line, as a stream.
#[derive(Default)]
pub(super) struct ArrayUnwrapper {
    pub(super) started: bool,
    pub(super) is_array: bool,
    pub(super) depth: usize,
    pub(super) in_string: bool,
    pub(super) escaped: bool,
}

impl ArrayUnwrapper {
    pub(super) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        if !self.started {
            let skip = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
            rest = &rest[skip..];
            if rest.is_empty() {
                return;
            }
            self.started = true;
            self.is_array = rest[0] == b'[';
            if self.is_array {
                rest = &rest[1..];
            }
        }
        if !self.is_array {
            out.extend_from_slice(rest);
            return;
        }
        for &b in rest {
            if self.in_string {
                out.push(b);
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    out.push(b);
                }
                b'{' | b'[' => {
                    self.depth += 1;
                    out.push(b);
                }
                b'}' | b']' if self.depth > 0 => {
                    self.depth -= 1;
                    out.push(b);
                }
                // The closing bracket of the array itself.
                b']' => {}
                b',' if self.depth == 0 => out.push(b'\n'),
                b'\n' | b'\r' if self.depth == 0 => {}
                // A pretty-printed element spans lines: outside strings a line end is only
                // whitespace, so each element comes out on one line.
                b'\n' | b'\r' => out.push(b' '),
                _ => out.push(b),
            }
        }
    }
}

pub(crate) async fn read_json(
    mut text: Box<dyn AsyncBufRead + Send + Unpin>,
    schema: SchemaRef,
    encoding: TextEncoding,
    batch_rows: usize,
    sink: &BatchSink<'_>,
    uri: &str,
) -> Result<()> {
    // Time and number columns are decoded as text and read by pandas' rules, as `read_json`
    // and the seed's `to_datetime` read them (numeric text and booleans are numbers, `true`
    // 1); numbers meant as text are text.
    let decode_schema = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(_, _)
                | DataType::Date32
                | DataType::Time64(_)
                | DataType::Int64
                | DataType::Float64 => Field::new(f.name(), DataType::Utf8, true),
                _ => f.as_ref().clone(),
            })
            .collect::<Vec<_>>(),
    ));
    let mut readers: Vec<pandas::ColumnReader> = schema
        .fields()
        .iter()
        .map(|_| pandas::ColumnReader::new(false))
        .collect();
    let today = chrono::Utc::now().date_naive();
    let mut batch_lines: Vec<usize> = Vec::new();
    let build = || {
        arrow::json::ReaderBuilder::new(decode_schema.clone())
            .with_coerce_primitive(true)
            .with_batch_size(batch_rows)
            .build_decoder()
            .map_err(|e| Error::Source(format!("{uri}: {e}")))
    };
    let mut decoder = build()?;
    let mut unwrapper = ArrayUnwrapper::default();
    let mut raw = Vec::with_capacity(READ_CHUNK);
    let mut lines: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    // The current batch's lines, kept to find a bad value's line when the batch fails.
    let mut batch_text: Vec<u8> = Vec::new();
    let mut batch_first_line = 1usize;
    let mut line = 0usize;
    let mut at_end = false;
    while !at_end {
        raw.clear();
        at_end = !fill(text.as_mut(), encoding, &mut raw, uri).await?;
        unwrapper.feed(&raw, &mut lines);
        if at_end && !lines.is_empty() && lines.last() != Some(&b'\n') {
            lines.push(b'\n');
        }
        let mut start = 0;
        while let Some(nl) = lines[start..].iter().position(|&b| b == b'\n') {
            let one = &lines[start..start + nl + 1];
            start += nl + 1;
            line += 1;
            if one.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            decoder
                .decode(one)
                .map_err(|e| Error::Source(format!("{uri}, {} {line}: {e}", unit(&unwrapper))))?;
            if decoder.has_partial_record() {
                return Err(Error::Source(format!(
                    "{uri}, {} {line}: not one complete JSON value on the line",
                    unit(&unwrapper)
                )));
            }
            if batch_text.is_empty() {
                batch_first_line = line;
            }
            batch_text.extend_from_slice(one);
            batch_lines.push(line);
            if decoder.len() >= batch_rows {
                let batch = flush_json(
                    &mut decoder,
                    &batch_text,
                    batch_first_line,
                    &build,
                    uri,
                    &unwrapper,
                )?;
                batch_text.clear();
                if let Some(batch) = batch {
                    let place = |row| json_place(uri, &unwrapper, &batch_lines, row, line);
                    let batch = convert_text(batch, &schema, &mut readers, today, place)?;
                    if !sink.send(batch, uri).await? {
                        return Ok(());
                    }
                }
                batch_lines.clear();
            }
        }
        lines.drain(..start);
    }
    if let Some(batch) = flush_json(
        &mut decoder,
        &batch_text,
        batch_first_line,
        &build,
        uri,
        &unwrapper,
    )? {
        let place = |row| json_place(uri, &unwrapper, &batch_lines, row, line);
        let batch = convert_text(batch, &schema, &mut readers, today, place)?;
        sink.send(batch, uri).await?;
    }
    Ok(())
}

/// Where a batch's row is: its line (or array element), as the reader numbered them.
pub(super) fn json_place(
    uri: &str,
    unwrapper: &ArrayUnwrapper,
    lines: &[usize],
    row: usize,
    last: usize,
) -> String {
    let at = lines.get(row).copied().unwrap_or(last);
    format!("{uri}, {} {at}", unit(unwrapper))
}

pub(super) fn unit(unwrapper: &ArrayUnwrapper) -> &'static str {
    if unwrapper.is_array {
        "element"
    } else {
        "line"
    }
}

/// Flushes a JSON batch; when a value does not fit its column, decodes the batch's lines one
/// by one to name the line.
pub(super) fn flush_json(
    decoder: &mut arrow::json::reader::Decoder,
    batch_text: &[u8],
    first_line: usize,
    build: &dyn Fn() -> Result<arrow::json::reader::Decoder>,
    uri: &str,
    unwrapper: &ArrayUnwrapper,
) -> Result<Option<RecordBatch>> {
    match decoder.flush() {
        Ok(batch) => Ok(batch),
        Err(e) => {
            let mut line = first_line;
            for one in batch_text.split_inclusive(|&b| b == b'\n') {
                if one.iter().all(u8::is_ascii_whitespace) {
                    line += 1;
                    continue;
                }
                let mut single = build()?;
                let failed = single.decode(one).and_then(|_| single.flush());
                if let Err(e) = failed {
                    return Err(Error::Source(format!(
                        "{uri}, {} {line}: {e}",
                        unit(unwrapper)
                    )));
                }
                line += 1;
            }
            Err(Error::Source(format!("{uri}: {e}")))
        }
    }
}

/// A JSON sample as one value per line (a top-level array unwrapped).
pub(crate) fn json_lines(sample: &[u8]) -> Vec<u8> {
    let mut unwrapper = ArrayUnwrapper::default();
    let mut out = Vec::with_capacity(sample.len());
    unwrapper.feed(sample, &mut out);
    out
}
