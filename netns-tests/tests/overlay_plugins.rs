//! The overlay plugins (`vxlan-overlay`, `host-gw`) end to end, standalone: the
//! shipped conflists (`conf-examples/30-weft-*.conflist`: the plugin with an etcd
//! lease source, then portmap) driven through the conflist driver in node
//! namespaces of a [`Cluster`] with a real etcd. The first STATUS or ADD on a node
//! brings it up (lease in etcd, VTEP or nothing, the peers known then, node
//! masquerade, subnet.env); later calls stay local (shown with etcd stopped),
//! except one per `peerResync` period, which syncs again and so picks up peers
//! that came up later.
//!
//! Two cluster tests run weftd on node 1 (the plugin there finds weftd's
//! subnet.env and delegates only) and bring nodes 2 and 3 up standalone, in that
//! order: node 2 learns node 3 at its next sync. A third runs no agent at all.
//!
//! Every file a plugin writes lives in the node's temp dir (subnet.env, the
//! plugin's dataDir, host-local's dataDir, portmap's dataDir, the driver's cache);
//! nothing touches /run/flannel or /var/lib/cni.

use netns_tests::driver::{Attachment, Driver, DriverError};
use netns_tests::weftd_cluster::{
    CONFIG_KEY, Cluster, ENDPOINT, HOST_GW_CONFIG, NETWORK, Node, Pod, SUBNETS, TCP_PORT,
    VXLAN_CONFIG, Weftd, attachment_leftovers, first_host, lease_key, lease_value, network_addr,
    peer_route_line, tcp_send, wait_for,
};
use netns_tests::{TestNetns, bin_dir, require_root};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How long pods may take to reach each other once the entries are there.
const REACH: Duration = Duration::from_secs(20);
/// A published pod's port, and the host port it is published on.
const CONTAINER_PORT: u16 = 8080;
const HOST_PORT: u16 = 18080;
/// `peerResync` in the tests: a standalone node syncs at most this often.
const RESYNC: Duration = Duration::from_secs(2);
/// The shipped conflists' network name (host-local keeps its reservations under it).
const NET: &str = "cbr0";
/// CNI error codes.
const INVALID_NETWORK_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
const NOT_AVAILABLE: u32 = 50;
const ADDRESS_EXHAUSTED: u32 = 100;
const CHECK_FAILED: u32 = 102;

// --- helpers ----------------------------------------------------------------------

/// The pod runtime of one node: a shipped overlay conflist, its plugins run in the
/// node's netns, every file of theirs under `root` (a dir of the node's).
struct Runtime<'a> {
    node: &'a Node,
    root: PathBuf,
    driver: Driver,
}

impl<'a> Runtime<'a> {
    /// `conf-examples/30-weft-<plugin>.conflist` on `node` with etcd at the
    /// cluster's endpoint and all state in the node's dir (subnet.env where
    /// [`Node::subnet_file`] looks).
    fn shipped(node: &'a Node, plugin: &str) -> Self {
        Runtime::with(node, plugin, node.dir.path().to_path_buf(), |p| {
            p["peerResync"] = json!(RESYNC.as_secs());
        })
    }

    /// The shipped conflist of `plugin` with its state under `root`, then `tweak`ed
    /// (the plugin's entry).
    fn with(node: &'a Node, plugin: &str, root: PathBuf, tweak: impl FnOnce(&mut Value)) -> Self {
        let path =
            netns_tests::workspace_root().join(format!("conf-examples/30-weft-{plugin}.conflist"));
        let mut conflist: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(conflist["name"], NET);
        assert_eq!(conflist["cniVersion"], "1.1.0");
        let p = &mut conflist["plugins"][0];
        assert_eq!(p["type"], plugin);
        assert_eq!(p["iface"], "eth0");
        p["etcd"]["endpoints"] = json!([ENDPOINT]);
        p["subnetFile"] = json!(root.join("subnet.env"));
        p["dataDir"] = json!(root.join("data"));
        p["ipam"] = json!({"dataDir": root.join("ipam")});
        tweak(p);
        assert_eq!(conflist["plugins"][1]["type"], "portmap");
        conflist["plugins"][1]["dataDir"] = json!(root.join("portmap"));
        let driver = Driver::from_json(&conflist, vec![bin_dir()], root.join("cache"))
            .expect("the conflist loads")
            .in_netns(node.ns.path());
        Runtime { node, root, driver }
    }

