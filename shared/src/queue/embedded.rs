//! The in-process queue: topics fan out to subscriptions; each subscription keeps a ready queue
//! and leases. A lease that runs out, or a nack, is a failed attempt: the message goes back to
//! the front of the line, or to the dead-letter topic once it has had `max_delivery_attempts`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    AckHandle, DEAD_LETTER_COUNT_ATTRIBUTE, Delivery, Message, Queue, Subscription,
    SubscriptionConfig,
};
use crate::{Error, Result};

#[derive(Clone)]
struct Pending {
    id: String,
    message: Message,
    attempts: u32,
}

struct Lease {
    pending: Pending,
    deadline: Instant,
}

struct SubState {
    config: SubscriptionConfig,
    ready: VecDeque<Pending>,
    leases: HashMap<u64, Lease>,
}

#[derive(Default)]
struct State {
    topics: BTreeMap<String, Vec<String>>,
    subs: HashMap<String, SubState>,
    next_id: u64,
}

/// Fault injection: deliver every published message twice (Pub/Sub may; we must cope).
#[derive(Clone, Copy, Debug, Default)]
pub struct EmbeddedOptions {
    pub duplicate_every_message: bool,
}

#[derive(Clone, Default)]
pub struct EmbeddedQueue {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    options: EmbeddedOptions,
}

impl EmbeddedQueue {
    pub fn new(options: EmbeddedOptions) -> Self {
        EmbeddedQueue {
            options,
            ..Default::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every mutation is one step).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a subscription (and its topic); an existing one is left as it is.
    pub fn create_subscription(&self, name: &str, config: SubscriptionConfig) {
        let mut st = self.lock();
        if st.subs.contains_key(name) {
            return;
        }
        st.topics
            .entry(config.topic.clone())
            .or_default()
            .push(name.to_string());
        if let Some(dl) = &config.dead_letter {
            st.topics.entry(dl.topic.clone()).or_default();
        }
        st.subs.insert(
            name.to_string(),
            SubState {
                config,
                ready: VecDeque::new(),
                leases: HashMap::new(),
            },
        );
    }

    /// Messages waiting or leased on a subscription (the backlog an autoscaler would see).
    pub fn backlog(&self, subscription: &str) -> usize {
        let st = self.lock();
        st.subs
            .get(subscription)
            .map_or(0, |s| s.ready.len() + s.leases.len())
    }

    fn publish_locked(
        st: &mut State,
        topic: &str,
        message: Message,
        copies: usize,
    ) -> Result<String> {
        let subs = st
            .topics
            .get(topic)
            .ok_or_else(|| Error::Queue(format!("topic {topic} does not exist")))?
            .clone();
        st.next_id += 1;
        let id = st.next_id.to_string();
        for sub in subs {
            if let Some(s) = st.subs.get_mut(&sub) {
                for _ in 0..copies {
                    s.ready.push_back(Pending {
                        id: id.clone(),
                        message: message.clone(),
                        attempts: 0,
                    });
                }
            }
        }
        Ok(id)
    }

    /// A failed attempt: back to the front of the line, or dead-lettered.
    fn fail_attempt(st: &mut State, sub: &str, pending: Pending) {
        let Some(s) = st.subs.get_mut(sub) else {
            return;
        };
        match &s.config.dead_letter {
            Some(dl) if pending.attempts >= dl.max_delivery_attempts => {
                let topic = dl.topic.clone();
                let message = pending
                    .message
                    .with_attribute(DEAD_LETTER_COUNT_ATTRIBUTE, pending.attempts.to_string());
                if let Err(e) = Self::publish_locked(st, &topic, message, 1) {
                    tracing::error!(error = %e, "dead-letter publish failed");
                }
            }
            _ => s.ready.push_front(pending),
        }
    }

    /// Returns expired leases to the line; yields the earliest remaining deadline.
    fn expire_leases(st: &mut State, sub: &str, now: Instant) -> Option<Instant> {
        let expired: Vec<u64> = st
            .subs
            .get(sub)?
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(lease) = st.subs.get_mut(sub).and_then(|s| s.leases.remove(&key)) {
                Self::fail_attempt(st, sub, lease.pending);
            }
        }
        st.subs.get(sub)?.leases.values().map(|l| l.deadline).min()
    }

