//! The Kubernetes lease source (`KubeSource`, weftd's `--kube-subnet-mgr`) against
//! the fake API server of `netns_tests::kube_api` (a Python imitation serving
//! recorded kubeadm Node objects, not a real API server): the annotations flanneld
//! writes, byte for byte; the PodCIDR as the lease; the node list and watch as peer
//! updates (410 expiry, closed and broken watches, bookmarks, restarts); finding
//! the node through its pod; kubeconfig, `--kube-api-url` and in-cluster
//! credentials, and the message for every way they can be missing or wrong.
//!
//! The last part has harness tests of the fake server itself.

use netns_tests::certs::KeyFormat;
use netns_tests::kube_api::{
    ApiRequest, ClientCerts, DEFAULT_TOKEN, FakeApiOptions, FakeApiServer, WatchFraming,
    recorded_node, recorded_nodes,
};
use netns_tests::{TempDir, TestNetns, base64, require_root};
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use weft_core::lease::kube::{
    KubeOptions, KubeSource, SERVICE_ACCOUNT_DIR, SERVICE_ACCOUNT_DIR_ENV,
};
use weft_core::lease::{
    AcquireRequest, BackendData, Lease, LeaseAttrs, LeaseError, LeaseSource, NetworkConfig,
    PeerEvent, PeerUpdate, SubnetKey,
};

/// flanneld's default annotation prefix.
const P: &str = "flannel.alpha.coreos.com/";
/// kube-flannel.yml's net-conf.json.
const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const DUAL_NET_CONF: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd44::/48","Backend":{"Type":"vxlan"}}"#;
const V6_NET_CONF: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd44::/48","Backend":{"Type":"vxlan"}}"#;
/// The lease value of the recorded node flanneld annotated (kube-master).
const MASTER_LEASE: &str = r#"{"PublicIP":"192.168.56.10","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}}"#;
/// How an error for an API server that cannot be talked to (TLS) begins.
const UNREACHABLE: &str = "calling the API server (/api/v1/nodes/kube-worker-1): ";
const WAIT: Duration = Duration::from_secs(10);

fn rt() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn config(text: &str) -> NetworkConfig {
    NetworkConfig::parse(text.as_bytes()).unwrap()
}

// --- nodes, requests and leases -----------------------------------------------------
//
// Node `kube-worker-<i>` (the recorded kube-worker-1 and -2 too) holds
// 10.244.<i>.0/24 and acquires with `request(10 + i)`.

fn vxlan_data(mac: &str) -> BackendData {
    json!({"VNI": 1, "VtepMAC": mac}).into()
}

/// A vxlan node's request: public IP 192.168.56.<n>, VTEP MAC 0e:77:00:00:00:<n>.
fn request(n: u8) -> AcquireRequest {
    AcquireRequest {
        attrs: LeaseAttrs {
            public_ip: Ipv4Addr::new(192, 168, 56, n),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(vxlan_data(&mac(n))),
            backend_v6_data: None,
        },
        previous_v4: None,
        previous_v6: None,
    }
}

fn mac(n: u8) -> String {
    format!("0e:77:00:00:00:{n:02x}")
}

/// The annotations flanneld (and weft) write for `request(n)`.
fn flannel_annotations(n: u8) -> Value {
    json!({
        format!("{P}kube-subnet-manager"): "true",
        format!("{P}backend-type"): "vxlan",
        format!("{P}backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, mac(n)),
        format!("{P}public-ip"): format!("192.168.56.{n}"),
    })
}

/// The object `map` with the entries of the object `extra` added or replaced.
fn with_entries(mut map: Value, extra: &Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        map[k] = v.clone();
    }
    map
}

/// A node kubeadm registered with `cidr`; annotated like flanneld does for
/// `request(n)` when `annotated`.
fn node(name: &str, cidr: &str, n: u8, annotated: bool) -> Value {
    let mut node = recorded_node("kube-worker-2");
    node["metadata"]["name"] = json!(name);
    node["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-0000000000{n:02x}"));
    node["metadata"]["labels"]["kubernetes.io/hostname"] = json!(name);
    node["spec"] = json!({"podCIDR": cidr, "podCIDRs": [cidr]});
    if annotated {
        let a = node["metadata"]["annotations"].take();
        node["metadata"]["annotations"] = with_entries(a, &flannel_annotations(n));
    }
    node
}

/// `kube-worker-<i>`, annotated when `annotated`.
fn worker(i: u8, annotated: bool) -> Value {
    node(
        &format!("kube-worker-{i}"),
        &format!("10.244.{i}.0/24"),
        10 + i,
        annotated,
    )
}

fn key(s: &str) -> SubnetKey {
    s.parse().unwrap()
}

/// `kube-worker-<i>`'s subnet.
fn worker_key(i: u8) -> SubnetKey {
    key(&format!("10.244.{i}.0-24"))
}

/// `(key, value JSON)` of leases, for comparisons that show flanneld's bytes.
fn summary(leases: &[Lease]) -> Vec<(String, String)> {
    leases
        .iter()
        .map(|l| (l.key.to_string(), l.attrs.to_json()))
        .collect()
}

/// [`summary`] of `kube-worker-<i>`'s lease.
fn worker_lease(i: u8) -> (String, String) {
    (worker_key(i).to_string(), request(10 + i).attrs.to_json())
}

/// The annotation `name` (after the prefix [`P`]) in a patch `r` sent.
fn patched<'a>(r: &'a ApiRequest, name: &str) -> &'a Value {
    &r.body["metadata"]["annotations"][format!("{P}{name}")]
}

/// Whether `r` lists the nodes (not a watch).
fn is_node_list(r: &ApiRequest) -> bool {
    r.path == "/api/v1/nodes" && !r.is_watch()
}

/// The message of a `LeaseError::Store`.
fn store_message(r: &Result<Lease, LeaseError>) -> Option<&str> {
    match r {
        Err(LeaseError::Store(m)) => Some(m),
        _ => None,
    }
}

// --- the fake cluster ---------------------------------------------------------------

/// A fake API server with the recorded nodes, and a scratch directory with a
/// token kubeconfig for it.
struct Cluster {
    api: FakeApiServer,
    dir: TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::with(FakeApiOptions::default())
    }

    fn with(opts: FakeApiOptions<'_>) -> Cluster {
        let api = FakeApiServer::start(opts);
        let dir = TempDir::new("kube-lease");
        std::fs::write(dir.join("kubeconfig"), api.kubeconfig(&token_user())).unwrap();
        Cluster { api, dir }
    }

    /// Options for node `node` with the token kubeconfig.
    fn opts(&self, node: &str) -> KubeOptions {
        KubeOptions {
            kubeconfig: Some(self.dir.join("kubeconfig")),
            node_name: Some(node.into()),
            ..Default::default()
        }
    }

    /// [`opts`](Self::opts) with neither node name nor pod.
    fn nameless(&self) -> KubeOptions {
        KubeOptions {
            node_name: None,
            ..self.opts("")
        }
    }

    /// Options that find the node through pod `kube-flannel/<pod>`.
    fn pod_opts(&self, pod: &str) -> KubeOptions {
        KubeOptions {
            pod: Some(("kube-flannel".into(), pod.into())),
            ..self.nameless()
        }
    }

    /// Options for kube-worker-1 with the kubeconfig `path`.
    fn kubeconfig_opts(&self, path: &Path) -> KubeOptions {
        KubeOptions {
            kubeconfig: Some(path.to_path_buf()),
            ..self.opts("kube-worker-1")
        }
    }

    /// A kubeconfig file `name` in the scratch directory holding `text`.
    fn kubeconfig_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A kubeconfig file `name` in kubeadm's layout (see [`kubeconfig`]).
    fn kubeadm_file(&self, name: &str, cluster: &str, user: &str) -> PathBuf {
        self.kubeconfig_file(name, &kubeconfig(cluster, user))
    }

    /// The kubeconfig cluster field `server: <url>`.
    fn server(&self) -> String {
        format!("server: {}", self.api.url())
    }

    /// The kubeconfig cluster field `certificate-authority-data` with the CA.
    fn ca_data(&self) -> String {
        format!(
            "certificate-authority-data: {}",
            b64_file(self.api.ca_path())
        )
    }

    /// The kubeconfig cluster fields for this server, with the CA inline.
    fn trusted_cluster(&self) -> String {
        format!("{}\n{}", self.ca_data(), self.server())
    }

    /// Connect as `node` and acquire with `request(n)` under [`NET_CONF`].
    fn acquire(&self, node: &str, n: u8) -> Result<Lease, LeaseError> {
        acquire_as(&self.opts(node), NET_CONF, &request(n))
    }

    /// Annotation `name` (after the prefix [`P`]) of node `node`.
    fn annotation(&self, node: &str, name: &str) -> Value {
        self.api.annotations(node)[&format!("{P}{name}")].clone()
    }

    /// Set (`Some`) or remove (`None`) annotation `name` (after [`P`]) of `node`.
    fn set_annotation(&self, node: &str, name: &str, value: Option<&str>) {
        self.api.annotate(node, &[(&format!("{P}{name}"), value)]);
    }

    /// Annotate `node` like its flanneld does for `request(n)`.
    fn annotate_like_flanneld(&self, node: &str, n: u8) {
        let a = flannel_annotations(n);
        let changes: Vec<(&str, Option<&str>)> = a
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.api.annotate(node, &changes);
    }

    /// How each API request so far was authenticated.
    fn auths(&self) -> Vec<Option<String>> {
        self.api.requests().into_iter().map(|r| r.auth).collect()
    }
}

