//! conf-examples/kube-weft.yml, the Kubernetes deployment (kube-flannel.yml's
//! objects with weftd): every document is a Kubernetes object, the ConfigMap is
//! the conf-examples files byte for byte, the release weftd accepts the
//! DaemonSet's flags, the probes reach its health server, the init containers'
//! scripts really install the plugins and the conflist (run here against scratch
//! directories), and the RBAC rules are exactly the API calls weftd makes.
//! No root needed; the flag check needs `target/release/weftd` (or `$WEFT_BIN_DIR`).

use netns_tests::{TempDir, bin_dir, workspace_root};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

const MANIFEST: &str = "conf-examples/kube-weft.yml";
const NAMESPACE: &str = "kube-weft";
const CONFIG_MAP: &str = "kube-weft-cfg";
const DAEMON_SET: &str = "kube-weft-ds";
/// What the install-cni-plugin init container must install besides the conflist's
/// own plugins: flannel's delegate (bridge) and its IPAM (host-local).
const DELEGATES: [&str; 2] = ["bridge", "host-local"];

fn read(rel: &str) -> Vec<u8> {
    let path = workspace_root().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every YAML document of the manifest, as JSON.
fn documents() -> Vec<Value> {
    let text = String::from_utf8(read(MANIFEST)).expect("the manifest is UTF-8");
    serde_yaml_ng::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{MANIFEST} document {i}: {e}"))
        })
        .collect()
}

/// The one object of `kind`.
fn object(kind: &str) -> Value {
    let mut found: Vec<Value> = documents()
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "{MANIFEST}: one {kind}");
    found.remove(0)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} is not a string in {v:#}"))
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{pointer} is not a list in {v:#}"))
}

fn pod_spec() -> Value {
    object("DaemonSet")["spec"]["template"]["spec"].clone()
}

/// The container (or init container, `list` = "initContainers") called `name`.
fn container(spec: &Value, list: &str, name: &str) -> Value {
    array_at(spec, &format!("/{list}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} entry {name}"))
        .clone()
}

fn main_container() -> Value {
    let spec = pod_spec();
    let containers = array_at(&spec, "/containers");
    assert_eq!(containers.len(), 1, "one container: weftd");
    containers[0].clone()
}

/// The main container's command line: command, then args.
fn weftd_argv() -> Vec<String> {
    let c = main_container();
    array_at(&c, "/command")
        .iter()
        .chain(c["args"].as_array().into_iter().flatten())
        .map(|a| a.as_str().expect("string arguments").to_string())
        .collect()
}

/// The value of `--flag` in `args` (`--flag=v`, `-flag=v` or `--flag v`).
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        let name = a.trim_start_matches('-');
        if !a.starts_with('-') {
            return None;
        }
        match name.split_once('=') {
            Some((n, v)) if n == flag => Some(v.to_string()),
            None if name == flag => args.get(i + 1).cloned(),
            _ => None,
        }
    })
}

