//! The sweep: what dead runs left behind, removed. A `dispatcher run` sweeps before its run,
//! `dispatcher serve` every `--gc-interval-secs`, and `dispatcher gc` on demand.
//!
//! A run whose owner has been silent for `stale_after` and that no job will continue (it is
//! not part of an incremental stream) is closed as `abandoned`: a later delivery of its job
//! starts a new run. A stream's run is left `running`, because the stream's next job takes it
//! over and continues it under its job key (so an append it committed is not made twice).
//! Then every staged folder and warehouse leftover whose run is not running goes, except
//! replaced table versions still in their grace period.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use shardflow::Result;
use shardflow::staging::Staging;
use shardflow::state::{RunEnd, StateStore};
use shardflow::warehouse::Warehouse;

/// What one sweep did, printed by `dispatcher gc`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct SweepReport {
    /// Runs closed as `abandoned`.
    pub abandoned_runs: Vec<String>,
    /// Silent runs of incremental streams, left for the stream's next job to continue.
    pub left_for_their_stream: Vec<String>,
    /// Runs whose staged parts were removed.
    pub staging_removed: Vec<String>,
    /// Warehouse leftovers removed (their locations).
    pub warehouse_removed: Vec<String>,
    /// Leftovers kept: their run is running or their grace period is not over.
    pub warehouse_kept: usize,
    /// What could not be removed (tried again by the next sweep).
    pub errors: Vec<String>,
}

pub struct Sweeper<'a> {
    pub state: &'a dyn StateStore,
    pub staging: &'a Staging,
    pub warehouse: &'a dyn Warehouse,
    /// Who closes the runs (recorded as their last owner).
    pub owner: &'a str,
    pub stale_after: Duration,
}

/// `dispatcher gc`: one sweep over a destination, its staging and its state store.
pub async fn collect(
    dest: &str,
    staging: Option<&str>,
    state_url: &str,
    stale_after: Duration,
    version_grace: Duration,
) -> Result<SweepReport> {
    let warehouse = crate::open_warehouse(dest, version_grace).await?;
    let staging = crate::open_staging(staging, dest)?;
    let state = shardflow::state::sql::SqlStateStore::open(state_url).await?;
    let owner = format!("gc-{}", uuid::Uuid::new_v4().simple());
    Sweeper {
        state: &state,
        staging: &staging,
        warehouse: warehouse.as_ref(),
        owner: &owner,
        stale_after,
    }
    .sweep()
    .await
}

impl Sweeper<'_> {
    pub async fn sweep(&self) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        // Listed before the state store is asked: a run that starts in between is not in
        // these lists, so its scratch is never taken for a dead run's.
        let staged = self.staging.staged_runs().await?;
        let leftovers = self.warehouse.leftovers().await?;

        let mut running = HashSet::new();
        for run in self.state.running_runs().await? {
            let silent_since = run.heartbeat_at.clone();
            if run.stream_key.is_some() {
                if self.is_stale(&silent_since) {
                    report.left_for_their_stream.push(run.run_id.clone());
                }
                running.insert(run.run_id);
                continue;
            }
            // Claimed only when its owner is silent; then it is ours to close.
            if !self
                .state
                .claim_run(&run.run_id, self.owner, self.stale_after)
                .await?
            {
                running.insert(run.run_id);
                continue;
            }
            let why = format!(
                "abandoned: its owner {} went quiet (last heartbeat {silent_since}) and no job \
                 continued it; {} swept what it left",
                run.owner, self.owner
            );
            tracing::warn!(run_id = %run.run_id, "{why}");
            self.state
                .finish_run(&run.run_id, &RunEnd::abandoned(why))
                .await?;
            report.abandoned_runs.push(run.run_id);
        }

        for run in staged {
            if running.contains(&run) {
                continue;
            }
            match self.staging.remove_run(&run).await {
                Ok(()) => report.staging_removed.push(run),
                Err(e) => report.errors.push(format!("staging of {run}: {e}")),
            }
        }
        let now = SystemTime::now();
        for leftover in leftovers {
            if !leftover.removable(&running, now) {
                report.warehouse_kept += 1;
                continue;
            }
            match self.warehouse.remove_leftover(&leftover).await {
                Ok(()) => report.warehouse_removed.push(leftover.location),
                Err(e) => report.errors.push(format!("{}: {e}", leftover.location)),
            }
        }
        for e in &report.errors {
            tracing::warn!(error = %e, "the sweep could not remove a leftover");
        }
        Ok(report)
    }

    fn is_stale(&self, heartbeat_at: &str) -> bool {
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(heartbeat_at) else {
            return false;
        };
        chrono::Duration::from_std(self.stale_after)
            .is_ok_and(|stale| at.to_utc() + stale < chrono::Utc::now())
    }
}
