//! flannel's network config: `Network`, `SubnetLen`, `SubnetMin/Max`, the IPv6
//! twins and `Backend`, with flanneld's defaults and checks (`CheckNetworkConfig`).

use super::LeaseError;
use super::gojson;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};
use std::net::IpAddr;

/// The cluster network config as flanneld reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// The IPv4 pool, when `EnableIPv4` (default true).
    pub v4: Option<Pool>,
    /// The IPv6 pool, when `EnableIPv6`.
    pub v6: Option<Pool>,
    pub enable_nftables: bool,
    pub backend: BackendConfig,
}

/// `Backend`: its type (lower-cased, as flanneld looks it up) and the raw object,
/// whose other keys are the backend's options (`VNI`, `Port`, `DirectRouting`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub kind: String,
    /// False when the config has no `Backend`: flanneld then runs `udp`, which weft
    /// does not implement, so the agent refuses such a config by name.
    pub explicit: bool,
    pub options: Map<String, Value>,
}

/// One family's address pool: subnets of `subnet_len` carved out of `network`,
/// from `min` to `max` (the first subnet of the network is skipped by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    pub network: IpNet,
    pub subnet_len: u8,
    pub min: IpAddr,
    pub max: IpAddr,
}

/// Field names and limits of one family, so both go through one check.
struct Family {
    network: &'static str,
    subnet_len: &'static str,
    subnet_min: &'static str,
    subnet_max: &'static str,
    bits: u8,
    /// SubnetLen when the network is large enough.
    usual_len: u8,
}

const V4: Family = Family {
    network: "Network",
    subnet_len: "SubnetLen",
    subnet_min: "SubnetMin",
    subnet_max: "SubnetMax",
    bits: 32,
    usual_len: 24,
};

const V6: Family = Family {
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    subnet_min: "IPv6SubnetMin",
    subnet_max: "IPv6SubnetMax",
    bits: 128,
    usual_len: 64,
};

impl NetworkConfig {
    /// Parse and check a config, filling in flanneld's defaults.
    pub fn parse(text: &[u8]) -> Result<NetworkConfig, LeaseError> {
        Self::parse_inner(text, true)
    }

    /// Parse without the pool checks, as flanneld's kube subnet manager does (the
    /// node's PodCIDR is assigned by Kubernetes, not carved from SubnetMin..Max).
    pub fn parse_unchecked(text: &[u8]) -> Result<NetworkConfig, LeaseError> {
        Self::parse_inner(text, false)
    }

    fn parse_inner(text: &[u8], check: bool) -> Result<NetworkConfig, LeaseError> {
        let obj = gojson::object(text, "the network config").map_err(LeaseError::Config)?;
        let flag = |name, default| {
            gojson::boolean(&obj, name)
                .map(|b| b.unwrap_or(default))
                .map_err(LeaseError::Config)
        };
        let (enable_v4, enable_v6) = (flag("EnableIPv4", true)?, flag("EnableIPv6", false)?);
        if !enable_v4 && !enable_v6 {
            return Err(LeaseError::Config(
                "EnableIPv4 and EnableIPv6 are both false: nothing to lease".into(),
            ));
        }
        let v4 = enable_v4.then(|| pool(&obj, &V4, check)).transpose()?;
        let v6 = enable_v6.then(|| pool(&obj, &V6, check)).transpose()?;
        Ok(NetworkConfig {
            v4,
            v6,
            enable_nftables: flag("EnableNFTables", false)?,
            backend: backend(&obj)?,
        })
    }

    /// The IPv4 network, when enabled.
    pub fn network_v4(&self) -> Option<Ipv4Net> {
        match self.v4?.network {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }
    }

    /// The IPv6 network, when enabled.
    pub fn network_v6(&self) -> Option<Ipv6Net> {
        match self.v6?.network {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        }
    }
}

fn backend(obj: &Map<String, Value>) -> Result<BackendConfig, LeaseError> {
    let Some(raw) = gojson::field(obj, "Backend") else {
        return Ok(BackendConfig {
            kind: "udp".into(),
            explicit: false,
            options: Map::new(),
        });
    };
    let Value::Object(options) = raw else {
        return Err(LeaseError::Config(format!(
            "Backend must be a JSON object, got {raw}"
        )));
    };
    let kind = gojson::string(options, "Type")
        .map_err(|e| LeaseError::Config(format!("Backend.{e}")))?
        .unwrap_or("udp")
        .to_ascii_lowercase();
    Ok(BackendConfig {
        kind,
        explicit: true,
        options: options.clone(),
    })
}

