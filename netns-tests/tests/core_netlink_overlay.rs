//! weft-core's overlay primitives (vxlan device, neighbours, FDB, owned routes,
//! batched writes) against a real kernel, each read back and compared with what
//! iproute2 shows. Every test runs in throwaway namespaces; this kernel has no
//! dummy links, so a veth pair stands in for the underlay.

use ipnet::IpNet;
use netns_tests::{TempDir, TestNetns, join, require_root};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;
use weft_core::backend::{DataPlane, ExtLink, Kind};
use weft_core::lease::{Lease, LeaseAttrs, SubnetKey};
use weft_core::netlink::{
    Fdb, Neigh, NetOp, Netlink, OwnedRoute, VXLAN_DEFAULT_PORT, VxlanInfo, VxlanSpec,
};
use weft_core::netns::NetNs;

/// weft's route protocol number in these tests.
const PROTO: u8 = 200;

/// A node: a namespace with an underlay (`ul0`, a veth whose peer `ul1` stays
/// in the same namespace) addressed 10.77.0.1/24 and fd00:77::1/64.
struct Node {
    ns: TestNetns,
    nl: Netlink,
    ul: u32,
}

fn node() -> Option<Node> {
    if !require_root() {
        return None;
    }
    let ns = TestNetns::new();
    ns.exec_ok(&[
        "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "ul1",
    ]);
    for cmd in [
        &["ip", "addr", "add", "10.77.0.1/24", "dev", "ul0"][..],
        &["ip", "addr", "add", "fd00:77::1/64", "dev", "ul0", "nodad"],
        &["ip", "link", "set", "ul1", "up"],
        &["ip", "link", "set", "ul0", "up"],
    ] {
        ns.exec_ok(cmd);
    }
    let nl = Netlink::in_netns(&NetNs::open(ns.path()).unwrap()).unwrap();
    let ul = nl.link_by_name("ul0").unwrap().unwrap().index;
    Some(Node { ns, nl, ul })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn mac_str(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// flanneld's device: `flannel.1`, VNI 1, default port, nolearning, MTU 1450.
fn flannel_spec(n: &Node, mac: [u8; 6]) -> VxlanSpec {
    VxlanSpec {
        name: "flannel.1".into(),
        vni: 1,
        local: ip("10.77.0.1"),
        dev: n.ul,
        port: 0,
        learning: false,
        gbp: false,
        mtu: 1450,
        mac,
    }
}

fn show_link(ns: &TestNetns, name: &str) -> Value {
    ns.exec_json(&["ip", "-j", "-d", "link", "show", name])[0].clone()
}

/// The attributes `ip -d link show` prints for a vxlan device, next to ours.
fn assert_matches_ip_link(ns: &TestNetns, name: &str, info: &VxlanInfo) {
    let shown = show_link(ns, name);
    let data = &shown["linkinfo"]["info_data"];
    assert_eq!(shown["linkinfo"]["info_kind"], "vxlan", "{shown}");
    assert_eq!(shown["ifindex"], info.index, "{shown}");
    assert_eq!(data["id"], info.vni, "{shown}");
    let local = data["local"].as_str().or(data["local6"].as_str());
    assert_eq!(local.map(ip), info.local, "{shown}");
    assert_eq!(data["port"], info.port, "{shown}");
    assert_eq!(data["learning"], info.learning, "{shown}");
    assert_eq!(shown["mtu"], info.mtu, "{shown}");
    assert_eq!(shown["address"], mac_str(&info.mac), "{shown}");
    let up = shown["flags"].as_array().unwrap().iter().any(|f| f == "UP");
    assert_eq!(up, info.up, "{shown}");
    let dev = info.dev.map(|d| {
        let l = ns.exec_json(&["ip", "-j", "link", "show"]);
        l.as_array()
            .unwrap()
            .iter()
            .find(|l| l["ifindex"] == d)
            .unwrap()["ifname"]
            .clone()
    });
    assert_eq!(data.get("link").cloned(), dev, "{shown}");
    assert_eq!(data.get("gbp").is_some(), info.gbp, "{shown}");
}

#[test]
fn vxlan_device_is_flanneld_s_and_reads_back() {
    let Some(n) = node() else { return };
    let mac = [0x0e, 0x11, 0x22, 0x33, 0x44, 0x55];
    let info = n.nl.create_vxlan(&flannel_spec(&n, mac)).unwrap();
    assert_eq!(
        info,
        VxlanInfo {
            index: info.index,
            vni: 1,
            local: Some(ip("10.77.0.1")),
            dev: Some(n.ul),
            port: VXLAN_DEFAULT_PORT,
            learning: false,
            gbp: false,
            mtu: 1450,
            mac: mac.to_vec(),
            up: true,
        }
    );
    assert_eq!(n.nl.vxlan("flannel.1").unwrap(), Some(info.clone()));
    assert_matches_ip_link(&n.ns, "flannel.1", &info);
    // flanneld's kernel line: `vxlan id 1 local 10.77.0.1 dev ul0 srcport 0 0
    // dstport 8472 nolearning ttl auto ageing 300 udpcsum noudp6zerocsumtx
    // noudp6zerocsumrx`.
    let text = n.ns.exec_ok(&["ip", "-d", "link", "show", "flannel.1"]);
    for part in [
        "vxlan id 1 local 10.77.0.1 dev ul0 srcport 0 0 dstport 8472 nolearning ttl auto ageing 300",
        "udpcsum noudp6zerocsumtx noudp6zerocsumrx",
        "mtu 1450",
        "link/ether 0e:11:22:33:44:55",
    ] {
        assert!(text.contains(part), "{part:?} not in {text}");
    }
    // sysfs shows the mounting namespace's devices: mount one of this netns.
    let addr_assign = n.ns.exec_ok(&[
        "unshare",
        "--mount",
        "sh",
        "-c",
        "mount -t sysfs sysfs /sys && cat /sys/class/net/flannel.1/addr_assign_type",
    ]);
    assert_eq!(
        addr_assign.trim(),
        "3",
        "MAC set by us (NET_ADDR_SET), not random"
    );

    // Again, with another MAC and a changed MTU: the same device, its MAC kept
    // (peers may have it), the MTU brought in line.
    n.ns.exec_ok(&["ip", "link", "set", "flannel.1", "down"]);
    let again =
        n.nl.create_vxlan(&VxlanSpec {
            mtu: 1400,
            ..flannel_spec(&n, [0x0e, 0, 0, 0, 0, 9])
        })
        .unwrap();
    assert_eq!(
        again,
        VxlanInfo {
            mtu: 1400,
            ..info.clone()
        }
    );
    assert_matches_ip_link(&n.ns, "flannel.1", &again);

    // Incompatible: refused, naming the difference; nothing changed.
    let e =
        n.nl.create_vxlan(&VxlanSpec {
            vni: 2,
            ..flannel_spec(&n, mac)
        })
        .unwrap_err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (
            7,
            "vxlan \"flannel.1\" exists with vni 1 (want 2); delete it to recreate"
        )
    );
    let e =
        n.nl.create_vxlan(&VxlanSpec {
            learning: true,
            ..flannel_spec(&n, mac)
        })
        .unwrap_err();
    assert!(e.msg.contains("learning false (want true)"), "{}", e.msg);
    let e =
        n.nl.create_vxlan(&VxlanSpec {
            port: 4789,
            ..flannel_spec(&n, mac)
        })
        .unwrap_err();
    assert!(e.msg.contains("dstport 8472 (want 4789)"), "{}", e.msg);
    // port 8472 spelled out is the default, hence compatible.
    n.nl.create_vxlan(&VxlanSpec {
        port: 8472,
        mtu: 1400,
        ..flannel_spec(&n, mac)
    })
    .unwrap();

    // Another kind of link under the name, or none.
    let e = n.nl.vxlan("ul0").unwrap_err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (7, "\"ul0\" exists but is not a vxlan device")
    );
    let e =
        n.nl.create_vxlan(&VxlanSpec {
            name: "ul1".into(),
            ..flannel_spec(&n, mac)
        })
        .unwrap_err();
    assert_eq!(e.msg, "\"ul1\" exists but is not a vxlan device");
    assert_eq!(n.nl.vxlan("flannel.9").unwrap(), None);

    // A kernel refusal names the device.
    let e =
        n.nl.create_vxlan(&VxlanSpec {
            name: "flannel.3".into(),
            vni: 3,
            dev: 999_999,
            ..flannel_spec(&n, mac)
        })
        .unwrap_err();
    assert!(
        e.msg
            .starts_with("creating vxlan \"flannel.3\" (vni 3, local 10.77.0.1, dev #999999): "),
        "{}",
        e.msg
    );
}

