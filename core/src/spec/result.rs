//! CNI results. One in-memory model (the 1.1.0 one), read from and written to
//! every spec version with libcni's conversion rules.

use crate::error::{CniError, Result};
use crate::version;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::net::IpAddr;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub mac: String,
    /// 1.0.0+ only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub sandbox: String,
    /// 1.0.0+ only.
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub socket_path: String,
    /// 1.0.0+ only.
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        rename = "pciID",
        skip_serializing_if = "String::is_empty"
    )]
    pub pci_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Index into `interfaces`; absent in IPAM results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// Address with the subnet's prefix length, e.g. `10.1.0.5/24`.
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Self {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub nameservers: Vec<String>,
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub domain: String,
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub search: Vec<String>,
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

/// The 0.1.0/0.2.0 per-family block: `{"ip","gateway","routes"}`.
#[derive(Debug, Serialize, Deserialize)]
struct LegacyIp {
    ip: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<IpAddr>,
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    routes: Vec<LegacyRoute>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LegacyRoute {
    dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gw: Option<IpAddr>,
}

/// The 0.3.0–1.1.0 document; `version` on ips exists only before 1.0.0 and is ignored on read.
#[derive(Debug, Deserialize)]
struct ModernDoc {
    #[serde(default, deserialize_with = "crate::spec::null_as_default")]
    interfaces: Vec<Interface>,
    #[serde(default, deserialize_with = "crate::spec::null_as_default")]
    ips: Vec<IpConfig>,
    #[serde(default, deserialize_with = "crate::spec::null_as_default")]
    routes: Vec<Route>,
    #[serde(default, deserialize_with = "crate::spec::null_as_default")]
    dns: Dns,
}

#[derive(Debug, Deserialize)]
struct LegacyDoc {
    #[serde(default)]
    ip4: Option<LegacyIp>,
    #[serde(default)]
    ip6: Option<LegacyIp>,
    #[serde(default, deserialize_with = "crate::spec::null_as_default")]
    dns: Dns,
}

fn is_legacy(v: &str) -> bool {
    !version::at_least(v, "0.3.0")
}

impl CniResult {
    /// Read a result of any supported version. A result without `cniVersion`
    /// is taken to be of `default_version` (libcni injects the config's).
    pub fn from_value(value: &Value, default_version: &str) -> Result<Self> {
        let ver = match value.get("cniVersion") {
            None => default_version,
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(CniError::decode(format!(
                    "cniVersion must be a string, got {other}"
                )));
            }
        };
        version::require_supported(ver)?;
        let bad =
            |e: serde_json::Error| CniError::decode(format!("failed to decode {ver} result: {e}"));
        if is_legacy(ver) {
            let doc = LegacyDoc::deserialize(value).map_err(bad)?;
            Ok(Self::from_legacy(doc))
        } else {
            let doc = ModernDoc::deserialize(value).map_err(bad)?;
            Ok(CniResult {
                interfaces: doc.interfaces,
                ips: doc.ips,
                routes: doc.routes,
                dns: doc.dns,
            })
        }
    }

    fn from_legacy(doc: LegacyDoc) -> Self {
        let mut r = CniResult {
            dns: doc.dns,
            ..Default::default()
        };
        for fam in [doc.ip4, doc.ip6].into_iter().flatten() {
            r.ips.push(IpConfig {
                interface: None,
                address: fam.ip,
                gateway: fam.gateway,
            });
            r.routes
                .extend(fam.routes.into_iter().map(|rt| Route::new(rt.dst, rt.gw)));
        }
        r
    }

    /// Write the result as `cni_version` defines it.
    pub fn to_value(&self, cni_version: &str) -> Result<Value> {
        version::require_supported(cni_version)?;
        let mut doc = Map::new();
        doc.insert("cniVersion".into(), json!(cni_version));
        if is_legacy(cni_version) {
            self.write_legacy(&mut doc)?;
        } else {
            self.write_modern(&mut doc, cni_version);
        }
        Ok(Value::Object(doc))
    }

    /// The JSON text printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> Result<String> {
        Ok(super::to_pretty_json(&self.to_value(cni_version)?))
    }

    fn write_modern(&self, doc: &mut Map<String, Value>, ver: &str) {
        let v1 = version::at_least(ver, "1.0.0");
        if !self.interfaces.is_empty() {
            let ifaces: Vec<Value> = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut i = i.clone();
                    if !v1 {
                        (i.mtu, i.socket_path, i.pci_id) = (None, String::new(), String::new());
                    }
                    to_value(&i)
                })
                .collect();
            doc.insert("interfaces".into(), Value::Array(ifaces));
        }
        if !self.ips.is_empty() {
            let ips = self.ips.iter().map(|ip| ip_value(ip, v1)).collect();
            doc.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            doc.insert("routes".into(), to_value(&self.routes));
        }
        // 0.x always carried a (possibly empty) dns object; 1.x omits an empty one.
        if !v1 || !self.dns.is_empty() {
            doc.insert("dns".into(), to_value(&self.dns));
        }
    }

    fn write_legacy(&self, doc: &mut Map<String, Value>) -> Result<()> {
        let first = |v4: bool| self.ips.iter().find(|ip| ip.address.addr().is_ipv4() == v4);
        let (ip4, ip6) = (first(true), first(false));
        if ip4.is_none() && ip6.is_none() {
            return Err(CniError::decode("cannot convert: no valid IP addresses"));
        }
        for (key, ip, v4) in [("ip4", ip4, true), ("ip6", ip6, false)] {
            let Some(ip) = ip else { continue };
            let routes = self
                .routes
                .iter()
                .filter(|r| r.dst.addr().is_ipv4() == v4)
                .map(|r| LegacyRoute {
                    dst: r.dst,
                    gw: r.gw,
                })
                .collect();
            let block = LegacyIp {
                ip: ip.address,
                gateway: ip.gateway,
                routes,
            };
            doc.insert(key.into(), to_value(&block));
        }
        doc.insert("dns".into(), to_value(&self.dns));
        Ok(())
    }
}

