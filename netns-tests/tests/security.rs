//! Security hardening, end to end with the release binaries, in throwaway network
//! namespaces and temp dirs:
//!
//! - hostile network names, container IDs and interface names are refused with the
//!   skel's precise errors before anything is written: nothing appears under the
//!   test's root (every dataDir, their parents, a canary dir) or next to it, and
//!   each refusal is logged on exactly one line (a line break in the input cannot
//!   forge log lines);
//! - names that pass validation but are too long for a file name stay inside the
//!   data directory; symlinks planted in state directories are replaced or
//!   refused, never written through;
//! - state is private whatever the umask: every file a plugin creates is 0600 and
//!   every directory 0700, the log file too (weftd's subnet.env excepted: 0644 in
//!   0755 directories, as flanneld writes it; a standalone overlay node's lock is
//!   0600 and its sync marker 0644);
//! - the plugin's own network namespace (the host's) is refused by every plugin
//!   that enters CNI_NETNS, before anything happens; DEL then runs host-side only;
//! - shell metacharacters in every string a runtime or a config passes reach no
//!   shell, and no product code spawns one;
//! - weftd's health server listens only where it is told, and neither its
//!   endpoints nor its logs (at trace level) nor the overlay plugins' logs reveal
//!   etcd passwords, TLS key contents or a Kubernetes token.

use netns_tests::etcd::EtcdCluster;
use netns_tests::weftd_cluster::{Cluster, ENDPOINT, Node, VXLAN_CONFIG, Weftd, wait_for};
use netns_tests::{CniErr, Outcome, PLUGINS, TempDir, TestNetns, bin_dir, require_root};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// PATH given to plugins (as the harness's [`netns_tests::Invocation`] does).
const PATH_VAR: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// host-local's range for the bridge and host-local configs.
const POD_SUBNET: &str = "10.61.0.0/24";
/// The node's subnet.env for flannel and the overlay plugins (agent mode).
const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.62.0.0/16\nFLANNEL_SUBNET=10.62.5.1/24\n\
                          FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
/// The refusal of one's own namespace, after `CNI_NETNS "<as given>" `.
const OWN_NETNS: &str = "is the plugin's own network namespace; refusing to configure it";

// --- running a plugin ---------------------------------------------------------------

/// One plugin run, like [`netns_tests::Invocation`] (cleared environment, config on
/// stdin, optionally inside a node netns), plus a working directory and a umask.
#[derive(Clone)]
struct Call {
    bin: PathBuf,
    node: Option<PathBuf>,
    vars: Vec<(String, String)>,
    stdin: Vec<u8>,
    cwd: Option<PathBuf>,
    umask: Option<libc::mode_t>,
}

impl Call {
    fn new(plugin: &str) -> Call {
        Call {
            bin: bin_dir().join(plugin),
            node: None,
            vars: Vec::new(),
            stdin: Vec::new(),
            cwd: None,
            umask: None,
        }
    }

    fn node(mut self, ns: &TestNetns) -> Call {
        self.node = Some(ns.path().to_path_buf());
        self
    }