#[test]
fn vxlan_ipv6_with_port_learning_and_gbp() {
    let Some(n) = node() else { return };
    let mac = [0x0e, 0x66, 0, 0, 0, 1];
    let spec = VxlanSpec {
        name: "flannel-v6.1".into(),
        vni: 1,
        local: ip("fd00:77::1"),
        dev: n.ul,
        port: 4789,
        learning: true,
        gbp: true,
        mtu: 1430,
        mac,
    };
    let info = n.nl.create_vxlan(&spec).unwrap();
    assert_eq!(
        (
            info.local,
            info.port,
            info.learning,
            info.gbp,
            info.mtu,
            info.mac.as_slice()
        ),
        (Some(spec.local), 4789, true, true, 1430, &mac[..])
    );
    assert_matches_ip_link(&n.ns, "flannel-v6.1", &info);
    let text = n.ns.exec_ok(&["ip", "-d", "link", "show", "flannel-v6.1"]);
    assert!(
        text.contains("vxlan id 1 local fd00:77::1 dev ul0 srcport 0 0 dstport 4789 ttl auto"),
        "{text}"
    );
    assert!(text.contains(" gbp"), "{text}");
    assert_eq!(n.nl.create_vxlan(&spec).unwrap(), info, "idempotent");

    // flanneld's v6 MTU (underlay − 50) is more than IPv6 encapsulation allows:
    // the kernel clamps it at creation (1500 − 70), and so does every later call.
    let flannel_v6 = VxlanSpec {
        name: "flannel-v6.2".into(),
        vni: 2,
        port: 0,
        learning: false,
        gbp: false,
        mtu: 1450,
        ..spec.clone()
    };
    let clamped = n.nl.create_vxlan(&flannel_v6).unwrap();
    assert_eq!(clamped.mtu, 1430);
    assert_eq!(n.nl.create_vxlan(&flannel_v6).unwrap(), clamped);
    n.ns.exec_ok(&["ip", "link", "set", "flannel-v6.2", "mtu", "1300"]);
    assert_eq!(n.nl.create_vxlan(&flannel_v6).unwrap(), clamped, "restored");
    let e =
        n.ns.exec(&["ip", "link", "set", "flannel-v6.2", "mtu", "1450"]);
    assert!(!e.status.success(), "the kernel refuses it after creation");

    // No underlay device, and the kernel's MTU.
    let bare =
        n.nl.create_vxlan(&VxlanSpec {
            name: "vx.7".into(),
            vni: 7,
            local: ip("fd00:77::1"),
            dev: 0,
            port: 0,
            learning: false,
            gbp: false,
            mtu: 0,
            mac: [0x0e, 0x66, 0, 0, 0, 7],
        })
        .unwrap();
    assert_eq!((bare.dev, bare.port, bare.gbp), (None, 8472, false));
    assert_matches_ip_link(&n.ns, "vx.7", &bare);
    println!("kernel default MTU of a v6 vxlan without dev: {}", bare.mtu);
}

