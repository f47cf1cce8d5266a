//! The flannel plugin on one node (a test netns) with subnet.env written by the
//! test: cases F01–F11 of the reference, with our expected behaviour, and the
//! state it leaves (saved configs, veths, addresses, masquerade) after every verb.

use netns_tests::weftd_cluster::wait_for;
use netns_tests::{
    Invocation, Outcome, TempDir, TestNetns, bin_dir, reference_dir, require_root, unique_name,
};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.78.0.0/16\nFLANNEL_SUBNET=10.78.5.1/24\n\
                          FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

struct Node {
    ns: TestNetns,
    dir: TempDir,
    name: String,
    bridge: String,
    /// CNI_PATH: ours, or flannel with the reference bridge and host-local.
    path: Vec<PathBuf>,
}

impl Node {
    fn new() -> Option<Node> {
        require_root().then(|| {
            let name = unique_name("fl");
            let n = name.rsplit('-').next().unwrap().to_string();
            Node {
                ns: TestNetns::new(),
                dir: TempDir::new("flannel"),
                bridge: format!("wfl{}{n}", std::process::id() % 1000),
                name,
                path: vec![bin_dir()],
            }
        })
    }

    /// The same node delegating to the reference bridge and host-local.
    fn with_reference_delegates(mut self) -> Node {
        let bin = self.dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(bin_dir().join("flannel"), bin.join("flannel")).unwrap();
        for p in ["bridge", "host-local"] {
            std::os::unix::fs::symlink(reference_dir().join(p), bin.join(p)).unwrap();
        }
        self.path = vec![bin];
        self
    }

    fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    fn write_subnet_env(&self, text: &str) {
        std::fs::write(self.subnet_file(), text).unwrap();
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("flannel")
    }

    fn saved(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.data_dir().join(file)).ok()
    }

    /// kube-flannel's plugin entry at `version` (none when empty), with its state
    /// under the test's directory.
    fn conf(&self, version: &str, extra: Value) -> Value {
        let mut c = json!({"name": self.name, "type": "flannel",
            "subnetFile": self.subnet_file(), "dataDir": self.data_dir(),
            "ipam": {"dataDir": self.dir.join("ipam")},
            "delegate": {"bridge": self.bridge, "hairpinMode": true, "isDefaultGateway": true}});
        if !version.is_empty() {
            c["cniVersion"] = version.into();
        }
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn call(&self, cmd: &str, conf: &Value) -> Invocation {
        Invocation::plugin("flannel")
            .in_netns(self.ns.path())
            .command(cmd)
            .path(&self.path)
            .stdin_json(conf)
    }

    fn run(&self, cmd: &str, cid: &str, pod: &TestNetns, conf: &Value) -> Outcome {
        self.run_if(cmd, cid, pod, "eth0", conf)
    }

    fn run_if(&self, cmd: &str, cid: &str, pod: &TestNetns, ifname: &str, conf: &Value) -> Outcome {
        self.call(cmd, conf)
            .container_id(cid)
            .netns(pod.path())
            .ifname(ifname)
            .run()
    }

    fn veths(&self) -> Vec<String> {
        let links = self.ns.exec_json(&["ip", "-j", "link", "show"]);
        let names = links.as_array().unwrap().iter();
        names
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("veth"))
            .map(str::to_string)
            .collect()
    }

    fn reservations(&self) -> usize {
        netns_tests::reservations(&self.dir.join("ipam").join(&self.name)).len()
    }

    /// The node's veths once `n` remain: DEL deletes a pod's interface in the
    /// background, so the host end goes a moment later.
    fn wait_veths(&self, n: usize) {
        wait_for(
            &format!("{n} veths on the node"),
            Duration::from_secs(5),
            || (self.veths().len() == n).then_some(()),
        );
    }

    /// Nothing of any pod left on the node: no veth, no address, no saved config.
    fn assert_clean(&self) {
        self.wait_veths(0);
        assert_eq!(self.reservations(), 0, "addresses left");
        let saved: Vec<_> = std::fs::read_dir(self.data_dir())
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(saved.is_empty(), "saved configs left: {saved:?}");
    }
}

