//! CNI wire types: network configs, conflists and results for every spec version.

mod config;
mod conflist;
mod result;

pub use config::{NetConf, parse_netconf};
pub use conflist::{ConfList, parse_conflist};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};

use serde::Serialize;

/// JSON the way the reference plugins print it: 4-space indent, no trailing newline.
pub fn to_pretty_json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::with_capacity(512);
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    value
        .serialize(&mut ser)
        .expect("serializing to a Vec cannot fail");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// Serde helper: `null` reads as the type's zero value, as Go's encoding/json does.
/// Configs written by Go tools carry `"routes": null`, `"dns": {"nameservers": null}`…
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Serde helper: deserialize a bool that may also be written as "true"/"false"
/// (libcni accepts both for disableCheck, disableGC, loadOnlyInlinedPlugins).
pub(crate) fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Bool(b) => Ok(b),
        serde_json::Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        serde_json::Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        other => Err(D::Error::custom(format!("expected a bool, got {other}"))),
    }
}

use serde::Deserialize;
