//! The node side of the overlay plugins (`vxlan-overlay`, `host-gw`): weftd's node
//! when the conf names no lease source, else brought up by the plugin itself
//! (see [`weft_core::standalone`]).

use crate::{NodeState, NodeSubnets};
use std::net::IpAddr;
use std::path::Path;
use weft_core::backend::iface::all_links;
use weft_core::error::{CniError, Result, code};
use weft_core::netlink::Netlink;
use weft_core::skel::Request;
use weft_core::standalone::{self, SourceConf};

/// An overlay plugin's node: its backend (`vxlan`, `host-gw`) and state dir.
pub struct OverlayNode {
    pub backend: &'static str,
    pub data_dir: &'static str,
}

impl NodeState for OverlayNode {
    fn default_data_dir(&self) -> &'static str {
        self.data_dir
    }

    fn ensure_up(&self, req: &Request, subnet_file: &Path) -> Result<()> {
        let conf: SourceConf = req.parse_conf()?;
        standalone::ensure_up(&conf, self.backend, subnet_file)
    }

    /// The peer routes a standalone node's last sync programmed; for vxlan also
    /// the VTEP: it holds the node subnet's `.0/32` (`::/128`), is up and has the
    /// MTU subnet.env gives pods.
    fn check(&self, _req: &Request, node: &NodeSubnets, subnet_file: &Path) -> Result<()> {
        standalone::check_routes(subnet_file)?;
        if self.backend != "vxlan" {
            return Ok(());
        }
        let nl = Netlink::host()?;
        let links = all_links(&nl)?;
        for subnet in node.subnets() {
            let own = subnet.network();
            let vtep = links
                .iter()
                .find(|l| l.addrs.iter().any(|a| a.addr() == own && is_host(a)))
                .ok_or_else(|| {
                    failed(format!("no VTEP holds {own} (the node subnet's address)"))
                })?;
            let info = nl.vxlan(&vtep.name)?.ok_or_else(|| {
                failed(format!(
                    "{} holds {own} but is not a vxlan device",
                    vtep.name
                ))
            })?;
            let link = nl
                .link_by_index(info.index)?
                .ok_or_else(|| failed(format!("{} vanished", vtep.name)))?;
            if !link.up {
                return Err(failed(format!("VTEP {} is down", vtep.name)));
            }
            if own.is_ipv4() && info.mtu != node.mtu {
                return Err(failed(format!(
                    "VTEP {} has MTU {}, subnet.env gives pods {}",
                    vtep.name, info.mtu, node.mtu
                )));
            }
        }
        Ok(())
    }
}

fn is_host(a: &ipnet::IpNet) -> bool {
    a.prefix_len()
        == match a.addr() {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
}

fn failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}
