//! Root integration tests of the handover's forwarding pieces: the tunnel
//! probe, a VXLAN tunnel carrying a /32 route (TCP through it, counters),
//! policy rules steering traffic into a table, and gratuitous ARP updating
//! a neighbour's cache.
//!
//! They need root and FAIL (never skip) without it. Everything they create
//! is named `xth<pid><tag>…` (tag: one letter per test) and lives in
//! namespaces the test creates (plus the root-side bridge and veth ends);
//! a [`Lab`] guard removes it when the test ends, also when it fails, and
//! each test first removes what a crashed earlier run (a `xth<pid>…` whose
//! pid is gone) left. Traffic only flows between those namespaces.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::pin::pin;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xfer_net::rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourState,
};
use xfer_net::{
    pids_in_netns, run_in_netns, send_gratuitous_arp, Ipv4Cidr, NetError, NetOps, Netlink, Ns,
    RouteSpec, RouteVia, RuleSpec, TunnelKind, TunnelSpec, VxlanSpec, TABLE_MAIN, VXLAN_PORT,
};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the xfer-net integration tests need root (CAP_NET_ADMIN, CAP_NET_RAW and \
         CAP_SYS_ADMIN to create network namespaces, tunnels, routes and raw sockets); \
         run `cargo test -p xfer-net` as root"
    );
}

const PREFIX: &str = "xth";

/// `xth<pid><tag>`: at most 11 bytes, leaving 4 for a suffix.
fn prefix(tag: char) -> String {
    format!("{PREFIX}{}{tag}", std::process::id())
}

/// The pid in a name made by [`prefix`], if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let tag = rest[digits.len()..].chars().next()?;
    if digits.is_empty() || !tag.is_ascii_lowercase() {
        return None;
    }
    digits.parse().ok()
}

/// Remove every namespace (after killing what runs in it) and every root
/// link whose name matches `doomed`, on a thread and runtime of its own (so
/// it works from `Drop`). Returns what went wrong.
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

/// Two hosts on a bridge: namespaces `n0`/`n1`, `eth0` at 10.254.S.1 and
/// .2/24 (the underlay).
struct TwoHosts {
    ns: [String; 2],
    addrs: [Ipv4Addr; 2],
}

