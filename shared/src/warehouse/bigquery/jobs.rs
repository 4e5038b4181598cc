//! Jobs: deterministic ids, lookups before every insert, waiting, retries under the next
//! attempt's id, what a failed job says, and counting a table's rows.

use super::*;

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

pub(super) fn short_digest(parts: &[&str]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    hex::encode(hasher.finalize())[..12].to_string()
}

/// Replaces every character `keep` refuses with `_`.
pub(super) fn clean(raw: &str, keep: impl Fn(char) -> bool) -> String {
    raw.chars().map(|c| if keep(c) { c } else { '_' }).collect()
}

/// A cleaned (ASCII) name cut to fit `max` bytes with `_{digest}` after it.
pub(super) fn with_digest(name: &str, max: usize, digest: &str) -> String {
    let keep = max.saturating_sub(digest.len() + 1).min(name.len());
    format!("{}_{digest}", &name[..keep])
}

/// The deterministic id of one job of a run's load of a table:
/// `shardflow_{run}_{table}_{step}_{digest}`, in `[A-Za-z0-9_-]`. Job ids are unique per
/// project, not per dataset, so the digest of (dataset, run, table, step) keeps apart loads into
/// other datasets and names that cleaning, cutting or an ambiguous `_` would make alike; the
/// readable part is for people reading the job list.
pub fn job_id(dataset: &str, run_id: &str, table: &str, step: &str) -> String {
    let readable = clean(&format!("shardflow_{run_id}_{table}_{step}"), |c| {
        c.is_ascii_alphanumeric() || c == '_' || c == '-'
    });
    with_digest(
        &readable,
        MAX_JOB_BASE_LEN,
        &short_digest(&[dataset, run_id, table, step]),
    )
}

/// The id of attempt `n` of a job (0 is the job itself).
pub(super) fn attempt_id(base: &str, n: u32) -> String {
    if n == 0 {
        base.to_string()
    } else {
        format!("{base}_retry{n}")
    }
}

/// The staging table of a run's load of `table` in steps: `{table}__shardflow_{run}`.
pub fn staging_table_name(table: &str, run_id: &str) -> String {
    let raw = format!("{table}{STAGING_MARK}{run_id}");
    let run = clean(run_id, |c| c.is_ascii_alphanumeric() || c == '_');
    let name = format!("{table}{STAGING_MARK}{run}");
    if name == raw && name.len() <= MAX_ID_LEN {
        name
    } else {
        with_digest(&name, MAX_ID_LEN, &short_digest(&[table, run_id]))
    }
}

// ---------------------------------------------------------------------------------------------
// Talking to BigQuery
// ---------------------------------------------------------------------------------------------

pub(super) fn http_status(e: &BQError) -> Option<i64> {
    match e {
        BQError::ResponseError { error } => Some(error.error.code),
        _ => None,
    }
}

pub(super) fn describe(e: &BQError) -> String {
    match e {
        BQError::ResponseError { error } => {
            format!("HTTP {}: {}", error.error.code, error.error.message)
        }
        // No answer: the peer and the cause, not "error sending request for url (…)". (The
        // client's reqwest is another version than ours: the cause is read off the chain.)
        BQError::RequestError(e) => {
            let cause = crate::net::io_cause(e).unwrap_or_else(|| {
                if e.is_timeout() {
                    "timed out waiting for an answer".into()
                } else {
                    e.to_string()
                }
            });
            match e.url() {
                Some(url) => format!(
                    "BigQuery at {}: {cause}",
                    url.origin().ascii_serialization()
                ),
                None => format!("BigQuery: {cause}"),
            }
        }
        other => other.to_string(),
    }
}

pub(super) fn bq_error(what: impl std::fmt::Display) -> impl FnOnce(BQError) -> Error {
    move |e| Error::Warehouse(format!("{what}: {}", describe(&e)))
}

/// What a failed job reported, or None when it succeeded (or is not done).
pub(super) fn job_failure(job: &Job) -> Option<String> {
    let status = job.status.as_ref()?;
    let first = status.error_result.as_ref()?;
    let mut text = format!(
        "{}: {}",
        first.reason.as_deref().unwrap_or("error"),
        first.message.as_deref().unwrap_or("(no message)")
    );
    if let Some(location) = &first.location {
        text.push_str(&format!(" (at {location})"));
    }
    // `errors` repeats the first and may add detail, e.g. one entry per bad file.
    let more: Vec<&str> = status
        .errors
        .iter()
        .flatten()
        .filter_map(|e| e.message.as_deref())
        .filter(|m| Some(*m) != first.message.as_deref())
        .take(3)
        .collect();
    if !more.is_empty() {
        text.push_str(&format!("; also: {}", more.join("; ")));
    }
    Some(text)
}

pub(super) fn job_state(job: &Job) -> &str {
    job.status
        .as_ref()
        .and_then(|s| s.state.as_deref())
        .unwrap_or("PENDING")
}

