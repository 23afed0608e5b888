//! The few system calls std does not wrap: `flock` (one process per store) and
//! `mmap`, plus directory fsync.

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

/// A shared mapping of a whole file: read-only (for hashing a file without copying it
/// into the process) or writable (for moving data within a file in place). The file
/// must not shrink while mapped (accesses past its end would fault): map only files
/// this process alone writes.
pub(crate) struct Mmap {
    ptr: *mut libc::c_void,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is read-only and never written through; sharing `&[u8]` views
// of it between threads is as safe as sharing any immutable slice.
unsafe impl Send for Mmap {}
// SAFETY: see `Send`: only immutable access exists.
unsafe impl Sync for Mmap {}

impl std::fmt::Debug for Mmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mmap").field("len", &self.len).finish()
    }
}

impl Mmap {
    /// Maps `file` (`len` bytes, its current size). `len` 0 maps nothing.
    pub(crate) fn map(file: &File, len: usize, path: &Path) -> Result<Mmap, StoreError> {
        Self::map_with(file, len, path, false)
    }

    /// Maps `file` (`len` bytes, at most its current size) for reading and writing;
    /// the file must have been opened for both.
    pub(crate) fn map_mut(file: &File, len: usize, path: &Path) -> Result<Mmap, StoreError> {
        Self::map_with(file, len, path, true)
    }

    fn map_with(file: &File, len: usize, path: &Path, writable: bool) -> Result<Mmap, StoreError> {
        if len == 0 {
            return Ok(Mmap {
                ptr: std::ptr::null_mut(),
                len: 0,
                writable,
            });
        }
        let (prot, flags) = if writable {
            // Not populated: only the pages written should be faulted in (and dirtied).
            (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED)
        } else {
            (libc::PROT_READ, libc::MAP_SHARED | libc::MAP_POPULATE)
        };
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL) of a valid
        // descriptor; it aliases no Rust memory. MAP_POPULATE only pre-faults.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(StoreError::io(
                "mmap",
                path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Mmap { ptr, len, writable })
    }

    /// Copies `len` bytes from offset `from` to offset `to` (the ranges may overlap,
    /// like `memmove`). Panics if either range is out of the mapping or the mapping
    /// is read-only.
    pub(crate) fn copy_within(&mut self, from: usize, to: usize, len: usize) {
        assert!(self.writable, "copy within a read-only mapping");
        assert!(
            from.checked_add(len).is_some_and(|e| e <= self.len)
                && to.checked_add(len).is_some_and(|e| e <= self.len),
            "copy out of the mapping"
        );
        if len == 0 {
            return;
        }
        let base = self.ptr as *mut u8;
        // SAFETY: both ranges lie inside the live, writable mapping (checked above);
        // `ptr::copy` allows overlap; `&mut self` means no slice of the mapping is
        // borrowed meanwhile.
        unsafe { std::ptr::copy(base.add(from), base.add(to), len) }
    }

    /// Writes `bytes` at offset `at`. Panics if out of the mapping or read-only.
    pub(crate) fn write_at(&mut self, at: usize, bytes: &[u8]) {
        assert!(self.writable, "write to a read-only mapping");
        assert!(
            at.checked_add(bytes.len()).is_some_and(|e| e <= self.len),
            "write out of the mapping"
        );
        if bytes.is_empty() {
            return;
        }
        // SAFETY: the destination lies inside the live, writable mapping (checked
        // above) and cannot overlap `bytes`, which `&mut self` keeps from borrowing it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.ptr as *mut u8).add(at),
                bytes.len(),
            )
        }
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is a live mapping of `len` readable bytes until `drop`, and the
        // returned slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `map`; no slice of it outlives
            // `self` (they borrow it).
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }
}
