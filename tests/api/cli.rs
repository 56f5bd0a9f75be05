//! The operator subcommands, run as the real binary against a relay.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::fake_openai::Scripted;
use crate::helpers::{Options, amqp_url, secret_text, spawn_relay};

fn relay_cli(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_openai-webhook-relay"));
    command.args(args).env("AMQP_URL", amqp_url()).env_remove("OPENAI_WEBHOOK_SECRET").stdin(Stdio::null());
    command
}

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
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
    let relay = spawn_relay(Options::default()).await;
    let mut command = relay_cli(&["tail", "--exchange", &relay.topology.exchange, "--binding", "response.*", "--count", "1", "--summary"]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    // The temporary queue must be bound before the event is published.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _keep = relay.bind("#").await; // the relay needs a route for other kinds meanwhile
    assert_eq!(relay.deliver(&crate::helpers::event("response.completed", "resp_completed01")).await.status(), 200);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("com.openai.response.completed resp_completed01 evt_"), "{stdout}");
}

#[tokio::test]
async fn replay_dead_moves_dead_letters_back_after_the_cause_is_fixed() {
    let relay = spawn_relay(Options::default().arg("--fetch-max-attempts", 2)).await;
    let queue = relay.bind("#").await;
    relay.openai.always("resp_completed01", Scripted::status(401));
    assert_eq!(relay.deliver(&crate::helpers::event("response.completed", "resp_completed01")).await.status(), 200);
    let dead = relay.topology.dead();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while relay.amqp.count(&dead).await == 0 {
        assert!(std::time::Instant::now() < deadline, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let dry = run(relay_cli(&["replay-dead", "--inbox-queue", &relay.topology.inbox, "--dry-run"])).await;
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(stdout.contains("would replay webhook-id=wh_") && stdout.contains("status=401 attempts=2"), "{stdout}");
    assert!(stdout.contains("would move 1 of 1 dead letters"), "{stdout}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(relay.amqp.count(&dead).await, 1, "a dry run moves nothing");

    relay.openai.clear("resp_completed01"); // the key is fixed
    let real = run(relay_cli(&["replay-dead", "--inbox-queue", &relay.topology.inbox])).await;
    assert!(real.status.success(), "{}", String::from_utf8_lossy(&real.stderr));
    assert!(String::from_utf8_lossy(&real.stdout).contains("moved 1 of 1 dead letters"));
    let delivery = relay.amqp.next(&queue, Duration::from_secs(10)).await.expect("published after replay");
    let event: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(event["data"]["response"]["id"], "resp_completed01");
    assert_eq!(relay.amqp.count(&dead).await, 0);
    assert_eq!(relay.openai.requests("resp_completed01"), 3, "two failed attempts, one after the replay");
}
