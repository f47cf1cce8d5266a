//! DEL: remove the pod's interface (its host peer goes with it), release the
//! addresses and the masquerade state. Needs neither the netns nor prevResult, and
//! succeeds when repeated.

use crate::config::{forward_to_ipam, ip_masq};
use std::net::IpAddr;
use weft_core::error::Result;
use weft_core::masq;
use weft_core::netlink::Netlink;
use weft_core::netns::NetNs;
use weft_core::skel::{Command, Request};

pub fn del(req: &Request) -> Result<()> {
    let addrs = remove_pod_interface(req)?;
    forward_to_ipam(req, Command::Del)?;
    if ip_masq(req) {
        // Without the interface's addresses (netns or interface gone, as with
        // nerdctl's empty CNI_NETNS), masq finds this attachment's entries itself:
        // the reference leaks its rules here.
        masq::del(
            &req.conf.name,
            &req.env.container_id,
            &req.env.ifname,
            addrs.as_deref(),
        )?;
    }
    Ok(())
}

/// Delete CNI_IFNAME in the pod; the addresses it had, if it was still there.
fn remove_pod_interface(req: &Request) -> Result<Option<Vec<IpAddr>>> {
    // The skel cleared CNI_NETNS if it was unusable; a namespace gone since is fine too.
    let Ok(pod) = NetNs::open(&req.env.netns) else {
        return Ok(None);
    };
    let nl = Netlink::in_netns(&pod)?;
    let Some(link) = nl.link_by_name(&req.env.ifname)? else {
        return Ok(None);
    };
    // Link-local addresses are the kernel's, never masqueraded: leaving them out keeps
    // the masquerade teardown to one nft transaction.
    let addrs: Vec<IpAddr> = nl
        .addresses(link.index)?
        .iter()
        .map(|a| a.addr())
        .filter(|a| !is_link_local(a))
        .collect();
    nl.delete_link(link.index)?;
    Ok(Some(addrs))
}

fn is_link_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    }
}
