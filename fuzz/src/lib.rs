//! Helpers shared by the fuzz targets in `fuzz_targets/`.

use serde_json::Value;
use weft_core::args::CniArgs;
use weft_core::skel::{Command, Env, Request};
use weft_core::spec::NetConf;

/// Every spec version weft speaks, re-exported for the targets.
pub use weft_core::version::SUPPORTED;

/// JSON equality where numbers compare by value: serde_json (without its
/// `float_roundtrip` feature) may read back a printed float one ULP off, which is
/// not a weft bug, so floats compare within a relative 1e-12.
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// A request as the skel would hand it to a plugin's ADD, for `conf` read from
/// `stdin`, without touching the environment, the filesystem or a netns.
pub fn request(conf: NetConf, stdin: &[u8], args: CniArgs) -> Request {
    Request {
        env: Env {
            command: Command::Add,
            container_id: "fuzz-container".into(),
            netns: "/var/run/netns/fuzz".into(),
            ifname: "eth0".into(),
            raw_args: String::new(),
            args,
            path: vec!["/opt/cni/bin".into()],
        },
        conf,
        stdin: stdin.to_vec(),
    }
}

/// Whether `s` is one complete JSON document (what a plugin must print).
pub fn is_one_json_document(s: &str) -> bool {
    serde_json::from_str::<Value>(s).is_ok()
}
