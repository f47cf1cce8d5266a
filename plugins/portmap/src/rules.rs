//! The nftables state of hostPort mappings: per-mapping map elements in one table of
//! our own, so ADD and DEL cost the same at 0 or 5,000 mappings.
//!
//! # Layout: table `inet weft_portmap`
//! ```text
//! table inet weft_portmap {
//!   map ports_v4          { type inet_proto . inet_service : verdict             # no hostIP
//!                           elements = { tcp . 8080 comment "net:N id:C if:eth0" : jump pm-<h(N)>-<h(opts)>-a } }
//!   map hostip_ports_v4   { type ipv4_addr . inet_proto . inet_service : verdict # with hostIP
//!                           elements = { 192.0.2.1 . udp . 5353 comment "…" : jump pm-…-h } }
//!   map targets_v4        { type inet_proto . inet_service : ipv4_addr . inet_service
//!                           elements = { tcp . 8080 : 10.85.0.2 . 80 } }
//!   map hostip_targets_v4 { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service }
//!   map owners_v4         { type ipv4_addr . inet_proto . inet_service : mark . mark . mark . mark
//!                           elements = { 0.0.0.0 . tcp . 8080 : <h64(N)> . <h64(C, eth0)> } }
//!   (the same five for IPv6)
//!   chain prerouting { type nat hook prerouting priority dstnat; policy accept;
//!                      fib daddr type local jump hostports }
//!   chain output     { type nat hook output priority dstnat; policy accept;
//!                      fib daddr type local jump hostports }
//!   chain hostports {
//!     ip daddr . meta l4proto . th dport vmap @hostip_ports_v4      # a hostIP match wins
//!     meta nfproto ipv4 meta l4proto . th dport vmap @ports_v4
//!     ip6 daddr . meta l4proto . th dport vmap @hostip_ports_v6
//!     meta nfproto ipv6 meta l4proto . th dport vmap @ports_v6 }
//!   chain pm-<h(N)>-<h(options, subnet)>-a {   # one per network, options and pod subnet
//!     <conditionsV4> ip saddr 10.85.0.0/24 meta mark set meta mark | 0x00002000   # hairpin
//!     <conditionsV4> ip saddr 127.0.0.0/8 meta mark set meta mark | 0x00002000    # localhost
//!     <conditionsV4> dnat ip to meta l4proto . th dport map @targets_v4 }
//!   chain pm-…-h { the same, DNAT through hostip_targets_v4 keyed by ip daddr too }
//!   chain masq-bit13 { type nat hook postrouting priority srcnat; policy accept;
//!                      meta mark & 0x00002000 == 0x00002000 masquerade }
//! }
//! ```
//! A mapping is three elements: its verdict (which options apply), its target and its
//! owner. ADD only adds elements, which go to the kernel over nfnetlink in one batch
//! with no `nft` process; the chains are built once per network on a repair path.
//! nft cannot put a constant into a concatenated lookup key, hence the separate maps
//! for mappings with and without a hostIP.
//!
//! # Owners
//! As in [`weft_core::masq`]: a delete first `add`s the attachment's own owner
//! element, which is a no-op when the key is ours and fails (EEXIST) when it is
//! another attachment's, so a late DEL never removes a mapping a newer pod now holds.
//! The same EEXIST tells ADD that a host port is taken.

use crate::config::{PortMapConf, PortMapping, Protocol};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use weft_core::masq::{self, Attachment, OWNER_TYPE, Owner};
use weft_core::nft::{
    self, BaseChain, ChainType, Comment, Element, Family, Hook, Ident, Listing, Policy, Priority,
    Rule, SetDecl, Transaction, Value, Verdict,
};

pub const TABLE: &str = "weft_portmap";
const FAMILY: Family = Family::Inet;
const TABLE_COMMENT: &str = "weft portmap - managed by weft, do not edit";
const HOSTPORTS: &str = "hostports";
/// Hashed into network chain names: a release that changes [`chain_rules`] bumps it.
const CHAIN_LAYOUT: &str = "v1";

fn table() -> Ident {
    Ident::constant(TABLE)
}

/// One mapped host port of one family: what a packet is matched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Key {
    #[serde(rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    pub v6: bool,
    pub protocol: Protocol,
    pub host_port: u16,
}

