//! Telling Django how runs go, off the runs' path: no PATCH is awaited by a run.
//!
//! - Progress (`running`, shards done) goes to a lane per Django run that holds only the
//!   newest update: while one PATCH is in flight, later updates replace each other (they
//!   coalesce), and an update that fails its few tries is dropped (a newer one says more).
//! - A final status is recorded in the state store (`record_report`) before the job message
//!   is acked, then sent by [`Reporter::serve`] until Django accepts it, with a growing pause,
//!   or given up with a logged error: at once when Django refuses it (a 4xx), else
//!   `give_up_after` after it was recorded. A dispatcher that dies first leaves it recorded
//!   for the next one. A run's final status is never followed by its progress: recording it
//!   closes the lane, and it is sent only after a progress PATCH in flight has ended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use shardflow::Result;
use shardflow::django::{DjangoClient, RunUpdate};
use shardflow::state::{PendingReport, ReportAttempt, StateStore};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct ReporterSettings {
    /// Tries of one progress update before it is dropped.
    pub progress_attempts: u32,
    pub progress_pause: Duration,
    /// The pause after a final report's first failed attempt; it doubles up to `longest_pause`.
    pub first_pause: Duration,
    pub longest_pause: Duration,
    /// A final report Django has not accepted this long after it was recorded is given up.
    pub give_up_after: Duration,
    /// How often the state store is asked for due reports (recording one also wakes it).
    pub poll: Duration,
    /// How long a claimed report is not handed to another dispatcher (longer than a PATCH
    /// can take: the client's timeout is 30 s).
    pub claim_for: Duration,
    /// Delivered and given-up reports are deleted this long after they were recorded.
    pub keep_for: Duration,
}

