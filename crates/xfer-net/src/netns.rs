//! Named network namespaces (iproute2-compatible) and running code or
//! programs inside them.
//!
//! Everything here is blocking but quick (a few syscalls and at most one
//! short-lived thread); async callers may call it directly or through
//! `tokio::task::spawn_blocking`.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;

use crate::error::{NetError, NsLabel};
use crate::names::validate_netns_name;

/// The directory holding named network namespaces, as iproute2 uses it.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The path of the named namespace `name` (`/run/netns/<name>`); the name is
/// not validated.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Create the named network namespace `name`, like `ip netns add`.
///
/// A dedicated thread unshares `CLONE_NEWNET` and bind-mounts
/// `/proc/self/task/<tid>/ns/net` onto `/run/netns/<name>`; the thread then
/// exits and the mount keeps the namespace alive. `/run/netns` is made a
/// shared mount first (bind-mounting it onto itself if it is not a mount
/// point yet), exactly as iproute2 does, so `ip netns` sees and can use it.
///
/// The calling thread never changes namespace.
pub fn create_netns(name: &str) -> Result<(), NetError> {
    validate_netns_name(name)?;
    let err = |source| NetError::CreateNetns {
        name: name.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(NETNS_RUN_DIR)
        .map_err(err)?;
    make_run_dir_shared().map_err(err)?;

    let path = netns_path(name);
    // The mount point: an empty file, created exclusively so that a
    // namespace of that name is never replaced.
    let file = nix::fcntl::open(
        &path,
        OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(e.into()))?;
    drop(file);

    let target = path.clone();
    let bound = std::thread::Builder::new()
        .name("xfer-netns-add".into())
        .spawn(move || -> io::Result<()> {
            // Only this thread moves into the new namespace; it exits right
            // after, the bind mount keeps the namespace alive.
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
            let tid = nix::unistd::gettid();
            let source = format!("/proc/self/task/{tid}/ns/net");
            nix::mount::mount(
                Some(source.as_str()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .and_then(|thread| {
            thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the netns thread panicked")))
        });
    if let Err(e) = bound {
        let _ = fs::remove_file(&path);
        return Err(err(e));
    }
    tracing::debug!(netns = name, "created network namespace");
    Ok(())
}

/// Make `/run/netns` a recursively shared mount point, like iproute2: then
/// unmounting a namespace file propagates to other mount namespaces, which
/// lets the namespace be freed.
fn make_run_dir_shared() -> io::Result<()> {
    let mut made_mount_point = false;
    loop {
        match nix::mount::mount(
            None::<&str>,
            NETNS_RUN_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => return Ok(()),
            // EINVAL: not a mount point yet; make it one and retry once.
            Err(Errno::EINVAL) if !made_mount_point => {
                nix::mount::mount(
                    Some(NETNS_RUN_DIR),
                    NETNS_RUN_DIR,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )?;
                made_mount_point = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Delete the named network namespace, like `ip netns delete`: lazily
/// unmount `/run/netns/<name>` and remove the file. The namespace itself
/// disappears once no process, socket or mount holds it any more.
///
/// A leftover file that is not mounted (a crash between creating the file
/// and mounting it) is removed too. Fails with a "not found" error
/// ([`NetError::is_not_found`]) if there is no such namespace.
pub fn delete_netns(name: &str) -> Result<(), NetError> {
    validate_netns_name(name)?;
    let err = |source| NetError::DeleteNetns {
        name: name.to_owned(),
        source,
    };
    let path = netns_path(name);
    match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: the file exists but is not a mount point.
        Ok(()) | Err(Errno::EINVAL) => {}
        Err(e) => return Err(err(e.into())),
    }
    fs::remove_file(&path).map_err(err)?;
    tracing::debug!(netns = name, "deleted network namespace");
    Ok(())
}

/// Names of the named network namespaces (files in `/run/netns`), sorted.
/// An absent `/run/netns` means none.
pub fn list_netns() -> Result<Vec<String>, NetError> {
    let err = |source| NetError::ListNetns {
        dir: NETNS_RUN_DIR.to_owned(),
        source,
    };
    let entries = match fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(err)?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Whether `/run/netns/<name>` exists (it may be a leftover that is not a
/// live namespace; [`delete_netns`] removes those too).
pub fn netns_exists(name: &str) -> Result<bool, NetError> {
    validate_netns_name(name)?;
    netns_path(name)
        .try_exists()
        .map_err(|source| NetError::EnterNetns {
            name: name.to_owned(),
            source,
        })
}

/// Open `/run/netns/<name>` (close-on-exec); the file is a handle on the
/// namespace, usable with `setns(2)`.
pub fn open_netns(name: &str) -> Result<File, NetError> {
    validate_netns_name(name)?;
    File::open(netns_path(name)).map_err(|source| NetError::EnterNetns {
        name: name.to_owned(),
        source,
    })
}

fn enter(ns: &impl AsFd) -> io::Result<()> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Run `f` on a new thread that has entered the named namespace, wait for
/// it and return its result. The calling thread never changes namespace.
///
/// Sockets are bound to the namespace they are created in, so a socket
/// created by `f` (a `TcpListener`, a `TcpStream`, a netlink socket) can be
/// returned and used from any thread afterwards. A panic in `f` is resumed
/// on the caller.
///
/// Blocking: from async code, call it through `tokio::task::spawn_blocking`
/// unless `f` is quick.
pub fn run_in_netns<F, T>(name: &str, f: F) -> Result<T, NetError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let ns = open_netns(name)?;
    let err = |source| NetError::EnterNetns {
        name: name.to_owned(),
        source,
    };
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("xfer-netns-run".into())
            .spawn_scoped(scope, || -> io::Result<T> {
                enter(&ns)?;
                Ok(f())
            })
            .map_err(err)?;
        match thread.join() {
            Ok(result) => result.map_err(err),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Run `f` on a new thread that has entered the named namespace, without
/// blocking the async caller (the result comes back through a channel).
/// `f` must be quick and must not block on the caller's runtime.
pub(crate) async fn run_in_netns_async<F, T>(name: &str, f: F) -> Result<T, NetError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let ns = open_netns(name)?;
    let err = |source| NetError::EnterNetns {
        name: name.to_owned(),
        source,
    };
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("xfer-netns-run".into())
        .spawn(move || {
            let result = enter(&ns).map(|()| f());
            let _ = tx.send(result);
        })
        .map_err(err)?;
    rx.await
        .map_err(|_| err(io::Error::other("the netns thread panicked")))?
        .map_err(err)
}

/// Configure `cmd` so that the program it spawns joins the named network
/// namespace, and only that: unlike `ip netns exec`, the child keeps the
/// caller's mount namespace (no private `/sys` remount, no
/// `/etc/netns/<name>` bind mounts), so daemons such as containerd see the
/// same mounts as the host.
///
/// The namespace file is opened now (close-on-exec) and owned by `cmd`'s
/// `pre_exec` hook, which calls `setns(2)` in the forked child before
/// `exec`; the descriptor is released when `cmd` is dropped. A
/// `tokio::process::Command` built `From` this command keeps the hook.
pub fn command_in_netns(cmd: &mut Command, name: &str) -> Result<(), NetError> {
    let ns: OwnedFd = open_netns(name)?.into();
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe work is allowed. It makes one `setns` syscall on a
    // descriptor owned by the closure (so open for as long as `cmd` can
    // spawn) and, on failure, builds an `io::Error` from the raw errno,
    // which does not allocate. It touches no locks and no other state.
    unsafe {
        cmd.pre_exec(move || enter(&ns));
    }
    Ok(())
}

/// Spawn `cmd` inside the named network namespace only (see
/// [`command_in_netns`]).
pub fn spawn_in_netns(name: &str, mut cmd: Command) -> Result<Child, NetError> {
    command_in_netns(&mut cmd, name)?;
    cmd.spawn().map_err(|source| NetError::Spawn {
        program: cmd.get_program().to_string_lossy().into_owned(),
        ns: NsLabel(Some(name.to_owned())),
        source,
    })
}

/// All processes that have a thread in the named network namespace: those
/// whose `/proc/<pid>/ns/net` (or one of whose `/proc/<pid>/task/<tid>/ns/net`)
/// is the same inode as `/run/netns/<name>`. Sorted; the calling process is
/// never included (it may have a thread in there transiently, and callers
/// use the list to kill what a lab host left behind).
///
/// Processes that vanish or cannot be inspected during the scan are skipped.
pub fn pids_in_netns(name: &str) -> Result<Vec<u32>, NetError> {
    validate_netns_name(name)?;
    let err = |source| NetError::ListPids {
        name: name.to_owned(),
        source,
    };
    let target = fs::metadata(netns_path(name)).map_err(err)?;
    let target = (target.dev(), target.ino());
    let same = |path: &Path| {
        fs::metadata(path)
            .map(|m| (m.dev(), m.ino()) == target)
            .unwrap_or(false)
    };
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").map_err(err)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = entry.path();
        let inside = same(&dir.join("ns/net"))
            || fs::read_dir(dir.join("task")).is_ok_and(|tasks| {
                tasks
                    .flatten()
                    .any(|task| same(&task.path().join("ns/net")))
            });
        if inside {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}
