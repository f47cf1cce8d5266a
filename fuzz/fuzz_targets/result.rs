#![no_main]
//! Results of every version (`CniResult::from_value`, how plugins read prevResult
//! and delegates' replies) and the conversions between versions (`to_value`,
//! `to_json`, what a plugin prints). Invariants:
//! - writing at version V fails only for 0.1.0/0.2.0 and a result without IPs;
//! - what is written at V reads back as exactly the part of the result V can hold,
//!   and writes the same document again;
//! - a hop V1 → V2 keeps what the narrower of the two can hold (libcni's rules).

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use weft_core::error::code;
use weft_core::spec::{CniResult, Route};
use weft_core::version;
use weft_fuzz::SUPPORTED;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // The default version only matters without `cniVersion`.
    let defaults: &[&str] = if value.get("cniVersion").is_some() {
        &["1.1.0"]
    } else {
        SUPPORTED
    };
    for default in defaults {
        match CniResult::from_value(&value, default) {
            Ok(r) => check(&r),
            Err(e) => assert!(
                matches!(e.code, code::INCOMPATIBLE_VERSION | code::DECODING_FAILURE),
                "{e}"
            ),
        }
    }
    assert!(value.get("cniVersion").is_some() || CniResult::from_value(&value, "").is_err());
});

fn is_legacy(v: &str) -> bool {
    !version::at_least(v, "0.3.0")
}

/// The part of `r` that version `v` can carry, as it reads back.
fn project(r: &CniResult, v: &str) -> CniResult {
    let mut p = r.clone();
    if is_legacy(v) {
        // First address per family (IPv4 block first), no interfaces, and only dst/gw
        // of the routes of a family that has an address.
        let first = |v4: bool| r.ips.iter().find(|ip| ip.address.addr().is_ipv4() == v4);
        let fams: Vec<bool> = [true, false]
            .into_iter()
            .filter(|v4| first(*v4).is_some())
            .collect();
        p.interfaces.clear();
        p.ips = fams
            .iter()
            .map(|v4| {
                let mut ip = first(*v4).unwrap().clone();
                ip.interface = None;
                ip
            })
            .collect();
        p.routes = fams
            .iter()
            .flat_map(|v4| {
                r.routes
                    .iter()
                    .filter(move |rt| rt.dst.addr().is_ipv4() == *v4)
                    .map(|rt| Route::new(rt.dst, rt.gw))
            })
            .collect();
    } else if !version::at_least(v, "1.0.0") {
        for i in &mut p.interfaces {
            i.mtu = None;
            i.socket_path.clear();
            i.pci_id.clear();
        }
    }
    p
}

fn check(r: &CniResult) {
    // `at[i]`: r written at SUPPORTED[i] and read back (None: not expressible there).
    let mut at: Vec<Option<CniResult>> = Vec::new();
    for to in SUPPORTED {
        let written = match r.to_value(to) {
            Ok(v) => v,
            Err(e) => {
                assert!(is_legacy(to) && r.ips.is_empty(), "{to}: {e}");
                assert_eq!(e.code, code::DECODING_FAILURE);
                at.push(None);
                continue;
            }
        };
        assert!(!(is_legacy(to) && r.ips.is_empty()));
        assert_eq!(written["cniVersion"], *to);
        let text = r.to_json(to).expect("to_value succeeded");
        let reread: Value = serde_json::from_str(&text).expect("to_json prints JSON");
        assert_eq!(reread, written, "{to}: to_json differs from to_value");

        let back = CniResult::from_value(&written, "1.1.0")
            .unwrap_or_else(|e| panic!("{to}: written result does not read back: {e}\n{text}"));
        assert_eq!(back, project(r, to), "{to}: read back differs\n{text}");
        assert_eq!(
            back.to_value(to).unwrap(),
            written,
            "{to}: not a fixed point"
        );
        at.push(Some(back));
    }
    for (i, a) in SUPPORTED.iter().enumerate() {
        let Some(at_a) = &at[i] else { continue };
        for (j, b) in SUPPORTED.iter().enumerate() {
            let hop = at_a
                .to_value(b)
                .ok()
                .map(|v| CniResult::from_value(&v, "1.1.0").expect("written reads back"));
            assert_eq!(hop.as_ref(), at[i.min(j)].as_ref(), "{a} -> {b}");
        }
    }
}
