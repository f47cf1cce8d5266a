//! The kernel objects of weftd's overlay backends, as flanneld programs them
//! (`reference/flannel.md` §2, §3):
//!
//! - vxlan: the `flannel.<VNI>` device, then per peer a permanent neighbour (the
//!   peer's subnet address → its VTEP MAC), a bridge FDB entry (that MAC → the
//!   peer's public IP) and an on-link route to the peer's subnet via its subnet
//!   address, in that order so the kernel never has to ARP;
//! - host-gw: per peer a route to its subnet via its public IP.
//!
//! Every write is idempotent: adds are `CREATE|REPLACE`, and deleting an absent
//! object reports `false` (or `Ok` inside [`Netlink::apply_ops`]). Routes carry a
//! protocol number of weft's own, so a resync lists exactly the routes it owns.
//! Listings are dumps, since the kernel has no GET for "all neighbours of a
//! device"; rtnetlink does not check `NLM_F_DUMP_INTR`, so the listings retry
//! interrupted dumps themselves.

use super::nexthop::Nexthop;
use super::{Netlink, errno, fail};
use crate::error::{CniError, Result};
use futures_util::StreamExt;
use ipnet::IpNet;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags};
use rtnetlink::packet_route::link::{LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The UDP port the kernel gives a vxlan device created without one (Linux's
/// historical default, which flanneld relies on; IANA's 4789 must be asked for).
pub const VXLAN_DEFAULT_PORT: u16 = 8472;

/// How many requests [`Netlink::apply_ops`] keeps queued. rtnetlink's
/// connection writes one request per wake-up and reads every reply before the
/// next, so at most one acknowledgement sits in the socket buffer at a time and
/// this bound only limits memory (see [`Netlink::apply_ops`]).
const APPLY_CONCURRENCY: usize = 512;

/// Attempts at a dump the kernel keeps flagging as interrupted.
const DUMP_ATTEMPTS: usize = 10;

/// The vxlan device to create, with flanneld's settings as the defaults to pick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// `flannel.<VNI>` (`flannel-v6.<VNI>` for the IPv6 device) for interop.
    pub name: String,
    pub vni: u32,
    /// The VTEP's own address (the node's public IP), v4 or v6.
    pub local: IpAddr,
    /// The underlay interface's index; 0 leaves it unset.
    pub dev: u32,
    /// Destination UDP port; 0 means the kernel default, [`VXLAN_DEFAULT_PORT`].
    pub port: u16,
    /// Source-MAC learning; flanneld turns it off (`nolearning`) because it
    /// programs every peer's FDB entry itself.
    pub learning: bool,
    /// VXLAN Group Based Policy extension.
    pub gbp: bool,
    /// Device MTU (flanneld: underlay MTU − 50); 0 leaves the kernel's choice.
    pub mtu: u32,
    /// Set at creation, not afterwards: systemd's MACAddressPolicy may otherwise
    /// replace it between creation and the peers learning it (flannel #1155).
    pub mac: [u8; 6],
}

/// A vxlan device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanInfo {
    /// The device's ifindex, for neighbours, FDB entries and routes on it.
    pub index: u32,
    pub vni: u32,
    /// The VTEP address, if the device has one.
    pub local: Option<IpAddr>,
    /// The underlay interface's index.
    pub dev: Option<u32>,
    /// Destination UDP port (the kernel always reports one).
    pub port: u16,
    pub learning: bool,
    pub gbp: bool,
    /// After the kernel's clamping (see [`Netlink::create_vxlan`]).
    pub mtu: u32,
    /// The VTEP MAC that peers must program (flannel's `VtepMAC`).
    pub mac: Vec<u8>,
    /// Administratively up.
    pub up: bool,
}

/// A route weft owns: tagged with `protocol` so resync finds exactly ours.
///
/// In the main table, scope universe. vxlan peers use
/// `{dst: subnet, gw: subnet address, oif: Some(vxlan), onlink: true}`; host-gw
/// peers `{dst: subnet, gw: public IP, oif: None, onlink: false}`, letting the
/// kernel pick the device (listings always report the `oif` it chose).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnedRoute {
    /// The peer's subnet, with host bits clear (the kernel refuses others).
    pub dst: IpNet,
    /// Same family as `dst`. A listed route of our protocol without a gateway
    /// (not one weft writes) reports the unspecified address, and deleting with
    /// the unspecified address matches any gateway, so resync can still remove it.
    pub gw: IpAddr,
    /// Output device; `None` in a write lets the kernel pick.
    pub oif: Option<u32>,
    /// `RTNH_F_ONLINK`: the gateway is reachable on `oif` without a covering
    /// connected route, as for flanneld's `10.244.27.0/24 via 10.244.27.0 dev
    /// flannel.1 onlink`.
    pub onlink: bool,
    /// `rtm_protocol`: weft's tag (flanneld's routes are `boot`, 3).
    pub protocol: u8,
    /// Through this nexthop object (see [`super::nexthop`]) rather than with its own
    /// gateway; `gw`, `oif` and `onlink` still describe it (listings report them).
    pub nh: Option<u32>,
}

