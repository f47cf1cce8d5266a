//! weft-core's `node_masq` (weftd's `--ip-masq`) against real nftables and real
//! traffic, each test in throwaway network namespaces (never the host's ruleset). The
//! code under test runs on a thread inside the node's namespace (`NetNs::run`), so the
//! `nft` processes it spawns live there; the checks go through `nsenter … nft`.

use netns_tests::{
    TestNetns, exec_line, has_nft_table, inside, join, nft, nft_delete_rule, require_root,
};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;
use weft_core::node_masq::{self, NodeMasq};

fn table(ns: &TestNetns) -> String {
    nft(ns, &["list", "table", "inet", node_masq::TABLE])
}

fn has_table(ns: &TestNetns) -> bool {
    has_nft_table(ns, "inet", node_masq::TABLE)
}

fn v4() -> NodeMasq {
    NodeMasq {
        network_v4: Some("10.244.0.0/16".parse().unwrap()),
        subnet_v4: Some("10.244.1.0/24".parse().unwrap()),
        network_v6: None,
        subnet_v6: None,
        fully_random: true,
        forward_rules: true,
        masquerade: true,
    }
}

fn dual() -> NodeMasq {
    NodeMasq {
        network_v6: Some("fd00:10:244::/56".parse().unwrap()),
        subnet_v6: Some("fd00:10:244:1::/64".parse().unwrap()),
        ..v4()
    }
}

fn apply(ns: &TestNetns, nm: &NodeMasq) {
    inside(ns, || nm.apply()).unwrap();
}

fn check(ns: &TestNetns, nm: &NodeMasq) -> Result<(), String> {
    inside(ns, || nm.check())
}

/// `check` fails naming each of `wants`; `apply` repairs, and `check` passes.
fn assert_repaired(ns: &TestNetns, nm: &NodeMasq, wants: &[&str]) {
    let err = check(ns, nm).unwrap_err();
    for want in wants {
        assert!(err.contains(want), "{want}: {err}");
    }
    apply(ns, nm);
    check(ns, nm).unwrap();
}

const EXPECTED_V4: &str = r#"table inet weft_node {
	comment "weftd ip-masq and forward rules - managed by weftd, do not edit"
	chain postrtg {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return comment "weft ip-masq: kube-proxy mark 0x4000, kube-proxy masquerades it"
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return comment "weft ip-masq v4: node pods to cluster network, keep source"
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return comment "weft ip-masq v4: cluster network to node pods, keep source"
		ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return comment "weft ip-masq v4: outside to node pods, keep source"
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random comment "weft ip-masq v4: cluster network to outside but multicast, masquerade"
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random comment "weft ip-masq v4: outside to cluster network, masquerade"
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept comment "weft forward v4: from cluster network"
		ip daddr 10.244.0.0/16 accept comment "weft forward v4: to cluster network"
	}
}
"#;

#[test]
fn apply_installs_the_table_and_check_passes() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let nm = v4();
    assert!(check(&ns, &nm).unwrap_err().contains("does not exist"));
    apply(&ns, &nm);
    assert_eq!(table(&ns), EXPECTED_V4);
    check(&ns, &nm).unwrap();
    // Idempotent: a second apply leaves the same table.
    apply(&ns, &nm);
    assert_eq!(table(&ns), EXPECTED_V4);
    check(&ns, &nm).unwrap();

    // Dual-stack: the IPv6 rules follow the IPv4 ones, with ff00::/8.
    let nm = dual();
    assert!(check(&ns, &nm).unwrap_err().contains("v6"));
    apply(&ns, &nm);
    let listing = table(&ns);
    for want in [
        "ip6 saddr fd00:10:244:1::/64 ip6 daddr fd00:10:244::/56 return",
        "ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244:1::/64 return",
        "ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random",
        "ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 masquerade fully-random",
        "ip6 daddr fd00:10:244::/56 accept",
    ] {
        assert!(listing.contains(want), "{want}: {listing}");
    }
    assert_eq!(listing.matches("comment \"weft ").count(), 15, "{listing}");
    assert_eq!(listing.matches("kube-proxy mark").count(), 1, "{listing}");
    check(&ns, &nm).unwrap();
    // The IPv4-only configuration sees the IPv6 rules as unexpected.
    let err = check(&ns, &v4()).unwrap_err();
    assert!(
        err.contains("unexpected rule") && err.contains("ip6"),
        "{err}"
    );

    // Without fully-random: check sees the difference, apply changes it.
    let plain = NodeMasq {
        fully_random: false,
        ..dual()
    };
    let err = check(&ns, &plain).unwrap_err();
    assert!(
        err.contains("expected `ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade`"),
        "{err}"
    );
    apply(&ns, &plain);
    assert!(!table(&ns).contains("fully-random"));
    check(&ns, &plain).unwrap();
}

