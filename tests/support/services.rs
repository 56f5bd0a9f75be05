//! The services the tests need, RabbitMQ and (for the cross-replica dedup tests) Redis,
//! installed and started by `services.sh` when they do not answer: `cargo test` on a fresh
//! machine needs nothing set up first. A broker or Redis that already runs is only used; with
//! `AMQP_URL` set, the tests use that broker and start nothing.

use std::net::TcpStream;
use std::sync::OnceLock;
use std::time::Duration;

/// Once per test process, before its first connection.
pub fn ensure() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if std::env::var_os("AMQP_URL").is_some() || (answers("127.0.0.1:5672") && answers("127.0.0.1:6379")) {
            return;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/services.sh");
        let status = std::process::Command::new("bash").arg(script).status().expect("running tests/support/services.sh");
        assert!(status.success(), "tests/support/services.sh could not make RabbitMQ and Redis answer (its output is above)");
    });
}

fn answers(address: &str) -> bool {
    TcpStream::connect_timeout(&address.parse().expect("a socket address"), Duration::from_secs(1)).is_ok()
}
