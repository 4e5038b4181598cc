//! Retries of transient failures (a database restarting, a dropped connection) with exponential
//! backoff, configured like the seed: `ETL_MAX_RETRIES` (default 3) and `ETL_RETRY_DELAY`
//! (initial delay in seconds, default 5). Problems in the job or the data are never retried.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    pub max_retries: usize,
    pub initial_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Reads `ETL_MAX_RETRIES` and `ETL_RETRY_DELAY`; a malformed value is an error, not a
    /// silent default.
    pub fn from_env() -> Result<Self> {
        let mut policy = RetryPolicy::default();
        if let Ok(v) = std::env::var("ETL_MAX_RETRIES") {
            policy.max_retries = v.trim().parse().map_err(|_| {
                Error::Other(format!(
                    "ETL_MAX_RETRIES must be a whole number, got \"{v}\""
                ))
            })?;
        }
        if let Ok(v) = std::env::var("ETL_RETRY_DELAY") {
            let secs: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| {
                    Error::Other(format!("ETL_RETRY_DELAY must be seconds, got \"{v}\""))
                })?;
            policy.initial_delay = Duration::from_secs_f64(secs);
        }
        Ok(policy)
    }

    pub fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            initial_delay: Duration::ZERO,
        }
    }

    /// Runs `op`, retrying transient errors; the final error says how many retries it took.
    pub async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.initial_delay.max(Duration::from_secs(60)))
            .with_max_times(self.max_retries)
            .with_jitter();
        let retries = self.max_retries;
        op.retry(backoff)
            .when(Error::is_transient)
            .notify(|e, delay| tracing::warn!(error = %e, ?delay, "{what} failed; retrying"))
            .await
            .map_err(|e| match e {
                Error::Database(text) if retries > 0 => {
                    Error::Database(format!("{text} (gave up after {retries} retries)"))
                }
                other => other,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn transient_errors_are_retried_then_reported() {
        let policy = RetryPolicy {
            max_retries: 2,
            initial_delay: Duration::from_millis(1),
        };
        let calls = AtomicUsize::new(0);
        let err = policy
            .run("thing", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::Database("connection refused".into()))
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(
            err.to_string(),
            "source database error: connection refused (gave up after 2 retries)"
        );
    }

    #[tokio::test]
    async fn problems_in_the_job_are_not_retried() {
        let policy = RetryPolicy {
            max_retries: 5,
            initial_delay: Duration::from_millis(1),
        };
        let calls = AtomicUsize::new(0);
        let err = policy
            .run("thing", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::Source("table x not found".into()))
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(err.to_string(), "table x not found");
    }
}
