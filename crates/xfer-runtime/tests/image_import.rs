//! Import registry-free images into a private containerd and read them back.
//!
//! Needs root (containerd, overlayfs mounts), `containerd` and `ctr` in PATH, and the
//! Debian packages busybox-static (`/bin/busybox`) and redis-server
//! (`/usr/bin/redis-server`, `/usr/bin/redis-cli`). Run with `--nocapture` to see the
//! import timings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use containerd_client::services::v1::snapshots::{
    Kind, RemoveSnapshotRequest, StatSnapshotRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::{DeleteRequest, GetImageRequest, InfoRequest};
use containerd_client::Client;
use tonic::Request;
use xfer_runtime::daemon::{cleanup_state, mounts_under, ContainerdDaemon, DaemonConfig};
use xfer_runtime::image::{
    has_blobs, image_info, import, import_from_content, read_blob, rfc3339, write_blob,
    BlobDescriptor, BuiltImage, ImageBuilder, ImportedImage, LayerCompression, Lease,
    LABEL_GC_REF_CONTENT, LABEL_GC_REF_SNAPSHOT, LABEL_UNCOMPRESSED,
};

const SNAPSHOTTER: &str = "overlayfs";
const BUSYBOX: &str = "/bin/busybox";
const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";

fn require_root_and_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "image_import tests need root: they start containerd and mount overlayfs snapshots"
    );
    for p in [BUSYBOX, REDIS_SERVER, REDIS_CLI] {
        assert!(
            Path::new(p).exists(),
            "image_import tests need {p} (Debian packages busybox-static and redis-server)"
        );
    }
    for tool in ["containerd", "ctr"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "image_import tests need `{tool}` in PATH (Debian containerd)"
        );
    }
}

/// One private containerd in a temp dir; stopped and cleaned up on drop, also when an
/// assertion fails.
struct Lab {
    dir: tempfile::TempDir,
    cfg: DaemonConfig,
    daemon: Option<ContainerdDaemon>,
    views: Vec<PathBuf>,
}

impl Lab {
    async fn start() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("xfer-imgtest-")
            .tempdir()
            .expect("tempdir");
        let cfg = DaemonConfig::in_dir(dir.path());
        let t = Instant::now();
        let daemon = ContainerdDaemon::start(cfg.clone())
            .await
            .expect("start containerd");
        eprintln!(
            "containerd {} (pid {}) up in {:?}",
            daemon.version(),
            daemon.pid(),
            t.elapsed()
        );
        Lab {
            dir,
            cfg,
            daemon: Some(daemon),
            views: Vec::new(),
        }
    }

    fn daemon(&self) -> &ContainerdDaemon {
        self.daemon.as_ref().expect("daemon running")
    }

    async fn client(&self) -> Client {
        self.daemon().client().await.expect("connect")
    }

    fn ctr(&self, ns: &str, args: &[&str]) -> String {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.daemon().socket())
            .arg("-n")
            .arg(ns)
            .args(args)
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stop the daemon and clean its state; assert nothing is left behind.
    async fn shutdown(mut self) {
        let daemon = self.daemon.take().expect("daemon");
        let pid = daemon.pid();
        for v in self.views.drain(..) {
            let _ = nix::mount::umount2(&v, nix::mount::MntFlags::MNT_DETACH);
        }
        daemon.stop().await.expect("stop containerd");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "containerd pid {pid} still exists after stop"
        );
        let report = cleanup_state(&self.cfg.root, &self.cfg.state).expect("cleanup_state");
        eprintln!("cleanup: {report:?}");
        let base = std::fs::canonicalize(self.dir.path()).expect("canonicalize");
        assert!(
            mounts_under(std::slice::from_ref(&base))
                .expect("mountinfo")
                .is_empty(),
            "mounts left under {}",
            base.display()
        );
        assert!(!self.cfg.root.exists() && !self.cfg.state.exists());
        let users = processes_using(&base);
        assert!(
            users.is_empty(),
            "processes still use {}: {users:?}",
            base.display()
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for v in self.views.drain(..) {
            let _ = nix::mount::umount2(&v, nix::mount::MntFlags::MNT_DETACH);
        }
        drop(self.daemon.take());
        if let Err(e) = cleanup_state(&self.cfg.root, &self.cfg.state) {
            eprintln!("cleanup_state in drop: {e}");
        }
    }
}

