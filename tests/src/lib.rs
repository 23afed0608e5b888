//! Helpers of the end-to-end tests: a lab per test that is torn down even when the
//! test fails, and the checks those tests share.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use xfer_agent::client::Client;
use xfer_lab::{Lab, LabSpec};

/// Fails the test (never skips) unless it runs as root with the tools it needs.
pub fn require_root_stack() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this end-to-end test needs root (network namespaces, containerd, CRIU): run it as root, e.g. through `cargo xtask test`"
    );
    for tool in ["containerd", "runc", "criu", "iptables", "redis-cli"] {
        let found = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .chain([PathBuf::from("/usr/local/sbin"), PathBuf::from("/usr/sbin")])
                    .any(|d| d.join(tool).exists())
            })
            .unwrap_or(false);
        assert!(
            found,
            "this end-to-end test needs `{tool}` on PATH: run `cargo xtask setup` first"
        );
    }
}

/// The xferd binary built next to the test binaries.
pub fn xferd_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> -> target/debug/xferd
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join("xferd");
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `cargo xtask test` does)",
        p.display()
    );
    p
}

/// The load generator binary (built with the workspace's binaries).
pub fn loadgen_path() -> PathBuf {
    let p = xferd_path().with_file_name("xfer-loadgen");
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (`cargo xtask test` does)",
        p.display()
    );
    p
}

/// Runs `xfer-loadgen run` from the client namespace against redis at `ip` for
/// `seconds` (a write every 500 µs over one connection), its report going to `report`;
/// join the thread for the process output.
pub fn spawn_load(
    lab: &Lab,
    ip: &str,
    seconds: u32,
    report: &std::path::Path,
) -> std::thread::JoinHandle<Result<std::process::Output, xfer_lab::LabError>> {
    let args = vec![
        loadgen_path().display().to_string(),
        "run".into(),
        "--addr".into(),
        format!("{ip}:6379"),
        "--seconds".into(),
        seconds.to_string(),
        "--pace-us".into(),
        "500".into(),
        "--out".into(),
        report.display().to_string(),
    ];
    let lab = lab.clone();
    std::thread::spawn(move || lab.exec("client", &args))
}

