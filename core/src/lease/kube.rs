//! Kubernetes as the lease store (flanneld's `--kube-subnet-mgr`): the node's
//! subnet is its `spec.podCIDR(s)`, our lease value goes into the node annotations
//! flanneld uses, and peers are the other annotated nodes (list, then watch).
//!
//! A blocking HTTP client (ureq) is enough: a handful of calls per lifetime plus
//! one long watch, which runs on its own thread and feeds the async side.

use super::{
    AcquireRequest, BackendData, Lease, LeaseAttrs, LeaseError, LeaseSource, NetworkConfig,
    PeerEvent, PeerUpdate, SubnetKey,
};
use ipnet::IpNet;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Where a pod finds its service-account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Deadline of one API call, and of one watch (the server ends it at 290 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const WATCH_TIMEOUT: Duration = Duration::from_secs(300);
/// Overrides [`SERVICE_ACCOUNT_DIR`] (tests; unusual mounts).
pub const SERVICE_ACCOUNT_DIR_ENV: &str = "WEFT_SERVICEACCOUNT_DIR";
/// flanneld's default `--kube-annotation-prefix`.
pub const DEFAULT_ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com";

/// How to reach the API server and which node we are.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// `--kube-api-url`: overrides the kubeconfig's server.
    pub api_url: Option<String>,
    /// `--kubeconfig-file`; without it (and without api_url) the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    pub annotation_prefix: String,
    /// `NODE_NAME`; else the node of pod `POD_NAMESPACE/POD_NAME`.
    pub node_name: Option<String>,
    pub pod: Option<(String, String)>,
    /// flanneld's `--set-node-network-unavailable` (default true): clear the
    /// node's NetworkUnavailable condition once ready.
    pub set_network_unavailable: bool,
}

/// Leases from the node objects of a Kubernetes cluster.
pub struct KubeSource {
    api: Arc<Api>,
    node: String,
    prefix: String,
    config: NetworkConfig,
    peers: Option<mpsc::Receiver<PeerUpdate>>,
    set_network_unavailable: bool,
}

impl KubeSource {
    /// Build the client and find our node name. `config` comes from net-conf.json.
    pub async fn connect(
        opts: &KubeOptions,
        config: NetworkConfig,
    ) -> Result<KubeSource, LeaseError> {
        let api = Arc::new(Api::new(opts)?);
        let mut prefix = if opts.annotation_prefix.is_empty() {
            DEFAULT_ANNOTATION_PREFIX.to_owned()
        } else {
            opts.annotation_prefix.clone()
        };
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let node = match (&opts.node_name, &opts.pod) {
            (Some(n), _) if !n.is_empty() => n.clone(),
            (_, Some((ns, pod))) => {
                let path = format!("/api/v1/namespaces/{ns}/pods/{pod}");
                let api = api.clone();
                let object = blocking(move || api.get(&path)).await?;
                object
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        LeaseError::Store(format!("pod {ns}/{pod} has no spec.nodeName yet"))
                    })?
            }
            _ => {
                return Err(LeaseError::Access(
                    "the node name is unknown: set NODE_NAME (the DaemonSet passes it from spec.nodeName), or POD_NAME and POD_NAMESPACE".into(),
                ));
            }
        };
        Ok(KubeSource {
            api,
            node,
            prefix,
            config,
            peers: None,
            set_network_unavailable: opts.set_network_unavailable,
        })
    }

    /// The annotations this node should carry for `attrs`.
    fn annotations(&self, attrs: &LeaseAttrs) -> Map<String, Value> {
        let p = &self.prefix;
        let data = |d: &Option<BackendData>| {
            d.as_ref()
                .map_or("null".to_owned(), |d| d.value().to_string())
        };
        let mut a = Map::new();
        a.insert(format!("{p}kube-subnet-manager"), json!("true"));
        a.insert(format!("{p}backend-type"), json!(attrs.backend_type));
        a.insert(format!("{p}backend-data"), json!(data(&attrs.backend_data)));
        a.insert(format!("{p}public-ip"), json!(attrs.public_ip.to_string()));
        if let Some(v6) = attrs.public_ipv6 {
            a.insert(
                format!("{p}backend-v6-data"),
                json!(data(&attrs.backend_v6_data)),
            );
            a.insert(format!("{p}public-ipv6"), json!(v6.to_string()));
        }
        a
    }
}

