//! Leases in etcd v3, byte-compatible with flanneld ≥ v0.18 so weft and flannel
//! nodes can share one cluster. Where flanneld is fragile, this does better:
//! - a lost create race is retried with a fresh listing (flanneld exits);
//! - renewal keeps the same etcd lease alive (flanneld grants a new one each time
//!   and never revokes the old, leaking one lease per day and restart);
//! - a reused lease keeps its etcd lease, and a reservation (a key without a TTL)
//!   stays one;
//! - the peer watch resumes from the last revision after a disconnect and re-lists
//!   after compaction, and every RPC has a deadline (a dead server is noticed).

use super::{
    AcquireRequest, Lease, LeaseAttrs, LeaseError, LeaseSource, NetworkConfig, PeerEvent,
    PeerUpdate, SubnetKey, SubnetPicker, free_subnets,
};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use ipnet::IpNet;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// flanneld's lease TTL: 24 h.
pub const SUBNET_TTL: Duration = Duration::from_secs(24 * 3600);
/// flanneld's default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// Deadline of one unary RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// How often in a row an RPC that failed on the way to etcd is made again ([`call`]),
/// and the pause before each retry (times the attempt number; 0.7 s in all).
const RETRIES: u32 = 7;
const RETRY_PAUSE: Duration = Duration::from_millis(25);
/// How often a lost create race is retried before giving up.
const RACE_RETRIES: u32 = 50;
/// Reconnect backoff bounds (flannel's: 100 ms to 5 s).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where the store is and how to authenticate (flanneld's `--etcd-*` flags).
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// A password: `{:?}` shows `<redacted>`, so logging anything that holds one
/// cannot reveal it. The value is `.0`.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Subnet leases in etcd, plus the peer watch state.
pub struct EtcdSource {
    client: Client,
    prefix: String,
    picker: SubnetPicker,
    watch: WatchState,
}

#[derive(Default)]
struct WatchState {
    /// The revision the peer set is known at; None until listed (or after compaction).
    revision: Option<i64>,
    stream: Option<WatchStream>,
    backoff: Option<Duration>,
}

impl EtcdSource {
    /// Connect. TLS when a CA or client certificate is given; user/password auth
    /// when a username is given. Fails fast on bad files; an unreachable server
    /// surfaces on the first request.
    pub async fn connect(opts: &EtcdOptions) -> Result<EtcdSource, LeaseError> {
        let mut connect = ConnectOptions::new()
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_connect_timeout(Duration::from_secs(3))
            .with_require_leader(true);
        if let Some(tls) = tls_options(opts)? {
            connect = connect.with_tls(tls);
        }
        if let Some(user) = &opts.username {
            connect = connect
                .with_user(user, opts.password.as_ref().map_or("", |p| &p.0))
                .with_auto_token_refresh(true);
        }
        let endpoints = opts.endpoints.clone();
        if endpoints.is_empty() {
            return Err(LeaseError::Config("no etcd endpoints given".into()));
        }
        let client = deadline(Client::connect(endpoints, Some(connect)))
            .await
            .map_err(|e| {
                LeaseError::Store(format!("connecting to etcd {:?}: {e}", opts.endpoints))
            })?;
        let prefix = if opts.prefix.is_empty() {
            DEFAULT_PREFIX
        } else {
            &opts.prefix
        };
        Ok(EtcdSource {
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
            picker: SubnetPicker::default(),
            watch: WatchState::default(),
        })
    }

