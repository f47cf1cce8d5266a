//! The bridge plugin with host-local, run inside a "node" test netns with pods in
//! other test namespaces: kernel state, traffic, CHECK, DEL, rollback.

use netns_tests::{
    Invocation, Outcome, TempDir, TestNetns, bin_dir, reference_dir, require_root, unique_name,
};
use serde_json::{Value, json};

struct Node {
    ns: TestNetns,
    dir: TempDir,
    name: String,
}

impl Node {
    fn new() -> Option<Node> {
        require_root().then(|| Node {
            ns: TestNetns::new(),
            dir: TempDir::new("br"),
            name: unique_name("br"),
        })
    }

    /// A bridge config on `bridge` with host-local over `subnets` (one set each).
    fn conf(&self, bridge: &str, subnets: &[&str], extra: Value) -> Value {
        let sets: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
        let mut c = json!({"cniVersion": "1.0.0", "name": self.name, "type": "bridge", "bridge": bridge,
            "ipam": {"type": "host-local", "dataDir": self.dir.path(), "ranges": sets}});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn run(&self, cmd: &str, cid: &str, pod: &TestNetns, ifname: &str, conf: &Value) -> Outcome {
        self.pod_call(cmd, cid, pod.path(), ifname, conf).run()
    }

    /// bridge run on this node for `cmd`, with CNI_PATH and `conf` set.
    fn call(&self, cmd: &str, conf: &Value) -> Invocation {
        Invocation::plugin("bridge")
            .in_netns(self.ns.path())
            .command(cmd)
            .path(&[bin_dir()])
            .stdin_json(conf)
    }

    /// [`Self::call`] for one attachment, ready for extra variables before `run()`.
    fn pod_call(
        &self,
        cmd: &str,
        cid: &str,
        netns: impl AsRef<std::path::Path>,
        ifname: &str,
        conf: &Value,
    ) -> Invocation {
        self.call(cmd, conf)
            .container_id(cid)
            .netns(netns)
            .ifname(ifname)
    }

    /// host-local reservation files (named by an address) of this network.
    fn reservations(&self) -> usize {
        netns_tests::reservations(&self.dir.join(&self.name)).len()
    }
}

/// The pod's links once DEL's background deletion of retired interfaces (`wdel…`)
/// has finished: they must go within a few seconds.
fn pod_links_after_del(pod: &TestNetns) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let links = pod.link_names();
        if !links.iter().any(|l| l.starts_with("wdel")) || std::time::Instant::now() > deadline {
            return links;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn ping(from: &TestNetns, to: &str) -> bool {
    from.exec(&["ping", "-c", "1", "-W", "2", to])
        .status
        .success()
}

#[test]
fn add_check_del_dual_stack() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let conf = node.conf(
        "wb0",
        &["10.85.0.0/24", "fd85::/64"],
        json!({"isDefaultGateway": true, "mtu": 1400}),
    );
    let result = node.run("ADD", "c1", &pod, "eth0", &conf).ok();
    insta::assert_json_snapshot!("bridge_add_dual_stack", result, {
        ".interfaces[].mac" => "[mac]",
        ".interfaces[1].name" => "[veth]",
        ".interfaces[2].sandbox" => "[netns]",
    });
    let veth = result["interfaces"][1]["name"].as_str().unwrap();
    assert!(veth.len() == 12 && veth.starts_with("veth"), "{veth}");
    assert_eq!(result["interfaces"][2]["sandbox"], pod.path_str());

    let br = node
        .ns
        .exec_json(&["ip", "-j", "-d", "addr", "show", "wb0"]);
    let addrs: Vec<&str> = br[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["local"].as_str().unwrap())
        .collect();
    assert!(
        addrs.contains(&"10.85.0.1") && addrs.contains(&"fd85::1"),
        "{addrs:?}"
    );
    let eth0 = pod.exec_json(&["ip", "-j", "-d", "link", "show", "eth0"]);
    assert_eq!(
        (
            eth0[0]["mtu"].as_u64(),
            eth0[0]["linkinfo"]["info_kind"].as_str()
        ),
        (Some(1400), Some("veth"))
    );
    let arp_notify = pod.exec_ok(&["cat", "/proc/sys/net/ipv4/conf/eth0/arp_notify"]);
    assert_eq!(arp_notify.trim(), "1");
    assert!(ping(&pod, "10.85.0.1"), "pod reaches its gateway");

    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    node.run("CHECK", "c1", &pod, "eth0", &with_prev).ok();
    pod.exec_ok(&["ip", "addr", "del", "10.85.0.2/24", "dev", "eth0"]);
    let e = node.run("CHECK", "c1", &pod, "eth0", &with_prev).err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (102, "failed to match addr 10.85.0.2/24 on interface eth0")
    );

