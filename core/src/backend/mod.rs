//! The data plane between nodes, as flanneld programs it so weft and flannel nodes
//! interoperate:
//! - **vxlan**: a VTEP `flannel.<VNI>` (dstport 8472, nolearning) holding
//!   `<subnet>.0/32`; per peer a permanent neighbour (peer's `<subnet>.0` → its VTEP
//!   MAC), a `self` FDB entry (that MAC → the peer's public IP) and an onlink route
//!   to its subnet via `<subnet>.0`. `DirectRouting` peers on the same link get a
//!   plain route via their public IP instead.
//! - **host-gw**: a route to each peer's subnet via its public IP.
//!
//! Unlike flanneld, the state is converged, not just applied once: [`plan`] diffs
//! what the peers need against what the kernel holds (our routes carry
//! [`ROUTE_PROTOCOL`]; the VTEP's neighbours and FDB entries are all ours), so
//! entries deleted by hand come back and entries of peers that left while the agent
//! was down go away.

pub mod iface;
mod plan;

pub use plan::{PeerState, Plan, plan};

use crate::lease::{BackendData, Lease, LeaseAttrs, NetworkConfig, SubnetKey, gojson};
use crate::netlink::{
    Fdb, Neigh, NetOp, Netlink, Nexthop, OwnedRoute, VXLAN_DEFAULT_PORT, VxlanSpec,
};
use crate::{CniError, Result};
use ipnet::IpNet;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The route protocol weft tags its peer routes with (`ip route show proto 87`),
/// so resync touches exactly ours.
pub const ROUTE_PROTOCOL: u8 = 87;
/// VXLAN and outer IPv4/UDP/Ethernet headers.
const VXLAN_OVERHEAD: u32 = 50;
/// The same over IPv6.
const VXLAN6_OVERHEAD: u32 = 70;

/// `Backend` of the network config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Vxlan(VxlanConfig),
    HostGw,
}

/// flanneld's `VXLANConfig` (keys case-insensitive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// 0: the kernel default, 8472.
    pub port: u16,
    /// The underlay MTU to assume (default: the external interface's).
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
}

impl Kind {
    /// The backend of `config`, or why weft cannot run it.
    pub fn of(config: &NetworkConfig) -> std::result::Result<Kind, String> {
        let o = &config.backend.options;
        let get = |name: &str| gojson::field(o, name);
        let num =
            |name: &str, max: u64| -> std::result::Result<Option<u64>, String> {
                match get(name) {
                    None => Ok(None),
                    Some(v) => v.as_u64().filter(|n| *n <= max).map(Some).ok_or_else(|| {
                        format!("Backend.{name}: {v} is not a number from 0 to {max}")
                    }),
                }
            };
        let flag = |name: &str| get(name).and_then(Value::as_bool).unwrap_or(false);
        match config.backend.kind.as_str() {
            "vxlan" => Ok(Kind::Vxlan(VxlanConfig {
                vni: num("VNI", 0xff_ffff)?.map_or(1, |v| v as u32),
                port: num("Port", 65535)?.map_or(0, |v| v as u16),
                mtu: num("MTU", 65535)?.filter(|m| *m > 0).map(|m| m as u32),
                gbp: flag("GBP"),
                learning: flag("Learning"),
                direct_routing: flag("DirectRouting"),
            })),
            "host-gw" => Ok(Kind::HostGw),
            other => Err(format!(
                "backend type {other:?} is not supported; weft runs vxlan and host-gw"
            )),
        }
    }

    /// `BackendType` of the lease.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Vxlan(_) => "vxlan",
            Kind::HostGw => "host-gw",
        }
    }

    /// flanneld's FLANNEL_MTU for an external interface of `ext_mtu`.
    pub fn pod_mtu(&self, ext_mtu: u32) -> u32 {
        match self {
            Kind::Vxlan(c) => c.mtu.unwrap_or(ext_mtu).saturating_sub(VXLAN_OVERHEAD),
            Kind::HostGw => ext_mtu,
        }
    }
}

/// The external interface peers are reached through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtLink {
    pub index: u32,
    pub mtu: u32,
    /// Its addresses, for the on-link test of peers.
    pub addrs: Vec<IpNet>,
}

impl ExtLink {
    /// Whether `ip` is on one of the interface's connected subnets.
    fn on_link(&self, ip: IpAddr) -> bool {
        self.addrs.iter().any(|a| a.trunc().contains(&ip))
    }
}

/// A VTEP of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vtep {
    pub index: u32,
    pub mac: [u8; 6],
}