    fn settle(&self, sub: &str, lease_id: u64, ack: bool) -> Result<()> {
        let mut st = self.lock();
        let lease = st
            .subs
            .get_mut(sub)
            .and_then(|s| s.leases.remove(&lease_id));
        match lease {
            // Like Pub/Sub, settling an expired lease is not an error; it just has no effect.
            None => Ok(()),
            Some(lease) => {
                if !ack {
                    Self::fail_attempt(&mut st, sub, lease.pending);
                }
                drop(st);
                self.changed.notify_waiters();
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn publish(&self, topic: &str, message: Message) -> Result<String> {
        let copies = if self.options.duplicate_every_message {
            2
        } else {
            1
        };
        let id = Self::publish_locked(&mut self.lock(), topic, message, copies)?;
        self.changed.notify_waiters();
        Ok(id)
    }

    async fn subscribe(
        &self,
        subscription: &str,
        max_outstanding: usize,
    ) -> Result<Box<dyn Subscription>> {
        if !self.lock().subs.contains_key(subscription) {
            return Err(Error::Queue(format!(
                "subscription {subscription} does not exist"
            )));
        }
        Ok(Box::new(EmbeddedSubscription {
            queue: self.clone(),
            name: subscription.to_string(),
            max_outstanding: max_outstanding.max(1),
            outstanding: Arc::new(AtomicUsize::new(0)),
        }))
    }
}

struct EmbeddedSubscription {
    queue: EmbeddedQueue,
    name: String,
    max_outstanding: usize,
    outstanding: Arc<AtomicUsize>,
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            let notified = self.queue.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut st = self.queue.lock();
                let now = Instant::now();
                let next_deadline = EmbeddedQueue::expire_leases(&mut st, &self.name, now);
                let room = self.outstanding.load(Ordering::SeqCst) < self.max_outstanding;
                let sub = st.subs.get_mut(&self.name).ok_or_else(|| {
                    Error::Queue(format!("subscription {} was deleted", self.name))
                })?;
                if room && let Some(mut pending) = sub.ready.pop_front() {
                    pending.attempts += 1;
                    st.next_id += 1;
                    let lease_id = st.next_id;
                    let sub = st.subs.get_mut(&self.name).expect("checked above");
                    let deadline = now + sub.config.ack_deadline;
                    sub.leases.insert(
                        lease_id,
                        Lease {
                            pending: pending.clone(),
                            deadline,
                        },
                    );
                    self.outstanding.fetch_add(1, Ordering::SeqCst);
                    return Ok(Delivery::new(
                        pending.message,
                        pending.id,
                        pending.attempts,
                        Box::new(EmbeddedAck {
                            queue: self.queue.clone(),
                            sub: self.name.clone(),
                            lease_id,
                            outstanding: self.outstanding.clone(),
                            settled: std::sync::atomic::AtomicBool::new(false),
                        }),
                    ));
                }
                next_deadline
            };
            match wake_at {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, notified).await;
                }
                None => notified.await,
            }
        }
    }
}

struct EmbeddedAck {
    queue: EmbeddedQueue,
    sub: String,
    lease_id: u64,
    outstanding: Arc<AtomicUsize>,
    settled: std::sync::atomic::AtomicBool,
}