/// `ip neigh show dev` as (ip, mac, state) triples.
fn ip_neighs(ns: &TestNetns, dev: &str, v6: bool) -> BTreeSet<(String, String, String)> {
    let fam = if v6 { "-6" } else { "-4" };
    let shown = ns.exec_json(&["ip", fam, "-j", "neigh", "show", "dev", dev]);
    shown
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["dst"].as_str().unwrap().to_string(),
                n["lladdr"].as_str().unwrap_or("").to_string(),
                n["state"][0].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn triples(ns: &[Neigh]) -> BTreeSet<(String, String, String)> {
    ns.iter()
        .map(|n| (n.ip.to_string(), mac_str(&n.mac), "PERMANENT".to_string()))
        .collect()
}

#[test]
fn neighbours_replace_list_delete() {
    let Some(n) = node() else { return };
    let vx =
        n.nl.create_vxlan(&flannel_spec(&n, [0x0e, 0, 0, 0, 0, 1]))
            .unwrap()
            .index;
    for (v4, peer, other) in [
        (true, "10.244.27.0", "10.244.28.0"),
        (false, "fd44:0:0:14::", "fd44:0:0:15::"),
    ] {
        let a = Neigh {
            ip: ip(peer),
            mac: [0xbe, 0x55, 0xaa, 0xbf, 0x94, 0x77],
        };
        let b = Neigh {
            ip: ip(other),
            mac: [0xbe, 0x55, 0xaa, 0xbf, 0x94, 0x78],
        };
        n.nl.replace_neigh(vx, &a).unwrap();
        n.nl.replace_neigh(vx, &a).unwrap(); // idempotent
        n.nl.replace_neigh(vx, &b).unwrap();
        let moved = Neigh {
            mac: [0xbe, 0x55, 0xaa, 0xbf, 0x94, 0x79],
            ..b
        };
        n.nl.replace_neigh(vx, &moved).unwrap(); // a new MAC replaces the old
        let listed = n.nl.neighs(vx, v4).unwrap();
        assert_eq!(
            listed.iter().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([a, moved])
        );
        assert_eq!(ip_neighs(&n.ns, "flannel.1", !v4), triples(&listed));
        // flanneld's line: `10.244.27.0 dev flannel.1 lladdr be:55:aa:bf:94:77 PERMANENT`.
        let text =
            n.ns.exec_ok(&["ip", "neigh", "show", "dev", "flannel.1", "to", peer]);
        assert_eq!(
            text.trim(),
            format!("{peer} lladdr be:55:aa:bf:94:77 PERMANENT")
        );
        assert!(n.nl.del_neigh(vx, b.ip).unwrap());
        assert!(!n.nl.del_neigh(vx, b.ip).unwrap(), "already gone");
        assert_eq!(n.nl.neighs(vx, v4).unwrap(), [a]);
    }
    // The other family's and the kernel's own (non-permanent) entries are not listed.
    n.ns.exec_ok(&[
        "ip",
        "neigh",
        "add",
        "10.244.99.0",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "flannel.1",
        "nud",
        "reachable",
    ]);
    n.ns.exec_ok(&[
        "ip",
        "neigh",
        "replace",
        "10.77.0.9",
        "lladdr",
        "02:00:00:00:00:98",
        "dev",
        "ul0",
        "nud",
        "permanent",
    ]);
    assert_eq!(n.nl.neighs(vx, true).unwrap().len(), 1);
    assert_eq!(n.nl.neighs(vx, false).unwrap().len(), 1);
    assert_eq!(n.nl.neighs(n.ul, true).unwrap().len(), 1, "per device");

    // Errors name the object; a vanished device is "absent" for a delete.
    let e =
        n.nl.replace_neigh(
            999_999,
            &Neigh {
                ip: ip("10.244.1.0"),
                mac: [2, 0, 0, 0, 0, 1],
            },
        )
        .unwrap_err();
    assert_eq!(
        e.msg,
        "replacing neighbour 10.244.1.0 lladdr 02:00:00:00:00:01 on link #999999: No such device (os error 19)"
    );
    assert!(!n.nl.del_neigh(999_999, ip("10.244.1.0")).unwrap());
}

/// `bridge fdb show dev` entries with a dst, as (mac, dst, flags).
fn bridge_fdbs(ns: &TestNetns, dev: &str) -> BTreeSet<(String, String, Vec<String>)> {
    let shown = ns.exec_json(&["bridge", "-j", "fdb", "show", "dev", dev]);
    shown
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("dst").is_some() && e["mac"] != "00:00:00:00:00:00")
        .map(|e| {
            let mut flags: Vec<String> = e["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            flags.push(e["state"].as_str().unwrap_or("").to_string());
            (
                e["mac"].as_str().unwrap().to_string(),
                e["dst"].as_str().unwrap().to_string(),
                flags,
            )
        })
        .collect()
}

#[test]
fn fdb_replace_list_delete() {
    let Some(n) = node() else { return };
    let vx =
        n.nl.create_vxlan(&flannel_spec(&n, [0x0e, 0, 0, 0, 0, 1]))
            .unwrap()
            .index;
    let mac = [0xbe, 0x55, 0xaa, 0xbf, 0x94, 0x77];
    let a = Fdb {
        mac,
        dst: ip("10.77.0.2"),
    };
    let b = Fdb {
        mac: [0xbe, 0x55, 0xaa, 0xbf, 0x94, 0x78],
        dst: ip("10.77.0.3"),
    };
    n.nl.replace_fdb(vx, &a).unwrap();
    n.nl.replace_fdb(vx, &a).unwrap(); // idempotent
    n.nl.replace_fdb(vx, &b).unwrap();
    let mut listed = n.nl.fdbs(vx).unwrap();
    listed.sort();
    assert_eq!(listed, [a, b]);
    let shown = bridge_fdbs(&n.ns, "flannel.1");
    let ours: BTreeSet<_> = listed
        .iter()
        .map(|f| {
            (
                mac_str(&f.mac),
                f.dst.to_string(),
                vec!["self".to_string(), "permanent".to_string()],
            )
        })
        .collect();
    assert_eq!(shown, ours);
    // flanneld's line: `be:55:aa:bf:94:77 dev flannel.1 dst 10.77.0.2 self permanent`.
    let text = n.ns.exec_ok(&["bridge", "fdb", "show", "dev", "flannel.1"]);
    assert!(
        text.lines()
            .any(|l| l == "be:55:aa:bf:94:77 dst 10.77.0.2 self permanent"),
        "{text}"
    );

    // A MAC that moves: replacing it changes its dst (one entry, not two).
    let moved = Fdb {
        dst: ip("10.77.0.4"),
        ..b
    };
    n.nl.replace_fdb(vx, &moved).unwrap();
    let mut listed = n.nl.fdbs(vx).unwrap();
    listed.sort();
    assert_eq!(listed, [a, moved]);
    assert!(!n.nl.del_fdb(vx, &b).unwrap(), "the old dst is gone");

    // IPv6 destinations, the all-zero flood entry (not ours, not listed).
    let v6 = Fdb {
        mac: [0xbe, 0x55, 0xaa, 0xbf, 0x94, 0x80],
        dst: ip("fd00:77::2"),
    };
    // A v4 vxlan device takes v4 destinations only.
    let e = n.nl.replace_fdb(vx, &v6).unwrap_err();
    assert!(
        e.msg
            .ends_with("Address family not supported by protocol (os error 97)"),
        "{}",
        e.msg
    );
    n.ns.exec_ok(&[
        "bridge",
        "fdb",
        "append",
        "00:00:00:00:00:00",
        "dev",
        "flannel.1",
        "dst",
        "10.77.0.9",
    ]);
    let listed: BTreeSet<_> = n.nl.fdbs(vx).unwrap().into_iter().collect();
    assert!(listed.contains(&a) && listed.contains(&moved));
    assert!(listed.iter().all(|f| f.mac != [0; 6]));

    assert!(n.nl.del_fdb(vx, &a).unwrap());
    assert!(!n.nl.del_fdb(vx, &a).unwrap(), "already gone");
    assert!(n.nl.del_fdb(vx, &moved).unwrap());
    assert_eq!(n.nl.fdbs(vx).unwrap(), []);
    assert!(!n.nl.del_fdb(999_999, &a).unwrap(), "no device, no entry");
}

#[test]
fn fdb_on_an_ipv6_vxlan() {
    let Some(n) = node() else { return };
    let vx =
        n.nl.create_vxlan(&VxlanSpec {
            name: "flannel-v6.1".into(),
            local: ip("fd00:77::1"),
            mtu: 1430,
            ..flannel_spec(&n, [0x0e, 0, 0, 0, 0, 6])
        })
        .unwrap()
        .index;
    let f = Fdb {
        mac: [0xbe, 0x55, 0xaa, 0xbf, 0x94, 0x77],
        dst: ip("fd00:77::2"),
    };
    n.nl.replace_fdb(vx, &f).unwrap();
    assert_eq!(n.nl.fdbs(vx).unwrap(), [f]);
    let text =
        n.ns.exec_ok(&["bridge", "fdb", "show", "dev", "flannel-v6.1"]);
    assert!(
        text.lines()
            .any(|l| l == "be:55:aa:bf:94:77 dst fd00:77::2 self permanent"),
        "{text}"
    );
    let nb = Neigh {
        ip: ip("fd44:0:0:14::"),
        mac: f.mac,
    };
    n.nl.replace_neigh(vx, &nb).unwrap();
    let r = OwnedRoute {
        dst: net("fd44:0:0:14::/64"),
        gw: nb.ip,
        oif: Some(vx),
        onlink: true,
        protocol: PROTO,
        nh: None,
    };
    n.nl.replace_owned_route(&r).unwrap();
    assert_eq!(n.nl.owned_routes(false, PROTO).unwrap(), [r]);
    let text =
        n.ns.exec_ok(&["ip", "-6", "route", "show", "proto", &PROTO.to_string()]);
    assert_eq!(
        text.trim(),
        "fd44:0:0:14::/64 via fd44:0:0:14:: dev flannel-v6.1 metric 1024 onlink pref medium"
    );
    // Taking over flanneld's v6 route (proto boot), as for v4.
    n.ns.exec_ok(&[
        "ip",
        "-6",
        "route",
        "add",
        "fd44:0:0:15::/64",
        "via",
        "fd44:0:0:15::",
        "dev",
        "flannel-v6.1",
        "onlink",
        "proto",
        "boot",
    ]);
    let taken = OwnedRoute {
        dst: net("fd44:0:0:15::/64"),
        gw: ip("fd44:0:0:15::"),
        ..r
    };
    n.nl.replace_owned_route(&taken).unwrap();
    let shown =
        n.ns.exec_ok(&["ip", "-6", "route", "show", "fd44:0:0:15::/64"]);
    assert_eq!(
        shown.trim(),
        "fd44:0:0:15::/64 via fd44:0:0:15:: dev flannel-v6.1 proto 200 metric 1024 onlink pref medium"
    );
    assert!(n.nl.del_owned_route(&taken).unwrap());
    assert!(n.nl.del_fdb(vx, &f).unwrap());
    assert!(n.nl.del_owned_route(&r).unwrap());
    assert!(!n.nl.del_owned_route(&r).unwrap());
}

/// `ip route show proto N` as text lines (sorted).
fn ip_routes(ns: &TestNetns, v4: bool, proto: u8) -> Vec<String> {
    let fam = if v4 { "-4" } else { "-6" };
    let text = ns.exec_ok(&["ip", fam, "route", "show", "proto", &proto.to_string()]);
    let mut lines: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    lines.sort();
    lines
}

#[test]
fn owned_routes_replace_list_delete() {
    let Some(n) = node() else { return };
    let vx =
        n.nl.create_vxlan(&flannel_spec(&n, [0x0e, 0, 0, 0, 0, 1]))
            .unwrap()
            .index;
    // flanneld's vxlan route, exactly.
    let vxr = OwnedRoute {
        dst: net("10.244.27.0/24"),
        gw: ip("10.244.27.0"),
        oif: Some(vx),
        onlink: true,
        protocol: PROTO,
        nh: None,
    };
    n.nl.replace_owned_route(&vxr).unwrap();
    n.nl.replace_owned_route(&vxr).unwrap(); // idempotent
    // A host-gw route: via the peer's public IP, device left to the kernel.
    let hgw = OwnedRoute {
        dst: net("10.244.30.0/24"),
        gw: ip("10.77.0.2"),
        oif: None,
        onlink: false,
        protocol: PROTO,
        nh: None,
    };
    n.nl.replace_owned_route(&hgw).unwrap();
    // Routes that are not ours, to the side.
    n.ns.exec_ok(&["ip", "route", "add", "10.250.0.0/24", "via", "10.77.0.3"]);
    n.ns.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.251.0.0/24",
        "via",
        "10.77.0.3",
        "proto",
        "201",
    ]);
    n.ns.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.252.0.0/24",
        "via",
        "10.77.0.3",
        "proto",
        "200",
        "table",
        "7",
    ]);
    let mut listed = n.nl.owned_routes(true, PROTO).unwrap();
    listed.sort();
    let hgw_read = OwnedRoute {
        oif: Some(n.ul),
        ..hgw
    };
    assert_eq!(
        listed,
        [vxr, hgw_read],
        "the kernel's choice of device reads back"
    );
    assert_eq!(
        ip_routes(&n.ns, true, PROTO),
        [
            "10.244.27.0/24 via 10.244.27.0 dev flannel.1 onlink",
            "10.244.30.0/24 via 10.77.0.2 dev ul0",
        ]
    );
    assert_eq!(n.nl.owned_routes(false, PROTO).unwrap(), []);
    assert_eq!(n.nl.owned_routes(true, 201).unwrap().len(), 1);

    // A route flanneld left behind (proto boot) to a destination we want is
    // taken over by the replace, not duplicated.
    n.ns.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.244.40.0/24",
        "via",
        "10.244.40.0",
        "dev",
        "flannel.1",
        "onlink",
        "proto",
        "boot",
    ]);
    let taken = OwnedRoute {
        dst: net("10.244.40.0/24"),
        gw: ip("10.244.40.0"),
        ..vxr
    };
    n.nl.replace_owned_route(&taken).unwrap();
    let shown = n.ns.exec_ok(&["ip", "route", "show", "10.244.40.0/24"]);
    assert_eq!(
        shown.trim(),
        "10.244.40.0/24 via 10.244.40.0 dev flannel.1 proto 200 onlink"
    );
    assert!(n.nl.del_owned_route(&taken).unwrap());

    // Replacing changes the gateway in place.
    let moved = OwnedRoute {
        gw: ip("10.77.0.4"),
        ..hgw
    };
    n.nl.replace_owned_route(&moved).unwrap();
    assert_eq!(
        ip_routes(&n.ns, true, PROTO)[1],
        "10.244.30.0/24 via 10.77.0.4 dev ul0"
    );
    // A route someone else owns is not ours to delete, even with the same dst.
    let foreign = OwnedRoute {
        dst: net("10.251.0.0/24"),
        gw: ip("10.77.0.3"),
        oif: None,
        onlink: false,
        protocol: PROTO,
        nh: None,
    };
    assert!(!n.nl.del_owned_route(&foreign).unwrap());
    assert_eq!(n.nl.owned_routes(true, 201).unwrap().len(), 1);

    assert!(n.nl.del_owned_route(&vxr).unwrap());
    assert!(!n.nl.del_owned_route(&vxr).unwrap(), "already gone");
    assert!(!n.nl.del_owned_route(&hgw).unwrap(), "gateway differs");
    assert!(n.nl.del_owned_route(&moved).unwrap());
    assert_eq!(n.nl.owned_routes(true, PROTO).unwrap(), []);
    assert_eq!(ip_routes(&n.ns, true, PROTO), Vec::<String>::new());

    // Without onlink the vxlan route needs a connected route to its gateway.
    let e =
        n.nl.replace_owned_route(&OwnedRoute {
            onlink: false,
            ..vxr
        })
        .unwrap_err();
    assert_eq!(
        e.msg,
        format!(
            "replacing route 10.244.27.0/24 via 10.244.27.0 dev #{vx} proto 200: Network is unreachable (os error 101)"
        )
    );
    let e =
        n.nl.replace_owned_route(&OwnedRoute {
            gw: ip("fd00::1"),
            ..vxr
        })
        .unwrap_err();
    assert_eq!(e.code, 7, "{}", e.msg);
}