    node.run("DEL", "c1", &pod, "eth0", &conf).ok();
    assert_eq!(pod_links_after_del(&pod), ["lo"]);
    assert!(
        !node.ns.link_names().iter().any(|l| l.starts_with("veth")),
        "{:?}",
        node.ns.link_names()
    );
    assert_eq!(node.reservations(), 0);
    node.run("DEL", "c1", &pod, "eth0", &conf).ok();
}

#[test]
fn two_pods_talk_through_the_bridge() {
    let Some(node) = Node::new() else { return };
    let (a, b) = (TestNetns::new(), TestNetns::new());
    let conf = node.conf("wb1", &["10.87.0.0/24"], json!({"isGateway": true}));
    let ip_a = node.run("ADD", "a", &a, "eth0", &conf).ok()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    let ip_b = node.run("ADD", "b", &b, "eth0", &conf).ok()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ping(&a, ip_b.split('/').next().unwrap()), "a -> b");
    assert!(ping(&b, ip_a.split('/').next().unwrap()), "b -> a");
    for (cid, pod) in [("a", &a), ("b", &b)] {
        node.run("DEL", cid, pod, "eth0", &conf).ok();
    }
}

/// A failed ADD leaves nothing: no veth, no address, no bridge it created itself.
#[test]
fn failed_add_rolls_back() {
    let Some(node) = Node::new() else { return };
    let (a, b) = (TestNetns::new(), TestNetns::new());
    let conf = node.conf("wb2", &["10.88.0.0/30"], json!({"isGateway": true}));
    node.run("ADD", "a", &a, "eth0", &conf).ok(); // takes the only address
    let e = node.run("ADD", "b", &b, "eth0", &conf).err();
    assert_eq!(e.code, 100);
    assert_eq!(b.link_names(), ["lo"], "the pod's veth was removed");
    assert_eq!(
        node.ns
            .link_names()
            .iter()
            .filter(|l| l.starts_with("veth"))
            .count(),
        1,
        "{:?}",
        node.ns.link_names()
    );
    assert_eq!(node.reservations(), 1);

    // A bridge this ADD created is removed with it.
    let fresh = node.conf("wb3", &["10.89.0.0/24"], json!({"ipam": {"type": "nope"}}));
    let e = node.run("ADD", "c", &b, "eth0", &fresh).err();
    assert!(
        e.msg.starts_with("failed to find plugin \"nope\""),
        "{}",
        e.msg
    );
    assert!(
        !node.ns.link_names().contains(&"wb3".to_string()),
        "{:?}",
        node.ns.link_names()
    );
    assert_eq!(b.link_names(), ["lo"]);
}

#[test]
fn existing_ifname_fails_before_ipam() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let conf = node.conf("wb4", &["10.90.0.0/24"], json!({}));
    node.run("ADD", "a", &pod, "eth0", &conf).ok();
    let e = node.run("ADD", "b", &pod, "eth0", &conf).err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (4, "container veth name provided (eth0) already exists")
    );
    assert_eq!(node.reservations(), 1, "no address was taken");
}

#[test]
fn l2_mode_and_requested_mac() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let conf = json!({"cniVersion": "1.0.0", "name": node.name, "type": "bridge", "bridge": "wb5",
        "runtimeConfig": {"mac": "0a:58:0a:55:00:09"}});
    let r = node.run("ADD", "a", &pod, "eth0", &conf).ok();
    assert!(r.get("ips").is_none(), "{r}");
    assert_eq!(r["interfaces"][2]["mac"], "0a:58:0a:55:00:09");
    let eth0 = pod.exec_json(&["ip", "-j", "link", "show", "eth0"]);
    assert!(eth0[0]["flags"].as_array().unwrap().contains(&json!("UP")));
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = r;
    node.run("CHECK", "a", &pod, "eth0", &with_prev).ok();
    let e = node
        .run(
            "ADD",
            "b",
            &pod,
            "eth1",
            &node.conf(
                "wb5",
                &["10.91.0.0/24"],
                json!({"cniVersion": "0.2.0", "ipam": {}}),
            ),
        )
        .err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (6, "cannot convert: no valid IP addresses")
    );
    // Undone by DEL, which deletes the interface in the background.
    assert_eq!(
        pod_links_after_del(&pod),
        ["lo", "eth0"],
        "the 0.2.0 L2 ADD was undone"
    );
    node.run("DEL", "a", &pod, "eth0", &conf).ok();
}

