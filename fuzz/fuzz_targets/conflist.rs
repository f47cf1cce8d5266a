#![no_main]
//! Conflist parsing (`spec::parse_conflist`), version negotiation, and the stdin
//! libcni builds for every plugin of the list, which must read back as a NetConf of
//! that list (name, negotiated version, type, prevResult, declared capabilities).

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use std::sync::LazyLock;
use weft_core::error::code;
use weft_core::spec::{parse_conflist, parse_netconf};
use weft_core::version;
use weft_fuzz::{SUPPORTED, json_eq};

/// What a runtime passes as capability arguments (CNI_ARGS-like runtimeConfig).
static CAPS: LazyLock<Map<String, Value>> = LazyLock::new(|| {
    json!({
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
        "ips": ["10.1.0.5/24"],
        "mac": "0a:58:0a:01:00:05",
        "bandwidth": {"ingressRate": 1000},
        "io.kubernetes.cri.pod-annotations": {}
    })
    .as_object()
    .unwrap()
    .clone()
});

static PREV: LazyLock<Value> = LazyLock::new(
    || json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1"}]}),
);

fuzz_target!(|data: &[u8]| {
    let list = match parse_conflist(data) {
        Ok(list) => list,
        Err(e) => {
            assert!(
                matches!(
                    e.code,
                    code::DECODING_FAILURE | code::INVALID_NETWORK_CONFIG
                ),
                "{e}"
            );
            return;
        }
    };
    assert!(!list.plugins.is_empty());

    let negotiated = match list.negotiated_version() {
        Ok(v) => {
            // The highest supported one of cniVersions ∪ {cniVersion}.
            assert!(SUPPORTED.contains(&v));
            let wanted: Vec<&String> = list
                .cni_versions
                .iter()
                .chain(std::iter::once(&list.cni_version))
                .collect();
            assert!(wanted.iter().any(|w| w.as_str() == v));
            for w in wanted {
                if SUPPORTED.contains(&w.as_str()) {
                    assert!(version::at_least(v, w), "{v} < {w}");
                }
            }
            v
        }
        Err(e) => {
            assert_eq!(e.code, code::INCOMPATIBLE_VERSION, "{e}");
            // libcni stops here; go on with the list's own version to exercise the rest.
            list.cni_version.as_str()
        }
    };

    for i in 0..list.plugins.len() {
        let ty = list.plugin_type(i);
        assert!(!ty.is_empty());
        let stdin = list.plugin_stdin(i, negotiated, Some(&PREV), &CAPS);
        let v: Value = serde_json::from_slice(&stdin).expect("plugin stdin is JSON");
        assert_eq!(v["name"], list.name.as_str());
        assert_eq!(v["cniVersion"], negotiated);
        assert_eq!(v["type"], ty);
        assert_eq!(v["prevResult"], *PREV);
        if !list.plugins[i].contains_key("runtimeConfig") {
            // Only capabilities the plugin declares (as true) reach it.
            let caps = list.plugins[i].get("capabilities");
            for (k, _) in v
                .get("runtimeConfig")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                assert_eq!(caps.and_then(|c| c.get(k)), Some(&Value::Bool(true)));
            }
        }
        match parse_netconf(&stdin) {
            Ok(conf) => {
                assert_eq!(conf.name, list.name);
                assert_eq!(conf.cni_version, negotiated);
                assert_eq!(conf.plugin_type, ty);
                assert!(conf.prev_result.is_some());
            }
            // Only a plugin entry's own keys (`"dns": 5`) can make it undecodable.
            Err(e) => assert_eq!(e.code, code::DECODING_FAILURE, "{e}"),
        }
    }

    // A conflist written back (as runtimes cache it) reads as the same list.
    let text = serde_json::to_vec(&list).expect("a ConfList serializes");
    let again = parse_conflist(&text).expect("a written ConfList parses again");
    assert_eq!(
        (
            &list.cni_version,
            &list.cni_versions,
            &list.name,
            list.disable_check,
            list.disable_gc,
            list.load_only_inlined_plugins
        ),
        (
            &again.cni_version,
            &again.cni_versions,
            &again.name,
            again.disable_check,
            again.disable_gc,
            again.load_only_inlined_plugins
        )
    );
    let (a, b) = (
        serde_json::to_value(&list).unwrap(),
        serde_json::to_value(&again).unwrap(),
    );
    assert!(json_eq(&a, &b), "{a} != {b}");
});
