//! Test harness for weft's plugins: run real binaries, in real (throwaway) network
//! namespaces, the way container runtimes run them.
//!
//! - [`TestNetns`]: a fresh netns owned by a child process, gone when dropped.
//! - [`TempDir`]: a scratch directory removed on drop, even when a test panics.
//! - [`Invocation`] / [`Outcome`]: run one plugin with a controlled environment.
//! - [`driver::Driver`]: a libcni-like conflist runtime (ADD/CHECK/DEL/GC/STATUS + result cache).
//! - [`fake::FakePlugin`]: shell-script plugins that record their calls.
//! - [`etcd::EtcdCluster`]: real etcd servers (1 or 3 members, TLS, in a netns),
//!   inspected through etcd's v3 JSON gateway with curl.
//! - [`kube_api::FakeApiServer`]: a fake Kubernetes API (Python, HTTPS) serving
//!   recorded Node objects, for the kube lease source; not a real API server.
//! - [`certs::Certs`]: a CA, server and client certificates (openssl CLI).
//! - [`netns_command`], [`die_with_thread`]: run a server or daemon in a netns, and
//!   have it die with the test's thread.
//! - [`inside`]: run test code (sockets, weft-core calls) in a netns; [`exec_line`]:
//!   one command line there; [`nft`] and friends: look at and damage its nftables
//!   ruleset.
//!
//! Tests that need root start with `if !netns_tests::require_root() { return; }`.

pub mod base64;
pub mod certs;
mod command;
pub mod driver;
pub mod etcd;
pub mod fake;
pub mod kube_api;
mod netns;
pub mod node_state;
mod runner;
mod tempdir;
pub mod weftd_cluster;

pub use command::{die_with_thread, netns_command};
pub use netns::TestNetns;
pub use runner::{
    CniErr, Invocation, Outcome, bin_dir, debug_bin_dir, plugin_path, reference_dir, workspace_root,
};
pub use tempdir::TempDir;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Every CNI plugin binary weft builds.
pub const PLUGINS: [&str; 6] = [
    "bridge",
    "host-local",
    "portmap",
    "flannel",
    "vxlan-overlay",
    "host-gw",
];

/// Join two namespaces with a veth pair: `(ifname, address/prefix)` on each side,
/// both ends up. A multi-node or outside-world test is built from these.
pub fn join(a: &TestNetns, a_side: (&str, &str), b: &TestNetns, b_side: (&str, &str)) {
    let pid = b.pid().to_string();
    a.exec_ok(&[
        "ip", "link", "add", a_side.0, "type", "veth", "peer", "name", b_side.0, "netns", &pid,
    ]);
    for (ns, (ifname, addr)) in [(a, a_side), (b, b_side)] {
        ns.exec_ok(&["ip", "addr", "add", addr, "dev", ifname, "nodad"]);
        ns.exec_ok(&["ip", "link", "set", ifname, "up"]);
    }
}

/// The address `ip` a test server (`what`, started with `options`) is to listen
/// on. Outside a netns only loopback: tests must not listen or send traffic
/// anywhere else. Panics otherwise.
pub(crate) fn listen_ip(options: &str, what: &str, ip: &str, netns: Option<&TestNetns>) -> IpAddr {
    let parsed: IpAddr = ip
        .parse()
        .unwrap_or_else(|e| panic!("{options}::ip {ip:?}: {e}"));
    assert!(
        netns.is_some() || parsed.is_loopback(),
        "{what} outside a netns must listen on loopback, not {parsed}"
    );
    parsed
}

/// `ip` as the host of a URL: IPv6 in brackets.
pub(crate) fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Run `f` inside `ns` (on a throwaway thread): sockets it creates stay in that
/// namespace, and so do the processes it spawns.
pub fn inside<T: Send>(ns: &TestNetns, f: impl FnOnce() -> T + Send) -> T {
    weft_core::netns::NetNs::open(ns.path())
        .expect("opening the netns")
        .run(f)
        .expect("entering the netns")
}

