//! The agent's life: config → lease → rules → subnet.env → ready, then keep the
//! lease renewed, the peer set current and the rules intact until SIGTERM.

use crate::dataplane::Programmer;
use crate::health::Status;
use crate::iface::ExtIface;
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};
use weft_core::backend::Kind;
use weft_core::lease::{
    AcquireRequest, Lease, LeaseError, LeaseSource, NetworkConfig, PeerEvent, PeerUpdate,
    SubnetEnv, SubnetKey,
};
use weft_core::node_masq::NodeMasq;

/// Backoff of failed lease acquisitions: from 200 ms, doubling, up to 10 s.
const LEASE_RETRY_FIRST: Duration = Duration::from_millis(200);

fn next_lease_retry(wait: Duration) -> Duration {
    (wait * 2).min(Duration::from_secs(10))
}

/// Waits between retries of a failed renewal: from 1 s, doubling up to flanneld's
/// 1 min.
const RENEW_RETRY_FIRST: Duration = Duration::from_secs(1);
const RENEW_RETRY_MAX: Duration = Duration::from_secs(60);

/// The wait before retrying a failed renewal, after `previous` (None: the first
/// failure), when the lease has `left` until it expires: never more than half of
/// that, so a transient failure (an etcd member down, an election) costs a few
/// seconds, not the lease. flanneld waits a fixed minute: with
/// `--subnet-lease-renew-margin=1` one failed renewal lets the lease expire.
fn renew_retry(previous: Option<Duration>, left: Option<Duration>) -> Duration {
    let wait = previous.map_or(RENEW_RETRY_FIRST, |w| (w * 2).min(RENEW_RETRY_MAX));
    left.map_or(wait, |left| wait.min(left / 2))
        .max(RENEW_RETRY_FIRST)
}

/// What the daemon needs besides its lease source.
pub struct Settings {
    pub iface: ExtIface,
    pub public_ip: Option<std::net::Ipv4Addr>,
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    pub subnet_file: PathBuf,
    pub renew_margin: Duration,
    pub ip_masq: bool,
    pub fully_random: bool,
    pub forward_rules: bool,
    pub rules_resync: Duration,
    /// How often the peer entries are compared with the kernel and repaired.
    pub peers_resync: Duration,
}

/// One node's state while running.
struct Node<'a, S> {
    source: S,
    settings: &'a Settings,
    status: Arc<Status>,
    config: NetworkConfig,
    request: AcquireRequest,
    lease: Lease,
    renew_at: Instant,
    /// When the lease expires, if it does.
    expires_at: Option<Instant>,
    /// The last wait after a failed renewal; None after a success.
    renew_backoff: Option<Duration>,
    /// Other nodes' leases; deletions are matched against these.
    /// Shared with the data plane's tasks, which only read them.
    peers: BTreeMap<SubnetKey, Arc<Lease>>,
    /// While our lease is gone from the store: when to try again, and the backoff.
    lost: Option<(Instant, Duration)>,
    dp: Programmer,
}

/// Run until SIGTERM or SIGINT. Errors only for what an operator must fix.
pub async fn run<S: LeaseSource>(
    source: S,
    settings: &Settings,
    status: Arc<Status>,
) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let mut node = tokio::select! {
        r = start(source, settings, status.clone()) => r?,
        name = signals.recv() => {
            info!("{name} before the lease was acquired; exiting");
            return Ok(());
        }
    };
    let mut rules_tick = tokio::time::interval(settings.rules_resync.max(Duration::from_secs(1)));
    let mut peers_tick = tokio::time::interval(settings.peers_resync.max(Duration::from_secs(1)));
    peers_tick.reset();
    loop {
        tokio::select! {
            name = signals.recv() => {
                info!("{name}: shutting down; the lease stays for the next start");
                break;
            }
            _ = tokio::time::sleep_until(node.renew_at.into()), if node.lost.is_none() => node.renew().await,
            _ = tokio::time::sleep_until(node.retry_at().into()), if node.lost.is_some() => node.reacquire().await?,
            update = node.source.next_peers() => node.peers_changed(update?).await,
            _ = rules_tick.tick() => node.check_rules().await,
            _ = peers_tick.tick() => node.dp.converge(node.peers.values().cloned().collect()).await,
        }
    }
    status.ready.store(false, Ordering::Relaxed);
    Ok(())
}

