//! A node brought up by a CNI plugin when no agent runs: the overlay plugins'
//! conf names a lease source (etcd, or a fixed PodCIDR with the network config
//! inline), and the first ADD or STATUS on the node leases a subnet, prepares the
//! backend (VTEP or nothing), programs the peers known at that moment and writes
//! subnet.env, under a node-wide lock. Every later call finds subnet.env and goes
//! no further: local state only, no store round trip.
//!
//! What an agent does continuously (renewing the lease, following peers as they
//! come and go) does not happen here: a standalone node's etcd lease is created
//! like weftd's (24 h) and not renewed, and peers that join later are not
//! programmed on it. Run weftd for a cluster that changes; standalone mode is for
//! fixed clusters and bootstrapping.

use crate::backend::iface::{self, ExtIface};
use crate::backend::{DataPlane, ExtLink, Kind};
use crate::error::{CniError, Result, code};
use crate::lease::etcd::{EtcdOptions, EtcdSource};
use crate::lease::{
    AcquireRequest, LeaseError, LeaseSource, NetworkConfig, PeerUpdate, StaticSource, SubnetEnv,
};
use crate::netlink::Netlink;
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// flanneld's default etcd prefix.
const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// How long the first peer listing may take before bring-up gives up.
const PEERS_TIMEOUT: Duration = Duration::from_secs(10);

/// The lease source keys of an overlay plugin's conf.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceConf {
    #[serde(default)]
    pub etcd: Option<EtcdConf>,
    /// The node's subnet(s), one per family: a string or a list.
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<OneOrMany>,
    /// flannel's net-conf.json, inline; required with `podCIDR` (with etcd the
    /// config is read from `<prefix>/config`).
    #[serde(default)]
    pub net_conf: Option<Value>,
    /// The external interface: names or addresses, the first that exists wins;
    /// default: the interface of the default route.
    #[serde(default)]
    pub iface: Option<OneOrMany>,
    #[serde(default, rename = "publicIP")]
    pub public_ip: Option<Ipv4Addr>,
    #[serde(default, rename = "publicIPv6")]
    pub public_ipv6: Option<Ipv6Addr>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EtcdConf {
    pub endpoints: OneOrMany,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

/// A string or a list of strings (comma-separated entries are split too).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<String> {
        let all: Vec<&str> = match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        };
        all.iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl SourceConf {
    /// Whether the conf names a lease source (else the node is an agent's).
    pub fn is_set(&self) -> bool {
        self.etcd.is_some() || self.pod_cidr.is_some()
    }
}

/// The backend a plugin type runs: `vxlan` or `host-gw`.
pub fn check_backend(kind: &Kind, wanted: &str) -> Result<()> {
    if kind.name() != wanted {
        return Err(CniError::config(format!(
            "the network config's backend is {}, but this plugin runs {wanted}",
            kind.name()
        )));
    }
    Ok(())
}

/// Bring the node up unless subnet.env exists; see the module docs. `backend` is
/// the plugin's (`vxlan`, `host-gw`).
pub fn ensure_up(conf: &SourceConf, backend: &str, subnet_file: &Path) -> Result<()> {
    if !conf.is_set() || subnet_file.exists() {
        return Ok(());
    }
    let _lock = lock(subnet_file)?;
    if subnet_file.exists() {
        return Ok(()); // another plugin brought it up while we waited
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::io("starting the lease runtime", e))?;
    rt.block_on(async {
        match (&conf.etcd, &conf.pod_cidr) {
            (Some(_), Some(_)) => Err(CniError::config(
                "\"etcd\" and \"podCIDR\" are two lease sources: give one",
            )),
            (Some(etcd), None) => {
                let source = EtcdSource::connect(&etcd_options(etcd)?)
                    .await
                    .map_err(lease_error)?;
                bring_up(source, conf, backend, subnet_file).await
            }
            (None, _) => bring_up(static_source(conf)?, conf, backend, subnet_file).await,
        }
    })
}

