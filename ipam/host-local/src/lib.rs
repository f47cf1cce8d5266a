//! host-local IPAM: hands out addresses from static range sets and records them as
//! files, in the same layout as the reference plugin so either can take over.

mod config;
mod dns;
mod range;
mod store;

pub use config::{DEFAULT_DATA_DIR, IpamConfig};
pub use range::{Range, RangeSet};

use range::{candidates, describe, range_for};
use std::collections::HashSet;
use std::net::IpAddr;
use store::{Owner, Store};
use weft_core::delegate::Linked;
use weft_core::error::{CniError, Result, code};
use weft_core::skel::{self, About, Attachment, Plugin, Request};
use weft_core::spec::{CniResult, IpConfig};

pub const ABOUT: About = About {
    name: "host-local",
    version: env!("CARGO_PKG_VERSION"),
    help: include_str!("help.txt"),
};

/// The identity the `host-local` binary carries (see [`weft_core::ident`]).
pub const IDENT: &str = concat!("weft host-local ", env!("CARGO_PKG_VERSION"));

/// host-local as a library plugins can delegate to in-process.
pub const LINKED: Linked = Linked {
    name: "host-local",
    ident: IDENT,
    run: |var, stdin, stdout| skel::run(&ABOUT, &HostLocal, var, stdin, stdout),
};

/// The plugin: every verb works on the data directory alone.
pub struct HostLocal;

impl Plugin for HostLocal {
    /// IPAM only touches its data directory; the pod's netns is the main plugin's.
    fn uses_netns(&self) -> bool {
        false
    }
    fn add(&self, req: &Request) -> Result<CniResult> {
        add(req)
    }
    fn del(&self, req: &Request) -> Result<()> {
        del(req)
    }
    fn check(&self, req: &Request) -> Result<()> {
        check(req)
    }
    fn gc(&self, req: &Request) -> Result<()> {
        gc(req)
    }
    fn status(&self, req: &Request) -> Result<()> {
        status(req)
    }
}

/// ADD: one address from every range set, all or nothing.
pub fn add(req: &Request) -> Result<CniResult> {
    let conf = config::load(req)?;
    let wanted = assign_requested(&conf)?;
    let mut store = Store::open(&conf.data_dir, true)?.expect("created");
    let (cid, ifname) = (&req.env.container_id, &req.env.ifname);
    let held = store.held_by(cid, ifname);
    let mut taken: Vec<IpAddr> = Vec::new();
    let mut ips = Vec::new();
    let mut allocated = Ok(());
    for (i, set) in conf.sets.iter().enumerate() {
        match allocate(&mut store, set, i, wanted[i], cid, ifname, &held) {
            Ok(ip) => {
                taken.push(ip.address.addr());
                ips.push(ip);
            }
            Err(e) => {
                allocated = Err(e.context(format!("failed to allocate for range {i}")));
                break;
            }
        }
    }
    if let Err(e) = allocated.and_then(|()| weft_core::fault::point("host-local.reserved")) {
        for ip in taken {
            let _ = store.release(ip);
        }
        return Err(e);
    }
    Ok(CniResult {
        ips,
        routes: conf.routes,
        dns: conf.dns,
        ..Default::default()
    })
}

/// Match each requested address to the first set containing it, before touching
/// any state; an address no set can take fails the whole ADD.
fn assign_requested(conf: &IpamConfig) -> Result<Vec<Option<IpAddr>>> {
    let mut left = conf.requested.clone();
    let wanted: Vec<Option<IpAddr>> = conf
        .sets
        .iter()
        .map(|set| {
            let pos = left.iter().position(|ip| range_for(set, *ip).is_some());
            pos.map(|p| left.remove(p))
        })
        .collect();
    if !left.is_empty() {
        let list: Vec<String> = left.iter().map(IpAddr::to_string).collect();
        let msg = format!("failed to allocate all requested IPs: {}", list.join(" "));
        return Err(CniError::new(code::ADDRESS_UNAVAILABLE, msg));
    }
    Ok(wanted)
}

fn allocate(
    store: &mut Store,
    set: &RangeSet,
    index: usize,
    wanted: Option<IpAddr>,
    cid: &str,
    ifname: &str,
    held: &[IpAddr],
) -> Result<IpConfig> {
    if let Some(ip) = held.iter().find(|ip| range_for(set, **ip).is_some()) {
        return Err(CniError::new(
            code::ADDRESS_UNAVAILABLE,
            format!("{ip} has been allocated to {cid}, duplicate allocation is not allowed"),
        ));
    }
    let ip_config = |ip: IpAddr, r: &Range| IpConfig {
        interface: None,
        address: ipnet::IpNet::new(ip, r.subnet.prefix_len()).expect("prefix from a valid subnet"),
        gateway: Some(r.gateway),
    };
    if let Some(ip) = wanted {
        let r = range_for(set, ip).expect("assigned to this set");
        if ip == r.gateway {
            return Err(CniError::new(
                code::ADDRESS_UNAVAILABLE,
                format!("requested ip {ip} is subnet's gateway"),
            ));
        }
        if !store.reserve(ip, cid, ifname, index)? {
            let msg = format!(
                "requested IP address {ip} is not available in range set {}",
                describe(set)
            );
            return Err(CniError::new(code::ADDRESS_UNAVAILABLE, msg));
        }
        return Ok(ip_config(ip, r));
    }
    for (ip, r) in candidates(set, store.last_reserved(index)) {
        if store.reserve(ip, cid, ifname, index)? {
            return Ok(ip_config(ip, r));
        }
    }
    let msg = format!("no IP addresses available in range set: {}", describe(set));
    Err(CniError::new(code::ADDRESS_EXHAUSTED, msg))
}

