//! A small cluster of weftd nodes for end-to-end tests: real weftd binaries in node
//! namespaces, leasing from a real etcd in an "underlay" namespace, and pods
//! attached to the nodes with the real `bridge` + `host-local` plugins the way
//! flannel's CNI plugin does it (from subnet.env), or through the stock
//! kube-flannel conflist and the conflist driver ([`FlannelRuntime`]).
//!
//! Topology: etcd listens on 10.77.0.100 in the underlay netns; node `i` (1-based)
//! is a netns whose `eth0` (10.77.0.i/24, MTU 1500) is a veth into the underlay,
//! where all nodes' veths share one bridge (br0, which holds 10.77.0.100/24). weftd
//! runs inside a node netns (`nsenter --net`) with its health server on
//! 127.0.0.1:8081 there; tests talk to it with curl, in that netns too. A cluster
//! may also run etcd with TLS, or have no store at all ([`Cluster::storeless`]:
//! `--pod-cidr`, or Kubernetes mode with the fake API server of
//! [`crate::kube_api`] in the node netns, on [`KUBE_API_IP`] on its `lo`).
//!
//! Everything lives in throwaway namespaces and temp dirs: dropping the [`Weftd`]s,
//! the [`Pod`]s and then the [`Cluster`] (declare them after the cluster) leaves
//! nothing behind. weftd and etcd die with the thread that started them, so start
//! (and restart) them on the test's own thread.

use crate::driver::{Attachment, Driver};
use crate::etcd::{EtcdCluster, EtcdOptions};
use crate::kube_api::{DEFAULT_TOKEN, FakeApiOptions, FakeApiServer};
use crate::{Invocation, TempDir, TestNetns, bin_dir, die_with_thread, inside, netns_command};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const ETCD_IP: &str = "10.77.0.100";
pub const ENDPOINT: &str = "http://10.77.0.100:2379";
pub const HEALTHZ_PORT: u16 = 8081;
pub const CONFIG_KEY: &str = "/coreos.com/network/config";
pub const SUBNETS: &str = "/coreos.com/network/subnets/";
pub const NETWORK: &str = "10.244.0.0/16";
pub const VXLAN_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
pub const HOST_GW_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
/// The IPv6 pod network of [`DUAL_STACK_VXLAN_CONFIG`].
pub const NETWORK_V6: &str = "fd44::/56";
/// vxlan over both families: 10.244.0.0/16 and fd44::/56.
pub const DUAL_STACK_VXLAN_CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd44::/56","Backend":{"Type":"vxlan"}}"#;
/// The underlay bridge's IPv6 address in a dual-stack cluster ([`Cluster::new_dual_stack`]).
pub const UNDERLAY_V6_BRIDGE_IP: &str = "fd00:77::100";
/// How long IPv6 duplicate address detection may take (~1 s per address, plus slack).
pub const DAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The fake Kubernetes API server's address, on the node's `lo` ([`Node::kube_api`]).
pub const KUBE_API_IP: &str = "10.99.0.1";
/// What weftd's Kubernetes mode reads from the environment besides FLANNELD_*:
/// never passed on from the developer's environment.
const FOREIGN_ENV: [&str; 7] = [
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
    weft_core::lease::kube::SERVICE_ACCOUNT_DIR_ENV,
    "NODE_NAME",
    "POD_NAME",
    "POD_NAMESPACE",
    "WEFT_LOG",
];
/// How long weftd may take to become ready (etcd is local; this is slack only).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process may take to exit on its own or after SIGTERM.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

// --- topology ---------------------------------------------------------------------

/// One node: its netns, its address on the underlay and a scratch dir for
/// subnet.env, the network config file, weftd's logs and host-local's reservations.
pub struct Node {
    pub ns: TestNetns,
    /// The address of `eth0`, 10.77.0.i.
    pub ip: String,
    pub dir: TempDir,
}

/// The underlay with etcd (or none) and `n` nodes. Fields drop in declaration
/// order: etcd before the namespace it lives in.
pub struct Cluster {
    etcd: Option<EtcdCluster>,
    pub nodes: Vec<Node>,
    /// Kept alive (etcd and the bridge live there).
    pub underlay: TestNetns,
}

impl Cluster {
    /// `n` nodes and a plain-HTTP etcd holding the network config `config`.
    pub fn new(n: usize, config: &str) -> Cluster {
        let c = Cluster::build(n, Some(false));
        c.etcd().put(CONFIG_KEY, config);
        c
    }

