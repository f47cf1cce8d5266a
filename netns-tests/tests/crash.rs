//! Crash consistency: 1,000 ADD/DEL operations of the bridge → portmap chain
//! (host-local, masquerade, a hostPort each) on one shared network, with a plugin
//! killed (SIGKILL) at a random moment in about a third of them. After a kill the
//! runtime either cleans up with DEL, which must succeed, or forgets the sandbox
//! (its netns goes), as a runtime that crashed too would. GC with the true
//! attachment list must then leave exactly the live attachments: no leaked
//! address, veth, nft element or portmap record, no address handed out twice, and
//! every live pod passing CHECK.
//!
//! The release binaries, as installed. The seed is printed; `WEFT_CRASH_SEED`
//! replays a run.

use netns_tests::{Invocation, Outcome, TempDir, TestNetns, bin_dir, require_root, unique_name};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const OPS: usize = 1000;
const SLOTS: usize = 40;
const SUBNET: &str = "10.130.0.0/22";
const FIRST_PORT: usize = 20000;

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

struct Node {
    ns: TestNetns,
    dir: TempDir,
    name: String,
    bridge: String,
}

/// A pod the runtime believes attached.
struct Live {
    cid: String,
    pod: TestNetns,
    ip: String,
    port: usize,
    result: Value,
}

#[derive(Default, Debug)]
struct Tally {
    adds: usize,
    dels: usize,
    kills: usize,
    del_after_kill: usize,
    forgotten: usize,
}

impl Node {
    fn bridge_conf(&self) -> Value {
        json!({"cniVersion": "1.1.0", "name": self.name, "type": "bridge",
            "bridge": self.bridge, "isGateway": true, "ipMasq": true,
            "ipam": {"type": "host-local", "dataDir": self.dir.join("ipam"),
                "ranges": [[{"subnet": SUBNET}]]}})
    }

