//! What the forwarding layer must do for each binding change: pure bookkeeping of
//! which tunnels exist and which home addresses use them, turned into a list of
//! [`Action`]s that [`super::Mobility`] applies with rtnetlink. Kept free of I/O so
//! the rules (one tunnel per peer, no chain of tunnels, the local route comes back
//! when the container comes home) are unit-tested.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use xfer_mobility::BindingChange;

/// The inner address of a tunnel's home-agent end.
pub const INNER_HOME_AGENT: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
/// The inner address of a tunnel's care-of end: the home agent routes a home
/// address "via" it (L2 tunnels resolve it by ARP on the tunnel).
pub const INNER_CARE_OF: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);

/// Which end of a tunnel a host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    HomeAgent,
    CareOf,
}

impl Role {
    /// This end's inner address.
    pub fn inner(self) -> Ipv4Addr {
        match self {
            Role::HomeAgent => INNER_HOME_AGENT,
            Role::CareOf => INNER_CARE_OF,
        }
    }
}

/// The tunnel device name of `role` toward `peer`: `xh…` on a home agent, `xc…` on a
/// care-of host, from a digest of the peer address (fits IFNAMSIZ).
pub fn tunnel_name(role: Role, peer: Ipv4Addr) -> String {
    let h = xfer_store::Digest::of(&peer.octets()).to_hex();
    let p = match role {
        Role::HomeAgent => "xh",
        Role::CareOf => "xc",
    };
    format!("{p}{}", &h[..10])
}

/// The tunnel key (VXLAN VNI) of the pair (home agent, care-of): both ends compute
/// the same, and two pairs between the same hosts in opposite roles differ.
pub fn tunnel_key(home_agent: Ipv4Addr, care_of: Ipv4Addr) -> u32 {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&home_agent.octets());
    b[4..].copy_from_slice(&care_of.octets());
    let d = xfer_store::Digest::of(&b);
    let v = u32::from_be_bytes([0, d.as_bytes()[0], d.as_bytes()[1], d.as_bytes()[2]]);
    v.max(1)
}

/// The MAC address of an L2 tunnel end of `role` on host `me` toward `peer`: stable
/// across re-creation, locally administered, unicast.
pub fn tunnel_mac(role: Role, me: Ipv4Addr, peer: Ipv4Addr) -> [u8; 6] {
    let mut b = [0u8; 9];
    b[0] = match role {
        Role::HomeAgent => 1,
        Role::CareOf => 2,
    };
    b[1..5].copy_from_slice(&me.octets());
    b[5..].copy_from_slice(&peer.octets());
    let d = xfer_store::Digest::of(&b);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&d.as_bytes()[..6]);
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// The routing table a care-of host uses for a home address's reverse tunnel.
pub fn reverse_table(home: Ipv4Addr) -> u32 {
    20_000 + (u32::from(home) % 10_000)
}

/// Priority of the reverse-tunnel rules.
pub const REVERSE_RULE_PRIORITY: u32 = 900;

/// One network change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the tunnel `name` of `role` to `peer`, with this end's inner address, up.
    CreateTunnel {
        role: Role,
        peer: Ipv4Addr,
        name: String,
    },
    /// Delete tunnel `name` (its routes go with it).
    DeleteTunnel { name: String },
    /// Route `home` into tunnel `tunnel` (replacing whatever route it had).
    RouteHome { home: Ipv4Addr, tunnel: String },
    /// Remove that route (nothing if it was replaced meanwhile).
    UnrouteHome { home: Ipv4Addr, tunnel: String },
    /// Route `home` to the local container behind `host_if` (replacing the tunnel).
    RouteLocal { home: Ipv4Addr, host_if: String },
    /// Care-of side: send what `home` sends through `tunnel` (policy rule + table).
    AddReverse { home: Ipv4Addr, tunnel: String },
    /// Remove that.
    DeleteReverse { home: Ipv4Addr },
}

/// A home agent's tunnel to one care-of host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaTunnel {
    pub name: String,
    /// Home addresses routed into it.
    pub homes: BTreeSet<Ipv4Addr>,
    /// Removed for idleness; the bindings stay, nothing is forwarded.
    pub idle_removed: bool,
}