impl LeaseSource for KubeSource {
    async fn network_config(&mut self) -> Result<NetworkConfig, LeaseError> {
        Ok(self.config.clone())
    }

    /// Our subnet is whatever Kubernetes assigned; publish our lease value in the
    /// node annotations (on the status subresource, as flanneld; RBAC nodes/status
    /// patch), honouring the `public-ip-overwrite` annotations.
    async fn acquire(
        &mut self,
        config: &NetworkConfig,
        req: &AcquireRequest,
    ) -> Result<Lease, LeaseError> {
        let path = format!("/api/v1/nodes/{}", self.node);
        let api = self.api.clone();
        let node = blocking(move || api.get(&path)).await?;
        let key = pod_cidrs(&node).ok_or_else(|| {
            LeaseError::Store(format!(
                "node {} has no spec.podCIDR yet (is kube-controller-manager running with --allocate-node-cidrs?)",
                self.node
            ))
        })?;
        // A dual-stack node in a single-stack network: only the enabled family
        // (flanneld ignores the other PodCIDR too).
        let key = SubnetKey {
            v4: key.v4.filter(|_| config.v4.is_some()),
            v6: key.v6.filter(|_| config.v6.is_some()),
        };
        check_inside(config, &key)?;
        let mut attrs = req.attrs.clone();
        let current = node
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let overwrite = |name: &str| {
            current
                .get(&format!("{}{name}", self.prefix))
                .and_then(Value::as_str)
        };
        if let Some(ip) = overwrite("public-ip-overwrite").and_then(|s| s.parse().ok()) {
            attrs.public_ip = ip;
        }
        if let Some(ip) = overwrite("public-ipv6-overwrite").and_then(|s| s.parse().ok()) {
            attrs.public_ipv6 = Some(ip);
        }
        let wanted = self.annotations(&attrs);
        if wanted.iter().any(|(k, v)| current.get(k) != Some(v)) {
            let path = format!("/api/v1/nodes/{}/status", self.node);
            let api = self.api.clone();
            let patch = json!({"metadata": {"annotations": wanted}});
            blocking(move || api.patch(&path, &patch)).await?;
        }
        Ok(Lease {
            key,
            attrs,
            etcd_lease: 0,
            ttl: None,
        })
    }

    /// flanneld's `CompleteLease`: condition NetworkUnavailable=False, reason
    /// FlannelIsUp (kube-weft.yml keeps flannel's reason so tooling that looks for
    /// it still works). A strategic merge patch, which merges conditions by type; a
    /// JSON merge patch would replace the whole list.
    async fn mark_ready(&mut self) -> Result<(), LeaseError> {
        if !self.set_network_unavailable {
            return Ok(());
        }
        let now = httpdate_utc();
        let patch = json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "weftd is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        let path = format!("/api/v1/nodes/{}/status", self.node);
        let api = self.api.clone();
        blocking(move || api.patch_as(&path, &patch, "application/strategic-merge-patch+json"))
            .await?;
        Ok(())
    }

    /// Our node lost its annotations (or was re-created): publish them again.
    async fn restore(&mut self, lease: &Lease) -> Result<Option<Lease>, LeaseError> {
        let req = AcquireRequest {
            attrs: lease.attrs.clone(),
            previous_v4: None,
            previous_v6: None,
        };
        let config = self.config.clone();
        self.acquire(&config, &req).await.map(Some)
    }

    /// Node objects do not expire.
    async fn renew(&mut self, lease: &Lease) -> Result<Lease, LeaseError> {
        Ok(lease.clone())
    }

    async fn next_peers(&mut self) -> Result<PeerUpdate, LeaseError> {
        let rx = self.peers.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(64);
            let (api, prefix) = (self.api.clone(), self.prefix.clone());
            std::thread::Builder::new()
                .name("kube-watch".into())
                .spawn(move || watch_nodes(&api, &prefix, &tx))
                .expect("spawning the node watch thread");
            rx
        });
        rx.recv()
            .await
            .ok_or_else(|| LeaseError::Store("the node watch stopped".into()))
    }
}

