//! Private containerd daemons: start/stop, network namespace, start failures, and
//! `cleanup_state`. Needs root and `containerd` in PATH; the netns test also needs `ip`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use xfer_runtime::daemon::{cleanup_state, connect, mounts_under, ContainerdDaemon, DaemonConfig};
use xfer_runtime::RuntimeError;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "daemon_lifecycle tests need root: they start containerd, mount tmpfs and create a netns"
    );
}

/// A temp dir whose daemon state is cleaned up on drop, also when an assertion fails.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("xfer-dtest-")
            .tempdir()
            .expect("tempdir");
        Self { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn cfg(&self) -> DaemonConfig {
        DaemonConfig::in_dir(self.path())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let cfg = self.cfg();
        if let Err(e) = cleanup_state(&cfg.root, &cfg.state) {
            eprintln!("cleanup_state in drop: {e}");
        }
    }
}

/// A named network namespace (`ip netns add`), deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new(name: String) -> Self {
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip netns add {name}");
        Self(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s[s.rfind(')').expect("stat") + 2..].chars().next();
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(_) => false,
    }
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

#[tokio::test]
async fn start_answer_and_stop() {
    require_root();
    let dir = Dir::new();
    let cfg = dir.cfg();
    let daemon = ContainerdDaemon::start(cfg.clone()).await.expect("start");
    let pid = daemon.pid();
    assert!(alive(pid));
    assert!(daemon.version().starts_with("1.") || daemon.version().starts_with("2."));
    assert_eq!(daemon.socket(), cfg.socket.as_path());
    let config = std::fs::read_to_string(cfg.config_file()).expect("config file");
    assert!(config.contains("io.containerd.grpc.v1.cri"), "{config}");
    assert!(cfg.ttrpc_socket().exists(), "ttrpc socket");
    // The CRI plugin is really off and overlayfs is loaded.
    let client = connect(daemon.socket()).await.expect("connect");
    let plugins = client
        .introspection()
        .plugins(containerd_client::services::v1::PluginsRequest::default())
        .await
        .expect("plugins")
        .into_inner()
        .plugins;
    assert!(!plugins
        .iter()
        .any(|p| p.id == "cri" && p.init_err.is_none()));
    let overlay = plugins
        .iter()
        .find(|p| p.r#type == "io.containerd.snapshotter.v1" && p.id == "overlayfs")
        .expect("overlayfs plugin");
    assert!(
        overlay.init_err.is_none(),
        "overlayfs: {:?}",
        overlay.init_err
    );
    // The network namespace is ours when none is given.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns"),
        std::fs::read_link("/proc/self/ns/net").expect("ns")
    );

    // A second daemon on the same socket is refused.
    let mut again = cfg.clone();
    again.root = dir.path().join("root2");
    again.state = dir.path().join("state2");
    match ContainerdDaemon::start(again).await {
        Err(RuntimeError::Invalid(m)) => assert!(m.contains("already answers"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(client);

    let status = daemon.stop().await.expect("stop");
    eprintln!("containerd exited: {status}");
    assert!(!alive(pid));
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let report = cleanup_state(&cfg.root, &cfg.state).expect("cleanup");
    assert!(report.killed.is_empty(), "{report:?}");
    assert!(!cfg.root.exists() && !cfg.state.exists());
}

#[tokio::test]
async fn runs_in_the_given_netns_only() {
    require_root();
    let dir = Dir::new();
    let netns = NetNs::new(format!("xfer-dtest-{}", std::process::id()));
    let cfg = dir.cfg().with_netns(netns.path());
    let daemon = ContainerdDaemon::start(cfg).await.expect("start in netns");
    let pid = daemon.pid();
    let st = nix::sys::stat::stat(&netns.path()).expect("stat netns");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns"),
        PathBuf::from(format!("net:[{}]", st.st_ino))
    );
    // Only the network namespace: the mount namespace is still ours, so the socket works.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("ns"),
        std::fs::read_link("/proc/self/ns/mnt").expect("ns")
    );
    connect(daemon.socket())
        .await
        .expect("connect across netns");
    daemon.stop().await.expect("stop");
    assert!(!alive(pid));
}

#[tokio::test]
async fn start_failures_carry_the_log_tail() {
    require_root();
    let dir = Dir::new();

    // Exits at once.
    let mut cfg = dir.cfg();
    cfg.binary = script(
        dir.path(),
        "fail.sh",
        "echo boom-from-fake-containerd >&2\nexit 3",
    );
    match ContainerdDaemon::start(cfg).await {
        Err(e @ RuntimeError::Daemon { .. }) => {
            let text = e.to_string();
            assert!(text.contains("exited"), "{text}");
            assert!(text.contains("boom-from-fake-containerd"), "{text}");
        }
        other => panic!("expected a daemon error, got {other:?}"),
    }

    // Never answers: killed after the timeout.
    let mut cfg = dir.cfg();
    let pidfile = dir.path().join("hang.pid");
    cfg.binary = script(
        dir.path(),
        "hang.sh",
        &format!(
            "echo $$ > {}\necho hanging-fake-containerd\nexec sleep 600",
            pidfile.display()
        ),
    );
    cfg.start_timeout = Duration::from_millis(800);
    cfg.stop_timeout = Duration::from_secs(2);
    match ContainerdDaemon::start(cfg).await {
        Err(e @ RuntimeError::Daemon { .. }) => {
            let text = e.to_string();
            assert!(text.contains("did not answer"), "{text}");
            assert!(text.contains("hanging-fake-containerd"), "{text}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    assert!(!alive(pid), "hung fake containerd {pid} still alive");

    // Socket path too long for a unix socket.
    let mut cfg = dir.cfg();
    cfg.socket = dir.path().join("s".repeat(120));
    assert!(matches!(
        ContainerdDaemon::start(cfg).await,
        Err(RuntimeError::Invalid(_))
    ));
}

#[test]
fn cleanup_state_unmounts_kills_and_removes() {
    require_root();
    let dir = Dir::new();
    let cfg = dir.cfg();
    let deep = cfg.root.join("a/b c/d");
    std::fs::create_dir_all(&deep).expect("mkdir");
    let mnt = |target: &Path| {
        nix::mount::mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .expect("mount tmpfs")
    };
    // Nested and stacked mounts, one with a space in its path.
    mnt(&cfg.root.join("a"));
    std::fs::create_dir_all(&deep).expect("mkdir in tmpfs");
    mnt(&cfg.root.join("a/b c"));
    std::fs::create_dir_all(&deep).expect("mkdir in tmpfs");
    mnt(&deep);
    mnt(&deep);
    std::fs::create_dir_all(cfg.state.join("bundle")).expect("mkdir state");
    let base = std::fs::canonicalize(dir.path()).expect("canonicalize");
    assert_eq!(
        mounts_under(std::slice::from_ref(&base))
            .expect("mounts")
            .len(),
        4
    );
    // A process (with a child) working in the state dir, like a runc shim.
    let child = Command::new("sh")
        .args(["-c", "sleep 600 & wait"])
        .current_dir(cfg.state.join("bundle"))
        .spawn()
        .expect("spawn");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(200));

    let report = cleanup_state(&cfg.root, &cfg.state).expect("cleanup");
    eprintln!("{report:?}");
    assert!(report.killed.contains(&(pid as i32)), "{report:?}");
    assert!(report.killed.len() >= 2, "the sleep child too: {report:?}");
    assert!(!alive(pid));
    assert_eq!(report.unmounted.len(), 4, "{report:?}");
    assert_eq!(report.unmounted[0], base.join("root/a/b c/d"));
    assert!(mounts_under(std::slice::from_ref(&base))
        .expect("mounts")
        .is_empty());
    assert!(!cfg.root.exists() && !cfg.state.exists());
    // Idempotent.
    assert_eq!(
        cleanup_state(&cfg.root, &cfg.state).expect("again"),
        Default::default()
    );
    drop(child);
}
