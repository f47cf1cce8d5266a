//! The host-local section of a network config, validated into range sets.

use crate::range::{self, Range, RangeSet};
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use std::net::IpAddr;
use std::path::PathBuf;
use weft_core::error::{CniError, Result};
use weft_core::skel::Request;
use weft_core::spec::{Dns, Route, null_as_default};
use weft_core::version;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// A range as written in JSON; parsed by hand for precise messages.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    #[serde(default, deserialize_with = "null_as_default")]
    subnet: String,
    range_start: Option<String>,
    range_end: Option<String>,
    gateway: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    /// The legacy single-range form lives inline in `ipam`.
    #[serde(flatten)]
    legacy: RawRange,
    #[serde(default, deserialize_with = "null_as_default")]
    ranges: Vec<Vec<RawRange>>,
    #[serde(default, deserialize_with = "null_as_default")]
    routes: Vec<RawRoute>,
    /// Empty means unset, as Go reads a zero value.
    #[serde(default, deserialize_with = "null_as_default")]
    data_dir: String,
    #[serde(default, deserialize_with = "null_as_default")]
    resolv_conf: String,
}

/// A route as written; every field of the 1.1.0 route is passed through.
#[derive(Debug, Deserialize)]
struct RawRoute {
    dst: String,
    gw: Option<String>,
    mtu: Option<u32>,
    advmss: Option<u32>,
    priority: Option<u32>,
    table: Option<u32>,
    scope: Option<u32>,
}

/// A validated host-local config.
#[derive(Debug)]
pub struct IpamConfig {
    pub network: String,
    pub data_dir: PathBuf,
    pub sets: Vec<RangeSet>,
    pub routes: Vec<Route>,
    pub dns: Dns,
    /// Addresses the runtime asked for, in order of preference.
    pub requested: Vec<IpAddr>,
}

fn ipam_value(req: &Request) -> Result<&Value> {
    req.conf
        .ipam
        .as_ref()
        .ok_or_else(|| CniError::config("IPAM config missing 'ipam' key"))
}

/// The state directory of this network, read leniently: DEL and GC must work
/// even when the rest of the config no longer validates. `None` without `ipam`.
pub fn data_dir_of(req: &Request) -> Option<PathBuf> {
    let dir = req
        .conf
        .ipam
        .as_ref()?
        .get("dataDir")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Some(network_dir(dir, &req.conf.name))
}

/// `<dataDir>/<network>`, with the default for an empty dataDir.
fn network_dir(data_dir: &str, network: &str) -> PathBuf {
    let base = if data_dir.is_empty() {
        DEFAULT_DATA_DIR
    } else {
        data_dir
    };
    PathBuf::from(base).join(network)
}

/// Parse and validate everything ADD, CHECK and STATUS need.
pub fn load(req: &Request) -> Result<IpamConfig> {
    let raw = RawIpam::deserialize(ipam_value(req)?)
        .map_err(|e| CniError::decode(format!("failed to parse ipam config: {e}")))?;
    let mut raw_sets: Vec<Vec<RawRange>> = match req.conf.runtime("ipRanges") {
        Some(v) => null_as_default(v)
            .map_err(|e| CniError::decode(format!("invalid runtimeConfig.ipRanges: {e}")))?,
        None => Vec::new(),
    };
    if !raw.legacy.subnet.is_empty() {
        raw_sets.push(vec![raw.legacy]);
    }
    raw_sets.extend(raw.ranges);
    let sets = build_sets(raw_sets, req.version())?;
    let routes = raw
        .routes
        .into_iter()
        .map(parse_route)
        .collect::<Result<_>>()?;
    let dns = match raw.resolv_conf.as_str() {
        "" => Dns::default(),
        path => crate::dns::parse_resolv_conf(path.as_ref())?,
    };
    Ok(IpamConfig {
        network: req.conf.name.clone(),
        data_dir: network_dir(&raw.data_dir, &req.conf.name),
        sets,
        routes,
        dns,
        requested: requested_ips(req)?,
    })
}

