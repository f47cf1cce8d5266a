//! The portmap plugin chained after bridge + host-local through the conflist driver,
//! in a "node" test netns with an "outside" client netns: real TCP and UDP servers in
//! pods reached through host ports; conflicts, teardown, CHECK and GC.

use netns_tests::driver::{Attachment, Driver, DriverError};
use netns_tests::{Invocation, TempDir, TestNetns, bin_dir, require_root, unique_name};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;
use weft_core::netns::NetNs;

/// The node's address on the outside link, and the outside client's.
const NODE_IP: &str = "198.51.100.1";
const NODE_IP6: &str = "2001:db8:51::1";
const CLIENT_IP: &str = "198.51.100.2";

struct Node {
    ns: TestNetns,
    outside: TestNetns,
    dir: TempDir,
    name: String,
}

impl Node {
    fn new() -> Option<Node> {
        if !require_root() {
            return None;
        }
        let (ns, outside) = (TestNetns::new(), TestNetns::new());
        netns_tests::join(
            &ns,
            ("up0", &format!("{NODE_IP}/24")),
            &outside,
            ("up1", &format!("{CLIENT_IP}/24")),
        );
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{NODE_IP6}/64"),
            "dev",
            "up0",
            "nodad",
        ]);
        outside.exec_ok(&[
            "ip",
            "addr",
            "add",
            "2001:db8:51::2/64",
            "dev",
            "up1",
            "nodad",
        ]);
        Some(Node {
            ns,
            outside,
            dir: TempDir::new("pm"),
            name: unique_name("pm"),
        })
    }

    /// The shipped bridge + portmap conflist, on this node's dirs and `subnets`,
    /// with `portmap` keys merged into the portmap entry.
    fn driver(&self, subnets: &[&str], portmap: Value) -> Driver {
        self.driver_named(&self.name, "wp0", subnets, portmap)
    }

    /// [`Self::driver`] for another network `name` on bridge `bridge`.
    fn driver_named(&self, name: &str, bridge: &str, subnets: &[&str], portmap: Value) -> Driver {
        let path = netns_tests::workspace_root().join("conf-examples/20-weft-portmap.conflist");
        let mut list: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        list["name"] = json!(name);
        list["plugins"][0]["bridge"] = json!(bridge);
        let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
        list["plugins"][0]["ipam"]["ranges"] = json!(ranges);
        list["plugins"][0]["ipam"]["dataDir"] = json!(self.dir.join("ipam"));
        if subnets.iter().any(|s| s.contains(':')) {
            list["plugins"][0]["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]);
        }
        list["plugins"][1]["dataDir"] = json!(self.dir.join("portmap"));
        for (k, v) in portmap.as_object().unwrap() {
            list["plugins"][1][k] = v.clone();
        }
        Driver::from_json(&list, vec![bin_dir()], self.dir.join("cache"))
            .unwrap()
            .in_netns(self.ns.path())
    }

    fn table(&self) -> String {
        let out = self
            .ns
            .exec(&["nft", "list", "table", "inet", "weft_portmap"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every element line of the mapping sets and maps (class sets, targets, owners),
    /// each prefixed by its set's name.
    fn elements(&self) -> Vec<String> {
        let elems = netns_tests::table_elements(&self.ns, "inet", "weft_portmap");
        elems.iter().map(|(set, e)| format!("{set} {e}")).collect()
    }

    fn records(&self) -> usize {
        let files = netns_tests::portmap_files(&self.dir.join("portmap"));
        files.iter().filter(|f| f.ends_with(".json")).count()
    }
}

impl Node {
    /// portmap alone for (`cid`, eth0), as a runtime would call it in the chain.
    fn portmap(&self, cmd: &str, cid: &str, pod: &TestNetns, conf: &Value) -> netns_tests::Outcome {
        self.portmap_on(cmd, cid, pod, "eth0", conf)
    }

    /// [`Self::portmap`] for another CNI_IFNAME.
    fn portmap_on(
        &self,
        cmd: &str,
        cid: &str,
        pod: &TestNetns,
        ifname: &str,
        conf: &Value,
    ) -> netns_tests::Outcome {
        Invocation::plugin("portmap")
            .in_netns(self.ns.path())
            .command(cmd)
            .path(&[bin_dir()])
            .container_id(cid)
            .netns(pod.path())
            .ifname(ifname)
            .stdin_json(conf)
            .run()
    }

    /// A portmap config of this node's network with `maps` and `prev`.
    fn portmap_conf(&self, maps: &Value, prev: Option<&Value>) -> Value {
        let mut c = json!({"cniVersion": "1.1.0", "name": self.name, "type": "portmap",
            "dataDir": self.dir.join("portmap"), "runtimeConfig": {"portMappings": maps}});
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }
}

fn mapping(host: i64, container: i64, proto: &str) -> Value {
    json!({"hostPort": host, "containerPort": container, "protocol": proto})
}

fn pod(id: &str, netns: &TestNetns, mappings: Value) -> Attachment {
    let mut a = Attachment::new(id, &netns.path_str(), "eth0");
    a.capability_args.insert("portMappings".into(), mappings);
    a
}

fn ns(t: &TestNetns) -> NetNs {
    NetNs::open(t.path()).unwrap()
}

/// A TCP server in `netns` on `port` answering each connection with the address it
/// saw the client as; it lives as long as the test process.
fn tcp_server(netns: &TestNetns, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let l = ns(netns).run(|| TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let peer = c.peer_addr().unwrap().ip().to_string();
            let _ = c.write_all(peer.as_bytes());
        }
    });
}

/// A UDP server in `netns` answering each datagram with the sender's address.
fn udp_server(netns: &TestNetns, addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = ns(netns).run(|| UdpSocket::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(from.ip().to_string().as_bytes(), from);
        }
    });
}

