//! portmap's configuration keys and `runtimeConfig.portMappings`, validated before
//! anything is changed, and the container addresses taken from prevResult.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::IpAddr;
use std::path::PathBuf;
use weft_core::error::{CniError, Result};
use weft_core::skel::Request;
use weft_core::spec::CniResult;

/// Where ADD records what it installed, for a DEL that lacks portMappings.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/weft-portmap";
/// The reference's default: mark 0x2000.
const DEFAULT_MARK_BIT: u32 = 13;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    snat: Option<bool>,
    #[serde(default)]
    masq_all: bool,
    mark_masq_bit: Option<i64>,
    external_set_mark_chain: Option<String>,
    #[serde(rename = "conditionsV4")]
    conditions_v4: Option<Vec<String>>,
    #[serde(rename = "conditionsV6")]
    conditions_v6: Option<Vec<String>>,
    backend: Option<String>,
    data_dir: Option<PathBuf>,
}

/// The plugin's options, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapConf {
    /// Masquerade hairpin (pod subnet → its own hostPort) and localhost traffic.
    pub snat: bool,
    /// Masquerade every source, not only the pod subnet and localhost.
    pub masq_all: bool,
    /// The packet-mark bit that flags traffic for masquerading.
    pub mark_bit: u32,
    /// nft expressions every DNAT of this network also requires, per family.
    pub conditions_v4: Vec<String>,
    pub conditions_v6: Vec<String>,
    pub data_dir: PathBuf,
}

/// `tcp`, `udp` or `sctp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn parse(s: &str) -> Option<Protocol> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One entry of `runtimeConfig.portMappings`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    /// `None` for every local address (no `hostIP`, `0.0.0.0` or `::`).
    pub host_ip: Option<IpAddr>,
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(ip) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(
            f,
            "{}/{} -> {}",
            self.host_port,
            self.protocol.name(),
            self.container_port
        )
    }
}

fn parse_err(msg: impl std::fmt::Display) -> CniError {
    CniError::config(format!("failed to parse config: {msg}"))
}

impl PortMapConf {
    /// Parse and check every key; nothing on the host has been touched yet.
    pub fn load(req: &Request) -> Result<PortMapConf> {
        let raw: RawConf = req.parse_conf()?;
        if raw.mark_masq_bit.is_some() && raw.external_set_mark_chain.is_some() {
            return Err(parse_err(
                "Cannot specify externalSetMarkChain and markMasqBit",
            ));
        }
        let mark_bit = match raw.mark_masq_bit {
            None => DEFAULT_MARK_BIT,
            Some(b @ 0..=31) => b as u32,
            Some(_) => return Err(parse_err("MasqMarkBit must be between 0 and 31")),
        };
        match raw.backend.as_deref() {
            None | Some("nftables") | Some("iptables") => {}
            Some(other) => {
                return Err(parse_err(format!(
                    "unknown backend {other:?}: expected \"nftables\" or \"iptables\""
                )));
            }
        }
        Ok(PortMapConf {
            snat: raw.snat.unwrap_or(true),
            masq_all: raw.masq_all,
            mark_bit,
            conditions_v4: conditions(raw.conditions_v4.unwrap_or_default(), "conditionsV4")?,
            conditions_v6: conditions(raw.conditions_v6.unwrap_or_default(), "conditionsV6")?,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        })
    }
}

/// Conditions as nft text. iptables syntax (a first token starting with `-` or `!`,
/// as the reference tells the two apart) is translated for the address and
/// interface matches; anything else in it is refused, since guessing would change
/// which traffic is forwarded.
fn conditions(tokens: Vec<String>, key: &str) -> Result<Vec<String>> {
    let iptables = tokens
        .first()
        .is_some_and(|t| t.starts_with('-') || t.starts_with('!'));
    let out = if iptables {
        translate_iptables(&tokens, key.ends_with("V6"))
            .map_err(|e| parse_err(format!("{key}: {e}")))?
    } else {
        tokens
    };
    for c in &out {
        // One rule per line in the nft script: no statement separators, comments or
        // line breaks smuggled in.
        if c.contains(['\n', '\r', ';', '#']) {
            return Err(parse_err(format!(
                "{key}: {c:?} may not contain a line break, ';' or '#'"
            )));
        }
    }
    Ok(out)
}

/// `-s/-d/-i/-o` with an optional leading `!`, as nft expressions.
fn translate_iptables(tokens: &[String], v6: bool) -> std::result::Result<Vec<String>, String> {
    let ip = if v6 { "ip6" } else { "ip" };
    let mut out = Vec::new();
    let mut it = tokens.iter().map(String::as_str).peekable();
    while let Some(mut tok) = it.next() {
        let negate = tok == "!";
        if negate {
            tok = it.next().ok_or("\"!\" at the end")?;
        }
        let what = match tok {
            "-s" | "--source" => format!("{ip} saddr"),
            "-d" | "--destination" => format!("{ip} daddr"),
            "-i" | "--in-interface" => "iifname".to_string(),
            "-o" | "--out-interface" => "oifname".to_string(),
            other => {
                return Err(format!(
                    "iptables option {other:?} cannot be translated to nftables; \
                     write the conditions in nft syntax"
                ));
            }
        };
        let arg = it.next().ok_or_else(|| format!("{tok} needs a value"))?;
        let arg = if what.ends_with("ifname") {
            format!("\"{}\"", arg.replace('+', "*"))
        } else {
            arg.parse::<ipnet::IpNet>()
                .map(|n| n.trunc().to_string())
                .or_else(|_| arg.parse::<IpAddr>().map(|a| a.to_string()))
                .map_err(|_| format!("{tok} {arg:?} is not an address"))?
        };
        let op = if negate { "!= " } else { "" };
        out.push(format!("{what} {op}{arg}"));
    }
    Ok(out)
}

