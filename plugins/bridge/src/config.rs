//! The bridge plugin's configuration keys, validated before anything is changed.

use serde::Deserialize;
use serde_json::Value;
use weft_core::delegate::Delegate;
use weft_core::error::{CniError, Result, code};
use weft_core::skel::{Command, Request, validate_ifname};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeConf {
    #[serde(default = "default_bridge")]
    pub bridge: String,
    #[serde(default)]
    pub is_gateway: bool,
    #[serde(default)]
    pub is_default_gateway: bool,
    #[serde(default)]
    pub force_address: bool,
    #[serde(default)]
    pub ip_masq: bool,
    #[serde(default)]
    pub ip_masq_backend: Option<String>,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub hairpin_mode: bool,
    #[serde(default)]
    pub promisc_mode: bool,
    #[serde(default)]
    pub vlan: u32,
    #[serde(default)]
    pub vlan_trunk: Option<Value>,
    #[serde(default)]
    pub macspoofchk: bool,
    /// Spelled this way by the reference (`json:"enabledad"`).
    #[serde(default)]
    pub enabledad: bool,
    #[serde(default)]
    pub disable_container_interface: bool,
    #[serde(default)]
    pub port_isolation: bool,
}

fn default_bridge() -> String {
    "cni0".into()
}

impl BridgeConf {
    /// Parse and check every key; nothing on the host has been touched yet.
    pub fn load(req: &Request) -> Result<BridgeConf> {
        let mut conf: BridgeConf = req.parse_conf()?;
        conf.is_gateway |= conf.is_default_gateway;
        validate_ifname(&conf.bridge)
            .map_err(|e| CniError::config(format!("bridge {:?}: {}", conf.bridge, e.msg)))?;
        if conf.hairpin_mode && conf.promisc_mode {
            return Err(CniError::config(
                "cannot set hairpin mode and promiscuous mode at the same time",
            ));
        }
        if conf.vlan > 4094 {
            return Err(CniError::config(format!(
                "invalid VLAN ID {} (must be between 0 and 4094)",
                conf.vlan
            )));
        }
        if conf.mtu != 0 && !(68..=65535).contains(&conf.mtu) {
            return Err(CniError::config(format!(
                "invalid mtu {} (must be between 68 and 65535)",
                conf.mtu
            )));
        }
        if conf.disable_container_interface && conf.has_ipam(req) {
            return Err(CniError::config(
                "cannot use IPAM when DisableContainerInterface flag is set",
            ));
        }
        conf.refuse_unsupported()?;
        Ok(conf)
    }

    /// Keys weft does not implement yet are refused up front with code 2, never ignored.
    fn refuse_unsupported(&self) -> Result<()> {
        let unsupported = |key: &str, value: String| {
            Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!("{key}={value} is not supported by weft's bridge yet"),
            ))
        };
        if self.vlan != 0 {
            return unsupported("vlan", self.vlan.to_string());
        }
        if let Some(trunk) = &self.vlan_trunk {
            return unsupported("vlanTrunk", trunk.to_string());
        }
        match self.ip_masq_backend.as_deref() {
            None | Some("") | Some("nftables") => {}
            Some(other) => {
                return unsupported(
                    "ipMasqBackend",
                    format!("{other:?} (weft masquerades with nftables)"),
                );
            }
        }
        Ok(())
    }

    /// `ipam` present with a type: L3. Absent or `{}`: L2 only.
    pub fn has_ipam(&self, req: &Request) -> bool {
        ipam_type(req).is_some()
    }
}

/// `ipMasq`, read leniently for DEL and GC, which must not fail on ADD-only keys.
pub fn ip_masq(req: &Request) -> bool {
    flag(req, "ipMasq")
}

/// A boolean config key straight from the raw config (false when absent).
fn flag(req: &Request, key: &str) -> bool {
    req.conf
        .extra
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Run `command` on the IPAM plugin, if the config names one.
pub fn forward_to_ipam(req: &Request, command: Command) -> Result<()> {
    match ipam_type(req) {
        Some(ipam) => find_ipam(req, ipam)?.run(command),
        None => Ok(()),
    }
}

/// The IPAM plugin `ipam` on CNI_PATH; weft's own host-local runs in-process.
pub fn find_ipam<'a>(req: &'a Request, ipam: &str) -> Result<Delegate<'a>> {
    Delegate::find_linked(ipam, &req.env, &req.stdin, &[host_local::LINKED])
}

/// `macspoofchk` as DEL and GC read it (without the rest of the config's checks).
pub fn macspoofchk(req: &Request) -> bool {
    flag(req, "macspoofchk")
}

/// The IPAM plugin to delegate to, if any.
pub fn ipam_type(req: &Request) -> Option<&str> {
    req.conf
        .ipam
        .as_ref()?
        .get("type")?
        .as_str()
        .filter(|t| !t.is_empty())
}

/// The MAC the runtime asked for: `runtimeConfig.mac`, else `args.cni.mac`, else
/// `CNI_ARGS` `MAC=`.
pub fn requested_mac(req: &Request) -> Result<Option<[u8; 6]>> {
    let from_conf = [
        ("runtimeConfig.mac", req.conf.runtime("mac")),
        ("args.cni.mac", req.conf.cni_arg("mac")),
    ];
    for (source, value) in from_conf {
        if let Some(v) = value.and_then(Value::as_str).filter(|s| !s.is_empty()) {
            return weft_core::mac::parse(v)
                .map(Some)
                .ok_or_else(|| CniError::config(format!("invalid MAC {v:?} in {source}")));
        }
    }
    match req.env.args.get("MAC").filter(|s| !s.is_empty()) {
        Some(v) => weft_core::mac::parse(v)
            .map(Some)
            .ok_or_else(|| CniError::env(format!("CNI_ARGS: invalid MAC {v:?}"))),
        None => Ok(None),
    }
}