/// Connect from `netns` to `to`: the peer address the server saw, or `None`.
fn tcp_get(netns: &TestNetns, to: &str) -> Option<String> {
    let to: SocketAddr = to.parse().unwrap();
    ns(netns)
        .run(|| {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            let mut s = String::new();
            c.read_to_string(&mut s).ok()?;
            Some(s)
        })
        .unwrap()
}

/// One datagram from `netns` (from `from_port`, 0 = any) to `to`; the answer.
fn udp_get(netns: &TestNetns, from_port: u16, to: &str) -> Option<String> {
    let to: SocketAddr = to.parse().unwrap();
    ns(netns)
        .run(|| {
            let bind = if to.is_ipv4() { "0.0.0.0" } else { "::" };
            let s = UdpSocket::bind((bind, from_port)).ok()?;
            s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
            s.send_to(b"hi", to).ok()?;
            let mut buf = [0u8; 64];
            let (n, _) = s.recv_from(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .unwrap()
}

fn ip_of(result: &Value, v4: bool) -> String {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap().split('/').next().unwrap())
        .find(|a| a.contains('.') == v4)
        .unwrap()
        .to_string()
}

#[test]
fn tcp_and_udp_reach_the_pod_from_outside_the_host_the_pod_and_localhost() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.86.0.0/24"], json!({}));
    let (a, b) = (TestNetns::new(), TestNetns::new());
    // b first: its ADD creates the table, so conntrack tracks the probe below.
    let att_b = pod("b", &b, json!([mapping(17000, 7000, "tcp")]));
    let rb = driver.add(&att_b).unwrap();
    // A UDP "connection" to a host port nobody maps yet: without the conntrack flush
    // it would keep bypassing the mapping added next.
    let early = format!("{NODE_IP}:15353");
    assert_eq!(udp_get(&node.outside, 40000, &early), None);

    let att_a = pod(
        "a",
        &a,
        json!([mapping(18080, 80, "tcp"), mapping(15353, 53, "udp")]),
    );
    let ra = driver.add(&att_a).unwrap();
    let (gw, ip_a) = ("10.86.0.1", ip_of(&ra, true));
    tcp_server(&a, "0.0.0.0:80");
    udp_server(&a, "0.0.0.0:53");

    let via_node = format!("{NODE_IP}:18080");
    // From outside: the client's own address reaches the pod (no masquerade).
    assert_eq!(
        tcp_get(&node.outside, &via_node).as_deref(),
        Some(CLIENT_IP)
    );
    assert_eq!(
        udp_get(&node.outside, 40000, &early).as_deref(),
        Some(CLIENT_IP)
    );
    // From the host itself, to its own addresses and to localhost.
    assert!(tcp_get(&node.ns, &via_node).is_some());
    assert_eq!(tcp_get(&node.ns, "127.0.0.1:18080").as_deref(), Some(gw));
    assert_eq!(udp_get(&node.ns, 0, "127.0.0.1:15353").as_deref(), Some(gw));
    let sysctl = node
        .ns
        .exec_ok(&["sysctl", "-n", "net.ipv4.conf.wp0.route_localnet"]);
    assert_eq!(sysctl.trim(), "1");
    // Hairpin: the pod itself and its neighbour come back masqueraded.
    assert_eq!(tcp_get(&a, &via_node).as_deref(), Some(gw));
    assert_eq!(tcp_get(&b, &via_node).as_deref(), Some(gw));
    assert_eq!(tcp_get(&b, &format!("{gw}:18080")).as_deref(), Some(gw));
    // Direct pod traffic is untouched.
    let ip_b = ip_of(&rb, true);
    assert_eq!(tcp_get(&b, &format!("{ip_a}:80")), Some(ip_b));

    driver.check(&att_a).unwrap();
    driver.del(&att_a).unwrap();
    assert_eq!(tcp_get(&node.outside, &via_node), None);
    driver.del(&att_b).unwrap();
    assert_eq!(node.elements(), Vec::<String>::new());
    assert_eq!(node.records(), 0);
}

#[test]
fn ipv6_and_host_ip_mappings() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.87.0.0/24", "fd87::/64"], json!({}));
    let a = TestNetns::new();
    let att = pod(
        "a",
        &a,
        json!([
            mapping(18080, 80, "tcp"),
            {"hostPort": 18081, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_IP},
            {"hostPort": 18082, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_IP6},
        ]),
    );
    let r = driver.add(&att).unwrap();
    tcp_server(&a, "[::]:80");
    let client6 = "2001:db8:51::2";
    // The gateway address on the bridge is usable once the kernel's duplicate
    // address detection is done (~1 s after the first pod's ADD, as with the
    // reference bridge).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !node
        .ns
        .exec_ok(&["ip", "-6", "addr", "show", "dev", "wp0", "tentative"])
        .trim()
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "DAD never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        tcp_get(&node.outside, &format!("[{NODE_IP6}]:18080")).as_deref(),
        Some(client6)
    );
    assert_eq!(
        tcp_get(&node.outside, &format!("[{NODE_IP6}]:18082")).as_deref(),
        Some(client6)
    );
    // The v4 server socket is dual-stack: v4 clients show as mapped addresses.
    let mapped = format!("::ffff:{CLIENT_IP}");
    assert_eq!(
        tcp_get(&node.outside, &format!("{NODE_IP}:18081")).as_deref(),
        Some(mapped.as_str())
    );
    // hostIP restricts: the gateway is a local address too, but not the mapped one.
    assert!(tcp_get(&node.ns, "10.87.0.1:18080").is_some());
    assert_eq!(tcp_get(&node.ns, "10.87.0.1:18081"), None);
    // Hairpin over IPv6 comes back from the v6 gateway.
    let gw6 = r["ips"][1]["gateway"].as_str().unwrap().to_string();
    assert_eq!(
        tcp_get(&a, &format!("[{NODE_IP6}]:18080")).as_deref(),
        Some(gw6.as_str())
    );
    driver.check(&att).unwrap();
    driver.del(&att).unwrap();
    assert_eq!(node.elements(), Vec::<String>::new());
}