#[test]
fn bad_configs_change_nothing() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let cases = [
        (json!({"hairpinMode": true, "promiscMode": true}), 7),
        (json!({"vlan": 5000}), 7),
        (json!({"vlan": 10}), 2),
        (json!({"ipMasqBackend": "iptables"}), 2),
        (json!({"mtu": 10}), 7),
        (json!({"bridge": "a-bridge-name-too-long"}), 7),
        (json!({"disableContainerInterface": true}), 7),
        (json!({"runtimeConfig": {"mac": "zz:zz"}}), 7),
        (json!({"isGateway": "yes"}), 6),
    ];
    for (extra, code) in cases {
        let e = node
            .run(
                "ADD",
                "a",
                &pod,
                "eth0",
                &node.conf("wb6", &["10.92.0.0/24"], extra.clone()),
            )
            .err();
        assert_eq!(e.code, code, "{extra}: {}", e.msg);
        assert_eq!(node.ns.link_names(), ["lo"], "{extra}");
        assert_eq!(pod.link_names(), ["lo"], "{extra}");
        assert_eq!(node.reservations(), 0, "{extra}");
    }
}

/// The plugin's own namespace as CNI_NETNS: refused before anything happens.
#[test]
fn own_netns_is_refused() {
    let Some(node) = Node::new() else { return };
    let conf = node.conf("wb7", &["10.93.0.0/24"], json!({"isDefaultGateway": true}));
    let e = node.run("ADD", "a", &node.ns, "eth0", &conf).err();
    assert_eq!(e.code, 4);
    assert!(e.msg.contains("own network namespace"), "{}", e.msg);
    assert_eq!(node.ns.link_names(), ["lo"]);
    assert_eq!(node.reservations(), 0);
}

/// DEL without the pod's namespace still releases the addresses.
#[test]
fn del_after_the_netns_is_gone() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let conf = node.conf("wb8", &["10.94.0.0/24"], json!({"isGateway": true}));
    node.run("ADD", "a", &pod, "eth0", &conf).ok();
    let path = pod.path_str();
    drop(pod);
    let del = node.pod_call("DEL", "a", &path, "eth0", &conf).run();
    del.ok();
    assert_eq!(node.reservations(), 0);
}

#[test]
fn hairpin_and_port_isolation() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let conf = node.conf(
        "wb9",
        &["10.95.0.0/24"],
        json!({"hairpinMode": true, "portIsolation": true}),
    );
    let r = node.run("ADD", "a", &pod, "eth0", &conf).ok();
    let veth = r["interfaces"][1]["name"].as_str().unwrap().to_string();
    let veth = veth.as_str();
    let info = node.ns.exec_json(&["ip", "-j", "-d", "link", "show", veth]);
    let port = &info[0]["linkinfo"]["info_slave_data"];
    assert_eq!(
        (port["hairpin"].as_bool(), port["isolated"].as_bool()),
        (Some(true), Some(true)),
        "{port}"
    );
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = r;
    node.run("CHECK", "a", &pod, "eth0", &with_prev).ok();
    node.ns.exec_ok(&[
        "ip",
        "link",
        "set",
        veth,
        "type",
        "bridge_slave",
        "hairpin",
        "off",
    ]);
    assert_eq!(
        node.run("CHECK", "a", &pod, "eth0", &with_prev).err().code,
        102
    );
}

#[test]
fn status_and_gc_go_to_ipam() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let mut conf = node.conf("wb10", &["10.96.0.0/30"], json!({}));
    conf["cniVersion"] = json!("1.1.0");
    let status = || node.call("STATUS", &conf).run();
    status().ok();
    node.run("ADD", "a", &pod, "eth0", &conf).ok();
    assert_eq!(status().err().code, 50, "the only address is taken");
    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([]);
    node.call("GC", &gc).run().ok();
    assert_eq!(node.reservations(), 0);
}

