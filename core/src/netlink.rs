//! A small synchronous facade over rtnetlink: the link, address and route operations
//! the plugins need, with errors already in CNI terms.
//!
//! One current-thread tokio runtime per process drives every connection; each call
//! blocks on it, so callers stay plain synchronous code. A handle for a pod's netns
//! talks through a socket opened inside that netns (see [`NetNs::netlink_socket`]),
//! so no thread ever switches namespace to use it.

use crate::error::{CniError, Result};
use crate::netns::NetNs;
use futures_util::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use rtnetlink::packet_core::{ErrorMessage, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::OnceLock;

mod nexthop;
mod overlay;
pub use nexthop::Nexthop;
use nexthop::NexthopSocket;
pub use overlay::{Fdb, Neigh, NetOp, OwnedRoute, VXLAN_DEFAULT_PORT, VxlanInfo, VxlanSpec};

const NETLINK_ROUTE: isize = 0;

/// A link as the plugins see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Empty for links without a hardware address.
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// `bridge`, `veth`, … (`None` for devices without link info, like `lo`).
    pub kind: Option<String>,
    /// The bridge (or other controller) this link is a port of.
    pub controller: Option<u32>,
    /// For a veth: the peer's index (in the peer's netns).
    pub peer: Option<u32>,
    /// Administratively up.
    pub up: bool,
    pub promisc: bool,
    /// For a bridge port: hairpin mode and port isolation.
    pub hairpin: Option<bool>,
    pub isolated: Option<bool>,
}

impl Link {
    /// The Ethernet address, for links that have one.
    pub fn ether(&self) -> Option<[u8; 6]> {
        self.mac.as_slice().try_into().ok()
    }
}

/// A route read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
    pub table: u32,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("a current-thread runtime with I/O always builds")
    })
}

/// The negative errno of a kernel refusal, if that is what the error is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(ErrorMessage { code: Some(c), .. }) => Some(-c.get()),
        _ => None,
    }
}

fn fail(what: impl std::fmt::Display, e: rtnetlink::Error) -> CniError {
    match errno(&e) {
        Some(n) => CniError::internal(format!("{what}: {}", std::io::Error::from_raw_os_error(n))),
        None => CniError::internal(format!("{what}: {e}")),
    }
}

/// A netlink route handle bound to one network namespace.
pub struct Netlink {
    handle: Handle,
    /// For nexthop objects, which rtnetlink cannot express; same namespace.
    nexthops: std::sync::Mutex<NexthopSocket>,
}

