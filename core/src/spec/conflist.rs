//! Network configuration lists (`*.conflist`) and how libcni turns one entry
//! into a plugin's stdin.

use super::bool_or_string;
use crate::error::{CniError, Result};
use crate::version;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfList {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cni_versions: Vec<String>,
    pub name: String,
    #[serde(default, deserialize_with = "bool_or_string")]
    pub disable_check: bool,
    #[serde(default, rename = "disableGC", deserialize_with = "bool_or_string")]
    pub disable_gc: bool,
    #[serde(default, deserialize_with = "bool_or_string")]
    pub load_only_inlined_plugins: bool,
    pub plugins: Vec<Map<String, Value>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Decode a conflist file's bytes.
pub fn parse_conflist(bytes: &[u8]) -> Result<ConfList> {
    let list: ConfList = serde_json::from_slice(bytes)
        .map_err(|e| CniError::decode(format!("error parsing configuration list: {e}")))?;
    if list.plugins.is_empty() {
        return Err(CniError::config(format!(
            "error parsing configuration list: no plugins in list {:?}",
            list.name
        )));
    }
    if list.plugins.iter().any(|p| {
        p.get("type")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    }) {
        return Err(CniError::config(
            "error parsing configuration list: a plugin has no type",
        ));
    }
    Ok(list)
}

impl ConfList {
    /// libcni's choice: the highest of `cniVersions ∪ {cniVersion}` that we support.
    pub fn negotiated_version(&self) -> Result<&'static str> {
        let wanted = self
            .cni_versions
            .iter()
            .chain(std::iter::once(&self.cni_version));
        wanted
            .filter_map(|v| version::SUPPORTED.iter().copied().find(|s| s == v))
            .max_by(|a, b| version::cmp(a, b))
            .ok_or_else(|| version::require_supported(&self.cni_version).unwrap_err())
    }

    /// The stdin of plugin `index`: its config with `name`, `cniVersion`, `prevResult`
    /// and the `runtimeConfig` of the capabilities it declares and the runtime supplied.
    pub fn plugin_stdin(
        &self,
        index: usize,
        cni_version: &str,
        prev_result: Option<&Value>,
        capability_args: &Map<String, Value>,
    ) -> Vec<u8> {
        let mut conf = self.plugins[index].clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(cni_version.to_string()));
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        let caps = conf.get("capabilities").and_then(Value::as_object);
        let runtime: Map<String, Value> = capability_args
            .iter()
            .filter(|(k, _)| caps.and_then(|c| c.get(*k)).and_then(Value::as_bool) == Some(true))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        serde_json::to_vec(&conf).expect("a JSON map always serializes")
    }

    /// The plugin `type` of entry `index`.
    pub fn plugin_type(&self, index: usize) -> &str {
        self.plugins[index]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIST: &[u8] =
        br#"{"cniVersion":"0.4.0","cniVersions":["1.0.0","1.1.0","9.0.0"],"name":"net",
        "disableCheck":"true","plugins":[{"type":"bridge"},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn negotiates_highest_supported() {
        let l = parse_conflist(LIST).unwrap();
        assert_eq!(l.negotiated_version().unwrap(), "1.1.0");
        assert!(l.disable_check);
        let mut only_bad = l.clone();
        (only_bad.cni_version, only_bad.cni_versions) = ("9.9.9".into(), vec![]);
        assert_eq!(only_bad.negotiated_version().unwrap_err().code, 1);
    }

    #[test]
    fn stdin_injects_name_version_prev_and_declared_caps_only() {
        let l = parse_conflist(LIST).unwrap();
        let caps: Map<String, Value> =
            json!({"portMappings": [{"hostPort": 8080}], "ips": ["10.0.0.1"]})
                .as_object()
                .unwrap()
                .clone();
        let prev = json!({"cniVersion": "1.1.0"});
        let first: Value =
            serde_json::from_slice(&l.plugin_stdin(0, "1.1.0", None, &caps)).unwrap();
        assert_eq!(
            first,
            json!({"type": "bridge", "name": "net", "cniVersion": "1.1.0"})
        );
        let second: Value =
            serde_json::from_slice(&l.plugin_stdin(1, "1.1.0", Some(&prev), &caps)).unwrap();
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080}]})
        );
        assert_eq!(second["prevResult"], prev);
    }

    #[test]
    fn rejects_empty_or_typeless_lists() {
        assert_eq!(
            parse_conflist(br#"{"name":"n","plugins":[]}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            parse_conflist(br#"{"name":"n","plugins":[{"x":1}]}"#)
                .unwrap_err()
                .code,
            7
        );
        assert_eq!(
            parse_conflist(br#"{"name":"n","plugins":[{"type":"a"}],"disableGC":3}"#)
                .unwrap_err()
                .code,
            6
        );
    }
}