/// DEL: release whatever (cid, ifname) holds. Needs only the data directory, so it
/// works without `ipam`, with a broken config, and when called again.
pub fn del(req: &Request) -> Result<()> {
    let Some(dir) = config::data_dir_of(req) else {
        weft_core::warn!("DEL without an 'ipam' key: nothing to release");
        return Ok(());
    };
    let Some(mut store) = Store::open(&dir, false)? else {
        return Ok(());
    };
    for ip in store.held_by(&req.env.container_id, &req.env.ifname) {
        store.release(ip)?;
    }
    Ok(())
}

/// CHECK: every range set holds an address for (cid, ifname), and when the runtime
/// passes the result, those are exactly the addresses it lists.
pub fn check(req: &Request) -> Result<()> {
    let conf = config::load(req)?;
    let (cid, ifname) = (&req.env.container_id, &req.env.ifname);
    let failed = |msg: String| CniError::new(code::CHECK_FAILED, msg);
    let Some(store) = Store::open(&conf.data_dir, false)? else {
        return Err(failed(format!(
            "host-local: Failed to find address added by container {cid}"
        )));
    };
    let held = store.held_by(cid, ifname);
    let listed: Option<Vec<IpAddr>> = req
        .conf
        .prev_result()?
        .map(|r| r.ips.iter().map(|ip| ip.address.addr()).collect());
    for (i, set) in conf.sets.iter().enumerate() {
        let Some(ip) = held.iter().find(|ip| range_for(set, **ip).is_some()) else {
            return Err(failed(format!(
                "host-local: Failed to find address added by container {cid} in range set {i} ({})",
                describe(set)
            )));
        };
        if listed.as_ref().is_some_and(|l| !l.contains(ip)) {
            return Err(failed(format!(
                "host-local: {ip} is reserved for {cid}/{ifname} but not in prevResult"
            )));
        }
    }
    for ip in listed.iter().flatten() {
        let ours = conf.sets.iter().any(|s| range_for(s, *ip).is_some());
        if ours && !held.contains(ip) {
            return Err(failed(format!(
                "host-local: {ip} from prevResult is not reserved for {cid}/{ifname}"
            )));
        }
    }
    Ok(())
}

/// GC: release every reservation whose attachment is not in the valid list. A legacy
/// file (container ID only) stays while any attachment of that container is valid.
pub fn gc(req: &Request) -> Result<()> {
    let valid: HashSet<Attachment> = req.valid_attachments()?.into_iter().collect();
    let Some(dir) = config::data_dir_of(req) else {
        return Ok(());
    };
    let Some(mut store) = Store::open(&dir, false)? else {
        return Ok(());
    };
    let live_cids: HashSet<&str> = valid.iter().map(|a| a.container_id.as_str()).collect();
    let mut errors = Vec::new();
    let all: Vec<(IpAddr, Owner)> = store
        .reservations()
        .iter()
        .map(|(ip, o)| (*ip, o.clone()))
        .collect();
    for (ip, owner) in all {
        let keep = match &owner {
            Owner::Attachment {
                container_id,
                ifname,
            } => valid.contains(&Attachment {
                container_id: container_id.clone(),
                ifname: ifname.clone(),
            }),
            Owner::Legacy { container_id } => live_cids.contains(container_id.as_str()),
        };
        if !keep {
            weft_core::info!("GC: releasing {ip} held by {}", owner.container_id());
            if let Err(e) = store.release(ip) {
                errors.push(e.msg);
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::internal(errors.join("; ")))
    }
}

/// STATUS: ready unless some range set has no free address (ADD needs one from each).
pub fn status(req: &Request) -> Result<()> {
    let conf = config::load(req)?;
    let reserved = match Store::open(&conf.data_dir, false)? {
        Some(store) => store.reservations().keys().copied().collect(),
        None => Vec::new(),
    };
    for (i, set) in conf.sets.iter().enumerate() {
        let capacity: u128 = set.iter().map(Range::capacity).sum();
        let used = reserved
            .iter()
            .filter(|ip| range_for(set, **ip).is_some_and(|r| r.gateway != **ip))
            .count();
        if used as u128 >= capacity {
            let msg = format!(
                "range set {i} is exhausted: no free address in {}",
                describe(set)
            );
            return Err(CniError::new(code::NOT_AVAILABLE, msg));
        }
    }
    Ok(())
}