async fn two_hosts(net: &Netlink, lab: &Lab, subnet: u8) -> TwoHosts {
    let bridge = lab.name("br");
    net.create_bridge(Ns::Root, &bridge)
        .await
        .expect("create bridge");
    let hosts = TwoHosts {
        ns: [lab.name("n0"), lab.name("n1")],
        addrs: [
            Ipv4Addr::new(10, 254, subnet, 1),
            Ipv4Addr::new(10, 254, subnet, 2),
        ],
    };
    for i in 0..2 {
        let ns = &hosts.ns[i];
        let end = lab.name(&format!("v{i}"));
        net.create_netns(ns).await.expect("create netns");
        net.create_veth(Ns::Root, &end, "eth0", Ns::Named(ns))
            .await
            .expect("create veth");
        net.set_master(Ns::Root, &end, &bridge)
            .await
            .expect("attach to bridge");
        net.set_link_up(Ns::Root, &end).await.expect("root end up");
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

/// The inner (tunnel) addresses of a [`tunnel_pair`]: 10.253.S.1 and .2/30.
fn inner(subnet: u8) -> [Ipv4Addr; 2] {
    [
        Ipv4Addr::new(10, 253, subnet, 1),
        Ipv4Addr::new(10, 253, subnet, 2),
    ]
}

/// A point-to-point VXLAN `vx0` between the two hosts over `eth0`, with
/// the inner addresses of [`inner`], up on both sides.
async fn tunnel_pair(net: &Netlink, hosts: &TwoHosts, subnet: u8) {
    let inner = inner(subnet);
    for (i, j) in [(0, 1), (1, 0)] {
        let ns = Ns::Named(&hosts.ns[i]);
        let spec = VxlanSpec {
            name: "vx0".into(),
            vni: 4000 + u32::from(subnet),
            local: hosts.addrs[i],
            remote: hosts.addrs[j],
            dst_port: VXLAN_PORT,
            underlay_dev: Some("eth0".into()),
        };
        net.create_vxlan(ns, &spec).await.expect("create vxlan");
        let cidr = Ipv4Cidr::new(inner[i], 30).expect("valid prefix");
        net.add_address(ns, "vx0", cidr).await.expect("address vx0");
        net.set_link_up(ns, "vx0").await.expect("vx0 up");
    }
}

/// Put `addr`/32 on `lo` in `ns`: an address only reachable through a
/// route that leads there.
async fn add_home_address(net: &Netlink, ns: &str, addr: Ipv4Addr) {
    let cidr = Ipv4Cidr::new(addr, 32).expect("valid prefix");
    net.add_address(Ns::Named(ns), "lo", cidr)
        .await
        .expect("address on lo");
}

/// Accept one connection within `limit`.
fn accept_within(listener: &TcpListener, limit: Duration) -> io::Result<std::net::TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

const ECHO_BYTES: usize = 256 * 1024;

/// Open a TCP connection from `client_ns` (bound to `bind` if given) to a
/// listener on `server_addr` in `server_ns`, send [`ECHO_BYTES`] and read
/// them back. `Err` if the connection cannot be made (within 3 s) or the
/// echo fails.
async fn echo(
    client_ns: &str,
    server_ns: &str,
    server_addr: Ipv4Addr,
    bind: Option<Ipv4Addr>,
) -> io::Result<()> {
    let listener = run_in_netns(server_ns, || TcpListener::bind((server_addr, 0)))
        .expect("enter server netns")?;
    let target = listener.local_addr()?;
    let server = tokio::task::spawn_blocking(move || -> io::Result<usize> {
        let mut conn = accept_within(&listener, Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0_u8; 64 * 1024];
        let mut total = 0;
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            conn.write_all(&buf[..n])?;
            total += n;
        }
    });
    let socket =
        run_in_netns(client_ns, tokio::net::TcpSocket::new_v4).expect("enter client netns")?;
    if let Some(ip) = bind {
        socket.bind(SocketAddr::from((ip, 0)))?;
    }
    let client = async {
        let mut stream = socket.connect(target).await?;
        let data: Vec<u8> = (0..ECHO_BYTES).map(|i| (i % 251) as u8).collect();
        let (mut rd, mut wr) = stream.split();
        let write = async {
            wr.write_all(&data).await?;
            wr.shutdown().await
        };
        let mut back = Vec::with_capacity(ECHO_BYTES);
        let read = rd.read_to_end(&mut back);
        let (w, r) = tokio::join!(write, read);
        w?;
        r?;
        if back != data {
            return Err(io::Error::other("echo mismatch"));
        }
        Ok(())
    };
    let result = match tokio::time::timeout(Duration::from_secs(15), client).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "echo timed out")),
    };
    if result.is_ok() {
        let echoed = server.await.expect("server thread")?;
        assert_eq!(echoed, ECHO_BYTES);
    }
    // On failure the server times out on its own; nobody waits for it.
    result
}

