//! The operator subcommands, run as the real binary against a relay.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::fake_openai::Scripted;
use crate::helpers::{Options, amqp_url, eventually, id_of, secret_text, spawn_relay, webhook_id};

/// The longest any one step of these tests may take.
const WAIT: Duration = Duration::from_secs(15);

fn relay_cli(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_openai-webhook-relay"));
    command.args(args).env("AMQP_URL", amqp_url()).env_remove("OPENAI_WEBHOOK_SECRET").stdin(Stdio::null());
    command
}

/// Runs `command` to its end, killing it if it takes longer than `WAIT`.
async fn run(command: Command) -> Output {
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    tokio::time::timeout(WAIT, command.output()).await.unwrap_or_else(|_| panic!("{command:?} still running after {WAIT:?}")).unwrap()
}

#[tokio::test]
async fn send_signs_like_openai_and_the_relay_accepts_it() {
    let relay = spawn_relay(Options::default()).await;
    let queue = relay.bind("batch.*").await;
    let url = format!("{}/webhooks/openai", relay.url);
    let mut command = relay_cli(&["send", "--url", &url, "--type", "batch.completed", "--object-id", "batch_completed01"]);
    command.env("OPENAI_WEBHOOK_SECRET", secret_text());
    let output = run(command).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("200 wh_"));
    let delivery = relay.amqp.next(&queue, Duration::from_secs(10)).await.expect("published");
    let event: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(event["data"]["batch"]["id"], "batch_completed01");
}

#[tokio::test]
async fn send_with_a_malformed_secret_says_so_and_sends_nothing() {
    let relay = spawn_relay(Options::default().role("receiver")).await;
    let url = format!("{}/webhooks/openai", relay.url);
    let output = run(relay_cli(&["send", "--url", &url, "--secret", "whsec_not base64!"])).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unusable") && stderr.contains("nothing was sent"), "{stderr}");
    let metrics = relay.get("/metrics").await.text().await.unwrap();
    assert!(!metrics.contains("relay_deliveries_total{"), "no delivery reached the relay:\n{metrics}");
}

#[tokio::test]
async fn send_reports_a_refused_delivery_with_a_non_zero_exit() {
    let relay = spawn_relay(Options::default().role("receiver")).await;
    let url = format!("{}/webhooks/openai", relay.url);
    let wrong = format!("whsec_{}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [1u8; 32]));
    let output = run(relay_cli(&["send", "--url", &url, "--secret", &wrong])).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("401 "));
}

#[tokio::test]
async fn serve_refuses_a_setting_that_would_fail_every_delivery_with_exit_code_2() {
    let mut command = relay_cli(&["serve"]);
    command
        .env("OPENAI_WEBHOOK_SECRET", secret_text())
        .env("OPENAI_API_KEY", "sk-test")
        .env("RELAY_LISTEN", "127.0.0.1:0")
        .env("RELAY_MAX_IN_FLIGHT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    // Accepted by mistake, it would serve until stopped: give it 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the relay started with RELAY_MAX_IN_FLIGHT=0");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end(), "error: RELAY_MAX_IN_FLIGHT is unusable: must be at least 1");
}