fn ping(from: &TestNetns, to: &str) -> bool {
    from.exec(&["ping", "-c", "1", "-W", "2", to])
        .status
        .success()
}

fn pod_links(pod: &TestNetns) -> Vec<String> {
    let links = pod.exec_json(&["ip", "-j", "link", "show"]);
    let names = links.as_array().unwrap().iter();
    names
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| !n.starts_with("wdel"))
        .map(str::to_string)
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// F01, F07, F08: ADD saves flannel's delegate config (byte for byte as flannel
/// writes it, 0600 in a 0700 dir) and answers with bridge's result; the pod reaches
/// its gateway; DEL consumes the file and leaves nothing; DEL again and DEL of a
/// never-added container succeed.
#[test]
fn add_saves_flannels_delegate_config_and_del_consumes_it() {
    let Some(node) = Node::new() else { return };
    node.write_subnet_env(SUBNET_ENV);
    let pod = TestNetns::new();
    let conf = node.conf("0.3.1", json!({}));
    let result = node.run("ADD", "c1", &pod, &conf).ok();
    insta::assert_json_snapshot!("flannel_add", result, {
        ".interfaces[].mac" => "[mac]",
        ".interfaces[0].name" => "[bridge]",
        ".interfaces[1].name" => "[veth]",
        ".interfaces[2].sandbox" => "[netns]",
    });
    let want = format!(
        r#"{{"bridge":"{br}","cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{{"dataDir":"{ipam}","ranges":[[{{"subnet":"10.78.5.0/24"}}]],"routes":[{{"dst":"10.78.0.0/16"}}],"type":"host-local"}},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"{name}","type":"bridge"}}"#,
        br = node.bridge,
        ipam = node.dir.join("ipam").display(),
        name = node.name,
    );
    assert_eq!(node.saved("c1").as_deref(), Some(want.as_str()));
    assert_eq!(mode(&node.data_dir()), 0o700);
    assert_eq!(mode(&node.data_dir().join("c1")), 0o600);

    let eth0 = pod.exec_json(&["ip", "-j", "link", "show", "eth0"]);
    assert_eq!(eth0[0]["mtu"].as_u64(), Some(1450));
    let routes = pod.exec_ok(&["ip", "route", "show"]);
    assert!(
        routes.contains("default via 10.78.5.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("10.78.0.0/16 via 10.78.5.1 dev eth0"),
        "{routes}"
    );
    assert!(ping(&pod, "10.78.5.1"), "the pod reaches its gateway");

    node.run("DEL", "c1", &pod, &conf).ok();
    assert_eq!(pod_links(&pod), ["lo"]);
    node.assert_clean();
    node.run("DEL", "c1", &pod, &conf).ok();
    node.run("DEL", "never-added", &pod, &conf).ok();
}

/// A second interface of the same container gets its own saved config instead of
/// overwriting the first one's (flannel keys by container ID only, so one DEL
/// used to strand the other attachment).
#[test]
fn two_interfaces_of_one_container_keep_separate_configs() {
    let Some(node) = Node::new() else { return };
    node.write_subnet_env(SUBNET_ENV);
    let pod = TestNetns::new();
    let conf = node.conf("1.0.0", json!({}));
    node.run_if("ADD", "c1", &pod, "eth0", &conf).ok();
    node.run_if("ADD", "c1", &pod, "net1", &conf).ok();
    assert!(node.saved("c1").is_some() && node.saved("c1@net1").is_some());
    node.run_if("DEL", "c1", &pod, "net1", &conf).ok();
    assert!(node.saved("c1").is_some(), "eth0's config stays");
    node.wait_veths(1);
    node.run_if("DEL", "c1", &pod, "eth0", &conf).ok();
    node.assert_clean();
}

/// F02: no subnet.env yet: ADD says try again later in flannel's words, STATUS says
/// not available, and nothing is created; once the agent writes it, both work.
#[test]
fn missing_subnet_env_is_try_again_later_and_status_50() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let conf = node.conf("1.1.0", json!({}));
    let e = node.run("ADD", "c1", &pod, &conf).err();
    let msg = format!(
        "failed to load flannel 'subnet.env' file: open {}: no such file or directory. \
         Check the flannel pod log for this node.",
        node.subnet_file().display()
    );
    assert_eq!((e.code, e.msg.as_str()), (11, msg.as_str()));
    let status = node.call("STATUS", &conf).run().err();
    assert_eq!((status.code, status.msg), (50, msg));
    assert!(!node.data_dir().exists());
    assert_eq!(pod_links(&pod), ["lo"]);
    assert!(
        !node
            .ns
            .exec(&["ip", "link", "show", &node.bridge])
            .status
            .success()
    );

    node.write_subnet_env(SUBNET_ENV);
    node.call("STATUS", &conf).run().ok();
    node.run("ADD", "c1", &pod, &conf).ok();
    node.run("DEL", "c1", &pod, &conf).ok();
    node.assert_clean();
}

