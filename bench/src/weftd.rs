//! weftd rows: the agent against a real etcd, timed until the kernel holds what the
//! peers need. There is no flanneld binary here, so these rows have no reference
//! column; the flanneld figures of `reference/flannel.md` §7 are printed as notes.
//!
//! Topology (netns-tests' `weftd.rs`, one node): an "underlay" namespace holds a
//! bridge `br0` with 10.77.255.254/16 and etcd listening there; each iteration gets
//! a fresh "node" namespace whose `eth0` (10.77.0.1/16) is a veth port of `br0`,
//! so every run is a cold start with an empty kernel. The network is 10.0.0.0/8
//! with /24 subnets; peer `k` holds `10.(1+k/256).(k%256).0/24`, public IP
//! `10.77.(1+k/250).(1+k%250)` (on the node's link) and VTEP MAC
//! `0a:77:00:kk:kk:kk`. weftd itself leases from 10.0.1.0 up, below every peer.
//!
//! Completion is seen, not polled: [`Watcher`] timestamps the kernel's
//! announcement of each expected route, neighbour and FDB entry (within 2 ms); a
//! dump confirms the counts afterwards.
//!
//! Cleanup: weftd and etcd die with the main thread (`PR_SET_PDEATHSIG`), each
//! namespace with its owner process; on errors every value here is dropped on
//! the way out, which stops weftd and tears the namespaces down.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use netns_tests::etcd::{ETCD_BIN, EtcdCluster, EtcdOptions};
use netns_tests::{TestNetns, die_with_thread, netns_command};
use weft_core::backend::{DataPlane, ExtLink, Kind, PeerState, ROUTE_PROTOCOL, plan};
use weft_core::lease::{Lease, LeaseAttrs, NetworkConfig, SubnetKey};
use weft_core::netlink::Netlink;
use weft_core::netns::NetNs;

use crate::harness::check_interrupted;
use crate::nlwatch::{Expected, Timeline, Watcher};

const UNDERLAY_IP: &str = "10.77.255.254";
const ENDPOINT: &str = "http://10.77.255.254:2379";
const NODE_ADDR: &str = "10.77.0.1/16";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CONFIG_KEY: &str = "/coreos.com/network/config";
const SUBNETS: &str = "/coreos.com/network/subnets/";
const CONFIG: &str = r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;
/// Puts per etcd transaction when pre-loading (etcd's --max-txn-ops is 128).
const TXN_OPS: usize = 100;
/// Leases added, one put each, in the events row.
const EVENTS: usize = 1_000;
/// Puts in flight at once in the events row: enough to outrun the agent.
const WRITERS: usize = 64;
/// How long convergence may take before the row fails.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// flanneld v0.20.2 as measured for the reference doc (§7); not run here.
pub const FLANNELD_COLD: &str = "flanneld v0.20.2 (reference/flannel.md §7, measured there, \
     not here): 2,000 peers from cold start in 1.35 s; RSS 36 MB with 3 peers, 41.8 MB with \
     2,000 (36-58 MB); target: 10,000 peers < 1 s and < 15 MB";
pub const FLANNELD_PACED: &str = "flanneld: no paced figure in the reference doc; its \
     3,000 leases at about 480/s were never all programmed (watch bug)";
pub const FLANNELD_EVENTS: &str = "flanneld v0.20.2 (reference/flannel.md §7): 3,000 leases \
     inserted at about 480/s; only 1,681 programmed after 74 s (watch bug)";
pub const FLOOR: &str = "not a weftd run: weft_core's DataPlane writing the same entries \
     straight into a fresh namespace (no etcd, no process start): the kernel's share";

/// One timed sample of a weftd row.
pub struct Sample {
    pub elapsed: Duration,
    /// More figures of the same run: (label, value, unit), summarized by median.
    pub figures: Vec<(&'static str, f64, &'static str)>,
}

/// A weftd row: run by itself, without a reference side.
pub struct Solo {
    pub run: fn(&mut Env, usize) -> Result<Sample>,
    /// At most this many timed iterations (each takes seconds).
    pub max_iterations: usize,
    /// What flanneld did, printed under the table.
    pub reference: &'static str,
}

/// The underlay with etcd, shared by all weftd rows. Fields drop in order: etcd
/// before the namespace it lives in.
pub struct Env {
    etcd: EtcdCluster,
    underlay_nl: Netlink,
    underlay: TestNetns,
    weftd: PathBuf,
    scratch: PathBuf,
    /// Peer leases in etcd now.
    loaded: Option<usize>,
    nodes: usize,
}

