//! The `flannel` plugin binary: a drop-in for flannel's CNI plugin.

use flannel::{Flannel, SubnetMeta};

fn main() {
    weft_core::embed_ident!(concat!("weft flannel ", env!("CARGO_PKG_VERSION")));
    weft_core::skel::main(
        weft_core::skel::About {
            name: "flannel",
            version: env!("CARGO_PKG_VERSION"),
            help: include_str!("help.txt"),
        },
        SubnetMeta(Flannel),
    )
}
