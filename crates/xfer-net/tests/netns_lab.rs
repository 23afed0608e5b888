//! Root integration tests: real namespaces, a bridge, veth pairs, TCP
//! between namespaces, htb shaping, process lookup.
//!
//! They need root and FAIL (never skip) without it. Every object they create
//! is named `xnt<pid><tag>…` (tag: one letter per test); a [`Lab`] guard
//! removes them when the test ends, also when it fails, and each test first
//! removes what a crashed earlier run (a `xnt<pid>…` whose pid is gone) left.
//! Traffic only flows between namespaces the tests create.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use xfer_net::{
    pids_in_netns, run_in_netns, spawn_in_netns, Ipv4Cidr, NetError, NetOps, Netlink, Ns,
};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the xfer-net integration tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN \
         to create network namespaces, links and qdiscs); run `cargo test -p xfer-net` as root"
    );
}

/// Prefix of everything a test creates: `xnt<pid><tag>`, at most 11 bytes,
/// leaving room for a 2-4 byte suffix within the 15-byte interface limit.
fn prefix(tag: char) -> String {
    format!("xnt{}{tag}", std::process::id())
}

/// The pid in a name made by [`prefix`], if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("xnt")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let tag = rest[digits.len()..].chars().next()?;
    if digits.is_empty() || !tag.is_ascii_lowercase() {
        return None;
    }
    digits.parse().ok()
}

/// Remove every namespace (after killing what runs in it) and every root
/// link whose name matches `doomed`. Runs on its own thread and runtime so
/// that it can be called from `Drop` inside a test's runtime. Returns what
/// went wrong instead of panicking.
fn remove_matching(doomed: impl Fn(&str) -> bool + Send + 'static) -> Vec<String> {
    let cleanup = std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => return vec![format!("cannot build a runtime: {e}")],
        };
        runtime.block_on(async move {
            let mut problems = Vec::new();
            let net = match Netlink::new() {
                Ok(net) => net,
                Err(e) => return vec![format!("{e}")],
            };
            match net.list_netns().await {
                Ok(names) => {
                    for name in names.into_iter().filter(|n| doomed(n)) {
                        if let Ok(pids) = pids_in_netns(&name) {
                            for pid in pids {
                                let pid = nix::unistd::Pid::from_raw(pid as i32);
                                let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
                            }
                        }
                        if let Err(e) = net.delete_netns(&name).await {
                            if !e.is_not_found() {
                                problems.push(format!("{e}"));
                            }
                        }
                    }
                }
                Err(e) => problems.push(format!("{e}")),
            }
            // Deleting a namespace destroys the veth ends inside it and so
            // their root-side peers; bridges and anything else remain.
            match net.list_links(Ns::Root).await {
                Ok(names) => {
                    for name in names.into_iter().filter(|n| doomed(n)) {
                        if let Err(e) = net.delete_link(Ns::Root, &name).await {
                            if !e.is_not_found() {
                                problems.push(format!("{e}"));
                            }
                        }
                    }
                }
                Err(e) => problems.push(format!("{e}")),
            }
            problems
        })
    });
    cleanup
        .join()
        .unwrap_or_else(|_| vec!["the cleanup thread panicked".to_owned()])
}

/// Guard owning everything named with one test's prefix.
struct Lab {
    prefix: String,
    done: bool,
}