#[test]
fn a_taken_host_port_is_refused_and_the_loser_leaves_nothing() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.88.0.0/24"], json!({}));
    let (a, b) = (TestNetns::new(), TestNetns::new());
    let att_a = pod("a", &a, json!([mapping(18080, 80, "tcp")]));
    let ra = driver.add(&att_a).unwrap();
    let before = node.elements();
    let att_b = pod(
        "b",
        &b,
        json!([mapping(18090, 80, "tcp"), mapping(18080, 8080, "tcp")]),
    );
    let err = driver.add(&att_b).unwrap_err();
    let cni = err.cni.clone().unwrap();
    assert_eq!(cni.code, 104, "{err}");
    assert!(
        cni.msg.contains("18080/tcp") && cni.msg.contains("id:a if:eth0"),
        "{cni}"
    );
    assert_eq!(node.elements(), before, "b's other mapping was rolled back");
    assert_eq!(node.records(), 1);
    // The same attachment adding again is not a conflict.
    let again = node.portmap_conf(&json!([mapping(18080, 80, "tcp")]), Some(&ra));
    assert_eq!(node.portmap("ADD", "a", &a, &again).ok(), ra);
    assert_eq!(node.elements(), before);
    // Another protocol, or another host IP, on the same port is no conflict either.
    let att_c = pod(
        "c",
        &b,
        json!([mapping(18080, 80, "udp"), {"hostPort": 18080, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_IP}]),
    );
    let _ = driver.del(&att_b);
    driver.add(&att_c).unwrap();
    driver.del(&att_c).unwrap();
    driver.del(&att_a).unwrap();
    assert_eq!(node.elements(), Vec::<String>::new());
}