    /// `n` nodes and a plain-HTTP etcd cluster of `members` members (all on
    /// [`ETCD_IP`], member `i` on client port 2379 + 10000·i), holding the network
    /// config `config`. Give weftd all of them with [`Cluster::endpoints`].
    pub fn new_members(n: usize, members: usize, config: &str) -> Cluster {
        let c = Cluster::build_with(n, Some(false), members);
        c.etcd().put(CONFIG_KEY, config);
        c
    }

    /// The client URLs of all etcd members, comma-separated: the value of
    /// `--etcd-endpoints`.
    pub fn endpoints(&self) -> String {
        self.etcd().endpoints().join(",")
    }

    /// `n` nodes and an etcd that speaks only TLS and wants client certificates
    /// ([`EtcdOptions::tls`]), holding the network config `config`.
    pub fn new_tls(n: usize, config: &str) -> Cluster {
        let c = Cluster::build(n, Some(true));
        c.etcd().put(CONFIG_KEY, config);
        c
    }

    /// One node and no etcd at all (the endpoint leads nowhere), `net_conf` its
    /// net-conf.json: the cluster and that file's path, for --net-config-path.
    pub fn storeless(net_conf: &str) -> (Cluster, String) {
        let c = Cluster::build(1, None);
        let conf = c.node(1).net_conf(net_conf);
        (c, conf)
    }

    /// `n` nodes with an IPv6 underlay too (node `i`'s `eth0` also holds
    /// `fd00:77::i/64`, br0 [`UNDERLAY_V6_BRIDGE_IP`]/64, all nodad) and a plain-HTTP
    /// etcd (on IPv4) holding the network config `config`.
    pub fn new_dual_stack(n: usize, config: &str) -> Cluster {
        let c = Cluster::build(n, Some(false));
        let bridge_ip = format!("{UNDERLAY_V6_BRIDGE_IP}/64");
        c.underlay
            .exec_ok(&["ip", "-6", "addr", "add", &bridge_ip, "dev", "br0", "nodad"]);
        for node in &c.nodes {
            let addr = format!("{}/64", node.ip6());
            node.ns
                .exec_ok(&["ip", "-6", "addr", "add", &addr, "dev", "eth0", "nodad"]);
        }
        // Every node reaches the bridge over IPv6.
        for node in &c.nodes {
            node.ns.exec_ok(&[
                "ping",
                "-6",
                "-c",
                "1",
                "-W",
                "5",
                "-q",
                UNDERLAY_V6_BRIDGE_IP,
            ]);
        }
        c.etcd().put(CONFIG_KEY, config);
        c
    }

    /// `etcd`: None for no etcd at all, Some(tls) otherwise. No network config.
    fn build(n: usize, etcd: Option<bool>) -> Cluster {
        Cluster::build_with(n, etcd, 1)
    }

    /// [`build`](Self::build) with `members` etcd members.
    fn build_with(n: usize, etcd: Option<bool>, members: usize) -> Cluster {
        let underlay = TestNetns::new();
        let nodes: Vec<Node> = (1..=n)
            .map(|i| Node {
                ns: TestNetns::new(),
                ip: format!("10.77.0.{i}"),
                dir: TempDir::new("weftd-node"),
            })
            .collect();
        underlay.exec_ok(&["ip", "link", "add", "br0", "type", "bridge"]);
        underlay.exec_ok(&["ip", "addr", "add", "10.77.0.100/24", "dev", "br0", "nodad"]);
        underlay.exec_ok(&["ip", "link", "set", "br0", "up"]);
        for (i, node) in nodes.iter().enumerate() {
            let port = format!("u{}", i + 1);
            let pid = node.ns.pid().to_string();
            underlay.exec_ok(&[
                "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &pid,
            ]);
            underlay.exec_ok(&["ip", "link", "set", &port, "master", "br0", "up"]);
            let addr = format!("{}/24", node.ip);
            node.ns
                .exec_ok(&["ip", "addr", "add", &addr, "dev", "eth0", "nodad"]);
            node.ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        }
        let etcd = etcd.map(|tls| {
            EtcdCluster::start(EtcdOptions {
                members,
                tls,
                netns: Some(&underlay),
                ip: ETCD_IP,
            })
        });
        let c = Cluster {
            etcd,
            nodes,
            underlay,
        };
        // Every node reaches etcd's address over the underlay.
        for node in &c.nodes {
            node.ns
                .exec_ok(&["ping", "-c", "1", "-W", "5", "-q", ETCD_IP]);
        }
        c
    }

    pub fn etcd(&self) -> &EtcdCluster {
        self.etcd.as_ref().expect("this cluster has etcd")
    }

    pub fn etcd_mut(&mut self) -> &mut EtcdCluster {
        self.etcd.as_mut().expect("this cluster has etcd")
    }

