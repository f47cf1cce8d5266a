//! Choosing the external interface and public IP the way flanneld does:
//! `--iface` (name or IP), then `--iface-regex` (IPs, then names), then
//! `--iface-can-reach`, else the interface of the default route.

use crate::flags::Flags;
use anyhow::{Context, bail};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_core::netlink::Netlink;

/// The interface peers reach this node through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtIface {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    pub addr_v4: Option<Ipv4Addr>,
    pub addr_v6: Option<Ipv6Addr>,
}

/// Pick the interface per the flags. Runs netlink synchronously: call it before
/// the async runtime starts.
pub fn choose(flags: &Flags) -> anyhow::Result<ExtIface> {
    let nl = Netlink::host().context("opening netlink")?;
    let links = all_links(&nl)?;
    if !flags.iface.is_empty() {
        for want in &flags.iface {
            let found = match want.parse::<IpAddr>() {
                Ok(ip) => links
                    .iter()
                    .find(|l| l.addrs.iter().any(|a| a.addr() == ip)),
                Err(_) => links.iter().find(|l| &l.name == want),
            };
            if let Some(link) = found {
                return link.to_iface(&nl);
            }
        }
        bail!(
            "none of the interfaces given by --iface ({}) exists",
            flags.iface.join(", ")
        );
    }
    if !flags.iface_regex.is_empty() {
        for pattern in &flags.iface_regex {
            let re =
                regex::Regex::new(pattern).with_context(|| format!("--iface-regex {pattern:?}"))?;
            let by_ip = links
                .iter()
                .find(|l| l.addrs.iter().any(|a| re.is_match(&a.addr().to_string())));
            if let Some(link) = by_ip.or_else(|| links.iter().find(|l| re.is_match(&l.name))) {
                return link.to_iface(&nl);
            }
        }
        bail!(
            "no interface address or name matches --iface-regex ({})",
            flags.iface_regex.join(", ")
        );
    }
    let oif = match flags.iface_can_reach {
        Some(dst) => nl
            .route_oif(dst)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_context(|| format!("--iface-can-reach {dst}: no route to it"))?,
        None => default_route_oif(&nl)?,
    };
    let link = links
        .iter()
        .find(|l| l.index == oif)
        .with_context(|| format!("the route's interface (index {oif}) vanished"))?;
    link.to_iface(&nl)
}

struct LinkAddrs {
    index: u32,
    name: String,
    addrs: Vec<IpNet>,
}

impl LinkAddrs {
    fn to_iface(&self, nl: &Netlink) -> anyhow::Result<ExtIface> {
        let link = nl
            .link_by_index(self.index)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_context(|| format!("interface {} vanished", self.name))?;
        let usable = |a: &&IpNet| !a.addr().is_loopback() && !is_link_local(a.addr());
        Ok(ExtIface {
            name: link.name,
            index: link.index,
            mtu: link.mtu,
            addr_v4: self
                .addrs
                .iter()
                .filter(usable)
                .find_map(|a| match a.addr() {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                }),
            addr_v6: self
                .addrs
                .iter()
                .filter(usable)
                .find_map(|a| match a.addr() {
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
fn all_links(nl: &Netlink) -> anyhow::Result<Vec<LinkAddrs>> {
    let names = nix::net::if_::if_nameindex().context("listing interfaces")?;
    let mut out = Vec::new();
    for i in names.iter() {
        let index = i.index();
        let addrs = nl.addresses(index).map_err(|e| anyhow::anyhow!("{e}"))?;
        out.push(LinkAddrs {
            index,
            name: i.name().to_string_lossy().into_owned(),
            addrs,
        });
    }
    Ok(out)
}

fn default_route_oif(nl: &Netlink) -> anyhow::Result<u32> {
    let routes = nl.routes(true).map_err(|e| anyhow::anyhow!("{e}"))?;
    routes
        .iter()
        .find(|r| r.dst.prefix_len() == 0 && r.table == libc::RT_TABLE_MAIN as u32)
        .and_then(|r| r.oif)
        .context("no default route to take the external interface from: pass --iface")
}