/// Run the release weftd with `args` and nothing from our environment (no
/// FLANNELD_* variable may change its view of the flags).
fn weftd(args: &[String]) -> Output {
    let bin = bin_dir().join("weftd");
    assert!(
        bin.exists(),
        "{} is missing: cargo build --release --workspace --bins",
        bin.display()
    );
    Command::new(&bin)
        .env_clear()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

/// weftd's `--help`, for the defaults of flags the manifest leaves out.
fn help_default(flag: &str) -> String {
    let out = weftd(&["--help".into()]);
    assert!(out.status.success(), "weftd --help: {out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let header = format!("--{flag} ");
    let start = help
        .lines()
        .position(|l| l.trim_start().starts_with(&header))
        .unwrap_or_else(|| panic!("--{flag} is not in weftd --help"));
    let entry: String = help
        .lines()
        .skip(start + 1)
        .take_while(|l| !l.trim_start().starts_with('-'))
        .collect();
    let (_, rest) = entry
        .split_once("[default: ")
        .unwrap_or_else(|| panic!("--{flag} has no default in weftd --help"));
    rest.split_once(']').unwrap().0.to_string()
}

/// A flag's value in the manifest's command line, else weftd's default.
fn effective(flag: &str) -> String {
    flag_value(&weftd_argv(), flag).unwrap_or_else(|| help_default(flag))
}

/// The node path a container sees at `path`: (volume name, mountPath) of the
/// mount containing it.
fn mount_of(c: &Value, path: &str) -> Option<(String, String)> {
    c["volumeMounts"]
        .as_array()?
        .iter()
        .map(|m| {
            (
                str_at(m, "/name").to_string(),
                str_at(m, "/mountPath").trim_end_matches('/').to_string(),
            )
        })
        .filter(|(_, mp)| path == mp || path.starts_with(&format!("{mp}/")))
        .max_by_key(|(_, mp)| mp.len())
}

fn volume(name: &str) -> Value {
    array_at(&pod_spec(), "/volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
        .clone()
}

/// `path` in container `c` is the node's `host_path` (a hostPath volume mounted
/// at the same place).
fn assert_host_path(c: &Value, path: &str, host_path: &str) {
    let (vol, mount) =
        mount_of(c, path).unwrap_or_else(|| panic!("{path} is not mounted in {}", c["name"]));
    assert_eq!(mount, path, "{}: {path} is its own mount", c["name"]);
    assert_eq!(
        str_at(&volume(&vol), "/hostPath/path"),
        host_path,
        "volume {vol}"
    );
}

/// `path` in container `c` is key `key` of our ConfigMap.
fn assert_config_map_key(c: &Value, path: &str, key: &str) {
    let (vol, mount) =
        mount_of(c, path).unwrap_or_else(|| panic!("{path} is not mounted in {}", c["name"]));
    assert_eq!(str_at(&volume(&vol), "/configMap/name"), CONFIG_MAP);
    assert_eq!(path, format!("{mount}/{key}"), "{}: {path}", c["name"]);
    assert!(
        object("ConfigMap")["data"].get(key).is_some(),
        "no key {key}"
    );
}

#[test]
fn documents_are_kubernetes_objects() {
    let docs = documents();
    let mut kinds = BTreeSet::new();
    for (i, d) in docs.iter().enumerate() {
        assert!(d.is_object(), "document {i} is not an object: {d}");
        let (api, kind, name) = (
            str_at(d, "/apiVersion"),
            str_at(d, "/kind"),
            str_at(d, "/metadata/name"),
        );
        assert!(!name.is_empty(), "document {i}: empty name");
        let want_api = match kind {
            "Namespace" | "ServiceAccount" | "ConfigMap" => "v1",
            "ClusterRole" | "ClusterRoleBinding" => "rbac.authorization.k8s.io/v1",
            "DaemonSet" => "apps/v1",
            _ => panic!("document {i}: unexpected kind {kind}"),
        };
        assert_eq!(api, want_api, "{kind} {name}");
        let cluster_scoped = matches!(kind, "Namespace" | "ClusterRole" | "ClusterRoleBinding");
        assert_eq!(
            d.pointer("/metadata/namespace").and_then(Value::as_str),
            (!cluster_scoped).then_some(NAMESPACE),
            "{kind} {name}: namespace"
        );
        assert!(kinds.insert(kind.to_string()), "two {kind}s");
    }
    let want: BTreeSet<String> = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, want);
    assert_eq!(str_at(&object("Namespace"), "/metadata/name"), NAMESPACE);
    assert_eq!(str_at(&object("ConfigMap"), "/metadata/name"), CONFIG_MAP);
    assert_eq!(str_at(&object("DaemonSet"), "/metadata/name"), DAEMON_SET);

    // The selector picks the template's pods.
    let ds = object("DaemonSet");
    let selector = ds["spec"]["selector"]["matchLabels"].as_object().unwrap();
    for (k, v) in selector {
        assert_eq!(&ds["spec"]["template"]["metadata"]["labels"][k], v, "{k}");
    }
}

#[test]
fn config_map_is_the_conf_examples_files() {
    let cm = object("ConfigMap");
    let data = cm["data"].as_object().unwrap();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["cni-conf.json", "net-conf.json"]
    );
    for (key, file) in [
        ("cni-conf.json", "conf-examples/10-flannel.conflist"),
        ("net-conf.json", "conf-examples/net-conf.json"),
    ] {
        let value = str_at(&cm, &format!("/data/{key}"));
        assert!(
            value.as_bytes() == read(file).as_slice(),
            "{key} differs from {file}:\n{value}"
        );
    }
}

#[test]
fn daemon_set_pod_spec() {
    let spec = pod_spec();
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert!(
        array_at(&spec, "/tolerations")
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t["effect"] == "NoSchedule"
                && t["key"].is_null()),
        "tolerates every NoSchedule taint"
    );
    let sa = object("ServiceAccount");
    assert_eq!(spec["serviceAccountName"], sa["metadata"]["name"]);
    assert_ne!(
        sa["automountServiceAccountToken"], false,
        "weftd's in-cluster credentials"
    );

    // Every mount has its volume; every volume is used.
    let mut used = BTreeSet::new();
    for c in array_at(&spec, "/initContainers")
        .iter()
        .chain(array_at(&spec, "/containers"))
    {
        assert_eq!(
            c["image"], "weft:latest",
            "{}: the documented image",
            c["name"]
        );
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            volume(str_at(m, "/name"));
            used.insert(str_at(m, "/name").to_string());
        }
    }
    for v in array_at(&spec, "/volumes") {
        assert!(used.contains(str_at(v, "/name")), "unused volume {v}");
        if let Some(path) = v.pointer("/hostPath/path").and_then(Value::as_str) {
            // weft writes nftables with nft: no iptables lock; no module tree.
            assert!(
                !matches!(path, "/run/xtables.lock" | "/lib/modules"),
                "{path} is not needed"
            );
        }
    }

    // weftd: unprivileged, with exactly the capabilities it uses.
    let c = main_container();
    assert_eq!(c["securityContext"]["privileged"], false);
    let caps: BTreeSet<&str> = array_at(&c, "/securityContext/capabilities/add")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(caps, BTreeSet::from(["NET_ADMIN", "NET_RAW"]));

    // Its node name (NODE_NAME, else POD_NAMESPACE/POD_NAME) from the downward API.
    for (var, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let env = array_at(&c, "/env")
            .iter()
            .find(|e| e["name"] == var)
            .unwrap_or_else(|| panic!("no {var}"));
        assert_eq!(str_at(env, "/valueFrom/fieldRef/fieldPath"), field, "{var}");
    }

    // Its files: the network config from the ConfigMap, subnet.env on the node.
    let net_conf = effective("net-config-path");
    assert_config_map_key(&c, &net_conf, "net-conf.json");
    let subnet_file = effective("subnet-file");
    let dir = Path::new(&subnet_file).parent().unwrap().to_str().unwrap();
    assert_eq!(dir, "/run/flannel", "the CNI plugins read subnet.env there");
    assert_host_path(&c, dir, "/run/flannel");
}