/// DEL without portMappings, without prevResult, with the network renamed, twice.
#[test]
fn del_cleans_up_without_mappings_or_prev_result_and_after_a_rename() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.89.0.0/24"], json!({}));
    let a = TestNetns::new();
    let maps = json!([mapping(18080, 80, "tcp"), mapping(15353, 53, "udp")]);
    let att = pod("a", &a, maps.clone());
    let r = driver.add(&att).unwrap();
    let bare = |name: &str| {
        json!({"cniVersion": "1.1.0", "name": name, "type": "portmap",
            "dataDir": node.dir.join("portmap")})
    };
    let add = node.portmap_conf(&maps, Some(&r));
    // Renamed network, no portMappings, no prevResult: ADD's record still names it.
    node.portmap("DEL", "a", &a, &bare("renamed")).ok();
    assert_eq!(node.elements(), Vec::<String>::new());
    assert_eq!(node.records(), 0);
    node.portmap("DEL", "a", &a, &bare("renamed")).ok();

    // Without the record either: the owners are found in the table.
    node.portmap("ADD", "a", &a, &add).ok();
    assert_eq!(node.elements().len(), 6);
    std::fs::remove_dir_all(node.dir.join("portmap")).unwrap();
    node.portmap("DEL", "a", &a, &bare("renamed-again")).ok();
    assert_eq!(node.elements(), Vec::<String>::new());

    // With portMappings but no record and no prevResult: the owners are found in the
    // table too (the mappings do not say which class holds a key).
    node.portmap("ADD", "a", &a, &add).ok();
    std::fs::remove_dir_all(node.dir.join("portmap")).unwrap();
    node.portmap("DEL", "a", &a, &node.portmap_conf(&maps, None))
        .ok();
    assert_eq!(node.elements(), Vec::<String>::new());
    driver.del(&att).unwrap();
}