    fn subnet_file(&self) -> PathBuf {
        self.root.join("subnet.env")
    }

    /// ADD a new pod `id` on `eth0`: the pod, its attachment, or the error.
    fn try_add(&self, id: &str) -> (TestNetns, Attachment, Result<Value, DriverError>) {
        self.try_add_publishing(id, None)
    }

    /// [`Self::try_add`], publishing `host_port` → the pod's [`CONTAINER_PORT`].
    fn try_add_publishing(
        &self,
        id: &str,
        host_port: Option<u16>,
    ) -> (TestNetns, Attachment, Result<Value, DriverError>) {
        let ns = TestNetns::new();
        let mut att = Attachment::new(id, &ns.path_str(), "eth0");
        if let Some(port) = host_port {
            let maps =
                json!([{"hostPort": port, "containerPort": CONTAINER_PORT, "protocol": "tcp"}]);
            att.capability_args.insert("portMappings".into(), maps);
        }
        let result = self.driver.add(&att);
        (ns, att, result)
    }

    /// ADD a new pod `id`; its address must be in `subnet` (default: the node's
    /// subnet per subnet.env, read after the ADD, which may have written it).
    fn add_pod_in(&self, id: &str, subnet: Option<&str>) -> (Pod, Attachment) {
        self.add_pod_with(id, subnet, None)
    }

    /// [`Self::add_pod_in`], publishing `host_port` when given.
    fn add_pod_with(
        &self,
        id: &str,
        subnet: Option<&str>,
        host_port: Option<u16>,
    ) -> (Pod, Attachment) {
        let (ns, att, result) = self.try_add_publishing(id, host_port);
        let result = result.unwrap_or_else(|e| panic!("ADD {id} on {}: {e}", self.node.ip));
        let subnet = subnet.map_or_else(|| self.node.leased_subnet(), str::to_string);
        (Pod::from_result(ns, &result, self.node, &subnet), att)
    }

    fn add_pod(&self, id: &str) -> (Pod, Attachment) {
        self.add_pod_in(id, None)
    }

    /// Whatever the plugins and the driver keep of any attachment on this node,
    /// one line each: ports on cni0, host-local reservations, saved delegate
    /// configs, portmap elements and records, cached results.
    fn leftovers(&self) -> Vec<String> {
        attachment_leftovers(self.node, &self.root, NET, "data", &self.driver)
    }

    /// DEL each of `atts`, then GC with no valid attachments: nothing may remain.
    fn del_all_and_gc(&self, atts: &[&Attachment]) {
        for att in atts {
            self.driver
                .del(att)
                .unwrap_or_else(|e| panic!("DEL {} on {}: {e}", att.container_id, self.node.ip));
        }
        self.driver
            .gc::<&str>(&[])
            .unwrap_or_else(|e| panic!("GC on {}: {e}", self.node.ip));
        assert_eq!(
            self.leftovers(),
            Vec::<String>::new(),
            "left behind on node {}",
            self.node.ip
        );
    }
}

/// The CNI code of a failed driver call; panics on success.
fn code_of<T: std::fmt::Debug>(what: &str, r: Result<T, DriverError>) -> (u32, String) {
    let e = r.expect_err(what);
    eprintln!("{what}: {e}");
    (
        e.code()
            .unwrap_or_else(|| panic!("{what}: no CNI error: {e}")),
        e.message,
    )
}

/// Wait until `from` pings `to`.
fn wait_ping(from: &Pod, to: &Pod) {
    let what = format!(
        "{} (on {}) to ping {} (on {})",
        from.ip, from.node, to.ip, to.node
    );
    wait_for(&what, REACH, || from.ping(&to.ip).then_some(()));
}

/// 256 KiB over TCP from `from` to `to`, arriving from `from`'s own address:
/// pod-to-pod traffic is not masqueraded (the node masquerades only what leaves
/// the cluster network, as flanneld's `--ip-masq`).
fn transfer(from: &Pod, to: &Pod) {
    let what = format!(
        "TCP {} (on {}) → {} (on {})",
        from.ip, from.node, to.ip, to.node
    );
    let dst: SocketAddr = format!("{}:{TCP_PORT}", to.ip).parse().unwrap();
    let seen = tcp_send(&what, &from.ns, dst, (&to.ns, TCP_PORT), 256 * 1024);
    assert_eq!(seen.ip().to_string(), from.ip, "{what}: source seen");
}