fn pool(obj: &Map<String, Value>, fam: &Family, check: bool) -> Result<Pool, LeaseError> {
    let err = LeaseError::Config;
    let network = match gojson::string(obj, fam.network).map_err(err)? {
        Some(s) => parse_net(s, fam).map_err(err)?.trunc(),
        None => {
            return Err(err(format!(
                "please define a correct {} parameter in the flannel config",
                fam.network
            )));
        }
    };
    let explicit_len = gojson::unsigned(obj, fam.subnet_len).map_err(err)?;
    let addr = |name| -> Result<Option<IpAddr>, LeaseError> {
        gojson::string(obj, name)
            .map_err(err)?
            .map(|s| parse_addr(s, fam, name).map_err(err))
            .transpose()
    };
    let (min, max) = (addr(fam.subnet_min)?, addr(fam.subnet_max)?);
    if !check {
        let subnet_len = explicit_len.map_or(network.prefix_len(), |l| l.min(255) as u8);
        let (first, last) = (network.network(), network.broadcast());
        return Ok(Pool {
            network,
            subnet_len,
            min: min.unwrap_or(first),
            max: max.unwrap_or(last),
        });
    }
    let subnet_len = subnet_len(network, explicit_len, fam).map_err(err)?;
    let size = 1u128 << (fam.bits - subnet_len);
    let start = to_u128(network.network());
    let end = to_u128(network.broadcast());
    let bound = |given: Option<IpAddr>, name: &str, default: u128| match given {
        None => Ok(default),
        Some(a) if network.contains(&a) => Ok(to_u128(a)),
        Some(_) => Err(err(format!(
            "{name} is not in the range of the {}",
            fam.network
        ))),
    };
    let min = bound(min, fam.subnet_min, start + size)?;
    let max = bound(max, fam.subnet_max, end - (size - 1))?;
    for (value, name) in [(min, fam.subnet_min), (max, fam.subnet_max)] {
        if value % size != 0 {
            return Err(err(format!(
                "{name} is not on a {} boundary: {}",
                fam.subnet_len,
                from_u128(value, fam)
            )));
        }
    }
    if min > max {
        return Err(err(format!(
            "{} ({}) is above {} ({}): no subnet to lease",
            fam.subnet_min,
            from_u128(min, fam),
            fam.subnet_max,
            from_u128(max, fam)
        )));
    }
    Ok(Pool {
        network,
        subnet_len,
        min: from_u128(min, fam),
        max: from_u128(max, fam),
    })
}

/// flanneld's rule: a /24 (v6: /64) per node when the network allows it, else a
/// quarter of the network; an explicit length must leave room for four subnets.
fn subnet_len(network: IpNet, explicit: Option<u64>, fam: &Family) -> Result<u8, String> {
    let prefix = network.prefix_len();
    match explicit.filter(|&l| l > 0) {
        Some(len) if len > u64::from(fam.bits - 2) => Err(format!(
            "{} must be less than /{}",
            fam.subnet_len,
            fam.bits - 1
        )),
        Some(len) if len < u64::from(prefix) + 2 => Err(format!(
            "{} must be able to accommodate at least four subnets",
            fam.network
        )),
        Some(len) => Ok(len as u8),
        None if prefix > fam.bits - 4 => Err(format!(
            "{} is too small. Minimum useful network prefix is /{}",
            fam.network,
            fam.bits - 4
        )),
        None if prefix + 2 <= fam.usual_len => Ok(fam.usual_len),
        None => Ok(prefix + 2),
    }
}

fn parse_net(s: &str, fam: &Family) -> Result<IpNet, String> {
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("{}: {s:?} is not a CIDR", fam.network))?;
    if net.max_prefix_len() != fam.bits {
        return Err(format!(
            "{}: {s} is not an IPv{} CIDR",
            fam.network,
            ip_version(fam)
        ));
    }
    Ok(net)
}

fn parse_addr(s: &str, fam: &Family, name: &str) -> Result<IpAddr, String> {
    match s.parse::<IpAddr>() {
        Ok(a) if (a.is_ipv4() && fam.bits == 32) || (a.is_ipv6() && fam.bits == 128) => Ok(a),
        _ => Err(format!(
            "{name}: {s:?} is not an IPv{} address",
            ip_version(fam)
        )),
    }
}

fn ip_version(fam: &Family) -> u8 {
    if fam.bits == 32 { 4 } else { 6 }
}

pub(super) fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, fam: &Family) -> IpAddr {
    from_bits(v, fam.bits)
}

/// An address of the family with `bits` bits.
pub(super) fn from_bits(v: u128, bits: u8) -> IpAddr {
    if bits == 32 {
        IpAddr::V4((v as u32).into())
    } else {
        IpAddr::V6(v.into())
    }
}