/// This node's data plane: the backend, the external interface, the VTEPs.
#[derive(Debug, Clone)]
pub struct DataPlane {
    kind: Kind,
    ext: ExtLink,
    vtep4: Option<Vtep>,
    vtep6: Option<Vtep>,
}

impl DataPlane {
    /// Before leasing: the VTEPs exist (their MACs go into the lease). An existing
    /// compatible device is kept, MAC and all; an incompatible one is replaced. New
    /// devices get a MAC derived from the public address and VNI, so it survives
    /// reboots (flannel #1828) and is set at creation (flannel #1155).
    pub fn prepare(
        nl: &Netlink,
        kind: Kind,
        ext: ExtLink,
        public4: Option<IpAddr>,
        public6: Option<IpAddr>,
    ) -> Result<DataPlane> {
        let (mut vtep4, mut vtep6) = (None, None);
        if let Kind::Vxlan(c) = &kind {
            let mtu = c.mtu.unwrap_or(ext.mtu).saturating_sub(VXLAN_OVERHEAD);
            // The kernel clamps an IPv6 VTEP to the underlay's MTU − 70.
            let mtu6 = mtu.min(ext.mtu.saturating_sub(VXLAN6_OVERHEAD));
            for (local, name, mtu, slot) in [
                (public4, format!("flannel.{}", c.vni), mtu, &mut vtep4),
                (public6, format!("flannel-v6.{}", c.vni), mtu6, &mut vtep6),
            ] {
                if let Some(local) = local {
                    *slot = Some(ensure_vtep(nl, c, &ext, &name, local, mtu)?);
                }
            }
        }
        Ok(DataPlane {
            kind,
            ext,
            vtep4,
            vtep6,
        })
    }

    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// The VTEPs' interface indexes (none for host-gw).
    pub fn vtep_indexes(&self) -> Vec<u32> {
        [self.vtep4, self.vtep6]
            .iter()
            .flatten()
            .map(|v| v.index)
            .collect()
    }

    /// `BackendData` and `BackendV6Data` of our lease.
    pub fn backend_data(&self) -> (Option<Value>, Option<Value>) {
        let Kind::Vxlan(c) = &self.kind else {
            return (None, None);
        };
        let data = |v: Option<Vtep>| {
            v.map(|v| json!({"VNI": c.vni, "VtepMAC": crate::mac::format(&v.mac)}))
        };
        (data(self.vtep4), data(self.vtep6))
    }

    /// After leasing: `<subnet>.0/32` (v6: `<subnet>::/128`) on the VTEP, and no
    /// other address of the cluster network there (a previous lease's).
    pub fn assign(&self, nl: &Netlink, key: &SubnetKey, config: &NetworkConfig) -> Result<()> {
        let pairs = [
            (
                self.vtep4,
                key.v4.map(|n| IpNet::new(n.network().into(), 32)),
                config.network_v4().map(IpNet::V4),
            ),
            (
                self.vtep6,
                key.v6.map(|n| IpNet::new(n.network().into(), 128)),
                config.network_v6().map(IpNet::V6),
            ),
        ];
        for (vtep, own, network) in pairs {
            let (Some(vtep), Some(Ok(own))) = (vtep, own) else {
                continue;
            };
            for addr in nl.addresses(vtep.index)? {
                if addr != own && network.is_some_and(|n| n.contains(&addr.addr())) {
                    nl.del_address(vtep.index, addr)?;
                }
            }
            if !nl.addresses(vtep.index)?.contains(&own) {
                nl.add_address(vtep.index, own)?;
            }
        }
        Ok(())
    }

    /// The lease value this node publishes: its addresses and the backend's data.
    pub fn lease_attrs(
        &self,
        public_v4: Option<std::net::Ipv4Addr>,
        public_v6: Option<std::net::Ipv6Addr>,
    ) -> LeaseAttrs {
        let (backend_data, backend_v6_data) = self.backend_data();
        LeaseAttrs {
            public_ip: public_v4.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            public_ipv6: public_v6,
            backend_type: self.kind.name().to_owned(),
            backend_data: backend_data.map(Into::into),
            backend_v6_data: backend_v6_data.map(Into::into),
        }
    }