    /// `<prefix>/subnets/<key>`.
    pub fn lease_key(&self, key: &SubnetKey) -> String {
        format!("{}/subnets/{key}", self.prefix)
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// All leases and the revision they were read at. Keys that are not subnet
    /// keys, or values that are not lease JSON, are skipped as flanneld does.
    pub async fn list(&mut self) -> Result<(Vec<Lease>, i64), LeaseError> {
        let (leases, revision) = self.list_versioned().await?;
        Ok((leases.into_iter().map(|(l, _)| l).collect(), revision))
    }

    /// [`list`](Self::list) with each key's mod_revision, for guarded writes.
    async fn list_versioned(&mut self) -> Result<(Vec<(Lease, i64)>, i64), LeaseError> {
        let prefix = self.subnets_prefix();
        let resp = call(&self.client, async |mut c| {
            c.get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await
        })
        .await
        .map_err(|e| store("listing leases", e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let leases = resp
            .kvs()
            .iter()
            .filter_map(|kv| lease_of(&prefix, kv).map(|l| (l, kv.mod_revision())))
            .collect();
        Ok((leases, revision))
    }

    /// Create `key` if nobody holds it: flanneld's `Version(key) == 0` txn, under
    /// `reuse` (an etcd lease of ours still alive) or a fresh 24 h lease. Ok(None)
    /// when the key exists (a lost race); a fresh lease is then revoked.
    async fn create(
        &mut self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
        reuse: Option<(i64, Duration)>,
    ) -> Result<Option<Lease>, LeaseError> {
        let (id, ttl) = match reuse {
            Some(alive) => alive,
            None => {
                let ttl = SUBNET_TTL.as_secs() as i64;
                let grant = call_unsent(&self.client, async |mut c| c.lease_grant(ttl, None).await)
                    .await
                    .map_err(|e| store("granting an etcd lease", e))?;
                (grant.id(), Duration::from_secs(grant.ttl().max(0) as u64))
            }
        };
        let path = self.lease_key(&key);
        let value = attrs.to_json();
        // The key is read back when the guard fails: a retried attempt (see `call`)
        // whose first one did land finds our own put, which is a win, not a lost race.
        let txn = Txn::new()
            .when([Compare::version(path.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                path.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(path, None)]);
        let won = match call(&self.client, async |mut c| c.txn(txn.clone()).await).await {
            Ok(resp) => resp.succeeded() || holds_our_put(&resp, id, &value),
            Err(e) => {
                if reuse.is_none() {
                    self.revoke(id).await;
                }
                return Err(store("creating the lease", e));
            }
        };
        if !won {
            if reuse.is_none() {
                self.revoke(id).await;
            }
            return Ok(None);
        }
        Ok(Some(Lease {
            key,
            attrs: attrs.clone(),
            etcd_lease: id,
            ttl: Some(ttl),
        }))
    }

    /// Take over `old` (our own lease from before a restart): same key, our new
    /// value, its etcd lease kept alive (or none for a reservation). Ok(None) when
    /// the key changed meanwhile or its etcd lease is gone.
    async fn reuse(
        &mut self,
        old: &Lease,
        attrs: &LeaseAttrs,
        mod_revision: i64,
    ) -> Result<Option<Lease>, LeaseError> {
        let ttl = match old.etcd_lease {
            0 => None,
            id => match self.keep_alive(id).await? {
                Some(ttl) => Some(ttl),
                None => return Ok(None),
            },
        };
        let path = self.lease_key(&old.key);
        let put = match old.etcd_lease {
            0 => PutOptions::new(),
            id => PutOptions::new().with_lease(id),
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                path.clone(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::put(path, attrs.to_json(), Some(put))]);
        let resp = call(&self.client, async |mut c| c.txn(txn.clone()).await)
            .await
            .map_err(|e| store("updating our lease", e))?;
        Ok(resp.succeeded().then(|| Lease {
            key: old.key,
            attrs: attrs.clone(),
            etcd_lease: old.etcd_lease,
            ttl,
        }))
    }

    /// One keep-alive round trip: the remaining TTL, or None if the lease is gone.
    async fn keep_alive(&mut self, id: i64) -> Result<Option<Duration>, LeaseError> {
        let round_trip = call(&self.client, async |mut c| {
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            stream.message().await
        });
        match round_trip.await {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(Some(Duration::from_secs(resp.ttl() as u64))),
            Ok(_) => Ok(None),
            // etcd-client reports an expired lease as an error since 0.14.
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(None),
            Err(e) => Err(store("renewing the etcd lease", e)),
        }
    }

    async fn revoke(&mut self, id: i64) {
        // Best effort: an unrevoked lease expires by itself within 24 h.
        let _ = call(&self.client, async |mut c| c.lease_revoke(id).await).await;
    }

    /// Delete `key` if it is still at `mod_revision`.
    async fn delete_if_unchanged(
        &mut self,
        key: &SubnetKey,
        mod_revision: i64,
    ) -> Result<(), LeaseError> {
        let path = self.lease_key(key);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                path.clone(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::delete(path, None)]);
        call(&self.client, async |mut c| c.txn(txn.clone()).await)
            .await
            .map_err(|e| store("deleting an incompatible lease", e))?;
        Ok(())
    }

    /// One acquisition attempt on a fresh listing. Ok(None): lost a race, retry.
    async fn try_acquire(
        &mut self,
        config: &NetworkConfig,
        req: &AcquireRequest,
    ) -> Result<Option<Lease>, LeaseError> {
        let (mut leases, _) = self.list_versioned().await?;
        if let Some(i) = leases
            .iter()
            .position(|(l, _)| same_node(&l.attrs, &req.attrs, config))
        {
            let (old, rev) = leases.swap_remove(i);
            if compatible(config, &old.key) {
                return self.reuse(&old, &req.attrs, rev).await;
            }
            // Our lease from an older config: give it back and lease anew.
            self.delete_if_unchanged(&old.key, rev).await?;
        }
        let taken: Vec<SubnetKey> = leases.iter().map(|(l, _)| l.key).collect();
        let key = match previous(config, req, &taken) {
            Some(key) => key,
            None => self.choose(config, &taken)?,
        };
        self.create(key, &req.attrs, None).await
    }

    /// A random free subnet per enabled family.
    fn choose(
        &mut self,
        config: &NetworkConfig,
        taken: &[SubnetKey],
    ) -> Result<SubnetKey, LeaseError> {
        let mut pick =
            |pool: Option<&super::Pool>, nets: Vec<IpNet>| -> Result<Option<IpNet>, LeaseError> {
                let Some(pool) = pool else { return Ok(None) };
                let free = free_subnets(pool, nets, super::CANDIDATES);
                self.picker
                    .pick(&free)
                    .map(Some)
                    .ok_or(LeaseError::OutOfSubnets)
            };
        let v4 = pick(
            config.v4.as_ref(),
            taken.iter().filter_map(|k| k.v4.map(IpNet::V4)).collect(),
        )?;
        let v6 = pick(
            config.v6.as_ref(),
            taken.iter().filter_map(|k| k.v6.map(IpNet::V6)).collect(),
        )?;
        Ok(SubnetKey {
            v4: v4.and_then(|n| match n {
                IpNet::V4(n) => Some(n),
                IpNet::V6(_) => None,
            }),
            v6: v6.and_then(|n| match n {
                IpNet::V6(n) => Some(n),
                IpNet::V4(_) => None,
            }),
        })
    }

    /// Open the peer watch from the known revision.
    async fn open_watch(&mut self, revision: i64) -> Result<WatchStream, etcd_client::Error> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let prefix = self.subnets_prefix();
        call(&self.client, async |mut c| {
            c.watch(prefix.clone(), Some(opts.clone())).await
        })
        .await
    }

    async fn back_off(&mut self) {
        let wait = self
            .watch
            .backoff
            .map_or(BACKOFF_MIN, |b| (b * 2).min(BACKOFF_MAX));
        self.watch.backoff = Some(wait);
        tokio::time::sleep(wait).await;
    }

    /// The etcd client, for callers that need more than leases (tests, tools).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl LeaseSource for EtcdSource {
    async fn network_config(&mut self) -> Result<NetworkConfig, LeaseError> {
        let path = format!("{}/config", self.prefix);
        let resp = call(&self.client, async |mut c| c.get(path.clone(), None).await)
            .await
            .map_err(|e| store("reading the network config", e))?;
        match resp.kvs().first() {
            Some(kv) => NetworkConfig::parse(kv.value()),
            None => Err(LeaseError::ConfigMissing(path)),
        }
    }

    /// flanneld's order: our own lease (same public IP) if it still fits the config,
    /// else the subnet from subnet.env if free, else a random free one; a lost
    /// create race starts over on a fresh listing.
    async fn acquire(
        &mut self,
        config: &NetworkConfig,
        req: &AcquireRequest,
    ) -> Result<Lease, LeaseError> {
        for attempt in 0..RACE_RETRIES {
            if let Some(lease) = self.try_acquire(config, req).await? {
                return Ok(lease);
            }
            // Spread the retries of nodes that collided.
            let jitter = self.picker.pick(&[0u64, 5, 10, 15, 20, 25]).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(
                jitter + u64::from(attempt.min(10)) * 5,
            ))
            .await;
        }
        Err(LeaseError::Contended(RACE_RETRIES))
    }

    /// Keep the same etcd lease alive. If it is gone (expired while we were cut
    /// off, or deleted), create the key again under a fresh lease, guarded by
    /// create-if-absent so a node that took the subnet meanwhile keeps it.
    async fn renew(&mut self, lease: &Lease) -> Result<Lease, LeaseError> {
        if lease.etcd_lease == 0 {
            return Ok(lease.clone());
        }
        if let Some(ttl) = self.keep_alive(lease.etcd_lease).await? {
            return Ok(Lease {
                ttl: Some(ttl),
                ..lease.clone()
            });
        }
        self.create(lease.key, &lease.attrs, None)
            .await?
            .ok_or_else(|| {
                LeaseError::Store(format!(
                    "our lease {} expired and another node now holds it",
                    lease.key
                ))
            })
    }

    /// Put our deleted key back, under its etcd lease when that is still alive (a
    /// deleted key does not revoke its lease). If another node took the subnet
    /// meanwhile, our old etcd lease is revoked so nothing leaks.
    async fn restore(&mut self, lease: &Lease) -> Result<Option<Lease>, LeaseError> {
        let alive = match lease.etcd_lease {
            0 => None,
            id => self.keep_alive(id).await?.map(|ttl| (id, ttl)),
        };
        let restored = self.create(lease.key, &lease.attrs, alive).await?;
        if restored.is_none()
            && let Some((id, _)) = alive
        {
            self.revoke(id).await;
        }
        Ok(restored)
    }

    async fn next_peers(&mut self) -> Result<PeerUpdate, LeaseError> {
        loop {
            let Some(revision) = self.watch.revision else {
                match self.list().await {
                    Ok((leases, rev)) => {
                        self.watch.revision = Some(rev);
                        self.watch.stream = None;
                        return Ok(PeerUpdate::Snapshot(leases));
                    }
                    Err(_) => {
                        self.back_off().await;
                        continue;
                    }
                }
            };
            if self.watch.stream.is_none() {
                match self.open_watch(revision).await {
                    Ok(s) => self.watch.stream = Some(s),
                    Err(_) => {
                        self.back_off().await;
                        continue;
                    }
                }
            }
            // The stream stays in `self` while we wait, so a caller that drops this
            // future (a `select!` branch) resumes on the same watch.
            let stream = self.watch.stream.as_mut().expect("opened above");
            match stream.message().await {
                Ok(Some(resp)) if resp.canceled() => {
                    // Compacted past our revision: re-list. Otherwise (leader lost,
                    // server shutting down) re-open from the same revision.
                    self.watch.stream = None;
                    if resp.compact_revision() > 0 {
                        self.watch.revision = None;
                    } else {
                        self.back_off().await;
                    }
                    continue;
                }
                Ok(Some(resp)) => {
                    self.watch.backoff = None;
                    // Resume after the last event delivered; a progress notification
                    // (no events) vouches for everything up to its header revision.
                    let delivered = match resp.events().last().and_then(|e| e.kv()) {
                        Some(kv) => kv.mod_revision(),
                        None => resp.header().map_or(revision, |h| h.revision()),
                    };
                    self.watch.revision = Some(delivered.max(revision));
                    let prefix = self.subnets_prefix();
                    let events: Vec<PeerEvent> = resp
                        .events()
                        .iter()
                        .filter_map(|ev| peer_event(&prefix, ev))
                        .collect();
                    if !events.is_empty() {
                        return Ok(PeerUpdate::Events(events));
                    }
                }
                Ok(None) | Err(_) => {
                    self.watch.stream = None;
                    self.back_off().await;
                }
            }
        }
    }
}

fn peer_event(prefix: &str, ev: &etcd_client::Event) -> Option<PeerEvent> {
    let kv = ev.kv()?;
    match ev.event_type() {
        EventType::Put => lease_of(prefix, kv).map(|l| PeerEvent::Added(Box::new(l))),
        EventType::Delete => subnet_key(prefix, kv).map(PeerEvent::Removed),
    }
}

fn subnet_key(prefix: &str, kv: &KeyValue) -> Option<SubnetKey> {
    kv.key_str().ok()?.strip_prefix(prefix)?.parse().ok()
}

/// A stored lease, or None for keys/values flanneld would skip too.
fn lease_of(prefix: &str, kv: &KeyValue) -> Option<Lease> {
    Some(Lease {
        key: subnet_key(prefix, kv)?,
        attrs: LeaseAttrs::from_json(kv.value()).ok()?,
        etcd_lease: kv.lease(),
        ttl: None,
    })
}

/// The same node: equal public IP (IPv6 when the node has no IPv4 one). An
/// unspecified address never matches, which is flanneld's v6-only bug.
fn same_node(a: &LeaseAttrs, b: &LeaseAttrs, config: &NetworkConfig) -> bool {
    if config.v4.is_some() && !b.public_ip.is_unspecified() {
        return a.public_ip == b.public_ip;
    }
    b.public_ipv6.is_some() && a.public_ipv6 == b.public_ipv6
}

/// Whether the key fits the current config (flanneld's `isSubnetConfigCompat`).
fn compatible(config: &NetworkConfig, key: &SubnetKey) -> bool {
    let fits = |pool: Option<&super::Pool>, net: Option<IpNet>| match (pool, net) {
        (Some(p), Some(n)) => p.holds(n),
        (None, None) => true,
        _ => false,
    };
    fits(config.v4.as_ref(), key.v4.map(IpNet::V4))
        && fits(config.v6.as_ref(), key.v6.map(IpNet::V6))
}

/// The subnets from subnet.env, if they fit the config and nobody holds them.
fn previous(
    config: &NetworkConfig,
    req: &AcquireRequest,
    taken: &[SubnetKey],
) -> Option<SubnetKey> {
    let key = SubnetKey {
        v4: config.v4.and(req.previous_v4.map(|n| n.trunc())),
        v6: config.v6.and(req.previous_v6.map(|n| n.trunc())),
    };
    if key.v4.is_none() && key.v6.is_none() || !compatible(config, &key) {
        return None;
    }
    let overlaps = |a: IpNet, b: IpNet| a.contains(&b.network()) || b.contains(&a.network());
    let clash = taken.iter().any(|t| {
        matches!((t.v4, key.v4), (Some(a), Some(b)) if overlaps(IpNet::V4(a), IpNet::V4(b)))
            || matches!((t.v6, key.v6), (Some(a), Some(b)) if overlaps(IpNet::V6(a), IpNet::V6(b)))
    });
    (!clash).then_some(key)
}

/// The failed-guard branch of [`EtcdSource::create`]'s txn found the key holding
/// exactly what we put, under our etcd lease.
fn holds_our_put(resp: &etcd_client::TxnResponse, id: i64, value: &str) -> bool {
    resp.op_responses().iter().any(|op| match op {
        etcd_client::TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .is_some_and(|kv| kv.lease() == id && kv.value() == value.as_bytes()),
        _ => false,
    })
}

const CERT: &str = "CERTIFICATE-----";

fn tls_options(opts: &EtcdOptions) -> Result<Option<TlsOptions>, LeaseError> {
    // A file without the PEM block would only fail each TLS handshake later, with
    // a bare "transport error", retried forever.
    let read = |p: &PathBuf, what: &str, block: &str| {
        let bytes = std::fs::read(p).map_err(|e| {
            LeaseError::Config(format!("reading the etcd {what} {}: {e}", p.display()))
        })?;
        let text = String::from_utf8_lossy(&bytes);
        let has_block = text
            .lines()
            .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(block));
        if !has_block {
            return Err(LeaseError::Config(format!(
                "the etcd {what} {} holds no PEM {}",
                p.display(),
                block.trim_end_matches('-').to_lowercase()
            )));
        }
        Ok(bytes)
    };
    let mut tls = TlsOptions::new();
    let mut any = false;
    if let Some(ca) = &opts.ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca, "CA file", CERT)?));
        any = true;
    }
    match (&opts.cert_file, &opts.key_file) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read(cert, "certificate file", CERT)?,
                read(key, "key file", "PRIVATE KEY-----")?,
            ));
            any = true;
        }
        (None, None) => {}
        _ => {
            return Err(LeaseError::Config(
                "--etcd-certfile and --etcd-keyfile must be given together".into(),
            ));
        }
    }
    Ok(any.then_some(tls))
}

