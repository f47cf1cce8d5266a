//! weft's `flannel` CNI plugin on weftd nodes, end to end: pods attached through
//! the conflist driver with the stock kube-flannel conflist (flannel + portmap) in
//! node namespaces of a [`Cluster`], real traffic between them over vxlan and
//! through a hostPort, CHECK, then DEL and GC leaving nothing behind. And a weftd
//! node next to a node set up exactly as flanneld sets one up (its etcd lease,
//! `flannel.1`, peer entries and subnet.env written by hand per
//! `reference/flannel.md` §1–§2), with pods on both talking TCP.
//!
//! Every file a plugin writes lives in the node's temp dir (the flannel plugin's
//! dataDir, host-local's dataDir through `ipam.dataDir`, portmap's dataDir, the
//! driver's result cache); nothing touches /var/lib/cni.

use netns_tests::weftd_cluster::{
    Cluster, FLANNEL_NET, FlannelRuntime, NETWORK, Node, Pod, REACH, READY_TIMEOUT, SUBNETS,
    VXLAN_CONFIG, Weftd, first_host, lease_key, lease_value, metric, network_addr, peer_route_line,
    tcp_send, tcp_transfer, wait_for, wait_ping,
};
use netns_tests::{exec_line, require_root};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;

/// The published port of the hostPort test, and the pod's.
const HOST_PORT: u16 = 18080;
const CONTAINER_PORT: u16 = 8080;
/// The VTEP MAC of the node set up by hand (locally administered, as flanneld's).
const GOLDEN_MAC: &str = "0e:77:00:00:00:02";

// --- helpers ----------------------------------------------------------------------

/// weftd as kube-flannel runs flanneld (`--ip-masq`), resyncing every second, on
/// each of `nodes`, ready.
fn start_weftds(nodes: &[&Node]) -> Vec<Weftd> {
    nodes
        .iter()
        .map(|n| n.ready_weftd(&["--ip-masq", "--peers-resync", "1"]))
        .collect()
}

/// Every pod pings every pod on another node, then sends it `len` bytes over TCP.
fn cross_node_traffic(pods: &[&Pod], len: usize) {
    let pairs = || {
        pods.iter()
            .flat_map(|a| pods.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.node != b.node)
    };
    pairs().for_each(|(a, b)| wait_ping(a, b));
    pairs().for_each(|(a, b)| tcp_transfer(a, b, len));
}

/// Assert that weftd on `node` is still running and programmed without errors.
fn assert_healthy(node: &Node, weftd: &mut Weftd) {
    weftd.assert_running();
    let m = node.metrics();
    let errors = metric(&m, "weft_programming_errors_total");
    assert_eq!(errors.as_deref(), Some("0"), "node {}: {m}", node.ip);
}

// --- flanneld by hand ---------------------------------------------------------------

/// A peer as its etcd lease describes it (vxlan).
struct Peer {
    subnet: String,
    public_ip: String,
    vtep_mac: String,
}

/// Every vxlan lease in etcd but `own`'s.
fn vxlan_peers(c: &Cluster, own: &str) -> Vec<Peer> {
    c.leases()
        .into_iter()
        .filter(|(key, _)| *key != lease_key(own))
        .filter_map(|(key, value)| {
            let v: Value = serde_json::from_str(&value).expect("a JSON lease");
            (v["BackendType"] == "vxlan").then(|| Peer {
                subnet: key[SUBNETS.len()..].replace('-', "/"),
                public_ip: v["PublicIP"].as_str().expect("PublicIP").to_string(),
                vtep_mac: v["BackendData"]["VtepMAC"]
                    .as_str()
                    .expect("VtepMAC")
                    .to_string(),
            })
        })
        .collect()
}