/// A permanent neighbour entry (`ip neigh replace IP lladdr MAC nud permanent`):
/// a vxlan peer's subnet address and VTEP MAC, so the kernel never ARPs across
/// the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neigh {
    /// The peer's subnet address (the routes' gateway).
    pub ip: IpAddr,
    /// The peer's VTEP MAC.
    pub mac: [u8; 6],
}

/// A permanent `self` FDB entry on a vxlan device (`bridge fdb replace MAC dev
/// DEV dst IP self permanent`): where to send frames for a peer's VTEP MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fdb {
    /// The peer's VTEP MAC.
    pub mac: [u8; 6],
    /// The peer's underlay (public) address.
    pub dst: IpAddr,
}

/// One write for [`Netlink::apply_ops`]; the `u32`s are device indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetOp {
    /// [`Netlink::replace_neigh`].
    ReplaceNeigh(u32, Neigh),
    /// Delete the neighbour with this IP on the device, whatever its MAC.
    DelNeigh(u32, IpAddr),
    /// [`Netlink::replace_fdb`].
    ReplaceFdb(u32, Fdb),
    /// Delete this MAC's entry if it has this dst. Unlike [`Netlink::del_fdb`]
    /// it does not look first: the kernel answers a wrong dst with success.
    DelFdb(u32, Fdb),
    /// [`Netlink::replace_owned_route`].
    ReplaceRoute(OwnedRoute),
    /// [`Netlink::del_owned_route`].
    DelRoute(OwnedRoute),
    /// Create the nexthop object, or replace it if it is ours (before routes use it).
    ReplaceNexthop(Nexthop),
    /// Delete this nexthop object if it has this protocol (after the routes).
    DelNexthop(u32, u8),
}

impl NetOp {
    fn is_del(&self) -> bool {
        matches!(
            self,
            NetOp::DelNeigh(..) | NetOp::DelFdb(..) | NetOp::DelRoute(_) | NetOp::DelNexthop(..)
        )
    }

    /// The request: the message and its flags beyond `REQUEST|ACK`.
    fn request(&self) -> Result<(RouteNetlinkMessage, u16)> {
        const UPSERT: u16 = NLM_F_CREATE | NLM_F_REPLACE;
        Ok(match self {
            NetOp::ReplaceNeigh(dev, n) => (
                RouteNetlinkMessage::NewNeighbour(neigh_msg(*dev, n.ip, Some(&n.mac))),
                UPSERT,
            ),
            NetOp::DelNeigh(dev, ip) => (
                RouteNetlinkMessage::DelNeighbour(neigh_msg(*dev, *ip, None)),
                0,
            ),
            NetOp::ReplaceFdb(dev, f) => {
                (RouteNetlinkMessage::NewNeighbour(fdb_msg(*dev, f)), UPSERT)
            }
            NetOp::DelFdb(dev, f) => (RouteNetlinkMessage::DelNeighbour(fdb_msg(*dev, f)), 0),
            NetOp::ReplaceRoute(r) => (
                RouteNetlinkMessage::NewRoute(route_msg(r).map_err(|e| e.context(self))?),
                UPSERT,
            ),
            NetOp::DelRoute(r) => (
                RouteNetlinkMessage::DelRoute(
                    route_msg(&r.to_delete()).map_err(|e| e.context(self))?,
                ),
                0,
            ),
            NetOp::ReplaceNexthop(_) | NetOp::DelNexthop(..) => {
                return Err(CniError::internal(format!("{self}: not a route message")));
            }
        })
    }
}

/// What the operation does, for error messages: "replacing neighbour 10.244.27.0
/// lladdr be:55:aa:bf:94:77 on link #5".
impl fmt::Display for NetOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetOp::ReplaceNeigh(dev, n) => write!(f, "replacing neighbour {n} on link #{dev}"),
            NetOp::DelNeigh(dev, ip) => write!(f, "deleting neighbour {ip} on link #{dev}"),
            NetOp::ReplaceFdb(dev, e) => write!(f, "replacing fdb entry {e} on link #{dev}"),
            NetOp::DelFdb(dev, e) => write!(f, "deleting fdb entry {e} on link #{dev}"),
            NetOp::ReplaceRoute(r) => write!(f, "replacing route {r}"),
            NetOp::DelRoute(r) => write!(f, "deleting route {r}"),
            NetOp::ReplaceNexthop(n) => write!(f, "writing {n}"),
            NetOp::DelNexthop(id, _) => write!(f, "deleting nexthop id {id}"),
        }
    }
}

