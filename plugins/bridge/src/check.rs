//! CHECK: the state ADD created is still there and still matches prevResult.

use crate::config::{BridgeConf, forward_to_ipam};
use weft_core::error::{CniError, Result, code};
use weft_core::netlink::{Link, Netlink};
use weft_core::netns::NetNs;
use weft_core::skel::{Command, Request};
use weft_core::spec::CniResult;
use weft_core::{macspoof, masq};

fn failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

pub fn check(req: &Request, conf: &BridgeConf) -> Result<()> {
    let prev = req
        .conf
        .prev_result()?
        .ok_or_else(|| CniError::config("Required prevResult missing"))?;
    forward_to_ipam(req, Command::Check)?;
    let host = Netlink::host()?;
    let bridge = check_bridge(&host, conf)?;
    let pod = NetNs::open(&req.env.netns)?;
    let pod_nl = Netlink::in_netns(&pod)?;
    let pod_if = check_pod_interface(req, &prev, &pod_nl)?;
    let veth = check_host_veth(conf, &prev, &host, &pod_if, &bridge)?;
    check_l3(&prev, &pod_nl, &pod_if)?;
    if conf.macspoofchk {
        let guarded = match pod_if.ether() {
            Some(m) => macspoof::check(&veth.name, m)?,
            None => false,
        };
        if !guarded {
            return Err(failed(format!(
                "macspoofchk: {} is not guarded to the MAC of {}",
                veth.name, pod_if.name
            )));
        }
    }
    if conf.ip_masq {
        let nets: Vec<_> = prev.ips.iter().map(|ip| ip.address).collect();
        masq::check(
            &req.conf.name,
            &req.env.container_id,
            &req.env.ifname,
            &nets,
        )?;
    }
    Ok(())
}

fn check_bridge(host: &Netlink, conf: &BridgeConf) -> Result<Link> {
    let bridge = host
        .link_by_name(&conf.bridge)?
        .filter(|l| l.kind.as_deref() == Some("bridge"))
        .ok_or_else(|| failed(format!("bridge {:?} not found", conf.bridge)))?;
    if bridge.promisc != conf.promisc_mode {
        return Err(failed(format!(
            "bridge {:?} configured promiscMode {} doesn't match current state {}",
            conf.bridge, conf.promisc_mode, bridge.promisc
        )));
    }
    Ok(bridge)
}

fn check_pod_interface(req: &Request, prev: &CniResult, pod_nl: &Netlink) -> Result<Link> {
    let ifname = &req.env.ifname;
    let listed = prev
        .interfaces
        .iter()
        .find(|i| &i.name == ifname && i.sandbox == req.env.netns)
        .ok_or_else(|| {
            failed(format!(
                "prevResult has no interface {ifname} in sandbox {}",
                req.env.netns
            ))
        })?;
    let link = pod_nl
        .link_by_name(ifname)?
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .ok_or_else(|| failed(format!("veth {ifname} not found in the container")))?;
    if !listed.mac.is_empty() && listed.mac != weft_core::mac::format(&link.mac) {
        return Err(failed(format!(
            "interface {ifname} mac {} doesn't match container mac {}",
            listed.mac,
            weft_core::mac::format(&link.mac)
        )));
    }
    Ok(link)
}

fn check_host_veth(
    conf: &BridgeConf,
    prev: &CniResult,
    host: &Netlink,
    pod_if: &Link,
    bridge: &Link,
) -> Result<Link> {
    let missing = || {
        failed(format!(
            "CNI veth created for bridge {} was not found",
            conf.bridge
        ))
    };
    let veth = host
        .link_by_index(pod_if.peer.ok_or_else(missing)?)?
        .ok_or_else(missing)?;
    if veth.controller != Some(bridge.index) || !prev.interfaces.iter().any(|i| i.name == veth.name)
    {
        return Err(missing());
    }
    let (hairpin, isolated) = (
        veth.hairpin.unwrap_or(false),
        veth.isolated.unwrap_or(false),
    );
    if hairpin != conf.hairpin_mode || isolated != conf.port_isolation {
        return Err(failed(format!(
            "{}: hairpin {hairpin} / isolated {isolated}, configured {} / {}",
            veth.name, conf.hairpin_mode, conf.port_isolation
        )));
    }
    Ok(veth)
}

fn check_l3(prev: &CniResult, pod_nl: &Netlink, pod_if: &Link) -> Result<()> {
    let addrs = pod_nl.addresses(pod_if.index)?;
    for ip in &prev.ips {
        if !addrs.contains(&ip.address) {
            return Err(failed(format!(
                "failed to match addr {} on interface {}",
                ip.address, pod_if.name
            )));
        }
    }
    for v4 in [true, false] {
        let wanted: Vec<_> = prev
            .routes
            .iter()
            .filter(|r| r.dst.addr().is_ipv4() == v4)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let routes = pod_nl.routes(v4)?;
        for r in wanted {
            let found = routes
                .iter()
                .any(|k| k.dst == r.dst && r.gw.is_none_or(|gw| k.gw == Some(gw)));
            if !found {
                return Err(failed(format!(
                    "expected route to {} not found in the container",
                    r.dst
                )));
            }
        }
    }
    Ok(())
}
