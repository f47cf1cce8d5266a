//! The benchmark rows. To add one, write a `fn(&mut Target, iteration) ->
//! Result<Duration>` that times exactly the operation being compared (setup and
//! checks untimed) and list it in [`ROWS`]. weftd rows have no reference side
//! (there is no flanneld binary here): see [`crate::weftd`].

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::harness::{self, Target, ensure_success, result_addresses};
use crate::throughput;
use crate::weftd::{self, Solo};

pub struct Row {
    /// Shown in the table and matched by `--only`.
    pub name: &'static str,
    pub about: &'static str,
    /// Binaries that must exist in both directories (for [`Run::Solo`] rows:
    /// in ours only; a [`Run::Front`] row's front plugin: in ours only).
    pub plugins: &'static [&'static str],
    pub run: Run,
}

pub enum Run {
    /// Ours against the reference, interleaved. One timed sample: gets a target
    /// with a fresh data dir and network per row and implementation; `iteration`
    /// counts from 0 (warm-up included).
    Pair(fn(&mut Target, usize) -> Result<Duration>),
    /// A [`Run::Pair`] row where our `plugin` runs on both sides and only the
    /// plugins it delegates to on CNI_PATH differ: the reference side's CNI_PATH
    /// holds ours `plugin` and the reference's other [`Row::plugins`].
    Front {
        plugin: &'static str,
        run: fn(&mut Target, usize) -> Result<Duration>,
    },
    /// Ours alone.
    Solo(Solo),
}

impl Row {
    /// The plugin of ours run on both sides, for a [`Run::Front`] row.
    pub fn front(&self) -> Option<&'static str> {
        match self.run {
            Run::Front { plugin, .. } => Some(plugin),
            _ => None,
        }
    }
}

