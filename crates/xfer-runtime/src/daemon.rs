//! Private containerd instances.
//!
//! [`ContainerdDaemon::start`] runs `containerd --config <file>` with its own `root`,
//! `state`, gRPC socket and ttrpc socket, from a generated version-2 config that
//! disables the CRI plugin and the snapshotters this project does not use (see
//! [`DISABLED_PLUGINS`]). It waits until the socket answers `Version` and stops the
//! daemon with SIGTERM (SIGKILL after a timeout) in [`ContainerdDaemon::stop`] or on
//! drop. Optionally the daemon runs inside a prepared network namespace
//! (`/run/netns/NAME`); only the network namespace is entered, the mount namespace stays
//! the caller's, so the socket and all paths are visible as usual.
//!
//! [`cleanup_state`] clears what a crashed run left behind under a daemon's root and
//! state directories: processes (the daemon, runc shims and their containers), mounts
//! (deepest first, lazily detached) and finally the directories.
//!
//! # Several daemons on one machine
//!
//! Each daemon has its own root, state and sockets, but two things are still global:
//!
//! * runc, when started by the runc shim, keeps its state in
//!   `/run/containerd/runc/<containerd namespace>` whatever containerd's `--state` is.
//!   Two daemons that use the same containerd namespace collide there, so every
//!   simulated host must use its own containerd namespace (e.g. `xfer-<lab>-<host>`),
//!   or pass its own runc `root` in the shim's create options.
//! * The runc shim's sockets live in `/run/containerd/s/<hash>`; the hash covers the
//!   daemon's socket address, so distinct sockets do not collide.
//!
//! Containers outlive their daemon: [`ContainerdDaemon::stop`] stops containerd only,
//! the shims and their containers keep running (that is containerd's design). Delete
//! tasks before stopping, or use [`cleanup_state`] which kills them.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use containerd_client::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::RuntimeError;

/// Plugins disabled in the generated config: the CRI plugin (the engine drives containerd
/// through its own API) and snapshotters and tracing plugins that are not used here.
/// Disabling them also keeps the log free of "skip plugin" noise.
pub const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
];

/// Longest path a unix socket address can hold (`sizeof(sun_path) - 1`).
const MAX_SOCKET_PATH: usize = 107;

/// Name of the generated config file, written into the state directory.
pub const CONFIG_FILE_NAME: &str = "xfer-containerd.toml";

/// How to run one private containerd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// containerd's persistent root (`root` in the config): content, snapshots, metadata.
    pub root: PathBuf,
    /// containerd's state directory (`state`): task bundles, the generated config file.
    pub state: PathBuf,
    /// gRPC socket (`[grpc] address`); the ttrpc socket is this path plus `.ttrpc`.
    /// At most 107 bytes long (a unix socket address limit).
    pub socket: PathBuf,
    /// File that receives containerd's stdout and stderr (appended to).
    pub log_file: PathBuf,
    /// Network namespace to run containerd in, e.g. `/run/netns/NAME`. Only the network
    /// namespace is entered.
    pub netns: Option<PathBuf>,
    /// The containerd binary (looked up in `PATH` if not absolute). Default `containerd`.
    pub binary: PathBuf,
    /// containerd's log level (`[debug] level`). Default `info`.
    pub log_level: String,
    /// How long [`ContainerdDaemon::start`] waits for the socket to answer. Default 30 s.
    pub start_timeout: Duration,
    /// How long [`ContainerdDaemon::stop`] waits after SIGTERM before SIGKILL. Default 10 s.
    pub stop_timeout: Duration,
}

