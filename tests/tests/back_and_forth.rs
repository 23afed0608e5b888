//! Twenty live migrations of one container back and forth between two hosts leak
//! nothing: file descriptors of the agents, mounts, network namespaces, containerd
//! objects, chunk-store leases; and the container's state survives all of them.

use std::time::Duration;

use xfer_agent::client::Mode;
use xfer_tests::{chain, read_in, task_pid, wait_for, TestLab};

const COUNTER: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /count; head -c 65536 /dev/urandom > /tmp/churn; sleep 0.05; done";

#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    fds: Vec<usize>,
    mounts: usize,
    namespaces: usize,
    containers: usize,
    snapshots: Vec<usize>,
    leases: usize,
}

fn count_lines(cmd: &mut std::process::Command) -> usize {
    let out = cmd.output().expect("run ctr");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count()
}

fn footprint(lab: &TestLab) -> Footprint {
    let p = &lab.lab.prefix;
    let fds = lab
        .lab
        .hosts
        .iter()
        .map(|h| {
            std::fs::read_dir(format!("/proc/{}/fd", h.xferd_pid))
                .expect("fds")
                .count()
        })
        .collect();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(&format!("/xfer-lab/{p}/")))
        .count();
    let namespaces = xfer_net::list_netns()
        .expect("netns")
        .iter()
        .filter(|n| n.starts_with(&format!("{p}-")))
        .count();
    let ctr = |h: &xfer_lab::LabHost, what: &[&str]| {
        let mut c = std::process::Command::new("ctr");
        c.arg("--address")
            .arg(&h.containerd_socket)
            .args(["-n", &h.containerd_namespace])
            .args(what);
        count_lines(&mut c)
    };
    let containers = lab
        .lab
        .hosts
        .iter()
        .map(|h| ctr(h, &["containers", "ls"]))
        .sum();
    let snapshots = lab
        .lab
        .hosts
        .iter()
        .map(|h| ctr(h, &["snapshots", "ls"]))
        .collect();
    let leases = lab
        .lab
        .hosts
        .iter()
        .map(|h| {
            let dir = std::path::Path::new(xfer_lab::LAB_SCRATCH)
                .join(p)
                .join(&h.name)
                .join("store/leases");
            // Migrations' leases; the image index's (one per host) stays by design.
            let index = format!("{}.lease", xfer_agent::layers::LEASE);
            std::fs::read_dir(dir)
                .map(|d| d.flatten().filter(|e| e.file_name() != *index).count())
                .unwrap_or(0)
        })
        .sum();
    Footprint {
        fds,
        mounts,
        namespaces,
        containers,
        snapshots,
        leases,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_migrations_back_and_forth_leak_nothing() {
    let lab = TestLab::up("tbf", 2).await;
    lab.import("h1", "busybox").await;
    lab.import("h2", "busybox").await;
    let mut agents = [lab.agent("h1").await, lab.agent("h2").await];
    let ends = [
        lab.lab.host("h1").expect("h1").endpoint.clone(),
        lab.lab.host("h2").expect("h2").endpoint.clone(),
    ];
    let args: Vec<String> = vec!["sh".into(), "-c".into(), COUNTER.into()];
    agents[0]
        .run_with_address(
            "c",
            "busybox",
            &args,
            &[],
            &lab.lab.service_address(3),
            &lab.lab.gateway.to_string(),
        )
        .await
        .unwrap_or_else(|e| panic!("run: {}", chain(&e)));
    let mut last = 0u64;
    let mut after_two = None;
    for n in 0..20usize {
        let (from, to) = (n % 2, (n + 1) % 2);
        let rep = agents[from]
            .migrate("c", &ends[to], Mode::Precopy, |_| {})
            .await
            .unwrap_or_else(|e| panic!("migration {n}: {}", chain(&e)));
        let (pid, status) = task_pid(&mut agents[to], "c")
            .await
            .expect("container on its new host");
        assert_eq!(status, "running", "migration {n}");
        assert_eq!(rep.restored_pid, pid);
        let now = wait_for("counter readable", Duration::from_secs(10), || {
            read_in(pid, "/count").and_then(|s| s.parse::<u64>().ok())
        })
        .await;
        assert!(
            now >= last,
            "migration {n}: the counter went back from {last} to {now}"
        );
        last = now;
        if n == 1 {
            after_two = Some(footprint(&lab));
        }
    }
    let before = after_two.expect("footprint after two migrations");
    let after = footprint(&lab);
    eprintln!("after 2: {before:?}\nafter 20: {after:?}");
    assert_eq!(after.leases, 0, "chunk-store leases left behind");
    assert_eq!(
        after.containers, 1,
        "exactly one container across both hosts"
    );
    assert_eq!(after.mounts, before.mounts, "mounts grew");
    assert_eq!(
        after.namespaces, before.namespaces,
        "network namespaces grew"
    );
    assert_eq!(
        after.snapshots, before.snapshots,
        "containerd snapshots grew"
    );
    for (a, b) in after.fds.iter().zip(&before.fds) {
        // Pooled gRPC connections may differ by a few; a leak grows with every migration.
        assert!(
            *a <= b + 4,
            "agent file descriptors grew from {b} to {a} over 18 migrations"
        );
    }
}
