//! A fake Kubernetes API server for tests of the Kubernetes lease source — NOT a
//! real API server. It is `fixtures/kube/fake_apiserver.py` (Python 3 standard
//! library only), which serves recorded v1 Node and Pod objects
//! (`fixtures/kube/nodes.json`, a kubeadm cluster of three nodes, one annotated by
//! a real flanneld; `pods.json`) over HTTPS with just what a flannel-style subnet
//! manager uses: get, list and watch nodes, merge-patch a node's status, get a
//! pod. Its doc string lists what it imitates and what it does not.
//!
//! Tests steer it through test-only endpoints (`/_test/...`): add, change and
//! delete nodes (watchers see ADDED, MODIFIED, DELETED), expire the watch history
//! (watchers get an ERROR 410 event), end watches, send bookmarks, change the
//! accepted tokens, forbid requests (403), and read the log of every API request
//! made, with its method, path, query, content type, whether it carried an
//! Authorization header, how it was authenticated, the answer's status and the body.
//! The harness talks to those endpoints with `curl` (inside the netns, if any),
//! not with the HTTP client under test.
//!
//! The server dies with the thread that started it ([`die_with_thread`]), so a test
//! killed without unwinding leaves no server behind; dropping a [`FakeApiServer`]
//! kills it and removes its scratch directory (certificates, state, log).

use crate::certs::Certs;
use crate::command::{self, die_with_thread, netns_command};
use crate::{TempDir, TestNetns, base64, listen_ip, url_host};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

/// The directory of the server script and the recorded objects.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/kube");
/// The bearer token [`FakeApiOptions::default`] accepts.
pub const DEFAULT_TOKEN: &str = "weft-test-token";
/// How long a start (or restart) may take.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Per-request limit for the harness's curl calls.
const CURL_TIMEOUT_SECS: &str = "10";

/// The recorded nodes (`fixtures/kube/nodes.json`): `kube-master` (10.244.0.0/24,
/// annotated by flanneld: vxlan, VtepMAC 12:c6:65:89:b4:e3, public IP
/// 192.168.56.10), `kube-worker-1` (10.244.1.0/24) and `kube-worker-2`
/// (10.244.2.0/24), neither annotated by flannel.
pub fn recorded_nodes() -> Vec<Value> {
    items(&Path::new(FIXTURES).join("nodes.json"))
}

/// One of [`recorded_nodes`] by name; panics when there is none.
pub fn recorded_node(name: &str) -> Value {
    recorded_nodes()
        .into_iter()
        .find(|n| n["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no recorded node {name:?} in {FIXTURES}/nodes.json"))
}

/// The recorded pods (`fixtures/kube/pods.json`): `kube-flannel/kube-flannel-ds-7xk2p`
/// running on kube-worker-1, and `kube-flannel/kube-flannel-ds-pending`, not
/// scheduled yet (no `spec.nodeName`).
pub fn recorded_pods() -> Vec<Value> {
    items(&Path::new(FIXTURES).join("pods.json"))
}

fn items(path: &Path) -> Vec<Value> {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let doc: Value = serde_json::from_slice(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    match doc {
        Value::Array(a) => a,
        mut v => match v["items"].take() {
            Value::Array(a) => a,
            _ => panic!("{} is neither a list nor a v1 List", path.display()),
        },
    }
}

/// Whether and how the server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// Not asked for: bearer tokens only.
    Off,
    /// Asked for; a certificate from the harness CA authenticates, without one a
    /// token must.
    Optional,
    /// Required in the TLS handshake (Python's `CERT_REQUIRED`): clients without a
    /// certificate from the harness CA do not even get to send a request.
    Required,
}

/// How a watch response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFraming {
    /// HTTP/1.1 `Transfer-Encoding: chunked`, one event per chunk (what the real
    /// API server does); the connection stays open for reuse after a watch ends.
    Chunked,
    /// No length, `Connection: close`: the body ends when the connection does.
    CloseDelimited,
}