/// F03, F04: a subnet.env without the required keys or with a bad value, and a
/// delegate dictionary flannel refuses: precise errors, nothing saved or created.
#[test]
fn bad_subnet_env_and_delegate_are_refused_before_acting() {
    let Some(node) = Node::new() else { return };
    let pod = TestNetns::new();
    let cases = [
        (
            "FLANNEL_NETWORK=10.78.0.0/16\nFLANNEL_SUBNET=10.78.5.1/24\n",
            json!({}),
            6,
            "is missing FLANNEL_MTU, FLANNEL_IPMASQ.",
        ),
        (
            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            json!({}),
            6,
            "is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET.",
        ),
        (
            "FLANNEL_NETWORK=banana\n",
            json!({}),
            6,
            "FLANNEL_NETWORK=\"banana\" in subnet.env is not a list of IPv4 CIDRs",
        ),
        (
            SUBNET_ENV,
            json!({"delegate": {"name": "x"}}),
            7,
            "'delegate' dictionary must not have 'name' field, it'll be set by flannel",
        ),
        (
            SUBNET_ENV,
            json!({"delegate": {"ipam": {}}}),
            7,
            "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel",
        ),
        (
            SUBNET_ENV,
            json!({"delegate": {"type": 1}}),
            7,
            "'delegate' dictionary, if present, must have (string) 'type' field",
        ),
    ];
    for (env, extra, code, msg) in cases {
        node.write_subnet_env(env);
        let e = node
            .run("ADD", "c1", &pod, &node.conf("1.0.0", extra))
            .err();
        assert_eq!(e.code, code, "{}", e.msg);
        assert!(e.msg.contains(msg), "{} does not say {msg}", e.msg);
        assert!(!node.data_dir().exists());
        assert_eq!(pod_links(&pod), ["lo"]);
    }
}

/// F05: dual-stack with IPMASQ=false (so the bridge masquerades), the conf's own
/// ipam routes first, and runtimeConfig passed to the delegate.
#[test]
fn dual_stack_masquerade_routes_and_runtime_config() {
    let Some(node) = Node::new() else { return };
    node.write_subnet_env(
        "FLANNEL_NETWORK=10.79.0.0/16,10.79.0.0/16\nFLANNEL_SUBNET=10.79.5.1/24\n\
         FLANNEL_IPV6_NETWORK=fd79::/56\nFLANNEL_IPV6_SUBNET=fd79:0:0:5::1/64\n\
         FLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n",
    );
    let pod = TestNetns::new();
    let mut conf = node.conf(
        "1.0.0",
        json!({"runtimeConfig": {"mac": "0a:58:0a:4f:05:77"}}),
    );
    conf["ipam"]["routes"] = json!([{"dst": "192.0.2.0/24"}]);
    let result = node.run("ADD", "c1", &pod, &conf).ok();
    let ips: Vec<&str> = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    assert_eq!(ips, ["10.79.5.2/24", "fd79:0:0:5::2/64"]);
    assert_eq!(result["interfaces"][2]["mac"], "0a:58:0a:4f:05:77");
    let saved: Value = serde_json::from_str(&node.saved("c1").unwrap()).unwrap();
    assert_eq!(saved["ipMasq"], true);
    assert_eq!(saved["runtimeConfig"], json!({"mac": "0a:58:0a:4f:05:77"}));
    assert_eq!(
        saved["ipam"]["routes"],
        json!([{"dst": "192.0.2.0/24"}, {"dst": "10.79.0.0/16"}, {"dst": "fd79::/56"}])
    );
    let masq = node
        .ns
        .exec_ok(&["nft", "list", "table", "inet", "weft_masq"]);
    assert!(masq.contains("10.79.5.2"), "{masq}");

    node.run("DEL", "c1", &pod, &conf).ok();
    let masq = node
        .ns
        .exec_ok(&["nft", "list", "table", "inet", "weft_masq"]);
    assert!(!masq.contains("10.79.5.2"), "{masq}");
    node.assert_clean();
}

