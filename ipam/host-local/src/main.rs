//! The `host-local` IPAM plugin binary.

use weft_core::Result;
use weft_core::skel::{self, About, Plugin, Request};
use weft_core::spec::CniResult;

struct HostLocal;

impl Plugin for HostLocal {
    /// IPAM only touches its data directory; the pod's netns is the main plugin's.
    fn uses_netns(&self) -> bool {
        false
    }
    fn add(&self, req: &Request) -> Result<CniResult> {
        host_local::add(req)
    }
    fn del(&self, req: &Request) -> Result<()> {
        host_local::del(req)
    }
    fn check(&self, req: &Request) -> Result<()> {
        host_local::check(req)
    }
    fn gc(&self, req: &Request) -> Result<()> {
        host_local::gc(req)
    }
    fn status(&self, req: &Request) -> Result<()> {
        host_local::status(req)
    }
}

fn main() {
    skel::main(
        About {
            name: "host-local",
            version: env!("CARGO_PKG_VERSION"),
        },
        HostLocal,
    )
}