fn ip_value(ip: &IpConfig, v1: bool) -> Value {
    let mut m = Map::new();
    if !v1 {
        let fam = if ip.address.addr().is_ipv4() {
            "4"
        } else {
            "6"
        };
        m.insert("version".into(), json!(fam));
    }
    if let Some(i) = ip.interface {
        m.insert("interface".into(), json!(i));
    }
    m.insert("address".into(), json!(ip.address.to_string()));
    if let Some(gw) = ip.gateway {
        m.insert("gateway".into(), json!(gw.to_string()));
    }
    Value::Object(m)
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("result types always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dual-stack bridge result with every 1.1.0 field set.
    fn full() -> CniResult {
        let r = json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "cni0", "mac": "0a:58:0a:01:00:01", "mtu": 1450},
                {"name": "veth1234abcd", "mac": "0a:58:0a:01:00:02"},
                {"name": "eth0", "mac": "0a:58:0a:01:00:03", "sandbox": "/run/netns/p", "mtu": 1450,
                 "socketPath": "/run/s.sock", "pciID": "0000:00:01.0"}
            ],
            "ips": [
                {"interface": 2, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
                {"interface": 2, "address": "10.2.0.5/24"},
                {"interface": 2, "address": "fd00::5/64", "gateway": "fd00::1"}
            ],
            "routes": [
                {"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1400, "advmss": 1360, "priority": 5, "table": 100, "scope": 0},
                {"dst": "::/0"}
            ],
            "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local", "search": ["svc"], "options": ["ndots:5"]}
        });
        CniResult::from_value(&r, "1.1.0").unwrap()
    }

    #[test]
    fn every_version_snapshot() {
        for v in version::SUPPORTED {
            insta::assert_snapshot!(format!("full_{v}"), full().to_json(v).unwrap());
        }
    }

    #[test]
    fn every_pair_round_trips_what_the_target_can_hold() {
        let src = full();
        for from in version::SUPPORTED {
            let at_from = CniResult::from_value(&src.to_value(from).unwrap(), "1.1.0").unwrap();
            for to in version::SUPPORTED {
                let converted =
                    CniResult::from_value(&at_from.to_value(to).unwrap(), "1.1.0").unwrap();
                // What survives a hop is what the narrower of the two versions can carry.
                let narrow = if version::cmp(from, to).is_lt() {
                    from
                } else {
                    to
                };
                let expect =
                    CniResult::from_value(&src.to_value(narrow).unwrap(), "1.1.0").unwrap();
                assert_eq!(converted, expect, "{from} -> {to}");
                assert_eq!(converted.to_value(to).unwrap()["cniVersion"], *to);
            }
        }
    }

    #[test]
    fn legacy_keeps_first_ip_per_family_and_only_dst_gw() {
        let v = full().to_value("0.2.0").unwrap();
        assert_eq!(v["ip4"]["ip"], "10.1.0.5/24");
        assert_eq!(
            v["ip4"]["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}])
        );
        assert_eq!(v["ip6"]["routes"], json!([{"dst": "::/0"}]));
        assert!(v.get("interfaces").is_none());
    }

    #[test]
    fn legacy_routes_need_an_ip_of_their_family() {
        let mut r = full();
        r.ips.retain(|i| i.address.addr().is_ipv4());
        let v = r.to_value("0.1.0").unwrap();
        assert!(v.get("ip6").is_none());
        assert_eq!(v["ip4"]["routes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn legacy_without_ips_fails() {
        let mut r = full();
        r.ips.clear();
        let e = r.to_value("0.2.0").unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (6, "cannot convert: no valid IP addresses")
        );
        assert!(r.to_value("0.4.0").is_ok());
    }

    #[test]
    fn legacy_input_becomes_ips_and_routes() {
        let v = json!({"cniVersion": "0.2.0",
            "ip4": {"ip": "10.0.0.2/24", "gateway": "10.0.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
            "ip6": {"ip": "fd::2/64", "routes": [{"dst": "::/0", "gw": "fd::1"}]}, "dns": {}});
        let r = CniResult::from_value(&v, "1.0.0").unwrap();
        insta::assert_snapshot!(r.to_json("0.4.0").unwrap());
    }

    #[test]
    fn empty_dns_only_before_1_0() {
        let r = CniResult {
            ips: full().ips,
            ..Default::default()
        };
        assert_eq!(r.to_value("0.4.0").unwrap()["dns"], json!({}));
        assert!(r.to_value("1.0.0").unwrap().get("dns").is_none());
        assert!(r.to_value("1.0.0").unwrap().get("interfaces").is_none());
    }

    #[test]
    fn bad_results_are_code_6_or_1() {
        let cases = [
            (json!({"cniVersion": 1}), 6),
            (json!({"cniVersion": "7.0.0"}), 1),
            (
                json!({"cniVersion": "1.0.0", "ips": [{"address": "banana"}]}),
                6,
            ),
            (json!({"cniVersion": "0.2.0", "ip4": {"ip": 5}}), 6),
            (json!({"cniVersion": "1.0.0", "routes": "no"}), 6),
        ];
        for (v, code) in cases {
            assert_eq!(
                CniResult::from_value(&v, "1.0.0").unwrap_err().code,
                code,
                "{v}"
            );
        }
        assert_eq!(full().to_value("2.0.0").unwrap_err().code, 1);
    }

    #[test]
    fn missing_version_takes_default() {
        let r = CniResult::from_value(&json!({"ip4": {"ip": "10.0.0.2/24"}}), "0.2.0").unwrap();
        assert_eq!(r.ips.len(), 1);
    }
}
