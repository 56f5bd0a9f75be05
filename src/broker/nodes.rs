//! `AMQP_URL` as a list of broker nodes: one URL, or a comma-separated list for a RabbitMQ
//! cluster (same vhost and credentials on every node).
//!
//! lapin takes one URL and its parser silently misreads `h1,h2`, so the list is split and
//! each URL checked here. Each process shuffles the list once, as RabbitMQ's Java and .NET
//! clients do with an address list, so that replicas spread over the nodes; the supervisor
//! then walks it in order, moving on to the next node whenever one fails or drops.

use lapin::uri::{AMQPScheme, AMQPUri};

/// Heartbeat asked for when a URL names none: a dead or hung peer is noticed within about
/// two of them (lapin closes the connection after missing the broker's heartbeats).
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// The broker nodes, in the order this process tries them.
#[derive(Clone)]
pub struct Nodes(Vec<AMQPUri>);

impl Nodes {
    /// Parses `AMQP_URL`; the error says which entry is wrong and why, never a password.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut uris = Vec::new();
        for (i, entry) in text.split(',').map(str::trim).enumerate() {
            let which = format!("entry {} of {}", i + 1, text.split(',').count());
            if entry.is_empty() {
                return Err(format!("{which} is empty"));
            }
            let lower = entry.to_ascii_lowercase();
            if !lower.starts_with("amqp://") && !lower.starts_with("amqps://") {
                return Err(format!("{which} does not start with amqp:// or amqps://"));
            }
            let mut uri: AMQPUri = entry.parse().map_err(|e| format!("{which}: {e}"))?;
            if uri.authority.host.is_empty() {
                return Err(format!("{which} names no host"));
            }
            uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
            if let Some(first) = uris.first() {
                let first: &AMQPUri = first;
                if uri.vhost != first.vhost || uri.authority.userinfo != first.authority.userinfo {
                    return Err(format!("{which} ({}) has another vhost or other credentials than entry 1: every node of a cluster is reached the same way", node(&uri)));
                }
            }
            uris.push(uri);
        }
        Ok(Self(uris))
    }

    /// The same nodes in a random order, drawn once per process.
    pub fn shuffled(mut self) -> Self {
        fastrand::shuffle(&mut self.0);
        self
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `i`-th node to try, wrapping around.
    pub fn get(&self, i: usize) -> &AMQPUri {
        &self.0[i % self.0.len()]
    }
}

/// `host:port` of a node, for logs and metrics: never the credentials.
pub fn node(uri: &AMQPUri) -> String {
    let scheme = match uri.scheme {
        AMQPScheme::AMQP => "",
        AMQPScheme::AMQPS => "amqps://",
    };
    format!("{scheme}{}:{}", uri.authority.host, uri.authority.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_one_node_with_a_heartbeat() {
        let nodes = Nodes::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(node(nodes.get(0)), "127.0.0.1:5672");
        assert_eq!(nodes.get(0).query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        let own = Nodes::parse("amqp://h/%2f?heartbeat=30").unwrap();
        assert_eq!(own.get(0).query.heartbeat, Some(30));
    }

    #[test]
    fn a_list_is_every_node_in_a_shuffled_order() {
        let text = "amqp://u:p@h1:5672/v, amqp://u:p@h2:5673/v,amqps://u:p@h3/v";
        let nodes = Nodes::parse(text).unwrap().shuffled();
        let mut names: Vec<String> = (0..nodes.len()).map(|i| node(nodes.get(i))).collect();
        names.sort();
        assert_eq!(names, ["amqps://h3:5671", "h1:5672", "h2:5673"]);
        assert_eq!(node(nodes.get(3)), node(nodes.get(0)), "the list wraps around");
    }

    #[test]
    fn a_malformed_entry_is_named_without_its_password() {
        let cases = [
            ("amqp://u:secret@h1/v,", "entry 2 of 2 is empty"),
            ("amqp://u:secret@h1/v,h2:5672", "entry 2 of 2 does not start with amqp:// or amqps://"),
            ("amqp://u:secret@h1/v,amqp://u:secret@h2:notaport/v", "entry 2 of 2"),
            ("amqp://u:secret@h1/v,amqp://u:other@h2/v", "entry 2 of 2 (h2:5672) has another vhost or other credentials"),
            ("amqp://u:secret@h1/v,amqp://u:secret@h2/w", "another vhost"),
            ("http://u:secret@h1/v", "entry 1 of 1 does not start with amqp://"),
        ];
        for (text, expected) in cases {
            let error = Nodes::parse(text).err().unwrap_or_else(|| panic!("{text} accepted"));
            assert!(error.contains(expected), "{text}: {error}");
            assert!(!error.contains("secret") && !error.contains("other@"), "{text}: {error}");
        }
    }
}
