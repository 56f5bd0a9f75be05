//! Running the relay: shutdown, broker connections that go away, a message the broker keeps
//! handing out, and what the logs say.

use std::time::Duration;

use openai_webhook_relay::inbox::header;

use crate::helpers::{Options, Relay, event, eventually, spawn_relay, webhook_id};

#[tokio::test]
async fn stopping_the_relay_finishes_cleanly() {
    let relay = spawn_relay(Options::default()).await;
    let queue = relay.bind("#").await;
    assert_eq!(relay.deliver(&event("something.new", "x_1")).await.status(), 200);
    assert!(relay.amqp.next(&queue, Duration::from_secs(10)).await.is_some());
    tokio::time::timeout(Duration::from_secs(10), relay.stop()).await.expect("stops in time").expect("stops without error");
}

async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. a 408 before closing
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn slow_header_senders_are_cut_off_and_others_still_served() {
    use tokio::io::AsyncWriteExt;
    let relay = spawn_relay(Options::default().role("receiver").arg("--header-timeout-secs", 1)).await;
    let addr = relay.url.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nwebhook-id: wh_1\r\n").await.unwrap();
    assert_eq!(relay.deliver(&event("response.completed", "resp_1")).await.status(), 200, "others are served meanwhile");
    assert!(closed_by_server(&mut slow, Duration::from_secs(3)).await, "slowloris connection closed");
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(closed_by_server(&mut idle, Duration::from_secs(3)).await, "idle connection closed");
}