/// Pings and TCP both ways between every two of `pods`.
fn all_talk(pods: &[&Pod]) {
    for (i, a) in pods.iter().enumerate() {
        for b in &pods[i + 1..] {
            wait_ping(a, b);
            wait_ping(b, a);
            transfer(a, b);
            transfer(b, a);
        }
    }
}

/// From `client` (a pod on another node) to `node`'s underlay address and
/// `host_port`, published by `web`: 64 KiB over TCP arrive.
fn host_port_reached(client: &Pod, node: &Node, host_port: u16, web: &Pod) {
    let what = format!(
        "TCP {} → hostPort {}:{host_port} ({})",
        client.ip, node.ip, web.ip
    );
    let dst: SocketAddr = format!("{}:{host_port}", node.ip).parse().unwrap();
    tcp_send(&what, &client.ns, dst, (&web.ns, CONTAINER_PORT), 64 * 1024);
}

/// CHECK through the driver passes for each attachment on its node's runtime.
fn check_all(checks: &[(&Runtime, &Attachment)]) {
    for (rt, att) in checks {
        rt.driver
            .check(att)
            .unwrap_or_else(|e| panic!("CHECK {}: {e}", att.container_id));
    }
}

/// Wait out a resync period, then STATUS on `rt`'s node: it syncs.
fn resync(rt: &Runtime) {
    std::thread::sleep(RESYNC + Duration::from_millis(200));
    rt.driver.status().expect("STATUS (a sync)");
}

/// The lease of `subnet` in etcd, parsed.
fn lease_of(c: &Cluster, subnet: &str) -> Value {
    let v = c
        .etcd()
        .get(&lease_key(subnet))
        .unwrap_or_else(|| panic!("no lease for {subnet}: {:?}", c.leases()));
    serde_json::from_str(&v).expect("a JSON lease")
}

/// subnet.env as a standalone node writes it for `subnet` (node masquerade on).
fn want_subnet_env(subnet: &str, mtu: u32) -> String {
    format!(
        "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n",
        first_host(subnet)
    )
}

/// `ip -j addr show dev flannel.1`: its IPv4 addresses as `a/len`, its MTU.
fn vtep(node: &Node) -> (Vec<String>, u64) {
    let j = node
        .ns
        .exec_json(&["ip", "-j", "addr", "show", "dev", "flannel.1"]);
    let addrs = j[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    (addrs, j[0]["mtu"].as_u64().unwrap())
}

/// vxlan routes (flanneld's form) to `peers`, sorted.
fn vxlan_routes(peers: &[&Node]) -> Vec<String> {
    let mut v: Vec<String> = peers
        .iter()
        .map(|p| {
            let s = p.leased_subnet();
            peer_route_line(&s, network_addr(&s), "flannel.1", true)
        })
        .collect();
    v.sort();
    v
}

/// host-gw routes (flanneld's form) to `peers`, sorted.
fn host_gw_routes(peers: &[&Node]) -> Vec<String> {
    let mut v: Vec<String> = peers
        .iter()
        .map(|p| peer_route_line(&p.leased_subnet(), &p.ip, "eth0", false))
        .collect();
    v.sort();
    v
}

/// weftd on `node`, masquerading as kube-flannel runs flanneld, ready.
fn weftd_on(node: &Node) -> Weftd {
    node.ready_weftd(&["--ip-masq", "--peers-resync", "1"])
}

// --- tests ------------------------------------------------------------------------

/// Three standalone vxlan-overlay nodes and no agent at all: each first ADD
/// brings its node up knowing the nodes before it; one sync per node after a
/// resync period completes the mesh, and every pod reaches every other.
#[test]
fn three_standalone_vxlan_overlay_nodes_mesh_after_a_sync() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(3, VXLAN_CONFIG);
    let nodes = [c.node(1), c.node(2), c.node(3)];
    let rts = nodes.map(|n| Runtime::shipped(n, "vxlan-overlay"));
    let pods: Vec<(Pod, Attachment)> = rts
        .iter()
        .enumerate()
        .map(|(i, rt)| rt.add_pod(&format!("pod-{i}")))
        .collect();
    assert_eq!(
        nodes[0].weft_routes(),
        Vec::<String>::new(),
        "node 1 came up first"
    );
    for rt in &rts {
        resync(rt);
    }
    for (i, n) in nodes.iter().enumerate() {
        let others: Vec<&Node> = nodes.iter().copied().filter(|o| o.ip != n.ip).collect();
        assert_eq!(n.weft_routes(), vxlan_routes(&others), "node {}", i + 1);
    }
    let all: Vec<&Pod> = pods.iter().map(|(p, _)| p).collect();
    all_talk(&all);
    for (rt, (_, att)) in rts.iter().zip(&pods) {
        rt.del_all_and_gc(&[att]);
    }
    assert_eq!(c.leases().len(), 3, "{:?}", c.leases());
}