    /// The entries all of `peers` need (peers this backend cannot program are
    /// skipped, logged at debug level).
    pub fn desired<'a>(&self, peers: impl IntoIterator<Item = &'a Lease>) -> PeerState {
        let mut all = PeerState::default();
        for peer in peers {
            match self.peer_state(peer) {
                Ok(s) => all.merge(s),
                Err(why) => crate::debug!("peer {} not programmed: {why}", peer.key),
            }
        }
        all
    }

    /// Make the kernel hold exactly `desired` (see [`DataPlane::desired`]). Returns
    /// the number of writes planned and the ones that failed.
    pub fn converge(
        &self,
        nl: &Netlink,
        desired: &PeerState,
    ) -> Result<(usize, Vec<(NetOp, CniError)>)> {
        let plan = plan(desired, &self.actual(nl)?);
        Ok((plan.len(), self.apply(nl, &plan)))
    }

    /// The entries one peer needs (none for a peer of another backend type or with
    /// unusable data; `Err` says why, for the logs).
    pub fn peer_state(&self, peer: &Lease) -> std::result::Result<PeerState, String> {
        let mut s = PeerState::default();
        if peer.attrs.backend_type != self.kind.name() {
            return Err(format!(
                "backend type {:?}, not {}",
                peer.attrs.backend_type,
                self.kind.name()
            ));
        }
        let families = [
            (
                peer.key.v4.map(IpNet::V4),
                Some(IpAddr::V4(peer.attrs.public_ip)).filter(|a| !a.is_unspecified()),
                &peer.attrs.backend_data,
                self.vtep4,
            ),
            (
                peer.key.v6.map(IpNet::V6),
                peer.attrs.public_ipv6.map(IpAddr::V6),
                &peer.attrs.backend_v6_data,
                self.vtep6,
            ),
        ];
        for (subnet, public, data, vtep) in families {
            let (Some(subnet), Some(public)) = (subnet, public) else {
                continue;
            };
            match &self.kind {
                Kind::HostGw => {
                    if !self.ext.on_link(public) {
                        return Err(format!(
                            "host-gw peer {public} is not on the external interface's link: use vxlan, or put the nodes on one L2 segment"
                        ));
                    }
                    peer_route(&mut s, self.direct_route(subnet, public));
                }
                Kind::Vxlan(c) if c.direct_routing && self.ext.on_link(public) => {
                    peer_route(&mut s, self.direct_route(subnet, public))
                }
                Kind::Vxlan(_) => {
                    let Some(vtep) = vtep else { continue };
                    let mac = vtep_mac(data.as_ref()).ok_or("no VtepMAC in its backend data")?;
                    let gw = subnet.network();
                    s.neigh(vtep.index, Neigh { ip: gw, mac });
                    s.fdb(vtep.index, Fdb { mac, dst: public });
                    peer_route(
                        &mut s,
                        OwnedRoute {
                            dst: subnet,
                            gw,
                            oif: Some(vtep.index),
                            onlink: true,
                            protocol: ROUTE_PROTOCOL,
                            nh: None,
                        },
                    );
                }
            }
        }
        Ok(s)
    }

    fn direct_route(&self, dst: IpNet, gw: IpAddr) -> OwnedRoute {
        OwnedRoute {
            dst,
            gw,
            oif: Some(self.ext.index),
            onlink: false,
            protocol: ROUTE_PROTOCOL,
            nh: None,
        }
    }

    /// What the kernel holds of ours: the VTEPs' permanent neighbours and FDB
    /// entries, and the routes tagged [`ROUTE_PROTOCOL`].
    pub fn actual(&self, nl: &Netlink) -> Result<PeerState> {
        let mut s = PeerState::default();
        for (vtep, v4) in [(self.vtep4, true), (self.vtep6, false)] {
            if let Some(v) = vtep {
                for n in nl.neighs(v.index, v4)? {
                    s.neigh(v.index, n);
                }
                for f in nl.fdbs(v.index)? {
                    s.fdb(v.index, f);
                }
            }
        }
        for v4 in [true, false] {
            for r in nl.owned_routes(v4, ROUTE_PROTOCOL)? {
                s.route(r);
            }
        }
        for n in nl.owned_nexthops(ROUTE_PROTOCOL)? {
            s.nexthop(n);
        }
        Ok(s)
    }

    /// Apply a plan batch by batch; the failed writes with their errors. A route
    /// whose nexthop object could not be written (no kernel support, or its id is
    /// another owner's) is written with its own gateway instead.
    pub fn apply(&self, nl: &Netlink, plan: &Plan) -> Vec<(NetOp, CniError)> {
        let mut failed = Vec::new();
        let mut no_nexthop = BTreeSet::new();
        for batch in plan.batches() {
            let batch: Vec<NetOp> = batch
                .iter()
                .map(|op| match op {
                    NetOp::ReplaceRoute(r) if r.nh.is_some_and(|id| no_nexthop.contains(&id)) => {
                        NetOp::ReplaceRoute(OwnedRoute { nh: None, ..*r })
                    }
                    op => op.clone(),
                })
                .collect();
            for (op, r) in batch.iter().zip(nl.apply_ops(&batch)) {
                if let Err(e) = r {
                    if let NetOp::ReplaceNexthop(n) = op {
                        no_nexthop.insert(n.id);
                    }
                    failed.push((op.clone(), e));
                }
            }
        }
        failed
    }
}

