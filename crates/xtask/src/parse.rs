//! Pure parsers used by `xtask setup`: kept free of I/O so they can be unit tested.

use std::cmp::Ordering;
use std::collections::BTreeSet;

/// A CRIU release number as printed by `criu --version` ("Version: 4.2.1").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CriuVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl CriuVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }
}

impl std::fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Parses the output of `criu --version`:
///
/// ```text
/// Version: 4.2.1
/// GitID: v4.2.1
/// ```
///
/// A missing patch level ("Version: 4.2") counts as 0.
pub fn parse_criu_version(output: &str) -> Option<CriuVersion> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?;
    let word = line.split_whitespace().next()?;
    let mut parts = word.split('.');
    let major = leading_number(parts.next()?)?;
    let minor = leading_number(parts.next()?)?;
    let patch = match parts.next() {
        Some(p) => leading_number(p).unwrap_or(0),
        None => 0,
    };
    Some(CriuVersion::new(major, minor, patch))
}

fn leading_number(s: &str) -> Option<u32> {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Which of `packages` `dpkg-query -W -f='${Package}\t${Status}\n' <packages...>` reports as
/// installed. Status is "want flag status" (e.g. "install ok installed", "hold ok installed",
/// "deinstall ok config-files"); only status `installed` counts. Packages dpkg does not know at
/// all are simply absent from the output.
pub fn installed_packages(dpkg_query_output: &str) -> BTreeSet<String> {
    dpkg_query_output
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once('\t')?;
            let name = name.trim();
            let name = name.split_once(':').map_or(name, |(n, _arch)| n);
            (dpkg_status_installed(status) && !name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// True if a dpkg `${Status}` field ("install ok installed") says the package is installed.
pub fn dpkg_status_installed(status: &str) -> bool {
    let words: Vec<&str> = status.split_whitespace().collect();
    words.len() == 3 && words[1] == "ok" && words[2] == "installed"
}

/// One `Package: criu` stanza of `apt-cache showsrc criu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceVersion {
    /// Full Debian version, e.g. "4.2.1-1".
    pub version: String,
    /// The upstream tarball ("criu_4.2.1.orig.tar.xz") and its SHA-256 from the signed index.
    pub orig: Option<(String, String)>,
}

impl SourceVersion {
    /// Upstream part of the version: no epoch, no Debian revision ("1:4.2.1-3" -> "4.2.1").
    pub fn upstream(&self) -> &str {
        upstream_version(&self.version)
    }
}

/// Parses `apt-cache showsrc <package>` into its stanzas for `package`.
pub fn parse_showsrc(output: &str, package: &str) -> Vec<SourceVersion> {
    let mut out = Vec::new();
    for stanza in output.split("\n\n") {
        let mut name = None;
        let mut version = None;
        let mut sha256_files: Vec<(String, String)> = Vec::new();
        let mut in_sha256 = false;
        for line in stanza.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                if in_sha256 {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    if let [sha, _size, file] = fields[..] {
                        sha256_files.push((file.to_string(), sha.to_string()));
                    }
                }
                continue;
            }
            in_sha256 = false;
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key {
                "Package" => name = Some(value.trim().to_string()),
                "Version" => version = Some(value.trim().to_string()),
                "Checksums-Sha256" => in_sha256 = true,
                _ => {}
            }
        }
        let (Some(name), Some(version)) = (name, version) else {
            continue;
        };
        if name != package {
            continue;
        }
        let orig_prefix = format!("{package}_{}.orig.tar.", upstream_version(&version));
        let orig = sha256_files
            .into_iter()
            .find(|(file, _)| file.starts_with(&orig_prefix) && !file.ends_with(".asc"));
        out.push(SourceVersion { version, orig });
    }
    out
}

/// The newest source version whose upstream version is at least `min_upstream` (Debian ordering,
/// so "4.2~rc1" is older than "4.2").
pub fn pick_newest_at_least<'a>(
    versions: &'a [SourceVersion],
    min_upstream: &str,
) -> Option<&'a SourceVersion> {
    versions
        .iter()
        .filter(|v| deb_version_cmp(v.upstream(), min_upstream) != Ordering::Less)
        .max_by(|a, b| deb_version_cmp(&a.version, &b.version))
}

/// Strips the epoch and the Debian revision from a version string.
pub fn upstream_version(version: &str) -> &str {
    let no_epoch = version.split_once(':').map_or(version, |(_, rest)| rest);
    no_epoch.rsplit_once('-').map_or(no_epoch, |(up, _)| up)
}

/// Compares two Debian version strings the way `dpkg --compare-versions` does.
pub fn deb_version_cmp(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split_version(a);
    let (eb, ub, rb) = split_version(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua, ub))
        .then_with(|| verrevcmp(ra, rb))
}

fn split_version(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) if e.chars().all(|c| c.is_ascii_digit()) && !e.is_empty() => {
            (e.parse().unwrap_or(0), rest)
        }
        _ => (0, v),
    };
    let (upstream, revision) = rest.rsplit_once('-').unwrap_or((rest, ""));
    (epoch, upstream, revision)
}

