//! The merge: the latest staged row of each key replaces the table's rows of that key, files
//! holding none of the keys are linked as they are; and the Parquet reads and writes it needs.

use super::*;

pub(super) fn read_batches(
    path: &Path,
    columns: Option<&[String]>,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Warehouse(format!("cannot open {}: {e}", path.display())))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let builder = match columns {
        None => builder,
        Some(names) => {
            let schema = builder.parquet_schema();
            let indices: Vec<usize> = names
                .iter()
                .map(|n| {
                    schema
                        .columns()
                        .iter()
                        .position(|c| c.name() == n)
                        .ok_or_else(|| {
                            Error::Warehouse(format!(
                                "{} has no column {n:?} to merge on",
                                path.display()
                            ))
                        })
                })
                .collect::<Result<_>>()?;
            let mask = parquet::arrow::ProjectionMask::leaves(schema, indices);
            builder.with_projection(mask)
        }
    };
    let reader = builder.build()?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// Row-encodes the key columns (named in `keys`) of a batch: equal keys, equal bytes.
pub(super) fn key_rows(
    converter: &RowConverter,
    batch: &RecordBatch,
    keys: &[String],
) -> Result<Rows> {
    let columns = keys
        .iter()
        .map(|k| {
            batch.column_by_name(k).cloned().ok_or_else(|| {
                Error::Warehouse(format!("a staged part has no merge key column {k:?}"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(converter.convert_columns(&columns)?)
}

pub(super) fn write_file(path: &Path, schema: SchemaRef, batches: &[RecordBatch]) -> Result<u64> {
    let file = std::fs::File::create(path)
        .map_err(|e| Error::Warehouse(format!("cannot create {}: {e}", path.display())))?;
    let props = crate::parquet_sink::properties(&crate::parquet_sink::PartOptions::default())?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
    let mut rows = 0;
    for b in batches {
        rows += b.num_rows() as u64;
        writer.write(b)?;
    }
    writer.close()?;
    Ok(rows)
}

/// The staged row that holds a key's latest version so far.
pub(super) struct Winner {
    /// The row encoding of its `latest_by` value; None without one.
    rank: Option<Box<[u8]>>,
    part: usize,
    row: usize,
}

/// The merge: the latest staged row of each key replaces the table's rows of that key (in
/// files rewritten without them); files holding no staged key are linked as they are.
pub(super) fn merge_into(req: &LoadRequest<'_>, live: &Path, build: &Path) -> Result<LoadOutcome> {
    if req.merge_keys.is_empty() {
        return Err(Error::Warehouse(format!(
            "a merge into {} needs merge keys",
            req.table
        )));
    }
    let key_fields = req
        .merge_keys
        .iter()
        .map(|k| {
            req.schema
                .field_with_name(k)
                .map(|f| SortField::new(f.data_type().clone()))
                .map_err(|_| {
                    Error::Warehouse(format!("no merge key column {k:?} in {}", req.table))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let keys = RowConverter::new(key_fields)?;
    let order = match req.latest_by {
        Some(c) => Some(RowConverter::new(vec![SortField::new(
            req.schema
                .field_with_name(c)
                .map_err(|_| Error::Warehouse(format!("no column {c:?} to order a merge by")))?
                .data_type()
                .clone(),
        )])?),
        None => None,
    };

    // The winner of each key among the staged rows: the greatest `latest_by` (nulls lose),
    // the later part on a tie. Only the key and order columns are read for this.
    let staged: Vec<PathBuf> = req
        .parts
        .iter()
        .map(|part| {
            req.staging.local_path(&part.path).ok_or_else(|| {
                Error::Warehouse(
                    "the Parquet directory warehouse loads from local staging only".into(),
                )
            })
        })
        .collect::<Result<_>>()?;
    let mut probe: Vec<String> = req.merge_keys.to_vec();
    if let Some(c) = req.latest_by
        && !probe.iter().any(|k| k == c)
    {
        probe.push(c.to_string());
    }
    // Keys and ranks as their row encodings: byte order is the values' order, and a lookup
    // by `&[u8]` costs no allocation per row.
    let mut part_rows: Vec<usize> = Vec::with_capacity(staged.len());
    let mut winners: HashMap<Box<[u8]>, Winner> = HashMap::new();
    for (p, path) in staged.iter().enumerate() {
        let mut offset = 0;
        for batch in read_batches(path, Some(&probe))?.1 {
            let rows = key_rows(&keys, &batch, req.merge_keys)?;
            let ordering = match (&order, req.latest_by) {
                (Some(converter), Some(c)) => {
                    let column = batch.column_by_name(c).cloned().ok_or_else(|| {
                        Error::Warehouse(format!("a staged part has no column {c:?}"))
                    })?;
                    Some(converter.convert_columns(&[column])?)
                }
                _ => None,
            };
            for i in 0..batch.num_rows() {
                let rank: Option<&[u8]> = ordering.as_ref().map(|o| o.row(i).data());
                let beats = |w: &Winner| rank >= w.rank.as_deref();
                let key = rows.row(i).data();
                match winners.get_mut(key) {
                    Some(w) if !beats(w) => {}
                    Some(w) => {
                        w.rank = rank.map(Into::into);
                        (w.part, w.row) = (p, offset + i);
                    }
                    None => {
                        winners.insert(
                            key.into(),
                            Winner {
                                rank: rank.map(Into::into),
                                part: p,
                                row: offset + i,
                            },
                        );
                    }
                }
            }
            offset += batch.num_rows();
        }
        part_rows.push(offset);
    }
    let staged_rows: u64 = part_rows.iter().map(|n| *n as u64).sum();
    if staged_rows != req.expected_rows {
        return Err(Error::Warehouse(format!(
            "staged parts hold {staged_rows} rows but the workers reported {}; table {} left as it was",
            req.expected_rows, req.table
        )));
    }
    let mut keep: Vec<Vec<bool>> = part_rows.iter().map(|n| vec![false; *n]).collect();
    for w in winners.values() {
        keep[w.part][w.row] = true;
    }

    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut files = 0usize;
    let mut kept_rows = 0u64;
    if live.exists() {
        for (n, f) in table_files(live)?.into_iter().enumerate() {
            let name = f.file_name().map(|n| n.to_os_string()).unwrap_or_default();
            let (_, key_batches) = read_batches(&f, Some(req.merge_keys))?;
            let mut hit = false;
            for batch in &key_batches {
                let rows = key_rows(&keys, batch, req.merge_keys)?;
                if (0..batch.num_rows()).any(|i| winners.contains_key(rows.row(i).data())) {
                    hit = true;
                    break;
                }
            }
            if !hit {
                link_or_copy(&f, &build.join(name))?;
                kept_rows += parquet_rows(&f)?;
                files += 1;
                continue;
            }
            let (schema, batches) = read_batches(&f, None)?;
            let mut remaining = Vec::with_capacity(batches.len());
            for batch in &batches {
                let rows = key_rows(&keys, batch, req.merge_keys)?;
                let mask: BooleanArray = (0..batch.num_rows())
                    .map(|i| Some(!winners.contains_key(rows.row(i).data())))
                    .collect();
                let rest = filter_record_batch(batch, &mask)?;
                if rest.num_rows() > 0 {
                    remaining.push(rest);
                }
            }
            if !remaining.is_empty() {
                kept_rows += write_file(
                    &build.join(format!("{}-{tag}-kept-{n:05}.parquet", req.run_id)),
                    schema,
                    &remaining,
                )?;
                files += 1;
            }
        }
    }
    // Staged parts whose every row wins are linked; the others are written without the
    // rows that lost to a later version of their key.
    let mut merged = 0u64;
    for (p, (path, keep)) in staged.iter().zip(keep).enumerate() {
        let won = keep.iter().filter(|k| **k).count() as u64;
        if won == 0 {
            continue;
        }
        let to = build.join(format!("{}-{tag}-merged-{p:05}.parquet", req.run_id));
        if won == keep.len() as u64 {
            link_or_copy(path, &to)?;
        } else {
            let (schema, batches) = read_batches(path, None)?;
            let mut offset = 0;
            let mut rest = Vec::with_capacity(batches.len());
            for batch in &batches {
                let mask = BooleanArray::from(keep[offset..offset + batch.num_rows()].to_vec());
                offset += batch.num_rows();
                rest.push(filter_record_batch(batch, &mask)?);
            }
            write_file(&to, schema, &rest)?;
        }
        merged += won;
        files += 1;
    }
    // What the new version holds, read back from its footers.
    let mut total = 0;
    for f in table_files(build)? {
        total += parquet_rows(&f)?;
    }
    if total != kept_rows + merged || merged != winners.len() as u64 {
        return Err(Error::Warehouse(format!(
            "the merged version of {} holds {total} rows, not {kept_rows} kept plus {} merged; \
             table left as it was",
            req.table,
            winners.len()
        )));
    }
    Ok(LoadOutcome {
        rows_loaded: merged,
        files,
        location: live.display().to_string(),
        source_read: None,
    })
}
