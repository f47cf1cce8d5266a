//! `/run/flannel/subnet.env`: what the node leased, for the CNI plugins and for the
//! next start (a restarted node asks for the same subnet again).

use super::{LeaseError, NetworkConfig, SubnetKey, first_host_v4, first_host_v6};
use ipnet::{Ipv4Net, Ipv6Net};
use std::fmt::Write as _;
use std::path::Path;

/// The file's content. Subnets are written in flanneld's form, the first address
/// with the subnet's length (`10.244.84.1/24`); readers accept comma-separated
/// network lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetEnv {
    pub networks_v4: Vec<Ipv4Net>,
    pub subnet_v4: Option<Ipv4Net>,
    pub networks_v6: Vec<Ipv6Net>,
    pub subnet_v6: Option<Ipv6Net>,
    pub mtu: Option<u32>,
    pub ipmasq: Option<bool>,
}

impl SubnetEnv {
    /// What a node holding `key` in the network of `config` writes, with the
    /// backend's pod MTU and whether the node masquerades itself.
    pub fn for_lease(config: &NetworkConfig, key: &SubnetKey, mtu: u32, ipmasq: bool) -> SubnetEnv {
        SubnetEnv {
            networks_v4: config.network_v4().into_iter().collect(),
            subnet_v4: key.v4.map(first_host_v4),
            networks_v6: config.network_v6().into_iter().collect(),
            subnet_v6: key.v6.map(first_host_v6),
            mtu: Some(mtu),
            ipmasq: Some(ipmasq),
        }
    }

    /// The text flanneld writes, line for line.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let list = |v: &[String]| v.join(",");
        if !self.networks_v4.is_empty() {
            let nets: Vec<String> = self.networks_v4.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(s, "FLANNEL_NETWORK={}", list(&nets));
        }
        if let Some(sn) = self.subnet_v4 {
            let _ = writeln!(s, "FLANNEL_SUBNET={sn}");
        }
        if !self.networks_v6.is_empty() {
            let nets: Vec<String> = self.networks_v6.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(s, "FLANNEL_IPV6_NETWORK={}", list(&nets));
        }
        if let Some(sn) = self.subnet_v6 {
            let _ = writeln!(s, "FLANNEL_IPV6_SUBNET={sn}");
        }
        if let Some(mtu) = self.mtu {
            let _ = writeln!(s, "FLANNEL_MTU={mtu}");
        }
        if let Some(masq) = self.ipmasq {
            let _ = writeln!(s, "FLANNEL_IPMASQ={masq}");
        }
        s
    }

    /// Parse the file's text. Unknown variables are ignored, as the readers of
    /// flanneld's file do; a malformed value of a known one is an error naming it.
    pub fn parse(text: &str) -> Result<SubnetEnv, String> {
        let mut env = SubnetEnv::default();
        for line in text.lines().map(str::trim) {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            let bad = |what: &str| format!("{key}={value:?} in subnet.env is not {what}");
            match key.trim() {
                "FLANNEL_NETWORK" => {
                    env.networks_v4 = list(value).map_err(|_| bad("a list of IPv4 CIDRs"))?
                }
                "FLANNEL_SUBNET" => {
                    env.subnet_v4 = Some(value.parse().map_err(|_| bad("an IPv4 CIDR"))?)
                }
                "FLANNEL_IPV6_NETWORK" => {
                    env.networks_v6 = list(value).map_err(|_| bad("a list of IPv6 CIDRs"))?
                }
                "FLANNEL_IPV6_SUBNET" => {
                    env.subnet_v6 = Some(value.parse().map_err(|_| bad("an IPv6 CIDR"))?)
                }
                "FLANNEL_MTU" => env.mtu = Some(value.parse().map_err(|_| bad("a number"))?),
                "FLANNEL_IPMASQ" => {
                    env.ipmasq = Some(value.parse().map_err(|_| bad("true or false"))?)
                }
                _ => {}
            }
        }
        Ok(env)
    }

    /// Read `path`; `Ok(None)` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<SubnetEnv>, LeaseError> {
        match std::fs::read_to_string(path) {
            Ok(text) => SubnetEnv::parse(&text).map(Some).map_err(LeaseError::Io),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LeaseError::Io(format!("reading {}: {e}", path.display()))),
        }
    }

    /// Write `path` atomically (a temp file in the same directory, fsync, rename):
    /// readers see the old file or the new one, never a torn one. Directory 0755,
    /// file 0644, as flanneld.
    pub fn write(&self, path: &Path) -> Result<(), LeaseError> {
        let modes = crate::atomic_file::Modes {
            dir: 0o755,
            file: 0o644,
        };
        crate::atomic_file::write(path, self.render().as_bytes(), modes, true)
            .map_err(|e| LeaseError::Io(format!("writing {}: {e}", path.display())))
    }
}

fn list<N: std::str::FromStr>(value: &str) -> Result<Vec<N>, N::Err> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flanneld_form_and_reads_it_back() {
        let env = SubnetEnv {
            networks_v4: vec!["10.244.0.0/16".parse().unwrap()],
            subnet_v4: Some("10.244.84.1/24".parse().unwrap()),
            networks_v6: vec!["fd44::/56".parse().unwrap()],
            subnet_v6: Some("fd44:0:0:50::1/64".parse().unwrap()),
            mtu: Some(1450),
            ipmasq: Some(true),
        };
        let text = env.render();
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.84.1/24\n\
             FLANNEL_IPV6_NETWORK=fd44::/56\nFLANNEL_IPV6_SUBNET=fd44:0:0:50::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&text).unwrap(), env);
        let two = SubnetEnv::parse("FLANNEL_NETWORK=10.1.0.0/16,10.2.0.0/16\nOTHER=1\n").unwrap();
        assert_eq!(two.networks_v4.len(), 2);
        assert!(
            SubnetEnv::parse("FLANNEL_MTU=big")
                .unwrap_err()
                .contains("FLANNEL_MTU")
        );
    }

    #[test]
    fn writes_atomically_with_flanneld_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weft-subnet-env-{}", std::process::id()));
        let path = dir.join("flannel/subnet.env");
        let env = SubnetEnv {
            mtu: Some(1500),
            ..Default::default()
        };
        env.write(&path).unwrap();
        env.write(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), Some(env));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&path), mode(path.parent().unwrap())), (0o644, 0o755));
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        assert_eq!(SubnetEnv::read(&dir.join("absent")).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
