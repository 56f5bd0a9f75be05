//! Running the relay: shutdown, and broker connections that go away.

use std::time::Duration;

use crate::helpers::{Options, event, spawn_relay};

#[tokio::test]
async fn stopping_the_relay_finishes_cleanly() {
    let relay = spawn_relay(Options::default()).await;
    let queue = relay.bind("#").await;
    assert_eq!(relay.deliver(&event("something.new", "x_1")).await.status(), 200);
    assert!(relay.amqp.next(&queue, Duration::from_secs(10)).await.is_some());
    tokio::time::timeout(Duration::from_secs(10), relay.stop()).await.expect("stops in time").expect("stops without error");
}