#[test]
fn check_names_a_rule_deleted_by_hand_and_apply_repairs() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let nm = dual();
    apply(&ns, &nm);
    check(&ns, &nm).unwrap();

    let comment = "weft ip-masq v4: outside to node pods, keep source";
    nft_delete_rule(&ns, "inet weft_node postrtg", comment);
    let err = check(&ns, &nm).unwrap_err();
    assert_eq!(
        err,
        format!(
            "chain postrtg: rule \"{comment}\" is missing \
             (`ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return`)"
        )
    );
    apply(&ns, &nm);
    check(&ns, &nm).unwrap();

    // A forward rule deleted, a policy changed, a rule added.
    nft_delete_rule(
        &ns,
        "inet weft_node forward",
        "weft forward v6: to cluster network",
    );
    exec_line(
        &ns,
        "nft add chain inet weft_node forward { type filter hook forward priority filter; policy drop; }",
    );
    exec_line(
        &ns,
        "nft insert rule inet weft_node postrtg counter masquerade",
    );
    assert_repaired(
        &ns,
        &nm,
        &[
            "chain postrtg: unexpected rule (handle ",
            "`{\"counter\":",
            "chain forward is `type filter hook forward prio 0 policy drop`",
            "rule \"weft forward v6: to cluster network\" is missing",
        ],
    );
    assert!(table(&ns).contains("policy accept"));

    // The nat chain re-created with another priority (`add chain` cannot change it
    // back), a foreign chain and set in our table: apply replaces the table.
    nft(&ns, &["flush", "chain", "inet", "weft_node", "postrtg"]);
    nft(&ns, &["delete", "chain", "inet", "weft_node", "postrtg"]);
    exec_line(
        &ns,
        "nft add chain inet weft_node postrtg { type nat hook postrouting priority 50; policy accept; }",
    );
    nft(&ns, &["add", "chain", "inet", "weft_node", "extra"]);
    exec_line(&ns, "nft add set inet weft_node s { type ipv4_addr; }");
    assert_repaired(
        &ns,
        &nm,
        &[
            "chain postrtg is `type nat hook postrouting prio 50 policy accept`",
            "rule \"weft ip-masq: kube-proxy mark 0x4000, kube-proxy masquerades it\" is missing",
            "unexpected chain extra",
            "unexpected set s",
        ],
    );
    let listing = table(&ns);
    assert!(
        !listing.contains("extra") && !listing.contains("set s"),
        "{listing}"
    );

    // The table deleted by hand.
    nft(&ns, &["delete", "table", "inet", "weft_node"]);
    assert_eq!(
        check(&ns, &nm).unwrap_err(),
        "table inet weft_node does not exist"
    );
    apply(&ns, &nm);
    check(&ns, &nm).unwrap();
}