pub const ROWS: &[Row] = &[
    Row {
        name: "host-local VERSION",
        about: "exec + runtime start-up + one JSON reply: the floor under every other row",
        plugins: &["host-local"],
        run: Run::Pair(host_local_version),
    },
    Row {
        name: "host-local ADD",
        about: "one ADD of a new container ID (allocations accumulate over iterations)",
        plugins: &["host-local"],
        run: Run::Pair(host_local_add),
    },
    Row {
        name: "host-local DEL",
        about: "one DEL of a container ADDed just before (the ADD is untimed)",
        plugins: &["host-local"],
        run: Run::Pair(host_local_del),
    },
    Row {
        name: "bridge+host-local ADD",
        about: "ADD of a pod on a gateway bridge (veth, addresses, routes); its DEL is untimed",
        plugins: &["bridge", "host-local"],
        run: Run::Pair(bridge_add),
    },
    Row {
        name: "bridge+host-local DEL",
        about: "DEL of a pod ADDed just before (the ADD is untimed)",
        plugins: &["bridge", "host-local"],
        run: Run::Pair(bridge_del),
    },
    Row {
        name: "bridge+host-local ADD ipMasq",
        about: "the ADD row with ipMasq (reference: iptables chains; ours: nftables map elements)",
        plugins: &["bridge", "host-local"],
        run: Run::Pair(bridge_add_masq),
    },
    Row {
        name: "bridge+host-local DEL ipMasq",
        about: "the DEL row with ipMasq",
        plugins: &["bridge", "host-local"],
        run: Run::Pair(bridge_del_masq),
    },
    Row {
        name: "flannel ADD",
        about: "ADD via our flannel (subnet.env) to bridge + host-local, ours vs the reference's; \
                its DEL is untimed",
        plugins: &["flannel", "bridge", "host-local"],
        run: Run::Front {
            plugin: "flannel",
            run: flannel_add,
        },
    },
    Row {
        name: "flannel DEL",
        about: "DEL of a pod ADDed just before (the ADD is untimed), delegated likewise",
        plugins: &["flannel", "bridge", "host-local"],
        run: Run::Front {
            plugin: "flannel",
            run: flannel_del,
        },
    },
    Row {
        name: "host-local 100 parallel ADDs",
        about: "wall time of 100 concurrent ADDs into one empty network; 100 distinct IPs required",
        plugins: &["host-local"],
        run: Run::Pair(host_local_parallel_add),
    },
    Row {
        name: "portmap ADD N=0",
        about: "ADD of one tcp mapping (snat) with 0 other mappings present; its DEL is untimed",
        plugins: &["portmap"],
        run: Run::Pair(portmap_add_0),
    },
    Row {
        name: "portmap DEL N=0",
        about: "DEL of one mapping ADDed just before (untimed), 0 other mappings present",
        plugins: &["portmap"],
        run: Run::Pair(portmap_del_0),
    },
    Row {
        name: "portmap ADD N=200",
        about: "ADD of one tcp mapping (snat) with 200 other mappings present; its DEL is untimed",
        plugins: &["portmap"],
        run: Run::Pair(portmap_add_200),
    },
    Row {
        name: "portmap DEL N=200",
        about: "DEL of one mapping ADDed just before (untimed), 200 other mappings present",
        plugins: &["portmap"],
        run: Run::Pair(portmap_del_200),
    },
    Row {
        name: "portmap ADD N=1000",
        about: "ADD of one tcp mapping (snat) with 1000 other mappings present; its DEL is untimed",
        plugins: &["portmap"],
        run: Run::Pair(portmap_add_1000),
    },
    Row {
        name: "portmap DEL N=1000",
        about: "DEL of one mapping ADDed just before (untimed), 1000 other mappings present",
        plugins: &["portmap"],
        run: Run::Pair(portmap_del_1000),
    },
    Row {
        name: "portmap ADD N=5000",
        about: "ADD of one tcp mapping (snat) with 5000 other mappings present; its DEL is untimed",
        plugins: &["portmap"],
        run: Run::Pair(portmap_add_5000),
    },
    Row {
        name: "portmap DEL N=5000",
        about: "DEL of one mapping ADDed just before (untimed), 5000 other mappings present",
        plugins: &["portmap"],
        run: Run::Pair(portmap_del_5000),
    },
    Row {
        name: "weftd cold start, 1,000 peer leases",
        about: "spawn until the kernel holds 1,000 peers' routes, neighbours and FDB entries",
        plugins: &["weftd"],
        run: Run::Solo(Solo {
            run: weftd::cold_start_1k,
            max_iterations: 10,
            reference: weftd::FLANNELD_COLD,
        }),
    },
    Row {
        name: "weftd cold start, 10,000 peer leases",
        about: "the same with 10,000 peers in etcd",
        plugins: &["weftd"],
        run: Run::Solo(Solo {
            run: weftd::cold_start_10k,
            max_iterations: 5,
            reference: weftd::FLANNELD_COLD,
        }),
    },
    Row {
        name: "weftd netlink floor, 1,000 peers",
        about: "no weftd: its data plane code writing 1,000 peers into a fresh netns",
        plugins: &[],
        run: Run::Solo(Solo {
            run: weftd::floor_1k,
            max_iterations: 10,
            reference: weftd::FLOOR,
        }),
    },
    Row {
        name: "weftd netlink floor, 10,000 peers",
        about: "the same with 10,000 peers",
        plugins: &[],
        run: Run::Solo(Solo {
            run: weftd::floor_10k,
            max_iterations: 5,
            reference: weftd::FLOOR,
        }),
    },
    Row {
        name: "weftd lease events, 1,000 adds",
        about: "weftd on 0 peers; 1,000 puts (64 in flight), first put until all are programmed",
        plugins: &["weftd"],
        run: Run::Solo(Solo {
            run: weftd::lease_events,
            max_iterations: 10,
            reference: weftd::FLANNELD_EVENTS,
        }),
    },
    Row {
        name: "weftd lease events, 1,000 at 1,000/s",
        about: "the same, paced at one put per ms: the lag behind a steady stream",
        plugins: &["weftd"],
        run: Run::Solo(Solo {
            run: weftd::lease_events_paced,
            max_iterations: 10,
            reference: weftd::FLANNELD_PACED,
        }),
    },
    Row {
        name: "throughput: pod→pod TCP over vxlan (2 nodes)",
        about: "one TCP stream between pods on two weftd nodes (vxlan); ms = the timed transfer",
        plugins: &["weftd", "bridge", "host-local"],
        run: Run::Solo(Solo {
            run: throughput::vxlan,
            max_iterations: 10,
            reference: throughput::NOTE,
        }),
    },
    Row {
        name: "throughput: pod→pod TCP over host-gw",
        about: "the same over host-gw routes (no encapsulation)",
        plugins: &["weftd", "bridge", "host-local"],
        run: Run::Solo(Solo {
            run: throughput::host_gw,
            max_iterations: 10,
            reference: throughput::NOTE,
        }),
    },
    Row {
        name: "throughput: node→node TCP over the bare underlay veth",
        about: "the same stream between the two nodes over the underlay bridge, no weftd",
        plugins: &[],
        run: Run::Solo(Solo {
            run: throughput::bare_underlay,
            max_iterations: 10,
            reference: throughput::NOTE,
        }),
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
    pod_add(t, "bridge", &conf)
}

fn bridge_del_with(t: &mut Target, ip_masq: bool) -> Result<Duration> {
    let conf = t.bridge_conf(&t.network, ip_masq);
    pod_del(t, "bridge", &conf)
}

fn flannel_add(t: &mut Target, i: usize) -> Result<Duration> {
    let conf = flannel_conf(t, i)?;
    pod_add(t, "flannel", &conf)
}

fn flannel_del(t: &mut Target, i: usize) -> Result<Duration> {
    let conf = flannel_conf(t, i)?;
    pod_del(t, "flannel", &conf)
}

/// The timed ADD of a new pod, then its DEL (frees eth0 in the shared pod netns).
fn pod_add(t: &mut Target, plugin: &str, conf: &[u8]) -> Result<Duration> {
    let id = t.next_container_id();
    let (elapsed, out) = t.timed_exec(plugin, "ADD", &id, conf)?;
    result_addresses(&out, &t.describe(plugin, "ADD", &id))?;
    t.exec(plugin, "DEL", &id, conf)?;
    Ok(elapsed)
}

/// An untimed ADD of a new pod, then its timed DEL.
fn pod_del(t: &mut Target, plugin: &str, conf: &[u8]) -> Result<Duration> {
    let id = t.next_container_id();
    t.exec(plugin, "ADD", &id, conf)?;
    let (elapsed, _) = t.timed_exec(plugin, "DEL", &id, conf)?;
    Ok(elapsed)
}

/// kube-flannel's config (bridge, hairpin, default gateway; IPMASQ=true, so no
/// ipMasq), with its files in the data dir: the subnet.env, written at the row's
/// first iteration, gives the node the last /24 of the implementation's /16 (clear
/// of the bridge rows' gateway), the saved delegate configs and host-local's state.
fn flannel_conf(t: &Target, i: usize) -> Result<Vec<u8>> {
    let subnet_file = t.data_dir.join("subnet.env");
    if i == 0 {
        let (ab, _) = subnet_parts(t);
        let env = format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={ab}.255.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
            t.imp.subnet
        );
        std::fs::write(&subnet_file, env)
            .with_context(|| format!("writing {}", subnet_file.display()))?;
    }
    Ok(serde_json::json!({
        "cniVersion": "1.0.0",
        "name": t.network,
        "type": "flannel",
        "subnetFile": subnet_file,
        "dataDir": t.data_dir.join("flannel"),
        "ipam": { "dataDir": t.data_dir },
        "delegate": { "bridge": t.bridge_name("wfl"), "hairpinMode": true, "isDefaultGateway": true },
    })
    .to_string()
    .into_bytes())
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

fn portmap_add_0(t: &mut Target, i: usize) -> Result<Duration> {
    portmap_add(t, i, 0)
}

fn portmap_del_0(t: &mut Target, i: usize) -> Result<Duration> {
    portmap_del(t, i, 0)
}

fn portmap_add_200(t: &mut Target, i: usize) -> Result<Duration> {
    portmap_add(t, i, 200)
}

fn portmap_del_200(t: &mut Target, i: usize) -> Result<Duration> {
    portmap_del(t, i, 200)
}

fn portmap_add_1000(t: &mut Target, i: usize) -> Result<Duration> {
    portmap_add(t, i, 1000)
}

fn portmap_del_1000(t: &mut Target, i: usize) -> Result<Duration> {
    portmap_del(t, i, 1000)
}

fn portmap_add_5000(t: &mut Target, i: usize) -> Result<Duration> {
    portmap_add(t, i, 5000)
}

fn portmap_del_5000(t: &mut Target, i: usize) -> Result<Duration> {
    portmap_del(t, i, 5000)
}

/// One timed ADD of a fresh container (one mapping, fresh hostPort), then its DEL.
fn portmap_add(t: &mut Target, i: usize, n: usize) -> Result<Duration> {
    if i == 0 {
        portmap_setup(t, n)?;
    }
    let conf = portmap_conf(t, 20000 + i % 10000, 6000 + i);
    let id = t.next_container_id();
    let (elapsed, _) = t.timed_exec("portmap", "ADD", &id, &conf)?;
    t.exec("portmap", "DEL", &id, &conf)?;
    Ok(elapsed)
}

/// An untimed ADD, then the timed DEL.
fn portmap_del(t: &mut Target, i: usize, n: usize) -> Result<Duration> {
    if i == 0 {
        portmap_setup(t, n)?;
    }
    let conf = portmap_conf(t, 20000 + i % 10000, 6000 + i);
    let id = t.next_container_id();
    t.exec("portmap", "ADD", &id, &conf)?;
    let (elapsed, _) = t.timed_exec("portmap", "DEL", &id, &conf)?;
    Ok(elapsed)
}

/// The first two octets of the implementation's /16, and its prefix length.
fn subnet_parts(t: &Target) -> (String, &'static str) {
    let (net, prefix) = t.imp.subnet.split_once('/').expect("subnet is a CIDR");
    let ab: Vec<&str> = net.split('.').take(2).collect();
    (ab.join("."), prefix)
}

/// The `k`th pod address of the implementation's subnet (above the gateway, .0.1).
fn pod_ip(t: &Target, k: usize) -> String {
    let (ab, _) = subnet_parts(t);
    format!("{ab}.{}.{}", (k + 2) / 256, (k + 2) % 256)
}

fn portmap_bridge(t: &Target) -> String {
    t.bridge_name("wpm")
}

/// portmap config with one tcp mapping and a bridge-like prevResult for pod `k`.
fn portmap_conf(t: &Target, host_port: usize, k: usize) -> Vec<u8> {
    let (_, prefix) = subnet_parts(t);
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": t.network,
        "type": "portmap",
        "snat": true,
        "dataDir": t.data_dir.join("portmap"),
        "runtimeConfig": { "portMappings": [
            { "hostPort": host_port, "containerPort": 80, "protocol": "tcp" },
        ] },
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{ "name": portmap_bridge(t) }, { "name": "eth0", "sandbox": t.netns }],
            "ips": [{ "interface": 1, "address": format!("{}/{prefix}", pod_ip(t, k)) }],
        },
    })
    .to_string()
    .into_bytes()
}

