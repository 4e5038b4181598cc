//! The load: every shard's parts (or the source files themselves) into the warehouse at once,
//! checked against what the shards reported.

use super::*;

impl Engine {
    /// Every shard is in: gathers the parts in plan order and loads them once.
    pub(super) async fn load(
        &self,
        job: &RunJob,
        run_id: &str,
        plan: &Plan,
        timestamp_column: Option<&str>,
        report: &mut RunReport,
    ) -> Result<()> {
        let spec = &job.spec;
        let records = self.state.shards(run_id).await?;
        let mut parts: Vec<StagedFile> = Vec::new();
        for r in &records {
            report.shard_rows.push(r.rows.unwrap_or(0));
            parts.extend(r.files.iter().cloned());
        }
        report.rows_extracted = report.shard_rows.iter().sum();
        let schema = shardflow::source::staged_schema(
            spec.source_type,
            &plan.source_columns,
            &plan.destination_names,
        );
        let destination = |name: &str| plan.destination_name(name).to_string();
        let staged_timestamp = timestamp_column.map(destination);
        let summary = summarize_shards(&records, &schema, staged_timestamp.as_deref())?;
        let merge_keys: Vec<String> = plan.merge_keys.iter().map(|k| destination(k)).collect();
        report.renamed_columns = plan.renamed_columns.clone();
        // Of a merge's staged rows sharing a key, the one latest by its window's column wins.
        let (mode, latest_by) = match &spec.load {
            Load::Catalog { .. } => (WriteMode::Replace, None),
            Load::Append { .. } => (WriteMode::Append, None),
            Load::Merge { window, .. } => (WriteMode::Merge, Some(destination(&window.column))),
        };
        let outcome = self
            .warehouse
            .load(LoadRequest {
                table: &spec.dest_table_name,
                schema: &schema,
                run_id,
                load_key: match mode {
                    WriteMode::Replace => run_id,
                    // No attempt of the job may append twice (nor need merge twice).
                    WriteMode::Append | WriteMode::Merge => &job.job_key,
                },
                parts: &parts,
                staging: &self.staging,
                mode,
                expected_rows: report.rows_extracted,
                merge_keys: &merge_keys,
                latest_by: latest_by.as_deref(),
                allow_new_columns: spec
                    .files()
                    .is_some_and(|f| f.schema_policy == SchemaPolicy::AddColumns),
            })
            .await?;
        fault::point(fault::Step::LoadCommitted)?;
        report.rows_loaded = outcome.rows_loaded;
        report.destination = Some(outcome.location);
        report.checksum = Some(summary.checksum);
        // The largest value loaded; the planned high-water mark when the column is not
        // extracted (it bounds what was read, in the same snapshot).
        report.watermark = summary
            .watermark
            .or_else(|| plan.window.as_ref().map(|w| w.through.clone()));
        if plan.files.is_some() {
            report.processed_files = processed_files(&records, run_id, stream_key(spec))?;
            report.files_loaded = Some(report.processed_files.len());
        }
        Ok(())
    }