/// How to start a [`FakeApiServer`]. The default: HTTPS on 127.0.0.1 (a free
/// port), bearer token [`DEFAULT_TOKEN`], the recorded nodes and pods, chunked
/// watches. Override fields with struct update syntax.
#[derive(Debug, Clone, Copy)]
pub struct FakeApiOptions<'a> {
    /// HTTPS with the harness's certificates (always made, see
    /// [`FakeApiServer::certs`]); plain HTTP otherwise.
    pub tls: bool,
    /// Accepted bearer tokens. With none and [`ClientCerts::Off`], everyone is let
    /// in (`kubectl proxy` style).
    pub tokens: &'a [&'a str],
    pub client_certs: ClientCerts,
    /// Run the server inside this namespace (`nsenter --net`), listening on `ip`,
    /// which must already be on an interface there. Drop the server before the
    /// netns (declare it after), or its helpers cannot reach it.
    pub netns: Option<&'a TestNetns>,
    /// Address to listen on; outside a netns a loopback address (127.0.0.1, ::1).
    /// The server certificate has SAN IPs `ip` and 127.0.0.1.
    pub ip: &'a str,
    /// The nodes to serve; `None`: [`recorded_nodes`].
    pub nodes: Option<&'a [Value]>,
    /// The pods to serve; `None`: [`recorded_pods`].
    pub pods: Option<&'a [Value]>,
    pub watch_framing: WatchFraming,
}

impl Default for FakeApiOptions<'_> {
    fn default() -> Self {
        FakeApiOptions {
            tls: true,
            tokens: &[DEFAULT_TOKEN],
            client_certs: ClientCerts::Off,
            netns: None,
            ip: "127.0.0.1",
            nodes: None,
            pods: None,
            watch_framing: WatchFraming::Chunked,
        }
    }
}

/// One API request as the server saw it (test-control requests are not logged).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ApiRequest {
    pub method: String,
    /// The path without the query, e.g. `/api/v1/nodes/kube-worker-1/status`.
    pub path: String,
    /// The raw query string, e.g. `watch=1&resourceVersion=1219&...`; empty if none.
    pub query: String,
    pub content_type: Option<String>,
    /// Whether an `Authorization` header was sent.
    pub authorization: bool,
    /// How the server authenticated it: `"token"`, `"cert:<CN>"`, `"anonymous"`;
    /// `None` when it did not (401).
    pub auth: Option<String>,
    /// The answer's status code (200 for a watch as soon as it starts).
    pub status: Option<u16>,
    /// The body: JSON when it parsed, a string when not, null when empty.
    pub body: Value,
}

impl ApiRequest {
    /// The value of query parameter `key`, if present (no percent-decoding).
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// Whether this is a watch (`?watch=1` or `true`).
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("1" | "true"))
    }

    /// `"GET /api/v1/nodes?watch=1&..."`: short, for assertions on sequences.
    pub fn line(&self) -> String {
        if self.query.is_empty() {
            format!("{} {}", self.method, self.path)
        } else {
            format!("{} {}?{}", self.method, self.path, self.query)
        }
    }
}

/// A running fake API server. Helpers panic when the server does not do what they
/// ask: a test cannot go on without it. Start, restart and drop it on the test's
/// own thread (the parent-death signal is per thread).
#[derive(Debug)]
pub struct FakeApiServer {
    child: Option<Child>,
    netns: Option<PathBuf>,
    certs: Certs,
    tls: bool,
    /// The host part of the URL: `127.0.0.1`, `[::1]`.
    host: String,
    ip: String,
    port: u16,
    /// Fixed arguments (everything but the port).
    args: Vec<String>,
    log: PathBuf,
    state_file: PathBuf,
    dir: TempDir,
}