fn build_sets(raw: Vec<Vec<RawRange>>, cni_version: &str) -> Result<Vec<RangeSet>> {
    if raw.is_empty() {
        return Err(CniError::config("no IP ranges specified"));
    }
    let mut sets = Vec::with_capacity(raw.len());
    for (i, raw_set) in raw.into_iter().enumerate() {
        let set: RangeSet = raw_set
            .into_iter()
            .map(build_range)
            .collect::<Result<_>>()
            .map_err(|e| e.context(format!("invalid range set {i}")))?;
        range::validate_set(&set)
            .map_err(|e| CniError::config(format!("invalid range set {i}: {e}")))?;
        sets.push(set);
    }
    let v4 = sets.iter().filter(|s| s[0].start.is_ipv4()).count();
    if (v4 > 1 || sets.len() - v4 > 1) && !version::at_least(cni_version, "0.3.0") {
        return Err(CniError::config(format!(
            "CNI version {cni_version} does not support more than 1 address per family"
        )));
    }
    for (i, a) in sets.iter().enumerate() {
        if let Some(j) = (i + 1..sets.len()).find(|&j| range::sets_overlap(a, &sets[j])) {
            return Err(CniError::config(format!("range set {i} overlaps with {j}")));
        }
    }
    Ok(sets)
}

fn build_range(raw: RawRange) -> Result<Range> {
    let subnet = parse_cidr(&raw.subnet)?;
    let addr = |field: &str, v: Option<String>| {
        v.filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|_| CniError::config(format!("invalid {field} {s:?}")))
            })
            .transpose()
    };
    let start = addr("rangeStart", raw.range_start)?;
    let end = addr("rangeEnd", raw.range_end)?;
    let gateway = addr("gateway", raw.gateway)?;
    Range::new(subnet, start, end, gateway).map_err(CniError::config)
}

fn parse_cidr(s: &str) -> Result<IpNet> {
    s.parse::<IpNet>()
        .map_err(|_| CniError::config(format!("invalid CIDR address: {s}")))
}

fn parse_route(r: RawRoute) -> Result<Route> {
    // Kept as written (host bits included), as the reference returns it.
    let dst = parse_cidr(&r.dst)?;
    let gw = r.gw.filter(|s| !s.is_empty());
    let gw = gw
        .map(|g| {
            g.parse()
                .map_err(|_| CniError::config(format!("invalid route gateway {g:?}")))
        })
        .transpose()?;
    let (mtu, advmss, priority, table, scope) = (r.mtu, r.advmss, r.priority, r.table, r.scope);
    Ok(Route {
        dst,
        gw,
        mtu,
        advmss,
        priority,
        table,
        scope,
    })
}

/// Requested addresses, by the conventions' precedence: `runtimeConfig.ips`, else
/// `args.cni.ips`, else `CNI_ARGS` `IP=` (comma-separated). Only the first source
/// that names any address is used, so a stale CNI_ARGS cannot fight the runtime.
fn requested_ips(req: &Request) -> Result<Vec<IpAddr>> {
    for (source, value) in [
        ("runtimeConfig.ips", req.conf.runtime("ips")),
        ("args.cni.ips", req.conf.cni_arg("ips")),
    ] {
        let Some(value) = value else { continue };
        let list: Vec<String> = null_as_default(value)
            .map_err(|e| CniError::decode(format!("{source} must be a list of strings: {e}")))?;
        if !list.is_empty() {
            return parse_ip_list(list.iter().map(String::as_str), |s| {
                CniError::config(format!("invalid IP {s:?} in {source}"))
            });
        }
    }
    match req.env.args.get("IP") {
        Some(v) if !v.is_empty() => parse_ip_list(v.split(','), |s| {
            CniError::env(format!("CNI_ARGS: invalid IP {s:?}"))
        }),
        _ => Ok(Vec::new()),
    }
}

fn parse_ip_list<'a>(
    items: impl Iterator<Item = &'a str>,
    bad: impl Fn(&str) -> CniError,
) -> Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = Vec::new();
    for item in items.map(str::trim) {
        let ip = item
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| bad(item))?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}