/// List, then watch from the list's resourceVersion; re-list on 410 Gone, re-watch
/// when the server ends a watch, back off on errors. Runs until the receiver goes.
fn watch_nodes(api: &Api, prefix: &str, tx: &mpsc::Sender<PeerUpdate>) {
    let mut backoff = Duration::from_millis(100);
    let wait = |backoff: &mut Duration| {
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
    };
    while !tx.is_closed() {
        let list = match api.get("/api/v1/nodes") {
            Ok(list) => list,
            Err(_) => {
                wait(&mut backoff);
                continue;
            }
        };
        let mut watch = NodeWatch {
            prefix,
            known: BTreeMap::new(),
            version: list
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        };
        for node in list["items"].as_array().into_iter().flatten() {
            watch.changed(node);
        }
        let leases = watch.known.values().cloned().collect();
        if tx.blocking_send(PeerUpdate::Snapshot(leases)).is_err() {
            return;
        }
        while !tx.is_closed() {
            match watch.once(api, tx) {
                Ok(WatchEnd::Expired) => break,
                Ok(WatchEnd::Closed) => backoff = Duration::from_millis(100),
                Err(_) => wait(&mut backoff),
            }
        }
    }
}

enum WatchEnd {
    /// 410 Gone: our resourceVersion is too old; re-list.
    Expired,
    /// The server ended the watch (its timeout), or the receiver went away.
    Closed,
}

/// The peers as of `version`, by node name, so only real lease changes become
/// events (kubelet updates its node every few seconds; flanneld filters those too).
struct NodeWatch<'a> {
    prefix: &'a str,
    known: BTreeMap<String, Lease>,
    version: String,
}

impl NodeWatch<'_> {
    /// Fold in a node's new state; the event it means for the peer set, if any.
    fn changed(&mut self, node: &Value) -> Option<PeerEvent> {
        let name = node.pointer("/metadata/name")?.as_str()?.to_owned();
        match node_lease(node, self.prefix) {
            Some(lease) if self.known.get(&name) == Some(&lease) => None,
            Some(lease) => {
                self.known.insert(name, lease.clone());
                Some(PeerEvent::Added(Box::new(lease)))
            }
            // Not (or no longer) annotated: a peer only if it was one.
            None => self.removed(&name),
        }
    }

    fn removed(&mut self, name: &str) -> Option<PeerEvent> {
        self.known.remove(name).map(|l| PeerEvent::Removed(l.key))
    }

    fn once(&mut self, api: &Api, tx: &mpsc::Sender<PeerUpdate>) -> Result<WatchEnd, LeaseError> {
        let path = format!(
            "/api/v1/nodes?watch=1&allowWatchBookmarks=true&timeoutSeconds=290&resourceVersion={}",
            self.version
        );
        let reader = api.stream(&path)?;
        for line in reader.lines() {
            let line =
                line.map_err(|e| LeaseError::Store(format!("reading the node watch: {e}")))?;
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let object = &event["object"];
            if let Some(v) = object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
            {
                self.version = v.to_owned();
            }
            let update = match event["type"].as_str() {
                Some("ERROR") if object["code"] == 410 => return Ok(WatchEnd::Expired),
                Some("ADDED" | "MODIFIED") => self.changed(object),
                Some("DELETED") => object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .and_then(|name| self.removed(name)),
                _ => None,
            };
            if let Some(ev) = update
                && tx.blocking_send(PeerUpdate::Events(vec![ev])).is_err()
            {
                return Ok(WatchEnd::Closed);
            }
        }
        Ok(WatchEnd::Closed)
    }
}

/// A node's lease, when flanneld (or weft) manages it: annotated and with a PodCIDR.
fn node_lease(node: &Value, prefix: &str) -> Option<Lease> {
    let a = node.pointer("/metadata/annotations")?.as_object()?;
    let get = |name: &str| a.get(&format!("{prefix}{name}")).and_then(Value::as_str);
    if get("kube-subnet-manager") != Some("true") {
        return None;
    }
    let data = |name: &str| {
        get(name).and_then(|s| serde_json::from_str::<Value>(s).ok().map(BackendData::from))
    };
    Some(Lease {
        key: pod_cidrs(node)?,
        attrs: LeaseAttrs {
            // IPv6-only flanneld nodes write no public-ip.
            public_ip: match get("public-ip") {
                Some(ip) => ip.parse().ok()?,
                None => std::net::Ipv4Addr::UNSPECIFIED,
            },
            public_ipv6: get("public-ipv6").and_then(|s| s.parse().ok()),
            backend_type: get("backend-type").unwrap_or_default().to_owned(),
            backend_data: data("backend-data"),
            backend_v6_data: data("backend-v6-data"),
        },
        etcd_lease: 0,
        ttl: None,
    })
}

