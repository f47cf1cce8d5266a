//! Desired kernel state for the peers versus what the kernel holds, and the
//! writes that turn one into the other, in a safe order: neighbours and FDB
//! entries before the routes that use them; on removal routes first.

use crate::netlink::{Fdb, Neigh, NetOp, Nexthop, OwnedRoute};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The peer entries on this node: neighbours and FDB entries per device, our
/// routes by destination and the nexthop objects of our IPv4 routes by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerState {
    pub neighs: BTreeMap<(u32, IpAddr), [u8; 6]>,
    pub fdbs: BTreeSet<(u32, Fdb)>,
    pub routes: BTreeMap<IpNet, OwnedRoute>,
    pub nexthops: BTreeMap<u32, Nexthop>,
}

impl PeerState {
    pub fn neigh(&mut self, dev: u32, n: Neigh) {
        self.neighs.insert((dev, n.ip), n.mac);
    }

    pub fn fdb(&mut self, dev: u32, f: Fdb) {
        self.fdbs.insert((dev, f));
    }

    pub fn route(&mut self, r: OwnedRoute) {
        self.routes.insert(r.dst, r);
    }

    pub fn nexthop(&mut self, n: Nexthop) {
        self.nexthops.insert(n.id, n);
    }

    /// Everything in `other` too (one peer's entries into the whole).
    pub fn merge(&mut self, other: PeerState) {
        self.neighs.extend(other.neighs);
        self.fdbs.extend(other.fdbs);
        self.routes.extend(other.routes);
        self.nexthops.extend(other.nexthops);
    }

    /// The entries a peer needs, nexthop objects not counted (one per route).
    pub fn len(&self) -> usize {
        self.neighs.len() + self.fdbs.len() + self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The writes, in the order they must be applied; each batch may run pipelined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Neighbour and FDB entries to add or replace.
    pub links: Vec<NetOp>,
    /// Nexthop objects to create or replace (before the routes through them).
    pub nexthops: Vec<NetOp>,
    /// Routes to add or replace (after `links`, so the kernel never has to ARP).
    pub routes: Vec<NetOp>,
    /// Routes to delete (before `unlinks`).
    pub unroutes: Vec<NetOp>,
    /// Nexthop objects to delete (after the routes through them).
    pub unnexthops: Vec<NetOp>,
    /// Neighbour and FDB entries to delete.
    pub unlinks: Vec<NetOp>,
}

impl Plan {
    /// The batches in application order.
    pub fn batches(&self) -> [&[NetOp]; 6] {
        [
            &self.links,
            &self.nexthops,
            &self.routes,
            &self.unroutes,
            &self.unnexthops,
            &self.unlinks,
        ]
    }

