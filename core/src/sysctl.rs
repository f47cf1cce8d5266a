//! Kernel parameters under /proc/sys, read-compare-write: a value that is already
//! right is not written again (writes to some keys, like ip_forward, have side
//! effects and cost a syscall per plugin run).
//!
//! `/proc/sys/net` shows the network namespace of the *thread* that opens it, so to
//! set a pod's parameters call these inside [`crate::netns::NetNs::run`].

use crate::error::{CniError, Result};
use std::path::PathBuf;

/// `net.ipv4.conf.eth0.arp_notify` or `net/ipv4/conf/eth0/arp_notify`. Interface
/// names may contain dots (`eth0.100`), so pass the slash form for those.
fn path_of(key: &str) -> PathBuf {
    let rel = if key.contains('/') {
        key.to_string()
    } else {
        key.replace('.', "/")
    };
    PathBuf::from("/proc/sys").join(rel)
}

/// The current value, trimmed.
pub fn get(key: &str) -> Result<String> {
    let path = path_of(key);
    std::fs::read_to_string(&path)
        .map(|v| v.trim().to_string())
        .map_err(|e| CniError::io(format!("reading sysctl {}", path.display()), e))
}

/// Set `key` to `value` unless it already has it. Returns whether it wrote.
pub fn set(key: &str, value: &str) -> Result<bool> {
    if get(key)? == value {
        return Ok(false);
    }
    let path = path_of(key);
    std::fs::write(&path, value)
        .map_err(|e| CniError::io(format!("writing sysctl {}", path.display()), e))?;
    Ok(true)
}

/// [`set`], skipping a key the kernel does not have (all of net/ipv6 when IPv6 is
/// disabled, or an interface that has none). Returns whether it wrote.
pub fn set_if_present(key: &str, value: &str) -> Result<bool> {
    if !path_of(key).exists() {
        return Ok(false);
    }
    set(key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_forms() {
        assert_eq!(
            path_of("net.ipv4.ip_forward"),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            path_of("net/ipv6/conf/eth0.100/accept_ra"),
            PathBuf::from("/proc/sys/net/ipv6/conf/eth0.100/accept_ra")
        );
    }

    #[test]
    fn read_and_unchanged_write() {
        let v = get("kernel.ostype").unwrap();
        assert_eq!(v, "Linux");
        assert!(
            !set("kernel.ostype", "Linux").unwrap(),
            "an equal value is not written"
        );
        assert_eq!(get("net.nonexistent.key").unwrap_err().code, 999);
        assert!(
            !set_if_present("net.nonexistent.key", "1").unwrap(),
            "an absent key is skipped"
        );
    }
}