/// A kept-alive connection that holds one of the relay's connection slots: the relay answered
/// a request on it (one over the limit is closed unanswered). Retried while the slots are
/// still held by connections closed on this side that the relay has not yet seen close.
async fn connection_in_a_slot(addr: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    eventually(Duration::from_secs(5), "the relay serves a new connection", async || {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n").await.ok()?;
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await.ok()?.ok()?;
        buf[..read].starts_with(b"HTTP/1.1 200").then_some(stream)
    })
    .await
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_once() {
    let relay = spawn_relay(Options::default().role("receiver").arg("--max-connections", 2).arg("--header-timeout-secs", 30)).await;
    let addr = relay.url.trim_start_matches("http://").to_owned();
    // Both slots held by this test (the readiness check's connection may still hold one a moment).
    let a = connection_in_a_slot(&addr).await;
    let b = connection_in_a_slot(&addr).await;
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(closed_by_server(&mut c, Duration::from_secs(2)).await, "third connection refused");
    drop((a, b));
    // Served again once the relay has seen a slot free up; until then it closes unanswered.
    let body = event("response.completed", "resp_1");
    let status = eventually(Duration::from_secs(5), "a delivery is served again", async || {
        let id = webhook_id();
        let ts = openai_webhook_relay::inbox::unix_now();
        let headers = [("webhook-id", id.as_str()), ("webhook-timestamp", &ts.to_string()), ("webhook-signature", &relay.sign(&id, ts, &body))];
        relay.try_post(&headers, body.clone().into_bytes()).await.ok().map(|response| response.status())
    })
    .await;
    assert_eq!(status, 200, "served again once slots free up");
}

/// Waits until `GET /readyz` answers `status`, returning how long that took.
async fn readyz_becomes(relay: &Relay, status: u16, within: Duration) -> Duration {
    let started = std::time::Instant::now();
    eventually(within, format!("/readyz answers {status}"), async || (relay.get("/readyz").await.status() == status).then_some(())).await;
    started.elapsed()
}

#[tokio::test]
async fn a_cut_broker_connection_gives_503_then_heals_by_itself_without_losing_events() {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    let proxy = crate::proxy::Proxy::start("127.0.0.1:5672").await;
    let relay = Arc::new(spawn_relay(Options { amqp_url: proxy.amqp_url(), ..Default::default() }).await);
    relay.wait_ready().await;
    let queue = relay.bind("#").await; // the test's own connection does not pass the proxy

    // Senders keep delivering through the cuts and remember which events got a 200.
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut senders = Vec::new();
    for _ in 0..4 {
        let (relay, accepted, stop) = (relay.clone(), accepted.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut refused = 0;
            while !stop.is_cancelled() {
                let body = event("something.new", "x_1");
                let started = std::time::Instant::now();
                let status = relay.deliver(&body).await.status().as_u16();
                assert!(started.elapsed() < Duration::from_secs(4), "a delivery hung for {:?}", started.elapsed());
                match status {
                    200 => {
                        let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
                        accepted.lock().unwrap().insert(id);
                    }
                    503 => refused += 1,
                    other => panic!("unexpected {other}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            refused
        }));
    }

    // Deliveries are accepted before each cut and after the last heal.
    let twenty_more_accepted = async || {
        let before = accepted.lock().unwrap().len();
        eventually(Duration::from_secs(10), "20 more deliveries accepted", async || (accepted.lock().unwrap().len() >= before + 20).then_some(())).await
    };
    let cuts = 2;
    for _ in 0..cuts {
        twenty_more_accepted().await;
        proxy.cut();
        let noticed = readyz_becomes(&relay, 503, Duration::from_secs(2)).await;
        assert!(noticed < Duration::from_secs(2), "noticed after {noticed:?}");
        assert_eq!(relay.deliver(&event("something.new", "x_1")).await.status(), 503, "refused while the broker is away");
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.restore();
        readyz_becomes(&relay, 200, Duration::from_secs(10)).await;
    }
    twenty_more_accepted().await;
    stop.cancel();
    let mut refused = 0;
    for sender in senders {
        refused += sender.await.unwrap();
    }

    // Every accepted event comes out once the worker has re-attached.
    let accepted = accepted.lock().unwrap().clone();
    assert!(!accepted.is_empty());
    let mut published = HashSet::new();
    while !accepted.is_subset(&published) {
        let Some(delivery) = relay.amqp.next(&queue, Duration::from_secs(15)).await else { break };
        published.insert(delivery.properties.message_id().as_ref().unwrap().to_string());
    }
    let lost: Vec<_> = accepted.difference(&published).collect();
    println!("broker cuts: accepted={} refused={refused} published={} lost={}", accepted.len(), published.len(), lost.len());
    assert!(lost.is_empty(), "accepted but never published: {lost:?}");
    // The first connection and one new one after each cut, seen as /readyz going 503 then 200;
    // more when a reconnect attempt fails or a channel is replaced, which is not wrong.
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    let connects: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("relay_broker_connects_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no relay_broker_connects_total in\n{metrics}"));
    assert!(connects > cuts, "{connects} broker connections for {cuts} cuts:\n{metrics}");
}

/// Starts the real binary with the given extra environment, its logs discarded.
pub fn spawn_binary(openai: &crate::fake_openai::FakeOpenAi, topology: &openai_webhook_relay::topology::Topology, port: u16, extra: &[(&str, &str)]) -> std::process::Child {
    relay_binary(openai, topology, port, extra).stderr(std::process::Stdio::null()).spawn().expect("the relay binary starts")
}

/// The real binary, set up as [`spawn_binary`] starts it (`RUST_LOG=warn`), not started yet.
pub fn relay_binary(openai: &crate::fake_openai::FakeOpenAi, topology: &openai_webhook_relay::topology::Topology, port: u16, extra: &[(&str, &str)]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_openai-webhook-relay"));
    command
        .env("OPENAI_WEBHOOK_SECRET", crate::helpers::secret_text())
        .env("OPENAI_API_KEY", crate::fake_openai::API_KEY)
        .env("OPENAI_BASE_URL", &openai.base_url)
        .env("AMQP_URL", crate::helpers::amqp_url())
        .env("RELAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("RELAY_EXCHANGE", &topology.exchange)
        .env("RELAY_INBOX_QUEUE", &topology.inbox)
        .env("RELAY_REQUEST_QUEUE", topology.requests.as_deref().unwrap_or_default())
        .env("RUST_LOG", "warn")
        .envs(extra.iter().copied())
        .stdin(std::process::Stdio::null());
    command
}

/// POSTs `body` to the relay at `base` as OpenAI would, signed with the tests' secret.
pub async fn deliver_signed(http: &reqwest::Client, base: &str, id: &str, body: &str) -> reqwest::Response {
    let ts = openai_webhook_relay::inbox::unix_now().to_string();
    let sig = openai_webhook_relay::verify::Secret::parse(&crate::helpers::secret_text()).unwrap().sign(id, &ts, body.as_bytes());
    http.post(format!("{base}/webhooks/openai"))
        .header("webhook-id", id)
        .header("webhook-timestamp", &ts)
        .header("webhook-signature", sig)
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn sigterm_lets_the_delivery_in_hand_finish_and_exits_0() {
    use crate::fake_openai::{FakeOpenAi, Scripted};
    use crate::helpers::{Amqp, Cleanup, unique_topology};

    let openai = FakeOpenAi::start().await.unwrap();
    let topology = unique_topology();
    let _cleanup = Cleanup::topology(&topology);
    let port = free_port();
    let mut child = spawn_binary(&openai, &topology, port, &[]);
    let http = crate::helpers::http_client();
    let base = format!("http://127.0.0.1:{port}");
    crate::helpers::wait_ready(&base).await;
    let amqp = Amqp::connect().await;
    let queue = amqp.bind(&topology.exchange, "#").await;

    // A fetch that takes 1.5 s is in flight when SIGTERM arrives.
    let fixture = std::fs::read_to_string(format!("{}/fixtures/openai/responses/resp_completed01.json", env!("CARGO_MANIFEST_DIR"))).unwrap();
    openai.script("resp_completed01", [Scripted::status(200).body(&fixture).delay(Duration::from_millis(1500))]);
    let body = event("response.completed", "resp_completed01");
    let id = crate::helpers::webhook_id();
    assert_eq!(deliver_signed(&http, &base, &id, &body).await.status(), 200);
    eventually(Duration::from_secs(10), "the worker fetches the object", async || (openai.requests("resp_completed01") > 0).then_some(())).await;
    let exit = crate::helpers::terminate(&mut child, Duration::from_secs(15)).await;
    assert_eq!(exit.code(), Some(0));
    let published = amqp.next(&queue, Duration::ZERO).await.expect("the delivery in hand was published before exit");
    assert_eq!(header(&published.properties, "webhook-id"), Some(id.as_str()));
    assert_eq!(amqp.left_over(&topology).await, Vec::<String>::new(), "and acked");
}

#[tokio::test]
async fn on_a_stop_signal_readiness_fails_first_while_deliveries_are_still_taken() {
    let relay = spawn_relay(Options::default().role("receiver").arg("--drain-delay-secs", 2)).await;
    relay.signal_stop();
    readyz_becomes(&relay, 503, Duration::from_secs(1)).await;
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &event("response.completed", "resp_1")).await.status(), 200, "still served while draining");
    assert_eq!(relay.take_stored_ids().await, [id]);
    tokio::time::timeout(Duration::from_secs(10), relay.stop()).await.expect("stops after the drain delay").unwrap();
}

/// A message the broker hands out more often than the inbox's delivery limit (a worker that
/// crashes on it every time, a reconnect storm) is dead-lettered to `<inbox>.dead`, never
/// dropped, which RabbitMQ 4.0-4.2 otherwise does after 20 returns.
///
/// Each return here is a `basic.reject` with requeue: every RabbitMQ version counts it
/// (from 4.3 on, a `basic.nack` with requeue no longer counts towards the limit).
#[tokio::test]
async fn an_inbox_message_handed_out_past_the_delivery_limit_ends_in_the_dead_letter_queue() {
    use lapin::options::{BasicGetOptions, BasicRejectOptions};
    use openai_webhook_relay::topology::INBOX_DELIVERY_LIMIT;

    // Receiver only: nothing consumes the inbox but this test.
    let relay = spawn_relay(Options::default().role("receiver")).await;
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &event("response.completed", "resp_1")).await.status(), 200);
    let (inbox, dead) = (relay.topology.inbox.as_str(), relay.topology.dead());
    let mut handed_out = 0;
    eventually(Duration::from_secs(60), "the message leaves the inbox for the dead-letter queue", async || {
        match relay.amqp.channel.basic_get(inbox.into(), BasicGetOptions { no_ack: false }).await.unwrap() {
            Some(message) => {
                handed_out += 1;
                assert!(handed_out <= INBOX_DELIVERY_LIMIT + 5, "handed out {handed_out} times and still in the inbox");
                message.delivery.acker.reject(BasicRejectOptions { requeue: true }).await.unwrap();
                None
            }
            // Between a return and the next get, or gone: see where.
            None => (relay.amqp.count(&dead).await > 0).then_some(()),
        }
    })
    .await;
    assert!(handed_out >= INBOX_DELIVERY_LIMIT, "dead-lettered after {handed_out} deliveries, before the limit of {INBOX_DELIVERY_LIMIT}");

    let letter = relay.amqp.next(&dead, Duration::from_secs(5)).await.expect("the message in the dead-letter queue");
    assert_eq!(header(&letter.properties, "webhook-id"), Some(id.as_str()));
    assert_eq!(header(&letter.properties, "x-first-death-reason"), Some("delivery_limit"));
    assert_eq!(header(&letter.properties, "x-first-death-queue"), Some(inbox));
    assert_eq!(relay.amqp.settled_count(inbox).await, 0, "and nowhere else");
    println!("delivery limit: dead-lettered after {handed_out} deliveries (limit {INBOX_DELIVERY_LIMIT})");
}