/// Run one RPC (`f` makes an attempt, on a clone of `client`) within the deadline,
/// making an attempt that failed on the way to etcd again at once (up to
/// [`RETRIES`] times). The client balances over all endpoints, and tonic's
/// balancer keeps an endpoint whose member is down in the rotation: the first
/// request on its old connection fails ("broken pipe"), and each one it hands the
/// endpoint later fails as well ("tcp connect error"), while the other members
/// would answer. With one member of three down that was every second or third RPC:
/// a renewal failed (and weftd waited a minute), a watch backed off.
///
/// For RPCs that are safe to repeat: reads, keep-alives, revokes and the guarded
/// txns (a repeated txn whose first attempt did land finds its guard false: the
/// create txn reads the key back then and counts its own put as a win; the others
/// are resolved as a lost race on a fresh listing). A lease grant is not: see
/// [`call_unsent`].
async fn call<T>(
    client: &Client,
    f: impl AsyncFn(Client) -> Result<T, etcd_client::Error>,
) -> Result<T, etcd_client::Error> {
    call_with(client, |e| failure(e) != Failure::Other, f).await
}

/// [`call`] for an RPC that must not run twice (a lease grant: a second one would
/// leak a lease for 24 h): made again only when it cannot have reached etcd, its
/// connection having failed to open.
async fn call_unsent<T>(
    client: &Client,
    f: impl AsyncFn(Client) -> Result<T, etcd_client::Error>,
) -> Result<T, etcd_client::Error> {
    call_with(client, |e| failure(e) == Failure::Unsent, f).await
}

