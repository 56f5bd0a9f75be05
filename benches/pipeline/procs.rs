//! The relay as a child process (the release binary), and what /proc says about processes:
//! CPU time and peak resident memory.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Builds the release binary (a bench target does not build the bin) and returns its path.
pub fn build_relay() -> Result<PathBuf, String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--release", "--quiet", "--bin", "openai-webhook-relay"]).current_dir(manifest);
    // Cargo runs this bench with this package's CARGO_PKG_* and CARGO_MANIFEST_* set. Build
    // scripts that watch those names (ring's does) would see them changed, rebuild, and
    // make the next `cargo bench` rebuild them back: minutes per run.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_for_this_package = ["CARGO_PKG_", "CARGO_MANIFEST_"].iter().any(|prefix| name.starts_with(prefix))
            || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME", "CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR"].contains(&name.as_ref());
        if set_for_this_package {
            command.env_remove(name.as_ref());
        }
    }
    let status = command
        .status()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --release --bin openai-webhook-relay failed: {status}"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| manifest.join("target"), |dir| manifest.join(dir));
    let binary = target.join("release").join("openai-webhook-relay");
    if !binary.is_file() {
        return Err(format!("no relay binary at {}", binary.display()));
    }
    Ok(binary)
}

/// A free local port (bound and released; the child binds it right after).
pub fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
    listener.local_addr().expect("local address")
}

/// A running relay process (or the bench's bare receiver); killed when dropped.
pub struct RelayProcess {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl RelayProcess {
    pub fn spawn(binary: &Path, role: &str, addr: SocketAddr, env: &[(&str, String)]) -> Result<Self, String> {
        let mut command = Command::new(binary);
        command
            .args(["--role", role])
            .env("RELAY_LISTEN", addr.to_string())
            .env("RELAY_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().map_err(|e| format!("cannot start the relay: {e}"))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        for stream in [child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), child.stderr.take().map(|s| Box::new(s) as _)]
            .into_iter()
            .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut log = log.lock().unwrap();
                    if log.len() == 50 {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        Ok(Self { child, addr, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the relay logged (at its default level, as a user runs it).
    pub fn log_tail(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().cloned().collect()
    }

    pub async fn wait_ready(&mut self, http: &reqwest::Client) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let url = format!("http://{}/readyz", self.addr);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("relay exited during start-up ({status}); last log lines:\n{}", self.log_tail().join("\n")));
            }
            if let Ok(response) = http.get(&url).send().await
                && response.status().is_success() {
                    return Ok(());
                }
            if Instant::now() > deadline {
                return Err(format!("relay not ready after 20 s; last log lines:\n{}", self.log_tail().join("\n")));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        vm_hwm_kib(self.pid())
    }

    /// SIGTERM (graceful shutdown), then SIGKILL after 10 s.
    pub async fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields restart after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from `state` (field 3) here.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Time the process's threads spent runnable but waiting for a CPU, in nanoseconds
/// (second field of /proc/<pid>/task/<tid>/schedstat).
fn run_delay_ns(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Busy ticks of the whole machine (all CPUs, everything but idle and iowait).
fn machine_busy_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0 };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0 };
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum()
}

/// PIDs of the RabbitMQ node (the Erlang VM started with `-s rabbit boot`) on this machine.
pub fn broker_pids() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "beam.smp"))
        // The node itself, not a `rabbitmqctl` run (also an Erlang VM).
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| cmdline.windows(11).any(|w| w == b"rabbit\0boot")))
        .collect()
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// What one process used during a window.
#[derive(Debug, Clone)]
pub struct Usage {
    pub name: String,
    pub cores: f64,
    pub cpu_wait_ms_per_s: f64,
}

/// CPU counters at the start of a window.
pub struct CpuWindow {
    before: Vec<(u64, u64)>,
    started: Instant,
}

/// Measures the CPU the named processes use over a time window.
pub struct CpuProbe {
    processes: Vec<(String, Vec<String>)>,
    ticks_per_second: f64,
}

impl CpuProbe {
    pub fn new() -> Self {
        Self { processes: Vec::new(), ticks_per_second: clock_ticks_per_second() }
    }

    pub fn with(mut self, name: &str, pids: Vec<String>) -> Self {
        self.processes.push((name.to_owned(), pids));
        self
    }

    fn sample(&self) -> Vec<(u64, u64)> {
        let mut samples: Vec<(u64, u64)> = self
            .processes
            .iter()
            .map(|(_, pids)| (pids.iter().filter_map(|p| cpu_ticks(p)).sum(), pids.iter().map(|p| run_delay_ns(p)).sum()))
            .collect();
        samples.push((machine_busy_ticks(), 0));
        samples
    }

    /// Per process between `from` and `until` (waits until then): cores used, and
    /// milliseconds per second its threads waited for a CPU.
    pub async fn measure_between(&self, from: Instant, until: Instant) -> Vec<Usage> {
        tokio::time::sleep_until(from.into()).await;
        let window = self.start();
        tokio::time::sleep_until(until.into()).await;
        self.finish(window)
    }

    /// Opens a window that [`CpuProbe::finish`] closes, for a phase of unknown length.
    pub fn start(&self) -> CpuWindow {
        CpuWindow { before: self.sample(), started: Instant::now() }
    }

    pub fn finish(&self, window: CpuWindow) -> Vec<Usage> {
        let CpuWindow { before, started } = window;
        let after = self.sample();
        let seconds = started.elapsed().as_secs_f64();
        let mut usage: Vec<Usage> = self
            .processes
            .iter()
            .zip(before.iter().zip(&after))
            .map(|((name, _), (b, a))| Usage {
                name: name.clone(),
                cores: a.0.saturating_sub(b.0) as f64 / self.ticks_per_second / seconds,
                cpu_wait_ms_per_s: a.1.saturating_sub(b.1) as f64 / 1e6 / seconds,
            })
            .collect();
        // Whatever else ran on the machine meanwhile (a build, another test run).
        let machine = after.last().unwrap().0.saturating_sub(before.last().unwrap().0) as f64 / self.ticks_per_second / seconds;
        let probed: f64 = usage.iter().map(|u| u.cores).sum();
        usage.push(Usage { name: "others".into(), cores: (machine - probed).max(0.0), cpu_wait_ms_per_s: 0.0 });
        usage
    }

    /// Waits until the probed process `name` uses at most `cores` over half a second, or
    /// `limit` passed; returns how long it waited and what `name` used in the last half
    /// second. Before a timed run, this lets the broker finish what the previous step left
    /// it, so that each run starts from the same state.
    pub async fn wait_idle(&self, name: &str, cores: f64, limit: Duration) -> (Duration, f64) {
        let started = Instant::now();
        loop {
            let now = Instant::now();
            let usage = self.measure_between(now, now + Duration::from_millis(500)).await;
            let busy = usage.iter().find(|u| u.name == name).map(|u| u.cores).expect("the named process is probed");
            if busy <= cores || started.elapsed() >= limit {
                return (started.elapsed(), busy);
            }
        }
    }

    /// Cores busy with anything but the probed processes, over `duration` (a pre-flight check).
    pub async fn others_now(&self, duration: Duration) -> f64 {
        let now = Instant::now();
        let usage = self.measure_between(now, now + duration).await;
        usage.iter().find(|u| u.name == "others").map_or(0.0, |u| u.cores)
    }
}
