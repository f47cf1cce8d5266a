//! The flannel plugin's own keys, and the delegate config built from them and the
//! node's subnet.env exactly as flannel's plugin builds it.

use crate::subnet_file::NodeSubnets;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use weft_core::error::{CniError, Result};
use weft_core::skel::Request;
use weft_core::spec::null_as_default;

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlannelConf {
    #[serde(default, deserialize_with = "null_as_default")]
    subnet_file: String,
    #[serde(default, deserialize_with = "null_as_default")]
    data_dir: String,
    #[serde(default, deserialize_with = "null_as_default")]
    delegate: Map<String, Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    ipam: Map<String, Value>,
}

impl FlannelConf {
    /// The conf of `req`: subnet.env at its default path and saved configs under
    /// `default_data_dir` unless the conf names others.
    pub fn load(req: &Request, default_data_dir: &'static str) -> Result<FlannelConf> {
        let mut fc: FlannelConf = req.parse_conf()?;
        if fc.subnet_file.is_empty() {
            fc.subnet_file = DEFAULT_SUBNET_FILE.into();
        }
        if fc.data_dir.is_empty() {
            fc.data_dir = default_data_dir.into();
        }
        Ok(fc)
    }

    pub fn subnet_file(&self) -> PathBuf {
        PathBuf::from(&self.subnet_file)
    }

    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(&self.data_dir)
    }

    /// The config the delegate (bridge by default) is run with, keys sorted as Go
    /// writes a map, so the saved file reads the same as flannel's.
    pub fn delegate_conf(&self, req: &Request, node: &NodeSubnets) -> Result<Value> {
        let mut d = self.delegate.clone();
        check_delegate(&d)?;
        if let Some(rc) = &req.conf.runtime_config {
            d.insert("runtimeConfig".into(), Value::Object(rc.clone()));
        }
        d.insert("name".into(), req.conf.name.clone().into());
        d.entry("type").or_insert_with(|| "bridge".into());
        d.entry("ipMasq").or_insert_with(|| (!node.ipmasq).into());
        d.entry("mtu").or_insert_with(|| node.mtu.into());
        if d["type"] == "bridge" {
            d.entry("isGateway").or_insert(Value::Bool(true));
        }
        // flannel copies only an explicit version; without one its delegate runs
        // as 0.1.0, which is also what the missing key means to us.
        d.insert("cniVersion".into(), req.version().into());
        d.insert("ipam".into(), Value::Object(self.delegate_ipam(node)?));
        Ok(go_sorted(Value::Object(d)))
    }

    /// `ipam` with host-local as the default type, one range set per node subnet
    /// (replacing any given), and routes: the given ones, then every cluster network.
    fn delegate_ipam(&self, node: &NodeSubnets) -> Result<Map<String, Value>> {
        let mut ipam = self.ipam.clone();
        ipam.entry("type").or_insert_with(|| "host-local".into());
        let ranges: Vec<Value> = node
            .subnets()
            .iter()
            .map(|s| json!([{ "subnet": s.to_string() }]))
            .collect();
        ipam.insert("ranges".into(), ranges.into());
        let mut routes = given_routes(ipam.get("routes"))?;
        routes.extend(
            node.networks
                .iter()
                .map(|n| json!({ "dst": n.to_string() })),
        );
        ipam.insert("routes".into(), routes.into());
        Ok(ipam)
    }
}

/// flannel's rules for the `delegate` dictionary, with its messages.
fn check_delegate(d: &Map<String, Value>) -> Result<()> {
    if d.get("type").is_some_and(|t| !t.is_string()) {
        return Err(CniError::config(
            "'delegate' dictionary, if present, must have (string) 'type' field",
        ));
    }
    for key in ["name", "ipam"] {
        if d.contains_key(key) {
            return Err(CniError::config(format!(
                "'delegate' dictionary must not have '{key}' field, it'll be set by flannel"
            )));
        }
    }
    Ok(())
}

/// `ipam.routes` as given: each an object with a CIDR `dst` (and optionally a `gw`).
fn given_routes(routes: Option<&Value>) -> Result<Vec<Value>> {
    let bad = |why: String| {
        CniError::config(format!(
            "failed to assemble Delegate IPAM: failed to read IPAM routes: {why}"
        ))
    };
    let list = match routes {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(bad(format!("ipam.routes is not a list: {other}"))),
    };
    for r in list {
        let dst = r.get("dst").and_then(Value::as_str).unwrap_or_default();
        if dst.parse::<ipnet::IpNet>().is_err() {
            return Err(bad(format!("route {r} has no valid CIDR \"dst\"")));
        }
        let gw = r.get("gw").filter(|g| !g.is_null());
        if gw.is_some_and(|g| {
            g.as_str()
                .and_then(|s| s.parse::<std::net::IpAddr>().ok())
                .is_none()
        }) {
            return Err(bad(format!("route {r} has an invalid \"gw\"")));
        }
    }
    Ok(list.clone())
}