/// A care-of host's tunnel back to one home agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoaTunnel {
    pub name: String,
    /// Home addresses of containers here whose home agent is that peer.
    pub homes: BTreeSet<Ipv4Addr>,
    /// Of those, the ones with a reverse tunnel.
    pub reverse: BTreeSet<Ipv4Addr>,
}

/// The tunnels of one host, in both roles.
#[derive(Debug, Clone, Default)]
pub struct Tunnels {
    /// Home agent role, by care-of address.
    pub ha: BTreeMap<Ipv4Addr, HaTunnel>,
    /// Care-of role, by home agent address.
    pub coa: BTreeMap<Ipv4Addr, CoaTunnel>,
}

impl Tunnels {
    /// Home agent: what `change` needs. `local` maps the home addresses of
    /// containers running on this host to their host-side interface.
    pub fn on_change(
        &mut self,
        change: &BindingChange,
        local: &HashMap<Ipv4Addr, String>,
    ) -> Vec<Action> {
        match change {
            BindingChange::Created(b) => self.route_to(b.home_address, b.care_of),
            BindingChange::Moved {
                previous_care_of,
                binding,
            } => {
                let mut a = self.route_to(binding.home_address, binding.care_of);
                a.extend(self.leave(binding.home_address, *previous_care_of, false));
                a
            }
            BindingChange::Refreshed(b) => {
                if self.ha.contains_key(&b.care_of) {
                    Vec::new()
                } else {
                    // Lost on a restart: put it back.
                    self.route_to(b.home_address, b.care_of)
                }
            }
            BindingChange::Removed {
                home_address,
                care_of,
            } => self.removed(*home_address, *care_of, local),
        }
    }

    /// Home agent: the binding of `home` (to `care_of`) ended.
    pub fn removed(
        &mut self,
        home: Ipv4Addr,
        care_of: Ipv4Addr,
        local: &HashMap<Ipv4Addr, String>,
    ) -> Vec<Action> {
        let mut a = Vec::new();
        if let Some(host_if) = local.get(&home) {
            a.push(Action::RouteLocal {
                home,
                host_if: host_if.clone(),
            });
        }
        a.extend(self.leave(home, care_of, true));
        a
    }

    /// Home agent: the care-of address a home address is tunnelled to, if any.
    pub fn care_of_of(&self, home: Ipv4Addr) -> Option<Ipv4Addr> {
        self.ha
            .iter()
            .find(|(_, t)| t.homes.contains(&home))
            .map(|(c, _)| *c)
    }

    fn route_to(&mut self, home: Ipv4Addr, care_of: Ipv4Addr) -> Vec<Action> {
        let mut a = Vec::new();
        let t = self.ha.entry(care_of).or_insert_with(|| HaTunnel {
            name: tunnel_name(Role::HomeAgent, care_of),
            homes: BTreeSet::new(),
            idle_removed: true,
        });
        if t.idle_removed {
            a.push(Action::CreateTunnel {
                role: Role::HomeAgent,
                peer: care_of,
                name: t.name.clone(),
            });
            // Every home that used it comes back with it.
            for h in &t.homes {
                if *h != home {
                    a.push(Action::RouteHome {
                        home: *h,
                        tunnel: t.name.clone(),
                    });
                }
            }
            t.idle_removed = false;
        }
        t.homes.insert(home);
        a.push(Action::RouteHome {
            home,
            tunnel: t.name.clone(),
        });
        a
    }

    fn leave(&mut self, home: Ipv4Addr, care_of: Ipv4Addr, unroute: bool) -> Vec<Action> {
        let mut a = Vec::new();
        let Some(t) = self.ha.get_mut(&care_of) else {
            return a;
        };
        if !t.homes.remove(&home) {
            return a;
        }
        if unroute && !t.idle_removed {
            a.push(Action::UnrouteHome {
                home,
                tunnel: t.name.clone(),
            });
        }
        if t.homes.is_empty() {
            if !t.idle_removed {
                a.push(Action::DeleteTunnel {
                    name: t.name.clone(),
                });
            }
            self.ha.remove(&care_of);
        }
        a
    }