/// A peer's route, through a nexthop object of its own where the kernel gains from
/// one (IPv4: see [`crate::netlink::Nexthop`]).
fn peer_route(s: &mut PeerState, mut r: OwnedRoute) {
    if let Some(oif) = r.oif
        && let Some(n) = Nexthop::for_route(r.dst, r.gw, oif, r.onlink, r.protocol)
    {
        r.nh = Some(n.id);
        s.nexthop(n);
    }
    s.route(r);
}

fn ensure_vtep(
    nl: &Netlink,
    c: &VxlanConfig,
    ext: &ExtLink,
    name: &str,
    local: IpAddr,
    mtu: u32,
) -> Result<Vtep> {
    let port = if c.port == 0 {
        VXLAN_DEFAULT_PORT
    } else {
        c.port
    };
    let mut keep_mac = None;
    if let Some(have) = nl.vxlan(name)? {
        let same = have.vni == c.vni
            && have.local == Some(local)
            && have.dev == Some(ext.index)
            && have.port == port
            && have.learning == c.learning
            && have.gbp == c.gbp;
        let mac = <[u8; 6]>::try_from(have.mac.as_slice()).ok();
        if let (true, true, Some(mac)) = (same, have.up && have.mtu == mtu, mac) {
            return Ok(Vtep {
                index: have.index,
                mac,
            });
        }
        // Recreated rather than patched; a device that is ours in all but MTU or
        // state keeps its MAC, so peers need no update.
        nl.delete_link(have.index)?;
        keep_mac = mac.filter(|_| same);
    }
    let mac = keep_mac.unwrap_or_else(|| derived_mac(local, c.vni));
    let spec = VxlanSpec {
        name: name.to_owned(),
        vni: c.vni,
        local,
        dev: ext.index,
        port: c.port,
        learning: c.learning,
        gbp: c.gbp,
        mtu,
        mac,
    };
    let info = nl.create_vxlan(&spec)?;
    Ok(Vtep {
        index: info.index,
        mac,
    })
}

/// A locally administered unicast MAC from (address, VNI): the same on every start.
fn derived_mac(local: IpAddr, vni: u32) -> [u8; 6] {
    let h = crate::nft::hash64(&["weft-vtep", &local.to_string(), &vni.to_string()]).to_be_bytes();
    [(h[0] & 0xfe) | 0x02, h[1], h[2], h[3], h[4], h[5]]
}

