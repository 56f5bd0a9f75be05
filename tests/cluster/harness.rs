//! A private 3-node RabbitMQ cluster on this machine, for tests that need a real cluster
//! (a node lost, a quorum queue re-electing its leader).
//!
//! The nodes run beside the shared broker and never touch it: own node names, ports, data
//! directories, config files, Erlang cookie and even their own epmd, all under one temporary
//! directory. They are started with the Debian package's own scripts in its lib directory,
//! not the `sbin` wrappers, which switch to the `rabbitmq` user and read its home.
//!
//! Nodes are numbered 0, 1, 2 everywhere: in node names, in `amqp_urls()`, in arguments.
//!
//! Teardown is done by a watchdog process, not by this process: it waits for end-of-file on
//! a pipe that only this process holds, so it runs when the `Cluster` is dropped (the test
//! ended or panicked) and equally when the test process dies without unwinding (SIGKILL,
//! a CI timeout). Nodes never outlive the test process that started them.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The Debian package's scripts that run as whoever calls them.
const SCRIPTS: &str = "/usr/lib/rabbitmq/bin";
const NODES: usize = 3;

/// Every process of a cluster carries `RELAY_CLUSTER_MEMBER=<cluster id>/<member>` in its
/// environment, inherited by whatever it spawns. That is how teardown finds a node's
/// helper processes (`erl_child_setup` and `inet_gethost` start sessions of their own, so a
/// process group would miss them) without ever touching the shared broker's.
const MARKER: &str = "RELAY_CLUSTER_MEMBER";

/// `sweep PATTERN`: SIGKILL every process whose marker matches PATTERN (a grep regex on
/// the member), again until none is left, as a dying node may still have been forking.
/// Zombies have an empty environ, so they do not count.
const SWEEP: &str = r#"
sweep() {
    for _ in $(seq 100); do
        pids=$(grep -lszx "RELAY_CLUSTER_MEMBER=$1" /proc/[0-9]*/environ | cut -d/ -f3)
        [ -z "$pids" ] && return 0
        kill -KILL $pids 2>/dev/null
        sleep 0.05
    done
    echo "processes matching $1 survive SIGKILL: $pids" >&2
    return 1
}
"#;

/// Deadline for a node to answer `await_startup` after its process was started.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// A `rabbitmqctl` call that takes longer is killed and fails the test.
const CTL_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Cluster {
    id: String,
    dir: PathBuf,
    epmd_port: u16,
    nodes: Vec<Node>,
    /// Dropping its stdin (our end of the pipe) makes it kill every member and remove `dir`.
    watchdog: Child,
    epmd: Option<Child>,
}

struct Node {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// The `rabbitmq-server` script, whose child is the node's `beam.smp`; `None` once killed.
    server: Option<Child>,
}

