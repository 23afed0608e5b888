//! Route optimisation for clients: follow a home agent's bindings and route each home
//! address straight to its care-of host, so new and existing flows of this client
//! stop crossing the home agent. `xfer rebind` is this module on the command line.
//!
//! The client must reach the care-of host directly (same link, or a route to it);
//! the kernel refuses a route through an unreachable gateway and the error says so.
//! When a binding ends (the container came home, or it expired) the direct route is
//! removed again and traffic takes the normal route to the home network.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use xfer_net::{NetOps, Netlink, Ns, RouteSpec, RouteVia};
use xfer_proto::v1::{BindingEvent, BindingEventKind};

use crate::error::AgentError;
use crate::handover::{Notice, NoticeKind};

/// Route metric of rebind routes (so they are told apart from others).
pub const REBIND_METRIC: u32 = 77;

/// The wire form of a binding notice.
pub fn to_event(n: &Notice, tunnel_kind: &str, home_agent: &str) -> BindingEvent {
    let kind = match n.kind {
        NoticeKind::Current => BindingEventKind::Current,
        NoticeKind::Created => BindingEventKind::Created,
        NoticeKind::Moved => BindingEventKind::Moved,
        NoticeKind::Refreshed => BindingEventKind::Refreshed,
        NoticeKind::Removed => BindingEventKind::Removed,
        NoticeKind::TunnelIdle => BindingEventKind::TunnelIdle,
    };
    BindingEvent {
        kind: kind as i32,
        home_address: n.home.to_string(),
        care_of: n.care_of.map(|c| c.to_string()).unwrap_or_default(),
        sequence: u32::from(n.sequence),
        lifetime_secs: n.lifetime_secs,
        reverse_tunnel: n.reverse_tunnel,
        tunnel: n.tunnel.clone().unwrap_or_default(),
        tunnel_kind: if n.tunnel.is_some() {
            tunnel_kind.to_string()
        } else {
            String::new()
        },
        home_agent: home_agent.to_string(),
    }
}

/// What applying an event did to this client's routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebound {
    /// `home` now goes straight to `care_of`.
    Direct { home: Ipv4Addr, care_of: Ipv4Addr },
    /// The direct route of `home` was removed.
    Home { home: Ipv4Addr },
    /// Nothing to do.
    Unchanged,
}

/// The routing decisions of a rebinding client, without I/O (unit-tested).
#[derive(Debug, Default, Clone)]
pub struct RebindTable {
    routes: BTreeMap<Ipv4Addr, Ipv4Addr>,
}

impl RebindTable {
    /// What `event` means for the routes of this client, optionally only for `only`.
    /// Fallible: a malformed event is refused, never guessed at.
    pub fn decide(
        &mut self,
        event: &BindingEvent,
        only: Option<Ipv4Addr>,
    ) -> Result<Rebound, AgentError> {
        let kind = BindingEventKind::try_from(event.kind).map_err(|_| {
            AgentError::Refused(format!("unknown binding event kind {}", event.kind))
        })?;
        if matches!(
            kind,
            BindingEventKind::Synced | BindingEventKind::TunnelIdle | BindingEventKind::Unspecified
        ) {
            return Ok(Rebound::Unchanged);
        }
        let home: Ipv4Addr = event.home_address.parse().map_err(|_| {
            AgentError::Refused(format!(
                "binding event with a bad home address {:?}",
                event.home_address
            ))
        })?;
        if only.is_some_and(|o| o != home) {
            return Ok(Rebound::Unchanged);
        }
        if kind == BindingEventKind::Removed {
            return Ok(match self.routes.remove(&home) {
                Some(_) => Rebound::Home { home },
                None => Rebound::Unchanged,
            });
        }
        let care_of: Ipv4Addr = event.care_of.parse().map_err(|_| {
            AgentError::Refused(format!(
                "binding event with a bad care-of address {:?}",
                event.care_of
            ))
        })?;
        if self.routes.insert(home, care_of) == Some(care_of) {
            return Ok(Rebound::Unchanged);
        }
        Ok(Rebound::Direct { home, care_of })
    }

    /// The direct routes in force.
    pub fn routes(&self) -> impl Iterator<Item = (Ipv4Addr, Ipv4Addr)> + '_ {
        self.routes.iter().map(|(h, c)| (*h, *c))
    }
}

fn route(home: Ipv4Addr, care_of: Ipv4Addr) -> RouteSpec {
    let mut r = RouteSpec::host(
        home,
        RouteVia::Gateway {
            gateway: care_of,
            dev: None,
            onlink: false,
        },
    );
    r.metric = Some(REBIND_METRIC);
    r
}

/// A client that rebinds: applies binding events to the routes of a network
/// namespace (`None`: this process's).
#[derive(Debug)]
pub struct Rebinder {
    net: Netlink,
    netns: Option<String>,
    table: RebindTable,
    only: Option<Ipv4Addr>,
}

