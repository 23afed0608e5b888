//! A private etcd-server for tests, examples and benchmarks: a temporary data
//! directory, free loopback ports, killed and removed when dropped (also while a
//! panicking test unwinds).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::KbError;

/// A running etcd-server. It is killed when dropped, and also (PR_SET_PDEATHSIG) when
/// the thread that started it exits, so start it from a thread that outlives it
/// (a test's thread, a current-thread runtime).
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, KbError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| KbError::StartEtcd {
            what: "finding a free loopback port".into(),
            source: Some(source),
        })
}

/// The `etcd` binary on PATH.
pub fn etcd_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

impl EtcdServer {
    /// Starts etcd (`etcd` on PATH, Debian package etcd-server) on loopback and waits
    /// until it answers.
    pub async fn start() -> Result<EtcdServer, KbError> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST).await
    }

    /// [`EtcdServer::start`], its client and peer URLs on address `ip` (e.g. an
    /// address other network namespaces reach).
    pub async fn start_on(ip: std::net::Ipv4Addr) -> Result<EtcdServer, KbError> {
        let bin = etcd_binary().ok_or_else(|| KbError::StartEtcd {
            what: "the `etcd` binary is not on PATH (Debian package etcd-server; \
                   `cargo xtask setup` installs it)"
                .into(),
            source: None,
        })?;
        let dir = tempfile::tempdir().map_err(|source| KbError::StartEtcd {
            what: "creating its data directory".into(),
            source: Some(source),
        })?;
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://{ip}:{client}");
        let peer_url = format!("http://{ip}:{peer}");
        let mut cmd = Command::new(&bin);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl, which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // etcd dies with the thread that started it, even if this process
                // is killed before it can drop the server.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .arg("--name=xfer-kb")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=xfer-kb={peer_url}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| KbError::StartEtcd {
                what: format!("running {}", bin.display()),
                source: Some(source),
            })?;
        let server = EtcdServer { child, dir, url };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([&server.url], None).await {
                if c.get("probe", None).await.is_ok() {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                return Err(KbError::StartEtcd {
                    what: format!("etcd did not answer at {} within 30 s", server.url),
                    source: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its client URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Its resident set size in bytes (from /proc).
    pub fn rss(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}
