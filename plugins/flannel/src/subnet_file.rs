//! The node's `subnet.env` as flannel's plugin reads it: networks deduplicated,
//! subnets as networks, and the same messages operators already search for.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::path::Path;
use weft_core::error::{CniError, Result, code};
use weft_core::lease::SubnetEnv;

/// What the delegate config is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSubnets {
    /// FLANNEL_NETWORK then FLANNEL_IPV6_NETWORK entries, each once.
    pub networks: Vec<IpNet>,
    /// The node's IPv4 subnet (a network: `10.244.1.1/24` reads as `10.244.1.0/24`).
    pub subnet_v4: Option<Ipv4Net>,
    pub subnet_v6: Option<Ipv6Net>,
    pub mtu: u32,
    /// Whether the agent masquerades pod traffic itself.
    pub ipmasq: bool,
}

impl NodeSubnets {
    /// The node subnets, IPv4 first.
    pub fn subnets(&self) -> Vec<IpNet> {
        let v4 = self.subnet_v4.map(IpNet::V4);
        let v6 = self.subnet_v6.map(IpNet::V6);
        v4.into_iter().chain(v6).collect()
    }
}

/// Read `path`. A missing file is TRY_AGAIN_LATER (the agent has not written it
/// yet); a file without the required keys or with a bad value is a decoding failure.
pub fn load(path: &Path) -> Result<NodeSubnets> {
    let fail = |code: u32, why: String| {
        CniError::new(
            code,
            format!(
                "failed to load flannel 'subnet.env' file: {why}. Check the flannel pod log for this node."
            ),
        )
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        let why = format!("open {}: {}", path.display(), io_text(&e));
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => code::TRY_AGAIN_LATER,
            _ => code::IO_FAILURE,
        };
        fail(code, why)
    })?;
    let env = SubnetEnv::parse(&text).map_err(|why| fail(code::DECODING_FAILURE, why))?;
    let missing = missing(&env);
    if !missing.is_empty() {
        let why = format!("{} is missing {}", path.display(), missing.join(", "));
        return Err(fail(code::DECODING_FAILURE, why));
    }
    let mut networks: Vec<IpNet> = Vec::new();
    let all = env.networks_v4.iter().map(|n| IpNet::V4(n.trunc()));
    for net in all.chain(env.networks_v6.iter().map(|n| IpNet::V6(n.trunc()))) {
        if !networks.contains(&net) {
            networks.push(net);
        }
    }
    Ok(NodeSubnets {
        networks,
        subnet_v4: env.subnet_v4.map(|s| s.trunc()),
        subnet_v6: env.subnet_v6.map(|s| s.trunc()),
        mtu: env.mtu.expect("checked by missing()"),
        ipmasq: env.ipmasq.expect("checked by missing()"),
    })
}

/// The required keys `env` lacks, in flannel's order: a network and a subnet of
/// either family, the MTU and IPMASQ.
fn missing(env: &SubnetEnv) -> Vec<&'static str> {
    let mut m = Vec::new();
    if env.networks_v4.is_empty() && env.networks_v6.is_empty() {
        m.extend(["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]);
    }
    if env.subnet_v4.is_none() && env.subnet_v6.is_none() {
        m.extend(["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]);
    }
    if env.mtu.is_none() {
        m.push("FLANNEL_MTU");
    }
    if env.ipmasq.is_none() {
        m.push("FLANNEL_IPMASQ");
    }
    m
}

/// Go's wording for the common errors ("no such file or directory"), which is what
/// flannel users search for; Rust's adds "(os error 2)".
fn io_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.split_once(" (os error") {
        Some((head, _)) => head.to_lowercase(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<NodeSubnets> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("weft-flannel-env-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("subnet.env");
        std::fs::write(&path, text).unwrap();
        let r = load(&path).map_err(|mut e| {
            e.msg = e.msg.replace(&path.display().to_string(), "F");
            e
        });
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn reads_networks_deduplicated_and_subnets_as_networks() {
        let s = load_text(
            "FLANNEL_NETWORK=10.78.0.0/16,10.79.0.0/16,10.78.0.0/16\nFLANNEL_SUBNET=10.78.5.1/24\n\
             FLANNEL_IPV6_NETWORK=fd78::/56\nFLANNEL_IPV6_SUBNET=fd78:0:0:5::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\nJUNK\nOTHER=1\n",
        )
        .unwrap();
        let nets: Vec<String> = s.networks.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.78.0.0/16", "10.79.0.0/16", "fd78::/56"]);
        let subnets: Vec<String> = s.subnets().iter().map(|n| n.to_string()).collect();
        assert_eq!(subnets, ["10.78.5.0/24", "fd78:0:0:5::/64"]);
        assert_eq!((s.mtu, s.ipmasq), (1450, true));
    }

    #[test]
    fn names_every_missing_key_in_flannels_order() {
        let e =
            load_text("FLANNEL_NETWORK=10.78.0.0/16\nFLANNEL_SUBNET=10.78.5.1/24\n").unwrap_err();
        assert_eq!(e.code, code::DECODING_FAILURE);
        assert_eq!(
            e.msg,
            "failed to load flannel 'subnet.env' file: F is missing FLANNEL_MTU, FLANNEL_IPMASQ. \
             Check the flannel pod log for this node."
        );
        let e = load_text("FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n").unwrap_err();
        assert!(
            e.msg.contains(
                "is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET."
            ),
            "{}",
            e.msg
        );
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let e = load_text("FLANNEL_NETWORK=banana\n").unwrap_err();
        assert_eq!(e.code, code::DECODING_FAILURE);
        assert!(e.msg.contains("FLANNEL_NETWORK=\"banana\""), "{}", e.msg);
    }

    #[test]
    fn a_missing_file_is_try_again_later_in_flannels_words() {
        let e = load(Path::new("/nonexistent/weft/subnet.env")).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert_eq!(
            e.msg,
            "failed to load flannel 'subnet.env' file: open /nonexistent/weft/subnet.env: \
             no such file or directory. Check the flannel pod log for this node."
        );
    }
}
