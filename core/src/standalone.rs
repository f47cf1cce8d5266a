//! A node brought up by a CNI plugin when no agent runs: the overlay plugins'
//! conf names a lease source (etcd, or a fixed PodCIDR with the network config
//! inline), and the first ADD or STATUS on the node leases a subnet, prepares the
//! backend (VTEP or nothing), programs the peers and writes subnet.env, under a
//! node-wide lock. Later calls find subnet.env and go no further (local state only,
//! no store round trip), except one call per `peerResync` period, which syncs
//! again: the same steps, idempotent (the VTEP is kept, our own lease is found by
//! our address and kept alive, peers that came or went are converged). Runtimes
//! call STATUS every few seconds, so that is what keeps a standalone node's lease
//! alive and its peers current; a sync that fails is logged and retried a period
//! later, never failing the call that triggered it.

use crate::backend::iface::{self, ExtIface};
use crate::backend::{DataPlane, ExtLink, Kind, ROUTE_PROTOCOL};
use crate::error::{CniError, Result, code};
use crate::lease::etcd::{EtcdOptions, EtcdSource, Secret};
use crate::lease::{
    AcquireRequest, LeaseError, LeaseSource, NetworkConfig, PeerUpdate, StaticSource, SubnetEnv,
};
use crate::netlink::{Netlink, OwnedRoute};
use crate::node_masq::NodeMasq;
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::runtime::Runtime;

/// flanneld's default etcd prefix.
const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// How long the peer listing may take before a sync gives up.
const PEERS_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `peerResync`.
const DEFAULT_RESYNC: Duration = Duration::from_secs(60);

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
    /// Masquerade node-wide as flanneld's `--ip-masq` (default true, as
    /// kube-flannel runs it); false: the bridge masquerades per pod.
    #[serde(default)]
    pub ip_masq: Option<bool>,
    /// Seconds between syncs of an up node (default 60; 0: every call).
    #[serde(default)]
    pub peer_resync: Option<u64>,
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
    pub password: Option<Secret>,
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
fn check_backend(kind: &Kind, wanted: &str) -> Result<()> {
    if kind.name() != wanted {
        return Err(CniError::config(format!(
            "the network config's backend is {}, but this plugin runs {wanted}",
            kind.name()
        )));
    }
    Ok(())
}

/// Bring the node up unless subnet.env exists, or sync it when a `peerResync`
/// period has passed since the last sync; see the module docs. `backend` is the
/// plugin's (`vxlan`, `host-gw`).
pub fn ensure_up(conf: &SourceConf, backend: &str, subnet_file: &Path) -> Result<()> {
    if !conf.is_set() {
        return Ok(());
    }
    let marker = sync_marker(subnet_file);
    if subnet_file.exists() {
        let resync = conf.peer_resync.map_or(DEFAULT_RESYNC, Duration::from_secs);
        let age = std::fs::metadata(&marker)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a < resync) {
            return Ok(());
        }
        // Due: one caller syncs, the others (lock busy) take the fast path.
        let Some(_lock) = lock(subnet_file, false)? else {
            return Ok(());
        };
        if let Err(e) = sync(conf, backend, subnet_file) {
            crate::warn!(
                "syncing the node failed, retried in a resync period: {}",
                e.msg
            );
        }
        return touch(&marker);
    }
    let _lock = lock(subnet_file, true)?;
    if subnet_file.exists() {
        return Ok(()); // another plugin brought it up while we waited
    }
    sync(conf, backend, subnet_file)?;
    touch(&marker)
}

/// When the node last synced: the mtime of a file next to subnet.env.
fn sync_marker(subnet_file: &Path) -> PathBuf {
    sibling(subnet_file, "synced")
}

/// `.<subnet file name>.<suffix>` in subnet.env's directory.
fn sibling(subnet_file: &Path, suffix: &str) -> PathBuf {
    let dir = subnet_file.parent().unwrap_or(Path::new("/"));
    let name = subnet_file
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    dir.join(format!(".{name}.{suffix}"))
}

fn touch(path: &Path) -> Result<()> {
    // Not writable by others: its mtime decides when the next sync is due.
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .map_err(|e| CniError::io(path.display(), e))
}