    /// The fast path: the warehouse loads the source files itself, in one job.
    pub(super) async fn load_source_files(
        &self,
        job: &RunJob,
        run_id: &str,
        plan: &Plan,
        direct: &shardflow::source::files::plan::DirectLoad,
        report: &mut RunReport,
    ) -> Result<()> {
        let spec = &job.spec;
        let schema = shardflow::source::staged_schema(
            spec.source_type,
            &plan.source_columns,
            &plan.destination_names,
        );
        report.renamed_columns = plan.renamed_columns.clone();
        let mode = match spec.load {
            Load::Catalog { .. } => WriteMode::Replace,
            Load::Append { .. } => WriteMode::Append,
            // The planner sends merges to the workers: one load job cannot match keys.
            Load::Merge { .. } => {
                return Err(Error::Other(
                    "a merge file job cannot be loaded by one load job over the files".into(),
                ));
            }
        };
        // BigQuery reads the files at load time and cannot pin a generation ("If you include a
        // generation number in the Cloud Storage URI, then the load job fails"): a file
        // rewritten since planning fails the run before anything moves.
        let location = FileLocation::open(spec)?;
        for files in direct.files.chunks(FILE_CHECKS_AT_ONCE) {
            futures::future::try_join_all(files.iter().map(|f| location.check_unchanged(f)))
                .await?;
        }
        let checked_at = chrono::Utc::now().timestamp_millis();
        let outcome = self
            .warehouse
            .load_source_files(SourceFilesLoad {
                table: &spec.dest_table_name,
                schema: &schema,
                load_key: match mode {
                    WriteMode::Replace => run_id,
                    _ => &job.job_key,
                },
                uris: &direct.uris,
                format: direct.format.clone(),
                mode,
            })
            .await?;
        fault::point(fault::Step::LoadCommitted)?;
        report.rows_extracted = outcome.rows_loaded;
        report.rows_loaded = outcome.rows_loaded;
        report.destination = Some(outcome.location);
        let stream_key = stream_key(spec).unwrap_or_default();
        let read = outcome.source_read.as_ref();
        // The job that committed may be an earlier attempt's, which read other files: only
        // those it read are recorded.
        let read_files: Vec<&FileInfo> = direct
            .files
            .iter()
            .filter(|f| read.is_none_or(|r| r.uris.contains(&location.uri(&f.path))))
            .collect();
        // One job counts only the total: a single file's rows are known, several files' not.
        let rows = (read_files.len() == 1).then_some(outcome.rows_loaded);
        let mut now: Vec<FileInfo> = Vec::with_capacity(read_files.len());
        for files in read_files.chunks(FILE_CHECKS_AT_ONCE) {
            let current =
                futures::future::join_all(files.iter().map(|f| location.current(f))).await;
            for (planned, current) in files.iter().zip(current) {
                // The job succeeded, so it read the file: one gone (or unreadable) now was
                // read as planned, and the load that committed must still be recorded.
                now.push(current.unwrap_or_else(|e| {
                    tracing::warn!(file = %location.uri(&planned.path), error = %e, "cannot look at the file after its load; taken as planned");
                    (*planned).clone()
                }));
            }
        }
        // A file rewritten around the job is recorded in the version the job read, when that
        // can be told.
        let window = read.map(|r| (r.started_ms, r.ended_ms));
        let mut loaded = Vec::with_capacity(read_files.len());
        for (planned, now) in read_files.into_iter().zip(now) {
            match read_version(planned, &now, window, checked_at) {
                ReadVersion::Planned => loaded.push(planned.clone()),
                ReadVersion::Current => {
                    if now.version_key() != planned.version_key() {
                        tracing::warn!(file = %location.uri(&planned.path), "rewritten before BigQuery read it; recorded in its new version");
                    }
                    loaded.push(now);
                }
                ReadVersion::NotRead => {
                    tracing::info!(file = %location.uri(&planned.path), "rewritten after an earlier attempt's load read it; its new version loads next");
                }
                ReadVersion::Unknown => {
                    let warning = format!(
                        "{} was rewritten while BigQuery's load job read it: the table holds its \
                         old or its new rows, which cannot be told; it is not recorded as loaded, \
                         so the next run loads its new version",
                        location.uri(&planned.path)
                    );
                    tracing::error!("{warning}");
                    report.warnings.push(warning);
                }
            }
        }
        report.processed_files = loaded
            .iter()
            .map(|f| shardflow::state::ProcessedFile {
                stream_key: stream_key.clone(),
                path: f.path.clone(),
                size: f.size,
                version: f.version_key(),
                last_modified: f.last_modified.to_rfc3339(),
                rows,
                run_id: run_id.to_string(),
            })
            .collect();
        report.files_loaded = Some(report.processed_files.len());
        Ok(())
    }
}

/// What the shards of a finished extraction say together.
#[derive(Debug, PartialEq)]
pub(super) struct ShardSummary {
    pub(super) checksum: String,
    pub(super) watermark: Option<String>,
}