/// The shipped conflist, driven as a runtime drives it: ADD with a cached result,
/// CHECK with that result as prevResult, GC, reverse DEL removing the cache.
#[test]
fn conflist_example_through_the_driver() {
    use netns_tests::driver::{Attachment, Driver};
    let Some(node) = Node::new() else { return };
    let path = netns_tests::workspace_root().join("conf-examples/10-weft-bridge.conflist");
    let mut list: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    list["name"] = json!(node.name);
    list["plugins"][0]["ipam"]["dataDir"] = json!(node.dir.path());
    let driver = Driver::from_json(&list, vec![bin_dir()], node.dir.join("cache"))
        .unwrap()
        .in_netns(node.ns.path());
    let (a, b) = (TestNetns::new(), TestNetns::new());
    let (att_a, att_b) = (
        Attachment::new("a", &a.path_str(), "eth0"),
        Attachment::new("b", &b.path_str(), "eth0"),
    );
    let ra = driver.add(&att_a).unwrap();
    driver.add(&att_b).unwrap();
    assert_eq!(ra["cniVersion"], "1.1.0");
    assert_eq!(ra["interfaces"][0]["name"], "cni0");
    driver.check(&att_a).unwrap();
    driver.status().unwrap();
    let ip_a = ra["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(ping(&b, &ip_a), "b reaches a");
    driver.gc(&[("a", "eth0")]).unwrap(); // b's cached attachment is DELeted
    assert_eq!(pod_links_after_del(&b), ["lo"]);
    assert!(!driver.cache_path("b", "eth0").exists());
    driver.del(&att_a).unwrap();
    assert_eq!(pod_links_after_del(&a), ["lo"]);
    assert_eq!(node.reservations(), 0);
    assert!(!driver.cache_path("a", "eth0").exists());
}

/// Connect `node` to a fresh "outside" namespace on 198.51.100.0/24, which has no
/// route back to any pod subnet: only masqueraded traffic gets answers.
fn outside(node: &Node) -> TestNetns {
    let out = TestNetns::new();
    netns_tests::join(
        &node.ns,
        ("wo0", "198.51.100.1/24"),
        &out,
        ("wo1", "198.51.100.2/24"),
    );
    out
}

fn masq_elements(node: &Node) -> String {
    node.ns
        .exec_ok(&["nft", "list", "map", "inet", "weft_masq", "pods_v4"])
}

#[test]
fn ip_masq_reaches_the_outside_and_leaves_nothing() {
    let Some(node) = Node::new() else { return };
    let out = outside(&node);
    let pod = TestNetns::new();
    let plain = node.conf("wb11", &["10.97.0.0/24"], json!({"isDefaultGateway": true}));
    node.run("ADD", "p0", &pod, "eth0", &plain).ok();
    assert!(
        !ping(&pod, "198.51.100.2"),
        "without ipMasq the outside cannot answer"
    );
    node.run("DEL", "p0", &pod, "eth0", &plain).ok();

    let conf = node.conf(
        "wb11",
        &["10.97.0.0/24"],
        json!({"isDefaultGateway": true, "ipMasq": true}),
    );
    let r = node.run("ADD", "a", &pod, "eth0", &conf).ok();
    let ip = r["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(
        ping(&pod, "198.51.100.2"),
        "masqueraded traffic gets answers"
    );
    assert!(
        ping(&pod, "10.97.0.1"),
        "the subnet is not masqueraded and still works"
    );
    assert!(
        masq_elements(&node).contains(&ip),
        "{}",
        masq_elements(&node)
    );

    let mut with_prev = conf.clone();
    with_prev["prevResult"] = r;
    node.run("CHECK", "a", &pod, "eth0", &with_prev).ok();
    node.ns.exec_ok(&[
        "nft",
        "delete",
        "element",
        "inet",
        "weft_masq",
        "pods_v4",
        &format!("{{ {ip} }}"),
    ]);
    assert_eq!(
        node.run("CHECK", "a", &pod, "eth0", &with_prev).err().code,
        102,
        "CHECK sees the firewall"
    );

    // DEL without the netns (nerdctl sends an empty CNI_NETNS): the reference leaks here.
    node.run("ADD", "b", &TestNetns::new(), "eth0", &conf).ok();
    let del = node
        .call("DEL", &conf)
        .container_id("b")
        .ifname("eth0")
        .run();
    del.ok();
    assert_eq!(
        node.reservations(),
        1,
        "only a's address is left (its element was deleted by hand)"
    );
    assert!(
        !masq_elements(&node).contains("id:b "),
        "{}",
        masq_elements(&node)
    );

    // GC drops the state of attachments the runtime no longer lists.
    node.run("ADD", "c", &TestNetns::new(), "eth0", &conf).ok();
    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
    node.call("GC", &gc).run().ok();
    assert!(
        !masq_elements(&node).contains("id:c "),
        "{}",
        masq_elements(&node)
    );
    node.run("DEL", "a", &pod, "eth0", &conf).ok();
    assert_eq!(node.reservations(), 0);
    let left = masq_elements(&node);
    assert!(!left.contains("10.97."), "{left}");
    drop(out);
}

#[test]
fn force_address_replaces_a_foreign_gateway() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    node.ns
        .exec_ok(&["ip", "link", "add", "wb12", "type", "bridge"]);
    node.ns
        .exec_ok(&["ip", "addr", "add", "10.98.5.9/24", "dev", "wb12"]);
    let conf = node.conf("wb12", &["10.98.0.0/24"], json!({"isGateway": true}));
    let e = node.run("ADD", "a", &pod, "eth0", &conf).err();
    assert_eq!(e.code, 7);
    assert_eq!(
        e.msg,
        "failed to set bridge addr: \"wb12\" already has an IP address different from 10.98.0.1/24"
    );
    assert_eq!(
        (pod.link_names(), node.reservations()),
        (vec!["lo".to_string()], 0),
        "rolled back"
    );
    let forced = node.conf(
        "wb12",
        &["10.98.0.0/24"],
        json!({"isGateway": true, "forceAddress": true}),
    );
    node.run("ADD", "a", &pod, "eth0", &forced).ok();
    let addrs = node
        .ns
        .exec_ok(&["ip", "-4", "-br", "addr", "show", "wb12"]);
    assert!(
        addrs.contains("10.98.0.1/24") && !addrs.contains("10.98.5.9"),
        "{addrs}"
    );
}