impl Env {
    /// The underlay netns, its bridge and etcd (≈1 s).
    pub fn new(bin_dir: &Path, scratch: &Path) -> Result<Env> {
        let weftd = bin_dir.join("weftd");
        ensure!(
            weftd.is_file(),
            "weftd not found at {} (build it with `cargo build --release`, or pass --ours DIR)",
            weftd.display()
        );
        ensure!(
            Path::new(ETCD_BIN).is_file(),
            "{ETCD_BIN} not found: the weftd rows need etcd (Debian's etcd-server)"
        );
        let underlay = TestNetns::new();
        let bridge = format!("{UNDERLAY_IP}/16");
        for argv in [
            &["ip", "link", "add", "br0", "type", "bridge"][..],
            &["ip", "addr", "add", &bridge, "dev", "br0"],
            &["ip", "link", "set", "br0", "up"],
        ] {
            ns_exec(&underlay, argv)?;
        }
        // Panics (and so aborts, in release) if etcd does not come up; the members
        // and the namespace die with this process regardless.
        let etcd = EtcdCluster::start(EtcdOptions {
            netns: Some(&underlay),
            ip: UNDERLAY_IP,
            ..Default::default()
        });
        let underlay_nl = Netlink::in_netns(&NetNs::open(underlay.path())?)?;
        Ok(Env {
            etcd,
            underlay_nl,
            underlay,
            weftd,
            scratch: scratch.to_path_buf(),
            loaded: None,
            nodes: 0,
        })
    }

    /// The directory holding our weftd (the bench's `--ours`).
    pub fn bin_dir(&self) -> &Path {
        self.weftd.parent().unwrap_or(Path::new("."))
    }