impl Netlink {
    /// The namespace this process lives in.
    pub fn host() -> Result<Netlink> {
        runtime().block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|e| CniError::io("netlink socket", e))?;
            tokio::spawn(conn);
            let nexthops = netlink_sys::Socket::new(NETLINK_ROUTE)
                .and_then(NexthopSocket::new)
                .map_err(|e| CniError::io("netlink socket", e))?;
            Ok(Netlink {
                handle,
                nexthops: nexthops.into(),
            })
        })
    }

    /// The namespace `ns`, through a socket opened inside it.
    pub fn in_netns(ns: &NetNs) -> Result<Netlink> {
        // Both sockets from one visit to the namespace (each visit is a thread).
        let (socket, nexthops) = ns
            .run(|| {
                let route = netlink_sys::Socket::new(NETLINK_ROUTE)?;
                Ok::<_, std::io::Error>((route, netlink_sys::Socket::new(NETLINK_ROUTE)?))
            })?
            .map_err(|e| CniError::io("netlink socket", e))?;
        let nexthops =
            NexthopSocket::new(nexthops).map_err(|e| CniError::io("netlink socket", e))?;
        let fd = socket.into_raw_fd();
        runtime().block_on(async {
            // SAFETY: we own `fd`, just released by the socket; TokioSocket takes it over.
            let socket = unsafe { rtnetlink::sys::TokioSocket::from_raw_fd(fd) };
            let (conn, handle, _) = rtnetlink::from_socket(socket);
            tokio::spawn(conn);
            Ok(Netlink {
                handle,
                nexthops: nexthops.into(),
            })
        })
    }

    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        runtime().block_on(f)
    }

    /// The nexthop socket, one request batch at a time.
    fn nexthops(&self) -> std::sync::MutexGuard<'_, NexthopSocket> {
        self.nexthops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The link called `name`, if there is one (a GET by name, not a dump).
    pub fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let req = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        self.one_link(req, name)
    }

    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let req = self.handle.link().get().match_index(index).execute();
        self.one_link(req, &format!("link #{index}"))
    }

    fn one_link(
        &self,
        mut stream: impl futures_util::Stream<Item = std::result::Result<LinkMessage, rtnetlink::Error>>
        + Unpin,
        what: &str,
    ) -> Result<Option<Link>> {
        match self.block(stream.try_next()) {
            Ok(msg) => Ok(msg.map(to_link)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(fail(format!("looking up {what}"), e)),
        }
    }

    /// The bridge `name`, created (up, with `mtu`) if missing, and whether this call
    /// created it. An existing link of another kind is an error, not something to reuse.
    pub fn ensure_bridge(&self, name: &str, mtu: Option<u32>) -> Result<(Link, bool)> {
        let (link, created) = match self.link_by_name(name)? {
            Some(link) => (link, false),
            None => {
                let mut msg = LinkBridge::new(name);
                if let Some(mtu) = mtu {
                    msg = msg.mtu(mtu);
                }
                // EEXIST: a concurrent ADD created it meanwhile, which is fine.
                let created = match self.block(self.handle.link().add(msg.build()).execute()) {
                    Ok(()) => true,
                    Err(e) if errno(&e) == Some(libc::EEXIST) => false,
                    Err(e) => return Err(fail(format!("creating bridge {name:?}"), e)),
                };
                let link = self.link_by_name(name)?.ok_or_else(|| {
                    CniError::internal(format!("bridge {name:?} vanished after creation"))
                })?;
                (link, created)
            }
        };
        if link.kind.as_deref() != Some("bridge") {
            return Err(CniError::config(format!(
                "{name:?} already exists but is not a bridge"
            )));
        }
        if !link.up {
            self.set_up(link.index)?;
        }
        Ok((link, created))
    }

    /// A veth pair: `host_name` here, its peer `peer_name` created directly inside
    /// `peer_ns` (the peer's name is only checked there). `Ok(false)` if a link
    /// called `host_name` exists here already, so the caller can pick another name.
    pub fn create_veth(
        &self,
        host_name: &str,
        peer_name: &str,
        peer_ns: &NetNs,
        mtu: Option<u32>,
        peer_mac: Option<&[u8]>,
    ) -> Result<bool> {
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(peer_name.to_string());
        peer = peer.setns_by_fd(peer_ns.as_raw_fd());
        if let Some(mtu) = mtu {
            peer = peer.mtu(mtu);
        }
        if let Some(mac) = peer_mac {
            peer = peer.address(mac.to_vec());
        }
        let mut msg = LinkVeth::new(host_name, peer_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
        if let Some(mtu) = mtu {
            msg = msg.mtu(mtu);
        }
        match self.block(self.handle.link().add(msg.build()).execute()) {
            Ok(()) => Ok(true),
            Err(e)
                if errno(&e) == Some(libc::EEXIST) && self.link_by_name(host_name)?.is_some() =>
            {
                Ok(false)
            }
            Err(e) => Err(fail(
                format!("creating veth {host_name:?} with peer {peer_name:?}"),
                e,
            )),
        }
    }

    fn set(&self, what: String, msg: LinkMessage) -> Result<()> {
        self.block(self.handle.link().set(msg).execute())
            .map_err(|e| fail(what, e))
    }

    pub fn set_up(&self, index: u32) -> Result<()> {
        self.set(
            format!("setting link #{index} up"),
            LinkUnspec::new_with_index(index).up().build(),
        )
    }

    /// Take `index` out of service without deleting it (a fast operation, unlike the
    /// kernel's ~20 ms unregister): down, which cuts both ends of a veth, then renamed
    /// to `new_name` so its name is free for a new interface at once.
    pub fn retire_link(&self, index: u32, new_name: &str) -> Result<()> {
        self.set(
            format!("setting link #{index} down"),
            LinkUnspec::new_with_index(index).down().build(),
        )?;
        self.set(
            format!("renaming link #{index} to {new_name}"),
            LinkUnspec::new_with_index(index)
                .name(new_name.to_string())
                .build(),
        )
    }

    /// Make `index` a port of `controller` (a bridge).
    pub fn set_controller(&self, index: u32, controller: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(controller)
            .build();
        self.set(format!("attaching link #{index} to #{controller}"), msg)
    }

    pub fn set_mac(&self, index: u32, mac: &[u8]) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .address(mac.to_vec())
            .build();
        self.set(format!("setting the MAC of link #{index}"), msg)
    }

    /// Delete bridge `index` unless some link is its port: undoing a bridge this ADD
    /// created, without pulling it from under a concurrent ADD. Dumps all links
    /// (a rollback path only).
    pub fn delete_link_if_portless(&self, index: u32) -> Result<bool> {
        let links: Vec<LinkMessage> = self
            .block(self.handle.link().get().execute().try_collect())
            .map_err(|e| fail("listing links", e))?;
        if links
            .into_iter()
            .map(to_link)
            .any(|l| l.controller == Some(index))
        {
            return Ok(false);
        }
        self.delete_link(index)
    }

    /// Bridge-port flags of `index` (a port of some bridge): hairpin and isolation.
    pub fn set_bridge_port(&self, index: u32, hairpin: bool, isolated: bool) -> Result<()> {
        let data = InfoPortData::BridgePort(vec![
            InfoBridgePort::HairpinMode(hairpin),
            InfoBridgePort::Isolated(isolated),
        ]);
        let msg = LinkUnspec::new_with_index(index)
            .set_port_kind(InfoPortKind::Bridge)
            .set_port_data(data)
            .build();
        // Port data travels in RTM_NEWLINK (change), which RTM_SETLINK ignores.
        self.block(self.handle.link().change(msg).execute())
            .map_err(|e| fail(format!("setting bridge-port flags of link #{index}"), e))
    }

    pub fn set_promisc(&self, index: u32, on: bool) -> Result<()> {
        self.set(
            format!("setting promiscuous mode of link #{index}"),
            LinkUnspec::new_with_index(index).promiscuous(on).build(),
        )
    }

    /// Delete a link; `Ok(false)` if it was already gone.
    pub fn delete_link(&self, index: u32) -> Result<bool> {
        match self.block(self.handle.link().del(index).execute()) {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(libc::ENODEV | libc::ENOENT)) => Ok(false),
            Err(e) => Err(fail(format!("deleting link #{index}"), e)),
        }
    }

    /// Add (or refresh) `addr` with its prefix on link `index`.
    pub fn add_address(&self, index: u32, addr: IpNet) -> Result<()> {
        let req = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .replace();
        self.block(req.execute())
            .map_err(|e| fail(format!("adding {addr} to link #{index}"), e))
    }

    /// Remove `addr` from link `index`; `Ok(false)` if it was not there.
    pub fn del_address(&self, index: u32, addr: IpNet) -> Result<bool> {
        let found = self
            .address_messages(index)?
            .into_iter()
            .find(|m| to_ipnet(m) == Some(addr));
        let Some(msg) = found else { return Ok(false) };
        match self.block(self.handle.address().del(msg).execute()) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(fail(format!("removing {addr} from link #{index}"), e)),
        }
    }

    /// The addresses on link `index`, with their prefix lengths.
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        Ok(self
            .address_messages(index)?
            .iter()
            .filter_map(to_ipnet)
            .collect())
    }

    fn address_messages(&self, index: u32) -> Result<Vec<AddressMessage>> {
        let req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        self.block(req.try_collect())
            .map_err(|e| fail(format!("listing addresses of link #{index}"), e))
    }

    /// Add or replace a route in the main table; `oif` pins the output interface.
    pub fn add_route(&self, dst: IpNet, gw: Option<IpAddr>, oif: Option<u32>) -> Result<()> {
        let what = || {
            format!(
                "adding route {dst}{}",
                gw.map(|g| format!(" via {g}")).unwrap_or_default()
            )
        };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| CniError::config(format!("{}: {e}", what())))?;
        if let Some(gw) = gw {
            b = b
                .gateway(gw)
                .map_err(|e| CniError::config(format!("{}: {e}", what())))?;
        }
        if let Some(oif) = oif {
            b = b.output_interface(oif);
        }
        self.block(self.handle.route().add(b.build()).replace().execute())
            .map_err(|e| fail(what(), e))
    }

    /// The output interface the kernel would route `dst` through (`ip route get`):
    /// one lookup, not a dump. `None` when `dst` is unreachable or routed without
    /// an interface.
    pub fn route_oif(&self, dst: IpAddr) -> Result<Option<u32>> {
        let mut msg = RouteMessage::default();
        let (family, len, addr) = match dst {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = len;
        msg.attributes.push(RouteAttribute::Destination(addr));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
        req.header.flags = NLM_F_REQUEST;
        let what = || format!("looking up the route to {dst}");
        let mut handle = self.handle.clone();
        let replies = handle.request(req).map_err(|e| fail(what(), e))?;
        let replies: Vec<_> = self.block(replies.collect());
        for reply in replies {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                    return Ok(r.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    }));
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    let errno = -e.code.map_or(0, |c| c.get());
                    if [libc::ENETUNREACH, libc::EHOSTUNREACH].contains(&errno) {
                        return Ok(None);
                    }
                    return Err(CniError::internal(format!(
                        "{}: {}",
                        what(),
                        std::io::Error::from_raw_os_error(errno)
                    )));
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// Every route of one family, all tables.
    pub fn routes(&self, v4: bool) -> Result<Vec<RouteEntry>> {
        let filter = if v4 {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        };
        let msgs: Vec<RouteMessage> = self
            .block(self.handle.route().get(filter).execute().try_collect())
            .map_err(|e| fail("listing routes", e))?;
        Ok(msgs.iter().filter_map(|m| to_route(m, v4)).collect())
    }
}

