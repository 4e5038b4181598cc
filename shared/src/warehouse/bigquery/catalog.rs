//! Datasets and tables: the dataset's location (created only where asked), the staging
//! bucket's location, and a table created or widened from the staged schema.

use super::*;

impl BigQueryWarehouse {
    /// The dataset's location, which every job runs in. A missing dataset is created in
    /// `create_in`, or the load fails before anything moves; one that `create_in` places
    /// elsewhere is refused ("After a dataset is created, its location cannot be changed").
    pub(super) async fn ensure_dataset(&self) -> Result<String> {
        self.ensure_dataset_for(None).await
    }

    /// `ensure_dataset`, checking first (before a missing dataset is created) that BigQuery
    /// loads from `staging`'s bucket into the dataset's location.
    pub(super) async fn ensure_dataset_for(&self, staging: Option<&Staging>) -> Result<String> {
        let what = || format!("dataset {}.{}", self.project, self.dataset);
        let get = || async {
            match self
                .client
                .dataset()
                .get(&self.project, &self.dataset)
                .await
            {
                Ok(dataset) => Ok(Some(dataset)),
                Err(e) if http_status(&e) == Some(404) => Ok(None),
                Err(e) => Err(bq_error(format!("cannot read {}", what()))(e)),
            }
        };
        let dataset = match get().await? {
            Some(dataset) => dataset,
            None => {
                let Some(location) = &self.create_in else {
                    return Err(Error::Warehouse(format!(
                        "{} does not exist: create it where the data must live, or set \
                         BIGQUERY_LOCATION (e.g. US, EU, europe-west1) for shardflow to create it \
                         there; nothing was loaded",
                        what()
                    )));
                };
                if let Some(staging) = staging {
                    self.check_bucket_location(staging, location).await?;
                }
                tracing::info!(dataset = %what(), %location, "creating the dataset");
                let created = self
                    .client
                    .dataset()
                    .create(Dataset::new(&self.project, &self.dataset).location(location))
                    .await;
                match created {
                    Ok(dataset) => dataset,
                    // Someone else created it meanwhile.
                    Err(e) if http_status(&e) == Some(409) => get().await?.ok_or_else(|| {
                        Error::Warehouse(format!("{} exists and vanished", what()))
                    })?,
                    Err(e) => return Err(bq_error(format!("cannot create {}", what()))(e)),
                }
            }
        };
        let location = dataset.location.ok_or_else(|| {
            Error::Warehouse(format!("BigQuery reports no location for {}", what()))
        })?;
        if let Some(want) = &self.create_in
            && !want.eq_ignore_ascii_case(&location)
        {
            return Err(Error::Warehouse(format!(
                "{} is in {location}, but BIGQUERY_LOCATION is {want}; a dataset's location \
                 cannot change: fix BIGQUERY_LOCATION or load into another dataset",
                what()
            )));
        }
        if let Some(staging) = staging {
            self.check_bucket_location(staging, &location).await?;
        }
        Ok(location)
    }

    /// Refuses, before any job runs, a staging bucket BigQuery would not load from into this
    /// dataset: "the dataset that contains the table must be in the same regional or
    /// multi-regional location as the Cloud Storage bucket".
    pub(super) async fn check_bucket_location(
        &self,
        staging: &Staging,
        dataset_location: &str,
    ) -> Result<()> {
        let Some(gcs) = staging.gcs_bucket() else {
            return Ok(());
        };
        let bucket = gcs.bucket().to_string();
        let mut known = self.bucket_locations.lock().await;
        let location = match known.get(&bucket) {
            Some(l) => l.clone(),
            None => {
                let info = gcs.bucket_info().await.map_err(|e| {
                    Error::Warehouse(format!(
                        "cannot read the location of staging bucket gs://{bucket} \
                         (storage.buckets.get): {e}"
                    ))
                })?;
                known.insert(bucket.clone(), info.location.clone());
                info.location
            }
        };
        if colocated(dataset_location, &location) {
            Ok(())
        } else {
            Err(Error::Warehouse(format!(
                "staging bucket gs://{bucket} is in {location} and dataset {}.{} in \
                 {dataset_location}: BigQuery loads only from a bucket in the dataset's location; \
                 use a staging bucket there; nothing was loaded",
                self.project, self.dataset
            )))
        }
    }

    pub(super) async fn get_table(&self, table: &str) -> Result<Option<Table>> {
        match self
            .client
            .table()
            .get(&self.project, &self.dataset, table, None)
            .await
        {
            Ok(t) => Ok(Some(t)),
            Err(e) if http_status(&e) == Some(404) => Ok(None),
            Err(e) => Err(bq_error(format!(
                "cannot read table {}",
                self.full_name(table)
            ))(e)),
        }
    }

    /// Creates the table when missing; refuses one whose columns differ.
    pub(super) async fn ensure_table(
        &self,
        table: &str,
        columns: &[TableFieldSchema],
        expires: Option<SystemTime>,
        allow_new_columns: bool,
        location: Option<&str>,
    ) -> Result<()> {
        let full = self.full_name(table);
        let existing = match self.get_table(table).await? {
            Some(t) => t,
            None => {
                let mut new = Table::new(
                    &self.project,
                    &self.dataset,
                    table,
                    TableSchema::new(columns.to_vec()),
                );
                if let Some(at) = expires {
                    new = new.expiration_time(at);
                }
                match self.client.table().create(new).await {
                    Ok(_) => return Ok(()),
                    Err(e) if http_status(&e) == Some(409) => {
                        self.get_table(table).await?.ok_or_else(|| {
                            Error::Warehouse(format!("table {full} exists and vanished"))
                        })?
                    }
                    Err(e) => return Err(bq_error(format!("cannot create table {full}"))(e)),
                }
            }
        };
        let fields = existing.schema.fields.unwrap_or_default();
        crate::warehouse::check_columns(
            &full,
            &named_types(&fields),
            &named_types(columns),
            allow_new_columns,
        )?;
        check_modes(&full, &fields, columns)?;
        let new: Vec<&TableFieldSchema> = columns
            .iter()
            .filter(|c| !fields.iter().any(|f| f.name.eq_ignore_ascii_case(&c.name)))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        // schema_policy "add_columns": the new columns are added before the load, by DDL
        // rather than the load's ALLOW_FIELD_ADDITION, which a staging table's copy job lacks
        // and bqemulator ignores. If the load then fails, they stay, empty.
        let added: Vec<String> = new
            .iter()
            .map(|c| {
                format!(
                    "ADD COLUMN IF NOT EXISTS {} {}",
                    quoted(&c.name),
                    type_name(&c.r#type)
                )
            })
            .collect();
        let names: Vec<&str> = new.iter().map(|c| c.name.as_str()).collect();
        tracing::info!(table = %full, columns = ?names, "adding columns");
        // One job per table version and column set: a retry waits for it instead of adding
        // twice.
        let base = job_id(
            &self.dataset,
            existing.creation_time.as_deref().unwrap_or("0"),
            table,
            &format!("add_{}", names.join("_")),
        );
        let config = JobConfiguration {
            query: Some(JobConfigurationQuery {
                query: format!("ALTER TABLE {} {}", quoted(&full), added.join(", ")),
                use_legacy_sql: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let what = format!("adding columns {} to {full}", names.join(", "));
        self.run_job(&base, &what, location, config, None).await?;
        Ok(())
    }
}