/// `ip neigh` style: `10.244.27.0 lladdr be:55:aa:bf:94:77`.
impl fmt::Display for Neigh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lladdr {}", self.ip, crate::mac::format(&self.mac))
    }
}

/// `bridge fdb` style: `be:55:aa:bf:94:77 dst 10.77.0.2`.
impl fmt::Display for Fdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dst {}", crate::mac::format(&self.mac), self.dst)
    }
}

/// `ip route` style: `10.244.27.0/24 via 10.244.27.0 dev #5 onlink proto 200`.
impl fmt::Display for OwnedRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(id) = self.nh {
            write!(f, " nhid {id}")?;
        }
        if !self.gw.is_unspecified() {
            write!(f, " via {}", self.gw)?;
        }
        if let Some(oif) = self.oif {
            write!(f, " dev #{oif}")?;
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        write!(f, " proto {}", self.protocol)
    }
}

impl OwnedRoute {
    /// The route as a delete names it. The kernel matches no route through a
    /// nexthop object when a gateway or device is given, so such a route is named
    /// by destination and protocol only (we own one route per destination).
    fn to_delete(self) -> OwnedRoute {
        if self.nh.is_none() {
            return self;
        }
        let gw = if self.dst.addr().is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        OwnedRoute {
            gw,
            oif: None,
            onlink: false,
            nh: None,
            ..self
        }
    }
}

impl Netlink {
    /// The vxlan device `name` as the kernel has it (a GET, not a dump); `None`
    /// if there is no such link, an error if `name` is a link of another kind.
    pub fn vxlan(&self, name: &str) -> Result<Option<VxlanInfo>> {
        let mut req = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let msg = match self.block(req.next()) {
            None => return Ok(None),
            Some(Ok(msg)) => msg,
            Some(Err(e)) if errno(&e) == Some(libc::ENODEV) => return Ok(None),
            Some(Err(e)) => return Err(fail(format!("looking up {name:?}"), e)),
        };
        to_vxlan(msg)
            .map(Some)
            .ok_or_else(|| CniError::config(format!("{name:?} exists but is not a vxlan device")))
    }

    /// The vxlan device `spec` describes, created with its MAC, MTU, `nolearning`
    /// (unless `learning`) and UDP checksums on (flanneld's kernel settings), up.
    ///
    /// Idempotent the way flanneld is: an existing device with the same VNI,
    /// local address, underlay device, port, learning and GBP is reused, and only
    /// its MTU and up state are brought in line. It keeps its MAC, which peers may
    /// already have programmed: compare `mac` in the result with `spec.mac` and
    /// call [`Netlink::set_mac`] if the new one must win. A device that differs in
    /// any of those (or a link of another kind) is an error naming the difference;
    /// deleting and recreating it (dropping every entry on it) is the caller's call.
    ///
    /// An MTU above the underlay's less the VXLAN overhead (50 bytes over IPv4,
    /// 70 over IPv6) is clamped to it, as the kernel does at creation (and only
    /// then: changing it later to more is EINVAL). flanneld asks 1450 for its v6
    /// device over a 1500 underlay and gets 1430; so does this, every time.
    pub fn create_vxlan(&self, spec: &VxlanSpec) -> Result<VxlanInfo> {
        let name = &spec.name;
        let existing = match self.vxlan(name)? {
            Some(info) => info,
            None => {
                let mut msg = LinkVxlan::new(name, spec.vni)
                    .learning(spec.learning)
                    .udp_csum(true)
                    .udp_zero_csum6_tx(false)
                    .udp_zero_csum6_rx(false)
                    .address(spec.mac.to_vec())
                    .up();
                msg = match spec.local {
                    IpAddr::V4(a) => msg.local(a),
                    IpAddr::V6(a) => msg.local6(a),
                };
                if spec.dev != 0 {
                    msg = msg.dev(spec.dev);
                }
                if spec.port != 0 {
                    msg = msg.port(spec.port);
                }
                if spec.gbp {
                    msg = msg.gbp();
                }
                if spec.mtu != 0 {
                    msg = msg.mtu(spec.mtu);
                }
                match self.block(self.handle.link().add(msg.build()).execute()) {
                    // EEXIST: created meanwhile by someone else; check it below.
                    Err(e) if errno(&e) != Some(libc::EEXIST) => {
                        return Err(fail(
                            format!(
                                "creating vxlan {name:?} (vni {}, local {}, dev #{})",
                                spec.vni, spec.local, spec.dev
                            ),
                            e,
                        ));
                    }
                    _ => {}
                }
                self.vxlan(name)?.ok_or_else(|| {
                    CniError::internal(format!("vxlan {name:?} vanished after creation"))
                })?
            }
        };
        if let Some(diff) = incompatibility(spec, &existing) {
            return Err(CniError::config(format!(
                "vxlan {name:?} exists with {diff}; delete it to recreate"
            )));
        }
        let mut changed = false;
        if spec.mtu != 0 && existing.mtu != spec.mtu {
            let mtu = self.vxlan_mtu(spec)?;
            if existing.mtu != mtu {
                self.set(
                    format!("setting the MTU of {name:?} to {mtu}"),
                    LinkUnspec::new_with_index(existing.index).mtu(mtu).build(),
                )?;
                changed = true;
            }
        }
        if !existing.up {
            self.set_up(existing.index)?;
            changed = true;
        }
        if !changed {
            return Ok(existing);
        }
        self.vxlan(name)?
            .ok_or_else(|| CniError::internal(format!("vxlan {name:?} vanished while set up")))
    }

