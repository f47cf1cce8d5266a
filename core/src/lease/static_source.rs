//! A fixed PodCIDR (`weftd --pod-cidr`): one node, no store, no peers.

use super::{AcquireRequest, Lease, LeaseError, LeaseSource, NetworkConfig, PeerUpdate, SubnetKey};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Leases the given subnets to this node, from a config read from disk.
pub struct StaticSource {
    config: NetworkConfig,
    v4: Option<Ipv4Net>,
    v6: Option<Ipv6Net>,
    /// What [`LeaseSource::acquire`] handed out: the whole lease set.
    leased: Option<Lease>,
    listed: bool,
}

impl StaticSource {
    /// `subnets`: the node's PodCIDRs, at most one per family, each inside the
    /// config's network of that family.
    pub fn new(config: NetworkConfig, subnets: &[IpNet]) -> Result<StaticSource, LeaseError> {
        let (mut v4, mut v6) = (None, None);
        for net in subnets {
            let (slot, network) = match net {
                IpNet::V4(n) => (
                    v4.replace(IpNet::V4(n.trunc())),
                    config.network_v4().map(IpNet::V4),
                ),
                IpNet::V6(n) => (
                    v6.replace(IpNet::V6(n.trunc())),
                    config.network_v6().map(IpNet::V6),
                ),
            };
            if slot.is_some() {
                return Err(LeaseError::Config(format!(
                    "more than one PodCIDR of the family of {net}"
                )));
            }
            match network {
                Some(n) if n.contains(net) => {}
                Some(n) => {
                    return Err(LeaseError::Config(format!(
                        "PodCIDR {net} is not inside the network {n}"
                    )));
                }
                None => {
                    return Err(LeaseError::Config(format!(
                        "PodCIDR {net}: its IP family is not enabled in the network config"
                    )));
                }
            }
        }
        let pick4 = |n: Option<IpNet>| match n {
            Some(IpNet::V4(n)) => Some(n),
            _ => None,
        };
        let pick6 = |n: Option<IpNet>| match n {
            Some(IpNet::V6(n)) => Some(n),
            _ => None,
        };
        let (v4, v6) = (pick4(v4), pick6(v6));
        if config.v4.is_some() && v4.is_none() || config.v6.is_some() && v6.is_none() {
            return Err(LeaseError::Config(
                "a PodCIDR is needed for every enabled IP family".into(),
            ));
        }
        Ok(StaticSource {
            config,
            v4,
            v6,
            leased: None,
            listed: false,
        })
    }

    fn lease(&self, req: &AcquireRequest) -> Lease {
        Lease {
            key: SubnetKey {
                v4: self.v4,
                v6: self.v6,
            },
            attrs: req.attrs.clone(),
            etcd_lease: 0,
            ttl: None,
        }
    }
}

impl LeaseSource for StaticSource {
    async fn network_config(&mut self) -> Result<NetworkConfig, LeaseError> {
        Ok(self.config.clone())
    }

    async fn acquire(
        &mut self,
        _: &NetworkConfig,
        req: &AcquireRequest,
    ) -> Result<Lease, LeaseError> {
        let lease = self.lease(req);
        self.leased = Some(lease.clone());
        Ok(lease)
    }

    async fn renew(&mut self, lease: &Lease) -> Result<Lease, LeaseError> {
        Ok(lease.clone())
    }

    /// Our own lease and no peers, once; then nothing ever changes.
    async fn next_peers(&mut self) -> Result<PeerUpdate, LeaseError> {
        if !std::mem::replace(&mut self.listed, true) {
            return Ok(PeerUpdate::Snapshot(self.leased.iter().cloned().collect()));
        }
        std::future::pending().await
    }
}
