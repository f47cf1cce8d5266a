//! Throughput rows: weftd's data plane under one bulk TCP stream, the way `iperf3`
//! would measure it (iperf3 is not installed here, so this is its equivalent: a
//! std `TcpStream` pair, 256 KiB writes, one stream).
//!
//! Each iteration builds a fresh two-node cluster with netns-tests'
//! [`weftd_cluster`](netns_tests::weftd_cluster) harness: an underlay namespace
//! with a bridge and etcd, two node namespaces whose `eth0` is a veth port of that
//! bridge, weftd on both, and one pod per node attached with the real `bridge` +
//! `host-local` plugins as flannel's CNI plugin does it. The stream then runs
//! from the pod on node 1 to the pod on node 2 (the sockets are made on threads
//! inside the pods' namespaces), and, in the same iteration, from node 1 to node 2
//! over the bare underlay veth, so each overlay sample has a baseline measured
//! next to it under the same load.
//!
//! Every stream is preceded by an untimed 16 MiB warm-up (slow start, ARP); the
//! timed part sends [`BYTES`] or stops after [`MAX_TIME`], whichever comes first,
//! and runs from the first write until the receiver sees EOF.
//!
//! Cleanup: the pods, weftd (SIGTERM) and the cluster (etcd, namespaces) are
//! dropped at the end of each iteration, on errors too. The harness panics (and
//! so aborts, in release) if the cluster itself cannot be built; its namespaces,
//! weftd and etcd die with this process regardless.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use netns_tests::weftd_cluster::{Cluster, HOST_GW_CONFIG, READY_TIMEOUT, VXLAN_CONFIG, Weftd};
use netns_tests::{TestNetns, inside};

use crate::harness::check_interrupted;
use crate::weftd::{Env, Sample};

/// The receiver's port, in whichever namespace it listens.
const PORT: u16 = 5201;
/// The timed part of a stream sends this much...
const BYTES: u64 = 1 << 30;
/// ...or stops after this long.
const MAX_TIME: Duration = Duration::from_secs(4);
/// Untimed warm-up before each timed stream.
const WARM_UP: u64 = 16 << 20;
/// Bytes per write and per read.
const CHUNK: usize = 256 << 10;
/// No read or write may block longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long pods may take to reach each other once weftd is ready.
const REACH: Duration = Duration::from_secs(20);

pub const NOTE: &str = "no reference binary (iperf3 is not installed): one TCP stream, \
     std TcpStream, 256 KiB writes, 1 GiB or 4 s whichever first after a 16 MiB warm-up, \
     between namespaces of a fresh 2-node cluster per iteration; ms = the timed transfer, \
     Gbit/s and the ratio to the bare underlay (measured in the same iteration) in the figures";

/// One timed stream: what the receiver got and how long it took.
struct Stream {
    bytes: u64,
    elapsed: Duration,
}

impl Stream {
    fn gbit_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// The throughput rows need netns-tests' binaries (weftd, bridge, host-local) to
/// be the bench's `--ours`: that harness finds them by itself.
fn check_bin_dir(env: &Env) -> Result<()> {
    let ours = env.bin_dir();
    let theirs = netns_tests::bin_dir();
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    ensure!(
        same(ours, &theirs),
        "the throughput rows run the binaries in {} (WEFT_BIN_DIR or target/release), \
         not --ours {}: set WEFT_BIN_DIR to the same directory",
        theirs.display(),
        ours.display()
    );
    Ok(())
}

/// Stream from `from` to a listener in `to` on `to_ip`: an untimed warm-up, then
/// the timed stream.
fn measure(from: &TestNetns, to: &TestNetns, to_ip: &str) -> Result<Stream> {
    let listener = inside(to, || TcpListener::bind(("0.0.0.0", PORT)))
        .with_context(|| format!("listening on port {PORT} in {}", to.path().display()))?;
    let dst: SocketAddr = format!("{to_ip}:{PORT}")
        .parse()
        .with_context(|| format!("the address {to_ip}"))?;
    stream(&listener, from, dst, WARM_UP, IO_TIMEOUT).context("the warm-up stream")?;
    check_interrupted()?;
    let s = stream(&listener, from, dst, BYTES, MAX_TIME)?;
    ensure!(s.bytes > 0, "the stream to {dst} carried nothing");
    Ok(s)
}

/// One connection from `from` to `dst`, accepted on `listener`: send `limit`
/// bytes or for `max_time`, whichever ends first, then close. Timed from the
/// first write until the receiver reads EOF.
fn stream(
    listener: &TcpListener,
    from: &TestNetns,
    dst: SocketAddr,
    limit: u64,
    max_time: Duration,
) -> Result<Stream> {
    let mut conn = inside(from, || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(10))
    })
    .with_context(|| format!("connecting to {dst}"))?;
    // The handshake is done: accept returns at once.
    let (mut accepted, _) = listener.accept().context("accepting")?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    accepted.set_read_timeout(Some(IO_TIMEOUT))?;
    let receiver = std::thread::spawn(move || -> std::io::Result<(u64, Instant)> {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            match accepted.read(&mut buf) {
                Ok(0) => return Ok((got, Instant::now())),
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });
    // Not all zeros, in case anything on the way would compress.
    let buf: Vec<u8> = (0..CHUNK)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    let written = (|| {
        while sent < limit && start.elapsed() < max_time {
            let n = CHUNK.min((limit - sent) as usize);
            conn.write_all(&buf[..n])?;
            sent += n as u64;
        }
        conn.shutdown(Shutdown::Write)
    })();
    if let Err(e) = written {
        // Unblock the receiver before waiting for it.
        let _ = conn.shutdown(Shutdown::Both);
        let _ = receiver.join();
        bail!("writing to {dst} after {sent} bytes: {e}");
    }
    let (got, end) = match receiver.join() {
        Ok(r) => r.with_context(|| format!("reading the stream to {dst}"))?,
        Err(_) => bail!("the receiver thread panicked"),
    };
    ensure!(
        got == sent,
        "{dst}: sent {sent} bytes, the receiver got {got}"
    );
    Ok(Stream {
        bytes: got,
        elapsed: end - start,
    })
}

