//! `/healthz` (alive), `/readyz` (rules and subnet.env in place) and `/metrics`
//! (Prometheus text format) on `--healthz-ip:--healthz-port`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// What the agent reports. Updated by the daemon loop, read by the HTTP server.
#[derive(Default)]
pub struct Status {
    pub ready: AtomicBool,
    /// 1 while the node holds a lease.
    pub lease_held: AtomicBool,
    /// Seconds since the epoch when the lease expires (0: never or none).
    pub lease_expiry: AtomicU64,
    pub peers: AtomicU64,
    pub lease_acquisitions: AtomicU64,
    pub lease_renewals: AtomicU64,
    pub lease_errors: AtomicU64,
    pub peer_events: AtomicU64,
    pub resyncs: AtomicU64,
    pub programming_errors: AtomicU64,
    /// The node's subnets, for the `weft_lease_info` labels.
    pub subnet: Mutex<String>,
    reconcile: Mutex<Histogram>,
}

/// Seconds buckets of the reconcile latency histogram.
const BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Status {
    /// Record how long applying one change (lease, peers, rules) took.
    pub fn observe_reconcile(&self, secs: f64) {
        let mut h = self.reconcile.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let flag = |a: &AtomicBool| u64::from(a.load(Ordering::Relaxed));
        let subnet = self
            .subnet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{value}"
            );
        };
        metric(
            "weft_ready",
            "gauge",
            "1 once rules and subnet.env are in place.",
            format!(" {}", flag(&self.ready)),
        );
        metric(
            "weft_lease_held",
            "gauge",
            "1 while this node holds a subnet lease.",
            format!(" {}", flag(&self.lease_held)),
        );
        metric(
            "weft_lease_info",
            "gauge",
            "The leased subnets.",
            format!("{{subnet=\"{subnet}\"}} 1"),
        );
        metric(
            "weft_lease_expiry_timestamp_seconds",
            "gauge",
            "When the lease expires (0: never).",
            format!(" {}", get(&self.lease_expiry)),
        );
        metric(
            "weft_lease_acquisitions_total",
            "counter",
            "Leases acquired (startup and re-acquisitions).",
            format!(" {}", get(&self.lease_acquisitions)),
        );
        metric(
            "weft_lease_renewals_total",
            "counter",
            "Lease renewals.",
            format!(" {}", get(&self.lease_renewals)),
        );
        metric(
            "weft_lease_errors_total",
            "counter",
            "Failed lease operations (acquire, renew).",
            format!(" {}", get(&self.lease_errors)),
        );
        metric(
            "weft_peers",
            "gauge",
            "Leases of other nodes currently known.",
            format!(" {}", get(&self.peers)),
        );
        metric(
            "weft_peer_events_total",
            "counter",
            "Peer lease events received.",
            format!(" {}", get(&self.peer_events)),
        );
        metric(
            "weft_resyncs_total",
            "counter",
            "Full re-listings of the lease store.",
            format!(" {}", get(&self.resyncs)),
        );
        metric(
            "weft_programming_errors_total",
            "counter",
            "Failures to program the kernel (rules, routes).",
            format!(" {}", get(&self.programming_errors)),
        );
        let h = self.reconcile.lock().unwrap_or_else(|e| e.into_inner());
        let name = "weft_reconcile_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to apply one change.\n# TYPE {name} histogram"
        );
        for (b, c) in BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            h.count, h.sum, h.count
        );
        out
    }
}

fn respond(status: &Status, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (code, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n".to_owned()),
        (&Method::GET | &Method::HEAD, "/readyz") if status.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "ready\n".to_owned())
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
        }
        (&Method::GET, "/metrics") => (StatusCode::OK, status.render()),
        (_, "/healthz" | "/readyz" | "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let content_type = if req.uri().path() == "/metrics" {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}

/// At most this many connections are served at once; more are closed on accept.
/// Probes and scrapers need a handful.
const MAX_CONNECTIONS: usize = 64;
/// A connection must have sent its request headers this long after it was accepted.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Any connection is closed this long after it was accepted, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of file descriptors, say) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bind now (so a taken port fails startup), then serve forever in the background.
///
/// The endpoints need no authentication, so whoever reaches the port must not be
/// able to exhaust weftd: connections beyond [`MAX_CONNECTIONS`] are closed at
/// once, each serves one request (no keep-alive), must send its headers within
/// [`HEADER_TIMEOUT`] and is closed after [`CONNECTION_TIMEOUT`]. Otherwise idle
/// connections held open would use up weftd's file descriptors, and with them its
/// netlink sockets, the nft runs that repair the rules and the store connection.
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the health server to {addr}: {e}"))?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut refused: u64 = 0;
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "health server: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        refused,
                        "health server: {MAX_CONNECTIONS} connections open, closing new ones"
                    );
                }
                drop(stream);
                continue;
            };
            let status = status.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let resp = respond(&status, &req);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(io, service);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let s = Status::default();
        s.peers.store(3, Ordering::Relaxed);
        *s.subnet.lock().unwrap() = "10.244.7.0/24".into();
        s.observe_reconcile(0.002);
        let text = s.render();
        assert!(
            text.contains("# TYPE weft_peers gauge\nweft_peers 3\n"),
            "{text}"
        );
        assert!(text.contains("weft_lease_info{subnet=\"10.244.7.0/24\"} 1\n"));
        assert!(text.contains("weft_reconcile_duration_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(text.contains("weft_reconcile_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("weft_reconcile_duration_seconds_count 1\n"));
        // Every sample line belongs to a declared metric.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {base} ")), "{line}");
        }
    }
}
