//! The `portmap` plugin: hostPort → pod DNAT, chained after an interface plugin.

mod add;
mod check;
mod config;
mod del;
mod layout_lock;
mod rules;
mod state;

use config::PortMapConf;
use weft_core::Result;
use weft_core::skel::{self, About, Plugin, Request};
use weft_core::spec::CniResult;

struct PortMap;

impl Plugin for PortMap {
    /// portmap only programs the host; CNI_NETNS is not entered.
    fn uses_netns(&self) -> bool {
        false
    }

    fn add(&self, req: &Request) -> Result<CniResult> {
        add::add(req, &PortMapConf::load(req)?)
    }

    fn del(&self, req: &Request) -> Result<()> {
        del::del(req, &PortMapConf::load(req)?)
    }

    fn check(&self, req: &Request) -> Result<()> {
        check::check(req, &PortMapConf::load(req)?)
    }

    /// Mappings of attachments the runtime no longer lists.
    fn gc(&self, req: &Request) -> Result<()> {
        del::gc(req, &PortMapConf::load(req)?)
    }

    /// Nothing to wait for: the table is created by the first ADD that needs it.
    fn status(&self, _req: &Request) -> Result<()> {
        Ok(())
    }
}

fn main() {
    weft_core::embed_ident!(concat!("weft portmap ", env!("CARGO_PKG_VERSION")));
    skel::main(
        About {
            name: "portmap",
            version: env!("CARGO_PKG_VERSION"),
            help: include_str!("help.txt"),
        },
        PortMap,
    )
}