    /// The MTU the kernel gives a new device for `spec`.
    fn vxlan_mtu(&self, spec: &VxlanSpec) -> Result<u32> {
        let underlay = match spec.dev {
            0 => None,
            dev => self.link_by_index(dev)?,
        };
        let Some(underlay) = underlay else {
            return Ok(spec.mtu);
        };
        let overhead = if spec.local.is_ipv6() { 70 } else { 50 };
        Ok(spec.mtu.min(underlay.mtu.saturating_sub(overhead)))
    }

    /// Add or replace the permanent neighbour `n` on link `dev` (RTM_NEWNEIGH
    /// with CREATE|REPLACE, NUD_PERMANENT), as flanneld's `AddARP`.
    pub fn replace_neigh(&self, dev: u32, n: &Neigh) -> Result<()> {
        self.run(&NetOp::ReplaceNeigh(dev, *n)).map(drop)
    }

    /// Delete the neighbour `ip` on link `dev`; `Ok(false)` if there was none.
    pub fn del_neigh(&self, dev: u32, ip: IpAddr) -> Result<bool> {
        self.run(&NetOp::DelNeigh(dev, ip))
    }

    /// The permanent neighbours of one family on link `dev` (entries the kernel
    /// resolved itself are not ours and left out).
    pub fn neighs(&self, dev: u32, v4: bool) -> Result<Vec<Neigh>> {
        let mut filter = NeighbourMessage::default();
        filter.header.family = if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        // The kernel filters on NDA_IFINDEX even without strict checking.
        filter.attributes.push(NeighbourAttribute::IfIndex(dev));
        let msgs = self.dump(
            &format!("listing neighbours of link #{dev}"),
            RouteNetlinkMessage::GetNeighbour(filter),
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => to_neigh(&n, dev, v4),
                _ => None,
            })
            .collect())
    }

    /// Add or replace the FDB entry `f` on vxlan link `dev` (family AF_BRIDGE,
    /// NTF_SELF, NUD_PERMANENT, NDA_DST), as flanneld's `AddFDB`. Replacing an
    /// existing MAC moves it to the new `dst`.
    pub fn replace_fdb(&self, dev: u32, f: &Fdb) -> Result<()> {
        self.run(&NetOp::ReplaceFdb(dev, *f)).map(drop)
    }

    /// Delete the FDB entry `f` (that MAC *and* that dst) on link `dev`;
    /// `Ok(false)` if there was none.
    ///
    /// The kernel acknowledges deleting a MAC's entry with a dst it does not
    /// have as a success (and deletes nothing), so this looks the MAC up first
    /// (a GET, kernels ≥ 5.0) to tell. The GET shows an entry's first
    /// destination only, which is all an entry weft writes has.
    pub fn del_fdb(&self, dev: u32, f: &Fdb) -> Result<bool> {
        match self.fdb_get(dev, &f.mac) {
            Ok(Some(have)) if have.dst != f.dst => return Ok(false),
            Ok(None) => return Ok(false),
            // EOPNOTSUPP: no fdb GET on this kernel; trust the delete's answer.
            Ok(Some(_)) | Err(_) => {}
        }
        self.run(&NetOp::DelFdb(dev, *f))
    }

    /// The FDB entry for `mac` on link `dev` (its first destination), by GET.
    fn fdb_get(&self, dev: u32, mac: &[u8; 6]) -> std::result::Result<Option<Fdb>, i32> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = dev;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(msg));
        req.header.flags = NLM_F_REQUEST;
        let replies = self.handle.clone().request(req).map_err(|_| 0)?;
        let replies: Vec<_> = self.block(replies.collect());
        for reply in replies {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
                    return Ok(to_fdb(&n, dev));
                }
                NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
                    Some(libc::ENOENT | libc::ENODEV) => return Ok(None),
                    Some(n) => return Err(n),
                    None => {}
                },
                _ => {}
            }
        }
        Ok(None)
    }

    /// The permanent FDB entries with a destination on link `dev`, skipping the
    /// all-zero default (flood) entries, which weft does not write.
    ///
    /// Dumps the FDB of every device and filters here: without strict checking
    /// the kernel only filters AF_BRIDGE dumps given an `ifinfomsg` header. On a
    /// node that is the vxlan entries plus a few multicast addresses per device.
    pub fn fdbs(&self, dev: u32) -> Result<Vec<Fdb>> {
        let mut filter = NeighbourMessage::default();
        filter.header.family = AddressFamily::Bridge;
        let msgs = self.dump(
            &format!("listing fdb entries of link #{dev}"),
            RouteNetlinkMessage::GetNeighbour(filter),
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => to_fdb(&n, dev),
                _ => None,
            })
            .collect())
    }

    /// Add or replace `r` in the main table (scope universe, `RTNH_F_ONLINK` when
    /// `onlink`, tagged with `r.protocol`). Replacing takes over a route to the
    /// same destination whatever its protocol, e.g. one flanneld left behind.
    pub fn replace_owned_route(&self, r: &OwnedRoute) -> Result<()> {
        self.run(&NetOp::ReplaceRoute(*r)).map(drop)
    }

    /// Delete `r` from the main table; `Ok(false)` if no route matches. Only a
    /// route with `r.protocol` matches, so another owner's route survives.
    pub fn del_owned_route(&self, r: &OwnedRoute) -> Result<bool> {
        self.run(&NetOp::DelRoute(*r))
    }

    /// The main-table routes of one family tagged with `protocol`: what a resync
    /// compares with the routes it wants.
    pub fn owned_routes(&self, v4: bool, protocol: u8) -> Result<Vec<OwnedRoute>> {
        let filter = if v4 {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        };
        let msgs = self.dump(
            &format!(
                "listing IPv{} routes of protocol {protocol}",
                if v4 { 4 } else { 6 }
            ),
            RouteNetlinkMessage::GetRoute(filter),
        )?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => to_owned_route(&r, v4, protocol),
                _ => None,
            })
            .collect())
    }

    /// Many writes at once, with their results in `ops` order. Deleting an
    /// absent object is `Ok`; one failure does not stop the others (order
    /// dependencies, like flanneld's neighbour → FDB → route, are the caller's:
    /// put dependent ops in a later call).
    ///
    /// Up to 512 requests are queued on the connection together, in `ops`
    /// order, inside one runtime entry instead of one blocking call each. The
    /// connection still writes one request per wake-up (4 syscalls per op), so
    /// the gain is the per-call overhead: 10,000 neighbours or FDB entries take
    /// 60–90 ms (release build; iproute2's `ip -batch` needs ~120 ms for the
    /// neighbours), deleting 30,000 objects 0.2–0.4 s. IPv4 routes are
    /// kernel-bound: flanneld-style routes (a gateway per peer on one device,
    /// same metric) share one bucket of the kernel's next-hop hash, which
    /// ignores the gateway, so 10,000 take ~1.8 s here and with `ip -batch`
    /// alike (2,000: 0.1 s; IPv6: 0.1 s for 10,000).
    ///
    /// A socket receive-buffer overrun (ENOBUFS, flannel #958) cannot happen
    /// here: the connection sends the next request only after reading every
    /// reply waiting, so one acknowledgement at most is queued (measured: no
    /// drops on the socket after 120,000 requests). An overrun would hang, not
    /// fail: netlink-proto turns ENOBUFS into an unsolicited message and the
    /// lost replies' requests would never finish.
    ///
    /// Nexthop objects go over a socket of their own, in datagrams of many requests
    /// each (see [`super::nexthop`]).
    pub fn apply_ops(&self, ops: &[NetOp]) -> Vec<Result<()>> {
        let handle = &self.handle;
        let mut out: Vec<Result<()>> = self.block(
            futures_util::stream::iter(ops)
                .map(|op| async move {
                    match op {
                        NetOp::ReplaceNexthop(_) | NetOp::DelNexthop(..) => Ok(()),
                        op => exec(handle, op).await.map(drop),
                    }
                })
                .buffered(APPLY_CONCURRENCY)
                .collect(),
        );
        let (mut writes, mut deletes) = (Vec::new(), Vec::new());
        for (i, op) in ops.iter().enumerate() {
            match op {
                NetOp::ReplaceNexthop(n) => writes.push((i, *n)),
                NetOp::DelNexthop(id, protocol) => deletes.push((i, (*id, *protocol))),
                _ => {}
            }
        }
        if !writes.is_empty() {
            let nhs: Vec<Nexthop> = writes.iter().map(|w| w.1).collect();
            for ((i, _), r) in writes.iter().zip(self.nexthops().replace(&nhs)) {
                out[*i] = r;
            }
        }
        for (i, (id, protocol)) in deletes {
            // Rare (a peer leaving), so one request at a time is fine.
            out[i] = self.nexthops().delete(&[id], protocol).remove(0);
        }
        out
    }

    /// Our IPv4 nexthop objects: those tagged `protocol`.
    pub fn owned_nexthops(&self, protocol: u8) -> Result<Vec<Nexthop>> {
        self.nexthops().list(protocol)
    }

    fn run(&self, op: &NetOp) -> Result<bool> {
        self.block(exec(&self.handle, op))
    }

    /// A dump's messages, retried while the kernel flags it `NLM_F_DUMP_INTR`
    /// (its table changed mid-dump, so entries may be missing or doubled).
    fn dump(&self, what: &str, filter: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
        for _ in 0..DUMP_ATTEMPTS {
            let mut req = NetlinkMessage::from(filter.clone());
            req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let replies = self
                .handle
                .clone()
                .request(req)
                .map_err(|e| fail(what, e))?;
            let replies: Vec<_> = self.block(replies.collect());
            if let Some(msgs) = dump_result(replies).map_err(|e| fail(what, e))? {
                return Ok(msgs);
            }
        }
        Err(CniError::internal(format!(
            "{what}: the kernel interrupted the dump {DUMP_ATTEMPTS} times in a row"
        )))
    }
}