#[test]
fn weftd_accepts_the_daemon_set_flags() {
    let argv = weftd_argv();
    assert_eq!(argv[0], "/usr/local/bin/weftd");
    let dockerfile = String::from_utf8(read("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(&format!("/src/target/release/weftd {}", argv[0])),
        "the image puts weftd at {}",
        argv[0]
    );
    let args = &argv[1..];
    for flag in ["--ip-masq", "--kube-subnet-mgr"] {
        assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
    }

    // weftd has no parse-only mode, but clap parses and validates every argument
    // before a trailing --version (names and values), then exits 0 without
    // starting anything.
    let with_version = |extra: &[&str]| {
        let mut a = args.to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push("--version".into());
        weftd(&a)
    };
    let out = with_version(&[]);
    assert!(
        out.status.success(),
        "weftd refuses the DaemonSet's flags {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("weftd "));
    // The control: a bad name or value before --version does fail.
    for bad in [
        &["--no-such-flag"][..],
        &["--healthz-port=x"],
        &["--ip-masq=maybe"],
    ] {
        let out = with_version(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
}

#[test]
fn probes_reach_the_health_server() {
    let c = main_container();
    let port: u16 = effective("healthz-port").parse().unwrap();
    assert_ne!(port, 0, "--healthz-port 0 turns the health server off");
    // kubelet probes a hostNetwork pod at the node's address.
    let ip: std::net::IpAddr = effective("healthz-ip").parse().unwrap();
    assert!(
        !ip.is_loopback(),
        "--healthz-ip {ip}: kubelet cannot reach it"
    );
    let declared: Vec<(String, u16)> = array_at(&c, "/ports")
        .iter()
        .map(|p| {
            let n = p["containerPort"].as_u64().unwrap();
            (p["name"].as_str().unwrap_or("").to_string(), n as u16)
        })
        .collect();
    assert!(
        declared.iter().any(|(_, n)| *n == port),
        "containerPort {port} declared (hostNetwork: the scheduler sees the host port)"
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        let probe_port = match &get["port"] {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(name) => {
                declared
                    .iter()
                    .find(|(n, _)| n == name)
                    .unwrap_or_else(|| panic!("{probe}: no port named {name}"))
                    .1
            }
            other => panic!("{probe}: port {other}"),
        };
        assert_eq!(probe_port, port, "{probe} port");
        assert!(get["host"].is_null(), "{probe}: the node's address");
        assert!(
            get["scheme"].is_null() || get["scheme"] == "HTTP",
            "{probe}: plain HTTP"
        );
    }
}

/// Run an init container's `/bin/sh -c` script with its absolute paths moved
/// under scratch directories.
fn run_init_script(c: &Value, paths: &[(&str, &Path)]) {
    let command: Vec<&str> = array_at(c, "/command")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(command[..2], ["/bin/sh", "-ec"], "{}", c["name"]);
    let mut script = command[2].to_string();
    for (from, to) in paths {
        script = script.replace(from, to.to_str().unwrap());
    }
    let out = Command::new("/bin/sh")
        .arg("-ec")
        .arg(&script)
        .args(&command[3..])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {out:?}\n{script}", c["name"]);
}

/// The files `dir` holds.
fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn init_containers_install_the_plugins_and_the_conflist() {
    let spec = pod_spec();
    let cni_conf: Value =
        serde_json::from_slice(&read("conf-examples/10-flannel.conflist")).unwrap();
    assert_eq!(cni_conf["name"], "cbr0");
    let mut wanted: BTreeSet<String> = array_at(&cni_conf, "/plugins")
        .iter()
        .map(|p| str_at(p, "/type").to_string())
        .collect();
    wanted.extend(DELEGATES.map(String::from));

    // install-cni-plugin: the plugins are its arguments after $0; the sources are
    // in the image (not a mount), the destination is the node's /opt/cni/bin.
    let c = container(&spec, "initContainers", "install-cni-plugin");
    let installed: BTreeSet<String> = array_at(&c, "/command")[4..]
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        installed, wanted,
        "the conflist's plugins, bridge and host-local"
    );
    assert!(
        mount_of(&c, "/opt/weft/bin").is_none(),
        "the image's own files"
    );
    assert_host_path(&c, "/opt/cni/bin", "/opt/cni/bin");
    let dockerfile = String::from_utf8(read("Dockerfile")).unwrap();
    for p in &wanted {
        assert!(
            dockerfile.contains(&format!("/src/target/release/{p} \\")),
            "the image ships {p} in /opt/weft/bin"
        );
    }

    let scratch = TempDir::new("manifests");
    let (src, dst) = (scratch.join("weft-bin"), scratch.join("cni-bin"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    let mut old_inodes = Vec::new();
    for p in &wanted {
        std::fs::write(src.join(p), format!("#!/bin/sh\n# new {p}\n")).unwrap();
        std::fs::set_permissions(src.join(p), PermissionsExt::from_mode(0o644)).unwrap();
        // An older plugin is in place, maybe running: it must be replaced by a
        // rename (a new inode), never rewritten where it stands.
        std::fs::write(dst.join(p), "old").unwrap();
        old_inodes.push(std::fs::metadata(dst.join(p)).unwrap().ino());
    }
    std::fs::write(dst.join("loopback"), "not ours").unwrap();
    run_init_script(&c, &[("/opt/weft/bin", &src), ("/opt/cni/bin", &dst)]);
    let mut listed = wanted.clone();
    listed.insert("loopback".into());
    assert_eq!(listing(&dst), listed, "no temporary files left");
    for (p, old) in wanted.iter().zip(old_inodes) {
        let meta = std::fs::metadata(dst.join(p)).unwrap();
        assert_eq!(
            std::fs::read(dst.join(p)).unwrap(),
            std::fs::read(src.join(p)).unwrap()
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o755, "{p}");
        assert_ne!(meta.ino(), old, "{p} replaced by a rename");
    }
    assert_eq!(std::fs::read(dst.join("loopback")).unwrap(), b"not ours");
    // Twice is fine (a restarted pod).
    run_init_script(&c, &[("/opt/weft/bin", &src), ("/opt/cni/bin", &dst)]);
    assert_eq!(listing(&dst), listed);

    // install-cni: the ConfigMap's cni-conf.json as 10-flannel.conflist.
    let c = container(&spec, "initContainers", "install-cni");
    assert_config_map_key(&c, "/etc/kube-flannel/cni-conf.json", "cni-conf.json");
    assert_host_path(&c, "/etc/cni/net.d", "/etc/cni/net.d");
    let (cfg, net_d) = (scratch.join("cfg"), scratch.join("net.d"));
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::create_dir_all(&net_d).unwrap();
    let conf = str_at(&object("ConfigMap"), "/data/cni-conf.json").to_string();
    std::fs::write(cfg.join("cni-conf.json"), &conf).unwrap();
    std::fs::write(net_d.join("10-flannel.conflist"), "old").unwrap();
    let old = std::fs::metadata(net_d.join("10-flannel.conflist"))
        .unwrap()
        .ino();
    run_init_script(
        &c,
        &[("/etc/kube-flannel", &cfg), ("/etc/cni/net.d", &net_d)],
    );
    assert_eq!(
        listing(&net_d),
        BTreeSet::from(["10-flannel.conflist".into()])
    );
    let installed = net_d.join("10-flannel.conflist");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        read("conf-examples/10-flannel.conflist")
    );
    assert_ne!(
        std::fs::metadata(&installed).unwrap().ino(),
        old,
        "replaced by a rename"
    );
}

/// The API calls of weftd's kube subnet manager (core/src/lease/kube.rs), as the
/// RBAC rules see them: (resource, verb) in the core group.
const CALLS: [(&str, &str, &str); 5] = [
    // path in kube.rs, resource, verb
    ("/api/v1/namespaces/{ns}/pods/{pod}", "pods", "get"),
    ("/api/v1/nodes/{}", "nodes", "get"),
    ("/api/v1/nodes", "nodes", "list"),
    ("/api/v1/nodes?watch=1", "nodes", "watch"),
    ("/api/v1/nodes/{}/status", "nodes/status", "patch"),
];

#[test]
fn rbac_is_exactly_what_weftd_calls() {
    // kube.rs still makes exactly these calls (a new one needs a rule here and in
    // the manifest).
    let source = String::from_utf8(read("core/src/lease/kube.rs")).unwrap();
    let source = source.split("#[cfg(test)]").next().unwrap();
    let mut paths = BTreeSet::new();
    for (i, _) in source.match_indices("\"/api") {
        let literal = &source[i + 1..];
        let literal = &literal[..literal.find('"').unwrap()];
        let known = CALLS
            .iter()
            .find(|(p, ..)| literal == *p || (p.contains('?') && literal.starts_with(p)))
            .unwrap_or_else(|| panic!("kube.rs calls {literal}: add its RBAC rule"));
        paths.insert(known.0);
    }
    assert_eq!(
        paths.len(),
        CALLS.len(),
        "kube.rs no longer calls all of {CALLS:?}"
    );
    // The verbs on the status subresource: a merge patch and a strategic merge patch.
    assert!(source.contains("api.patch(&path") && source.contains("api.patch_as(&path"));

    let role = object("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in array_at(&role, "/rules") {
        let strings = |key: &str| -> Vec<String> {
            array_at(rule, &format!("/{key}"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(strings("apiGroups"), [""], "the core group only: {rule}");
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for res in strings("resources") {
            for verb in strings("verbs") {
                assert!(res != "*" && verb != "*", "no wildcards: {rule}");
                granted.insert((res.clone(), verb));
            }
        }
    }
    let needed: BTreeSet<(String, String)> = CALLS
        .iter()
        .map(|(_, r, v)| (r.to_string(), v.to_string()))
        .collect();
    assert_eq!(granted, needed);

    let binding = object("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["apiGroup"], "rbac.authorization.k8s.io");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let sa = object("ServiceAccount");
    let subjects = array_at(&binding, "/subjects");
    assert!(
        subjects.iter().any(|s| s["kind"] == "ServiceAccount"
            && s["name"] == sa["metadata"]["name"]
            && s["namespace"] == NAMESPACE),
        "bound to the DaemonSet's service account: {subjects:?}"
    );
    assert_eq!(pod_spec()["serviceAccountName"], sa["metadata"]["name"]);
}
