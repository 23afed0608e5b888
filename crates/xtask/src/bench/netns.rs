//! Work inside a named network namespace from a thread of this process: waiting for a
//! redis server to answer PING, and sending a file over a lab link.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Path of a namespace made by `ip netns add NAME` (or the lab).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Moves the calling thread (only it) into the network namespace at `path`.
fn enter(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns is given a file descriptor that stays open for the duration of the
    // call (`f` lives until the end of this function) and CLONE_NEWNET, which changes only
    // the calling thread's network namespace; no memory is passed to the kernel.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns into {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `f` on a new thread inside the network namespace `ns` (None: this one).
fn spawn_in<T: Send + 'static>(
    ns: Option<String>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            enter(&netns_path(&ns))?;
        }
        f()
    })
}

fn join<T>(h: std::thread::JoinHandle<Result<T>>, what: &str) -> Result<T> {
    match h.join() {
        Ok(r) => r,
        Err(_) => bail!("{what}: the helper thread panicked"),
    }
}

/// One `PING` over a fresh connection; true on `+PONG`.
pub fn ping_once(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    if s.set_read_timeout(Some(Duration::from_millis(500)))
        .is_err()
        || s.write_all(b"PING\r\n").is_err()
    {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Polls `PING` (1 ms apart) on `addr`, from inside namespace `ns` (None: this one),
/// until it answers; returns when it did, or fails after `timeout`.
pub fn wait_for_pong(ns: Option<&str>, addr: SocketAddr, timeout: Duration) -> Result<Instant> {
    let ns_name = ns.map(str::to_string);
    let h = spawn_in(ns_name, move || {
        let deadline = Instant::now() + timeout;
        loop {
            if ping_once(addr) {
                return Ok(Instant::now());
            }
            if Instant::now() >= deadline {
                bail!(
                    "redis at {addr} did not answer PING within {:.1} s",
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    join(h, "wait for PING")
}

/// Sends `file` over TCP from this namespace to a receiver listening on `listen` inside
/// namespace `ns`, which writes it to `dest`. Returns the bytes received and the time
/// from connecting to the receiver having written the last byte.
pub fn copy_over_link(
    file: &Path,
    ns: &str,
    listen: Ipv4Addr,
    dest: &Path,
) -> Result<(u64, Duration)> {
    let (port_tx, port_rx) = mpsc::channel::<u16>();
    let dest_owned = dest.to_path_buf();
    let receiver = spawn_in(Some(ns.to_string()), move || {
        let l = TcpListener::bind((listen, 0)).with_context(|| format!("listen on {listen}"))?;
        let port = l.local_addr()?.port();
        port_tx.send(port).context("hand the port over")?;
        let (mut s, _) = l.accept().context("accept the sender")?;
        let mut out = File::create(&dest_owned)
            .with_context(|| format!("create {}", dest_owned.display()))?;
        let n = std::io::copy(&mut s, &mut out).context("receive")?;
        out.sync_all().ok();
        Ok((n, Instant::now()))
    });
    let port = match port_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(p) => p,
        Err(_) => {
            // The receiver failed before listening: report its error.
            join(receiver, "link receiver")?;
            bail!("the link receiver in {ns} did not start listening");
        }
    };
    let addr = SocketAddr::from((listen, port));
    let mut src = File::open(file).with_context(|| format!("open {}", file.display()))?;
    let t0 = Instant::now();
    let sent = (|| -> Result<u64> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect to {addr} in {ns}"))?;
        let n = std::io::copy(&mut src, &mut s).context("send")?;
        s.shutdown(std::net::Shutdown::Write).context("shutdown")?;
        Ok(n)
    })();
    let sent = match sent {
        Ok(n) => n,
        Err(e) => {
            // Unblock a receiver still waiting in accept().
            let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(200));
            let _ = join(receiver, "link receiver");
            return Err(e);
        }
    };
    let (received, done) = join(receiver, "link receiver")?;
    if received != sent {
        bail!("sent {sent} bytes over the link to {addr}, but {received} arrived");
    }
    Ok((received, done.duration_since(t0)))
}