/// A dump's replies: `Ok(None)` if the kernel flagged it interrupted. (An
/// interruption flagged only on the closing NLMSG_DONE is invisible here:
/// netlink-proto does not forward DONE messages.)
fn dump_result(
    replies: Vec<NetlinkMessage<RouteNetlinkMessage>>,
) -> std::result::Result<Option<Vec<RouteNetlinkMessage>>, rtnetlink::Error> {
    let mut msgs = Vec::with_capacity(replies.len());
    let mut interrupted = false;
    for reply in replies {
        interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
        match reply.payload {
            NetlinkPayload::InnerMessage(m) => msgs.push(m),
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
            _ => {}
        }
    }
    Ok((!interrupted).then_some(msgs))
}

/// Send one request and wait for its acknowledgement; `Ok(false)` for a delete
/// of something absent (or on a device that is gone).
async fn exec(handle: &Handle, op: &NetOp) -> Result<bool> {
    let (msg, flags) = op.request()?;
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut replies = handle.clone().request(req).map_err(|e| fail(op, e))?;
    while let Some(reply) = replies.next().await {
        if let NetlinkPayload::Error(e) = reply.payload
            && e.code.is_some()
        {
            let e = rtnetlink::Error::NetlinkError(e);
            let absent = matches!(errno(&e), Some(libc::ENOENT | libc::ESRCH | libc::ENODEV));
            return if op.is_del() && absent {
                Ok(false)
            } else {
                Err(fail(op, e))
            };
        }
    }
    Ok(true)
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// A neighbour message; `mac` for adds (permanent), `None` for deletes.
fn neigh_msg(dev: u32, ip: IpAddr, mac: Option<&[u8; 6]>) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family(ip);
    msg.header.ifindex = dev;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
    if let Some(mac) = mac {
        msg.header.state = NeighbourState::Permanent;
        // flanneld's netlink.NeighSet sends RTN_UNICAST.
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    }
    msg
}

