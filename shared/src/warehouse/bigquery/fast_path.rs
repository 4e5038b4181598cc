//! The fast path: source files on GCS that BigQuery reads itself, loaded where they lie.

use super::*;

impl BigQueryWarehouse {
    /// A load of source files as they lie: BigQuery parses them into the table's columns,
    /// by position for CSV and by name for JSON lines and Parquet.
    pub(super) fn source_files_job(
        &self,
        table: &str,
        uris: &[String],
        format: &NativeFormat,
        mode: WriteMode,
    ) -> JobConfiguration {
        let mut load = JobConfigurationLoad {
            source_uris: Some(uris.to_vec()),
            destination_table: Some(self.table_ref(table)),
            write_disposition: Some(write_disposition(mode).into()),
            create_disposition: Some("CREATE_NEVER".into()),
            // One bad record fails the job, naming the file and the position.
            max_bad_records: Some(0),
            ..Default::default()
        };
        match format {
            NativeFormat::Csv {
                delimiter,
                quote,
                skip_leading_rows,
                encoding,
            } => {
                load.source_format = Some("CSV".into());
                load.field_delimiter = Some(delimiter.to_string());
                load.quote = Some(quote.to_string());
                load.skip_leading_rows = Some(*skip_leading_rows as i32);
                load.encoding = Some((*encoding).into());
                // The workers' reader accepts line breaks inside quotes; so must this path.
                load.allow_quoted_newlines = Some(true);
            }
            NativeFormat::JsonLines => load.source_format = Some("NEWLINE_DELIMITED_JSON".into()),
            NativeFormat::Parquet => {
                load.source_format = Some("PARQUET".into());
                load.decimal_target_types = Some(DECIMAL_TARGET_TYPES.map(String::from).to_vec());
            }
        }
        JobConfiguration {
            load: Some(load),
            ..Default::default()
        }
    }

    /// Source files loaded as they lie, by one job per chunk of URIs (the fast path).
    pub(super) async fn load_files_in_place(
        &self,
        req: SourceFilesLoad<'_>,
    ) -> Result<LoadOutcome> {
        self.check_table_name(req.table)?;
        let full = self.full_name(req.table);
        if let Some(other) = req.uris.iter().find(|u| !u.starts_with("gs://")) {
            return Err(Error::Warehouse(format!(
                "BigQuery loads source files from gs:// only, not {other}; table {full} not loaded"
            )));
        }
        if req.uris.len() > self.max_uris_per_job {
            return Err(Error::Warehouse(format!(
                "{} source files are more than one BigQuery load job takes ({}); table {full} \
                 not loaded",
                req.uris.len(),
                self.max_uris_per_job
            )));
        }
        let columns = bigquery_schema(req.schema)?;
        let location = self.ensure_dataset().await?;
        let location = Some(location.as_str());
        self.ensure_table(req.table, &columns, None, false, location)
            .await?;
        let base = job_id(&self.dataset, req.load_key, req.table, "files");
        let what = format!("load of {} source files into {full}", req.uris.len());
        let config = self.source_files_job(req.table, req.uris, &req.format, req.mode);
        let append = (req.mode == WriteMode::Append).then_some(req.table);
        let job = self.run_job(&base, &what, location, config, append).await?;
        let after = self.count_rows(req.table, location).await?;
        let loaded = match req.mode {
            WriteMode::Replace => after,
            WriteMode::Append | WriteMode::Merge => {
                let before = rows_before(&job)?;
                after.checked_sub(before).ok_or_else(|| {
                    Error::Warehouse(format!(
                        "table {full} shrank from {before} to {after} rows around BigQuery job {}",
                        job_name(&job)
                    ))
                })?
            }
        };
        // No worker counted these rows. The table cannot have gained more than the job read
        // (more means another writer appended meanwhile). bqemulator reports the table's
        // total as the job's output rows, hence no equality check.
        let reported = job
            .statistics
            .as_ref()
            .and_then(|s| s.load.as_ref())
            .and_then(|l| l.output_rows.as_ref())
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(reported) = reported
            && reported < loaded
        {
            return Err(Error::Warehouse(format!(
                "table {full} gained {loaded} rows, but BigQuery job {} read only {reported} from \
                 the source files: another writer appended meanwhile",
                job_name(&job)
            )));
        }
        Ok(LoadOutcome {
            rows_loaded: loaded,
            files: req.uris.len(),
            location: full,
            source_read: source_read(&job),
        })
    }
}
