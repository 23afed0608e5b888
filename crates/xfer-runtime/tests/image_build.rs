//! Building images from host files: determinism, symlinks, libraries, the OCI layout.
//! Needs the Debian packages busybox-static and redis-server (and `ldd`).

use std::collections::BTreeMap;
use std::path::Path;

use xfer_runtime::image::{sha256_digest, BuiltImage, ImageBuilder, MEDIA_TYPE_INDEX};

const BUSYBOX: &str = "/bin/busybox";
const REDIS: [&str; 2] = ["/usr/bin/redis-server", "/usr/bin/redis-cli"];

fn require_tools() {
    for p in [BUSYBOX, REDIS[0], REDIS[1]] {
        assert!(
            Path::new(p).exists(),
            "image_build tests need {p} (Debian packages busybox-static and redis-server)"
        );
    }
}

enum Kind {
    Dir(u32),
    File(u32, Vec<u8>),
    Link(String),
}

fn entries(img: &BuiltImage, layer: usize) -> BTreeMap<String, Kind> {
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(img.layers[layer].bytes.as_slice());
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let path = e.path().expect("path").display().to_string();
        let h = e.header().clone();
        let mode = h.mode().expect("mode");
        let kind = match h.entry_type() {
            tar::EntryType::Directory => Kind::Dir(mode),
            tar::EntryType::Symlink => Kind::Link(
                e.link_name()
                    .expect("link")
                    .expect("target")
                    .display()
                    .to_string(),
            ),
            tar::EntryType::Regular => {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).expect("read");
                Kind::File(mode, data)
            }
            other => panic!("unexpected entry type {other:?} at {path}"),
        };
        out.insert(path.trim_end_matches('/').to_string(), kind);
    }
    out
}

/// Resolve an absolute path inside the layer, following its symlinks; returns the
/// relative path of the final (non-symlink) entry.
fn resolve(e: &BTreeMap<String, Kind>, path: &str) -> String {
    let mut todo: Vec<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .rev()
        .collect();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        cur.push(c);
        let key = cur.join("/");
        match e.get(&key) {
            Some(Kind::Link(t)) => {
                hops += 1;
                assert!(hops < 40, "symlink loop at {key}");
                cur.pop();
                if t.starts_with('/') {
                    cur.clear();
                }
                for part in t.split('/').filter(|c| !c.is_empty()).rev() {
                    todo.push(part.to_string());
                }
            }
            Some(_) => {}
            None => panic!("{path}: {key} is not in the image"),
        }
    }
    cur.join("/")
}

#[test]
fn busybox_image_is_deterministic_and_complete() {
    require_tools();
    let a = ImageBuilder::busybox(BUSYBOX)
        .expect("builder")
        .build()
        .expect("build");
    let b = ImageBuilder::busybox(BUSYBOX)
        .expect("builder")
        .build()
        .expect("build");
    assert_eq!(a.layers[0].descriptor, b.layers[0].descriptor);
    assert_eq!(a.manifest, b.manifest);
    assert_eq!(a.layers[0].bytes, b.layers[0].bytes);

    let e = entries(&a, 0);
    match e.get("bin/busybox") {
        Some(Kind::File(mode, data)) => {
            assert_eq!(*mode, 0o755);
            assert_eq!(data, &std::fs::read(BUSYBOX).expect("busybox"));
        }
        _ => panic!("no bin/busybox file"),
    }
    for applet in [
        "sh", "ls", "cat", "echo", "sleep", "date", "seq", "rm", "mkdir", "nc", "wc", "head",
        "tail", "grep",
    ] {
        assert!(
            matches!(e.get(&format!("bin/{applet}")), Some(Kind::Link(t)) if t == "busybox"),
            "bin/{applet}"
        );
    }
    assert!(matches!(e.get("tmp"), Some(Kind::Dir(0o1777))));
    for f in ["etc/passwd", "etc/group", "etc/hosts"] {
        assert!(matches!(e.get(f), Some(Kind::File(0o644, _))), "{f}");
    }
}