#[test]
fn apply_ops_results_follow_op_order() {
    let Some(n) = node() else { return };
    let vx =
        n.nl.create_vxlan(&flannel_spec(&n, [0x0e, 0, 0, 0, 0, 1]))
            .unwrap()
            .index;
    let nb = Neigh {
        ip: ip("10.244.5.0"),
        mac: [2, 0, 0, 0, 5, 0],
    };
    let fdb = Fdb {
        mac: nb.mac,
        dst: ip("10.77.0.5"),
    };
    let route = OwnedRoute {
        dst: net("10.244.5.0/24"),
        gw: nb.ip,
        oif: Some(vx),
        onlink: true,
        protocol: PROTO,
        nh: None,
    };
    let off_link = OwnedRoute {
        onlink: false,
        dst: net("10.244.6.0/24"),
        gw: ip("10.244.6.0"),
        ..route
    };
    let results = n.nl.apply_ops(&[
        NetOp::ReplaceNeigh(vx, nb),
        NetOp::ReplaceFdb(vx, fdb),
        NetOp::ReplaceRoute(off_link),
        NetOp::ReplaceRoute(route),
        NetOp::DelNeigh(vx, ip("10.244.7.0")),
        NetOp::DelFdb(
            vx,
            Fdb {
                dst: ip("10.77.0.7"),
                ..fdb
            },
        ),
        NetOp::DelRoute(off_link),
    ]);
    let brief: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().map_err(|e| e.code))
        .collect();
    assert_eq!(
        brief,
        [
            Ok(&()),
            Ok(&()),
            Err(999),
            Ok(&()),
            Ok(&()),
            Ok(&()),
            Ok(&())
        ],
        "{results:?}"
    );
    assert!(
        results[2]
            .as_ref()
            .unwrap_err()
            .msg
            .contains("10.244.6.0/24"),
        "{results:?}"
    );
    assert_eq!(n.nl.neighs(vx, true).unwrap(), [nb]);
    assert_eq!(n.nl.fdbs(vx).unwrap(), [fdb]);
    assert_eq!(n.nl.owned_routes(true, PROTO).unwrap(), [route]);
    assert!(n.nl.apply_ops(&[]).is_empty());
}