// --- the source ---------------------------------------------------------------------

async fn connect(opts: &KubeOptions, conf: &str) -> KubeSource {
    match KubeSource::connect(opts, config(conf)).await {
        Ok(src) => src,
        Err(e) => panic!("KubeSource::connect: {e}"),
    }
}

/// Why connecting with `opts` fails (on a runtime of its own).
fn connect_err(opts: &KubeOptions) -> LeaseError {
    match rt().block_on(KubeSource::connect(opts, config(NET_CONF))) {
        Ok(_) => panic!("KubeSource::connect succeeded with {opts:?}"),
        Err(e) => e,
    }
}

/// Acquire with `req` under the source's network config.
async fn acquire(src: &mut KubeSource, req: &AcquireRequest) -> Result<Lease, LeaseError> {
    let cfg = src.network_config().await?;
    src.acquire(&cfg, req).await
}

/// Connect with `opts` under net-conf `conf` and acquire with `req`.
async fn acquired(opts: &KubeOptions, conf: &str, req: &AcquireRequest) -> KubeSource {
    let mut src = connect(opts, conf).await;
    acquire(&mut src, req).await.unwrap();
    src
}

/// Connect with `opts` under net-conf `conf` and acquire with `req`, on a runtime
/// of its own.
fn acquire_as(opts: &KubeOptions, conf: &str, req: &AcquireRequest) -> Result<Lease, LeaseError> {
    rt().block_on(async {
        let mut src = connect(opts, conf).await;
        acquire(&mut src, req).await
    })
}

/// Connect as kube-master, take the first Snapshot (kube-master, which flanneld
/// annotated) and wait for the watch.
async fn watching(c: &Cluster) -> KubeSource {
    let mut src = connect(&c.opts("kube-master"), NET_CONF).await;
    let first = snapshot(next(&mut src).await);
    assert_eq!(
        summary(&first),
        [("10.244.0.0-24".to_string(), MASTER_LEASE.to_string())]
    );
    c.api.wait_open_watches(1, WAIT);
    src
}

/// The next peer update, panicking after 10 s.
async fn next(src: &mut KubeSource) -> PeerUpdate {
    match tokio::time::timeout(WAIT, src.next_peers()).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => panic!("next_peers: {e}"),
        Err(_) => panic!("no peer update within {WAIT:?}"),
    }
}

/// Assert nothing arrives for `d`.
async fn quiet(src: &mut KubeSource, d: Duration) {
    if let Ok(u) = tokio::time::timeout(d, src.next_peers()).await {
        panic!("expected no peer update, got {u:?}");
    }
}

fn snapshot(u: PeerUpdate) -> Vec<Lease> {
    match u {
        PeerUpdate::Snapshot(mut leases) => {
            leases.sort_by_key(|l| l.key);
            leases
        }
        other => panic!("expected a Snapshot, got {other:?}"),
    }
}

/// The next update, which must be one event.
async fn next_event(src: &mut KubeSource) -> PeerEvent {
    match next(src).await {
        PeerUpdate::Events(mut e) if e.len() == 1 => e.remove(0),
        other => panic!("expected one event, got {other:?}"),
    }
}

/// The next update, which must be one `Added`: the lease.
async fn next_added(src: &mut KubeSource) -> Lease {
    match next_event(src).await {
        PeerEvent::Added(l) => *l,
        other => panic!("expected one Added, got {other:?}"),
    }
}

/// The next update, which must be one `Removed`: the key.
async fn next_removed(src: &mut KubeSource) -> SubnetKey {
    match next_event(src).await {
        PeerEvent::Removed(k) => k,
        other => panic!("expected one Removed, got {other:?}"),
    }
}

/// Add `kube-worker-<i>`, annotated, and expect it as the next update: the stored
/// node.
async fn add_worker(c: &Cluster, src: &mut KubeSource, i: u8) -> Value {
    let stored = c.api.put_node(&worker(i, true));
    assert_eq!(next_added(src).await.key, worker_key(i));
    stored
}

// --- acquire ----------------------------------------------------------------------

#[test]
fn acquire_publishes_flanneld_annotations_with_a_merge_patch_of_status() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let lease = c.acquire("kube-worker-1", 11).unwrap();
    assert_eq!(lease.key, worker_key(1));
    assert_eq!(lease.attrs, request(11).attrs);
    assert_eq!((lease.etcd_lease, lease.ttl), (0, None));

    let reqs = c.api.requests();
    assert_eq!(
        c.api.request_lines(),
        [
            "GET /api/v1/nodes/kube-worker-1",
            "PATCH /api/v1/nodes/kube-worker-1/status"
        ]
    );
    let patch = &reqs[1];
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert!(patch.authorization);
    assert_eq!(patch.auth.as_deref(), Some("token"));
    assert_eq!(patch.status, Some(200));
    // Exactly flanneld's annotation set, the backend data as a JSON string.
    assert_eq!(
        patch.body,
        json!({"metadata": {"annotations": flannel_annotations(11)}})
    );
    // Merged into kubeadm's annotations.
    let kubeadm = recorded_node("kube-worker-1")["metadata"]["annotations"].clone();
    assert_eq!(
        Value::Object(c.api.annotations("kube-worker-1")),
        with_entries(kubeadm, &flannel_annotations(11))
    );
}

#[test]
fn acquire_with_unchanged_annotations_does_not_patch() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    c.acquire("kube-worker-1", 11).unwrap();
    let rv = c.api.resource_version();
    c.api.clear_requests();
    // A restart with the same address and VTEP: a read, nothing written.
    assert_eq!(c.acquire("kube-worker-1", 11).unwrap().key, worker_key(1));
    assert_eq!(c.api.request_lines(), ["GET /api/v1/nodes/kube-worker-1"]);
    assert_eq!(c.api.resource_version(), rv);

    // A new VTEP MAC (the device was recreated): patched again.
    c.api.clear_requests();
    let mut req = request(11);
    req.attrs.backend_data = Some(vxlan_data("0e:77:00:00:01:11"));
    acquire_as(&c.opts("kube-worker-1"), NET_CONF, &req).unwrap();
    let reqs = c.api.requests();
    assert_eq!(reqs.len(), 2, "{:?}", c.api.request_lines());
    assert_eq!(
        patched(&reqs[1], "backend-data"),
        r#"{"VNI":1,"VtepMAC":"0e:77:00:00:01:11"}"#
    );
}

#[test]
fn the_node_flanneld_annotated_is_not_patched_for_the_same_values() {
    if !require_root() {
        return;
    }
    // weft taking over from flanneld on kube-master, same address and VTEP MAC:
    // the annotations flanneld wrote are byte-identical to weft's.
    let c = Cluster::start();
    let mut req = request(10);
    req.attrs.backend_data = Some(vxlan_data("12:c6:65:89:b4:e3"));
    let lease = acquire_as(&c.opts("kube-master"), NET_CONF, &req).unwrap();
    assert_eq!(lease.key, key("10.244.0.0-24"));
    assert_eq!(lease.attrs.to_json(), MASTER_LEASE);
    assert_eq!(c.api.request_lines(), ["GET /api/v1/nodes/kube-master"]);
}