/// `v` with every object's keys in byte order, as Go's encoding/json writes a map.
fn go_sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, go_sorted(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(go_sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_core::skel::{Command, Env};
    use weft_core::spec::parse_netconf;

    fn request(conf: &str) -> Request {
        Request {
            env: Env {
                command: Command::Add,
                container_id: "c1".into(),
                netns: String::new(),
                ifname: "eth0".into(),
                args: Default::default(),
                raw_args: String::new(),
                path: Vec::new(),
            },
            conf: parse_netconf(conf.as_bytes()).unwrap(),
            stdin: conf.as_bytes().to_vec(),
        }
    }

    fn node(dual: bool, ipmasq: bool) -> NodeSubnets {
        let mut networks = vec!["10.78.0.0/16".parse().unwrap()];
        if dual {
            networks.push("fd78::/56".parse().unwrap());
        }
        NodeSubnets {
            networks,
            subnet_v4: Some("10.78.5.0/24".parse().unwrap()),
            subnet_v6: dual.then(|| "fd78:0:0:5::/64".parse().unwrap()),
            mtu: 1450,
            ipmasq,
        }
    }

    fn render(conf: &str, node: &NodeSubnets) -> Result<String> {
        let req = request(conf);
        let fc = FlannelConf::load(&req, DEFAULT_DATA_DIR)?;
        Ok(serde_json::to_string(&fc.delegate_conf(&req, node)?).unwrap())
    }

    /// F01: the reference case, byte for byte as flannel writes its scratch file.
    #[test]
    fn kube_flannel_delegate_as_flannel_writes_it() {
        let conf = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
            "delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;
        insta::assert_snapshot!(render(conf, &node(false, true)).unwrap());
    }

    /// F05: dual-stack, IPMASQ=false, ipam.routes and its other keys, runtimeConfig.
    #[test]
    fn dual_stack_routes_and_runtime_config() {
        let conf = r#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel",
            "ipam":{"dataDir":"/tmp/x","routes":[{"dst":"192.168.0.0/16","gw":"10.78.5.254"}],
                    "ranges":[[{"subnet":"1.2.3.0/24"}]]},
            "delegate":{"type":"bridge","bridge":"t-fl0","mtu":1400,"isGateway":false},
            "runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}}"#;
        insta::assert_snapshot!(render(conf, &node(true, false)).unwrap());
    }

    /// F11: without cniVersion the delegate is told 0.1.0 explicitly.
    #[test]
    fn no_version_means_0_1_0() {
        let out = render(r#"{"name":"n","type":"flannel"}"#, &node(false, true)).unwrap();
        assert!(out.starts_with(r#"{"cniVersion":"0.1.0","#), "{out}");
    }

    /// F04: the delegate dictionary's forbidden contents, in flannel's words.
    #[test]
    fn rejects_name_ipam_and_non_string_type_in_delegate() {
        let cases = [
            (
                r#"{"name":"x"}"#,
                "'delegate' dictionary must not have 'name' field, it'll be set by flannel",
            ),
            (
                r#"{"ipam":{}}"#,
                "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel",
            ),
            (
                r#"{"type":5}"#,
                "'delegate' dictionary, if present, must have (string) 'type' field",
            ),
        ];
        for (delegate, msg) in cases {
            let conf = format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"flannel","delegate":{delegate}}}"#
            );
            let e = render(&conf, &node(false, true)).unwrap_err();
            assert_eq!((e.code, e.msg.as_str()), (7, msg));
        }
    }

    #[test]
    fn rejects_bad_ipam_routes() {
        for routes in [
            r#""x""#,
            r#"[{"dst":"banana"}]"#,
            r#"[{"dst":"10.0.0.0/8","gw":"y"}]"#,
        ] {
            let conf = format!(
                r#"{{"cniVersion":"1.0.0","name":"n","type":"flannel","ipam":{{"routes":{routes}}}}}"#
            );
            let e = render(&conf, &node(false, true)).unwrap_err();
            assert_eq!(e.code, 7);
            assert!(
                e.msg.starts_with("failed to assemble Delegate IPAM"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn defaults_for_files() {
        let req =
            request(r#"{"cniVersion":"1.0.0","name":"n","type":"flannel","subnetFile":null}"#);
        let fc = FlannelConf::load(&req, DEFAULT_DATA_DIR).unwrap();
        assert_eq!(fc.subnet_file(), PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(fc.data_dir(), PathBuf::from(DEFAULT_DATA_DIR));
    }
}