/// `VtepMAC` of a peer's backend data (keys case-insensitive, like Go).
fn vtep_mac(data: Option<&BackendData>) -> Option<[u8; 6]> {
    let value = data?.value();
    let obj: &Map<String, Value> = value.as_object()?;
    crate::mac::parse(gojson::field(obj, "VtepMAC")?.as_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn config(backend: &str) -> NetworkConfig {
        NetworkConfig::parse(
            format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#).as_bytes(),
        )
        .unwrap()
    }

    fn plane(kind: Kind) -> DataPlane {
        DataPlane {
            kind,
            ext: ExtLink {
                index: 2,
                mtu: 1500,
                addrs: vec!["10.77.0.1/24".parse().unwrap()],
            },
            vtep4: Some(Vtep {
                index: 7,
                mac: [2, 1, 1, 1, 1, 1],
            }),
            vtep6: None,
        }
    }

    fn lease(subnet: &str, public: &str, kind: &str, data: Option<Value>) -> Lease {
        Lease {
            key: SubnetKey {
                v4: Some(subnet.parse().unwrap()),
                v6: None,
            },
            attrs: LeaseAttrs {
                public_ip: public.parse().unwrap(),
                public_ipv6: None,
                backend_type: kind.into(),
                backend_data: data.map(Into::into),
                backend_v6_data: None,
            },
            etcd_lease: 0,
            ttl: None,
        }
    }

    #[test]
    fn backend_config_follows_flanneld() {
        let k = Kind::of(&config(
            r#"{"type":"vxlan","vni":4,"port":4789,"directrouting":true}"#,
        ))
        .unwrap();
        assert_eq!(
            k,
            Kind::Vxlan(VxlanConfig {
                vni: 4,
                port: 4789,
                mtu: None,
                gbp: false,
                learning: false,
                direct_routing: true
            })
        );
        assert_eq!(k.pod_mtu(1500), 1450);
        assert_eq!(
            Kind::of(&config(r#"{"Type":"vxlan","MTU":9001}"#))
                .unwrap()
                .pod_mtu(1500),
            8951
        );
        assert_eq!(
            Kind::of(&config(r#"{"Type":"host-gw"}"#))
                .unwrap()
                .pod_mtu(1500),
            1500
        );
        assert!(
            Kind::of(&config(r#"{"Type":"vxlan","VNI":-1}"#))
                .unwrap_err()
                .contains("Backend.VNI")
        );
        assert!(
            Kind::of(&config(r#"{"Type":"wireguard"}"#))
                .unwrap_err()
                .contains("not supported")
        );
    }

    #[test]
    fn vxlan_peers_get_neighbour_fdb_and_onlink_route() {
        let p = plane(Kind::of(&config(r#"{"Type":"vxlan"}"#)).unwrap());
        let data = json!({"VNI": 1, "VtepMAC": "be:55:aa:bf:94:77"});
        let s = p
            .peer_state(&lease("10.244.27.0/24", "10.77.0.2", "vxlan", Some(data)))
            .unwrap();
        let mac = [0xbe, 0x55, 0xaa, 0xbf, 0x94, 0x77];
        assert_eq!(
            s.neighs.get(&(7, "10.244.27.0".parse().unwrap())),
            Some(&mac)
        );
        assert!(s.fdbs.contains(&(
            7,
            Fdb {
                mac,
                dst: "10.77.0.2".parse().unwrap()
            }
        )));
        let r = s.routes.values().next().unwrap();
        assert_eq!(
            r.to_string(),
            "10.244.27.0/24 nhid 183769856 via 10.244.27.0 dev #7 onlink proto 87"
        );
        // Through a nexthop object whose id is the subnet's address (10.244.27.0).
        assert_eq!(
            s.nexthops
                .values()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            ["nexthop id 183769856 via 10.244.27.0 dev #7 onlink proto 87"]
        );
        // Other backend types and unusable data are skipped with a reason.
        assert!(
            p.peer_state(&lease("10.244.28.0/24", "10.77.0.3", "host-gw", None))
                .is_err()
        );
        assert!(
            p.peer_state(&lease(
                "10.244.29.0/24",
                "10.77.0.4",
                "vxlan",
                Some(json!({"VNI": 1}))
            ))
            .unwrap_err()
            .contains("VtepMAC")
        );
    }

    #[test]
    fn host_gw_and_direct_routing_use_the_public_ip() {
        let p = plane(Kind::HostGw);
        let s = p
            .peer_state(&lease("10.244.27.0/24", "10.77.0.2", "host-gw", None))
            .unwrap();
        assert_eq!(
            s.routes.values().next().unwrap().to_string(),
            "10.244.27.0/24 nhid 183769856 via 10.77.0.2 dev #2 proto 87"
        );
        assert_eq!(s.len(), 1);
        let err = p
            .peer_state(&lease("10.244.28.0/24", "192.0.2.9", "host-gw", None))
            .unwrap_err();
        assert!(
            err.contains("not on the external interface's link"),
            "{err}"
        );
        let direct = plane(Kind::of(&config(r#"{"Type":"vxlan","DirectRouting":true}"#)).unwrap());
        let data = json!({"VNI": 1, "VtepMAC": "be:55:aa:bf:94:77"});
        let s = direct
            .peer_state(&lease(
                "10.244.27.0/24",
                "10.77.0.2",
                "vxlan",
                Some(data.clone()),
            ))
            .unwrap();
        assert_eq!((s.neighs.len(), s.fdbs.len(), s.routes.len()), (0, 0, 1));
        let s = direct
            .peer_state(&lease("10.244.28.0/24", "192.0.2.9", "vxlan", Some(data)))
            .unwrap();
        assert_eq!(s.len(), 3, "off-link peers still go over the VTEP");
    }

    #[test]
    fn derived_macs_are_stable_local_unicast() {
        let a = derived_mac("10.77.0.1".parse().unwrap(), 1);
        assert_eq!(a, derived_mac("10.77.0.1".parse().unwrap(), 1));
        assert_ne!(a, derived_mac("10.77.0.2".parse().unwrap(), 1));
        assert_eq!(a[0] & 0x03, 0x02);
        assert_eq!(
            vtep_mac(Some(&json!({"vtepmac": crate::mac::format(&a)}).into())),
            Some(a)
        );
    }
}
