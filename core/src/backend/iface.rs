//! The external interface: the one peers reach this node through, and the address
//! it publishes. Chosen by name or IP, else the interface of the default route, as
//! flanneld does (weftd adds flanneld's regex and can-reach choices on top).

use crate::netlink::Netlink;
use crate::{CniError, Result};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The interface peers reach this node through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtIface {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// Its first usable (not loopback, not link-local) address per family.
    pub addr_v4: Option<Ipv4Addr>,
    pub addr_v6: Option<Ipv6Addr>,
}

/// An interface of this netns with its addresses.
pub struct LinkAddrs {
    pub index: u32,
    pub name: String,
    pub addrs: Vec<IpNet>,
}

impl LinkAddrs {
    /// Whether `want` is this interface's name or one of its addresses.
    pub fn is(&self, want: &str) -> bool {
        match want.parse::<IpAddr>() {
            Ok(ip) => self.addrs.iter().any(|a| a.addr() == ip),
            Err(_) => self.name == want,
        }
    }

    pub fn to_iface(&self, nl: &Netlink) -> Result<ExtIface> {
        let link = nl
            .link_by_index(self.index)?
            .ok_or_else(|| CniError::internal(format!("interface {} vanished", self.name)))?;
        let usable = || {
            let addrs = self.addrs.iter().map(IpNet::addr);
            addrs.filter(|a| !a.is_loopback() && !is_link_local(*a))
        };
        Ok(ExtIface {
            name: link.name,
            index: link.index,
            mtu: link.mtu,
            addr_v4: usable().find_map(|a| match a {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }),
            addr_v6: usable().find_map(|a| match a {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            }),
        })
    }
}

fn is_link_local(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Every interface of this netns with its addresses (if_nameindex asks the kernel
/// of our netns; /sys/class/net may belong to another one).
pub fn all_links(nl: &Netlink) -> Result<Vec<LinkAddrs>> {
    let names = nix::net::if_::if_nameindex()
        .map_err(|e| CniError::io("listing interfaces", std::io::Error::from(e)))?;
    let mut out = Vec::new();
    for i in names.iter() {
        out.push(LinkAddrs {
            index: i.index(),
            name: i.name().to_string_lossy().into_owned(),
            addrs: nl.addresses(i.index())?,
        });
    }
    Ok(out)
}

/// The interface of the main table's default route, if there is one.
pub fn default_route_oif(nl: &Netlink) -> Result<Option<u32>> {
    let routes = nl.routes(true)?;
    Ok(routes
        .iter()
        .find(|r| r.dst.prefix_len() == 0 && r.table == libc::RT_TABLE_MAIN as u32)
        .and_then(|r| r.oif))
}

/// The first of `wants` (names or addresses) that exists; with none given, the
/// interface of the default route. `Err` says what was looked for.
pub fn choose(nl: &Netlink, wants: &[String]) -> Result<ExtIface> {
    let links = all_links(nl)?;
    if !wants.is_empty() {
        let found = wants
            .iter()
            .find_map(|w| links.iter().find(|l| l.is(w)))
            .ok_or_else(|| {
                CniError::config(format!(
                    "none of the interfaces asked for ({}) exists",
                    wants.join(", ")
                ))
            })?;
        return found.to_iface(nl);
    }
    let oif = default_route_oif(nl)?.ok_or_else(|| {
        CniError::config("no default route to take the external interface from: name one")
    })?;
    let link = links.iter().find(|l| l.index == oif).ok_or_else(|| {
        CniError::internal(format!("the route's interface (index {oif}) vanished"))
    })?;
    link.to_iface(nl)
}