impl Key {
    fn family(&self) -> &'static str {
        if self.v6 { "v6" } else { "v4" }
    }

    fn ports_map(&self) -> Ident {
        let kind = if self.host_ip.is_some() {
            "hostip_ports"
        } else {
            "ports"
        };
        Ident::constant(&format!("{kind}_{}", self.family()))
    }

    fn targets_map(&self) -> Ident {
        targets_map(self.v6, self.host_ip.is_some())
    }

    fn owners_map(&self) -> Ident {
        Ident::constant(&format!("owners_{}", self.family()))
    }

    /// The key in the ports and targets maps: `[hostIP .] proto . port`.
    fn value(&self) -> Value {
        let mut parts: Vec<Value> = self.host_ip.map(Value::Addr).into_iter().collect();
        parts.extend([
            Value::Proto(self.protocol.number()),
            Value::Port(self.host_port),
        ]);
        Value::Concat(parts)
    }

    /// The key in the owners map: the unspecified address stands for "any".
    fn owner_key(&self) -> Value {
        let any: IpAddr = if self.v6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        Value::Concat(vec![
            Value::Addr(self.host_ip.unwrap_or(any)),
            Value::Proto(self.protocol.number()),
            Value::Port(self.host_port),
        ])
    }

    /// The keys a mapping can have, in both families: what a DEL that only knows the
    /// runtime's portMappings must look at.
    pub fn all_of(m: &PortMapping) -> Vec<Key> {
        let fams: &[bool] = match m.host_ip {
            Some(ip) => &[ip.is_ipv6()][..],
            None => &[false, true],
        };
        fams.iter()
            .map(|&v6| Key {
                host_ip: m.host_ip,
                v6,
                protocol: m.protocol,
                host_port: m.host_port,
            })
            .collect()
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(ip) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(f, "{}/{}", self.host_port, self.protocol.name())?;
        if self.host_ip.is_none() {
            write!(f, " (IP{})", self.family())?;
        }
        Ok(())
    }
}

/// One mapping as installed for one container address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Key,
    pub pod: IpAddr,
    pub container_port: u16,
    pub chain: Ident,
}

/// What ADD installs for an attachment: the entries and the chains they jump to.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub entries: Vec<Entry>,
    /// `(chain, pod subnet, with hostIP)` for each chain the entries use.
    chains: Vec<(Ident, IpNet, bool)>,
}

impl Plan {
    /// Each mapping for each container address of a family it applies to (a hostIP
    /// of the other family skips it, as in the reference).
    pub fn new(network: &str, conf: &PortMapConf, mappings: &[PortMapping], ips: &[IpNet]) -> Plan {
        let mut plan = Plan::default();
        for ip in ips {
            for m in mappings {
                if m.host_ip
                    .is_some_and(|h| h.is_ipv4() != ip.addr().is_ipv4())
                {
                    continue;
                }
                let with_ip = m.host_ip.is_some();
                let chain = network_chain(network, conf, ip, with_ip);
                if !plan.chains.iter().any(|(c, _, _)| *c == chain) {
                    plan.chains.push((chain.clone(), ip.trunc(), with_ip));
                }
                plan.entries.push(Entry {
                    key: Key {
                        host_ip: m.host_ip,
                        v6: ip.addr().is_ipv6(),
                        protocol: m.protocol,
                        host_port: m.host_port,
                    },
                    pod: ip.addr(),
                    container_port: m.container_port,
                    chain,
                });
            }
        }
        plan
    }

    pub fn keys(&self) -> Vec<Key> {
        self.entries.iter().map(|e| e.key).collect()
    }

    /// ADD's fast path: three `add element`s per entry, nothing else. Fails
    /// atomically with ENOENT when the table, a map or a chain is missing, and with
    /// EEXIST when a key is held by another attachment (or by this one with other
    /// values).
    pub fn add_tx(&self, att: &Attachment<'_>) -> Transaction {
        let t = table();
        let owner = masq::owner_value(&att.owner());
        let mut tx = Transaction::new();
        for e in &self.entries {
            let k = &e.key;
            tx.add_elements(
                FAMILY,
                &t,
                &k.ports_map(),
                &[Element::new(k.value())
                    .comment(att.comment())
                    .verdict(Verdict::Jump(e.chain.clone()))],
            )
            .add_elements(
                FAMILY,
                &t,
                &k.targets_map(),
                &[Element::new(k.value()).value(Value::Concat(vec![
                    Value::Addr(e.pod),
                    Value::Port(e.container_port),
                ]))],
            )
            .add_elements(
                FAMILY,
                &t,
                &k.owners_map(),
                &[Element::new(k.owner_key()).value(owner.clone())],
            );
        }
        tx
    }

