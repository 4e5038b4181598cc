//! The Google Pub/Sub backend (`google-cloud-pubsub`). Publishing goes through one cached
//! publisher per topic; subscribing is a streaming pull with flow control, whose client keeps
//! the leases of unsettled messages alive (up to `max_lease`), so `extend` has nothing to do.
//! A consumer that dies stops extending, and the message is redelivered after at most
//! `lease_extension`. `PUBSUB_EMULATOR_HOST` points every client at the emulator with
//! anonymous credentials.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{
    BasePublisher, Publisher, Subscriber, SubscriptionAdmin, TopicAdmin,
};
use google_cloud_pubsub::model;
use google_cloud_pubsub::subscriber::ShutdownBehavior;
use google_cloud_pubsub::subscriber::handler::Handler;

use super::{AckHandle, Delivery, Message, Queue, Subscription, SubscriptionConfig};
use crate::{Error, Result};

/// How long a call to Pub/Sub may take before we call it dead: the client retries quietly
/// against an endpoint that does not answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct PubSubOptions {
    pub project: String,
    /// `http://host:port` of an emulator; None for Google's endpoint with ADC.
    pub emulator: Option<String>,
    /// Each lease extension the client sends (10 s to 10 min): how soon a dead consumer's
    /// message is redelivered.
    pub lease_extension: Duration,
    /// The longest a message is held before the client stops extending its lease.
    pub max_lease: Duration,
}

impl PubSubOptions {
    /// Project from the argument, emulator from `PUBSUB_EMULATOR_HOST`.
    pub fn from_env(project: &str) -> Self {
        PubSubOptions {
            project: project.to_string(),
            emulator: std::env::var("PUBSUB_EMULATOR_HOST")
                .ok()
                .filter(|h| !h.trim().is_empty())
                .map(|h| {
                    if h.contains("://") {
                        h
                    } else {
                        format!("http://{h}")
                    }
                }),
            lease_extension: Duration::from_secs(60),
            max_lease: Duration::from_secs(6 * 3600),
        }
    }
}

#[derive(Clone)]
pub struct PubSubQueue {
    options: PubSubOptions,
    base: BasePublisher,
    subscriber: Subscriber,
    publishers: Arc<Mutex<HashMap<String, Publisher>>>,
}

/// Google's endpoint, named in errors when no emulator is configured.
const PRODUCTION_ENDPOINT: &str = "https://pubsub.googleapis.com";

/// The endpoint the clients talk to, for errors: every one names its peer.
fn peer(options: &PubSubOptions) -> &str {
    options.emulator.as_deref().unwrap_or(PRODUCTION_ENDPOINT)
}

fn queue_error(peer: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Queue(format!("Pub/Sub at {peer}: {what}: {e}"))
}

/// Bounds a Pub/Sub call, which would otherwise retry forever against a dead endpoint.
async fn timed<T>(peer: &str, what: &str, call: impl std::future::Future<Output = T>) -> Result<T> {
    timed_for(CALL_TIMEOUT, peer, what, call).await
}

async fn timed_for<T>(
    limit: Duration,
    peer: &str,
    what: &str,
    call: impl std::future::Future<Output = T>,
) -> Result<T> {
    tokio::time::timeout(limit, call).await.map_err(|_| {
        Error::Queue(format!(
            "Pub/Sub at {peer}: {what}: no answer within {} s (the client retries a peer that \
             refuses connections or does not exist until then: is PUBSUB_EMULATOR_HOST or the \
             network right?)",
            limit.as_secs_f64()
        ))
    })
}

async fn bounded<T, E: std::fmt::Display>(
    peer: &str,
    what: &str,
    call: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    timed(peer, what, call)
        .await?
        .map_err(|e| queue_error(peer, what, e))
}

macro_rules! configure {
    ($builder:expr, $options:expr) => {{
        let builder = $builder;
        match &$options.emulator {
            Some(endpoint) => builder.with_endpoint(endpoint.clone()).with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            ),
            None => builder,
        }
    }};
}

impl PubSubQueue {
    pub async fn connect(options: PubSubOptions) -> Result<Self> {
        let base = bounded(
            peer(&options),
            "publisher client",
            configure!(BasePublisher::builder(), options).build(),
        )
        .await?;
        let subscriber = bounded(
            peer(&options),
            "subscriber client",
            configure!(Subscriber::builder(), options).build(),
        )
        .await?;
        Ok(PubSubQueue {
            options,
            base,
            subscriber,
            publishers: Arc::default(),
        })
    }

    /// The endpoint, for errors.
    fn peer(&self) -> &str {
        peer(&self.options)
    }

    pub fn project(&self) -> &str {
        &self.options.project
    }

    fn topic_path(&self, topic: &str) -> String {
        format!("projects/{}/topics/{topic}", self.options.project)
    }

