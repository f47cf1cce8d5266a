//! ADD: bridge, veth (peer created directly in the pod), IPAM, addresses, routes,
//! gateway. Every step registers its undo, so a failure leaves nothing behind.

use crate::config::{BridgeConf, find_ipam, ipam_type, requested_mac};
use ipnet::IpNet;
use std::net::IpAddr;
use weft_core::delegate::Delegate;
use weft_core::error::{CniError, Result};
use weft_core::netlink::{Link, Netlink};
use weft_core::netns::NetNs;
use weft_core::skel::{Command, Request};
use weft_core::spec::{CniResult, Interface, IpConfig, Route};
use weft_core::sysctl;
use weft_core::{fault, macspoof, masq};

/// Undo actions, run newest first when ADD fails.
#[derive(Default)]
struct Undo(Vec<Box<dyn FnOnce()>>);

impl Undo {
    fn push(&mut self, f: impl FnOnce() + 'static) {
        self.0.push(Box::new(f));
    }

    fn run(self) {
        for f in self.0.into_iter().rev() {
            f();
        }
    }
}

pub fn add(req: &Request, conf: &BridgeConf) -> Result<CniResult> {
    let mac = requested_mac(req)?;
    let pod = NetNs::open(&req.env.netns)?;
    let host = Netlink::host()?;
    let pod_nl = Netlink::in_netns(&pod)?;
    if pod_nl.link_by_name(&req.env.ifname)?.is_some() {
        return Err(CniError::env(format!(
            "container veth name provided ({}) already exists",
            req.env.ifname
        )));
    }
    let mut undo = Undo::default();
    let outcome = setup(req, conf, mac, &pod, &host, &pod_nl, &mut undo);
    if outcome.is_err() {
        undo.run();
    }
    outcome
}

fn setup(
    req: &Request,
    conf: &BridgeConf,
    mac: Option<[u8; 6]>,
    pod: &NetNs,
    host: &Netlink,
    pod_nl: &Netlink,
    undo: &mut Undo,
) -> Result<CniResult> {
    let bridge = ensure_bridge(host, conf, undo)?;
    fault::point("bridge.bridge")?;
    let host_veth = create_veth(req, conf, mac, pod, host, undo)?;
    fault::point("bridge.veth")?;
    attach_port(conf, host, &host_veth, &bridge)?;
    fault::point("bridge.port")?;
    let ifname = req.env.ifname.clone();
    let enabledad = conf.enabledad;
    pod.run(move || pod_sysctls(&ifname, enabledad))??;
    // Read once: nothing below changes its index, name or MAC.
    let pod_if = pod_link(pod_nl, &req.env.ifname)?;
    if conf.macspoofchk {
        // Before the pod's interface goes up, so no spoofed frame slips through.
        guard_mac(req, &host_veth, &pod_if, undo)?;
        fault::point("bridge.macspoof")?;
    }

    let mut result = CniResult::default();
    if let Some(ipam) = ipam_type(req) {
        result = run_ipam(req, ipam, undo)?;
        fault::point("bridge.ipam")?;
        configure_l3(conf, &mut result, pod, pod_nl, &pod_if, host, &bridge)?;
        fault::point("bridge.l3")?;
        if conf.ip_masq {
            masquerade(req, &result, undo)?;
            fault::point("bridge.masq")?;
        }
    } else if !conf.disable_container_interface {
        pod_nl.set_up(pod_if.index)?;
    }
    fill_interfaces(req, &mut result, host, &pod_if, &bridge, &host_veth)?;
    fault::point("bridge.result")?;
    if let Some(dns) = req.conf.dns.as_ref().filter(|d| !d.is_empty()) {
        result.dns = dns.clone();
    }
    Ok(result)
}

/// The bridge, created if missing (and removed again on failure if it was ours and
/// nothing else attached to it meanwhile).
fn ensure_bridge(host: &Netlink, conf: &BridgeConf, undo: &mut Undo) -> Result<Link> {
    let mtu = (conf.mtu != 0).then_some(conf.mtu);
    let (bridge, created) = host.ensure_bridge(&conf.bridge, mtu)?;
    if created {
        let index = bridge.index;
        undo.push(move || {
            if let Ok(host) = Netlink::host() {
                let _ = host.delete_link_if_portless(index);
            }
        });
    }
    if conf.promisc_mode && !bridge.promisc {
        host.set_promisc(bridge.index, true)?;
    }
    let name = format!("net/ipv6/conf/{}/accept_ra", conf.bridge);
    sysctl::set_if_present(&name, "0")?;
    Ok(bridge)
}