/// Pids whose cwd or command line mention `dir`.
fn processes_using(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cwd.starts_with(dir) || String::from_utf8_lossy(&cmd).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

fn ns_request<T>(msg: T, ns: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("containerd-namespace", ns.parse().expect("ns header"));
    req
}

/// Run containerd's garbage collector now: deleting a lease with `sync` does.
async fn force_gc(client: &Client, ns: &str) {
    let lease = Lease::create(client, ns, Duration::from_secs(60))
        .await
        .expect("lease");
    client
        .leases()
        .delete(ns_request(
            DeleteRequest {
                id: lease.id().to_string(),
                sync: true,
            },
            ns,
        ))
        .await
        .expect("delete lease with sync");
}

fn busybox_image() -> BuiltImage {
    ImageBuilder::busybox(BUSYBOX)
        .expect("busybox builder")
        .build()
        .expect("build busybox")
}

fn redis_on(base: &BuiltImage) -> BuiltImage {
    ImageBuilder::host_binaries(&[REDIS_SERVER, REDIS_CLI])
        .expect("redis builder")
        .build_on(base)
        .expect("build redis")
}

/// Check the record, the labels and the snapshot chain of an imported image.
async fn check_imported(client: &Client, ns: &str, img: &BuiltImage, got: &ImportedImage) {
    assert_eq!(got.manifest, img.manifest);
    assert_eq!(got.config, img.config);
    assert_eq!(got.diff_ids, img.diff_ids());
    assert_eq!(got.chain_id, img.chain_id());
    assert_eq!(
        got.layer_digests(),
        img.layers
            .iter()
            .map(|l| l.descriptor.digest.clone())
            .collect::<Vec<_>>()
    );

    let record = client
        .images()
        .get(ns_request(
            GetImageRequest {
                name: got.name.clone(),
            },
            ns,
        ))
        .await
        .expect("Images.Get")
        .into_inner()
        .image
        .expect("image");
    let target = record.target.expect("target");
    assert_eq!(target.digest, img.manifest.digest);
    assert_eq!(target.media_type, img.manifest.media_type);
    assert_eq!(target.size as u64, img.manifest.size);

    // The snapshot chain: each chainID committed, parent = the previous chainID.
    let mut parent = String::new();
    for chain in got.chain_ids() {
        let info = client
            .snapshots()
            .stat(ns_request(
                StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: chain.clone(),
                },
                ns,
            ))
            .await
            .unwrap_or_else(|e| panic!("Snapshots.Stat {chain}: {e}"))
            .into_inner()
            .info
            .expect("info");
        assert_eq!(info.kind, Kind::Committed as i32, "{chain}");
        assert_eq!(info.parent, parent, "parent of {chain}");
        parent = chain;
    }

    // GC labels.
    let labels = |digest: String| {
        let mut content = client.content();
        let ns = ns.to_string();
        async move {
            content
                .info(ns_request(InfoRequest { digest }, &ns))
                .await
                .expect("Content.Info")
                .into_inner()
                .info
                .expect("info")
                .labels
        }
    };
    let m = labels(img.manifest.digest.clone()).await;
    assert_eq!(
        m.get(&format!("{LABEL_GC_REF_CONTENT}config")),
        Some(&img.config.digest)
    );
    for (i, l) in img.layers.iter().enumerate() {
        assert_eq!(
            m.get(&format!("{LABEL_GC_REF_CONTENT}l.{i}")),
            Some(&l.descriptor.digest)
        );
        let ll = labels(l.descriptor.digest.clone()).await;
        assert_eq!(ll.get(LABEL_UNCOMPRESSED), Some(&l.diff_id));
    }
    let c = labels(img.config.digest.clone()).await;
    assert_eq!(
        c.get(&format!("{LABEL_GC_REF_SNAPSHOT}{SNAPSHOTTER}")),
        Some(&img.chain_id())
    );
}

