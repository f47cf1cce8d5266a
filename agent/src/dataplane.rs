//! The agent's side of the data plane: prepares the backend, programs peers as
//! their leases come and go (only the entries that changed), and converges
//! everything on snapshots and every resync period. Netlink blocks, so all of it
//! runs on the blocking pool.

use crate::health::Status;
use crate::iface::ExtIface;
use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{info, warn};
use weft_core::backend::{DataPlane, ExtLink, Kind, plan};
use weft_core::lease::{Lease, NetworkConfig, SubnetKey};
use weft_core::netlink::Netlink;

/// The backend and the netlink handle it programs through.
#[derive(Clone)]
pub struct Programmer {
    plane: Arc<DataPlane>,
    nl: Arc<Netlink>,
    status: Arc<Status>,
}

impl Programmer {
    /// Create the VTEPs (vxlan) before leasing: their MACs go into the lease.
    pub async fn prepare(
        kind: Kind,
        iface: &ExtIface,
        public4: Option<std::net::Ipv4Addr>,
        public6: Option<std::net::Ipv6Addr>,
        status: Arc<Status>,
    ) -> anyhow::Result<Programmer> {
        let (index, mtu) = (iface.index, iface.mtu);
        let (plane, nl) = tokio::task::spawn_blocking(move || -> weft_core::Result<_> {
            let nl = Netlink::host()?;
            let ext = ExtLink {
                index,
                mtu,
                addrs: nl.addresses(index)?,
            };
            let plane = DataPlane::prepare(
                &nl,
                kind,
                ext,
                public4.map(Into::into),
                public6.map(Into::into),
            )?;
            Ok((plane, nl))
        })
        .await
        .context("the backend setup task panicked")?
        .map_err(|e| anyhow::anyhow!("setting up the backend: {}", e.msg))?;
        Ok(Programmer {
            plane: Arc::new(plane),
            nl: Arc::new(nl),
            status,
        })
    }

    pub fn plane(&self) -> &DataPlane {
        &self.plane
    }

    /// Our subnet's address on the VTEPs.
    pub async fn assign(&self, key: SubnetKey, config: NetworkConfig) -> anyhow::Result<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.plane.assign(&this.nl, &key, &config))
            .await
            .context("the backend task panicked")?
            .map_err(|e| anyhow::anyhow!("configuring the VTEP: {}", e.msg))
    }

    /// Make the kernel hold exactly what `peers` need: adds what is missing,
    /// repairs what was changed by hand, removes entries of peers gone meanwhile.
    pub async fn converge(&self, peers: Vec<Arc<Lease>>) {
        let this = self.clone();
        let started = Instant::now();
        let done = tokio::task::spawn_blocking(move || {
            let desired = this.plane.desired(peers.iter().map(|p| &**p));
            let (writes, failed) = this.plane.converge(&this.nl, &desired)?;
            Ok::<_, weft_core::CniError>((writes, desired.len(), failed))
        })
        .await;
        match done {
            Ok(Ok((writes, entries, failed))) => {
                self.report(&failed);
                if writes > 0 {
                    info!(writes, entries, took = ?started.elapsed(), "converged the peer entries");
                }
            }
            Ok(Err(e)) => {
                self.status
                    .programming_errors
                    .fetch_add(1, Ordering::Relaxed);
                warn!(error = %e.msg, "reading the kernel's peer entries failed; next resync retries");
            }
            Err(e) => warn!(error = %e, "the converge task panicked"),
        }
        self.status
            .observe_reconcile(started.elapsed().as_secs_f64());
    }

    /// One peer changed: write only the difference between its old and new entries.
    pub async fn update(&self, old: Option<Arc<Lease>>, new: Option<Arc<Lease>>) {
        let this = self.clone();
        let started = Instant::now();
        let failed = tokio::task::spawn_blocking(move || {
            let before = this.plane.desired(old.as_deref());
            let after = this.plane.desired(new.as_deref());
            this.plane.apply(&this.nl, &plan(&after, &before))
        })
        .await
        .unwrap_or_default();
        self.report(&failed);
        self.status
            .observe_reconcile(started.elapsed().as_secs_f64());
    }

    fn report(&self, failed: &[(weft_core::netlink::NetOp, weft_core::CniError)]) {
        if failed.is_empty() {
            return;
        }
        self.status
            .programming_errors
            .fetch_add(failed.len() as u64, Ordering::Relaxed);
        for (op, e) in failed.iter().take(5) {
            warn!(%op, error = %e.msg, "programming a peer entry failed; the next resync retries");
        }
    }
}