#[test]
fn public_ip_overwrite_annotations_are_honoured() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    c.set_annotation("kube-worker-2", "public-ip-overwrite", Some("203.0.113.12"));
    c.acquire("kube-worker-2", 12).unwrap();
    assert_eq!(c.annotation("kube-worker-2", "public-ip"), "203.0.113.12");
    assert_eq!(
        c.annotation("kube-worker-2", "public-ip-overwrite"),
        "203.0.113.12"
    );
    assert_eq!(patched(&c.api.requests()[1], "public-ip"), "203.0.113.12");

    // Not an IPv4 address: ignored, the node's own address is published.
    c.set_annotation("kube-worker-2", "public-ip-overwrite", Some("not-an-ip"));
    c.acquire("kube-worker-2", 12).unwrap();
    assert_eq!(c.annotation("kube-worker-2", "public-ip"), "192.168.56.12");
}

#[test]
fn dual_stack_nodes_publish_the_v6_annotations_too() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let mut n = node("kube-ds", "10.244.5.0/24", 15, false);
    n["spec"]["podCIDRs"] = json!(["10.244.5.0/24", "fd44:0:0:5::/64"]);
    c.api.put_node(&n);
    c.set_annotation("kube-ds", "public-ipv6-overwrite", Some("2001:db8::15"));
    let mut req = request(15);
    req.attrs.public_ipv6 = Some("fd00:56::15".parse().unwrap());
    req.attrs.backend_v6_data = Some(vxlan_data("0e:77:00:00:06:15"));
    let lease = acquire_as(&c.opts("kube-ds"), DUAL_NET_CONF, &req).unwrap();
    assert_eq!(lease.key, key("10.244.5.0-24&fd44:0:0:5::-64"));
    let reqs = c.api.requests();
    let mut want = flannel_annotations(15);
    want[format!("{P}backend-v6-data")] = json!(r#"{"VNI":1,"VtepMAC":"0e:77:00:00:06:15"}"#);
    want[format!("{P}public-ipv6")] = json!("2001:db8::15");
    assert_eq!(reqs[1].body, json!({"metadata": {"annotations": want}}));

    // A v4-only net-conf.json: the node's IPv6 PodCIDR is ignored, as flanneld does.
    assert_eq!(c.acquire("kube-ds", 15).unwrap().key, key("10.244.5.0-24"));
}

#[test]
fn a_pod_cidr_outside_the_network_is_a_config_error_naming_both() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let conf = r#"{"Network":"10.10.0.0/16","Backend":{"Type":"vxlan"}}"#;
    let err = acquire_as(&c.opts("kube-worker-1"), conf, &request(11)).unwrap_err();
    assert_eq!(
        err,
        LeaseError::Config(
            "the node's podCIDR 10.244.1.0/24 is not inside the network 10.10.0.0/16 of net-conf.json"
                .into()
        )
    );
    // Nothing published for a subnet we cannot use.
    assert_eq!(c.api.request_lines(), ["GET /api/v1/nodes/kube-worker-1"]);
}

#[test]
fn a_node_without_pod_cidr_is_a_store_error_naming_allocate_node_cidrs() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let mut n = node("kube-new", "10.244.9.0/24", 9, false);
    n["spec"] = json!({});
    c.api.put_node(&n);
    assert_eq!(
        c.acquire("kube-new", 9).unwrap_err(),
        LeaseError::Store(
            "node kube-new has no spec.podCIDR yet (is kube-controller-manager running with --allocate-node-cidrs?)"
                .into()
        )
    );
    assert_eq!(c.api.request_lines(), ["GET /api/v1/nodes/kube-new"]);

    // Then kube-controller-manager assigns one: the retry works.
    n["spec"] = json!({"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]});
    c.api.put_node(&n);
    assert_eq!(c.acquire("kube-new", 9).unwrap().key, key("10.244.9.0-24"));
}

#[test]
fn a_missing_node_is_a_store_error_with_the_api_message() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    assert_eq!(
        c.acquire("ghost", 1).unwrap_err(),
        LeaseError::Store(
            r#"/api/v1/nodes/ghost: HTTP 404 Not Found: nodes "ghost" not found"#.into()
        )
    );
}

#[test]
fn a_forbidden_patch_names_the_rbac_rules() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    c.api.forbid(&[("PATCH", "^/api/v1/nodes/[^/]+/status$")]);
    assert_eq!(
        c.acquire("kube-worker-1", 11).unwrap_err(),
        LeaseError::Store(
            r#"/api/v1/nodes/kube-worker-1/status: HTTP 403 Forbidden: nodes "kube-worker-1" is forbidden: User "system:serviceaccount:kube-flannel:flannel" cannot patch resource "nodes/status" in API group "" at the cluster scope (RBAC: weftd needs nodes get/list/watch, nodes/status patch and pods get)"#
                .into()
        )
    );
}

#[test]
fn a_custom_annotation_prefix_gets_a_slash_and_ignores_flannels() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let opts = KubeOptions {
        annotation_prefix: "weft.example.com".into(),
        ..c.opts("kube-worker-1")
    };
    rt().block_on(async {
        let mut src = acquired(&opts, NET_CONF, &request(11)).await;
        // kube-master carries flannel.alpha.coreos.com/ annotations only.
        let leases = snapshot(next(&mut src).await);
        assert_eq!(summary(&leases), [worker_lease(1)]);
    });
    let body = &c.api.requests()[1].body;
    let keys: Vec<&String> = body["metadata"]["annotations"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        keys,
        [
            "weft.example.com/kube-subnet-manager",
            "weft.example.com/backend-type",
            "weft.example.com/backend-data",
            "weft.example.com/public-ip"
        ]
    );
}

#[test]
fn mark_ready_clears_network_unavailable_with_a_strategic_merge_patch() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let mark_ready = |opts: KubeOptions| {
        rt().block_on(async { connect(&opts, NET_CONF).await.mark_ready().await.unwrap() })
    };
    // --set-node-network-unavailable=false: nothing.
    mark_ready(c.opts("kube-worker-1"));
    assert_eq!(c.api.request_lines(), Vec::<String>::new());

    mark_ready(KubeOptions {
        set_network_unavailable: true,
        ..c.opts("kube-worker-1")
    });
    let reqs = c.api.requests();
    assert_eq!(
        c.api.request_lines(),
        ["PATCH /api/v1/nodes/kube-worker-1/status"]
    );
    assert_eq!(
        reqs[0].content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    let cond = &reqs[0].body["status"]["conditions"][0];
    assert_eq!(cond["type"], "NetworkUnavailable");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "FlannelIsUp");
    for t in ["lastTransitionTime", "lastHeartbeatTime"] {
        let ts = cond[t].as_str().unwrap();
        // RFC 3339 in UTC, seconds: 2026-11-22T23:11:24Z.
        assert_eq!(ts.len(), 20, "{t}: {ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{t}: {ts}");
    }
    // Merged by type into the kubelet's conditions, which stay.
    let node = c.api.node("kube-worker-1").unwrap();
    let types: Vec<&str> = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "MemoryPressure",
            "DiskPressure",
            "PIDPressure",
            "Ready",
            "NetworkUnavailable"
        ]
    );
}

// --- peers ------------------------------------------------------------------------

#[test]
fn peers_are_a_snapshot_then_watch_events() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    rt().block_on(async {
        let mut src = acquired(&c.opts("kube-worker-1"), NET_CONF, &request(11)).await;
        let list_rv = c.api.resource_version();

        // The annotated nodes, own included; the one flanneld annotated parses to
        // flanneld's lease value exactly.
        let leases = snapshot(next(&mut src).await);
        assert_eq!(
            summary(&leases),
            [
                ("10.244.0.0-24".to_string(), MASTER_LEASE.to_string()),
                worker_lease(1),
            ]
        );
        c.api.wait_open_watches(1, WAIT);

        // ADDED: a new node, annotated.
        c.api.put_node(&worker(3, true));
        assert_eq!(summary(&[next_added(&mut src).await]), [worker_lease(3)]);

        // MODIFIED: kube-worker-2 annotated by its flanneld.
        c.annotate_like_flanneld("kube-worker-2", 12);
        assert_eq!(summary(&[next_added(&mut src).await]), [worker_lease(2)]);

        // MODIFIED: a new VTEP MAC on kube-worker-3.
        c.set_annotation(
            "kube-worker-3",
            "backend-data",
            Some(r#"{"VNI":1,"VtepMAC":"0e:77:00:00:01:0d"}"#),
        );
        let l = next_added(&mut src).await;
        assert_eq!(l.key, worker_key(3));
        assert_eq!(
            l.attrs.backend_data,
            Some(vxlan_data("0e:77:00:00:01:0d"))
        );

        // DELETED.
        c.api.delete_node("kube-worker-3");
        assert_eq!(next_removed(&mut src).await, worker_key(3));

        // Annotations removed (flannel uninstalled there): gone as a peer.
        c.set_annotation("kube-worker-2", "kube-subnet-manager", None);
        assert_eq!(next_removed(&mut src).await, worker_key(2));

        quiet(&mut src, Duration::from_millis(300)).await;
        let reqs = c.api.requests();
        let lines: Vec<String> = reqs.iter().map(|r| r.line()).collect();
        assert_eq!(
            lines[2..],
            [
                "GET /api/v1/nodes".to_string(),
                format!(
                    "GET /api/v1/nodes?watch=1&allowWatchBookmarks=true&timeoutSeconds=290&resourceVersion={list_rv}"
                ),
            ]
        );
        assert!(reqs.iter().all(|r| r.auth.as_deref() == Some("token")));
    });
}

