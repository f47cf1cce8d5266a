//! The `bridge` plugin: a veth per pod, its host end a port of a Linux bridge.
//!
//! A library as well as a binary, so meta-plugins (flannel, the overlay plugins)
//! can run it in-process when the `bridge` on CNI_PATH is this build.

mod add;
mod check;
mod config;
mod del;

use config::{BridgeConf, forward_to_ipam};
use weft_core::Result;
use weft_core::delegate::Linked;
use weft_core::skel::{self, About, Command, Plugin, Request};
use weft_core::spec::CniResult;

pub const ABOUT: About = About {
    name: "bridge",
    version: env!("CARGO_PKG_VERSION"),
    help: include_str!("help.txt"),
};

/// The identity the `bridge` binary carries (see [`weft_core::ident`]).
pub const IDENT: &str = concat!("weft bridge ", env!("CARGO_PKG_VERSION"));

/// bridge as a library meta-plugins can delegate to in-process.
pub const LINKED: Linked = Linked {
    name: "bridge",
    ident: IDENT,
    run: |var, stdin, stdout| skel::run(&ABOUT, &Bridge, var, stdin, stdout),
};

pub struct Bridge;

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