/// dpkg's character order: '~' before end-of-string before letters before everything else.
fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// dpkg's `verrevcmp`.
fn verrevcmp(a: &str, b: &str) -> Ordering {
    let a = a.as_bytes();
    let b = b.as_bytes();
    let digit = |s: &[u8], i: usize| s.get(i).is_some_and(u8::is_ascii_digit);
    let (mut i, mut j) = (0usize, 0usize);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let ac = order(a.get(i).copied());
            let bc = order(b.get(j).copied());
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// The effective uid from the text of `/proc/self/status` ("Uid:\treal\teffective\tsaved\tfs").
pub fn effective_uid(proc_status: &str) -> Option<u32> {
    let line = proc_status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// State of one option in a kernel config (`/proc/config.gz`, `/boot/config-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KconfigState {
    BuiltIn,
    Module,
    NotSet,
}

/// Looks `option` ("CONFIG_VETH") up in kernel config text. `None` if the text does not mention it.
pub fn kconfig_state(config: &str, option: &str) -> Option<KconfigState> {
    let not_set = format!("# {option} is not set");
    for line in config.lines() {
        let line = line.trim();
        if line == not_set {
            return Some(KconfigState::NotSet);
        }
        if let Some(value) = line
            .strip_prefix(option)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return Some(match value {
                "y" => KconfigState::BuiltIn,
                "m" => KconfigState::Module,
                _ => KconfigState::NotSet,
            });
        }
    }
    None
}