#[test]
fn flags_select_the_chains_and_remove_is_idempotent() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    apply(&ns, &v4());

    // Forward rules only: the nat chain goes.
    let fwd = NodeMasq {
        masquerade: false,
        subnet_v4: None,
        ..v4()
    };
    assert!(
        check(&ns, &fwd)
            .unwrap_err()
            .contains("unexpected chain postrtg")
    );
    apply(&ns, &fwd);
    let listing = table(&ns);
    assert!(
        !listing.contains("postrtg") && listing.contains("chain forward"),
        "{listing}"
    );
    check(&ns, &fwd).unwrap();

    // Masquerade only.
    let masq = NodeMasq {
        forward_rules: false,
        ..v4()
    };
    apply(&ns, &masq);
    let listing = table(&ns);
    assert!(
        listing.contains("postrtg") && !listing.contains("chain forward"),
        "{listing}"
    );
    check(&ns, &masq).unwrap();

    // Both off: apply removes the table, and check wants it gone.
    let off = NodeMasq {
        masquerade: false,
        forward_rules: false,
        ..v4()
    };
    assert!(check(&ns, &off).unwrap_err().contains("are off"));
    apply(&ns, &off);
    assert!(!has_table(&ns));
    check(&ns, &off).unwrap();
    apply(&ns, &off);

    apply(&ns, &v4());
    assert!(has_table(&ns));
    inside(&ns, NodeMasq::remove).unwrap();
    assert!(!has_table(&ns));
    inside(&ns, NodeMasq::remove).unwrap();
    assert!(!has_table(&ns));
    assert!(check(&ns, &v4()).unwrap_err().contains("does not exist"));
}

#[test]
fn invalid_configuration_is_refused_before_nft_runs() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let bad = NodeMasq {
        subnet_v4: Some("10.245.1.0/24".parse().unwrap()),
        ..v4()
    };
    let err = inside(&ns, || bad.apply()).unwrap_err();
    assert_eq!(err.code, 7);
    assert!(
        err.msg
            .contains("subnet 10.245.1.0/24 is not inside the IPv4 network 10.244.0.0/16"),
        "{err:?}"
    );
    assert!(!has_table(&ns));
    assert!(check(&ns, &bad).unwrap_err().contains("not inside"));
}

#[test]
fn foreign_tables_are_untouched() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    // kube-proxy's nftables table and an iptables-nft-like one, each with a rule.
    nft(&ns, &["add", "table", "ip", "kube-proxy"]);
    exec_line(
        &ns,
        "nft add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority srcnat; policy accept; }",
    );
    exec_line(
        &ns,
        "nft add rule ip kube-proxy nat-postrouting meta mark & 0x4000 == 0x4000 masquerade",
    );
    nft(&ns, &["add", "table", "inet", "weft_masq"]);
    nft(&ns, &["add", "chain", "inet", "weft_masq", "c"]);
    let before = nft(&ns, &["list", "ruleset"]);
    apply(&ns, &dual());
    let during = nft(&ns, &["list", "ruleset"]);
    assert!(during.starts_with(&before), "{during}");
    inside(&ns, NodeMasq::remove).unwrap();
    assert_eq!(nft(&ns, &["list", "ruleset"]), before);
}

// ---------------------------------------------------------------------------------
// Traffic
// ---------------------------------------------------------------------------------

/// Connect over TCP from `from` to `addr:port`, where `to` listens, and return the
/// source address the listener sees.
fn source_seen(from: &TestNetns, to: &TestNetns, addr: &str, port: u16) -> IpAddr {
    let ip: IpAddr = addr.parse().unwrap();
    let any: IpAddr = if ip.is_ipv4() {
        "0.0.0.0".parse().unwrap()
    } else {
        "::".parse().unwrap()
    };
    // The socket stays in the namespace it was created in.
    let listener = inside(to, || TcpListener::bind(SocketAddr::new(any, port)))
        .unwrap_or_else(|e| panic!("listening on port {port}: {e}"));
    let dst = SocketAddr::new(ip, port);
    let conn = inside(from, || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    })
    .unwrap_or_else(|e| panic!("connecting to {dst}: {e}"));
    // The handshake is done: accept returns at once.
    let (_accepted, peer) = listener.accept().unwrap();
    drop(conn);
    peer.ip()
}

