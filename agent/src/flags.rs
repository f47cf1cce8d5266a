//! flanneld's command line: the same flags, Go's spellings (`-flag`, `--flag=value`,
//! `--bool=false`) and the same `FLANNELD_*` environment variables.

use clap::Parser;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use weft_core::lease::etcd::Secret;

/// weftd leases this node's pod subnet (etcd v3 in flannel's schema, the node's
/// Kubernetes PodCIDR, or a fixed --pod-cidr), writes subnet.env for the CNI plugins,
/// keeps node-level masquerade rules and serves /healthz, /readyz and /metrics.
/// Flags and FLANNELD_* variables are flanneld's.
#[derive(Debug, Parser)]
#[command(name = "weftd", version)]
pub struct Flags {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    /// etcd prefix of the network config and leases.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// TLS key file for etcd client authentication.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    /// TLS certificate file for etcd client authentication.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// CA file that signed etcd's server certificate.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// etcd password (never logged).
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<Secret>,
    /// External interface, by name or IP address (repeatable; the first that exists wins).
    #[arg(long, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,
    /// Regex matched against interface IPs, then names (repeatable).
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,
    /// Use the interface that routes to this address.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,
    /// IPv4 address other nodes reach this one at (default: the interface's).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 address other nodes reach this one at.
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,
    /// Where to write the leased subnet for the CNI plugins.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires (1–1439).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=1439))]
    pub subnet_lease_renew_margin: u64,
    /// Masquerade traffic leaving the cluster network.
    #[arg(long, env = "FLANNELD_IP_MASQ", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = go_bool)]
    pub ip_masq: bool,
    /// Do not use fully-random source ports for masquerade.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = go_bool)]
    pub ip_masq_fully_random_disable: bool,
    /// Accept forwarded traffic to and from the cluster network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = go_bool)]
    pub iptables_forward_rules: bool,
    /// Seconds between checks that the masquerade and forward rules are intact.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,
    /// weft: seconds between comparisons of the peer routes, neighbours and FDB
    /// entries with the kernel (hand-made damage is repaired then).
    #[arg(long, env = "FLANNELD_PEERS_RESYNC", default_value_t = 10)]
    pub peers_resync: u64,
    /// Take the subnet from the Kubernetes node's PodCIDR.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", default_value = "false", num_args = 0..=1, default_missing_value = "true", value_parser = go_bool)]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL (kube mode).
    #[arg(long, env = "FLANNELD_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
    /// kubeconfig file (kube mode).
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<PathBuf>,
    /// Prefix of the node annotations (kube mode).
    #[arg(
        long,
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,
    /// Clear the node's NetworkUnavailable condition once ready (kube mode).
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", default_value = "true", num_args = 0..=1, default_missing_value = "true", value_parser = go_bool)]
    pub set_node_network_unavailable: bool,
    /// Network config file (kube and --pod-cidr modes).
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,
    /// weft: lease this fixed subnet (one per IP family, comma-separated) with no store at all.
    #[arg(long, env = "FLANNELD_POD_CIDR", value_delimiter = ',')]
    pub pod_cidr: Vec<ipnet::IpNet>,
    /// Address the health and metrics server listens on.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// Port of the health and metrics server (0: off).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,
    /// weft: log format, text or json.
    #[arg(long, env = "FLANNELD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Log verbosity (klog's -v: 0 info, 1+ debug).
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,
}

/// Go's `strconv.ParseBool`.
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true, false, 1, 0, t, f)")),
    }
}

/// Go's flag package takes `-name` as well as `--name`; clap wants `--name`.
pub fn normalise_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest_are_values = false;
    for arg in args {
        let single_dash_long = !rest_are_values
            && arg.starts_with('-')
            && !arg.starts_with("--")
            && arg.len() > 2
            && arg.as_bytes()[1].is_ascii_alphabetic()
            && !arg.starts_with("-v=");
        rest_are_values |= arg == "--";
        out.push(if single_dash_long {
            format!("-{arg}")
        } else {
            arg
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        let argv = std::iter::once("weftd")
            .chain(args.iter().copied())
            .map(String::from);
        Flags::try_parse_from(normalise_args(argv))
    }

    #[test]
    fn defaults_are_flanneld_defaults() {
        let f = parse(&[]).unwrap();
        assert_eq!(
            f.etcd_endpoints,
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert!(!f.ip_masq && f.iptables_forward_rules && !f.kube_subnet_mgr);
        assert_eq!(
            (f.healthz_ip.to_string(), f.healthz_port),
            ("0.0.0.0".into(), 0)
        );
    }

    #[test]
    fn the_password_is_never_in_debug_output() {
        let f = parse(&["--etcd-username=root", "--etcd-password=s3cr3t-pw"]).unwrap();
        assert_eq!(f.etcd_password, Some(Secret("s3cr3t-pw".into())));
        let shown = format!("{f:?}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(shown.contains("etcd_password: Some(<redacted>)"), "{shown}");
    }

    #[test]
    fn go_spellings_are_accepted() {
        let f = parse(&[
            "-ip-masq",
            "--iface=eth0",
            "-iface",
            "10.0.0.1",
            "--kube-subnet-mgr=false",
            "-etcd-endpoints=http://a:2379,http://b:2379",
        ])
        .unwrap();
        assert!(f.ip_masq && !f.kube_subnet_mgr);
        assert_eq!(f.iface, ["eth0", "10.0.0.1"]);
        assert_eq!(f.etcd_endpoints.len(), 2);
        assert!(parse(&["--ip-masq=maybe"]).is_err());
        assert!(parse(&["--subnet-lease-renew-margin=1440"]).is_err());
        assert!(parse(&["--no-such-flag"]).is_err());
    }
}
