//! One suite of queue semantics, run against every backend (the embedded queue in process,
//! Pub/Sub against Google's emulator): ack, nack with the attempt counted, redelivery of an
//! abandoned delivery, dead-lettering after N attempts, flow control.

use std::sync::Arc;
use std::time::Duration;

use super::{DEAD_LETTER_COUNT_ATTRIBUTE, Delivery, Message, Queue, Subscription};

/// Dead-lettering after this many attempts (Pub/Sub's minimum).
pub const MAX_ATTEMPTS: u32 = 5;

/// A fresh work topic and subscription (dead-lettering to a fresh dead topic) per test.
pub struct Fixture {
    pub queue: Arc<dyn Queue>,
    pub work_topic: String,
    pub work_sub: String,
    pub dead_sub: String,
    /// How long a delivery may take to show up (the emulator is slower than a channel).
    pub patience: Duration,
}

pub async fn next(fx: &Fixture, sub: &mut Box<dyn Subscription>) -> Delivery {
    tokio::time::timeout(fx.patience, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery within {:?}", fx.patience))
        .expect("delivery")
}

async fn nothing_within(sub: &mut Box<dyn Subscription>, wait: Duration) -> bool {
    tokio::time::timeout(wait, sub.next()).await.is_err()
}

pub async fn acked_messages_are_gone(fx: Fixture) {
    let mut sub = fx.queue.subscribe(&fx.work_sub, 10).await.unwrap();
    let id = fx
        .queue
        .publish(
            &fx.work_topic,
            Message::new("a").with_attribute("run_id", "r1"),
        )
        .await
        .unwrap();
    let d = next(&fx, &mut sub).await;
    assert_eq!(
        (
            d.message.data.as_ref(),
            d.message_id.as_str(),
            d.delivery_attempt
        ),
        (&b"a"[..], id.as_str(), 1)
    );
    assert_eq!(
        d.message.attributes.get("run_id").map(String::as_str),
        Some("r1")
    );
    d.ack().await.unwrap();
    assert!(nothing_within(&mut sub, Duration::from_millis(1500)).await);
}

pub async fn nacked_messages_come_back_with_the_attempt_counted(fx: Fixture) {
    let mut sub = fx.queue.subscribe(&fx.work_sub, 10).await.unwrap();
    let id = fx
        .queue
        .publish(&fx.work_topic, Message::new("a"))
        .await
        .unwrap();
    next(&fx, &mut sub).await.nack().await.unwrap();
    let again = next(&fx, &mut sub).await;
    assert_eq!(
        (again.message_id.as_str(), again.delivery_attempt),
        (id.as_str(), 2)
    );
    again.ack().await.unwrap();
}

pub async fn an_abandoned_delivery_is_redelivered(fx: Fixture) {
    let mut sub = fx.queue.subscribe(&fx.work_sub, 10).await.unwrap();
    let id = fx
        .queue
        .publish(&fx.work_topic, Message::new("lost"))
        .await
        .unwrap();
    // The consumer goes away without settling (a crashed worker).
    drop(next(&fx, &mut sub).await);
    let again = next(&fx, &mut sub).await;
    assert_eq!(again.message_id, id);
    assert!(again.delivery_attempt >= 2, "{}", again.delivery_attempt);
    again.ack().await.unwrap();
}

pub async fn a_message_that_keeps_failing_is_dead_lettered_after_n_attempts(fx: Fixture) {
    let mut sub = fx.queue.subscribe(&fx.work_sub, 10).await.unwrap();
    let mut dead = fx.queue.subscribe(&fx.dead_sub, 10).await.unwrap();
    fx.queue
        .publish(
            &fx.work_topic,
            Message::new("poison").with_attribute("k", "v"),
        )
        .await
        .unwrap();
    for attempt in 1..=MAX_ATTEMPTS {
        let d = next(&fx, &mut sub).await;
        assert_eq!(d.delivery_attempt, attempt);
        d.nack().await.unwrap();
    }
    let d = next(&fx, &mut dead).await;
    assert_eq!(d.message.data.as_ref(), b"poison");
    assert_eq!(d.message.attributes.get("k").map(String::as_str), Some("v"));
    assert_eq!(
        d.message
            .attributes
            .get(DEAD_LETTER_COUNT_ATTRIBUTE)
            .map(String::as_str),
        Some(MAX_ATTEMPTS.to_string().as_str())
    );
    d.ack().await.unwrap();
    assert!(nothing_within(&mut sub, Duration::from_millis(1500)).await);
}

pub async fn flow_control_holds_back_deliveries_until_one_settles(fx: Fixture) {
    let mut sub = fx.queue.subscribe(&fx.work_sub, 1).await.unwrap();
    fx.queue
        .publish(&fx.work_topic, Message::new("1"))
        .await
        .unwrap();
    fx.queue
        .publish(&fx.work_topic, Message::new("2"))
        .await
        .unwrap();
    let first = next(&fx, &mut sub).await;
    assert!(nothing_within(&mut sub, Duration::from_millis(1500)).await);
    let first_data = first.message.data.clone();
    first.ack().await.unwrap();
    let second = next(&fx, &mut sub).await;
    assert_ne!(second.message.data, first_data);
    second.ack().await.unwrap();
}

/// Runs every case against a backend: `$fixture` is an async fn returning a fresh `Fixture`.
macro_rules! queue_conformance_suite {
    ($fixture:path) => {
        mod conformance_suite {
            use crate::queue::conformance as suite;

            #[tokio::test]
            async fn acked_messages_are_gone() {
                suite::acked_messages_are_gone($fixture().await).await;
            }

            #[tokio::test]
            async fn nacked_messages_come_back_with_the_attempt_counted() {
                suite::nacked_messages_come_back_with_the_attempt_counted($fixture().await).await;
            }

            #[tokio::test]
            async fn an_abandoned_delivery_is_redelivered() {
                suite::an_abandoned_delivery_is_redelivered($fixture().await).await;
            }

            #[tokio::test]
            async fn a_message_that_keeps_failing_is_dead_lettered_after_n_attempts() {
                suite::a_message_that_keeps_failing_is_dead_lettered_after_n_attempts(
                    $fixture().await,
                )
                .await;
            }

            #[tokio::test]
            async fn flow_control_holds_back_deliveries_until_one_settles() {
                suite::flow_control_holds_back_deliveries_until_one_settles($fixture().await).await;
            }
        }
    };
}
pub(crate) use queue_conformance_suite;
