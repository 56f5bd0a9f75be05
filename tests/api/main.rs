//! Integration tests: the relay on port 0, the real RabbitMQ at `AMQP_URL` (default local),
//! and a fake OpenAI API serving `fixtures/openai/`. Each test gets its own exchange and
//! queues and deletes them when it ends, so tests run in parallel and leave nothing behind.
//! A test that cannot reach RabbitMQ fails and says so: `.ci/run` starts the broker.

#[path = "../support/cleanup.rs"]
mod cleanup;
#[path = "../support/deliveries.rs"]
mod deliveries;
#[path = "../support/services.rs"]
mod services;
use openai_webhook_relay::dev::fake_openai;
mod helpers;
mod receiver;

mod worker;
mod operations;
mod proxy;
mod cli;
mod hostile;
mod projects;
mod schema;
mod consumers;
mod durability;
mod migration;
mod gateway;
mod metadata;
mod calls;
mod traces;