/// True if `/proc/filesystems` lists `fs` (lines are "nodev\toverlay" or "\text4").
pub fn filesystem_listed(proc_filesystems: &str, fs: &str) -> bool {
    proc_filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_version_full() {
        let out = "Version: 4.2.1\nGitID: v4.2.1\n";
        assert_eq!(parse_criu_version(out), Some(CriuVersion::new(4, 2, 1)));
    }

    #[test]
    fn criu_version_two_parts_and_suffix() {
        assert_eq!(
            parse_criu_version("Version: 4.2\n"),
            Some(CriuVersion::new(4, 2, 0))
        );
        assert_eq!(
            parse_criu_version("Version: 3.17.1-dirty\n"),
            Some(CriuVersion::new(3, 17, 1))
        );
        assert_eq!(
            parse_criu_version("  Version: 4.1\nGitID: v4.1\n"),
            Some(CriuVersion::new(4, 1, 0))
        );
    }

    #[test]
    fn criu_version_garbage() {
        assert_eq!(parse_criu_version(""), None);
        assert_eq!(parse_criu_version("criu: command not found"), None);
        assert_eq!(parse_criu_version("Version: x.y"), None);
        assert_eq!(parse_criu_version("Version: 4"), None);
    }

    #[test]
    fn criu_version_ordering() {
        let min = CriuVersion::new(4, 2, 0);
        assert!(CriuVersion::new(4, 2, 1) >= min);
        assert!(CriuVersion::new(4, 10, 0) >= min);
        assert!(CriuVersion::new(5, 0, 0) >= min);
        assert!(CriuVersion::new(4, 1, 9) < min);
        assert!(CriuVersion::new(3, 17, 1) < min);
    }

    #[test]
    fn dpkg_status() {
        assert!(dpkg_status_installed("install ok installed"));
        assert!(dpkg_status_installed("hold ok installed"));
        assert!(!dpkg_status_installed("deinstall ok config-files"));
        assert!(!dpkg_status_installed("install ok half-configured"));
        assert!(!dpkg_status_installed("unknown ok not-installed"));
        assert!(!dpkg_status_installed(""));
    }

    #[test]
    fn dpkg_query_output() {
        let out = "containerd\tinstall ok installed\n\
                   runc\tinstall ok installed\n\
                   podman\tdeinstall ok config-files\n\
                   libc6:amd64\tinstall ok installed\n\
                   tcpdump\tunknown ok not-installed\n";
        let got = installed_packages(out);
        let want: BTreeSet<String> = ["containerd", "runc", "libc6"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(got, want);
    }

    const SHOWSRC: &str = "\
Package: criu
Format: 3.0 (quilt)
Binary: criu, python3-criu, python3-pycriu, crit, compel, amdgpu-plugin
Architecture: amd64 arm64 armhf ppc64el s390x
Version: 4.1.1-3
Maintainer: Salvatore Bonaccorso <carnil@debian.org>
Files:
 0123 1634 criu_4.1.1-3.dsc
 4567 1796136 criu_4.1.1.orig.tar.xz
Checksums-Sha256:
 aaaa1111 1634 criu_4.1.1-3.dsc
 bbbb2222 1796136 criu_4.1.1.orig.tar.xz
 cccc3333 19000 criu_4.1.1-3.debian.tar.xz
Directory: pool/main/c/criu

Package: criu
Format: 3.0 (quilt)
Binary: criu
Version: 4.2.1-1
Checksums-Sha256:
 dddd4444 1700 criu_4.2.1-1.dsc
 29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9 1812345 criu_4.2.1.orig.tar.xz
 eeee5555 20000 criu_4.2.1-1.debian.tar.xz
Directory: pool/main/c/criu

Package: criu
Binary: criu
Version: 4.2~rc1-1
Checksums-Sha256:
 ffff6666 1812345 criu_4.2~rc1.orig.tar.xz

Package: criu
Binary: criu
Version: 3.17.1-2
Checksums-Sha256:
 9999 1 criu_3.17.1.orig.tar.xz

Package: not-criu
Version: 9.9-1
";

    #[test]
    fn showsrc_parse() {
        let v = parse_showsrc(SHOWSRC, "criu");
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].version, "4.1.1-3");
        assert_eq!(
            v[0].orig,
            Some(("criu_4.1.1.orig.tar.xz".into(), "bbbb2222".into()))
        );
        assert_eq!(v[1].upstream(), "4.2.1");
        assert_eq!(
            v[1].orig.as_ref().map(|(f, _)| f.as_str()),
            Some("criu_4.2.1.orig.tar.xz")
        );
    }

    #[test]
    fn showsrc_pick_newest() {
        let v = parse_showsrc(SHOWSRC, "criu");
        let best = pick_newest_at_least(&v, "4.2").expect("a version >= 4.2");
        assert_eq!(best.version, "4.2.1-1");
        assert_eq!(
            best.orig.as_ref().map(|(_, sha)| sha.as_str()),
            Some("29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9")
        );
    }

    #[test]
    fn showsrc_pick_none_or_rc_excluded() {
        let only_old = parse_showsrc(
            "Package: criu\nVersion: 4.1.1-3\n\nPackage: criu\nVersion: 4.2~rc1-1\n",
            "criu",
        );
        assert_eq!(pick_newest_at_least(&only_old, "4.2"), None);
        assert_eq!(pick_newest_at_least(&[], "4.2"), None);
        let exact = parse_showsrc("Package: criu\nVersion: 4.2-1\n", "criu");
        assert_eq!(
            pick_newest_at_least(&exact, "4.2").map(|v| v.version.as_str()),
            Some("4.2-1")
        );
    }

    #[test]
    fn showsrc_pick_prefers_higher_revision_and_numeric_order() {
        let v = parse_showsrc(
            "Package: criu\nVersion: 4.2.1-1\n\n\
             Package: criu\nVersion: 4.2.1-2\n\n\
             Package: criu\nVersion: 4.10-1\n\n\
             Package: criu\nVersion: 4.9-5\n",
            "criu",
        );
        assert_eq!(
            pick_newest_at_least(&v, "4.2").map(|v| v.version.as_str()),
            Some("4.10-1")
        );
    }

    #[test]
    fn deb_compare() {
        use Ordering::*;
        assert_eq!(deb_version_cmp("4.2.1-1", "4.2.1-1"), Equal);
        assert_eq!(deb_version_cmp("4.2.1-2", "4.2.1-1"), Greater);
        assert_eq!(deb_version_cmp("4.10", "4.9"), Greater);
        assert_eq!(deb_version_cmp("4.2~rc1", "4.2"), Less);
        assert_eq!(deb_version_cmp("4.2", "4.2.0"), Less);
        assert_eq!(deb_version_cmp("1:3.0-1", "4.2-1"), Greater);
        assert_eq!(deb_version_cmp("4.2+dfsg-1", "4.2-1"), Greater);
        assert_eq!(deb_version_cmp("4.2a", "4.2+"), Less);
        assert_eq!(upstream_version("1:4.2.1-3"), "4.2.1");
        assert_eq!(upstream_version("4.2.1"), "4.2.1");
        assert_eq!(upstream_version("4.2.1+ds1-8+deb12u1"), "4.2.1+ds1");
    }

    #[test]
    fn euid() {
        let status = "Name:\tcat\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        let status = "Uid:\t0\t1000\t1000\t1000\n";
        assert_eq!(effective_uid(status), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn kconfig() {
        let cfg = "CONFIG_NET_NS=y\n# CONFIG_NET_IPIP is not set\nCONFIG_VXLAN=m\nCONFIG_VETH=y\n";
        assert_eq!(
            kconfig_state(cfg, "CONFIG_VETH"),
            Some(KconfigState::BuiltIn)
        );
        assert_eq!(
            kconfig_state(cfg, "CONFIG_VXLAN"),
            Some(KconfigState::Module)
        );
        assert_eq!(
            kconfig_state(cfg, "CONFIG_NET_IPIP"),
            Some(KconfigState::NotSet)
        );
        assert_eq!(kconfig_state(cfg, "CONFIG_NET"), None);
        assert_eq!(kconfig_state(cfg, "CONFIG_BRIDGE"), None);
    }

    #[test]
    fn proc_filesystems() {
        let fs = "nodev\tsysfs\nnodev\toverlay\n\text4\n";
        assert!(filesystem_listed(fs, "overlay"));
        assert!(filesystem_listed(fs, "ext4"));
        assert!(!filesystem_listed(fs, "btrfs"));
    }
}
