//! DEL: take the pod's interface out of service, release the addresses and the
//! masquerade state, and leave the interface's deletion (its host peer goes with it)
//! to a detached process. Needs neither the netns nor prevResult, and succeeds when
//! repeated.

use crate::config::{forward_to_ipam, ip_masq, macspoofchk};
use std::net::IpAddr;
use weft_core::error::Result;
use weft_core::netlink::Netlink;
use weft_core::netns::NetNs;
use weft_core::skel::{Command, Request};
use weft_core::{background, macspoof, masq};

pub fn del(req: &Request) -> Result<()> {
    let retired = retire_pod_interface(req)?;
    let released = release(req, retired.as_ref());
    if let Some(r) = retired {
        // The kernel needs ~20 ms to delete a veth; nothing waits for it (see
        // weft_core::background), even when releasing failed.
        background::run("deleting the pod's interface", move || r.delete());
    }
    released
}

/// The addresses, the MAC guard and the masquerade state of the attachment.
fn release(req: &Request, retired: Option<&Retired>) -> Result<()> {
    forward_to_ipam(req, Command::Del)?;
    let att = masq::Attachment::new(&req.conf.name, &req.env.container_id, &req.env.ifname);
    if macspoofchk(req) {
        let hint = retired.and_then(|r| Some((r.host_veth.as_deref()?, r.mac?)));
        macspoof::del(&att, hint)?;
    }
    let addrs = retired.map(|r| r.addrs.as_slice());
    if ip_masq(req) {
        // Without the interface's addresses (netns or interface gone, as with
        // nerdctl's empty CNI_NETNS), masq finds this attachment's entries itself:
        // the reference leaks its rules here.
        masq::del(
            &req.conf.name,
            &req.env.container_id,
            &req.env.ifname,
            addrs,
        )?;
    }
    Ok(())
}

/// The pod's interface, down and renamed out of the way, awaiting deletion.
struct Retired {
    netns: NetNs,
    index: u32,
    addrs: Vec<IpAddr>,
    mac: Option<[u8; 6]>,
    /// The host end's name, looked up only for macspoofchk.
    host_veth: Option<String>,
}

impl Retired {
    fn delete(self) -> Result<()> {
        Netlink::in_netns(&self.netns)?
            .delete_link(self.index)
            .map(drop)
    }
}

/// Take CNI_IFNAME in the pod out of service (down: both ends of the veth lose
/// carrier; renamed: the name is free for a new ADD at once). `None` if the netns
/// or the interface is gone.
fn retire_pod_interface(req: &Request) -> Result<Option<Retired>> {
    // The skel cleared CNI_NETNS if it was unusable; a namespace gone since is fine too.
    let Ok(netns) = NetNs::open(&req.env.netns) else {
        return Ok(None);
    };
    let nl = Netlink::in_netns(&netns)?;
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
    let host_veth = match link.peer.filter(|_| macspoofchk(req)) {
        Some(peer) => Netlink::host()?.link_by_index(peer)?.map(|l| l.name),
        None => None,
    };
    // Unique in the pod's netns, like the index it is made of.
    nl.retire_link(link.index, &format!("wdel{:08x}", link.index))?;
    Ok(Some(Retired {
        netns,
        index: link.index,
        addrs,
        mac: link.ether(),
        host_veth,
    }))
}

fn is_link_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    }
}
