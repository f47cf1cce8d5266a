//! DEL: remove the pod's interface (its host peer goes with it) and release the
//! addresses. Needs neither the netns nor prevResult, and succeeds when repeated.

use crate::config::ipam_type;
use weft_core::delegate::Delegate;
use weft_core::error::Result;
use weft_core::netlink::Netlink;
use weft_core::netns::NetNs;
use weft_core::skel::{Command, Request};

pub fn del(req: &Request) -> Result<()> {
    // The skel cleared CNI_NETNS if it was unusable; a namespace gone since is fine too.
    if let Ok(pod) = NetNs::open(&req.env.netns) {
        let nl = Netlink::in_netns(&pod)?;
        if let Some(link) = nl.link_by_name(&req.env.ifname)? {
            nl.delete_link(link.index)?;
        }
    }
    if let Some(ipam) = ipam_type(req) {
        Delegate::find(ipam, &req.env, &req.stdin)?.run(Command::Del)?;
    }
    Ok(())
}