fn to_link(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        kind: None,
        controller: None,
        peer: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        promisc: msg.header.flags.contains(LinkFlags::Promisc),
        hairpin: None,
        isolated: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(a) => link.mac = a,
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::Controller(c) => link.controller = Some(c),
            LinkAttribute::Link(p) => link.peer = Some(p),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => link.kind = Some(kind_name(&kind)),
                        LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                            read_port(&mut link, &port)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn read_port(link: &mut Link, port: &[InfoBridgePort]) {
    for attr in port {
        match attr {
            InfoBridgePort::HairpinMode(on) => link.hairpin = Some(*on),
            InfoBridgePort::Isolated(on) => link.isolated = Some(*on),
            _ => {}
        }
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        other => other.to_string(),
    }
}

fn to_ipnet(msg: &AddressMessage) -> Option<IpNet> {
    let addr = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })?;
    IpNet::new(addr, msg.header.prefix_len).ok()
}

fn to_route(msg: &RouteMessage, v4: bool) -> Option<RouteEntry> {
    let family_ok = (msg.header.address_family == AddressFamily::Inet) == v4;
    if !family_ok {
        return None;
    }
    let unspecified: IpAddr = if v4 {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let (mut dst, mut gw, mut oif, mut table) =
        (unspecified, None, None, u32::from(msg.header.table));
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = route_addr(a)?,
            RouteAttribute::Gateway(a) => gw = route_addr(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    Some(RouteEntry {
        dst: IpNet::new(dst, msg.header.destination_prefix_length).ok()?,
        gw,
        oif,
        table,
    })
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}