/// vxlan-overlay standalone on nodes 2 and 3 (brought up by STATUS, in order),
/// weftd on node 1; pods on all three through the shipped conflist.
#[test]
fn vxlan_overlay_standalone_nodes_next_to_a_weftd_node() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(3, VXLAN_CONFIG);
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    let _weftd = weftd_on(n1);
    let rts = [n1, n2, n3].map(|n| Runtime::shipped(n, "vxlan-overlay"));

    // Node 2: nothing until the first STATUS, which brings it up.
    assert!(n2.subnet_env().is_none() && !n2.has_link("flannel.1"));
    rts[1].driver.status().expect("STATUS on node 2 (bring-up)");
    let s1 = n1.leased_subnet();
    let s2 = n2.leased_subnet();
    assert_eq!(n2.subnet_env().unwrap(), want_subnet_env(&s2, 1450));
    assert_eq!(vtep(n2), (vec![format!("{}/32", network_addr(&s2))], 1450));
    let lease: Value = lease_of(&c, &s2);
    let want: Value = serde_json::from_str(&n2.lease_value()).unwrap();
    assert_eq!(lease, want, "node 2's lease: flanneld's form");
    // It knew node 1 (weftd's lease) when it came up.
    assert_eq!(n2.weft_routes(), vxlan_routes(&[n1]));
    assert_eq!(
        n2.vtep_neighbours(),
        [format!(
            "{} lladdr {} PERMANENT",
            network_addr(&s1),
            n1.vtep_mac()
        )]
    );
    assert_eq!(
        n2.vtep_fdb(),
        [format!("{} dst {} self permanent", n1.vtep_mac(), n1.ip)]
    );

    // Node 3 knows both.
    rts[2].driver.status().expect("STATUS on node 3 (bring-up)");
    let s3 = n3.leased_subnet();
    assert_eq!(n3.subnet_env().unwrap(), want_subnet_env(&s3, 1450));
    assert_eq!(vtep(n3).0, [format!("{}/32", network_addr(&s3))]);
    assert_eq!(n3.weft_routes(), vxlan_routes(&[n1, n2]));
    let mut keys: Vec<String> = c.leases().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    let mut want_keys = vec![lease_key(&s1), lease_key(&s2), lease_key(&s3)];
    want_keys.sort();
    assert_eq!(keys, want_keys);
    assert!(keys.iter().all(|k| k.starts_with(SUBNETS)));
    let want: Value = serde_json::from_str(&n3.lease_value()).unwrap();
    assert_eq!(lease_of(&c, &s3), want, "node 3's lease");

    // weftd on node 1 follows both; node 2 learns node 3 at its next sync.
    wait_for("weftd on node 1 to route to nodes 2 and 3", REACH, || {
        (n1.weft_routes() == vxlan_routes(&[n2, n3])).then_some(())
    });
    assert_eq!(n2.weft_routes(), vxlan_routes(&[n1]), "within the period");
    resync(&rts[1]);
    assert_eq!(n2.weft_routes(), vxlan_routes(&[n1, n3]), "after a sync");
    let masq = n2.nft(&["list", "table", "inet", "weft_node"]);
    assert!(masq.contains(&s2), "node 2 masquerades its pods: {masq}");

    // From here etcd is gone: STATUS and ADD keep working (within the period they
    // do not even try the store; after it, the failed sync is only logged).
    c.etcd_mut().stop(0);
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    let rts = [n1, n2, n3].map(|n| Runtime::shipped(n, "vxlan-overlay"));
    for rt in &rts {
        rt.driver.status().expect("STATUS with etcd stopped");
    }
    let (p1, a1) = rts[0].add_pod("pod-1");
    let (p2, a2) = rts[1].add_pod("pod-2");
    resync(&rts[2]);
    let (p3, a3) = rts[2].add_pod("pod-3");
    let (p3b, a3b) = rts[2].add_pod_with("pod-3b", None, Some(HOST_PORT));
    for p in [&p1, &p2, &p3] {
        let link = p.ns.exec_json(&["ip", "-j", "link", "show", "dev", "eth0"]);
        assert_eq!(link[0]["mtu"], 1450, "pod {}: FLANNEL_MTU", p.ip);
    }
    all_talk(&[&p1, &p2, &p3, &p3b]);
    host_port_reached(&p1, n3, HOST_PORT, &p3b);
    host_port_reached(&p2, n3, HOST_PORT, &p3b);

    // CHECK passes on every node.
    check_all(&[
        (&rts[0], &a1),
        (&rts[1], &a2),
        (&rts[2], &a3),
        (&rts[2], &a3b),
    ]);

    // DEL + GC leave nothing of the pods; the node (VTEP, subnet.env, lease) stays.
    rts[0].del_all_and_gc(&[&a1]);
    rts[1].del_all_and_gc(&[&a2]);
    rts[2].del_all_and_gc(&[&a3, &a3b]);
    for n in [n2, n3] {
        assert!(
            n.has_link("flannel.1") && n.subnet_env().is_some(),
            "{}",
            n.ip
        );
    }
    c.etcd_mut().start_again(0);
    assert_eq!(c.leases().len(), 3, "{:?}", c.leases());
}

