//! What the CRIU on this host can do: its version, whether `criu check` passes, and
//! whether the kernel tracks dirty memory (soft-dirty), which decides between CRIU
//! pre-dump rounds and digest-diffed leave-running dumps.

use std::process::Command;

use crate::error::RuntimeError;

/// The oldest CRIU that works on kernels >= 6.16 (SO_PASSCRED/SO_PASSSEC restriction).
pub const MIN_VERSION: (u32, u32) = (4, 2);

/// The facts a migration needs about a host's CRIU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuFacts {
    pub version: String,
    pub version_ok: bool,
    pub check_ok: bool,
    pub mem_dirty_track: bool,
    /// Whether CRIU can restore lazily here (userfaultfd, non-cooperative events):
    /// post-copy needs it on the destination.
    pub lazy_pages: bool,
    /// Whether CRIU can lock the network with nftables (built with libnftables).
    pub nftables_lock: bool,
}

impl CriuFacts {
    /// The options xfer's CRIU configuration file adds to
    /// [`crate::containerd::CRIU_CONFIG`] on this host, then `more`.
    pub fn config_extras(&self, more: &[&'static str]) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.nftables_lock {
            v.push(crate::containerd::NFTABLES_LOCK);
        }
        v.extend_from_slice(more);
        v
    }

    /// Whether this CRIU can checkpoint and restore containers here.
    pub fn usable(&self) -> bool {
        self.version_ok && self.check_ok
    }
}

/// Parses `criu --version` output ("Version: 4.2.1") into (major, minor, patch).
pub fn parse_version(out: &str) -> Option<(u32, u32, u32)> {
    let v = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let mut it = v.split(['.', '-']).map(|p| p.parse::<u32>());
    let major = it.next()?.ok()?;
    let minor = it.next().and_then(Result::ok).unwrap_or(0);
    let patch = it.next().and_then(Result::ok).unwrap_or(0);
    Some((major, minor, patch))
}

fn run(args: &[&str]) -> Result<(bool, String), RuntimeError> {
    let out = Command::new("criu")
        .args(args)
        .output()
        .map_err(|source| RuntimeError::Spawn {
            program: format!("criu {}", args.join(" ")),
            source,
        })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// Probes the CRIU found on PATH.
pub fn probe() -> Result<CriuFacts, RuntimeError> {
    let (_, vout) = run(&["--version"])?;
    let parsed = parse_version(&vout);
    let version = parsed
        .map(|(a, b, c)| format!("{a}.{b}.{c}"))
        .unwrap_or_else(|| "unknown".into());
    let version_ok = parsed.is_some_and(|(a, b, _)| (a, b) >= MIN_VERSION);
    let (check_ok, _) = run(&["check"])?;
    let (mem_dirty_track, _) = run(&["check", "--feature", "mem_dirty_track"])?;
    let (uffd, _) = run(&["check", "--feature", "uffd-noncoop"])?;
    let (nftables_lock, _) = run(&["check", "--network-lock", "nftables"])?;
    Ok(CriuFacts {
        version,
        version_ok,
        check_ok,
        mem_dirty_track,
        lazy_pages: uffd,
        nftables_lock,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_locks_with_nftables_only_where_criu_can() {
        let mut f = CriuFacts {
            version: "4.2.1".into(),
            version_ok: true,
            check_ok: true,
            mem_dirty_track: false,
            lazy_pages: true,
            nftables_lock: true,
        };
        assert_eq!(
            f.config_extras(&["lazy-pages"]),
            vec!["network-lock nftables", "lazy-pages"]
        );
        f.nftables_lock = false;
        assert_eq!(f.config_extras(&[]), Vec::<&str>::new());
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("Version: 4.2.1\n"), Some((4, 2, 1)));
        assert_eq!(parse_version("Version: 3.17\nGitID: x"), Some((3, 17, 0)));
        assert_eq!(parse_version("nothing"), None);
        assert!((3, 17) < MIN_VERSION && (4, 2) >= MIN_VERSION && (4, 1) < MIN_VERSION);
    }
}
