//! weft-core's netlink facade and sysctl module against a real kernel. One test
//! netns plays the node, another the pod; the host's own namespace is never used.

use ipnet::IpNet;
use netns_tests::{TestNetns, require_root};
use weft_core::netlink::Netlink;
use weft_core::netns::NetNs;
use weft_core::sysctl;

/// A node and a pod namespace, with a netlink handle on each.
struct World {
    node: TestNetns,
    pod: TestNetns,
    node_nl: Netlink,
    pod_nl: Netlink,
    pod_ns: NetNs,
}

fn world() -> Option<World> {
    if !require_root() {
        return None;
    }
    let (node, pod) = (TestNetns::new(), TestNetns::new());
    let node_nl = Netlink::in_netns(&NetNs::open(node.path()).unwrap()).unwrap();
    let pod_ns = NetNs::open(pod.path()).unwrap();
    let pod_nl = Netlink::in_netns(&pod_ns).unwrap();
    Some(World {
        node,
        pod,
        node_nl,
        pod_nl,
        pod_ns,
    })
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn bridge_is_created_once_up_and_typed() {
    let Some(w) = world() else { return };
    let (br, created) = w.node_nl.ensure_bridge("wbr0", Some(1400)).unwrap();
    assert!(created);
    assert_eq!(
        (br.kind.as_deref(), br.mtu, br.up),
        (Some("bridge"), 1400, true)
    );
    let (again, created) = w.node_nl.ensure_bridge("wbr0", None).unwrap();
    assert_eq!((again.index, created), (br.index, false), "idempotent");
    let shown = w
        .node
        .exec_json(&["ip", "-j", "-d", "link", "show", "wbr0"]);
    assert_eq!(shown[0]["linkinfo"]["info_kind"], "bridge");
    // A name taken by something else is refused, not reused.
    assert!(
        w.node_nl
            .create_veth("wveth0", "eth0", &w.pod_ns, None, None)
            .unwrap()
    );
    let e = w.node_nl.ensure_bridge("wveth0", None).unwrap_err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (7, "\"wveth0\" already exists but is not a bridge")
    );
}

#[test]
fn veth_peer_is_created_inside_the_pod() {
    let Some(w) = world() else { return };
    let mac = [0x0a, 0x58, 0x0a, 0x01, 0x00, 0x05];
    assert!(
        w.node_nl
            .create_veth("wveth1", "eth0", &w.pod_ns, Some(1450), Some(&mac))
            .unwrap()
    );
    let host = w.node_nl.link_by_name("wveth1").unwrap().unwrap();
    let peer = w.pod_nl.link_by_name("eth0").unwrap().unwrap();
    assert_eq!(
        (host.kind.as_deref(), host.mtu, peer.mtu),
        (Some("veth"), 1450, 1450)
    );
    assert_eq!(peer.mac, mac);
    assert_eq!(
        peer.peer,
        Some(host.index),
        "the pod side points at its host peer"
    );
    assert!(
        w.node_nl.link_by_name("eth0").unwrap().is_none(),
        "no eth0 on the node"
    );
    // The same host name again: reported, so the caller can pick another.
    assert!(
        !w.node_nl
            .create_veth("wveth1", "eth1", &w.pod_ns, None, None)
            .unwrap()
    );
    assert!(w.pod_nl.link_by_name("eth1").unwrap().is_none());
}