    /// The base objects and this plan's chains (`add chain` + `flush chain` + rules:
    /// idempotent, atomic, repairs tampering). ~20 ms: only when the fast path failed.
    pub fn ensure_tx(&self, conf: &PortMapConf) -> Transaction {
        let t = table();
        let mut tx = ensure_tx(conf);
        for (chain, subnet, with_ip) in &self.chains {
            let rules = chain_rules(conf, subnet, *with_ip);
            tx.rebuild_chain(FAMILY, &t, chain, None, None, &rules);
        }
        tx
    }
}

fn targets_map(v6: bool, with_ip: bool) -> Ident {
    let kind = if with_ip { "hostip_targets" } else { "targets" };
    Ident::constant(&format!("{kind}_{}", if v6 { "v6" } else { "v4" }))
}

/// `pm-<h(network)>-<h(layout, options, subnet)>-a|h`: one chain per network, set of
/// options and pod subnet (`h` with a hostIP, `a` without).
fn network_chain(network: &str, conf: &PortMapConf, ip: &IpNet, with_ip: bool) -> Ident {
    let conditions = if ip.addr().is_ipv4() {
        &conf.conditions_v4
    } else {
        &conf.conditions_v6
    };
    let opts = format!(
        "snat={} masqAll={} bit={} conditions={:?}",
        conf.snat, conf.masq_all, conf.mark_bit, conditions
    );
    let subnet = ip.trunc().to_string();
    Ident::constant(&format!(
        "{}{}-{}",
        network_chain_prefix(network),
        nft::hash_hex(&[CHAIN_LAYOUT, &opts, &subnet]),
        if with_ip { "h" } else { "a" }
    ))
}

/// How every chain of `network` starts.
fn network_chain_prefix(network: &str) -> String {
    format!("pm-{}-", nft::hash_hex(&[network]))
}

fn mark(conf: &PortMapConf) -> Value {
    Value::Hex(1u64 << conf.mark_bit)
}

fn masq_chain(conf: &PortMapConf) -> Ident {
    Ident::constant(&format!("masq-bit{}", conf.mark_bit))
}

/// A network chain's rules: mark what needs masquerading, then DNAT.
fn chain_rules(conf: &PortMapConf, subnet: &IpNet, with_ip: bool) -> Vec<Rule> {
    let v4 = subnet.addr().is_ipv4();
    let conditions = if v4 {
        &conf.conditions_v4
    } else {
        &conf.conditions_v6
    };
    let start = || {
        conditions
            .iter()
            .fold(Rule::new(), |r, c| r.condition(c.as_str()))
    };
    let set_mark = |r: Rule| r.kw("meta mark set meta mark |").value(mark(conf));
    let saddr = if v4 { "ip saddr" } else { "ip6 saddr" };
    let mut rules = Vec::new();
    if conf.snat && conf.masq_all {
        rules.push(set_mark(start()));
    } else if conf.snat {
        // Hairpin: a pod of this subnet reaching a pod through a host port would get
        // the reply straight from the pod over the bridge, past the DNAT.
        rules.push(set_mark(start().kw(saddr).value(subnet.trunc())));
        if v4 {
            let lo: IpNet = "127.0.0.0/8".parse().expect("constant");
            rules.push(set_mark(start().kw(saddr).value(lo)));
        }
    }
    let dnat = match (v4, with_ip) {
        (true, false) => "dnat ip to meta l4proto . th dport map",
        (true, true) => "dnat ip to ip daddr . meta l4proto . th dport map",
        (false, false) => "dnat ip6 to meta l4proto . th dport map",
        (false, true) => "dnat ip6 to ip6 daddr . meta l4proto . th dport map",
    };
    rules.push(start().kw(dnat).set_ref(&targets_map(!v4, with_ip)));
    rules
}

fn nat_chain(hook: Hook, priority: Priority) -> BaseChain {
    BaseChain {
        kind: ChainType::Nat,
        hook,
        priority,
        policy: Policy::Accept,
    }
}