/// Drops counted on this namespace's netlink sockets (`/proc/net/netlink`):
/// what a receive-buffer overrun (ENOBUFS) would show.
fn netlink_drops(ns: &TestNetns) -> u64 {
    let table = ns.exec_ok(&["cat", "/proc/net/netlink"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let col = header.iter().position(|h| *h == "Drops").unwrap();
    lines
        .map(|l| {
            l.split_whitespace()
                .nth(col)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn ten_thousand_peers_through_apply_ops() {
    let Some(n) = node() else { return };
    let vx =
        n.nl.create_vxlan(&flannel_spec(&n, [0x0e, 0, 0, 0, 0, 1]))
            .unwrap()
            .index;
    const PEERS: u32 = 10_000;
    let peer = |i: u32| {
        let (hi, lo) = ((i >> 8) as u8, i as u8);
        let subnet_ip = ip(&format!("10.{}.{lo}.0", 100 + hi));
        let mac = [0x02, 0x42, 0, 0, hi, lo];
        (
            Neigh { ip: subnet_ip, mac },
            Fdb {
                mac,
                dst: ip(&format!("172.16.{hi}.{lo}")),
            },
            OwnedRoute {
                dst: IpNet::new(subnet_ip, 24).unwrap(),
                gw: subnet_ip,
                oif: Some(vx),
                onlink: true,
                protocol: PROTO,
                nh: None,
            },
        )
    };
    let peers: Vec<_> = (0..PEERS).map(peer).collect();
    let neigh_ops: Vec<NetOp> = peers.iter().map(|p| NetOp::ReplaceNeigh(vx, p.0)).collect();
    let fdb_ops: Vec<NetOp> = peers.iter().map(|p| NetOp::ReplaceFdb(vx, p.1)).collect();
    let route_ops: Vec<NetOp> = peers.iter().map(|p| NetOp::ReplaceRoute(p.2)).collect();
    let drops_before = netlink_drops(&n.ns);
    let timed = |ops: &[NetOp]| {
        let t = Instant::now();
        let results = n.nl.apply_ops(ops);
        let took = t.elapsed();
        assert_eq!(results.len(), ops.len());
        if let Some((i, Err(e))) = results.iter().enumerate().find(|(_, r)| r.is_err()) {
            panic!("op {i} ({}) failed: {}", ops[i], e.msg);
        }
        took
    };

    // flanneld's order, one kind after the other: neighbours, FDB, routes.
    let neigh_add = timed(&neigh_ops);
    let fdb_add = timed(&fdb_ops);
    let route_add = timed(&route_ops);
    let all: Vec<NetOp> = [&neigh_ops[..], &fdb_ops, &route_ops].concat();
    let reapply = timed(&all);

    let t = Instant::now();
    let neighs = n.nl.neighs(vx, true).unwrap();
    let neigh_list = t.elapsed();
    let t = Instant::now();
    let fdbs = n.nl.fdbs(vx).unwrap();
    let fdb_list = t.elapsed();
    let t = Instant::now();
    let routes = n.nl.owned_routes(true, PROTO).unwrap();
    let route_list = t.elapsed();
    assert_eq!(
        neighs.into_iter().collect::<BTreeSet<_>>(),
        peers.iter().map(|p| p.0).collect()
    );
    assert_eq!(
        fdbs.into_iter().collect::<BTreeSet<_>>(),
        peers.iter().map(|p| p.1).collect()
    );
    assert_eq!(
        routes.into_iter().collect::<BTreeSet<_>>(),
        peers.iter().map(|p| p.2).collect()
    );
    // iproute2 agrees on the counts.
    let count = |argv: &[&str]| n.ns.exec_ok(argv).lines().count();
    assert_eq!(
        count(&[
            "ip",
            "-4",
            "neigh",
            "show",
            "dev",
            "flannel.1",
            "nud",
            "permanent"
        ]),
        PEERS as usize
    );
    let fdb_lines = n.ns.exec_ok(&["bridge", "fdb", "show", "dev", "flannel.1"]);
    assert_eq!(
        fdb_lines
            .lines()
            .filter(|l| l.contains(" dst 172.16.") && l.ends_with("self permanent"))
            .count(),
        PEERS as usize
    );
    assert_eq!(
        count(&["ip", "-4", "route", "show", "proto", "200"]),
        PEERS as usize
    );

    // Tear down in reverse (routes, FDB entries, neighbours), in one call.
    let dels: Vec<NetOp> = all
        .iter()
        .rev()
        .map(|op| match op {
            NetOp::ReplaceNeigh(d, nb) => NetOp::DelNeigh(*d, nb.ip),
            NetOp::ReplaceFdb(d, f) => NetOp::DelFdb(*d, *f),
            NetOp::ReplaceRoute(r) => NetOp::DelRoute(*r),
            other => other.clone(),
        })
        .collect();
    let delete = timed(&dels);
    let delete_absent = timed(&dels);
    assert_eq!(n.nl.neighs(vx, true).unwrap(), []);
    assert_eq!(n.nl.fdbs(vx).unwrap(), []);
    assert_eq!(n.nl.owned_routes(true, PROTO).unwrap(), []);

    // The kernel's share of the route time: iproute2 loading the same routes,
    // and the same routes with a metric each. IPv4 hashes next-hop info by
    // device, protocol, metric and source, not gateway, so flanneld-style routes
    // (a gateway per peer, one device, metric 0) all land in one hash chain.
    let dir = TempDir::new("overlay-batch");
    let batch = |metric: bool| {
        let lines: String = peers
            .iter()
            .zip(1..)
            .map(|(p, m)| {
                let r = &p.2;
                let metric = if metric {
                    format!(" metric {m}")
                } else {
                    String::new()
                };
                format!(
                    "route replace {} via {} dev flannel.1 onlink proto {PROTO}{metric}\n",
                    r.dst, r.gw
                )
            })
            .collect();
        let path = dir.join(if metric { "metric" } else { "plain" });
        std::fs::write(&path, lines).unwrap();
        let t = Instant::now();
        n.ns.exec_ok(&["ip", "-batch", path.to_str().unwrap()]);
        let took = t.elapsed();
        n.ns.exec_ok(&["ip", "route", "flush", "proto", &PROTO.to_string()]);
        took
    };
    let (iproute2_plain, iproute2_metric) = (batch(false), batch(true));

    let drops = netlink_drops(&n.ns) - drops_before;
    assert_eq!(drops, 0, "netlink socket overruns (ENOBUFS)");
    println!(
        "{PEERS} peers: add neighbours {neigh_add:?}, fdb {fdb_add:?}, routes {route_add:?} \
         (ip -batch: {iproute2_plain:?}, with a metric each {iproute2_metric:?}); \
         re-apply all {} {reapply:?}; \
         list neighbours {neigh_list:?}, fdb {fdb_list:?}, routes {route_list:?}; \
         delete all {delete:?}, again (absent) {delete_absent:?}; netlink drops {drops}",
        all.len()
    );
}

/// Two nodes joined by a veth underlay, each with flanneld's vxlan device and
/// the other programmed as a peer the way flanneld does (neighbour → FDB →
/// on-link route): pings cross the overlay, v4 and v6.
#[test]
fn traffic_crosses_the_overlay() {
    if !require_root() {
        return;
    }
    let (a, b) = (TestNetns::new(), TestNetns::new());
    join(&a, ("ul0", "10.77.0.1/24"), &b, ("ul0", "10.77.0.2/24"));
    a.exec_ok(&["ip", "addr", "add", "fd00:77::1/64", "dev", "ul0", "nodad"]);
    b.exec_ok(&["ip", "addr", "add", "fd00:77::2/64", "dev", "ul0", "nodad"]);
    struct Side<'a> {
        ns: &'a TestNetns,
        nl: Netlink,
        public: (&'static str, &'static str),
        subnet: (&'static str, &'static str),
        v4: VxlanInfo,
        v6: VxlanInfo,
    }
    let mut sides = Vec::new();
    for (k, ns) in [(1u8, &a), (2u8, &b)] {
        let nl = Netlink::in_netns(&NetNs::open(ns.path()).unwrap()).unwrap();
        let ul = nl.link_by_name("ul0").unwrap().unwrap().index;
        let (public, subnet) = if k == 1 {
            (("10.77.0.1", "fd00:77::1"), ("10.244.1.0", "fd44:0:0:1::"))
        } else {
            (("10.77.0.2", "fd00:77::2"), ("10.244.2.0", "fd44:0:0:2::"))
        };
        let v4 = nl
            .create_vxlan(&VxlanSpec {
                name: "flannel.1".into(),
                vni: 1,
                local: ip(public.0),
                dev: ul,
                port: 0,
                learning: false,
                gbp: false,
                mtu: 1450,
                mac: [0x0e, 0x44, 0, 0, 0, k],
            })
            .unwrap();
        let v6 = nl
            .create_vxlan(&VxlanSpec {
                name: "flannel-v6.1".into(),
                vni: 1,
                local: ip(public.1),
                dev: ul,
                port: 0,
                learning: false,
                gbp: false,
                mtu: 1430,
                mac: [0x0e, 0x66, 0, 0, 0, k],
            })
            .unwrap();
        // flanneld's own addresses: the subnet address, /32 (/128).
        nl.add_address(v4.index, IpNet::new(ip(subnet.0), 32).unwrap())
            .unwrap();
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/128", subnet.1),
            "dev",
            "flannel-v6.1",
            "nodad",
        ]);
        sides.push(Side {
            ns,
            nl,
            public,
            subnet,
            v4,
            v6,
        });
    }
    for (me, peer) in [(0, 1), (1, 0)] {
        let (s, p) = (&sides[me], &sides[peer]);
        for (dev, pmac, pub_ip, sub, len) in [
            (s.v4.index, &p.v4.mac, p.public.0, p.subnet.0, 24),
            (s.v6.index, &p.v6.mac, p.public.1, p.subnet.1, 64),
        ] {
            let mac: [u8; 6] = pmac.as_slice().try_into().unwrap();
            let results = s.nl.apply_ops(&[
                NetOp::ReplaceNeigh(dev, Neigh { ip: ip(sub), mac }),
                NetOp::ReplaceFdb(
                    dev,
                    Fdb {
                        mac,
                        dst: ip(pub_ip),
                    },
                ),
            ]);
            assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
            s.nl.replace_owned_route(&OwnedRoute {
                dst: IpNet::new(ip(sub), len).unwrap(),
                gw: ip(sub),
                oif: Some(dev),
                onlink: true,
                protocol: PROTO,
                nh: None,
            })
            .unwrap();
        }
    }
    for (s, p) in [(&sides[0], &sides[1]), (&sides[1], &sides[0])] {
        for target in [p.subnet.0, p.subnet.1] {
            let out =
                s.ns.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", target]);
            assert!(
                out.status.success(),
                "{} cannot reach {target} over vxlan: {}{}",
                s.public.0,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // The traffic went through the vxlan devices, encapsulated on the underlay.
    let stats = sides[0]
        .ns
        .exec_json(&["ip", "-j", "-s", "link", "show", "flannel.1"]);
    assert!(
        stats[0]["stats64"]["rx"]["packets"].as_u64().unwrap() >= 2,
        "{stats}"
    );
}

/// A host-gw lease of `subnet` at `public`.
fn host_gw_lease(subnet: &str, public: &str) -> Lease {
    Lease {
        key: SubnetKey {
            v4: Some(subnet.parse().unwrap()),
            v6: None,
        },
        attrs: LeaseAttrs {
            public_ip: public.parse().unwrap(),
            public_ipv6: None,
            backend_type: "host-gw".into(),
            backend_data: None,
            backend_v6_data: None,
        },
        etcd_lease: 0,
        ttl: None,
    }
}

/// IPv4 peer routes go through nexthop objects of ours, whose id is the subnet's
/// address; a nexthop of another owner with that id is never replaced or deleted
/// (the route keeps its own gateway instead), and a resync repairs and removes
/// nexthops like any other entry.
#[test]
fn peer_routes_use_nexthop_objects_of_ours_only() {
    let Some(n) = node() else { return };
    let id = |subnet: &str| u32::from(subnet.parse::<std::net::Ipv4Addr>().unwrap());
    let (taken, free) = (id("10.244.5.0"), id("10.244.6.0"));
    // Someone else's nexthop holds the id 10.244.5.0 would get.
    let foreign = format!("id {taken} via 10.77.0.9 dev ul0 scope link proto static");
    n.ns.exec_ok(&[
        "ip",
        "nexthop",
        "add",
        "id",
        &taken.to_string(),
        "via",
        "10.77.0.9",
        "dev",
        "ul0",
        "proto",
        "static",
    ]);
    let ext = ExtLink {
        index: n.ul,
        mtu: 1500,
        addrs: vec![net("10.77.0.1/24")],
    };
    let plane = DataPlane::prepare(&n.nl, Kind::HostGw, ext, Some(ip("10.77.0.1")), None).unwrap();
    let peers = [
        host_gw_lease("10.244.5.0/24", "10.77.0.5"),
        host_gw_lease("10.244.6.0/24", "10.77.0.6"),
    ];
    let converge = |peers: &[Lease]| {
        let (_, failed) = plane.converge(&n.nl, &plane.desired(peers)).unwrap();
        failed.into_iter().map(|(_, e)| e.msg).collect::<Vec<_>>()
    };
    let nexthops = || {
        let mut v: Vec<String> =
            n.ns.exec_ok(&["ip", "nexthop", "show"])
                .lines()
                .map(|l| l.trim().to_string())
                .collect();
        v.sort();
        v
    };
    let ours = format!("id {free} via 10.77.0.6 dev ul0 scope link proto 87");
    let want_routes = [
        "10.244.5.0/24 via 10.77.0.5 dev ul0".to_string(),
        format!("10.244.6.0/24 nhid {free} via 10.77.0.6 dev ul0"),
    ];

    let failed = converge(&peers);
    assert_eq!(
        failed,
        [format!(
            "writing nexthop id {taken} via 10.77.0.5 dev #{} proto 87: the id is taken by a nexthop of protocol 4, not ours",
            n.ul
        )]
    );
    assert_eq!(ip_routes(&n.ns, true, 87), want_routes);
    assert_eq!(nexthops(), [foreign.clone(), ours.clone()]);
    // The fallback stays: the next resync writes nothing and reports nothing.
    assert_eq!(converge(&peers), Vec::<String>::new());
    assert_eq!(ip_routes(&n.ns, true, 87), want_routes);
    assert_eq!(
        n.nl.owned_nexthops(87)
            .unwrap()
            .iter()
            .map(|h| h.id)
            .collect::<Vec<_>>(),
        [free]
    );

    // Deleting our nexthop by hand takes its route with it: both come back.
    n.ns.exec_ok(&["ip", "nexthop", "del", "id", &free.to_string()]);
    assert_eq!(ip_routes(&n.ns, true, 87), want_routes[..1]);
    converge(&peers);
    assert_eq!(ip_routes(&n.ns, true, 87), want_routes);
    // A peer that moved: its nexthop is replaced in place.
    let moved = [
        peers[0].clone(),
        host_gw_lease("10.244.6.0/24", "10.77.0.7"),
    ];
    converge(&moved);
    assert_eq!(
        ip_routes(&n.ns, true, 87)[1],
        format!("10.244.6.0/24 nhid {free} via 10.77.0.7 dev ul0")
    );
    // A nexthop of ours that no route needs (a crash between the two writes) goes.
    n.ns.exec_ok(&[
        "ip",
        "nexthop",
        "add",
        "id",
        "4242",
        "via",
        "10.77.0.8",
        "dev",
        "ul0",
        "proto",
        "87",
    ]);
    converge(&moved);
    assert_eq!(nexthops().len(), 2, "{:?}", nexthops());

    // The peers leave: our routes and nexthop go, the foreign nexthop stays.
    assert_eq!(converge(&[]), Vec::<String>::new());
    assert_eq!(ip_routes(&n.ns, true, 87), Vec::<String>::new());
    assert_eq!(nexthops(), std::slice::from_ref(&foreign));
    // A delete of that id by the plan's op leaves it alone too.
    assert!(n.nl.apply_ops(&[NetOp::DelNexthop(taken, 87)])[0].is_ok());
    assert_eq!(nexthops(), [foreign]);
}