/// Lease, backend, peers, subnet.env, from the conf's source. The lease calls run
/// on a runtime of their own, one at a time: netlink (sync) keeps its own.
fn sync(conf: &SourceConf, backend: &str, subnet_file: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::io("starting the lease runtime", e))?;
    match (&conf.etcd, &conf.pod_cidr) {
        (Some(_), Some(_)) => Err(CniError::config(
            "\"etcd\" and \"podCIDR\" are two lease sources: give one",
        )),
        (Some(etcd), None) => {
            let source = rt
                .block_on(EtcdSource::connect(&etcd_options(etcd)?))
                .map_err(lease_error)?;
            bring_up(&rt, source, conf, backend, subnet_file)
        }
        (None, _) => bring_up(&rt, static_source(conf)?, conf, backend, subnet_file),
    }
}

/// The node-wide lock: a file next to subnet.env, flock'ed. Without `wait`,
/// `None` when another process holds it.
fn lock(subnet_file: &Path, wait: bool) -> Result<Option<std::fs::File>> {
    let path = sibling(subnet_file, "lock");
    if let Some(dir) = path.parent() {
        // As flanneld's /run/flannel, whatever the runtime's umask.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| CniError::io(dir.display(), e))?;
    }
    // 0600: whoever can open the lock can flock it and stall the node's syncs.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| CniError::io(path.display(), e))?;
    let locked = if wait {
        file.lock().map(|_| true)
    } else {
        match file.try_lock() {
            Ok(()) => Ok(true),
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    };
    match locked {
        Ok(true) => Ok(Some(file)),
        Ok(false) => Ok(None),
        Err(e) => Err(CniError::io(format!("locking {}", path.display()), e)),
    }
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

/// Lease, backend, peers, subnet.env: weftd's start, once. A first bring-up that
/// fails removes the VTEPs it created.
fn bring_up<S: LeaseSource>(
    rt: &Runtime,
    mut source: S,
    conf: &SourceConf,
    backend: &str,
    subnet_file: &Path,
) -> Result<()> {
    let config = rt.block_on(source.network_config()).map_err(lease_error)?;
    if !config.backend.explicit {
        return Err(CniError::config(
            "the network config has no Backend: set \"Backend\": {\"Type\": \"vxlan\"} or \"host-gw\"",
        ));
    }
    let kind = Kind::of(&config).map_err(CniError::config)?;
    check_backend(&kind, backend)?;
    let nl = Netlink::host()?;
    let wanted = conf.iface.as_ref().map(OneOrMany::items);
    let ext = iface::choose(&nl, &wanted.unwrap_or_default())?;
    let (v4, v6) = public_ips(&config, conf, &ext)?;
    let initial = !subnet_file.exists();
    let existed: Vec<u32> = iface::all_links(&nl)?.iter().map(|l| l.index).collect();
    let link = ext_link(&nl, &ext)?;
    let plane = DataPlane::prepare(&nl, kind, link, v4.map(Into::into), v6.map(Into::into))?;
    let node = Up {
        rt,
        nl: &nl,
        plane: &plane,
        config: &config,
        ext: &ext,
        ip_masq: conf.ip_masq.unwrap_or(true),
    };
    let result = node.lease_and_program(&mut source, (v4, v6), subnet_file);
    if result.is_err() && initial {
        for index in plane.vtep_indexes() {
            if !existed.contains(&index) {
                let _ = nl.delete_link(index);
            }
        }
    }
    result
}

/// A node whose backend is prepared.
struct Up<'a> {
    rt: &'a Runtime,
    nl: &'a Netlink,
    plane: &'a DataPlane,
    config: &'a NetworkConfig,
    ext: &'a ExtIface,
    ip_masq: bool,
}

impl Up<'_> {
    fn lease_and_program<S: LeaseSource>(
        &self,
        source: &mut S,
        (v4, v6): (Option<Ipv4Addr>, Option<Ipv6Addr>),
        subnet_file: &Path,
    ) -> Result<()> {
        let previous = SubnetEnv::read(subnet_file)
            .ok()
            .flatten()
            .unwrap_or_default();
        let request = AcquireRequest {
            attrs: self.plane.lease_attrs(v4, v6),
            previous_v4: previous.subnet_v4,
            previous_v6: previous.subnet_v6,
        };
        let lease = self
            .rt
            .block_on(source.acquire(self.config, &request))
            .map_err(lease_error)?;
        // A lease found again (a sync) gets its TTL back.
        let lease = self
            .rt
            .block_on(source.renew(&lease))
            .map_err(lease_error)?;
        self.plane.assign(self.nl, &lease.key, self.config)?;
        // The timer is made inside the runtime: it needs its clock.
        let listing = async { tokio::time::timeout(PEERS_TIMEOUT, source.next_peers()).await };
        let peers = match self.rt.block_on(listing) {
            Ok(Ok(PeerUpdate::Snapshot(all))) => all,
            Ok(Ok(PeerUpdate::Events(_))) => Vec::new(),
            Ok(Err(e)) => return Err(lease_error(e)),
            Err(_) => {
                let msg = "listing the peers timed out";
                return Err(CniError::new(code::TRY_AGAIN_LATER, msg));
            }
        };
        let peers: Vec<_> = peers.into_iter().filter(|p| p.key != lease.key).collect();
        let desired = self.plane.desired(&peers);
        let (_, failed) = self.plane.converge(self.nl, &desired)?;
        if let Some((op, e)) = failed.first() {
            return Err(CniError::internal(format!("programming {op}: {}", e.msg)));
        }
        let routes: Vec<OwnedRoute> = desired.routes.into_values().collect();
        record_routes(subnet_file, &routes)?;
        self.masquerade(&lease.key)?;
        let mtu = self.plane.kind().pod_mtu(self.ext.mtu);
        SubnetEnv::for_lease(self.config, &lease.key, mtu, self.ip_masq)
            .write(subnet_file)
            .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string()))?;
        crate::info!(
            "node synced: {} on {}, {} peers",
            lease.key,
            self.ext.name,
            peers.len()
        );
        Ok(())
    }

    /// flanneld's `--ip-masq` rules (pod traffic leaving the cluster network is
    /// masqueraded, pod-to-pod keeps its addresses) and forward accepts; without
    /// `ipMasq` the bridge masquerades per pod instead.
    fn masquerade(&self, key: &crate::lease::SubnetKey) -> Result<()> {
        if !self.ip_masq {
            return Ok(());
        }
        NodeMasq {
            network_v4: self.config.network_v4(),
            subnet_v4: key.v4,
            network_v6: self.config.network_v6(),
            subnet_v6: key.v6,
            fully_random: true,
            forward_rules: true,
            masquerade: true,
        }
        .apply()
    }
}