/// The reference fails `could not set bridge's mac: invalid argument` here: a bridge
/// whose ports all left has the all-zero MAC.
#[test]
fn gateway_on_a_bridge_whose_ports_all_left() {
    let Some(node) = Node::new() else { return };
    let (a, b) = (TestNetns::new(), TestNetns::new());
    let l2 = json!({"cniVersion": "1.0.0", "name": node.name, "type": "bridge", "bridge": "wb13"});
    node.run("ADD", "a", &a, "eth0", &l2).ok();
    node.run("DEL", "a", &a, "eth0", &l2).ok();
    // DEL deletes the veth in the background: the bridge is portless once it is gone.
    assert_eq!(pod_links_after_del(&a), ["lo"]);
    let link = node.ns.exec_json(&["ip", "-j", "link", "show", "wb13"]);
    assert_eq!(
        link[0]["address"], "00:00:00:00:00:00",
        "the precondition of the reference bug"
    );
    let conf = node.conf("wb13", &["10.99.0.0/24"], json!({"isGateway": true}));
    let r = node.run("ADD", "b", &b, "eth0", &conf).ok();
    assert!(ping(&b, "10.99.0.1"));
    assert_ne!(r["interfaces"][0]["mac"], "00:00:00:00:00:00");
}

#[test]
fn dns_from_config_only_when_set_and_dad_knob() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let rc = node.dir.join("resolv.conf");
    std::fs::write(&rc, "nameserver 10.0.0.10\n").unwrap();
    let mut conf = node.conf(
        "wb14",
        &["10.100.0.0/24", "fd64::/64"],
        json!({"enabledad": true, "dns": {}}),
    );
    conf["ipam"]["resolvConf"] = json!(rc);
    let r = node.run("ADD", "a", &pod, "eth0", &conf).ok();
    assert_eq!(
        r["dns"],
        json!({"nameservers": ["10.0.0.10"]}),
        "an empty dns keeps IPAM's"
    );
    assert_eq!(
        pod.exec_ok(&["cat", "/proc/sys/net/ipv6/conf/eth0/accept_dad"])
            .trim(),
        "1"
    );
    conf["dns"] = json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]});
    let r = node.run("ADD", "b", &pod, "eth1", &conf).ok();
    assert_eq!(
        r["dns"],
        json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]})
    );
}

/// The last ADD step failing (nftables) undoes all the earlier ones.
#[test]
fn failing_masquerade_rolls_back_veth_and_address() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let conf = node.conf(
        "wb15",
        &["10.101.0.0/24"],
        json!({"isGateway": true, "ipMasq": true}),
    );
    let out = node
        .pod_call("ADD", "a", pod.path(), "eth0", &conf)
        .var("WEFT_NFT", "/bin/false")
        .run();
    assert_eq!(out.err().code, 999);
    assert_eq!(pod.link_names(), ["lo"]);
    assert!(
        !node.ns.link_names().iter().any(|l| l.starts_with("veth")),
        "{:?}",
        node.ns.link_names()
    );
    assert_eq!(node.reservations(), 0);
}

