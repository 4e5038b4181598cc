//! One run of a stream at a time: the stream a job belongs to, and taking over a run whose
//! owner went silent.

use super::*;

/// The stream an incremental load belongs to: its source and destination. Its runs go one at
/// a time and each starts after the watermark the one before recorded.
pub fn stream_key(spec: &JobSpec) -> Option<String> {
    // A file job's runs go one at a time too: each reads the files the one before did not.
    if let Some(files) = spec.files() {
        let source = match spec.data_source_id {
            Some(id) => format!("ds{id}"),
            None => {
                let bucket = shardflow::source::files::bucket_param(spec).unwrap_or_default();
                format!(
                    "{:?}:{bucket}:{}{}",
                    spec.source_type, files.path_prefix, files.pattern
                )
            }
        };
        return Some(format!("{source}->{}", spec.dest_table_name));
    }
    spec.load.kind().is_incremental().then(|| {
        let source = match spec.data_source_id {
            Some(id) => format!("ds{id}"),
            None => spec.qualified_table(),
        };
        format!("{source}->{}", spec.dest_table_name)
    })
}

/// The window recorded in a run's plan, if it had one.
pub(super) fn window_of(plan_json: &str) -> Option<Window> {
    let plan: serde_json::Value = serde_json::from_str(plan_json).ok()?;
    serde_json::from_value(plan.get("window")?.clone()).ok()
}

/// The files a file job's recorded plan selected (their URIs), if it was one.
pub(super) fn files_of(plan_json: &str) -> Option<Vec<String>> {
    let plan: serde_json::Value = serde_json::from_str(plan_json).ok()?;
    serde_json::from_value(plan.get("files")?.get("selected")?.clone()).ok()
}

impl Engine {
    /// Another run of a job's stream is running. When its owner has been silent for
    /// `stale_after` (a killed `dispatcher run`, a dead dispatcher), the run becomes ours and is
    /// superseded; its record comes back so the job can continue it. `None`: its owner is alive.
    pub(super) async fn take_over_stream(&self, other: &str) -> Result<Option<RunRecord>> {
        let Some(record) = self.state.run(other).await? else {
            return Ok(None);
        };
        if !self
            .state
            .claim_run(other, &self.owner, self.settings.stale_after)
            .await?
        {
            return Ok(None);
        }
        let why = format!(
            "superseded: its owner {} went quiet (last heartbeat {}) and {} took its stream over",
            record.owner, record.heartbeat_at, self.owner
        );
        tracing::warn!(run_id = %other, "{why}");
        self.state
            .finish_run(other, &RunEnd::superseded(why))
            .await?;
        if let Err(e) = self.staging.remove_run(other).await {
            tracing::warn!(error = %e, "could not clean the superseded run's staging");
        }
        Ok(Some(record))
    }

    /// The stream's newest run, when it is another job's and was superseded or abandoned:
    /// nothing continues it yet (a continuation shares its job key and is newer), so its
    /// committed append is in no watermark. A new window would read its rows again.
    pub(super) async fn orphaned_stream_run(&self, job: &RunJob) -> Result<Option<RunRecord>> {
        let Some(key) = stream_key(&job.spec) else {
            return Ok(None);
        };
        Ok(self.state.latest_stream_run(&key).await?.filter(|r| {
            r.job_key != job.job_key
                && (r.status == RunStatus::Superseded || r.status == RunStatus::Abandoned)
        }))
    }

    /// Who holds a stream's running run, and until when it is theirs if they fall silent.
    pub(super) async fn stream_holder(&self, other: &str) -> Result<String> {
        let Some(record) = self.state.run(other).await? else {
            return Ok("another job of the same incremental stream (it has just ended)".into());
        };
        let deadline = chrono::DateTime::parse_from_rfc3339(&record.heartbeat_at)
            .ok()
            .and_then(|at| {
                let stale = chrono::Duration::from_std(self.settings.stale_after).ok()?;
                Some(
                    (at + stale)
                        .to_utc()
                        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                        .to_string(),
                )
            });
        Ok(format!(
            "{} for another job of the same incremental stream (last heartbeat {}; the stream \
             is taken over if no heartbeat comes by {})",
            record.owner,
            record.heartbeat_at,
            deadline
                .as_deref()
                .unwrap_or("a heartbeat's staleness later")
        ))
    }
}
