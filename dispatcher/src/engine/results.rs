//! Shard results and dead letters from the queue into the state store, and waiting for a
//! run's shards there.

use super::*;

impl Engine {
    /// Records shard results from the results subscription until `shutdown`.
    pub async fn record_results(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        let mut results = self
            .queue
            .subscribe(&self.topology.results_subscription, 256)
            .await?;
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                d = results.next() => d?,
            };
            let result: ShardResult = match messages::decode("shard result", &delivery.message.data)
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "dropping an undecodable shard result");
                    delivery.ack().await?;
                    continue;
                }
            };
            match self.record_result(&result).await {
                Ok(recorded) => {
                    if recorded == Recorded::Duplicate {
                        tracing::debug!(run_id = %result.run_id, shard_id = %result.shard_id, "duplicate shard result ignored");
                        self.events.count_duplicate(&result.run_id);
                    }
                    self.events.poke(&result.run_id);
                    delivery.ack().await?;
                }
                Err(e) => {
                    // Not recorded: let it come back rather than lose it.
                    tracing::warn!(error = %e, "could not record a shard result; it will be redelivered");
                    delivery.nack().await?;
                }
            }
        }
    }

    /// Records one result; a permanent failure (the worker acked the shard, which will not
    /// come back) fails the shard at once, so its run fails without waiting for a dead letter.
    pub(super) async fn record_result(&self, result: &ShardResult) -> Result<Recorded> {
        let recorded = self.state.record_result(result).await?;
        if let ShardOutcome::Failed {
            error,
            permanent: true,
        } = &result.outcome
            && recorded == Recorded::FailedAttempt
        {
            let why = format!("shard {} failed: {error}", result.shard_id);
            self.state
                .fail_shard(&result.run_id, &result.shard_id, &why)
                .await?;
        }
        Ok(recorded)
    }

    /// Marks dead-lettered shards failed until `shutdown`; their run then fails with the reason.
    pub async fn record_dead_letters(self: Arc<Self>, shutdown: CancellationToken) -> Result<()> {
        let mut dead = self
            .queue
            .subscribe(&self.topology.dead_letter_subscription, 64)
            .await?;
        loop {
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                d = dead.next() => d?,
            };
            let task: ShardTask =
                match messages::decode("dead-lettered shard", &delivery.message.data) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(error = %e, "dropping an undecodable dead letter");
                        delivery.ack().await?;
                        continue;
                    }
                };
            let attempts = delivery
                .message
                .attributes
                .get(DEAD_LETTER_COUNT_ATTRIBUTE)
                .cloned()
                .unwrap_or_else(|| "several".into());
            let last_error = self
                .last_error(&task)
                .await?
                .unwrap_or_else(|| "no error was reported".into());
            let why = format!(
                "shard {} failed after {attempts} attempts: {last_error}",
                task.shard_id
            );
            self.state
                .fail_shard(&task.run_id, &task.shard_id, &why)
                .await?;
            self.events.poke(&task.run_id);
            delivery.ack().await?;
        }
    }

    /// The error a dead-lettered shard's last attempt reported. The worker publishes it before
    /// it nacks, but the dead letter can overtake it on the other subscription, so this waits
    /// a little for it to be recorded.
    pub(super) async fn last_error(&self, task: &ShardTask) -> Result<Option<String>> {
        let started = Instant::now();
        loop {
            let error = self
                .state
                .shards(&task.run_id)
                .await?
                .into_iter()
                .find(|s| s.shard_id == task.shard_id)
                .and_then(|s| s.error);
            if error.is_some() || started.elapsed() > Duration::from_secs(5) {
                return Ok(error);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Until every shard succeeded (Ok(true)), one failed for good (Err), or the run was
    /// taken over (Ok(false)).
    pub(super) async fn wait_for_shards(
        &self,
        run_id: &str,
        wake: &Notify,
        observer: &dyn RunObserver,
    ) -> Result<bool> {
        let mut last_done = 0usize;
        let mut last_beat = Instant::now();
        loop {
            if let Some(why) = self.events.fatal() {
                return Err(Error::Other(why));
            }
            let shards = self.state.shards(run_id).await?;
            if let Some(failed) = shards.iter().find(|s| s.status == ShardStatus::Failed) {
                return Err(Error::Other(
                    failed
                        .error
                        .clone()
                        .unwrap_or_else(|| format!("shard {} failed", failed.shard_id)),
                ));
            }
            let done = shards
                .iter()
                .filter(|s| s.status == ShardStatus::Succeeded)
                .count();
            if done != last_done {
                last_done = done;
                let rows = shards.iter().filter_map(|s| s.rows).sum();
                observer.shard_done(done, shards.len(), rows).await;
            }
            if done == shards.len() {
                return Ok(true);
            }
            if last_beat.elapsed() >= self.settings.heartbeat {
                if !self.state.heartbeat(run_id, &self.owner).await? {
                    tracing::warn!("another dispatcher took this run over");
                    return Ok(false);
                }
                last_beat = Instant::now();
            }
            let _ = tokio::time::timeout(self.settings.poll, wake.notified()).await;
        }
    }
}
