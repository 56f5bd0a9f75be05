//! Private RabbitMQ nodes on this machine: one for `dev` when no broker answers, three
//! clustered for the tests that need a real cluster (a node lost, a quorum queue
//! re-electing its leader).
//!
//! The nodes run beside any other broker on the machine and never touch it: own node names,
//! ports, data directories, config files, Erlang cookie and even their own epmd, all under
//! one temporary directory. They are started with the Debian package's own scripts in its lib directory,
//! not the `sbin` wrappers, which switch to the `rabbitmq` user and read its home.
//!
//! Nodes are numbered 0, 1, 2 everywhere: in node names, in `amqp_urls()`, in arguments.
//!
//! Teardown is done by a watchdog process, not by this process: it waits for end-of-file on
//! a pipe that only this process holds, so it runs when the `LocalCluster` is dropped (the
//! command stopped, the test ended or panicked) and equally when the process dies without
//! unwinding (SIGKILL, a CI timeout). Nodes never outlive the process that started them.

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

use anyhow::{Context, bail, ensure};

/// The Debian package's scripts that run as whoever calls them.
pub const SCRIPTS: &str = "/usr/lib/rabbitmq/bin";

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
/// A `rabbitmqctl` call that takes longer is killed and fails.
const CTL_TIMEOUT: Duration = Duration::from_secs(90);

pub struct LocalCluster {
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

impl LocalCluster {
    /// `count` nodes running and clustered, each answering AMQP on its own port.
    pub async fn start(count: usize) -> anyhow::Result<Self> {
        let script = Path::new(SCRIPTS).join("rabbitmq-server");
        ensure!(script.exists(), "{} is missing: install the rabbitmq-server package", script.display());
        let id = format!("{:08x}", fastrand::u32(..));
        let dir = std::env::temp_dir().join(format!("relay-rabbitmq-{id}"));
        DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let watchdog = spawn_watchdog(&id, &dir)?;
        let nodes = (0..count)
            .map(|i| Node {
                name: format!("relay-{id}-{i}@localhost"),
                amqp_port: free_port(),
                dist_port: free_port(),
                dir: dir.join(format!("node-{i}")),
                server: None,
            })
            .collect();
        // Built before anything is started, so that an error or a panic from here on tears
        // down through Drop.
        let mut cluster = Self { id, dir, epmd_port: free_port(), nodes, watchdog, epmd: None };
        cluster.write_files().context("writing the nodes' files")?;
        cluster.start_epmd()?;
        // Booting is mostly CPU: all at once is faster than one after the other even on two
        // cores. Each boots as a cluster of one; the others are then joined to node 0.
        for i in 0..count {
            cluster.spawn_node(i)?;
        }
        cluster.await_startup(0).await?;
        let first = cluster.node_name(0).to_owned();
        for i in 1..count {
            cluster.await_startup(i).await?;
            cluster.ctl(i, &["stop_app"]).await?;
            cluster.ctl(i, &["join_cluster", &first]).await?;
            cluster.ctl(i, &["start_app"]).await?;
        }
        cluster.await_running(0, count).await?;
        Ok(cluster)
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
    pub fn kill9(&mut self, i: usize) -> anyhow::Result<()> {
        let pid = self.beam_pid(i).with_context(|| format!("node {i} has no pid file: not running"))?;
        // Only a pid that carries this node's marker is killed, should the file be stale.
        let script = format!(
            "{SWEEP}\ngrep -qszx \"RELAY_CLUSTER_MEMBER=$1\" /proc/$2/environ && kill -KILL $2\nsweep \"$1\""
        );
        let status = Command::new("sh").arg("-c").arg(script).arg("sh").arg(self.member(i)).arg(pid.to_string()).status()?;
        ensure!(status.success(), "node {i} did not die");
        // A killed node leaves its pid file behind; a later beam_pid must not find it.
        let _ = fs::remove_file(self.nodes[i].dir.join("pid"));
        if let Some(mut server) = self.nodes[i].server.take() {
            let _ = server.wait();
        }
        Ok(())
    }

    /// Starts a killed node again on its old ports and data, and returns once it runs and
    /// the other running nodes see it as a member again.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        ensure!(self.nodes[i].server.is_none(), "node {i} is running; kill9 it first");
        self.spawn_node(i)?;
        self.await_startup(i).await?;
        let running = self.nodes.iter().filter(|n| n.server.is_some()).count();
        self.await_running(i, running).await
    }

