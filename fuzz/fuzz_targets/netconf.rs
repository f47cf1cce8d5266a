#![no_main]
//! Network config parsing (`spec::parse_netconf`, what the skel reads from stdin),
//! then what plugins do with the result: the version default, `prevResult` in the
//! config's model, `runtimeConfig`/`args.cni` lookups, and a write/read round trip.

use libfuzzer_sys::fuzz_target;
use weft_core::error::code;
use weft_core::spec::parse_netconf;
use weft_core::version;
use weft_fuzz::json_eq;

fuzz_target!(|data: &[u8]| {
    let conf = match parse_netconf(data) {
        Ok(conf) => conf,
        Err(e) => {
            // Anything stdin can hold is a decoding failure, never another code.
            assert_eq!(e.code, code::DECODING_FAILURE, "{e}");
            return;
        }
    };
    let ver = conf.version();
    assert!(!ver.is_empty());
    if conf.cni_version.is_empty() {
        assert_eq!(ver, "0.1.0");
    }

    match conf.prev_result() {
        Ok(Some(prev)) => {
            // Plugins write prevResult back at the config's version (chained ADD).
            if version::require_supported(ver).is_ok() {
                match prev.to_json(ver) {
                    Ok(text) => assert!(weft_fuzz::is_one_json_document(&text)),
                    Err(e) => assert_eq!(e.code, code::DECODING_FAILURE),
                }
            }
        }
        Ok(None) => assert!(conf.prev_result.is_none()),
        Err(e) => assert!(
            matches!(e.code, code::INCOMPATIBLE_VERSION | code::DECODING_FAILURE),
            "{e}"
        ),
    }
    for key in ["ips", "mac", "portMappings", "bandwidth", "ipRanges"] {
        let _ = conf.runtime(key);
        let _ = conf.cni_arg(key);
    }

    // What a meta-plugin passes on (a NetConf written back) reads as the same config.
    let text = serde_json::to_vec(&conf).expect("a NetConf serializes");
    let again = parse_netconf(&text).expect("a written NetConf parses again");
    assert_eq!(
        (
            &conf.cni_version,
            &conf.cni_versions,
            &conf.name,
            &conf.plugin_type,
            &conf.dns
        ),
        (
            &again.cni_version,
            &again.cni_versions,
            &again.name,
            &again.plugin_type,
            &again.dns
        )
    );
    let (a, b) = (
        serde_json::to_value(&conf).unwrap(),
        serde_json::to_value(&again).unwrap(),
    );
    assert!(json_eq(&a, &b), "{a} != {b}");
});