pub(super) fn job_name(job: &Job) -> &str {
    job.job_reference
        .as_ref()
        .and_then(|r| r.job_id.as_deref())
        .unwrap_or("(no id)")
}

/// What a load job read and when it ran (ms since the epoch), as it says of itself.
pub(super) fn source_read(job: &Job) -> Option<crate::warehouse::SourceRead> {
    let stats = job.statistics.as_ref()?;
    let ms = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<i64>().ok());
    let uris = job
        .configuration
        .as_ref()?
        .load
        .as_ref()?
        .source_uris
        .clone()?;
    Some(crate::warehouse::SourceRead {
        uris,
        started_ms: ms(&stats.start_time)?,
        ended_ms: ms(&stats.end_time)?,
    })
}

/// The destination's count before the job ran, from its label.
pub(super) fn rows_before(job: &Job) -> Result<u64> {
    job.configuration
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .and_then(|labels| labels.get(ROWS_BEFORE_LABEL))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            Error::Warehouse(format!(
                "BigQuery job {} has no {ROWS_BEFORE_LABEL} label, so the rows it appended cannot be counted",
                job_name(job)
            ))
        })
}

/// The table a load or copy job writes.
pub(super) fn destination(configuration: Option<&JobConfiguration>) -> Option<&TableReference> {
    let configuration = configuration?;
    configuration
        .load
        .as_ref()
        .and_then(|l| l.destination_table.as_ref())
        .or_else(|| {
            configuration
                .copy
                .as_ref()
                .and_then(|c| c.destination_table.as_ref())
        })
}

pub(super) fn table_text(table: Option<&TableReference>) -> String {
    table.map_or("no table".into(), |t| {
        format!("{}.{}.{}", t.project_id, t.dataset_id, t.table_id)
    })
}

/// A job found under our id must be ours: one writing the table we would write.
pub(super) fn check_destination(job: &Job, ours: &JobConfiguration) -> Result<()> {
    let theirs = table_text(destination(job.configuration.as_ref()));
    let ours = table_text(destination(Some(ours)));
    if theirs == ours {
        Ok(())
    } else {
        Err(Error::Warehouse(format!(
            "BigQuery job {} already exists but writes {theirs}, not {ours}; not using it",
            job_name(job)
        )))
    }
}

/// A load's write disposition. A replace keeps the table's schema: "WRITE_TRUNCATE_DATA: If
/// the table already exists, BigQuery overwrites the data, but keeps the constraints and schema
/// of the existing table" (WRITE_TRUNCATE "uses the schema from the load job").
pub(super) fn write_disposition(mode: WriteMode) -> &'static str {
    match mode {
        WriteMode::Replace => "WRITE_TRUNCATE_DATA",
        // A merge never loads into the table itself; its staging table is appended to.
        WriteMode::Append | WriteMode::Merge => "WRITE_APPEND",
    }
}

/// Whether a job is already there to be waited for, or which id the next attempt takes.
pub(super) enum Lookup {
    Existing(String, Box<Job>),
    Free(String),
}

impl BigQueryWarehouse {
    pub(super) async fn get_job(&self, id: &str, location: Option<&str>) -> Result<Option<Job>> {
        match self.client.job().get_job(&self.project, id, location).await {
            Ok(job) => Ok(Some(job)),
            Err(e) if http_status(&e) == Some(404) => Ok(None),
            Err(e) => Err(bq_error(format!("cannot look up BigQuery job {id}"))(e)),
        }
    }

    /// Walks the attempts of job `base`: the first that is running or succeeded is waited for
    /// instead of inserting anything; failed ones are skipped (they changed nothing).
    pub(super) async fn lookup(&self, base: &str, location: Option<&str>) -> Result<Lookup> {
        let mut last_failure = String::new();
        for n in 0..MAX_ATTEMPTS {
            let id = attempt_id(base, n);
            match self.get_job(&id, location).await? {
                None => return Ok(Lookup::Free(id)),
                Some(job) => match job_failure(&job) {
                    None => return Ok(Lookup::Existing(id, Box::new(job))),
                    Some(failure) => {
                        tracing::warn!(job = %id, %failure, "an earlier attempt failed; trying the next id");
                        last_failure = failure;
                    }
                },
            }
        }
        Err(Error::Warehouse(format!(
            "BigQuery job {base} failed {MAX_ATTEMPTS} times; the last attempt said: {last_failure}"
        )))
    }

    pub(super) async fn insert_job(
        &self,
        id: &str,
        configuration: JobConfiguration,
        location: Option<&str>,
        what: &str,
    ) -> Result<Job> {
        let job = Job {
            job_reference: Some(JobReference {
                job_id: Some(id.to_string()),
                location: location.map(str::to_string),
                project_id: Some(self.project.clone()),
            }),
            configuration: Some(configuration),
            ..Default::default()
        };
        let ours = job.configuration.clone().unwrap_or_default();
        match self.client.job().insert(&self.project, job).await {
            Ok(job) => Ok(job),
            // Another dispatcher inserted it between our lookup and our insert: use theirs.
            Err(e) if http_status(&e) == Some(409) => {
                let theirs = self.get_job(id, location).await?.ok_or_else(|| {
                    Error::Warehouse(format!(
                        "BigQuery job {id} ({what}) was refused as a duplicate but cannot be found"
                    ))
                })?;
                check_destination(&theirs, &ours)?;
                Ok(theirs)
            }
            Err(e) => Err(bq_error(format!("cannot start BigQuery job {id} ({what})"))(e)),
        }
    }

