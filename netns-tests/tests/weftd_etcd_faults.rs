//! weftd against etcd faults, end to end: real weftd binaries on multi-node vxlan
//! clusters with pods attached, while etcd is down at start, killed mid-run, loses
//! its leader, is compacted past a stalled watch, or has a lease deleted behind
//! weftd's back. Every test checks that
//!
//! - the data plane keeps working: pods on different nodes ping each other during
//!   and after the fault (and a TCP connection opened before it still carries data);
//! - weftd keeps running, with /readyz and the metrics saying what happened;
//! - the state re-converges: each node's routes, VTEP neighbours and FDB entries
//!   are exactly those the leases in etcd call for;
//! - nothing is duplicated or leaked: one lease per node, distinct subnets, every
//!   etcd lease holding a key, subnet.env unchanged ([`problems`]).
//!
//! Each test prints one `SUMMARY` line: the faults injected and what was checked.
//! Harness: [`netns_tests::weftd_cluster`], [`netns_tests::etcd`].

use netns_tests::weftd_cluster::{
    Cluster, Node, Pod, READY_TIMEOUT, SUBNETS, VXLAN_CONFIG, Weftd, lease_key, lease_value,
    metric, network_addr, peer_route_line, wait_for, wait_ping,
};
use netns_tests::{inside, require_root};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// How long kernel state may take to converge after a change reaches etcd: the
/// watch's reconnect backoff (≤ 5 s) plus a few `--peers-resync 1` periods, with
/// slack for a loaded machine.
const CONVERGE: Duration = Duration::from_secs(30);

/// Flags of every weftd here: compare the kernel with the peer set every second.
const FAST: [&str; 2] = ["--peers-resync", "1"];

// --- starting things ----------------------------------------------------------------

/// weftd on `node` with all of the cluster's etcd endpoints, [`FAST`] and `extra`.
fn spawn(c: &Cluster, node: &Node, extra: &[&str]) -> Weftd {
    let mut args = node.args(&[&FAST[..], extra].concat());
    let i = args
        .iter()
        .position(|a| a == "--etcd-endpoints")
        .expect("--etcd-endpoints in the usual args");
    args[i + 1] = c.endpoints();
    Weftd::spawn(node, &args, &[])
}

/// [`spawn`] on each of `nodes` (1-based), then wait until all are ready and see
/// each other.
fn start_all(c: &Cluster, nodes: &[usize]) -> Vec<Weftd> {
    let mut all: Vec<Weftd> = nodes.iter().map(|&i| spawn(c, c.node(i), &[])).collect();
    for (&i, w) in nodes.iter().zip(&mut all) {
        c.node(i).wait_ready(w);
    }
    let peers = (nodes.len() - 1).to_string();
    for &i in nodes {
        c.node(i).wait_metric("weft_peers", &peers, READY_TIMEOUT);
    }
    all
}

/// One pod on each of `nodes`, `pod-<i>`.
fn pods_on(c: &Cluster, nodes: &[usize]) -> Vec<Pod> {
    nodes
        .iter()
        .map(|&i| c.node(i).add_pod(&format!("pod-{i}")))
        .collect()
}

// --- the leases in etcd -------------------------------------------------------------

/// One lease as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Stored {
    subnet: String,
    public_ip: String,
    vtep_mac: String,
    /// The etcd lease the key is attached to (0: none).
    etcd_lease: i64,
}

