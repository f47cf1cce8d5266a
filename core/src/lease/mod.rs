//! Node subnet leases in flannel's formats, and the sources a node leases from.
//!
//! - [`NetworkConfig`]: flannel's network config (`<prefix>/config` or net-conf.json),
//!   parsed like Go does (case-insensitive keys) with flanneld's defaults and checks.
//! - [`Lease`], [`SubnetKey`], [`LeaseAttrs`]: a lease key and value, byte-compatible
//!   with flanneld ≥ v0.18.
//! - [`SubnetEnv`]: `/run/flannel/subnet.env`, written and read as flanneld does.
//! - [`LeaseSource`]: the one interface the agent drives; [`StaticSource`] (a fixed
//!   PodCIDR) here, `etcd::EtcdSource` behind the `etcd` feature.

mod alloc;
mod config;
#[cfg(feature = "etcd")]
pub mod etcd;
pub(crate) mod gojson;
#[cfg(feature = "kube")]
pub mod kube;
mod record;
mod static_source;
mod subnet_env;

pub use alloc::{CANDIDATES, SubnetPicker, free_subnets};
pub use config::{BackendConfig, NetworkConfig, Pool};
pub use record::{BackendData, Lease, LeaseAttrs, SubnetKey};
pub use static_source::StaticSource;
pub use subnet_env::SubnetEnv;

use ipnet::{Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why leasing failed. The agent retries `Store` errors with backoff; the others
/// need an operator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("invalid network config: {0}")]
    Config(String),
    #[error("flannel config not found at {0} (did you create it with the etcd v3 API?)")]
    ConfigMissing(String),
    #[error("out of subnets: every subnet between SubnetMin and SubnetMax is leased")]
    OutOfSubnets,
    #[error("lost the race for a free subnet {0} times in a row")]
    Contended(u32),
    #[error("{0}")]
    Store(String),
    /// How to reach or authenticate to the store is wrong (credentials, kubeconfig,
    /// node identity): an operator must fix it, but not in the network config.
    #[error("{0}")]
    Access(String),
    #[error("{0}")]
    Io(String),
}

/// What a node asks for: its public addresses and backend data (the lease value),
/// and the subnets it had before (subnet.env), which it gets back when still free.
#[derive(Debug, Clone, PartialEq)]
pub struct AcquireRequest {
    pub attrs: LeaseAttrs,
    pub previous_v4: Option<Ipv4Net>,
    pub previous_v6: Option<Ipv6Net>,
}

/// A change in the set of leases other nodes hold.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    Added(Box<Lease>),
    /// Deletion events carry no value; consumers keep the attrs they saw on `Added`.
    Removed(SubnetKey),
}

/// What [`LeaseSource::next_peers`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerUpdate {
    /// The complete set of leases (own included): at start, and again whenever the
    /// source had to re-list (compaction, a long disconnect). Replaces what came before,
    /// so peers that vanished meanwhile are noticed.
    Snapshot(Vec<Lease>),
    Events(Vec<PeerEvent>),
}

/// A place a node leases its subnet from. One implementation per store; the agent
/// is written against this trait only.
#[allow(async_fn_in_trait)] // Used with static dispatch only.
pub trait LeaseSource {
    /// The cluster's network config.
    async fn network_config(&mut self) -> Result<NetworkConfig, LeaseError>;
    /// Lease a subnet for this node (its own old one when possible).
    async fn acquire(
        &mut self,
        config: &NetworkConfig,
        req: &AcquireRequest,
    ) -> Result<Lease, LeaseError>;
    /// Extend `lease`; returns it with the new expiry.
    async fn renew(&mut self, lease: &Lease) -> Result<Lease, LeaseError>;
    /// Put our lease back after it was deleted behind our back, same subnet;
    /// Ok(None) when another node holds that subnet now (then lease anew).
    async fn restore(&mut self, lease: &Lease) -> Result<Option<Lease>, LeaseError> {
        Ok(Some(lease.clone()))
    }
    /// Tell the store the node is up (after subnet.env is written). Only the
    /// Kubernetes source has something to say: the node's NetworkUnavailable
    /// condition.
    async fn mark_ready(&mut self) -> Result<(), LeaseError> {
        Ok(())
    }
    /// Wait for the next change of the lease set. Reconnects internally; errors
    /// only for what retrying cannot fix.
    async fn next_peers(&mut self) -> Result<PeerUpdate, LeaseError>;
}

/// `a.b.c.d + 1`: subnet.env and the VTEP use a subnet's first address.
pub fn first_host_v4(net: Ipv4Net) -> Ipv4Net {
    let ip = Ipv4Addr::from(u32::from(net.network()).wrapping_add(1));
    Ipv4Net::new(ip, net.prefix_len()).expect("prefix unchanged")
}

/// The IPv6 counterpart of [`first_host_v4`].
pub fn first_host_v6(net: Ipv6Net) -> Ipv6Net {
    let ip = Ipv6Addr::from(u128::from(net.network()).wrapping_add(1));
    Ipv6Net::new(ip, net.prefix_len()).expect("prefix unchanged")
}