/// The table, its ten maps, the `hostports` lookup chain, the two DNAT base chains
/// and, with snat, the masquerade base chain of the configured mark bit.
pub fn ensure_tx(conf: &PortMapConf) -> Transaction {
    let t = table();
    let mut tx = Transaction::new();
    tx.add_table(FAMILY, &t, Some(&Comment::new(TABLE_COMMENT)));
    for fam in ["v4", "v6"] {
        let target: &'static str = if fam == "v4" {
            "ipv4_addr . inet_service"
        } else {
            "ipv6_addr . inet_service"
        };
        let with_ip: &'static str = if fam == "v4" {
            "ipv4_addr . inet_proto . inet_service"
        } else {
            "ipv6_addr . inet_proto . inet_service"
        };
        let any = "inet_proto . inet_service";
        for (name, decl) in [
            ("ports", SetDecl::map(any, "verdict")),
            ("hostip_ports", SetDecl::map(with_ip, "verdict")),
            ("targets", SetDecl::map(any, target)),
            ("hostip_targets", SetDecl::map(with_ip, target)),
            ("owners", SetDecl::map(with_ip, OWNER_TYPE)),
        ] {
            tx.add_set(
                FAMILY,
                &t,
                &Ident::constant(&format!("{name}_{fam}")),
                &decl,
            );
        }
    }
    let hostports = Ident::constant(HOSTPORTS);
    let lookups: Vec<Rule> = [
        ("ip daddr . meta l4proto . th dport vmap", "hostip_ports_v4"),
        ("meta nfproto ipv4 meta l4proto . th dport vmap", "ports_v4"),
        (
            "ip6 daddr . meta l4proto . th dport vmap",
            "hostip_ports_v6",
        ),
        ("meta nfproto ipv6 meta l4proto . th dport vmap", "ports_v6"),
    ]
    .into_iter()
    .map(|(lookup, map)| Rule::new().kw(lookup).set_ref(&Ident::constant(map)))
    .collect();
    tx.rebuild_chain(FAMILY, &t, &hostports, None, None, &lookups);
    // nft 1.0.6 knows the name `dstnat` in prerouting only; it is -100 in both.
    let to_hostports = Rule::new()
        .kw("fib daddr type local")
        .verdict(&Verdict::Jump(hostports));
    for (name, hook, prio) in [
        ("prerouting", Hook::Prerouting, Priority::DstNat),
        ("output", Hook::Output, Priority::Num(-100)),
    ] {
        let base = nat_chain(hook, prio);
        let chain = Ident::constant(name);
        tx.rebuild_chain(
            FAMILY,
            &t,
            &chain,
            Some(&base),
            None,
            std::slice::from_ref(&to_hostports),
        );
    }
    if conf.snat {
        let base = nat_chain(Hook::Postrouting, Priority::SrcNat);
        let masquerade = Rule::new()
            .kw("meta mark &")
            .value(mark(conf))
            .kw("==")
            .value(mark(conf))
            .kw("masquerade");
        tx.rebuild_chain(
            FAMILY,
            &t,
            &masq_chain(conf),
            Some(&base),
            None,
            &[masquerade],
        );
    }
    tx
}

/// Guarded deletes of `keys` for `owner`: per map one unit that first `add`s the
/// owner element (a no-op if the key is ours, EEXIST if it is someone else's) and
/// then deletes, so a piece already gone (ENOENT) drops only its own unit. Meant for
/// [`Transaction::apply_ignoring`] with `NotFound` and `Exists`.
pub fn del_tx(keys: &[Key], owner: &Owner) -> Transaction {
    let t = table();
    let owner = masq::owner_value(owner);
    let mut tx = Transaction::new();
    let mut seen = HashSet::new();
    for k in keys.iter().filter(|k| seen.insert(**k)) {
        let guard = [Element::new(k.owner_key()).value(owner.clone())];
        for (map, key) in [
            (k.ports_map(), k.value()),
            (k.targets_map(), k.value()),
            (k.owners_map(), k.owner_key()),
        ] {
            tx.group(|tx| {
                tx.add_elements(FAMILY, &t, &k.owners_map(), &guard)
                    .delete_elements(FAMILY, &t, &map, &[key]);
            });
        }
    }
    tx
}

/// The table, or `None` when no mapping was ever installed. O(mappings): not for ADD.
pub fn list() -> weft_core::Result<Option<Listing>> {
    nft::list_table(FAMILY, &table())
}

