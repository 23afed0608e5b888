//! `cargo xtask setup`: make a Debian 12 machine able to run xfer (idempotent).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::parse::{self, CriuVersion, KconfigState};
use crate::util::{capture, capture_any, describe, find_on_path, fmt_duration, run, run_status};

pub const DEFAULT_CRIU_PREFIX: &str = "/usr/local";
pub const DEFAULT_CRIU_WORKDIR: &str = "/var/cache/xfer/criu";

/// The oldest CRIU that works on this project's kernels (see docs/host-facts: 4.1 cannot dump
/// INET sockets on kernels >= 6.16).
const MIN_CRIU: CriuVersion = CriuVersion::new(4, 2, 0);
const MIN_CRIU_UPSTREAM: &str = "4.2";

const CRIU_SRC_ENTRY: &str = "/etc/apt/sources.list.d/xfer-criu-src.sources";
const CRIU_SRC_ENTRY_TEXT: &str = "\
# Temporary entry written by `cargo xtask setup` to fetch CRIU's source; removed right after.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: sid forky
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

/// Runtime packages, then CRIU's build dependencies.
pub const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "iptables",
    "nftables",
    "iproute2",
    "protobuf-compiler",
    "busybox-static",
    "redis-server",
    "redis-tools",
    "zstd",
    "tcpdump",
    "podman",
    "etcd-server",
    // CRIU build dependencies
    "libbsd-dev",
    "libcap-dev",
    "libgnutls28-dev",
    "libnet1-dev",
    "libnftables-dev",
    "libnl-3-dev",
    "libprotobuf-c-dev",
    "libprotobuf-dev",
    "pkgconf",
    "protobuf-c-compiler",
    "python3-protobuf",
    "libaio-dev",
    "uuid-dev",
    "build-essential",
];

/// Daemons whose package scripts may start them (process name, service user, service unit).
const PACKAGE_DAEMONS: &[(&str, &str, &str)] = &[
    ("redis-server", "redis", "redis-server.service"),
    ("etcd", "etcd", "etcd.service"),
];

#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// Install prefix for the CRIU binary (installed as <prefix>/sbin/criu). With a prefix other
    /// than /usr/local, setup checks that binary instead of the `criu` found on PATH.
    #[arg(long, env = "XFER_CRIU_PREFIX", default_value = DEFAULT_CRIU_PREFIX)]
    pub criu_prefix: PathBuf,
    /// Where CRIU's source is downloaded and built.
    #[arg(long, env = "XFER_CRIU_WORKDIR", default_value = DEFAULT_CRIU_WORKDIR)]
    pub criu_workdir: PathBuf,
    /// Rebuild and reinstall CRIU even if a good one is present.
    #[arg(long)]
    pub rebuild_criu: bool,
}

impl Default for SetupArgs {
    fn default() -> Self {
        Self {
            criu_prefix: DEFAULT_CRIU_PREFIX.into(),
            criu_workdir: DEFAULT_CRIU_WORKDIR.into(),
            rebuild_criu: false,
        }
    }
}

fn ok(item: &str, detail: impl std::fmt::Display) {
    println!("  ok    {item}: {detail}");
}

fn done(item: &str, detail: impl std::fmt::Display) {
    println!("  done  {item}: {detail}");
}

fn info(item: &str, detail: impl std::fmt::Display) {
    println!("  info  {item}: {detail}");
}

fn warn(item: &str, detail: impl std::fmt::Display) {
    println!("  warn  {item}: {detail}");
}

pub fn setup(args: &SetupArgs) -> Result<()> {
    let started = Instant::now();
    println!("xtask setup");
    check_root()?;
    check_kernel()?;
    remove_stale_criu_src_entry()?;
    ensure_packages()?;
    check_iptables()?;
    ensure_criu(args)?;
    println!("setup finished in {}", fmt_duration(started.elapsed()));
    Ok(())
}

