//! Fault injection: every ADD step of bridge (host-local in-process), portmap and
//! flannel is made to fail, and is killed with SIGKILL, in turn. After a failure
//! the node is exactly as before the ADD; after a kill, the runtime's DEL makes it
//! so, and so does GC once the runtime has dropped the failed sandbox. The steps
//! come from the plugins themselves (`WEFT_FAULT_TRACE` over a clean ADD), so a new
//! `weft_core::fault::point` is covered without touching this file. Then faults
//! made by breaking the environment: a full dataDir, nftables failing, a missing
//! delegate, the pod's netns vanishing mid-ADD.
//!
//! Runs the debug builds (target/debug): fault injection is compiled out of release
//! builds.

use netns_tests::node_state::NodeState;
use netns_tests::{
    Invocation, Outcome, TempDir, TestNetns, debug_bin_dir, require_root, unique_name,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long background deletions (DEL's, the kernel's for a dead netns) may take.
/// Generous: the kernel tears namespaces down on one work queue, and the tests run
/// in parallel; waiting ends as soon as the state is back.
const SETTLE: Duration = Duration::from_secs(20);

struct World {
    node: TestNetns,
    dir: TempDir,
    name: String,
    bridge: String,
}

impl World {
    fn new(tag: &str) -> Option<World> {
        require_root().then(|| {
            let name = unique_name(tag);
            let n = name.rsplit('-').next().unwrap().to_string();
            World {
                node: TestNetns::new(),
                dir: TempDir::new(tag),
                bridge: format!("wf{}{n}", std::process::id() % 10000),
                name,
            }
        })
    }

    fn dirs(&self) -> [PathBuf; 3] {
        ["ipam", "portmap", "flannel"].map(|d| self.dir.join(d))
    }

    fn state(&self) -> NodeState {
        let dirs = self.dirs();
        NodeState::capture(&self.node, &dirs.each_ref().map(PathBuf::as_path))
    }

    /// Wait until the node is back to `before`; panic with the difference if not.
    fn assert_back(&self, before: &NodeState, what: &str) {
        let dirs = self.dirs();
        let diff = before.wait_back(&self.node, &dirs.each_ref().map(PathBuf::as_path), SETTLE);
        assert!(diff.is_empty(), "{what}: {diff:#?}");
    }

    /// bridge + host-local with everything that has an ADD step: both families,
    /// gateway, masquerade, MAC guard.
    fn bridge_conf(&self) -> Value {
        json!({"cniVersion": "1.1.0", "name": self.name, "type": "bridge",
            "bridge": self.bridge, "isGateway": true, "ipMasq": true, "macspoofchk": true,
            "ipam": {"type": "host-local", "dataDir": self.dir.join("ipam"),
                "ranges": [[{"subnet": "10.120.0.0/24"}], [{"subnet": "fd12:0:0:1::/64"}]]}})
    }

    fn portmap_conf(&self, host_port: u16, prev: &Value) -> Value {
        json!({"cniVersion": "1.1.0", "name": self.name, "type": "portmap", "snat": true,
            "dataDir": self.dir.join("portmap"), "prevResult": prev,
            "runtimeConfig": {"portMappings": [
                {"hostPort": host_port, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": host_port, "containerPort": 80, "protocol": "udp"}]}})
    }

    fn flannel_conf(&self) -> Value {
        json!({"cniVersion": "1.1.0", "name": self.name, "type": "flannel",
            "subnetFile": self.dir.join("subnet.env"), "dataDir": self.dir.join("flannel"),
            "ipam": {"dataDir": self.dir.join("ipam")},
            "delegate": {"bridge": self.bridge, "isDefaultGateway": true}})
    }

    /// `plugin` (a debug build, CNI_PATH the debug builds too) on this node.
    fn call(&self, plugin: &str, cmd: &str, conf: &Value) -> Invocation {
        Invocation::new(debug_bin_dir().join(plugin))
            .in_netns(self.node.path())
            .command(cmd)
            .path(&[debug_bin_dir()])
            .stdin_json(conf)
    }

    fn attach(&self, plugin: &str, cmd: &str, cid: &str, pod: &Path, conf: &Value) -> Invocation {
        self.call(plugin, cmd, conf)
            .container_id(cid)
            .netns(pod)
            .ifname("eth0")
    }

    /// GC of `plugin` with only `valid` containers (eth0) left.
    fn gc(&self, plugin: &str, conf: &Value, valid: &[&str]) {
        let list: Vec<Value> = valid
            .iter()
            .map(|c| json!({"containerID": c, "ifname": "eth0"}))
            .collect();
        let mut conf = conf.clone();
        conf["cni.dev/valid-attachments"] = json!(list);
        let out = self.call(plugin, "GC", &conf).run();
        assert_eq!(out.status, 0, "GC {plugin}: {out:?}");
    }

    /// The fault points a clean run of `inv` passes, in order (the attachment is
    /// left in place).
    fn trace(&self, inv: Invocation) -> Vec<String> {
        let file = self.dir.join(format!("trace-{}", unique_name("t")));
        let out = inv
            .var("WEFT_FAULT_TRACE", file.display().to_string())
            .run();
        assert_eq!(out.status, 0, "{out:?}");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        text.lines().map(str::to_owned).collect()
    }
}

/// Wait for DEL's background deletion of the pod's interface.
fn settled(pod: &TestNetns) {
    netns_tests::weftd_cluster::wait_for("the pod's interface to go", SETTLE, || {
        (pod.link_names() == ["lo"]).then_some(())
    });
}

/// How a runtime drives one attachment of the plugin under test.
struct Flow<'a> {
    /// Plugins before the one under test in the chain, run without faults.
    prepare: &'a dyn Fn(&str, &TestNetns),
    /// The ADD under test, with `WEFT_FAULT` set to the given value.
    add: &'a dyn Fn(&str, &TestNetns, &str) -> Outcome,
    /// The runtime's DEL of the whole chain (must succeed).
    del: &'a dyn Fn(&str, &TestNetns),
    /// GC of the whole chain with only the keeper valid.
    gc: &'a dyn Fn(),
}

/// Every point three ways: failing (rolled back at once, then the runtime's DEL
/// still succeeds), killed then DEL, killed then GC after the sandbox is gone.
/// Returns how many faults were injected.
fn each_point(w: &World, points: &[String], flow: &Flow) -> usize {
    let before = w.state();
    for p in points {
        let pod = TestNetns::new();
        (flow.prepare)("victim", &pod);
        let mid = w.state();
        let out = (flow.add)("victim", &pod, p);
        let e = out.err();
        assert_eq!(e.code, 999, "{p}: {out:?}");
        assert!(
            e.msg.contains(&format!("injected fault at {p}")),
            "{p}: {}",
            e.msg
        );
        w.assert_back(&mid, &format!("failing at {p}"));
        (flow.del)("victim", &pod);
        w.assert_back(&before, &format!("DEL after failing at {p}"));

        let kill = format!("{p}:kill");
        (flow.prepare)("victim", &pod);
        let out = (flow.add)("victim", &pod, &kill);
        assert_eq!(out.status, 137, "{p}: {out:?}");
        (flow.del)("victim", &pod);
        w.assert_back(&before, &format!("DEL after a kill at {p}"));
        assert_eq!(pod.link_names(), ["lo"], "{p}");

        let gone = TestNetns::new();
        (flow.prepare)("lost", &gone);
        let out = (flow.add)("lost", &gone, &kill);
        assert_eq!(out.status, 137, "{p}: {out:?}");
        drop(gone);
        (flow.gc)();
        w.assert_back(&before, &format!("GC after a kill at {p}"));
    }
    points.len() * 3
}

fn report(what: &str, points: &[String], injected: usize) {
    eprintln!(
        "faults: {what}: {} steps, {injected} faults injected, leaks 0",
        points.len()
    );
}

#[test]
fn every_bridge_add_step_fails_cleanly_and_crashes_recoverably() {
    let Some(w) = World::new("fb") else { return };
    let conf = w.bridge_conf();
    let keeper = TestNetns::new();
    let ok = |cmd: &str, cid: &str, pod: &TestNetns| {
        let out = w.attach("bridge", cmd, cid, pod.path(), &conf).run();
        assert_eq!(out.status, 0, "{cmd} {cid}: {out:?}");
    };
    ok("ADD", "keeper", &keeper);

    let probe = TestNetns::new();
    let points = w.trace(w.attach("bridge", "ADD", "probe", probe.path(), &conf));
    ok("DEL", "probe", &probe);
    settled(&probe);
    let expected = [
        "bridge.bridge",
        "bridge.veth",
        "bridge.port",
        "bridge.macspoof",
        "host-local.reserved",
        "bridge.ipam",
        "bridge.l3",
        "bridge.masq",
        "bridge.result",
    ];
    assert_eq!(points, expected);

    let flow = Flow {
        prepare: &|_, _| {},
        add: &|cid, pod, fault| {
            let inv = w.attach("bridge", "ADD", cid, pod.path(), &conf);
            inv.var("WEFT_FAULT", fault).run()
        },
        del: &|cid, pod| ok("DEL", cid, pod),
        gc: &|| w.gc("bridge", &conf, &["keeper"]),
    };
    let injected = each_point(&w, &points, &flow);
    report("bridge + host-local", &points, injected);
    ok("DEL", "keeper", &keeper);
}

/// host-local alone, as another plugin (the reference bridge, say) execs it.
#[test]
fn every_host_local_add_step_fails_cleanly_and_crashes_recoverably() {
    let Some(w) = World::new("fh") else { return };
    // What bridge hands its IPAM plugin: the whole network config.
    let conf = w.bridge_conf();
    let ok = |cmd: &str, cid: &str, pod: &TestNetns| {
        let out = w.attach("host-local", cmd, cid, pod.path(), &conf).run();
        assert_eq!(out.status, 0, "{cmd} {cid}: {out:?}");
    };
    let keeper = TestNetns::new();
    ok("ADD", "keeper", &keeper);
    let probe = TestNetns::new();
    let points = w.trace(w.attach("host-local", "ADD", "probe", probe.path(), &conf));
    ok("DEL", "probe", &probe);
    assert_eq!(points, ["host-local.reserved"]);
    let flow = Flow {
        prepare: &|_, _| {},
        add: &|cid, pod, fault| {
            let inv = w.attach("host-local", "ADD", cid, pod.path(), &conf);
            inv.var("WEFT_FAULT", fault).run()
        },
        del: &|cid, pod| ok("DEL", cid, pod),
        gc: &|| w.gc("host-local", &conf, &["keeper"]),
    };
    let injected = each_point(&w, &points, &flow);
    report("host-local", &points, injected);
}

/// The first ADD on a node creates the bridge: failing at any step removes it
/// again, and every other trace of the attempt.
#[test]
fn a_failed_first_add_leaves_no_bridge() {
    let Some(w) = World::new("fn") else { return };
    let conf = w.bridge_conf();
    let probe = TestNetns::new();
    let points = w.trace(w.attach("bridge", "ADD", "probe", probe.path(), &conf));
    let out = w
        .attach("bridge", "DEL", "probe", probe.path(), &conf)
        .run();
    assert_eq!(out.status, 0, "{out:?}");
    settled(&probe);
    w.node.exec_ok(&["ip", "link", "del", &w.bridge]);
    // The masquerade chains the probe created stay, empty, for the next pod: shared
    // infrastructure, not an attachment's state.
    let before = w.state();
    for p in &points {
        let pod = TestNetns::new();
        let inv = w.attach("bridge", "ADD", "victim", pod.path(), &conf);
        let e = inv.var("WEFT_FAULT", p).run().err();
        assert_eq!(e.code, 999, "{p}");
        let diff = before.diff(&w.state());
        assert!(diff.is_empty(), "first ADD failing at {p} left {diff:#?}");
        assert_eq!(pod.link_names(), ["lo"], "{p}");
    }
    report("first ADD on a node", &points, points.len());
}

#[test]
fn every_portmap_add_step_fails_cleanly_and_crashes_recoverably() {
    let Some(w) = World::new("fp") else { return };
    let conf = w.bridge_conf();
    let keeper = TestNetns::new();
    let bridge_add = |cid: &str, pod: &TestNetns| -> Value {
        w.attach("bridge", "ADD", cid, pod.path(), &conf).run().ok()
    };
    let prev = bridge_add("keeper", &keeper);
    let out = w
        .attach(
            "portmap",
            "ADD",
            "keeper",
            keeper.path(),
            &w.portmap_conf(18080, &prev),
        )
        .run();
    assert_eq!(out.status, 0, "{out:?}");

    // The victim's bridge result, kept between `prepare` and `add`.
    let result = std::cell::RefCell::new(Value::Null);
    let probe = TestNetns::new();
    let probe_prev = bridge_add("probe", &probe);
    let pm = w.portmap_conf(18081, &probe_prev);
    let points = w.trace(w.attach("portmap", "ADD", "probe", probe.path(), &pm));
    assert_eq!(
        points,
        ["portmap.recorded", "portmap.installed", "portmap.localhost"]
    );
    let del_chain = |cid: &str, pod: &TestNetns| {
        let conf_pm = w.portmap_conf(18081, &Value::Null);
        for (plugin, c) in [("portmap", &conf_pm), ("bridge", &conf)] {
            let out = w.attach(plugin, "DEL", cid, pod.path(), c).run();
            assert_eq!(out.status, 0, "DEL {plugin} {cid}: {out:?}");
        }
    };
    del_chain("probe", &probe);
    settled(&probe);

    let flow = Flow {
        prepare: &|cid, pod| *result.borrow_mut() = bridge_add(cid, pod),
        add: &|cid, pod, fault| {
            let pm = w.portmap_conf(18081, &result.borrow());
            let inv = w.attach("portmap", "ADD", cid, pod.path(), &pm);
            inv.var("WEFT_FAULT", fault).run()
        },
        del: &del_chain,
        gc: &|| {
            w.gc("portmap", &w.portmap_conf(18081, &Value::Null), &["keeper"]);
            w.gc("bridge", &conf, &["keeper"]);
        },
    };
    let injected = each_point(&w, &points, &flow);
    report("portmap (after bridge)", &points, injected);

    // A real nftables failure (the nft binary forced and failing) rolls back too.
    let pod = TestNetns::new();
    let prev = bridge_add("nft", &pod);
    let mid = w.state();
    let inv = w.attach(
        "portmap",
        "ADD",
        "nft",
        pod.path(),
        &w.portmap_conf(18082, &prev),
    );
    let e = inv.var("WEFT_NFT", "/bin/false").run().err();
    assert!(e.msg.contains("portmap"), "{}", e.msg);
    let diff = mid.diff(&w.state());
    assert!(diff.is_empty(), "a failing nft left {diff:#?}");
    del_chain("nft", &pod);
    del_chain("keeper", &keeper);
}

#[test]
fn every_flannel_add_step_fails_cleanly_and_crashes_recoverably() {
    let Some(w) = World::new("ff") else { return };
    std::fs::write(
        w.dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.121.0.0/16\nFLANNEL_SUBNET=10.121.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )
    .unwrap();
    let conf = w.flannel_conf();
    let ok = |cmd: &str, cid: &str, pod: &TestNetns| {
        let out = w.attach("flannel", cmd, cid, pod.path(), &conf).run();
        assert_eq!(out.status, 0, "{cmd} {cid}: {out:?}");
    };
    let keeper = TestNetns::new();
    ok("ADD", "keeper", &keeper);
    let probe = TestNetns::new();
    let points = w.trace(w.attach("flannel", "ADD", "probe", probe.path(), &conf));
    ok("DEL", "probe", &probe);
    settled(&probe);
    assert_eq!(points.first().map(String::as_str), Some("flannel.saved"));
    assert_eq!(points.last().map(String::as_str), Some("flannel.delegated"));
    for p in ["host-local.reserved", "bridge.veth", "bridge.masq"] {
        assert!(points.iter().any(|q| q == p), "{p} not in {points:?}");
    }

    let flow = Flow {
        prepare: &|_, _| {},
        add: &|cid, pod, fault| {
            let inv = w.attach("flannel", "ADD", cid, pod.path(), &conf);
            inv.var("WEFT_FAULT", fault).run()
        },
        del: &|cid, pod| ok("DEL", cid, pod),
        gc: &|| w.gc("flannel", &conf, &["keeper"]),
    };
    let injected = each_point(&w, &points, &flow);
    report("flannel → bridge → host-local", &points, injected);

    // A delegate that is not there: refused before anything is saved.
    let before = w.state();
    let mut missing = conf.clone();
    missing["delegate"]["type"] = json!("no-such-plugin");
    let pod = TestNetns::new();
    let e = w
        .attach("flannel", "ADD", "m", pod.path(), &missing)
        .run()
        .err();
    assert!(e.msg.contains("no-such-plugin"), "{}", e.msg);
    w.assert_back(&before, "missing delegate");
    ok("DEL", "keeper", &keeper);
}

/// A tmpfs of 64 KiB, filled, mounted on a test directory; unmounted on drop.
struct FullDisk(PathBuf);

impl FullDisk {
    fn new(at: PathBuf) -> FullDisk {
        std::fs::create_dir_all(&at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "weft-full"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(st.success());
        let disk = FullDisk(at);
        let filler = disk.0.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = [0u8; 4096];
        while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
        disk
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_data_dir_fails_the_add_and_leaves_nothing() {
    let Some(w) = World::new("fd") else { return };
    let full = FullDisk::new(w.dir.join("ipam"));
    let conf = w.bridge_conf();
    let keeper = TestNetns::new();
    // The network's directory, lock and the first reservation fit; then it is full.
    std::fs::remove_file(full.0.join("filler")).unwrap();
    let out = w
        .attach("bridge", "ADD", "keeper", keeper.path(), &conf)
        .run();
    assert_eq!(out.status, 0, "{out:?}");
    let filler = full.0.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while std::io::Write::write_all(&mut f, &[0u8; 4096]).is_ok() {}
    drop(f);

    let before = w.state();
    let pod = TestNetns::new();
    let e = w
        .attach("bridge", "ADD", "victim", pod.path(), &conf)
        .run()
        .err();
    assert!(
        e.msg.contains("No space left on device"),
        "{} ({})",
        e.msg,
        e.code
    );
    w.assert_back(&before, "ENOSPC in the dataDir");
    assert_eq!(pod.link_names(), ["lo"]);
    // DEL still works on a full disk (it frees space).
    let out = w
        .attach("bridge", "DEL", "keeper", keeper.path(), &conf)
        .run();
    assert_eq!(out.status, 0, "{out:?}");
    eprintln!("faults: full dataDir: 1 fault injected, leaks 0");
}

/// The pod's netns goes away while ADD is between creating the veth and asking
/// IPAM: the plugin finishes on the namespace it holds open, the kernel drops the
/// veth with the namespace once the plugin exits, and the runtime's DEL (the netns
/// path gone) releases the rest.
#[test]
fn the_netns_vanishing_mid_add_leaves_nothing_after_del() {
    let Some(w) = World::new("fv") else { return };
    let conf = w.bridge_conf();
    let keeper = TestNetns::new();
    let out = w
        .attach("bridge", "ADD", "keeper", keeper.path(), &conf)
        .run();
    assert_eq!(out.status, 0, "{out:?}");
    let before = w.state();
    for point in ["bridge.veth", "bridge.ipam", "bridge.l3"] {
        let pod = TestNetns::new();
        let path = pod.path().to_path_buf();
        let trace = w.dir.join(format!("trace-{point}"));
        let inv = w
            .attach("bridge", "ADD", "victim", &path, &conf)
            .var("WEFT_FAULT", format!("{point}:pause=1000"))
            .var("WEFT_FAULT_TRACE", trace.display().to_string());
        let add = std::thread::spawn(move || inv.run());
        // The namespace goes once the plugin is paused at the point, not before.
        netns_tests::weftd_cluster::wait_for(point, SETTLE, || {
            let reached = std::fs::read_to_string(&trace).unwrap_or_default();
            reached.lines().any(|l| l == point).then_some(())
        });
        drop(pod);
        let out = add.join().unwrap();
        // Finished on the namespace it held open, or failed cleanly: either way
        // the runtime's DEL must leave nothing.
        assert!(out.status == 0 || out.err().code != 0, "{out:?}");
        let out = w.attach("bridge", "DEL", "victim", &path, &conf).run();
        assert_eq!(out.status, 0, "{point}: {out:?}");
        w.assert_back(&before, &format!("netns gone at {point}"));
    }
    eprintln!("faults: netns vanishing mid-ADD: 3 faults injected, leaks 0");
    let out = w
        .attach("bridge", "DEL", "keeper", keeper.path(), &conf)
        .run();
    assert_eq!(out.status, 0, "{out:?}");
}