/// Checks every shard staged the planned schema (parts of another shape must never reach
/// the load), and combines the shards' checksums and timestamp maxima.
pub(super) fn summarize_shards(
    records: &[ShardRecord],
    expected: &Schema,
    timestamp_column: Option<&str>,
) -> Result<ShardSummary> {
    let mut checksums = Vec::with_capacity(records.len());
    let mut maxima = Vec::new();
    // Shards almost always report the same JSON: decode and compare each distinct text once.
    let mut checked: Option<&str> = None;
    for r in records {
        let (Some(checksum), Some(schema_json)) = (&r.checksum, &r.schema_json) else {
            return Err(Error::Other(format!(
                "shard {} reported no checksum or schema",
                r.shard_id
            )));
        };
        if checked != Some(schema_json.as_str()) {
            let schema: Schema = serde_json::from_str(schema_json).map_err(|e| {
                Error::Other(format!(
                    "shard {} reported an unreadable schema: {e}",
                    r.shard_id
                ))
            })?;
            if schema.fields() != expected.fields() {
                return Err(Error::Other(format!(
                    "shard {} staged columns [{}], the plan expects [{}]",
                    r.shard_id,
                    describe_fields(&schema),
                    describe_fields(expected)
                )));
            }
            checked = Some(schema_json);
        }
        checksums.push(checksum.as_str());
        maxima.extend(r.max_value.clone());
    }
    let watermark = match timestamp_column {
        Some(column) => {
            let field = expected.field_with_name(column).map_err(|_| {
                Error::Other(format!("timestamp_column {column:?} is not extracted"))
            })?;
            match field.data_type() {
                // An unconstrained numeric travels as its text, whose order is not the
                // number's ("99" > "150"): the planned high-water mark, which PostgreSQL
                // took in the column's own type, is the watermark instead.
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => None,
                data_type => digest::max_of(&maxima, data_type)?,
            }
        }
        None => None,
    };
    Ok(ShardSummary {
        checksum: digest::combine_checksums(checksums)?,
        watermark,
    })
}

/// Source files checked (HEAD requests) at once around a direct load.
pub(super) const FILE_CHECKS_AT_ONCE: usize = 16;

/// Which version of a source file the committed load job read, the file being `now` after
/// it. The job ran over `window` (ms since the epoch); this attempt checked the files were
/// as planned at `checked_at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReadVersion {
    /// The version planned.
    Planned,
    /// The live one, written before the job started.
    Current,
    /// An older one than the live version, which it does not name: the job is an earlier
    /// attempt's and the file was rewritten after it ended.
    NotRead,
    /// Written while the job ran, or no time to tell by.
    Unknown,
}

pub(super) fn read_version(
    planned: &FileInfo,
    now: &FileInfo,
    window: Option<(i64, i64)>,
    checked_at: i64,
) -> ReadVersion {
    let unchanged = now.version_key() == planned.version_key();
    let written = now.last_modified.timestamp_millis();
    match window {
        None if unchanged => ReadVersion::Planned,
        None => ReadVersion::Unknown,
        // This attempt's job: it started after the files were checked as planned.
        Some((start, end)) if start >= checked_at => {
            if unchanged || written > end {
                ReadVersion::Planned
            } else if written < start {
                ReadVersion::Current
            } else {
                ReadVersion::Unknown
            }
        }
        // An earlier attempt's job, found by its id: only the times tell what it read.
        Some((start, _)) if written < start => ReadVersion::Current,
        Some((_, end)) if written > end => ReadVersion::NotRead,
        Some(_) => ReadVersion::Unknown,
    }
}

pub(super) fn describe_fields(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The files a file run's shards read, with the rows each gave, for the state store.
pub(super) fn processed_files(
    records: &[ShardRecord],
    run_id: &str,
    stream_key: Option<String>,
) -> Result<Vec<shardflow::state::ProcessedFile>> {
    let stream_key = stream_key.unwrap_or_default();
    // A Parquet file split by row groups is in several shards: add its rows up.
    let mut by_file: Vec<shardflow::state::ProcessedFile> = Vec::new();
    for r in records {
        let task: ShardTask = messages::decode("recorded shard", r.task_json.as_bytes())?;
        let ShardBounds::Files { files } = &task.bounds else {
            continue;
        };
        for (i, part) in files.iter().enumerate() {
            let rows = r.source_rows.get(i).copied().unwrap_or(0);
            match by_file.iter_mut().find(|p| p.path == part.file.path) {
                Some(p) => p.rows = Some(p.rows.unwrap_or(0) + rows),
                None => by_file.push(shardflow::state::ProcessedFile {
                    stream_key: stream_key.clone(),
                    path: part.file.path.clone(),
                    size: part.file.size,
                    version: part.file.version_key(),
                    last_modified: part.file.last_modified.to_rfc3339(),
                    rows: Some(rows),
                    run_id: run_id.to_string(),
                }),
            }
        }
    }
    Ok(by_file)
}
