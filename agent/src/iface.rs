//! Choosing the external interface and public IP the way flanneld does:
//! `--iface` (name or IP), then `--iface-regex` (IPs, then names), then
//! `--iface-can-reach`, else the interface of the default route. The name/IP and
//! default-route choices are core's, shared with the overlay plugins.

use crate::flags::Flags;
use anyhow::{Context, bail};
use weft_core::backend::iface::{self, all_links};
use weft_core::netlink::Netlink;

pub use weft_core::backend::iface::ExtIface;

/// Pick the interface per the flags. Runs netlink synchronously: call it before
/// the async runtime starts.
pub fn choose(flags: &Flags) -> anyhow::Result<ExtIface> {
    let nl = Netlink::host().context("opening netlink")?;
    let core_err = |e: weft_core::CniError| anyhow::anyhow!("{}", e.msg);
    if !flags.iface.is_empty() {
        return iface::choose(&nl, &flags.iface).map_err(|e| match e.code {
            weft_core::error::code::INVALID_NETWORK_CONFIG => anyhow::anyhow!(
                "none of the interfaces given by --iface ({}) exists",
                flags.iface.join(", ")
            ),
            _ => core_err(e),
        });
    }
    let links = all_links(&nl).map_err(core_err)?;
    if !flags.iface_regex.is_empty() {
        for pattern in &flags.iface_regex {
            let re =
                regex::Regex::new(pattern).with_context(|| format!("--iface-regex {pattern:?}"))?;
            let by_ip = links
                .iter()
                .find(|l| l.addrs.iter().any(|a| re.is_match(&a.addr().to_string())));
            if let Some(link) = by_ip.or_else(|| links.iter().find(|l| re.is_match(&l.name))) {
                return link.to_iface(&nl).map_err(core_err);
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
            .map_err(core_err)?
            .with_context(|| format!("--iface-can-reach {dst}: no route to it"))?,
        None => iface::default_route_oif(&nl)
            .map_err(core_err)?
            .context("no default route to take the external interface from: pass --iface")?,
    };
    let link = links
        .iter()
        .find(|l| l.index == oif)
        .with_context(|| format!("the route's interface (index {oif}) vanished"))?;
    link.to_iface(&nl).map_err(core_err)
}