#[test]
fn watch_events_arrive_as_they_happen() {
    if !require_root() {
        return;
    }
    // One small chunk per event: a reader that waits for a full buffer (or for the
    // end of the response) would sit on them.
    let c = Cluster::start();
    rt().block_on(async {
        let mut src = watching(&c).await;
        let mut slowest = Duration::ZERO;
        for i in 0..5u8 {
            let name = format!("kube-extra-{i}");
            let cidr = format!("10.244.{}.0/24", 100 + i);
            let t = Instant::now();
            c.api.put_node(&node(&name, &cidr, 100 + i, true));
            let l = next_added(&mut src).await;
            slowest = slowest.max(t.elapsed());
            assert_eq!(l.key, key(&cidr.replace('/', "-")));
        }
        assert!(
            slowest < Duration::from_secs(2),
            "slowest event took {slowest:?}"
        );
    });
}

#[test]
fn unannotated_nodes_are_not_peers() {
    if !require_root() {
        return;
    }
    // Like flanneld: a node without flannel's annotations (or without a PodCIDR)
    // is no peer and no event; one that loses its annotations is removed.
    let c = Cluster::start();
    rt().block_on(async {
        let mut src = watching(&c).await;
        c.api.put_node(&worker(4, false));
        quiet(&mut src, Duration::from_millis(500)).await;
        let mut bare = worker(5, true);
        bare["spec"] = json!({});
        c.api.put_node(&bare);
        quiet(&mut src, Duration::from_millis(500)).await;
        add_worker(&c, &mut src, 4).await;
        c.api.put_node(&worker(4, false));
        assert_eq!(next_removed(&mut src).await, worker_key(4));
    });
}

#[test]
fn watch_expiry_relists_into_a_new_snapshot() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    rt().block_on(async {
        let mut src = watching(&c).await;

        // While the re-list is refused, nodes come and go: the new Snapshot has
        // them, although no event for them was ever seen.
        c.api.forbid(&[("GET", "^/api/v1/nodes$")]);
        let rv = c.api.expire();
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.api.put_node(&worker(3, true));
        c.api.delete_node("kube-master");
        c.api.forbid(&[]);
        let leases = snapshot(next(&mut src).await);
        assert_eq!(summary(&leases), [worker_lease(3)]);

        // And the watch goes on from the new list.
        c.api.wait_open_watches(1, WAIT);
        add_worker(&c, &mut src, 4).await;

        let reqs = c.api.requests();
        let lists = reqs.iter().filter(|r| is_node_list(r));
        let ok: Vec<_> = lists.filter(|r| r.status == Some(200)).collect();
        assert_eq!(ok.len(), 2, "{:#?}", c.api.request_lines());
        let watches: Vec<_> = reqs
            .iter()
            .filter(|r| r.is_watch() && r.status == Some(200))
            .collect();
        assert_eq!(watches.len(), 2, "{:#?}", c.api.request_lines());
        let last: u64 = watches[1]
            .param("resourceVersion")
            .unwrap()
            .parse()
            .unwrap();
        assert!(last > rv, "re-watch from {last}, expired at {rv}");
    });
}

#[test]
fn a_closed_watch_resumes_where_it_was_without_a_snapshot() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    rt().block_on(async {
        let mut src = watching(&c).await;
        let n3 = add_worker(&c, &mut src, 3).await;
        let seen = n3["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned();

        // The server ends the watch (its timeoutSeconds); meanwhile a node goes.
        assert_eq!(c.api.close_watches(), 1);
        c.api.delete_node("kube-worker-3");
        assert_eq!(next_removed(&mut src).await, worker_key(3));
        c.api.wait_open_watches(1, WAIT);

        // Cut without a goodbye (no last chunk, no close_notify): same.
        assert_eq!(c.api.close_watches_abruptly(), 1);
        add_worker(&c, &mut src, 4).await;
        c.api.wait_open_watches(1, WAIT);

        let reqs = c.api.requests();
        let lists = reqs.iter().filter(|r| is_node_list(r)).count();
        assert_eq!(lists, 1, "{:#?}", c.api.request_lines());
        let from: Vec<&str> = reqs
            .iter()
            .filter(|r| r.is_watch())
            .map(|r| r.param("resourceVersion").unwrap())
            .collect();
        assert_eq!(from.len(), 3, "{:#?}", c.api.request_lines());
        assert_eq!(
            from[1], seen,
            "the second watch starts after the last event"
        );
    });
}

#[test]
fn a_bookmark_moves_the_resume_point() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    rt().block_on(async {
        let mut src = watching(&c).await;
        let rv = c.api.bookmark();
        quiet(&mut src, Duration::from_millis(300)).await;
        c.api.close_watches();
        c.api.wait_open_watches(1, WAIT);
        let reqs = c.api.requests();
        let last = reqs.iter().rev().find(|r| r.is_watch()).unwrap();
        assert_eq!(last.param("resourceVersion"), Some(rv.to_string().as_str()));
    });
}

#[test]
fn close_delimited_watches_work_too() {
    if !require_root() {
        return;
    }
    let c = Cluster::with(FakeApiOptions {
        watch_framing: WatchFraming::CloseDelimited,
        ..Default::default()
    });
    rt().block_on(async {
        let mut src = watching(&c).await;
        add_worker(&c, &mut src, 3).await;
        c.api.close_watches();
        c.api.delete_node("kube-worker-3");
        assert_eq!(next_removed(&mut src).await, worker_key(3));
    });
}

#[test]
fn an_api_server_restart_is_survived() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::start();
    rt().block_on(async {
        let mut src = watching(&c).await;
        c.api.stop();
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.api.start_again();
        c.api.wait_open_watches(1, WAIT);
        add_worker(&c, &mut src, 3).await;
    });
}

#[test]
fn list_errors_are_retried_until_allowed() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    c.api.forbid(&[("GET", "^/api/v1/nodes$")]);
    rt().block_on(async {
        let mut src = connect(&c.opts("kube-master"), NET_CONF).await;
        quiet(&mut src, Duration::from_millis(800)).await;
        c.api.forbid(&[]);
        let leases = snapshot(next(&mut src).await);
        assert_eq!(leases.len(), 1);
    });
    let refused = c
        .api
        .requests()
        .iter()
        .filter(|r| r.status == Some(403))
        .count();
    assert!(refused >= 2, "{:#?}", c.api.request_lines());
}

#[test]
fn a_forbidden_watch_is_retried_from_the_list_version() {
    if !require_root() {
        return;
    }
    // RBAC with `list` but without `watch` on nodes: the Snapshot comes, then the
    // watch is retried (backing off, not re-listing) until it is allowed.
    let c = Cluster::start();
    c.api.forbid(&[("GET", "^/api/v1/nodes\\?.*watch=1")]);
    rt().block_on(async {
        let mut src = connect(&c.opts("kube-master"), NET_CONF).await;
        let list_rv = c.api.resource_version();
        assert_eq!(snapshot(next(&mut src).await).len(), 1);
        c.api.put_node(&worker(3, true));
        quiet(&mut src, Duration::from_millis(800)).await;
        c.api.forbid(&[]);
        // The change made meanwhile arrives as an event, no Snapshot.
        assert_eq!(next_added(&mut src).await.key, worker_key(3));
        let reqs = c.api.requests();
        let refused: Vec<_> = reqs.iter().filter(|r| r.status == Some(403)).collect();
        assert!(refused.len() >= 2, "{:#?}", c.api.request_lines());
        assert!(
            refused.iter().all(|r| r.is_watch()
                && r.param("resourceVersion") == Some(list_rv.to_string().as_str()))
        );
        let lists = reqs.iter().filter(|r| is_node_list(r));
        assert_eq!(lists.count(), 1, "{:#?}", c.api.request_lines());
    });
}