fn check_root() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let euid = parse::effective_uid(&status).context("no Uid line in /proc/self/status")?;
    if euid != 0 {
        bail!(
            "xtask setup must run as root: it installs Debian packages and builds CRIU \
             (effective uid is {euid})"
        );
    }
    ok("root", "effective uid 0");
    Ok(())
}

fn check_kernel() -> Result<()> {
    let mut missing = Vec::new();

    if Path::new("/proc/self/ns/net").exists() {
        ok("kernel network namespaces", "/proc/self/ns/net exists");
    } else {
        missing.push("network namespaces (CONFIG_NET_NS; /proc/self/ns/net is missing)".into());
    }

    let config = kernel_config();
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if parse::filesystem_listed(&filesystems, "overlay") {
        ok("kernel overlayfs", "listed in /proc/filesystems");
    } else {
        match probe_module("overlay", "CONFIG_OVERLAY_FS", config.as_deref()) {
            Some(how) => ok("kernel overlayfs", how),
            None => missing.push("overlayfs (CONFIG_OVERLAY_FS)".into()),
        }
    }

    for (module, option, what) in [
        ("veth", "CONFIG_VETH", "veth"),
        ("bridge", "CONFIG_BRIDGE", "bridge"),
        ("vxlan", "CONFIG_VXLAN", "vxlan"),
    ] {
        match probe_module(module, option, config.as_deref()) {
            Some(how) => ok(&format!("kernel {what}"), how),
            None => missing.push(format!("{what} ({option})")),
        }
    }

    if !missing.is_empty() {
        bail!(
            "this kernel lacks features xfer needs: {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// The running kernel's config, from /proc/config.gz or /boot/config-<release>.
fn kernel_config() -> Option<String> {
    if Path::new("/proc/config.gz").exists() {
        if let Ok(text) = capture(Command::new("gzip").args(["-dc", "/proc/config.gz"])) {
            return Some(text);
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
}

/// How we know a kernel feature is there, or None if it is not (or we cannot tell).
fn probe_module(module: &str, option: &str, config: Option<&str>) -> Option<String> {
    if Path::new("/sys/module").join(module).exists() {
        return Some(format!("/sys/module/{module} exists"));
    }
    match config.and_then(|c| parse::kconfig_state(c, option)) {
        Some(KconfigState::BuiltIn) => return Some(format!("{option}=y in the kernel config")),
        Some(KconfigState::Module) => {
            return Some(format!("{option}=m in the kernel config (loadable module)"))
        }
        Some(KconfigState::NotSet) => return None,
        None => {}
    }
    let probed = Command::new("modprobe")
        .args(["-n", "-q", module])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    probed.then(|| format!("`modprobe -n {module}` succeeds"))
}

fn installed(packages: &[&str]) -> Result<BTreeSet<String>> {
    let mut cmd = Command::new("dpkg-query");
    cmd.arg("-W")
        .arg("-f=${Package}\t${Status}\n")
        .args(packages);
    let out = capture_any(&mut cmd)?;
    // dpkg-query exits 1 when some package is unknown; it still lists the others.
    match out.status.code() {
        Some(0 | 1) => Ok(parse::installed_packages(&out.stdout)),
        _ => bail!(
            "run {}: {}: {}",
            describe(&cmd),
            out.status,
            out.stderr.trim()
        ),
    }
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn apt_update() -> Result<()> {
    run(apt_get().args(["update", "-q"]))
}

fn ensure_packages() -> Result<()> {
    let have = installed(PACKAGES)?;
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !have.contains(*p))
        .collect();
    for p in PACKAGES.iter().filter(|p| have.contains(**p)) {
        ok(&format!("package {p}"), "already installed");
    }
    if missing.is_empty() {
        return Ok(());
    }

    println!("  ....  installing {}", missing.join(" "));
    let daemons_before = package_daemon_pids();
    apt_update()?;
    run(apt_get()
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))?;
    stop_daemons_started_by_install(&daemons_before, &missing);

    let have = installed(&missing)?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !have.contains(*p))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these packages are still not installed: {}",
            still.join(" ")
        );
    }
    for p in &missing {
        done(&format!("package {p}"), "installed");
    }
    Ok(())
}

/// PIDs of processes named like a package daemon and owned by its service user.
fn package_daemon_pids() -> BTreeSet<(u32, &'static str)> {
    let mut found = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    let users: Vec<(&'static str, Option<u32>)> = PACKAGE_DAEMONS
        .iter()
        .map(|(name, user, _)| (*name, user_uid(user)))
        .collect();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let Some((name, Some(uid))) = users.iter().find(|(n, _)| *n == comm.trim()) else {
            continue;
        };
        let owner = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| parse::effective_uid(&s));
        if owner == Some(*uid) {
            found.insert((pid, *name));
        }
    }
    found
}