    /// Polls until the job is DONE; its error, if any, becomes ours.
    pub(super) async fn wait(
        &self,
        id: &str,
        mut job: Job,
        location: Option<&str>,
        what: &str,
    ) -> Result<Job> {
        let deadline = Instant::now() + self.job_timeout;
        let mut pause = Duration::from_millis(200);
        while job_state(&job) != "DONE" {
            if Instant::now() >= deadline {
                return Err(Error::Warehouse(format!(
                    "BigQuery job {id} ({what}) is still {} after {}s",
                    job_state(&job),
                    self.job_timeout.as_secs()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            job = self.get_job(id, location).await?.ok_or_else(|| {
                Error::Warehouse(format!("BigQuery job {id} ({what}) disappeared"))
            })?;
        }
        match job_failure(&job) {
            None => Ok(job),
            Some(failure) => Err(Error::Warehouse(format!(
                "BigQuery job {id} ({what}) failed: {failure}"
            ))),
        }
    }

    /// Runs job `base` once across calls: waits for an attempt that exists, else inserts the
    /// next. With `count_before`, the table's count is taken first and labels the job.
    pub(super) async fn run_job(
        &self,
        base: &str,
        what: &str,
        location: Option<&str>,
        mut configuration: JobConfiguration,
        count_before: Option<&str>,
    ) -> Result<Job> {
        let (id, job) = match self.lookup(base, location).await? {
            Lookup::Existing(id, job) => {
                check_destination(&job, &configuration)?;
                tracing::info!(job = %id, what, "job already inserted; waiting for it");
                (id, *job)
            }
            Lookup::Free(id) => {
                if let Some(table) = count_before {
                    let before = self.count_rows(table, location).await?;
                    configuration.labels = Some(HashMap::from([(
                        ROWS_BEFORE_LABEL.to_string(),
                        before.to_string(),
                    )]));
                }
                tracing::info!(job = %id, what, "inserting job");
                let job = self.insert_job(&id, configuration, location, what).await?;
                (id, job)
            }
        };
        self.wait(&id, job, location, what).await
    }

    /// `SELECT COUNT(*)`: exact on BigQuery (from metadata, no bytes billed) and the emulator.
    pub(super) async fn count_rows(&self, table: &str, location: Option<&str>) -> Result<u64> {
        let full = self.full_name(table);
        // Every part of the name was checked to hold no backtick, so the quoting holds.
        let mut request = QueryRequest::new(format!("SELECT COUNT(*) FROM `{full}`"));
        request.location = location.map(str::to_string);
        request.use_query_cache = Some(false);
        request.timeout_ms = Some(30_000);
        let failed = || format!("cannot count the rows of {full}");
        let mut response = self
            .client
            .job()
            .query(&self.project, request)
            .await
            .map_err(bq_error(failed()))?;
        let deadline = Instant::now() + self.job_timeout;
        // A slow query answers before it is done; ask for its results until it is.
        while !response.job_complete.unwrap_or(false) {
            let id = response
                .job_reference
                .as_ref()
                .and_then(|r| r.job_id.clone())
                .ok_or_else(|| Error::Warehouse(format!("{}: no job to wait for", failed())))?;
            if Instant::now() >= deadline {
                return Err(Error::Warehouse(format!(
                    "{}: query job {id} not done after {}s",
                    failed(),
                    self.job_timeout.as_secs()
                )));
            }
            let parameters = GetQueryResultsParameters {
                location: location.map(str::to_string),
                timeout_ms: Some(10_000),
                ..Default::default()
            };
            response = QueryResponse::from(
                self.client
                    .job()
                    .get_query_results(&self.project, &id, parameters)
                    .await
                    .map_err(bq_error(failed()))?,
            );
        }
        if let Some(error) = response.errors.as_ref().and_then(|e| e.first()) {
            return Err(Error::Warehouse(format!(
                "{}: {}",
                failed(),
                error.message.as_deref().unwrap_or("query failed")
            )));
        }
        let cell = response
            .rows
            .as_ref()
            .and_then(|rows| rows.first())
            .and_then(|row| row.columns.as_ref())
            .and_then(|columns| columns.first())
            .and_then(|cell| cell.value.as_ref());
        // The REST API sends INT64 as a JSON string.
        match cell {
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            _ => None,
        }
        .ok_or_else(|| Error::Warehouse(format!("{}: unexpected answer {cell:?}", failed())))
    }
}
