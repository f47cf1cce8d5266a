//! weft's shared core: the CNI protocol (spec types, skel, delegation), network
//! namespaces, and the small helpers every plugin needs.

pub mod args;
pub mod atomic_file;
pub mod backend;
pub mod background;
pub mod conntrack;
pub mod delegate;
pub mod error;
pub mod fault;
pub mod ident;
pub mod lease;
pub mod log;
pub mod mac;
pub mod macspoof;
pub mod masq;
pub mod netlink;
pub mod netns;
mod nfnetlink;
pub mod nft;
pub mod node_masq;
pub mod skel;
pub mod spec;
#[cfg(feature = "etcd")]
pub mod standalone;
pub mod sysctl;
pub mod version;

pub use error::{CniError, Result};