    fn subscription_path(&self, subscription: &str) -> String {
        format!(
            "projects/{}/subscriptions/{subscription}",
            self.options.project
        )
    }

    fn publisher(&self, topic: &str) -> Publisher {
        let mut publishers = self.publishers.lock().unwrap_or_else(|p| p.into_inner());
        publishers
            .entry(topic.to_string())
            .or_insert_with(|| {
                self.base
                    .publisher(self.topic_path(topic))
                    // Shard messages are few and latency matters more than batching.
                    .set_delay_threshold(Duration::from_millis(5))
                    .build()
            })
            .clone()
    }

    /// Creates the topic if it is missing. True when it was created.
    pub async fn ensure_topic(&self, topic: &str) -> Result<bool> {
        let admin = bounded(
            self.peer(),
            "topic admin client",
            configure!(TopicAdmin::builder(), self.options).build(),
        )
        .await?;
        let created = timed(
            self.peer(),
            "create topic",
            admin.create_topic().set_name(self.topic_path(topic)).send(),
        )
        .await?;
        created_or_existing(created, self.peer(), &format!("topic {topic}"))
    }

    /// Creates the subscription if it is missing, with its ack deadline and dead-letter
    /// policy. True when it was created; an existing one is left as it is (and logged when
    /// its settings differ).
    pub async fn ensure_subscription(
        &self,
        name: &str,
        config: &SubscriptionConfig,
    ) -> Result<bool> {
        let admin = bounded(
            self.peer(),
            "subscription admin client",
            configure!(SubscriptionAdmin::builder(), self.options).build(),
        )
        .await?;
        let mut request = admin
            .create_subscription()
            .set_name(self.subscription_path(name))
            .set_topic(self.topic_path(&config.topic))
            .set_ack_deadline_seconds(config.ack_deadline.as_secs().clamp(10, 600) as i32)
            // Never let an idle subscription expire: the fleet may be quiet for weeks.
            .set_expiration_policy(model::ExpirationPolicy::new());
        if let Some(dead) = &config.dead_letter {
            request = request
                .set_dead_letter_policy(
                    model::DeadLetterPolicy::new()
                        .set_dead_letter_topic(self.topic_path(&dead.topic))
                        .set_max_delivery_attempts(dead.max_delivery_attempts.clamp(5, 100) as i32),
                )
                .set_retry_policy(
                    model::RetryPolicy::new()
                        .set_minimum_backoff(wkt_duration(dead.retry_backoff.0))
                        .set_maximum_backoff(wkt_duration(dead.retry_backoff.1)),
                );
        }
        let created = timed(self.peer(), "create subscription", request.send()).await?;
        let created = created_or_existing(created, self.peer(), &format!("subscription {name}"))?;
        if !created {
            let existing = bounded(
                self.peer(),
                "get subscription",
                admin
                    .get_subscription()
                    .set_subscription(self.subscription_path(name))
                    .send(),
            )
            .await?;
            let wanted_attempts = config
                .dead_letter
                .as_ref()
                .map(|d| d.max_delivery_attempts as i32);
            let has_attempts = existing
                .dead_letter_policy
                .as_ref()
                .map(|d| d.max_delivery_attempts);
            if wanted_attempts != has_attempts {
                tracing::warn!(
                    subscription = name,
                    ?wanted_attempts,
                    ?has_attempts,
                    "the subscription exists with another dead-letter policy; left as it is"
                );
            }
        }
        Ok(created)
    }

    /// Deletes a subscription (tests use fresh ones).
    pub async fn delete_subscription(&self, name: &str) -> Result<()> {
        let admin = bounded(
            self.peer(),
            "subscription admin client",
            configure!(SubscriptionAdmin::builder(), self.options).build(),
        )
        .await?;
        bounded(
            self.peer(),
            "delete subscription",
            admin
                .delete_subscription()
                .set_subscription(self.subscription_path(name))
                .send(),
        )
        .await
    }
}

fn wkt_duration(d: Duration) -> google_cloud_wkt::Duration {
    google_cloud_wkt::Duration::clamp(d.as_secs() as i64, d.subsec_nanos() as i32)
}

/// True when created, false when it already existed.
fn created_or_existing<T>(
    outcome: std::result::Result<T, google_cloud_pubsub::Error>,
    peer: &str,
    what: &str,
) -> Result<bool> {
    match outcome {
        // Debug, not info: `pubsub-setup` prints each outcome itself (info printed it twice).
        Ok(_) => {
            tracing::debug!("created {what}");
            Ok(true)
        }
        Err(e) if e.status().is_some_and(|s| s.code == Code::AlreadyExists) => Ok(false),
        Err(e) => Err(queue_error(peer, &format!("create {what}"), e)),
    }
}

