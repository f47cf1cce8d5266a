//! `CNI_ARGS`: `K=V;K2=V2` pairs the runtime passes to every plugin in a chain.

use crate::error::{CniError, Result};

/// Parsed `CNI_ARGS`, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(pub Vec<(String, String)>);

impl CniArgs {
    /// Parse the variable. Unknown keys are kept (every plugin of a chain sees the same
    /// CNI_ARGS, so rejecting keys meant for another plugin breaks chains); a pair
    /// without `=` is malformed and rejected.
    pub fn parse(raw: &str) -> Result<Self> {
        let mut pairs = Vec::new();
        for item in raw.split(';').filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| CniError::env(format!("CNI_ARGS: invalid pair {item:?}")))?;
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(CniArgs(pairs))
    }

    /// The last value given for `key` (keys are case-sensitive, as in libcni).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_rejects_bare_words() {
        let a = CniArgs::parse("IgnoreUnknown=1;IP=10.0.0.5;K8S_POD_NAME=a=b;").unwrap();
        assert_eq!(a.get("IP"), Some("10.0.0.5"));
        assert_eq!(a.get("ip"), None);
        assert_eq!(a.get("K8S_POD_NAME"), Some("a=b"));
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        let e = CniArgs::parse("A=1;FOO").unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (4, r#"CNI_ARGS: invalid pair "FOO""#)
        );
        assert_eq!(CniArgs::parse("=x").unwrap_err().code, 4);
    }
}