/// host-gw standalone on nodes 2 and 3 (brought up by their first ADD, in
/// order), weftd on node 1.
#[test]
fn host_gw_standalone_nodes_next_to_a_weftd_node() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(3, HOST_GW_CONFIG);
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    let _weftd = weftd_on(n1);
    let rts = [n1, n2, n3].map(|n| Runtime::shipped(n, "host-gw"));
    let s1 = n1.leased_subnet();

    assert!(n2.subnet_env().is_none());
    let (p2, a2) = rts[1].add_pod("pod-2");
    let s2 = n2.leased_subnet();
    assert_eq!(n2.subnet_env().unwrap(), want_subnet_env(&s2, 1500));
    assert!(!n2.has_link("flannel.1"), "host-gw has no VTEP");
    let lease = lease_of(&c, &s2);
    eprintln!("node 2's host-gw lease: {lease}");
    assert_eq!(lease["PublicIP"], n2.ip);
    assert_eq!(lease["BackendType"], "host-gw");
    assert_eq!(n2.weft_routes(), host_gw_routes(&[n1]));

    let (p3, a3) = rts[2].add_pod("pod-3");
    let s3 = n3.leased_subnet();
    assert_eq!(n3.subnet_env().unwrap(), want_subnet_env(&s3, 1500));
    assert_eq!(lease_of(&c, &s3)["PublicIP"], n3.ip);
    assert_eq!(n3.weft_routes(), host_gw_routes(&[n1, n2]));
    assert_eq!(c.leases().len(), 3, "{:?}", c.leases());
    assert!(
        [&s1, &s2, &s3]
            .iter()
            .all(|s| c.etcd().get(&lease_key(s)).is_some()),
        "{:?}",
        c.leases()
    );
    wait_for("weftd on node 1 to route to nodes 2 and 3", REACH, || {
        (n1.weft_routes() == host_gw_routes(&[n2, n3])).then_some(())
    });
    assert_eq!(n2.weft_routes(), host_gw_routes(&[n1]), "within the period");
    resync(&rts[1]);
    assert_eq!(n2.weft_routes(), host_gw_routes(&[n1, n3]), "after a sync");

    // etcd gone: more ADDs, on the standalone nodes and on weftd's.
    c.etcd_mut().stop(0);
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    let rts = [n1, n2, n3].map(|n| Runtime::shipped(n, "host-gw"));
    let (p1, a1) = rts[0].add_pod("pod-1");
    let (p3b, a3b) = rts[2].add_pod("pod-3b");
    let (p2b, a2b) = rts[1].add_pod_with("pod-2b", None, Some(HOST_PORT));
    all_talk(&[&p1, &p2, &p3, &p3b, &p2b]);
    host_port_reached(&p3, n2, HOST_PORT, &p2b);

    // A peer route deleted by hand: CHECK names it, the next sync restores it.
    let s3 = n3.leased_subnet();
    n2.ns.exec_ok(&["ip", "route", "del", &s3]);
    let (code, msg) = code_of("CHECK without the route", rts[1].driver.check(&a2));
    assert_eq!(code, CHECK_FAILED, "{msg}");
    assert!(msg.contains(&s3), "{msg}");
    c.etcd_mut().start_again(0);
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    let rts = [n1, n2, n3].map(|n| Runtime::shipped(n, "host-gw"));
    resync(&rts[1]);
    assert_eq!(n2.weft_routes(), host_gw_routes(&[n1, n3]), "repaired");

    check_all(&[
        (&rts[0], &a1),
        (&rts[1], &a2),
        (&rts[2], &a3),
        (&rts[2], &a3b),
    ]);
    rts[0].del_all_and_gc(&[&a1]);
    rts[1].del_all_and_gc(&[&a2, &a2b]);
    rts[2].del_all_and_gc(&[&a3, &a3b]);
    for n in [n2, n3] {
        assert!(n.subnet_env().is_some(), "{}", n.ip);
    }
    assert_eq!(c.leases().len(), 3, "{:?}", c.leases());
}