#[test]
fn check_finds_tampering_and_add_repairs_it() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.90.0.0/24"], json!({}));
    let a = TestNetns::new();
    let att = pod("a", &a, json!([mapping(18080, 80, "tcp")]));
    let r = driver.add(&att).unwrap();
    driver.check(&att).unwrap();
    node.ns.exec_ok(&[
        "nft",
        "delete",
        "element",
        "inet",
        "weft_portmap",
        "targets_v4",
        "{",
        "tcp",
        ".",
        "18080",
        "}",
    ]);
    let err = driver.check(&att).unwrap_err();
    let cni = err.cni.clone().unwrap();
    assert_eq!(cni.code, 102);
    assert!(
        cni.msg
            .contains("18080/tcp (IPv4) has no element in targets_v4"),
        "{cni}"
    );
    // ADD again (portmap alone, as the chain's last plugin) puts it back.
    node.portmap(
        "ADD",
        "a",
        &a,
        &node.portmap_conf(&json!([mapping(18080, 80, "tcp")]), Some(&r)),
    )
    .ok();
    driver.check(&att).unwrap();
    node.ns.exec_ok(&[
        "nft",
        "flush",
        "chain",
        "inet",
        "weft_portmap",
        "prerouting",
    ]);
    let err = driver.check(&att).unwrap_err();
    assert!(
        err.to_string().contains("chain prerouting has no rules"),
        "{err}"
    );
    driver.del(&att).unwrap();
}

#[test]
fn gc_removes_the_mappings_of_attachments_gone_missing() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.91.0.0/24"], json!({}));
    let (a, b) = (TestNetns::new(), TestNetns::new());
    driver
        .add(&pod("a", &a, json!([mapping(18080, 80, "tcp")])))
        .unwrap();
    driver
        .add(&pod("b", &b, json!([mapping(18081, 80, "tcp")])))
        .unwrap();
    // A mapping of another network on the same node must survive our GC.
    let other = node.driver_named("other-net", "wp1", &["10.191.0.0/24"], json!({}));
    let c = TestNetns::new();
    let att_c = pod("c", &c, json!([mapping(18082, 80, "tcp")]));
    other.add(&att_c).unwrap();
    driver.gc(&[("a", "eth0")]).unwrap();
    let left = node.elements();
    assert_eq!(left.len(), 6, "{left:?}");
    assert!(left.iter().all(|e| !e.contains("18081")), "{left:?}");
    assert_eq!(node.records(), 2);
    driver
        .del(&pod("a", &a, json!([mapping(18080, 80, "tcp")])))
        .unwrap();
    driver.gc::<&str>(&[]).unwrap();
    let own_chains = format!("chain pm-{}", weft_core::nft::hash_hex(&[&node.name]));
    assert!(!node.table().contains(&own_chains), "{}", node.table());
    assert_eq!(
        node.elements().len(),
        3,
        "the other network's mapping stays"
    );
    other.del(&att_c).unwrap();
    assert_eq!(node.elements(), Vec::<String>::new());
    assert_eq!(node.records(), 0);
}

#[test]
fn conditions_and_snat_options() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(
        &["10.92.0.0/24"],
        json!({"conditionsV4": ["!", "-s", "198.51.100.0/24"], "snat": false}),
    );
    let a = TestNetns::new();
    let att = pod("a", &a, json!([mapping(18080, 80, "tcp")]));
    driver.add(&att).unwrap();
    tcp_server(&a, "0.0.0.0:80");
    assert_eq!(tcp_get(&node.outside, &format!("{NODE_IP}:18080")), None);
    assert!(tcp_get(&node.ns, "10.92.0.1:18080").is_some());
    // snat off: nothing masquerades, and route_localnet is left alone.
    assert!(!node.table().contains("masquerade"), "{}", node.table());
    let sysctl = node
        .ns
        .exec_ok(&["sysctl", "-n", "net.ipv4.conf.wp0.route_localnet"]);
    assert_eq!(sysctl.trim(), "0");
    driver.del(&att).unwrap();
}

