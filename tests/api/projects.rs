//! Several OpenAI projects on one relay, and deduplication across replicas through Redis.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use openai_webhook_relay::inbox::{header, unix_now};
use openai_webhook_relay::verify::Secret;

use crate::fake_openai::API_KEY;
use crate::helpers::{Options, Relay, event, post_signed, spawn_relay, webhook_id};

fn secret_of(byte: u8) -> String {
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([byte; 32]))
}

/// POSTs `body` to `path`, signed with `secret`.
async fn deliver_to(relay: &Relay, path: &str, secret: &str, body: &str) -> u16 {
    let (id, ts) = (webhook_id(), unix_now().to_string());
    let signature = Secret::parse(secret).unwrap().sign(&id, &ts, body.as_bytes());
    relay
        .http
        .post(format!("{}{path}", relay.url))
        .header("webhook-id", id)
        .header("webhook-timestamp", ts)
        .header("webhook-signature", signature)
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn each_project_is_served_with_its_own_secret_and_key_and_tagged() {
    let (alpha, beta) = (secret_of(1), secret_of(2));
    let mut options = Options::default().arg("--projects", "alpha,beta-2");
    options.env = vec![
        ("OPENAI_WEBHOOK_SECRET_ALPHA".into(), alpha.clone()),
        ("OPENAI_API_KEY_ALPHA".into(), format!("{API_KEY}-alpha")),
        ("OPENAI_WEBHOOK_SECRET_BETA_2".into(), beta.clone()),
        ("OPENAI_API_KEY_BETA_2".into(), format!("{API_KEY}-beta")),
    ];
    let relay = spawn_relay(options).await;
    let queue = relay.bind("#").await;

    // Each project at its own path, with its own secret; fetched with its own key.
    assert_eq!(deliver_to(&relay, "/webhooks/openai/alpha", &alpha, &event("response.completed", "resp_completed01")).await, 200);
    let got = relay.amqp.next(&queue, Duration::from_secs(10)).await.expect("alpha's event");
    let cloud_event: serde_json::Value = serde_json::from_slice(&got.data).unwrap();
    assert_eq!(cloud_event["source"], "openai/alpha");
    assert_eq!(header(&got.properties, "openai-project"), Some("alpha"));
    assert_eq!(got.routing_key.as_str(), "response.completed", "the routing key stays the event type");
    assert_eq!(relay.openai.keys("resp_completed01"), [format!("{API_KEY}-alpha")]);

    assert_eq!(deliver_to(&relay, "/webhooks/openai/beta-2", &beta, &event("batch.completed", "batch_completed01")).await, 200);
    let got = relay.amqp.next(&queue, Duration::from_secs(10)).await.expect("beta's event");
    let cloud_event: serde_json::Value = serde_json::from_slice(&got.data).unwrap();
    assert_eq!(cloud_event["source"], "openai/beta-2");
    assert_eq!(relay.openai.keys("batch_completed01"), [format!("{API_KEY}-beta")]);

    // The single-project variables keep working at the plain path, untagged.
    assert_eq!(relay.deliver(&event("something.new", "x_1")).await.status(), 200);
    let got = relay.amqp.next(&queue, Duration::from_secs(10)).await.expect("default project's event");
    let cloud_event: serde_json::Value = serde_json::from_slice(&got.data).unwrap();
    assert_eq!(cloud_event["source"], "openai");
    assert_eq!(header(&got.properties, "openai-project"), None);

    // A delivery signed for one project is refused on another's path, and on the default one.
    let body = event("something.new", "x_2");
    assert_eq!(deliver_to(&relay, "/webhooks/openai/beta-2", &alpha, &body).await, 401);
    assert_eq!(deliver_to(&relay, "/webhooks/openai", &alpha, &body).await, 401);
    assert_eq!(deliver_to(&relay, "/webhooks/openai/alpha", &crate::helpers::secret_text(), &body).await, 401);
    assert_eq!(deliver_to(&relay, "/webhooks/openai/gamma", &alpha, &body).await, 404);
    assert!(relay.amqp.next(&queue, Duration::from_millis(300)).await.is_none(), "nothing refused was published");
}

#[tokio::test]
async fn duplicated_deliveries_to_two_replicas_are_published_once_with_redis() {
    use crate::fake_openai::FakeOpenAi;
    use crate::helpers::{Amqp, Cleanup, unique_topology};
    use crate::operations::{free_port, spawn_binary};

    let redis_url = "redis://127.0.0.1:6379";
    let openai = FakeOpenAi::start().await.unwrap();
    let topology = unique_topology();
    let _cleanup = Cleanup::topology(&topology);
    let ports = [free_port(), free_port()];
    let mut replicas: Vec<_> = ports
        .iter()
        .map(|port| Replica(spawn_binary(&openai, &topology, *port, &[("RELAY_DEDUP_REDIS_URL", redis_url)])))
        .collect();
    let http = crate::helpers::http_client();
    for port in ports {
        crate::helpers::wait_ready(&format!("http://127.0.0.1:{port}")).await;
    }
    let amqp = Amqp::connect().await;
    let queue = amqp.bind(&topology.exchange, "#").await;

    // OpenAI repeats deliveries; behind a load balancer the copies land on different replicas.
    let secret = Secret::parse(&crate::helpers::secret_text()).unwrap();
    let mut sent = HashMap::new();
    let mut copies = Vec::new();
    for n in 0..30 {
        let body = if n % 2 == 0 { event("response.completed", "resp_completed01") } else { event("something.new", "x_1") };
        let id = webhook_id();
        sent.insert(id.clone(), body.clone());
        for port in ports {
            let (http, secret, id, body) = (http.clone(), secret.clone(), id.clone(), body.clone());
            copies.push(tokio::spawn(async move { post_signed(&http, &format!("http://127.0.0.1:{port}"), &secret, &id, body, &[]).await.status().as_u16() }));
        }
    }
    for copy in copies {
        assert_eq!(copy.await.unwrap(), 200);
    }

    let mut published: HashMap<String, usize> = HashMap::new();
    while let Some(delivery) = amqp.next(&queue, Duration::from_secs(3)).await {
        *published.entry(header(&delivery.properties, "webhook-id").unwrap().to_owned()).or_default() += 1;
    }
    println!("redis dedup: sent={} copies={} published={} duplicates={}", sent.len(), sent.len() * 2, published.values().sum::<usize>(), published.values().sum::<usize>() - published.len());
    let missing: Vec<_> = sent.keys().filter(|id| !published.contains_key(*id)).collect();
    let unknown: Vec<_> = published.keys().filter(|id| !sent.contains_key(*id)).collect();
    assert!(missing.is_empty() && unknown.is_empty(), "never published: {missing:?}; published but never sent: {unknown:?}");
    let repeated: Vec<_> = published.iter().filter(|(_, n)| **n != 1).collect();
    assert!(repeated.is_empty(), "published more than once: {repeated:?}");
    // Stopped, the replicas' connections close and whatever they held unacked goes back.
    for Replica(child) in &mut replicas {
        assert!(crate::helpers::terminate(child, Duration::from_secs(15)).await.success());
    }
    assert_eq!(amqp.left_over(&topology).await, Vec::<String>::new(), "both copies of each acked");

    // Leave nothing behind in Redis.
    let mut redis = redis::Client::open(redis_url).unwrap().get_multiplexed_async_connection().await.unwrap();
    for id in sent.keys() {
        let _: () = redis::cmd("DEL").arg(format!("openai-webhook-relay:dedup:/{id}")).query_async(&mut redis).await.unwrap();
    }
}

/// Redis configured but down when the relay starts: the relay runs anyway, ready, with
/// per-process dedup (`relay_dedup_fallback 1`) until Redis answers, and delivers events.
#[tokio::test]
async fn a_relay_whose_redis_is_down_at_start_runs_and_delivers_with_dedup_in_memory() {
    let relay = spawn_relay(Options::default().arg("--dedup-redis-url", "redis://127.0.0.1:1")).await;
    assert_eq!(relay.get("/readyz").await.status(), 200);
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    assert!(metrics.lines().any(|line| line == "relay_dedup_fallback 1"), "{metrics}");
    let queue = relay.bind("#").await;
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &event("response.completed", "resp_completed01")).await.status(), 200);
    let got = relay.amqp.next(&queue, Duration::from_secs(15)).await.expect("published without Redis");
    assert_eq!(header(&got.properties, "webhook-id"), Some(id.as_str()));
}

/// A relay process, killed when the test ends.
struct Replica(std::process::Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