/// Waits for a load started by [`spawn_load`]; panics unless it ran to its end.
/// Returns its JSON report as text (for messages) and parsed.
pub fn finish_load(
    load: std::thread::JoinHandle<Result<std::process::Output, xfer_lab::LabError>>,
) -> (String, serde_json::Value) {
    let out = load.join().expect("load thread").expect("run loadgen");
    assert!(
        out.status.success(),
        "loadgen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let v = serde_json::from_str(&text).expect("report json");
    (text, v)
}

/// Checks from the client namespace that every write acknowledged in a load
/// generator `report` (keys `KEY_PREFIX:N`, counter `KEY_PREFIXctr`) is in the redis at
/// `ip`, then removes the report.
pub fn verify_writes(lab: &xfer_lab::Lab, ip: &str, report: &std::path::Path, key_prefix: &str) {
    let out = lab
        .exec(
            "client",
            &[
                loadgen_path().display().to_string(),
                "verify".into(),
                "--addr".into(),
                format!("{ip}:6379"),
                "--report".into(),
                report.display().to_string(),
                "--key-prefix".into(),
                key_prefix.into(),
            ],
        )
        .expect("run the verifier");
    assert!(
        out.status.success(),
        "lost writes: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(report);
}

/// `prefix` with `XFER_TEST_LAB_TAG` appended (see [`TestLab::up`]).
pub fn lab_prefix(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        std::env::var("XFER_TEST_LAB_TAG").unwrap_or_default()
    )
}

/// A lab that goes down when dropped, also when the test panics.
#[derive(Debug)]
pub struct TestLab {
    pub lab: Lab,
}

impl TestLab {
    /// Brings up a lab with `nodes` hosts under `prefix` (clearing leftovers first).
    ///
    /// `XFER_TEST_LAB_TAG` (lowercase letters and digits) is appended to the prefix, so
    /// two checkouts can run the end-to-end tests at the same time.
    pub async fn up(prefix: &str, nodes: usize) -> TestLab {
        Self::up_with(prefix, nodes, xfer_lab::HandoverSpec::default()).await
    }

    /// [`TestLab::up`] with these handover settings for the agents.
    pub async fn up_with(prefix: &str, nodes: usize, handover: xfer_lab::HandoverSpec) -> TestLab {
        require_root_stack();
        become_subreaper();
        let prefix = &lab_prefix(prefix);
        let lab = xfer_lab::up(&LabSpec {
            prefix: prefix.to_string(),
            nodes,
            rates: Vec::new(),
            xferd: xferd_path(),
            handover,
        })
        .await
        .unwrap_or_else(|e| panic!("lab up {prefix}: {}", chain(&e)));
        TestLab { lab }
    }

    /// A client of host `name`'s agent.
    pub async fn agent(&self, name: &str) -> Client {
        let h = self.lab.host(name).expect("host");
        Client::connect(&h.endpoint, Some(&self.lab.operator_tls()))
            .await
            .unwrap_or_else(|e| panic!("connect to {name}: {}", chain(&e)))
    }

    /// Imports a lab image into a host.
    pub async fn import(&self, host: &str, kind: &str) {
        let h = self.lab.host(host).expect("host");
        xfer_lab::import_image(h, kind)
            .await
            .unwrap_or_else(|e| panic!("import {kind} into {host}: {}", chain(&e)));
    }

    /// Writes a `--kb-config` naming the agents of `hosts` (`"hosts"`: their
    /// endpoints), from `base` with `extra` merged in. Returns its directory (removed
    /// when dropped) and path.
    pub fn kb_config(
        &self,
        hosts: &[&str],
        base: serde_json::Value,
        extra: serde_json::Value,
    ) -> (tempfile::TempDir, PathBuf) {
        let endpoints: serde_json::Map<String, serde_json::Value> = hosts
            .iter()
            .map(|h| {
                let ep = self.lab.host(h).expect("host").endpoint.clone();
                (h.to_string(), serde_json::Value::String(ep))
            })
            .collect();
        let mut cfg = base;
        if let Some(c) = cfg.as_object_mut() {
            c.insert("hosts".into(), serde_json::Value::Object(endpoints));
            if let Some(e) = extra.as_object() {
                c.extend(e.clone());
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kb.json");
        std::fs::write(&path, cfg.to_string()).expect("write kb.json");
        (dir, path)
    }

    /// Restarts `host`'s agent with the knowledge-base configuration `cfg`.
    pub async fn restart_with_kb(&mut self, host: &str, cfg: &std::path::Path) {
        std::env::set_var("XFER_KB_CONFIG", cfg);
        let res = xfer_lab::restart_agent(&mut self.lab, host).await;
        std::env::remove_var("XFER_KB_CONFIG");
        res.unwrap_or_else(|e| panic!("restart {host}: {}", chain(&e)));
    }

    /// Runs a program in the client namespace; returns stdout, panics on failure.
    pub fn client_exec(&self, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = self
            .lab
            .exec("client", &args)
            .expect("exec in client namespace");
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let prefix = self.lab.prefix.clone();
        // Drop may run inside a runtime: tear down on a thread with its own.
        let res = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(xfer_lab::down(&prefix)).map_err(|e| chain(&e))
        })
        .join();
        reap_orphans();
        match res {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("lab down failed: {e}"),
            Err(_) => eprintln!("lab down panicked"),
        }
    }
}

/// The whole error chain as one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// The pid of a container's task on a host, if running.
pub async fn task_pid(c: &mut Client, id: &str) -> Option<(u32, String)> {
    c.list()
        .await
        .expect("list containers")
        .into_iter()
        .find(|ci| ci.id == id)
        .map(|ci| (ci.pid, ci.status))
}

/// The pid of container `id`'s task on a host; panics unless it is running.
pub async fn running_pid(c: &mut Client, id: &str) -> u32 {
    let (pid, status) = task_pid(c, id).await.expect("the container is there");
    assert_eq!(status, "running", "container {id}");
    pid
}

/// A number the container of `pid` keeps in the file `path` (0 if unreadable).
pub fn read_number(pid: u32, path: &str) -> u64 {
    read_in(pid, path).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Reads a file inside a running container, through /proc/PID/root.
pub fn read_in(pid: u32, path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/root{path}"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Waits until `f` returns Some, or panics with `what` after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes the test process the reaper of orphaned lab processes (shims, containers):
/// this machine's PID 1 does not reap zombies.
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes integer arguments and only changes
    // this process's attributes.
    unsafe {
        nix::libc::prctl(nix::libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Reaps exited children without blocking (the tests run one at a time, so no other
/// test's child status is taken).
pub fn reap_orphans() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(st) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if st == WaitStatus::StillAlive {
            break;
        }
    }
}

/// redis-server arguments the tests use: no persistence, reachable from the client
/// namespace, DEBUG allowed (for POPULATE and DIGEST).
pub fn redis_args() -> Vec<String> {
    [
        "redis-server",
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--enable-debug-command",
        "yes",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl TestLab {
    /// Imports the redis image into `host` and starts redis there as `name` with the
    /// routed home address number `k` of that host (the host becomes its home agent);
    /// waits until it answers PING from the client namespace. Returns the address.
    pub async fn start_routed_redis(
        &self,
        host: &str,
        name: &str,
        k: u8,
        reverse_tunnel: bool,
    ) -> std::net::Ipv4Addr {
        self.import(host, "redis").await;
        let home = self.lab.home_address(host, k).expect("home address");
        self.agent(host)
            .await
            .run_routed(name, "redis", &redis_args(), &[], home, reverse_tunnel)
            .await
            .unwrap_or_else(|e| panic!("run routed redis: {}", chain(&e)));
        self.wait_redis(&home.to_string()).await;
        home
    }

    /// Waits until redis at `ip` answers PING from the client namespace.
    pub async fn wait_redis(&self, ip: &str) {
        wait_for("redis answering PING", Duration::from_secs(20), || {
            let args = [
                "redis-cli".to_string(),
                "-h".into(),
                ip.to_string(),
                "PING".into(),
            ];
            let out = self.lab.exec("client", &args).ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("PONG")
                .then_some(())
        })
        .await;
    }

    /// Imports the redis image into `host`, starts redis there as `name` (with its own
    /// `address` (CIDR) when given, else in the host's namespace) and waits until it
    /// answers PING from the client namespace. Returns the IP clients use.
    pub async fn start_redis(&self, host: &str, name: &str, address: Option<&str>) -> String {
        self.import(host, "redis").await;
        let mut agent = self.agent(host).await;
        let ip = match address {
            Some(a) => {
                agent
                    .run_with_address(
                        name,
                        "redis",
                        &redis_args(),
                        &[],
                        a,
                        &self.lab.gateway.to_string(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("run redis: {}", chain(&e)));
                a.split('/').next().expect("ip").to_string()
            }
            None => {
                agent
                    .run(name, "redis", &redis_args(), &[])
                    .await
                    .unwrap_or_else(|e| panic!("run redis: {}", chain(&e)));
                self.lab.host(host).expect("host").address.to_string()
            }
        };
        self.wait_redis(&ip).await;
        ip
    }
}