/// SIGTERM (what kubelet and systemd send) and SIGINT.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// The name of the next signal received.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Everything up to ready.
async fn start<S: LeaseSource>(
    mut source: S,
    settings: &Settings,
    status: Arc<Status>,
) -> anyhow::Result<Node<'_, S>> {
    let config = wait_for_config(&mut source).await?;
    let kind = backend_kind(&config)?;
    let public = public_ips(&config, settings)?;
    let dp = Programmer::prepare(kind, &settings.iface, public.0, public.1, status.clone()).await?;
    let previous = match SubnetEnv::read(&settings.subnet_file) {
        Ok(prev) => prev.unwrap_or_default(),
        Err(e) => {
            warn!(error = %e, "ignoring the old subnet file");
            SubnetEnv::default()
        }
    };
    let request = AcquireRequest {
        attrs: dp.plane().lease_attrs(public.0, public.1),
        previous_v4: previous.subnet_v4,
        previous_v6: previous.subnet_v6,
    };
    let lease = acquire(&mut source, &config, &request, &status).await?;
    dp.assign(lease.key, config.clone()).await?;
    let mut node = Node {
        source,
        dp,
        settings,
        status,
        renew_at: renew_at(&lease, settings.renew_margin),
        expires_at: expires_at(&lease),
        renew_backoff: None,
        config,
        request,
        lease,
        peers: BTreeMap::new(),
        lost: None,
    };
    node.apply_rules()
        .await
        .context("installing the masquerade and forward rules")?;
    node.write_subnet_file()?;
    node.status.ready.store(true, Ordering::Relaxed);
    info!(subnet = %node.lease.key, file = %settings.subnet_file.display(), "ready");
    if let Err(e) = node.source.mark_ready().await {
        warn!(error = %e, "could not mark the node's network available");
    }
    Ok(node)
}

/// flanneld retries every second until the config exists; so do we, and also
/// while the store is unreachable.
async fn wait_for_config<S: LeaseSource>(source: &mut S) -> anyhow::Result<NetworkConfig> {
    every_second(
        "the network config",
        |e| !matches!(e, LeaseError::Config(_)),
        async || source.network_config().await,
    )
    .await
}

/// Call `f` once a second until it succeeds or fails with an error `retry` rejects;
/// the first retried failure is logged, the rest would only repeat it.
pub async fn every_second<T>(
    what: &str,
    retry: impl Fn(&LeaseError) -> bool,
    mut f: impl AsyncFnMut() -> Result<T, LeaseError>,
) -> anyhow::Result<T> {
    let mut logged = false;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if retry(&e) => {
                if !logged {
                    warn!(error = %e, "waiting for {what} (retrying every second)");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => bail!(e),
        }
    }
}

/// The backend to run: flanneld's explicit choice, one weft implements.
fn backend_kind(config: &NetworkConfig) -> anyhow::Result<Kind> {
    if !config.backend.explicit {
        bail!(
            "the network config has no Backend; flanneld would run the udp backend, which weft does not have: set \"Backend\": {{\"Type\": \"vxlan\"}} or \"host-gw\""
        );
    }
    Kind::of(config).map_err(|e| anyhow::anyhow!(e))
}