/// Run a tool (ip, nft, iptables-*) with `stdin` on `t`'s host; its output, whatever
/// its status.
fn tool(t: &Target, prog: &str, args: &[&str], stdin: &str) -> Result<Output> {
    let mut cmd = Command::new(prog);
    harness::in_netns(&mut cmd, t.host)?;
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {prog}"))?;
    let mut input = child.stdin.take().expect("stdin is piped");
    if let Err(e) = input.write_all(stdin.as_bytes())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e).with_context(|| format!("writing to {prog}"));
    }
    drop(input);
    child
        .wait_with_output()
        .with_context(|| format!("waiting for {prog}"))
}

fn tool_ok(t: &Target, prog: &str, args: &[&str], stdin: &str) -> Result<Output> {
    let out = tool(t, prog, args, stdin)?;
    ensure_success(&out, &format!("{prog} {}", args.join(" ")))?;
    Ok(out)
}

/// Untimed, at a row's first iteration: a bridge holding the gateway (both plugins
/// look up the route to the pod), then exactly `n` mappings of this implementation.
fn portmap_setup(t: &mut Target, n: usize) -> Result<()> {
    let (ab, prefix) = subnet_parts(t);
    let (br, gw) = (portmap_bridge(t), format!("{ab}.0.1/{prefix}"));
    for args in [
        &["link", "add", &br, "type", "bridge"][..],
        &["addr", "add", &gw, "dev", &br],
        &["link", "set", &br, "up"],
    ] {
        let out = tool(t, "ip", args, "")?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !(err.contains("exists") || err.contains("already assigned")) {
            ensure_success(&out, &format!("ip {}", args.join(" ")))?;
        }
    }
    if t.imp.label == "ours" {
        let _ = tool(t, "nft", &["delete", "table", "inet", "weft_portmap"], "")?;
        for k in 0..n {
            let id = format!("weft-bench-ours-fill-{k:05}");
            t.exec("portmap", "ADD", &id, &portmap_conf(t, 30000 + k, k))?;
        }
        Ok(())
    } else {
        reference_filler(t, n)
    }
}

