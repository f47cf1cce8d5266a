//! Real etcd servers (Debian's etcd-server, `/usr/bin/etcd`, 3.4) for integration
//! tests of the agent: one member or a small cluster, plain or TLS, on loopback or
//! inside a [`TestNetns`].
//!
//! Tests inspect what the code under test wrote through etcd's v3 JSON gateway with
//! `curl`, not through an etcd client crate: a bug shared by the agent and the
//! harness would otherwise go unnoticed, and there is no `etcdctl` on the test
//! machines. Things worth knowing about that gateway (3.4):
//!
//! - keys and values are base64 (`bytes` in the protobuf JSON mapping);
//! - 64-bit integers (revisions, lease IDs, TTLs) are JSON *strings*;
//! - fields holding a zero value are left out: no `kvs` when nothing matched, no
//!   `leases` when there are none, no `deleted` when nothing was deleted;
//! - failures are HTTP 400 with `{"error", "message", "code"}`.
//!
//! Every member dies with the thread that started it ([`die_with_thread`]), so a test
//! process killed without unwinding does not leave etcd servers behind.

use crate::certs::Certs;
use crate::command::{self, die_with_thread, netns_command};
use crate::{TempDir, TestNetns, base64, listen_ip, url_host};
use serde_json::{Value, json};
use std::io::Write;
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The etcd server binary (Debian package etcd-server).
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a start (or restart) may take before the harness gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a member may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-request limit for curl: a request to a member without quorum hangs otherwise.
const CURL_TIMEOUT_SECS: &str = "5";

/// How to start an [`EtcdCluster`]. `EtcdOptions::default()` is one plain-HTTP
/// member on 127.0.0.1; override fields with struct update syntax:
///
/// ```ignore
/// let etcd = EtcdCluster::start(EtcdOptions { members: 3, ..Default::default() });
/// ```
#[derive(Debug, Clone, Copy)]
pub struct EtcdOptions<'a> {
    /// Cluster size: 1, or 3 for leader-loss tests (any size ≥ 1 works).
    pub members: usize,
    /// HTTPS with client certificates on the client URLs (peers stay plain HTTP).
    pub tls: bool,
    /// Run the members inside this namespace (`nsenter --net`), listening on `ip`
    /// with fixed ports. The cluster keeps only the path: drop it before the netns
    /// (declare it after), or its helpers cannot reach it any more.
    pub netns: Option<&'a TestNetns>,
    /// Address to listen on. Without a netns it must be a loopback address (free
    /// ports are picked); inside one it must already be on an interface there.
    pub ip: &'a str,
}

impl Default for EtcdOptions<'_> {
    fn default() -> Self {
        EtcdOptions {
            members: 1,
            tls: false,
            netns: None,
            ip: "127.0.0.1",
        }
    }
}

/// Running etcd members with their data in a [`TempDir`]. Dropping it SIGKILLs the
/// members, waits for them and removes everything.
///
/// Helpers panic when etcd does not do what they ask: a test cannot go on without
/// its etcd. KV and lease helpers talk to the first running member; after killing
/// or stopping members call [`wait_leader`](Self::wait_leader) first, since a
/// request made during an election fails.
///
/// Members die with the *thread* that spawned them (that is how the parent-death
/// signal works), so start, restart and drop a cluster on the test's own thread,
/// not on a short-lived helper thread.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    /// `nsenter --net=` target when the cluster lives in a netns.
    netns: Option<PathBuf>,
    tls: Option<Tls>,
    token: String,
    initial_cluster: String,
    dir: TempDir,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    /// etcd's log (zap to stderr) plus its stdout, appended to across restarts.
    log: PathBuf,
    child: Option<Child>,
}

/// Certificates made with the `openssl` CLI ([`Certs`]); see [`EtcdCluster::ca_path`].
type Tls = Certs;

/// Why a start attempt failed, and whether trying again with other ports may help.
struct StartError {
    message: String,
    port_clash: bool,
}