/// What flanneld (etcd mode, vxlan, `--ip-masq`) sets up on `node` for the /24
/// `subnet`, in its order (`reference/flannel.md` §1, §2): `flannel.1` with the
/// VTEP MAC [`GOLDEN_MAC`] and `<subnet>.0/32`, the lease (attached to a 24 h etcd
/// lease), subnet.env (written to a temp file, then renamed), then per vxlan peer
/// in etcd a permanent neighbour, a self FDB entry and an onlink route. The
/// masquerade rules of §4 are left out: they do not touch pod-to-pod traffic.
fn golden_flanneld(c: &Cluster, node: &Node, subnet: &str) {
    let run = |line: String| exec_line(&node.ns, &line);
    let gw = network_addr(subnet);
    let eth0 = node
        .ns
        .exec_json(&["ip", "-j", "link", "show", "dev", "eth0"]);
    let mtu = eth0[0]["mtu"].as_u64().expect("eth0's MTU") - 50;
    run(format!(
        "ip link add flannel.1 address {GOLDEN_MAC} mtu {mtu} type vxlan id 1 local {} dev eth0 \
         dstport 8472 nolearning",
        node.ip
    ));
    run("sysctl -qw net.ipv6.conf.flannel/1.accept_ra=0".into());
    run(format!("ip addr add {gw}/32 dev flannel.1"));
    run("ip link set flannel.1 up".into());

    let lease = c.etcd().lease_grant(86400);
    c.etcd().put_with_lease(
        &lease_key(subnet),
        &lease_value(&node.ip, GOLDEN_MAC),
        lease,
    );

    let env = format!(
        "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n",
        first_host(subnet)
    );
    let tmp = node.dir.join(".subnet.env");
    std::fs::write(&tmp, env).expect("writing .subnet.env");
    std::fs::rename(&tmp, node.subnet_file()).expect("renaming subnet.env");

    for p in vxlan_peers(c, subnet) {
        let pgw = network_addr(&p.subnet);
        run(format!(
            "ip neigh replace {pgw} lladdr {} dev flannel.1 nud permanent",
            p.vtep_mac
        ));
        run(format!(
            "bridge fdb replace {} dev flannel.1 dst {} self permanent",
            p.vtep_mac, p.public_ip
        ));
        run(format!(
            "ip route replace {} via {pgw} dev flannel.1 onlink",
            p.subnet
        ));
    }
}

// --- tests ------------------------------------------------------------------------

#[test]
fn stock_flannel_conflist_over_weftd_on_three_nodes() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(3, VXLAN_CONFIG);
    let nodes: Vec<&Node> = c.nodes.iter().collect();
    let mut weftds = start_weftds(&nodes);
    for n in &nodes {
        n.wait_metric("weft_peers", "2", READY_TIMEOUT);
    }
    let runtimes: Vec<FlannelRuntime> = nodes.iter().map(|n| FlannelRuntime::stock(n)).collect();

    // node 1: a web pod publishing a hostPort, and a plain one; one pod each on
    // nodes 2 and 3, and a pod on node 3 the runtime forgets (GC's work).
    let mapping =
        json!([{"hostPort": HOST_PORT, "containerPort": CONTAINER_PORT, "protocol": "tcp"}]);
    let (web, att_web) = runtimes[0].add_pod("web", Some(mapping));
    let (p1, att1) = runtimes[0].add_pod("pod-1", None);
    let (p2, att2) = runtimes[1].add_pod("pod-2", None);
    let (p3, att3) = runtimes[2].add_pod("pod-3", None);
    let (_forgotten, _) = runtimes[2].add_pod("forgotten", None);
    let attachments = [(0, &att_web), (0, &att1), (1, &att2), (2, &att3)];

    // The delegate config flannel saved, built from weftd's subnet.env.
    let saved = runtimes[0].scratch("web");
    eprintln!("saved delegate config of web: {saved}");
    let want = json!({
        "cniVersion": "0.3.1",
        "hairpinMode": true,
        "ipMasq": false,
        "ipam": {
            "dataDir": c.node(1).dir.join("ipam"),
            "ranges": [[{"subnet": c.node(1).leased_subnet()}]],
            "routes": [{"dst": NETWORK}],
            "type": "host-local",
        },
        "isDefaultGateway": true,
        "isGateway": true,
        "mtu": 1450,
        "name": FLANNEL_NET,
        "type": "bridge",
    });
    assert_eq!(saved, want, "flannel's delegate config");
    for p in [&web, &p1, &p2, &p3] {
        let link = p.ns.exec_json(&["ip", "-j", "link", "show", "dev", "eth0"]);
        assert_eq!(link[0]["mtu"], 1450, "pod {}: the MTU of FLANNEL_MTU", p.ip);
    }

    // Pods on different nodes talk, unmasqueraded; pods of one node too.
    cross_node_traffic(&[&web, &p1, &p2, &p3], 64 * 1024);
    wait_ping(&p1, &web);

    // The hostPort on node 1's underlay address, from a pod on node 2: node 2
    // masquerades traffic leaving the pod network (--ip-masq), node 1 DNATs it.
    let dst: SocketAddr = format!("{}:{HOST_PORT}", c.node(1).ip).parse().unwrap();
    let what = format!("TCP {} (on {}) → hostPort {dst}", p2.ip, p2.node);
    let seen = tcp_send(&what, &p2.ns, dst, (&web.ns, CONTAINER_PORT), 64 * 1024);
    assert_eq!(seen.ip().to_string(), c.node(2).ip, "{what}: source seen");

    // CHECK: libcni refuses it for the stock 0.3.1 conflist; the same conflist
    // declaring 1.1.0 (an upgraded kube-flannel) passes for every attachment.
    let err = runtimes[0].driver.check(&att_web).unwrap_err();
    assert!(
        err.message.contains("does not support the CHECK command"),
        "{err}"
    );
    for &(i, att) in &attachments {
        FlannelRuntime::at(nodes[i], "1.1.0")
            .driver
            .check(att)
            .unwrap_or_else(|e| panic!("CHECK {} on node {}: {e}", att.container_id, i + 1));
    }

    // DEL every attachment with the stock conflist; the hostPort goes with web.
    for &(i, att) in &attachments {
        runtimes[i]
            .driver
            .del(att)
            .unwrap_or_else(|e| panic!("DEL {} on node {}: {e}", att.container_id, i + 1));
    }
    let gone = netns_tests::inside(&p2.ns, || {
        std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))
    });
    assert!(gone.is_err(), "the hostPort outlived DEL");
    // GC: the stock conflist DELs the forgotten attachment; at 1.1.0 every plugin
    // gets GC too, with no valid attachments.
    for (i, rt) in runtimes.iter().enumerate() {
        rt.driver
            .gc::<&str>(&[])
            .unwrap_or_else(|e| panic!("GC on node {}: {e}", i + 1));
        FlannelRuntime::at(nodes[i], "1.1.0")
            .driver
            .gc::<&str>(&[])
            .unwrap_or_else(|e| panic!("GC (1.1.0) on node {}: {e}", i + 1));
    }
    for rt in &runtimes {
        assert_eq!(
            rt.leftovers(),
            Vec::<String>::new(),
            "left behind on node {}",
            rt.node.ip
        );
    }
    for (n, w) in nodes.iter().zip(&mut weftds) {
        assert_healthy(n, w);
    }
}