/// Whether a TCP connection attempt failed for lack of a route.
fn unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH)
    ) || e.kind() == io::ErrorKind::TimedOut
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_probe_reports_exactly_the_kinds_that_work() {
    let lab = Lab::start('p');
    let net = Netlink::new().expect("netlink");

    let scratch = lab.name("s");
    let kinds = net
        .probe_tunnel_kinds_in_scratch(&scratch)
        .await
        .expect("probe");
    eprintln!("tunnel kinds this kernel can create: {kinds:?}");
    assert!(
        !net.netns_exists(&scratch).await.expect("exists"),
        "the scratch namespace must be gone"
    );
    assert!(kinds.contains(&TunnelKind::Vxlan), "{kinds:?}");
    assert!(kinds.windows(2).all(|w| w[0] < w[1]), "sorted: {kinds:?}");
    assert_eq!(TunnelKind::pick(&kinds), kinds.first().copied());

    // Compare with iproute2, kind by kind, in a namespace of our own.
    let check = lab.name("c");
    net.create_netns(&check).await.expect("create netns");
    for kind in TunnelKind::ALL {
        let name = format!("t{}", kind.as_str());
        let mut args = vec!["-n", &check, "link", "add", &name, "type", kind.as_str()];
        args.extend(["local", "192.0.2.1", "remote", "192.0.2.2"]);
        if kind == TunnelKind::Vxlan {
            args.extend(["id", "7", "dstport", "4789"]);
        }
        let out = Command::new("ip").args(&args).output().expect("run ip");
        let iproute2_can = out.status.success();
        if iproute2_can {
            let del = Command::new("ip")
                .args(["-n", &check, "link", "del", &name])
                .status()
                .expect("run ip link del");
            assert!(del.success());
        }
        assert_eq!(
            kinds.contains(&kind),
            iproute2_can,
            "probe and `ip link add … type {kind}` disagree ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );

        // Every reported kind works through our own API too; the others
        // fail with a clear error.
        let spec = TunnelSpec::point_to_point(
            kind,
            "tun0",
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(192, 0, 2, 2),
            9,
            None,
        );
        let created = net.create_tunnel(Ns::Named(&check), &spec).await;
        if kinds.contains(&kind) {
            created.unwrap_or_else(|e| panic!("create {kind}: {e}"));
            assert!(net
                .list_links(Ns::Named(&check))
                .await
                .expect("links")
                .contains(&"tun0".to_owned()));
            net.delete_link(Ns::Named(&check), "tun0")
                .await
                .expect("delete tunnel");
        } else {
            let e = created.expect_err("an unsupported kind must fail");
            assert!(matches!(e, NetError::CreateLink { .. }), "{e:?}");
            assert!(
                e.to_string()
                    .starts_with(&format!("cannot create link tun0 ({kind} tunnel) in netns")),
                "{e}"
            );
        }
    }
    // The probe in a namespace leaves nothing behind there.
    net.probe_tunnel_kinds(Ns::Named(&check))
        .await
        .expect("probe in place");
    let links = net.list_links(Ns::Named(&check)).await.expect("links");
    assert!(
        links.iter().all(|l| !l.starts_with("xprb")),
        "probe links left: {links:?}"
    );

    lab.finish(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_tunnel_carries_a_host_route() {
    const S: u8 = 211;
    let lab = Lab::start('v');
    let net = Netlink::new().expect("netlink");
    let hosts = two_hosts(&net, &lab, S).await;
    let (ns0, ns1) = (hosts.ns[0].clone(), hosts.ns[1].clone());
    tunnel_pair(&net, &hosts, S).await;
    // The home address lives only in n1, behind the tunnel.
    let home = Ipv4Addr::new(10, 252, S, 9);
    add_home_address(&net, &ns1, home).await;

    // No route yet: unreachable from n0.
    let e = echo(&ns0, &ns1, home, None)
        .await
        .expect_err("no route yet");
    assert!(unreachable(&e), "{e}");

    let route = RouteSpec::host(home, RouteVia::Device("vx0".into()));
    net.add_route(Ns::Named(&ns0), &route)
        .await
        .expect("add route");
    let dup = net
        .add_route(Ns::Named(&ns0), &route)
        .await
        .expect_err("duplicate route");
    assert!(dup.is_already_exists(), "{dup:?}");
    assert_eq!(
        dup.to_string(),
        format!("cannot add route 10.252.{S}.9/32 dev vx0 in netns {ns0}: it already exists")
    );
    let routes = net
        .list_routes(Ns::Named(&ns0), Some(TABLE_MAIN))
        .await
        .expect("routes");
    let ours = routes
        .iter()
        .find(|r| r.destination.addr() == home)
        .unwrap_or_else(|| panic!("no route to {home} in {routes:?}"));
    assert_eq!(
        (ours.destination.prefix(), ours.dev.as_deref(), ours.gateway),
        (32, Some("vx0"), None)
    );

    let before = net.link_stats(Ns::Named(&ns0), "vx0").await.expect("stats");
    let underlay_before = net
        .link_stats(Ns::Named(&ns0), "eth0")
        .await
        .expect("stats");
    echo(&ns0, &ns1, home, None)
        .await
        .expect("TCP through the tunnel");
    let after = net.link_stats(Ns::Named(&ns0), "vx0").await.expect("stats");
    let underlay_after = net
        .link_stats(Ns::Named(&ns0), "eth0")
        .await
        .expect("stats");
    eprintln!("vx0 before {before:?}\nvx0 after  {after:?}");
    assert!(after.moved_since(&before));
    let payload = ECHO_BYTES as u64;
    assert!(after.tx_bytes - before.tx_bytes > payload, "{after:?}");
    assert!(after.rx_bytes - before.rx_bytes > payload, "{after:?}");
    // The encapsulated traffic crossed the underlay: more bytes there.
    assert!(
        underlay_after.tx_bytes - underlay_before.tx_bytes > after.tx_bytes - before.tx_bytes,
        "underlay {underlay_after:?}"
    );

    // Re-point the route through a gateway on the tunnel, atomically.
    let via_gateway = RouteSpec::host(
        home,
        RouteVia::Gateway {
            gateway: inner(S)[1],
            dev: Some("vx0".into()),
            onlink: false,
        },
    );
    net.replace_route(Ns::Named(&ns0), &via_gateway)
        .await
        .expect("replace route");
    let routes = net
        .list_routes(Ns::Named(&ns0), Some(TABLE_MAIN))
        .await
        .expect("routes");
    let ours: Vec<_> = routes
        .iter()
        .filter(|r| r.destination.addr() == home)
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].gateway, Some(inner(S)[1]));
    let stats = net.link_stats(Ns::Named(&ns0), "vx0").await.expect("stats");
    echo(&ns0, &ns1, home, None)
        .await
        .expect("TCP via the gateway");
    assert!(net
        .link_stats(Ns::Named(&ns0), "vx0")
        .await
        .expect("stats")
        .moved_since(&stats));

    // Delete: unreachable again; deleting twice says "not found".
    net.delete_route(Ns::Named(&ns0), &via_gateway)
        .await
        .expect("delete route");
    let e = echo(&ns0, &ns1, home, None).await.expect_err("route gone");
    assert!(unreachable(&e), "{e}");
    let gone = net
        .delete_route(Ns::Named(&ns0), &via_gateway)
        .await
        .expect_err("second delete");
    assert!(gone.is_not_found(), "{gone:?}");

    // Tearing the tunnel down.
    net.delete_link(Ns::Named(&ns0), "vx0")
        .await
        .expect("delete vxlan");
    assert!(!net
        .list_links(Ns::Named(&ns0))
        .await
        .expect("links")
        .contains(&"vx0".to_owned()));
    let missing = net
        .link_stats(Ns::Named(&ns0), "vx0")
        .await
        .expect_err("no vx0");
    assert!(missing.is_not_found(), "{missing:?}");

    lab.finish(&net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_rules_steer_traffic_into_a_table() {
    const S: u8 = 212;
    const TABLE: u32 = 100;
    let lab = Lab::start('r');
    let net = Netlink::new().expect("netlink");
    let hosts = two_hosts(&net, &lab, S).await;
    let (ns0, ns1) = (hosts.ns[0].clone(), hosts.ns[1].clone());
    tunnel_pair(&net, &hosts, S).await;
    let home = Ipv4Addr::new(10, 252, S, 10);
    add_home_address(&net, &ns1, home).await;
    let n0 = Ns::Named(&ns0);

    // The route exists only in table 100: the main table does not know it.
    let route = RouteSpec::host(
        home,
        RouteVia::Gateway {
            gateway: inner(S)[1],
            dev: Some("vx0".into()),
            onlink: false,
        },
    )
    .in_table(TABLE);
    net.add_route(n0, &route).await.expect("route in table 100");
    let in_table = net.list_routes(n0, Some(TABLE)).await.expect("routes");
    assert_eq!(in_table.len(), 1, "{in_table:?}");
    assert_eq!(in_table[0].destination.addr(), home);
    assert_eq!(in_table[0].table, TABLE);
    assert!(!net
        .list_routes(n0, Some(TABLE_MAIN))
        .await
        .expect("routes")
        .iter()
        .any(|r| r.destination.addr() == home));
    let e = echo(&ns0, &ns1, home, None).await.expect_err("no rule yet");
    assert!(unreachable(&e), "{e}");

    // "to" selector.
    let to_rule = RuleSpec {
        to: Some(Ipv4Cidr::new(home, 32).expect("cidr")),
        priority: Some(1000),
        ..RuleSpec::lookup(TABLE)
    };
    net.add_rule(n0, &to_rule).await.expect("add rule");
    let rules = net.list_rules(n0).await.expect("rules");
    let ours = rules
        .iter()
        .find(|r| r.priority == 1000)
        .unwrap_or_else(|| panic!("no rule 1000 in {rules:?}"));
    assert_eq!((ours.to, ours.from, ours.table), (to_rule.to, None, TABLE));
    let ip_rules = Command::new("ip")
        .args(["-n", &ns0, "rule", "show"])
        .output()
        .expect("ip rule");
    let ip_rules = String::from_utf8_lossy(&ip_rules.stdout);
    assert!(
        ip_rules.contains(&format!("1000:\tfrom all to {home} lookup 100")),
        "{ip_rules}"
    );
    echo(&ns0, &ns1, home, None)
        .await
        .expect("steered by the rule");
    net.delete_rule(n0, &to_rule).await.expect("delete rule");
    let e = echo(&ns0, &ns1, home, None).await.expect_err("rule gone");
    assert!(unreachable(&e), "{e}");
    let gone = net
        .delete_rule(n0, &to_rule)
        .await
        .expect_err("second delete");
    assert!(gone.is_not_found(), "{gone:?}");
    assert!(
        gone.to_string()
            .starts_with("cannot delete rule pref 1000 from all to 10.252.212.10/32 lookup 100"),
        "{gone}"
    );

    // "from" selector: only traffic from the tunnel address uses table
    // 100; the same destination from an unbound socket has no route.
    let from_rule = RuleSpec {
        from: Some(Ipv4Cidr::new(inner(S)[0], 32).expect("cidr")),
        priority: Some(1001),
        ..RuleSpec::lookup(TABLE)
    };
    net.add_rule(n0, &from_rule).await.expect("add from rule");
    echo(&ns0, &ns1, home, Some(inner(S)[0]))
        .await
        .expect("bound to the selected source");
    let e = echo(&ns0, &ns1, home, None)
        .await
        .expect_err("other sources are not steered");
    assert!(unreachable(&e), "{e}");
    net.delete_rule(n0, &from_rule).await.expect("delete rule");

    net.delete_route(n0, &route).await.expect("delete route");
    assert!(net
        .list_routes(n0, Some(TABLE))
        .await
        .expect("routes")
        .is_empty());

    lab.finish(&net).await;
}

/// The MAC `ns` has in its neighbour table for `ip` on `link`, if any.
async fn neighbour_mac(net: &Netlink, ns: &str, link: &str, ip: Ipv4Addr) -> Option<[u8; 6]> {
    let handle = net.handle(Ns::Named(ns)).await.expect("handle");
    let index = {
        let links = handle.link().get().match_name(link.to_owned()).execute();
        let mut links = pin!(links);
        links
            .try_next()
            .await
            .expect("link dump")
            .expect("link exists")
            .header
            .index
    };
    let neighbours = handle.neighbours().get().execute();
    let mut neighbours = pin!(neighbours);
    while let Some(n) = neighbours.try_next().await.expect("neighbour dump") {
        if n.header.ifindex != index {
            continue;
        }
        let dest = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => Some(*d),
            _ => None,
        });
        if dest == Some(ip) {
            return n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLocalAddress(mac) => <[u8; 6]>::try_from(&mac[..]).ok(),
                _ => None,
            });
        }
    }
    None
}

