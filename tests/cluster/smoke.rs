//! The harness proves itself: a quorum queue of three replicas keeps every confirmed
//! message when its leader's node is killed with SIGKILL, and serves them again through a
//! surviving node once the other two elect a new leader.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use openai_webhook_relay::topology::table;

use crate::SERIAL;
use crate::harness::Cluster;
use crate::teardown::{TornDown, assert_torn_down};

const MESSAGES: u32 = 100;

#[tokio::test]
async fn a_quorum_queue_keeps_its_messages_when_its_leader_node_is_killed() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = Cluster::start().await;
    let start_time = started.elapsed();
    let rss: Vec<String> = (0..3).map(|i| format!("{:.0}", rss_mib(cluster.beam_pid(i).expect("a running node has a pid")))).collect();
    let urls = cluster.amqp_urls();
    let queue = format!("cluster-smoke-{:08x}", fastrand::u32(..));

    let declarer = connect(&urls[0]).await;
    let channel = declarer.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(queue.as_str().into(), durable, table([("x-queue-type", AMQPValue::LongString("quorum".into()))])).await.unwrap();

    let publisher = connect(&urls[1]).await;
    let channel = publisher.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut confirms = Vec::new();
    for n in 0..MESSAGES {
        let persistent = BasicProperties::default().with_delivery_mode(2);
        confirms.push(channel.basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), n.to_string().as_bytes(), persistent).await.unwrap());
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack(), "a publish was not confirmed");
    }
    // Closed before the kill, which may be of their node.
    for connection in [declarer, publisher] {
        connection.close(200, "published".into()).await.unwrap();
    }

    // Usually node 0, where the queue was declared: leaders are placed client-local.
    let leader = cluster.queue_leader(&queue).await.expect("a declared quorum queue has a leader");
    let survivor = (leader + 1) % 3;
    let killed_at = Instant::now();
    cluster.kill9(leader);
    println!("killed {} (node {leader}), the leader of {queue}", cluster.node_name(leader));

    // Both clocks run from the kill: the leader as `rabbitmqctl` reports it (each call takes
    // a good half second, so this is an upper bound), and the first message a client gets.
    let ((new_leader, elected_after), (first_get_after, read_all_after, read)) =
        tokio::join!(new_leader(&cluster, &queue, leader, killed_at), read_all(&urls[survivor], &queue, killed_at));
    assert_eq!(read, (0..MESSAGES).collect::<BTreeSet<_>>(), "every confirmed message, read through node {survivor}");

    let restarted_at = Instant::now();
    cluster.restart(leader).await;
    let restart_time = restarted_at.elapsed();
    assert_eq!(cluster.running_nodes(survivor).await.len(), 3);

    cluster.stop_app(survivor).await;
    assert!(!cluster.running_nodes(leader).await.contains(&cluster.node_name(survivor).to_owned()), "stop_app stops the node's rabbit application");
    cluster.start_app(survivor).await;
    assert_eq!(cluster.running_nodes(leader).await.len(), 3, "start_app brings it back");

    println!(
        "cluster smoke: start={:.1}s rss_mib=[{}] leader=node{leader} new_leader=node{new_leader} elected_after={:.2}s first_get_after={:.2}s read_{MESSAGES}_after={:.2}s restart={:.1}s",
        start_time.as_secs_f64(),
        rss.join(","),
        elected_after.as_secs_f64(),
        first_get_after.as_secs_f64(),
        read_all_after.as_secs_f64(),
        restart_time.as_secs_f64(),
    );

    let torn_down = TornDown::of(&cluster);
    let dropped_at = Instant::now();
    drop(cluster);
    println!("cluster smoke: teardown={:.2}s", dropped_at.elapsed().as_secs_f64());
    assert_torn_down(&torn_down, Duration::ZERO).await;
}

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default()).await.unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Until a node other than `old` holds the leader; the time since the kill.
async fn new_leader(cluster: &Cluster, queue: &str, old: usize, killed_at: Instant) -> (usize, Duration) {
    loop {
        if let Some(leader) = cluster.queue_leader(queue).await
            && leader != old
        {
            return (leader, killed_at.elapsed());
        }
        assert!(killed_at.elapsed() < Duration::from_secs(60), "{queue} has no new leader 60 s after the kill");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gets and acknowledges every message of `queue` through `url`, retrying while the queue
/// has no leader; the times of the first and the last message since the kill, and the
/// bodies read.
async fn read_all(url: &str, queue: &str, killed_at: Instant) -> (Duration, Duration, BTreeSet<u32>) {
    let (mut first, mut read) = (None, BTreeSet::new());
    let mut connection = connect(url).await;
    let mut channel = connection.create_channel().await.unwrap();
    while read.len() < MESSAGES as usize {
        assert!(killed_at.elapsed() < Duration::from_secs(60), "{} of {MESSAGES} messages read 60 s after the kill", read.len());
        match channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await {
            Ok(Some(message)) => {
                first.get_or_insert(killed_at.elapsed());
                let body: u32 = std::str::from_utf8(&message.data).unwrap().parse().unwrap();
                assert!(read.insert(body), "message {body} read twice");
                message.acker.ack(BasicAckOptions::default()).await.unwrap();
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            // While the queue has no leader, a get fails with a connection error
            // (INTERNAL_ERROR, "nodedown"): the broker closes the whole connection.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                connection = connect(url).await;
                channel = connection.create_channel().await.unwrap();
            }
        }
    }
    let last = killed_at.elapsed();
    assert!(channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await.unwrap().is_none(), "more than {MESSAGES} messages");
    connection.close(200, "read".into()).await.unwrap();
    (first.unwrap(), last, read)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap();
    kib / 1024.0
}
