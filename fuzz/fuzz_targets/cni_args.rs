#![no_main]
//! `CNI_ARGS` parsing (`args::CniArgs`) and the values plugins read from it (`IP=`
//! for host-local, `MAC=` for bridge), and the environment checks of the skel
//! (`validate_container_id`, `validate_ifname`, `validate_network_name`), each
//! against the rule it documents.

use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use weft_core::args::CniArgs;
use weft_core::error::code;
use weft_core::mac;
use weft_core::skel::{validate_container_id, validate_ifname, validate_network_name};

fuzz_target!(|data: &[u8]| {
    // Environment variables that are not UTF-8 read as unset (`std::env::var`).
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    cni_args(s);
    names(s);
});

fn cni_args(raw: &str) {
    let items = || raw.split(';').filter(|i| !i.is_empty());
    let malformed = items().any(|i| i.starts_with('=') || !i.contains('='));
    let args = match CniArgs::parse(raw) {
        Ok(args) => args,
        Err(e) => {
            assert!(malformed, "{raw:?} rejected: {e}");
            assert_eq!(e.code, code::INVALID_ENV);
            assert!(weft_fuzz::is_one_json_document(&e.to_json("1.1.0")));
            return;
        }
    };
    assert!(!malformed, "{raw:?} accepted");
    assert_eq!(args.0.len(), items().count());
    for (k, v) in &args.0 {
        assert!(!k.is_empty() && !k.contains(['=', ';']) && !v.contains(';'));
        // The last value of a key wins.
        let last = args.0.iter().rev().find(|(k2, _)| k2 == k).unwrap();
        assert_eq!(args.get(k), Some(last.1.as_str()));
    }
    // Pairs joined again (as a meta-plugin could rebuild CNI_ARGS) parse the same.
    let joined: Vec<String> = args.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(CniArgs::parse(&joined.join(";")).unwrap(), args);

    // host-local: IP=a,b (each may carry a prefix, ignored).
    if let Some(ips) = args.get("IP") {
        for item in ips.split(',').map(str::trim) {
            let _ = item.split('/').next().unwrap_or_default().parse::<IpAddr>();
        }
    }
    // bridge: MAC=; what parses prints back as written (up to case).
    if let Some(m) = args.get("MAC")
        && let Some(bytes) = mac::parse(m)
    {
        let printed = mac::format(&bytes);
        assert!(
            printed.eq_ignore_ascii_case(m),
            "MAC {m:?} read as {printed}"
        );
        assert_eq!(mac::parse(&printed), Some(bytes));
    }
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, libcni's rule for container IDs and network names.
fn name_like(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn names(s: &str) {
    let cid = validate_container_id(s);
    assert_eq!(cid.is_ok(), name_like(s), "containerID {s:?}");
    if let Err(e) = &cid {
        let want = if s.is_empty() {
            code::UNKNOWN_CONTAINER
        } else {
            code::INVALID_ENV
        };
        assert_eq!(e.code, want);
    }

    let net = validate_network_name(s);
    assert_eq!(net.is_ok(), name_like(s), "network name {s:?}");
    match &net {
        // A network name becomes a directory under host-local's dataDir: it must be
        // one path component that does not climb out.
        Ok(()) => assert!(!s.contains('/') && s != "." && s != ".."),
        Err(e) => assert_eq!(e.code, code::INVALID_NETWORK_CONFIG),
    }

    // Linux IFNAMSIZ is 16 with the NUL; the reference's ValidateInterfaceName rules,
    // and no NUL inside (the kernel would cut the name there).
    let ifname_ok = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    match validate_ifname(s) {
        Ok(()) => assert!(ifname_ok, "ifname {s:?} accepted"),
        Err(e) => {
            assert!(!ifname_ok, "ifname {s:?} rejected: {e}");
            assert_eq!(e.code, code::INVALID_ENV);
        }
    }
}