    fn portmap_conf(&self, port: usize, prev: Option<&Value>) -> Value {
        let mut c = json!({"cniVersion": "1.1.0", "name": self.name, "type": "portmap",
            "snat": true, "dataDir": self.dir.join("portmap"),
            "runtimeConfig": {"portMappings": [
                {"hostPort": port, "containerPort": 80, "protocol": "tcp"}]}});
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    fn call(
        &self,
        plugin: &str,
        cmd: &str,
        cid: &str,
        pod: &TestNetns,
        conf: &Value,
    ) -> Invocation {
        Invocation::plugin(plugin)
            .in_netns(self.ns.path())
            .command(cmd)
            .path(&[bin_dir()])
            .container_id(cid)
            .netns(pod.path())
            .ifname("eth0")
            .stdin_json(conf)
    }

    /// Run, killed after `kill` if given; `None` when the plugin was killed.
    fn run(&self, inv: Invocation, kill: Option<Duration>) -> Option<Outcome> {
        let out = match kill {
            Some(after) => inv.run_killed_after(after),
            None => inv.run(),
        };
        (out.status != 137).then_some(out)
    }

    /// The chain's ADD; `kill` = (which plugin, 0 bridge / 1 portmap, after).
    fn add(
        &self,
        cid: &str,
        pod: &TestNetns,
        port: usize,
        kill: Option<(u64, Duration)>,
    ) -> Option<Value> {
        let at = |i| kill.filter(|k| k.0 == i).map(|k| k.1);
        let bridge = self.call("bridge", "ADD", cid, pod, &self.bridge_conf());
        let result = self.run(bridge, at(0))?.ok();
        let pm = self.portmap_conf(port, Some(&result));
        let out = self.run(self.call("portmap", "ADD", cid, pod, &pm), at(1))?;
        Some(out.ok())
    }

    /// The chain's DEL, portmap first; `false` when a plugin was killed.
    fn del(&self, cid: &str, pod: &TestNetns, port: usize, kill: Option<(u64, Duration)>) -> bool {
        let at = |i| kill.filter(|k| k.0 == i).map(|k| k.1);
        let steps = [
            ("portmap", self.portmap_conf(port, None), 1),
            ("bridge", self.bridge_conf(), 0),
        ];
        for (plugin, conf, i) in steps {
            let Some(out) = self.run(self.call(plugin, "DEL", cid, pod, &conf), at(i)) else {
                return false;
            };
            assert_eq!(out.status, 0, "DEL {plugin} {cid}: {out:?}");
        }
        true
    }

    fn gc(&self, live: &[&Live]) {
        let valid: Vec<Value> = live
            .iter()
            .map(|l| json!({"containerID": l.cid, "ifname": "eth0"}))
            .collect();
        for (plugin, mut conf) in [
            ("portmap", self.portmap_conf(0, None)),
            ("bridge", self.bridge_conf()),
        ] {
            conf["cni.dev/valid-attachments"] = json!(valid);
            let inv = Invocation::plugin(plugin)
                .in_netns(self.ns.path())
                .command("GC")
                .path(&[bin_dir()])
                .stdin_json(&conf);
            let out = inv.run();
            assert_eq!(out.status, 0, "GC {plugin}: {out:?}");
        }
    }

    fn reservations(&self) -> BTreeMap<String, String> {
        netns_tests::reservations(&self.dir.join("ipam").join(&self.name))
    }

    /// portmap's files: a record per attachment, nothing else.
    fn records(&self) -> BTreeSet<String> {
        netns_tests::portmap_files(&self.dir.join("portmap"))
    }

    /// (bridge ports, veths anywhere on the node).
    fn veths(&self) -> (usize, usize) {
        let links = self.ns.exec_json(&["ip", "-j", "link", "show"]);
        let links = links.as_array().unwrap();
        let ports = links.iter().filter(|l| l["master"] == self.bridge.as_str());
        let veths = links.iter().filter(|l| {
            l["link_type"] == "ether" && l["ifname"].as_str().unwrap().starts_with("veth")
        });
        (ports.count(), veths.count())
    }

    /// Every pod address and host port named anywhere in the ruleset.
    fn nft_mentions(&self) -> (BTreeSet<String>, BTreeSet<usize>) {
        let text = self.ns.exec_ok(&["nft", "list", "ruleset"]);
        let mut ips = BTreeSet::new();
        let mut ports = BTreeSet::new();
        // Words, not digit runs: a hex mark (`0x7c20482f`) or a hashed set or chain
        // name holds digit runs that can look like a mapped port.
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.')) {
            // The pod subnet itself (10.130.0.0/22) is named by the masquerade rules.
            if word.starts_with("10.130.") && word != "10.130.0.0" {
                ips.insert(word.to_owned());
            } else if let Ok(p) = word.parse::<usize>()
                && (FIRST_PORT..FIRST_PORT + OPS).contains(&p)
            {
                ports.insert(p);
            }
        }
        (ips, ports)
    }
}

fn ip_of(result: &Value) -> String {
    let addr = result["ips"][0]["address"].as_str().unwrap();
    addr.split('/').next().unwrap().to_owned()
}

fn seed() -> u64 {
    std::env::var("WEFT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 | 1
        })
}

