//! weft-demo: weft end to end on one machine. Two simulated nodes in network
//! namespaces, a local etcd, weftd on each node, two pods per node added through
//! the real CNI binaries (the stock kube-flannel conflist), cross-node traffic, a
//! hostPort, then DEL and teardown, each step printed.
//!
//! Built on netns-tests' [`weftd_cluster`](netns_tests::weftd_cluster) harness,
//! whose helpers panic on failure. The release profile aborts on panic, so there
//! is no unwinding to catch: a panic hook prints the failed step, kills what this
//! process started (namespace owners, etcd, weftd), removes its temp dirs and
//! exits 1. On success everything is dropped in order and checked to be gone.

use netns_tests::etcd::ETCD_BIN;
use netns_tests::weftd_cluster::{
    CONFIG_KEY, Cluster, ENDPOINT, FlannelRuntime, Pod, READY_TIMEOUT, VXLAN_CONFIG, Weftd,
    lease_key, tcp_send, tcp_transfer, wait_ping,
};
use netns_tests::{bin_dir, inside, workspace_root};
use serde_json::json;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const STEPS: [&str; 8] = [
    "building two nodes in network namespaces and starting etcd",
    "reading the network config back from etcd",
    "starting weftd on node 1",
    "starting weftd on node 2",
    "adding pods through the CNI plugins",
    "sending traffic between pods on different nodes",
    "reaching a hostPort across nodes",
    "deleting the pods and tearing down",
];
/// The step under way (1-based), for the failure message.
static STEP: AtomicUsize = AtomicUsize::new(0);
const BINARIES: [&str; 5] = ["weftd", "flannel", "bridge", "host-local", "portmap"];
const TOOLS: [(&str, &str); 6] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("ping", "iputils-ping"),
    ("curl", "curl"),
];
const CONFLIST: &str = "conf-examples/10-flannel.conflist";
const HOST_PORT: u16 = 18080;
const CONTAINER_PORT: u16 = 8080;
const MIB: usize = 1 << 20;

/// The headline of the current step, then its details, indented.
macro_rules! say {
    ($($t:tt)*) => { println!("==> [{}/8] {}", STEP.load(Ordering::SeqCst), format_args!($($t)*)) };
}
macro_rules! detail {
    ($($t:tt)*) => { println!("      {}", format_args!($($t)*)) };
}

fn usage() -> String {
    format!(
        "\
weft-demo: weft end to end on this machine, in throwaway network namespaces

USAGE: sudo target/release/weft-demo [--help]

It prints each step as it completes:
  1-2  two simulated nodes (network namespaces on an underlay bridge) and a local
       etcd holding the network config
       {VXLAN_CONFIG}
  3-4  weftd --ip-masq on each node: its subnet lease, subnet.env and VTEP
  5    two pods per node through the real CNI binaries, with the stock
       kube-flannel conflist {CONFLIST}
       (flannel -> bridge -> host-local, then portmap)
  6    ping and a 1 MiB TCP transfer between pods on different nodes, timed
  7    a hostPort ({HOST_PORT}->{CONTAINER_PORT}/tcp) of a pod on node 1, reached from a
       pod on node 2 through node 1's address
  8    DEL of every pod, a check that no plugin state is left, and teardown
Only the namespaces and its own temp dirs are touched (not /run/flannel,
/var/lib/cni, or the host's links, routes and nftables), and all of it is removed
at the end, after a failure too. Exit status: 0 on success, 1 on any failure.

NEEDS:
  root             network namespaces, veths, nftables rules
  weft binaries    {bins} in $WEFT_BIN_DIR, else
                   {dir} (cargo build --release --workspace --bins)
  etcd-server      {ETCD_BIN} (apt-get install etcd-server)
  iproute2, nftables, util-linux (nsenter, unshare), iputils-ping, curl
",
        bins = BINARIES.join(", "),
        dir = bin_dir().display(),
    )
}

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("-h" | "--help") => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Some(arg) => {
            eprintln!("weft-demo: unknown argument {arg:?} (try --help)");
            return ExitCode::from(2);
        }
    }
    if let Err(e) = preflight() {
        eprintln!("weft-demo: {e}");
        return ExitCode::FAILURE;
    }
    std::panic::set_hook(Box::new(|info| {
        let msg = (info.payload().downcast_ref::<&str>().copied())
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let n = STEP.load(Ordering::SeqCst).max(1);
        eprintln!("\nweft-demo: FAILED at [{n}/8] {}:\n{msg}", STEPS[n - 1]);
        if let Some(at) = info.location() {
            eprintln!("(in {at})");
        }
        tear_down_after_failure();
        std::process::exit(1);
    }));
    let started = Instant::now();
    let processes = demo();
    // Everything is dropped: check that it is gone.
    let left = children();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let dirs = temp_dirs();
    assert!(dirs.is_empty(), "temp dirs left behind: {dirs:?}");
    detail!(
        "stopped {processes} processes (etcd, 2 weftd, 7 namespace owners: 2 nodes, the \
         underlay, 4 pods), removed the temp dirs; nothing left"
    );
    println!("==> done in {:.1} s", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}