/// ADD again for the same attachment with other options (another class) and one
/// mapping fewer: what the first ADD installed and the second does not is gone, and
/// DEL then leaves nothing.
#[test]
fn a_repeated_add_drops_what_it_no_longer_installs() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.95.0.0/24"], json!({}));
    let a = TestNetns::new();
    let two = json!([mapping(18080, 80, "tcp"), mapping(18081, 81, "tcp")]);
    let r = driver.add(&pod("a", &a, two.clone())).unwrap();
    assert_eq!(node.elements().len(), 6);
    let mut again = node.portmap_conf(&json!([mapping(18080, 80, "tcp")]), Some(&r));
    again["snat"] = json!(false);
    node.portmap("ADD", "a", &a, &again).ok();
    let left = node.elements();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left.iter().all(|e| !e.contains("18081")), "{left:?}");
    node.portmap("DEL", "a", &a, &again).ok();
    assert_eq!(node.elements(), Vec::<String>::new());
    assert_eq!(node.records(), 0);
    driver.del(&pod("a", &a, two)).unwrap();
}

/// A node that ran the layout before classes (a verdict map `ports_v4` whose
/// elements jump to a per-network chain, flat records without classes) keeps working
/// next to the new one: DEL empties the legacy map, GC drops it with its lookup and
/// chain once empty.
#[test]
fn the_layout_before_classes_is_emptied_and_dropped() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.96.0.0/24"], json!({}));
    let b = TestNetns::new();
    let att_b = pod("b", &b, json!([mapping(18080, 80, "tcp")]));
    driver.add(&att_b).unwrap();
    // What the earlier layout left for attachment ("old", eth0).
    let chain = format!(
        "pm-{}-0123456789abcdef-a",
        weft_core::nft::hash_hex(&[&node.name])
    );
    let att = weft_core::masq::Attachment::new(&node.name, "old", "eth0");
    let owner = weft_core::masq::owner_value(&att.owner());
    let legacy = format!(
        "add map inet weft_portmap ports_v4 {{ type inet_proto . inet_service : verdict; }}\n\
         add chain inet weft_portmap {chain}\n\
         add rule inet weft_portmap {chain} dnat ip to meta l4proto . th dport map @targets_v4\n\
         add rule inet weft_portmap hostports meta nfproto ipv4 meta l4proto . th dport vmap @ports_v4\n\
         add element inet weft_portmap ports_v4 {{ tcp . 18090 : jump {chain} }}\n\
         add element inet weft_portmap targets_v4 {{ tcp . 18090 : 10.96.0.50 . 80 }}\n\
         add element inet weft_portmap owners_v4 {{ 0.0.0.0 . tcp . 18090 : {owner} }}\n"
    );
    let script = node.dir.join("legacy.nft");
    std::fs::write(&script, legacy).unwrap();
    node.ns.exec_ok(&["nft", "-f", script.to_str().unwrap()]);
    let record = json!({"network": node.name, "containerID": "old", "ifname": "eth0",
        "keys": [{"v6": false, "protocol": "tcp", "hostPort": 18090}]});
    let flat = node.dir.join("portmap").join(format!(
        "{}.json",
        weft_core::nft::hash_hex(&["old", "eth0"])
    ));
    std::fs::write(&flat, record.to_string()).unwrap();
    assert_eq!(node.elements().len(), 6);

    node.portmap("DEL", "old", &b, &node.portmap_conf(&json!([]), None))
        .ok();
    let left = node.elements();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left.iter().all(|e| !e.contains("18090")), "{left:?}");
    assert!(!flat.exists());
    assert!(node.table().contains("vmap @ports_v4"), "kept until GC");

    driver.gc(&[("b", "eth0")]).unwrap();
    let table = node.table();
    assert!(!table.contains("ports_v4"), "{table}");
    assert!(!table.contains(&chain), "{table}");
    assert_eq!(node.elements().len(), 3, "b's mapping stays");
    driver.check(&att_b).unwrap();
    driver.del(&att_b).unwrap();
    assert_eq!(node.elements(), Vec::<String>::new());
}