impl FakeApiServer {
    /// Start the server and wait (≤ 15 s) until it answers. Panics with its log
    /// otherwise.
    pub fn start(opts: FakeApiOptions<'_>) -> FakeApiServer {
        let ip = listen_ip("FakeApiOptions", "the fake API server", opts.ip, opts.netns);
        let script = Path::new(FIXTURES).join("fake_apiserver.py");
        assert!(script.exists(), "{} is missing", script.display());
        let dir = TempDir::new("kube-api");
        let certs = Certs::generate(&dir.join("tls"), &ip.to_string(), "kube-apiserver");
        let write_list = |name: &str, list: Option<&[Value]>, default: &str| -> PathBuf {
            match list {
                Some(items) => {
                    let path = dir.join(name);
                    let text = serde_json::to_string_pretty(items).expect("JSON values");
                    std::fs::write(&path, text)
                        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
                    path
                }
                None => Path::new(FIXTURES).join(default),
            }
        };
        let nodes = write_list("nodes.json", opts.nodes, "nodes.json");
        let pods = write_list("pods.json", opts.pods, "pods.json");
        let state_file = dir.join("state.json");
        let mut args: Vec<String> = vec![
            "-u".into(),
            "-B".into(),
            s(&script),
            "--host".into(),
            ip.to_string(),
            "--port-file".into(),
            s(&dir.join("port")),
            "--state-file".into(),
            s(&state_file),
            "--nodes".into(),
            s(&nodes),
            "--pods".into(),
            s(&pods),
            "--watch-framing".into(),
            match opts.watch_framing {
                WatchFraming::Chunked => "chunked".into(),
                WatchFraming::CloseDelimited => "close".into(),
            },
        ];
        for t in opts.tokens {
            args.extend(["--token".into(), t.to_string()]);
        }
        if opts.tls {
            args.extend([
                "--cert".into(),
                s(&certs.server_cert),
                "--key".into(),
                s(&certs.server_key),
            ]);
            match opts.client_certs {
                ClientCerts::Off => {}
                ClientCerts::Optional | ClientCerts::Required => {
                    let mode = if opts.client_certs == ClientCerts::Required {
                        "required"
                    } else {
                        "optional"
                    };
                    args.extend([
                        "--client-ca".into(),
                        s(&certs.ca),
                        "--client-cert".into(),
                        mode.into(),
                    ]);
                }
            }
        } else {
            assert_eq!(
                opts.client_certs,
                ClientCerts::Off,
                "client certificates need tls"
            );
        }
        let mut server = FakeApiServer {
            child: None,
            netns: opts.netns.map(|ns| ns.path().to_path_buf()),
            certs,
            tls: opts.tls,
            host: url_host(ip),
            ip: ip.to_string(),
            port: 0,
            args,
            log: dir.join("apiserver.log"),
            state_file,
            dir,
        };
        server.spawn(0);
        server
    }

    /// Spawn the script (`port` 0: a free one) and wait until it answers.
    fn spawn(&mut self, port: u16) {
        let port_file = self.dir.join("port");
        let _ = std::fs::remove_file(&port_file);
        let mut cmd = netns_command(self.netns.as_deref(), "python3");
        cmd.args(&self.args).args(["--port", &port.to_string()]);
        command::output_to(&mut cmd, &self.log);
        let child = die_with_thread(&mut cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning python3 {}: {e}", self.args[2]));
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        self.port = self.wait_starting(deadline, "listen", Duration::from_millis(10), |_| {
            std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.trim().parse::<u16>().ok())
        });
        // Listening is not answering: the first request proves the TLS setup too.
        self.wait_starting(deadline, "answer", Duration::from_millis(20), |server| {
            server.try_control("GET", "/_test/state", None).ok()
        });
    }

