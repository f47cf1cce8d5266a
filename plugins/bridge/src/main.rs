//! The `bridge` plugin: a veth per pod, its host end a port of a Linux bridge.

mod add;
mod check;
mod config;
mod del;

use config::{BridgeConf, forward_to_ipam};
use weft_core::Result;
use weft_core::skel::{self, About, Command, Plugin, Request};
use weft_core::spec::CniResult;

struct Bridge;

impl Plugin for Bridge {
    fn add(&self, req: &Request) -> Result<CniResult> {
        add::add(req, &BridgeConf::load(req)?)
    }

    fn del(&self, req: &Request) -> Result<()> {
        del::del(req)
    }

    fn check(&self, req: &Request) -> Result<()> {
        check::check(req, &BridgeConf::load(req)?)
    }

    /// Masquerade and MAC-guard state of attachments the runtime no longer lists,
    /// then IPAM's GC.
    fn gc(&self, req: &Request) -> Result<()> {
        let valid = req.valid_attachments()?;
        let pairs: Vec<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        if config::ip_masq(req) {
            weft_core::masq::gc(&req.conf.name, &pairs)?;
        }
        if config::macspoofchk(req) {
            weft_core::macspoof::gc(&req.conf.name, &pairs)?;
        }
        forward_to_ipam(req, Command::Gc)
    }

    fn status(&self, req: &Request) -> Result<()> {
        forward_to_ipam(req, Command::Status)
    }
}

fn main() {
    weft_core::embed_ident!(concat!("weft bridge ", env!("CARGO_PKG_VERSION")));
    skel::main(
        About {
            name: "bridge",
            version: env!("CARGO_PKG_VERSION"),
        },
        Bridge,
    )
}