/// At `RUST_LOG=warn` (the benchmark's level, and a common production one) a warning about
/// a delivery still names it: the delivery's ids come with the line, in its `spans`.
#[tokio::test]
async fn warnings_about_a_delivery_carry_its_ids_at_rust_log_warn() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    use crate::fake_openai::{FakeOpenAi, Scripted};
    use crate::helpers::{Cleanup, unique_topology};

    let openai = FakeOpenAi::start().await.unwrap();
    openai.always("resp_logs01", Scripted::status(500));
    let topology = unique_topology();
    let _cleanup = Cleanup::topology(&topology);
    let port = free_port();
    let mut command = tokio::process::Command::from(relay_binary(&openai, &topology, port, &[]));
    command.env_remove("RELAY_LOG_FORMAT").stderr(std::process::Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn().expect("the relay binary starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = format!("http://127.0.0.1:{port}");
    crate::helpers::wait_ready(&base).await;

    let body = event("response.completed", "resp_logs01");
    let event_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
    let id = webhook_id();
    assert_eq!(deliver_signed(&crate::helpers::http_client(), &base, &id, &body).await.status(), 200);

    let mut said = Vec::new();
    let warning = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            said.push(line);
            let parsed: serde_json::Value = serde_json::from_str(said.last().unwrap()).expect("every log line is JSON");
            if parsed["message"] == "will retry" {
                return Some(parsed);
            }
        }
        None
    })
    .await;
    let warning = warning.ok().flatten().unwrap_or_else(|| panic!("no \"will retry\" warning; stderr: {said:#?}"));
    assert_eq!(warning["level"], "WARN");
    let spans = warning["spans"].as_array().unwrap_or_else(|| panic!("no spans on {warning}"));
    let delivery = spans.iter().find(|span| span["name"] == "deliver").unwrap_or_else(|| panic!("no delivery span on {warning}"));
    assert_eq!(delivery["webhook_id"], id.as_str(), "{warning}");
    assert_eq!(delivery["event_id"], event_id.as_str(), "{warning}");
    assert_eq!(delivery["object_id"], "resp_logs01", "{warning}");
    assert_eq!(delivery["project"], "default", "{warning}");
    child.kill().await.unwrap();
}