fn fdb_msg(dev: u32, f: &Fdb) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = dev;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own; // NTF_SELF: the vxlan device's own FDB
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(f.mac.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(
            f.dst,
        )));
    msg
}

fn route_msg(r: &OwnedRoute) -> Result<RouteMessage> {
    if !r.gw.is_unspecified() && r.gw.is_ipv4() != r.dst.addr().is_ipv4() {
        return Err(CniError::config(
            "the gateway's address family differs from the destination's",
        ));
    }
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.dst.addr(), r.dst.prefix_len())
        .map_err(|e| CniError::config(e.to_string()))?;
    if let Some(id) = r.nh {
        let mut msg = b.protocol(RouteProtocol::from(r.protocol)).build();
        msg.attributes.push(RouteAttribute::NhId(id));
        return Ok(msg);
    }
    if !r.gw.is_unspecified() {
        b = b
            .gateway(r.gw)
            .map_err(|e| CniError::config(e.to_string()))?;
    }
    if let Some(oif) = r.oif {
        b = b.output_interface(oif);
    }
    if r.onlink {
        b = b.onlink();
    }
    Ok(b.protocol(RouteProtocol::from(r.protocol)).build())
}

fn to_vxlan(msg: LinkMessage) -> Option<VxlanInfo> {
    let mut info = VxlanInfo {
        index: msg.header.index,
        vni: 0,
        local: None,
        dev: None,
        port: 0,
        learning: false,
        gbp: false,
        mtu: 0,
        mac: Vec::new(),
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    let mut is_vxlan = false;
    for attr in msg.attributes {
        match attr {
            LinkAttribute::Address(a) => info.mac = a,
            LinkAttribute::Mtu(m) => info.mtu = m,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(InfoKind::Vxlan) => is_vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(data)) => read_vxlan(&mut info, data),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    is_vxlan.then_some(info)
}

fn read_vxlan(info: &mut VxlanInfo, data: Vec<InfoVxlan>) {
    for d in data {
        match d {
            InfoVxlan::Id(v) => info.vni = v,
            InfoVxlan::Local(a) => info.local = Some(a.into()),
            InfoVxlan::Local6(a) => info.local = Some(a.into()),
            InfoVxlan::Link(i) => info.dev = Some(i),
            InfoVxlan::Port(p) => info.port = p,
            InfoVxlan::Learning(l) => info.learning = l,
            InfoVxlan::Gbp => info.gbp = true,
            _ => {}
        }
    }
}

/// Why an existing device cannot serve as `spec` (flanneld's compatibility
/// test, plus learning), or `None`.
fn incompatibility(spec: &VxlanSpec, have: &VxlanInfo) -> Option<String> {
    let want_port = if spec.port == 0 {
        VXLAN_DEFAULT_PORT
    } else {
        spec.port
    };
    let want_dev = (spec.dev != 0).then_some(spec.dev);
    let show = |ip: Option<IpAddr>| ip.map_or("none".into(), |ip| ip.to_string());
    let show_dev = |d: Option<u32>| d.map_or("none".into(), |d| format!("#{d}"));
    if have.vni != spec.vni {
        Some(format!("vni {} (want {})", have.vni, spec.vni))
    } else if have.local != Some(spec.local) {
        Some(format!("local {} (want {})", show(have.local), spec.local))
    } else if have.dev != want_dev {
        Some(format!(
            "dev {} (want {})",
            show_dev(have.dev),
            show_dev(want_dev)
        ))
    } else if have.port != want_port {
        Some(format!("dstport {} (want {want_port})", have.port))
    } else if have.learning != spec.learning {
        Some(format!(
            "learning {} (want {})",
            have.learning, spec.learning
        ))
    } else if have.gbp != spec.gbp {
        Some(format!("gbp {} (want {})", have.gbp, spec.gbp))
    } else {
        None
    }
}

fn to_neigh(msg: &NeighbourMessage, dev: u32, v4: bool) -> Option<Neigh> {
    let h = &msg.header;
    let family_ok = h.family
        == if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
    if !family_ok || h.ifindex != dev || !permanent(h.state) {
        return None;
    }
    let (mut ip, mut mac) = (None, None);
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some((*a).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => ip = Some((*a).into()),
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(&l[..]).ok(),
            _ => {}
        }
    }
    Some(Neigh { ip: ip?, mac: mac? })
}

fn to_fdb(msg: &NeighbourMessage, dev: u32) -> Option<Fdb> {
    let h = &msg.header;
    if h.family != AddressFamily::Bridge || h.ifindex != dev || !permanent(h.state) {
        return None;
    }
    let (mut dst, mut mac) = (None, None);
    for attr in &msg.attributes {
        match attr {
            // Bridge-family dumps carry NDA_DST as raw bytes; the length says v4 or v6.
            NeighbourAttribute::Destination(a) => dst = neigh_addr(a),
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(&l[..]).ok(),
            _ => {}
        }
    }
    let mac = mac.filter(|m| *m != [0; 6])?;
    Some(Fdb { mac, dst: dst? })
}

fn neigh_addr(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some((*v4).into()),
        NeighbourAddress::Inet6(v6) => Some((*v6).into()),
        NeighbourAddress::Other(raw) => match raw.len() {
            4 => Some(Ipv4Addr::from(<[u8; 4]>::try_from(&raw[..]).ok()?).into()),
            16 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(&raw[..]).ok()?).into()),
            _ => None,
        },
        _ => None,
    }
}