fn parse_proto(v: &serde_json::Value) -> Option<Protocol> {
    match (v.as_str(), v.as_u64()) {
        (Some("tcp"), _) | (_, Some(6)) => Some(Protocol::Tcp),
        (Some("udp"), _) | (_, Some(17)) => Some(Protocol::Udp),
        (Some("sctp"), _) | (_, Some(132)) => Some(Protocol::Sctp),
        _ => None,
    }
}

/// `{"concat": [[addr,] proto, port]}` back to a key.
fn parse_key(v: &serde_json::Value, v6: bool, with_ip: bool) -> Option<Key> {
    let parts = v.get("concat")?.as_array()?;
    let (ip, rest) = match (with_ip, parts.as_slice()) {
        (true, [ip, rest @ ..]) => (Some(ip.as_str()?.parse::<IpAddr>().ok()?), rest),
        (false, rest) => (None, rest),
        _ => return None,
    };
    let [proto, port] = rest else { return None };
    Some(Key {
        host_ip: ip.filter(|ip| !ip.is_unspecified()),
        v6,
        protocol: parse_proto(proto)?,
        host_port: u16::try_from(port.as_u64()?).ok()?,
    })
}

/// Every `(key, owner)` of both owner maps.
pub fn owned(l: &Listing) -> Vec<(Key, Owner)> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let name = if v6 { "owners_v6" } else { "owners_v4" };
        for e in l.set(name).map(|s| s.elements.as_slice()).unwrap_or(&[]) {
            if let (Some(k), Some(o)) = (parse_key(&e.key, v6, true), masq::parse_owner(e)) {
                out.push((k, o));
            }
        }
    }
    out
}

/// The ports-map element of `key`: its comment and jump target.
pub fn verdict_of(l: &Listing, key: &Key) -> Option<(Option<String>, String)> {
    let set = l.set(key.ports_map().as_str())?;
    set.elements.iter().find_map(|e| {
        (parse_key(&e.key, key.v6, key.host_ip.is_some()) == Some(*key))
            .then(|| Some((e.comment.clone(), e.verdict_target()?.1.to_string())))?
    })
}

/// The targets-map value of `key`: `(pod address, container port)`.
pub fn target_of(l: &Listing, key: &Key) -> Option<(IpAddr, u16)> {
    let set = l.set(key.targets_map().as_str())?;
    set.elements.iter().find_map(|e| {
        if parse_key(&e.key, key.v6, key.host_ip.is_some()) != Some(*key) {
            return None;
        }
        let parts = e.data.as_ref()?.get("concat")?.as_array()?;
        let [ip, port] = parts.as_slice() else {
            return None;
        };
        Some((
            ip.as_str()?.parse().ok()?,
            u16::try_from(port.as_u64()?).ok()?,
        ))
    })
}

/// What CHECK finds wrong with `plan` for `att` in a listing (empty: all in place).
pub fn problems(l: &Listing, conf: &PortMapConf, plan: &Plan, att: &Attachment<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let mut chains: Vec<String> = vec!["prerouting".into(), "output".into(), HOSTPORTS.into()];
    if conf.snat {
        chains.push(masq_chain(conf).to_string());
    }
    chains.extend(plan.chains.iter().map(|(c, _, _)| c.to_string()));
    for c in chains {
        if l.chain(&c).is_none() {
            out.push(format!("chain {c} is missing"));
        } else if l.rules_of(&c).next().is_none() {
            out.push(format!("chain {c} has no rules"));
        }
    }
    let owner = att.owner();
    let owners = owned(l);
    for e in &plan.entries {
        let k = &e.key;
        match verdict_of(l, k) {
            Some((_, chain)) if chain == e.chain.as_str() => {}
            Some((_, chain)) => out.push(format!("{k} jumps to {chain}, not {}", e.chain)),
            None => out.push(format!("{k} has no element in {}", k.ports_map())),
        }
        match target_of(l, k) {
            Some(t) if t == (e.pod, e.container_port) => {}
            Some((ip, port)) => out.push(format!(
                "{k} goes to {ip} port {port}, not {} port {}",
                e.pod, e.container_port
            )),
            None => out.push(format!("{k} has no element in {}", k.targets_map())),
        }
        if !owners.iter().any(|(ok, o)| ok == k && *o == owner) {
            out.push(format!("{k} is not owned by this attachment"));
        }
    }
    out
}