/// The lease value this node publishes.
fn public_ips(
    config: &NetworkConfig,
    s: &Settings,
) -> anyhow::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let public_ip = s.public_ip.or(s.iface.addr_v4);
    if config.v4.is_some() && public_ip.is_none() {
        bail!(
            "{} has no IPv4 address to publish: set --public-ip",
            s.iface.name
        );
    }
    let public_ipv6 = s.public_ipv6.or(s.iface.addr_v6);
    if config.v6.is_some() && public_ipv6.is_none() {
        bail!(
            "{} has no IPv6 address to publish: set --public-ipv6",
            s.iface.name
        );
    }
    Ok((config.v4.and(public_ip), config.v6.and(public_ipv6)))
}

/// Acquire, retrying what time can fix (store down, contention, a full pool).
async fn acquire<S: LeaseSource>(
    source: &mut S,
    config: &NetworkConfig,
    req: &AcquireRequest,
    status: &Status,
) -> anyhow::Result<Lease> {
    let mut wait = LEASE_RETRY_FIRST;
    loop {
        match source.acquire(config, req).await {
            Ok(lease) => {
                leased(status, &lease);
                return Ok(lease);
            }
            Err(e @ LeaseError::Config(_)) => bail!(e),
            Err(e) => {
                status.lease_errors.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, retry_in = ?wait, "could not lease a subnet");
                tokio::time::sleep(wait).await;
                wait = next_lease_retry(wait);
            }
        }
    }
}

/// Count and report a lease just acquired.
fn leased(status: &Status, lease: &Lease) {
    status.lease_acquisitions.fetch_add(1, Ordering::Relaxed);
    status.lease_held.store(true, Ordering::Relaxed);
    *status.subnet.lock().unwrap_or_else(|e| e.into_inner()) = cidrs(&lease.key);
    set_expiry(status, lease);
    info!(subnet = %lease.key, etcd_lease = lease.etcd_lease, "leased");
}

/// `10.244.7.0/24` or `10.244.7.0/24,fd44:0:0:7::/64`, for metrics labels.
fn cidrs(key: &SubnetKey) -> String {
    let v4 = key.v4.map(|n| n.to_string());
    let v6 = key.v6.map(|n| n.to_string());
    v4.into_iter().chain(v6).collect::<Vec<_>>().join(",")
}

fn set_expiry(status: &Status, lease: &Lease) {
    let at = lease.ttl.and_then(|t| SystemTime::now().checked_add(t));
    let secs = at
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    status.lease_expiry.store(secs, Ordering::Relaxed);
}

/// When `lease` (just received) expires; None for leases without a TTL.
fn expires_at(lease: &Lease) -> Option<Instant> {
    lease.ttl.map(|ttl| Instant::now() + ttl)
}

/// `ttl − margin` from now; never, for leases without a TTL.
fn renew_at(lease: &Lease, margin: Duration) -> Instant {
    match lease.ttl {
        Some(ttl) => Instant::now() + ttl.saturating_sub(margin).max(Duration::from_secs(1)),
        None => Instant::now() + Duration::from_secs(365 * 24 * 3600),
    }
}