impl EmbeddedAck {
    fn release(&self) {
        if !self.settled.swap(true, Ordering::SeqCst) {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for EmbeddedAck {
    fn drop(&mut self) {
        // A delivery dropped unsettled frees its flow-control slot; the lease still runs out.
        self.release();
        self.queue.changed.notify_waiters();
    }
}

#[async_trait]
impl AckHandle for EmbeddedAck {
    async fn ack(&self) -> Result<()> {
        self.release();
        self.queue.settle(&self.sub, self.lease_id, true)
    }

    async fn nack(&self) -> Result<()> {
        self.release();
        self.queue.settle(&self.sub, self.lease_id, false)
    }

    async fn extend(&self, deadline: Duration) -> Result<()> {
        let mut st = self.queue.lock();
        if let Some(lease) = st
            .subs
            .get_mut(&self.sub)
            .and_then(|s| s.leases.get_mut(&self.lease_id))
        {
            lease.deadline = Instant::now() + deadline;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Pub/Sub's semantics, as the embedded queue must keep them: the shared suite, plus what
    //! only this backend has (explicit lease extension, duplicate injection).
    use super::*;
    use crate::queue::DeadLetterPolicy;
    use crate::queue::conformance::{Fixture, MAX_ATTEMPTS, queue_conformance_suite};

    async fn fixture() -> Fixture {
        Fixture {
            queue: Arc::new(queue(
                // Longer than the suite's quiet waits, so only abandonment redelivers.
                Duration::from_secs(3),
                MAX_ATTEMPTS,
                EmbeddedOptions::default(),
            )),
            work_topic: "work".into(),
            work_sub: "work-sub".into(),
            dead_sub: "dead-sub".into(),
            patience: Duration::from_secs(10),
        }
    }

    queue_conformance_suite!(super::fixture);

    fn queue(ack_deadline: Duration, max_attempts: u32, options: EmbeddedOptions) -> EmbeddedQueue {
        let q = EmbeddedQueue::new(options);
        q.create_subscription(
            "work-sub",
            SubscriptionConfig {
                topic: "work".into(),
                ack_deadline,
                dead_letter: Some(DeadLetterPolicy::new("dead", max_attempts)),
            },
        );
        q.create_subscription(
            "dead-sub",
            SubscriptionConfig {
                topic: "dead".into(),
                ack_deadline,
                dead_letter: None,
            },
        );
        q
    }

    async fn next(sub: &mut Box<dyn Subscription>) -> Delivery {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("a delivery within 5s")
            .expect("delivery")
    }

    #[tokio::test]
    async fn an_expired_lease_is_redelivered_unless_extended() {
        let q = queue(Duration::from_millis(200), 5, EmbeddedOptions::default());
        let mut sub = q.subscribe("work-sub", 10).await.unwrap();
        q.publish("work", Message::new("slow")).await.unwrap();
        let first = next(&mut sub).await;
        // Extended past the deadline: not redelivered yet.
        first.extend(Duration::from_millis(600)).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), sub.next())
                .await
                .is_err()
        );
        // Abandoned: redelivered once the lease runs out; acking the stale one does nothing.
        let second = next(&mut sub).await;
        assert_eq!(second.delivery_attempt, 2);
        first.ack().await.unwrap();
        assert_eq!(
            q.backlog("work-sub"),
            1,
            "the redelivered copy is still leased"
        );
        second.ack().await.unwrap();
        assert_eq!(q.backlog("work-sub"), 0);
    }

    #[tokio::test]
    async fn duplicate_delivery_injection_delivers_each_message_twice() {
        let q = queue(
            Duration::from_secs(30),
            5,
            EmbeddedOptions {
                duplicate_every_message: true,
            },
        );
        let mut sub = q.subscribe("work-sub", 10).await.unwrap();
        let id = q.publish("work", Message::new("x")).await.unwrap();
        let a = next(&mut sub).await;
        let b = next(&mut sub).await;
        assert_eq!(
            (a.message_id.as_str(), b.message_id.as_str()),
            (id.as_str(), id.as_str())
        );
        assert!(
            q.publish("missing", Message::new("x"))
                .await
                .unwrap_err()
                .to_string()
                .contains("topic missing does not exist")
        );
    }
}
