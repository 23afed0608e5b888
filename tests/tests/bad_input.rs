//! Bad input is refused before anything is frozen, with a message that says what is
//! wrong and what to do.

use std::process::{Command, Stdio};
use std::time::Duration;

use xfer_agent::client::Mode;
use xfer_agent::volumes::parse_cli;
use xfer_tests::{chain, task_pid, wait_for, TestLab};

/// A redis-server on the host listening on a unix socket in `dir`; killed on drop.
struct HostRedis(std::process::Child, std::path::PathBuf);

impl Drop for HostRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_to_the_outside_is_refused_before_the_freeze() {
    let lab = TestLab::up("tbi", 2).await;
    lab.import("h1", "redis").await;
    let dir = std::path::PathBuf::from(format!("/dev/shm/xfer-tbi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("socket dir");
    let sock = dir.join("r.sock");
    let child = Command::new("redis-server")
        .args(["--port", "0", "--save", "", "--unixsocket"])
        .arg(&sock)
        .args(["--unixsocketperm", "777"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start a host redis-server");
    let _host = HostRedis(child, dir.clone());
    wait_for("the host redis socket", Duration::from_secs(10), || {
        sock.exists().then_some(())
    })
    .await;

    // A container whose redis-cli holds a connection to the host's redis through a
    // bind-mounted socket.
    let mut h1 = lab.agent("h1").await;
    h1.set_volumes(vec![
        parse_cli(&format!("{}:/sock", dir.display())).expect("bind mount")
    ]);
    let args: Vec<String> = ["redis-cli", "-s", "/sock/r.sock", "monitor"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    h1.run("client", "redis", &args, &[])
        .await
        .unwrap_or_else(|e| panic!("run: {}", chain(&e)));
    let (pid, _) = task_pid(&mut h1, "client").await.expect("running");
    // Wait until it is connected (the host redis lists it).
    wait_for(
        "the container's connection",
        Duration::from_secs(10),
        || {
            let out = Command::new("redis-cli")
                .arg("-s")
                .arg(&sock)
                .args(["client", "list"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("cmd=monitor")
                .then_some(())
        },
    )
    .await;

    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    let mut seen = Vec::new();
    let e = h1
        .migrate_with("client", &dst, Mode::Precopy, "", |p| {
            seen.push(p.name.clone())
        })
        .await
        .expect_err("an external unix socket must be refused");
    let msg = chain(&e);
    assert!(
        msg.contains("unix sockets connected to processes outside"),
        "{msg}"
    );
    assert!(
        msg.contains("r.sock"),
        "the message names the socket: {msg}"
    );
    assert!(
        !seen
            .iter()
            .any(|p| p == "freeze" || p.starts_with("precopy")),
        "something was dumped or frozen: {seen:?}"
    );
    // Untouched: same process, running, nothing at the destination.
    assert_eq!(
        task_pid(&mut h1, "client").await,
        Some((pid, "running".into()))
    );
    let mut h2 = lab.agent("h2").await;
    assert!(task_pid(&mut h2, "client").await.is_none());
}
