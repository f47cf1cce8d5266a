//! The `vxlan-overlay` plugin: pods on a vxlan overlay between nodes (flannel's vxlan
//! backend).
//!
//! The node's subnet, MTU and cluster routes come from subnet.env, written by weftd,
//! or by this plugin on the node's first ADD or STATUS when the conf names a lease
//! source (`etcd`, or `podCIDR` with `netConf`). Pods are then delegated to
//! bridge + host-local exactly as the flannel plugin does.

use flannel::SubnetMeta;
use flannel::overlay::OverlayNode;

fn main() {
    weft_core::embed_ident!(concat!("weft vxlan-overlay ", env!("CARGO_PKG_VERSION")));
    weft_core::skel::main(
        weft_core::skel::About {
            name: "vxlan-overlay",
            version: env!("CARGO_PKG_VERSION"),
            help: include_str!("help.txt"),
        },
        SubnetMeta(OverlayNode {
            backend: "vxlan",
            data_dir: "/var/lib/cni/vxlan-overlay",
        }),
    )
}
