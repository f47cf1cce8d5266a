//! The benchmark rows. To add one, write a `fn(&mut Target, iteration) ->
//! Result<Duration>` that times exactly the operation being compared (setup and
//! checks untimed) and list it in [`ROWS`].

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::harness::{Target, ensure_success, result_addresses};

pub struct Row {
    /// Shown in the table and matched by `--only`.
    pub name: &'static str,
    pub about: &'static str,
    /// Binaries that must exist in both directories.
    pub plugins: &'static [&'static str],
    /// One timed sample. Gets a target with a fresh data dir and network per
    /// row and implementation; `iteration` counts from 0 (warm-up included).
    pub run: fn(&mut Target, usize) -> Result<Duration>,
}

pub const ROWS: &[Row] = &[
    Row {
        name: "host-local VERSION",
        about: "exec + runtime start-up + one JSON reply: the floor under every other row",
        plugins: &["host-local"],
        run: host_local_version,
    },
    Row {
        name: "host-local ADD",
        about: "one ADD of a new container ID (allocations accumulate over iterations)",
        plugins: &["host-local"],
        run: host_local_add,
    },
    Row {
        name: "host-local DEL",
        about: "one DEL of a container ADDed just before (the ADD is untimed)",
        plugins: &["host-local"],
        run: host_local_del,
    },
    Row {
        name: "bridge+host-local ADD",
        about: "ADD of a pod on a gateway bridge (veth, addresses, routes); its DEL is untimed",
        plugins: &["bridge", "host-local"],
        run: bridge_add,
    },
    Row {
        name: "bridge+host-local DEL",
        about: "DEL of a pod ADDed just before (the ADD is untimed)",
        plugins: &["bridge", "host-local"],
        run: bridge_del,
    },
    Row {
        name: "bridge+host-local ADD ipMasq",
        about: "the ADD row with ipMasq (reference: iptables chains; ours: nftables map elements)",
        plugins: &["bridge", "host-local"],
        run: bridge_add_masq,
    },
    Row {
        name: "bridge+host-local DEL ipMasq",
        about: "the DEL row with ipMasq",
        plugins: &["bridge", "host-local"],
        run: bridge_del_masq,
    },
    Row {
        name: "host-local 100 parallel ADDs",
        about: "wall time of 100 concurrent ADDs into one empty network; 100 distinct IPs required",
        plugins: &["host-local"],
        run: host_local_parallel_add,
    },
];

fn bridge_add(t: &mut Target, _: usize) -> Result<Duration> {
    bridge_add_with(t, false)
}

fn bridge_add_masq(t: &mut Target, _: usize) -> Result<Duration> {
    bridge_add_with(t, true)
}

fn bridge_del(t: &mut Target, _: usize) -> Result<Duration> {
    bridge_del_with(t, false)
}

fn bridge_del_masq(t: &mut Target, _: usize) -> Result<Duration> {
    bridge_del_with(t, true)
}

fn bridge_add_with(t: &mut Target, ip_masq: bool) -> Result<Duration> {
    let conf = t.bridge_conf(&t.network, ip_masq);
    let id = t.next_container_id();
    let (elapsed, out) = t.timed_exec("bridge", "ADD", &id, &conf)?;
    result_addresses(&out, &t.describe("bridge", "ADD", &id))?;
    t.exec("bridge", "DEL", &id, &conf)?; // frees eth0 in the shared pod netns
    Ok(elapsed)
}

fn bridge_del_with(t: &mut Target, ip_masq: bool) -> Result<Duration> {
    let conf = t.bridge_conf(&t.network, ip_masq);
    let id = t.next_container_id();
    t.exec("bridge", "ADD", &id, &conf)?;
    let (elapsed, _) = t.timed_exec("bridge", "DEL", &id, &conf)?;
    Ok(elapsed)
}

fn host_local_version(t: &mut Target, _: usize) -> Result<Duration> {
    let id = t.next_container_id();
    let (elapsed, out) =
        t.timed_exec("host-local", "VERSION", &id, br#"{"cniVersion":"1.0.0"}"#)?;
    let reply: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("VERSION reply is not JSON")?;
    ensure!(
        reply["supportedVersions"].is_array(),
        "VERSION reply without supportedVersions: {reply}"
    );
    Ok(elapsed)
}

fn host_local_add(t: &mut Target, _: usize) -> Result<Duration> {
    let conf = t.host_local_conf(&t.network);
    let id = t.next_container_id();
    let (elapsed, out) = t.timed_exec("host-local", "ADD", &id, &conf)?;
    result_addresses(&out, &t.describe("host-local", "ADD", &id))?;
    Ok(elapsed)
}

fn host_local_del(t: &mut Target, _: usize) -> Result<Duration> {
    let conf = t.host_local_conf(&t.network);
    let id = t.next_container_id();
    let out = t.exec("host-local", "ADD", &id, &conf)?;
    result_addresses(&out, &t.describe("host-local", "ADD", &id))?;
    let (elapsed, _) = t.timed_exec("host-local", "DEL", &id, &conf)?;
    Ok(elapsed)
}

const PARALLEL: usize = 100;

fn host_local_parallel_add(t: &mut Target, iteration: usize) -> Result<Duration> {
    // A network of its own per iteration: every burst starts from empty state.
    let network = format!("{}-par{iteration}", t.network);
    let conf = t.host_local_conf(&network);
    let ids: Vec<String> = (0..PARALLEL).map(|_| t.next_container_id()).collect();

    let start = Instant::now();
    let mut children = Vec::with_capacity(PARALLEL);
    let mut spawn_error = None;
    for id in &ids {
        match t.spawn("host-local", "ADD", id, &conf) {
            Ok(c) => children.push(c),
            Err(e) => {
                spawn_error = Some(e);
                break;
            }
        }
    }
    // Reap whatever was started, even when a spawn failed.
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output()).collect();
    let elapsed = start.elapsed();
    if let Some(e) = spawn_error {
        return Err(e);
    }

    let mut seen = HashSet::new();
    for (id, out) in ids.iter().zip(outputs) {
        let out = out.context("waiting for a plugin")?;
        let what = t.describe("host-local", "ADD", id);
        ensure_success(&out, &what)?;
        for ip in result_addresses(&out, &what)? {
            ensure!(
                seen.insert(ip.clone()),
                "{what}: address {ip} was handed out twice in one burst of {PARALLEL} parallel ADDs"
            );
        }
    }
    ensure!(
        seen.len() == PARALLEL,
        "{PARALLEL} parallel ADDs returned {} distinct addresses, expected {PARALLEL}",
        seen.len()
    );

    let state = t.data_dir.join(&network);
    std::fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    Ok(elapsed)
}