#[async_trait]
impl Queue for PubSubQueue {
    async fn publish(&self, topic: &str, message: Message) -> Result<String> {
        let msg = model::Message::new()
            .set_data(message.data)
            .set_attributes(message.attributes);
        bounded(
            self.peer(),
            &format!("publish to {topic}"),
            self.publisher(topic).publish(msg),
        )
        .await
    }

    async fn subscribe(
        &self,
        subscription: &str,
        max_outstanding: usize,
    ) -> Result<Box<dyn Subscription>> {
        let stream = self
            .subscriber
            .subscribe(self.subscription_path(subscription))
            .set_max_outstanding_messages(max_outstanding.max(1) as i64)
            .set_max_lease_extension(self.options.lease_extension)
            .set_max_lease(self.options.max_lease)
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build();
        Ok(Box::new(PubSubSubscription {
            name: subscription.to_string(),
            peer: self.peer().to_string(),
            stream,
            outstanding: Arc::new(tokio::sync::Semaphore::new(max_outstanding.max(1))),
        }))
    }
}

struct PubSubSubscription {
    name: String,
    /// The endpoint, for errors.
    peer: String,
    stream: google_cloud_pubsub::subscriber::MessageStream,
    /// Flow control enforced here: the server treats the stream's limit as a hint (and the
    /// emulator ignores it), so a delivery holds a permit until it is settled.
    outstanding: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Subscription for PubSubSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        let permit = self
            .outstanding
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::Queue(format!("flow control of {}: {e}", self.name)))?;
        match self.stream.next().await {
            Some(Ok((message, handler))) => {
                let attempt = handler.delivery_attempt().unwrap_or(1).max(1) as u32;
                let message_id = message.message_id.clone();
                Ok(Delivery::new(
                    Message {
                        data: message.data,
                        attributes: message.attributes.into_iter().collect(),
                    },
                    message_id,
                    attempt,
                    Box::new(PubSubAck {
                        handler: Mutex::new(Some((handler, permit))),
                    }),
                ))
            }
            Some(Err(e)) => Err(queue_error(
                &self.peer,
                &format!("pull from {}", self.name),
                e,
            )),
            None => Err(Error::Queue(format!(
                "Pub/Sub subscription {} stream ended",
                self.name
            ))),
        }
    }

    fn close(&mut self) {
        // Stop pulling; the client keeps extending the leases of what was handed out until
        // each is acked or nacked.
        let token = self.stream.shutdown_token();
        tokio::spawn(async move { token.shutdown().await });
    }
}

struct PubSubAck {
    /// The permit goes back when the delivery is settled or dropped.
    handler: Mutex<Option<(Handler, tokio::sync::OwnedSemaphorePermit)>>,
}

impl PubSubAck {
    fn take(&self) -> Option<Handler> {
        self.handler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|(h, _permit)| h)
    }
}

#[async_trait]
impl AckHandle for PubSubAck {
    async fn ack(&self) -> Result<()> {
        if let Some(h) = self.take() {
            h.ack();
        }
        Ok(())
    }

    async fn nack(&self) -> Result<()> {
        if let Some(h) = self.take() {
            h.nack();
        }
        Ok(())
    }

    async fn extend(&self, _deadline: Duration) -> Result<()> {
        // The streaming-pull client extends the lease itself while the handler is held.
        Ok(())
    }
}

#[cfg(test)]
mod peer_errors {
    use super::*;

    #[tokio::test]
    async fn a_call_that_gets_no_answer_names_the_endpoint_and_the_wait() {
        let err = timed_for(
            Duration::from_millis(50),
            "http://127.0.0.1:8085",
            "create topic",
            std::future::pending::<()>(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "queue: Pub/Sub at http://127.0.0.1:8085: create topic: no answer within 0.05 s (the \
             client retries a peer that refuses connections or does not exist until then: is \
             PUBSUB_EMULATOR_HOST or the network right?)"
        );
        let options = PubSubOptions {
            emulator: None,
            ..PubSubOptions::from_env("p")
        };
        assert_eq!(peer(&options), "https://pubsub.googleapis.com");
    }
}

#[cfg(all(test, feature = "service-tests"))]
pub(crate) mod tests {
    //! The shared queue suite against Google's Pub/Sub emulator, plus topology setup. Built
    //! with `service-tests` (tests/run.sh); fails when the emulator is absent.
    use super::*;
    use crate::queue::DeadLetterPolicy;
    use crate::queue::conformance::{Fixture, MAX_ATTEMPTS, queue_conformance_suite};