impl EtcdCluster {
    /// Start all members and wait (≤ 20 s) until each answers `/health` with
    /// `"health":"true"`. Panics with the members' log tails otherwise.
    ///
    /// Loopback ports are found by binding port 0, so another process may grab one
    /// before etcd binds it; a start that fails with "address already in use" is
    /// retried with new ports.
    pub fn start(opts: EtcdOptions<'_>) -> EtcdCluster {
        assert!(
            opts.members >= 1,
            "an etcd cluster needs at least one member"
        );
        assert!(
            Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} not found: install Debian's etcd-server"
        );
        let ip = listen_ip("EtcdOptions", "etcd", opts.ip, opts.netns);
        let attempts = if opts.netns.is_some() { 1 } else { 3 };
        for attempt in 1..=attempts {
            match Self::try_start(&opts, ip) {
                Ok(cluster) => return cluster,
                Err(e) if e.port_clash && attempt < attempts => {
                    eprintln!(
                        "etcd harness: port clash, retrying: {}",
                        first_line(&e.message)
                    );
                }
                Err(e) => panic!("{}", e.message),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn try_start(opts: &EtcdOptions<'_>, ip: IpAddr) -> Result<EtcdCluster, StartError> {
        let dir = TempDir::new("etcd");
        let host = url_host(ip);
        let tls = opts
            .tls
            .then(|| Certs::generate(&dir.join("tls"), &ip.to_string(), "etcd"));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ports = match opts.netns {
            // The namespace is ours alone: fixed, predictable ports.
            Some(_) => (0..opts.members)
                .map(|i| (2379 + 10000 * i as u16, 2380 + 10000 * i as u16))
                .collect(),
            None => free_ports(ip, opts.members),
        };
        let members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| Member {
                name: format!("m{i}"),
                client_url: format!("{scheme}://{host}:{client}"),
                peer_url: format!("http://{host}:{peer}"),
                data_dir: dir.join(format!("m{i}.data")),
                log: dir.join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut cluster = EtcdCluster {
            members,
            netns: opts.netns.map(|ns| ns.path().to_path_buf()),
            tls,
            token: format!("weft-{}-{nanos}", std::process::id()),
            initial_cluster,
            dir,
        };
        // All at once: each member waits for the others before it becomes healthy.
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new");
        }
        let all: Vec<usize> = (0..cluster.members.len()).collect();
        cluster.wait_healthy(&all).map_err(|message| StartError {
            port_clash: message.contains("address already in use"),
            message: format!("starting etcd (members: {}): {message}", all.len()),
        })?;
        Ok(cluster)
    }

    /// Spawn member `i` with `--initial-cluster-state <state>`.
    fn spawn(&mut self, i: usize, state: &str) {
        let m = &self.members[i];
        let _ = writeln!(
            command::append_to(&m.log),
            "=== etcd harness: starting {} ({state}) ===",
            m.name
        );
        let mut cmd = netns_command(self.netns.as_deref(), ETCD_BIN);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // Fast failure detection: a new leader within about a second.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        // etcd reads every flag from ETCD_<FLAG> too; the developer's must not leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        command::output_to(&mut cmd, &m.log);
        let child = die_with_thread(&mut cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {ETCD_BIN} for {}: {e}", m.name));
        self.members[i].child = Some(child);
    }

    /// Wait until each member in `which` is healthy; `Err` with log tails on timeout
    /// or when one exits.
    fn wait_healthy(&mut self, which: &[usize]) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut pending: Vec<usize> = which.to_vec();
        loop {
            for &i in &pending {
                if !self.is_running(i) {
                    let status = self.members[i]
                        .child
                        .as_mut()
                        .and_then(|c| c.wait().ok())
                        .map_or("never started".into(), |s| s.to_string());
                    self.members[i].child = None;
                    return Err(format!(
                        "member {i} exited ({status}); log {}:\n{}",
                        self.members[i].log.display(),
                        self.log_tail(i)
                    ));
                }
            }
            pending.retain(|&i| !self.health(i));
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tails: Vec<String> = pending
                    .iter()
                    .map(|&i| {
                        format!(
                            "member {i} ({}), log {}:\n{}",
                            self.members[i].client_url,
                            self.members[i].log.display(),
                            self.log_tail(i)
                        )
                    })
                    .collect();
                return Err(format!(
                    "not healthy within {READY_TIMEOUT:?}:\n{}",
                    tails.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Number of members (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Client URLs of all members, running or not, e.g. `http://127.0.0.1:41235`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> &str {
        &self.members[i].client_url
    }

    /// The scratch directory holding data dirs, logs and certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Member `i`'s log (etcd's zap output), appended to across restarts.
    pub fn log_path(&self, i: usize) -> &Path {
        &self.members[i].log
    }

    /// The last 40 lines of member `i`'s log, for assertion messages.
    pub fn log_tail(&self, i: usize) -> String {
        let log = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Pid of member `i`'s etcd process while it runs (nsenter execs etcd, so this
    /// is etcd itself even inside a netns).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Whether member `i`'s process is alive: started, not stopped or killed by the
    /// harness, and not exited on its own.
    pub fn is_running(&self, i: usize) -> bool {
        let Some(child) = &self.members[i].child else {
            return false;
        };
        // WNOWAIT: look without reaping, so Child::wait still works later.
        // SAFETY: waitid only writes into `info`, a zeroed siginfo_t.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // With WNOHANG, si_pid stays 0 while the child is still running.
        r == 0 && unsafe { info.si_pid() } == 0
    }

    /// SIGTERM member `i` and wait for it to exit (SIGKILL and panic after 10 s).
    pub fn stop(&mut self, i: usize) {
        assert!(self.is_running(i), "stop({i}): member {i} is not running");
        let mut child = self.members[i].child.take().expect("running member");
        // SAFETY: signalling our own, not yet reaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "member {i} did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.log_tail(i)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL member `i` (a crash: no clean shutdown, no leadership transfer) and
    /// wait for it.
    pub fn kill(&mut self, i: usize) {
        assert!(self.is_running(i), "kill({i}): member {i} is not running");
        let mut child = self.members[i].child.take().expect("running member");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Restart a stopped or killed member with its data dir and flags
    /// (`--initial-cluster-state existing`) and wait (≤ 20 s) until it is healthy,
    /// which needs a quorum: with a majority down use
    /// [`start_again_no_wait`](Self::start_again_no_wait) for all but the last.
    pub fn start_again(&mut self, i: usize) {
        self.start_again_no_wait(i);
        if let Err(e) = self.wait_healthy(&[i]) {
            panic!("restarting etcd member {i}: {e}");
        }
    }

    /// [`start_again`](Self::start_again) without waiting for health.
    pub fn start_again_no_wait(&mut self, i: usize) {
        assert!(
            !self.is_running(i),
            "start_again({i}): member {i} is still running"
        );
        // Reap a member that exited on its own.
        if let Some(mut old) = self.members[i].child.take() {
            let _ = old.wait();
        }
        self.spawn(i, "existing");
    }

    /// Wait (≤ 20 s) until every running member is healthy; panics with log tails.
    pub fn wait_all_healthy(&mut self) {
        let running: Vec<usize> = (0..self.len()).filter(|&i| self.is_running(i)).collect();
        if let Err(e) = self.wait_healthy(&running) {
            panic!("etcd: {e}");
        }
    }

    /// Whether member `i` answers `GET /health` with `"health":"true"` (false when
    /// it is down, has no leader or does not answer).
    pub fn health(&self, i: usize) -> bool {
        let url = format!("{}/health", self.members[i].client_url);
        let mut args = self.client_tls_args();
        args.push(url);
        let out = self.curl_strings(&args);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v["health"] == "true" || v["health"] == true)
    }

    /// Member `i`'s `/v3/maintenance/status`: `header.member_id`, `leader`,
    /// `raftTerm`, `version`, `dbSize`, ... (64-bit numbers as strings).
    pub fn status(&self, i: usize) -> Result<Value, String> {
        self.try_call_at(i, "/v3/maintenance/status", &json!({}))
    }

    /// Index of the leader: every running member that answers names the same
    /// leader, and it is one of them. `None` during an election, when members
    /// disagree, or when the named leader is down.
    pub fn leader(&self) -> Option<usize> {
        let mut seen = Vec::new(); // (index, member_id, leader)
        for i in 0..self.len() {
            if !self.is_running(i) {
                continue;
            }
            let Ok(s) = self.status(i) else { continue };
            let Some(id) = s["header"]["member_id"].as_str() else {
                continue;
            };
            let id = id.to_string();
            let leader = s["leader"].as_str().unwrap_or("0").to_string();
            seen.push((i, id, leader));
        }
        let leader = &seen.first()?.2;
        if leader == "0" || seen.iter().any(|(_, _, l)| l != leader) {
            return None;
        }
        seen.iter()
            .find(|(_, id, _)| id == leader)
            .map(|(i, _, _)| *i)
    }

    /// Wait until [`leader`](Self::leader) is `Some`; panics with each member's
    /// status after `timeout`.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            if Instant::now() >= deadline {
                let statuses: Vec<String> = (0..self.len())
                    .map(|i| match self.status(i) {
                        Ok(s) => format!("member {i}: {s}"),
                        Err(e) => format!("member {i}: {e}"),
                    })
                    .collect();
                panic!(
                    "no etcd leader within {timeout:?}:\n{}",
                    statuses.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // --- TLS material -------------------------------------------------------------

    fn tls(&self, what: &str) -> &Tls {
        self.tls
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: the cluster was started without tls"))
    }

    /// The CA that signed the servers' and the trusted client's certificates.
    pub fn ca_path(&self) -> &Path {
        &self.tls("ca_path").ca
    }

    /// A client certificate (CN=weft-test) etcd accepts.
    pub fn client_cert_path(&self) -> &Path {
        &self.tls("client_cert_path").client_cert
    }

    /// The key of [`client_cert_path`](Self::client_cert_path).
    pub fn client_key_path(&self) -> &Path {
        &self.tls("client_key_path").client_key
    }

    /// A client certificate (CN=weft-test) from another CA, which etcd refuses.
    pub fn rogue_client_cert_path(&self) -> &Path {
        &self.tls("rogue_client_cert_path").rogue_cert
    }

    /// The key of [`rogue_client_cert_path`](Self::rogue_client_cert_path).
    pub fn rogue_client_key_path(&self) -> &Path {
        &self.tls("rogue_client_key_path").rogue_key
    }

    // --- curl and the v3 JSON gateway ---------------------------------------------

    /// curl arguments for a trusted client (`--cacert --cert --key`); empty without TLS.
    pub fn client_tls_args(&self) -> Vec<String> {
        self.tls
            .as_ref()
            .map_or_else(Vec::new, Certs::curl_client_args)
    }

    /// Run curl where the cluster is reachable (inside its netns, if any) with
    /// `-sS --noproxy '*' --max-time 5` and `args`, nothing else: no TLS options, so
    /// tests can also try requests etcd must refuse.
    pub fn curl(&self, args: &[&str]) -> Output {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.curl_strings(&args)
    }

    fn curl_strings(&self, args: &[String]) -> Output {
        command::curl(self.netns.as_deref(), CURL_TIMEOUT_SECS, args)
    }

    /// POST `body` to the gateway `path` (e.g. `/v3/kv/range`) of member `i`. `Err`
    /// when curl fails, the answer is not JSON, or it carries an `error`.
    pub fn try_call_at(&self, i: usize, path: &str, body: &Value) -> Result<Value, String> {
        let url = format!("{}{path}", self.members[i].client_url);
        let mut args = self.client_tls_args();
        args.extend(["-X", "POST", "--data-binary"].map(String::from));
        args.push(body.to_string());
        args.push(url.clone());
        let stdout = command::curl_stdout(self.curl_strings(&args), &url)?;
        let v: Value = serde_json::from_slice(&stdout).map_err(|e| {
            format!(
                "{url} answered non-JSON ({e}): {}",
                String::from_utf8_lossy(&stdout)
            )
        })?;
        if v.get("error").is_some() {
            return Err(format!("{url} with {body}: {v}"));
        }
        Ok(v)
    }

    /// [`try_call_at`](Self::try_call_at) on the first running member, panicking on
    /// error.
    pub fn call(&self, path: &str, body: &Value) -> Value {
        let i = (0..self.len())
            .find(|&i| self.is_running(i))
            .expect("etcd: no member is running");
        self.try_call_at(i, path, body)
            .unwrap_or_else(|e| panic!("etcd gateway: {e}"))
    }

    /// Put `key` = `value`.
    pub fn put(&self, key: &str, value: &str) {
        self.call("/v3/kv/put", &kv_body(key, value, None));
    }

    /// Put `key` = `value` attached to lease `lease`.
    pub fn put_with_lease(&self, key: &str, value: &str, lease: i64) {
        self.call("/v3/kv/put", &kv_body(key, value, Some(lease)));
    }

    /// The value of `key` (linearizable read).
    pub fn get(&self, key: &str) -> Option<String> {
        let r = self.call("/v3/kv/range", &json!({ "key": b64(key) }));
        first_value(&r)
    }

    /// The value of `key` read through member `i`, e.g. to show a restarted member
    /// serves the cluster's data.
    pub fn get_from(&self, i: usize, key: &str) -> Option<String> {
        let r = self
            .try_call_at(i, "/v3/kv/range", &json!({ "key": b64(key) }))
            .unwrap_or_else(|e| panic!("etcd gateway: {e}"));
        first_value(&r)
    }

    /// All keys starting with `prefix` (the empty prefix: all keys) with their
    /// values, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let kvs = self.get_prefix_leases(prefix).into_iter();
        kvs.map(|(k, v, _)| (k, v)).collect()
    }

    /// All keys starting with `prefix` with their values and the etcd lease each is
    /// attached to (0: none), sorted by key.
    pub fn get_prefix_leases(&self, prefix: &str) -> Vec<(String, String, i64)> {
        let key = if prefix.is_empty() { "\0" } else { prefix };
        let body = json!({
            "key": b64(key),
            "range_end": base64::encode(&prefix_end(prefix.as_bytes())),
        });
        let r = self.call("/v3/kv/range", &body);
        r["kvs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|kv| (unb64(&kv["key"]), unb64(&kv["value"]), int(&kv["lease"])))
            .collect()
    }

    /// Delete every key starting with `prefix` in one request; how many there were.
    pub fn delete_prefix(&self, prefix: &str) -> i64 {
        assert!(
            !prefix.is_empty(),
            "delete_prefix: refusing to delete all keys"
        );
        let body = json!({
            "key": b64(prefix),
            "range_end": base64::encode(&prefix_end(prefix.as_bytes())),
        });
        int(&self.call("/v3/kv/deleterange", &body)["deleted"])
    }

    /// Delete `key`; whether it existed.
    pub fn delete(&self, key: &str) -> bool {
        let r = self.call("/v3/kv/deleterange", &json!({ "key": b64(key) }));
        int(&r["deleted"]) > 0
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let r = self.call(
            "/v3/kv/range",
            &json!({ "key": b64("\0"), "count_only": true }),
        );
        int(&r["header"]["revision"])
    }

    /// Compact history up to `revision` and wait until it is done (`physical`).
    /// Panics if it is already compacted or in the future.
    pub fn compact(&self, revision: i64) {
        self.call(
            "/v3/kv/compaction",
            &json!({ "revision": revision.to_string(), "physical": true }),
        );
    }

    /// Grant a lease of `ttl` seconds; its ID.
    pub fn lease_grant(&self, ttl: i64) -> i64 {
        let r = self.call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() }));
        int(&r["ID"])
    }

    /// Revoke lease `id`, deleting its keys.
    pub fn lease_revoke(&self, id: i64) {
        self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }));
    }

    /// IDs of all live leases, sorted.
    pub fn lease_list(&self) -> Vec<i64> {
        let r = self.call("/v3/lease/leases", &json!({}));
        let mut ids: Vec<i64> = r["leases"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|l| int(&l["ID"]))
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Remaining TTL in seconds of lease `id` and the keys attached to it; `(-1, [])`
    /// when the lease expired, was revoked or never existed.
    pub fn lease_ttl(&self, id: i64) -> (i64, Vec<String>) {
        let r = self.call(
            "/v3/lease/timetolive",
            &json!({ "ID": id.to_string(), "keys": true }),
        );
        let keys = r["keys"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(unb64)
            .collect();
        (int(&r["TTL"]), keys)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Then `dir` goes, with the data dirs and logs.
    }
}

/// `n` (client, peer) port pairs free on `ip` right now. All listeners are held
/// until every port is picked, so the pairs are distinct.
fn free_ports(ip: IpAddr, n: usize) -> Vec<(u16, u16)> {
    let listeners: Vec<TcpListener> = (0..2 * n)
        .map(|_| TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("binding {ip} port 0: {e}")))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().expect("bound listener").port())
        .collect();
    ports.chunks(2).map(|c| (c[0], c[1])).collect()
}

/// The end of etcd's range for `prefix`: the prefix with its last byte below 0xff
/// incremented and the rest cut off; `"\0"` (no end) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn b64(s: &str) -> String {
    base64::encode(s.as_bytes())
}

/// Decode a gateway `bytes` field (absent means empty) as UTF-8.
fn unb64(v: &Value) -> String {
    let enc = v.as_str().unwrap_or("");
    let bytes = base64::decode(enc).unwrap_or_else(|| panic!("etcd sent bad base64: {v}"));
    String::from_utf8(bytes).unwrap_or_else(|e| panic!("etcd value is not UTF-8: {e}"))
}

/// A gateway int64: a JSON string (or number), absent meaning 0.
fn int(v: &Value) -> i64 {
    match v {
        Value::Null => 0,
        Value::String(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("etcd sent a bad integer {s:?}: {e}")),
        Value::Number(n) => n
            .as_i64()
            .unwrap_or_else(|| panic!("etcd sent a bad integer {n}")),
        _ => panic!("etcd sent a non-integer: {v}"),
    }
}

fn kv_body(key: &str, value: &str, lease: Option<i64>) -> Value {
    let mut body = json!({ "key": b64(key), "value": b64(value) });
    if let Some(lease) = lease {
        body["lease"] = json!(lease.to_string());
    }
    body
}

fn first_value(range: &Value) -> Option<String> {
    range["kvs"].get(0).map(|kv| unb64(&kv["value"]))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_ff() {
        assert_eq!(prefix_end(b"/weft/"), b"/weft0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn gateway_integers_are_strings_or_absent() {
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&json!(-1)), -1);
        assert_eq!(int(&Value::Null), 0);
    }
}