/// A peer route as the last sync programmed it, for CHECK.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
struct RouteRecord {
    dst: IpNet,
    gw: std::net::IpAddr,
    oif: Option<u32>,
}

impl From<&OwnedRoute> for RouteRecord {
    fn from(r: &OwnedRoute) -> Self {
        RouteRecord {
            dst: r.dst,
            gw: r.gw,
            oif: r.oif,
        }
    }
}

fn record_routes(subnet_file: &Path, routes: &[OwnedRoute]) -> Result<()> {
    let records: Vec<RouteRecord> = routes.iter().map(RouteRecord::from).collect();
    let text = serde_json::to_vec(&records).map_err(|e| CniError::internal(e.to_string()))?;
    let path = sibling(subnet_file, "routes");
    let modes = crate::atomic_file::Modes {
        dir: 0o755,
        file: 0o644,
    };
    crate::atomic_file::write(&path, &text, modes, false)
        .map_err(|e| CniError::io(format!("writing {}", path.display()), e))
}

/// CHECK of a standalone node: every peer route its last sync programmed is in
/// the kernel. Nothing to check on an agent's node (no record; weftd repairs its
/// own entries every `--peers-resync`).
pub fn check_routes(subnet_file: &Path) -> Result<()> {
    let path = sibling(subnet_file, "routes");
    let Ok(text) = std::fs::read(&path) else {
        return Ok(());
    };
    let want: Vec<RouteRecord> = serde_json::from_slice(&text)
        .map_err(|e| CniError::decode(format!("{}: {e}", path.display())))?;
    let nl = Netlink::host()?;
    let mut have = nl.owned_routes(true, ROUTE_PROTOCOL)?;
    have.extend(nl.owned_routes(false, ROUTE_PROTOCOL)?);
    let have: Vec<RouteRecord> = have.iter().map(RouteRecord::from).collect();
    match want.iter().find(|r| !have.contains(r)) {
        None => Ok(()),
        Some(r) => Err(CniError::new(
            code::CHECK_FAILED,
            format!(
                "the route to peer subnet {} via {} is missing (the next sync restores it)",
                r.dst, r.gw
            ),
        )),
    }
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