impl<S: LeaseSource> Node<'_, S> {
    async fn renew(&mut self) {
        match self.source.renew(&self.lease).await {
            Ok(lease) => {
                self.status.lease_renewals.fetch_add(1, Ordering::Relaxed);
                set_expiry(&self.status, &lease);
                self.renew_at = renew_at(&lease, self.settings.renew_margin);
                self.expires_at = expires_at(&lease);
                self.renew_backoff = None;
                info!(subnet = %lease.key, ttl = ?lease.ttl, "lease renewed");
                self.lease = lease;
            }
            Err(e) => {
                self.status.lease_errors.fetch_add(1, Ordering::Relaxed);
                let left = self
                    .expires_at
                    .map(|t| t.saturating_duration_since(Instant::now()));
                let wait = renew_retry(self.renew_backoff, left);
                self.renew_backoff = Some(wait);
                self.renew_at = Instant::now() + wait;
                warn!(error = %e, retry_in = ?wait, expires_in = ?left, "lease renewal failed");
            }
        }
    }

    async fn peers_changed(&mut self, update: PeerUpdate) {
        let started = Instant::now();
        let own_gone = match update {
            PeerUpdate::Snapshot(leases) => {
                self.status.resyncs.fetch_add(1, Ordering::Relaxed);
                let own_present = leases.iter().any(|l| l.key == self.lease.key);
                let fresh: BTreeMap<SubnetKey, Arc<Lease>> = leases
                    .into_iter()
                    .filter(|l| l.key != self.lease.key)
                    .map(|l| (l.key, Arc::new(l)))
                    .collect();
                let gone = self.peers.keys().filter(|k| !fresh.contains_key(k)).count();
                info!(peers = fresh.len(), gone, "lease snapshot");
                self.peers = fresh;
                self.dp
                    .converge(self.peers.values().cloned().collect())
                    .await;
                release_free_memory();
                !own_present
            }
            PeerUpdate::Events(events) => {
                self.status
                    .peer_events
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                let mut own_gone = false;
                for ev in events {
                    match ev {
                        PeerEvent::Added(l) if l.key == self.lease.key => {}
                        PeerEvent::Added(l) => {
                            debug!(subnet = %l.key, public_ip = %l.attrs.public_ip, "peer lease added");
                            let new = Arc::new(*l);
                            let old = self.peers.insert(new.key, new.clone());
                            self.dp.update(old, Some(new)).await;
                        }
                        PeerEvent::Removed(k) if k == self.lease.key => own_gone = true,
                        PeerEvent::Removed(k) => {
                            if let Some(old) = self.peers.remove(&k) {
                                debug!(subnet = %k, "peer lease removed");
                                self.dp.update(Some(old), None).await;
                            }
                        }
                    }
                }
                own_gone
            }
        };
        self.status
            .peers
            .store(self.peers.len() as u64, Ordering::Relaxed);
        if own_gone && self.lost.is_none() {
            warn!(subnet = %self.lease.key, "our lease was deleted from the store; leasing again");
            self.status.lease_held.store(false, Ordering::Relaxed);
            self.request.previous_v4 = self.lease.key.v4;
            self.request.previous_v6 = self.lease.key.v6;
            self.lost = Some((Instant::now(), LEASE_RETRY_FIRST));
        }
        self.status
            .observe_reconcile(started.elapsed().as_secs_f64());
    }

    fn retry_at(&self) -> Instant {
        self.lost.map_or_else(Instant::now, |(at, _)| at)
    }

    /// Our lease was deleted behind our back (flanneld exits here). Put it back
    /// (same subnet, same etcd lease), else lease anew, and tell the plugins. One
    /// attempt per call: the main loop retries with backoff and keeps answering
    /// signals meanwhile.
    async fn reacquire(&mut self) -> anyhow::Result<()> {
        let attempt = match self.source.restore(&self.lease).await {
            Ok(Some(lease)) => Ok(lease),
            Ok(None) => self.source.acquire(&self.config, &self.request).await,
            Err(e) => Err(e),
        };
        let lease = match attempt {
            Ok(lease) => lease,
            Err(e @ LeaseError::Config(_)) => bail!(e),
            Err(e) => {
                self.status.lease_errors.fetch_add(1, Ordering::Relaxed);
                let wait = self
                    .lost
                    .map_or(LEASE_RETRY_FIRST, |(_, w)| next_lease_retry(w));
                warn!(error = %e, retry_in = ?wait, "could not lease a subnet again");
                self.lost = Some((Instant::now() + wait, wait));
                return Ok(());
            }
        };
        self.lost = None;
        leased(&self.status, &lease);
        if lease.key != self.lease.key {
            warn!(old = %self.lease.key, new = %lease.key, "the old subnet was taken meanwhile; pods must be restarted to use the new one");
        }
        self.renew_at = renew_at(&lease, self.settings.renew_margin);
        self.expires_at = expires_at(&lease);
        self.renew_backoff = None;
        let moved = lease.key != self.lease.key;
        self.lease = lease;
        if moved && let Err(e) = self.dp.assign(self.lease.key, self.config.clone()).await {
            error!(error = %e, "moving the VTEP to the new subnet failed");
        }
        if let Err(e) = self.apply_rules().await {
            // The rules check retries every resync period.
            error!(error = %e, "installing the rules for the new lease failed");
        }
        self.write_subnet_file()
    }
}