/// `veth` + 8 random hex digits on the host, `CNI_IFNAME` inside the pod.
fn create_veth(
    req: &Request,
    conf: &BridgeConf,
    mac: Option<[u8; 6]>,
    pod: &NetNs,
    host: &Netlink,
    undo: &mut Undo,
) -> Result<Link> {
    let mtu = (conf.mtu != 0).then_some(conf.mtu);
    for _ in 0..10 {
        let name = random_veth_name()?;
        if host.create_veth(
            &name,
            &req.env.ifname,
            pod,
            mtu,
            mac.as_ref().map(|m| &m[..]),
        )? {
            let link = host.link_by_name(&name)?.ok_or_else(|| {
                CniError::internal(format!("veth {name} vanished after creation"))
            })?;
            let index = link.index;
            undo.push(move || {
                if let Ok(host) = Netlink::host() {
                    let _ = host.delete_link(index);
                }
            });
            return Ok(link);
        }
    }
    Err(CniError::internal(
        "could not find a free veth name in 10 tries",
    ))
}

fn random_veth_name() -> Result<String> {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(CniError::io("getrandom", std::io::Error::last_os_error()));
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("veth{hex}"))
}

fn attach_port(conf: &BridgeConf, host: &Netlink, veth: &Link, bridge: &Link) -> Result<()> {
    sysctl::set_if_present(&format!("net/ipv6/conf/{}/accept_ra", veth.name), "0")?;
    host.set_controller(veth.index, bridge.index)?;
    if conf.hairpin_mode || conf.port_isolation {
        host.set_bridge_port(veth.index, conf.hairpin_mode, conf.port_isolation)?;
    }
    host.set_up(veth.index)
}

fn pod_sysctls(ifname: &str, enabledad: bool) -> Result<()> {
    sysctl::set(&format!("net/ipv4/conf/{ifname}/arp_notify"), "1")?;
    let dad = if enabledad { "1" } else { "0" };
    sysctl::set_if_present(&format!("net/ipv6/conf/{ifname}/accept_dad"), dad)?;
    if enabledad {
        sysctl::set_if_present(&format!("net/ipv6/conf/{ifname}/enhanced_dad"), "1")?;
    }
    Ok(())
}

fn run_ipam(req: &Request, ipam: &str, undo: &mut Undo) -> Result<CniResult> {
    let delegate = find_ipam(req, ipam)?;
    let result = delegate.add(req.version())?;
    let (binary, linked) = (delegate.binary.clone(), delegate.linked);
    let (env, stdin) = (req.env.clone(), req.stdin.clone());
    undo.push(move || {
        let d = Delegate {
            binary,
            env: &env,
            stdin: &stdin,
            linked,
        };
        if let Err(e) = d.run(Command::Del) {
            weft_core::warn!("rolling back IPAM failed: {e}");
        }
    });
    if result.ips.is_empty() {
        return Err(CniError::internal("IPAM plugin returned missing IP config"));
    }
    Ok(result)
}

/// macspoofchk: only the pod's own MAC may enter the bridge from its veth.
fn guard_mac(req: &Request, host_veth: &Link, pod_if: &Link, undo: &mut Undo) -> Result<()> {
    let mac = pod_if
        .ether()
        .ok_or_else(|| CniError::internal(format!("{} has no Ethernet address", pod_if.name)))?;
    let att = masq::Attachment::new(&req.conf.name, &req.env.container_id, &req.env.ifname);
    macspoof::add(&att, &host_veth.name, mac)?;
    let (net, cid, ifname, veth) = (
        req.conf.name.clone(),
        req.env.container_id.clone(),
        req.env.ifname.clone(),
        host_veth.name.clone(),
    );
    undo.push(move || {
        let att = masq::Attachment::new(&net, &cid, &ifname);
        if let Err(e) = macspoof::del(&att, Some((&veth, mac))) {
            weft_core::warn!("rolling back macspoofchk failed: {e}");
        }
    });
    Ok(())
}

/// nftables masquerade for the pod's addresses, in weft's own table.
fn masquerade(req: &Request, result: &CniResult, undo: &mut Undo) -> Result<()> {
    let nets: Vec<IpNet> = result.ips.iter().map(|ip| ip.address).collect();
    let (net, cid, ifname) = (
        req.conf.name.clone(),
        req.env.container_id.clone(),
        req.env.ifname.clone(),
    );
    masq::add(&net, &cid, &ifname, &nets)?;
    let addrs: Vec<IpAddr> = nets.iter().map(IpNet::addr).collect();
    undo.push(move || {
        if let Err(e) = masq::del(&net, &cid, &ifname, Some(&addrs)) {
            weft_core::warn!("rolling back masquerade failed: {e}");
        }
    });
    Ok(())
}

fn pod_link(pod_nl: &Netlink, ifname: &str) -> Result<Link> {
    pod_nl
        .link_by_name(ifname)?
        .ok_or_else(|| CniError::internal(format!("{ifname} vanished from the pod")))
}

fn first_host(net: IpNet) -> IpAddr {
    match net.network() {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
    }
}