/// `line` split at its spaces, run in `ns` (it must succeed): its stdout. For
/// commands none of whose arguments holds a space, and for nft, which joins its
/// arguments with spaces again.
pub fn exec_line(ns: &TestNetns, line: &str) -> String {
    ns.exec_ok(&line.split(' ').collect::<Vec<_>>())
}

/// `nft args...` in `ns` (it must succeed): its stdout.
pub fn nft(ns: &TestNetns, args: &[&str]) -> String {
    let mut argv = vec!["nft"];
    argv.extend_from_slice(args);
    ns.exec_ok(&argv)
}

/// Whether `nft list tables` in `ns` shows `table <family> <name>`.
pub fn has_nft_table(ns: &TestNetns, family: &str, name: &str) -> bool {
    let want = format!("table {family} {name}");
    nft(ns, &["list", "tables"]).lines().any(|l| l == want)
}

/// Delete, by its handle, the rule of `chain` (`<family> <table> <chain>`) whose
/// comment is `comment`.
pub fn nft_delete_rule(ns: &TestNetns, chain: &str, comment: &str) {
    let chain: Vec<&str> = chain.split(' ').collect();
    let listing = nft(ns, &[&["-a", "list", "chain"], &chain[..]].concat());
    let handle = listing
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .and_then(|l| l.rsplit_once("# handle "))
        .unwrap_or_else(|| panic!("no rule with comment {comment:?} in {listing}"))
        .1
        .trim();
    nft(
        ns,
        &[&["delete", "rule"], &chain[..], &["handle", handle]].concat(),
    );
}

/// Whether we run as root; prints a skip notice otherwise. Namespaces, nsenter and
/// most plugin work need root, and a silent pass is better than a confusing failure
/// on a developer machine.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: needs root");
    }
    root
}

/// A name unique within this test run and across concurrent runs (pid + counter),
/// valid as a CNI network name or container ID: `<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{}-{n}", std::process::id())
}

/// Every element of the sets and maps of `<family> <table>` in `ns`, as nft's JSON
/// has it, with its set's name. Empty without the table.
pub fn table_elements(
    ns: &TestNetns,
    family: &str,
    table: &str,
) -> Vec<(String, serde_json::Value)> {
    let out = ns.exec(&["nft", "-j", "list", "table", family, table]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let items = v["nftables"].as_array().into_iter().flatten();
    let sets = items.filter_map(|o| o.get("map").or_else(|| o.get("set")));
    let mut elems = Vec::new();
    for s in sets {
        let name = s["name"].as_str().unwrap_or("?");
        let es = s["elem"].as_array().into_iter().flatten();
        elems.extend(es.map(|e| (name.to_string(), e.clone())));
    }
    elems
}

/// Every file under portmap's data dir `dir`, in it or in its subdirectories (the
/// records are spread over 256 of them), by name. Empty when `dir` does not exist.
pub fn portmap_files(dir: &std::path::Path) -> std::collections::BTreeSet<String> {
    let entries = |d: &std::path::Path| {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .map(|e| e.expect("readable directory entry"))
            .collect::<Vec<_>>()
    };
    let mut names = std::collections::BTreeSet::new();
    for e in entries(dir) {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            names.extend(entries(&e.path()).iter().map(name_of));
        } else {
            names.insert(name_of(&e));
        }
    }
    names
}

fn name_of(e: &std::fs::DirEntry) -> String {
    e.file_name().to_string_lossy().into_owned()
}

/// host-local's reservations in one network's state directory: files named by an
/// address, with their contents. Empty when the directory does not exist.
pub fn reservations(net_dir: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let Ok(entries) = std::fs::read_dir(net_dir) else {
        return Default::default();
    };
    entries
        .map(|e| e.expect("readable directory entry"))
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<std::net::IpAddr>().is_ok())
        })
        .map(|e| {
            let content = std::fs::read_to_string(e.path()).expect("readable reservation");
            (e.file_name().into_string().expect("UTF-8 name"), content)
        })
        .collect()
}