/// Root, the binaries, etcd, the tools, the conflist.
fn preflight() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "needs root (it creates network namespaces, veths and nftables rules): \
                    sudo target/release/weft-demo"
                .into(),
        );
    }
    let dir = bin_dir();
    let missing: Vec<&str> = (BINARIES.into_iter())
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing weft binaries in {}: {}\n  build them from the repo root: \
             cargo build --release --workspace --bins (or set WEFT_BIN_DIR)",
            dir.display(),
            missing.join(", ")
        ));
    }
    if !Path::new(ETCD_BIN).is_file() {
        return Err(format!("{ETCD_BIN} not found: apt-get install etcd-server"));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, package) in TOOLS {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            return Err(format!(
                "`{tool}` not found in PATH: apt-get install {package}"
            ));
        }
    }
    let conflist = workspace_root().join(CONFLIST);
    if !conflist.is_file() {
        return Err(format!(
            "{} not found (the source tree it was built from)",
            conflist.display()
        ));
    }
    Ok(())
}

/// Steps 1-8; everything started is dropped on return. How many processes it ran.
fn demo() -> usize {
    step(1);
    let c = Cluster::new(2, VXLAN_CONFIG);
    let (n1, n2) = (c.node(1), c.node(2));
    say!("two nodes in network namespaces, on the underlay bridge br0 (10.77.0.100/24)");
    detail!("node 1: eth0 {}/24    node 2: eth0 {}/24", n1.ip, n2.ip);

    step(2);
    say!("etcd up at {ENDPOINT}, in the underlay namespace");
    let config = c
        .etcd()
        .get(CONFIG_KEY)
        .expect("the network config in etcd");
    detail!("{CONFIG_KEY} = {config}");

    let mut weftds: Vec<Weftd> = Vec::new();
    for (i, node) in [(1, n1), (2, n2)] {
        step(i + 2);
        weftds.push(node.ready_weftd(&["--ip-masq"]));
        let subnet = node.leased_subnet();
        say!(
            "weftd on node {i} leased {subnet} (vxlan, VTEP flannel.1 MAC {})",
            node.vtep_mac()
        );
        let key = lease_key(&subnet);
        let lease = c.etcd().get(&key).expect("the lease in etcd");
        detail!("etcd: {key} = {lease}");
        detail!("{}:", node.subnet_file().display());
        let env = node.subnet_env().expect("subnet.env");
        env.lines().for_each(|l| detail!("  {l}"));
    }
    for (i, node) in [(1, n1), (2, n2)] {
        node.wait_metric("weft_peers", "1", READY_TIMEOUT);
        let routes = node.weft_routes().join("; ");
        detail!("node {i} sees its peer: route {routes}");
    }

    step(5);
    let (r1, r2) = (FlannelRuntime::stock(n1), FlannelRuntime::stock(n2));
    let mapping =
        json!([{"hostPort": HOST_PORT, "containerPort": CONTAINER_PORT, "protocol": "tcp"}]);
    let pods: Vec<(&str, usize, &FlannelRuntime, (Pod, _))> = vec![
        ("web", 1, &r1, r1.add_pod("web", Some(mapping))),
        ("pod-a", 1, &r1, r1.add_pod("pod-a", None)),
        ("pod-b", 2, &r2, r2.add_pod("pod-b", None)),
        ("pod-c", 2, &r2, r2.add_pod("pod-c", None)),
    ];
    say!("4 pods added with {CONFLIST} (flannel -> bridge -> host-local, portmap)");
    for (name, i, _, (pod, _)) in &pods {
        let port = match *name {
            "web" => format!("   hostPort {HOST_PORT}->{CONTAINER_PORT}/tcp"),
            _ => String::new(),
        };
        detail!("{name:<6} on node {i}: {}{port}", pod.ip);
    }
    let pod = |name: &str| &pods.iter().find(|p| p.0 == name).expect("a pod").3.0;
    let (web, a, b, cc) = (pod("web"), pod("pod-a"), pod("pod-b"), pod("pod-c"));

    step(6);
    say!("traffic between pods on different nodes, over vxlan");
    for (from, fname, to, tname) in [(a, "pod-a", b, "pod-b"), (cc, "pod-c", web, "web")] {
        wait_ping(from, to);
        let out = from
            .ns
            .exec_ok(&["ping", "-c", "3", "-i", "0.2", "-q", &to.ip]);
        // "3 packets transmitted, 3 received, 0% packet loss, time 405ms"
        // "rtt min/avg/max/mdev = 0.052/0.070/0.089/0.015 ms"
        let sent = out
            .lines()
            .find(|l| l.contains(" received, "))
            .unwrap_or("");
        let sent: Vec<&str> = sent.split(", ").take(2).collect();
        let rtt = out
            .lines()
            .find_map(|l| l.strip_prefix("rtt min/avg/max/mdev = "));
        let avg = rtt.and_then(|r| r.split('/').nth(1)).unwrap_or("?");
        let (fip, tip) = (&from.ip, &to.ip);
        detail!(
            "ping {fname} {fip} -> {tname} {tip}: {}, rtt avg {avg} ms",
            sent.join(", ")
        );
        let t = Instant::now();
        tcp_transfer(from, to, MIB);
        let secs = t.elapsed().as_secs_f64();
        detail!(
            "TCP 1 MiB {fname} -> {tname}: {:.1} ms, {:.0} MiB/s, source address kept (no NAT)",
            secs * 1e3,
            1.0 / secs
        );
    }

    step(7);
    let dst: SocketAddr = format!("{}:{HOST_PORT}", n1.ip).parse().unwrap();
    let what = format!("pod-c -> hostPort {dst}");
    let seen = tcp_send(&what, &cc.ns, dst, (&web.ns, CONTAINER_PORT), 64 * 1024);
    say!(
        "hostPort {dst} -> web {}:{CONTAINER_PORT}/tcp reached from pod-c on node 2",
        web.ip
    );
    detail!(
        "64 KiB from pod-c ({}) arrived in web from {} (node 2 masquerades, node 1 DNATs)",
        cc.ip,
        seen.ip()
    );

    step(8);
    say!("DEL of every pod, then teardown");
    for (name, i, rt, (_, att)) in &pods {
        let del = rt.driver.del(att);
        del.unwrap_or_else(|e| panic!("DEL {name} on node {i}: {e}"));
        detail!("DEL {name} on node {i}: ok");
    }
    let refused = inside(&cc.ns, || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(2))
    });
    assert!(refused.is_err(), "the hostPort {dst} outlived DEL");
    detail!("hostPort {dst} is gone");
    for rt in [&r1, &r2] {
        let left = rt.leftovers();
        assert!(left.is_empty(), "left behind on {}: {left:#?}", rt.node.ip);
    }
    detail!(
        "no plugin state left on either node (cni0 ports, IP reservations, saved configs, \
         portmap rules, cached results)"
    );
    let processes = children().len();
    for (i, w) in weftds.iter_mut().enumerate() {
        let status = w.terminate();
        assert!(status.success(), "weftd on node {} exited {status}", i + 1);
        detail!("weftd on node {} exited 0 on SIGTERM", i + 1);
    }
    drop(pods);
    drop((r1, r2, weftds));
    drop(c);
    processes
}