fn user_uid(user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[0] == user).then(|| f[2].parse().ok())?
    })
}

/// Package scripts may start redis-server/etcd (a system instance would squat the ports the
/// engine's containers use). Stop what this install started; leave older processes alone.
fn stop_daemons_started_by_install(before: &BTreeSet<(u32, &'static str)>, installed: &[&str]) {
    if Path::new("/run/systemd/system").is_dir() {
        for (name, _, unit) in PACKAGE_DAEMONS {
            let package = if *name == "etcd" { "etcd-server" } else { name };
            if installed.contains(&package) {
                match capture(Command::new("systemctl").args(["stop", unit])) {
                    Ok(_) => done(&format!("service {unit}"), "stopped after install"),
                    Err(e) => warn(&format!("service {unit}"), format!("{e:#}")),
                }
            }
        }
    }
    let new: Vec<(u32, &str)> = package_daemon_pids()
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    for (pid, name) in new {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        done(
            &format!("{name} started by the package install"),
            format!("stopped pid {pid}"),
        );
    }
}

fn check_iptables() -> Result<()> {
    capture(Command::new("iptables").args(["-L", "-n"]))
        .context("iptables does not work (CRIU needs it to lock the network)")?;
    ok("iptables", "`iptables -L -n` works");
    Ok(())
}

/// What we found when looking at a CRIU binary.
enum CriuState {
    Missing,
    Unparsable(String),
    TooOld(CriuVersion),
    CheckFails(CriuVersion, String),
    Good(CriuVersion),
}

fn inspect_criu(bin: &Path) -> Result<CriuState> {
    if !bin.exists() {
        return Ok(CriuState::Missing);
    }
    let out = capture_any(Command::new(bin).arg("--version"))?;
    let Some(version) = parse::parse_criu_version(&out.combined()) else {
        return Ok(CriuState::Unparsable(out.combined().trim().to_string()));
    };
    if version < MIN_CRIU {
        return Ok(CriuState::TooOld(version));
    }
    let check = capture_any(Command::new(bin).arg("check"))?;
    if !check.success() || !check.combined().contains("Looks good.") {
        return Ok(CriuState::CheckFails(
            version,
            last_lines(&check.combined(), 5),
        ));
    }
    Ok(CriuState::Good(version))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn ensure_criu(args: &SetupArgs) -> Result<()> {
    let installed_bin = args.criu_prefix.join("sbin/criu");
    let default_prefix = args.criu_prefix == Path::new(DEFAULT_CRIU_PREFIX);
    // With the default prefix, the CRIU that matters is the one runc finds through PATH.
    let bin = if default_prefix {
        find_on_path("criu").unwrap_or_else(|| installed_bin.clone())
    } else {
        installed_bin.clone()
    };
    let item = format!("criu ({})", bin.display());
    let state = inspect_criu(&bin)?;
    let reason = match &state {
        CriuState::Good(v) if !args.rebuild_criu => {
            ok(
                &item,
                format!("version {v} >= {MIN_CRIU_UPSTREAM}, `criu check`: Looks good."),
            );
            report_dirty_tracking(&bin);
            return Ok(());
        }
        CriuState::Good(v) => format!("version {v} is fine, but --rebuild-criu was given"),
        CriuState::Missing => "not installed".to_string(),
        CriuState::Unparsable(out) => format!("cannot parse `criu --version`: {out}"),
        CriuState::TooOld(v) => format!("version {v} is older than {MIN_CRIU_UPSTREAM}"),
        CriuState::CheckFails(v, out) => format!("version {v}, but `criu check` fails: {out}"),
    };
    info(
        &item,
        format!("{reason}; building CRIU >= {MIN_CRIU_UPSTREAM} from Debian's source"),
    );

    let version = build_and_install_criu(args, &installed_bin)?;
    match inspect_criu(&installed_bin)? {
        CriuState::Good(v) => done(
            &format!("criu ({})", installed_bin.display()),
            format!("built {version}, installed version {v}; `criu check`: Looks good."),
        ),
        CriuState::CheckFails(v, out) => {
            bail!("the freshly built CRIU {v} fails `criu check`: {out}")
        }
        CriuState::Missing => bail!("{} is missing after install", installed_bin.display()),
        CriuState::Unparsable(out) => bail!("cannot parse the new CRIU's --version: {out}"),
        CriuState::TooOld(v) => bail!("the freshly built CRIU reports version {v}"),
    }
    if default_prefix {
        match find_on_path("criu") {
            Some(p) if p == installed_bin => {}
            Some(p) => bail!(
                "`criu` on PATH is {}, not {}: put {} ahead in PATH (runc finds CRIU there)",
                p.display(),
                installed_bin.display(),
                args.criu_prefix.join("sbin").display()
            ),
            None => warn(
                "criu on PATH",
                format!(
                    "{} is not on PATH; runc finds CRIU through PATH",
                    args.criu_prefix.join("sbin").display()
                ),
            ),
        }
    }
    report_dirty_tracking(&installed_bin);
    Ok(())
}

/// Soft-dirty tracking decides the engine's pre-copy strategy; report it, never fail on it.
fn report_dirty_tracking(bin: &Path) {
    let item = "criu mem_dirty_track";
    match capture_any(Command::new(bin).args(["check", "--feature", "mem_dirty_track"])) {
        Ok(out) if out.success() => info(
            item,
            "supported (soft-dirty): the engine can use CRIU pre-dump for live pre-copy",
        ),
        Ok(_) => info(
            item,
            "NOT supported (kernel without CONFIG_MEM_SOFT_DIRTY): the engine diffs pages by \
             content hash instead of CRIU pre-dump",
        ),
        Err(e) => warn(item, format!("{e:#}")),
    }
}

/// Removes the temporary deb-src entry (and refreshes apt's lists) on every path out.
struct SrcEntryGuard {
    armed: bool,
}

impl SrcEntryGuard {
    fn install() -> Result<Self> {
        std::fs::write(CRIU_SRC_ENTRY, CRIU_SRC_ENTRY_TEXT)
            .with_context(|| format!("write {CRIU_SRC_ENTRY}"))?;
        println!("  ....  wrote temporary deb-src entry {CRIU_SRC_ENTRY} (sid forky)");
        Ok(Self { armed: true })
    }

    fn remove(&mut self) -> Result<()> {
        if !self.armed {
            return Ok(());
        }
        self.armed = false;
        match std::fs::remove_file(CRIU_SRC_ENTRY) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {CRIU_SRC_ENTRY}")),
        }
        apt_update().context("apt-get update after removing the deb-src entry")?;
        done(
            "apt source entry",
            format!("removed {CRIU_SRC_ENTRY}, apt-get update"),
        );
        Ok(())
    }
}

impl Drop for SrcEntryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("  warn  cleanup of {CRIU_SRC_ENTRY}: {e:#}");
        }
    }
}