impl Pool {
    /// Whether `subnet` is one this pool hands out: the right length, within
    /// SubnetMin..=SubnetMax (flanneld's `isSubnetConfigCompat`).
    pub fn holds(&self, subnet: IpNet) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.max_prefix_len() == self.network.max_prefix_len()
            && (to_u128(self.min)..=to_u128(self.max)).contains(&to_u128(subnet.network()))
    }

    /// The size of one subnet, in addresses.
    pub(super) fn step(&self) -> u128 {
        1u128 << (self.network.max_prefix_len() - self.subnet_len)
    }

    /// The subnet starting at address `start`.
    pub(super) fn subnet_at(&self, start: u128) -> IpNet {
        let bits = self.network.max_prefix_len();
        IpNet::new(from_bits(start, bits), self.subnet_len).expect("length checked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, LeaseError> {
        NetworkConfig::parse(s.as_bytes())
    }

    fn msg(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn defaults_follow_flanneld() {
        let c = parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let p = c.v4.unwrap();
        assert_eq!(p.subnet_len, 24);
        assert_eq!(p.min.to_string(), "10.244.1.0");
        assert_eq!(p.max.to_string(), "10.244.255.0");
        assert_eq!(c.v6, None);
        assert_eq!(c.backend.kind, "vxlan");
        assert!(c.backend.explicit);
        // Smaller than /22: a quarter each.
        let p = parse(r#"{"Network":"10.1.2.0/26"}"#).unwrap().v4.unwrap();
        assert_eq!((p.subnet_len, p.min.to_string()), (28, "10.1.2.16".into()));
        // Host bits are dropped, like Go's ParseCIDR.
        let p = parse(r#"{"Network":"10.244.3.7/16"}"#).unwrap().v4.unwrap();
        assert_eq!(p.network.to_string(), "10.244.0.0/16");
    }

    #[test]
    fn keys_are_case_insensitive_and_a_missing_backend_is_udp() {
        let c =
            parse(r#"{"network":"10.0.0.0/8","subnetlen":20,"backend":{"type":"VXLAN","vni":4}}"#)
                .unwrap();
        assert_eq!(c.v4.unwrap().subnet_len, 20);
        assert_eq!(c.backend.kind, "vxlan");
        assert_eq!(c.backend.options["vni"], 4);
        let c = parse(r#"{"Network":"10.0.0.0/8"}"#).unwrap();
        assert_eq!(
            (c.backend.kind.as_str(), c.backend.explicit),
            ("udp", false)
        );
    }

    #[test]
    fn ipv6_and_dual_stack() {
        let c = parse(
            r#"{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd44::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let p = c.v6.unwrap();
        assert_eq!(p.subnet_len, 64);
        assert_eq!(p.min.to_string(), "fd44:0:0:1::");
        assert_eq!(p.max.to_string(), "fd44:0:0:ff::");
        let c =
            parse(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/120"}"#).unwrap();
        assert_eq!((c.v4, c.v6.unwrap().subnet_len), (None, 122));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        assert!(msg("{").contains("not valid JSON"));
        assert!(msg("{}").contains("please define a correct Network parameter"));
        assert!(
            msg(r#"{"Network":"10.0.0.0/29"}"#).contains("Minimum useful network prefix is /28")
        );
        assert!(msg(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#).contains("less than /31"));
        assert!(
            msg(r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#).contains("at least four subnets")
        );
        assert!(
            msg(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#)
                .contains("SubnetMin is not in the range")
        );
        assert!(
            msg(r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.3.5"}"#)
                .contains("SubnetMax is not on a SubnetLen boundary: 10.0.3.5")
        );
        assert!(
            msg(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.3.0"}"#)
                .contains("no subnet to lease")
        );
        assert!(msg(r#"{"Network":"fd00::/64"}"#).contains("not an IPv4 CIDR"));
        assert!(msg(r#"{"Network":"banana"}"#).contains("\"banana\" is not a CIDR"));
        assert!(
            msg(r#"{"Network":"10.0.0.0/8","SubnetLen":"24"}"#)
                .contains("SubnetLen: expected a non-negative integer")
        );
        assert!(msg(r#"{"EnableIPv4":false}"#).contains("nothing to lease"));
        assert!(
            msg(r#"{"EnableIPv6":true,"Network":"10.0.0.0/8"}"#).contains("IPv6Network parameter")
        );
        assert!(
            msg(r#"{"Network":"10.0.0.0/8","Backend":"vxlan"}"#)
                .contains("Backend must be a JSON object")
        );
    }

    #[test]
    fn the_example_net_conf_parses() {
        let c =
            NetworkConfig::parse(include_bytes!("../../../conf-examples/net-conf.json")).unwrap();
        assert_eq!(c.network_v4().unwrap().to_string(), "10.244.0.0/16");
        assert!(c.enable_nftables);
        assert_eq!(c.backend.kind, "vxlan");
    }

    #[test]
    fn pool_holds_only_its_own_subnets() {
        let p = parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap().v4.unwrap();
        assert!(p.holds("10.244.7.0/24".parse().unwrap()));
        assert!(!p.holds("10.244.0.0/24".parse().unwrap()));
        assert!(!p.holds("10.244.7.0/25".parse().unwrap()));
        assert!(!p.holds("10.245.7.0/24".parse().unwrap()));
    }
}