    /// Home agent: tunnel to `care_of` carried nothing for the idle time.
    pub fn idle(&mut self, care_of: Ipv4Addr) -> Vec<Action> {
        match self.ha.get_mut(&care_of) {
            Some(t) if !t.idle_removed => {
                t.idle_removed = true;
                vec![Action::DeleteTunnel {
                    name: t.name.clone(),
                }]
            }
            _ => Vec::new(),
        }
    }

    /// Care-of host: a container with home address `home` (home agent
    /// `home_agent`) now runs here.
    pub fn arrive(&mut self, home: Ipv4Addr, home_agent: Ipv4Addr, reverse: bool) -> Vec<Action> {
        let mut a = Vec::new();
        let t = self.coa.entry(home_agent).or_insert_with(|| {
            a.push(Action::CreateTunnel {
                role: Role::CareOf,
                peer: home_agent,
                name: tunnel_name(Role::CareOf, home_agent),
            });
            CoaTunnel {
                name: tunnel_name(Role::CareOf, home_agent),
                homes: BTreeSet::new(),
                reverse: BTreeSet::new(),
            }
        });
        t.homes.insert(home);
        if reverse && t.reverse.insert(home) {
            a.push(Action::AddReverse {
                home,
                tunnel: t.name.clone(),
            });
        }
        a
    }