/// Addresses and routes in the pod, the gateway on the bridge, forwarding on.
fn configure_l3(
    conf: &BridgeConf,
    result: &mut CniResult,
    pod: &NetNs,
    pod_nl: &Netlink,
    pod_if: &Link,
    host: &Netlink,
    bridge: &Link,
) -> Result<()> {
    for ip in &mut result.ips {
        ip.interface = Some(2);
        if conf.is_gateway && ip.gateway.is_none() {
            ip.gateway = Some(first_host(ip.address));
        }
    }
    if conf.is_default_gateway {
        add_default_routes(result);
    }
    if result.ips.iter().any(|ip| ip.address.addr().is_ipv6()) {
        let ifname = pod_if.name.clone();
        pod.run(move || -> Result<()> {
            sysctl::set_if_present("net/ipv6/conf/lo/disable_ipv6", "0")?;
            sysctl::set_if_present(&format!("net/ipv6/conf/{ifname}/disable_ipv6"), "0").map(drop)
        })??;
    }
    for ip in &result.ips {
        pod_nl.add_address(pod_if.index, ip.address)?;
    }
    pod_nl.set_up(pod_if.index)?;
    for route in &result.routes {
        let gw = route
            .gw
            .or_else(|| family_gateway(&result.ips, route.dst.addr().is_ipv4()));
        pod_nl.add_route(route.dst, gw, Some(pod_if.index))?;
    }
    if conf.is_gateway {
        set_gateways(conf, result, host, bridge)?;
    }
    Ok(())
}

fn family_gateway(ips: &[IpConfig], v4: bool) -> Option<IpAddr> {
    ips.iter()
        .filter(|ip| ip.address.addr().is_ipv4() == v4)
        .find_map(|ip| ip.gateway)
}

/// A default route per family with an address, unless IPAM already gave one with a gateway.
fn add_default_routes(result: &mut CniResult) {
    for v4 in [true, false] {
        let Some(gw) = family_gateway(&result.ips, v4) else {
            continue;
        };
        let dst: IpNet = if v4 {
            "0.0.0.0/0".parse().unwrap()
        } else {
            "::/0".parse().unwrap()
        };
        if !result.routes.iter().any(|r| r.dst == dst && r.gw.is_some()) {
            result.routes.push(Route::new(dst, Some(gw)));
        }
    }
}

fn set_gateways(
    conf: &BridgeConf,
    result: &CniResult,
    host: &Netlink,
    bridge: &Link,
) -> Result<()> {
    let present = host.addresses(bridge.index)?;
    for ip in &result.ips {
        let Some(gw) = ip.gateway else { continue };
        let want = IpNet::new(gw, ip.address.prefix_len()).expect("prefix of a valid address");
        if present.contains(&want) {
            continue;
        }
        let clash: Vec<IpNet> = present
            .iter()
            .filter(|a| a.addr().is_ipv4() && gw.is_ipv4() || a.addr().is_ipv6() && a.contains(&gw))
            .copied()
            .collect();
        if !clash.is_empty() && !conf.force_address {
            return Err(CniError::config(format!(
                "failed to set bridge addr: {:?} already has an IP address different from {want}",
                conf.bridge
            )));
        }
        for old in clash {
            host.del_address(bridge.index, old)?;
        }
        host.add_address(bridge.index, want)?;
    }
    pin_bridge_mac(host, bridge.index)?;
    let v4 = result.ips.iter().any(|ip| ip.address.addr().is_ipv4());
    let v6 = result.ips.iter().any(|ip| ip.address.addr().is_ipv6());
    if v4 {
        sysctl::set("net/ipv4/ip_forward", "1")?;
    }
    if v6 {
        sysctl::set_if_present("net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}

/// A bridge takes the lowest MAC of its ports until one is set explicitly; pin the
/// current one (read now, with our port attached, so never the all-zero MAC the
/// reference trips over) so pods' ARP entries for the gateway stay valid.
fn pin_bridge_mac(host: &Netlink, index: u32) -> Result<()> {
    let link = host
        .link_by_index(index)?
        .ok_or_else(|| CniError::internal("bridge vanished"))?;
    if link.mac.iter().any(|b| *b != 0) {
        host.set_mac(index, &link.mac)?;
    }
    Ok(())
}

fn fill_interfaces(
    req: &Request,
    result: &mut CniResult,
    host: &Netlink,
    pod_if: &Link,
    bridge: &Link,
    veth: &Link,
) -> Result<()> {
    let fresh = |l: &Link| {
        host.link_by_index(l.index)
            .map(|o| o.unwrap_or_else(|| l.clone()))
    };
    let (bridge, veth) = (fresh(bridge)?, fresh(veth)?);
    let iface = |name: &str, mac: &[u8], sandbox: &str| Interface {
        name: name.to_string(),
        // A port-less bridge has the all-zero MAC; the reference leaves it out then.
        mac: if mac.iter().any(|b| *b != 0) {
            weft_core::mac::format(mac)
        } else {
            String::new()
        },
        sandbox: sandbox.to_string(),
        ..Default::default()
    };
    result.interfaces = vec![
        iface(&bridge.name, &bridge.mac, ""),
        iface(&veth.name, &veth.mac, ""),
        iface(&pod_if.name, &pod_if.mac, &req.env.netns),
    ];
    Ok(())
}