async fn call_with<T>(
    client: &Client,
    again: impl Fn(&etcd_client::Error) -> bool,
    f: impl AsyncFn(Client) -> Result<T, etcd_client::Error>,
) -> Result<T, etcd_client::Error> {
    deadline(async {
        let mut attempt = 0;
        loop {
            match f(client.clone()).await {
                Err(e) if attempt < RETRIES && again(&e) => {
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE * attempt).await;
                }
                done => return done,
            }
        }
    })
    .await
}

/// How an RPC failed, as far as retrying it is concerned.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// No connection could be made (refused, no route): nothing was sent.
    Unsent,
    /// The connection broke under the request: its server may have gone down
    /// with it, or may have carried it out.
    Broken,
    /// An answer from etcd, a deadline, anything else.
    Other,
}

/// The first I/O error under a failed RPC tells how it failed.
fn failure(e: &etcd_client::Error) -> Failure {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return Failure::Other;
    };
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io_failure(io.kind());
        }
        source = err.source();
    }
    Failure::Other
}

fn io_failure(kind: std::io::ErrorKind) -> Failure {
    use std::io::ErrorKind::*;
    match kind {
        ConnectionRefused | HostUnreachable | NetworkUnreachable | AddrNotAvailable => {
            Failure::Unsent
        }
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof | NotConnected => {
            Failure::Broken
        }
        _ => Failure::Other,
    }
}