#[test]
fn host_gw_nodes_carry_backend_data_null_like_flanneld() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let conf = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
    let mut req = request(11);
    req.attrs.backend_type = "host-gw".into();
    req.attrs.backend_data = None;
    rt().block_on(async {
        let mut src = acquired(&c.opts("kube-worker-1"), conf, &req).await;
        assert_eq!(c.annotation("kube-worker-1", "backend-type"), "host-gw");
        assert_eq!(c.annotation("kube-worker-1", "backend-data"), "null");
        // As a peer: flanneld's RawMessage("null"), marshalled as null.
        let leases = snapshot(next(&mut src).await);
        assert_eq!(
            summary(&leases)[1],
            (
                "10.244.1.0-24".to_string(),
                r#"{"PublicIP":"192.168.56.11","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}"#
                    .to_string()
            )
        );
    });
}

#[test]
fn flanneld_ipv6_only_nodes_are_peers() {
    if !require_root() {
        return;
    }
    // flanneld in IPv6-only mode (EnableIPv4 false) writes no public-ip and no
    // backend-data annotation, only the v6 ones (pkg/subnet/kube/kube.go
    // AcquireLease: the v4 block is skipped when BackendData is null for vxlan),
    // and its nodeToLease reads only the v6 ones.
    let c = Cluster::start();
    let mut n = node("kube-v6", "fd44:0:0:7::/64", 17, false);
    let a = n["metadata"]["annotations"].take();
    n["metadata"]["annotations"] = with_entries(
        a,
        &json!({
            format!("{P}kube-subnet-manager"): "true",
            format!("{P}backend-type"): "vxlan",
            format!("{P}backend-v6-data"): r#"{"VNI":1,"VtepMAC":"0e:77:00:00:06:17"}"#,
            format!("{P}public-ipv6"): "fd00:56::17",
        }),
    );
    c.api.put_node(&n);
    rt().block_on(async {
        let mut src = connect(&c.opts("kube-v6"), V6_NET_CONF).await;
        let leases = snapshot(next(&mut src).await);
        let v6: Vec<&Lease> = leases
            .iter()
            .filter(|l| l.key.v6 == Some("fd44:0:0:7::/64".parse().unwrap()))
            .collect();
        assert_eq!(
            v6.len(),
            1,
            "the IPv6-only flanneld node is missing from the peers: {leases:?}"
        );
        assert_eq!(
            v6[0].attrs.public_ipv6,
            Some("fd00:56::17".parse::<Ipv6Addr>().unwrap())
        );
    });
}

#[test]
fn a_dropped_source_stops_watching() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    rt().block_on(async { drop(watching(&c).await) });
    // The watch thread cannot notice at once (it blocks reading the watch), but
    // once that watch ends it must not start another one for nobody.
    c.api.clear_requests();
    c.api.close_watches();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        c.api.request_lines(),
        Vec::<String>::new(),
        "API requests after the KubeSource was dropped"
    );
}

// --- the node name ----------------------------------------------------------------

#[test]
fn the_node_name_comes_from_the_pod() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let opts = c.pod_opts("kube-flannel-ds-7xk2p");
    let lease = acquire_as(&opts, NET_CONF, &request(11)).unwrap();
    assert_eq!(lease.key, worker_key(1));
    assert_eq!(
        c.api.request_lines(),
        [
            "GET /api/v1/namespaces/kube-flannel/pods/kube-flannel-ds-7xk2p",
            "GET /api/v1/nodes/kube-worker-1",
            "PATCH /api/v1/nodes/kube-worker-1/status"
        ]
    );
    // An empty NODE_NAME counts as unset.
    let opts = KubeOptions {
        node_name: Some(String::new()),
        ..opts
    };
    let lease = acquire_as(&opts, NET_CONF, &request(11)).unwrap();
    assert_eq!(lease.key, worker_key(1));
}

#[test]
fn without_node_or_pod_name_connect_says_what_to_set() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    assert_eq!(
        connect_err(&c.nameless()),
        LeaseError::Access(
            "the node name is unknown: set NODE_NAME (the DaemonSet passes it from spec.nodeName), or POD_NAME and POD_NAMESPACE"
                .into()
        )
    );
}

#[test]
fn a_missing_pod_is_a_store_error_with_the_api_message() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    assert_eq!(
        connect_err(&c.pod_opts("nope")),
        LeaseError::Store(
            r#"/api/v1/namespaces/kube-flannel/pods/nope: HTTP 404 Not Found: pods "nope" not found"#
                .into()
        )
    );
}

#[test]
fn an_unscheduled_pod_names_itself_in_the_error() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    assert_eq!(
        connect_err(&c.pod_opts("kube-flannel-ds-pending")),
        LeaseError::Store(
            "pod kube-flannel/kube-flannel-ds-pending has no spec.nodeName yet".into()
        )
    );
}

// --- kubeconfig ---------------------------------------------------------------------

/// A kubeconfig with the cluster fields `cluster` and the user fields `user`
/// (YAML lines, indented here), context and names as kubeadm writes them.
fn kubeconfig(cluster: &str, user: &str) -> String {
    let indent = |s: &str| -> String { s.lines().map(|l| format!("    {l}\n")).collect() };
    format!(
        "apiVersion: v1\nclusters:\n- cluster:\n{}  name: kubernetes\ncontexts:\n- context:\n    cluster: kubernetes\n    user: kubernetes-admin\n  name: kubernetes-admin@kubernetes\ncurrent-context: kubernetes-admin@kubernetes\nkind: Config\npreferences: {{}}\nusers:\n- name: kubernetes-admin\n  user:\n{}",
        indent(cluster),
        indent(user)
    )
}

fn b64_file(path: &Path) -> String {
    base64::encode(&std::fs::read(path).unwrap())
}

/// The kubeconfig user field with the token the server accepts.
fn token_user() -> String {
    format!("token: {DEFAULT_TOKEN}")
}

/// Kubeconfig user fields with a client certificate and its key inline.
fn inline_cert_user(cert: &Path, key: &Path) -> String {
    format!(
        "client-certificate-data: {}\nclient-key-data: {}",
        b64_file(cert),
        b64_file(key)
    )
}

/// A server that takes client certificates from its CA and nothing else.
fn cert_auth() -> FakeApiOptions<'static> {
    FakeApiOptions {
        tokens: &[],
        client_certs: ClientCerts::Required,
        ..Default::default()
    }
}

/// Acquire as kube-worker-1 with `kubeconfig` (and `api_url`); the result and the
/// requests' `auth`.
fn try_kubeconfig(
    c: &Cluster,
    path: &Path,
    api_url: Option<String>,
) -> (Result<Lease, LeaseError>, Vec<Option<String>>) {
    c.api.clear_requests();
    let opts = KubeOptions {
        api_url,
        ..c.kubeconfig_opts(path)
    };
    let r = rt().block_on(async {
        let mut src = KubeSource::connect(&opts, config(NET_CONF)).await?;
        acquire(&mut src, &request(11)).await
    });
    (r, c.auths())
}

#[test]
fn kubeconfig_with_a_token_and_a_ca_file_relative_to_it() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    std::fs::create_dir_all(c.dir.join("kube/pki")).unwrap();
    std::fs::copy(c.api.ca_path(), c.dir.join("kube/pki/ca.crt")).unwrap();
    let cluster = format!("certificate-authority: pki/ca.crt\n{}", c.server());
    let path = c.kubeadm_file("kube/config", &cluster, &token_user());
    let (r, auth) = try_kubeconfig(&c, &path, None);
    assert_eq!(r.unwrap().key, worker_key(1));
    assert_eq!(auth, [Some("token".into()), Some("token".into())]);
}