    /// Node `i`, 1-based.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// All lease keys with their values.
    pub fn leases(&self) -> Vec<(String, String)> {
        self.etcd().get_prefix(SUBNETS)
    }

    /// A /24 of the network that no lease holds, past every one in `taken`
    /// (counting down from 10.244.255.0/24).
    pub fn free_subnet(&self, taken: &[&str]) -> String {
        let leases = self.leases();
        (1..=255u32)
            .rev()
            .map(|x| format!("10.244.{x}.0/24"))
            .find(|s| {
                !taken.contains(&s.as_str()) && !leases.iter().any(|(k, _)| *k == lease_key(s))
            })
            .expect("a free /24")
    }
}

impl Node {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    pub fn subnet_env(&self) -> Option<String> {
        std::fs::read_to_string(self.subnet_file()).ok()
    }

    /// subnet.env, read like flannel's CNI plugin reads it.
    pub fn flannel_env(&self) -> FlannelEnv {
        let text = self.subnet_env().expect("subnet.env exists");
        FlannelEnv::parse(&text)
    }

    /// The subnet leased per subnet.env: `10.244.X.0/24`, of which FLANNEL_SUBNET
    /// must name the first host.
    pub fn leased_subnet(&self) -> String {
        let text = self.subnet_env().expect("subnet.env exists");
        let subnet = FlannelEnv::parse(&text).subnet;
        let line = format!("FLANNEL_SUBNET={}", first_host(&subnet));
        assert!(
            text.lines().any(|l| l == line),
            "the first host of the subnet: {text}"
        );
        subnet
    }

    /// This node's IPv6 underlay address in a dual-stack cluster
    /// ([`Cluster::new_dual_stack`]): `fd00:77::i` for `10.77.0.i`.
    pub fn ip6(&self) -> String {
        let i = self.ip.rsplit('.').next().expect("a dotted quad");
        format!("fd00:77::{i}")
    }

    /// The IPv6 subnet leased per subnet.env: `fd44:0:0:X::/64`, of which
    /// FLANNEL_IPV6_SUBNET must name the first host.
    pub fn leased_subnet_v6(&self) -> String {
        let text = self.subnet_env().expect("subnet.env exists");
        let v6 = FlannelEnv::parse(&text)
            .v6
            .unwrap_or_else(|| panic!("no IPv6 part in subnet.env: {text}"));
        let line = format!("FLANNEL_IPV6_SUBNET={}", v6.subnet.replace("::/", "::1/"));
        assert!(
            text.lines().any(|l| l == line),
            "the first host of the IPv6 subnet: {text}"
        );
        v6.subnet
    }

    /// The MAC of weftd's IPv6 VTEP in this node (`flannel-v6.1`).
    pub fn vtep_mac_v6(&self) -> String {
        let link = self
            .ns
            .exec_json(&["ip", "-j", "link", "show", "dev", "flannel-v6.1"]);
        link[0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("flannel-v6.1 has no MAC: {link}"))
            .to_string()
    }

    /// Write `json` as this node's net-conf.json; its path, for --net-config-path.
    pub fn net_conf(&self, json: &str) -> String {
        let path = self.dir.join("net-conf.json");
        std::fs::write(&path, json).expect("writing net-conf.json");
        path.display().to_string()
    }