    /// Poll `f` every `poll` until it gives Some while the server starts; panics
    /// (with the log) when it exits or at `deadline`, saying it did not `what`.
    fn wait_starting<T>(
        &mut self,
        deadline: Instant,
        what: &str,
        poll: Duration,
        mut f: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            self.assert_alive("while starting");
            assert!(
                Instant::now() < deadline,
                "the fake API server did not {what} within {READY_TIMEOUT:?}; log {}:\n{}",
                self.log.display(),
                self.log_tail()
            );
            std::thread::sleep(poll);
        }
    }

    fn assert_alive(&mut self, when: &str) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            panic!(
                "the fake API server exited {when} ({status}); log {}:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
    }

    /// `https://127.0.0.1:<port>` (or `http://`, `https://[::1]:<port>`).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// The address it listens on (no brackets), e.g. for `KUBERNETES_SERVICE_HOST`.
    pub fn ip(&self) -> &str {
        &self.ip
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The harness's certificates: the server's, a trusted client's, a rogue one.
    pub fn certs(&self) -> &Certs {
        &self.certs
    }

    /// The CA that signed the server certificate and the trusted client certificate.
    pub fn ca_path(&self) -> &Path {
        &self.certs.ca
    }

    /// The CA as PEM text.
    pub fn ca_pem(&self) -> String {
        read_text(&self.certs.ca)
    }

    /// A client certificate (CN=weft-test) the server accepts.
    pub fn client_cert_path(&self) -> &Path {
        &self.certs.client_cert
    }

    pub fn client_key_path(&self) -> &Path {
        &self.certs.client_key
    }

    /// A client certificate (CN=weft-test) from a CA the server does not trust.
    pub fn rogue_client_cert_path(&self) -> &Path {
        &self.certs.rogue_cert
    }

    pub fn rogue_client_key_path(&self) -> &Path {
        &self.certs.rogue_key
    }

    /// A kubeconfig for this server in kubeadm's admin.conf layout: cluster `fake`
    /// (server [`url`](Self::url), `certificate-authority-data` inline), context
    /// `fake@fake` (current), user `weft` whose mapping is `user_yaml`, lines like
    /// `"token: abc"` (indented here).
    pub fn kubeconfig(&self, user_yaml: &str) -> String {
        let user: String = user_yaml
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>();
        format!(
            "apiVersion: v1\n\
             clusters:\n\
             - cluster:\n    certificate-authority-data: {ca}\n    server: {url}\n  name: fake\n\
             contexts:\n\
             - context:\n    cluster: fake\n    user: weft\n  name: fake@fake\n\
             current-context: fake@fake\n\
             kind: Config\n\
             preferences: {{}}\n\
             users:\n\
             - name: weft\n  user:\n{user}",
            ca = base64::encode(self.ca_pem().as_bytes()),
            url = self.url(),
        )
    }

    /// The scratch directory (certificates under `tls/`, state, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log (its stderr: one line per request, TLS failures).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last 40 lines of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The server's pid while it runs (python3 itself, also inside a netns).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL the server (an API server crash: connections reset) and wait for
    /// it. Its objects and resourceVersion survive in its state file.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("stop: the server is not running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Start a stopped server again on the same port with the objects it had. Its
    /// watch history is gone: a watch from an older resourceVersion gets 410.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again: the server is running");
        self.spawn(self.port);
    }

    // --- curl and the test-control endpoints ------------------------------------

    /// curl's TLS arguments for a trusted client (`--cacert --cert --key`); empty
    /// without TLS.
    pub fn client_tls_args(&self) -> Vec<String> {
        if !self.tls {
            return Vec::new();
        }
        self.certs.curl_client_args()
    }

    /// Run curl where the server is reachable (inside its netns, if any) with
    /// `-sS --noproxy '*' --max-time 10` and `args`, nothing else (no TLS options),
    /// so tests can also make requests the server must refuse.
    pub fn curl(&self, args: &[&str]) -> Output {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.curl_strings(&args)
    }

    fn curl_strings(&self, args: &[String]) -> Output {
        command::curl(self.netns.as_deref(), CURL_TIMEOUT_SECS, args)
    }

    /// `method path` with an optional JSON body as a trusted client: `(status, JSON)`.
    /// `Err` when curl fails or the answer is not JSON.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.url());
        let mut args = self.client_tls_args();
        args.extend([
            "-X".into(),
            method.into(),
            "-w".into(),
            "\n%{http_code}".into(),
        ]);
        if let Some(b) = body {
            args.extend([
                "-H".into(),
                "Content-Type: application/json".into(),
                "--data-binary".into(),
                b.to_string(),
            ]);
        }
        args.push(url.clone());
        let stdout = command::curl_stdout(self.curl_strings(&args), &format!("{method} {url}"))?;
        let text = String::from_utf8_lossy(&stdout);
        let (body, code) = text
            .rsplit_once('\n')
            .ok_or_else(|| format!("curl {method} {url}: no status line in {text:?}"))?;
        let code: u16 = code
            .trim()
            .parse()
            .map_err(|e| format!("curl {method} {url}: status {code:?}: {e}"))?;
        let json = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body)
                .map_err(|e| format!("{method} {url} answered non-JSON ({e}): {body}"))?
        };
        Ok((code, json))
    }

    fn try_control(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        match self.try_request(method, path, body)? {
            (200, v) => Ok(v),
            (code, v) => Err(format!("{method} {path}: HTTP {code}: {v}")),
        }
    }

    /// A test-control call, panicking (with the server log) unless it answers 200.
    fn control(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.try_control(method, path, body).unwrap_or_else(|e| {
            panic!(
                "fake API server: {e}\nlog {}:\n{}",
                self.log.display(),
                self.log_tail()
            )
        })
    }

    /// The server's current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.control("GET", "/_test/state", None)["resourceVersion"]
            .as_u64()
            .expect("resourceVersion is a number")
    }

    /// Number of watches open right now.
    pub fn open_watches(&self) -> usize {
        self.control("GET", "/_test/state", None)["watches"]
            .as_u64()
            .expect("watches is a number") as usize
    }

    /// Wait until exactly `n` watches are open; panics after `timeout`.
    pub fn wait_open_watches(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let open = self.open_watches();
            if open == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{open} watches open, not {n}, after {timeout:?}; requests:\n{}",
                self.request_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The TLS handshakes that failed so far (Python's error texts).
    pub fn tls_failures(&self) -> Vec<String> {
        serde_json::from_value(self.control("GET", "/_test/state", None)["tlsFailures"].take())
            .expect("tlsFailures is a list of strings")
    }

    /// All nodes as stored now, sorted by name.
    pub fn nodes(&self) -> Vec<Value> {
        serde_json::from_value(self.control("GET", "/_test/nodes", None))
            .expect("the node list is a list")
    }

    /// Node `name` as stored now.
    pub fn node(&self, name: &str) -> Option<Value> {
        match self.try_request("GET", &format!("/_test/nodes/{name}"), None) {
            Ok((200, v)) => Some(v),
            Ok((404, _)) => None,
            other => panic!("fake API server: GET node {name}: {other:?}"),
        }
    }

    /// The annotations of node `name` (empty when it has none); panics when the
    /// node does not exist.
    pub fn annotations(&self, name: &str) -> serde_json::Map<String, Value> {
        let node = self
            .node(name)
            .unwrap_or_else(|| panic!("fake API server: no node {name:?}"));
        node["metadata"]["annotations"]
            .as_object()
            .cloned()
            .unwrap_or_default()
    }

    /// Add or replace a node (watchers get ADDED or MODIFIED); the stored node with
    /// its new resourceVersion.
    pub fn put_node(&self, node: &Value) -> Value {
        self.control("POST", "/_test/nodes", Some(node))
    }

    /// Set (`Some`) or remove (`None`) annotations of node `name` (MODIFIED).
    pub fn annotate(&self, name: &str, changes: &[(&str, Option<&str>)]) -> Value {
        let mut node = self
            .node(name)
            .unwrap_or_else(|| panic!("fake API server: no node {name:?}"));
        let meta = &mut node["metadata"];
        if !meta["annotations"].is_object() {
            meta["annotations"] = json!({});
        }
        let a = meta["annotations"].as_object_mut().expect("an object");
        for (k, v) in changes {
            match v {
                Some(v) => a.insert(k.to_string(), json!(v)),
                None => a.remove(*k),
            };
        }
        self.put_node(&node)
    }

    /// Delete node `name` (watchers get DELETED); the deleted node.
    pub fn delete_node(&self, name: &str) -> Value {
        self.control("DELETE", &format!("/_test/nodes/{name}"), None)
    }

    /// Add or replace a pod (no events).
    pub fn put_pod(&self, pod: &Value) {
        self.control("POST", "/_test/pods", Some(pod));
    }

    /// A compaction: the resourceVersion moves on, the watch history is dropped,
    /// open watches get an ERROR event with code 410 and end, and watches from an
    /// older resourceVersion get the same. The new resourceVersion.
    pub fn expire(&self) -> u64 {
        self.control("POST", "/_test/expire", None)["resourceVersion"]
            .as_u64()
            .expect("a number")
    }

    /// End every open watch cleanly (the terminating chunk; for close-delimited
    /// watches, a TCP close with TLS close_notify), as the real server does at
    /// `timeoutSeconds`. Returns once they are all gone; how many there were.
    pub fn close_watches(&self) -> usize {
        let v = self.control("POST", "/_test/close-watches", None);
        v["closed"].as_u64().expect("a number") as usize
    }

    /// End every open watch abruptly: a TCP shutdown without terminating chunk or
    /// close_notify (a dying proxy or server).
    pub fn close_watches_abruptly(&self) -> usize {
        let v = self.control("POST", "/_test/close-watches?abrupt=1", None);
        v["closed"].as_u64().expect("a number") as usize
    }

    /// Move the resourceVersion on (another object changed) and send a BOOKMARK
    /// with it to watches that allow bookmarks. The new resourceVersion.
    pub fn bookmark(&self) -> u64 {
        self.control("POST", "/_test/bookmark", None)["resourceVersion"]
            .as_u64()
            .expect("a number")
    }

    /// Accept exactly these bearer tokens from now on (a rotation).
    pub fn set_tokens(&self, tokens: &[&str]) {
        self.control("POST", "/_test/tokens", Some(&json!({ "tokens": tokens })));
    }

    /// Answer API requests matching any `(method, regex)` with 403 (RBAC style
    /// message); the regex is searched in the path with `?query` appended when
    /// there is one, so `^/api/v1/nodes$` is the list and `[?&]watch=` the watch.
    /// An empty list allows everything again.
    pub fn forbid(&self, rules: &[(&str, &str)]) {
        let rules: Vec<Value> = rules
            .iter()
            .map(|(m, p)| json!({ "method": m, "path": p }))
            .collect();
        self.control("POST", "/_test/forbid", Some(&json!({ "rules": rules })));
    }

    /// Every API request since the start (or [`clear_requests`](Self::clear_requests)),
    /// oldest first. A restart starts a new log.
    pub fn requests(&self) -> Vec<ApiRequest> {
        serde_json::from_value(self.control("GET", "/_test/requests", None))
            .unwrap_or_else(|e| panic!("the request log does not parse: {e}"))
    }

    /// [`requests`](Self::requests) as `"METHOD path?query"` lines.
    pub fn request_lines(&self) -> Vec<String> {
        self.requests().iter().map(ApiRequest::line).collect()
    }

    /// Forget the requests logged so far.
    pub fn clear_requests(&self) {
        self.control("DELETE", "/_test/requests", None);
    }

    /// The state file (nodes, pods, resourceVersion, tokens, rules).
    pub fn state_path(&self) -> &Path {
        &self.state_file
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A bug in the fake shows as a Python traceback in its log (the client only
        // sees a dropped connection): make it visible.
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        if log.contains("Traceback (most recent call last)") {
            eprintln!(
                "fake API server: the log {} has a Python traceback:\n{log}",
                self.log.display()
            );
        }
        // Then `dir` goes, with the certificates, state and log.
    }
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn s(p: &Path) -> String {
    p.display().to_string()
}