/// Wait until `from` pings `ip` (the first packets may race the last entries).
fn wait_ping(from: &TestNetns, ip: &str) -> Result<()> {
    let deadline = Instant::now() + REACH;
    loop {
        let out = from.exec(&["ping", "-c", "1", "-W", "1", "-q", ip]);
        if out.status.success() {
            return Ok(());
        }
        check_interrupted()?;
        ensure!(
            Instant::now() < deadline,
            "{ip} did not answer pings from {} within {REACH:?}",
            from.path().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mib(s: &Stream) -> f64 {
    s.bytes as f64 / f64::from(1 << 20)
}

// --- rows ---------------------------------------------------------------------------

pub fn vxlan(env: &mut Env, i: usize) -> Result<Sample> {
    overlay(env, i, VXLAN_CONFIG)
}

pub fn host_gw(env: &mut Env, i: usize) -> Result<Sample> {
    overlay(env, i, HOST_GW_CONFIG)
}

/// Two nodes running weftd with network config `config`, a pod on each: the
/// pod→pod stream, and the node→node one over the bare underlay next to it (in
/// alternating order across iterations).
fn overlay(env: &mut Env, i: usize, config: &str) -> Result<Sample> {
    check_bin_dir(env)?;
    let c = Cluster::new(2, config);
    let mut weftds: Vec<Weftd> = c.nodes.iter().map(|n| n.weftd(&[])).collect();
    for (node, w) in c.nodes.iter().zip(&mut weftds) {
        node.wait_ready(w);
    }
    for node in &c.nodes {
        node.wait_metric("weft_peers", "1", READY_TIMEOUT);
    }
    let a = c.node(1).add_pod("throughput-a");
    let b = c.node(2).add_pod("throughput-b");
    wait_ping(&a.ns, &b.ip)?;
    let (n1, n2) = (c.node(1), c.node(2));
    let bare = || measure(&n1.ns, &n2.ns, &n2.ip).context("node→node over the underlay");
    let pods = || measure(&a.ns, &b.ns, &b.ip).context("pod→pod");
    let (pod, under) = if i.is_multiple_of(2) {
        let p = pods()?;
        check_interrupted()?;
        (p, bare()?)
    } else {
        let u = bare()?;
        check_interrupted()?;
        (pods()?, u)
    };
    for w in &mut weftds {
        w.assert_running();
    }
    if config == VXLAN_CONFIG {
        // The pods' stream went through node 1's VTEP.
        let link = n1
            .ns
            .exec_json(&["ip", "-j", "-s", "link", "show", "dev", "flannel.1"]);
        let tx = link[0]["stats64"]["tx"]["bytes"].as_u64().unwrap_or(0);
        ensure!(
            tx >= pod.bytes,
            "flannel.1 on node 1 sent {tx} bytes, less than the {} of the pod stream",
            pod.bytes
        );
    } else {
        ensure!(!n1.has_link("flannel.1"), "host-gw made a VTEP");
    }
    Ok(Sample {
        elapsed: pod.elapsed,
        figures: vec![
            ("pod→pod throughput", pod.gbit_s(), "Gbit/s"),
            ("bare underlay, same iteration", under.gbit_s(), "Gbit/s"),
            (
                "pod→pod as % of the bare underlay",
                100.0 * pod.gbit_s() / under.gbit_s(),
                "%",
            ),
            ("pod→pod MiB sent (timed part)", mib(&pod), "MiB"),
        ],
    })
}

/// Two nodes on the underlay bridge, no weftd: node→node over the veths.
pub fn bare_underlay(_: &mut Env, _: usize) -> Result<Sample> {
    let c = Cluster::new(2, VXLAN_CONFIG);
    let (n1, n2) = (c.node(1), c.node(2));
    let s = measure(&n1.ns, &n2.ns, &n2.ip)?;
    Ok(Sample {
        elapsed: s.elapsed,
        figures: vec![
            ("node→node throughput", s.gbit_s(), "Gbit/s"),
            ("MiB sent (timed part)", mib(&s), "MiB"),
        ],
    })
}