/// B25–B33: CHECK notices each kind of drift, with a precise error.
#[test]
fn check_detects_drift() {
    let Some(node) = Node::new() else { return };
    let conf = node.conf(
        "wb16",
        &["10.102.0.0/24"],
        json!({"isDefaultGateway": true}),
    );
    type Tamper = fn(&Node, &TestNetns, &str);
    let cases: [(&str, Tamper, u64, &str); 7] = [
        (
            "B25 default route deleted",
            |_, pod, _| drop(pod.exec_ok(&["ip", "route", "del", "default"])),
            102,
            "expected route to 0.0.0.0/0",
        ),
        (
            "B27 MAC changed",
            |_, pod, _| {
                drop(pod.exec_ok(&["ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"]))
            },
            102,
            "doesn't match container mac 02:00:00:00:00:99",
        ),
        (
            "B28 promisc on",
            |node, _, _| {
                drop(
                    node.ns
                        .exec_ok(&["ip", "link", "set", "wb16", "promisc", "on"]),
                )
            },
            102,
            "promiscMode false doesn't match current state true",
        ),
        (
            "B29 veth nomaster",
            |node, _, veth| drop(node.ns.exec_ok(&["ip", "link", "set", veth, "nomaster"])),
            102,
            "CNI veth created for bridge wb16 was not found",
        ),
        (
            "B31 IPAM file deleted",
            |node, _, _| {
                let dir = node.dir.join(&node.name);
                for e in std::fs::read_dir(dir).unwrap().flatten() {
                    if e.file_name().to_str().unwrap().starts_with("10.102.") {
                        std::fs::remove_file(e.path()).unwrap();
                    }
                }
            },
            102,
            "host-local: Failed to find address added by container a",
        ),
        (
            "B32 other netns",
            |_, _, _| {},
            102,
            "prevResult has no interface eth0 in sandbox",
        ),
        (
            "B33 no prevResult",
            |_, _, _| {},
            7,
            "Required prevResult missing",
        ),
    ];
    for (label, tamper, code, msg) in cases {
        let pod = TestNetns::new();
        let result = node.run("ADD", "a", &pod, "eth0", &conf).ok();
        let veth = result["interfaces"][1]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = result;
        node.run("CHECK", "a", &pod, "eth0", &with_prev).ok();
        tamper(&node, &pod, &veth);
        let other = TestNetns::new();
        let e = match label {
            l if l.starts_with("B32") => node.run("CHECK", "a", &other, "eth0", &with_prev).err(),
            l if l.starts_with("B33") => node.run("CHECK", "a", &pod, "eth0", &conf).err(),
            _ => node.run("CHECK", "a", &pod, "eth0", &with_prev).err(),
        };
        assert_eq!(e.code, code, "{label}: {}", e.msg);
        assert!(e.msg.contains(msg), "{label}: {}", e.msg);
        node.ns
            .exec_ok(&["ip", "link", "set", "wb16", "promisc", "off"]);
        node.run("DEL", "a", &pod, "eth0", &conf).ok();
    }
}

/// B36: DEL whose IPAM binary is missing fails, and the retry cleans up everything
/// (the reference leaks its masquerade rules on the retry).
#[test]
fn del_retry_after_missing_ipam_leaves_nothing() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let conf = node.conf(
        "wb17",
        &["10.103.0.0/24"],
        json!({"isGateway": true, "ipMasq": true}),
    );
    node.run("ADD", "a", &pod, "eth0", &conf).ok();
    let empty = TempDir::new("no-plugins");
    let e = node
        .pod_call("DEL", "a", pod.path(), "eth0", &conf)
        .path(&[empty.path()])
        .run()
        .err();
    assert!(
        e.msg.starts_with("failed to find plugin \"host-local\""),
        "{}",
        e.msg
    );
    node.run("DEL", "a", &pod, "eth0", &conf).ok();
    assert_eq!(node.reservations(), 0);
    assert!(
        !masq_elements(&node).contains("10.103."),
        "{}",
        masq_elements(&node)
    );
    assert_eq!(pod_links_after_del(&pod), ["lo"]);
}

/// B04 and B06 through the binary: a bad CNI_NETNS or a bridge name taken by another
/// kind of link fails before anything changes.
#[test]
fn bad_netns_or_foreign_link_change_nothing() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let conf = node.conf("wb18", &["10.104.0.0/24"], json!({"isGateway": true}));
    let file = node.dir.join("not-a-netns");
    std::fs::write(&file, "").unwrap();
    for (netns, code) in [
        (node.dir.join("gone").display().to_string(), 3),
        (file.display().to_string(), 4),
    ] {
        let e = node.pod_call("ADD", "a", &netns, "eth0", &conf).run().err();
        assert_eq!(e.code, code, "{netns}: {}", e.msg);
        assert_eq!(node.ns.link_names(), ["lo"]);
    }
    node.ns.exec_ok(&[
        "ip", "link", "add", "wb18", "type", "veth", "peer", "name", "wb18p",
    ]);
    let e = node.run("ADD", "a", &pod, "eth0", &conf).err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (7, "\"wb18\" already exists but is not a bridge")
    );
    assert_eq!(
        (pod.link_names(), node.reservations()),
        (vec!["lo".to_string()], 0)
    );
}