/// Bad configs fail with code 7 before anything changes; no mappings, or no address
/// on CNI_IFNAME in a sandbox, pass prevResult through untouched.
#[test]
fn bad_configs_and_nothing_to_do() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.93.0.0/24"], json!({}));
    let a = TestNetns::new();
    let r = driver.add(&pod("a", &a, json!([]))).unwrap();
    assert_eq!(node.table(), "", "no mappings: no table");
    let run = |conf: &Value, ifname: &str| node.portmap_on("ADD", "x", &a, ifname, conf);
    let base = |extra: Value, maps: Value| {
        let mut c = node.portmap_conf(&maps, Some(&r));
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let one = json!([mapping(18080, 80, "tcp")]);
    for (extra, maps, want) in [
        (
            json!({}),
            json!([mapping(0, 80, "tcp")]),
            "Invalid host port number: 0",
        ),
        (
            json!({}),
            json!([mapping(70000, 80, "tcp")]),
            "Invalid host port number: 70000",
        ),
        (
            json!({}),
            json!([mapping(1, 0, "tcp")]),
            "Invalid container port number: 0",
        ),
        (
            json!({}),
            json!([mapping(1, 1, "")]),
            "Invalid protocol \"\"",
        ),
        (
            json!({"markMasqBit": 40}),
            one.clone(),
            "MasqMarkBit must be between 0 and 31",
        ),
        (
            json!({"markMasqBit": 5, "externalSetMarkChain": "KUBE-MARK-MASQ"}),
            one.clone(),
            "Cannot specify externalSetMarkChain and markMasqBit",
        ),
        (
            json!({"conditionsV4": ["-m", "mark"]}),
            one.clone(),
            "cannot be translated",
        ),
    ] {
        let e = run(&base(extra, maps), "eth0").err();
        assert_eq!(e.code, 7, "{e:?}");
        assert!(e.msg.contains(want), "{} lacks {want}", e.msg);
    }
    let mut chained = base(json!({}), one.clone());
    chained.as_object_mut().unwrap().remove("prevResult");
    assert!(
        run(&chained, "eth0")
            .err()
            .msg
            .contains("must be called as chained plugin")
    );
    assert_eq!(node.table(), "");
    assert_eq!(node.records(), 0);

    // Another ifname than the one in prevResult: nothing installed, result echoed.
    let out = run(&base(json!({}), one.clone()), "eth1").ok();
    assert_eq!(out, r);
    assert_eq!(node.table(), "");
    // No mappings: the result comes back byte for byte.
    let out = run(&base(json!({}), json!([])), "eth0").ok();
    insta::assert_json_snapshot!("portmap_echoes_prev_result", out, {
        ".interfaces[].mac" => "[mac]",
        ".interfaces[1].name" => "[veth]",
        ".interfaces[2].sandbox" => "[netns]",
    });
    let _: Result<(), DriverError> = driver.del(&pod("a", &a, json!([])));
}

/// An ADD right after a DEL, of the same attachment or of another pod taking the
/// same port, ends up mapped (the guard for any future deferral of DEL's deletes).
#[test]
fn add_right_after_del_waits_for_the_deletion() {
    let Some(node) = Node::new() else { return };
    let driver = node.driver(&["10.94.0.0/24"], json!({}));
    let (a, b) = (TestNetns::new(), TestNetns::new());
    let maps = json!([mapping(18080, 80, "tcp")]);
    let ra = driver.add(&pod("a", &a, maps.clone())).unwrap();
    let rb = driver.add(&pod("b", &b, json!([]))).unwrap();
    let conf_a = node.portmap_conf(&maps, Some(&ra));
    for _ in 0..5 {
        node.portmap("DEL", "a", &a, &conf_a).ok();
        node.portmap("ADD", "a", &a, &conf_a).ok();
        assert_eq!(node.elements().len(), 3, "the same attachment again");
    }
    let conf_b = node.portmap_conf(&maps, Some(&rb));
    node.portmap("DEL", "a", &a, &conf_a).ok();
    node.portmap("ADD", "b", &b, &conf_b).ok();
    let left = node.elements();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(
        left.iter().any(|e| e.contains(&ip_of(&rb, true))),
        "{left:?}"
    );
    node.portmap("DEL", "b", &b, &conf_b).ok();
    assert_eq!(node.elements(), Vec::<String>::new());
    assert_eq!(node.records(), 0);
}