    pub fn len(&self) -> usize {
        self.batches().iter().map(|b| b.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What to write so `actual` becomes `desired`. Entries equal on both sides cost
/// nothing; a changed one is replaced in place.
pub fn plan(desired: &PeerState, actual: &PeerState) -> Plan {
    let mut p = Plan::default();
    for (&(dev, ip), &mac) in &desired.neighs {
        if actual.neighs.get(&(dev, ip)) != Some(&mac) {
            p.links.push(NetOp::ReplaceNeigh(dev, Neigh { ip, mac }));
        }
    }
    for &(dev, f) in desired.fdbs.difference(&actual.fdbs) {
        p.links.push(NetOp::ReplaceFdb(dev, f));
    }
    for (dst, r) in &desired.routes {
        let same = same_route(actual.routes.get(dst), r);
        // A nexthop is written with its route, which DataPlane::apply writes with
        // its own gateway instead should the nexthop fail; a route with its own
        // gateway that is already right keeps it (a kernel or id that could not
        // take the nexthop, or a route of an earlier weft) unless we hold a
        // different nexthop for it.
        let nexthop = r.nh.and_then(|id| desired.nexthops.get(&id)).filter(|n| {
            let ours = actual.nexthops.get(&n.id);
            ours != Some(*n) && (!same || ours.is_some())
        });
        if let Some(n) = nexthop {
            p.nexthops.push(NetOp::ReplaceNexthop(*n));
        }
        if !same || nexthop.is_some() {
            p.routes.push(NetOp::ReplaceRoute(*r));
        }
    }
    for (dst, r) in &actual.routes {
        if !desired.routes.contains_key(dst) {
            p.unroutes.push(NetOp::DelRoute(*r));
        }
    }
    for (id, n) in &actual.nexthops {
        if !desired.nexthops.contains_key(id) {
            p.unnexthops.push(NetOp::DelNexthop(*id, n.protocol));
        }
    }
    for &(dev, f) in actual.fdbs.difference(&desired.fdbs) {
        p.unlinks.push(NetOp::DelFdb(dev, f));
    }
    for &(dev, ip) in actual.neighs.keys() {
        if !desired.neighs.contains_key(&(dev, ip)) {
            p.unlinks.push(NetOp::DelNeigh(dev, ip));
        }
    }
    p
}

/// Listings always name the device the kernel chose; a wanted route without an
/// `oif` accepts any. A route through the wanted nexthop object is the same (the
/// object is compared on its own), and so is one that forwards alike.
fn same_route(have: Option<&OwnedRoute>, want: &OwnedRoute) -> bool {
    have.is_some_and(|h| {
        h.protocol == want.protocol && want.nh.is_some() && h.nh == want.nh
            || h.gw == want.gw
                && h.onlink == want.onlink
                && h.protocol == want.protocol
                && (want.oif.is_none() || h.oif == want.oif)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, gw: &str, oif: u32) -> OwnedRoute {
        OwnedRoute {
            dst: dst.parse().unwrap(),
            gw: gw.parse().unwrap(),
            oif: Some(oif),
            onlink: true,
            protocol: 87,
            nh: None,
        }
    }

    fn peer(subnet: &str, gw: &str, mac: u8, public: &str) -> PeerState {
        let mut s = PeerState::default();
        s.neigh(
            5,
            Neigh {
                ip: gw.parse().unwrap(),
                mac: [2, 0, 0, 0, 0, mac],
            },
        );
        s.fdb(
            5,
            Fdb {
                mac: [2, 0, 0, 0, 0, mac],
                dst: public.parse().unwrap(),
            },
        );
        s.route(route(subnet, gw, 5));
        s
    }

    #[test]
    fn only_differences_are_written_in_a_safe_order() {
        let mut desired = peer("10.244.1.0/24", "10.244.1.0", 1, "10.77.0.1");
        desired.merge(peer("10.244.2.0/24", "10.244.2.0", 2, "10.77.0.2"));
        let mut actual = peer("10.244.1.0/24", "10.244.1.0", 1, "10.77.0.1");
        actual.merge(peer("10.244.3.0/24", "10.244.3.0", 3, "10.77.0.3"));
        let p = plan(&desired, &actual);
        assert_eq!(p.links.len(), 2, "{p:?}");
        assert_eq!(
            p.routes,
            [NetOp::ReplaceRoute(route("10.244.2.0/24", "10.244.2.0", 5))]
        );
        assert_eq!(
            p.unroutes,
            [NetOp::DelRoute(route("10.244.3.0/24", "10.244.3.0", 5))]
        );
        assert_eq!(p.unlinks.len(), 2);
        assert!(plan(&desired, &desired).is_empty());
    }

    #[test]
    fn a_changed_mac_replaces_the_neighbour_and_swaps_the_fdb_entry() {
        let desired = peer("10.244.1.0/24", "10.244.1.0", 9, "10.77.0.1");
        let actual = peer("10.244.1.0/24", "10.244.1.0", 1, "10.77.0.1");
        let p = plan(&desired, &actual);
        assert_eq!(p.links.len(), 2);
        assert!(p.routes.is_empty() && p.unroutes.is_empty());
        // The old MAC's FDB entry goes (flanneld leaves it behind).
        assert!(matches!(
            p.unlinks[..],
            [NetOp::DelFdb(
                5,
                Fdb {
                    mac: [2, 0, 0, 0, 0, 1],
                    ..
                }
            )]
        ));
    }

    #[test]
    fn a_route_without_oif_matches_whatever_device_the_kernel_chose() {
        let mut want = route("10.244.1.0/24", "10.77.0.1", 3);
        want.oif = None;
        want.onlink = false;
        let mut have = want;
        have.oif = Some(3);
        assert!(same_route(Some(&have), &want));
        have.gw = "10.77.0.9".parse().unwrap();
        assert!(!same_route(Some(&have), &want));
    }

    #[test]
    fn nexthops_are_written_with_their_route_and_a_working_fallback_stays() {
        let nh = |gw: &str| Nexthop {
            id: 183769856,
            gw: gw.parse().unwrap(),
            oif: 5,
            onlink: true,
            protocol: 87,
        };
        let mut want = route("10.244.27.0/24", "10.244.27.0", 5);
        want.nh = Some(183769856);
        let mut desired = PeerState::default();
        desired.route(want);
        desired.nexthop(nh("10.244.27.0"));

        let p = plan(&desired, &PeerState::default());
        assert_eq!(p.nexthops, [NetOp::ReplaceNexthop(nh("10.244.27.0"))]);
        assert_eq!(p.routes, [NetOp::ReplaceRoute(want)]);

        // The nexthop could not be written, the route went in with its own gateway:
        // nothing to do on the next resync.
        let mut fallback = PeerState::default();
        fallback.route(route("10.244.27.0/24", "10.244.27.0", 5));
        assert!(plan(&desired, &fallback).is_empty());

        // Our nexthop points elsewhere: replaced, its route written again (so a
        // failed replace still leaves the right gateway).
        let mut stale = PeerState::default();
        stale.route(OwnedRoute {
            gw: "10.244.99.0".parse().unwrap(),
            ..want
        });
        stale.nexthop(nh("10.244.99.0"));
        let p = plan(&desired, &stale);
        assert_eq!(p.nexthops, [NetOp::ReplaceNexthop(nh("10.244.27.0"))]);
        assert_eq!(p.routes, [NetOp::ReplaceRoute(want)]);
        assert!(p.unnexthops.is_empty());
    }
}