/// Run one RPC with a deadline, so a dead or partitioned server is an error, not
/// a hang.
async fn deadline<T>(
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {RPC_TIMEOUT:?}"),
        ))),
    }
}

fn store(what: &str, e: etcd_client::Error) -> LeaseError {
    LeaseError::Store(format!("etcd: {what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_without_their_pem_block_are_refused_at_once() {
        let dir = std::env::temp_dir().join(format!("weft-etcd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            Some(p)
        };
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n";
        let good = EtcdOptions {
            ca_file: file("ca", cert),
            cert_file: file("cert", cert),
            key_file: file("key", key),
            ..Default::default()
        };
        assert!(tls_options(&good).unwrap().is_some());
        let garbage_key = EtcdOptions {
            key_file: file("garbage", "SECRET-MARKER not a key"),
            ..good.clone()
        };
        let Err(LeaseError::Config(msg)) = tls_options(&garbage_key) else {
            panic!("a key file that is no key was accepted")
        };
        assert!(msg.ends_with("holds no PEM private key"), "{msg}");
        assert!(!msg.contains("SECRET-MARKER"), "{msg}");
        let key_as_ca = EtcdOptions {
            ca_file: file("ca2", key),
            ..good
        };
        let Err(LeaseError::Config(msg)) = tls_options(&key_as_ca) else {
            panic!("a CA file that is no certificate was accepted")
        };
        assert!(msg.ends_with("holds no PEM certificate"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_password_is_never_in_debug_output() {
        let opts = EtcdOptions {
            username: Some("root".into()),
            password: Some(Secret("s3cr3t-pw".into())),
            ..Default::default()
        };
        let shown = format!("{opts:?}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(shown.contains("password: Some(<redacted>)"), "{shown}");
    }
}