/// Mount a read-only view of the image's top snapshot and run a command in it (chroot).
async fn run_in_view(
    lab: &mut Lab,
    client: &Client,
    ns: &str,
    chain: &str,
    argv: &[&str],
) -> String {
    let key = format!("view-{}", lab.views.len());
    let mounts = client
        .snapshots()
        .view(ns_request(
            ViewSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.clone(),
                parent: chain.to_string(),
                // Without a lease or this label the garbage collector may take the view
                // while it is mounted.
                labels: [(
                    "containerd.io/gc.root".to_string(),
                    rfc3339(SystemTime::now()),
                )]
                .into(),
            },
            ns,
        ))
        .await
        .expect("Snapshots.View")
        .into_inner()
        .mounts;
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let m = &mounts[0];
    let target = lab.dir.path().join(&key);
    std::fs::create_dir_all(&target).expect("mkdir view");
    let mut flags = nix::mount::MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        match o.as_str() {
            "ro" => flags |= nix::mount::MsFlags::MS_RDONLY,
            "bind" => flags |= nix::mount::MsFlags::MS_BIND,
            "rbind" => flags |= nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
            other => data.push(other.to_string()),
        }
    }
    let data = data.join(",");
    nix::mount::mount(
        Some(m.source.as_str()),
        &target,
        Some(m.r#type.as_str()),
        flags,
        Some(data.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount {m:?}: {e}"));
    lab.views.push(target.clone());
    let out = Command::new("chroot")
        .arg(&target)
        .args(argv)
        .output()
        .expect("chroot");
    let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
    lab.views.retain(|v| v != &target);
    client
        .snapshots()
        .remove(ns_request(
            RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key,
            },
            ns,
        ))
        .await
        .expect("remove view");
    assert!(
        out.status.success(),
        "chroot {argv:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_busybox_and_redis() {
    require_root_and_tools();
    let mut lab = Lab::start().await;
    let client = lab.client().await;
    let ns = format!("xfer-imgtest-{}", std::process::id());

    let t = Instant::now();
    let busybox = busybox_image();
    let redis = redis_on(&busybox);
    eprintln!(
        "built busybox ({} bytes) and redis-on-busybox ({} bytes, {} layers) in {:?}",
        busybox.total_size(),
        redis.total_size(),
        redis.layers.len(),
        t.elapsed()
    );

    // First import: everything is written and unpacked.
    let t = Instant::now();
    let bb = import(
        &client,
        &ns,
        "xfer.local/busybox:latest",
        &busybox,
        SNAPSHOTTER,
    )
    .await
    .expect("import busybox");
    let bb_time = t.elapsed();
    let t = Instant::now();
    let rd = import(&client, &ns, "xfer.local/redis:latest", &redis, SNAPSHOTTER)
        .await
        .expect("import redis");
    let rd_time = t.elapsed();
    eprintln!("import busybox: {bb_time:?} {:?}", bb.stats);
    eprintln!("import redis:   {rd_time:?} {:?}", rd.stats);
    assert_eq!(bb.stats.blobs_written, 3);
    assert_eq!(bb.stats.layers_unpacked, 1);
    assert!(bb.stats.image_created);
    // redis shares the busybox layer and its snapshot.
    assert_eq!(rd.stats.blobs_written, 3);
    assert_eq!(rd.stats.blobs_skipped, 1);
    assert_eq!(rd.stats.layers_skipped, 1);
    assert_eq!(rd.stats.layers_unpacked, 1);
    check_imported(&client, &ns, &busybox, &bb).await;
    check_imported(&client, &ns, &redis, &rd).await;

    // Importing again is idempotent and skips every blob and snapshot.
    let t = Instant::now();
    let again = import(&client, &ns, "xfer.local/redis:latest", &redis, SNAPSHOTTER)
        .await
        .expect("re-import redis");
    eprintln!("re-import redis: {:?} {:?}", t.elapsed(), again.stats);
    assert_eq!(again.stats.blobs_written, 0);
    assert_eq!(again.stats.blobs_skipped, 4);
    assert_eq!(again.stats.layers_unpacked, 0);
    assert_eq!(again.stats.layers_skipped, 2);
    assert!(!again.stats.image_created);
    let bb2 = import(
        &client,
        &ns,
        "xfer.local/busybox:latest",
        &busybox,
        SNAPSHOTTER,
    )
    .await
    .expect("re-import busybox");
    assert_eq!((bb2.stats.blobs_written, bb2.stats.layers_unpacked), (0, 0));
    check_imported(&client, &ns, &redis, &again).await;

    // A synchronous garbage collection (deleting a lease with sync=true runs one) keeps
    // everything: the labels and the image record hold it all.
    // (Control: an unreferenced blob written without a lease does not survive it.)
    let stray = b"unreferenced blob".to_vec();
    let stray_desc = BlobDescriptor::of("application/octet-stream", &stray);
    assert!(
        write_blob(&client, &ns, None, &stray_desc, &stray, &BTreeMap::new())
            .await
            .expect("write stray")
    );
    force_gc(&client, &ns).await;
    assert_eq!(
        has_blobs(&client, &ns, &[&stray_desc.digest])
            .await
            .expect("has_blobs"),
        vec![false],
        "the garbage collector did not run"
    );
    check_imported(&client, &ns, &busybox, &bb).await;
    check_imported(&client, &ns, &redis, &again).await;

    // Reading the records back.
    let info = image_info(&client, &ns, "xfer.local/redis:latest")
        .await
        .expect("image_info")
        .expect("redis exists");
    assert_eq!(
        ImportedImage {
            stats: Default::default(),
            ..rd.clone()
        },
        info
    );
    assert!(image_info(&client, &ns, "xfer.local/nope:latest")
        .await
        .expect("image_info")
        .is_none());
    let mut digests = rd.blob_digests();
    digests.push(format!("sha256:{}", "0".repeat(64)));
    let present = has_blobs(&client, &ns, &digests).await.expect("has_blobs");
    assert_eq!(present, vec![true, true, true, true, false]);
    assert_eq!(
        read_blob(&client, &ns, &redis.config.digest)
            .await
            .expect("read config"),
        redis.config_bytes
    );
    let top = &redis.layers[1];
    assert_eq!(
        read_blob(&client, &ns, &top.descriptor.digest)
            .await
            .expect("read layer"),
        top.bytes
    );

    // Cross-check with ctr: names, snapshots, and containerd's own view of "unpacked".
    let names = lab.ctr(&ns, &["images", "ls", "-q"]);
    assert!(
        names.lines().any(|l| l == "xfer.local/busybox:latest"),
        "{names}"
    );
    assert!(
        names.lines().any(|l| l == "xfer.local/redis:latest"),
        "{names}"
    );
    let snaps = lab.ctr(&ns, &["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    for chain in rd.chain_ids() {
        assert!(snaps.contains(&chain), "{chain} not in\n{snaps}");
    }
    let check = lab.ctr(&ns, &["images", "check", "--snapshotter", SNAPSHOTTER]);
    eprintln!("ctr images check:\n{check}");
    for line in check.lines().skip(1) {
        assert!(line.contains("complete"), "{line}");
        assert!(line.trim_end().ends_with("true"), "not unpacked: {line}");
    }

    // The unpacked root file systems work: busybox applets, redis with its libraries.
    let out = run_in_view(
        &mut lab,
        &client,
        &ns,
        &bb.chain_id,
        &["/bin/sh", "-c", "echo hi; seq 3 | wc -l; ls -ld /tmp"],
    )
    .await;
    assert!(out.starts_with("hi\n3\ndrwxrwxrwt"), "{out}");
    let out = run_in_view(
        &mut lab,
        &client,
        &ns,
        &rd.chain_id,
        &[REDIS_SERVER, "--version"],
    )
    .await;
    assert!(out.contains("Redis server"), "{out}");
    let out = run_in_view(
        &mut lab,
        &client,
        &ns,
        &rd.chain_id,
        &[REDIS_CLI, "--version"],
    )
    .await;
    assert!(out.contains("redis-cli"), "{out}");
    let out = run_in_view(
        &mut lab,
        &client,
        &ns,
        &rd.chain_id,
        &["/bin/ls", "-d", "/data", "/etc/passwd"],
    )
    .await;
    assert_eq!(out, "/data\n/etc/passwd\n");

    // The OCI layout is what `ctr images import` expects.
    let layout = lab.dir.path().join("layout");
    redis
        .write_layout_named(&layout, "xfer.local/redis-layout:v1")
        .expect("write layout");
    for (d, bytes) in redis.blobs() {
        let p = layout
            .join("blobs/sha256")
            .join(d.digest.trim_start_matches("sha256:"));
        assert_eq!(std::fs::read(&p).expect("blob"), bytes);
    }
    let tarball = lab.dir.path().join("layout.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success());
    let ns2 = format!("{ns}-layout");
    lab.ctr(
        &ns2,
        &[
            "images",
            "import",
            "--no-unpack",
            tarball.to_str().expect("utf8"),
        ],
    );
    let listed = lab.ctr(&ns2, &["images", "ls"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("xfer.local/redis-layout:v1")
                && l.contains(&redis.manifest.digest)),
        "{listed}"
    );

    drop(client);
    lab.shutdown().await;
}

/// What migration does: the destination has some layers; the source sends only the
/// missing blobs, and the destination recreates the image from its content store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreate_image_on_another_daemon() {
    require_root_and_tools();
    let src = Lab::start().await;
    let dst = Lab::start().await;
    let (sc, dc) = (src.client().await, dst.client().await);
    let src_ns = format!("xfer-imgtest-src-{}", std::process::id());
    let dst_ns = format!("xfer-imgtest-dst-{}", std::process::id());

    let busybox = busybox_image();
    let mut gz = ImageBuilder::host_binaries(&[REDIS_SERVER, REDIS_CLI]).expect("builder");
    gz.compression(LayerCompression::Gzip);
    let redis = gz.build_on(&busybox).expect("build gzip redis");
    assert_ne!(redis.layers[1].descriptor.digest, redis.layers[1].diff_id);

    let name = "xfer.local/redis-gz:latest";
    let t = Instant::now();
    let at_src = import(&sc, &src_ns, name, &redis, SNAPSHOTTER)
        .await
        .expect("import at source");
    eprintln!(
        "import gzip redis at source: {:?} {:?}",
        t.elapsed(),
        at_src.stats
    );
    import(
        &dc,
        &dst_ns,
        "xfer.local/busybox:latest",
        &busybox,
        SNAPSHOTTER,
    )
    .await
    .expect("busybox at destination");

    // Source side: read the record; destination: which blobs are missing?
    let info = image_info(&sc, &src_ns, name)
        .await
        .expect("info")
        .expect("exists");
    let digests = info.blob_digests();
    let present = has_blobs(&dc, &dst_ns, &digests).await.expect("has_blobs");
    assert_eq!(present, vec![true, false, false, false]);
    let descs: Vec<_> = info
        .layers
        .iter()
        .cloned()
        .chain([info.config.clone(), info.manifest.clone()])
        .collect();
    let t = Instant::now();
    let lease = Lease::create(&dc, &dst_ns, Duration::from_secs(600))
        .await
        .expect("lease");
    let mut sent = 0u64;
    for (desc, have) in descs.iter().zip(&present) {
        if *have {
            continue;
        }
        let bytes = read_blob(&sc, &src_ns, &desc.digest).await.expect("read");
        sent += bytes.len() as u64;
        let written = write_blob(
            &dc,
            &dst_ns,
            Some(lease.id()),
            desc,
            &bytes,
            &BTreeMap::new(),
        )
        .await
        .expect("write");
        assert!(written);
    }
    let at_dst = import_from_content(&dc, &dst_ns, name, &info.manifest, SNAPSHOTTER)
        .await
        .expect("import_from_content");
    lease.delete(&dc).await.expect("delete lease");
    eprintln!(
        "recreated at destination with {sent} bytes sent in {:?}: {:?}",
        t.elapsed(),
        at_dst.stats
    );
    assert_eq!(at_dst.stats.layers_skipped, 1);
    assert_eq!(at_dst.stats.layers_unpacked, 1);
    check_imported(&dc, &dst_ns, &redis, &at_dst).await;
    assert_eq!(
        ImportedImage {
            stats: Default::default(),
            ..at_dst
        },
        info
    );
    // A write of a blob that is there is a no-op.
    let written = write_blob(
        &dc,
        &dst_ns,
        None,
        &info.config,
        &redis.config_bytes,
        &BTreeMap::new(),
    )
    .await
    .expect("rewrite");
    assert!(!written);
    // Wrong bytes are refused before anything is sent.
    assert!(
        write_blob(&dc, &dst_ns, None, &info.config, b"nope", &BTreeMap::new())
            .await
            .is_err()
    );

    drop((sc, dc));
    src.shutdown().await;
    dst.shutdown().await;
}

/// Two imports of the same image racing in one namespace both succeed (content ref locks,
/// snapshot commits and image creation that lose the race are absorbed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_imports_of_the_same_image() {
    require_root_and_tools();
    let lab = Lab::start().await;
    let (c1, c2) = (lab.client().await, lab.client().await);
    let ns = format!("xfer-imgtest-race-{}", std::process::id());
    let redis = redis_on(&busybox_image());
    let name = "xfer.local/redis-race:latest";
    let t = Instant::now();
    let (a, b) = tokio::join!(
        import(&c1, &ns, name, &redis, SNAPSHOTTER),
        import(&c2, &ns, name, &redis, SNAPSHOTTER)
    );
    let (a, b) = (a.expect("first import"), b.expect("second import"));
    eprintln!(
        "racing imports: {:?}\n  {:?}\n  {:?}",
        t.elapsed(),
        a.stats,
        b.stats
    );
    assert_eq!(a.stats.blobs_written + b.stats.blobs_written, 4);
    assert!(a.stats.image_created ^ b.stats.image_created);
    check_imported(&c1, &ns, &redis, &a).await;
    // No extraction snapshot is left behind.
    let snaps = lab.ctr(&ns, &["snapshots", "--snapshotter", SNAPSHOTTER, "ls"]);
    assert_eq!(snaps.lines().count(), 3, "{snaps}");
    drop((c1, c2));
    lab.shutdown().await;
}