impl DaemonConfig {
    /// A config with the given directories and defaults for everything else.
    pub fn new(
        root: impl Into<PathBuf>,
        state: impl Into<PathBuf>,
        socket: impl Into<PathBuf>,
        log_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            root: root.into(),
            state: state.into(),
            socket: socket.into(),
            log_file: log_file.into(),
            netns: None,
            binary: PathBuf::from("containerd"),
            log_level: "info".to_string(),
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
        }
    }

    /// Everything under one directory: `base/root`, `base/state`, `base/containerd.sock`
    /// and `base/containerd.log`.
    pub fn in_dir(base: impl AsRef<Path>) -> Self {
        let base = base.as_ref();
        Self::new(
            base.join("root"),
            base.join("state"),
            base.join("containerd.sock"),
            base.join("containerd.log"),
        )
    }

    /// Run the daemon in this network namespace (e.g. `/run/netns/NAME`).
    pub fn with_netns(mut self, netns: impl Into<PathBuf>) -> Self {
        self.netns = Some(netns.into());
        self
    }

    /// Path of the generated config file (`<state>/xfer-containerd.toml`).
    pub fn config_file(&self) -> PathBuf {
        self.state.join(CONFIG_FILE_NAME)
    }

    /// The ttrpc socket path (`<socket>.ttrpc`).
    pub fn ttrpc_socket(&self) -> PathBuf {
        let mut s = self.socket.clone().into_os_string();
        s.push(".ttrpc");
        PathBuf::from(s)
    }

    /// The version-2 containerd config file for this daemon.
    pub fn render_config(&self) -> Result<String, RuntimeError> {
        let root = toml_path(&self.root)?;
        let state = toml_path(&self.state)?;
        let grpc = toml_path(&self.socket)?;
        let ttrpc = toml_path(&self.ttrpc_socket())?;
        let opt = toml_path(&self.root.join("opt"))?;
        let disabled = DISABLED_PLUGINS
            .iter()
            .map(|p| toml_str(p))
            .collect::<Vec<_>>()
            .join(", ");
        let level = toml_str(&self.log_level);
        Ok(format!(
            "# Generated by xfer-runtime for a private containerd instance.\n\
             version = 2\n\
             root = {root}\n\
             state = {state}\n\
             disabled_plugins = [{disabled}]\n\
             \n\
             [grpc]\n  address = {grpc}\n\
             \n\
             [ttrpc]\n  address = {ttrpc}\n\
             \n\
             [debug]\n  address = \"\"\n  level = {level}\n\
             \n\
             [metrics]\n  address = \"\"\n\
             \n\
             [plugins]\n\
             \x20 [plugins.\"io.containerd.internal.v1.opt\"]\n    path = {opt}\n"
        ))
    }
}

fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> Result<String, RuntimeError> {
    let s = p
        .to_str()
        .ok_or_else(|| RuntimeError::Invalid(format!("path {} is not UTF-8", p.display())))?;
    if !p.is_absolute() {
        return Err(RuntimeError::Invalid(format!(
            "containerd paths must be absolute: {}",
            p.display()
        )));
    }
    Ok(toml_str(s))
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let path = path.to_path_buf();
    move |source| RuntimeError::Io { op, path, source }
}

/// Connect a containerd client to `socket`.
pub async fn connect(socket: impl AsRef<Path>) -> Result<Client, RuntimeError> {
    let path = socket.as_ref();
    Client::from_path(path)
        .await
        .map_err(|source| RuntimeError::Connect {
            path: path.to_path_buf(),
            source,
        })
}

/// Ask the daemon at `socket` for its version; `Ok(version)` once it answers.
pub async fn version(socket: impl AsRef<Path>) -> Result<String, RuntimeError> {
    let client = connect(socket).await?;
    let resp = client
        .version()
        .version(())
        .await
        .map_err(|source| RuntimeError::Containerd {
            op: "version".to_string(),
            source,
        })?;
    Ok(resp.into_inner().version)
}

