//! The `host-local` IPAM plugin binary.

fn main() {
    weft_core::embed_ident!(host_local::IDENT);
    weft_core::skel::main(host_local::ABOUT, host_local::HostLocal)
}