fn step(n: usize) {
    STEP.store(n, Ordering::SeqCst);
}

/// This process's children (pid, name): the namespace owners, etcd and weftd
/// (nsenter and unshare exec them), and any plugin or tool running right now.
fn children() -> Vec<(u32, String)> {
    let me = std::process::id();
    let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    entries
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let ppid: u32 = rest.split(' ').nth(1)?.parse().ok()?;
            (ppid == me).then(|| (pid, comm.to_string()))
        })
        .collect()
}

/// The harness's temp dirs of this process: `<tmp>/weft-<tag>-<pid>-<n>`.
fn temp_dirs() -> Vec<PathBuf> {
    let mark = format!("-{}-", std::process::id());
    let entries = std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten();
    let names = entries
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e));
    let ours = names.filter(|(n, _)| n.starts_with("weft-") && n.contains(&mark));
    ours.map(|(_, e)| e.path()).collect()
}

/// After a panic (no unwinding in release): show weftd's log tails, SIGKILL and
/// reap every child, remove the temp dirs. The namespaces go with their owners.
fn tear_down_after_failure() {
    for dir in temp_dirs() {
        let logs = std::fs::read_dir(&dir).into_iter().flatten().flatten();
        for log in logs.filter(|e| e.file_name().to_string_lossy().starts_with("weftd-")) {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {} ---", log.path().display());
            lines[lines.len().saturating_sub(15)..]
                .iter()
                .for_each(|l| eprintln!("{l}"));
        }
    }
    let children = children();
    for &(pid, _) in &children {
        // SAFETY: signalling and reaping our own children.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
    }
    let dirs = temp_dirs();
    dirs.iter().for_each(|d| drop(std::fs::remove_dir_all(d)));
    eprintln!(
        "weft-demo: tore down: killed {} processes (etcd, weftd, namespace owners), removed {} \
         temp dirs",
        children.len(),
        dirs.len()
    );
}