/// The node-wide lock: a file next to subnet.env, flock'ed.
fn lock(subnet_file: &Path) -> Result<std::fs::File> {
    let dir = subnet_file.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| CniError::io(dir.display(), e))?;
    let name = subnet_file
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    let path = dir.join(format!(".{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| CniError::io(path.display(), e))?;
    file.lock()
        .map_err(|e| CniError::io(format!("locking {}", path.display()), e))?;
    Ok(file)
}

fn etcd_options(c: &EtcdConf) -> Result<EtcdOptions> {
    let endpoints = c.endpoints.items();
    if endpoints.is_empty() {
        return Err(CniError::config("etcd.endpoints is empty"));
    }
    Ok(EtcdOptions {
        endpoints,
        prefix: c.prefix.clone().unwrap_or_else(|| DEFAULT_PREFIX.into()),
        ca_file: c.ca_file.clone(),
        cert_file: c.cert_file.clone(),
        key_file: c.key_file.clone(),
        username: c.username.clone(),
        password: c.password.clone(),
    })
}

fn static_source(conf: &SourceConf) -> Result<StaticSource> {
    let net_conf = conf
        .net_conf
        .as_ref()
        .ok_or_else(|| CniError::config("\"podCIDR\" needs the network config in \"netConf\""))?;
    let config =
        NetworkConfig::parse_unchecked(net_conf.to_string().as_bytes()).map_err(lease_error)?;
    let cidrs = conf
        .pod_cidr
        .as_ref()
        .map(OneOrMany::items)
        .unwrap_or_default();
    let subnets = cidrs
        .iter()
        .map(|c| {
            c.parse::<IpNet>()
                .map_err(|_| CniError::config(format!("podCIDR {c:?} is not a CIDR")))
        })
        .collect::<Result<Vec<_>>>()?;
    StaticSource::new(config, &subnets).map_err(lease_error)
}

/// Lease, backend, peers, subnet.env: weftd's start, once.
async fn bring_up<S: LeaseSource>(
    mut source: S,
    conf: &SourceConf,
    backend: &str,
    subnet_file: &Path,
) -> Result<()> {
    let config = source.network_config().await.map_err(lease_error)?;
    if !config.backend.explicit {
        return Err(CniError::config(
            "the network config has no Backend: set \"Backend\": {\"Type\": \"vxlan\"} or \"host-gw\"",
        ));
    }
    let kind = Kind::of(&config).map_err(CniError::config)?;
    check_backend(&kind, backend)?;
    let nl = Netlink::host()?;
    let ext = iface::choose(
        &nl,
        &conf
            .iface
            .as_ref()
            .map(OneOrMany::items)
            .unwrap_or_default(),
    )?;
    let (v4, v6) = public_ips(&config, conf, &ext)?;
    let plane = DataPlane::prepare(
        &nl,
        kind,
        ext_link(&nl, &ext)?,
        v4.map(Into::into),
        v6.map(Into::into),
    )?;
    let request = AcquireRequest {
        attrs: plane.lease_attrs(v4, v6),
        previous_v4: None,
        previous_v6: None,
    };
    let lease = source
        .acquire(&config, &request)
        .await
        .map_err(lease_error)?;
    plane.assign(&nl, &lease.key, &config)?;
    let peers = match tokio::time::timeout(PEERS_TIMEOUT, source.next_peers()).await {
        Ok(Ok(PeerUpdate::Snapshot(all))) => all,
        Ok(Ok(PeerUpdate::Events(_))) => Vec::new(),
        Ok(Err(e)) => return Err(lease_error(e)),
        Err(_) => {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "listing the peers timed out",
            ));
        }
    };
    let peers: Vec<_> = peers.into_iter().filter(|p| p.key != lease.key).collect();
    let (_, failed) = plane.converge(&nl, &peers)?;
    if let Some((op, e)) = failed.first() {
        return Err(CniError::internal(format!("programming {op}: {}", e.msg)));
    }
    let mtu = plane.kind().pod_mtu(ext.mtu);
    SubnetEnv::for_lease(&config, &lease.key, mtu, false)
        .write(subnet_file)
        .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string()))?;
    crate::info!("node up: leased {} on {}", lease.key, ext.name);
    Ok(())
}