fn to_owned_route(msg: &RouteMessage, v4: bool, protocol: u8) -> Option<OwnedRoute> {
    let h = &msg.header;
    if u8::from(h.protocol) != protocol {
        return None;
    }
    let r = super::to_route(msg, v4)?;
    if r.table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let unspecified: IpAddr = if v4 {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    Some(OwnedRoute {
        dst: r.dst,
        gw: r.gw.unwrap_or(unspecified),
        oif: r.oif,
        onlink: h.flags.contains(RouteFlags::Onlink),
        protocol,
        nh: msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::NhId(id) => Some(*id),
            _ => None,
        }),
    })
}

/// NUD_PERMANENT set, alone or with other bits: `bridge fdb add … self permanent`
/// stores NOARP|PERMANENT, and such an entry on our VTEP is ours to manage too.
fn permanent(state: NeighbourState) -> bool {
    const NUD_PERMANENT: u16 = 0x80;
    u16::from(state) & NUD_PERMANENT != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::{NLM_F_MULTIPART, NetlinkHeader};

    fn reply(flags: u16, n: u32) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = n;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_MULTIPART | flags;
        NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(msg)),
        )
    }

    #[test]
    fn an_interrupted_dump_is_retried_not_trusted() {
        let clean = dump_result(vec![reply(0, 1), reply(0, 2)]).unwrap();
        assert_eq!(clean.map(|m| m.len()), Some(2));
        let torn = dump_result(vec![reply(0, 1), reply(NLM_F_DUMP_INTR, 2)]).unwrap();
        assert_eq!(torn, None);
    }

    #[test]
    fn requests_carry_what_the_kernel_needs() {
        let mac = [0xbe, 0x55, 0xaa, 0xbf, 0x94, 0x77];
        let f = Fdb {
            mac,
            dst: "10.77.0.2".parse().unwrap(),
        };
        let msg = fdb_msg(5, &f);
        assert_eq!(
            (msg.header.family, msg.header.state, msg.header.flags),
            (
                AddressFamily::Bridge,
                NeighbourState::Permanent,
                NeighbourFlags::Own
            )
        );
        assert_eq!(to_fdb(&msg, 5), Some(f), "bridge NDA_DST parses back");
        let n = Neigh {
            ip: "10.244.27.0".parse().unwrap(),
            mac,
        };
        assert_eq!(to_neigh(&neigh_msg(5, n.ip, Some(&mac)), 5, true), Some(n));
        let del = neigh_msg(5, n.ip, None);
        assert_eq!(del.attributes.len(), 1, "a delete names only the IP");

        let r = OwnedRoute {
            dst: "10.244.27.0/24".parse().unwrap(),
            gw: "10.244.27.0".parse().unwrap(),
            oif: Some(5),
            onlink: true,
            protocol: 200,
            nh: None,
        };
        assert_eq!(to_owned_route(&route_msg(&r).unwrap(), true, 200), Some(r));
        assert_eq!(to_owned_route(&route_msg(&r).unwrap(), true, 201), None);
        let mixed = OwnedRoute {
            gw: "fd00::1".parse().unwrap(),
            ..r
        };
        assert!(route_msg(&mixed).is_err());
        assert_eq!(
            NetOp::ReplaceRoute(r).to_string(),
            "replacing route 10.244.27.0/24 via 10.244.27.0 dev #5 onlink proto 200"
        );
        assert_eq!(
            NetOp::ReplaceFdb(5, f).to_string(),
            "replacing fdb entry be:55:aa:bf:94:77 dst 10.77.0.2 on link #5"
        );
    }

    #[test]
    fn an_existing_device_must_match_to_be_reused() {
        let spec = VxlanSpec {
            name: "flannel.1".into(),
            vni: 1,
            local: "10.77.0.1".parse().unwrap(),
            dev: 2,
            port: 0,
            learning: false,
            gbp: false,
            mtu: 1450,
            mac: [2, 0, 0, 0, 0, 1],
        };
        let have = VxlanInfo {
            index: 7,
            vni: 1,
            local: Some(spec.local),
            dev: Some(2),
            port: VXLAN_DEFAULT_PORT,
            learning: false,
            gbp: false,
            mtu: 1400,
            mac: vec![2, 0, 0, 0, 0, 9],
            up: false,
        };
        assert_eq!(incompatibility(&spec, &have), None, "MTU, MAC, up: fixable");
        let other = VxlanInfo {
            vni: 2,
            ..have.clone()
        };
        assert_eq!(
            incompatibility(&spec, &other).as_deref(),
            Some("vni 2 (want 1)")
        );
        let other = VxlanInfo { port: 4789, ..have };
        assert_eq!(
            incompatibility(&spec, &other).as_deref(),
            Some("dstport 4789 (want 8472)")
        );
    }
}