    /// Care-of host: the container with home address `home` left (or failed to
    /// arrive).
    pub fn depart(&mut self, home: Ipv4Addr) -> Vec<Action> {
        let mut a = Vec::new();
        let Some((&ha, t)) = self.coa.iter_mut().find(|(_, t)| t.homes.contains(&home)) else {
            return a;
        };
        t.homes.remove(&home);
        if t.reverse.remove(&home) {
            a.push(Action::DeleteReverse { home });
        }
        if t.homes.is_empty() {
            a.push(Action::DeleteTunnel {
                name: t.name.clone(),
            });
            self.coa.remove(&ha);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xfer_mobility::{Binding, Timestamp};

    const H1: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 17);
    const H2: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 18);
    const B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
    const C: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);

    fn binding(home: Ipv4Addr, care_of: Ipv4Addr) -> Binding {
        Binding {
            home_address: home,
            care_of,
            sequence: 1,
            lifetime_secs: 60,
            registered_at: Timestamp::from_millis(0),
            expires_at: Timestamp::from_millis(60_000),
            reverse_tunnel: false,
        }
    }

    #[test]
    fn one_tunnel_per_care_of_host_and_no_chain() {
        let mut t = Tunnels::default();
        let local = HashMap::new();
        let a = t.on_change(&BindingChange::Created(binding(H1, B)), &local);
        let xb = tunnel_name(Role::HomeAgent, B);
        assert_eq!(
            a,
            vec![
                Action::CreateTunnel {
                    role: Role::HomeAgent,
                    peer: B,
                    name: xb.clone()
                },
                Action::RouteHome {
                    home: H1,
                    tunnel: xb.clone()
                }
            ]
        );
        // A second home address to the same host shares the tunnel.
        let a = t.on_change(&BindingChange::Created(binding(H2, B)), &local);
        assert_eq!(
            a,
            vec![Action::RouteHome {
                home: H2,
                tunnel: xb.clone()
            }]
        );
        // H1 moves on to C: the tunnel to B stays for H2, H1 is re-pointed.
        let xc = tunnel_name(Role::HomeAgent, C);
        let a = t.on_change(
            &BindingChange::Moved {
                previous_care_of: B,
                binding: binding(H1, C),
            },
            &local,
        );
        assert_eq!(
            a,
            vec![
                Action::CreateTunnel {
                    role: Role::HomeAgent,
                    peer: C,
                    name: xc.clone()
                },
                Action::RouteHome {
                    home: H1,
                    tunnel: xc.clone()
                }
            ]
        );
        // H2 moves to C too: B's tunnel goes, no route is left pointing at it.
        let a = t.on_change(
            &BindingChange::Moved {
                previous_care_of: B,
                binding: binding(H2, C),
            },
            &local,
        );
        assert_eq!(
            a,
            vec![
                Action::RouteHome {
                    home: H2,
                    tunnel: xc.clone()
                },
                Action::DeleteTunnel { name: xb }
            ]
        );
        assert_eq!(t.ha.len(), 1);
        assert_eq!(t.care_of_of(H1), Some(C));
    }

    #[test]
    fn coming_home_restores_the_local_route_and_removes_the_tunnel() {
        let mut t = Tunnels::default();
        let mut local = HashMap::new();
        t.on_change(&BindingChange::Created(binding(H1, B)), &local);
        local.insert(H1, "vc0123456789".to_string());
        let a = t.on_change(
            &BindingChange::Removed {
                home_address: H1,
                care_of: B,
            },
            &local,
        );
        let xb = tunnel_name(Role::HomeAgent, B);
        assert_eq!(
            a,
            vec![
                Action::RouteLocal {
                    home: H1,
                    host_if: "vc0123456789".into()
                },
                Action::UnrouteHome {
                    home: H1,
                    tunnel: xb.clone()
                },
                Action::DeleteTunnel { name: xb }
            ]
        );
        assert!(t.ha.is_empty());
        // A removal of something unknown does nothing.
        assert!(t.removed(H2, C, &HashMap::new()).is_empty());
    }

    #[test]
    fn an_idle_tunnel_goes_and_comes_back_on_the_next_move() {
        let mut t = Tunnels::default();
        let local = HashMap::new();
        t.on_change(&BindingChange::Created(binding(H1, B)), &local);
        t.on_change(&BindingChange::Created(binding(H2, B)), &local);
        let xb = tunnel_name(Role::HomeAgent, B);
        assert_eq!(t.idle(B), vec![Action::DeleteTunnel { name: xb.clone() }]);
        assert!(t.idle(B).is_empty(), "idle twice does nothing");
        // A refresh does not bring it back.
        assert!(t
            .on_change(&BindingChange::Refreshed(binding(H1, B)), &local)
            .is_empty());
        // A new registration does, with every home it carried.
        let a = t.on_change(&BindingChange::Created(binding(H1, B)), &local);
        assert_eq!(
            a,
            vec![
                Action::CreateTunnel {
                    role: Role::HomeAgent,
                    peer: B,
                    name: xb.clone()
                },
                Action::RouteHome {
                    home: H2,
                    tunnel: xb.clone()
                },
                Action::RouteHome {
                    home: H1,
                    tunnel: xb.clone()
                }
            ]
        );
        // Removing a home from an idle-removed tunnel issues no route deletion.
        t.idle(B);
        let a = t.removed(H1, B, &local);
        assert!(a.is_empty(), "{a:?}");
    }

    #[test]
    fn care_of_side_keeps_one_tunnel_per_home_agent() {
        let ha = Ipv4Addr::new(10, 1, 0, 1);
        let mut t = Tunnels::default();
        let xc = tunnel_name(Role::CareOf, ha);
        assert_eq!(
            t.arrive(H1, ha, true),
            vec![
                Action::CreateTunnel {
                    role: Role::CareOf,
                    peer: ha,
                    name: xc.clone()
                },
                Action::AddReverse {
                    home: H1,
                    tunnel: xc.clone()
                }
            ]
        );
        assert!(t.arrive(H2, ha, false).is_empty());
        assert_eq!(t.depart(H1), vec![Action::DeleteReverse { home: H1 }]);
        assert_eq!(t.depart(H2), vec![Action::DeleteTunnel { name: xc }]);
        assert!(t.depart(H2).is_empty());
    }

    #[test]
    fn names_and_keys() {
        assert!(tunnel_name(Role::HomeAgent, B).len() <= 15);
        assert_ne!(
            tunnel_name(Role::HomeAgent, B),
            tunnel_name(Role::CareOf, B)
        );
        assert_ne!(tunnel_key(B, C), tunnel_key(C, B));
        assert!(tunnel_key(B, C) > 0 && tunnel_key(B, C) < (1 << 24));
        assert_ne!(reverse_table(H1), reverse_table(H2));
        let m = tunnel_mac(Role::CareOf, B, C);
        assert_eq!(m, tunnel_mac(Role::CareOf, B, C), "stable");
        assert_ne!(m, tunnel_mac(Role::HomeAgent, B, C));
        assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
    }
}
