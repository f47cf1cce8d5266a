//! What a node's plugins leave behind, captured so a test can compare the node
//! before and after a fault: links (with their bridge), addresses, routes, the
//! nftables ruleset (without counter values) and the files under the plugins' state
//! directories. host-local's round-robin pointer, lock and owner cache are left
//! out: they are bookkeeping, not an attachment's state.

use crate::TestNetns;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub links: Vec<String>,
    pub addrs: Vec<String>,
    pub routes: Vec<String>,
    pub ruleset: String,
    /// Path relative to its state directory (prefixed by the directory's index) →
    /// contents.
    pub files: BTreeMap<String, String>,
}

impl NodeState {
    /// The state of `node` and of the files under `dirs`.
    pub fn capture(node: &TestNetns, dirs: &[&Path]) -> NodeState {
        let mut files = BTreeMap::new();
        for (i, dir) in dirs.iter().enumerate() {
            collect_files(dir, dir, &format!("{i}:"), &mut files);
        }
        NodeState {
            links: links(node),
            addrs: addrs(node),
            routes: routes(node),
            ruleset: node.exec_ok(&["nft", "-s", "list", "ruleset"]),
            files,
        }
    }

    /// What differs from `other`, one line per item; empty when equal.
    pub fn diff(&self, other: &NodeState) -> Vec<String> {
        let mut out = Vec::new();
        diff_lists("link", &self.links, &other.links, &mut out);
        diff_lists("addr", &self.addrs, &other.addrs, &mut out);
        diff_lists("route", &self.routes, &other.routes, &mut out);
        let rules = |s: &str| s.lines().map(str::to_owned).collect::<Vec<_>>();
        diff_lists(
            "nft",
            &rules(&self.ruleset),
            &rules(&other.ruleset),
            &mut out,
        );
        let files = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| format!("{k} = {v:?}"))
                .collect::<Vec<_>>()
        };
        diff_lists("file", &files(&self.files), &files(&other.files), &mut out);
        out
    }

    /// Wait (up to `timeout`) until `node` is back to this state — DEL deletes
    /// interfaces in the background, and the kernel deletes a dead netns's veths
    /// asynchronously — and return what still differs then.
    pub fn wait_back(&self, node: &TestNetns, dirs: &[&Path], timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let diff = self.diff(&NodeState::capture(node, dirs));
            if diff.is_empty() || Instant::now() > deadline {
                return diff;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn diff_lists(what: &str, before: &[String], after: &[String], out: &mut Vec<String>) {
    for b in before.iter().filter(|b| !after.contains(b)) {
        out.push(format!("{what} gone: {b}"));
    }
    for a in after.iter().filter(|a| !before.contains(a)) {
        out.push(format!("{what} left behind: {a}"));
    }
}

fn json_lines(node: &TestNetns, argv: &[&str]) -> Vec<Value> {
    let v = node.exec_json(argv);
    v.as_array().cloned().unwrap_or_default()
}

fn links(node: &TestNetns) -> Vec<String> {
    let mut out: Vec<String> = json_lines(node, &["ip", "-j", "link", "show"])
        .iter()
        .map(|l| {
            format!(
                "{} master={}",
                l["ifname"].as_str().unwrap_or("?"),
                l["master"].as_str().unwrap_or("-")
            )
        })
        .collect();
    out.sort();
    out
}

fn addrs(node: &TestNetns) -> Vec<String> {
    let mut out = Vec::new();
    for l in json_lines(node, &["ip", "-j", "addr", "show"]) {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            out.push(format!(
                "{} {}/{}",
                l["ifname"].as_str().unwrap_or("?"),
                a["local"].as_str().unwrap_or("?"),
                a["prefixlen"]
            ));
        }
    }
    out.sort();
    out
}

fn routes(node: &TestNetns) -> Vec<String> {
    let mut out = Vec::new();
    for fam in ["-4", "-6"] {
        // Not the local table: the kernel's routes for the node's own addresses,
        // which for IPv6 appear only once duplicate address detection is done.
        let all = json_lines(node, &["ip", "-j", fam, "route", "show", "table", "all"]);
        for r in all.iter().filter(|r| r["table"] != "local") {
            out.push(format!(
                "{} {} dev {} table {}",
                r["type"].as_str().unwrap_or("unicast"),
                r["dst"].as_str().unwrap_or("?"),
                r["dev"].as_str().unwrap_or("-"),
                r["table"].as_str().unwrap_or("main")
            ));
        }
    }
    out.sort();
    out
}

fn collect_files(root: &Path, dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            collect_files(root, &path, prefix, out);
        } else if !(name == "lock"
            || name == ".weft-owners"
            || name.starts_with("last_reserved_ip"))
        {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            let text = std::fs::read(&path).unwrap_or_default();
            out.insert(
                format!("{prefix}{rel}"),
                String::from_utf8_lossy(&text).into_owned(),
            );
        }
    }
}
