//! The CNI error type: a spec error code, a short message and optional details.
//!
//! Everything a plugin can fail with ends up as a [`CniError`], printed as
//! `{"cniVersion","code","msg","details"}` on stdout with exit status 1.

use serde::Serialize;
use std::fmt;

/// Error codes from the CNI spec (1-99 are reserved for it) and weft's own (100+).
pub mod code {
    /// The plugin does not support the config's cniVersion.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A field in the config is not supported; the message names it.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// The container does not exist; the runtime need not clean up.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A required CNI_* environment variable is missing or invalid.
    pub const INVALID_ENV: u32 = 4;
    /// Reading or writing an I/O stream (stdin) failed.
    pub const IO_FAILURE: u32 = 5;
    /// stdin or a result could not be decoded.
    pub const DECODING_FAILURE: u32 = 6;
    /// The network configuration is invalid.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// A transient condition: the runtime should retry later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: existing containers may have limited connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// weft: no free address is left in a range set.
    pub const ADDRESS_EXHAUSTED: u32 = 100;
    /// weft: a requested or existing address cannot be given to this attachment.
    pub const ADDRESS_UNAVAILABLE: u32 = 101;
    /// weft: CHECK found state that does not match the result.
    pub const CHECK_FAILED: u32 = 102;
    /// weft: a delegated plugin failed without a parsable error.
    pub const DELEGATE_FAILED: u32 = 103;
    /// weft: a host port (with protocol and host IP) is already mapped to another
    /// attachment.
    pub const PORT_IN_USE: u32 = 104;
    /// Anything unexpected (kernel or filesystem failures); libcni's ErrInternal.
    pub const INTERNAL: u32 = 999;
}

/// A CNI error as the spec defines it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Prefix the message with context, keeping the code: `"<ctx>: <msg>"`.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_NETWORK_CONFIG, msg)
    }

    pub fn env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENV, msg)
    }

    pub fn decode(msg: impl Into<String>) -> Self {
        Self::new(code::DECODING_FAILURE, msg)
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg)
    }

    /// An I/O error on a named path, reported as an internal failure.
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        Self::internal(format!("{what}: {err}"))
    }

    /// The JSON document printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Reply<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        crate::spec::to_pretty_json(&Reply {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.details.is_empty() {
            write!(f, "{}", self.msg)
        } else {
            write!(f, "{}; {}", self.msg, self.details)
        }
    }
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_omits_empty_details() {
        let e = CniError::env("required env variables [CNI_NETNS] missing");
        insta::assert_snapshot!(e.to_json("1.1.0"), @r#"
        {
            "cniVersion": "1.1.0",
            "code": 4,
            "msg": "required env variables [CNI_NETNS] missing"
        }
        "#);
    }

    #[test]
    fn json_keeps_details_and_context() {
        let e = CniError::config("bad")
            .with_details("more")
            .context("range set 0");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.4.0")).unwrap();
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "range set 0: bad");
        assert_eq!(v["details"], "more");
        assert_eq!(e.to_string(), "range set 0: bad; more");
    }
}