/// What a failed bring-up must not leave: subnet.env, a VTEP, a bridge, saved
/// configs, cached results, leases.
fn assert_nothing_created(c: &Cluster, rt: &Runtime, pod: &TestNetns) {
    let n = rt.node;
    assert!(!rt.subnet_file().exists(), "subnet.env was written");
    assert!(
        !n.has_link("flannel.1"),
        "a VTEP was left: {}",
        n.ns.exec_ok(&["ip", "-d", "link", "show"])
    );
    assert!(!n.has_link("cni0"), "a bridge was created");
    assert_eq!(rt.leftovers(), Vec::<String>::new());
    let links = pod.exec_ok(&["ip", "-o", "link", "show"]);
    assert_eq!(links.lines().count(), 1, "the pod has only lo: {links}");
    assert_eq!(c.leases(), vec![], "no lease");
}

/// Single node: bring-ups that fail (before the node is touched, or after the
/// VTEP was made) leave nothing behind.
#[test]
fn overlay_plugin_bring_up_errors_leave_nothing() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(1, HOST_GW_CONFIG);
    let n = c.node(1);
    let case = |name: &str| n.dir.join(name);

    // No lease source and no subnet.env: the agent's node, not up.
    let rt = Runtime::with(n, "vxlan-overlay", case("none"), |p| {
        p.as_object_mut().unwrap().remove("etcd");
    });
    let (pod, _, r) = rt.try_add("pod-none");
    assert_eq!(code_of("ADD without source", r).0, TRY_AGAIN_LATER);
    assert_eq!(
        code_of("STATUS without source", rt.driver.status()).0,
        NOT_AVAILABLE
    );
    assert_nothing_created(&c, &rt, &pod);

    // The network config is host-gw's; the plugin runs vxlan.
    let rt = Runtime::with(n, "vxlan-overlay", case("mismatch"), |_| {});
    let (pod, _, r) = rt.try_add("pod-mismatch");
    let (code, msg) = code_of("ADD with a host-gw config", r);
    assert_eq!(code, INVALID_NETWORK_CONFIG, "{msg}");
    assert!(msg.contains("host-gw") && msg.contains("vxlan"), "{msg}");
    assert_eq!(
        code_of("STATUS, mismatch", rt.driver.status()).0,
        NOT_AVAILABLE
    );
    assert_nothing_created(&c, &rt, &pod);

    // etcd unreachable (a closed port).
    let rt = Runtime::with(n, "vxlan-overlay", case("unreachable"), |p| {
        p["etcd"]["endpoints"] = json!(["http://127.0.0.1:1"]);
    });
    let t = std::time::Instant::now();
    let (pod, _, r) = rt.try_add("pod-unreachable");
    let (code, msg) = code_of("ADD with etcd unreachable", r);
    eprintln!("ADD with etcd unreachable failed after {:?}", t.elapsed());
    assert_eq!(code, TRY_AGAIN_LATER, "{msg}");
    assert_nothing_created(&c, &rt, &pod);

    // podCIDR without netConf.
    let rt = Runtime::with(n, "vxlan-overlay", case("no-netconf"), |p| {
        p.as_object_mut().unwrap().remove("etcd");
        p["podCIDR"] = json!("10.244.7.0/24");
    });
    let (pod, _, r) = rt.try_add("pod-no-netconf");
    let (code, msg) = code_of("ADD podCIDR without netConf", r);
    assert_eq!(code, INVALID_NETWORK_CONFIG, "{msg}");
    assert!(msg.contains("netConf"), "{msg}");
    assert_nothing_created(&c, &rt, &pod);

    // A full pool: the VTEP made before leasing (its MAC goes into the lease) is
    // removed again.
    let full = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.9.0","Backend":{"Type":"vxlan"}}"#;
    c.etcd().put(CONFIG_KEY, full);
    let other = lease_value("10.77.0.99", "0e:00:00:00:00:99");
    c.etcd().put(&lease_key("10.244.9.0/24"), &other);
    let rt = Runtime::with(n, "vxlan-overlay", case("full"), |_| {});
    let (pod, _, r) = rt.try_add("pod-full");
    let (code, msg) = code_of("ADD with the pool full", r);
    assert_eq!(code, ADDRESS_EXHAUSTED, "{msg}");
    c.etcd().delete(&lease_key("10.244.9.0/24"));
    assert_nothing_created(&c, &rt, &pod);
}

