//! The network configuration a runtime writes on a plugin's stdin.

use super::result::{CniResult, Dns};
use crate::error::{CniError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The keys every plugin config shares. Plugin-specific keys stay in `extra`, so a
/// plugin can re-read its own struct from the same bytes and delegates get them back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Empty means 0.1.0, as libcni decodes it.
    #[serde(default, deserialize_with = "crate::spec::null_as_default")]
    pub cni_version: String,
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cni_versions: Vec<String>,
    #[serde(default, deserialize_with = "crate::spec::null_as_default")]
    pub name: String,
    #[serde(
        default,
        deserialize_with = "crate::spec::null_as_default",
        rename = "type"
    )]
    pub plugin_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl NetConf {
    /// The config version, with libcni's default for an empty one.
    pub fn version(&self) -> &str {
        if self.cni_version.is_empty() {
            "0.1.0"
        } else {
            &self.cni_version
        }
    }

    /// `prevResult` converted to the config's version model (any supported version is accepted).
    pub fn prev_result(&self) -> Result<Option<CniResult>> {
        self.prev_result
            .as_ref()
            .map(|v| {
                CniResult::from_value(v, self.version())
                    .map_err(|e| e.context("could not parse prevResult"))
            })
            .transpose()
    }

    /// A capability value the runtime passed in `runtimeConfig`.
    pub fn runtime(&self, key: &str) -> Option<&Value> {
        self.runtime_config.as_ref()?.get(key)
    }

    /// `args.cni.<key>`, the conventional place for per-attachment arguments.
    pub fn cni_arg(&self, key: &str) -> Option<&Value> {
        self.args.as_ref()?.get("cni")?.get(key)
    }
}

/// Decode stdin into a [`NetConf`], with the reference's error codes and messages.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::decode(format!(
            "error unmarshall network config: {}",
            json_err(&e, stdin)
        ))
    })?;
    let Value::Object(obj) = &value else {
        return Err(CniError::decode(
            "error unmarshall network config: not a JSON object",
        ));
    };
    match obj.get("cniVersion") {
        None | Some(Value::String(_)) => {}
        Some(other) => {
            return Err(CniError::decode(format!(
                "decoding version from network config: cniVersion must be a string, got {other}"
            )));
        }
    }
    NetConf::deserialize(value)
        .map_err(|e| CniError::decode(format!("error unmarshall network config: {e}")))
}

/// serde_json says "EOF while parsing" where Go says "unexpected end of JSON input".
fn json_err(e: &serde_json::Error, input: &[u8]) -> String {
    if input.iter().all(u8::is_ascii_whitespace) || e.is_eof() {
        "unexpected end of JSON input".to_string()
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_unknown_keys_and_capabilities() {
        let c = parse_netconf(
            br#"{"cniVersion":"1.0.0","name":"n","type":"bridge","bridge":"cni0",
                "capabilities":{"portMappings":true},"runtimeConfig":{"ips":["10.0.0.5"]},
                "args":{"cni":{"ips":["10.0.0.6"]}}}"#,
        )
        .unwrap();
        assert_eq!(c.extra["bridge"], "cni0");
        assert!(c.extra.contains_key("capabilities"));
        assert_eq!(c.runtime("ips").unwrap()[0], "10.0.0.5");
        assert_eq!(c.cni_arg("ips").unwrap()[0], "10.0.0.6");
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["bridge"], "cni0");
    }

    #[test]
    fn empty_version_means_010() {
        assert_eq!(
            parse_netconf(br#"{"name":"n"}"#).unwrap().version(),
            "0.1.0"
        );
    }

    #[test]
    fn decode_errors_are_code_6() {
        for input in [
            &b""[..],
            b"   ",
            b"{",
            b"[1]",
            br#"{"cniVersion":1.0}"#,
            br#"{"name":5}"#,
            b"nul",
        ] {
            let e = parse_netconf(input).unwrap_err();
            assert_eq!(e.code, 6, "{}", String::from_utf8_lossy(input));
        }
        assert_eq!(
            parse_netconf(b"").unwrap_err().msg,
            "error unmarshall network config: unexpected end of JSON input"
        );
        assert!(
            parse_netconf(br#"{"cniVersion":1}"#)
                .unwrap_err()
                .msg
                .starts_with("decoding version")
        );
    }

    #[test]
    fn prev_result_of_other_version_is_converted() {
        let c = parse_netconf(
            br#"{"cniVersion":"1.0.0","name":"n","prevResult":{"cniVersion":"0.3.1",
                "ips":[{"version":"4","address":"10.1.0.2/24"}]}}"#,
        )
        .unwrap();
        let r = c.prev_result().unwrap().unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.1.0.2/24");
    }
}
