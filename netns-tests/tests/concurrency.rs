//! Concurrency: hundreds of real plugin processes racing on one node. The release
//! binaries (bridge + host-local, and the bridge → portmap conflist through the
//! driver) run inside a test "node" netns; every pod is its own netns. All ADDs and
//! DELs of a phase start together behind a barrier, one thread (and one plugin
//! process) each; the checks after a phase (ping, links) run a few at a time.
//!
//! After every phase the node's state must be exactly the live pods': host-local
//! reservations, bridge ports (DEL deletes veths in the background, so ports are
//! polled), veths, masquerade and hostPort elements, portmap records, the driver's
//! cache; no address is ever handed out twice. Each test prints a summary line
//! (`operations`, `duplicates`, `leaks`, `wrong`) and asserts the last three are 0.

use ipnet::IpNet;
use netns_tests::driver::{Attachment, Driver, DriverError};
use netns_tests::{Invocation, Outcome, TempDir, TestNetns, bin_dir, require_root, unique_name};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------
// Harness helpers
// ---------------------------------------------------------------------------------

/// Every file descriptor a few hundred namespace owners, plugin pipes and sockets
/// need: raise the soft limit to the hard one (CI machines often start at 1024).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, initialized struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `n` fresh pod namespaces, created by a few threads at once.
fn netns_many(n: usize) -> Vec<TestNetns> {
    const MAKERS: usize = 8;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..MAKERS)
            .map(|t| {
                s.spawn(move || {
                    (t..n)
                        .step_by(MAKERS)
                        .map(|_| TestNetns::new())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("netns maker panicked"))
            .collect()
    })
}