#[test]
fn kubeconfig_with_a_token_file_read_on_every_call() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    std::fs::write(c.dir.join("token"), format!("{DEFAULT_TOKEN}\n")).unwrap();
    let path = c.kubeadm_file("tf/config", &c.trusted_cluster(), "tokenFile: ../token");
    rt().block_on(async {
        let mut src = acquired(&c.kubeconfig_opts(&path), NET_CONF, &request(11)).await;
        // The token rotates (projected service-account tokens do).
        c.api.set_tokens(&["rotated-token"]);
        assert!(acquire(&mut src, &request(11)).await.is_err());
        std::fs::write(c.dir.join("token"), "rotated-token\n").unwrap();
        acquire(&mut src, &request(11)).await.unwrap();
    });
}

#[test]
fn kubeconfig_with_inline_client_certificate_data() {
    if !require_root() {
        return;
    }
    let c = Cluster::with(cert_auth());
    let cluster = c.trusted_cluster();
    let user = inline_cert_user(c.api.client_cert_path(), c.api.client_key_path());
    let path = c.kubeadm_file("inline", &cluster, &user);
    let (r, auth) = try_kubeconfig(&c, &path, None);
    assert_eq!(r.unwrap().key, worker_key(1));
    assert_eq!(
        auth,
        [Some("cert:weft-test".into()), Some("cert:weft-test".into())]
    );
    assert!(!c.api.requests()[0].authorization);

    // kubeadm's admin.conf holds an RSA key in PKCS#1, k3s an EC key in SEC1;
    // files relative to the kubeconfig.
    for (name, format) in [
        ("kubeadm-admin", KeyFormat::RsaPkcs1),
        ("k3s-admin", KeyFormat::EcSec1),
    ] {
        let (cert, key_path) = c.api.certs().extra_client(name, name, format);
        std::fs::copy(&cert, c.dir.join(format!("{name}.crt"))).unwrap();
        std::fs::copy(&key_path, c.dir.join(format!("{name}.key"))).unwrap();
        let user = format!("client-certificate: {name}.crt\nclient-key: {name}.key");
        let path = c.kubeadm_file(&format!("{name}.conf"), &cluster, &user);
        let (r, auth) = try_kubeconfig(&c, &path, None);
        assert!(r.is_ok(), "{name}: {r:?}");
        assert_eq!(auth[0].as_deref(), Some(format!("cert:{name}").as_str()));
    }
}

#[test]
fn kubeconfig_with_a_wrong_token_is_a_401_store_error() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let path = c.kubeconfig_file("wrong", &c.api.kubeconfig("token: not-the-token"));
    let (r, auth) = try_kubeconfig(&c, &path, None);
    assert_eq!(
        r.unwrap_err(),
        LeaseError::Store(
            "/api/v1/nodes/kube-worker-1: HTTP 401 Unauthorized: Unauthorized (the token or client certificate is not accepted)"
                .into()
        )
    );
    assert_eq!(auth, [None]);
}

#[test]
fn untrusted_or_missing_client_certificates_fail_the_handshake() {
    if !require_root() {
        return;
    }
    let c = Cluster::with(cert_auth());
    let user = inline_cert_user(
        c.api.rogue_client_cert_path(),
        c.api.rogue_client_key_path(),
    );
    let rogue = c.kubeconfig_file("rogue", &c.api.kubeconfig(&user));
    let none = c.kubeconfig_file("none", &c.api.kubeconfig("{}"));
    for path in [rogue, none] {
        let before = c.api.tls_failures().len();
        let (r, auth) = try_kubeconfig(&c, &path, None);
        assert!(
            store_message(&r).is_some_and(|m| m.starts_with(UNREACHABLE)),
            "{}: {r:?}",
            path.display()
        );
        assert_eq!(auth, Vec::<Option<String>>::new(), "no request got through");
        assert!(c.api.tls_failures().len() > before);
    }
}

#[test]
fn kubeconfig_insecure_skip_tls_verify_and_api_url_override() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let cluster = format!("insecure-skip-tls-verify: true\n{}", c.server());
    let insecure = c.kubeadm_file("insecure", &cluster, &token_user());
    let (r, _) = try_kubeconfig(&c, &insecure, None);
    assert!(r.is_ok(), "{r:?}");

    // --kube-api-url wins over the kubeconfig's server; CA and token still apply.
    let cluster = format!("{}\nserver: https://127.0.0.1:1", c.ca_data());
    let elsewhere = c.kubeadm_file("elsewhere", &cluster, &token_user());
    let (r, auth) = try_kubeconfig(&c, &elsewhere, Some(c.api.url()));
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(auth[0].as_deref(), Some("token"));
    let (r, _) = try_kubeconfig(&c, &elsewhere, None);
    assert!(
        store_message(&r).is_some_and(|m| m.starts_with(UNREACHABLE)),
        "{r:?}"
    );

    // Without a CA the server's certificate is not trusted.
    let no_ca = c.kubeadm_file("no-ca", &c.server(), &token_user());
    let (r, auth) = try_kubeconfig(&c, &no_ca, None);
    assert!(
        store_message(&r).is_some_and(|m| m.contains("UnknownIssuer")),
        "{r:?}"
    );
    assert!(auth.is_empty());
}

#[test]
fn a_json_kubeconfig_with_a_trailing_slash_works_too() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": format!("{}/", c.api.url()), "certificate-authority": c.api.ca_path()}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
        "users": [{"name": "u", "user": {"token": DEFAULT_TOKEN}}],
    });
    let path = c.kubeconfig_file("json", &doc.to_string());
    let (r, _) = try_kubeconfig(&c, &path, None);
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn api_url_alone_talks_plain_http_anonymously() {
    if !require_root() {
        return;
    }
    // `kubectl proxy` or an insecure port: --kube-api-url=http://... and nothing else.
    let c = Cluster::with(FakeApiOptions {
        tls: false,
        tokens: &[],
        ..Default::default()
    });
    assert!(c.api.url().starts_with("http://127.0.0.1:"));
    let opts = KubeOptions {
        api_url: Some(c.api.url()),
        node_name: Some("kube-worker-1".into()),
        ..Default::default()
    };
    let lease = acquire_as(&opts, NET_CONF, &request(11)).unwrap();
    assert_eq!(lease.key, worker_key(1));
    let reqs = c.api.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs.iter()
            .all(|r| !r.authorization && r.auth.as_deref() == Some("anonymous"))
    );
}

#[test]
fn kubeconfig_errors_say_what_is_wrong() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let (server, ca, token) = (c.server(), c.ca_data(), token_user());
    let good_cluster = c.trusted_cluster();
    let err = |name: &str, text: &str| -> (String, LeaseError) {
        let path = c.kubeconfig_file(name, text);
        (
            path.display().to_string(),
            connect_err(&c.kubeconfig_opts(&path)),
        )
    };
    let access_msg = |e: LeaseError| match e {
        LeaseError::Access(m) => m,
        other => panic!("expected an Access error, got {other:?}"),
    };

    let (p, e) = err("not-yaml", "apiVersion: v1\nclusters: [\n  - {\n");
    let m = access_msg(e);
    assert!(
        m.starts_with(&format!("the kubeconfig {p} is not valid YAML: ")),
        "{m}"
    );

    let missing = c.dir.join("does-not-exist");
    assert_eq!(
        connect_err(&c.kubeconfig_opts(&missing)),
        LeaseError::Access(format!(
            "reading the kubeconfig {}: No such file or directory (os error 2)",
            missing.display()
        ))
    );

    let full = kubeconfig(&good_cluster, &token);
    let cases: Vec<(&str, String, String)> = vec![
        (
            "no-current",
            full.replace("current-context: kubernetes-admin@kubernetes\n", ""),
            "no current-context".into(),
        ),
        (
            "empty-current",
            full.replace(
                "current-context: kubernetes-admin@kubernetes",
                "current-context: \"\"",
            ),
            "no current-context".into(),
        ),
        (
            "no-context",
            full.replace(
                "current-context: kubernetes-admin@kubernetes",
                "current-context: other",
            ),
            r#"no contexts entry named "other""#.into(),
        ),
        (
            "no-cluster",
            full.replace("    cluster: kubernetes\n", "    cluster: prod\n"),
            r#"no clusters entry named "prod""#.into(),
        ),
        (
            "no-user",
            full.replace("    user: kubernetes-admin\n", "    user: bob\n"),
            r#"no users entry named "bob""#.into(),
        ),
        (
            "no-server",
            kubeconfig(&ca, &token),
            "the cluster has no server".into(),
        ),
        (
            "cert-no-key",
            kubeconfig(
                &good_cluster,
                &format!(
                    "client-certificate-data: {}",
                    b64_file(c.api.client_cert_path())
                ),
            ),
            "a client certificate needs both the certificate and the key".into(),
        ),
        (
            "bad-b64",
            kubeconfig(
                &format!("certificate-authority-data: not*base64\n{server}"),
                &token,
            ),
            "certificate-authority-data is not base64".into(),
        ),
    ];
    for (name, text, want) in cases {
        let (p, e) = err(name, &text);
        assert_eq!(
            e,
            LeaseError::Access(format!("kubeconfig {p}: {want}")),
            "case {name}"
        );
    }

    // Files it names that are missing or not what they should be.
    let (_, e) = err(
        "missing-ca",
        &kubeconfig(
            &format!("certificate-authority: nope/ca.crt\n{server}"),
            &token,
        ),
    );
    assert_eq!(
        e,
        LeaseError::Access(format!(
            "reading the API server CA {}: No such file or directory (os error 2)",
            c.dir.join("nope/ca.crt").display()
        ))
    );
    std::fs::write(c.dir.join("garbage.crt"), "not a certificate\n").unwrap();
    let (_, e) = err(
        "garbage-ca",
        &kubeconfig(
            &format!("certificate-authority: garbage.crt\n{server}"),
            &token,
        ),
    );
    assert_eq!(
        e,
        LeaseError::Access("the API server CA holds no PEM certificate".into())
    );
    let (_, e) = err(
        "garbage-key",
        &kubeconfig(
            &good_cluster,
            &format!(
                "client-certificate-data: {}\nclient-key: garbage.crt",
                b64_file(c.api.client_cert_path())
            ),
        ),
    );
    let m = access_msg(e);
    assert!(m.starts_with("the kubeconfig's client key: "), "{m}");
}

