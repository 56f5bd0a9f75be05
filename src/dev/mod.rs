//! `openai-webhook-relay dev`: the whole loop on one machine, offline, in one command.
//!
//! It takes `serve`'s flags and fills in what a newcomer lacks: a broker (a private node,
//! when nothing answers at `AMQP_URL`), a webhook secret (generated), and an OpenAI API
//! (the built-in fake, unless `OPENAI_API_KEY` is set). Then it runs both roles and prints
//! the commands that drive it. `serve` itself never does any of this: in production a
//! missing broker or secret is an error, not something to paper over.

pub mod fake_openai;
pub mod rabbitmq;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use lapin::{Connection, ConnectionProperties};

use crate::broker::nodes::{self, Nodes};
use crate::config::{LogFormat, Role, ServeArgs};
use crate::verify::Secret;
use crate::{App, shutdown, telemetry};
use fake_openai::FakeOpenAi;
use rabbitmq::LocalCluster;

/// How long a broker at `AMQP_URL` has to answer before a private node is started instead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(mut args: ServeArgs) -> anyhow::Result<()> {
    // Human-readable logs in a terminal, unless a format was asked for.
    let format_chosen = std::env::var_os("RELAY_LOG_FORMAT").is_some() || std::env::args().any(|a| a.starts_with("--log-format"));
    // Each delivery's "stored in the inbox" and "event published" too (debug in production),
    // to watch the loop work.
    let _telemetry = telemetry::init(if format_chosen { args.log_format } else { LogFormat::Pretty }, "info,openai_webhook_relay::http::receive=debug,openai_webhook_relay::worker=debug");
    let exe = executable();
    println!("openai-webhook-relay dev: the whole loop on this machine; Ctrl-C stops everything");

    // Dropped last: the relay closes its connection before the node goes away.
    let private_broker = if let Some(node) = broker_answers(&args.amqp_url).await {
        println!("  RabbitMQ  {node} (answers at AMQP_URL)");
        None
    } else {
        println!("  RabbitMQ  nothing answers at AMQP_URL; starting a private node (takes about 10 s)...");
        let node = LocalCluster::start(1).await.context("no broker at AMQP_URL, and a private RabbitMQ node could not be started")?;
        args.amqp_url = node.amqp_urls().remove(0);
        println!("  RabbitMQ  private node {} at {}; its data in {}, removed on exit", node.node_name(0), args.amqp_url, node.dir().display());
        Some(node)
    };

    let secret = match args.webhook_secret.as_deref() {
        Some(given) => {
            println!("  secret    from OPENAI_WEBHOOK_SECRET");
            Secret::list_entries(given).next().unwrap_or_default().to_owned()
        }
        None => {
            let generated = generate_secret()?;
            println!("  secret    {generated} (generated; set OPENAI_WEBHOOK_SECRET to choose one)");
            args.webhook_secret = Some(generated.clone());
            generated
        }
    };

    let fake = if args.api_key.is_none() {
        let fake = FakeOpenAi::start().await.context("cannot start the built-in fake OpenAI API")?;
        println!("  OpenAI    built-in fake API at {} (set OPENAI_API_KEY to use a real one)", fake.base_url);
        args.openai_base_url = fake.base_url.clone();
        args.api_key = Some(fake_openai::API_KEY.to_owned());
        Some(fake)
    } else {
        println!("  OpenAI    {} with OPENAI_API_KEY", args.openai_base_url);
        None
    };

    args.role = Role::All;
    let app = App::build(args.clone().validate()?).await?;
    let base = format!("http://{}", reachable(app.local_addr()));
    if let Some(fake) = &fake {
        // The fake finishes responses created through the gateway and, like OpenAI, sends
        // their webhooks to the relay.
        fake.send_webhooks_to(&base, Secret::parse(&secret).context("OPENAI_WEBHOOK_SECRET")?);
    }
    let banner = async {
        await_ready(&base).await;
        print_commands(&exe, &base, &secret, &args);
    };
    let running = app.run_until(shutdown::signal());
    tokio::pin!(running);
    let result = tokio::select! {
        result = &mut running => result,
        () = banner => running.await,
    };
    drop(private_broker);
    result
}

/// The node of `AMQP_URL` that answers (`host:port`, never the credentials), if one does.
/// An unusable `AMQP_URL` answers nowhere: `dev` then brings its own broker.
async fn broker_answers(amqp_url: &str) -> Option<String> {
    let nodes = Nodes::parse(amqp_url).ok()?;
    let uri = nodes.get(0);
    let properties = ConnectionProperties::default().with_connection_name("openai-webhook-relay-dev-probe".into());
    let connection = tokio::time::timeout(PROBE_TIMEOUT, Connection::connect_uri(uri.clone(), properties)).await.ok()?.ok()?;
    let _ = connection.close(200, "probe".into()).await;
    Some(nodes::node(uri))
}

/// Until `/readyz` answers 200 (broker connected, topology declared), for a minute at most:
/// the commands printed after it work at once.
async fn await_ready(base: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("  the relay is not ready after 60 s; see its log above");
}

fn print_commands(exe: &str, base: &str, secret: &str, args: &ServeArgs) {
    let broker = format!("--amqp-url '{}' --exchange '{}'", args.amqp_url, args.exchange);
    println!("ready: the relay listens at {base}/webhooks/openai and runs both roles.");
    println!();
    println!("Follow the events coming out (in another terminal):");
    println!("    {exe} tail {broker}");
    println!("Send a signed delivery, as OpenAI would; the relay fetches the response and publishes it:");
    println!("    {exe} send --url '{base}/webhooks/openai' --secret '{secret}' --type response.completed --object-id resp_completed01");
    if !args.request_queue.is_empty() {
        println!("Ask for a background response through RabbitMQ and wait for its result:");
        println!(
            "    {exe} request --amqp-url '{}' --request-queue '{}' --model gpt-4.1-mini --input 'Say hello' --wait",
            args.amqp_url, args.request_queue
        );
    }
}

/// How to call this binary from where the user stands: relative to the working directory
/// when it is below it (`target/release/openai-webhook-relay`), else its full path.
fn executable() -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("openai-webhook-relay"));
    let relative = std::env::current_dir().ok().and_then(|cwd| exe.strip_prefix(cwd).ok().map(PathBuf::from));
    relative.unwrap_or(exe).display().to_string()
}

/// The address to connect to: a wildcard listen address is reached through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port()),
        SocketAddr::V6(a) if a.ip().is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port()),
        other => other,
    }
}

/// 32 bytes from the kernel's CSPRNG, as OpenAI's dashboard makes them: the secret may end
/// up guarding a tunnel to this machine.
fn generate_secret() -> anyhow::Result<String> {
    use std::io::Read;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key)).context("reading /dev/urandom")?;
    Ok(format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key)))
}