/// `runtimeConfig.portMappings`, checked; `[]` when the runtime sent none.
pub fn port_mappings(req: &Request) -> Result<Vec<PortMapping>> {
    let Some(v) = req.conf.runtime("portMappings") else {
        return Ok(Vec::new());
    };
    let list = v
        .as_array()
        .ok_or_else(|| parse_err("runtimeConfig.portMappings must be a list"))?;
    let mut out: Vec<PortMapping> = Vec::new();
    for m in list {
        let m = mapping(m)?;
        match out
            .iter()
            .find(|o| (o.host_ip, o.protocol, o.host_port) == (m.host_ip, m.protocol, m.host_port))
        {
            Some(o) if *o == m => {}
            Some(o) => {
                return Err(parse_err(format!(
                    "host port mapped twice with different targets: {o} and {m}"
                )));
            }
            None => out.push(m),
        }
    }
    Ok(out)
}

fn port(v: Option<&Value>, what: &str) -> Result<u16> {
    let n = v.and_then(Value::as_i64).unwrap_or(0);
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| parse_err(format!("Invalid {what} port number: {n}")))
}

fn mapping(m: &Value) -> Result<PortMapping> {
    let host_port = port(m.get("hostPort"), "host")?;
    let container_port = port(m.get("containerPort"), "container")?;
    let proto = m.get("protocol").and_then(Value::as_str).unwrap_or("");
    let protocol = Protocol::parse(proto).ok_or_else(|| {
        parse_err(format!(
            "Invalid protocol {proto:?}: expected tcp, udp or sctp"
        ))
    })?;
    let host_ip = match m.get("hostIP").and_then(Value::as_str).unwrap_or("") {
        "" => None,
        s => {
            let ip: IpAddr = s
                .parse()
                .map_err(|_| parse_err(format!("Invalid host IP {s:?}")))?;
            Some(ip).filter(|ip| !ip.is_unspecified())
        }
    };
    Ok(PortMapping {
        host_port,
        container_port,
        protocol,
        host_ip,
    })
}

/// The container's first IPv4 and first IPv6 address with their prefix, as the
/// reference picks them: an address whose interface is another one than
/// CNI_IFNAME, or is not in a sandbox, is skipped; one without an interface counts.
pub fn container_ips(prev: &CniResult, ifname: &str) -> Vec<ipnet::IpNet> {
    let mut out: Vec<ipnet::IpNet> = Vec::new();
    for ip in &prev.ips {
        if let Some(i) = ip.interface {
            let Some(iface) = prev.interfaces.get(i) else {
                continue;
            };
            if iface.name != ifname || iface.sandbox.is_empty() {
                continue;
            }
        }
        if !out
            .iter()
            .any(|o| o.addr().is_ipv4() == ip.address.addr().is_ipv4())
        {
            out.push(ip.address);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn iptables_conditions_translate_or_fail() {
        assert_eq!(
            conditions(strs(&["!", "-s", "192.0.2.7/24"]), "conditionsV4").unwrap(),
            ["ip saddr != 192.0.2.0/24"]
        );
        assert_eq!(
            conditions(strs(&["-i", "eth+", "-d", "fd00::1"]), "conditionsV6").unwrap(),
            ["iifname \"eth*\"", "ip6 daddr fd00::1"]
        );
        let e = conditions(strs(&["-m", "mark"]), "conditionsV4").unwrap_err();
        assert!(e.msg.contains("\"-m\" cannot be translated"), "{e}");
        let e = conditions(strs(&["-s"]), "conditionsV4").unwrap_err();
        assert!(e.msg.contains("needs a value"), "{e}");
        let e = conditions(strs(&["ip saddr 1.2.3.4; flush ruleset"]), "conditionsV4").unwrap_err();
        assert!(e.msg.contains("may not contain"), "{e}");
        assert_eq!(
            conditions(strs(&["ip saddr != 192.0.2.0/24"]), "conditionsV4").unwrap(),
            ["ip saddr != 192.0.2.0/24"]
        );
    }

    #[test]
    fn mappings_are_checked() {
        let ok = mapping(&serde_json::json!({"hostPort": 8080, "containerPort": 80, "protocol": "TCP", "hostIP": "0.0.0.0"})).unwrap();
        assert_eq!((ok.protocol, ok.host_ip), (Protocol::Tcp, None));
        for (m, want) in [
            (
                serde_json::json!({"hostPort": 0, "containerPort": 80, "protocol": "tcp"}),
                "Invalid host port number: 0",
            ),
            (
                serde_json::json!({"hostPort": 70000, "containerPort": 80, "protocol": "tcp"}),
                "Invalid host port number: 70000",
            ),
            (
                serde_json::json!({"hostPort": 1, "containerPort": -1, "protocol": "tcp"}),
                "Invalid container port number: -1",
            ),
            (
                serde_json::json!({"hostPort": 1, "containerPort": 1, "protocol": ""}),
                "Invalid protocol \"\"",
            ),
            (
                serde_json::json!({"hostPort": 1, "containerPort": 1, "protocol": "icmp"}),
                "Invalid protocol \"icmp\"",
            ),
            (
                serde_json::json!({"hostPort": 1, "containerPort": 1, "protocol": "udp", "hostIP": "1.2.3"}),
                "Invalid host IP \"1.2.3\"",
            ),
        ] {
            let e = mapping(&m).unwrap_err();
            assert_eq!(e.code, weft_core::error::code::INVALID_NETWORK_CONFIG);
            assert!(e.msg.starts_with("failed to parse config: "), "{e}");
            assert!(e.msg.contains(want), "{e} lacks {want}");
        }
    }
}