// --- in-cluster config ----------------------------------------------------------------

/// The in-cluster tests change the process environment: one at a time, and back
/// to what it was afterwards (also when they fail).
static ENV_LOCK: Mutex<()> = Mutex::new(());

struct EnvGuard {
    saved: Vec<(&'static str, Option<std::ffi::OsString>)>,
    _lock: MutexGuard<'static, ()>,
}

const ENV_VARS: [&str; 3] = [
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
    SERVICE_ACCOUNT_DIR_ENV,
];

/// Set (`Some`) or unset (`None`) the variable `key`. Callers hold ENV_LOCK.
fn set_env(key: &str, value: Option<&OsStr>) {
    // SAFETY: ENV_LOCK serialises the tests that touch the environment; the
    // others in this binary do not read these variables.
    unsafe {
        match value {
            Some(v) => std::env::set_var(key, v),
            None => std::env::remove_var(key),
        }
    }
}

impl EnvGuard {
    fn take() -> EnvGuard {
        let lock = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let saved = ENV_VARS.iter().map(|k| (*k, std::env::var_os(k))).collect();
        EnvGuard { saved, _lock: lock }
    }

    /// Set (`Some`) or unset (`None`) the in-cluster variables: host, port, dir.
    fn set(&self, host: Option<&str>, port: Option<&str>, dir: Option<&Path>) {
        let values = [
            host.map(OsStr::new),
            port.map(OsStr::new),
            dir.map(Path::as_os_str),
        ];
        for (k, v) in ENV_VARS.iter().zip(values) {
            set_env(k, v);
        }
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for (k, v) in &self.saved {
            set_env(k, v.as_deref());
        }
    }
}

/// Options without kubeconfig and API URL: the in-cluster config.
fn in_cluster(node: &str) -> KubeOptions {
    KubeOptions {
        node_name: Some(node.into()),
        ..Default::default()
    }
}

/// A service-account directory like the kubelet mounts: token (with a newline,
/// as projected tokens have none but Secrets often do), ca.crt, namespace.
fn service_account_dir(c: &Cluster, token: &str) -> PathBuf {
    let dir = c.dir.join("serviceaccount");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    std::fs::copy(c.api.ca_path(), dir.join("ca.crt")).unwrap();
    std::fs::write(dir.join("namespace"), "kube-flannel").unwrap();
    dir
}

/// Connect on `rt` as kube-worker-1 with the in-cluster config: the service at
/// `host` and the fake server's port, a service account with the accepted token.
fn connect_in_cluster(rt: &Runtime, c: &Cluster, host: &str) -> (KubeSource, PathBuf) {
    let sa = service_account_dir(c, DEFAULT_TOKEN);
    let env = EnvGuard::take();
    env.set(Some(host), Some(&c.api.port().to_string()), Some(&sa));
    let src = rt.block_on(connect(&in_cluster("kube-worker-1"), NET_CONF));
    (src, sa)
}

#[test]
fn in_cluster_config_uses_the_service_account_mount() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let rt = rt();
    let (mut src, sa) = connect_in_cluster(&rt, &c, "127.0.0.1");
    rt.block_on(async {
        let lease = acquire(&mut src, &request(11)).await.unwrap();
        assert_eq!(lease.key, worker_key(1));
        // The kubelet rotates the projected token; the next call reads the new one.
        c.api.set_tokens(&["rotated"]);
        std::fs::write(sa.join("token"), "rotated").unwrap();
        acquire(&mut src, &request(11)).await.unwrap();
    });
    assert_eq!(c.auths(), vec![Some("token".to_string()); 3]);
}

#[test]
fn in_cluster_config_with_an_ipv6_service_address() {
    if !require_root() {
        return;
    }
    let c = Cluster::with(FakeApiOptions {
        ip: "::1",
        ..Default::default()
    });
    assert!(c.api.url().starts_with("https://[::1]:"), "{}", c.api.url());
    let rt = rt();
    let (mut src, _) = connect_in_cluster(&rt, &c, "::1");
    rt.block_on(acquire(&mut src, &request(11))).unwrap();
}

#[test]
fn in_cluster_config_names_every_missing_piece_and_the_fix() {
    if !require_root() {
        return;
    }
    let c = Cluster::start();
    let port = c.api.port().to_string();
    let opts = in_cluster("kube-worker-1");
    let env = EnvGuard::take();
    let not_in_pod = LeaseError::Access(
        "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set, so weftd is not running in a pod: pass --kubeconfig-file (or --kube-api-url)"
            .into(),
    );
    let sa = service_account_dir(&c, DEFAULT_TOKEN);
    for (host, port) in [
        (None, None),
        (Some("127.0.0.1"), None),
        (None, Some(port.as_str())),
        (Some(""), Some(port.as_str())),
        (Some("127.0.0.1"), Some("")),
    ] {
        env.set(host, port, Some(&sa));
        assert_eq!(connect_err(&opts), not_in_pod, "{host:?} {port:?}");
    }

    let missing = |what: &str, path: &Path| {
        LeaseError::Access(format!(
            "the {what} {} is missing: give the DaemonSet a service account with automountServiceAccountToken enabled (kube-weft.yml does), or run weftd with --kubeconfig-file",
            path.display()
        ))
    };
    // No token.
    let empty = c.dir.join("empty-sa");
    std::fs::create_dir_all(&empty).unwrap();
    env.set(Some("127.0.0.1"), Some(&port), Some(&empty));
    assert_eq!(
        connect_err(&opts),
        missing("service-account token", &empty.join("token"))
    );
    // A token, no CA.
    std::fs::write(empty.join("token"), DEFAULT_TOKEN).unwrap();
    assert_eq!(
        connect_err(&opts),
        missing("service-account CA certificate", &empty.join("ca.crt"))
    );
    // A CA that is not one.
    std::fs::write(empty.join("ca.crt"), "-----BEGIN NOTHING-----\n").unwrap();
    assert_eq!(
        connect_err(&opts),
        LeaseError::Access("the API server CA holds no PEM certificate".into())
    );
    // Without WEFT_SERVICEACCOUNT_DIR: the kubelet's mount point.
    if !Path::new(SERVICE_ACCOUNT_DIR).join("token").exists() {
        env.set(Some("127.0.0.1"), Some(&port), None);
        assert_eq!(
            connect_err(&opts),
            missing(
                "service-account token",
                &Path::new(SERVICE_ACCOUNT_DIR).join("token")
            )
        );
    }
    drop(env);
}