/// `spec.podCIDRs` (one per family), else `spec.podCIDR`.
fn pod_cidrs(node: &Value) -> Option<SubnetKey> {
    let spec = &node["spec"];
    let mut cidrs: Vec<&str> = spec["podCIDRs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if cidrs.is_empty() {
        cidrs.extend(spec["podCIDR"].as_str().filter(|s| !s.is_empty()));
    }
    let mut key = SubnetKey { v4: None, v6: None };
    for c in cidrs {
        match c.parse::<IpNet>().ok()? {
            IpNet::V4(n) => key.v4 = Some(n.trunc()),
            IpNet::V6(n) => key.v6 = Some(n.trunc()),
        }
    }
    (key.v4.is_some() || key.v6.is_some()).then_some(key)
}

fn check_inside(config: &NetworkConfig, key: &SubnetKey) -> Result<(), LeaseError> {
    for (enabled, have, family) in [
        (config.v4.is_some(), key.v4.is_some(), "IPv4"),
        (config.v6.is_some(), key.v6.is_some(), "IPv6"),
    ] {
        if enabled && !have {
            return Err(LeaseError::Config(format!(
                "net-conf.json enables {family} but the node has no {family} podCIDR"
            )));
        }
    }
    let outside = |sub: IpNet, net: Option<IpNet>| match net {
        Some(n) if n.contains(&sub) => Ok(()),
        Some(n) => Err(LeaseError::Config(format!(
            "the node's podCIDR {sub} is not inside the network {n} of net-conf.json"
        ))),
        None => Err(LeaseError::Config(format!(
            "the node's podCIDR {sub} is of an IP family net-conf.json does not enable"
        ))),
    };
    if let Some(v4) = key.v4 {
        outside(IpNet::V4(v4), config.network_v4().map(IpNet::V4))?;
    }
    if let Some(v6) = key.v6 {
        outside(IpNet::V6(v6), config.network_v6().map(IpNet::V6))?;
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LeaseError> + Send + 'static,
) -> Result<T, LeaseError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LeaseError::Store(format!("the API call panicked: {e}")))?
}

/// A minimal API client: base URL, TLS roots, a bearer token (re-read from its
/// file on every call: projected tokens rotate) or a client certificate.
struct Api {
    agent: ureq::Agent,
    base: String,
    token: Option<Token>,
}

enum Token {
    Literal(String),
    File(PathBuf),
}

