//! ADD: install the attachment's mappings, or fail and leave nothing.

use crate::config::{self, PortMapConf, Protocol};
use crate::layout_lock::LayoutLock;
use crate::rules::{self, Plan};
use crate::state::{self, Record};
use weft_core::error::{CniError, Result, code};
use weft_core::fault;
use weft_core::masq::Attachment;
use weft_core::netlink::Netlink;
use weft_core::nft::ErrorKind;
use weft_core::skel::Request;
use weft_core::spec::CniResult;

pub fn add(req: &Request, conf: &PortMapConf) -> Result<CniResult> {
    let mappings = config::port_mappings(req)?;
    let prev = req
        .conf
        .prev_result()?
        .ok_or_else(|| CniError::config("must be called as chained plugin"))?;
    let ips = config::container_ips(&prev, &req.env.ifname);
    let plan = Plan::new(&req.conf.name, conf, &mappings, &ips);
    if plan.entries.is_empty() {
        return Ok(prev);
    }
    let env = &req.env;
    let att = Attachment::new(&req.conf.name, &env.container_id, &env.ifname);
    drop_superseded(conf, &att, &plan)?;
    // Recorded first: a crash after the kernel took the mappings still leaves DEL
    // what it needs.
    state::save(
        &conf.data_dir,
        &Record {
            network: req.conf.name.clone(),
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
            keys: plan.installed(),
        },
    )?;
    let done = fault::point("portmap.recorded")
        .and_then(|()| install(&att, conf, &plan))
        .and_then(|()| {
            fault::point("portmap.installed")
                .and_then(|()| enable_localhost(conf, &plan))
                .and_then(|()| fault::point("portmap.localhost"))
                .inspect_err(|_| {
                    if let Err(e) = rules::del_tx(&plan.installed(), &att.owner())
                        .apply_ignoring(&[ErrorKind::NotFound, ErrorKind::Exists])
                    {
                        weft_core::warn!("rolling back the mappings failed: {e}");
                    }
                })
        });
    if let Err(e) = done {
        let _ = state::remove(&conf.data_dir, &env.container_id, &env.ifname);
        return Err(e);
    }
    flush_udp_conntrack(&plan);
    Ok(prev)
}

/// A repeated ADD of this attachment (a retry, changed options): what the last one
/// installed and this one does not (another class, a mapping dropped) goes first,
/// or its record, overwritten next, would be the only trace of it.
fn drop_superseded(conf: &PortMapConf, att: &Attachment<'_>, plan: &Plan) -> Result<()> {
    let Some(prev) = state::load(&conf.data_dir, att.container_id, att.ifname) else {
        return Ok(());
    };
    let now = plan.installed();
    let stale: Vec<_> = prev.keys.into_iter().filter(|i| !now.contains(i)).collect();
    if stale.is_empty() {
        return Ok(());
    }
    let owner = Attachment::new(&prev.network, att.container_id, att.ifname).owner();
    rules::del_tx(&stale, &owner)
        .apply_ignoring(&[ErrorKind::NotFound, ErrorKind::Exists])
        .map(drop)
        .map_err(setup_err)
}

fn setup_err(e: impl Into<CniError>) -> CniError {
    e.into().context("portmap")
}

/// The elements in one batch; on ENOENT build the table and chains first, on EEXIST
/// clear this attachment's own stale elements (a repeated ADD with other targets).
/// A key still held by another attachment afterwards is a conflict.
fn install(att: &Attachment<'_>, conf: &PortMapConf, plan: &Plan) -> Result<()> {
    let add = plan.add_tx(att);
    let lock = LayoutLock::shared()?;
    let e = match add.try_apply() {
        Ok(()) => return Ok(()),
        Err(e) if e.only(&[ErrorKind::NotFound, ErrorKind::Exists]) => e,
        Err(e) => return Err(setup_err(e)),
    };
    weft_core::debug!("portmap fast path for {att:?}: {e}; repairing");
    let _lock = lock.upgrade()?;
    if e.has(ErrorKind::NotFound) {
        // Which of this plan's classes `hostports` already dispatches to.
        let listing = rules::list().map_err(setup_err)?;
        plan.ensure_tx(conf, listing.as_ref())
            .apply()
            .map_err(setup_err)?;
    }
    if e.has(ErrorKind::Exists) {
        rules::del_tx(&plan.installed(), &att.owner())
            .apply_ignoring(&[ErrorKind::NotFound, ErrorKind::Exists])
            .map_err(setup_err)?;
    }
    match add.try_apply() {
        Ok(()) => Ok(()),
        Err(e) if e.only(&[ErrorKind::Exists]) => Err(conflict(plan)),
        Err(e) => Err(setup_err(e)),
    }
}

/// Which host ports are taken, and by whom (one listing, on this error path only).
fn conflict(plan: &Plan) -> CniError {
    let listing = rules::list().ok().flatten();
    let mut taken = Vec::new();
    for e in &plan.entries {
        let holder = listing
            .as_ref()
            .and_then(|l| rules::holders(l, &e.key).into_iter().next())
            .map(|(_, comment)| comment.unwrap_or_else(|| "an unnamed attachment".into()));
        if let Some(h) = holder {
            taken.push(format!("{} is held by {h}", e.key));
        }
    }
    if taken.is_empty() {
        taken.push("a host port is held by another attachment".into());
    }
    CniError::new(
        code::PORT_IN_USE,
        format!("host port already mapped: {}", taken.join("; ")),
    )
}

/// IPv4 localhost → pod needs `route_localnet` on the interface the pod is routed
/// through (the bridge): the kernel otherwise drops 127.0.0.1 leaving the host
/// before the masquerade rewrites it. Only with snat and an IPv4 entry.
fn enable_localhost(conf: &PortMapConf, plan: &Plan) -> Result<()> {
    let pod = plan.entries.iter().map(|e| e.pod).find(|ip| ip.is_ipv4());
    let Some(pod) = pod.filter(|_| conf.snat) else {
        return Ok(());
    };
    let nl = Netlink::host()?;
    let Some(oif) = nl.route_oif(pod)? else {
        // As the reference: without a route the pod is unreachable from the host
        // anyway, and the remote mappings still work.
        weft_core::warn!("portmap: no route to {pod}; localhost mappings will not work");
        return Ok(());
    };
    let link = nl
        .link_by_index(oif)?
        .ok_or_else(|| CniError::internal(format!("portmap: link #{oif} vanished")))?;
    weft_core::sysctl::set(&format!("net/ipv4/conf/{}/route_localnet", link.name), "1")?;
    Ok(())
}

/// UDP "connections" that started before the mapping existed would keep bypassing
/// it until they time out; drop them. Failures are only logged (as the reference).
fn flush_udp_conntrack(plan: &Plan) {
    for v6 in [false, true] {
        let ports: Vec<u16> = plan
            .entries
            .iter()
            .filter(|e| e.key.protocol == Protocol::Udp && e.key.v6 == v6)
            .map(|e| e.key.host_port)
            .collect();
        if ports.is_empty() {
            continue;
        }
        if let Err(e) = weft_core::conntrack::delete_by_dport(!v6, 17, &ports) {
            weft_core::warn!("portmap: flushing UDP conntrack entries: {e}");
        }
    }
}
