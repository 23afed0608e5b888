//! Post-copy (lazy pages) with CRIU and runc.
//!
//! containerd's runc shim has no lazy-pages option, so the source side runs `runc
//! checkpoint --lazy-pages` itself, against the shim's runc state (the same container,
//! the same CRIU configuration file from the spec annotation). CRIU then dumps
//! everything but the task's private anonymous memory, reports readiness on a status
//! pipe and serves the remaining pages from a page server until the destination's
//! `criu lazy-pages` daemon has taken every one. The destination restores through
//! containerd as usual, with a per-migration CRIU configuration that adds `lazy-pages`;
//! its restored task then faults its memory in through userfaultfd while the daemon
//! also pushes the rest in the background.
//!
//! Killing the dumping CRIU before the destination confirmed detaches it from the
//! task, which carries on (frozen, if it was paused) with its memory intact: that is
//! the rollback.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::error::RuntimeError;

/// CRIU grows its page pipes up to this size; without CAP_SYS_RESOURCE it cannot go
/// past `fs.pipe-max-size`, and a lazy transfer then fails ("page-pipe: tee: ...
/// Operation not permitted").
pub const PIPE_MAX_SIZE: u64 = 4 * 1024 * 1024;

const PIPE_MAX_PATH: &str = "/proc/sys/fs/pipe-max-size";

/// Raises `fs.pipe-max-size` to [`PIPE_MAX_SIZE`] if it is lower; returns the value
/// found (the caller may put it back when no lazy migration runs any more).
pub fn ensure_pipe_max_size() -> Result<u64, RuntimeError> {
    let io = |op, source| RuntimeError::Io {
        op,
        path: PathBuf::from(PIPE_MAX_PATH),
        source,
    };
    let text = std::fs::read_to_string(PIPE_MAX_PATH).map_err(|e| io("read", e))?;
    let cur: u64 = text
        .trim()
        .parse()
        .map_err(|_| RuntimeError::Invalid(format!("{PIPE_MAX_PATH} holds {text:?}")))?;
    if cur < PIPE_MAX_SIZE {
        std::fs::write(PIPE_MAX_PATH, PIPE_MAX_SIZE.to_string()).map_err(|e| io("write", e))?;
    }
    Ok(cur)
}

/// Kills a helper's whole process group (runc and the CRIU it started).
fn kill_group(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

fn spawn_err(program: &str) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Spawn {
        program: program.to_string(),
        source,
    }
}

/// A lazy dump in progress at the source: CRIU has written every image but the lazy
/// memory and serves that memory on `listen` until the destination took it all.
#[derive(Debug)]
pub struct LazyDump {
    child: Child,
    work_dir: PathBuf,
    runc_root: PathBuf,
    id: String,
    /// How long CRIU took to be ready (everything but lazy memory dumped).
    pub ready_after: Duration,
}

impl LazyDump {
    /// Starts `runc checkpoint --lazy-pages` of container `id` (state under
    /// `runc_root`), serving pages on `listen`, and waits until CRIU is ready.
    /// The task stays as it was afterwards (`--leave-running`; frozen if paused), so a
    /// failed migration can resume it.
    pub async fn start(
        runc_root: &Path,
        id: &str,
        image_dir: &Path,
        work_dir: &Path,
        listen: SocketAddr,
    ) -> Result<Self, RuntimeError> {
        crate::containerd::create_checkpoint_dirs(image_dir, work_dir)?;
        let (rd, wr): (OwnedFd, OwnedFd) =
            nix::unistd::pipe().map_err(|e| RuntimeError::Spawn {
                program: "pipe for runc's --status-fd".into(),
                source: e.into(),
            })?;
        // The read end stays here; the write end is inherited under its own number.
        nix::fcntl::fcntl(
            &rd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| RuntimeError::Spawn {
            program: "fcntl on the status pipe".into(),
            source: e.into(),
        })?;
        let t = Instant::now();
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(runc_root)
            .arg("checkpoint")
            .arg("--image-path")
            .arg(image_dir)
            .arg("--work-path")
            .arg(work_dir)
            .args(["--tcp-established", "--file-locks", "--leave-running"])
            .arg("--lazy-pages")
            .arg("--page-server")
            .arg(listen.to_string())
            .arg("--status-fd")
            .arg(wr.as_raw_fd().to_string())
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(spawn_err("runc checkpoint --lazy-pages"))?;
        drop(wr);
        let mut status = tokio::net::unix::pipe::Receiver::from_owned_fd(rd).map_err(|e| {
            RuntimeError::Spawn {
                program: "status pipe".into(),
                source: e,
            }
        })?;
        let mut byte = [0u8; 1];
        let mut dump = LazyDump {
            child,
            work_dir: work_dir.to_path_buf(),
            runc_root: runc_root.to_path_buf(),
            id: id.to_string(),
            ready_after: Duration::ZERO,
        };
        enum Outcome {
            Ready,
            Closed,
            Exited(String),
            Timeout,
        }
        let outcome = tokio::select! {
            r = status.read(&mut byte) => match r {
                Ok(1) => Outcome::Ready,
                _ => Outcome::Closed,
            },
            st = dump.child.wait() => Outcome::Exited(match st {
                Ok(s) => format!("runc checkpoint --lazy-pages exited ({s}) before CRIU was ready"),
                Err(e) => format!("waiting for runc checkpoint: {e}"),
            }),
            _ = tokio::time::sleep(Duration::from_secs(60)) => Outcome::Timeout,
        };
        match outcome {
            Outcome::Ready => {
                dump.ready_after = t.elapsed();
                Ok(dump)
            }
            Outcome::Closed => Err(dump
                .failure("CRIU closed its status pipe before it was ready")
                .await),
            Outcome::Exited(why) => Err(dump.failure(&why).await),
            Outcome::Timeout => Err(dump.failure("CRIU was not ready after 60 s").await),
        }
    }

