//! `openai-webhook-relay dev`: where no broker answers at `AMQP_URL` it brings its own node,
//! where one answers it uses that one; either way the commands it prints drive the loop, and
//! a stop signal (SIGINT as from Ctrl-C, SIGTERM as from a service manager) leaves nothing
//! running.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use openai_webhook_relay::topology::Topology;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::SERIAL;
use crate::cleanup::Cleanup;
use crate::teardown::{TornDown, assert_torn_down};

#[tokio::test]
async fn dev_brings_its_own_broker_and_stops_it_on_sigint() {
    dev_on_its_own_broker("INT").await;
}

#[tokio::test]
async fn dev_brings_its_own_broker_and_stops_it_on_sigterm() {
    dev_on_its_own_broker("TERM").await;
}

async fn dev_on_its_own_broker(signal: &str) {
    let _serial = SERIAL.lock().await;
    crate::services::ensure();
    let mut dev = spawn_dev(&format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port()), &[]);
    let mut banner = BufReader::new(dev.stdout.take().unwrap()).lines();
    let node = line_with(&mut banner, "private node relay-").await;
    let (port, dir) = private_node(&node);
    let pid = std::fs::read_to_string(dir.join("node-0/pid")).expect("the private node's pid file").trim().parse().unwrap();
    let torn_down = TornDown { dir, ports: vec![port], pids: vec![pid] };
    drive(&mut banner).await;
    stop(&mut dev, signal).await;
    assert_torn_down(&torn_down, Duration::from_secs(20)).await;
    let id = torn_down.dir.file_name().unwrap().to_string_lossy().trim_start_matches("relay-rabbitmq-").to_owned();
    assert_eq!(marked_processes(&id), Vec::<u32>::new(), "processes of the private node survive");
}

#[tokio::test]
async fn dev_uses_a_broker_that_answers() {
    let amqp_url = crate::load::amqp_url();
    let names = format!("dev-{:08x}", fastrand::u32(..));
    let topology = Topology { exchange: format!("{names}.events"), inbox: format!("{names}.inbox"), requests: Some(format!("{names}.requests")) };
    let _cleanup = Cleanup::topology(&topology);
    let env = [("RELAY_EXCHANGE", topology.exchange.as_str()), ("RELAY_INBOX_QUEUE", &topology.inbox), ("RELAY_REQUEST_QUEUE", topology.requests.as_deref().unwrap())];
    let mut dev = spawn_dev(&amqp_url, &env);
    let mut banner = BufReader::new(dev.stdout.take().unwrap()).lines();
    let broker = line_with(&mut banner, "RabbitMQ").await;
    assert!(broker.ends_with("(answers at AMQP_URL)") && !broker.contains("guest:guest"), "dev names the broker it uses, password hidden: {broker}");
    drive(&mut banner).await;
    stop(&mut dev, "TERM").await;
}

/// `dev` as a newcomer runs it: none of the relay's settings but `AMQP_URL` and `env`.
fn spawn_dev(amqp_url: &str, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_openai-webhook-relay"))
        .args(["dev", "--listen", "127.0.0.1:0"])
        .env("AMQP_URL", amqp_url)
        .env_remove("OPENAI_WEBHOOK_SECRET")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Runs the printed `tail` and `send` commands: the delivery comes out as a CloudEvent
/// carrying the fake API's object.
async fn drive(banner: &mut Lines<BufReader<ChildStdout>>) {
    let tail = line_with(banner, " tail ").await;
    let send = line_with(banner, " send ").await;
    let mut tail = shell(&format!("{tail} --count 1"));
    let mut tail_log = BufReader::new(tail.stderr.take().unwrap()).lines();
    // Bound once it says so: an event published before would not reach its queue.
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = tail_log.next_line().await.unwrap() {
            if line.starts_with("following") {
                return;
            }
        }
        panic!("tail ended before following the exchange");
    })
    .await
    .expect("tail follows the exchange");
    let sent = shell(&send).wait_with_output().await.unwrap();
    assert!(sent.status.success(), "the printed send command fails: {}", String::from_utf8_lossy(&sent.stderr));
    let tailed = tokio::time::timeout(Duration::from_secs(30), tail.wait_with_output()).await.expect("an event comes out").unwrap();
    let event: Value = serde_json::from_slice(&tailed.stdout).unwrap_or_else(|e| panic!("tail printed no CloudEvent ({e}): {}", String::from_utf8_lossy(&tailed.stdout)));
    assert_eq!(event["type"], "com.openai.response.completed");
    let fixture: Value = serde_json::from_str(include_str!("../../fixtures/openai/responses/resp_completed01.json")).unwrap();
    let data = event["data"].as_object().expect("the CloudEvent has data");
    assert!(data.values().any(|v| *v == fixture), "the event does not carry the fake API's object: {event}");
}

async fn stop(dev: &mut Child, signal: &str) {
    let killed = Command::new("kill").arg(format!("-{signal}")).arg(dev.id().unwrap().to_string()).status().await.unwrap();
    assert!(killed.success());
    let stopped_at = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait()).await.expect("dev stops on the signal").unwrap();
    assert!(status.success(), "dev exits cleanly on SIG{signal}: {status}");
    println!("dev: SIG{signal} to exit in {:.2} s", stopped_at.elapsed().as_secs_f64());
}

/// The next banner line holding `needle`, trimmed.
async fn line_with(banner: &mut Lines<BufReader<ChildStdout>>, needle: &str) -> String {
    let found = tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(line) = banner.next_line().await.unwrap() {
            if line.contains(needle) {
                return line.trim().to_owned();
            }
        }
        panic!("dev ended without printing a line with {needle:?}");
    });
    found.await.unwrap_or_else(|_| panic!("dev printed no line with {needle:?} in 180 s"))
}

/// The AMQP port and data directory from `RabbitMQ  private node <name> at <url>; its data in <dir>, removed on exit`.
fn private_node(line: &str) -> (u16, PathBuf) {
    let url = line.split(" at ").nth(1).and_then(|rest| rest.split(';').next()).unwrap();
    let port = url.rsplit(':').next().unwrap().split('/').next().unwrap().parse().unwrap();
    let dir = line.split("its data in ").nth(1).unwrap().split(", removed").next().unwrap();
    (port, PathBuf::from(dir))
}

/// Runs a printed command line as a user pasting it would.
fn shell(line: &str) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A port where nothing listens.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Live processes that carry the private node's marker (see `dev::rabbitmq`).
fn marked_processes(id: &str) -> Vec<u32> {
    let marker = format!("RELAY_CLUSTER_MEMBER={id}/");
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var.starts_with(marker.as_bytes())))
        })
        .collect()
}