/// What a kubeconfig or the pod's mount provides.
#[derive(Default)]
struct Credentials {
    server: String,
    ca_pem: Option<Vec<u8>>,
    insecure: bool,
    token: Option<Token>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl Api {
    fn new(opts: &KubeOptions) -> Result<Api, LeaseError> {
        let mut creds = match (&opts.kubeconfig, &opts.api_url) {
            (Some(path), _) => kubeconfig(path)?,
            (None, Some(url)) => Credentials {
                server: url.clone(),
                ..Default::default()
            },
            (None, None) => in_cluster()?,
        };
        if let Some(url) = &opts.api_url {
            creds.server = url.clone();
        }
        let config = |e: String| LeaseError::Access(e);
        let mut tls = ureq::tls::TlsConfig::builder().disable_verification(creds.insecure);
        if let Some(pem) = &creds.ca_pem {
            let certs = ureq::tls::parse_pem(pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect::<Vec<_>>();
            if certs.is_empty() {
                return Err(config("the API server CA holds no PEM certificate".into()));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        if let Some((cert, key)) = &creds.client {
            let chain: Vec<_> = ureq::tls::parse_pem(cert)
                .filter_map(|i| match i {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            let key = ureq::tls::PrivateKey::from_pem(key)
                .map_err(|e| config(format!("the kubeconfig's client key: {e}")))?;
            tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        Ok(Api {
            agent,
            base: creds.server.trim_end_matches('/').to_owned(),
            token: creds.token,
        })
    }

    fn auth(&self) -> Result<Option<String>, LeaseError> {
        Ok(match &self.token {
            None => None,
            Some(Token::Literal(t)) => Some(format!("Bearer {t}")),
            Some(Token::File(p)) => {
                let t = std::fs::read_to_string(p).map_err(|e| {
                    LeaseError::Access(format!("reading the token {}: {e}", p.display()))
                })?;
                Some(format!("Bearer {}", t.trim()))
            }
        })
    }

    /// A request with our deadline and credentials.
    fn request<B>(
        &self,
        req: ureq::RequestBuilder<B>,
        timeout: Duration,
    ) -> Result<ureq::RequestBuilder<B>, LeaseError> {
        let mut req = req.config().timeout_global(Some(timeout)).build();
        if let Some(a) = self.auth()? {
            req = req.header("Authorization", a);
        }
        Ok(req)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> Result<Value, LeaseError> {
        let req = self.request(self.agent.get(self.url(path)), CALL_TIMEOUT)?;
        answer(path, req.call())
    }

    fn patch(&self, path: &str, body: &Value) -> Result<Value, LeaseError> {
        self.patch_as(path, body, "application/merge-patch+json")
    }

    fn patch_as(&self, path: &str, body: &Value, content_type: &str) -> Result<Value, LeaseError> {
        let req = self.request(self.agent.patch(self.url(path)), CALL_TIMEOUT)?;
        answer(path, req.content_type(content_type).send(body.to_string()))
    }

    /// A long GET read line by line (a watch). The server closes it after its
    /// timeoutSeconds; we give it ten more before calling it dead.
    fn stream(&self, path: &str) -> Result<impl BufRead + use<>, LeaseError> {
        let req = self.request(self.agent.get(self.url(path)), WATCH_TIMEOUT)?;
        let resp = req
            .call()
            .map_err(|e| LeaseError::Store(format!("watching nodes: {e}")))?;
        if !resp.status().is_success() {
            return Err(LeaseError::Store(format!(
                "watching nodes: HTTP {}",
                resp.status()
            )));
        }
        Ok(std::io::BufReader::new(
            resp.into_body().into_with_config().limit(u64::MAX).reader(),
        ))
    }
}

/// The JSON of a successful answer; the API's own message for a failure.
fn answer(
    path: &str,
    resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Value, LeaseError> {
    let resp =
        resp.map_err(|e| LeaseError::Store(format!("calling the API server ({path}): {e}")))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .into_with_config()
        .limit(256 << 20)
        .read_to_string()
        .unwrap_or_default();
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(json);
    }
    let why = json["message"]
        .as_str()
        .map_or_else(|| body.trim().to_owned(), str::to_owned);
    let hint = match status.as_u16() {
        401 => " (the token or client certificate is not accepted)",
        403 => " (RBAC: weftd needs nodes get/list/watch, nodes/status patch and pods get)",
        _ => "",
    };
    Err(LeaseError::Store(format!(
        "{path}: HTTP {status}: {why}{hint}"
    )))
}

/// The in-cluster config: the service's env vars and the mounted token and CA.
fn in_cluster() -> Result<Credentials, LeaseError> {
    let (host, port) = match (
        std::env::var("KUBERNETES_SERVICE_HOST"),
        std::env::var("KUBERNETES_SERVICE_PORT"),
    ) {
        (Ok(h), Ok(p)) if !h.is_empty() && !p.is_empty() => (h, p),
        _ => {
            return Err(LeaseError::Access(
                "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set, so weftd is not running in a pod: pass --kubeconfig-file (or --kube-api-url)".into(),
            ));
        }
    };
    let dir = std::env::var_os(SERVICE_ACCOUNT_DIR_ENV)
        .map_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR), PathBuf::from);
    let token = dir.join("token");
    let ca = dir.join("ca.crt");
    for (file, what) in [
        (&token, "service-account token"),
        (&ca, "service-account CA certificate"),
    ] {
        if !file.is_file() {
            return Err(LeaseError::Access(format!(
                "the {what} {} is missing: give the DaemonSet a service account with automountServiceAccountToken enabled (kube-weft.yml does), or run weftd with --kubeconfig-file",
                file.display()
            )));
        }
    }
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(Credentials {
        server: format!("https://{host}:{port}"),
        ca_pem: Some(read(&ca, "service-account CA certificate")?),
        token: Some(Token::File(token)),
        ..Default::default()
    })
}

/// The current context of a kubeconfig (YAML or JSON): server, CA, and a token
/// or client certificate. Relative paths are relative to the file.
fn kubeconfig(path: &Path) -> Result<Credentials, LeaseError> {
    let text = read(path, "kubeconfig")?;
    let doc: Value = serde_yaml_ng::from_slice(&text).map_err(|e| {
        LeaseError::Access(format!(
            "the kubeconfig {} is not valid YAML: {e}",
            path.display()
        ))
    })?;
    let bad = |what: String| LeaseError::Access(format!("kubeconfig {}: {what}", path.display()));
    let named = |list: &str, name: &str, field: &str| -> Result<Value, LeaseError> {
        doc[list]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["name"] == name))
            .map(|i| i[field].clone())
            .ok_or_else(|| bad(format!("no {list} entry named {name:?}")))
    };
    let current = doc["current-context"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("no current-context".into()))?;
    let context = named("contexts", current, "context")?;
    let cluster = named(
        "clusters",
        context["cluster"].as_str().unwrap_or(""),
        "cluster",
    )?;
    let user = match context["user"].as_str() {
        Some(u) if !u.is_empty() => named("users", u, "user")?,
        _ => Value::Null,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let inline_or_file =
        |data: &str, file: &str, what: &str| -> Result<Option<Vec<u8>>, LeaseError> {
            let pick =
                |v: &Value, key: &str| v[key].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
            let holder = if data.starts_with("certificate-authority") {
                &cluster
            } else {
                &user
            };
            if let Some(b64) = pick(holder, data) {
                return decode_base64(&b64)
                    .map(Some)
                    .ok_or_else(|| bad(format!("{data} is not base64")));
            }
            match pick(holder, file) {
                Some(f) => read(&dir.join(f), what).map(Some),
                None => Ok(None),
            }
        };
    let client = match (
        inline_or_file(
            "client-certificate-data",
            "client-certificate",
            "client certificate",
        )?,
        inline_or_file("client-key-data", "client-key", "client key")?,
    ) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(bad(
                "a client certificate needs both the certificate and the key".into(),
            ));
        }
    };
    let token = match (user["token"].as_str(), user["tokenFile"].as_str()) {
        (Some(t), _) if !t.is_empty() => Some(Token::Literal(t.to_owned())),
        (_, Some(f)) if !f.is_empty() => Some(Token::File(dir.join(f))),
        _ => None,
    };
    Ok(Credentials {
        server: cluster["server"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("the cluster has no server".into()))?
            .to_owned(),
        ca_pem: inline_or_file(
            "certificate-authority-data",
            "certificate-authority",
            "API server CA",
        )?,
        insecure: cluster["insecure-skip-tls-verify"]
            .as_bool()
            .unwrap_or(false),
        token,
        client,
    })
}

/// Now as RFC 3339 UTC seconds (`2026-11-22T23:10:00Z`), what the API expects.
fn httpdate_utc() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, LeaseError> {
    std::fs::read(path)
        .map_err(|e| LeaseError::Access(format!("reading the {what} {}: {e}", path.display())))
}

/// Standard base64 (kubeconfig's `*-data` fields).
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(annotations: Value, spec: Value) -> Value {
        json!({"metadata": {"name": "n1", "annotations": annotations}, "spec": spec})
    }

    #[test]
    fn annotated_nodes_are_leases() {
        let p = "flannel.alpha.coreos.com/";
        let n = node(
            json!({
                format!("{p}kube-subnet-manager"): "true",
                format!("{p}backend-type"): "vxlan",
                format!("{p}backend-data"): r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#,
                format!("{p}public-ip"): "10.77.0.2",
            }),
            json!({"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24", "fd44:0:0:2::/64"]}),
        );
        let l = node_lease(&n, p).unwrap();
        assert_eq!(l.key.to_string(), "10.244.2.0-24&fd44:0:0:2::-64");
        assert_eq!(
            l.attrs.to_json(),
            r#"{"PublicIP":"10.77.0.2","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}}"#
        );
        let plain = node(json!({}), json!({"podCIDR": "10.244.3.0/24"}));
        assert_eq!(node_lease(&plain, p), None);
        assert_eq!(pod_cidrs(&plain).unwrap().to_string(), "10.244.3.0-24");
        assert_eq!(pod_cidrs(&node(json!({}), json!({}))), None);
    }

    #[test]
    fn base64_decodes_kubeconfig_data() {
        assert_eq!(decode_base64("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(decode_base64("aGk\n=").unwrap(), b"hi");
        assert_eq!(decode_base64("a*"), None);
    }
}
