//! A private 3-node RabbitMQ cluster per test: the library's [`LocalCluster`] (the same
//! nodes `openai-webhook-relay dev` starts), with what only tests ask of it. Failures panic
//! with the broker's own message.
//!
//! Nodes are numbered 0, 1, 2 everywhere: in node names, in `amqp_urls()`, in arguments.

use std::ops::{Deref, DerefMut};

use openai_webhook_relay::dev::rabbitmq::LocalCluster;

pub struct Cluster(LocalCluster);

impl Deref for Cluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.0
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.0
    }
}

impl Cluster {
    /// Three nodes running and clustered, each answering AMQP on its own port.
    pub async fn start() -> Self {
        // The package's scripts are what the nodes run; installed on a fresh machine.
        crate::services::ensure();
        Self(LocalCluster::start(3).await.unwrap_or_else(|e| panic!("{e:#}")))
    }

    pub fn kill9(&mut self, i: usize) {
        self.0.kill9(i).unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub async fn restart(&mut self, i: usize) {
        self.0.restart(i).await.unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub async fn stop_app(&self, i: usize) {
        self.ctl(i, &["stop_app"]).await;
    }

    pub async fn start_app(&self, i: usize) {
        self.ctl(i, &["start_app"]).await;
    }

    /// `rabbitmqctl -n <node i> <args>`; its stdout.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> String {
        self.0.ctl(i, args).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn running_nodes(&self, via: usize) -> Vec<String> {
        self.0.running_nodes(via).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Which node holds the leader of quorum queue `queue` (on vhost `/`), asked of the
    /// first node that answers. `None` while it has none, as between a leader's death and
    /// the election of the next.
    pub async fn queue_leader(&self, queue: &str) -> Option<usize> {
        for i in (0..3).filter(|&i| self.beam_pid(i).is_some()) {
            let Ok(out) = self.0.ctl(i, &["list_queues", "name", "leader", "--formatter", "json"]).await else { continue };
            let Ok(serde_json::Value::Array(queues)) = serde_json::from_str(&out) else { continue };
            let leader = queues.iter().find(|q| q["name"] == queue)?["leader"].as_str()?.to_owned();
            return (0..3).position(|n| self.node_name(n) == leader);
        }
        None
    }
}