impl Lab {
    /// Check for root, clear leftovers of crashed runs, take the prefix.
    fn start(tag: char) -> Lab {
        require_root();
        let me = std::process::id();
        let problems = remove_matching(move |name| {
            owner_pid(name).is_some_and(|pid| {
                pid != me && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
        });
        assert!(problems.is_empty(), "cleaning old leftovers: {problems:?}");
        let lab = Lab {
            prefix: prefix(tag),
            done: false,
        };
        // A leftover of this very prefix (pid reuse) goes too.
        let problems = lab.remove_all();
        assert!(problems.is_empty(), "cleaning {}: {problems:?}", lab.prefix);
        lab
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn remove_all(&self) -> Vec<String> {
        let prefix = self.prefix.clone();
        remove_matching(move |name| name.starts_with(&prefix))
    }

    /// Clean up now and check that nothing with the prefix is left.
    async fn finish(mut self, net: &Netlink) {
        self.done = true;
        let problems = self.remove_all();
        assert!(problems.is_empty(), "cleanup: {problems:?}");
        let left: Vec<String> = net
            .list_netns()
            .await
            .expect("list netns")
            .into_iter()
            .chain(net.list_links(Ns::Root).await.expect("list links"))
            .filter(|n| n.starts_with(&self.prefix))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.done {
            for problem in self.remove_all() {
                eprintln!("cleanup of {}: {problem}", self.prefix);
            }
        }
    }
}

/// Two hosts: namespaces `n0`/`n1` with `eth0` at 10.254.<subnet>.1 and .2,
/// attached through root-side veth ends `v0`/`v1` to bridge `br`.
struct TwoHosts {
    ns: [String; 2],
    root_ends: [String; 2],
    addrs: [Ipv4Addr; 2],
}

async fn two_hosts(net: &Netlink, lab: &Lab, subnet: u8) -> TwoHosts {
    let bridge = lab.name("br");
    net.create_bridge(Ns::Root, &bridge)
        .await
        .expect("create bridge");
    let hosts = TwoHosts {
        ns: [lab.name("n0"), lab.name("n1")],
        root_ends: [lab.name("v0"), lab.name("v1")],
        addrs: [
            Ipv4Addr::new(10, 254, subnet, 1),
            Ipv4Addr::new(10, 254, subnet, 2),
        ],
    };
    for i in 0..2 {
        let (ns, end) = (&hosts.ns[i], &hosts.root_ends[i]);
        net.create_netns(ns).await.expect("create netns");
        net.create_veth(Ns::Root, end, "eth0", Ns::Named(ns))
            .await
            .expect("create veth");
        net.set_master(Ns::Root, end, &bridge)
            .await
            .expect("attach to bridge");
        net.set_link_up(Ns::Root, end).await.expect("root end up");
        net.loopback_up(ns).await.expect("lo up");
        net.set_link_up(Ns::Named(ns), "eth0")
            .await
            .expect("eth0 up");
        let cidr = Ipv4Cidr::new(hosts.addrs[i], 24).expect("valid prefix");
        net.add_address(Ns::Named(ns), "eth0", cidr)
            .await
            .expect("add address");
    }
    hosts
}

/// Accept one connection within `limit`.
fn accept_within(listener: &TcpListener, limit: Duration) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).expect("blocking");
                return (stream, peer);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {limit:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A listener bound inside `ns` (the socket stays in that namespace).
fn listen_in(ns: &str, addr: Ipv4Addr) -> TcpListener {
    run_in_netns(ns, || TcpListener::bind((addr, 0)))
        .expect("enter netns")
        .expect("bind listener")
}

/// Send `bytes` from namespace `from` to `to_addr` in namespace `to`;
/// returns how long the receiver took from the first byte to the end.
fn timed_transfer(from: &str, to: &str, to_addr: Ipv4Addr, bytes: usize) -> Duration {
    let listener = listen_in(to, to_addr);
    let target = listener.local_addr().expect("local addr");
    let sender = run_in_netns(from, || {
        TcpStream::connect_timeout(&target, Duration::from_secs(5))
    })
    .expect("enter netns")
    .expect("connect");
    let writer = std::thread::spawn(move || {
        let mut sender = sender;
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            sender.write_all(&chunk[..n]).expect("send");
            left -= n;
        }
        sender
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    let (mut receiver, _) = accept_within(&listener, Duration::from_secs(10));
    receiver
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut buf = vec![0_u8; 64 * 1024];
    let mut got = receiver.read(&mut buf).expect("first read");
    let start = Instant::now();
    loop {
        let n = receiver.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got += n;
    }
    let elapsed = start.elapsed();
    writer.join().expect("writer");
    assert_eq!(got, bytes, "bytes received");
    elapsed
}

// The default current-thread runtime: named-namespace connections must work
// there too.
#[tokio::test]
async fn netns_lifecycle_is_iproute2_compatible() {
    let lab = Lab::start('a');
    let net = Netlink::new().expect("netlink");
    let ns = lab.name("n0");

    assert!(!net.netns_exists(&ns).await.expect("exists"));
    net.create_netns(&ns).await.expect("create netns");
    assert!(net.netns_exists(&ns).await.expect("exists"));
    assert!(net.list_netns().await.expect("list").contains(&ns));

    let again = net.create_netns(&ns).await.expect_err("second create");
    assert!(again.is_already_exists(), "{again:?}");
    assert_eq!(
        again.to_string(),
        format!("cannot create network namespace {ns}: it already exists")
    );

    // iproute2 sees and can use it.
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&ns),
        "ip netns list: {listed:?}"
    );
    let exec = Command::new("ip")
        .args(["netns", "exec", &ns, "cat", "/proc/self/net/dev"])
        .output()
        .expect("run ip netns exec");
    assert!(exec.status.success(), "ip netns exec: {exec:?}");
    let devices = String::from_utf8_lossy(&exec.stdout);
    assert!(devices.contains("lo:"), "{devices}");
    assert!(!devices.contains("eth0:"), "{devices}");
    // A fresh namespace has only lo, and it is down.
    assert_eq!(net.list_links(Ns::Named(&ns)).await.expect("links"), ["lo"]);

    let missing = net
        .set_link_up(Ns::Named(&ns), "eth9")
        .await
        .expect_err("no such link");
    assert!(missing.is_not_found(), "{missing:?}");
    assert_eq!(
        missing.to_string(),
        format!("cannot set link eth9 in netns {ns} up: not found")
    );

    let too_long = net
        .create_bridge(Ns::Root, &lab.name("toolongname"))
        .await
        .expect_err("17 bytes");
    assert!(
        matches!(too_long, NetError::InvalidName { .. }),
        "{too_long:?}"
    );
    assert!(
        too_long.to_string().contains("the limit is 15"),
        "{too_long}"
    );

    net.delete_netns(&ns).await.expect("delete netns");
    assert!(!net.netns_exists(&ns).await.expect("exists"));
    let gone = net.delete_netns(&ns).await.expect_err("second delete");
    assert!(gone.is_not_found(), "{gone:?}");

    lab.finish(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_namespaces_on_a_bridge_talk_tcp() {
    let lab = Lab::start('b');
    let net = Netlink::new().expect("netlink");
    let hosts = two_hosts(&net, &lab, 201).await;
    let (ns0, ns1) = (&hosts.ns[0], &hosts.ns[1]);

    assert_eq!(
        net.list_links(Ns::Named(ns0)).await.expect("links"),
        ["eth0", "lo"]
    );
    let root_links = net.list_links(Ns::Root).await.expect("links");
    for end in &hosts.root_ends {
        assert!(root_links.contains(end), "{end} not in {root_links:?}");
    }
    // Creating the same veth again fails, and says so.
    let dup = net
        .create_veth(Ns::Root, &hosts.root_ends[0], "eth0", Ns::Named(ns0))
        .await
        .expect_err("duplicate veth");
    assert!(dup.is_already_exists(), "{dup:?}");
    assert!(dup.to_string().contains("already exists"), "{dup}");

    // The other direction: a veth made inside a namespace, peer in root.
    let back = lab.name("x0");
    net.create_veth(Ns::Named(ns0), "tmp0", &back, Ns::Root)
        .await
        .expect("veth from a namespace into root");
    assert!(net
        .list_links(Ns::Root)
        .await
        .expect("links")
        .contains(&back));
    net.delete_link(Ns::Named(ns0), "tmp0")
        .await
        .expect("delete veth in netns");
    assert!(!net
        .list_links(Ns::Root)
        .await
        .expect("links")
        .contains(&back));

    // A default route via the other host (it is on-link).
    net.add_default_route(Ns::Named(ns1), hosts.addrs[0])
        .await
        .expect("default route");
    let routes = Command::new("ip")
        .args(["-n", ns1, "-4", "route", "show", "default"])
        .output()
        .expect("ip route");
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        routes.contains(&format!("default via {} dev eth0", hosts.addrs[0])),
        "routes in {ns1}: {routes}"
    );

    // A real TCP connection from a program spawned in ns0 to a listener in
    // ns1.
    let listener = listen_in(ns1, hosts.addrs[1]);
    let port = listener.local_addr().expect("local addr").port();
    let mut client = Command::new("timeout");
    client.args([
        "10",
        "bash",
        "-c",
        &format!("echo hello-from-ns0 > /dev/tcp/{}/{port}", hosts.addrs[1]),
    ]);
    let mut client = spawn_in_netns(ns0, client).expect("spawn client");
    let (mut conn, peer) = accept_within(&listener, Duration::from_secs(10));
    let mut message = String::new();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.read_to_string(&mut message).expect("read");
    let status = client.wait().expect("wait client");
    assert!(status.success(), "client: {status}");
    assert_eq!(message, "hello-from-ns0\n");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(hosts.addrs[0]));

    // Nothing in the root namespace answers on those addresses: the
    // listener is only reachable from inside the lab.
    assert!(
        TcpStream::connect_timeout(
            &SocketAddr::from((hosts.addrs[1], port)),
            Duration::from_millis(300)
        )
        .is_err(),
        "the root namespace reached a lab address"
    );

    // Deleting a root-side end removes the pair, eth0 inside goes too.
    net.delete_link(Ns::Root, &hosts.root_ends[0])
        .await
        .expect("delete veth");
    assert_eq!(net.list_links(Ns::Named(ns0)).await.expect("links"), ["lo"]);

    lab.finish(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htb_shaping_limits_throughput() {
    const RATE: u64 = 10_000_000; // 10 Mbit/s
    const BYTES: usize = 3 * 1024 * 1024;
    let lab = Lab::start('c');
    let net = Netlink::new().expect("netlink");
    let hosts = two_hosts(&net, &lab, 202).await;
    let (ns0, ns1) = (hosts.ns[0].clone(), hosts.ns[1].clone());
    let to = hosts.addrs[1];
    let theory = Duration::from_secs_f64(BYTES as f64 * 8.0 / RATE as f64);

    let transfer = |from: String, to_ns: String| {
        tokio::task::spawn_blocking(move || timed_transfer(&from, &to_ns, to, BYTES))
    };
    let check_shaped = |what: &str, took: Duration| {
        eprintln!("{what}: {BYTES} bytes in {took:?} (theory {theory:?})");
        assert!(
            took >= theory.mul_f64(0.7),
            "{what}: {BYTES} bytes took {took:?}, at {RATE} bit/s at least 70% of {theory:?} expected"
        );
        assert!(
            took <= theory * 4,
            "{what}: {BYTES} bytes took {took:?}, far slower than {theory:?}: rate units wrong?"
        );
    };

    // Egress of the root-side end towards ns1.
    net.shape(Ns::Root, &hosts.root_ends[1], RATE)
        .await
        .expect("shape root-side end");
    // Shaping again replaces the qdisc rather than failing.
    net.shape(Ns::Root, &hosts.root_ends[1], RATE)
        .await
        .expect("reshape");
    let took = transfer(ns0.clone(), ns1.clone()).await.expect("transfer");
    check_shaped("root-side veth end", took);

    net.unshape(Ns::Root, &hosts.root_ends[1])
        .await
        .expect("unshape");
    net.unshape(Ns::Root, &hosts.root_ends[1])
        .await
        .expect("unshape is idempotent");
    let took = transfer(ns0.clone(), ns1.clone()).await.expect("transfer");
    eprintln!("unshaped: {BYTES} bytes in {took:?}");
    assert!(
        took < theory / 2,
        "unshaped transfer took {took:?}, shaping still active?"
    );

    // Egress of eth0 inside ns0 (tc runs in the namespace).
    net.shape(Ns::Named(&ns0), "eth0", RATE)
        .await
        .expect("shape eth0 in netns");
    let took = transfer(ns0.clone(), ns1.clone()).await.expect("transfer");
    check_shaped("eth0 inside the namespace", took);
    net.unshape(Ns::Named(&ns0), "eth0")
        .await
        .expect("unshape in netns");

    let bad = net
        .shape(Ns::Root, &hosts.root_ends[1], 0)
        .await
        .expect_err("zero rate");
    assert!(matches!(bad, NetError::Shape { .. }), "{bad:?}");

    lab.finish(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_in_netns_finds_a_spawned_sleep() {
    let lab = Lab::start('d');
    let net = Netlink::new().expect("netlink");
    let ns = lab.name("n0");
    net.create_netns(&ns).await.expect("create netns");
    assert!(pids_in_netns(&ns).expect("pids").is_empty());

    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    let mut child = spawn_in_netns(&ns, sleep).expect("spawn sleep");
    // The child joined the namespace before exec, so it is there at once.
    let pids = pids_in_netns(&ns).expect("pids");
    assert_eq!(pids, [child.id()]);
    // It is in the namespace, not in ours.
    let child_ns = std::fs::metadata(format!("/proc/{}/ns/net", child.id())).expect("child ns");
    let our_ns = std::fs::metadata("/proc/self/ns/net").expect("our ns");
    use std::os::unix::fs::MetadataExt;
    assert_ne!(child_ns.ino(), our_ns.ino());

    // A thread of ours inside the namespace does not count us in.
    let during = run_in_netns(&ns, || pids_in_netns(&ns)).expect("enter");
    assert_eq!(during.expect("pids"), [child.id()]);

    child.kill().expect("kill");
    child.wait().expect("reap");
    assert!(pids_in_netns(&ns).expect("pids").is_empty());

    lab.finish(&net).await;
}

#[test]
fn owner_pid_parses_test_prefixes() {
    assert_eq!(owner_pid("xnt123ab0"), Some(123));
    assert_eq!(owner_pid("xnt9cn1"), Some(9));
    assert_eq!(owner_pid("xntabc"), None);
    assert_eq!(owner_pid("xnt12"), None);
    assert_eq!(owner_pid("xnt12-x"), None);
    assert_eq!(owner_pid("eth0"), None);
}
