//! The load routes of staged parts: direct (one load job into the table) and staged copy
//! (load jobs into a staging table, one copy), each checked against the reported rows.

use super::*;

impl BigQueryWarehouse {
    /// A load of staged Parquet parts. `decimalTargetTypes` makes each decimal the column the
    /// type map created: "In the order of NUMERIC, BIGNUMERIC, and STRING, a type is picked if
    /// it is in the specified list and if it supports the precision and the scale" (the
    /// default, `["NUMERIC"]`, would put a decimal(50, 20) into NUMERIC and fail).
    pub(super) fn load_job(
        &self,
        table: &str,
        uris: &[String],
        disposition: &str,
    ) -> JobConfiguration {
        JobConfiguration {
            load: Some(JobConfigurationLoad {
                source_uris: Some(uris.to_vec()),
                source_format: Some("PARQUET".into()),
                decimal_target_types: Some(DECIMAL_TARGET_TYPES.map(String::from).to_vec()),
                destination_table: Some(self.table_ref(table)),
                write_disposition: Some(disposition.into()),
                // The table was created from the run's schema; a load must not invent one.
                create_disposition: Some("CREATE_NEVER".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Checks the count against the workers' and returns the rows the job added.
    pub(super) async fn verify(
        &self,
        req: &LoadRequest<'_>,
        job: &Job,
        location: Option<&str>,
    ) -> Result<u64> {
        let after = self.count_rows(req.table, location).await?;
        let loaded = match req.mode {
            WriteMode::Replace => after,
            WriteMode::Append | WriteMode::Merge => {
                let before = rows_before(job)?;
                after.checked_sub(before).ok_or_else(|| {
                    Error::Warehouse(format!(
                        "table {} shrank from {before} to {after} rows around BigQuery job {}",
                        self.full_name(req.table),
                        job_name(job)
                    ))
                })?
            }
        };
        if loaded != req.expected_rows {
            return Err(Error::Warehouse(format!(
                "table {} received {loaded} rows from BigQuery job {}, but the workers reported {}",
                self.full_name(req.table),
                job_name(job),
                req.expected_rows
            )));
        }
        Ok(loaded)
    }

    /// Up to `max_uris_per_job` parts: one load job into the table.
    pub(super) async fn load_direct(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        location: Option<&str>,
    ) -> Result<u64> {
        let base = job_id(&self.dataset, req.load_key, req.table, "load");
        let what = format!(
            "load of {} parts into {}",
            uris.len(),
            self.full_name(req.table)
        );
        let config = self.load_job(req.table, uris, write_disposition(req.mode));
        let append = (req.mode == WriteMode::Append).then_some(req.table);
        let job = self.run_job(&base, &what, location, config, append).await?;
        self.verify(req, &job, location).await
    }

    /// Loads every part into a fresh staging table, in steps of `max_uris_per_job`, and
    /// checks it holds the rows the workers reported. The staging table holds the parts as
    /// they are: JSON columns as the STRING a Parquet part can fill.
    pub(super) async fn stage_parts(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
        staging: &str,
    ) -> Result<()> {
        let expires = SystemTime::now() + STAGING_TTL;
        let staged = staging_columns(columns);
        self.ensure_table(staging, &staged, Some(expires), false, location)
            .await?;
        let steps = uris.chunks(self.max_uris_per_job.max(1));
        let count = steps.len();
        for (n, chunk) in steps.enumerate() {
            let base = job_id(
                &self.dataset,
                req.run_id,
                req.table,
                &format!("stage{n:05}"),
            );
            let what = format!(
                "step {} of {count}: {} parts into staging table {}",
                n + 1,
                chunk.len(),
                self.full_name(staging)
            );
            // The first step empties a staging table an earlier attempt may have filled.
            let disposition = if n == 0 {
                "WRITE_TRUNCATE_DATA"
            } else {
                "WRITE_APPEND"
            };
            let config = self.load_job(staging, chunk, disposition);
            self.run_job(&base, &what, location, config, None).await?;
        }
        let staged = self.count_rows(staging, location).await?;
        if staged != req.expected_rows {
            return Err(Error::Warehouse(format!(
                "staging table {} received {staged} rows from {count} load jobs, but the \
                 workers reported {}; table {} left as it was",
                self.full_name(staging),
                req.expected_rows,
                self.full_name(req.table)
            )));
        }
        Ok(())
    }

    /// Stages the parts for the job `step` that moves them on, unless that job was already
    /// inserted: a retried run must not look for a staging table that is dropped once the job
    /// is done. Returns the staging table and the job's base id.
    pub(super) async fn stage_for(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
        step: &str,
    ) -> Result<(String, String)> {
        let staging = staging_table_name(req.table, req.run_id);
        let base = job_id(&self.dataset, req.load_key, req.table, step);
        if !matches!(self.lookup(&base, location).await?, Lookup::Existing(..)) {
            self.stage_parts(req, uris, columns, location, &staging)
                .await?;
        }
        Ok((staging, base))
    }

    /// Drops a staging table once what it fed has committed; one left behind expires.
    pub(super) async fn drop_staging(&self, staging: &str) {
        if let Err(e) = self
            .client
            .table()
            .delete(&self.project, &self.dataset, staging)
            .await
            && http_status(&e) != Some(404)
        {
            tracing::warn!(table = %self.full_name(staging), error = %describe(&e), "cannot drop the staging table");
        }
    }

    /// More parts than one load job takes, appended: load steps into a staging table, check
    /// it, one copy (`WRITE_APPEND` keeps the table's schema), drop it.
    pub(super) async fn load_in_steps(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
    ) -> Result<u64> {
        let (staging, copy_base) = self.stage_for(req, uris, columns, location, "copy").await?;
        let what = format!(
            "copy of {} into {}",
            self.full_name(&staging),
            self.full_name(req.table)
        );
        let config = JobConfiguration {
            copy: Some(JobConfigurationTableCopy {
                source_table: Some(self.table_ref(&staging)),
                destination_table: Some(self.table_ref(req.table)),
                write_disposition: Some("WRITE_APPEND".into()),
                create_disposition: Some("CREATE_NEVER".into()),
                operation_type: Some("COPY".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let append = (req.mode == WriteMode::Append).then_some(req.table);
        let job = self
            .run_job(&copy_base, &what, location, config, append)
            .await?;
        let loaded = self.verify(req, &job, location).await?;
        self.drop_staging(&staging).await;
        Ok(loaded)
    }
}