/// F06: the node's subnet changed while a pod still uses the bridge: ADD fails
/// clearly and leaves nothing (flannel leaks the pod's interface), CHECK of the old
/// pod names the change.
#[test]
fn a_changed_subnet_is_a_clear_error_and_check_names_it() {
    let Some(node) = Node::new() else { return };
    node.write_subnet_env(SUBNET_ENV);
    let (a, b) = (TestNetns::new(), TestNetns::new());
    let conf = node.conf("1.0.0", json!({}));
    let result = node.run("ADD", "a", &a, &conf).ok();
    node.write_subnet_env(&SUBNET_ENV.replace("10.78.5.1/24", "10.78.6.1/24"));
    let e = node.run("ADD", "b", &b, &conf).err();
    let want = format!(
        "failed to delegate add: failed to set bridge addr: \"{}\" already has an IP address different from 10.78.6.1/24",
        node.bridge
    );
    assert_eq!((e.code, e.msg.as_str()), (7, want.as_str()));
    assert_eq!(pod_links(&b), ["lo"]);
    assert!(node.saved("b").is_none());
    assert_eq!(node.veths().len(), 1);
    assert_eq!(node.reservations(), 1);

    let mut check = conf.clone();
    check["prevResult"] = result;
    let e = node.run("CHECK", "a", &a, &check).err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (
            102,
            "the node's subnet changed since ADD: the pod was given 10.78.5.0/24 and subnet.env now says 10.78.6.0/24"
        )
    );
    node.run("DEL", "a", &a, &conf).ok();
    node.assert_clean();
}

/// F09: the delegate's DEL fails: the error is returned and the saved config kept,
/// so the retry really cleans up (flannel deletes it and the retry leaks).
#[test]
fn a_failed_delegate_del_keeps_the_config_for_the_retry() {
    let Some(node) = Node::new() else { return };
    node.write_subnet_env(SUBNET_ENV);
    let pod = TestNetns::new();
    let conf = node.conf("1.0.0", json!({}));
    node.run("ADD", "c1", &pod, &conf).ok();
    let saved = node.saved("c1").unwrap();
    let path = node.data_dir().join("c1");
    std::fs::write(
        &path,
        saved.replace(r#""type":"bridge""#, r#""type":"no-such-plugin""#),
    )
    .unwrap();
    let e = node.run("DEL", "c1", &pod, &conf).err();
    assert!(
        e.msg.contains("failed to find plugin \"no-such-plugin\""),
        "{}",
        e.msg
    );
    assert!(node.saved("c1").is_some(), "kept for the retry");
    assert_eq!(node.veths().len(), 1);

    std::fs::write(&path, saved).unwrap();
    node.run("DEL", "c1", &pod, &conf).ok();
    assert_eq!(pod_links(&pod), ["lo"]);
    node.assert_clean();
}

/// A torn saved config (a power loss under flannel's old writer) no longer strands
/// the pod: DEL rebuilds the config from subnet.env and cleans up.
#[test]
fn a_torn_saved_config_is_rebuilt_from_subnet_env() {
    let Some(node) = Node::new() else { return };
    node.write_subnet_env(SUBNET_ENV);
    let pod = TestNetns::new();
    let conf = node.conf("1.0.0", json!({}));
    node.run("ADD", "c1", &pod, &conf).ok();
    std::fs::write(node.data_dir().join("c1"), "").unwrap();
    node.run("DEL", "c1", &pod, &conf).ok();
    assert_eq!(pod_links(&pod), ["lo"]);
    node.assert_clean();
}

/// F10: CHECK runs the delegate's CHECK (flannel's is a no-op), so a pod that lost
/// its address fails it.
#[test]
fn check_runs_the_delegates_check() {
    let Some(node) = Node::new() else { return };
    node.write_subnet_env(SUBNET_ENV);
    let pod = TestNetns::new();
    let conf = node.conf("1.0.0", json!({}));
    let mut check = conf.clone();
    check["prevResult"] = node.run("ADD", "c1", &pod, &conf).ok();
    node.run("CHECK", "c1", &pod, &check).ok();
    pod.exec_ok(&["ip", "addr", "del", "10.78.5.2/24", "dev", "eth0"]);
    let e = node.run("CHECK", "c1", &pod, &check).err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (102, "failed to match addr 10.78.5.2/24 on interface eth0")
    );
    let e = node.run("CHECK", "other", &pod, &check).err();
    assert_eq!(e.code, 3, "{}", e.msg);
    node.run("DEL", "c1", &pod, &conf).ok();
    node.assert_clean();
}

