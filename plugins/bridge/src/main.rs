//! The `bridge` plugin binary.

fn main() {
    weft_core::embed_ident!(bridge::IDENT);
    weft_core::skel::main(bridge::ABOUT, bridge::Bridge)
}