/// GC's transaction: guarded deletes of every key owned by an attachment of
/// `network` not in `valid`, and the network's chains no mapping uses any more.
/// Returns the removed attachments' `(container ID, ifname)` owner halves count.
pub fn gc_tx(l: &Listing, network: &str, valid: &[(&str, &str)]) -> (Transaction, usize) {
    let net = Attachment::new(network, "", "").owner();
    let keep: HashSet<Owner> = valid
        .iter()
        .map(|(cid, ifname)| Attachment::new(network, cid, ifname).owner())
        .collect();
    let mut tx = Transaction::new();
    let mut stale: HashSet<Owner> = HashSet::new();
    let mut freed: HashSet<Key> = HashSet::new();
    for (key, owner) in owned(l) {
        if owner[..2] == net[..2] && !keep.contains(&owner) {
            tx.extend(del_tx(&[key], &owner));
            stale.insert(owner);
            freed.insert(key);
        }
    }
    let prefix = network_chain_prefix(network);
    let mut used: HashSet<String> = HashSet::new();
    for set in &l.sets {
        if !set.name.contains("ports_") {
            continue;
        }
        let (v6, with_ip) = (set.name.ends_with("v6"), set.name.starts_with("hostip"));
        for e in &set.elements {
            let freed_key = parse_key(&e.key, v6, with_ip).is_some_and(|k| freed.contains(&k));
            if let Some((_, target)) = e.verdict_target().filter(|_| !freed_key) {
                used.insert(target.to_string());
            }
        }
    }
    let t = table();
    for c in &l.chains {
        if c.name.starts_with(&prefix)
            && !used.contains(&c.name)
            && let Ok(chain) = Ident::new(c.name.clone())
        {
            tx.drop_chain(FAMILY, &t, &chain);
        }
    }
    (tx, stale.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortMapping;
    use std::path::PathBuf;

    fn conf() -> PortMapConf {
        PortMapConf {
            snat: true,
            masq_all: false,
            mark_bit: 13,
            conditions_v4: vec!["ip saddr != 192.0.2.0/24".into()],
            conditions_v6: Vec::new(),
            data_dir: PathBuf::from("/unused"),
        }
    }

    fn mappings() -> Vec<PortMapping> {
        vec![
            PortMapping {
                host_port: 18080,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: None,
            },
            PortMapping {
                host_port: 15353,
                container_port: 53,
                protocol: Protocol::Udp,
                host_ip: None,
            },
            PortMapping {
                host_port: 18443,
                container_port: 443,
                protocol: Protocol::Tcp,
                host_ip: Some("127.0.0.1".parse().unwrap()),
            },
        ]
    }

    fn plan() -> Plan {
        let ips: Vec<IpNet> = vec![
            "10.85.0.2/24".parse().unwrap(),
            "fd85::2/64".parse().unwrap(),
        ];
        Plan::new("rsApm", &conf(), &mappings(), &ips)
    }

    #[test]
    fn ensure_and_add_text() {
        let p = plan();
        // The hostIP mapping is IPv4: no IPv6 entry for it.
        assert_eq!(p.entries.len(), 5);
        let att = Attachment::new("rsApm", "rsAb1", "eth0");
        let text = format!("{}{}", p.ensure_tx(&conf()), p.add_tx(&att));
        insta::assert_snapshot!(text);
    }

    #[test]
    fn del_text() {
        let att = Attachment::new("rsApm", "rsAb1", "eth0");
        insta::assert_snapshot!(del_tx(&plan().keys(), &att.owner()).to_string());
    }

    #[test]
    fn keys_read_back_from_json() {
        let k = parse_key(
            &serde_json::json!({"concat": ["0.0.0.0", "udp", 53]}),
            false,
            true,
        );
        assert_eq!(
            k,
            Some(Key {
                host_ip: None,
                v6: false,
                protocol: Protocol::Udp,
                host_port: 53
            })
        );
        let k = parse_key(&serde_json::json!({"concat": ["sctp", 9]}), true, false).unwrap();
        assert_eq!((k.protocol, k.v6, k.host_port), (Protocol::Sctp, true, 9));
        assert_eq!(
            parse_key(&serde_json::json!({"concat": ["icmp", 9]}), true, false),
            None
        );
    }
}