#[tokio::test]
async fn tail_prints_events_as_they_arrive() {
    tokio::time::timeout(4 * WAIT, async {
        let relay = spawn_relay(Options::default()).await;
        let mut command = tokio::process::Command::from(relay_cli(&["tail", "--exchange", &relay.topology.exchange, "--binding", "response.*", "--count", "1", "--summary"]));
        command.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        // The temporary queue must be bound before the event is published: `tail` says
        // "following ..." once it is bound and consumed from.
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = Vec::new();
        let following = tokio::time::timeout(WAIT, async {
            while let Some(line) = stderr.next_line().await.unwrap() {
                said.push(line);
                if said.last().unwrap().starts_with("following ") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(following, Ok(true), "tail did not say it was following; stderr: {said:?}");
        let _keep = relay.bind("#").await; // the relay needs a route for other kinds meanwhile
        assert_eq!(relay.deliver(&crate::helpers::event("response.completed", "resp_completed01")).await.status(), 200);
        let output = tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("tail --count 1 exits after one event").unwrap();
        while let Ok(Some(line)) = stderr.next_line().await {
            said.push(line);
        }
        assert!(output.status.success(), "stderr: {said:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.starts_with("com.openai.response.completed resp_completed01 evt_"), "{stdout}");
    })
    .await
    .expect("the test finishes in time");
}

#[tokio::test]
async fn replay_dead_moves_dead_letters_back_after_the_cause_is_fixed() {
    let relay = spawn_relay(Options::default().arg("--fetch-max-attempts", 2)).await;
    let queue = relay.bind("#").await;
    relay.openai.always("resp_completed01", Scripted::status(401));
    let id = webhook_id();
    assert_eq!(relay.deliver_as(&id, &crate::helpers::event("response.completed", "resp_completed01")).await.status(), 200);
    let dead = relay.topology.dead();
    eventually(WAIT, "dead-lettered", async || (relay.amqp.count(&dead).await > 0).then_some(())).await;

    let dry = run(relay_cli(&["replay-dead", "--inbox-queue", &relay.topology.inbox, "--dry-run"])).await;
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(stdout.contains(&format!("would replay webhook-id={id} ")) && stdout.contains("status=401 attempts=2"), "{stdout}");
    assert!(stdout.contains("would move 1 of 1 dead letters"), "{stdout}");
    // The dry run took the dead letter without ack; it is back once its connection has gone.
    assert_eq!(relay.amqp.settled_count(&dead).await, 1, "a dry run moves nothing");

    relay.openai.clear("resp_completed01"); // the key is fixed
    let real = run(relay_cli(&["replay-dead", "--inbox-queue", &relay.topology.inbox])).await;
    assert!(real.status.success(), "{}", String::from_utf8_lossy(&real.stderr));
    assert!(String::from_utf8_lossy(&real.stdout).contains("moved 1 of 1 dead letters"));
    let delivery = relay.amqp.next(&queue, Duration::from_secs(10)).await.expect("published after replay");
    assert_eq!(id_of(&delivery), id);
    let event: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(event["data"]["response"]["id"], "resp_completed01");
    assert_eq!(relay.amqp.settled_count(&dead).await, 0);
    assert_eq!(relay.openai.requests("resp_completed01"), 3, "two failed attempts, one after the replay");
}

/// A dry run lists the dead letters and leaves them as they were: in the same order, and
/// not counted as delivered (each count brings a dead letter nearer a delivery limit, past
/// which RabbitMQ 4.0-4.2 would drop it).
#[tokio::test]
async fn replay_dead_dry_runs_count_no_delivery_and_keep_the_order() {
    use lapin::BasicProperties;
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable};
    use openai_webhook_relay::inbox::int_header;

    let (topology, _cleanup, amqp) = crate::helpers::declared_topology().await;
    let dead = topology.dead();
    let ids = [webhook_id(), webhook_id(), webhook_id()];
    for id in &ids {
        let mut headers = FieldTable::default();
        headers.insert("webhook-id".into(), AMQPValue::LongString(id.as_str().into()));
        headers.insert("x-relay-error-reason".into(), AMQPValue::LongString("400".into()));
        let properties = BasicProperties::default().with_delivery_mode(2).with_message_id(id.as_str().into()).with_headers(headers);
        let body = crate::helpers::event("response.completed", "resp_bad");
        amqp.channel.basic_publish("".into(), dead.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), properties).await.unwrap();
    }
    eventually(WAIT, "three dead letters", async || (amqp.count(&dead).await == 3).then_some(())).await;

    for run_number in 1..=3 {
        let dry = run(relay_cli(&["replay-dead", "--inbox-queue", &topology.inbox, "--dry-run"])).await;
        let stdout = String::from_utf8_lossy(&dry.stdout);
        assert!(dry.status.success(), "run {run_number}: {}", String::from_utf8_lossy(&dry.stderr));
        let listed: Vec<&str> = stdout.lines().filter_map(|line| line.strip_prefix("would replay webhook-id=")?.split(' ').next()).collect();
        assert_eq!(listed, ids, "run {run_number} lists each, in order:\n{stdout}");
        assert!(stdout.contains("would move 3 of 3 dead letters"), "run {run_number}:\n{stdout}");
    }

    let letters = amqp.take_all(&dead).await;
    assert_eq!(letters.iter().map(id_of).collect::<Vec<_>>(), ids, "same order");
    for letter in &letters {
        let count = int_header(&letter.properties, "x-delivery-count").unwrap_or(0);
        assert_eq!(count, 0, "{} counted as delivered {count} times", id_of(letter));
    }
}

#[tokio::test]
async fn request_with_wait_prints_the_replies_until_the_response_completes() {
    let relay = crate::gateway::spawn_gateway(Options::default()).await;
    let requests = relay.topology.requests.clone().unwrap();
    let output = run(relay_cli(&["request", "--request-queue", &requests, "--model", "gpt-test", "--input", "hi", "--wait", "--timeout-secs", "12"])).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["com.openai.response.queued", "com.openai.response.completed"]);
    assert_eq!(events[1]["data"]["output_text"], "echo: hi");
    assert_eq!(relay.openai.creates().len(), 1);

    let refused = run(relay_cli(&["request", "--request-queue", &requests, "--model", "unknown-model", "--wait", "--timeout-secs", "12"])).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stdout).contains("com.openai.request.failed"));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("ended with request.failed"), "{}", String::from_utf8_lossy(&refused.stderr));
    let missing = run(relay_cli(&["request", "--request-queue", "no-such-requests-queue", "--model", "gpt-test"])).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("did not take the request"), "{}", String::from_utf8_lossy(&missing.stderr));
}
