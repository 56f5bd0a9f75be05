//! The background-mode gateway with its relay killed outright (SIGKILL) twice while a batch
//! of requests is being created and completed: every request still gets its terminal reply.
//!
//! Duplicate POSTs are expected and counted, not failed on. Without Redis the gateway's
//! `message_id` claim and the record of OpenAI's answer live in the relay's memory, so the
//! crash window of the contract ("between OpenAI's answer and the ack") is, per process,
//! every request whose POST was sent (or answered) but whose message was not yet acked when
//! the process died: the broker redelivers it to the restarted relay, which remembers
//! nothing and POSTs again (the relay sends no `Idempotency-Key`, and the fake API, like
//! OpenAI without one, creates a second response). That response carries the same
//! `relay_*` metadata, so the request may get a second queued and terminal reply with
//! another response id; consumers deduplicate by `correlation_id`/request id.
//!
//! Webhooks: the fake API retries a terminal webhook every 200 ms for about 10 s until the
//! relay answers 2xx (OpenAI retries for days), so one sent while the relay is dead arrives
//! after the restart. The safety net (`RELAY_RECONCILE_AFTER_SECS=2`) is the backstop if it
//! does not; it also republishes, as `reconciled_<id>`, responses whose webhook the killed
//! process had already handled, since the restarted one's in-memory `terminal/<id>` claims
//! are empty: those show up as `reconciled` and as extra terminal replies.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::AMQPValue;
use openai_webhook_relay::verify::Secret;
use serde_json::{Value, json};

use crate::cleanup::Cleanup;
use crate::fake_openai::FakeOpenAi;
use crate::harness::{Relay, SERIAL, amqp_url, connect, secret_text};

const REQUESTS: usize = 200;

/// What arrived on the reply queue for one correlation id.
#[derive(Default)]
struct Replies {
    queued: usize,
    /// Terminal `response.completed` replies, by response id.
    completed: Vec<String>,
    other: Vec<String>,
}