/// Every lease under the subnets prefix, by subnet.
fn stored(c: &Cluster) -> Vec<Stored> {
    let mut all: Vec<Stored> = c
        .etcd()
        .get_prefix_leases(SUBNETS)
        .into_iter()
        .map(|(key, value, etcd_lease)| {
            let v: Value = serde_json::from_str(&value)
                .unwrap_or_else(|e| panic!("lease {key} is not JSON ({e}): {value}"));
            Stored {
                subnet: key[SUBNETS.len()..].replace('-', "/"),
                public_ip: v["PublicIP"].as_str().unwrap_or_default().to_string(),
                vtep_mac: v["BackendData"]["VtepMAC"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                etcd_lease,
            }
        })
        .collect();
    all.sort();
    all
}

/// The lease of the node with public IP `ip`; panics unless there is exactly one.
fn lease_of(c: &Cluster, ip: &str) -> Stored {
    let mine: Vec<Stored> = stored(c)
        .into_iter()
        .filter(|s| s.public_ip == ip)
        .collect();
    assert_eq!(mine.len(), 1, "leases of {ip}: {mine:?}");
    mine[0].clone()
}

/// A lease for a node that runs no weft (a flanneld node, say): `subnet` for
/// `public_ip`, attached to an etcd lease of its own (1 h); that lease's ID.
fn foreign_lease(c: &Cluster, subnet: &str, public_ip: &str, mac: &str) -> i64 {
    let id = c.etcd().lease_grant(3600);
    c.etcd()
        .put_with_lease(&lease_key(subnet), &lease_value(public_ip, mac), id);
    id
}

/// weftd's flag for the smallest renew margin (1 min), to go with [`short_lease`].
const RENEW_OFTEN: [&str; 2] = ["--subnet-lease-renew-margin", "1"];

/// The lease of the node with public IP `ip` from "before a restart", `subnet` on
/// a 62 s etcd lease; that lease's ID. weftd on that node takes it over (same
/// public IP, same etcd lease) and with [`RENEW_OFTEN`] renews it every ~2 s
/// (at TTL − 60 s): renewals a test can watch, through the same code path as the
/// daily ones.
fn short_lease(c: &Cluster, subnet: &str, ip: &str) -> i64 {
    let id = c.etcd().lease_grant(62);
    c.etcd().put_with_lease(
        &lease_key(subnet),
        &lease_value(ip, "0e:00:00:00:00:01"),
        id,
    );
    id
}

/// Everything duplicated or leaked, one line each (empty: all fine), given that
/// the nodes `nodes` (1-based) run weftd and `foreign` leases belong to nodes
/// without one: exactly one lease per node with its own public IP and VTEP MAC and
/// the subnet in its subnet.env, distinct subnets and public IPs, every live etcd
/// lease holding a key and every key's etcd lease alive.
fn problems(c: &Cluster, nodes: &[usize], foreign: usize) -> Vec<String> {
    let all = stored(c);
    let mut found = Vec::new();
    if all.len() != nodes.len() + foreign {
        found.push(format!(
            "{} leases for {} nodes and {foreign} foreign leases: {all:?}",
            all.len(),
            nodes.len()
        ));
    }
    for (what, field) in [
        (
            "subnet",
            (|s: &Stored| s.subnet.clone()) as fn(&Stored) -> String,
        ),
        ("public IP", |s: &Stored| s.public_ip.clone()),
    ] {
        let mut seen: Vec<String> = all.iter().map(field).collect();
        seen.sort();
        let total = seen.len();
        seen.dedup();
        if seen.len() != total {
            found.push(format!("a {what} held twice: {all:?}"));
        }
    }
    for &i in nodes {
        let node = c.node(i);
        let mine: Vec<&Stored> = all.iter().filter(|s| s.public_ip == node.ip).collect();
        let want = (node.leased_subnet(), node.vtep_mac());
        match &mine[..] {
            [one] if (one.subnet.clone(), one.vtep_mac.clone()) == want => {}
            _ => found.push(format!(
                "node {}: leases {mine:?}, want one with (subnet, VTEP MAC) {want:?}",
                node.ip
            )),
        }
    }
    let live = c.etcd().lease_list();
    for &id in &live {
        let (ttl, keys) = c.etcd().lease_ttl(id);
        if keys.is_empty() {
            found.push(format!("etcd lease {id} (TTL {ttl}) holds no key: leaked"));
        }
    }
    for s in all.iter().filter(|s| s.etcd_lease != 0) {
        if !live.contains(&s.etcd_lease) {
            found.push(format!("{s:?}: its etcd lease is not alive"));
        }
    }
    found
}

// --- the kernel side ----------------------------------------------------------------

/// weftd's peer entries on a node: sorted lines of `ip route show proto 87`, `ip
/// neigh show dev flannel.1` and `bridge fdb show dev flannel.1`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entries {
    routes: Vec<String>,
    neighbours: Vec<String>,
    fdb: Vec<String>,
}

impl Entries {
    /// What a vxlan node whose subnet is `own` must hold for the leases `leases`
    /// (flanneld's layout).
    fn for_leases(leases: &[Stored], own: &str) -> Entries {
        let mut e = Entries {
            routes: vec![],
            neighbours: vec![],
            fdb: vec![],
        };
        for l in leases.iter().filter(|l| l.subnet != own) {
            let gw = network_addr(&l.subnet);
            e.routes
                .push(peer_route_line(&l.subnet, gw, "flannel.1", true));
            e.neighbours
                .push(format!("{gw} lladdr {} PERMANENT", l.vtep_mac));
            e.fdb
                .push(format!("{} dst {} self permanent", l.vtep_mac, l.public_ip));
        }
        e.routes.sort();
        e.neighbours.sort();
        e.fdb.sort();
        e
    }

    /// What `node` holds now.
    fn of(node: &Node) -> Entries {
        Entries {
            routes: node.weft_routes(),
            neighbours: node.vtep_neighbours(),
            fdb: node.vtep_fdb(),
        }
    }
}