#[test]
fn credential_errors_do_not_blame_the_network_config() {
    if !require_root() {
        return;
    }
    // What weftd prints is the error's Display. LeaseError::Access displays as
    // "invalid network config: …", which sends an operator to net-conf.json for a
    // problem with the service account, the kubeconfig or NODE_NAME.
    let c = Cluster::start();
    let mut shown = Vec::new();
    {
        let env = EnvGuard::take();
        env.set(None, None, None);
        shown.push(connect_err(&in_cluster("kube-worker-1")).to_string());
    }
    shown.push(connect_err(&c.nameless()).to_string());
    let path = c.kubeconfig_file("no-current", "apiVersion: v1\nkind: Config\n");
    shown.push(connect_err(&c.kubeconfig_opts(&path)).to_string());
    for s in &shown {
        assert!(!s.starts_with("invalid network config"), "{s}");
    }
}

// --- the harness itself -----------------------------------------------------------------

#[test]
fn fake_apiserver_refuses_what_the_real_one_refuses() {
    if !require_root() {
        return;
    }
    let api = FakeApiServer::start(FakeApiOptions::default());
    let ca = api.ca_path().display().to_string();
    let url = api.url();
    let call = |args: &[&str]| -> (u16, Value) {
        let mut a = vec!["--cacert", &ca, "-w", "\n%{http_code}"];
        a.extend_from_slice(args);
        let out = api.curl(&a);
        assert!(out.status.success(), "curl {args:?}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    };
    let bearer = format!("Authorization: Bearer {DEFAULT_TOKEN}");
    let node_url = format!("{url}/api/v1/nodes/kube-worker-1");
    let status_url = format!("{node_url}/status");

    let (code, body) = call(&[&node_url]);
    assert_eq!(code, 401);
    assert_eq!(
        body,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    );
    let (code, body) = call(&["-H", &bearer, &node_url]);
    assert_eq!(code, 200);
    assert_eq!(body, recorded_node("kube-worker-1"));

    let (code, list) = call(&["-H", &bearer, &format!("{url}/api/v1/nodes")]);
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "NodeList");
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    let rv: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(rv, api.resource_version());

    let patch = |ctype: &str, body: &str| {
        call(&[
            "-X",
            "PATCH",
            "-H",
            &bearer,
            "-H",
            &format!("Content-Type: {ctype}"),
            "--data-binary",
            body,
            &status_url,
        ])
    };
    let (code, body) = patch("application/json-patch+json", "[]");
    assert_eq!(
        (code, body["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let (code, body) = patch(
        "application/merge-patch+json",
        r#"{"metadata":{"annotations":{"a":1}}}"#,
    );
    assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")));
    let (code, body) = patch(
        "application/merge-patch+json",
        r#"{"metadata":{"resourceVersion":"1","annotations":{"a":"b"}}}"#,
    );
    assert_eq!((code, body["reason"].as_str()), (409, Some("Conflict")));
    // The status subresource ignores spec; the patch applies; the version moves.
    let (code, body) = patch(
        "application/merge-patch+json",
        r#"{"metadata":{"annotations":{"a":"b"}},"spec":{"podCIDR":"10.99.0.0/24"}}"#,
    );
    assert_eq!(code, 200);
    assert_eq!(body["metadata"]["annotations"]["a"], "b");
    assert_eq!(body["spec"]["podCIDR"], "10.244.1.0/24");
    assert_eq!(body["metadata"]["resourceVersion"], (rv + 1).to_string());
    // A no-op patch changes nothing.
    let (code, body) = patch(
        "application/merge-patch+json",
        r#"{"metadata":{"annotations":{"a":"b"}}}"#,
    );
    assert_eq!(code, 200);
    assert_eq!(body["metadata"]["resourceVersion"], (rv + 1).to_string());
    assert_eq!(api.resource_version(), rv + 1);

    let (code, _) = call(&["-H", &bearer, &format!("{url}/api/v1/secrets")]);
    assert_eq!(code, 404);
    let out = api.curl(&["--cacert", &ca, &format!("{url}/healthz")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");

    // The log has the API requests (not the test-control ones).
    let reqs = api.requests();
    assert_eq!(reqs.len(), 10, "{:#?}", api.request_lines());
    assert_eq!(reqs[0].auth, None);
    assert_eq!(reqs[0].status, Some(401));
    assert_eq!(
        reqs[3].content_type.as_deref(),
        Some("application/json-patch+json")
    );
    assert_eq!(reqs[3].body, json!([]));
    assert_eq!(reqs[3].status, Some(415));
}

#[test]
fn fake_apiserver_watch_stream_is_line_delimited_events() {
    if !require_root() {
        return;
    }
    let api = FakeApiServer::start(FakeApiOptions {
        tokens: &[],
        ..Default::default()
    });
    let rv = api.resource_version();
    let ca = api.ca_path().display().to_string();
    let url = format!("{}/api/v1/nodes?watch=1&resourceVersion={rv}", api.url());
    let watch = |url: String, secs: &'static str| {
        let ca = ca.clone();
        let args = [
            "--cacert".to_string(),
            ca,
            "-N".into(),
            "--max-time".into(),
            secs.into(),
            url,
        ];
        std::thread::spawn(move || {
            std::process::Command::new("curl")
                .args(["-sS", "--noproxy", "*"])
                .args(&args)
                .output()
                .unwrap()
        })
    };
    let t = watch(url.clone(), "8");
    api.wait_open_watches(1, WAIT);
    api.put_node(&worker(3, true));
    api.annotate("kube-worker-3", &[("x", Some("y"))]);
    api.delete_node("kube-worker-3");
    api.bookmark();
    assert_eq!(api.close_watches(), 1);
    let out = t.join().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    // No bookmark: this watch did not ask for them.
    assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"]);
    let versions: Vec<u64> = events
        .iter()
        .map(|e| {
            e["object"]["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(versions, [rv + 1, rv + 2, rv + 3]);

    // From an expired resourceVersion: one ERROR 410 and the end.
    api.expire();
    let t = watch(url, "8");
    let out = t.join().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let ev: Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
}

#[test]
fn fake_apiserver_client_certificate_auth() {
    if !require_root() {
        return;
    }
    let api = FakeApiServer::start(cert_auth());
    let url = format!("{}/api/v1/nodes/kube-master", api.url());
    let ca = api.ca_path().display().to_string();
    let with_cert = |cert: &Path, key: &Path| {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        api.curl(&["--cacert", &ca, "--cert", &cert, "--key", &key, &url])
    };
    let ok = with_cert(api.client_cert_path(), api.client_key_path());
    assert!(ok.status.success(), "{ok:?}");
    let node: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(node["metadata"]["name"], "kube-master");
    let rogue = with_cert(api.rogue_client_cert_path(), api.rogue_client_key_path());
    assert!(!rogue.status.success(), "{rogue:?}");
    let none = api.curl(&["--cacert", &ca, &url]);
    assert!(!none.status.success(), "{none:?}");
    assert_eq!(api.requests()[0].auth.as_deref(), Some("cert:weft-test"));
    assert_eq!(api.requests().len(), 1);
}

#[test]
fn fake_apiserver_in_a_netns() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    ns.exec_ok(&["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"]);
    let api = FakeApiServer::start(FakeApiOptions {
        netns: Some(&ns),
        ip: "10.99.0.1",
        ..Default::default()
    });
    assert_eq!(api.url(), format!("https://10.99.0.1:{}", api.port()));
    let pid = api.pid().unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        std::fs::read_link(ns.path()).unwrap()
    );
    // The certificate is for 10.99.0.1: curl checks it.
    let out = api.curl(&[
        "--cacert",
        &api.ca_path().display().to_string(),
        "-H",
        &format!("Authorization: Bearer {DEFAULT_TOKEN}"),
        &format!("{}/api/v1/nodes", api.url()),
    ]);
    assert!(out.status.success(), "{out:?}");
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        recorded_nodes().len()
    );
    drop(api);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn fake_apiserver_dies_with_the_thread_that_started_it() {
    if !require_root() {
        return;
    }
    let api = std::thread::spawn(|| FakeApiServer::start(FakeApiOptions::default()))
        .join()
        .unwrap();
    let pid = api.pid().unwrap();
    // SIGKILLed when its thread ended: a zombie until reaped, then gone.
    let deadline = Instant::now() + WAIT;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| &r[..1]);
        if matches!(state, None | Some("Z")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server {pid} still running: {stat}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = api.dir().to_path_buf();
    drop(api);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
}
