//! The OpenAI API misbehaving in every way we know of, mixed, under load.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fake_openai::{FakeOpenAi, Scripted};
use crate::harness::{Relay, SERIAL, amqp_url, collect, event, load, report};

const MAX_ATTEMPTS: usize = 4;

fn fault() -> Scripted {
    match fastrand::u8(0..6) {
        0 => Scripted::status(429).header("retry-after-ms", "100"),
        1 => Scripted::status(500),
        2 => Scripted::status(503).header("retry-after", "0"),
        3 => Scripted::status(200).delay(Duration::from_millis(1500)), // over the 1 s fetch timeout
        4 => Scripted::reset(),
        _ => Scripted::status(200).body(r#"{"id": "resp_x", "object": "respo"#), // truncated JSON
    }
}

#[tokio::test]
async fn openai_api_faults_mixed_under_load_end_published_or_dead_lettered() {
    let _serial = SERIAL.lock().await;
    let openai = FakeOpenAi::start().await.unwrap();
    let relay = Relay::start(
        &openai,
        &amqp_url(),
        &[("RELAY_FETCH_MAX_ATTEMPTS", "4"), ("RELAY_FETCH_TIMEOUT_SECS", "1"), ("RELAY_FETCH_CONCURRENCY", "64")],
    )
    .await;
    let api = openai.clone();
    let make = Arc::new(move |n: usize| {
        let id = format!("resp_f{n}");
        match n % 10 {
            0 => {} // not found: 404
            1 => api.always(&id, Scripted::status(401)), // never fetchable: dead letter
            _ => {
                let faults = (0..fastrand::usize(0..MAX_ATTEMPTS)).map(|_| fault());
                api.script(&id, faults.chain([Scripted::completed(&id)]));
            }
        }
        event("response.completed", &id)
    });
    let stop = CancellationToken::new();
    let senders = tokio::spawn(load(relay.url(), 8, usize::MAX, stop.clone(), make));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.cancel();
    let sender = senders.await.unwrap();
    let outcome = collect(&relay, &sender.acked, Duration::from_secs(60)).await;
    let lost = report("openai_api_faults", &sender, &outcome);
    assert_eq!(lost, 0);
    assert!(!outcome.dead.is_empty(), "the 401 objects were dead-lettered");
    for (id, reason) in &outcome.dead {
        assert!(reason.starts_with("HTTP 401"), "{id} dead for an unexpected reason: {reason}");
    }
}
