//! Fault suite: the real binary as a child process, the real broker, a fake OpenAI API with
//! injected faults, and senders that retry like OpenAI until they get a 2xx. Each test
//! prints a figure line `<name>: sent=… acked=… published=… dead=… lost=… duplicates=…`
//! and fails if an acknowledged event is lost.
//!
//! These tests disturb the broker for everyone (closing all its connections, policies), so
//! they live in their own test binary (cargo runs test binaries one after another) and
//! take a lock so that they also run one at a time.

// Shared with tests/api, which uses more of it than these tests do.
use openai_webhook_relay::dev::fake_openai;
#[path = "../api/proxy.rs"]
mod proxy;

#[path = "../support/cleanup.rs"]
mod cleanup;
#[path = "../support/deliveries.rs"]
mod deliveries;
#[path = "../support/services.rs"]
mod services;
mod harness;

mod api_faults;
mod broker_faults;
mod crash;
mod gateway_crash;
mod restart;
