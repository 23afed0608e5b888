//! `lab down` removes everything the lab made, also after a crashed run.

use xfer_lab::LabSpec;
use xfer_tests::{chain, require_root_stack, task_pid, xferd_path, TestLab};

/// A live process (a zombie is dead: it only waits for a parent to reap it, and this
/// machine's init does not always do so promptly).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Takes the lab down when dropped, also if an assertion fails.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let p = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(xfer_lab::down(&p))
        })
        .join();
        xfer_tests::reap_orphans();
    }
}

fn leftovers(prefix: &str, pids: &[u32]) -> Vec<String> {
    let mut out = Vec::new();
    for ns in xfer_net::list_netns().expect("list netns") {
        if ns.starts_with(&format!("{prefix}-")) {
            out.push(format!("namespace {ns}"));
        }
    }
    for l in std::fs::read_dir("/sys/class/net")
        .expect("links")
        .flatten()
    {
        let n = l.file_name().to_string_lossy().into_owned();
        if n.starts_with(&format!("{prefix}-")) {
            out.push(format!("link {n}"));
        }
    }
    for p in pids {
        if alive(*p) {
            out.push(format!("process {p}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in mounts.lines() {
        if line.contains(&format!("/xfer-lab/{prefix}/")) {
            out.push(format!("mount {line}"));
        }
    }
    if std::path::Path::new(&format!("/var/lib/xfer-lab/{prefix}")).exists() {
        out.push("lab directory".into());
    }
    for e in std::fs::read_dir("/run/containerd/runc")
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("xfer-{prefix}-"))
        {
            out.push(format!("runc state {}", e.path().display()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_down_leaves_nothing_even_after_a_crash() {
    // (with a frozen container among the leftovers)
    require_root_stack();
    xfer_tests::become_subreaper();
    let prefix = &xfer_tests::lab_prefix("tcl");
    let lab = TestLab::up("tcl", 2).await;
    lab.import("h1", "busybox").await;
    let mut h1 = lab.agent("h1").await;
    let args: Vec<String> = vec!["sleep".into(), "1000".into()];
    h1.run("sleeper", "busybox", &args, &[])
        .await
        .unwrap_or_else(|e| panic!("run: {}", chain(&e)));
    let (cpid, _) = task_pid(&mut h1, "sleeper").await.expect("sleeper");
    let mut pids: Vec<u32> = lab
        .lab
        .hosts
        .iter()
        .flat_map(|h| [h.containerd_pid, h.xferd_pid])
        .collect();
    pids.push(cpid);
    // A container left frozen (a CRIU dump cut half way does that): its processes
    // take no SIGKILL until thawed, so `down` must thaw it.
    let cg = format!("xfer-{prefix}-h1/sleeper");
    let v1 = std::path::Path::new("/sys/fs/cgroup/freezer").join(&cg);
    let froze = if v1.is_dir() {
        std::fs::write(v1.join("freezer.state"), "FROZEN")
    } else {
        std::fs::write(
            std::path::Path::new("/sys/fs/cgroup")
                .join(&cg)
                .join("cgroup.freeze"),
            "1",
        )
    };
    froze.unwrap_or_else(|e| panic!("freeze the sleeper's cgroup {cg}: {e}"));
    // Simulate a crash: forget the lab without taking it down, then bring up a new
    // lab of the same prefix, which must clear the old one first.
    std::mem::forget(lab);
    let _down = Down(prefix.clone());
    let again = xfer_lab::up(&LabSpec {
        prefix: prefix.to_string(),
        nodes: 1,
        rates: vec![],
        xferd: xferd_path(),
        handover: Default::default(),
    })
    .await
    .unwrap_or_else(|e| panic!("lab up over a crashed lab: {}", chain(&e)));
    for p in &pids {
        assert!(!alive(*p), "process {p} of the crashed lab survived");
    }
    pids.extend(
        again
            .hosts
            .iter()
            .flat_map(|h| [h.containerd_pid, h.xferd_pid]),
    );
    let rep = xfer_lab::down(prefix)
        .await
        .unwrap_or_else(|e| panic!("down: {}", chain(&e)));
    assert!(!rep.namespaces.is_empty());
    let left = leftovers(prefix, &pids);
    assert!(left.is_empty(), "left behind: {left:#?}");
    // Down twice is fine.
    xfer_lab::down(prefix)
        .await
        .unwrap_or_else(|e| panic!("second down: {}", chain(&e)));
}