impl Default for ReporterSettings {
    fn default() -> Self {
        ReporterSettings {
            progress_attempts: 3,
            progress_pause: Duration::from_secs(1),
            first_pause: Duration::from_secs(2),
            longest_pause: Duration::from_secs(300),
            give_up_after: Duration::from_secs(24 * 3600),
            poll: Duration::from_secs(5),
            claim_for: Duration::from_secs(90),
            keep_for: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What to do after an attempt to deliver a final report: a pure rule. `failure` is the
/// error and whether it is transient (None: delivered); `age` is the time since it was
/// recorded.
pub fn after_attempt(
    failure: Option<(&str, bool)>,
    attempts: u32,
    age: Duration,
    settings: &ReporterSettings,
) -> ReportAttempt {
    let Some((error, transient)) = failure else {
        return ReportAttempt::Delivered;
    };
    if !transient {
        return ReportAttempt::GaveUp {
            error: format!("Django refused it: {error}"),
        };
    }
    let doublings = attempts.saturating_sub(1).min(20);
    let delay = settings
        .first_pause
        .saturating_mul(1 << doublings)
        .min(settings.longest_pause);
    if age.saturating_add(delay) > settings.give_up_after {
        return ReportAttempt::GaveUp {
            error: format!(
                "not accepted within {} s of the run's end ({attempts} attempts): {error}",
                settings.give_up_after.as_secs()
            ),
        };
    }
    ReportAttempt::RetryAfter {
        delay,
        error: error.to_string(),
    }
}

/// One Django run's progress: the newest update not yet sent, and the PATCH in flight.
#[derive(Default)]
struct Lane {
    pending: Mutex<Option<RunUpdate>>,
    /// A task is draining `pending`.
    draining: AtomicBool,
    /// Held while a PATCH of this run is in flight.
    in_flight: tokio::sync::Mutex<()>,
    /// The final status is recorded: no progress is sent any more.
    ended: AtomicBool,
}

impl Lane {
    /// The run's final status is recorded: progress not yet sent is dropped, and no more
    /// is taken.
    fn close(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

pub struct Reporter {
    django: DjangoClient,
    state: Arc<dyn StateStore>,
    lanes: Mutex<HashMap<i64, Arc<Lane>>>,
    wake: Notify,
    settings: ReporterSettings,
}

impl Reporter {
    pub fn new(
        django: DjangoClient,
        state: Arc<dyn StateStore>,
        settings: ReporterSettings,
    ) -> Arc<Self> {
        Arc::new(Reporter {
            django,
            state,
            lanes: Mutex::default(),
            wake: Notify::new(),
            settings,
        })
    }

    fn lane(&self, etl_run_id: i64) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes.entry(etl_run_id).or_default().clone()
    }

    /// Queues a progress update; returns at once. A newer one replaces it if it is not sent
    /// yet.
    pub fn progress(self: &Arc<Self>, etl_run_id: i64, update: RunUpdate) {
        let lane = self.lane(etl_run_id);
        if lane.ended.load(Ordering::SeqCst) {
            return;
        }
        *lane.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(update);
        if !lane.draining.swap(true, Ordering::SeqCst) {
            let reporter = self.clone();
            tokio::spawn(async move { reporter.drain(etl_run_id, lane).await });
        }
    }

    async fn drain(&self, etl_run_id: i64, lane: Arc<Lane>) {
        loop {
            let next = lane
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            let Some(update) = next else {
                lane.draining.store(false, Ordering::SeqCst);
                // An update queued between the take and the store finds `draining` set and
                // spawns nobody: look once more.
                let queued = lane
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_some();
                if queued && !lane.draining.swap(true, Ordering::SeqCst) {
                    continue;
                }
                return;
            };
            let _sending = lane.in_flight.lock().await;
            for attempt in 1..=self.settings.progress_attempts.max(1) {
                if lane.ended.load(Ordering::SeqCst) {
                    break;
                }
                match self.django.update_run_once(etl_run_id, &update).await {
                    Ok(()) => break,
                    Err(e) if attempt < self.settings.progress_attempts && e.is_transient() => {
                        tokio::time::sleep(self.settings.progress_pause).await;
                    }
                    Err(e) => {
                        tracing::warn!(etl_run_id, error = %e, "progress not reported to Django (a later update or the final status will be)");
                        break;
                    }
                }
            }
        }
    }

    /// Records the run's final status (durably, before the caller acks the job message) and
    /// wakes the sender. False when a final status of this Django run was recorded already.
    pub async fn record_final(&self, etl_run_id: i64, update: &RunUpdate) -> Result<bool> {
        let lane = self.lane(etl_run_id);
        lane.close();
        let body = serde_json::to_string(update)?;
        let recorded = self.state.record_report(etl_run_id, &body).await?;
        self.wake.notify_one();
        Ok(recorded)
    }

    /// Sends every due final report once; returns how many were delivered.
    pub async fn deliver_due(&self) -> Result<usize> {
        let due = self
            .state
            .claim_due_reports(self.settings.claim_for)
            .await?;
        let delivered = futures::stream::iter(due)
            .map(|report| self.deliver(report))
            .buffer_unordered(8)
            .filter(|delivered| std::future::ready(*delivered))
            .count()
            .await;
        Ok(delivered)
    }

    async fn deliver(&self, report: PendingReport) -> bool {
        let id = report.etl_run_id;
        let lane = self.lane(id);
        lane.close();
        let outcome = {
            let _after_progress = lane.in_flight.lock().await;
            match serde_json::from_str::<RunUpdate>(&report.body) {
                Ok(update) => self
                    .django
                    .update_run_once(id, &update)
                    .await
                    .map_err(|e| (e.to_string(), e.is_transient())),
                Err(e) => Err((
                    format!("the recorded report is not a run update: {e}"),
                    false,
                )),
            }
        };
        let age = chrono::DateTime::parse_from_rfc3339(&report.recorded_at)
            .ok()
            .and_then(|at| (chrono::Utc::now() - at.to_utc()).to_std().ok())
            .unwrap_or_default();
        let failure = outcome.as_ref().err().map(|(e, t)| (e.as_str(), *t));
        let next = after_attempt(failure, report.attempts, age, &self.settings);
        match &next {
            ReportAttempt::Delivered => {
                tracing::info!(
                    etl_run_id = id,
                    attempts = report.attempts,
                    "run reported to Django"
                );
            }
            ReportAttempt::RetryAfter { delay, error } => {
                tracing::warn!(etl_run_id = id, attempts = report.attempts, retry_in_secs = delay.as_secs(), error = %error, "final status not reported to Django yet; it is kept and sent again");
            }
            ReportAttempt::GaveUp { error } => {
                tracing::error!(etl_run_id = id, attempts = report.attempts, error = %error, body = %report.body, "final status given up: Django was never told how this run ended");
            }
        }
        if !matches!(next, ReportAttempt::RetryAfter { .. }) {
            self.lanes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
        if let Err(e) = self.state.report_attempted(id, &next).await {
            tracing::warn!(etl_run_id = id, error = %e, "could not record the report attempt; it may be sent again");
        }
        matches!(next, ReportAttempt::Delivered)
    }

    /// Sends due reports until `stop`, then tries once more for at most `last_try` (the runs
    /// drained at shutdown recorded theirs just now).
    pub async fn serve(self: Arc<Self>, stop: CancellationToken, last_try: Duration) {
        match self.state.prune_reports(self.settings.keep_for).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(reports = n, "old Django reports deleted"),
            Err(e) => tracing::warn!(error = %e, "could not delete old Django reports"),
        }
        loop {
            // A Django that never answers must not hold up a shutdown: a delivery cut short
            // stays claimed for `claim_for`, then the next dispatcher sends it.
            tokio::select! {
                _ = stop.cancelled() => break,
                delivered = self.deliver_due() => {
                    if let Err(e) = delivered {
                        tracing::warn!(error = %e, "could not read the reports due for Django");
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.settings.poll) => {}
            }
        }
        if tokio::time::timeout(last_try, self.deliver_due())
            .await
            .is_err()
        {
            tracing::warn!(
                "Django reports still unsent at shutdown stay recorded for the next dispatcher"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ReporterSettings {
        ReporterSettings {
            first_pause: Duration::from_secs(2),
            longest_pause: Duration::from_secs(60),
            give_up_after: Duration::from_secs(3600),
            ..ReporterSettings::default()
        }
    }

    #[test]
    fn a_refused_report_is_given_up_at_once_and_an_unreachable_one_retried_with_growing_pauses() {
        let s = settings();
        assert_eq!(
            after_attempt(None, 1, Duration::ZERO, &s),
            ReportAttempt::Delivered
        );
        assert_eq!(
            after_attempt(Some(("answered 404", false)), 1, Duration::ZERO, &s),
            ReportAttempt::GaveUp {
                error: "Django refused it: answered 404".into()
            }
        );
        let delays: Vec<u64> = (1..=8)
            .map(
                |n| match after_attempt(Some(("refused", true)), n, Duration::ZERO, &s) {
                    ReportAttempt::RetryAfter { delay, .. } => delay.as_secs(),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 60, 60, 60]);
        // Huge attempt counts do not overflow.
        assert!(matches!(
            after_attempt(Some(("refused", true)), u32::MAX, Duration::ZERO, &s),
            ReportAttempt::RetryAfter { delay, .. } if delay == Duration::from_secs(60)
        ));
    }

    #[test]
    fn a_report_is_given_up_once_the_next_try_would_be_past_the_deadline() {
        let s = settings();
        assert!(matches!(
            after_attempt(Some(("refused", true)), 9, Duration::from_secs(3539), &s),
            ReportAttempt::RetryAfter { .. }
        ));
        match after_attempt(Some(("refused", true)), 9, Duration::from_secs(3541), &s) {
            ReportAttempt::GaveUp { error } => assert_eq!(
                error,
                "not accepted within 3600 s of the run's end (9 attempts): refused"
            ),
            other => panic!("{other:?}"),
        }
    }
}
