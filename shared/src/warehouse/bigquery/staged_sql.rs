//! The staged SQL route: the parts into a staging table, then ONE query job (a MERGE, an
//! INSERT with JSON parsed, or a replace as a DELETE and INSERT transaction).

use super::*;

impl BigQueryWarehouse {
    /// Every part into a staging table, then ONE query job under the job's id (so a retried
    /// run waits for it rather than running it again) that moves the rows into the table with
    /// their JSON parsed: a MERGE, an INSERT, or a transaction that deletes and inserts. Then
    /// the staging table is dropped. Returns the rows loaded (for a merge, those it inserted or
    /// updated).
    pub(super) async fn load_sql(
        &self,
        req: &LoadRequest<'_>,
        uris: &[String],
        columns: &[TableFieldSchema],
        location: Option<&str>,
    ) -> Result<u64> {
        let full = self.full_name(req.table);
        let json: Vec<&str> = columns
            .iter()
            .filter(|c| matches!(c.r#type, FieldType::Json))
            .map(|c| c.name.as_str())
            .collect();
        if req.mode == WriteMode::Merge {
            if req.merge_keys.is_empty() {
                return Err(Error::Warehouse(format!(
                    "a merge into {full} needs merge keys"
                )));
            }
            let ordering = req
                .merge_keys
                .iter()
                .map(String::as_str)
                .chain(req.latest_by);
            if let Some(bad) = ordering.into_iter().find(|k| json.contains(k)) {
                return Err(Error::Warehouse(format!(
                    "column {bad} of {full} is JSON, which BigQuery cannot compare: it cannot be a \
                     merge key or the timestamp_column of a merge"
                )));
            }
        }
        let step = if req.mode == WriteMode::Merge {
            "merge"
        } else {
            "sql"
        };
        let (staging, base) = self.stage_for(req, uris, columns, location, step).await?;
        let sql_columns: Vec<SqlColumn> = columns
            .iter()
            .map(|c| SqlColumn {
                name: c.name.clone(),
                json: matches!(c.r#type, FieldType::Json),
            })
            .collect();
        let staged = self.full_name(&staging);
        let (sql, what) = match req.mode {
            WriteMode::Merge => (
                merge_sql(&full, &staged, &sql_columns, req.merge_keys, req.latest_by),
                format!(
                    "merge of {staged} into {full} on {}",
                    req.merge_keys.join(", ")
                ),
            ),
            WriteMode::Append => (
                routes::append_sql(&full, &staged, &sql_columns),
                format!("insert of {staged} into {full}"),
            ),
            WriteMode::Replace => (
                routes::replace_sql(&full, &staged, &sql_columns),
                format!("replace of {full}'s rows by {staged}"),
            ),
        };
        let config = JobConfiguration {
            query: Some(JobConfigurationQuery {
                query: sql,
                use_legacy_sql: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let job = self.run_job(&base, &what, location, config, None).await?;
        let affected = job
            .statistics
            .as_ref()
            .and_then(|s| s.query.as_ref())
            .and_then(|q| q.num_dml_affected_rows.as_deref())
            .and_then(|n| n.parse::<u64>().ok());
        let loaded = match (req.mode, affected) {
            (WriteMode::Replace, _) => {
                let after = self.count_rows(req.table, location).await?;
                (after == req.expected_rows).then_some(after).ok_or_else(|| {
                    Error::Warehouse(format!(
                        "table {full} holds {after} rows after BigQuery job {}, but the workers \
                         reported {}",
                        job_name(&job),
                        req.expected_rows
                    ))
                })?
            }
            (WriteMode::Append, Some(n)) if n != req.expected_rows => {
                return Err(Error::Warehouse(format!(
                    "BigQuery job {} ({what}) inserted {n} rows, but the workers reported {}",
                    job_name(&job),
                    req.expected_rows
                )));
            }
            (_, Some(n)) => n,
            (_, None) => {
                return Err(Error::Warehouse(format!(
                    "BigQuery job {} ({what}) reported no affected rows",
                    job_name(&job)
                )));
            }
        };
        self.drop_staging(&staging).await;
        Ok(loaded)
    }
}
