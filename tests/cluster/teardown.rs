//! Nodes must not outlive the test process: not when a test ends, not when it panics (both
//! drop the `Cluster`), and not when the process is killed without unwinding.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::SERIAL;
use crate::harness::Cluster;

/// What must be gone once a cluster is torn down.
pub struct TornDown {
    pub dir: PathBuf,
    pub ports: Vec<u16>,
    pub pids: Vec<u32>,
}

impl TornDown {
    pub fn of(cluster: &Cluster) -> Self {
        Self {
            dir: cluster.dir().to_owned(),
            ports: (0..3).map(|i| cluster.port(i)).collect(),
            pids: (0..3).filter_map(|i| cluster.beam_pid(i)).collect(),
        }
    }

    /// The line the holder prints, and its parse.
    fn line(&self) -> String {
        fn join<T: ToString>(values: &[T]) -> String {
            values.iter().map(T::to_string).collect::<Vec<_>>().join(",")
        }
        format!("{PREFIX}{} {} {}", self.dir.display(), join(&self.ports), join(&self.pids))
    }

    fn parse(line: &str) -> Option<Self> {
        let mut fields = line.strip_prefix(PREFIX)?.split(' ');
        let (dir, ports, pids) = (fields.next()?, fields.next()?, fields.next()?);
        Some(Self {
            dir: dir.into(),
            ports: ports.split(',').map(|p| p.parse().unwrap()).collect(),
            pids: pids.split(',').map(|p| p.parse().unwrap()).collect(),
        })
    }
}

/// Waits up to `within` for the directory to be removed, the AMQP ports to refuse and the
/// `beam.smp` processes to be dead (a zombie is dead: its parent may never reap it).
pub async fn assert_torn_down(torn_down: &TornDown, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let dir = torn_down.dir.exists();
        let ports: Vec<_> = torn_down.ports.iter().filter(|&&p| TcpStream::connect(("127.0.0.1", p)).is_ok()).collect();
        let pids: Vec<_> = torn_down.pids.iter().filter(|&&pid| alive(pid)).collect();
        if !dir && ports.is_empty() && pids.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: directory {} exists={dir}, listening ports {ports:?}, live pids {pids:?}", torn_down.dir.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

const PREFIX: &str = "cluster held: ";
const HOLDER: &str = "RELAY_CLUSTER_HOLDER";

#[tokio::test]
async fn nodes_do_not_outlive_a_killed_test_process() {
    let _serial = SERIAL.lock().await;
    // This very test binary, running only `holder` below.
    let mut holder = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "teardown::holder", "--ignored", "--nocapture"])
        .env(HOLDER, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let torn_down = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(torn_down) = TornDown::parse(&line) {
                return torn_down;
            }
        }
        panic!("the holder ended without a cluster");
    })
    .await
    .expect("the holder's cluster starts");
    assert!(torn_down.dir.exists() && torn_down.pids.len() == 3);

    holder.start_kill().unwrap(); // SIGKILL: no unwinding, no Drop
    holder.wait().await.unwrap();
    let killed_at = Instant::now();
    assert_torn_down(&torn_down, Duration::from_secs(20)).await;
    println!("cluster teardown after SIGKILL of the test process: {:.2}s", killed_at.elapsed().as_secs_f64());
}

/// The process that `nodes_do_not_outlive_a_killed_test_process` kills while it holds a
/// cluster. Does nothing when run any other way.
#[tokio::test]
#[ignore = "run by nodes_do_not_outlive_a_killed_test_process"]
async fn holder() {
    if std::env::var_os(HOLDER).is_none() {
        return;
    }
    let cluster = Cluster::start().await;
    println!("{}", TornDown::of(&cluster).line());
    // Killed long before this ends; bounded all the same.
    tokio::time::sleep(Duration::from_secs(300)).await;
    drop(cluster);
}
