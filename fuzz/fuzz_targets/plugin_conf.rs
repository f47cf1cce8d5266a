#![no_main]
//! The plugins' own config loads, on a request built from the fuzz input as stdin:
//! portmap (`PortMapConf::load`, `port_mappings`, `container_ips`), bridge
//! (`BridgeConf::load`, `requested_mac`, the lenient DEL/GC flags), host-local
//! (`config::load`: range sets, routes, requested IPs; then the range arithmetic ADD
//! uses) and flannel (`FlannelConf::load`, `delegate_conf`, whose output is then
//! loaded by bridge and host-local as flannel's in-process delegation does).
//!
//! The bridge, portmap and host-local config modules are private to their crates,
//! so they are compiled here from their source files (`#[path]`); if one of them
//! starts using another private module of its crate, add that module the same way
//! (host-local's `config.rs` already needs `range` and `dns`, declared below).
//!
//! A top-level `"CNI_ARGS"` string in the input, if any, is used as CNI_ARGS (so
//! `IP=`/`MAC=` are reachable). `ipam.resolvConf` is dropped: it names a file to read.

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::net::IpAddr;
use std::sync::LazyLock;
use weft_core::args::CniArgs;
use weft_core::skel::{Request, validate_ifname};
use weft_core::spec::{NetConf, parse_netconf};

#[allow(dead_code)]
#[path = "../../plugins/bridge/src/config.rs"]
mod bridge_config;
#[allow(dead_code)]
#[path = "../../ipam/host-local/src/dns.rs"]
mod dns;
#[allow(dead_code)]
#[path = "../../ipam/host-local/src/config.rs"]
mod host_local_config;
#[allow(dead_code)]
#[path = "../../plugins/portmap/src/config.rs"]
mod portmap_config;
#[allow(dead_code)]
#[path = "../../ipam/host-local/src/range.rs"]
mod range;

/// A node as flannel's subnet.env describes it (dual-stack).
static NODE: LazyLock<flannel::NodeSubnets> = LazyLock::new(|| flannel::NodeSubnets {
    networks: vec![
        "10.244.0.0/16".parse().unwrap(),
        "fd10::/56".parse().unwrap(),
    ],
    subnet_v4: Some("10.244.1.0/24".parse().unwrap()),
    subnet_v6: Some("fd10:0:0:1::/64".parse().unwrap()),
    mtu: 1450,
    ipmasq: true,
});

fuzz_target!(|data: &[u8]| {
    let Ok(conf) = parse_netconf(data) else {
        return;
    };
    let args = conf
        .extra
        .get("CNI_ARGS")
        .and_then(Value::as_str)
        .and_then(|a| CniArgs::parse(a).ok())
        .unwrap_or_default();
    let req = weft_fuzz::request(conf, data, args);

    portmap(&req);
    bridge(&req);
    host_local(&req);
    flannel(&req);
});

fn portmap(req: &Request) {
    use portmap_config::{PortMapConf, container_ips, port_mappings};
    if let Ok(c) = PortMapConf::load(req) {
        assert!(c.mark_bit <= 31);
        // Conditions go into an nft script one per line: nothing may break out.
        for cond in c.conditions_v4.iter().chain(&c.conditions_v6) {
            assert!(!cond.contains(['\n', '\r', ';', '#']), "{cond:?}");
        }
    }
    if let Ok(maps) = port_mappings(req) {
        for (i, m) in maps.iter().enumerate() {
            assert!(m.host_port != 0 && m.container_port != 0);
            assert!(m.host_ip.is_none_or(|ip| !ip.is_unspecified()));
            assert!(
                !maps[i + 1..]
                    .iter()
                    .any(|o| (o.host_ip, o.protocol, o.host_port)
                        == (m.host_ip, m.protocol, m.host_port)),
                "duplicate {m}"
            );
            let _ = (m.to_string(), m.protocol.number());
        }
    }
    if let Ok(Some(prev)) = req.conf.prev_result() {
        let ips = container_ips(&prev, &req.env.ifname);
        assert!(ips.len() <= 2);
        if let [a, b] = ips.as_slice() {
            assert_ne!(a.addr().is_ipv4(), b.addr().is_ipv4());
        }
    }
}

fn bridge(req: &Request) {
    use bridge_config::{BridgeConf, ip_masq, ipam_type, macspoofchk, requested_mac};
    if let Ok(c) = BridgeConf::load(req) {
        assert!(validate_ifname(&c.bridge).is_ok());
        assert!(!(c.hairpin_mode && c.promisc_mode));
        assert_eq!(c.vlan, 0);
        assert!(c.mtu == 0 || (68..=65535).contains(&c.mtu));
        assert!(c.is_gateway || !c.is_default_gateway);
        let _ = c.has_ipam(req);
    }
    let _ = (requested_mac(req), ip_masq(req), macspoofchk(req));
    if let Some(t) = ipam_type(req) {
        assert!(!t.is_empty());
    }
}

fn host_local(req: &Request) {
    // resolvConf names a file to read; leave it out of the fuzzed config.
    let mut req = req.clone();
    if let Some(Value::Object(ipam)) = &mut req.conf.ipam {
        ipam.remove("resolvConf");
    }
    let _ = host_local_config::data_dir_of(&req);
    let Ok(c) = host_local_config::load(&req) else {
        return;
    };
    assert!(!c.sets.is_empty());
    for set in &c.sets {
        assert!(range::validate_set(set).is_ok());
        let _ = range::describe(set);
        for r in set {
            for ip in [r.start, r.end, r.gateway] {
                assert!(r.subnet.contains(&ip), "{ip} outside {}", r.subnet);
            }
            assert!(range::to_u128(r.start) <= range::to_u128(r.end));
            assert!(r.capacity() <= range::to_u128(r.end) - range::to_u128(r.start) + 1);
            assert!(range::range_for(set, r.start).is_some());
        }
        // ADD's walk: the first few candidates, resuming after the first range's end
        // and after an address outside the set.
        let resume: [Option<IpAddr>; 3] = [None, Some(set[0].end), c.requested.first().copied()];
        for last in resume {
            for (ip, r) in range::candidates(set, last).take(4) {
                assert!(r.contains(ip) && ip != r.gateway, "{ip} from {r}");
            }
        }
    }
}

fn flannel(req: &Request) {
    let Ok(fc) = flannel::FlannelConf::load(req, "/var/lib/cni/flannel") else {
        return;
    };
    let _ = (fc.subnet_file(), fc.data_dir());
    let Ok(delegate) = fc.delegate_conf(req, &NODE) else {
        return;
    };
    assert_eq!(delegate["name"], req.conf.name.as_str());
    assert_eq!(delegate["cniVersion"], req.version());
    assert_eq!(
        delegate["ipam"]["ranges"].as_array().map(Vec::len),
        Some(NODE.subnets().len())
    );
    // The delegate (bridge + host-local by default) reads what flannel wrote.
    let stdin = serde_json::to_vec(&delegate).expect("delegate conf serializes");
    // Keys of the user's `delegate` dictionary (`"dns": 5`) can still make it fail.
    let Ok(conf): Result<NetConf, _> = parse_netconf(&stdin) else {
        return;
    };
    let dreq = weft_fuzz::request(conf, &stdin, req.env.args.clone());
    bridge(&dreq);
    host_local(&dreq);
}