    /// The arguments every test starts weftd with, then `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let subnet_file = self.subnet_file().display().to_string();
        let port = HEALTHZ_PORT.to_string();
        let mut args: Vec<String> = [
            "--etcd-endpoints",
            ENDPOINT,
            "--iface",
            "eth0",
            "--subnet-file",
            &subnet_file,
            "--healthz-ip",
            "127.0.0.1",
            "--healthz-port",
            &port,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Start weftd with the usual arguments plus `extra`.
    pub fn weftd(&self, extra: &[&str]) -> Weftd {
        Weftd::spawn(self, &self.args(extra), &[])
    }

    /// Start weftd with the usual arguments plus `extra` and wait until it is ready.
    pub fn ready_weftd(&self, extra: &[&str]) -> Weftd {
        let mut weftd = self.weftd(extra);
        self.wait_ready(&mut weftd);
        weftd
    }

    /// Start weftd with the fixed subnet 10.244.7.0/24 (`--pod-cidr`) and the
    /// net-conf.json `conf`, and wait until it is ready.
    pub fn pod_cidr_weftd(&self, conf: &str) -> Weftd {
        self.ready_weftd(&["--pod-cidr", "10.244.7.0/24", "--net-config-path", conf])
    }

    /// A fake Kubernetes API server (the recorded nodes) in this node's netns,
    /// listening on [`KUBE_API_IP`], which goes on `lo`, and a token kubeconfig
    /// for it: the server and the kubeconfig's path. Drop the server first.
    pub fn kube_api(&self) -> (FakeApiServer, String) {
        let addr = format!("{KUBE_API_IP}/32");
        self.ns.exec_ok(&["ip", "addr", "add", &addr, "dev", "lo"]);
        let api = FakeApiServer::start(FakeApiOptions {
            netns: Some(&self.ns),
            ip: KUBE_API_IP,
            ..Default::default()
        });
        let path = self.dir.join("kubeconfig");
        std::fs::write(&path, api.kubeconfig(&format!("token: {DEFAULT_TOKEN}")))
            .expect("writing the kubeconfig");
        (api, path.display().to_string())
    }

    /// GET `path` from weftd's health server: (HTTP status, body); status 0 when
    /// curl could not connect (body: curl's error).
    pub fn http(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{HEALTHZ_PORT}{path}");
        let out = self.ns.exec(&[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "3",
            "-w",
            "\n%{http_code}",
            &url,
        ]);
        if !out.status.success() {
            return (0, String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("curl -w adds a line");
        (
            code.trim().parse().expect("an HTTP status"),
            body.to_string(),
        )
    }

    /// /metrics; panics unless it answers 200.
    pub fn metrics(&self) -> String {
        let (code, body) = self.http("/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        body
    }

    /// Wait until /metrics has sample `name` at `value`; the exposition that had it.
    pub fn wait_metric(&self, name: &str, value: &str, timeout: Duration) -> String {
        wait_for(
            &format!("{name} {value} in /metrics of {}", self.ip),
            timeout,
            || {
                let m = self.metrics();
                (metric(&m, name).as_deref() == Some(value)).then_some(m)
            },
        )
    }

    /// Wait until /readyz says 200; panics (with weftd's log) if it exits first.
    pub fn wait_ready(&self, weftd: &mut Weftd) {
        wait_for("weftd to become ready (/readyz 200)", READY_TIMEOUT, || {
            weftd.assert_running();
            (self.http("/readyz").0 == 200).then_some(())
        });
    }

    /// The MAC of weftd's VTEP in this node (`flannel.1`, vxlan's VNI 1).
    pub fn vtep_mac(&self) -> String {
        let link = self
            .ns
            .exec_json(&["ip", "-j", "link", "show", "dev", "flannel.1"]);
        link[0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("flannel.1 has no MAC: {link}"))
            .to_string()
    }

    /// This node's vxlan lease value: its address and its VTEP's MAC.
    pub fn lease_value(&self) -> String {
        lease_value(&self.ip, &self.vtep_mac())
    }

    /// `nft args...` here (it must succeed): its stdout.
    pub fn nft(&self, args: &[&str]) -> String {
        crate::nft(&self.ns, args)
    }

    /// Whether weftd's `table inet weft_node` exists here.
    pub fn has_weft_table(&self) -> bool {
        crate::has_nft_table(&self.ns, "inet", "weft_node")
    }

    /// Whether the link `name` exists here.
    pub fn has_link(&self, name: &str) -> bool {
        self.ns
            .exec(&["ip", "link", "show", "dev", name])
            .status
            .success()
    }

    /// `argv` run here (it must succeed): its stdout as sorted, trimmed, non-empty lines.
    pub fn lines(&self, argv: &[&str]) -> Vec<String> {
        sorted_lines(&self.ns.exec_ok(argv))
    }

    /// `ip route show proto 87`: weftd's routes, one line each, sorted.
    pub fn weft_routes(&self) -> Vec<String> {
        self.lines(&["ip", "route", "show", "proto", "87"])
    }

    /// `ip neigh show dev flannel.1`, sorted lines.
    pub fn vtep_neighbours(&self) -> Vec<String> {
        self.lines(&["ip", "neigh", "show", "dev", "flannel.1"])
    }

    /// `bridge fdb show dev flannel.1`, sorted lines.
    pub fn vtep_fdb(&self) -> Vec<String> {
        self.lines(&["bridge", "fdb", "show", "dev", "flannel.1"])
    }

    /// A new pod attached to this node the way flannel's CNI plugin does it: the
    /// `bridge` plugin on `cni0` (isGateway, no masquerade, hairpin) with
    /// host-local over the node's FLANNEL_SUBNET and a route to FLANNEL_NETWORK,
    /// the MTU from FLANNEL_MTU. `id` is the container ID. With FLANNEL_IPV6_SUBNET
    /// in subnet.env the pod is dual-stack (a v6 range and a route to
    /// FLANNEL_IPV6_NETWORK too), and this returns once IPv6 duplicate address
    /// detection is done on the pod's `eth0` and the node's `cni0`.
    pub fn add_pod(&self, id: &str) -> Pod {
        let env = self.flannel_env();
        let ns = TestNetns::new();
        let conf = env.bridge_conf(&self.dir.join("ipam").display().to_string());
        let result = Invocation::plugin("bridge")
            .in_netns(self.ns.path())
            .command("ADD")
            .path(&[bin_dir()])
            .stdin_json(&conf)
            .container_id(id)
            .netns(ns.path())
            .ifname("eth0")
            .run()
            .ok();
        let cidr = result["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no address in {result}"));
        let ip = cidr.split('/').next().unwrap().to_string();
        let ip6 = env.v6.as_ref().map(|_| {
            let ips = result["ips"].as_array().cloned().unwrap_or_default();
            let cidr6 = ips
                .iter()
                .filter_map(|i| i["address"].as_str())
                .find(|a| a.contains(':'))
                .unwrap_or_else(|| panic!("no IPv6 address in {result}"));
            cidr6.split('/').next().unwrap().to_string()
        });
        if ip6.is_some() {
            wait_dad(&ns, "eth0");
            wait_dad(&self.ns, "cni0");
        }
        Pod {
            ns,
            ip,
            ip6,
            node: self.ip.clone(),
        }
    }
}

/// A pod netns with `eth0` on a node's `cni0`.
pub struct Pod {
    pub ns: TestNetns,
    /// Its address (from host-local).
    pub ip: String,
    /// Its IPv6 address (from host-local), when the node's subnet.env has one.
    pub ip6: Option<String>,
    /// Its node's underlay address.
    pub node: String,
}

impl Pod {
    /// The IPv4 pod an ADD `result` describes, in `ns` on `node`; its address must
    /// be in `subnet`.
    pub fn from_result(ns: TestNetns, result: &Value, node: &Node, subnet: &str) -> Pod {
        let cidr = result["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no address in {result}"));
        let addr: ipnet::Ipv4Net = cidr.parse().expect("an IPv4 CIDR");
        let subnet: ipnet::Ipv4Net = subnet.parse().unwrap();
        assert!(subnet.contains(&addr.addr()), "{cidr} not in {subnet}");
        Pod {
            ns,
            ip: addr.addr().to_string(),
            ip6: None,
            node: node.ip.clone(),
        }
    }

    /// One ping (2 s wait) to `ip`.
    pub fn ping(&self, ip: &str) -> bool {
        self.ns
            .exec(&["ping", "-c", "1", "-W", "2", ip])
            .status
            .success()
    }

    /// One IPv6 ping (`ping -6`, 2 s wait) to `ip`.
    pub fn ping6(&self, ip: &str) -> bool {
        self.ns
            .exec(&["ping", "-6", "-c", "1", "-W", "2", ip])
            .status
            .success()
    }
}

/// How long pods may take to reach each other once weftd is ready.
pub const REACH: Duration = Duration::from_secs(20);

/// Wait (up to [`REACH`]) until `from` pings `to`.
pub fn wait_ping(from: &Pod, to: &Pod) {
    let what = format!(
        "{} (on {}) to ping {} (on {})",
        from.ip, from.node, to.ip, to.node
    );
    wait_for(&what, REACH, || from.ping(&to.ip).then_some(()));
}

// --- pods through the stock flannel conflist ----------------------------------------

/// The stock conflist's network name (host-local keeps its reservations under it).
pub const FLANNEL_NET: &str = "cbr0";

/// The pod runtime of one node: the stock kube-flannel conflist
/// (`conf-examples/10-flannel.conflist`: flannel + portmap) through the conflist
/// [`Driver`], its plugins run in the node's netns, every file of theirs
/// (subnet.env, saved configs, addresses, mappings, cached results) in the node's
/// dir: nothing touches /run/flannel or /var/lib/cni.
pub struct FlannelRuntime<'a> {
    pub node: &'a Node,
    pub driver: Driver,
}

impl<'a> FlannelRuntime<'a> {
    /// kube-flannel's conflist as shipped (cniVersion 0.3.1).
    pub fn stock(node: &'a Node) -> Self {
        FlannelRuntime::at(node, "0.3.1")
    }