impl<S> Node<'_, S> {
    fn masq(&self) -> NodeMasq {
        NodeMasq {
            network_v4: self.config.network_v4(),
            subnet_v4: self.lease.key.v4,
            network_v6: self.config.network_v6(),
            subnet_v6: self.lease.key.v6,
            fully_random: self.settings.fully_random,
            forward_rules: self.settings.forward_rules,
            masquerade: self.settings.ip_masq,
        }
    }

    /// Install the rules (or remove our table when neither masquerade nor forward
    /// rules are wanted). nft runs as a child process: off the async threads.
    async fn apply_rules(&self) -> anyhow::Result<()> {
        let masq = self.masq();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            if masq.masquerade || masq.forward_rules {
                masq.apply()
            } else {
                NodeMasq::remove()
            }
        })
        .await
        .context("the rules task panicked")?;
        self.status
            .observe_reconcile(started.elapsed().as_secs_f64());
        result.map_err(|e| {
            self.status
                .programming_errors
                .fetch_add(1, Ordering::Relaxed);
            anyhow::anyhow!("{}", e.msg)
        })
    }

    /// Repair rules removed or changed by hand (flanneld's iptables resync).
    async fn check_rules(&self) {
        let masq = self.masq();
        if !masq.masquerade && !masq.forward_rules {
            return;
        }
        let intact = tokio::task::spawn_blocking(move || masq.check()).await;
        if let Ok(Err(missing)) = intact {
            warn!(%missing, "masquerade/forward rules changed behind our back; restoring them");
            if let Err(e) = self.apply_rules().await {
                error!(error = %e, "restoring the rules failed");
            }
        }
    }

    fn write_subnet_file(&self) -> anyhow::Result<()> {
        let env = SubnetEnv::for_lease(
            &self.config,
            &self.lease.key,
            self.mtu(),
            self.settings.ip_masq,
        );
        env.write(&self.settings.subnet_file)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// flanneld's FLANNEL_MTU: vxlan adds 50 bytes of headers.
    fn mtu(&self) -> u32 {
        self.dp.plane().kind().pod_mtu(self.settings.iface.mtu)
    }
}

/// Hand the allocator's free pages back to the kernel. Converging a lease snapshot
/// allocates several times what weftd keeps (the etcd reply, every peer's desired
/// entries, the plan and its results); glibc would otherwise hold on to the freed
/// memory, so weftd's RSS would stay at that peak for good.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_renewal_is_retried_within_the_time_left() {
        let s = Duration::from_secs;
        // Plenty of time left: 1 s, doubling, up to a minute.
        let day = Some(s(86_400));
        let mut wait = None;
        let waits: Vec<u64> = (0..8)
            .map(|_| {
                let w = renew_retry(wait, day);
                wait = Some(w);
                w.as_secs()
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        // --subnet-lease-renew-margin=1: a minute left at the first failure. The
        // retries stay inside it (flanneld's fixed minute lands on the expiry).
        let mut left = s(60);
        let mut wait = None;
        while left > s(2) {
            let w = renew_retry(wait, Some(left));
            assert!(
                w <= left / 2 || w == RENEW_RETRY_FIRST,
                "{w:?} with {left:?} left"
            );
            wait = Some(w);
            left -= w;
        }
        assert_eq!(renew_retry(Some(s(60)), Some(s(40))), s(20));
        // Never below a second, even at the very end; no TTL: plain backoff.
        assert_eq!(renew_retry(Some(s(8)), Some(Duration::ZERO)), s(1));
        assert_eq!(renew_retry(Some(s(32)), None), s(60));
    }
}