/// The last `lines` lines of a log file (empty if unreadable). Reads at most 64 KiB.
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX && f.seek(SeekFrom::Start(len - MAX)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running private containerd. Stopped (SIGTERM, then SIGKILL) by [`stop`](Self::stop)
/// or, as a fallback, when dropped.
#[derive(Debug)]
pub struct ContainerdDaemon {
    cfg: DaemonConfig,
    child: Option<Child>,
    pid: u32,
    version: String,
}

impl ContainerdDaemon {
    /// Write the config, spawn `containerd --config <file>` (inside `cfg.netns` if set)
    /// and wait until its socket answers `Version`. Fails with [`RuntimeError::Daemon`]
    /// (carrying the tail of the log file) if containerd exits or does not answer within
    /// `cfg.start_timeout`; the process is killed in that case.
    pub async fn start(cfg: DaemonConfig) -> Result<Self, RuntimeError> {
        let socket_len = cfg.socket.as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            return Err(RuntimeError::Invalid(format!(
                "socket path {} is {socket_len} bytes; unix sockets allow at most {MAX_SOCKET_PATH}",
                cfg.socket.display()
            )));
        }
        let config_text = cfg.render_config()?;
        for dir in [&cfg.root, &cfg.state] {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        for file in [&cfg.socket, &cfg.log_file] {
            if let Some(parent) = file.parent() {
                fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
            }
        }
        if cfg.socket.exists() {
            if let Ok(Ok(v)) =
                tokio::time::timeout(Duration::from_secs(2), version(&cfg.socket)).await
            {
                return Err(RuntimeError::Invalid(format!(
                    "a containerd ({v}) already answers on {}",
                    cfg.socket.display()
                )));
            }
            fs::remove_file(&cfg.socket).map_err(io_err("remove stale socket", &cfg.socket))?;
        }
        let config_file = cfg.config_file();
        fs::write(&config_file, config_text).map_err(io_err("write", &config_file))?;

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&cfg.log_file)
            .map_err(io_err("open log", &cfg.log_file))?;
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicate log fd", &cfg.log_file))?;

        let mut cmd = Command::new(&cfg.binary);
        cmd.arg("--config")
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));

        // Opened before fork (O_CLOEXEC, so the daemon does not inherit it); the child
        // only calls setns on it.
        let netns_file = match &cfg.netns {
            Some(path) => Some(File::open(path).map_err(io_err("open netns", path))?),
            None => None,
        };
        if let Some(ns) = netns_file.as_ref() {
            use std::os::fd::AsRawFd;
            let fd = ns.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec. It only performs
            // the setns(2) system call on a descriptor opened by the parent before fork
            // (still valid in the child: `netns_file` outlives `spawn`), and builds an
            // io::Error from the raw errno. It neither allocates nor takes locks, so it is
            // async-signal-safe. Only CLONE_NEWNET is requested: the mount namespace stays
            // the parent's.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            program: cfg.binary.display().to_string(),
            source,
        })?;
        drop(netns_file);
        let pid = child.id();
        tracing::debug!(pid, socket = %cfg.socket.display(), "containerd spawned");

        let mut daemon = Self {
            cfg,
            child: Some(child),
            pid,
            version: String::new(),
        };
        match daemon.wait_ready().await {
            Ok(v) => {
                daemon.version = v;
                Ok(daemon)
            }
            Err(e) => {
                daemon.kill_now();
                Err(e)
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<String, RuntimeError> {
        let started = Instant::now();
        let deadline = started + self.cfg.start_timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(RuntimeError::Daemon {
                        reason: format!(
                            "containerd (pid {}) exited with {status} before answering on {}",
                            self.pid,
                            self.cfg.socket.display()
                        ),
                        log_tail: log_tail(&self.cfg.log_file, 40),
                    });
                }
            }
            if self.cfg.socket.exists() {
                let attempt =
                    tokio::time::timeout(Duration::from_secs(2), version(&self.cfg.socket)).await;
                if let Ok(Ok(v)) = attempt {
                    tracing::debug!(
                        pid = self.pid,
                        version = %v,
                        ms = started.elapsed().as_millis() as u64,
                        "containerd answers"
                    );
                    return Ok(v);
                }
            }
            if Instant::now() >= deadline {
                return Err(RuntimeError::Daemon {
                    reason: format!(
                        "containerd (pid {}) did not answer Version on {} within {:?}",
                        self.pid,
                        self.cfg.socket.display(),
                        self.cfg.start_timeout
                    ),
                    log_tail: log_tail(&self.cfg.log_file, 40),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.cfg.socket
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The version string containerd reported when it came up.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The config the daemon was started with.
    pub fn config(&self) -> &DaemonConfig {
        &self.cfg
    }

    /// The last `lines` lines of the daemon's log file.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.cfg.log_file, lines)
    }

    /// A new client connected to the daemon's socket.
    pub async fn client(&self) -> Result<Client, RuntimeError> {
        connect(&self.cfg.socket).await
    }

    /// Whether the process is still running (not yet exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stop the daemon: SIGTERM, wait up to `stop_timeout`, then SIGKILL. Returns the exit
    /// status. Shims and containers started by the daemon keep running (see the module
    /// docs).
    pub async fn stop(mut self) -> Result<ExitStatus, RuntimeError> {
        let Some(mut child) = self.child.take() else {
            return Err(RuntimeError::Daemon {
                reason: format!("containerd (pid {}) was already reaped", self.pid),
                log_tail: self.log_tail(20),
            });
        };
        let pid = Pid::from_raw(self.pid as i32);
        if let Some(status) = child.try_wait().map_err(io_err("wait", &self.cfg.socket))? {
            return Ok(status);
        }
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + self.cfg.stop_timeout;
        loop {
            if let Some(status) = child.try_wait().map_err(io_err("wait", &self.cfg.socket))? {
                tracing::debug!(pid = self.pid, %status, "containerd stopped");
                return Ok(status);
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tracing::warn!(
            pid = self.pid,
            "containerd ignored SIGTERM; sending SIGKILL"
        );
        let _ = kill(pid, Signal::SIGKILL);
        // SIGKILL cannot be caught: the wait is short.
        loop {
            if let Some(status) = child.try_wait().map_err(io_err("wait", &self.cfg.socket))? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Blocking stop used by `Drop` and failed starts.
    fn kill_now(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_raw(self.pid as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + self.cfg.stop_timeout;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for ContainerdDaemon {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// What [`cleanup_state`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Processes killed (SIGKILL): the daemon, shims and their descendants.
    pub killed: Vec<i32>,
    /// Mount points detached, in the order they were unmounted.
    pub unmounted: Vec<PathBuf>,
    /// Directories removed.
    pub removed: Vec<PathBuf>,
}

/// Clear what a (crashed) daemon left under `root` and `state`: kill processes that use
/// those directories (a process whose working directory or command line refers to them,
/// i.e. containerd itself and its runc shims, plus all their descendants, i.e. the
/// containers), unmount every mount at or below them (deepest first, `MNT_DETACH`) and
/// remove both directories. Missing directories are fine. runc's own state in
/// `/run/containerd/runc/<namespace>` is not touched (see the module docs).
pub fn cleanup_state(root: &Path, state: &Path) -> Result<CleanupReport, RuntimeError> {
    cleanup_paths(&[root, state])
}

/// [`cleanup_state`] for any set of directories.
pub fn cleanup_paths(dirs: &[&Path]) -> Result<CleanupReport, RuntimeError> {
    let mut report = CleanupReport::default();
    let dirs: Vec<PathBuf> = dirs
        .iter()
        .filter(|d| d.exists())
        .map(|d| fs::canonicalize(d).map_err(io_err("canonicalize", d)))
        .collect::<Result<_, _>>()?;
    if dirs.is_empty() {
        return Ok(report);
    }

    report.killed = kill_users(&dirs);

    // Unmount until nothing is left (stacked mounts need several rounds).
    for _round in 0..64 {
        let mounts = mounts_under(&dirs)?;
        if mounts.is_empty() {
            break;
        }
        let mut progress = false;
        let mut last_err = None;
        for m in mounts {
            match nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => {
                    progress = true;
                    report.unmounted.push(m);
                }
                Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => last_err = Some((m, e)),
            }
        }
        if !progress {
            if let Some((m, e)) = last_err {
                return Err(RuntimeError::Io {
                    op: "umount",
                    path: m,
                    source: std::io::Error::from_raw_os_error(e as i32),
                });
            }
            break;
        }
    }
    let left = mounts_under(&dirs)?;
    if let Some(m) = left.first() {
        return Err(RuntimeError::Invalid(format!(
            "{} mount(s) left under {:?} after cleanup, e.g. {}",
            left.len(),
            dirs,
            m.display()
        )));
    }

    for d in &dirs {
        match fs::remove_dir_all(d) {
            Ok(()) => report.removed.push(d.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RuntimeError::Io {
                    op: "remove directory",
                    path: d.clone(),
                    source,
                })
            }
        }
    }
    Ok(report)
}

fn is_under(path: &Path, dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|d| path.starts_with(d))
}

/// Mount points at or below `dirs` (as seen in /proc/self/mountinfo), deepest first;
/// among equal depth, later mounts first.
pub fn mounts_under(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, RuntimeError> {
    let info_path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(info_path).map_err(io_err("read", info_path))?;
    let mut found: Vec<(usize, usize, PathBuf)> = parse_mountinfo(&text)
        .into_iter()
        .enumerate()
        .filter(|(_, m)| is_under(m, dirs))
        .map(|(i, m)| (m.components().count(), i, m))
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    Ok(found.into_iter().map(|(_, _, m)| m).collect())
}

/// Mount points (5th field) of a mountinfo text, with `\ooo` escapes decoded.
pub fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

fn unescape_octal(s: &str) -> String {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    std::ffi::OsString::from_vec(out)
        .to_string_lossy()
        .into_owned()
}

/// SIGKILL every process whose cwd or command line refers to `dirs`, and all their
/// descendants; wait (up to 10 s) until they are gone. Returns the killed pids.
fn kill_users(dirs: &[PathBuf]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut parent_of: HashMap<i32, i32> = HashMap::new();
    let mut roots = BTreeSet::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = e.path();
        if let Some(ppid) = proc_ppid(pid) {
            parent_of.insert(pid, ppid);
        }
        let cwd_hit = fs::read_link(base.join("cwd"))
            .map(|p| is_under(&p, dirs))
            .unwrap_or(false);
        let cmd_hit = fs::read(base.join("cmdline"))
            .map(|raw| {
                raw.split(|b| *b == 0).any(|arg| {
                    let arg = String::from_utf8_lossy(arg);
                    let arg = arg.split_once('=').map(|(_, v)| v).unwrap_or(&arg);
                    arg.starts_with('/') && is_under(Path::new(arg), dirs)
                })
            })
            .unwrap_or(false);
        if cwd_hit || cmd_hit {
            roots.insert(pid);
        }
    }
    // Never kill ourselves or an ancestor of ours.
    let mut ancestors = BTreeSet::new();
    let mut cur = me;
    while let Some(p) = parent_of.get(&cur).copied().or_else(|| proc_ppid(cur)) {
        if p <= 1 || !ancestors.insert(p) {
            break;
        }
        cur = p;
    }
    let mut victims = roots.clone();
    loop {
        let before = victims.len();
        for (&pid, &ppid) in &parent_of {
            if victims.contains(&ppid) {
                victims.insert(pid);
            }
        }
        if victims.len() == before {
            break;
        }
    }
    victims.retain(|p| *p != me && !ancestors.contains(p));
    for &pid in &victims {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Reap those that are our children; ECHILD for the others is fine.
        for &pid in &victims {
            let _ = nix::sys::wait::waitpid(
                Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        if victims.iter().all(|&p| !proc_alive(p)) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    victims.into_iter().collect()
}

fn proc_stat(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// (state, ppid) from /proc/PID/stat; the comm field may contain spaces and parens.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

fn proc_ppid(pid: i32) -> Option<i32> {
    proc_stat(pid).and_then(|s| parse_stat(&s)).map(|(_, p)| p)
}

/// Alive = exists and is not a zombie (or dead).
fn proc_alive(pid: i32) -> bool {
    match proc_stat(pid).and_then(|s| parse_stat(&s)) {
        Some((state, _)) => !matches!(state, 'Z' | 'X' | 'x'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_octal_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            parse_mountinfo(text),
            vec![PathBuf::from("/mnt/with space"), PathBuf::from("/proc")]
        );
        assert_eq!(unescape_octal("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_octal("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn stat_with_odd_comm() {
        assert_eq!(
            parse_stat("123 (a) b (c) S 45 123 123 0 -1"),
            Some(('S', 45))
        );
    }

    #[test]
    fn config_renders() {
        let cfg = DaemonConfig::in_dir("/tmp/x \"y\"");
        let text = cfg.render_config().expect("render");
        assert!(text.contains("version = 2"));
        assert!(text.contains("root = \"/tmp/x \\\"y\\\"/root\""));
        assert!(text.contains("\"io.containerd.grpc.v1.cri\""));
        assert!(text.contains("[ttrpc]\n  address = \"/tmp/x \\\"y\\\"/containerd.sock.ttrpc\""));
        assert!(DaemonConfig::new("rel", "/s", "/s/c.sock", "/l")
            .render_config()
            .is_err());
    }
}
