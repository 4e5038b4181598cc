//! The queue between dispatcher and workers, with Google Pub/Sub's semantics: at-least-once
//! delivery, ack / nack, redelivery when a lease runs out, a delivery-attempt count, and
//! dead-lettering after N attempts. The embedded backend keeps exactly these semantics in
//! process; the Pub/Sub backend plugs in behind the same traits.

#[cfg(test)]
mod conformance;
pub mod embedded;
pub mod pubsub;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::Result;

/// Topic and subscription names (overridable; these are the deployed defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    pub jobs_topic: String,
    pub jobs_subscription: String,
    pub shards_topic: String,
    pub shards_subscription: String,
    pub results_topic: String,
    pub results_subscription: String,
    pub dead_letter_topic: String,
    pub dead_letter_subscription: String,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            jobs_topic: "etl-jobs".into(),
            jobs_subscription: "etl-jobs-dispatcher".into(),
            shards_topic: "etl-shards".into(),
            shards_subscription: "etl-shards-workers".into(),
            results_topic: "etl-shard-results".into(),
            results_subscription: "etl-shard-results-dispatcher".into(),
            dead_letter_topic: "etl-shards-dead-letter".into(),
            dead_letter_subscription: "etl-shards-dead-letter-dispatcher".into(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub data: Bytes,
    pub attributes: BTreeMap<String, String>,
}

impl Message {
    pub fn new(data: impl Into<Bytes>) -> Self {
        Message {
            data: data.into(),
            attributes: BTreeMap::new(),
        }
    }

    pub fn with_attribute(mut self, key: &str, value: impl Into<String>) -> Self {
        self.attributes.insert(key.to_string(), value.into());
        self
    }
}

/// Settles one delivery.
#[async_trait]
pub trait AckHandle: Send + Sync {
    async fn ack(&self) -> Result<()>;
    /// Gives the message back for redelivery now (counts as a failed attempt).
    async fn nack(&self) -> Result<()>;
    /// Extends the lease: the message is not redelivered for `deadline` from now.
    async fn extend(&self, deadline: Duration) -> Result<()>;
}

/// One delivery of a message. Must be acked or nacked; if neither happens before the lease
/// runs out, the message is delivered again.
pub struct Delivery {
    pub message: Message,
    pub message_id: String,
    /// 1 on the first delivery.
    pub delivery_attempt: u32,
    handle: Box<dyn AckHandle>,
}

impl Delivery {
    pub fn new(
        message: Message,
        message_id: String,
        delivery_attempt: u32,
        handle: Box<dyn AckHandle>,
    ) -> Self {
        Delivery {
            message,
            message_id,
            delivery_attempt,
            handle,
        }
    }

    pub async fn ack(self) -> Result<()> {
        self.handle.ack().await
    }

    pub async fn nack(self) -> Result<()> {
        self.handle.nack().await
    }

    pub async fn extend(&self, deadline: Duration) -> Result<()> {
        self.handle.extend(deadline).await
    }
}

/// A stream of deliveries with flow control: at most `max_outstanding` unsettled at once.
#[async_trait]
pub trait Subscription: Send {
    /// Waits for the next delivery.
    async fn next(&mut self) -> Result<Delivery>;
    /// Stops pulling new messages; deliveries already handed out can still be settled.
    fn close(&mut self) {}
}

#[async_trait]
pub trait Queue: Send + Sync {
    /// Publishes and returns the message id.
    async fn publish(&self, topic: &str, message: Message) -> Result<String>;
    async fn subscribe(
        &self,
        subscription: &str,
        max_outstanding: usize,
    ) -> Result<Box<dyn Subscription>>;
}

/// Subscription settings, as Pub/Sub knows them.
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    pub topic: String,
    pub ack_deadline: Duration,
    pub dead_letter: Option<DeadLetterPolicy>,
}

#[derive(Clone, Debug)]
pub struct DeadLetterPolicy {
    pub topic: String,
    pub max_delivery_attempts: u32,
    /// Pub/Sub's wait before redelivering a nacked message, growing from the first to the
    /// second value. The embedded queue redelivers at once.
    pub retry_backoff: (Duration, Duration),
}

impl DeadLetterPolicy {
    pub fn new(topic: &str, max_delivery_attempts: u32) -> Self {
        DeadLetterPolicy {
            topic: topic.to_string(),
            max_delivery_attempts,
            retry_backoff: (Duration::from_secs(10), Duration::from_secs(600)),
        }
    }
}

/// The attribute Pub/Sub sets on dead-lettered messages.
pub const DEAD_LETTER_COUNT_ATTRIBUTE: &str = "CloudPubSubDeadLetterSourceDeliveryCount";