/// F11: a conf without cniVersion is 0.1.0 for the delegate too, and the result
/// comes back in 0.1.0's form.
#[test]
fn without_cni_version_the_delegate_runs_as_0_1_0() {
    let Some(node) = Node::new() else { return };
    node.write_subnet_env(SUBNET_ENV);
    let pod = TestNetns::new();
    let conf = node.conf("", json!({}));
    let result = node.run("ADD", "c1", &pod, &conf).ok();
    assert_eq!(result["ip4"]["ip"], "10.78.5.2/24", "{result}");
    assert!(
        node.saved("c1")
            .unwrap()
            .contains(r#""cniVersion":"0.1.0""#)
    );
    node.run("DEL", "c1", &pod, &conf).ok();
    node.assert_clean();
}

/// GC forwards to the delegate (host-local frees the stale pod's address) and drops
/// the saved configs of attachments the runtime no longer lists.
#[test]
fn gc_releases_stale_attachments_and_their_saved_configs() {
    let Some(node) = Node::new() else { return };
    node.write_subnet_env(SUBNET_ENV);
    let (a, b) = (TestNetns::new(), TestNetns::new());
    let conf = node.conf("1.1.0", json!({}));
    node.run("ADD", "a", &a, &conf).ok();
    node.run("ADD", "b", &b, &conf).ok();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
    node.call("GC", &gc).run().ok();
    assert_eq!(node.reservations(), 1);
    assert!(node.saved("a").is_some() && node.saved("b").is_none());
    node.run("DEL", "a", &a, &conf).ok();
    node.run("DEL", "b", &b, &conf).ok(); // nothing saved any more: a no-op
    // b's veth goes with its netns (a runtime DELs before it GCs).
    drop(b);
    node.assert_clean();
}

/// The same plugin delegating to the reference bridge and host-local (a node that
/// swapped only flannel's binary): ADD, CHECK-free DEL, nothing left.
#[test]
fn delegates_to_the_reference_bridge() {
    let Some(node) = Node::new() else { return };
    let node = node.with_reference_delegates();
    node.write_subnet_env(SUBNET_ENV);
    let pod = TestNetns::new();
    let conf = node.conf("0.3.1", json!({}));
    let result = node.run("ADD", "c1", &pod, &conf).ok();
    assert_eq!(result["ips"][0]["address"], "10.78.5.2/24");
    assert!(ping(&pod, "10.78.5.1"));
    node.run("DEL", "c1", &pod, &conf).ok();
    assert_eq!(pod_links(&pod), ["lo"]);
    node.assert_clean();
}