/// Wait until each of `nodes` (1-based) holds exactly the entries the leases in
/// etcd call for; panics with what differs. The number of entries per node.
fn wait_converged(what: &str, c: &Cluster, nodes: &[usize]) -> usize {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let leases = stored(c);
        let diff: Vec<String> = nodes
            .iter()
            .map(|&i| c.node(i))
            .filter_map(|node| {
                let want = Entries::for_leases(&leases, &node.leased_subnet());
                let have = Entries::of(node);
                (have != want).then(|| format!("node {}: want {want:#?}\nhave {have:#?}", node.ip))
            })
            .collect();
        if diff.is_empty() {
            return leases.len().saturating_sub(1);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not converged within {CONVERGE:?} (leases {leases:#?}):\n{}",
            diff.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// --- the data plane -----------------------------------------------------------------

/// Every pod pings every pod on another node, each within two tries: for the
/// middle of a fault, when nothing may break. The number of pings.
fn ping_all_now(pods: &[&Pod]) -> usize {
    let mut n = 0;
    for a in pods {
        for b in pods.iter().filter(|b| b.node != a.node) {
            assert!(
                a.ping(&b.ip) || a.ping(&b.ip),
                "{} (on {}) cannot ping {} (on {}) during the fault",
                a.ip,
                a.node,
                b.ip,
                b.node
            );
            n += 1;
        }
    }
    n
}

/// Every pod reaches every pod on another node (waiting up to 20 s for each).
fn wait_all_ping(pods: &[&Pod]) {
    for a in pods {
        for b in pods.iter().filter(|b| b.node != a.node) {
            wait_ping(a, b);
        }
    }
}

/// A TCP connection between two pods on different nodes, opened before a fault
/// and used after it: the fault must not break established flows.
struct Flow {
    what: String,
    tx: TcpStream,
    rx: TcpStream,
    sent: usize,
}

/// The port [`Flow`] listens on in the receiving pod.
const FLOW_PORT: u16 = 5002;

impl Flow {
    fn open(from: &Pod, to: &Pod) -> Flow {
        let what = format!(
            "TCP flow {} (on {}) → {} (on {})",
            from.ip, from.node, to.ip, to.node
        );
        let listener = inside(&to.ns, || TcpListener::bind(("0.0.0.0", FLOW_PORT)))
            .unwrap_or_else(|e| panic!("{what}: listening: {e}"));
        let dst = format!("{}:{FLOW_PORT}", to.ip).parse().unwrap();
        let tx = inside(&from.ns, || {
            TcpStream::connect_timeout(&dst, Duration::from_secs(10))
        })
        .unwrap_or_else(|e| panic!("{what}: connecting: {e}"));
        let (rx, _) = listener.accept().expect("accept");
        let timeout = Some(Duration::from_secs(30));
        tx.set_write_timeout(timeout).unwrap();
        rx.set_read_timeout(timeout).unwrap();
        let mut flow = Flow {
            what,
            tx,
            rx,
            sent: 0,
        };
        flow.check(1024);
        flow
    }

    /// Send `len` bytes one way; panics unless they all arrive unchanged.
    fn check(&mut self, len: usize) {
        let data: Vec<u8> = (0..len).map(|i| (i + self.sent) as u8 ^ 0x5a).collect();
        let mut got = vec![0u8; len];
        let (tx, rx) = (&mut self.tx, &mut self.rx);
        let (written, read) = std::thread::scope(|s| {
            let writer = s.spawn(|| tx.write_all(&data));
            let read = rx.read_exact(&mut got);
            (writer.join().expect("writer thread"), read)
        });
        assert!(
            written.is_ok() && read.is_ok(),
            "{}: write {written:?}, read {read:?}",
            self.what
        );
        assert!(got == data, "{}: the bytes arrived changed", self.what);
        self.sent += len;
    }
}

// --- weftd's side -------------------------------------------------------------------

/// Sample `name` of `node`'s /metrics as a number.
fn sample(node: &Node, name: &str) -> u64 {
    let m = node.metrics();
    metric(&m, name)
        .unwrap_or_else(|| panic!("no {name} in /metrics of {}: {m}", node.ip))
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Wait until sample `name` of `node` is at least `min`; its value.
fn wait_sample_at_least(node: &Node, name: &str, min: u64, timeout: Duration) -> u64 {
    wait_for(&format!("{name} ≥ {min} on {}", node.ip), timeout, || {
        let v = sample(node, name);
        (v >= min).then_some(v)
    })
}

/// The healthy, serving state of a node whose lease is in place: /healthz and
/// /readyz 200, lease held, weftd running.
fn assert_serving(node: &Node, weftd: &mut Weftd) {
    weftd.assert_running();
    assert_eq!(node.http("/healthz").0, 200, "/healthz of {}", node.ip);
    assert_eq!(node.http("/readyz").0, 200, "/readyz of {}", node.ip);
    let m = node.metrics();
    assert_eq!(metric(&m, "weft_ready").as_deref(), Some("1"), "{m}");
    assert_eq!(metric(&m, "weft_lease_held").as_deref(), Some("1"), "{m}");
}

/// How many lines of `log` contain `needle`.
fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The final verdict of a test: print its summary and the number of duplicates and
/// leaks found, then assert there were none.
fn verdict(test: &str, started: Instant, faults: &str, checked: &str, found: Vec<String>) {
    eprintln!(
        "SUMMARY {test}: {:.1} s; faults: {faults}; checked: {checked}; duplicates/leaks found: {}",
        started.elapsed().as_secs_f64(),
        found.len()
    );
    assert!(
        found.is_empty(),
        "{test}: duplicates or leaks:\n{}",
        found.join("\n")
    );
}

// --- tests --------------------------------------------------------------------------

#[test]
fn etcd_down_at_start_waits_then_leases() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::new(2, VXLAN_CONFIG);
    c.etcd_mut().stop(0);
    let mut ws: Vec<Weftd> = (1..=2).map(|i| spawn(&c, c.node(i), &[])).collect();

    // Waiting: alive, not ready, no lease, no subnet.env, one clear log line.
    for (node, w) in c.nodes.iter().zip(&mut ws) {
        wait_for("the health server", READY_TIMEOUT, || {
            w.assert_running();
            (node.http("/healthz").0 == 200).then_some(())
        });
    }
    let waiting = Instant::now();
    let mut polls = 0;
    while waiting.elapsed() < Duration::from_secs(3) {
        for (node, w) in c.nodes.iter().zip(&mut ws) {
            w.assert_running();
            assert_eq!(node.http("/readyz"), (503, "not ready\n".into()));
            assert_eq!(node.http("/healthz").0, 200);
            polls += 1;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for (node, w) in c.nodes.iter().zip(&ws) {
        let m = node.metrics();
        for (name, value) in [("weft_ready", "0"), ("weft_lease_held", "0")] {
            assert_eq!(metric(&m, name).as_deref(), Some(value), "{name}: {m}");
        }
        assert!(node.subnet_env().is_none(), "subnet.env before the lease");
        let log = w.log();
        assert_eq!(
            count(&log, "WARN"),
            1,
            "one warning while etcd is down, not one per retry:\n{log}"
        );
        assert!(
            log.contains("waiting for") && log.contains("retrying every second"),
            "says it waits:\n{log}"
        );
        assert!(log.contains("10.77.0.100:2379"), "names etcd:\n{log}");
        if node.ip == "10.77.0.1" {
            let line = log.lines().find(|l| l.contains("WARN")).unwrap_or_default();
            eprintln!("while etcd is down: {line}");
        }
    }
    assert!(!c.etcd().health(0), "etcd is down");

    // etcd comes back: both lease, distinct subnets, pods talk.
    c.etcd_mut().start_again(0);
    let back = Instant::now();
    for (node, w) in c.nodes.iter().zip(&mut ws) {
        node.wait_ready(w);
    }
    let ready_after = back.elapsed();
    for (node, w) in c.nodes.iter().zip(&mut ws) {
        node.wait_metric("weft_peers", "1", READY_TIMEOUT);
        assert_serving(node, w);
        assert_eq!(sample(node, "weft_lease_acquisitions_total"), 1);
    }
    let envs: Vec<String> = c.nodes.iter().map(|n| n.subnet_env().unwrap()).collect();
    let pods = pods_on(&c, &[1, 2]);
    let pods: Vec<&Pod> = pods.iter().collect();
    wait_all_ping(&pods);
    let entries = wait_converged("after etcd came up", &c, &[1, 2]);
    for (node, (w, env)) in c.nodes.iter().zip(ws.iter_mut().zip(&envs)) {
        assert_serving(node, w);
        assert_eq!(node.subnet_env().as_ref(), Some(env));
    }
    verdict(
        "etcd_down_at_start_waits_then_leases",
        started,
        "etcd stopped before 2 weftd started, started again after 3 s",
        &format!(
            "{polls} /readyz polls 503 while down, one WARN per node, ready {ready_after:.1?} \
             after etcd, {entries} peers programmed on each node, pods ping both ways"
        ),
        problems(&c, &[1, 2], 0),
    );
}

#[test]
fn etcd_killed_mid_run_then_back_converges_without_duplicates() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::new_members(3, 3, VXLAN_CONFIG);
    // Node 1 renews every ~2 s: its renewals fail during the outage and must
    // resume soon after it (not a minute later).
    let short = short_lease(&c, "10.244.61.0/24", "10.77.0.1");
    let mut ws = vec![
        spawn(&c, c.node(1), &RENEW_OFTEN),
        spawn(&c, c.node(2), &[]),
    ];
    for (i, w) in (1..=2).zip(&mut ws) {
        c.node(i).wait_ready(w);
    }
    assert_eq!(lease_of(&c, "10.77.0.1").etcd_lease, short);
    wait_sample_at_least(
        c.node(1),
        "weft_lease_renewals_total",
        1,
        Duration::from_secs(10),
    );
    let pods = pods_on(&c, &[1, 2]);
    let [p1, p2] = [&pods[0], &pods[1]];
    wait_all_ping(&[p1, p2]);
    wait_converged("before the outage", &c, &[1, 2]);
    let envs: Vec<String> = (1..=2).map(|i| c.node(i).subnet_env().unwrap()).collect();
    let before: Vec<Stored> = stored(&c);
    let mut flow = Flow::open(p1, p2);

    // kill -9 every member; a third node starts while etcd is down; a route is
    // deleted by hand on node 1 (the periodic resync needs no etcd).
    for m in 0..3 {
        c.etcd_mut().kill(m);
    }
    let outage = Instant::now();
    let mut w3 = spawn(&c, c.node(3), &[]);
    let s2 = c.node(2).leased_subnet();
    c.node(1).ns.exec_ok(&["ip", "route", "del", &s2]);
    wait_for(
        "the hand-deleted route to come back, etcd down",
        Duration::from_secs(10),
        || {
            let routes = c.node(1).weft_routes();
            routes.iter().any(|r| r.starts_with(&s2)).then_some(())
        },
    );
    let repaired = outage.elapsed();
    let (mut pings, mut polls) = (0, 0);
    // Down for 4 s: several resync periods, and the watch backs off to its limit.
    while outage.elapsed() < Duration::from_secs(4) {
        for (i, w) in [1, 2].into_iter().zip(&mut ws) {
            assert_serving(c.node(i), w);
            assert_eq!(c.node(i).subnet_env().as_ref(), Some(&envs[i - 1]));
        }
        w3.assert_running();
        assert_ne!(
            c.node(3).http("/readyz").0,
            200,
            "node 3 ready without etcd"
        );
        polls += 1;
        pings += ping_all_now(&[p1, p2]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let down_for = outage.elapsed();
    let renew_errors = sample(c.node(1), "weft_lease_errors_total");
    assert!(
        renew_errors > 0,
        "node 1's renewals failed during the outage"
    );
    let renewals = sample(c.node(1), "weft_lease_renewals_total");

    // All members back (a quorum is needed before any is healthy).
    c.etcd_mut().start_again_no_wait(0);
    c.etcd_mut().start_again_no_wait(1);
    c.etcd_mut().start_again(2);
    c.etcd_mut().wait_all_healthy();
    c.etcd().wait_leader(Duration::from_secs(10));
    let back = Instant::now();
    c.node(3).wait_ready(&mut w3);
    ws.push(w3);
    for i in 1..=3 {
        c.node(i).wait_metric("weft_peers", "2", CONVERGE);
    }
    let seen_after = back.elapsed();
    wait_sample_at_least(
        c.node(1),
        "weft_lease_renewals_total",
        renewals + 1,
        CONVERGE,
    );
    let renewing_after = back.elapsed();
    let p3 = c.node(3).add_pod("pod-3");
    wait_all_ping(&[p1, p2, &p3]);
    let entries = wait_converged("after the outage", &c, &[1, 2, 3]);
    flow.check(64 * 1024);

    // Nodes 1 and 2 kept their subnets, their etcd leases and subnet.env, and
    // leased once.
    let after = stored(&c);
    for old in &before {
        assert!(after.contains(old), "{old:?} changed: {after:?}");
    }
    assert_eq!(
        lease_of(&c, "10.77.0.1").etcd_lease,
        short,
        "renewed, not re-granted"
    );
    for (i, w) in (1..=3).zip(&mut ws) {
        let node = c.node(i);
        assert_serving(node, w);
        assert_eq!(
            sample(node, "weft_lease_acquisitions_total"),
            1,
            "{}",
            node.ip
        );
        if i < 3 {
            assert_eq!(node.subnet_env().as_ref(), Some(&envs[i - 1]));
        }
    }
    verdict(
        "etcd_killed_mid_run_then_back_converges_without_duplicates",
        started,
        &format!(
            "SIGKILL of all 3 etcd members for {down_for:.1?}, a node started during the \
             outage, a peer route deleted by hand during it"
        ),
        &format!(
            "{pings} pod pings and {polls} /readyz+metrics polls on 2 nodes during the outage, \
             the route repaired {repaired:.1?} into the outage, the new node seen everywhere \
             {seen_after:.1?} after etcd, {renew_errors} failed renewals on node 1 and renewing \
             again {renewing_after:.1?} after etcd, a TCP flow across the outage, {entries} \
             peers programmed on each node, leases and subnet.env unchanged"
        ),
        problems(&c, &[1, 2, 3], 0),
    );
}

#[test]
fn leader_loss_in_a_three_member_cluster() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let mut c = Cluster::new_members(3, 3, VXLAN_CONFIG);
    // Node 1 renews every ~2 s; renewals must go on across the leader loss.
    let seeded = "10.244.61.0/24";
    let short = short_lease(&c, seeded, "10.77.0.1");
    let mut w1 = spawn(&c, c.node(1), &RENEW_OFTEN);
    let mut w2 = spawn(&c, c.node(2), &[]);
    c.node(1).wait_ready(&mut w1);
    c.node(2).wait_ready(&mut w2);
    assert_eq!(c.node(1).leased_subnet(), seeded);
    assert_eq!(lease_of(&c, "10.77.0.1").etcd_lease, short);
    wait_sample_at_least(
        c.node(1),
        "weft_lease_renewals_total",
        2,
        Duration::from_secs(10),
    );
    let pods = pods_on(&c, &[1, 2]);
    let [p1, p2] = [&pods[0], &pods[1]];
    wait_all_ping(&[p1, p2]);
    wait_converged("before the leader loss", &c, &[1, 2]);
    let envs: Vec<String> = (1..=2).map(|i| c.node(i).subnet_env().unwrap()).collect();
    let mut flow = Flow::open(p2, p1);

    // Node 3 starts, and the leader is killed under its first lease requests.
    let leader = c.etcd().wait_leader(Duration::from_secs(10));
    let mut w3 = spawn(&c, c.node(3), &[]);
    c.etcd_mut().kill(leader);
    let killed = Instant::now();
    let renewals = sample(c.node(1), "weft_lease_renewals_total");
    let mut pings = 0;
    while killed.elapsed() < Duration::from_secs(3) {
        for (i, w) in [(1, &mut w1), (2, &mut w2)] {
            assert_serving(c.node(i), w);
        }
        w3.assert_running();
        pings += ping_all_now(&[p1, p2]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let new_leader = c.etcd().wait_leader(Duration::from_secs(10));
    c.node(3).wait_ready(&mut w3);
    let node3_ready = killed.elapsed();
    // Renewals go on against the surviving members.
    let renewed = wait_sample_at_least(
        c.node(1),
        "weft_lease_renewals_total",
        renewals + 3,
        CONVERGE,
    );
    let renew_errors = sample(c.node(1), "weft_lease_errors_total");
    let p3 = c.node(3).add_pod("pod-3");
    wait_all_ping(&[p1, p2, &p3]);
    let entries = wait_converged("after the leader loss", &c, &[1, 2, 3]);
    flow.check(64 * 1024);
    assert_eq!(
        problems(&c, &[1, 2, 3], 0),
        Vec::<String>::new(),
        "with the old leader down"
    );

    // The killed member comes back and catches up; a peer change made now (node
    // 2's lease deleted, which node 2 puts back) reaches every node.
    c.etcd_mut().start_again(leader);
    c.etcd_mut().wait_all_healthy();
    let s3 = c.node(3).leased_subnet();
    assert_eq!(
        c.etcd().get_from(leader, &lease_key(&s3)),
        Some(c.node(3).lease_value()),
        "the restarted member has node 3's lease"
    );
    let s2 = c.node(2).leased_subnet();
    assert!(c.etcd().delete(&lease_key(&s2)));
    wait_for("node 2's lease to be back", CONVERGE, || {
        c.etcd().get(&lease_key(&s2))
    });
    wait_converged("after the member's restart", &c, &[1, 2, 3]);
    wait_all_ping(&[p1, p2, &p3]);
    flow.check(64 * 1024);
    for (i, w) in [(1, &mut w1), (2, &mut w2), (3, &mut w3)] {
        assert_serving(c.node(i), w);
        if i < 3 {
            assert_eq!(c.node(i).subnet_env().as_ref(), Some(&envs[i - 1]));
        }
    }
    assert_eq!(
        lease_of(&c, "10.77.0.1").etcd_lease,
        short,
        "node 1 renewed, not re-granted"
    );
    verdict(
        "leader_loss_in_a_three_member_cluster",
        started,
        &format!(
            "SIGKILL of the etcd leader (member {leader}; member {new_leader} took over) just \
             after node 3's weftd started, then the member restarted and node 2's lease deleted"
        ),
        &format!(
            "{pings} pod pings during the election, node 3 ready {node3_ready:.1?} after the \
             kill, node 1's renewals {renewals} → {renewed} against the survivors \
             ({renew_errors} failed), {entries} peers programmed on each node, a TCP flow \
             across it, subnet.env unchanged"
        ),
        problems(&c, &[1, 2, 3], 0),
    );
}

#[test]
fn compaction_past_a_stalled_watch_makes_weftd_relist() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let c = Cluster::new(3, VXLAN_CONFIG);
    let mut ws = start_all(&c, &[1, 2, 3]);
    let pods = pods_on(&c, &[1, 2, 3]);
    let pods: Vec<&Pod> = pods.iter().collect();
    wait_all_ping(&pods);
    wait_converged("before the stall", &c, &[1, 2, 3]);
    let n1 = c.node(1);
    let env1 = n1.subnet_env().unwrap();
    let resyncs = sample(n1, "weft_resyncs_total");

    // Node 1's weftd stalls (SIGSTOP) and its connection to etcd breaks (ss -K):
    // it sees nothing of what follows. Node 3 leaves (weftd stopped, its etcd
    // lease revoked, as when it expires), a foreign node joins, another key
    // churns, and etcd is compacted to the head: the revision node 1's watch must
    // resume from is gone.
    ws[0].signal(libc::SIGSTOP);
    let cut = n1
        .ns
        .exec_ok(&["ss", "-K", "-t", "dst", "10.77.0.100", "dport", "=", "2379"]);
    let cut = cut.lines().filter(|l| l.contains("10.77.0.100")).count();
    assert!(cut > 0, "no connection of node 1 to etcd to cut");
    let s3 = lease_of(&c, &c.node(3).ip);
    assert_eq!(ws[2].terminate().code(), Some(0));
    c.etcd().lease_revoke(s3.etcd_lease);
    assert_eq!(c.etcd().get(&lease_key(&s3.subnet)), None);
    foreign_lease(&c, "10.244.250.0/24", "10.77.0.50", "0e:77:00:00:00:50");
    for k in 0..50 {
        c.etcd().put("/weft-test/churn", &k.to_string());
    }
    wait_converged("node 2, which watched all along", &c, &[2]);
    let revision = c.etcd().revision();
    c.etcd().compact(revision);
    let mut pings = ping_all_now(&pods[..2]);
    ws[0].signal(libc::SIGCONT);
    let woke = Instant::now();

    n1.wait_metric("weft_resyncs_total", &(resyncs + 1).to_string(), CONVERGE);
    let relisted = woke.elapsed();
    let entries = wait_converged("node 1 after the re-list", &c, &[1, 2]);
    pings += ping_all_now(&pods[..2]);
    // Re-listed once, not in a loop (flanneld < v0.28.7 loops here).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sample(n1, "weft_resyncs_total"), resyncs + 1);
    let log = ws[0].log();
    assert!(
        log.lines()
            .any(|l| l.contains("lease snapshot") && l.contains("gone=1")),
        "node 1 logs the re-list and the peer gone:\n{log}"
    );
    assert_serving(n1, &mut ws[0]);
    assert_serving(c.node(2), &mut ws[1]);
    assert_eq!(n1.subnet_env().as_deref(), Some(env1.as_str()));
    assert_eq!(sample(n1, "weft_lease_acquisitions_total"), 1);
    verdict(
        "compaction_past_a_stalled_watch_makes_weftd_relist",
        started,
        &format!(
            "node 1's weftd SIGSTOPped and {cut} connection(s) of it to etcd cut (ss -K), \
             then a node left, a foreign node joined, 50 puts churned, etcd compacted to \
             revision {revision}, SIGCONT"
        ),
        &format!(
            "node 1 re-listed once {relisted:.1?} after waking, {entries} peers programmed on \
             each node, {pings} pod pings, subnet.env unchanged"
        ),
        problems(&c, &[1, 2], 1),
    );
}

#[test]
fn a_lease_deleted_behind_weftds_back_comes_back_with_the_same_subnet() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let c = Cluster::new(3, VXLAN_CONFIG);
    let mut ws = start_all(&c, &[1, 2, 3]);
    let pods = pods_on(&c, &[1, 2, 3]);
    let pods: Vec<&Pod> = pods.iter().collect();
    wait_all_ping(&pods);
    wait_converged("at the start", &c, &[1, 2, 3]);
    let envs: Vec<String> = c.nodes.iter().map(|n| n.subnet_env().unwrap()).collect();
    let before = stored(&c);
    let mut flow = Flow::open(pods[1], pods[0]);
    let n1 = c.node(1);
    let s1 = n1.leased_subnet();
    let key1 = lease_key(&s1);
    let mine = lease_of(&c, &n1.ip);

    // 1. Node 1's key deleted: back with the same subnet, under the same etcd lease
    //    (deleting a key does not revoke its lease).
    assert!(c.etcd().delete(&key1));
    wait_for("node 1's lease to be back", CONVERGE, || {
        c.etcd().get(&key1)
    });
    assert_eq!(lease_of(&c, &n1.ip), mine);
    wait_converged("after the key was deleted", &c, &[1, 2, 3]);
    wait_all_ping(&pods);
    flow.check(64 * 1024);
    n1.wait_metric("weft_lease_acquisitions_total", "2", CONVERGE);

    // 2. Its etcd lease revoked (what expiry does; the key goes with it): back with
    //    the same subnet under one fresh etcd lease; the old one is gone.
    c.etcd().lease_revoke(mine.etcd_lease);
    let again = wait_for("node 1's lease to be back after a revoke", CONVERGE, || {
        stored(&c)
            .into_iter()
            .find(|s| s.public_ip == n1.ip && s.etcd_lease != mine.etcd_lease)
    });
    assert_eq!(again.subnet, s1);
    let (ttl, keys) = c.etcd().lease_ttl(again.etcd_lease);
    assert!((86_000..=86_400).contains(&ttl), "TTL {ttl}");
    assert_eq!(keys, std::slice::from_ref(&key1));
    wait_converged("after the etcd lease was revoked", &c, &[1, 2, 3]);
    wait_all_ping(&pods);
    n1.wait_metric("weft_lease_acquisitions_total", "3", CONVERGE);

    // 3. Every lease deleted at once: each node puts its own back.
    assert_eq!(c.etcd().delete_prefix(SUBNETS), 3);
    wait_for("all three leases back", CONVERGE, || {
        (stored(&c).len() == 3).then_some(())
    });
    let entries = wait_converged("after all leases were deleted", &c, &[1, 2, 3]);
    wait_all_ping(&pods);
    flow.check(64 * 1024);

    let after = stored(&c);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(
            (&old.subnet, &old.public_ip, &old.vtep_mac),
            (&new.subnet, &new.public_ip, &new.vtep_mac),
            "same subnets, same owners"
        );
    }
    for (i, w) in (1..=3).zip(&mut ws) {
        let node = c.node(i);
        assert_serving(node, w);
        assert_eq!(
            node.subnet_env().as_ref(),
            Some(&envs[i - 1]),
            "{}",
            node.ip
        );
        assert!(
            w.log().contains("our lease was deleted from the store"),
            "{}",
            node.ip
        );
    }
    let acquisitions: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| sample(n, "weft_lease_acquisitions_total"))
        .collect();
    assert_eq!(acquisitions, [4, 2, 2]);
    verdict(
        "a_lease_deleted_behind_weftds_back_comes_back_with_the_same_subnet",
        started,
        "node 1's key deleted, node 1's etcd lease revoked, all 3 keys deleted at once",
        &format!(
            "same subnets and owners each time, same etcd lease after a delete and one fresh \
             lease after the revoke, acquisitions {acquisitions:?}, {entries} peers \
             programmed on each node, pods ping, a TCP flow across all three, subnet.env unchanged"
        ),
        problems(&c, &[1, 2, 3], 0),
    );
}

/// Regression (the leader-loss test found it): with one member of three down, its
/// port refusing connections, no RPC of the etcd lease source may fail. tonic's
/// balancer keeps the dead endpoint in the rotation: the first request on its old
/// connection fails ("broken pipe") and so does each one it hands it later ("tcp
/// connect error"), at once; 22 to 29 of these 80 RPCs failed that way, and weftd
/// waited a minute after a failed renewal. The source now makes such an attempt
/// again, on the balancer's next pick. A follower is killed, so there is no
/// election to excuse a failure.
#[test]
fn no_lease_rpc_fails_while_one_member_of_three_is_down() {
    use weft_core::lease::etcd::{EtcdOptions as Connect, EtcdSource};
    use weft_core::lease::{AcquireRequest, LeaseAttrs, LeaseSource};
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let mut etcd = netns_tests::etcd::EtcdCluster::start(netns_tests::etcd::EtcdOptions {
        members: 3,
        ..Default::default()
    });
    etcd.put("/coreos.com/network/config", VXLAN_CONFIG);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let opts = Connect {
        endpoints: etcd.endpoints(),
        prefix: "/coreos.com/network".into(),
        ..Default::default()
    };
    let req = AcquireRequest {
        attrs: LeaseAttrs {
            public_ip: "10.77.0.1".parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(
                serde_json::json!({"VNI": 1, "VtepMAC": "0e:00:00:00:00:01"}).into(),
            ),
            backend_v6_data: None,
        },
        previous_v4: None,
        previous_v6: None,
    };
    let (mut src, config, mut lease) = rt.block_on(async {
        let mut src = EtcdSource::connect(&opts).await.unwrap();
        let config = src.network_config().await.unwrap();
        let lease = src.acquire(&config, &req).await.unwrap();
        (src, config, lease)
    });
    let follower = (etcd.wait_leader(Duration::from_secs(10)) + 1) % 3;
    etcd.kill(follower);
    const ROUNDS: usize = 20;
    let failed: Vec<String> = rt.block_on(async {
        let mut failed = Vec::new();
        for round in 0..ROUNDS {
            match src.renew(&lease).await {
                Ok(l) => lease = l,
                Err(e) => failed.push(format!("renewal {round}: {e}")),
            }
            if let Err(e) = src.list().await {
                failed.push(format!("listing {round}: {e}"));
            }
            if let Err(e) = src.network_config().await {
                failed.push(format!("config {round}: {e}"));
            }
            // The same node again: takes over its own lease.
            match src.acquire(&config, &req).await {
                Ok(again) if again.key == lease.key => {}
                other => failed.push(format!("acquisition {round}: {other:?}")),
            }
        }
        failed
    });
    assert_eq!(etcd.lease_list(), [lease.etcd_lease], "one etcd lease");
    verdict(
        "no_lease_rpc_fails_while_one_member_of_three_is_down",
        started,
        &format!("SIGKILL of etcd member {follower} (a follower) of 3"),
        &format!(
            "{ROUNDS} rounds of renew + list + config + acquire against all 3 endpoints: {} failed",
            failed.len()
        ),
        failed,
    );
}