    /// The shipped conflist declaring `version`, with every file of its plugins in
    /// the node's dir.
    pub fn at(node: &'a Node, version: &str) -> Self {
        let path = crate::workspace_root().join("conf-examples/10-flannel.conflist");
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut conflist: Value = serde_json::from_slice(&bytes).expect("a JSON conflist");
        assert_eq!(conflist["name"], FLANNEL_NET);
        conflist["cniVersion"] = version.into();
        let flannel = &mut conflist["plugins"][0];
        flannel["subnetFile"] = json!(node.subnet_file());
        flannel["dataDir"] = json!(node.dir.join("flannel"));
        flannel["ipam"] = json!({"dataDir": node.dir.join("ipam")});
        conflist["plugins"][1]["dataDir"] = json!(node.dir.join("portmap"));
        let driver = Driver::from_json(&conflist, vec![bin_dir()], node.dir.join("cache"))
            .expect("the conflist loads")
            .in_netns(node.ns.path());
        FlannelRuntime { node, driver }
    }

    /// ADD a new pod `id` (on `eth0`), with `port_mappings` offered when given.
    pub fn add_pod(&self, id: &str, port_mappings: Option<Value>) -> (Pod, Attachment) {
        let ns = TestNetns::new();
        let mut att = Attachment::new(id, &ns.path_str(), "eth0");
        if let Some(maps) = port_mappings {
            att.capability_args.insert("portMappings".into(), maps);
        }
        let result = self
            .driver
            .add(&att)
            .unwrap_or_else(|e| panic!("ADD {id} on {}: {e}", self.node.ip));
        let pod = Pod::from_result(ns, &result, self.node, &self.node.leased_subnet());
        (pod, att)
    }