    /// The emulator's queue; fails the test (never skips it) when the emulator is not set up.
    pub async fn emulator_queue() -> PubSubQueue {
        assert!(
            std::env::var("PUBSUB_EMULATOR_HOST").is_ok(),
            "PUBSUB_EMULATOR_HOST is not set: start the emulators with \
             eval \"$(bash tests/emulators.sh start)\""
        );
        let mut options = PubSubOptions::from_env("test-proj");
        options.lease_extension = Duration::from_secs(10);
        PubSubQueue::connect(options).await.expect("Pub/Sub client")
    }

    async fn fixture() -> Fixture {
        let q = emulator_queue().await;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (work, dead) = (format!("work-{id}"), format!("dead-{id}"));
        q.ensure_topic(&work).await.unwrap();
        q.ensure_topic(&dead).await.unwrap();
        let mut policy = DeadLetterPolicy::new(&dead, MAX_ATTEMPTS);
        policy.retry_backoff = (Duration::from_millis(100), Duration::from_millis(200));
        q.ensure_subscription(
            &format!("{work}-sub"),
            &SubscriptionConfig {
                topic: work.clone(),
                ack_deadline: Duration::from_secs(10),
                dead_letter: Some(policy),
            },
        )
        .await
        .unwrap();
        q.ensure_subscription(
            &format!("{dead}-sub"),
            &SubscriptionConfig {
                topic: dead.clone(),
                ack_deadline: Duration::from_secs(10),
                dead_letter: None,
            },
        )
        .await
        .unwrap();
        Fixture {
            queue: Arc::new(q),
            work_sub: format!("{work}-sub"),
            dead_sub: format!("{dead}-sub"),
            work_topic: work,
            patience: Duration::from_secs(30),
        }
    }

    queue_conformance_suite!(super::fixture);

    #[tokio::test]
    async fn setup_is_idempotent() {
        let q = emulator_queue().await;
        let topic = format!("idem-{}", uuid::Uuid::new_v4().simple());
        let config = SubscriptionConfig {
            topic: topic.clone(),
            ack_deadline: Duration::from_secs(60),
            dead_letter: None,
        };
        assert!(q.ensure_topic(&topic).await.unwrap());
        assert!(!q.ensure_topic(&topic).await.unwrap());
        let sub = format!("{topic}-sub");
        assert!(q.ensure_subscription(&sub, &config).await.unwrap());
        assert!(!q.ensure_subscription(&sub, &config).await.unwrap());
        q.delete_subscription(&sub).await.unwrap();
    }

    /// A consumer that went away must not keep receiving: messages published after it left
    /// reach the live consumer at once, not one ack deadline (or several) later. Against the
    /// Google Cloud CLI's emulator jar this needs the class tests/emulators.sh patches in.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_consumer_that_left_holds_no_messages() {
        let q = emulator_queue().await;
        let topic = format!("left-{}", uuid::Uuid::new_v4().simple());
        let sub = format!("{topic}-sub");
        q.ensure_topic(&topic).await.unwrap();
        let ack_deadline = Duration::from_secs(10);
        q.ensure_subscription(
            &sub,
            &SubscriptionConfig {
                topic: topic.clone(),
                ack_deadline,
                dead_letter: None,
            },
        )
        .await
        .unwrap();
        {
            // Its own client and connection, as another process would have.
            let gone = emulator_queue().await;
            let mut stream = gone.subscribe(&sub, 4).await.unwrap();
            let nothing = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
            assert!(nothing.is_err(), "the subscription should start empty");
        }
        let mut live = q.subscribe(&sub, 64).await.unwrap();
        let nothing = tokio::time::timeout(Duration::from_secs(1), live.next()).await;
        assert!(nothing.is_err(), "the subscription should still be empty");

        let start = std::time::Instant::now();
        for i in 0..20 {
            q.publish(&topic, Message::new(format!("m{i}")))
                .await
                .unwrap();
        }
        let mut received = std::collections::BTreeSet::new();
        while received.len() < 20 {
            let within = (ack_deadline / 2).saturating_sub(start.elapsed());
            let delivery = tokio::time::timeout(within, live.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of 20 messages reached the live consumer within {:?}: the \
                         emulator is still delivering to the consumer that left (start it with \
                         tests/emulators.sh, which patches its jar)",
                        received.len(),
                        ack_deadline / 2
                    )
                })
                .unwrap();
            received.insert(String::from_utf8(delivery.message.data.to_vec()).unwrap());
            delivery.ack().await.unwrap();
        }
        let expected: std::collections::BTreeSet<String> =
            (0..20).map(|i| format!("m{i}")).collect();
        assert_eq!(received, expected);
        q.delete_subscription(&sub).await.unwrap();
    }

    #[tokio::test]
    async fn publishing_to_a_missing_topic_is_a_clear_error() {
        let q = emulator_queue().await;
        let err = q
            .publish("no-such-topic-here", Message::new("x"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("publish to no-such-topic-here"), "{err}");
    }
}
