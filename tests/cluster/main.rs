//! Cluster suite: a private 3-node RabbitMQ cluster per test (`harness::Cluster`), beside
//! the shared broker and never joined to it.
//!
//! Each cluster is three Erlang VMs (about 150 MB each) booting on the machine's two cores,
//! so these tests live in their own test binary and take a lock to run one at a time.
//! Another test binary can use the harness through
//! `#[path = "../cluster/harness.rs"] mod cluster;`.

mod harness;

// The fault suite's relay process, OpenAI-like senders and per-id accounting.
#[allow(dead_code)]
#[path = "../faults/harness.rs"]
mod load;
use openai_webhook_relay::dev::fake_openai;
#[path = "../support/cleanup.rs"]
mod cleanup;
#[path = "../support/deliveries.rs"]
mod deliveries;
#[path = "../support/services.rs"]
mod services;

mod alarm;
mod dev;
mod failover;
mod smoke;
mod teardown;

/// One cluster at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
