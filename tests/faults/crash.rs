//! The relay killed outright mid-load.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fake_openai::FakeOpenAi;
use crate::harness::{Relay, SERIAL, amqp_url, collect, event, load, report};

#[tokio::test]
async fn sigkill_mid_load_and_restart_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let openai = FakeOpenAi::start().await.unwrap();
    let mut relay = Relay::start(&openai, &amqp_url(), &[]).await;
    let stop = CancellationToken::new();
    // Half need a fetch (served from fixtures), half pass through.
    let make = Arc::new(|n: usize| if n.is_multiple_of(2) { event("response.completed", "resp_completed01") } else { event("something.new", "x_1") });
    let senders = tokio::spawn(load(relay.url(), 8, usize::MAX, stop.clone(), make));
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        relay.crash_and_restart().await;
    }
    relay.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let sender = senders.await.unwrap();
    let outcome = collect(&relay, &sender.acked, Duration::from_secs(30)).await;
    assert_eq!(report("sigkill_restart", &sender, &outcome), 0);
}