fn ext_link(nl: &Netlink, ext: &ExtIface) -> Result<ExtLink> {
    Ok(ExtLink {
        index: ext.index,
        mtu: ext.mtu,
        addrs: nl.addresses(ext.index)?,
    })
}

/// The addresses published for each family the network has.
fn public_ips(
    config: &NetworkConfig,
    conf: &SourceConf,
    ext: &ExtIface,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let v4 = conf.public_ip.or(ext.addr_v4);
    let v6 = conf.public_ipv6.or(ext.addr_v6);
    if config.v4.is_some() && v4.is_none() {
        return Err(CniError::config(format!(
            "{} has no IPv4 address to publish: set \"publicIP\"",
            ext.name
        )));
    }
    if config.v6.is_some() && v6.is_none() {
        return Err(CniError::config(format!(
            "{} has no IPv6 address to publish: set \"publicIPv6\"",
            ext.name
        )));
    }
    Ok((config.v4.and(v4), config.v6.and(v6)))
}

/// A lease failure as the CNI code a runtime acts on.
fn lease_error(e: LeaseError) -> CniError {
    let code = match e {
        LeaseError::Config(_) => code::INVALID_NETWORK_CONFIG,
        LeaseError::OutOfSubnets => code::ADDRESS_EXHAUSTED,
        LeaseError::Io(_) => code::IO_FAILURE,
        LeaseError::ConfigMissing(_)
        | LeaseError::Contended(_)
        | LeaseError::Store(_)
        | LeaseError::Access(_) => code::TRY_AGAIN_LATER,
    };
    CniError::new(code, format!("bringing the node up: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_or_many_splits_and_trims() {
        let v: SourceConf = serde_json::from_str(
            r#"{"podCIDR":"10.1.2.0/24, fd00::/64","iface":["eth0","10.0.0.1"],
                "etcd":{"endpoints":"http://a:2379,http://b:2379"}}"#,
        )
        .unwrap();
        assert_eq!(v.pod_cidr.unwrap().items(), ["10.1.2.0/24", "fd00::/64"]);
        assert_eq!(v.iface.unwrap().items(), ["eth0", "10.0.0.1"]);
        let etcd = etcd_options(&v.etcd.unwrap()).unwrap();
        assert_eq!(etcd.endpoints, ["http://a:2379", "http://b:2379"]);
        assert_eq!(etcd.prefix, DEFAULT_PREFIX);
    }

    #[test]
    fn no_source_means_the_agent_owns_the_node() {
        let c = SourceConf::default();
        assert!(!c.is_set());
        ensure_up(&c, "vxlan", Path::new("/nonexistent/subnet.env")).unwrap();
    }

    #[test]
    fn pod_cidr_needs_net_conf_and_valid_cidrs() {
        let c: SourceConf = serde_json::from_str(r#"{"podCIDR":"10.1.2.0/24"}"#).unwrap();
        let e = static_source(&c).err().unwrap();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
        let c: SourceConf = serde_json::from_str(
            r#"{"podCIDR":"banana","netConf":{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}}"#,
        )
        .unwrap();
        assert_eq!(
            static_source(&c).err().unwrap().msg,
            "podCIDR \"banana\" is not a CIDR"
        );
        let c: SourceConf = serde_json::from_str(
            r#"{"podCIDR":"10.9.2.0/24","netConf":{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}}"#,
        )
        .unwrap();
        let e = static_source(&c).err().unwrap();
        assert!(e.msg.contains("not inside the network"), "{}", e.msg);
    }

    #[test]
    fn lease_errors_map_to_codes_a_runtime_acts_on() {
        assert_eq!(
            lease_error(LeaseError::OutOfSubnets).code,
            code::ADDRESS_EXHAUSTED
        );
        assert_eq!(
            lease_error(LeaseError::Store("down".into())).code,
            code::TRY_AGAIN_LATER
        );
        assert_eq!(
            lease_error(LeaseError::Config("x".into())).code,
            code::INVALID_NETWORK_CONFIG
        );
    }
}