#[test]
fn host_binaries_bring_libraries_and_symlinks() {
    require_tools();
    let build = || {
        ImageBuilder::host_binaries(&REDIS)
            .expect("builder")
            .build()
            .expect("build")
    };
    let a = build();
    let b = build();
    assert_eq!(
        a.layers[0].descriptor, b.layers[0].descriptor,
        "deterministic"
    );
    assert_eq!(a.manifest, b.manifest);
    eprintln!(
        "redis layer: {} bytes, {}",
        a.layers[0].descriptor.size, a.layers[0].descriptor.digest
    );

    let e = entries(&a, 0);
    // Every path the host resolves resolves in the image, symlinks kept as symlinks.
    for wanted in REDIS.iter().map(|p| p.to_string()).chain(
        xfer_runtime::image::ldd_dependencies(Path::new(REDIS[0]))
            .expect("ldd")
            .into_iter()
            .map(|p| p.display().to_string()),
    ) {
        let mut host = Path::new(&wanted).to_path_buf();
        let real = std::fs::canonicalize(&host).expect("canonicalize");
        // Walk the host path: every symlink on the way is a symlink in the image.
        let mut cur = std::path::PathBuf::from("/");
        for c in host.clone().components().skip(1) {
            cur.push(c);
            let md = std::fs::symlink_metadata(&cur).expect("lstat");
            let key = cur.strip_prefix("/").expect("rel").display().to_string();
            if md.file_type().is_symlink() {
                let target = std::fs::read_link(&cur).expect("readlink");
                assert!(
                    matches!(e.get(&key), Some(Kind::Link(t)) if Path::new(t) == target),
                    "{key} should be a symlink to {}",
                    target.display()
                );
                host = real.clone();
                break;
            }
        }
        let key = real.strip_prefix("/").expect("rel").display().to_string();
        match e.get(&key) {
            Some(Kind::File(_, data)) => {
                assert_eq!(
                    sha256_digest(data),
                    sha256_digest(&std::fs::read(&real).expect("read")),
                    "{key}"
                )
            }
            _ => panic!(
                "{key} (for {wanted}, via {}) is not a file in the image",
                host.display()
            ),
        }
    }
    // The loader path that every binary names resolves (through the image's symlinks)
    // to the loader itself.
    let loader = resolve(&e, "/lib64/ld-linux-x86-64.so.2");
    let host_loader = std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2").expect("loader");
    assert_eq!(Path::new("/").join(&loader), host_loader);
    for p in REDIS {
        let r = resolve(&e, p);
        assert!(
            matches!(e.get(&r), Some(Kind::File(0o755, _))),
            "{p} -> {r}"
        );
    }
    assert!(matches!(e.get("data"), Some(Kind::Dir(0o755))));
    assert!(matches!(e.get("tmp"), Some(Kind::Dir(0o1777))));
    assert!(e.contains_key("etc/passwd"));
}

#[test]
fn busybox_plus_host_binary_on_a_merged_usr_host() {
    require_tools();
    // The image's /bin is a real directory (busybox); the host's /bin may be a symlink
    // to usr/bin. The requested path must still work.
    let mut b = ImageBuilder::busybox(BUSYBOX).expect("builder");
    b.add_host_binary("/bin/bash").expect("bash");
    let img = b.build().expect("build");
    let e = entries(&img, 0);
    let real = std::fs::canonicalize("/bin/bash").expect("canonicalize");
    if real != Path::new("/bin/bash") {
        assert!(
            matches!(e.get("bin/bash"), Some(Kind::Link(t)) if Path::new(t) == real),
            "bin/bash should link to {}",
            real.display()
        );
    }
    let key = real.strip_prefix("/").expect("rel").display().to_string();
    assert!(matches!(e.get(&key), Some(Kind::File(..))), "{key}");
    assert!(matches!(e.get("bin/busybox"), Some(Kind::File(..))));
}

#[test]
fn oci_layout() {
    require_tools();
    let base = ImageBuilder::busybox(BUSYBOX)
        .expect("builder")
        .build()
        .expect("build");
    let img = ImageBuilder::host_binaries(&REDIS)
        .expect("builder")
        .build_on(&base)
        .expect("build");
    assert_eq!(img.layers[0].descriptor, base.layers[0].descriptor);
    let dir = tempfile::tempdir().expect("tempdir");
    img.write_layout_named(dir.path(), "xfer.local/redis:7")
        .expect("layout");
    img.write_layout_named(dir.path(), "xfer.local/redis:7")
        .expect("layout twice");
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("oci-layout")).expect("oci-layout"))
            .expect("json");
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).expect("index"))
            .expect("json");
    assert_eq!(index["mediaType"], MEDIA_TYPE_INDEX);
    assert_eq!(
        index["manifests"][0]["digest"],
        img.manifest.digest.as_str()
    );
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        "xfer.local/redis:7"
    );
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "7"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("blobs/sha256"))
        .expect("blobs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = img
        .blobs()
        .iter()
        .map(|(d, _)| d.digest.trim_start_matches("sha256:").to_string())
        .collect();
    want.sort();
    assert_eq!(names, want);
    for (d, _) in img.blobs() {
        let p = dir
            .path()
            .join("blobs/sha256")
            .join(d.digest.trim_start_matches("sha256:"));
        assert_eq!(sha256_digest(&std::fs::read(p).expect("blob")), d.digest);
    }
}