    /// The flannel plugin's saved delegate config of container `id`.
    pub fn scratch(&self, id: &str) -> Value {
        let path = self.node.dir.join("flannel").join(id);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_slice(&bytes).expect("a JSON delegate config")
    }

    /// Whatever the plugins and the driver keep of any attachment on this node,
    /// one line each: ports on cni0, host-local reservations, flannel scratch files,
    /// portmap elements and records, cached results.
    pub fn leftovers(&self) -> Vec<String> {
        let root = self.node.dir.path();
        attachment_leftovers(self.node, root, FLANNEL_NET, "flannel", &self.driver)
    }
}

/// Wait until no IPv6 address of `dev` in `ns` is tentative (duplicate address
/// detection done); panics after [`DAD_TIMEOUT`] or if DAD failed.
pub fn wait_dad(ns: &TestNetns, dev: &str) {
    wait_for(&format!("IPv6 DAD on {dev}"), DAD_TIMEOUT, || {
        let failed = ns.exec_ok(&["ip", "-6", "addr", "show", "dev", dev, "dadfailed"]);
        assert!(failed.trim().is_empty(), "DAD failed on {dev}: {failed}");
        ns.exec_ok(&["ip", "-6", "addr", "show", "dev", dev, "tentative"])
            .trim()
            .is_empty()
            .then_some(())
    })
}

/// The port [`tcp_transfer`] listens on in the receiving pod.
pub const TCP_PORT: u16 = 5001;

/// Send `len` bytes over TCP from pod `from` to a listener on [`TCP_PORT`] in pod
/// `to`; panics unless exactly those bytes arrive, from `from`'s own address.
pub fn tcp_transfer(from: &Pod, to: &Pod, len: usize) {
    let what = format!(
        "TCP {} (on {}) → {} (on {})",
        from.ip, from.node, to.ip, to.node
    );
    let dst: SocketAddr = format!("{}:{TCP_PORT}", to.ip).parse().unwrap();
    let peer = tcp_send(&what, &from.ns, dst, (&to.ns, TCP_PORT), len);
    assert_eq!(peer.ip().to_string(), from.ip, "{what}: no NAT on the way");
}

/// Send `len` bytes over TCP from `client` to `dst`, which must lead to a listener
/// this binds on `server.1` in the netns `server.0`: the source address the listener
/// saw. Panics, naming `what`, unless exactly those bytes arrive.
pub fn tcp_send(
    what: &str,
    client: &TestNetns,
    dst: SocketAddr,
    server: (&TestNetns, u16),
    len: usize,
) -> SocketAddr {
    let listener = inside(server.0, || TcpListener::bind(("0.0.0.0", server.1)))
        .unwrap_or_else(|e| panic!("{what}: listening: {e}"));
    let mut conn = inside(client, || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(10))
    })
    .unwrap_or_else(|e| panic!("{what}: connecting: {e}"));
    // The handshake is done: accept returns at once.
    let (mut accepted, peer) = listener.accept().expect("accept");
    let data = payload(len, len as u64 ^ u64::from(dst.port()));
    let sent = data.clone();
    let timeout = Some(Duration::from_secs(60));
    conn.set_write_timeout(timeout).unwrap();
    accepted.set_read_timeout(timeout).unwrap();
    let writer = std::thread::spawn(move || {
        conn.write_all(&sent)?;
        conn.shutdown(Shutdown::Write)
    });
    let mut got = Vec::with_capacity(len);
    let read = accepted.read_to_end(&mut got);
    let written = writer.join().expect("writer thread");
    assert!(
        read.is_ok() && written.is_ok(),
        "{what}: read {read:?}, write {written:?}"
    );
    assert_eq!(got.len(), len, "{what}: byte count");
    assert!(got == data, "{what}: the bytes arrived changed");
    peer
}

