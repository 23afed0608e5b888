//! Unix sockets that tie a container to the outside.
//!
//! CRIU cannot dump a unix socket whose peer is outside the dumped process tree (an
//! "external" socket: a container connected to a daemon through a bind-mounted
//! socket, say); the dump fails after the task was frozen. xfer looks before
//! anything is frozen: the socket inodes the container's processes hold (from
//! `/proc/PID/fd`) are matched against the kernel's unix socket table of the
//! container's network namespace (sock_diag, `UDIAG_SHOW_PEER`), and a socket whose
//! peer is not one of the container's own sockets is reported.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::AsFd;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use crate::RuntimeError;

/// A unix socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSock {
    pub inode: u32,
    /// The connected peer's inode.
    pub peer: Option<u32>,
    /// The path it is bound to.
    pub name: Option<String>,
}

/// A socket of the container connected outside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct External {
    pub pid: u32,
    pub comm: String,
    pub inode: u32,
    pub peer: u32,
    /// The path of the socket or of its peer, when bound.
    pub path: Option<String>,
}

impl std::fmt::Display for External {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}) socket {} -> peer {}",
            self.pid, self.comm, self.inode, self.peer
        )?;
        if let Some(p) = &self.path {
            write!(f, " at {p}")?;
        }
        Ok(())
    }
}

/// Which of the container's sockets (`held`: inode -> holding pid) have a peer that is
/// not one of them. Pure: unit-tested.
pub fn externals(
    held: &HashMap<u32, u32>,
    table: &HashMap<u32, UnixSock>,
    comm: impl Fn(u32) -> String,
) -> Vec<External> {
    let mut out: Vec<External> = held
        .iter()
        .filter_map(|(ino, pid)| {
            let s = table.get(ino)?;
            let peer = s.peer.filter(|p| *p != 0)?;
            if held.contains_key(&peer) {
                return None;
            }
            let path = s
                .name
                .clone()
                .or_else(|| table.get(&peer).and_then(|p| p.name.clone()));
            Some(External {
                pid: *pid,
                comm: comm(*pid),
                inode: *ino,
                peer,
                path,
            })
        })
        .collect();
    out.sort_by_key(|e| (e.pid, e.inode));
    out
}

/// The processes of the container whose init is `init_pid` (those in its pid
/// namespace) and the socket inodes they hold (inode -> a pid holding it).
fn held_sockets(init_pid: u32) -> io::Result<HashMap<u32, u32>> {
    let ns = fs::read_link(format!("/proc/{init_pid}/ns/pid"))?;
    let mut held = HashMap::new();
    for e in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(&ns) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(ino) = t
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse().ok())
                {
                    held.entry(ino).or_insert(pid);
                }
            }
        }
    }
    Ok(held)
}

/// The unix socket table of the calling thread's network namespace.
fn unix_table() -> io::Result<HashMap<u32, UnixSock>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        hdr,
        SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: StateFlags::all(),
            inode: 0,
            show_flags: ShowFlags::PEER | ShowFlags::NAME,
            cookie: [0xff; 8],
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    socket.send(&buf[..], 0)?;
    let mut table = HashMap::new();
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut rx[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(r)) => {
                    let name = r.nlas.iter().find_map(|n| match n {
                        netlink_packet_sock_diag::unix::nlas::Nla::Name(s) => Some(s.clone()),
                        _ => None,
                    });
                    table.insert(
                        r.header.inode,
                        UnixSock {
                            inode: r.header.inode,
                            peer: r.peer(),
                            name,
                        },
                    );
                }
                NetlinkPayload::Done(_) => return Ok(table),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::other(format!("sock_diag: {e:?}")))
                }
                _ => {}
            }
            if msg.header.length == 0 {
                break;
            }
            offset += msg.header.length as usize;
        }
    }
}

/// The unix sockets of the container whose init is `init_pid` that are connected
/// outside it. Blocking (reads /proc, talks netlink from a thread in the container's
/// network namespace).
pub fn external_unix_sockets(init_pid: u32) -> Result<Vec<External>, RuntimeError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |source: io::Error| RuntimeError::Io {
            op: "inspect unix sockets",
            path: format!("/proc/{init_pid} ({what})").into(),
            source,
        }
    };
    let held = held_sockets(init_pid).map_err(err("open files"))?;
    let netns = fs::File::open(format!("/proc/{init_pid}/ns/net")).map_err(err("netns"))?;
    let table = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<_> {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            unix_table()
        })
        .join()
        .map_err(|_| io::Error::other("the sock_diag thread panicked"))?
    })
    .map_err(err("sock_diag"))?;
    let comm = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    Ok(externals(&held, &table, comm))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(inode: u32, peer: Option<u32>, name: Option<&str>) -> (u32, UnixSock) {
        (
            inode,
            UnixSock {
                inode,
                peer,
                name: name.map(str::to_string),
            },
        )
    }

    #[test]
    fn only_peers_outside_the_container_count() {
        let table: HashMap<u32, UnixSock> = [
            sock(10, Some(11), None), // pair inside
            sock(11, Some(10), None),
            sock(20, Some(99), None),                // to the outside
            sock(99, Some(20), Some("/run/d.sock")), // the outside end (listed, not held)
            sock(30, None, Some("/tmp/listen")),     // listening inside
            sock(40, Some(0), None),
        ]
        .into();
        let held: HashMap<u32, u32> = [(10, 1), (11, 2), (20, 2), (30, 1), (40, 1)].into();
        let ext = externals(&held, &table, |p| format!("p{p}"));
        assert_eq!(
            ext,
            vec![External {
                pid: 2,
                comm: "p2".into(),
                inode: 20,
                peer: 99,
                path: Some("/run/d.sock".into())
            }]
        );
        assert_eq!(
            ext[0].to_string(),
            "pid 2 (p2) socket 20 -> peer 99 at /run/d.sock"
        );
    }

    #[test]
    fn a_socketpair_held_by_one_process_is_not_external() {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let ino = |s: &std::os::unix::net::UnixStream| {
            let fd = std::os::fd::AsRawFd::as_raw_fd(s);
            fs::metadata(format!("/proc/self/fd/{fd}"))
                .expect("stat")
                .ino() as u32
        };
        let (ia, ib) = (ino(&a), ino(&b));
        let ext = external_unix_sockets(std::process::id()).expect("inspect");
        assert!(
            !ext.iter().any(|e| e.inode == ia || e.inode == ib),
            "{ext:?}"
        );
        // The kernel's table has them, each the other's peer.
        let table = unix_table().expect("sock_diag");
        assert_eq!(table.get(&ia).and_then(|s| s.peer), Some(ib));
    }
}