/// B14: runtimeConfig.mac > args.cni.mac > CNI_ARGS MAC=, and a CNI_ARGS MAC does
/// not break host-local (the reference's host-local rejects the unknown key).
#[test]
fn mac_precedence() {
    let Some(node) = Node::new() else { return };
    let base = node.conf("wb19", &["10.105.0.0/24"], json!({}));
    let with = |runtime: bool, args: bool| {
        let mut c = base.clone();
        if runtime {
            c["runtimeConfig"] = json!({"mac": "0a:00:00:00:00:01"});
        }
        if args {
            c["args"] = json!({"cni": {"mac": "0a:00:00:00:00:02"}});
        }
        c
    };
    for (runtime, args, want) in [
        (true, true, "0a:00:00:00:00:01"),
        (false, true, "0a:00:00:00:00:02"),
        (false, false, "0a:00:00:00:00:03"),
    ] {
        let pod = TestNetns::new();
        let conf = with(runtime, args);
        let out = node
            .pod_call("ADD", "a", pod.path(), "eth0", &conf)
            .args("K8S_POD_NAME=p;MAC=0a:00:00:00:00:03")
            .run();
        assert_eq!(out.ok()["interfaces"][2]["mac"], want);
        node.run("DEL", "a", &pod, "eth0", &conf).ok();
    }
    let pod = TestNetns::new();
    let e = node
        .pod_call("ADD", "a", pod.path(), "eth0", &base)
        .args("MAC=zz:zz")
        .run()
        .err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (4, "CNI_ARGS: invalid MAC \"zz:zz\"")
    );
}

/// B17: results in older formats.
#[test]
fn results_in_older_versions() {
    let Some(node) = Node::new() else { return };
    for (version, check) in [
        (
            "0.3.1",
            (|r: &Value| r["ips"][0]["version"] == "4" && r["interfaces"].is_array())
                as fn(&Value) -> bool,
        ),
        ("0.2.0", |r: &Value| {
            r["ip4"]["gateway"] == "10.106.0.1" && r.get("interfaces").is_none()
        }),
    ] {
        let pod = TestNetns::new();
        let mut conf = node.conf("wb20", &["10.106.0.0/24"], json!({"isGateway": true}));
        conf["cniVersion"] = json!(version);
        let r = node.run("ADD", "a", &pod, "eth0", &conf).ok();
        assert_eq!(r["cniVersion"], version);
        assert!(check(&r), "{version}: {r}");
        node.run("DEL", "a", &pod, "eth0", &conf).ok();
    }
}

/// bridge runs host-local in-process only when the `host-local` on CNI_PATH is our own
/// build (its identity section says so); any other binary of that name, here the
/// reference plugin, is exec'd. Both give the same reservations and the same result.
#[test]
fn ipam_runs_in_process_only_for_our_own_host_local() {
    let Some(node) = Node::new() else { return };
    assert_eq!(
        weft_core::ident::read(&bin_dir().join("host-local")).as_deref(),
        Some(host_local::IDENT.as_bytes())
    );
    assert_eq!(
        weft_core::ident::read(&reference_dir().join("host-local")),
        None
    );
    // A CNI_PATH with our bridge but the reference host-local.
    let mixed = TempDir::new("mixed");
    std::fs::copy(bin_dir().join("bridge"), mixed.join("bridge")).unwrap();
    std::fs::copy(reference_dir().join("host-local"), mixed.join("host-local")).unwrap();

    let conf = node.conf("wb9", &["10.89.0.0/24"], json!({}));
    let (ours, theirs) = (TestNetns::new(), TestNetns::new());
    let add = |pod: &TestNetns, cid: &str, dirs: &[&std::path::Path]| {
        node.pod_call("ADD", cid, pod.path(), "eth0", &conf)
            .path(dirs)
            .var("WEFT_LOG", "debug")
            .run()
    };
    let a = add(&ours, "c1", &[bin_dir().as_path()]);
    assert!(a.stderr.contains("running it in-process"), "{a}");
    let b = add(&theirs, "c2", &[mixed.path()]);
    assert!(!b.stderr.contains("in-process"), "{b}");
    let (ra, rb) = (a.ok(), b.ok());
    assert_eq!(ra["ips"][0]["address"], "10.89.0.2/24");
    assert_eq!(rb["ips"][0]["address"], "10.89.0.3/24");
    assert_eq!(ra["ips"][0]["gateway"], rb["ips"][0]["gateway"]);
    assert_eq!(node.reservations(), 2);
    for (pod, cid) in [(&ours, "c1"), (&theirs, "c2")] {
        node.run("DEL", cid, pod, "eth0", &conf).ok();
    }
    assert_eq!(node.reservations(), 0);
}

