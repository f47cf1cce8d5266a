//! The `host-gw` plugin: pods routed between nodes through each node's address
//! on a shared L2 network (flannel's host-gw backend).
//!
//! The node's subnet, MTU and cluster routes come from subnet.env, written by weftd,
//! or by this plugin on the node's first ADD or STATUS when the conf names a lease
//! source (`etcd`, or `podCIDR` with `netConf`). Pods are then delegated to
//! bridge + host-local exactly as the flannel plugin does.

use flannel::SubnetMeta;
use flannel::overlay::OverlayNode;

fn main() {
    weft_core::embed_ident!(concat!("weft host-gw ", env!("CARGO_PKG_VERSION")));
    weft_core::skel::main(
        weft_core::skel::About {
            name: "host-gw",
            version: env!("CARGO_PKG_VERSION"),
            help: include_str!("help.txt"),
        },
        SubnetMeta(OverlayNode {
            backend: "host-gw",
            data_dir: "/var/lib/cni/host-gw",
        }),
    )
}