/// A connection from `from` to `addr:port`, where `to` listens, arrives from `want`.
fn assert_source(from: &TestNetns, to: &TestNetns, addr: &str, port: u16, want: &str) {
    let want: IpAddr = want.parse().unwrap();
    assert_eq!(source_seen(from, to, addr, port), want, "to {addr}:{port}");
}

/// pod (10.244.1.2, this node's subnet) — node — outside (192.0.2.1), and peer
/// (10.244.2.2, standing in for another node's pod) — node; with IPv6 as well.
#[test]
fn pods_are_masqueraded_to_the_outside_only() {
    if !require_root() {
        return;
    }
    let (node, pod, peer, outside) = (
        TestNetns::new(),
        TestNetns::new(),
        TestNetns::new(),
        TestNetns::new(),
    );
    join(
        &pod,
        ("eth0", "10.244.1.2/24"),
        &node,
        ("pod0", "10.244.1.1/24"),
    );
    join(
        &peer,
        ("eth0", "10.244.2.2/24"),
        &node,
        ("peer0", "10.244.2.1/24"),
    );
    join(
        &node,
        ("ext0", "192.0.2.2/24"),
        &outside,
        ("eth0", "192.0.2.1/24"),
    );
    for (ns, addr, dev) in [
        (&pod, "fd00:10:244:1::2/64", "eth0"),
        (&node, "fd00:10:244:1::1/64", "pod0"),
        (&node, "2001:db8::2/64", "ext0"),
        (&outside, "2001:db8::1/64", "eth0"),
    ] {
        ns.exec_ok(&["ip", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    pod.exec_ok(&["ip", "route", "add", "default", "via", "10.244.1.1"]);
    exec_line(&pod, "ip -6 route add default via fd00:10:244:1::1");
    peer.exec_ok(&["ip", "route", "add", "default", "via", "10.244.2.1"]);
    // The outside can route to the pods, so unmasqueraded traffic works too and the
    // source address alone tells whether it was masqueraded.
    outside.exec_ok(&["ip", "route", "add", "10.244.0.0/16", "via", "192.0.2.2"]);
    exec_line(&outside, "ip -6 route add fd00:10:244::/56 via 2001:db8::2");
    node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    node.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);

    // Before: nothing is masqueraded.
    assert_source(&pod, &outside, "192.0.2.1", 8000, "10.244.1.2");

    apply(&node, &dual());
    inside(&node, || dual().check()).unwrap();

    // This node's pods to the outside: masqueraded to the node's address there.
    assert_source(&pod, &outside, "192.0.2.1", 8001, "192.0.2.2");
    assert_source(&pod, &outside, "2001:db8::1", 8002, "2001:db8::2");
    // Pod to pod (another node's subnet) and back: the source is kept.
    assert_source(&pod, &peer, "10.244.2.2", 8003, "10.244.1.2");
    assert_source(&peer, &pod, "10.244.1.2", 8004, "10.244.2.2");
    // The outside to this node's pods: kept.
    assert_source(&outside, &pod, "10.244.1.2", 8005, "192.0.2.1");
    assert_source(&outside, &pod, "fd00:10:244:1::2", 8006, "2001:db8::1");
    // The outside to other nodes' pods: masqueraded.
    assert_source(&outside, &peer, "10.244.2.2", 8007, "10.244.2.1");

    // What kube-proxy marked 0x4000 is left to kube-proxy.
    nft(&node, &["add", "table", "ip", "kp_test"]);
    exec_line(
        &node,
        "nft add chain ip kp_test pre { type filter hook prerouting priority mangle; policy accept; }",
    );
    exec_line(
        &node,
        "nft add rule ip kp_test pre tcp dport 8008 meta mark set meta mark | 0x4000",
    );
    assert_source(&pod, &outside, "192.0.2.1", 8008, "10.244.1.2");
    assert_source(&pod, &outside, "192.0.2.1", 8009, "192.0.2.2");

    // Removed: new connections are not masqueraded any more.
    inside(&node, NodeMasq::remove).unwrap();
    assert_source(&pod, &outside, "192.0.2.1", 8010, "10.244.1.2");
}
