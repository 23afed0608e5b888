//! The few system calls std does not wrap: `flock` (one process per store) and
//! `syncfs` (one flush for a batch of chunk files), plus directory fsync.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::StoreError;

/// fsyncs a directory, making renames and unlinks in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync dir", dir, e))
}

/// Takes an exclusive, non-blocking `flock` on `file`. Returns false if another open
/// file description holds it. Released when the file is closed.
pub(crate) fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock only reads its integer arguments; the descriptor is valid for the
    // duration of the call because `file` is borrowed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Flushes every dirty page and metadata change of the file system holding `file`
/// (Linux `syncfs`, which waits for the writes and reports write-back errors since
/// Linux 5.8). One call replaces an fsync per file for a batch.
pub(crate) fn syncfs(file: &File, path: &Path) -> Result<(), StoreError> {
    // SAFETY: syncfs takes only a descriptor, which stays valid while `file` is
    // borrowed; it touches no memory of ours.
    let rc = unsafe { libc::syncfs(file.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(StoreError::io(
            "syncfs",
            path,
            std::io::Error::last_os_error(),
        ))
    }
}