    fn var(mut self, key: &str, value: impl Into<String>) -> Call {
        let value = value.into();
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_string(), value));
        self
    }

    fn conf(mut self, conf: &Value) -> Call {
        self.stdin = serde_json::to_vec(conf).unwrap();
        self
    }

    fn cwd(mut self, dir: &Path) -> Call {
        self.cwd = Some(dir.to_path_buf());
        self
    }

    fn umask(mut self, mask: libc::mode_t) -> Call {
        self.umask = Some(mask);
        self
    }

    fn run(&self) -> Outcome {
        assert!(
            self.bin.exists(),
            "build the plugins first: cargo build --release (looked for {})",
            self.bin.display()
        );
        let mut cmd = match &self.node {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.env_clear()
            .env("PATH", PATH_VAR)
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        if let Some(mask) = self.umask {
            // SAFETY: umask(2) is async-signal-safe and changes only the child.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("exec {}: {e}", self.bin.display()));
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let input = self.stdin.clone();
        let writer = std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
        let out = child.wait_with_output().expect("waiting for the plugin");
        let _ = writer.join();
        Outcome {
            status: out
                .status
                .code()
                .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A node netns with an `eth0` (a veth) (its "uplink", which no pod verb may touch), a
/// pod netns, and a root dir holding every file of every plugin: `data/` (the
/// dataDirs), `run/subnet.env`, `canary/` (a file no plugin has any business with)
/// and `cwd/` (the plugins' working directory in the shell tests).
struct Site {
    node: TestNetns,
    pod: TestNetns,
    root: TempDir,
}

impl Site {
    fn new() -> Option<Site> {
        if !require_root() {
            return None;
        }
        let site = Site {
            node: TestNetns::new(),
            pod: TestNetns::new(),
            root: TempDir::new("sec"),
        };
        site.node.exec_ok(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ]);
        site.node.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        for dir in ["data", "run", "canary", "cwd"] {
            std::fs::create_dir(site.root.join(dir)).unwrap();
        }
        std::fs::write(site.subnet_file(), SUBNET_ENV).unwrap();
        std::fs::write(site.root.join("canary/keep"), "precious\n").unwrap();
        Some(site)
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn subnet_file(&self) -> PathBuf {
        self.root.join("run/subnet.env")
    }

    /// Every plugin's dataDir under `data`, created now (as on a node that has run
    /// pods before), so a hostile input that is refused changes nothing at all.
    fn make_data_dirs(&self, data: &Path) {
        for p in ["ipam", "portmap", "flannel", "vxlan-overlay", "host-gw"] {
            std::fs::create_dir_all(data.join(p)).unwrap();
        }
    }

    /// A valid 1.1.0 config of `plugin` for network `name` with its state under
    /// `data`: bridge with host-local, ipMasq and macspoofchk; portmap with one
    /// mapping and a prevResult; the meta plugins delegating (agent mode: the
    /// site's subnet.env) to bridge `wsec1`.
    fn conf(&self, plugin: &str, name: &str, data: &Path) -> Value {
        let ipam = json!({"type": "host-local", "dataDir": data.join("ipam"),
            "ranges": [[{"subnet": POD_SUBNET}]]});
        let mut c = match plugin {
            "host-local" => json!({"ipam": ipam}),
            "bridge" => json!({"type": "bridge", "bridge": "wsec0", "isGateway": true,
                "ipMasq": true, "macspoofchk": true, "ipam": ipam}),
            "portmap" => json!({"type": "portmap", "dataDir": data.join("portmap"),
                "runtimeConfig": {"portMappings":
                    [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]},
                "prevResult": {"cniVersion": "1.1.0",
                    "interfaces": [{"name": "eth0", "sandbox": self.pod.path_str()}],
                    "ips": [{"address": "10.61.0.5/24", "interface": 0}]}}),
            meta => json!({"type": meta, "subnetFile": self.subnet_file(),
                "dataDir": data.join(meta), "ipam": {"dataDir": data.join("ipam")},
                "delegate": {"bridge": "wsec1"}}),
        };
        c["cniVersion"] = json!("1.1.0");
        c["name"] = json!(name);
        c
    }

    /// `plugin` run in the node for `cmd`, CNI_PATH set.
    fn call(&self, plugin: &str, cmd: &str, conf: &Value) -> Call {
        Call::new(plugin)
            .node(&self.node)
            .var("CNI_COMMAND", cmd)
            .var("CNI_PATH", bin_dir().display().to_string())
            .conf(conf)
    }

    /// [`Self::call`] for one attachment in the site's pod.
    fn pod_call(&self, plugin: &str, cmd: &str, cid: &str, ifname: &str, conf: &Value) -> Call {
        self.call(plugin, cmd, conf)
            .var("CNI_CONTAINERID", cid)
            .var("CNI_NETNS", self.pod.path_str())
            .var("CNI_IFNAME", ifname)
    }
}

// --- looking at the results -----------------------------------------------------------

/// Everything under `root`, recursively and without following symlinks: relative
/// path → `dir <mode>`, `file <mode> <content or length+hash>` or `link -> <target>`.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // removed meanwhile (a background DEL)
            };
            let mode = meta.permissions().mode() & 0o7777;
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {mode:o}")
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                let body = if bytes.len() <= 200 {
                    format!("{:?}", String::from_utf8_lossy(&bytes))
                } else {
                    use std::hash::{DefaultHasher, Hash, Hasher};
                    let mut h = DefaultHasher::new();
                    bytes.hash(&mut h);
                    format!("{} bytes {:016x}", bytes.len(), h.finish())
                };
                format!("file {mode:o} {body}")
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The links of `ns`, by name.
fn links(ns: &TestNetns) -> Vec<String> {
    let links = ns.exec_json(&["ip", "-j", "link", "show"]);
    let mut names: Vec<String> = links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn ruleset(ns: &TestNetns) -> String {
    ns.exec_ok(&["nft", "list", "ruleset"])
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A path next to the temp dirs (outside every test root) that a hostile name
/// would reach if it escaped: `/tmp/weft-sec-escape-<pid>`.
fn escape_target() -> PathBuf {
    std::env::temp_dir().join(format!("weft-sec-escape-{}", std::process::id()))
}

/// `../` enough times to leave any dataDir, then [`escape_target`].
fn escaping_relative_path() -> String {
    format!("{}{}", "../".repeat(16), escape_target().display())
}

/// Assert `out` is the CNI error `(code, msg, details)`, logged on exactly one
/// stderr line by `plugin`.
fn assert_refused(out: &Outcome, plugin: &str, what: &str, want: (u64, &str, Option<&str>)) {
    let e: CniErr = out.err();
    assert_eq!(
        (e.code, e.msg.as_str(), e.details.as_deref()),
        want,
        "{plugin} {what}:\n{out}"
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{plugin} {what}: one log line:\n{out}");
    assert!(
        lines[0].starts_with(&format!("{plugin} [")) && lines[0].contains("Warn: "),
        "{plugin} {what}: {:?}",
        lines[0]
    );
}

// --- hostile names --------------------------------------------------------------------

/// A hostile input and the skel's refusal of it: `(input, code, msg, details)`.
type Hostile = (String, u64, &'static str, Option<String>);

/// Network names the skel must refuse.
fn hostile_network_names() -> Vec<Hostile> {
    let bad = "invalid characters found in network name";
    let mut v: Vec<Hostile> = [
        "../x",
        "a/b",
        ".",
        "..",
        "./x",
        "a\0b",
        "a\nb",
        "x\r\nweft [1] Error: forged",
        "/etc",
        "-x",
        ".hidden",
        "_x",
        "a b",
        "a;touch X",
        "$(touch X)",
        "caf\u{e9}",
        "a\u{2028}b",
    ]
    .into_iter()
    .map(String::from)
    .chain([escaping_relative_path()])
    .map(|n| (n.clone(), 7, bad, Some(n)))
    .collect();
    v.push((String::new(), 7, "missing network name", None));
    v
}

/// Container IDs the skel must refuse.
fn hostile_container_ids() -> Vec<Hostile> {
    let bad = "invalid characters in containerID";
    let mut v: Vec<Hostile> = [
        "../../etc/x",
        "a/b",
        "..",
        ".",
        "../x",
        "/etc/passwd",
        "a\nb",
        "x\nhost-local [1] Error: forged",
        "-x",
        ".x",
        "_x",
        "a b",
        "a;touch X",
        "$(touch X)",
        "`touch X`",
        "c1@eth1",
        "a:b",
        "caf\u{e9}",
    ]
    .into_iter()
    .map(String::from)
    .chain([escaping_relative_path()])
    .map(|c| (c.clone(), 4, bad, Some(c)))
    .collect();
    v.push((
        String::new(),
        4,
        "required env variables [CNI_CONTAINERID] missing",
        None,
    ));
    v
}

/// Interface names the skel must refuse.
fn hostile_ifnames() -> Vec<Hostile> {
    let slash = "interface name contains / or : or whitespace characters";
    let dots = "interface name is . or ..";
    let long = "interface name is too long";
    let long_details = Some("interface name should be less than 16 characters".to_string());
    let mut v: Vec<Hostile> = [
        "../x",
        "a/b",
        "eth0/../..",
        "/",
        "../../../../etc",
        "a:b",
        "a b",
        "a\tb",
        "a\nb",
        "eth\u{a0}0",
    ]
    .into_iter()
    .map(|i| (i.to_string(), 4, slash, None))
    .collect();
    v.push((".".into(), 4, dots, None));
    v.push(("..".into(), 4, dots, None));
    for name in [
        "abcdefghijklmnop".to_string(),
        "../../../../../x".into(),
        "x".repeat(300),
        escaping_relative_path(),
    ] {
        v.push((name, 4, long, long_details.clone()));
    }
    v.push((
        String::new(),
        4,
        "required env variables [CNI_IFNAME] missing",
        None,
    ));
    v
}

/// Every verb of every plugin refuses every hostile network name, container ID and
/// interface name with the skel's code and message, before anything is done: the
/// test root (dataDirs, their parents, subnet.env, a canary) is byte for byte as
/// before, nothing appears outside it, the node's links and ruleset are untouched,
/// and each refusal is one log line.
#[test]
fn hostile_names_ids_and_ifnames_are_refused_before_anything_is_written() {
    let Some(site) = Site::new() else { return };
    let data = site.data();
    site.make_data_dirs(&data);
    let before = tree(site.root.path());
    let node_links = links(&site.node);
    let tried = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for plugin in PLUGINS {
            let (site, data, tried) = (&site, &data, &tried);
            s.spawn(move || {
                for (name, code, msg, details) in hostile_network_names() {
                    let mut conf = site.conf(plugin, &name, data);
                    conf["cni.dev/valid-attachments"] = json!([]);
                    for verb in ["ADD", "CHECK", "DEL", "GC", "STATUS"] {
                        let out = site.pod_call(plugin, verb, "c1", "eth0", &conf).run();
                        let what = format!("{verb} network name {name:?}");
                        assert_refused(&out, plugin, &what, (code, msg, details.as_deref()));
                        tried.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let conf = site.conf(plugin, "n1", data);
                for (cid, code, msg, details) in hostile_container_ids() {
                    for verb in ["ADD", "CHECK", "DEL"] {
                        let out = site.pod_call(plugin, verb, &cid, "eth0", &conf).run();
                        let what = format!("{verb} container ID {cid:?}");
                        assert_refused(&out, plugin, &what, (code, msg, details.as_deref()));
                        tried.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for (ifname, code, msg, details) in hostile_ifnames() {
                    for verb in ["ADD", "CHECK", "DEL"] {
                        let out = site.pod_call(plugin, verb, "c1", &ifname, &conf).run();
                        let what = format!("{verb} ifname {ifname:?}");
                        assert_refused(&out, plugin, &what, (code, msg, details.as_deref()));
                        tried.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let per_plugin = hostile_network_names().len() * 5
        + (hostile_container_ids().len() + hostile_ifnames().len()) * 3;
    assert_eq!(tried.into_inner(), per_plugin * PLUGINS.len());
    assert_eq!(tree(site.root.path()), before);
    assert!(!escape_target().exists());
    assert_eq!(links(&site.node), node_links);
    assert_eq!(links(&site.pod), ["lo"]);
    assert_eq!(ruleset(&site.node), "");
    eprintln!(
        "{} hostile inputs, {} refused invocations",
        hostile_network_names().len() + hostile_container_ids().len() + hostile_ifnames().len(),
        per_plugin * PLUGINS.len()
    );
}

/// A network name (300 bytes) or container ID (300 bytes) the skel accepts but no
/// file system takes as a name: the plugins that name a file by it fail with the
/// file system's error, the others work; either way nothing leaves the dataDirs and
/// nothing is left behind. A 255-byte container ID (the longest file name) works
/// for flannel, whose saved config is named by it.
#[test]
fn long_valid_names_stay_inside_the_data_dir() {
    let Some(site) = Site::new() else { return };
    let data = site.data();
    site.make_data_dirs(&data);
    let before = tree(site.root.path());
    let name = format!("n{}", "a".repeat(299));
    let too_long = |dir: &str, file: &str, verb: &str| {
        format!(
            "{verb} {}: File name too long (os error 36)",
            data.join(dir).join(file).display()
        )
    };
    let created = too_long("ipam", &name, "creating");
    for (plugin, msg) in [
        ("host-local", created.clone()),
        ("bridge", created.clone()),
        ("flannel", format!("failed to delegate add: {created}")),
        (
            "vxlan-overlay",
            format!("failed to delegate add: {created}"),
        ),
        ("host-gw", format!("failed to delegate add: {created}")),
    ] {
        let conf = site.conf(plugin, &name, &data);
        let out = site.pod_call(plugin, "ADD", "c1", "eth0", &conf).run();
        let e = out.err();
        assert_eq!((e.code, e.msg.as_str()), (999, msg.as_str()), "{plugin}");
    }
    // portmap names nothing after the network: it works, and DEL removes it all.
    let conf = site.conf("portmap", &name, &data);
    let prev = conf["prevResult"].clone();
    let out = site.pod_call("portmap", "ADD", "c1", "eth0", &conf).run();
    assert_eq!(out.ok(), prev);
    assert_eq!(std::fs::read_dir(data.join("portmap")).unwrap().count(), 1);
    site.pod_call("portmap", "DEL", "c1", "eth0", &conf)
        .run()
        .ok();

    // A 300-byte container ID: host-local keeps it inside the reservation file.
    let cid = format!("c{}", "b".repeat(299));
    let conf = site.conf("host-local", "n1", &data);
    let r = site
        .pod_call("host-local", "ADD", &cid, "eth0", &conf)
        .run();
    assert_eq!(r.ok()["ips"][0]["address"], "10.61.0.2/24");
    let reservation = std::fs::read_to_string(data.join("ipam/n1/10.61.0.2")).unwrap();
    assert_eq!(reservation, format!("{cid}\r\neth0"));
    site.pod_call("host-local", "DEL", &cid, "eth0", &conf)
        .run()
        .ok();
    // flannel names its saved config by it: the file system refuses the name.
    for plugin in ["flannel", "vxlan-overlay"] {
        let conf = site.conf(plugin, "n1", &data);
        let e = site
            .pod_call(plugin, "ADD", &cid, "eth0", &conf)
            .run()
            .err();
        let want = too_long(plugin, &cid, "writing");
        assert_eq!((e.code, e.msg.as_str()), (999, want.as_str()), "{plugin}");
    }
    // 255 bytes fit (the temporary file's name is shortened to fit as well).
    let cid255 = format!("c{}", "d".repeat(254));
    let conf = site.conf("flannel", "n1", &data);
    site.pod_call("flannel", "ADD", &cid255, "eth0", &conf)
        .run()
        .ok();
    let saved = data.join("flannel").join(&cid255);
    assert_eq!(mode(&saved), 0o600);
    site.pod_call("flannel", "DEL", &cid255, "eth0", &conf)
        .run()
        .ok();
    assert!(!saved.exists());

    // Nothing left: the files are gone (host-local's lock, pointer and cache stay,
    // inside the network's own directory), no pod interface, no rules of a pod.
    let mut after = tree(site.root.path());
    after.retain(|path, _| !path.starts_with("data/ipam/n1"));
    assert_eq!(after, before);
    assert!(!escape_target().exists());
    wait_for("the pod's interfaces to go", Duration::from_secs(5), || {
        (links(&site.pod) == ["lo"]).then_some(())
    });
}

// --- symlinks -------------------------------------------------------------------------

/// Symlinks planted where a plugin writes a file (flannel's saved config, a
/// host-local reservation, a portmap record), pointing at a canary file: the plugin
/// replaces or skips the link and never writes through it.
#[test]
fn symlinks_in_state_dirs_are_replaced_not_written_through() {
    let Some(site) = Site::new() else { return };
    let data = site.data();
    site.make_data_dirs(&data);
    let canary = site.root.join("canary");
    let canary_before = tree(&canary);
    let plant = |at: &Path| std::os::unix::fs::symlink(canary.join("keep"), at).unwrap();

    // flannel's saved config: the atomic rename replaces the link.
    let saved = data.join("flannel/c1");
    plant(&saved);
    let flannel = site.conf("flannel", "n1", &data);
    site.pod_call("flannel", "ADD", "c1", "eth0", &flannel)
        .run()
        .ok();
    let meta = std::fs::symlink_metadata(&saved).unwrap();
    assert!(meta.is_file(), "the link is replaced by a file");
    assert_eq!(mode(&saved), 0o600);
    let conf: Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(
        (&conf["type"], &conf["bridge"]),
        (&json!("bridge"), &json!("wsec1"))
    );

    // A host-local reservation: the name is taken (O_EXCL), the next address is used.
    let net = data.join("ipam/n2");
    std::fs::DirBuilder::new().mode(0o700).create(&net).unwrap();
    plant(&net.join("10.61.0.2"));
    let hl = site.conf("host-local", "n2", &data);
    let r = site.pod_call("host-local", "ADD", "c2", "eth0", &hl).run();
    assert_eq!(r.ok()["ips"][0]["address"], "10.61.0.3/24");
    site.pod_call("host-local", "DEL", "c2", "eth0", &hl)
        .run()
        .ok();
    assert!(std::fs::symlink_metadata(net.join("10.61.0.2")).is_ok_and(|m| m.is_symlink()));

    // portmap's record: replaced by the rename, then removed by DEL (the link is gone,
    // its target stays).
    let hash = weft_core::nft::hash_hex(&["c3", "eth0"]);
    let record = data.join(format!("portmap/{}/{hash}.json", &hash[..2]));
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    plant(&record);
    let pm = site.conf("portmap", "n3", &data);
    site.pod_call("portmap", "ADD", "c3", "eth0", &pm)
        .run()
        .ok();
    let rec: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(
        (&rec["containerID"], &rec["ifname"]),
        (&json!("c3"), &json!("eth0"))
    );
    assert!(std::fs::symlink_metadata(&record).unwrap().is_file());
    assert_eq!(mode(&record), 0o600);
    site.pod_call("portmap", "DEL", "c3", "eth0", &pm)
        .run()
        .ok();
    assert!(std::fs::symlink_metadata(&record).is_err());

    site.pod_call("flannel", "DEL", "c1", "eth0", &flannel)
        .run()
        .ok();
    assert!(std::fs::symlink_metadata(&saved).is_err());
    assert_eq!(
        tree(&canary),
        canary_before,
        "nothing written through a link"
    );
}

/// A link planted as host-local's network directory, `last_reserved_ip.0`,
/// `.weft-owners` or `lock` (the reference follows them all) never makes ADD write
/// or create the file it points at: the store opens every file O_NOFOLLOW, and ADD
/// refuses a network directory that is a symlink.
#[test]
fn host_local_never_writes_through_a_planted_symlink() {
    let Some(site) = Site::new() else { return };
    let data = site.data();
    site.make_data_dirs(&data);
    let canary = site.root.join("canary");
    std::fs::create_dir(canary.join("other")).unwrap();
    std::fs::write(canary.join("last"), "precious\n").unwrap();
    std::fs::write(canary.join("cache"), "precious\n").unwrap();
    let canary_before = tree(&canary);
    let link =
        |target: &str, at: PathBuf| std::os::unix::fs::symlink(canary.join(target), at).unwrap();
    // One network per planted link, so each is met on its own: the network's
    // directory itself, then the three files inside a real one.
    link("other", data.join("ipam/n1"));
    for (name, file, target) in [
        ("n2", "last_reserved_ip.0", "last"),
        ("n3", ".weft-owners", "cache"),
        ("n4", "lock", "new-lock"),
    ] {
        let net = data.join("ipam").join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&net).unwrap();
        link(target, net.join(file));
    }
    // Refused where writing would follow the link (an I/O error naming the path); the
    // cache is only a cache: it is ignored, and the ADD goes on without it.
    for (name, refused_at) in [
        ("n1", Some("ipam/n1")),
        ("n2", Some("last_reserved_ip.0")),
        ("n3", None),
        ("n4", Some("lock")),
    ] {
        let conf = site.conf("host-local", name, &data);
        let out = site
            .pod_call("host-local", "ADD", "c1", "eth0", &conf)
            .run();
        match refused_at {
            Some(path) => {
                let e = out.err();
                assert_eq!(e.code, 999, "{name}: {out}");
                assert!(
                    e.msg.contains(path) && e.msg.contains("symbolic links"),
                    "{name}: {}",
                    e.msg
                );
            }
            None => assert_eq!(out.status, 0, "{name}: {out}"),
        }
    }
    assert_eq!(tree(&canary), canary_before, "written through a link");
    // DEL still works where the directory is a link (an install that set one up
    // can release what it holds: its lock and cache then live where the link
    // points), but never takes a planted lock.
    for name in ["n1", "n2", "n3", "n4"] {
        let conf = site.conf("host-local", name, &data);
        let out = site
            .pod_call("host-local", "DEL", "c1", "eth0", &conf)
            .run();
        if name == "n4" {
            let e = out.err();
            assert!(
                e.msg
                    .ends_with("lock: Too many levels of symbolic links (os error 40)"),
                "{out}"
            );
        } else {
            assert_eq!(out.status, 0, "DEL {name}: {out}");
        }
    }
}

// --- modes ----------------------------------------------------------------------------

/// Every directory under `dir` is 0700 and every file 0600, all root's. Returns how
/// many of each were checked.
fn assert_private(dir: &Path) -> (usize, usize) {
    let (mut dirs, mut files) = (0, 0);
    let all = tree(dir.parent().unwrap());
    let prefix = dir.file_name().unwrap().to_string_lossy().into_owned();
    for (rel, what) in all.iter().filter(|(r, _)| r.starts_with(&prefix)) {
        let meta = std::fs::symlink_metadata(dir.parent().unwrap().join(rel)).unwrap();
        assert_eq!(meta.uid(), 0, "{rel}");
        if meta.is_dir() {
            assert!(what.starts_with("dir 700"), "{rel}: {what}");
            dirs += 1;
        } else {
            assert!(what.starts_with("file 600 "), "{rel}: {what}");
            files += 1;
        }
    }
    (dirs, files)
}

/// With umask 0 (the worst a runtime can give), everything host-local, bridge,
/// portmap, flannel and vxlan-overlay create is private: the data directories and
/// every directory above them that they create 0700, every state file 0600, and the
/// log file 0600. After DEL only host-local's per-network lock, pointer and cache
/// remain.
#[test]
fn state_is_private_whatever_the_umask() {
    let Some(site) = Site::new() else { return };
    let (pod2, pod3) = (TestNetns::new(), TestNetns::new());
    let fresh = site.root.join("fresh");
    let state = fresh.join("state");
    std::fs::create_dir(site.root.join("logs")).unwrap();
    let log = site.root.join("logs/plugins.log");
    let run = |call: Call| {
        call.umask(0)
            .var("WEFT_LOG", "debug")
            .var("WEFT_LOG_FILE", log.display().to_string())
            .run()
    };
    let bridge = site.conf("bridge", "n1", &state);
    let r = run(site.pod_call("bridge", "ADD", "c1", "eth0", &bridge)).ok();
    let mut portmap = site.conf("portmap", "n1", &state);
    portmap["prevResult"] = r.clone();
    assert_eq!(
        run(site.pod_call("portmap", "ADD", "c1", "eth0", &portmap)).ok(),
        r
    );
    let flannel = site.conf("flannel", "n2", &state);
    let flannel_call = |cmd: &str| {
        site.pod_call("flannel", cmd, "c2", "eth0", &flannel)
            .var("CNI_NETNS", pod2.path_str())
    };
    run(flannel_call("ADD")).ok();
    let overlay = site.conf("vxlan-overlay", "n2", &state);
    let overlay_call = |cmd: &str| {
        site.call("vxlan-overlay", cmd, &overlay)
            .var("CNI_CONTAINERID", "c3")
            .var("CNI_NETNS", pod3.path_str())
            .var("CNI_IFNAME", "net1")
    };
    run(overlay_call("ADD")).ok();

    let files = |dir: &str| {
        let mut v: Vec<String> = std::fs::read_dir(state.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let hash = weft_core::nft::hash_hex(&["c1", "eth0"]);
    assert_eq!(files("portmap"), [&hash[..2]]);
    assert_eq!(
        files(&format!("portmap/{}", &hash[..2])),
        [format!("{hash}.json")]
    );
    assert_eq!(files("flannel"), ["c2"]);
    assert_eq!(files("vxlan-overlay"), ["c3@net1"]);
    assert_eq!(files("ipam"), ["n1", "n2"]);
    assert_eq!(
        files("ipam/n2"),
        [
            ".weft-owners",
            "10.62.5.2",
            "10.62.5.3",
            "last_reserved_ip.0",
            "lock"
        ]
    );
    // Directories: fresh, fresh/state, its four dataDirs, two network dirs, portmap's
    // record subdirectory. Files: three records/saved configs, 4 + 5 in the network
    // dirs.
    assert_eq!(assert_private(&fresh), (9, 12));
    assert_eq!(mode(&log), 0o600);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("bridge ["), "{logged}");

    run(site.pod_call("portmap", "DEL", "c1", "eth0", &portmap)).ok();
    run(site.pod_call("bridge", "DEL", "c1", "eth0", &bridge)).ok();
    run(flannel_call("DEL")).ok();
    run(overlay_call("DEL")).ok();
    for dir in ["portmap", "flannel", "vxlan-overlay"] {
        assert_eq!(files(dir), Vec::<String>::new(), "{dir}");
    }
    for net in ["ipam/n1", "ipam/n2"] {
        assert_eq!(
            files(net),
            [".weft-owners", "last_reserved_ip.0", "lock"],
            "{net}"
        );
    }
    assert_eq!(assert_private(&fresh), (8, 6));
}

// --- the plugin's own network namespace -----------------------------------------------

/// The refusal of CNI_NETNS `path`.
fn own_netns_msg(path: &str) -> String {
    format!("CNI_NETNS {path:?} {OWN_NETNS}")
}

/// (device, inode) of a namespace file, when it can be read.
fn ns_id(path: &str) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// CNI_NETNS naming the namespace the plugin runs in (the node's, standing in for
/// the host's), by any path: every plugin that enters CNI_NETNS refuses ADD and
/// CHECK (code 4) before anything is done, though its config is valid and would
/// configure the node (the overlay plugins standalone: a lease, a VTEP, subnet.env).
/// DEL completes without the namespace and touches nothing in it: the node's `eth0`,
/// the CNI_IFNAME given, stays. host-local and portmap never enter CNI_NETNS (as the
/// reference's): they do their job, which changes nothing in that namespace.
#[test]
fn own_netns_is_refused_before_anything_happens() {
    let Some(site) = Site::new() else { return };
    let data = site.data();
    site.make_data_dirs(&data);
    site.node
        .exec_ok(&["ip", "addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    let link = site.root.join("run/nslink");
    std::os::unix::fs::symlink(site.node.path(), &link).unwrap();
    let paths = [
        site.node.path_str(),
        "/proc/self/ns/net".to_string(),
        "/proc/thread-self/ns/net".to_string(),
        link.display().to_string(),
    ];
    let conf = |plugin: &str| {
        let mut c = site.conf(plugin, "n1", &data);
        if let Some(backend) = match plugin {
            "vxlan-overlay" => Some("vxlan"),
            "host-gw" => Some("host-gw"),
            _ => None,
        } {
            c["subnetFile"] = json!(site.root.join("run/standalone/subnet.env"));
            c["podCIDR"] = json!("10.63.7.0/24");
            c["netConf"] = json!({"Network": "10.63.0.0/16", "Backend": {"Type": backend}});
            c["iface"] = json!("eth0");
        }
        c
    };
    let before = tree(site.root.path());
    let node_links = links(&site.node);
    let eth0 = site
        .node
        .exec_json(&["ip", "-j", "addr", "show", "dev", "eth0"]);
    let mut refused = 0;
    for plugin in ["bridge", "flannel", "vxlan-overlay", "host-gw"] {
        let conf = conf(plugin);
        for path in &paths {
            for verb in ["ADD", "CHECK"] {
                let out = site
                    .pod_call(plugin, verb, "c1", "eth0", &conf)
                    .var("CNI_NETNS", path.as_str())
                    .run();
                let msg = own_netns_msg(path);
                assert_refused(&out, plugin, verb, (4, &msg, None));
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 32);
    assert_eq!(tree(site.root.path()), before);
    assert_eq!(links(&site.node), node_links);
    assert_eq!(ruleset(&site.node), "");

    // DEL: host-side cleanup only, said in the log; the node's eth0 stays as it was.
    for plugin in PLUGINS {
        let conf = conf(plugin);
        for path in &paths {
            let out = site
                .pod_call(plugin, "DEL", "c1", "eth0", &conf)
                .var("CNI_NETNS", path.as_str())
                .run();
            assert_eq!(out.ok(), Value::Null, "{plugin} DEL");
            if !matches!(plugin, "host-local" | "portmap") {
                let warned = format!(
                    "Warn: DEL continues without the pod's namespace: {}",
                    own_netns_msg(path)
                );
                assert!(out.stderr.contains(&warned), "{plugin}: {}", out.stderr);
            }
        }
    }
    assert_eq!(tree(site.root.path()), before);
    assert_eq!(links(&site.node), node_links);
    assert_eq!(
        site.node
            .exec_json(&["ip", "-j", "addr", "show", "dev", "eth0"]),
        eth0
    );
    assert_eq!(ruleset(&site.node), "");

    // host-local and portmap ignore CNI_NETNS: they work, and the namespace keeps
    // its links (portmap's mapping is host state, which is its job).
    let hl = site.conf("host-local", "n1", &data);
    let pm = site.conf("portmap", "n1", &data);
    for (plugin, conf) in [("host-local", &hl), ("portmap", &pm)] {
        let out = site
            .pod_call(plugin, "ADD", "c1", "eth0", conf)
            .var("CNI_NETNS", "/proc/self/ns/net")
            .run();
        let r = out.ok();
        if plugin == "portmap" {
            assert_eq!(r, pm["prevResult"]);
        } else {
            assert_eq!(r["ips"][0]["address"], "10.61.0.2/24");
        }
        site.pod_call(plugin, "DEL", "c1", "eth0", conf)
            .var("CNI_NETNS", "/proc/self/ns/net")
            .run()
            .ok();
    }
    assert_eq!(links(&site.node), node_links);
}

/// The namespace of the test process itself (the machine's, unless the tests run in
/// a container), as `/proc/self/ns/net`, `/proc/thread-self/ns/net` and, when it is
/// the same namespace and readable, `/proc/1/ns/net`: refused by ADD and CHECK of
/// every plugin that enters CNI_NETNS. The plugins run here, outside any test
/// namespace, so every config is one that fails harmlessly in the plugin's own code
/// should the refusal be missing (bridge: a VLAN, refused before anything changes;
/// the meta plugins: no subnet.env, no saved config); that they do is shown first,
/// in a throwaway namespace. DEL is not run here: it proceeds without the namespace
/// by design (shown on a node above). host-local and portmap ignore CNI_NETNS and
/// fail on their config.
#[test]
fn the_test_hosts_own_netns_is_refused_with_harmless_configs() {
    if !require_root() {
        return;
    }
    let root = TempDir::new("sec-host");
    let missing = root.join("missing/subnet.env");
    let conf = |plugin: &str| {
        let mut c = match plugin {
            "bridge" => json!({"type": "bridge", "bridge": "wsecx", "vlan": 7,
                "ipam": {"type": "host-local", "dataDir": root.join("ipam"),
                    "ranges": [[{"subnet": POD_SUBNET}]]}}),
            "host-local" => json!({"ipam": {"type": "host-local", "dataDir": root.join("ipam")}}),
            "portmap" => json!({"type": "portmap", "dataDir": root.join("portmap"),
                "runtimeConfig": {"portMappings":
                    [{"hostPort": 0, "containerPort": 80, "protocol": "tcp"}]}}),
            meta => json!({"type": meta, "subnetFile": missing,
                "dataDir": root.join(meta), "ipam": {"dataDir": root.join("ipam")}}),
        };
        c["cniVersion"] = json!("1.1.0");
        c["name"] = json!("n1");
        c
    };
    let harmless = |plugin: &str, verb: &str| -> (u64, String) {
        let no_subnet_env = format!(
            "failed to load flannel 'subnet.env' file: open {}: no such file or directory. \
             Check the flannel pod log for this node.",
            missing.display()
        );
        match (plugin, verb) {
            ("bridge", _) => (2, "vlan=7 is not supported by weft's bridge yet".into()),
            ("host-local", _) => (7, "no IP ranges specified".into()),
            ("portmap", "ADD") => (
                7,
                "failed to parse config: Invalid host port number: 0".into(),
            ),
            ("portmap", _) => (7, "Required prevResult missing".into()),
            (_, "ADD") => (11, no_subnet_env),
            (meta, _) => (
                3,
                format!(
                    "no saved config for container \"c1\" interface \"eth0\" in {}",
                    root.join(meta).display()
                ),
            ),
        }
    };
    let call = |plugin: &str, verb: &str, netns: &str| {
        Call::new(plugin)
            .var("CNI_COMMAND", verb)
            .var("CNI_PATH", bin_dir().display().to_string())
            .var("CNI_CONTAINERID", "c1")
            .var("CNI_IFNAME", "eth0")
            .var("CNI_NETNS", netns)
            .conf(&conf(plugin))
    };
    // The configs are harmless: run for a real pod (in a throwaway node), each fails
    // in the plugin's own code, and nothing was created.
    let (node, pod) = (TestNetns::new(), TestNetns::new());
    for plugin in PLUGINS {
        for verb in ["ADD", "CHECK"] {
            let e = call(plugin, verb, &pod.path_str()).node(&node).run().err();
            let want = harmless(plugin, verb);
            assert_eq!((e.code, e.msg), want, "{plugin} {verb}");
        }
    }
    assert_eq!(links(&node), ["lo"]);
    assert_eq!(ruleset(&node), "");
    assert_eq!(tree(root.path()), BTreeMap::new());

    let mut paths = vec!["/proc/self/ns/net", "/proc/thread-self/ns/net"];
    match ns_id("/proc/1/ns/net") {
        Some(id) if Some(id) == ns_id("/proc/self/ns/net") => paths.push("/proc/1/ns/net"),
        other => {
            eprintln!("/proc/1/ns/net is not this namespace or unreadable ({other:?}): skipped")
        }
    }
    for plugin in PLUGINS {
        for path in &paths {
            for verb in ["ADD", "CHECK"] {
                let out = call(plugin, verb, path).run();
                let e = out.err();
                let want = match plugin {
                    "host-local" | "portmap" => harmless(plugin, verb),
                    _ => (4, own_netns_msg(path)),
                };
                assert_eq!((e.code, e.msg), want, "{plugin} {verb} {path}");
            }
        }
    }
    assert_eq!(tree(root.path()), BTreeMap::new());
}

/// A standalone overlay node's files next to subnet.env, brought up under umask 0:
/// the directory 0755 and subnet.env 0644 as flanneld writes them, the route record
/// 0644, and the lock and sync marker no other user can use: the lock 0600 (any
/// user who can open it can flock it, so the node never syncs again, or its first
/// bring-up waits forever), the marker not writable by others (its mtime decides
/// when the next sync is due).
#[test]
fn standalone_node_files_are_not_usable_by_other_users() {
    let Some(site) = Site::new() else { return };
    site.node
        .exec_ok(&["ip", "addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    let run_dir = site.root.join("fresh/run");
    let mut conf = site.conf("vxlan-overlay", "n1", &site.data());
    conf["subnetFile"] = json!(run_dir.join("subnet.env"));
    conf["podCIDR"] = json!("10.63.7.0/24");
    conf["netConf"] = json!({"Network": "10.63.0.0/16", "Backend": {"Type": "vxlan"}});
    conf["iface"] = json!("eth0");
    site.call("vxlan-overlay", "STATUS", &conf)
        .umask(0)
        .run()
        .ok();
    let octal = |p: &Path| format!("{:o}", mode(p));
    let modes: BTreeMap<String, String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_string().unwrap(), octal(&e.path()))
        })
        .chain([("(dir)".to_string(), octal(&run_dir))])
        .collect();
    let want: BTreeMap<String, String> = [
        ("(dir)", "755"),
        ("subnet.env", "644"),
        (".subnet.env.routes", "644"),
        (".subnet.env.lock", "600"),
        (".subnet.env.synced", "644"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(modes, want);
}

// --- no shell -------------------------------------------------------------------------

/// Shell payloads: any of them reaching a shell creates `X` in the plugin's working
/// directory or the file `y`.
fn shell_payloads(y: &Path) -> Vec<String> {
    let y = y.display();
    [
        "$(touch X)",
        "`touch X`",
        ";touch X",
        "|touch X",
        "&&touch X",
        "\ntouch X",
        "$(touch${IFS}X)",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        format!("$(touch {y})"),
        format!("';touch {y};'"),
        format!("\"`touch {y}`\""),
    ])
    .collect()
}

/// Shell payloads that are valid interface names (1-15 bytes, no '/', ':' or
/// whitespace): a pod interface gets such a name.
const IFNAME_PAYLOADS: [&str; 6] = ["$(id>X)", "`id>X`", ";id>X", "|id>X", "&id>X", "'$(id>X)'"];

/// The first `K=V` item of CNI_ARGS `args` that is not one: what the skel names.
fn bad_cni_args_pair(args: &str) -> Option<&str> {
    args.split(';')
        .filter(|s| !s.is_empty())
        .find(|i| i.split_once('=').is_none_or(|(k, _)| k.is_empty()))
}

/// Shell payloads in every string a runtime or a config hands a plugin never reach
/// a shell: no `X` appears in the plugins' working directory and no `Y` in the
/// canary dir. Interface names that are valid (the pod's interface is named by the
/// payload) go through bridge, portmap and flannel ADD, CHECK and DEL; CNI_ARGS
/// values through bridge and flannel; a bridge is named by payloads; config strings
/// (resolvConf, portmap conditions in both syntaxes, subnetFile, the IPAM and
/// delegate types, a MAC) and CNI_ARGS `MAC=`/`IP=` are refused with errors that
/// quote the payload as data. Container IDs and network names with payloads are
/// refused by validation (see the hostile-names test).
#[test]
fn shell_metacharacters_reach_no_shell() {
    let Some(site) = Site::new() else { return };
    let data = site.data();
    let cwd = site.root.join("cwd");
    let canary = site.root.join("canary");
    let canary_before = tree(&canary);
    let payloads = shell_payloads(&canary.join("Y"));
    let bin = bin_dir().display().to_string();
    let tried = std::cell::Cell::new(0);
    let run = |call: Call| {
        tried.set(tried.get() + 1);
        call.cwd(&cwd).run()
    };

    // Interface names: the pod's interfaces are named by the payloads.
    let bridge = site.conf("bridge", "n1", &data);
    let flannel = site.conf("flannel", "n2", &data);
    for (i, ifname) in IFNAME_PAYLOADS.iter().enumerate() {
        let cid = format!("b{i}");
        let r = run(site.pod_call("bridge", "ADD", &cid, ifname, &bridge)).ok();
        assert_eq!(r["interfaces"][2]["name"], *ifname);
        let mut checked = bridge.clone();
        checked["prevResult"] = r.clone();
        run(site.pod_call("bridge", "CHECK", &cid, ifname, &checked)).ok();
        let mut pm = site.conf("portmap", "n1", &data);
        pm["prevResult"] = r.clone();
        pm["runtimeConfig"]["portMappings"][0]["hostPort"] = json!(18080 + i);
        assert_eq!(
            run(site.pod_call("portmap", "ADD", &cid, ifname, &pm)).ok(),
            r
        );
        for verb in ["CHECK", "DEL"] {
            run(site.pod_call("portmap", verb, &cid, ifname, &pm)).ok();
        }
        run(site.pod_call("bridge", "DEL", &cid, ifname, &checked)).ok();

        let cid = format!("f{i}");
        let r = run(site.pod_call("flannel", "ADD", &cid, ifname, &flannel)).ok();
        assert!(data.join(format!("flannel/{cid}@{ifname}")).is_file());
        let mut checked = flannel.clone();
        checked["prevResult"] = r;
        run(site.pod_call("flannel", "CHECK", &cid, ifname, &checked)).ok();
        run(site.pod_call("flannel", "DEL", &cid, ifname, &checked)).ok();
    }

    // CNI_ARGS values, passed on to every delegate: fine as values, refused where
    // a ';' splits them into a pair without '='.
    for (i, p) in payloads.iter().enumerate() {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME={p};K8S_POD_UID={p}");
        for (plugin, conf) in [("bridge", &bridge), ("flannel", &flannel)] {
            let cid = format!("a{i}");
            let call = |verb: &str| {
                site.pod_call(plugin, verb, &cid, "eth0", conf)
                    .var("CNI_ARGS", args.as_str())
            };
            let out = run(call("ADD"));
            match bad_cni_args_pair(&args) {
                Some(pair) => {
                    let e = out.err();
                    let want = format!("CNI_ARGS: invalid pair {pair:?}");
                    assert_eq!((e.code, e.msg), (4, want), "{plugin} {p:?}");
                }
                None => {
                    out.ok();
                    run(call("DEL")).ok();
                }
            }
        }
    }

    // Bridges named by payloads.
    for name in &IFNAME_PAYLOADS[..2] {
        let mut c = bridge.clone();
        c["bridge"] = json!(name);
        let r = run(site.pod_call("bridge", "ADD", "br", "eth0", &c)).ok();
        assert_eq!(r["interfaces"][0]["name"], *name);
        assert!(links(&site.node).contains(&name.to_string()));
        run(site.pod_call("bridge", "DEL", "br", "eth0", &c)).ok();
    }

    // Config strings and CNI_ARGS values a plugin must interpret: refused, the
    // payload quoted as data.
    for p in &payloads {
        let with = |plugin: &str, key: &[&str], value: Value| {
            let mut c = site.conf(plugin, "n3", &data);
            let (last, path) = key.split_last().unwrap();
            let mut at = &mut c;
            for k in path {
                at = &mut at[*k];
            }
            at[*last] = value;
            c
        };
        let type_err = if p.contains('/') {
            format!("invalid plugin name: {p}")
        } else {
            format!("failed to find plugin {p:?} in path [{bin}]")
        };
        let nft_condition = format!("ip saddr != 192.0.2.0/24 {p}");
        let args_err = |key: &str, shown: &str| -> (u64, String) {
            match bad_cni_args_pair(&format!("{key}={p}")) {
                Some(pair) => (4, format!("CNI_ARGS: invalid pair {pair:?}")),
                None => (4, format!("CNI_ARGS: invalid {key} {shown:?}")),
            }
        };
        let cases: Vec<(&str, Value, &str, (u64, String))> = vec![
            (
                "host-local",
                with("host-local", &["ipam", "resolvConf"], json!(p)),
                "",
                (
                    7,
                    format!("resolvConf {p}: No such file or directory (os error 2)"),
                ),
            ),
            (
                "portmap",
                with("portmap", &["conditionsV4"], json!(["-s", p])),
                "",
                (
                    7,
                    format!("failed to parse config: conditionsV4: -s {p:?} is not an address"),
                ),
            ),
            (
                "flannel",
                with("flannel", &["subnetFile"], json!(p)),
                "",
                (
                    11,
                    format!(
                        "failed to load flannel 'subnet.env' file: open {p}: no such file or \
                         directory. Check the flannel pod log for this node."
                    ),
                ),
            ),
            (
                "bridge",
                with("bridge", &["ipam", "type"], json!(p)),
                "",
                (7, type_err.clone()),
            ),
            (
                "flannel",
                with("flannel", &["delegate", "type"], json!(p)),
                "",
                (7, type_err),
            ),
            (
                "bridge",
                with("bridge", &["runtimeConfig"], json!({"mac": p})),
                "",
                (7, format!("invalid MAC {p:?} in runtimeConfig.mac")),
            ),
            ("bridge", bridge.clone(), "MAC", args_err("MAC", p)),
            (
                "host-local",
                site.conf("host-local", "n3", &data),
                "IP",
                args_err("IP", p.trim()),
            ),
        ];
        for (plugin, conf, arg, want) in cases {
            let mut call = site.pod_call(plugin, "ADD", "c1", "eth0", &conf);
            if !arg.is_empty() {
                call = call.var("CNI_ARGS", format!("{arg}={p}"));
            }
            let e = run(call).err();
            assert_eq!((e.code, e.msg), want, "{plugin} {p:?}");
        }
        // portmap's nft conditions: a line break or ';' is refused up front; anything
        // else goes to nft as one rule's text, which nft rejects, naming it.
        let conf = with("portmap", &["conditionsV4"], json!([nft_condition]));
        let e = run(site.pod_call("portmap", "ADD", "c1", "eth0", &conf)).err();
        if p.contains(['\n', ';']) {
            let want = format!(
                "failed to parse config: conditionsV4: {nft_condition:?} may not contain a \
                 line break, ';' or '#'"
            );
            assert_eq!((e.code, e.msg), (7, want));
        } else {
            assert_eq!(e.code, 999, "{p:?}: {}", e.msg);
            assert!(e.msg.starts_with("portmap: nft failed: "), "{}", e.msg);
            assert!(e.msg.contains(&nft_condition), "{}", e.msg);
        }
    }

    assert_eq!(
        std::fs::read_dir(&cwd).unwrap().count(),
        0,
        "something ran in {cwd:?}"
    );
    assert_eq!(tree(&canary), canary_before);
    eprintln!(
        "{} payloads, {} invocations, no shell",
        payloads.len() + IFNAME_PAYLOADS.len(),
        tried.get()
    );
}

/// Product sources (every `.rs` under core/src, plugins/*/src, ipam/*/src and
/// agent/src) without their tests: `tests.rs` files are skipped and a file's
/// trailing `#[cfg(test)] mod tests` cut off. `(path relative to the workspace,
/// text)`.
fn product_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = netns_tests::workspace_root();
    let mut dirs = vec![root.join("core/src"), root.join("agent/src")];
    for parent in ["plugins", "ipam"] {
        for e in std::fs::read_dir(root.join(parent)).unwrap() {
            let src = e.unwrap().path().join("src");
            if src.is_dir() {
                dirs.push(src);
            }
        }
    }
    let mut files = Vec::new();
    for d in &dirs {
        walk(d, &mut files);
    }
    files.sort();
    files
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "tests.rs"))
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let product = match text.find("\n#[cfg(test)]\nmod tests") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            let rel = f.strip_prefix(&root).unwrap().display().to_string();
            (rel, product)
        })
        .collect()
}

/// No product code runs a shell: the only places that start a process are the
/// two that exec a binary directly with an argument vector (nft, found on PATH or
/// WEFT_NFT; a delegate plugin, found on CNI_PATH by a name without '/'), and no
/// product file names a shell or `-c` at all. A new spawn site fails this test
/// until it is reviewed and listed here.
#[test]
fn no_product_code_spawns_a_shell() {
    let sources = product_sources();
    assert!(sources.len() > 40, "found only {} files", sources.len());
    let spawn = [
        "Command::new(",
        "process::Command",
        "process::{",
        "unistd::exec",
        "libc::exec",
    ];
    let shell = [
        "\"sh\"",
        "\"bash\"",
        "/bin/sh",
        "/bin/bash",
        "\"-c\"",
        "libc::system",
        "popen",
        "posix_spawn",
    ];
    let mut sites = Vec::new();
    let mut shells = Vec::new();
    for (file, text) in &sources {
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("//") {
                continue;
            }
            if spawn.iter().any(|p| line.contains(p)) {
                sites.push(format!("{file}: {line}"));
            }
            if shell.iter().any(|p| line.contains(p)) {
                shells.push(format!("{file}: {line}"));
            }
        }
    }
    assert_eq!(
        shells,
        Vec::<String>::new(),
        "shell invocations in product code"
    );
    assert_eq!(
        sites,
        [
            "core/src/delegate.rs: let mut cmd = std::process::Command::new(binary);",
            "core/src/delegate.rs: fn spawn_retrying(cmd: &mut std::process::Command, \
             binary: &Path) -> Result<std::process::Child> {",
            "core/src/nft.rs: use std::process::{Command, Stdio};",
            "core/src/nft.rs: let mut cmd = Command::new(bin);",
        ],
        "process spawn sites in product code"
    );
}

// --- logs -----------------------------------------------------------------------------

/// A container ID carrying a line break and a forged log line: refused, and logged
/// on one line with the break escaped, to stderr or to WEFT_LOG_FILE (created 0600).
#[test]
fn log_lines_cannot_be_forged() {
    let dir = TempDir::new("sec-log");
    let conf = json!({"cniVersion": "1.1.0", "name": "n1",
        "ipam": {"type": "host-local", "dataDir": dir.join("ipam"),
            "ranges": [[{"subnet": POD_SUBNET}]]}});
    let cid = "c1\nhost-local [1] Error: forged\r\u{1b}[2J";
    let call = Call::new("host-local")
        .var("CNI_COMMAND", "ADD")
        .var("CNI_PATH", bin_dir().display().to_string())
        .var("CNI_CONTAINERID", cid)
        .var("CNI_IFNAME", "eth0")
        .var("CNI_NETNS", "/nonexistent")
        .conf(&conf);
    let escaped = "c1\\nhost-local [1] Error: forged\\r\\u{1b}[2J";
    let want = (4, "invalid characters in containerID", Some(cid));
    let out = call.run();
    assert_refused(&out, "host-local", "forged container ID", want);
    let line = format!("Warn: ADD failed: invalid characters in containerID; {escaped}\n");
    assert!(out.stderr.ends_with(&line), "{:?}", out.stderr);

    let log = dir.join("plugin.log");
    let out = call
        .var("WEFT_LOG_FILE", log.display().to_string())
        .umask(0)
        .run();
    assert_eq!(out.err().code, 4);
    assert_eq!(out.stderr, "");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(
        text.starts_with("host-local [") && text.ends_with(&line),
        "{text:?}"
    );
    assert_eq!(mode(&log), 0o600);
    assert_eq!(tree(dir.path()).len(), 1, "only the log file");
}

// --- weftd ----------------------------------------------------------------------------

/// Replace the value following `flag` in `args`.
fn set_arg(args: &mut [String], flag: &str, value: &str) {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} not in {args:?}"));
    args[i + 1] = value.to_string();
}

/// `curl -X method url` in `ns`: `Ok((status, body))`, or `Err(curl's exit code)`
/// when it got no answer (7: connection refused).
fn http(ns: &TestNetns, method: &str, url: &str) -> Result<(u16, String), i32> {
    let out = ns.exec(&[
        "curl",
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "3",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        url,
    ]);
    if !out.status.success() {
        return Err(out.status.code().unwrap_or(-1));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl -w adds a line");
    Ok((code.trim().parse().unwrap(), body.to_string()))
}

/// weftd's listening sockets in `ns` (TCP and UDP), one `ss` line each.
fn weftd_sockets(ns: &TestNetns) -> Vec<String> {
    ns.exec_ok(&["ss", "-Hltunp"])
        .lines()
        .filter(|l| l.contains("((\"weftd\""))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// Every endpoint of weftd's health server at `base` answers as documented, and no
/// body holds any of `secrets`: `/healthz`, `/readyz` (`ready` or not), `/metrics`
/// (nothing but weft's own samples), unknown paths and methods.
fn assert_endpoints_reveal_nothing(ns: &TestNetns, base: &str, ready: bool, secrets: &[&str]) {
    let get = |path: &str| http(ns, "GET", &format!("{base}{path}")).unwrap();
    let mut bodies = vec![];
    assert_eq!(get("/healthz"), (200, "ok\n".into()));
    let readyz = if ready {
        (200, "ready\n".to_string())
    } else {
        (503, "not ready\n".to_string())
    };
    assert_eq!(get("/readyz"), readyz);
    let (code, metrics) = get("/metrics");
    assert_eq!(code, 200);
    for line in metrics.lines() {
        let sample = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
            .unwrap_or(line);
        assert!(sample.starts_with("weft_"), "not weft's: {line:?}");
    }
    bodies.push(metrics);
    for path in [
        "/",
        "/nope",
        "/debug/pprof/",
        "/metrics/x",
        "/%2e%2e/etc/passwd",
        "/config",
    ] {
        assert_eq!(get(path), (404, "not found\n".into()), "{path}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = http(ns, "POST", &format!("{base}{path}")).unwrap();
        assert_eq!(r, (405, String::new()), "POST {path}");
    }
    for body in &bodies {
        for s in secrets {
            assert!(!body.contains(s), "{s:?} in {body}");
        }
    }
}

/// `log` holds none of `secrets`; with `verbose`, it was written at trace or debug
/// level, so a secret had every chance to show.
fn assert_log_reveals_nothing(log: &str, secrets: &[&str], verbose: bool) {
    for s in secrets {
        assert!(!log.contains(s), "{s:?} logged:\n{log}");
    }
    assert!(
        !verbose || log.contains("TRACE") || log.contains("DEBUG"),
        "not verbose:\n{log}"
    );
}

/// weftd's health server, told `--healthz-ip 10.77.0.1`, listens there and nowhere
/// else (one socket; loopback and the node's other addresses refuse connections);
/// its endpoints answer as documented and reveal nothing, the Kubernetes token
/// included, which its log does not hold either (run with `-v 10` and
/// `WEFT_LOG=trace`; in Kubernetes mode nothing logs below info, the HTTP client
/// included). subnet.env is written
/// as flanneld writes it (directories 0755, file 0644). With `--healthz-port 0`
/// there is no server at all.
#[test]
fn weftd_health_server_listens_only_where_told_and_reveals_nothing() {
    if !require_root() {
        return;
    }
    let (c, conf) = Cluster::storeless(VXLAN_CONFIG);
    let node = c.node(1);
    let (api, kubeconfig) = node.kube_api();
    node.ns
        .exec_ok(&["ip", "addr", "add", "10.99.0.9/32", "dev", "lo"]);
    let subnet_file = node.dir.join("run/flannel/subnet.env");
    let mut args = node.args(&[
        "--kube-subnet-mgr",
        "--kubeconfig-file",
        &kubeconfig,
        "--net-config-path",
        &conf,
        "-v",
        "10",
    ]);
    set_arg(&mut args, "--healthz-ip", "10.77.0.1");
    set_arg(
        &mut args,
        "--subnet-file",
        &subnet_file.display().to_string(),
    );
    let env = [("NODE_NAME", "kube-worker-1"), ("WEFT_LOG", "trace")];
    let mut weftd = Weftd::spawn(node, &args, &env);
    let base = "http://10.77.0.1:8081";
    wait_for("weftd ready on 10.77.0.1", Duration::from_secs(20), || {
        weftd.assert_running();
        let ready = http(&node.ns, "GET", &format!("{base}/readyz"));
        (ready == Ok((200, "ready\n".into()))).then_some(())
    });

    let sockets = weftd_sockets(&node.ns);
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    let fields: Vec<&str> = sockets[0].split(' ').collect();
    assert_eq!(
        (fields[0], fields[1], fields[4]),
        ("tcp", "LISTEN", "10.77.0.1:8081")
    );
    for other in ["127.0.0.1", "10.99.0.9", "10.99.0.1", "[::1]"] {
        let r = http(&node.ns, "GET", &format!("http://{other}:8081/healthz"));
        assert_eq!(r, Err(7), "{other} must refuse the connection");
    }
    let token = netns_tests::kube_api::DEFAULT_TOKEN;
    assert_endpoints_reveal_nothing(&node.ns, base, true, &[token]);
    assert!(
        api.requests()
            .iter()
            .all(|r| r.auth.as_deref() == Some("token"))
    );

    assert_eq!(mode(&subnet_file), 0o644);
    assert_eq!(mode(subnet_file.parent().unwrap()), 0o755);
    assert_eq!(mode(&node.dir.join("run")), 0o755);

    assert_eq!(weftd.terminate().code(), Some(0));
    assert_log_reveals_nothing(&weftd.log(), &[token], false);
    drop(weftd);

    set_arg(&mut args, "--healthz-port", "0");
    let mut quiet = Weftd::spawn(node, &args, &env);
    wait_for(
        "weftd ready without a server",
        Duration::from_secs(20),
        || {
            quiet.assert_running();
            quiet.log().contains(" ready ").then_some(())
        },
    );
    assert_eq!(weftd_sockets(&node.ns), Vec::<String>::new());
    assert_eq!(http(&node.ns, "GET", &format!("{base}/healthz")), Err(7));
    assert_eq!(quiet.terminate().code(), Some(0));
    assert_log_reveals_nothing(&quiet.log(), &[token], false);
    drop(quiet);
    drop(api);
}

/// Enable etcd authentication with user `root` and `password`.
fn enable_auth(etcd: &EtcdCluster, password: &str) {
    for (path, body) in [
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": password}),
        ),
        ("/v3/auth/role/add", json!({"name": "root"})),
        (
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/enable", json!({})),
    ] {
        etcd.call(path, &body);
    }
}

const PASSWORD: &str = "pw-R1ght-5ecret-4f1c";
const WRONG_PASSWORD: &str = "pw-Wr0ng-5ecret-77aa";
const DOWN_PASSWORD: &str = "pw-D0wn-5ecret-31bb";
/// An endpoint of the underlay where nothing listens.
const DOWN_ENDPOINT: &str = "http://10.77.0.100:2399";

/// weftd with `--etcd-username`/`--etcd-password`, at trace level (`-v 10`,
/// `WEFT_LOG=trace`), against etcd with authentication: with a wrong password and
/// against a store that is down (both retried, not ready), then with the right one
/// (ready). No password shows in its log or at any endpoint. Then the overlay
/// plugins with the same credentials in their `etcd` block (debug log to a file):
/// wrong password, store down, a backend mismatch after a successful login, and a
/// full standalone ADD/STATUS/DEL: no password in their replies, stderr, log file or
/// saved configs.
#[test]
fn etcd_passwords_are_never_revealed() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(2, VXLAN_CONFIG);
    enable_auth(c.etcd(), PASSWORD);
    let (n1, n2) = (c.node(1), c.node(2));
    let all = [PASSWORD, WRONG_PASSWORD, DOWN_PASSWORD];
    let etcd_args = |node: &Node, endpoint: &str, password: &str| {
        let mut a = node.args(&[
            "--etcd-username",
            "root",
            "--etcd-password",
            password,
            "-v",
            "10",
        ]);
        set_arg(&mut a, "--etcd-endpoints", endpoint);
        a
    };
    let trace = [("WEFT_LOG", "trace")];
    let mut wrong = Weftd::spawn(n1, &etcd_args(n1, ENDPOINT, WRONG_PASSWORD), &trace);
    let mut down = Weftd::spawn(n2, &etcd_args(n2, DOWN_ENDPOINT, DOWN_PASSWORD), &trace);
    for (node, w) in [(n1, &mut wrong), (n2, &mut down)] {
        wait_for("weftd to retry etcd", Duration::from_secs(15), || {
            w.assert_running();
            w.log()
                .contains("waiting for etcd (retrying every second)")
                .then_some(())
        });
        std::thread::sleep(Duration::from_millis(1200)); // another attempt
        w.assert_running();
        assert_endpoints_reveal_nothing(&node.ns, "http://127.0.0.1:8081", false, &all);
        assert!(node.subnet_env().is_none());
    }
    for w in [&mut wrong, &mut down] {
        // Still connecting: SIGTERM's default action ends it (nothing to clean up).
        let status = w.terminate();
        assert!(
            status.code() == Some(0) || status.signal() == Some(libc::SIGTERM),
            "{status:?}"
        );
        assert_log_reveals_nothing(&w.log(), &all, true);
    }
    drop((wrong, down));

    let mut weftd = Weftd::spawn(n1, &etcd_args(n1, ENDPOINT, PASSWORD), &trace);
    n1.wait_ready(&mut weftd);
    assert_endpoints_reveal_nothing(&n1.ns, "http://127.0.0.1:8081", true, &all);
    assert_eq!(weftd.terminate().code(), Some(0));
    assert_log_reveals_nothing(&weftd.log(), &all, true);
    drop(weftd);

    // The overlay plugins, standalone on node 2, the credentials in their conf.
    let pod = TestNetns::new();
    let log = n2.dir.join("plugins.log");
    let plugin_call = |plugin: &str, verb: &str, endpoint: &str, password: &str, dir: &str| {
        let d = n2.dir.join(dir);
        let conf = json!({"cniVersion": "1.1.0", "name": "cbr0", "type": plugin,
            "etcd": {"endpoints": [endpoint], "username": "root", "password": password},
            "iface": "eth0", "subnetFile": d.join("subnet.env"), "dataDir": d.join("data"),
            "ipam": {"dataDir": d.join("ipam")}});
        Call::new(plugin)
            .node(&n2.ns)
            .var("CNI_COMMAND", verb)
            .var("CNI_PATH", bin_dir().display().to_string())
            .var("CNI_CONTAINERID", "c1")
            .var("CNI_NETNS", pod.path_str())
            .var("CNI_IFNAME", "eth0")
            .var("WEFT_LOG", "debug")
            .var("WEFT_LOG_FILE", log.display().to_string())
            .conf(&conf)
    };
    let reveals_nothing = |out: &Outcome| {
        for s in all {
            assert!(
                !out.stdout.contains(s) && !out.stderr.contains(s),
                "{s}: {out}"
            );
        }
    };
    let connecting = |endpoint: &str| {
        format!("bringing the node up: connecting to etcd [\"{endpoint}\"]: grpc request error: ")
    };
    let failures = [
        (
            "vxlan-overlay",
            ENDPOINT,
            WRONG_PASSWORD,
            "wrong",
            11,
            connecting(ENDPOINT),
            "etcdserver: authentication failed, invalid user ID or password",
        ),
        (
            "vxlan-overlay",
            DOWN_ENDPOINT,
            DOWN_PASSWORD,
            "down",
            11,
            connecting(DOWN_ENDPOINT),
            "Connection refused",
        ),
        (
            "host-gw",
            ENDPOINT,
            PASSWORD,
            "mismatch",
            7,
            "the network config's backend is vxlan, but this plugin runs host-gw".to_string(),
            "",
        ),
    ];
    for (plugin, endpoint, password, dir, add_code, prefix, detail) in failures {
        for (verb, code) in [("ADD", add_code), ("STATUS", 50)] {
            let out = plugin_call(plugin, verb, endpoint, password, dir).run();
            reveals_nothing(&out);
            let e = out.err();
            assert_eq!(e.code, code, "{plugin} {verb} {dir}: {}", e.msg);
            assert!(
                e.msg.starts_with(&prefix) && e.msg.contains(detail),
                "{}",
                e.msg
            );
        }
        assert!(!n2.dir.join(dir).join("subnet.env").exists());
    }
    let ok = |verb: &str| plugin_call("vxlan-overlay", verb, ENDPOINT, PASSWORD, "ok").run();
    let out = ok("ADD");
    reveals_nothing(&out);
    out.ok();
    let saved = std::fs::read_to_string(n2.dir.join("ok/data/c1")).unwrap();
    assert!(!saved.contains(PASSWORD), "{saved}");
    for verb in ["STATUS", "DEL"] {
        let out = ok(verb);
        reveals_nothing(&out);
        out.ok();
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    for s in all {
        assert!(!logged.contains(s), "{s} in the plugins' log:\n{logged}");
    }
    assert!(logged.contains("vxlan-overlay ["), "{logged}");
}

/// TLS client keys: weftd at trace level with the real key (ready), with a key
/// file that is no key but holds a marker (PEM-framed, and plain text: retried like
/// a store that is down), and vxlan-overlay with those in its `etcd` block (code
/// 11): no line of the key and no marker in any log, reply or endpoint.
#[test]
fn tls_key_contents_are_never_revealed() {
    if !require_root() {
        return;
    }
    let c = Cluster::new_tls(1, VXLAN_CONFIG);
    let etcd = c.etcd();
    let node = c.node(1);
    let https = etcd.endpoint(0).to_string();
    let key_text = std::fs::read_to_string(etcd.client_key_path()).unwrap();
    let marker = "KeyMarker-8c1e5ee7-not-a-key";
    let marker_b64 = netns_tests::base64::encode(marker.as_bytes());
    let mut secrets: Vec<&str> = key_text
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .collect();
    assert!(secrets.len() >= 3, "{key_text}");
    secrets.extend([marker, marker_b64.as_str()]);
    let pem_key = node.dir.join("bogus-pem.key");
    std::fs::write(
        &pem_key,
        format!("-----BEGIN PRIVATE KEY-----\n{marker_b64}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    let text_key = node.dir.join("bogus-text.key");
    std::fs::write(&text_key, format!("{marker}\n")).unwrap();
    let path = |p: &Path| p.display().to_string();
    let (ca, cert) = (path(etcd.ca_path()), path(etcd.client_cert_path()));
    let args = |key: &str| {
        let mut a = node.args(&[
            "--etcd-cafile",
            &ca,
            "--etcd-certfile",
            &cert,
            "--etcd-keyfile",
            key,
            "-v",
            "10",
        ]);
        set_arg(&mut a, "--etcd-endpoints", &https);
        a
    };
    let trace = [("WEFT_LOG", "trace")];

    let mut weftd = Weftd::spawn(node, &args(&path(etcd.client_key_path())), &trace);
    node.wait_ready(&mut weftd);
    assert_endpoints_reveal_nothing(&node.ns, "http://127.0.0.1:8081", true, &secrets);
    assert_eq!(weftd.terminate().code(), Some(0));
    assert_log_reveals_nothing(&weftd.log(), &secrets, true);
    drop(weftd);
    // A PEM-shaped key that is no key: weftd retries every second, as for a store
    // that is down (the key is parsed when connecting), and says no more than
    // "transport error".
    let warning = format!(
        "WARN weftd::daemon: waiting for etcd (retrying every second) error=connecting \
         to etcd [\"{https}\"]: transport error: transport error"
    );
    let mut w = Weftd::spawn(node, &args(&path(&pem_key)), &trace);
    wait_for("weftd to retry", Duration::from_secs(15), || {
        w.assert_running();
        w.log().contains(&warning).then_some(())
    });
    let status = w.terminate();
    assert!(
        status.code() == Some(0) || status.signal() == Some(libc::SIGTERM),
        "{status:?}"
    );
    assert_log_reveals_nothing(&w.log(), &secrets, false);
    drop(w);
    // A key file with no PEM block at all is refused at once, named, not shown.
    let no_pem = format!(
        "the etcd key file {} holds no PEM private key",
        path(&text_key)
    );
    let mut w = Weftd::spawn(node, &args(&path(&text_key)), &trace);
    let (status, log) = (w.wait_exit(Duration::from_secs(15)), w.log());
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains(&no_pem), "{log}");
    assert_log_reveals_nothing(&log, &secrets, false);

    let pod = TestNetns::new();
    for key in [&pem_key, &text_key] {
        let d = node.dir.join("plugin");
        let conf = json!({"cniVersion": "1.1.0", "name": "cbr0", "type": "vxlan-overlay",
            "etcd": {"endpoints": [https], "caFile": ca, "certFile": cert, "keyFile": key},
            "iface": "eth0", "subnetFile": d.join("subnet.env"), "dataDir": d.join("data"),
            "ipam": {"dataDir": d.join("ipam")}});
        let log = node.dir.join("plugin.log");
        let out = Call::new("vxlan-overlay")
            .node(&node.ns)
            .var("CNI_COMMAND", "ADD")
            .var("CNI_PATH", bin_dir().display().to_string())
            .var("CNI_CONTAINERID", "c1")
            .var("CNI_NETNS", pod.path_str())
            .var("CNI_IFNAME", "eth0")
            .var("WEFT_LOG", "debug")
            .var("WEFT_LOG_FILE", log.display().to_string())
            .conf(&conf)
            .run();
        let logged = std::fs::read_to_string(&log).unwrap();
        for s in &secrets {
            assert!(
                !out.stdout.contains(s) && !out.stderr.contains(s),
                "{s}: {out}"
            );
            assert!(!logged.contains(s), "{s}: {logged}");
        }
        let e = out.err();
        let want = if key == &pem_key {
            let m = format!("connecting to etcd [\"{https}\"]: transport error: transport error");
            (11, m)
        } else {
            (7, format!("invalid network config: {no_pem}"))
        };
        let want = (want.0, format!("bringing the node up: {}", want.1));
        assert_eq!((e.code, e.msg), want, "{}", key.display());
    }
}

/// weftd's command line: `--help` shows the password flag but not the value
/// FLANNELD_ETCD_PASSWORD holds; parse errors name the bad argument, never the
/// password given next to it. (Run in a throwaway netns, though weftd exits before
/// it does anything.)
#[test]
fn weftd_flags_never_echo_the_password() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(bin_dir().join("weftd"))
            .args(args)
            .env_clear()
            .env("PATH", PATH_VAR)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let env = [("FLANNELD_ETCD_PASSWORD", PASSWORD)];
    let help = run(&["--help"], &env);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("--etcd-password"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    let with_flag = format!("--etcd-password={PASSWORD}");
    for (args, env) in [
        (vec!["--etcd-password", PASSWORD, "--no-such-flag"], &[][..]),
        (
            vec![with_flag.as_str(), "--subnet-lease-renew-margin=0"],
            &[],
        ),
        (vec!["--etcd-password", PASSWORD, "--ip-masq=maybe"], &[]),
        (vec!["--etcd-password", PASSWORD, "extra"], &[]),
        (vec!["--ip-masq=maybe"], &env[..]),
        (vec!["-v", "x"], &env[..]),
    ] {
        let out = run(&args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!stderr.contains(PASSWORD), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
}

/// weftd's established connections on its health port in `ns`.
fn health_connections(ns: &TestNetns) -> usize {
    ns.exec_ok(&["ss", "-Htnp", "state", "established", "( sport = :8081 )"])
        .lines()
        .filter(|l| l.contains("((\"weftd\""))
        .count()
}

/// Whoever reaches the health port cannot exhaust weftd: of 200 idle connections
/// it holds at most 64 (the rest are closed at once) and closes those within its
/// header timeout (5 s; at most 10 s for any connection), so weftd keeps its file
/// descriptors for its real work and answers again right after. A request is
/// answered and the connection closed (no keep-alive). Before, every connection
/// was kept open forever: with 200 file descriptors, 300 idle connections made
/// weftd fail to restore its rules ("Too many open files") and spin on accept.
#[test]
fn weftd_health_server_survives_a_connection_flood() {
    if !require_root() {
        return;
    }
    let (c, conf) = Cluster::storeless(VXLAN_CONFIG);
    let node = c.node(1);
    let mut weftd = node.pod_cidr_weftd(&conf);
    let addr: std::net::SocketAddr = "127.0.0.1:8081".parse().unwrap();

    let mut one = netns_tests::inside(&node.ns, || std::net::TcpStream::connect(addr)).unwrap();
    one.write_all(b"GET /healthz HTTP/1.1\r\nHost: weftd\r\n\r\n")
        .unwrap();
    one.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut one, &mut answer).expect("EOF after the answer");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");

    let flood: Vec<std::net::TcpStream> = netns_tests::inside(&node.ns, || {
        (0..200)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect()
    });
    std::thread::sleep(Duration::from_millis(500));
    let held = health_connections(&node.ns);
    assert!((1..=64).contains(&held), "{held} connections held");
    wait_for(
        "the idle connections to be closed",
        Duration::from_secs(12),
        || (health_connections(&node.ns) == 0).then_some(()),
    );
    for mut conn in flood {
        conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 1];
        let r = std::io::Read::read(&mut conn, &mut buf);
        assert!(
            matches!(r, Ok(0)) || r.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
        );
    }
    assert_eq!(node.http("/healthz"), (200, "ok\n".to_string()));
    weftd.assert_running();
    let log = weftd.log();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(
        log.contains("health server: 64 connections open, closing new ones"),
        "{log}"
    );
}