/// One node brought up from a fixed `podCIDR` and the inline `netConf` (etcd holds
/// a host-gw config the plugin must not read); CHECK against its VTEP; DEL + GC.
#[test]
fn vxlan_overlay_pod_cidr_node_check_and_cleanup() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(1, HOST_GW_CONFIG);
    let n = c.node(1);
    let rt = Runtime::with(n, "vxlan-overlay", n.dir.join("pod-cidr"), |p| {
        p.as_object_mut().unwrap().remove("etcd");
        p["podCIDR"] = json!("10.244.7.0/24");
        p["netConf"] = serde_json::from_str(VXLAN_CONFIG).unwrap();
    });
    let (pod, att) = rt.add_pod_in("pod-a", Some("10.244.7.0/24"));
    assert!(pod.ip.starts_with("10.244.7."), "{}", pod.ip);
    assert_eq!(
        std::fs::read_to_string(rt.subnet_file()).unwrap(),
        want_subnet_env("10.244.7.0/24", 1450)
    );
    assert_eq!(vtep(n), (vec!["10.244.7.0/32".to_string()], 1450));
    assert_eq!(c.leases(), vec![], "podCIDR leases nothing in etcd");
    assert_eq!(c.etcd().get(CONFIG_KEY).as_deref(), Some(HOST_GW_CONFIG));
    let (pod_b, att_b) = rt.add_pod_in("pod-b", Some("10.244.7.0/24"));
    wait_ping(&pod, &pod_b);
    rt.driver.status().expect("STATUS on the podCIDR node");
    rt.driver.check(&att).expect("CHECK");

    // CHECK notices the VTEP down.
    n.ns.exec_ok(&["ip", "link", "set", "flannel.1", "down"]);
    let (code, msg) = code_of("CHECK with flannel.1 down", rt.driver.check(&att));
    assert_eq!(code, CHECK_FAILED, "{msg}");
    assert!(msg.contains("flannel.1"), "{msg}");
    n.ns.exec_ok(&["ip", "link", "set", "flannel.1", "up"]);
    rt.driver
        .check(&att)
        .expect("CHECK with flannel.1 up again");

    rt.del_all_and_gc(&[&att, &att_b]);
    assert!(n.has_link("flannel.1") && rt.subnet_file().exists());
}

/// Four first ADDs at once on a fresh standalone node: the node-wide lock lets one
/// bring it up; every ADD succeeds and the node holds exactly one lease.
#[test]
fn parallel_first_adds_bring_the_node_up_once() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(1, VXLAN_CONFIG);
    let n = c.node(1);
    let rt = Runtime::shipped(n, "vxlan-overlay");
    let pods: Vec<(Pod, Attachment)> = std::thread::scope(|s| {
        let adds: Vec<_> = (0..4)
            .map(|i| {
                let rt = &rt;
                s.spawn(move || rt.add_pod(&format!("pod-{i}")))
            })
            .collect();
        adds.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(c.leases().len(), 1, "{:?}", c.leases());
    let subnet = n.leased_subnet();
    assert_eq!(n.subnet_env().unwrap(), want_subnet_env(&subnet, 1450));
    let atts: Vec<&Attachment> = pods.iter().map(|(_, a)| a).collect();
    rt.del_all_and_gc(&atts);
}