impl Rebinder {
    /// A rebinder for namespace `netns`, optionally only for home address `only`.
    pub fn new(netns: Option<String>, only: Option<Ipv4Addr>) -> Result<Self, AgentError> {
        let net = Netlink::new().map_err(|source| AgentError::Net {
            what: "open rtnetlink".into(),
            source: Box::new(source),
        })?;
        Ok(Rebinder {
            net,
            netns,
            table: RebindTable::default(),
            only,
        })
    }

    fn ns(&self) -> Ns<'_> {
        match &self.netns {
            Some(n) => Ns::Named(n),
            None => Ns::Root,
        }
    }

    /// Applies one event.
    pub async fn apply(&mut self, event: &BindingEvent) -> Result<Rebound, AgentError> {
        let previous: BTreeMap<_, _> = self.table.routes().collect();
        let r = self.table.decide(event, self.only)?;
        match &r {
            Rebound::Direct { home, care_of } => {
                self.net
                    .replace_route(self.ns(), &route(*home, *care_of))
                    .await
                    .map_err(|source| AgentError::Net {
                        what: format!("route {home} directly via care-of host {care_of}"),
                        source: Box::new(source),
                    })?;
            }
            Rebound::Home { home } => {
                if let Some(c) = previous.get(home) {
                    match self.net.delete_route(self.ns(), &route(*home, *c)).await {
                        Err(e) if !e.is_not_found() => {
                            return Err(AgentError::Net {
                                what: format!("remove the direct route of {home}"),
                                source: Box::new(e),
                            })
                        }
                        _ => {}
                    }
                }
            }
            Rebound::Unchanged => {}
        }
        Ok(r)
    }

    /// Removes every direct route this rebinder installed.
    pub async fn clear(&mut self) {
        let routes: Vec<_> = self.table.routes().collect();
        for (h, c) in routes {
            let _ = self.net.delete_route(self.ns(), &route(h, c)).await;
        }
        self.table = RebindTable::default();
    }
}

/// Applies the current bindings of a home agent's watch stream (up to its SYNCED
/// marker) and returns what changed; with `follow`, keeps applying changes until the
/// stream ends, calling `on_change` for each.
pub async fn run(
    stream: &mut tonic::Streaming<BindingEvent>,
    rebinder: &mut Rebinder,
    follow: bool,
    mut on_change: impl FnMut(&BindingEvent, &Rebound),
) -> Result<(), AgentError> {
    while let Some(ev) = stream
        .message()
        .await
        .map_err(|status| AgentError::Remote { status })?
    {
        let r = rebinder.apply(&ev).await?;
        on_change(&ev, &r);
        if !follow && ev.kind == BindingEventKind::Synced as i32 {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: BindingEventKind, home: &str, coa: &str) -> BindingEvent {
        BindingEvent {
            kind: kind as i32,
            home_address: home.into(),
            care_of: coa.into(),
            ..Default::default()
        }
    }

    #[test]
    fn decisions_follow_the_binding() {
        let mut t = RebindTable::default();
        let h: Ipv4Addr = "10.9.0.5".parse().expect("ip");
        let b: Ipv4Addr = "10.1.0.2".parse().expect("ip");
        let c: Ipv4Addr = "10.1.0.3".parse().expect("ip");
        assert_eq!(
            t.decide(&ev(BindingEventKind::Current, "10.9.0.5", "10.1.0.2"), None)
                .expect("ok"),
            Rebound::Direct {
                home: h,
                care_of: b
            }
        );
        assert_eq!(
            t.decide(
                &ev(BindingEventKind::Refreshed, "10.9.0.5", "10.1.0.2"),
                None
            )
            .expect("ok"),
            Rebound::Unchanged
        );
        assert_eq!(
            t.decide(&ev(BindingEventKind::Moved, "10.9.0.5", "10.1.0.3"), None)
                .expect("ok"),
            Rebound::Direct {
                home: h,
                care_of: c
            }
        );
        assert_eq!(
            t.decide(
                &ev(BindingEventKind::TunnelIdle, "10.9.0.5", "10.1.0.3"),
                None
            )
            .expect("ok"),
            Rebound::Unchanged
        );
        assert_eq!(
            t.decide(&ev(BindingEventKind::Removed, "10.9.0.5", ""), None)
                .expect("ok"),
            Rebound::Home { home: h }
        );
        assert_eq!(
            t.decide(&ev(BindingEventKind::Removed, "10.9.0.5", ""), None)
                .expect("ok"),
            Rebound::Unchanged
        );
        // A filter ignores other homes.
        assert_eq!(
            t.decide(
                &ev(BindingEventKind::Created, "10.9.0.6", "10.1.0.2"),
                Some(h)
            )
            .expect("ok"),
            Rebound::Unchanged
        );
        // Malformed events are refused.
        assert!(t
            .decide(&ev(BindingEventKind::Created, "nope", "10.1.0.2"), None)
            .is_err());
        assert!(t
            .decide(&ev(BindingEventKind::Created, "10.9.0.5", ""), None)
            .is_err());
        let mut bad = ev(BindingEventKind::Created, "10.9.0.5", "10.1.0.2");
        bad.kind = 99;
        assert!(t.decide(&bad, None).is_err());
    }
}