/// `len` bytes that make corruption or reordering visible.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// subnet.env as flannel's CNI plugin reads it (`net.ParseCIDR`, so the subnet is
/// the network address: `FLANNEL_SUBNET=10.244.7.1/24` is `10.244.7.0/24`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelEnv {
    pub network: String,
    pub subnet: String,
    pub mtu: u32,
    pub ipmasq: bool,
    /// FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET, when subnet.env has the latter.
    pub v6: Option<FlannelEnvV6>,
}

/// The IPv6 part of subnet.env as flannel's CNI plugin reads it: the subnet is the
/// network address (`FLANNEL_IPV6_SUBNET=fd44:0:0:5::1/64` is `fd44:0:0:5::/64`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlannelEnvV6 {
    pub network: String,
    pub subnet: String,
}

impl FlannelEnv {
    pub fn parse(text: &str) -> FlannelEnv {
        let find = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        let get =
            |key: &str| find(key).unwrap_or_else(|| panic!("no {key} in subnet.env: {text:?}"));
        let v6 = find("FLANNEL_IPV6_SUBNET").map(|sn| {
            let subnet: ipnet::Ipv6Net = sn.parse().expect("FLANNEL_IPV6_SUBNET");
            FlannelEnvV6 {
                network: get("FLANNEL_IPV6_NETWORK"),
                subnet: subnet.trunc().to_string(),
            }
        });
        let subnet: ipnet::Ipv4Net = get("FLANNEL_SUBNET").parse().expect("FLANNEL_SUBNET");
        FlannelEnv {
            network: get("FLANNEL_NETWORK"),
            subnet: subnet.trunc().to_string(),
            mtu: get("FLANNEL_MTU").parse().expect("FLANNEL_MTU"),
            ipmasq: get("FLANNEL_IPMASQ") == "true",
            v6,
        }
    }

    /// The bridge config flannel's CNI plugin hands its delegate, with host-local's
    /// state in `data_dir`.
    pub fn bridge_conf(&self, data_dir: &str) -> Value {
        let mut ranges = vec![json!([{"subnet": self.subnet}])];
        let mut routes = vec![json!({"dst": self.network})];
        if let Some(v6) = &self.v6 {
            ranges.push(json!([{"subnet": v6.subnet}]));
            routes.push(json!({"dst": v6.network}));
        }
        json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "mtu": self.mtu,
            "ipam": {
                "type": "host-local",
                "dataDir": data_dir,
                "ranges": ranges,
                "routes": routes,
            },
        })
    }
}

/// `10.244.X.0/24` → `/coreos.com/network/subnets/10.244.X.0-24`.
pub fn lease_key(subnet: &str) -> String {
    format!("{SUBNETS}{}", subnet.replace('/', "-"))
}

/// A vxlan lease value as flanneld writes it: the public IP and the VTEP's MAC.
pub fn lease_value(public_ip: &str, vtep_mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{vtep_mac}"}}}}"#
    )
}

/// `10.244.X.0/24` → `10.244.X.1/24`, the address subnet.env gives for it.
pub fn first_host(subnet: &str) -> String {
    subnet.replace(".0/", ".1/")
}

/// `10.244.X.0/24` → `10.244.X.0`, the vxlan gateway of that subnet.
pub fn network_addr(subnet: &str) -> &str {
    subnet.split('/').next().expect("a CIDR")
}

/// How `ip route show proto 87` prints weft's route to an IPv4 peer `subnet` via
/// `gw` on `dev`: through the nexthop object whose id is the subnet's address.
pub fn peer_route_line(subnet: &str, gw: &str, dev: &str, onlink: bool) -> String {
    let addr: std::net::Ipv4Addr = network_addr(subnet).parse().expect("an IPv4 subnet");
    let onlink = if onlink { " onlink" } else { "" };
    format!(
        "{subnet} nhid {} via {gw} dev {dev}{onlink}",
        u32::from(addr)
    )
}

/// The value of sample `name` (no labels) in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::to_string)
}