#[test]
fn weftd_node_and_golden_flanneld_node_exchange_pod_traffic() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(2, VXLAN_CONFIG);
    let (n1, n2) = (c.node(1), c.node(2));
    let mut weftd = start_weftds(&[n1]).remove(0);
    let s1 = n1.leased_subnet();
    let s2 = c.free_subnet(&[]);
    golden_flanneld(&c, n2, &s2);

    // subnet.env as weftd writes it is flanneld's, but for the subnet.
    let weftd_env = n1.subnet_env().expect("weftd's subnet.env");
    let golden_env = n2.subnet_env().expect("the golden subnet.env");
    assert_eq!(
        weftd_env.replace(&first_host(&s1), &first_host(&s2)),
        golden_env
    );

    // weftd programs the hand-made peer in flanneld's form.
    n1.wait_metric("weft_peers", "1", READY_TIMEOUT);
    let gw2 = network_addr(&s2);
    let want = (
        vec![peer_route_line(&s2, gw2, "flannel.1", true)],
        vec![format!("{gw2} lladdr {GOLDEN_MAC} PERMANENT")],
        vec![format!("{GOLDEN_MAC} dst {} self permanent", n2.ip)],
    );
    wait_for("weftd to program the golden peer", REACH, || {
        let have = (n1.weft_routes(), n1.vtep_neighbours(), n1.vtep_fdb());
        (have == want).then_some(())
    });
    let golden_routes = n2.lines(&["ip", "route", "show", "dev", "flannel.1"]);
    eprintln!("golden node's flannel.1 routes: {golden_routes:?}");

    let (r1, r2) = (FlannelRuntime::stock(n1), FlannelRuntime::stock(n2));
    let (a, att_a) = r1.add_pod("pod-a", None);
    let (b, att_b) = r2.add_pod("pod-b", None);
    cross_node_traffic(&[&a, &b], 1 << 20);

    r1.driver.del(&att_a).unwrap();
    r2.driver.del(&att_b).unwrap();
    for rt in [&r1, &r2] {
        assert_eq!(rt.leftovers(), Vec::<String>::new(), "on {}", rt.node.ip);
    }
    assert_healthy(n1, &mut weftd);
}