/// Wait up to 3 s for `ns`'s entry for `ip` to become `want`.
async fn wait_for_neighbour(net: &Netlink, ns: &str, ip: Ipv4Addr, want: [u8; 6]) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = neighbour_mac(net, ns, "eth0", ip).await;
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "neighbour entry for {ip} in {ns} is {got:02x?}, expected {want:02x?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gratuitous_arp_updates_the_neighbour_cache() {
    const S: u8 = 213;
    let lab = Lab::start('g');
    let net = Netlink::new().expect("netlink");
    let hosts = two_hosts(&net, &lab, S).await;
    let (ns0, ns1) = (hosts.ns[0].clone(), hosts.ns[1].clone());
    let announced = hosts.addrs[0];
    let real_mac = net
        .link_mac(Ns::Named(&ns0), "eth0")
        .await
        .expect("eth0 MAC");

    // n1 believes the address is at a stale, wrong MAC (as a client does
    // after the container moved).
    let old_mac = [0x02, 0, 0, 0, 0xbe, 0xef];
    {
        let handle = net.handle(Ns::Named(&ns1)).await.expect("handle");
        let links = handle.link().get().match_name("eth0".to_owned()).execute();
        let mut links = pin!(links);
        let index = links
            .try_next()
            .await
            .expect("dump")
            .expect("eth0")
            .header
            .index;
        handle
            .neighbours()
            .add(index, IpAddr::V4(announced))
            .link_local_address(&old_mac)
            .state(NeighbourState::Stale)
            .replace()
            .execute()
            .await
            .expect("add stale neighbour");
    }
    assert_eq!(
        neighbour_mac(&net, &ns1, "eth0", announced).await,
        Some(old_mac)
    );

    // Announce a given MAC (the free function)...
    let new_mac = [0x02, 0, 0, 0, 0, 0x42];
    send_gratuitous_arp(Ns::Named(&ns0), "eth0", announced, Some(new_mac))
        .expect("send gratuitous ARP");
    wait_for_neighbour(&net, &ns1, announced, new_mac).await;

    // ...and the link's own (the trait method), at once: gratuitous ARP
    // overrides within the kernel's lock time.
    net.send_gratuitous_arp(Ns::Named(&ns0), "eth0", announced, None)
        .await
        .expect("send gratuitous ARP");
    wait_for_neighbour(&net, &ns1, announced, real_mac).await;
    let ip_neigh = Command::new("ip")
        .args(["-n", &ns1, "neigh", "show", &announced.to_string()])
        .output()
        .expect("ip neigh");
    let ip_neigh = String::from_utf8_lossy(&ip_neigh.stdout);
    let mac_text = real_mac.map(|b| format!("{b:02x}")).join(":");
    assert!(ip_neigh.contains(&mac_text), "{ip_neigh}");

    // Errors name the link and the namespace.
    let e =
        send_gratuitous_arp(Ns::Named(&ns0), "eth9", announced, None).expect_err("no such link");
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "cannot send gratuitous ARP for {announced} on link eth9 in netns {ns0}: not found"
        )
    );

    lab.finish(&net).await;
}

#[test]
fn owner_pid_parses_test_prefixes() {
    assert_eq!(owner_pid("xth123ab0"), Some(123));
    assert_eq!(owner_pid("xth9pn1"), Some(9));
    assert_eq!(owner_pid("xthabc"), None);
    assert_eq!(owner_pid("xth12"), None);
    assert_eq!(owner_pid("xnt12a"), None);
    assert_eq!(owner_pid("eth0"), None);
}