    async fn failure(&mut self, why: &str) -> RuntimeError {
        kill_group(&self.child);
        let _ = self.child.wait().await;
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr).await;
        }
        RuntimeError::Invalid(format!(
            "lazy checkpoint of {}: {why}: {} ({})",
            self.id,
            stderr.trim(),
            crate::containerd::criu_log_tail(&self.work_dir)
        ))
    }

    /// Waits until the destination has taken every lazy page (CRIU exits).
    pub async fn finish(mut self) -> Result<(), RuntimeError> {
        let st = self
            .child
            .wait()
            .await
            .map_err(spawn_err("wait for runc checkpoint --lazy-pages"))?;
        if st.success() {
            Ok(())
        } else {
            Err(self
                .failure(&format!("the lazy transfer ended with {st}"))
                .await)
        }
    }

    /// Stops serving pages: CRIU lets go of the task, memory intact. CRIU thaws the
    /// cgroup it seized through, so the task is frozen again here: containerd still
    /// holds it paused, and its resume must find it so.
    pub async fn abort(mut self) {
        kill_group(&self.child);
        let _ = self.child.wait().await;
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["pause", &self.id])
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(
                id = %self.id,
                stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                "runc pause after an aborted lazy dump"
            ),
            Err(e) => {
                tracing::warn!(id = %self.id, error = %e, "runc pause after an aborted lazy dump")
            }
        }
    }
}

/// The destination's `criu lazy-pages` daemon: it takes the pages a lazily restored
/// task faults on (and then all the others) from the source's page server.
#[derive(Debug)]
pub struct LazyPagesDaemon {
    child: Child,
    work_dir: PathBuf,
    started: Instant,
}

/// Name of the socket through which CRIU's restore reaches the lazy-pages daemon, in
/// their common work directory.
pub const LAZY_SOCKET: &str = "lazy-pages.socket";