/// The reference would take minutes to ADD thousands of mappings one by one:
/// write the iptables state it creates and load it in one iptables-restore.
fn reference_filler(t: &mut Target, n: usize) -> Result<()> {
    let saved = tool_ok(t, "iptables-save", &["-t", "nat"], "")?;
    let saved = String::from_utf8_lossy(&saved.stdout);
    let chains: Vec<&str> = saved
        .lines()
        .filter_map(|l| l.strip_prefix(":CNI-DN-"))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut r = String::from("*nat\n");
    if saved.contains(":CNI-HOSTPORT-DNAT ") {
        r.push_str("-F CNI-HOSTPORT-DNAT\n");
    }
    for op in ["-F", "-X"] {
        for c in &chains {
            let _ = writeln!(r, "{op} CNI-DN-{c}");
        }
    }
    r.push_str("COMMIT\n");
    tool_ok(t, "iptables-restore", &["--noflush"], &r)?;
    if n == 0 {
        return Ok(());
    }

    // One real mapping, so that the reference makes its own top-level chains.
    let id = t.next_container_id();
    let conf = portmap_conf(t, 29999, 5999);
    t.exec("portmap", "ADD", &id, &conf)?;
    t.exec("portmap", "DEL", &id, &conf)?;

    let (net, sub) = (&t.network, t.imp.subnet);
    let mut decl = String::from("*nat\n");
    let mut rules = String::new();
    for k in 0..n {
        let (chain, hp, ip) = (format!("CNI-DN-fe{k:019x}"), 30000 + k, pod_ip(t, k));
        let cid = format!("weft-bench-reference-fill-{k:05}");
        let _ = writeln!(decl, ":{chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"{net}\\\" id: \\\"{cid}\\\"\" -m multiport --dports {hp} -j {chain}\n\
             -A {chain} -s {sub} -p tcp -m tcp --dport {hp} -j CNI-HOSTPORT-SETMARK\n\
             -A {chain} -s 127.0.0.1/32 -p tcp -m tcp --dport {hp} -j CNI-HOSTPORT-SETMARK\n\
             -A {chain} -p tcp -m tcp --dport {hp} -j DNAT --to-destination {ip}:80"
        );
    }
    tool_ok(
        t,
        "iptables-restore",
        &["--noflush"],
        &(decl + &rules + "COMMIT\n"),
    )?;
    Ok(())
}