/// A run killed half-way may have left the deb-src entry behind: remove it.
fn remove_stale_criu_src_entry() -> Result<()> {
    if Path::new(CRIU_SRC_ENTRY).exists() {
        let mut guard = SrcEntryGuard { armed: true };
        guard
            .remove()
            .context("remove a deb-src entry left by an interrupted setup")?;
    } else {
        ok("apt sources", format!("no leftover {CRIU_SRC_ENTRY}"));
    }
    Ok(())
}

fn sha256_of(path: &Path) -> Result<String> {
    let out = capture(Command::new("sha256sum").arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("sha256sum {}: empty output", path.display()))
}

/// Fetches CRIU's upstream tarball through apt (signed index), builds `criu`, installs it.
/// Returns the Debian source version that was built.
fn build_and_install_criu(args: &SetupArgs, dest: &Path) -> Result<String> {
    let work = &args.criu_workdir;
    std::fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;

    // Download with the temporary source entry in place; the guard removes it on every path.
    let mut guard = SrcEntryGuard::install()?;
    apt_update()?;
    let showsrc = capture(Command::new("apt-cache").args(["showsrc", "criu"]))?;
    let versions = parse::parse_showsrc(&showsrc, "criu");
    let listed: Vec<&str> = versions.iter().map(|v| v.version.as_str()).collect();
    let chosen = parse::pick_newest_at_least(&versions, MIN_CRIU_UPSTREAM)
        .with_context(|| {
            format!(
                "`apt-cache showsrc criu` lists no version >= {MIN_CRIU_UPSTREAM} (found: {})",
                if listed.is_empty() {
                    "none".to_string()
                } else {
                    listed.join(", ")
                }
            )
        })?
        .clone();
    let (orig_name, index_sha) = chosen.orig.clone().with_context(|| {
        format!(
            "`apt-cache showsrc criu` has no Checksums-Sha256 entry for criu {}'s orig tarball",
            chosen.version
        )
    })?;
    info(
        "criu source",
        format!("picked {} (listed: {})", chosen.version, listed.join(", ")),
    );

    let mut dl = apt_get();
    dl.current_dir(work)
        .args(["source", "--download-only"])
        .arg(format!("criu={}", chosen.version));
    let status = run_status(&mut dl)?;
    if !status.success() {
        info(
            "apt-get source",
            format!(
                "{status} (expected: the .debian.tar.xz is not served; only the upstream \
                 tarball is needed)"
            ),
        );
    }
    guard.remove()?;

    let orig = work.join(&orig_name);
    if !orig.is_file() {
        bail!(
            "apt-get source did not leave {} (run {} in {} by hand to see why)",
            orig.display(),
            describe(&dl),
            work.display()
        );
    }
    let sha = sha256_of(&orig)?;
    if sha != index_sha {
        bail!(
            "{}: sha256 {sha} does not match the signed index's {index_sha}",
            orig.display()
        );
    }
    ok(
        &format!("criu source {orig_name}"),
        format!("sha256 {sha} matches the signed Debian index"),
    );

    let upstream = chosen.upstream().to_string();
    let src = work.join(format!("criu-{upstream}"));
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("remove {}", src.display()))?;
    }
    run(Command::new("tar")
        .arg("-xf")
        .arg(&orig)
        .arg("-C")
        .arg(work))?;
    if !src.join("Makefile").is_file() {
        bail!(
            "extracting {} did not produce {}/Makefile",
            orig.display(),
            src.display()
        );
    }

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = Instant::now();
    println!("  ....  make -j{jobs} criu in {}", src.display());
    run(Command::new("make")
        .current_dir(&src)
        .arg(format!("-j{jobs}"))
        .arg("criu"))?;
    done(
        "criu build",
        format!("make -j{jobs} criu took {}", fmt_duration(t.elapsed())),
    );

    install_binary(&src.join("criu/criu"), dest)?;
    done("criu install", format!("{} (mode 0755)", dest.display()));
    Ok(chosen.version)
}

/// Copies `from` to `to` with mode 0755 through a temporary name, so a running criu is not
/// overwritten in place.
fn install_binary(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to
        .parent()
        .with_context(|| format!("{} has no parent directory", to.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(format!(".criu.xtask-{}", std::process::id()));
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copy {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 0755 {}", tmp.display()))?;
    std::fs::rename(&tmp, to)
        .with_context(|| format!("rename {} to {}", tmp.display(), to.display()))?;
    Ok(())
}