impl LazyPagesDaemon {
    /// Starts the daemon on the images in `image_dir` (the same directory and work
    /// directory the restore uses) and waits until its socket is there.
    pub async fn start(
        image_dir: &Path,
        work_dir: &Path,
        page_server: SocketAddr,
    ) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(work_dir).map_err(|source| RuntimeError::Io {
            op: "create lazy-pages work directory",
            path: work_dir.to_path_buf(),
            source,
        })?;
        let mut child = Command::new("criu")
            .arg("lazy-pages")
            .arg("--page-server")
            .arg("--address")
            .arg(page_server.ip().to_string())
            .arg("--port")
            .arg(page_server.port().to_string())
            .arg("-D")
            .arg(image_dir)
            .arg("-W")
            .arg(work_dir)
            .args(["-o", "lazy-pages.log", "-v4"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err("criu lazy-pages"))?;
        let sock = work_dir.join(LAZY_SOCKET);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if sock.exists() {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(RuntimeError::Invalid(format!(
                    "criu lazy-pages exited ({st}) before it listened: {}",
                    log_tail(&work_dir.join("lazy-pages.log"))
                )));
            }
            if Instant::now() > deadline {
                kill_group(&child);
                let _ = child.wait().await;
                return Err(RuntimeError::Invalid(format!(
                    "criu lazy-pages did not create {} within 10 s",
                    sock.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(LazyPagesDaemon {
            child,
            work_dir: work_dir.to_path_buf(),
            started: Instant::now(),
        })
    }

    /// Waits until every page is across (the daemon exits); returns how long the
    /// daemon ran.
    pub async fn finish(mut self) -> Result<Duration, RuntimeError> {
        let st = self
            .child
            .wait()
            .await
            .map_err(spawn_err("wait for criu lazy-pages"))?;
        if st.success() {
            Ok(self.started.elapsed())
        } else {
            Err(RuntimeError::Invalid(format!(
                "criu lazy-pages ended with {st}: {}",
                log_tail(&self.work_dir.join("lazy-pages.log"))
            )))
        }
    }

    /// Stops the daemon (a restore that failed).
    pub async fn abort(mut self) {
        kill_group(&self.child);
        let _ = self.child.wait().await;
    }
}

fn log_tail(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|t| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(5)..].join(" | ")
        })
        .unwrap_or_else(|_| format!("no log at {}", path.display()))
}

/// Memory a lazy dump left to the page server, in bytes: the pages its pagemap images
/// flag lazy.
pub fn lazy_bytes(image_dir: &Path) -> Result<u64, RuntimeError> {
    let mut total = 0u64;
    let rd = std::fs::read_dir(image_dir).map_err(|source| RuntimeError::Io {
        op: "list",
        path: image_dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("pagemap-") && name.ends_with(".img") {
            let data = std::fs::read(e.path()).map_err(|source| RuntimeError::Io {
                op: "read",
                path: e.path(),
                source,
            })?;
            total += pagemap::lazy_pages(&data).map_err(|why| {
                RuntimeError::Invalid(format!("pagemap image {}: {why}", e.path().display()))
            })? * 4096;
        }
    }
    Ok(total)
}

/// CRIU's pagemap image: two magic numbers, then length-prefixed protobuf messages
/// (a `PagemapHead`, then one `PagemapEntry` per run of pages).
pub mod pagemap {
    /// CRIU marks a pagemap entry's pages lazy with this flag.
    pub const PE_LAZY: u32 = 1 << 1;

    #[derive(Clone, PartialEq, prost::Message)]
    struct PagemapEntry {
        #[prost(uint64, required, tag = "1")]
        vaddr: u64,
        #[prost(uint32, required, tag = "2")]
        nr_pages: u32,
        #[prost(bool, optional, tag = "3")]
        in_parent: Option<bool>,
        #[prost(uint32, optional, tag = "4")]
        flags: Option<u32>,
        /// CRIU >= 4 counts pages here (64-bit) and leaves `nr_pages` 0.
        #[prost(uint64, optional, tag = "5")]
        pages: Option<u64>,
    }

    /// Counts the pages flagged lazy; fails on a truncated or malformed image.
    pub fn lazy_pages(data: &[u8]) -> Result<u64, String> {
        use prost::Message;
        if data.len() < 8 {
            return Err("shorter than its magic numbers".into());
        }
        let mut rest = &data[8..];
        let mut first = true;
        let mut pages = 0u64;
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err("truncated entry length".into());
            }
            let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let body = rest
                .get(4..4 + n)
                .ok_or_else(|| format!("entry of {n} bytes runs past the end"))?;
            rest = &rest[4 + n..];
            if first {
                // PagemapHead { pages_id }
                first = false;
                continue;
            }
            let e = PagemapEntry::decode(body).map_err(|e| format!("entry: {e}"))?;
            if e.flags.unwrap_or(0) & PE_LAZY != 0 {
                pages += e.pages.unwrap_or(u64::from(e.nr_pages));
            }
        }
        Ok(pages)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use prost::Message;

        fn image(entries: &[(u32, u32)]) -> Vec<u8> {
            image_with(entries, false)
        }

        fn image_with(entries: &[(u32, u32)], new_count: bool) -> Vec<u8> {
            let mut out = vec![0u8; 8];
            let head = [0x08u8, 0x01]; // pages_id = 1
            out.extend_from_slice(&(head.len() as u32).to_le_bytes());
            out.extend_from_slice(&head);
            for (i, &(nr, flags)) in entries.iter().enumerate() {
                let e = PagemapEntry {
                    vaddr: 0x1000 * i as u64,
                    nr_pages: if new_count { 0 } else { nr },
                    in_parent: None,
                    flags: Some(flags),
                    pages: new_count.then_some(u64::from(nr)),
                };
                let b = e.encode_to_vec();
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(&b);
            }
            out
        }

        #[test]
        fn only_lazy_entries_count() {
            let img = image(&[(3, PE_LAZY), (5, 4), (7, PE_LAZY | 4)]);
            assert_eq!(lazy_pages(&img), Ok(10));
            assert_eq!(lazy_pages(&image(&[])), Ok(0));
            // CRIU 4 writes the count in field 5.
            let img = image_with(&[(3, PE_LAZY), (5, 4), (7, PE_LAZY | 4)], true);
            assert_eq!(lazy_pages(&img), Ok(10));
        }

        #[test]
        fn a_real_criu_4_pagemap_entry_decodes() {
            // vaddr, nr_pages 0, flags PE_LAZY, pages 0x5d (bytes from a lazy dump).
            let mut img = vec![0u8; 8];
            img.extend_from_slice(&[2, 0, 0, 0, 0x08, 0x01]);
            let e = [
                0x08, 0x80, 0xe0, 0xc5, 0xf7, 0xeb, 0xbc, 0x15, 0x10, 0x00, 0x20, 0x02, 0x28, 0x5d,
            ];
            img.extend_from_slice(&(e.len() as u32).to_le_bytes());
            img.extend_from_slice(&e);
            assert_eq!(lazy_pages(&img), Ok(0x5d));
        }

        #[test]
        fn truncated_images_are_refused() {
            let img = image(&[(3, PE_LAZY)]);
            for cut in [4, 9, img.len() - 1] {
                assert!(lazy_pages(&img[..cut]).is_err(), "cut at {cut}");
            }
        }
    }
}
