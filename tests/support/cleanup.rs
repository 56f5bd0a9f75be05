//! Deleting what a test declared on the shared broker when the test ends, even when it
//! panicked, so tests leave nothing behind. Shared by the test binaries through `#[path]`.

// Each test binary uses a part of it.
#![allow(dead_code)]

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use openai_webhook_relay::topology::Topology;

pub struct Cleanup {
    queues: Vec<String>,
    exchange: Option<String>,
}

impl Cleanup {
    /// Every queue of `topology` and its exchange.
    pub fn topology(topology: &Topology) -> Self {
        Self { queues: topology.queues(), exchange: Some(topology.exchange.clone()) }
    }

    pub fn queue(name: &str) -> Self {
        Self { queues: vec![name.to_owned()], exchange: None }
    }

    pub fn and_queue(mut self, name: &str) -> Self {
        self.queues.push(name.to_owned());
        self
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (queues, exchange) = (std::mem::take(&mut self.queues), self.exchange.take());
        let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        // Drop cannot await; a thread with its own runtime can.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let Ok(connection) = Connection::connect(&url, ConnectionProperties::default()).await else { return };
                let Ok(channel) = connection.create_channel().await else { return };
                for queue in queues {
                    let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                }
                if let Some(exchange) = exchange {
                    let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
                }
                let _ = connection.close(200, "test done".into()).await;
            })
        })
        .join();
    }
}