#[tokio::test]
async fn gateway_sigkill_mid_batch_every_request_gets_its_terminal_reply() {
    let _serial = SERIAL.lock().await;
    let requests = format!("fault.gw{:016x}.requests", fastrand::u64(..));
    let reply_queue = format!("{requests}.replies");
    let gateway_queues = openai_webhook_relay::topology::Topology { exchange: String::new(), inbox: String::new(), requests: Some(requests.clone()) }
        .queues()
        .into_iter()
        .filter(|q| q.starts_with(&requests));
    // Declared before the relay, so it is dropped after the relay process is gone.
    let _cleanup = gateway_queues.fold(Cleanup::queue(&reply_queue), |c, q| c.and_queue(&q));

    let openai = FakeOpenAi::start().await.unwrap();
    openai.complete_after(Duration::from_millis(500));
    let mut relay = Relay::start(&openai, &amqp_url(), &[("RELAY_REQUEST_QUEUE", &requests), ("RELAY_RECONCILE_AFTER_SECS", "2")]).await;
    openai.send_webhooks_to(&format!("http://127.0.0.1:{}", relay.port), Secret::parse(&secret_text()).unwrap());

    let (_connection, channel) = connect().await;
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let quorum = openai_webhook_relay::topology::table([("x-queue-type", AMQPValue::LongString("quorum".into()))]);
    channel.queue_declare(reply_queue.as_str().into(), durable, quorum).await.unwrap();

    // The batch, published over about 4 s (confirmed), while the relay is killed twice.
    let publisher = {
        let (requests, reply_queue) = (requests.clone(), reply_queue.clone());
        tokio::spawn(async move {
            let (_connection, channel) = connect().await;
            channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            for i in 0..REQUESTS {
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(format!("gw-{i}").into())
                    .with_reply_to(reply_queue.as_str().into())
                    .with_correlation_id(format!("corr-{i}").into());
                let body = json!({"model": "gpt-test", "input": format!("n{i}")}).to_string();
                let options = BasicPublishOptions { mandatory: true, ..Default::default() };
                let confirm = channel.basic_publish("".into(), requests.as_str().into(), options, body.as_bytes(), properties).await.unwrap();
                assert!(confirm.await.unwrap().is_ack(), "the request queue took request {i}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    for pause in [Duration::from_millis(1200), Duration::from_millis(1500)] {
        tokio::time::sleep(pause).await;
        relay.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay.spawn();
    }
    relay.wait_ready().await;
    publisher.await.unwrap();

    // Every request's terminal reply, within a bound (watches come due after 2 s, then 4 s...).
    let mut replies: HashMap<String, Replies> = HashMap::new();
    let mut reconciled = 0;
    let started = Instant::now();
    loop {
        while let Some(message) = channel.basic_get(reply_queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            let delivery = message.delivery;
            let correlation = delivery.properties.correlation_id().as_ref().map(|c| c.to_string()).unwrap_or_default();
            let body: Value = serde_json::from_slice(&delivery.data).unwrap();
            let entry = replies.entry(correlation.clone()).or_default();
            match body["type"].as_str().unwrap_or_default() {
                "com.openai.response.queued" => entry.queued += 1,
                "com.openai.response.completed" => {
                    let i = correlation.strip_prefix("corr-").unwrap_or_default();
                    assert_eq!(body["data"]["output_text"], format!("echo: n{i}"), "the reply of {correlation} is its own response");
                    assert_eq!(body["data"]["response"]["metadata"]["relay_request_id"], format!("gw-{i}"));
                    if body["id"].as_str().is_some_and(|id| id.starts_with("reconciled_")) {
                        reconciled += 1;
                    }
                    entry.completed.push(body["subject"].as_str().unwrap_or_default().to_owned());
                }
                other => entry.other.push(other.to_owned()),
            }
        }
        let answered = (0..REQUESTS).filter(|i| replies.get(&format!("corr-{i}")).is_some_and(|r| !r.completed.is_empty())).count();
        if answered == REQUESTS || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mine: HashSet<String> = (0..REQUESTS).map(|i| format!("gw-{i}")).collect();
    let mut posts: HashMap<String, usize> = HashMap::new();
    for create in openai.creates() {
        if let Some(id) = create["metadata"]["relay_request_id"].as_str().filter(|id| mine.contains(*id)) {
            *posts.entry(id.to_owned()).or_default() += 1;
        }
    }
    let total_posts: usize = posts.values().sum();
    let duplicate_posts = total_posts - posts.len();
    let terminal: usize = replies.values().map(|r| r.completed.len()).sum();
    let missing: Vec<usize> = (0..REQUESTS).filter(|i| replies.get(&format!("corr-{i}")).is_none_or(|r| r.completed.is_empty())).collect();
    // Repeats of one response's terminal event (webhook and safety net in different processes).
    let repeated: usize = replies.values().map(|r| r.completed.len() - r.completed.iter().collect::<HashSet<_>>().len()).sum();
    let queued: usize = replies.values().map(|r| r.queued).sum();
    let others: Vec<&String> = replies.values().flat_map(|r| &r.other).collect();
    println!(
        "gateway_sigkill: requests={REQUESTS} terminal_replies={terminal} missing={} posts={total_posts} duplicate_posts={duplicate_posts} reconciled={reconciled} \
         (queued_replies={queued} repeated_terminal={repeated} webhooks_sent={} other_replies={})",
        missing.len(),
        openai.webhooks_sent(),
        others.len()
    );
    if !missing.is_empty() {
        println!("gateway_sigkill: missing requests (first 20): {:?}", &missing[..missing.len().min(20)]);
        for i in missing.iter().take(5) {
            let id = format!("gw-{i}");
            let created: Vec<(Value, Value)> = openai.created_for(&id).iter().map(|r| (r["id"].clone(), r["status"].clone())).collect();
            println!("gateway_sigkill: {id}: posts={} responses at the API={created:?}", posts.get(&id).copied().unwrap_or(0));
        }
        let counts = tokio::task::spawn_blocking(crate::harness::queue_counts).await.unwrap();
        println!("gateway_sigkill: gateway queues (name, ready, unacked): {:?}", counts.iter().filter(|(name, _, _)| name.starts_with(&requests)).collect::<Vec<_>>());
    }
    assert!(others.is_empty(), "no request failed: {others:?}");
    assert_eq!(posts.len(), REQUESTS, "every request reached the API");
    assert!(missing.is_empty(), "requests without a terminal reply: {missing:?}");
}