#[test]
fn kill_9_during_1000_operations_then_gc_leaves_exactly_the_live_pods() {
    if !require_root() {
        return;
    }
    let name = unique_name("crash");
    let node = Node {
        ns: TestNetns::new(),
        dir: TempDir::new("crash"),
        bridge: format!("wc{}", std::process::id() % 100000),
        name,
    };
    let seed = seed();
    eprintln!("crash: seed {seed} (WEFT_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let mut slots: Vec<Option<Live>> = (0..SLOTS).map(|_| None).collect();
    let mut t = Tally::default();
    let started = Instant::now();
    for op in 0..OPS {
        let s = rng.below(SLOTS as u64) as usize;
        // A kill in one op of three, at a moment spread over a plugin's run time.
        let kill = rng
            .one_in(3)
            .then(|| (rng.below(2), Duration::from_micros(rng.below(7000))));
        match slots[s].take() {
            None => {
                t.adds += 1;
                let (cid, port) = (format!("s{s}op{op}"), FIRST_PORT + op);
                let pod = TestNetns::new();
                match node.add(&cid, &pod, port, kill) {
                    Some(result) => {
                        let ip = ip_of(&result);
                        let holder = slots.iter().flatten().find(|l| l.ip == ip);
                        assert!(
                            holder.is_none(),
                            "{ip} handed out twice (op {op}, seed {seed})"
                        );
                        slots[s] = Some(Live {
                            cid,
                            pod,
                            ip,
                            port,
                            result,
                        });
                    }
                    None => after_kill(&node, &mut rng, &mut t, &cid, pod, port),
                }
            }
            Some(live) => {
                t.dels += 1;
                if !node.del(&live.cid, &live.pod, live.port, kill) {
                    after_kill(&node, &mut rng, &mut t, &live.cid, live.pod, live.port);
                }
            }
        }
    }
    let ran = started.elapsed();
    let live: Vec<&Live> = slots.iter().flatten().collect();
    let leaked_before_gc = node.reservations().len().saturating_sub(live.len());
    node.gc(&live);
    assert_exactly_live(&node, &live, seed);
    eprintln!(
        "crash: {OPS} operations ({} ADD, {} DEL) in {ran:.1?}, {} plugins killed, \
         {} cleaned by the runtime's DEL, {} sandboxes forgotten; GC reclaimed {leaked_before_gc} \
         addresses; after GC: {} live pods, leaks 0, duplicates 0",
        t.adds,
        t.dels,
        t.kills,
        t.del_after_kill,
        t.forgotten,
        live.len()
    );
    for l in &live {
        for (plugin, conf) in [
            ("bridge", node.bridge_conf()),
            ("portmap", node.portmap_conf(l.port, None)),
        ] {
            let mut conf = conf;
            conf["prevResult"] = l.result.clone();
            let out = node.call(plugin, "CHECK", &l.cid, &l.pod, &conf).run();
            assert_eq!(out.status, 0, "CHECK {plugin} {}: {out:?}", l.cid);
        }
    }
    for l in &live {
        assert!(node.del(&l.cid, &l.pod, l.port, None));
    }
    assert_exactly_live(&node, &[], seed);
}

/// A killed plugin: the runtime retries DEL (which must succeed), or has
/// forgotten the sandbox, whose netns goes.
fn after_kill(node: &Node, rng: &mut Rng, t: &mut Tally, cid: &str, pod: TestNetns, port: usize) {
    t.kills += 1;
    if rng.one_in(2) {
        t.del_after_kill += 1;
        assert!(node.del(cid, &pod, port, None), "DEL after a kill");
    } else {
        t.forgotten += 1;
    }
    drop(pod);
}

/// host-local, the bridge, nftables and portmap's records hold exactly `live`.
fn assert_exactly_live(node: &Node, live: &[&Live], seed: u64) {
    let ips: BTreeSet<String> = live.iter().map(|l| l.ip.clone()).collect();
    assert_eq!(
        ips.len(),
        live.len(),
        "duplicates among live pods (seed {seed})"
    );
    let held: BTreeMap<String, String> = live
        .iter()
        .map(|l| (l.ip.clone(), format!("{}\r\neth0", l.cid)))
        .collect();
    assert_eq!(node.reservations(), held, "reservations (seed {seed})");
    let ports: BTreeSet<usize> = live.iter().map(|l| l.port).collect();
    // DEL and dead namespaces delete veths in the background.
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.veths() != (live.len(), live.len()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        node.veths(),
        (live.len(), live.len()),
        "veths (seed {seed})"
    );
    assert_eq!(node.nft_mentions(), (ips, ports), "nftables (seed {seed})");
    let records = node.records();
    assert_eq!(
        records.len(),
        live.len(),
        "portmap records {records:?} (seed {seed})"
    );
    for l in live {
        let addrs = l
            .pod
            .exec_ok(&["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains(&format!("{}/", l.ip)), "{}: {addrs}", l.cid);
    }
}