impl Cluster {
    /// Three nodes running and clustered, each answering AMQP on its own port.
    pub async fn start() -> Self {
        // The package's scripts are what the nodes run; installed on a fresh machine.
        crate::services::ensure();
        let id = format!("{:08x}", fastrand::u32(..));
        let dir = std::env::temp_dir().join(format!("relay-cluster-{id}"));
        DirBuilder::new().mode(0o700).create(&dir).expect("the cluster's temporary directory");
        let watchdog = spawn_watchdog(&id, &dir);
        let nodes = (0..NODES)
            .map(|i| Node {
                name: format!("relay-test-{id}-{i}@localhost"),
                amqp_port: free_port(),
                dist_port: free_port(),
                dir: dir.join(format!("node-{i}")),
                server: None,
            })
            .collect();
        // Built before anything is started, so that a panic from here on tears down through Drop.
        let mut cluster = Self { id, dir, epmd_port: free_port(), nodes, watchdog, epmd: None };
        cluster.write_files();
        cluster.start_epmd();
        // Booting is mostly CPU: all three at once is faster than one after the other even
        // on two cores. Each boots as a cluster of one; 1 and 2 are then joined to 0.
        for i in 0..NODES {
            cluster.spawn_node(i);
        }
        cluster.await_startup(0).await;
        let first = cluster.node_name(0).to_owned();
        for i in 1..NODES {
            cluster.await_startup(i).await;
            cluster.ctl(i, &["stop_app"]).await;
            cluster.ctl(i, &["join_cluster", &first]).await;
            cluster.ctl(i, &["start_app"]).await;
        }
        cluster.await_running(0, NODES).await;
        cluster
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` per node; guest may log in from loopback.
    pub fn amqp_urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", n.amqp_port)).collect()
    }

    /// Erlang node name, as `rabbitmqctl -n` and `cluster_status` spell it.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// AMQP port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].amqp_port
    }

    /// The temporary directory holding every node's data, logs and config; gone after Drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// OS pid of node `i`'s `beam.smp`, from its pid file: `None` while it boots or once killed.
    pub fn beam_pid(&self, i: usize) -> Option<u32> {
        fs::read_to_string(self.nodes[i].dir.join("pid")).ok()?.trim().parse().ok()
    }

    /// A crash of node `i`: SIGKILL to its `beam.smp`, then to any helper process of that
    /// node still alive. Returns when none is left.
    pub fn kill9(&mut self, i: usize) {
        let pid = self.beam_pid(i).unwrap_or_else(|| panic!("node {i} has no pid file: not running"));
        // Only a pid that carries this node's marker is killed, should the file be stale.
        let script = format!(
            "{SWEEP}\ngrep -qszx \"RELAY_CLUSTER_MEMBER=$1\" /proc/$2/environ && kill -KILL $2\nsweep \"$1\""
        );
        let status = Command::new("sh").arg("-c").arg(script).arg("sh").arg(self.member(i)).arg(pid.to_string()).status().expect("sh runs");
        assert!(status.success(), "node {i} did not die");
        // A killed node leaves its pid file behind; a later beam_pid must not find it.
        let _ = fs::remove_file(self.nodes[i].dir.join("pid"));
        if let Some(mut server) = self.nodes[i].server.take() {
            let _ = server.wait();
        }
    }

    /// Starts a killed node again on its old ports and data, and returns once it runs and
    /// the other running nodes see it as a member again.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].server.is_none(), "node {i} is running; kill9 it first");
        self.spawn_node(i);
        self.await_startup(i).await;
        let running = self.nodes.iter().filter(|n| n.server.is_some()).count();
        self.await_running(i, running).await;
    }

    pub async fn stop_app(&self, i: usize) {
        self.ctl(i, &["stop_app"]).await;
    }

    pub async fn start_app(&self, i: usize) {
        self.ctl(i, &["start_app"]).await;
    }

    /// `rabbitmqctl -n <node i> <args>`; its stdout. Panics with stderr if it fails.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> String {
        self.try_ctl(i, args).await.unwrap_or_else(|e| panic!("rabbitmqctl -n {} {}: {e}", self.nodes[i].name, args.join(" ")))
    }

    /// Names of the running nodes, as node `via` sees them.
    pub async fn running_nodes(&self, via: usize) -> Vec<String> {
        let status = self.ctl(via, &["cluster_status", "--formatter", "json"]).await;
        let status: serde_json::Value = serde_json::from_str(&status).unwrap_or_else(|e| panic!("cluster_status is not JSON ({e}): {status}"));
        let running = status["running_nodes"].as_array().unwrap_or_else(|| panic!("no running_nodes in {status}"));
        running.iter().map(|n| n.as_str().unwrap().to_owned()).collect()
    }

    /// Which node holds the leader of quorum queue `queue` (on vhost `/`), asked of the
    /// first node that answers. `None` while it has none, as between a leader's death and
    /// the election of the next.
    pub async fn queue_leader(&self, queue: &str) -> Option<usize> {
        for i in (0..NODES).filter(|&i| self.nodes[i].server.is_some()) {
            let Ok(out) = self.try_ctl(i, &["list_queues", "name", "leader", "--formatter", "json"]).await else { continue };
            let Ok(serde_json::Value::Array(queues)) = serde_json::from_str(&out) else { continue };
            let leader = queues.iter().find(|q| q["name"] == queue)?["leader"].as_str()?.to_owned();
            return self.nodes.iter().position(|n| n.name == leader);
        }
        None
    }

    fn member(&self, i: usize) -> String {
        format!("{}/{i}", self.id)
    }

    /// Environment shared by epmd, the nodes and the CLI. The inherited one is dropped, so
    /// that nothing from the shell (an `ERL_FLAGS`, a `RABBITMQ_NODENAME`) leaks in.
    fn base_env(&self, member: &str) -> Vec<(&'static str, String)> {
        vec![
            ("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())),
            // Elixir, which the CLI runs on, warns on every call without a UTF-8 locale.
            ("LANG", "C.UTF-8".into()),
            (MARKER, member.to_owned()),
            // A private epmd: the nodes do not register with the shared broker's, nor spawn
            // a machine-wide one that would outlive the test where none runs.
            ("ERL_EPMD_PORT", self.epmd_port.to_string()),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        ]
    }

    fn node_env(&self, i: usize) -> Vec<(&'static str, String)> {
        let node = &self.nodes[i];
        let path = |name: &str| node.dir.join(name).to_string_lossy().into_owned();
        let mut env = self.base_env(&self.member(i));
        env.extend([
            // The cookie is read from $HOME/.erlang.cookie, by the node and by the CLI alike.
            ("HOME", path("home")),
            ("RABBITMQ_NODENAME", node.name.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", node.amqp_port.to_string()),
            ("RABBITMQ_DIST_PORT", node.dist_port.to_string()),
            ("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}".into()),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_PID_FILE", path("pid")),
            // Each of these defaults to a file under /etc/rabbitmq, the shared broker's.
            ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_CONFIG_FILES", path("conf.d/*.conf")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            // The CLI's own distribution port otherwise comes from a fixed range of eleven
            // (35672-35682) shared by every rabbitmqctl on the machine; 0 takes any free one.
            ("RABBITMQ_CTL_DIST_PORT_MIN", "0".into()),
            ("RABBITMQ_CTL_DIST_PORT_MAX", "0".into()),
        ]);
        env
    }

    fn write_files(&self) {
        let cookie: String = (0..32).map(|_| fastrand::uppercase()).collect();
        for node in &self.nodes {
            for sub in ["home", "mnesia", "log", "conf.d"] {
                fs::create_dir_all(node.dir.join(sub)).unwrap();
            }
            // Erlang refuses a cookie file that others can read.
            let mut file = OpenOptions::new().write(true).create_new(true).mode(0o400).open(node.dir.join("home/.erlang.cookie")).unwrap();
            file.write_all(cookie.as_bytes()).unwrap();
            fs::write(node.dir.join("rabbitmq-env.conf"), "").unwrap();
            // Ports, paths and names come from the environment the harness sets. A node that
            // hangs is counted down after `net_ticktime` (60 s unless set; RELAY_TEST_NET_TICKTIME).
            let ticktime = std::env::var("RELAY_TEST_NET_TICKTIME").map(|secs| format!("net_ticktime = {secs}\n")).unwrap_or_default();
            fs::write(node.dir.join("rabbitmq.conf"), ticktime).unwrap();
            fs::write(node.dir.join("enabled_plugins"), "[].\n").unwrap();
        }
    }

    fn start_epmd(&mut self) {
        let log = File::create(self.dir.join("epmd.log")).unwrap();
        let epmd = Command::new("epmd")
            .env_clear()
            .envs(self.base_env(&format!("{}/epmd", self.id)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Out of the test's process group: a Ctrl-C must leave teardown to the watchdog.
            .process_group(0)
            .spawn()
            .expect("epmd (from Erlang) is on PATH");
        self.epmd = Some(epmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.epmd_port)).is_err() {
            assert!(Instant::now() < deadline, "epmd does not listen on port {}", self.epmd_port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn_node(&mut self, i: usize) {
        let node = &self.nodes[i];
        // Appended to, so that a restarted node's log keeps what the killed one wrote.
        let log = OpenOptions::new().create(true).append(true).open(node.dir.join("server.log")).unwrap();
        let server = Command::new(format!("{SCRIPTS}/rabbitmq-server"))
            .env_clear()
            .envs(self.node_env(i))
            // An Erlang crash dump lands in the working directory.
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("rabbitmq-server starts (is the rabbitmq-server package installed?)");
        self.nodes[i].server = Some(server);
    }

    /// Until node `i` has booted. `await_startup` fails at once while the node is not yet
    /// registered with epmd, and waits once it is.
    async fn await_startup(&mut self, i: usize) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(status) = self.nodes[i].server.as_mut().and_then(|s| s.try_wait().unwrap()) {
                self.nodes[i].server = None;
                panic!("node {i} exited during boot ({status}):\n{}", self.log_tail(i));
            }
            let error = match self.try_ctl(i, &["await_startup", "--timeout", "30"]).await {
                Ok(_) => return,
                Err(e) => e,
            };
            assert!(Instant::now() < deadline, "node {i} not booted after {BOOT_TIMEOUT:?}: {error}\n{}", self.log_tail(i));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Until node `via` sees `count` running nodes, its own included.
    async fn await_running(&self, via: usize, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let running = self.running_nodes(via).await;
            if running.len() == count && running.iter().any(|n| *n == self.nodes[via].name) {
                return;
            }
            assert!(Instant::now() < deadline, "node {via} sees {running:?} running, not {count} nodes");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn try_ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let run = tokio::process::Command::new(format!("{SCRIPTS}/rabbitmqctl"))
            .env_clear()
            .envs(self.node_env(i))
            .arg("-n")
            .arg(&self.nodes[i].name)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(CTL_TIMEOUT, run).await.map_err(|_| format!("no answer after {CTL_TIMEOUT:?}"))?.map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("{}: {}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn log_tail(&self, i: usize) -> String {
        let dir = &self.nodes[i].dir;
        let read = |path: PathBuf| fs::read_to_string(path).unwrap_or_default();
        let text = read(dir.join("server.log")) + &read(dir.join("log").join(format!("{}.log", self.nodes[i].name)));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // End-of-file on its stdin is the watchdog's signal; waiting for it makes teardown
        // complete before the next test starts.
        drop(self.watchdog.stdin.take());
        let _ = self.watchdog.wait();
        // Reaps the scripts and epmd, which the watchdog killed (SIGKILL to a zombie is harmless).
        for mut child in self.nodes.iter_mut().filter_map(|n| n.server.take()).chain(self.epmd.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The process that tears the cluster down: it blocks reading a pipe whose only writer is
/// this process (Rust opens pipes close-on-exec, so no node inherits it), then kills every
/// process carrying the cluster's marker and removes the directory. It carries no marker
/// itself, and sits in a process group of its own with HUP/INT/TERM ignored, so that what
/// kills the test (a Ctrl-C, a timeout killing its group) leaves it to clean up.
fn spawn_watchdog(id: &str, dir: &Path) -> Child {
    let script = format!("{SWEEP}\ntrap '' HUP INT TERM\ncat >/dev/null\nsweep \"$1/.*\"\nrm -rf -- \"$2\"");
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(id)
        .arg(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("sh runs")
}

/// A port that is free now on 127.0.0.1 and was not handed out before by this process.
/// Taken below 32768, Linux's ephemeral range, where any outgoing connection could take
/// it again before the node binds it (and again when a killed node restarts on it);
/// the shared broker's fixed ports are avoided even while it is down.
fn free_port() -> u16 {
    static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    const SHARED: [u16; 5] = [4369, 5671, 5672, 15672, 25672];
    let mut taken = TAKEN.lock().unwrap();
    loop {
        let port = fastrand::u16(10_000..32_768);
        if !SHARED.contains(&port) && !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
}