    /// Run `f` with an etcd client on a thread inside the underlay (where etcd
    /// listens), on a runtime of its own.
    fn with_etcd<T: Send>(
        &self,
        f: impl FnOnce(&tokio::runtime::Runtime, etcd_client::Client) -> Result<T> + Send,
    ) -> Result<T> {
        NetNs::open(self.underlay.path())?.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a tokio runtime")?;
            let client = rt
                .block_on(etcd_client::Client::connect([ENDPOINT], None))
                .with_context(|| format!("connecting to etcd at {ENDPOINT}"))?;
            f(&rt, client)
        })?
    }

    /// etcd holds the network config and exactly peers `0..n`, and no etcd lease
    /// (weftd's own lease of an earlier run goes with its lease).
    fn prepare(&mut self, n: usize) -> Result<()> {
        let reload = self.loaded != Some(n);
        self.with_etcd(|rt, mut c| {
            rt.block_on(async {
                let leases = c.leases().await.context("listing etcd leases")?;
                for l in leases.leases() {
                    c.lease_revoke(l.id()).await.context("revoking a lease")?;
                }
                if !reload {
                    return Ok(());
                }
                c.delete(
                    SUBNETS,
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )
                .await
                .context("deleting the leases")?;
                c.put(CONFIG_KEY, CONFIG, None)
                    .await
                    .context("writing the network config")?;
                for chunk in (0..n).collect::<Vec<_>>().chunks(TXN_OPS) {
                    let ops: Vec<_> = chunk
                        .iter()
                        .map(|&k| etcd_client::TxnOp::put(lease_key(k), lease_value(k), None))
                        .collect();
                    c.txn(etcd_client::Txn::new().and_then(ops))
                        .await
                        .context("writing peer leases")?;
                }
                anyhow::Ok(())
            })
        })?;
        if reload {
            let have = self.etcd.get_prefix(SUBNETS).len();
            ensure!(have == n, "etcd holds {have} leases after loading {n}");
        }
        self.loaded = Some(n);
        Ok(())
    }

    /// Put peers `0..n`, one put each, `WRITERS` at a time, put `k` not before
    /// `k / rate` s when paced: when writing started, and when each put was
    /// acknowledged.
    fn put_peers(&mut self, n: usize, rate: Option<f64>) -> Result<(Instant, Vec<Instant>)> {
        self.loaded = None;
        self.with_etcd(|rt, c| {
            rt.block_on(async {
                let kv = c.kv_client();
                let start = Instant::now();
                let mut acks: Vec<(usize, Instant)> = futures_util::stream::iter(0..n)
                    .map(|k| {
                        let mut kv = kv.clone();
                        async move {
                            if let Some(rate) = rate {
                                let at = start + Duration::from_secs_f64(k as f64 / rate);
                                tokio::time::sleep_until(at.into()).await;
                            }
                            kv.put(lease_key(k), lease_value(k), None)
                                .await
                                .map(|_| (k, Instant::now()))
                        }
                    })
                    .buffer_unordered(WRITERS)
                    .try_collect()
                    .await
                    .context("putting a peer lease")?;
                acks.sort_unstable_by_key(|a| a.0);
                Ok((start, acks.into_iter().map(|a| a.1).collect()))
            })
        })
    }

    /// A fresh node namespace on the underlay bridge, reaching etcd.
    fn node(&mut self) -> Result<Node> {
        self.nodes += 1;
        let port = format!("u{}", self.nodes);
        let dir = self.scratch.join(format!("weftd-node-{}", self.nodes));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let node = Node {
            ns: TestNetns::new(),
            port,
            dir,
        };
        let pid = node.ns.pid().to_string();
        let port = node.port.as_str();
        ns_exec(
            &self.underlay,
            &[
                "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &pid,
            ],
        )?;
        ns_exec(
            &self.underlay,
            &["ip", "link", "set", port, "master", "br0", "up"],
        )?;
        ns_exec(&node.ns, &["ip", "addr", "add", NODE_ADDR, "dev", "eth0"])?;
        ns_exec(&node.ns, &["ip", "link", "set", "eth0", "up"])?;
        // weftd retries an unreachable etcd only every second: make sure it is not.
        ns_exec(&node.ns, &["ping", "-c", "1", "-W", "5", "-q", UNDERLAY_IP])?;
        Ok(node)
    }

    /// Tear a node down and wait until the kernel has: its flannel.1 first (with
    /// 30,000 entries on it) while we wait, then the namespace, whose end shows
    /// as its veth port leaving the bridge. Nothing of it may still burn CPU
    /// during the next timed run.
    fn remove_node(&self, node: Node) -> Result<()> {
        let out = node.ns.exec(&["ip", "link", "del", "flannel.1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() || err.contains("Cannot find device"),
            "ip link del flannel.1: {}",
            err.trim()
        );
        let Node { ns, port, dir } = node;
        drop(ns);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.underlay_nl.link_by_name(&port)?.is_some() {
            if Instant::now() > deadline {
                eprintln!("\nwarning: the node namespace of {port} was not freed within 30 s");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }
}

/// One node: its namespace, its port on the underlay bridge, a scratch dir.
struct Node {
    ns: TestNetns,
    port: String,
    dir: PathBuf,
}

impl Node {
    /// (routes of ours, neighbours on flannel.1, FDB entries on flannel.1), by dump.
    fn counts(&self) -> Result<(usize, usize, usize)> {
        let nl = Netlink::in_netns(&NetNs::open(self.ns.path())?)?;
        let vtep = nl
            .link_by_name("flannel.1")?
            .context("no flannel.1 in the node")?
            .index;
        Ok((
            nl.owned_routes(true, ROUTE_PROTOCOL)?.len(),
            nl.neighs(vtep, true)?.len(),
            nl.fdbs(vtep)?.len(),
        ))
    }
}

/// Run `argv` in `ns`; its stdout, or an error with its stderr.
fn ns_exec(ns: &TestNetns, argv: &[&str]) -> Result<String> {
    let out = ns.exec(argv);
    ensure!(
        out.status.success(),
        "{} in {}: {}: {}",
        argv.join(" "),
        ns.path().display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// --- peers --------------------------------------------------------------------------

fn subnet(k: usize) -> Ipv4Net {
    assert!(k < 250 * 256, "peer {k}: out of the bench's address plan");
    let ip = Ipv4Addr::new(10, (1 + k / 256) as u8, (k % 256) as u8, 0);
    Ipv4Net::new(ip, 24).expect("a /24")
}

fn public_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, (1 + k / 250) as u8, (1 + k % 250) as u8)
}

fn mac(k: usize) -> [u8; 6] {
    [0x0a, 0x77, 0, (k >> 16) as u8, (k >> 8) as u8, k as u8]
}

fn lease_key(k: usize) -> String {
    format!("{SUBNETS}{}", subnet(k).to_string().replace('/', "-"))
}

fn lease_value(k: usize) -> String {
    let m = mac(k).map(|b| format!("{b:02x}")).join(":");
    format!(
        r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{m}"}}}}"#,
        public_ip(k)
    )
}

fn expected(n: usize) -> Vec<Expected> {
    (0..n)
        .map(|k| Expected {
            subnet: u32::from(subnet(k).network()),
            mac: mac(k),
        })
        .collect()
}

// --- the weftd process --------------------------------------------------------------

/// weftd in a node, logging to a file; stopped (SIGTERM, then SIGKILL) on drop.
struct Weftd {
    child: Child,
    exited: Option<ExitStatus>,
    log: PathBuf,
    /// Just before the spawn, by both clocks (the log has wall-clock times).
    started: Instant,
    started_wall: SystemTime,
}

impl Weftd {
    fn spawn(env: &Env, node: &Node) -> Result<Weftd> {
        let log = node.dir.join("weftd.log");
        let file = std::fs::File::create(&log).context("creating the weftd log")?;
        let subnet_file = node.dir.join("subnet.env");
        let mut cmd = netns_command(Some(node.ns.path()), &env.weftd);
        cmd.args([
            "--etcd-endpoints",
            ENDPOINT,
            "--iface",
            "eth0",
            "--subnet-file",
        ])
        .arg(&subnet_file)
        .args(["--peers-resync", "3600"]);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("FLANNELD_")
                || k.starts_with("KUBERNETES_")
                || ["WEFT_LOG", "NODE_NAME", "POD_NAME", "POD_NAMESPACE"].contains(&&*k)
            {
                cmd.env_remove(&key);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().context("dup")?)
            .stderr(file)
            // Ctrl-C is the bench's to handle: it stops weftd on the way out.
            .process_group(0);
        let started_wall = SystemTime::now();
        let started = Instant::now();
        let child = die_with_thread(&mut cmd)
            .spawn()
            .with_context(|| format!("spawning nsenter {}", env.weftd.display()))?;
        Ok(Weftd {
            child,
            exited: None,
            log,
            started,
            started_wall,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Fail, with the log, if weftd has exited.
    fn check_running(&mut self) -> Result<()> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("waitpid weftd")?;
        }
        match self.exited {
            Some(status) => bail!(
                "weftd exited ({status}); log {}:\n{}",
                self.log.display(),
                self.log_tail()
            ),
            None => Ok(()),
        }
    }

    /// Wait until the log has a line whose message starts with `message`.
    fn wait_log(&mut self, message: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if log_events(&self.log())
                .iter()
                .any(|(_, m)| m.starts_with(message))
            {
                return Ok(());
            }
            self.check_running()?;
            check_interrupted()?;
            ensure!(
                Instant::now() < deadline,
                "weftd did not log {message:?} within {timeout:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// (VmRSS, RssAnon, VmHWM) in MiB.
    fn memory(&self) -> Result<(f64, f64, f64)> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib = |field: &str| -> Result<f64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .with_context(|| format!("no {field} in {path}"))
        };
        Ok((
            kib("VmRSS:")? / 1024.0,
            kib("RssAnon:")? / 1024.0,
            kib("VmHWM:")? / 1024.0,
        ))
    }

    /// SIGTERM, SIGKILL after [`EXIT_TIMEOUT`].
    fn stop(&mut self) {
        if self.exited.is_some() {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }

    /// Seconds from the spawn to the first log line whose message starts with
    /// `message`.
    fn log_offset(&self, events: &[(f64, String)], message: &str) -> Option<f64> {
        let t0 = self
            .started_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        events
            .iter()
            .find(|(_, m)| m.starts_with(message))
            .map(|(t, _)| t - t0)
    }
}

impl Drop for Weftd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Wait for the watcher to see every entry (or fail: weftd exited, Ctrl-C,
/// timeout). The timeline and the moment the last entry was there; after a
/// socket overflow that moment comes from polling dumps instead.
fn wait_converged(
    watcher: Watcher,
    weftd: &mut Weftd,
    node: &Node,
    n: usize,
) -> Result<(Timeline, Instant)> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while !watcher.is_finished() {
        weftd.check_running()?;
        check_interrupted()?;
        if Instant::now() > deadline {
            let (seen, total) = watcher.progress();
            bail!(
                "weftd did not program {n} peers within {CONVERGE_TIMEOUT:?} ({seen} of {total} \
                 entries seen); log:\n{}",
                weftd.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let tl = watcher.finish()?;
    if !tl.overflowed {
        let (_, done) = Timeline::span(&[&tl.route, &tl.neigh, &tl.fdb]).context("no entries")?;
        return Ok((tl, done));
    }
    eprint!("(netlink listener overflowed; polling) ");
    loop {
        let c = node.counts()?;
        if c == (n, n, n) {
            return Ok((tl, Instant::now()));
        }
        weftd.check_running()?;
        check_interrupted()?;
        ensure!(
            Instant::now() < deadline,
            "weftd did not program {n} peers within {CONVERGE_TIMEOUT:?}: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The kernel holds exactly `n` of each, by dump.
fn verify(node: &Node, n: usize) -> Result<()> {
    let c = node.counts()?;
    ensure!(
        c == (n, n, n),
        "after convergence the node holds (routes, neighbours, fdb entries) = {c:?}, want {n} each"
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn since(later: Instant, earlier: Instant) -> f64 {
    ms(later.saturating_duration_since(earlier))
}

// --- rows ---------------------------------------------------------------------------

pub fn cold_start_1k(env: &mut Env, i: usize) -> Result<Sample> {
    cold_start(env, i, 1_000)
}

/// How long after convergence the settled RSS is read.
const SETTLE: Duration = Duration::from_secs(1);

pub fn cold_start_10k(env: &mut Env, i: usize) -> Result<Sample> {
    cold_start(env, i, 10_000)
}

/// etcd holds `n` peer leases; time from weftd's spawn until the kernel holds all
/// their routes, neighbours and FDB entries.
fn cold_start(env: &mut Env, _: usize, n: usize) -> Result<Sample> {
    env.prepare(n)?;
    let node = env.node()?;
    let watcher = Watcher::start(node.ns.path(), &expected(n))?;
    let mut weftd = Weftd::spawn(env, &node)?;
    let (tl, done) = wait_converged(watcher, &mut weftd, &node, n)?;
    let (rss, anon, peak) = weftd.memory()?;
    let elapsed = done - weftd.started;
    verify(&node, n)?;
    // What stays once the snapshot's transient buffers are freed.
    std::thread::sleep(SETTLE);
    let (settled, settled_anon, _) = weftd.memory()?;
    weftd.stop();

    let mut figures = vec![
        ("RSS after convergence", rss, "MiB"),
        ("  of which anonymous (heap, stacks)", anon, "MiB"),
        ("peak RSS", peak, "MiB"),
        ("RSS 1 s later (settled)", settled, "MiB"),
        ("  of which anonymous", settled_anon, "MiB"),
    ];
    // Where the time went, from weftd's log and the kernel's announcements.
    let events = log_events(&weftd.log());
    let at = |m| weftd.log_offset(&events, m).map(|s| s * 1e3);
    let (leased, ready, snapshot) = (at("leased"), at("ready"), at("lease snapshot"));
    if let Some(t) = leased {
        figures.push(("spawn -> leased (etcd, VTEP, acquire)", t, "ms"));
    }
    if let (Some(a), Some(b)) = (leased, ready) {
        figures.push(("leased -> ready (address, nft, subnet.env)", b - a, "ms"));
    }
    if let (Some(a), Some(b)) = (ready, snapshot) {
        figures.push(("ready -> lease snapshot (list)", b - a, "ms"));
    }
    let links = Timeline::span(&[&tl.neigh, &tl.fdb]);
    let routes = Timeline::span(&[&tl.route]);
    if let (Some(s), Some((first, _))) = (snapshot, links) {
        let first = since(first, weftd.started);
        figures.push(("snapshot -> first write (dump, plan)", first - s, "ms"));
    }
    if let (Some((l0, l1)), Some((r0, r1))) = (links, routes) {
        figures.push(("neighbour+FDB writes", since(l1, l0), "ms"));
        figures.push(("route writes", since(r1, r0.min(l1)), "ms"));
    }
    if let Some(took) = events
        .iter()
        .find(|(_, m)| m.starts_with("converged the peer entries"))
        .and_then(|(_, m)| field(m, "took"))
        .and_then(parse_debug_duration)
    {
        figures.push(("weftd's own converge time", ms(took), "ms"));
    }
    env.remove_node(node)?;
    Ok(Sample { elapsed, figures })
}

/// weftd converged on no peers; 1,000 leases put as fast as etcd takes them.
pub fn lease_events(env: &mut Env, i: usize) -> Result<Sample> {
    lease_events_at(env, i, None)
}

/// The same, one put per millisecond.
pub fn lease_events_paced(env: &mut Env, i: usize) -> Result<Sample> {
    lease_events_at(env, i, Some(1_000.0))
}

/// weftd converged on no peers; [`EVENTS`] leases put one by one: time from the
/// first put until the kernel holds everything.
fn lease_events_at(env: &mut Env, _: usize, rate: Option<f64>) -> Result<Sample> {
    let n = EVENTS;
    env.prepare(0)?;
    let node = env.node()?;
    let watcher = Watcher::start(node.ns.path(), &expected(n))?;
    let mut weftd = Weftd::spawn(env, &node)?;
    weftd.wait_log("lease snapshot", Duration::from_secs(30))?;
    let (start, acks) = env.put_peers(n, rate)?;
    let (tl, done) = wait_converged(watcher, &mut weftd, &node, n)?;
    let (rss, _, _) = weftd.memory()?;
    verify(&node, n)?;
    weftd.stop();
    env.remove_node(node)?;

    let elapsed = done - start;
    let last_ack = acks.iter().max().copied().unwrap_or(start);
    let mut lags: Vec<f64> = (0..n)
        .filter_map(|k| Some(since(tl.peer_done(k)?, acks[k])))
        .collect();
    lags.sort_by(f64::total_cmp);
    let mut figures = vec![
        (
            "events/s programmed",
            n as f64 / elapsed.as_secs_f64(),
            "/s",
        ),
        (
            "writer puts/s (etcd acks)",
            n as f64 / (last_ack - start).as_secs_f64(),
            "/s",
        ),
        ("done after the last ack", since(done, last_ack), "ms"),
    ];
    if !lags.is_empty() {
        figures.push((
            "per-lease ack -> programmed p50",
            crate::stats::percentile(&lags, 0.5),
            "ms",
        ));
        figures.push((
            "per-lease ack -> programmed p99",
            crate::stats::percentile(&lags, 0.99),
            "ms",
        ));
    }
    figures.push(("RSS after", rss, "MiB"));
    Ok(Sample { elapsed, figures })
}

pub fn floor_1k(env: &mut Env, i: usize) -> Result<Sample> {
    floor(env, i, 1_000)
}

pub fn floor_10k(env: &mut Env, i: usize) -> Result<Sample> {
    floor(env, i, 10_000)
}

/// weftd's converge path without weftd: desired state, kernel dump, plan, then
/// the neighbour+FDB batch and the route batch, through the same netlink code.
fn floor(_: &mut Env, _: usize, n: usize) -> Result<Sample> {
    let ns = TestNetns::new();
    ns_exec(
        &ns,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ],
    )?;
    ns_exec(&ns, &["ip", "addr", "add", NODE_ADDR, "dev", "eth0"])?;
    ns_exec(&ns, &["ip", "link", "set", "eth0p", "up"])?;
    ns_exec(&ns, &["ip", "link", "set", "eth0", "up"])?;
    let nl = Netlink::in_netns(&NetNs::open(ns.path())?)?;
    let eth0 = nl.link_by_name("eth0")?.context("no eth0")?;
    let ext = ExtLink {
        index: eth0.index,
        mtu: eth0.mtu,
        addrs: nl.addresses(eth0.index)?,
    };
    let config = NetworkConfig::parse(CONFIG.as_bytes())?;
    let kind = Kind::of(&config).map_err(|e| anyhow!(e))?;
    let plane = DataPlane::prepare(&nl, kind, ext, Some(IpAddr::V4(NODE_IP)), None)?;
    let leases: Vec<Lease> = (0..n)
        .map(|k| {
            Ok(Lease {
                key: SubnetKey {
                    v4: Some(subnet(k)),
                    v6: None,
                },
                attrs: LeaseAttrs::from_json(lease_value(k).as_bytes()).map_err(|e| anyhow!(e))?,
                etcd_lease: 0,
                ttl: None,
            })
        })
        .collect::<Result<_>>()?;

    let t0 = Instant::now();
    let mut desired = PeerState::default();
    for l in &leases {
        desired.merge(plane.peer_state(l).map_err(|e| anyhow!(e))?);
    }
    let actual = plane.actual(&nl)?;
    let p = plan(&desired, &actual);
    let t1 = Instant::now();
    let links = nl.apply_ops(&p.links);
    let t2 = Instant::now();
    let nexthops = nl.apply_ops(&p.nexthops);
    let t3 = Instant::now();
    let routes = nl.apply_ops(&p.routes);
    let t4 = Instant::now();
    ensure!(
        (p.links.len(), p.nexthops.len(), p.routes.len()) == (2 * n, n, n),
        "plan for {n} peers: {} neighbour/FDB, {} nexthop and {} route writes",
        p.links.len(),
        p.nexthops.len(),
        p.routes.len()
    );
    let results = links.into_iter().chain(nexthops).chain(routes);
    if let Some(e) = results.into_iter().find_map(Result::err) {
        bail!("writing the peer entries: {}", e.msg);
    }
    let vtep = nl.link_by_name("flannel.1")?.context("no flannel.1")?.index;
    let t5 = Instant::now();
    nl.delete_link(vtep)?;
    let t6 = Instant::now();
    drop(nl);
    drop(ns);
    Ok(Sample {
        elapsed: t4 - t0,
        figures: vec![
            ("desired + dump + plan", ms(t1 - t0), "ms"),
            ("neighbour+FDB writes", ms(t2 - t1), "ms"),
            ("nexthop writes", ms(t3 - t2), "ms"),
            ("route writes", ms(t4 - t3), "ms"),
            ("per route", (t4 - t3).as_secs_f64() * 1e6 / n as f64, "µs"),
            ("delete flannel.1 afterwards", ms(t6 - t5), "ms"),
        ],
    })
}

// --- weftd's log ----------------------------------------------------------------------

/// (seconds since the epoch, message with its fields) of each line of weftd's
/// text log: `2026-05-06T10:11:12.123456Z  INFO weftd::daemon: leased subnet=…`.
fn log_events(log: &str) -> Vec<(f64, String)> {
    log.lines()
        .filter_map(|line| {
            let (ts, rest) = line.split_once(' ')?;
            let t = parse_rfc3339(ts)?;
            let (_, msg) = rest.split_once(": ")?;
            Some((t, msg.to_string()))
        })
        .collect()
}

/// `2026-05-06T10:11:12.123456Z` as seconds since the epoch (UTC only).
fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

/// The value of `name=` in a log message's fields.
fn field<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split(' ')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// A `Duration`'s Debug form: `1.234567s`, `812.5ms`, `93µs`, `7ns`.
fn parse_debug_duration(s: &str) -> Option<Duration> {
    // Two-letter units first: "ms" also ends in "s".
    for (unit, scale) in [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)] {
        if let Some(num) = s.strip_suffix(unit)
            && let Ok(v) = num.parse::<f64>()
        {
            return Some(Duration::from_secs_f64(v * scale));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_fit_the_address_plan() {
        assert_eq!(subnet(0).to_string(), "10.1.0.0/24");
        assert_eq!(subnet(9_999).to_string(), "10.40.15.0/24");
        assert_eq!(public_ip(9_999), Ipv4Addr::new(10, 77, 40, 250));
        assert_eq!(lease_key(257), "/coreos.com/network/subnets/10.2.1.0-24");
        let attrs = LeaseAttrs::from_json(lease_value(258).as_bytes()).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(10, 77, 2, 9));
        assert_eq!(
            attrs.backend_data.unwrap().value()["VtepMAC"],
            "0a:77:00:00:01:02"
        );
        let e = expected(10_000);
        let mut macs: Vec<_> = e.iter().map(|x| x.mac).collect();
        macs.sort();
        macs.dedup();
        assert_eq!(macs.len(), 10_000);
    }

    #[test]
    fn log_lines_and_durations_parse() {
        let log = "2026-05-06T10:11:12.250000Z  INFO weftd::daemon: leased subnet=10.0.5.0/24 etcd_lease=7\n\
                   garbage\n\
                   2026-05-06T10:11:12.500000Z  INFO weftd::dataplane: converged the peer entries writes=3 entries=3 took=1.5ms\n";
        let ev = log_events(log);
        assert_eq!(ev.len(), 2);
        assert!((ev[1].0 - ev[0].0 - 0.25).abs() < 1e-6);
        assert!(ev[0].1.starts_with("leased"));
        assert_eq!(parse_rfc3339("1970-01-02T00:00:01Z"), Some(86_401.0));
        assert_eq!(field(&ev[1].1, "took"), Some("1.5ms"));
        assert_eq!(
            parse_debug_duration("1.5ms"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(parse_debug_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_debug_duration("93µs"),
            Some(Duration::from_micros(93))
        );
    }
}