/// DEL replies once the pod's interface is down and renamed out of the way and its
/// address released; the kernel's ~20 ms veth deletion finishes in a detached
/// process. The runtime can ADD the same ifname again at once, traffic through the
/// retired interface stops immediately, and nothing is left afterwards.
#[test]
fn del_frees_the_interface_at_once_and_deletes_it_in_the_background() {
    let Some(node) = Node::new() else { return };
    let (pod, peer) = (TestNetns::new(), TestNetns::new());
    let conf = node.conf("wb21", &["10.107.0.0/24"], json!({"isGateway": true}));
    let r = node.run("ADD", "a", &pod, "eth0", &conf).ok();
    let first_ip = r["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    node.run("ADD", "p", &peer, "eth0", &conf).ok();
    assert!(ping(&peer, &first_ip));
    node.run("DEL", "a", &pod, "eth0", &conf).ok();
    // Whatever state the deletion is in, the old address no longer answers.
    assert!(
        !ping(&peer, &first_ip),
        "the retired interface still carries traffic"
    );
    let again = node.run("ADD", "a", &pod, "eth0", &conf).ok();
    assert_eq!(again["interfaces"][2]["name"], "eth0");
    let links = pod_links_after_del(&pod);
    assert_eq!(links, ["lo", "eth0"]);
    let veths = node
        .ns
        .link_names()
        .into_iter()
        .filter(|l| l.starts_with("veth"))
        .count();
    assert_eq!(veths, 2, "{:?}", node.ns.link_names());
    for (p, cid) in [(&pod, "a"), (&peer, "p")] {
        node.run("DEL", cid, p, "eth0", &conf).ok();
        assert_eq!(pod_links_after_del(p), ["lo"]);
    }
    assert!(
        !node.ns.link_names().iter().any(|l| l.starts_with("veth")),
        "{:?}",
        node.ns.link_names()
    );
    assert_eq!(node.reservations(), 0);
}

fn macspoof_table(node: &Node) -> String {
    let out = node
        .ns
        .exec(&["nft", "list", "table", "bridge", "weft_macspoof"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// B21: macspoofchk lets only the pod's own MAC into the bridge (one set element pair
/// per pod); CHECK notices a changed MAC; DEL with or without the netns and GC remove
/// the guard.
#[test]
fn macspoofchk_drops_spoofed_frames_and_leaves_nothing() {
    let Some(node) = Node::new() else { return };
    let (a, b, c) = (TestNetns::new(), TestNetns::new(), TestNetns::new());
    let conf = node.conf(
        "wb22",
        &["10.108.0.0/24"],
        json!({"isGateway": true, "macspoofchk": true}),
    );
    let ra = node.run("ADD", "a", &a, "eth0", &conf).ok();
    node.run("ADD", "b", &b, "eth0", &conf).ok();
    let veth_a = ra["interfaces"][1]["name"].as_str().unwrap().to_string();
    let mac_a = ra["interfaces"][2]["mac"].as_str().unwrap().to_string();
    let table = macspoof_table(&node);
    assert!(
        table.contains(&format!("\"{veth_a}\" . {mac_a}")),
        "{table}"
    );
    assert!(table.contains("comment \"net:"), "{table}");
    assert!(ping(&a, "10.108.0.3") && ping(&b, "10.108.0.2"));
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = ra.clone();
    node.run("CHECK", "a", &a, "eth0", &with_prev).ok();

    // a takes another MAC: its frames are dropped, and CHECK says why.
    a.exec_ok(&[
        "ip",
        "link",
        "set",
        "dev",
        "eth0",
        "address",
        "02:de:ad:be:ef:01",
    ]);
    a.exec_ok(&["ip", "neigh", "flush", "all"]);
    assert!(!ping(&a, "10.108.0.3"), "spoofed frames got through");
    let e = node.run("CHECK", "a", &a, "eth0", &with_prev).err();
    assert_eq!(e.code, 102, "{}", e.msg);
    a.exec_ok(&["ip", "link", "set", "dev", "eth0", "address", &mac_a]);
    assert!(ping(&a, "10.108.0.3"), "the real MAC passes again");

    // DEL with the netns, DEL without it (found by comment), GC.
    node.run("DEL", "a", &a, "eth0", &conf).ok();
    assert!(!macspoof_table(&node).contains(&veth_a));
    let gone = node.dir.join("gone");
    node.pod_call("DEL", "b", &gone, "eth0", &conf).run().ok();
    assert!(
        !macspoof_table(&node).contains("id:b "),
        "{}",
        macspoof_table(&node)
    );
    node.run("ADD", "c", &c, "eth0", &conf).ok();
    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([]);
    node.call("GC", &gc).run().ok();
    let table = macspoof_table(&node);
    assert!(!table.contains("elements"), "{table}");
}
