//! The consumers the documentation tells users to copy, run against a real relay: the Rust
//! example (`examples/consumer.rs`) and the Python snippet of README.md ("Consuming in
//! Python (pika)"), taken from README.md as it is. Each gets a batch event it must not see,
//! a response event twice (as a redelivery would bring it: it must handle it once), and a
//! second response event, after which it stops by itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::helpers::{Options, amqp_url, spawn_relay};

const WAIT: Duration = Duration::from_secs(30);

const COMPLETED_ID: &str = "evt_68af1c63a1b08190a3c5e7f9b2d4f6a8";
const COMPLETED_TEXT: &str = "Saturday in Lisbon looks dry: sunny, 28 °C, with a 5% chance of rain. You can leave the umbrella at home, but pack sunscreen.";
const FAILED_ID: &str = "evt_68af1ca6c2d481909e1f3a5b7c9d1e2f";

#[tokio::test]
async fn the_rust_example_consumer_handles_each_response_event_once() {
    let mut command = Command::new(example_binary("consumer").await);
    command.arg("2");
    let run = run_scenario(command, 1).await;
    let short: String = COMPLETED_TEXT.chars().take(60).collect();
    assert_eq!(
        run.stdout,
        [
            format!("waiting for response.* events on {} via queue {}", run.exchange, run.queue),
            format!("com.openai.response.completed resp_completed01 {COMPLETED_ID} status=completed output_text={short}"),
            format!("duplicate {COMPLETED_ID} skipped"),
            format!("com.openai.response.failed resp_failed01 {FAILED_ID} status=failed output_text=(no text)"),
        ],
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn the_readme_python_consumer_handles_each_response_event_once() {
    let python = python_with_pika().await;
    let mut command = Command::new(python);
    command.arg("-c").arg(readme_python_snippet()).env("MAX_EVENTS", "2").env("PYTHONUNBUFFERED", "1").env("PYTHONIOENCODING", "utf-8");
    let run = run_scenario(command, 0).await;
    assert_eq!(
        run.stdout,
        [
            format!("com.openai.response.completed resp_completed01 {COMPLETED_TEXT}"),
            format!("duplicate {COMPLETED_ID} skipped"),
            "com.openai.response.failed resp_failed01 None".to_owned(),
        ],
        "{}",
        run.stderr
    );
}

/// What a consumer printed, and where it consumed from.
struct Run {
    stdout: Vec<String>,
    stderr: String,
    exchange: String,
    queue: String,
}

/// Runs `command` as a consumer of a fresh relay's exchange with its own durable queue (given
/// in `CONSUMER_QUEUE`, deleted afterwards), feeds it the scenario, and waits for it to exit
/// by itself. `startup_lines`: how many lines it prints before the first event.
async fn run_scenario(mut command: Command, startup_lines: usize) -> Run {
    let relay = spawn_relay(Options::default()).await;
    // The test's own view of everything published; it also makes batch events routable.
    let watch = relay.bind("#").await;
    let queue = format!("test.consumer.{:016x}", fastrand::u64(..));
    let _delete = crate::helpers::Cleanup::queue(&queue);
    command
        .env("AMQP_URL", amqp_url())
        .env("RELAY_EXCHANGE", &relay.topology.exchange)
        .env("CONSUMER_QUEUE", &queue)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut consumer = Consumer::spawn(command);
    consumer.wait_until_consuming(&queue).await;

    // A batch event: published (the test's queue sees it), but not for this consumer.
    assert_eq!(relay.deliver(&fixture("webhooks/batch.completed.json")).await.status(), 200);
    let batch = relay.amqp.next(&watch, WAIT).await.expect("batch event published");
    assert_eq!(batch.routing_key.as_str(), "batch.completed");

    // A response event, then the very same message again, as a redelivery would bring it.
    assert_eq!(relay.deliver(&fixture("webhooks/response.completed.json")).await.status(), 200);
    let completed = relay.amqp.next(&watch, WAIT).await.expect("response event published");
    assert_eq!(completed.routing_key.as_str(), "response.completed");
    relay
        .amqp
        .channel
        .basic_publish(relay.topology.exchange.as_str().into(), "response.completed".into(), BasicPublishOptions::default(), &completed.data, completed.properties.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    consumer.wait_for_lines(startup_lines + 2).await;

    // A second response event: the consumer's second distinct event, after which it stops.
    assert_eq!(relay.deliver(&fixture("webhooks/response.failed.json")).await.status(), 200);
    let status = tokio::time::timeout(WAIT, consumer.child.wait()).await;
    let (stdout, stderr) = consumer.output().await;
    let status = status.unwrap_or_else(|_| panic!("consumer still running after {WAIT:?}\nstdout:\n{}\nstderr:\n{stderr}", stdout.join("\n"))).unwrap();
    assert!(status.success(), "consumer exited with {status}\nstdout:\n{}\nstderr:\n{stderr}", stdout.join("\n"));

    // Everything it received was acked, and nothing else is waiting for it: with the consumer
    // gone, what it held unacked is back in its queue.
    assert!(declare_passive(&queue).await.is_some(), "the consumer's queue is durable and still there");
    let left: Vec<String> = relay.amqp.take_all(&queue).await.iter().map(crate::helpers::id_of).collect();
    assert_eq!(left, Vec::<String>::new(), "left in the consumer's queue, unacked or never taken");
    Run { stdout, stderr, exchange: relay.topology.exchange.clone(), queue }
}

fn fixture(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A running consumer process whose output lines are collected as they come.
struct Consumer {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Consumer {
    fn spawn(mut command: Command) -> Self {
        let program = format!("{:?}", command.as_std().get_program());
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let readers = vec![collect(child.stdout.take().unwrap(), Arc::clone(&stdout)), collect(child.stderr.take().unwrap(), Arc::clone(&stderr))];
        Self { child, stdout, stderr, readers }
    }

    fn report(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout.lock().unwrap().join("\n"), self.stderr.lock().unwrap().join("\n"))
    }

    /// `report`, once the output of the exited process has been read to its end.
    async fn report_when_closed(&mut self) -> String {
        self.output().await;
        self.report()
    }

    /// Waits until `queue` exists and has a consumer: the consumer has declared, bound and
    /// subscribed (the binding comes before the subscription in both consumers).
    async fn wait_until_consuming(&mut self, queue: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if declare_passive(queue).await.is_some_and(|q| q.consumer_count() > 0) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("consumer exited with {status} before consuming from {queue}\n{}", self.report_when_closed().await);
            }
            assert!(Instant::now() < deadline, "consumer never started consuming from {queue}\n{}", self.report());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_lines(&mut self, count: usize) {
        let deadline = Instant::now() + WAIT;
        while self.stdout.lock().unwrap().len() < count {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("consumer exited with {status} before printing {count} lines\n{}", self.report_when_closed().await);
            }
            assert!(Instant::now() < deadline, "consumer printed fewer than {count} lines\n{}", self.report());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything printed, once the process has closed its output.
    async fn output(&mut self) -> (Vec<String>, String) {
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        (self.stdout.lock().unwrap().clone(), self.stderr.lock().unwrap().join("\n"))
    }
}

fn collect(stream: impl AsyncRead + Unpin + Send + 'static, lines: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            lines.lock().unwrap().push(line);
        }
    })
}

/// The queue's counts, or `None` when it does not exist (a passive declare, on a channel of
/// its own because a failed one closes the channel).
async fn declare_passive(queue: &str) -> Option<lapin::Queue> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await.expect("RabbitMQ reachable");
    let channel = connection.create_channel().await.unwrap();
    let declared = channel.queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await.ok();
    let _ = connection.close(200, "checked".into()).await;
    declared
}


/// `target/<profile>/`, from this test executable's path (`target/<profile>/deps/api-...`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("the test executable is in target/<profile>/deps");
    deps.parent().expect("target/<profile>").to_path_buf()
}