/// Assert that the exposition `m` has each sample `(name, value)` of `want`.
pub fn assert_samples(m: &str, want: &[(&str, &str)]) {
    for &(name, value) in want {
        assert_eq!(metric(m, name).as_deref(), Some(value), "{name}: {m}");
    }
}

pub fn sorted_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

/// Poll `f` every 100 ms until it gives Some; panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

// --- the weftd process ------------------------------------------------------------

/// A running weftd; SIGTERM, then SIGKILL on drop. Its stderr (the log) goes to a
/// file, printed when the test fails.
pub struct Weftd {
    child: Child,
    exited: Option<ExitStatus>,
    log: PathBuf,
}

impl Weftd {
    /// `nsenter --net=<node> weftd args...`, with `env` set and no FLANNELD_*,
    /// Kubernetes or WEFT_LOG variables of the developer's (or of a CI pod's).
    /// nsenter execs weftd (no --pid/--fork), so the child is weftd itself and dies
    /// with this thread ([`die_with_thread`]).
    pub fn spawn(node: &Node, args: &[String], env: &[(&str, &str)]) -> Weftd {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let bin = bin_dir().join("weftd");
        assert!(
            bin.exists(),
            "build weftd first: cargo build --release -p weftd (looked for {})",
            bin.display()
        );
        let log = node.dir.join(format!(
            "weftd-{}.log",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&log).expect("creating the weftd log");
        let mut cmd = netns_command(Some(node.ns.path()), &bin);
        cmd.args(args);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("FLANNELD_") || FOREIGN_ENV.contains(&&*k) {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file);
        let child = die_with_thread(&mut cmd)
            .spawn()
            .expect("spawning nsenter weftd");
        Weftd {
            child,
            exited: None,
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("waitpid weftd");
        }
        self.exited
    }

    /// weftd's pid (nsenter execs it, so this is weftd itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to weftd while it runs.
    pub fn signal(&mut self, signal: libc::c_int) {
        self.assert_running();
        // SAFETY: signalling our own, not yet reaped child.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(r, 0, "kill({signal}): {}", std::io::Error::last_os_error());
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.exit_status() {
            panic!("weftd exited ({status}); log:\n{}", self.log());
        }
    }

    /// Wait for weftd to exit on its own; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_for("weftd to exit", timeout, || self.exit_status())
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        if let Some(status) = self.exit_status() {
            return status;
        }
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.wait_exit(EXIT_TIMEOUT)
    }
}

impl Drop for Weftd {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            // SAFETY: as in terminate. SIGCONT: a test may have stopped it.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
                libc::kill(self.child.id() as libc::pid_t, libc::SIGCONT);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.exit_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.exit_status().is_none() {
                let _ = self.child.kill();
                self.exited = self.child.wait().ok();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- weftd log {} ({:?}) ---\n{}--- end of weftd log ---",
                self.log.display(),
                self.exited,
                self.log()
            );
        }
    }
}

/// Whatever the CNI plugins and the driver keep of any attachment on `node`, one
/// line each: ports on cni0, host-local reservations of network `net` under
/// `root/ipam`, saved delegate configs in `root/<saved>`, portmap records in
/// `root/portmap` and its map elements, the driver's cached results. The chains
/// in these tests keep all their state under `root`.
pub fn attachment_leftovers(
    node: &Node,
    root: &std::path::Path,
    net: &str,
    saved: &str,
    driver: &crate::driver::Driver,
) -> Vec<String> {
    let ns = &node.ns;
    let mut left: Vec<String> = Vec::new();
    if node.has_link("cni0") {
        let ports = ns.exec_ok(&["ip", "-o", "link", "show", "master", "cni0"]);
        left.extend(ports.lines().map(|l| format!("port on cni0: {l}")));
    }
    let ipam = crate::reservations(&root.join("ipam").join(net));
    left.extend(ipam.keys().map(|a| format!("reservation {a}")));
    let files = |dir: &str| -> Vec<String> {
        std::fs::read_dir(root.join(dir))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    left.extend(files(saved).iter().map(|f| format!("saved config {f}")));
    let records = crate::portmap_files(&root.join("portmap"));
    let records = records.iter().filter(|f| f.ends_with(".json"));
    left.extend(records.map(|f| format!("portmap record {f}")));
    let elems = crate::table_elements(ns, "inet", "weft_portmap");
    left.extend(
        elems
            .iter()
            .map(|(map, e)| format!("portmap {map} element {e}")),
    );
    let cached = driver.cached_attachments();
    left.extend(
        cached
            .iter()
            .map(|c| format!("cached result of {}", c.container_id)),
    );
    left
}