#[test]
fn ports_addresses_routes_and_traffic() {
    let Some(w) = world() else { return };
    let (br, _) = w.node_nl.ensure_bridge("wbr1", None).unwrap();
    w.node_nl
        .add_address(br.index, net("10.66.0.1/24"))
        .unwrap();
    w.node_nl
        .add_address(br.index, net("10.66.0.1/24"))
        .unwrap(); // replace: idempotent
    let v4: Vec<IpNet> = w
        .node_nl
        .addresses(br.index)
        .unwrap()
        .into_iter()
        .filter(|a| a.addr().is_ipv4())
        .collect();
    assert_eq!(v4, [net("10.66.0.1/24")]);
    assert!(
        w.node_nl
            .create_veth("wveth2", "eth0", &w.pod_ns, None, None)
            .unwrap()
    );
    let host = w.node_nl.link_by_name("wveth2").unwrap().unwrap();
    w.node_nl.set_controller(host.index, br.index).unwrap();
    w.node_nl.set_up(host.index).unwrap();
    assert_eq!(
        w.node_nl
            .link_by_index(host.index)
            .unwrap()
            .unwrap()
            .controller,
        Some(br.index)
    );

    let eth0 = w.pod_nl.link_by_name("eth0").unwrap().unwrap();
    w.pod_nl
        .add_address(eth0.index, net("10.66.0.2/24"))
        .unwrap();
    w.pod_nl.set_up(eth0.index).unwrap();
    let gw = "10.66.0.1".parse().unwrap();
    w.pod_nl
        .add_route(net("0.0.0.0/0"), Some(gw), None)
        .unwrap();
    w.pod_nl
        .add_route(net("0.0.0.0/0"), Some(gw), None)
        .unwrap(); // replace
    let routes = w.pod_nl.routes(true).unwrap();
    let default = routes
        .iter()
        .find(|r| r.dst == net("0.0.0.0/0"))
        .expect("default route");
    assert_eq!(
        (default.gw, default.oif, default.table),
        (Some(gw), Some(eth0.index), 254)
    );
    assert!(
        w.pod_nl
            .routes(false)
            .unwrap()
            .iter()
            .all(|r| r.dst.addr().is_ipv6())
    );

    let ping = w.pod.exec(&["ping", "-c", "1", "-W", "2", "10.66.0.1"]);
    assert!(
        ping.status.success(),
        "pod cannot reach its gateway: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    assert!(
        w.pod_nl
            .del_address(eth0.index, net("10.66.0.2/24"))
            .unwrap()
    );
    assert!(
        !w.pod_nl
            .del_address(eth0.index, net("10.66.0.2/24"))
            .unwrap(),
        "already gone"
    );
    assert!(w.node_nl.delete_link(host.index).unwrap());
    assert!(
        !w.node_nl.delete_link(host.index).unwrap(),
        "deleting twice is fine"
    );
    assert!(
        w.pod_nl.link_by_name("eth0").unwrap().is_none(),
        "the peer went with it"
    );
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let Some(w) = world() else { return };
    let e = w
        .node_nl
        .add_route(net("10.0.0.0/8"), Some("192.0.2.1".parse().unwrap()), None)
        .unwrap_err();
    assert_eq!(e.code, 999);
    assert_eq!(
        e.msg,
        "adding route 10.0.0.0/8 via 192.0.2.1: Network is unreachable (os error 101)"
    );
    let e = w
        .node_nl
        .add_address(999_999, net("10.0.0.1/24"))
        .unwrap_err();
    assert_eq!(e.code, 999);
    assert!(e.msg.contains("#999999"), "{}", e.msg);
    assert!(w.node_nl.link_by_index(999_999).unwrap().is_none());
}

#[test]
fn sysctl_inside_a_pod_namespace() {
    let Some(w) = world() else { return };
    let key = "net/ipv4/conf/lo/arp_notify";
    let host_before = sysctl::get(key).unwrap();
    let (wrote, again) = w
        .pod_ns
        .run(|| {
            (
                sysctl::set(key, "1").unwrap(),
                sysctl::set(key, "1").unwrap(),
            )
        })
        .unwrap();
    assert_eq!((wrote, again), (true, false));
    assert_eq!(w.pod_ns.run(|| sysctl::get(key).unwrap()).unwrap(), "1");
    assert_eq!(
        sysctl::get(key).unwrap(),
        host_before,
        "the host's value is untouched"
    );
}

#[test]
fn bridge_port_flags_and_promisc() {
    let Some(w) = world() else { return };
    let (br, _) = w.node_nl.ensure_bridge("wbr2", None).unwrap();
    assert!(
        w.node_nl
            .create_veth("wveth3", "eth0", &w.pod_ns, None, None)
            .unwrap()
    );
    let port = w.node_nl.link_by_name("wveth3").unwrap().unwrap();
    w.node_nl.set_controller(port.index, br.index).unwrap();
    w.node_nl.set_bridge_port(port.index, true, true).unwrap();
    let port = w.node_nl.link_by_index(port.index).unwrap().unwrap();
    assert_eq!((port.hairpin, port.isolated), (Some(true), Some(true)));
    w.node_nl.set_bridge_port(port.index, false, false).unwrap();
    let port = w.node_nl.link_by_index(port.index).unwrap().unwrap();
    assert_eq!((port.hairpin, port.isolated), (Some(false), Some(false)));
    w.node_nl.set_promisc(br.index, true).unwrap();
    assert!(w.node_nl.link_by_index(br.index).unwrap().unwrap().promisc);
    let shown = w
        .node
        .exec_json(&["ip", "-j", "-d", "link", "show", "wveth3"]);
    assert_eq!(shown[0]["linkinfo"]["info_slave_data"]["hairpin"], false);
}