/// The built example `name` (`target/<profile>/examples/<name>`). `cargo test` builds the
/// examples; when this test runs under cargo (`cargo test --test api` builds none), it asks
/// cargo to build the example too, which does nothing when it is up to date.
async fn example_binary(name: &str) -> PathBuf {
    let profile_dir = profile_dir();
    let binary = profile_dir.join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if let Ok(cargo) = std::env::var("CARGO") {
        let target_dir = profile_dir.parent().expect("target directory");
        let mut build = Command::new(cargo);
        build
            .args(["build", "--quiet", "--example", name, "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        // What cargo sets for this test, not for a build: a build script that watches one of
        // these (ring's) would otherwise be rerun here, and again by the next `cargo test`.
        for (variable, _) in std::env::vars_os() {
            let set_for_this_test = variable.to_str().is_some_and(|name| {
                name.starts_with("CARGO_PKG_")
                    || name.starts_with("CARGO_BIN_EXE_")
                    || matches!(name, "CARGO_MANIFEST_DIR" | "CARGO_MANIFEST_PATH" | "CARGO_CRATE_NAME" | "CARGO_TARGET_TMPDIR" | "CARGO_PRIMARY_PACKAGE")
            });
            if set_for_this_test {
                build.env_remove(variable);
            }
        }
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                build.arg("--release");
            }
            Some(profile) => {
                build.args(["--profile", profile]);
            }
            None => {}
        }
        let out = build.output().await.expect("cargo runs");
        assert!(out.status.success(), "cargo build --example {name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        binary.is_file(),
        "the example binary {} is missing: build it with `cargo build --example {name}` (plain `cargo test` builds it too)",
        binary.display()
    );
    binary
}

/// The ```python block under "### Consuming in Python (pika)" in README.md, as it is there.
fn readme_python_snippet() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README.md");
    let section = readme.split_once("### Consuming in Python (pika)").expect("README.md has a section \"Consuming in Python (pika)\"").1;
    let block = section.split_once("```python\n").expect("the section has a ```python block").1;
    let code = block.split_once("\n```").expect("the ```python block is closed").0;
    code.to_owned() + "\n"
}

/// A Python that can `import pika`: `python3` of a virtualenv in the target directory,
/// created and given pika from PyPI when needed. Fails (not skips) when that is impossible:
/// this consumer is part of the documentation and must run.
pub async fn python_with_pika() -> PathBuf {
    let venv = profile_dir().parent().expect("target directory").join("pyenv");
    let python = venv.join("bin").join("python");
    if imports_pika(&python).await {
        return python;
    }
    let created = Command::new("python3").arg("-m").arg("venv").arg(&venv).output().await;
    match created {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("`python3 -m venv {}` failed (on Debian: apt-get install python3-venv):\n{}", venv.display(), String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("python3 is needed to run README.md's consumer: {e}"),
    }
    let installed = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "pika"])
        .output()
        .await
        .expect("the virtualenv's python runs");
    assert!(installed.status.success(), "`pip install pika` into {} failed (is PyPI reachable?):\n{}", venv.display(), String::from_utf8_lossy(&installed.stderr));
    assert!(imports_pika(&python).await, "pika installed into {} but cannot be imported", venv.display());
    python
}

async fn imports_pika(python: &Path) -> bool {
    python.is_file() && Command::new(python).args(["-c", "import pika"]).output().await.is_ok_and(|out| out.status.success())
}