/// Run `f` on every item, one thread each, all released together by a barrier: the
/// results in item order.
fn race<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let barrier = Barrier::new(items.len().max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .iter()
            .map(|item| {
                let (barrier, f) = (&barrier, &f);
                s.spawn(move || {
                    barrier.wait();
                    f(item)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    })
}

/// Run `f` on every item with `workers` threads (for checks, not races): the
/// results in item order.
fn pool<T: Sync, R: Send>(items: &[T], workers: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let mut out: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let f = &f;
                s.spawn(move || {
                    let mine = items.iter().enumerate().skip(w).step_by(workers);
                    mine.map(|(i, item)| (i, f(item))).collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker panicked"))
            .collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// Poll `probe` until `done` holds for its value or `limit` passes: the last value.
fn poll<T>(limit: Duration, mut probe: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let v = probe();
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// What a test counts, printed as its summary and asserted at every checkpoint.
struct Tally {
    test: &'static str,
    started: Instant,
    ops: usize,
    /// An address (or host port) held by two live attachments, or handed out twice.
    duplicates: Vec<String>,
    /// State of an attachment that is gone (or never succeeded) still on the node.
    leaks: Vec<String>,
    /// Anything else that differs: a failed operation, missing state, a bad result.
    wrong: Vec<String>,
}

impl Tally {
    fn new(test: &'static str) -> Tally {
        Tally {
            test,
            started: Instant::now(),
            ops: 0,
            duplicates: Vec::new(),
            leaks: Vec::new(),
            wrong: Vec::new(),
        }
    }

    fn summary(&self, at: &str) {
        eprintln!(
            "[{}] {at}: operations {}, duplicates {}, leaks {}, wrong {}, wall {:.2}s",
            self.test,
            self.ops,
            self.duplicates.len(),
            self.leaks.len(),
            self.wrong.len(),
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Print where we are; panic with every problem found so far.
    fn checkpoint(&self, at: &str) {
        self.summary(at);
        let shown = |v: &[String]| v.iter().take(20).cloned().collect::<Vec<_>>().join("\n  ");
        assert!(
            self.duplicates.is_empty() && self.leaks.is_empty() && self.wrong.is_empty(),
            "[{}] after {at}:\nduplicates ({}):\n  {}\nleaks ({}):\n  {}\nwrong ({}):\n  {}",
            self.test,
            self.duplicates.len(),
            shown(&self.duplicates),
            self.leaks.len(),
            shown(&self.leaks),
            self.wrong.len(),
            shown(&self.wrong),
        );
    }
}

/// One element of an nft map: key (concatenations joined with ` . `), comment, value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Elem {
    key: String,
    comment: Option<String>,
    value: String,
}

fn nft_atom(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Object(o) if o.contains_key("concat") => o["concat"]
            .as_array()
            .map(|a| a.iter().map(nft_atom).collect::<Vec<_>>().join(" . "))
            .unwrap_or_default(),
        Value::Object(o) if o.contains_key("jump") => {
            format!("jump {}", o["jump"]["target"].as_str().unwrap_or("?"))
        }
        other => other.to_string(),
    }
}

/// Every map and set of `<family> <table>` in `ns` with its elements; empty without the table.
fn nft_maps(ns: &TestNetns, family: &str, table: &str) -> BTreeMap<String, Vec<Elem>> {
    let out = ns.exec(&["nft", "-j", "list", "table", family, table]);
    let mut maps = BTreeMap::new();
    if !out.status.success() {
        return maps;
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j prints JSON");
    for item in v["nftables"].as_array().into_iter().flatten() {
        // Sets too: their elements have no value.
        let (map, is_map) = match (item.get("map"), item.get("set")) {
            (Some(m), _) => (m, true),
            (None, Some(s)) => (s, false),
            (None, None) => continue,
        };
        let name = map["name"].as_str().unwrap_or("?").to_string();
        let elems = map["elem"].as_array().into_iter().flatten().map(|e| {
            let (k, val) = if is_map {
                (&e[0], &e[1])
            } else {
                (e, &Value::Null)
            };
            let (key, comment) = match k.get("elem") {
                Some(inner) => (
                    nft_atom(&inner["val"]),
                    inner["comment"].as_str().map(str::to_string),
                ),
                None => (nft_atom(k), None),
            };
            Elem {
                key,
                comment,
                value: nft_atom(val),
            }
        });
        maps.insert(name, elems.collect());
    }
    maps
}

/// The comment weft puts on every element of an attachment.
fn owner_comment(net: &str, cid: &str) -> String {
    format!("net:{net} id:{cid} if:eth0")
}

/// A bridge + host-local (or bridge → portmap) result is what the spec says: three
/// interfaces (bridge, host veth, the pod's eth0 in `sandbox`), one address in
/// `subnet` on interface 2 with `gateway`. The pod's address and host veth.
fn check_result(
    r: &Value,
    version: &str,
    bridge: &str,
    sandbox: &str,
    subnet: IpNet,
    gateway: IpAddr,
) -> Result<(IpAddr, String), String> {
    let ifs = r["interfaces"].as_array().map_or(&[][..], |a| a.as_slice());
    let veth = ifs.get(1).and_then(|i| i["name"].as_str()).unwrap_or("");
    let ips = r["ips"].as_array().map_or(&[][..], |a| a.as_slice());
    let (addr, gw, on) = match ips {
        [one] => (
            one["address"]
                .as_str()
                .and_then(|a| a.parse::<IpNet>().ok()),
            one["gateway"]
                .as_str()
                .and_then(|g| g.parse::<IpAddr>().ok()),
            one["interface"].as_u64(),
        ),
        _ => (None, None, None),
    };
    let fine = r["cniVersion"] == version
        && ifs.len() == 3
        && ifs[0]["name"] == bridge
        && veth.len() == 12
        && veth.starts_with("veth")
        && ifs[1].get("sandbox").is_none()
        && ifs[2]["name"] == "eth0"
        && ifs[2]["sandbox"] == sandbox
        && addr
            .is_some_and(|a| subnet.contains(&a.addr()) && a.prefix_len() == subnet.prefix_len())
        && gw == Some(gateway)
        && on == Some(2);
    match (fine, addr) {
        (true, Some(a)) => Ok((a.addr(), veth.to_string())),
        _ => Err(format!("bad result for {sandbox}: {r}")),
    }
}

/// The test node: the plugins' host namespace and a scratch directory.
struct Node {
    ns: TestNetns,
    dir: TempDir,
}

impl Node {
    fn new(tag: &str) -> Option<Node> {
        if !require_root() {
            return None;
        }
        raise_fd_limit();
        Some(Node {
            ns: TestNetns::new(),
            dir: TempDir::new(tag),
        })
    }

    /// The ports of `bridge` (empty when it does not exist).
    fn ports(&self, bridge: &str) -> BTreeSet<String> {
        let out = self
            .ns
            .exec(&["ip", "-j", "link", "show", "master", bridge]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }

    /// Every veth the plugins made on the node (host ends), port or not.
    fn veths(&self) -> BTreeSet<String> {
        let v = self
            .ns
            .exec_json(&["ip", "-j", "link", "show", "type", "veth"]);
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .filter(|n| n.starts_with("veth"))
            .collect()
    }

    /// The ports once DEL's background veth deletions settled at `want`.
    fn ports_settled(&self, bridge: &str, want: &BTreeSet<String>) -> BTreeSet<String> {
        poll(
            Duration::from_secs(15),
            || self.ports(bridge),
            |p| p == want,
        )
    }

    /// `(local address, prefix length)` of `dev`'s addresses, and whether any is
    /// still tentative (IPv6 DAD).
    fn addresses(&self, dev: &str) -> (BTreeSet<(IpAddr, u8)>, bool) {
        let v = self.ns.exec_json(&["ip", "-j", "addr", "show", "dev", dev]);
        let mut tentative = false;
        let addrs = v[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| {
                tentative |= a["tentative"].as_bool() == Some(true);
                let ip: IpAddr = a["local"].as_str()?.parse().ok()?;
                Some((ip, u8::try_from(a["prefixlen"].as_u64()?).ok()?))
            })
            .collect();
        (addrs, tentative)
    }
}

/// One bridge + host-local network (its own name and host-local dataDir).
struct Net {
    name: String,
    bridge: String,
    subnet: IpNet,
    gateway: IpAddr,
    data_dir: PathBuf,
    ip_masq: bool,
    conf: Value,
}

impl Net {
    fn new(node: &Node, tag: &str, bridge: &str, subnet: &str, ip_masq: bool) -> Net {
        let name = unique_name(tag);
        let subnet: IpNet = subnet.parse().unwrap();
        // network + 1, host-local's default gateway (`hosts()` starts at the
        // network address for IPv6).
        let gateway = match subnet.network() {
            IpAddr::V4(a) => std::net::Ipv4Addr::from(u32::from(a) + 1).into(),
            IpAddr::V6(a) => std::net::Ipv6Addr::from(u128::from(a) + 1).into(),
        };
        let data_dir = node.dir.join(format!("ipam-{tag}"));
        let conf = json!({"cniVersion": "1.0.0", "name": name, "type": "bridge",
            "bridge": bridge, "isGateway": true, "ipMasq": ip_masq,
            "ipam": {"type": "host-local", "dataDir": data_dir, "ranges": [[{"subnet": subnet}]]}});
        Net {
            name,
            bridge: bridge.into(),
            subnet,
            gateway,
            data_dir,
            ip_masq,
            conf,
        }
    }

    /// bridge `cmd` for (`cid`, eth0) in `pod`; `ip`: a requested address (CNI_ARGS).
    fn call(
        &self,
        node: &Node,
        cmd: &str,
        cid: &str,
        pod: &TestNetns,
        ip: Option<IpAddr>,
    ) -> Outcome {
        let mut inv = Invocation::plugin("bridge")
            .in_netns(node.ns.path())
            .command(cmd)
            .path(&[bin_dir()])
            .container_id(cid)
            .netns(pod.path())
            .ifname("eth0")
            .stdin_json(&self.conf);
        if let Some(ip) = ip {
            inv = inv.args(&format!("IP={ip}"));
        }
        inv.run()
    }

    /// host-local's reservations: address → file content.
    fn reservations(&self) -> BTreeMap<IpAddr, String> {
        netns_tests::reservations(&self.data_dir.join(&self.name))
            .into_iter()
            .map(|(ip, owner)| (ip.parse().unwrap(), owner))
            .collect()
    }
}

/// A live attachment: which pod, which network, what it got.
#[derive(Debug, Clone)]
struct Live {
    net: usize,
    pod: usize,
    cid: String,
    ip: IpAddr,
    veth: String,
}

/// One bridge-plugin operation of a mixed phase.
#[derive(Debug, Clone)]
enum Op {
    /// ADD of (`cid`, eth0) in pod #`pod` to network #`net`, asking for `ip` if set.
    Add {
        net: usize,
        pod: usize,
        cid: String,
        ip: Option<IpAddr>,
    },
    Del(Live),
}

impl Op {
    fn add(net: usize, pod: usize, cid: String) -> Op {
        Op::Add {
            net,
            pod,
            cid,
            ip: None,
        }
    }
}

/// What [`run_ops`] saw.
enum Done {
    Added(Live),
    Deleted(Live),
    /// An ADD of a requested address refused with host-local's code 101 (it was
    /// still held): the ADD to undo, as a runtime would, with DEL.
    Refused(Live),
    Failed(String),
}

/// Run `ops` all at once; results in op order.
fn run_ops(node: &Node, nets: &[Net], pods: &[TestNetns], ops: &[Op], t: &mut Tally) -> Vec<Done> {
    t.ops += ops.len();
    race(ops, |op| match op {
        Op::Add { net, pod, cid, ip } => {
            let n = &nets[*net];
            let out = n.call(node, "ADD", cid, &pods[*pod], *ip);
            let as_live = |ip, veth| Live {
                net: *net,
                pod: *pod,
                cid: cid.clone(),
                ip,
                veth,
            };
            if let (1, Some(ip)) = (out.status, ip) {
                let e = out.err();
                let want = format!(
                    "failed to allocate for range 0: requested IP address {ip} is not available in range set "
                );
                return if e.code == 101 && e.msg.starts_with(&want) {
                    Done::Refused(as_live(*ip, String::new()))
                } else {
                    Done::Failed(format!("ADD {cid} of {ip} on {}:\n{out}", n.name))
                };
            }
            if out.status != 0 {
                return Done::Failed(format!("ADD {cid} on {}:\n{out}", n.name));
            }
            let r = out.json();
            let sandbox = pods[*pod].path_str();
            match check_result(&r, "1.0.0", &n.bridge, &sandbox, n.subnet, n.gateway) {
                Ok((got, _)) if ip.is_some_and(|want| want != got) => {
                    Done::Failed(format!("ADD {cid} asked for {ip:?}, got {r}"))
                }
                Ok((got, veth)) => Done::Added(as_live(got, veth)),
                Err(e) => Done::Failed(e),
            }
        }
        Op::Del(live) => {
            let n = &nets[live.net];
            let out = n.call(node, "DEL", &live.cid, &pods[live.pod], None);
            if out.status == 0 && out.stdout.is_empty() {
                Done::Deleted(live.clone())
            } else {
                Done::Failed(format!("DEL {} on {}:\n{out}", live.cid, n.name))
            }
        }
    })
}

/// Apply a phase's outcomes to the live set. Every address the allocator chose goes
/// to `ever`: in these ranges it never wraps, so none may come twice (requested
/// addresses are reused on purpose and not counted). Refused ADDs are returned.
fn settle(
    done: Vec<Done>,
    live: &mut Vec<Live>,
    ever: &mut HashMap<(usize, IpAddr), String>,
    requested: &BTreeSet<String>,
    t: &mut Tally,
) -> Vec<Live> {
    let mut refused = Vec::new();
    for d in done {
        match d {
            Done::Added(l) => {
                if !requested.contains(&l.cid)
                    && let Some(prev) = ever.insert((l.net, l.ip), l.cid.clone())
                {
                    t.duplicates.push(format!(
                        "{} was handed out twice: {prev} and {} (the range never wraps here)",
                        l.ip, l.cid
                    ));
                }
                live.push(l);
            }
            Done::Deleted(l) => live.retain(|x| x.cid != l.cid),
            Done::Refused(l) => refused.push(l),
            Done::Failed(e) => t.wrong.push(e),
        }
    }
    refused
}

/// The node holds exactly `live`'s state: per network its reservations (and
/// masquerade elements), on the shared bridge exactly their veths as ports. Pods
/// in `gone` have no interface left but lo.
fn verify_node(
    node: &Node,
    nets: &[Net],
    pods: &[TestNetns],
    live: &[Live],
    gone: &[usize],
    at: &str,
    t: &mut Tally,
) {
    // No address held twice on one network.
    let mut seen: HashMap<(usize, IpAddr), &str> = HashMap::new();
    for l in live {
        if let Some(other) = seen.insert((l.net, l.ip), &l.cid) {
            t.duplicates
                .push(format!("{at}: {} held by {other} and {}", l.ip, l.cid));
        }
    }
    for (i, net) in nets.iter().enumerate() {
        let want: BTreeMap<IpAddr, String> = live
            .iter()
            .filter(|l| l.net == i)
            .map(|l| (l.ip, format!("{}\r\neth0", l.cid)))
            .collect();
        let have = net.reservations();
        for (ip, owner) in &have {
            match want.get(ip) {
                None => t.leaks.push(format!(
                    "{at}: {}: reservation {ip} ({owner:?}) of no live pod",
                    net.name
                )),
                Some(w) if w != owner => t.wrong.push(format!(
                    "{at}: {}: reservation {ip} holds {owner:?}, not {w:?}",
                    net.name
                )),
                Some(_) => {}
            }
        }
        for ip in want.keys().filter(|ip| !have.contains_key(ip)) {
            t.wrong
                .push(format!("{at}: {}: live {ip} has no reservation", net.name));
        }
        if net.ip_masq {
            verify_masq(node, net, &want, at, t);
        }
    }
    let bridges: BTreeSet<&str> = nets.iter().map(|n| n.bridge.as_str()).collect();
    for bridge in bridges {
        let want: BTreeSet<String> = live
            .iter()
            .filter(|l| nets[l.net].bridge == bridge)
            .map(|l| l.veth.clone())
            .collect();
        let ports = node.ports_settled(bridge, &want);
        for p in ports.difference(&want) {
            t.leaks
                .push(format!("{at}: port {p} of {bridge} belongs to no live pod"));
        }
        for p in want.difference(&ports) {
            t.wrong
                .push(format!("{at}: live veth {p} is not a port of {bridge}"));
        }
    }
    let all: BTreeSet<String> = live.iter().map(|l| l.veth.clone()).collect();
    for v in node.veths().difference(&all) {
        t.leaks.push(format!("{at}: veth {v} on the node"));
    }
    let leftovers = pool(gone, 16, |&p| {
        let links = poll(
            Duration::from_secs(10),
            || pods[p].link_names(),
            |l| l == &["lo"],
        );
        (links != ["lo"]).then(|| format!("{at}: deleted pod #{p} still has {links:?}"))
    });
    t.leaks.extend(leftovers.into_iter().flatten());
}

/// The masquerade maps hold exactly `want`'s addresses, each with its pod's comment.
fn verify_masq(node: &Node, net: &Net, want: &BTreeMap<IpAddr, String>, at: &str, t: &mut Tally) {
    let maps = nft_maps(&node.ns, "inet", "weft_masq");
    let fam = if net.subnet.addr().is_ipv4() {
        "v4"
    } else {
        "v6"
    };
    let ours = |e: &&Elem| {
        e.key
            .parse::<IpAddr>()
            .is_ok_and(|ip| net.subnet.contains(&ip))
    };
    let pods: Vec<&Elem> = maps
        .get(&format!("pods_{fam}"))
        .into_iter()
        .flatten()
        .filter(ours)
        .collect();
    let owners: Vec<&Elem> = maps
        .get(&format!("owners_{fam}"))
        .into_iter()
        .flatten()
        .filter(ours)
        .collect();
    let cid_of = |owner: &String| owner.split("\r\n").next().unwrap_or("").to_string();
    for e in &pods {
        let ip: IpAddr = e.key.parse().unwrap();
        match want.get(&ip) {
            None => t.leaks.push(format!(
                "{at}: masquerade element {} ({:?}) of no live pod",
                e.key, e.comment
            )),
            Some(owner) => {
                let c = owner_comment(&net.name, &cid_of(owner));
                if e.comment.as_deref() != Some(c.as_str()) {
                    t.wrong.push(format!(
                        "{at}: masquerade element {} says {:?}, not {c:?}",
                        e.key, e.comment
                    ));
                }
            }
        }
    }
    for e in owners
        .iter()
        .filter(|e| !want.contains_key(&e.key.parse().unwrap()))
    {
        t.leaks.push(format!(
            "{at}: masquerade owner element {} of no live pod",
            e.key
        ));
    }
    for ip in want.keys() {
        let key = ip.to_string();
        if !pods.iter().any(|e| e.key == key) || !owners.iter().any(|e| e.key == key) {
            t.wrong
                .push(format!("{at}: live {ip} lacks its masquerade elements"));
        }
    }
}

/// Each live pod has its address on eth0 and reaches its gateway (ping).
///
/// Not all at once: every ARP request is flooded to all ~200 ports of the bridge,
/// each copy queued on the CPU's backlog (`net.core.netdev_max_backlog`, 1000), so
/// 200 pods resolving the gateway in the same instant make the kernel drop frames
/// (tens of thousands in `/proc/net/softnet_stat`), and a single `ping -c 1`
/// could lose all its ARP attempts. 8 at a time, each retrying until a reply.
fn verify_pods(nets: &[Net], pods: &[TestNetns], live: &[Live], at: &str, t: &mut Tally) {
    let problems = pool(live, 8, |l| {
        let pod = &pods[l.pod];
        let gw = nets[l.net].gateway.to_string();
        let v = pod.exec_json(&["ip", "-j", "addr", "show", "dev", "eth0"]);
        let has = v[0]["addr_info"].as_array().into_iter().flatten().any(|a| {
            a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) == Some(l.ip)
                && a["prefixlen"].as_u64() == Some(u64::from(nets[l.net].subnet.prefix_len()))
        });
        if !has {
            return Some(format!("{at}: {} lacks {} on eth0: {v}", l.cid, l.ip));
        }
        // Up to 25 echo requests in 5 s, done at the first reply: a frame the
        // kernel drops (see `verify_pods`) is not a reachability failure.
        let ping = pod.exec(&["ping", "-c", "1", "-i", "0.2", "-w", "5", &gw]);
        (!ping.status.success()).then(|| {
            format!(
                "{at}: {} ({}) cannot ping its gateway {gw}: {}",
                l.cid,
                l.ip,
                String::from_utf8_lossy(&ping.stdout)
            )
        })
    });
    t.wrong.extend(problems.into_iter().flatten());
}

// ---------------------------------------------------------------------------------
// 1. One network: 200 parallel ADDs, 100 DELs racing 100 ADDs, address reuse
//    racing the old owner's DEL, 200 parallel DELs
// ---------------------------------------------------------------------------------

/// 200 ADDs at once on one bridge network (with ipMasq, so the masquerade table is
/// built under the race too): 200 distinct addresses, exactly those reserved and
/// masqueraded, 200 ports, every pod reaches the gateway. Then 100 DELs racing 100
/// new ADDs; then 50 DELs each racing an ADD of a new pod asking for (CNI_ARGS
/// `IP=`) the address being deleted: it gets it or is refused with code 101 (and
/// DELed, as a runtime does), and a late DEL of the old pod never removes the new
/// owner's masquerade; then every pod's DEL at once. After each phase the node
/// holds exactly the live pods' state, and at the end nothing.
#[test]
fn two_hundred_parallel_adds_then_mixed_then_all_deleted() {
    let Some(node) = Node::new("cc1") else { return };
    let mut t = Tally::new("one-network");
    // A /23 keeps all 300 allocated ADDs below the wrap of the round-robin
    // allocation, so an address chosen twice is a duplicate.
    let nets = [Net::new(&node, "cc1", "wcc0", "10.120.0.0/23", true)];
    let pods = netns_many(350);
    t.summary("350 pod namespaces made");
    let cid = |p: usize| format!("c{p}");
    let (mut live, mut ever) = (Vec::new(), HashMap::new());
    let mut requested = BTreeSet::new();

    let adds: Vec<Op> = (0..200).map(|p| Op::add(0, p, cid(p))).collect();
    let done = run_ops(&node, &nets, &pods, &adds, &mut t);
    settle(done, &mut live, &mut ever, &requested, &mut t);
    t.checkpoint("200 parallel ADDs");
    assert_eq!(live.len(), 200);
    let (gw_addrs, _) = node.addresses("wcc0");
    assert!(
        gw_addrs.contains(&("10.120.0.1".parse().unwrap(), 23)),
        "{gw_addrs:?}"
    );
    verify_node(&node, &nets, &pods, &live, &[], "200 ADDs", &mut t);
    verify_pods(&nets, &pods, &live, "200 ADDs", &mut t);
    t.checkpoint("state after 200 ADDs");

    // 100 DELs (pods 0..100) interleaved with 100 ADDs (pods 200..300).
    let mut mixed = Vec::new();
    for i in 0..100 {
        mixed.push(Op::Del(live.iter().find(|l| l.pod == i).unwrap().clone()));
        mixed.push(Op::add(0, 200 + i, cid(200 + i)));
    }
    let done = run_ops(&node, &nets, &pods, &mixed, &mut t);
    settle(done, &mut live, &mut ever, &requested, &mut t);
    t.checkpoint("100 DELs racing 100 ADDs");
    assert_eq!(live.len(), 200);
    let gone: Vec<usize> = (0..100).collect();
    verify_node(&node, &nets, &pods, &live, &gone, "mixed", &mut t);
    verify_pods(&nets, &pods, &live, "mixed", &mut t);
    t.checkpoint("state after the mixed phase");

    // Address reuse: pods 100..150 are deleted while pods 300..350 ask for their
    // addresses.
    let mut reuse = Vec::new();
    for i in 0..50 {
        let old = live.iter().find(|l| l.pod == 100 + i).unwrap().clone();
        let new = format!("reuse{i}");
        requested.insert(new.clone());
        reuse.push(Op::Add {
            net: 0,
            pod: 300 + i,
            cid: new,
            ip: Some(old.ip),
        });
        reuse.push(Op::Del(old));
    }
    let done = run_ops(&node, &nets, &pods, &reuse, &mut t);
    let refused = settle(done, &mut live, &mut ever, &requested, &mut t);
    let (got, lost) = (50 - refused.len(), refused.len());
    // The runtime's answer to a failed ADD: DEL it. That must not touch the old
    // owner's (gone) or anyone else's state.
    let undo: Vec<Op> = refused.into_iter().map(Op::Del).collect();
    let done = run_ops(&node, &nets, &pods, &undo, &mut t);
    settle(done, &mut live, &mut ever, &requested, &mut t);
    t.checkpoint(&format!(
        "50 DELs racing ADDs of their addresses ({got} reused, {lost} refused and DELed)"
    ));
    assert_eq!(live.len(), 150 + got);
    let mut gone: Vec<usize> = (100..150).collect();
    let alive: BTreeSet<usize> = live.iter().map(|l| l.pod).collect();
    gone.extend((300..350).filter(|p| !alive.contains(p)));
    verify_node(&node, &nets, &pods, &live, &gone, "reuse", &mut t);
    verify_pods(&nets, &pods, &live, "reuse", &mut t);
    t.checkpoint("state after the reuse phase");

    let n_del = live.len();
    let dels: Vec<Op> = live.iter().cloned().map(Op::Del).collect();
    let done = run_ops(&node, &nets, &pods, &dels, &mut t);
    settle(done, &mut live, &mut ever, &requested, &mut t);
    assert!(live.is_empty());
    let gone: Vec<usize> = (0..350).collect();
    verify_node(&node, &nets, &pods, &live, &gone, "all DELs", &mut t);
    let masq = nft_maps(&node.ns, "inet", "weft_masq");
    let left: Vec<String> = masq
        .iter()
        .flat_map(|(m, es)| es.iter().map(move |e| format!("{m}: {e:?}")))
        .collect();
    t.leaks
        .extend(left.into_iter().map(|e| format!("end: masquerade {e}")));
    assert_eq!(
        ever.len(),
        300,
        "every allocating ADD handed out an address"
    );
    t.checkpoint(&format!(
        "done (200 ADD; 100 DEL + 100 ADD; 50 DEL + 50 ADD of their addresses, \
         {lost} refused + DEL; {n_del} DEL)"
    ));
}

// ---------------------------------------------------------------------------------
// 2. Three networks sharing one bridge
// ---------------------------------------------------------------------------------

/// Three networks (own names, own host-local dataDirs, own IPv6 subnets) on ONE
/// bridge, 60 pods each, ADDs and DELs of all three racing. IPv6 because a Linux
/// bridge can be the gateway of several IPv6 subnets, while bridge (ours and the
/// reference) refuses a second IPv4 gateway address without `forceAddress`.
/// Each network's state stays exact, the bridge keeps every network's gateway while
/// ports remain, and DEL of everything leaves no port and no reservation.
#[test]
fn three_networks_share_one_bridge_under_parallel_add_and_del() {
    let Some(node) = Node::new("cc2") else { return };
    let mut t = Tally::new("shared-bridge");
    let nets: Vec<Net> = (0..3)
        .map(|i| {
            let subnet = format!("fd7c:0:0:{}::/64", i + 1);
            Net::new(&node, &format!("cc2n{i}"), "wcc1", &subnet, false)
        })
        .collect();
    let pods = netns_many(180);
    let pod_of = |net: usize, k: usize| net * 60 + k;
    let cid = |net: usize, k: usize| format!("n{net}-c{k}");
    let (mut live, mut ever) = (Vec::new(), HashMap::new());

    // 30 ADDs per network, all 90 at once.
    let mut first = Vec::new();
    for k in 0..30 {
        for net in 0..3 {
            first.push(Op::add(net, pod_of(net, k), cid(net, k)));
        }
    }
    let done = run_ops(&node, &nets, &pods, &first, &mut t);
    settle(done, &mut live, &mut ever, &BTreeSet::new(), &mut t);
    t.checkpoint("90 parallel ADDs over 3 networks");

    // Per network: 30 more ADDs racing 15 DELs of the first ones (135 at once).
    let mut mixed = Vec::new();
    let mut gone = Vec::new();
    for k in 0..30 {
        for net in 0..3 {
            if k < 15 {
                let l = live.iter().find(|l| l.cid == cid(net, k)).unwrap().clone();
                gone.push(l.pod);
                mixed.push(Op::Del(l));
            }
            mixed.push(Op::add(net, pod_of(net, 30 + k), cid(net, 30 + k)));
        }
    }
    let done = run_ops(&node, &nets, &pods, &mixed, &mut t);
    settle(done, &mut live, &mut ever, &BTreeSet::new(), &mut t);
    t.checkpoint("45 DELs racing 90 ADDs");
    assert_eq!(live.len(), 135);
    verify_node(&node, &nets, &pods, &live, &gone, "mixed", &mut t);
    // The bridge is every network's gateway; once DAD is done pods reach them.
    let (addrs, _) = poll(
        Duration::from_secs(10),
        || node.addresses("wcc1"),
        |(_, tentative)| !tentative,
    );
    for n in &nets {
        if !addrs.contains(&(n.gateway, 64)) {
            t.wrong.push(format!(
                "bridge lacks {}'s gateway {}: {addrs:?}",
                n.name, n.gateway
            ));
        }
    }
    verify_pods(&nets, &pods, &live, "mixed", &mut t);
    t.checkpoint("state after the mixed phase");

    // Everything else at once.
    let dels: Vec<Op> = live.iter().cloned().map(Op::Del).collect();
    let done = run_ops(&node, &nets, &pods, &dels, &mut t);
    settle(done, &mut live, &mut ever, &BTreeSet::new(), &mut t);
    assert!(live.is_empty());
    let gone: Vec<usize> = (0..180).collect();
    verify_node(&node, &nets, &pods, &live, &gone, "all DELs", &mut t);
    if !node.ports("wcc1").is_empty() {
        t.leaks
            .push(format!("ports left: {:?}", node.ports("wcc1")));
    }
    assert_eq!(ever.len(), 180, "every ADD handed out an address");
    t.checkpoint("done (180 ADD, 180 DEL over 3 networks)");
}

// ---------------------------------------------------------------------------------
// 3. portmap: racing for one hostPort, and for distinct ones
// ---------------------------------------------------------------------------------

const NODE_IP: &str = "198.51.100.1";
const CLIENT_IP: &str = "198.51.100.2";
const PM_BRIDGE: &str = "wcc2";
const PM_SUBNET: &str = "10.121.0.0/24";
const CONTAINER_PORT: u16 = 80;

/// A node with an outside client and the shipped bridge → portmap conflist.
struct PmNode {
    node: Node,
    outside: TestNetns,
    name: String,
    driver: Driver,
}

impl PmNode {
    fn new(tag: &str) -> Option<PmNode> {
        let node = Node::new(tag)?;
        let outside = TestNetns::new();
        netns_tests::join(
            &node.ns,
            ("up0", &format!("{NODE_IP}/24")),
            &outside,
            ("up1", &format!("{CLIENT_IP}/24")),
        );
        let name = unique_name(tag);
        let path = netns_tests::workspace_root().join("conf-examples/20-weft-portmap.conflist");
        let mut list: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        list["name"] = json!(name);
        list["plugins"][0]["bridge"] = json!(PM_BRIDGE);
        list["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": PM_SUBNET}]]);
        list["plugins"][0]["ipam"]["dataDir"] = json!(node.dir.join("ipam"));
        list["plugins"][1]["dataDir"] = json!(node.dir.join("portmap"));
        let driver = Driver::from_json(&list, vec![bin_dir()], node.dir.join("cache"))
            .unwrap()
            .in_netns(node.ns.path());
        Some(PmNode {
            node,
            outside,
            name,
            driver,
        })
    }

    fn reservations(&self) -> BTreeMap<IpAddr, String> {
        netns_tests::reservations(&self.node.dir.join("ipam").join(&self.name))
            .into_iter()
            .map(|(ip, owner)| (ip.parse().unwrap(), owner))
            .collect()
    }

    fn records(&self) -> BTreeSet<String> {
        let files = netns_tests::portmap_files(&self.node.dir.join("portmap"));
        files.into_iter().filter(|n| n.ends_with(".json")).collect()
    }

    /// The node holds exactly `winners`' state (cid → (ip, veth, hostPort)): one
    /// reservation, port, portmap record, cache entry, masquerade element and three
    /// hostPort elements (verdict, target, owner) each; pods in `gone` have only lo.
    fn verify(
        &self,
        winners: &BTreeMap<String, (IpAddr, String, u16)>,
        pods: &[TestNetns],
        gone: &[usize],
        at: &str,
        t: &mut Tally,
    ) {
        let want_res: BTreeMap<IpAddr, String> = winners
            .iter()
            .map(|(c, (ip, _, _))| (*ip, format!("{c}\r\neth0")))
            .collect();
        let have_res = self.reservations();
        if have_res != want_res {
            let extra: Vec<_> = have_res
                .iter()
                .filter(|(ip, _)| !want_res.contains_key(ip))
                .collect();
            if extra.is_empty() {
                t.wrong.push(format!(
                    "{at}: reservations {have_res:?}, want {want_res:?}"
                ));
            } else {
                t.leaks
                    .push(format!("{at}: reservations of no winner: {extra:?}"));
            }
        }
        let want_ports: BTreeSet<String> = winners.values().map(|(_, v, _)| v.clone()).collect();
        let ports = self.node.ports_settled(PM_BRIDGE, &want_ports);
        if ports != want_ports {
            t.leaks
                .push(format!("{at}: bridge ports {ports:?}, want {want_ports:?}"));
        }
        let veths = self.node.veths();
        if veths != want_ports {
            t.leaks
                .push(format!("{at}: node veths {veths:?}, want {want_ports:?}"));
        }
        let cached: BTreeSet<String> = self
            .driver
            .cached_attachments()
            .into_iter()
            .map(|c| c.container_id)
            .collect();
        let want_ids: BTreeSet<String> = winners.keys().cloned().collect();
        if cached != want_ids {
            t.leaks.push(format!(
                "{at}: cached results {cached:?}, want {want_ids:?}"
            ));
        }
        if self.records().len() != winners.len() {
            t.leaks.push(format!(
                "{at}: portmap records {:?} for {want_ids:?}",
                self.records()
            ));
        }
        // ipMasq is on in the shipped conflist.
        let masq = nft_maps(&self.node.ns, "inet", "weft_masq");
        let masq_ips: BTreeSet<String> = masq
            .iter()
            .filter(|(m, _)| m.ends_with("_v4"))
            .flat_map(|(_, es)| es.iter().map(|e| e.key.clone()))
            .collect();
        let want_ips: BTreeSet<String> = want_res.keys().map(IpAddr::to_string).collect();
        if masq_ips != want_ips || masq.get("pods_v4").map_or(0, Vec::len) != winners.len() {
            t.leaks.push(format!(
                "{at}: masquerade elements {masq:?}, want {want_ips:?}"
            ));
        }
        // hostPort elements: per winner its verdict (with its comment), target and owner.
        let maps = nft_maps(&self.node.ns, "inet", "weft_portmap");
        let mut want_pm: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (c, (ip, _, port)) in winners {
            let key = format!("tcp . {port}");
            let comment = owner_comment(&self.name, c);
            want_pm
                .entry("ports_v4".into())
                .or_default()
                .insert(format!("{key} [{comment}]"));
            want_pm
                .entry("targets_v4".into())
                .or_default()
                .insert(format!("{key} -> {ip} . {CONTAINER_PORT}"));
            want_pm
                .entry("owners_v4".into())
                .or_default()
                .insert(format!("0.0.0.0 . {key}"));
        }
        // The class sets (one here: IPv4, no hostIP) are shown as "ports_v4".
        let is_class = |m: &str| m.starts_with("pm-") && m.ends_with("-a4");
        let have_pm: BTreeMap<String, BTreeSet<String>> = maps
            .iter()
            .filter(|(_, es)| !es.is_empty())
            .map(|(m, es)| {
                let m = if is_class(m) { "ports_v4" } else { m.as_str() };
                let shown = es.iter().map(|e| match m {
                    "ports_v4" => format!("{} [{}]", e.key, e.comment.as_deref().unwrap_or("")),
                    "targets_v4" => format!("{} -> {}", e.key, e.value),
                    _ => e.key.clone(),
                });
                (m.to_string(), shown.collect())
            })
            .collect();
        if have_pm != want_pm {
            t.leaks.push(format!(
                "{at}: hostPort elements {have_pm:?}, want {want_pm:?}"
            ));
        }
        let leftovers = pool(gone, 16, |&p| {
            let links = poll(
                Duration::from_secs(10),
                || pods[p].link_names(),
                |l| l == &["lo"],
            );
            (links != ["lo"]).then(|| format!("{at}: pod #{p} still has {links:?}"))
        });
        t.leaks.extend(leftovers.into_iter().flatten());
    }
}

fn pm_attachment(cid: &str, pod: &TestNetns, host_port: u16) -> Attachment {
    let mut a = Attachment::new(cid, &pod.path_str(), "eth0");
    a.capability_args.insert(
        "portMappings".into(),
        json!([{"hostPort": host_port, "containerPort": CONTAINER_PORT, "protocol": "tcp"}]),
    );
    a
}

/// A TCP server in a pod on CONTAINER_PORT answering every connection with `answer`,
/// until dropped (the socket must not outlive the test: it would keep the pod's
/// namespace alive).
struct Server {
    stop: std::sync::Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(pod: &TestNetns, answer: String) -> Server {
        // The previous round's listener is closed, but a child another test thread
        // forked meanwhile may hold a copy of it until it execs (close-on-exec):
        // EADDRINUSE is retried for a while.
        let bind = || netns_tests::inside(pod, || TcpListener::bind(("0.0.0.0", CONTAINER_PORT)));
        let l = poll(
            Duration::from_secs(5),
            bind,
            |r| !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse),
        )
        .expect("binding the pod's server");
        l.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.write_all(answer.as_bytes());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return,
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connect from `ns` to `to`: what the server said, or `None` after 3 tries (a
/// dropped SYN under load is not a failure of the mapping; a wrong answer is).
fn tcp_get(ns: &TestNetns, to: &str) -> Option<String> {
    (0..3).find_map(|_| tcp_get_once(ns, to))
}

fn tcp_get_once(ns: &TestNetns, to: &str) -> Option<String> {
    let to: SocketAddr = to.parse().unwrap();
    netns_tests::inside(ns, || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        Some(s)
    })
}

/// The runtime's side of a failed ADD: DEL the attachment (libcni does not, CRI does).
fn del_all(pm: &PmNode, atts: &[Attachment], at: &str, t: &mut Tally) {
    t.ops += atts.len();
    let errs = race(atts, |a| {
        pm.driver
            .del(a)
            .err()
            .map(|e| format!("{at}: DEL {}: {e}", a.container_id))
    });
    t.wrong.extend(errs.into_iter().flatten());
}

/// 5 rounds of 20 pods' conflist ADDs (bridge → portmap) racing for one hostPort:
/// exactly one wins; every loser gets code 104 naming the winner, and once the
/// runtime DELs it nothing of it is left (veth, address, masquerade, hostPort
/// elements, record, cache); the hostPort reaches the winner. Then DEL of the winner
/// leaves the node empty.
#[test]
fn portmap_adds_racing_for_one_host_port_have_exactly_one_winner() {
    const PODS: usize = 20;
    const ROUNDS: u16 = 5;
    let Some(pm) = PmNode::new("cc3") else { return };
    let mut t = Tally::new("portmap-same-port");
    let pods = netns_many(PODS);
    let subnet: IpNet = PM_SUBNET.parse().unwrap();
    let gateway: IpAddr = "10.121.0.1".parse().unwrap();
    let mut ever: BTreeSet<IpAddr> = BTreeSet::new();
    for round in 0..ROUNDS {
        let port = 18000 + round;
        let at = format!("round {round} (hostPort {port})");
        let cids: Vec<String> = (0..PODS).map(|i| format!("r{round}-p{i}")).collect();
        let servers: Vec<Server> = pods
            .iter()
            .zip(&cids)
            .map(|(p, c)| Server::start(p, c.clone()))
            .collect();
        let atts: Vec<Attachment> = (0..PODS)
            .map(|i| pm_attachment(&cids[i], &pods[i], port))
            .collect();
        t.ops += PODS;
        let results: Vec<Result<Value, DriverError>> = race(&atts, |a| pm.driver.add(a));
        let winners: Vec<usize> = (0..PODS).filter(|&i| results[i].is_ok()).collect();
        if winners.len() != 1 {
            t.duplicates.push(format!(
                "{at}: {} winners: {:?}",
                winners.len(),
                winners.iter().map(|&i| &cids[i]).collect::<Vec<_>>()
            ));
            t.checkpoint(&at);
        }
        let w = winners[0];
        let (ip, veth) = check_result(
            results[w].as_ref().unwrap(),
            "1.1.0",
            PM_BRIDGE,
            &pods[w].path_str(),
            subnet,
            gateway,
        )
        .unwrap_or_else(|e| panic!("{at}: {e}"));
        if !ever.insert(ip) {
            // The /24 never wraps in 5 rounds of 20 ADDs.
            t.duplicates.push(format!("{at}: {ip} handed out again"));
        }
        let want_msg = format!(
            "host port already mapped: {port}/tcp (IPv4) is held by {}",
            owner_comment(&pm.name, &cids[w])
        );
        for (i, r) in results.iter().enumerate() {
            let Err(e) = r else { continue };
            let got = e.cni.as_ref().map(|c| (c.code, c.msg.as_str()));
            if got != Some((104, want_msg.as_str())) {
                t.wrong.push(format!("{at}: {} lost with {e:?}", cids[i]));
            }
        }
        t.checkpoint(&format!("{at}: race"));
        // Losers: the runtime DELs what a failed ADD may have left.
        let losers: Vec<Attachment> = (0..PODS)
            .filter(|&i| i != w)
            .map(|i| atts[i].clone())
            .collect();
        del_all(&pm, &losers, &at, &mut t);
        let gone: Vec<usize> = (0..PODS).filter(|&i| i != w).collect();
        let winner = BTreeMap::from([(cids[w].clone(), (ip, veth, port))]);
        pm.verify(&winner, &pods, &gone, &at, &mut t);
        for via in [NODE_IP, "127.0.0.1"] {
            let from = if via == NODE_IP {
                &pm.outside
            } else {
                &pm.node.ns
            };
            let got = tcp_get(from, &format!("{via}:{port}"));
            if got.as_deref() != Some(cids[w].as_str()) {
                t.wrong.push(format!(
                    "{at}: {via}:{port} answered {got:?}, not {}",
                    cids[w]
                ));
            }
        }
        t.checkpoint(&format!("{at}: losers deleted"));
        del_all(&pm, &atts[w..=w], &at, &mut t);
        let all: Vec<usize> = (0..PODS).collect();
        pm.verify(
            &BTreeMap::new(),
            &pods,
            &all,
            &format!("{at}: winner deleted"),
            &mut t,
        );
        t.checkpoint(&format!("{at}: winner deleted"));
        drop(servers);
    }
    t.checkpoint(&format!(
        "done ({ROUNDS} rounds of {PODS} racing ADDs + DELs)"
    ));
}

/// 20 conflist ADDs at once, each for its own hostPort: all win, every hostPort
/// reaches its own pod; 20 DELs at once leave the node empty.
#[test]
fn portmap_adds_racing_for_distinct_host_ports_all_win() {
    const PODS: usize = 20;
    let Some(pm) = PmNode::new("cc4") else { return };
    let mut t = Tally::new("portmap-distinct-ports");
    let pods = netns_many(PODS);
    let subnet: IpNet = PM_SUBNET.parse().unwrap();
    let gateway: IpAddr = "10.121.0.1".parse().unwrap();
    let cids: Vec<String> = (0..PODS).map(|i| format!("d{i}")).collect();
    let port = |i: usize| 19000 + u16::try_from(i).unwrap();
    let servers: Vec<Server> = pods
        .iter()
        .zip(&cids)
        .map(|(p, c)| Server::start(p, c.clone()))
        .collect();
    let atts: Vec<Attachment> = (0..PODS)
        .map(|i| pm_attachment(&cids[i], &pods[i], port(i)))
        .collect();
    t.ops += PODS;
    let results = race(&atts, |a| pm.driver.add(a));
    let mut winners = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(v) => {
                match check_result(v, "1.1.0", PM_BRIDGE, &pods[i].path_str(), subnet, gateway) {
                    Ok((ip, veth)) => {
                        winners.insert(cids[i].clone(), (ip, veth, port(i)));
                    }
                    Err(e) => t.wrong.push(e),
                }
            }
            Err(e) => t.wrong.push(format!("ADD {}: {e:?}", cids[i])),
        }
    }
    let ips: BTreeSet<IpAddr> = winners.values().map(|(ip, _, _)| *ip).collect();
    if ips.len() != winners.len() {
        t.duplicates
            .push(format!("addresses handed out twice: {winners:?}"));
    }
    t.checkpoint("20 parallel ADDs");
    pm.verify(&winners, &pods, &[], "20 ADDs", &mut t);
    let answers = race(&cids, |c| {
        let i = cids.iter().position(|x| x == c).unwrap();
        let got = tcp_get(&pm.outside, &format!("{NODE_IP}:{}", port(i)));
        (got.as_deref() != Some(c.as_str()))
            .then(|| format!("{NODE_IP}:{} answered {got:?}, not {c}", port(i)))
    });
    t.wrong.extend(answers.into_iter().flatten());
    t.checkpoint("every hostPort reaches its pod");
    del_all(&pm, &atts, "DEL all", &mut t);
    let all: Vec<usize> = (0..PODS).collect();
    pm.verify(&BTreeMap::new(), &pods, &all, "20 DELs", &mut t);
    drop(servers);
    t.checkpoint("done (20 ADD, 20 DEL)");
}