    /// `rabbitmqctl -n <node i> <args>`; its stdout, or an error with its output.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let run = tokio::process::Command::new(format!("{SCRIPTS}/rabbitmqctl"))
            .env_clear()
            .envs(self.node_env(i))
            .arg("-n")
            .arg(&self.nodes[i].name)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let call = || format!("rabbitmqctl -n {} {}", self.nodes[i].name, args.join(" "));
        let out = tokio::time::timeout(CTL_TIMEOUT, run).await.map_err(|_| anyhow::anyhow!("{}: no answer after {CTL_TIMEOUT:?}", call()))??;
        if !out.status.success() {
            bail!("{}: {}: {}{}", call(), out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Names of the running nodes, as node `via` sees them.
    pub async fn running_nodes(&self, via: usize) -> anyhow::Result<Vec<String>> {
        let status = self.ctl(via, &["cluster_status", "--formatter", "json"]).await?;
        let status: serde_json::Value = serde_json::from_str(&status).with_context(|| format!("cluster_status is not JSON: {status}"))?;
        let running = status["running_nodes"].as_array().with_context(|| format!("no running_nodes in {status}"))?;
        Ok(running.iter().filter_map(|n| n.as_str()).map(str::to_owned).collect())
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

    fn write_files(&self) -> std::io::Result<()> {
        let cookie: String = (0..32).map(|_| fastrand::uppercase()).collect();
        for node in &self.nodes {
            for sub in ["home", "mnesia", "log", "conf.d"] {
                fs::create_dir_all(node.dir.join(sub))?;
            }
            // Erlang refuses a cookie file that others can read.
            let mut file = OpenOptions::new().write(true).create_new(true).mode(0o400).open(node.dir.join("home/.erlang.cookie"))?;
            file.write_all(cookie.as_bytes())?;
            fs::write(node.dir.join("rabbitmq-env.conf"), "")?;
            // Ports, paths and names come from the environment set here. A node that hangs is
            // counted down after `net_ticktime` (60 s unless RELAY_TEST_NET_TICKTIME sets it).
            let ticktime = std::env::var("RELAY_TEST_NET_TICKTIME").map(|secs| format!("net_ticktime = {secs}\n")).unwrap_or_default();
            fs::write(node.dir.join("rabbitmq.conf"), ticktime)?;
            fs::write(node.dir.join("enabled_plugins"), "[].\n")?;
        }
        Ok(())
    }

    fn start_epmd(&mut self) -> anyhow::Result<()> {
        let log = File::create(self.dir.join("epmd.log"))?;
        let epmd = Command::new("epmd")
            .env_clear()
            .envs(self.base_env(&format!("{}/epmd", self.id)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Out of our process group: a Ctrl-C must leave teardown to the watchdog.
            .process_group(0)
            .spawn()
            .context("epmd (from Erlang) is not on PATH")?;
        self.epmd = Some(epmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.epmd_port)).is_err() {
            ensure!(Instant::now() < deadline, "epmd does not listen on port {}", self.epmd_port);
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn spawn_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        // Appended to, so that a restarted node's log keeps what the killed one wrote.
        let log = OpenOptions::new().create(true).append(true).open(node.dir.join("server.log"))?;
        let server = Command::new(format!("{SCRIPTS}/rabbitmq-server"))
            .env_clear()
            .envs(self.node_env(i))
            // An Erlang crash dump lands in the working directory.
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("rabbitmq-server does not start")?;
        self.nodes[i].server = Some(server);
        Ok(())
    }

    /// Until node `i` has booted. `await_startup` fails at once while the node is not yet
    /// registered with epmd, and waits once it is.
    async fn await_startup(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(status) = self.nodes[i].server.as_mut().and_then(|s| s.try_wait().ok().flatten()) {
                self.nodes[i].server = None;
                bail!("RabbitMQ node {i} exited during boot ({status}):\n{}", self.log_tail(i));
            }
            let error = match self.ctl(i, &["await_startup", "--timeout", "30"]).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            ensure!(Instant::now() < deadline, "RabbitMQ node {i} not booted after {BOOT_TIMEOUT:?}: {error}\n{}", self.log_tail(i));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Until node `via` sees `count` running nodes, its own included.
    async fn await_running(&self, via: usize, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let running = self.running_nodes(via).await?;
            if running.len() == count && running.iter().any(|n| *n == self.nodes[via].name) {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "node {via} sees {running:?} running, not {count} nodes");
            tokio::time::sleep(Duration::from_millis(250)).await;
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

impl Drop for LocalCluster {
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
fn spawn_watchdog(id: &str, dir: &Path) -> std::io::Result<Child> {
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
}

/// A port that is free now on 127.0.0.1 and was not handed out before by this process.
/// Taken below 32768, Linux's ephemeral range, where any outgoing connection could take
/// it again before the node binds it (and again when a killed node restarts on it);
/// the shared broker's fixed ports are avoided even while it is down.
fn free_port() -> u16 {
    static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    const SHARED: [u16; 5] = [4369, 5671, 5672, 15672, 25672];
    let mut taken = TAKEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = fastrand::u16(10_000..32_768);
        if !SHARED.contains(&port) && !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
}
