//! The writable layer of a container: its overlay upperdir turned into an OCI layer
//! tar (added and changed paths as entries, deleted paths as `.wh.NAME` whiteouts,
//! opaque directories as `.wh..wh..opq`), which containerd's Diff.Apply replays on
//! the destination's snapshot.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::RuntimeError;

/// What a writable-layer diff holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiffSummary {
    /// Added or changed paths (files, directories, links), relative to the root.
    pub changed: Vec<PathBuf>,
    /// Deleted paths.
    pub deleted: Vec<PathBuf>,
    /// Directories whose lower contents are hidden (replaced wholesale).
    pub opaque: Vec<PathBuf>,
    /// Bytes of the tar.
    pub tar_bytes: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::RootfsDiff {
        path: path.to_path_buf(),
        source,
    }
}

fn is_opaque(path: &Path) -> bool {
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut buf = [0u8; 4];
    for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        // SAFETY: cpath and name are NUL-terminated C strings that outlive the call, and
        // buf is a valid writable buffer of the length passed.
        let n = unsafe {
            libc::lgetxattr(
                cpath.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n == 1 && buf[0] == b'y' {
            return true;
        }
    }
    false
}

/// A whiteout in an overlay upperdir: a character device 0/0.
fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Writes the diff held in overlay `upper` as an OCI layer tar at `out`.
pub fn capture(upper: &Path, out: &Path) -> Result<DiffSummary, RuntimeError> {
    let file = File::create(out).map_err(io_err(out))?;
    let mut builder = tar::Builder::new(BufWriter::new(file));
    builder.follow_symlinks(false);
    let mut summary = DiffSummary::default();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = upper.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .collect::<Result<_, _>>()
            .map_err(io_err(&dir))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let rel_path = rel.join(&name);
            let full = upper.join(&rel_path);
            let meta = std::fs::symlink_metadata(&full).map_err(io_err(&full))?;
            if is_whiteout(&meta) {
                let mut wh_name = std::ffi::OsString::from(".wh.");
                wh_name.push(&name);
                append_empty(&mut builder, &rel.join(wh_name)).map_err(io_err(&full))?;
                summary.deleted.push(rel_path);
                continue;
            }
            builder
                .append_path_with_name(&full, &rel_path)
                .map_err(io_err(&full))?;
            summary.changed.push(rel_path.clone());
            if meta.is_dir() {
                if is_opaque(&full) {
                    append_empty(&mut builder, &rel_path.join(".wh..wh..opq"))
                        .map_err(io_err(&full))?;
                    summary.opaque.push(rel_path.clone());
                }
                stack.push(rel_path);
            }
        }
    }
    let mut w = builder.into_inner().map_err(io_err(out))?;
    w.flush().map_err(io_err(out))?;
    w.get_ref().sync_all().map_err(io_err(out))?;
    summary.tar_bytes = std::fs::metadata(out).map_err(io_err(out))?.len();
    Ok(summary)
}

fn append_empty<W: Write>(b: &mut tar::Builder<W>, path: &Path) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, path, std::io::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tar_path: &Path) -> Vec<String> {
        let mut a = tar::Archive::new(File::open(tar_path).expect("open"));
        a.entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn added_files_and_whiteouts_become_tar_entries() {
        let t = tempfile::tempdir().expect("tmp");
        let upper = t.path().join("upper");
        std::fs::create_dir_all(upper.join("etc/sub")).expect("mkdir");
        std::fs::write(upper.join("etc/new.txt"), b"hello").expect("write");
        std::fs::write(upper.join("etc/sub/x"), b"x").expect("write");
        std::os::unix::fs::symlink("new.txt", upper.join("etc/link")).expect("symlink");
        // A whiteout needs CAP_MKNOD; as non-root the test still checks the rest.
        let wh = CString::new(upper.join("etc/gone").as_os_str().as_bytes()).expect("c");
        // SAFETY: wh is a valid NUL-terminated path.
        let made = unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR | 0o600, 0) } == 0;
        let out = t.path().join("diff.tar");
        let s = capture(&upper, &out).expect("capture");
        let n = names(&out);
        assert!(n.contains(&"etc/new.txt".to_string()), "{n:?}");
        assert!(n.contains(&"etc/sub/x".to_string()), "{n:?}");
        assert!(n.contains(&"etc/link".to_string()), "{n:?}");
        assert!(s.changed.contains(&PathBuf::from("etc/new.txt")));
        if made {
            assert!(n.contains(&"etc/.wh.gone".to_string()), "{n:?}");
            assert_eq!(s.deleted, vec![PathBuf::from("etc/gone")]);
            assert!(!n.contains(&"etc/gone".to_string()));
        }
        assert_eq!(s.tar_bytes, std::fs::metadata(&out).expect("meta").len());
    }
}
