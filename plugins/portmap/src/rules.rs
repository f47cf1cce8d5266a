//! The nftables state of hostPort mappings: per-mapping map elements in one table of
//! our own, so ADD and DEL cost the same at 0 or 5,000 mappings.
//!
//! # Layout: table `inet weft_portmap`
//! ```text
//! table inet weft_portmap {
//!   set pm-<h(N)>-<h(opts, subnet)>-a4 { type inet_proto . inet_service        # no hostIP
//!                           elements = { tcp . 8080 comment "net:N id:C if:eth0" } }
//!   set pm-…-h4           { type ipv4_addr . inet_proto . inet_service          # with hostIP
//!                           elements = { 192.0.2.1 . udp . 5353 comment "…" } }
//!   map targets_v4        { type inet_proto . inet_service : ipv4_addr . inet_service
//!                           elements = { tcp . 8080 : 10.85.0.2 . 80 } }
//!   map hostip_targets_v4 { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service }
//!   map owners_v4         { type ipv4_addr . inet_proto . inet_service : mark . mark . mark . mark
//!                           elements = { 0.0.0.0 . tcp . 8080 : <h64(N)> . <h64(C, eth0)> } }
//!   (the same three maps for IPv6; sets -a6 and -h6)
//!   chain prerouting { type nat hook prerouting priority dstnat; policy accept;
//!                      fib daddr type local jump hostports }
//!   chain output     { type nat hook output priority dstnat; policy accept;
//!                      fib daddr type local jump hostports }
//!   chain hostports {                                # one rule per class, hostIP first
//!     ip daddr . meta l4proto . th dport @pm-…-h4 jump pm-…-h4
//!     meta nfproto ipv4 meta l4proto . th dport @pm-…-a4 jump pm-…-a4 }
//!   chain pm-<h(N)>-<h(options, subnet)>-a4 {   # one class per network, options, pod subnet
//!     <conditionsV4> ip saddr 10.85.0.0/24 meta mark set meta mark | 0x00002000   # hairpin
//!     <conditionsV4> ip saddr 127.0.0.0/8 meta mark set meta mark | 0x00002000    # localhost
//!     <conditionsV4> dnat ip to meta l4proto . th dport map @targets_v4 }
//!   chain pm-…-h4 { the same, DNAT through hostip_targets_v4 keyed by ip daddr too }
//!   chain masq-bit13 { type nat hook postrouting priority srcnat; policy accept;
//!                      meta mark & 0x00002000 == 0x00002000 masquerade }
//! }
//! ```
//! A mapping is three elements: its key in its class's set (which options apply),
//! its target and its owner. ADD only adds elements, which go to the kernel over
//! nfnetlink in one batch with no `nft` process; a class's set, chain and
//! `hostports` rule are built once, on a repair path. No element holds a verdict: an
//! element that jumps makes the kernel re-validate every chain and jump of the table
//! at commit, which walks every such element (~1 ms per ADD at 5,000 mappings).
//! nft cannot put a constant into a concatenated lookup key, hence the separate
//! target maps for mappings with and without a hostIP.
//!
//! # Owners
//! As in [`weft_core::masq`]: a delete first `add`s the attachment's own owner
//! element, which is a no-op when the key is ours and fails (EEXIST) when it is
//! another attachment's, so a late DEL never removes a mapping a newer pod now holds.
//! The same EEXIST tells ADD that a host port is taken.

use crate::config::{PortMapConf, PortMapping, Protocol};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};
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

/// The verdict maps of the layout before classes: emptied by DEL and GC, dropped by
/// GC (with their `hostports` rules) once empty, never filled.
const LEGACY_MAPS: [&str; 4] = ["hostip_ports_v4", "ports_v4", "hostip_ports_v6", "ports_v6"];

/// A legacy map's `(v6, with hostIP)` from its name; `None` for other names.
fn legacy_kind(name: &str) -> Option<(bool, bool)> {
    LEGACY_MAPS
        .contains(&name)
        .then(|| (name.ends_with("v6"), name.starts_with("hostip")))
}

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

    /// Where the layout before classes kept this key, with a jump verdict.
    fn legacy_map(&self) -> Ident {
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

    /// The key in the class sets and target maps: `[hostIP .] proto . port`.
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
    /// Its class: the set holding the key and the chain it jumps to (one name).
    pub class: Ident,
}

/// A key as ADD installed it, with its class: ADD's record, what DEL removes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Installed {
    #[serde(flatten)]
    pub key: Key,
    /// `None`: no class set holds the key (a listing found only its other elements).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
}

/// What ADD installs for an attachment: the entries and their classes.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub entries: Vec<Entry>,
    /// `(class, pod subnet, with hostIP)` for each class the entries use.
    classes: Vec<(Ident, IpNet, bool)>,
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
                let class = class_name(network, conf, ip, with_ip);
                if !plan.classes.iter().any(|(c, _, _)| *c == class) {
                    plan.classes.push((class.clone(), ip.trunc(), with_ip));
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
                    class,
                });
            }
        }
        plan
    }

    pub fn installed(&self) -> Vec<Installed> {
        self.entries
            .iter()
            .map(|e| Installed {
                key: e.key,
                class: Some(e.class.to_string()),
            })
            .collect()
    }

    /// ADD's fast path: three `add element`s per entry, nothing else. Fails
    /// atomically with ENOENT when the table, a map or a class is missing, and with
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
                &e.class,
                &[Element::new(k.value()).comment(att.comment())],
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

    /// The base objects, this plan's classes and their `hostports` rules where
    /// `listing` (the table as it was) lacks them: inserted first for hostIP classes,
    /// appended otherwise. `hostports` is never flushed here, so a concurrent repair
    /// for another class, which this listing may predate, keeps its rule (a rule added
    /// twice by a race is harmless). Idempotent, atomic. ~20 ms: only when the fast
    /// path failed.
    pub fn ensure_tx(&self, conf: &PortMapConf, listing: Option<&Listing>) -> Transaction {
        let t = table();
        let hostports = Ident::constant(HOSTPORTS);
        let mut tx = base_tx();
        for (class, subnet, with_ip) in &self.classes {
            let v6 = subnet.addr().is_ipv6();
            tx.add_set(
                FAMILY,
                &t,
                class,
                &SetDecl::set(class_key_type(v6, *with_ip)),
            );
            let rules = chain_rules(conf, subnet, *with_ip);
            tx.rebuild_chain(FAMILY, &t, class, None, None, &rules);
        }
        tx.add_chain(FAMILY, &t, &hostports, None, None);
        for (class, _, with_ip) in &self.classes {
            let has_rule =
                listing.is_some_and(|l| l.rules_of(HOSTPORTS).any(|r| jumps_to(r, class.as_str())));
            if has_rule {
                continue;
            }
            for rule in dispatch_rules(std::slice::from_ref(class)) {
                if *with_ip {
                    tx.insert_rule(FAMILY, &t, &hostports, &rule);
                } else {
                    tx.add_rule(FAMILY, &t, &hostports, &rule);
                }
            }
        }
        base_chains_tx(&mut tx, conf);
        tx
    }
}

fn targets_map(v6: bool, with_ip: bool) -> Ident {
    let kind = if with_ip { "hostip_targets" } else { "targets" };
    Ident::constant(&format!("{kind}_{}", if v6 { "v6" } else { "v4" }))
}

/// `pm-<h(network)>-<h(layout, options, subnet)>-a4|a6|h4|h6`: one class (set and
/// chain) per network, set of options and pod subnet (`h` with a hostIP, `a`
/// without; the IP version last).
fn class_name(network: &str, conf: &PortMapConf, ip: &IpNet, with_ip: bool) -> Ident {
    let v4 = ip.addr().is_ipv4();
    let conditions = if v4 {
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
        "{}{}-{}{}",
        network_chain_prefix(network),
        nft::hash_hex(&[CHAIN_LAYOUT, &opts, &subnet]),
        if with_ip { "h" } else { "a" },
        if v4 { "4" } else { "6" }
    ))
}

/// A class's `(v6, with hostIP)` from its name; `None` for other names.
fn class_kind(name: &str) -> Option<(bool, bool)> {
    if !name.starts_with("pm-") {
        return None;
    }
    let (_, kind) = name.rsplit_once('-')?;
    match kind {
        "a4" => Some((false, false)),
        "a6" => Some((true, false)),
        "h4" => Some((false, true)),
        "h6" => Some((true, true)),
        _ => None,
    }
}

fn class_key_type(v6: bool, with_ip: bool) -> &'static str {
    match (v6, with_ip) {
        (_, false) => "inet_proto . inet_service",
        (false, true) => "ipv4_addr . inet_proto . inet_service",
        (true, true) => "ipv6_addr . inet_proto . inet_service",
    }
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

/// The table and its six maps.
fn base_tx() -> Transaction {
    let t = table();
    let mut tx = Transaction::new();
    tx.add_table(FAMILY, &t, Some(&Comment::new(TABLE_COMMENT)));
    for fam in ["v4", "v6"] {
        let (target, with_ip) = if fam == "v4" {
            ("ipv4_addr . inet_service", class_key_type(false, true))
        } else {
            ("ipv6_addr . inet_service", class_key_type(true, true))
        };
        for (name, decl) in [
            (
                "targets",
                SetDecl::map(class_key_type(false, false), target),
            ),
            ("hostip_targets", SetDecl::map(with_ip, target)),
            ("owners", SetDecl::map(with_ip, OWNER_TYPE)),
        ] {
            let name = Ident::constant(&format!("{name}_{fam}"));
            tx.add_set(FAMILY, &t, &name, &decl);
        }
    }
    tx
}

/// `hostports` rebuilt with one lookup per class of `classes` (which must exist by
/// then): those with a hostIP first, so a hostIP match wins.
fn dispatch_tx(tx: &mut Transaction, classes: &[Ident], legacy: &[&str]) {
    let mut rules = dispatch_rules(classes);
    // A legacy verdict map still in use keeps its lookup, after the classes'.
    for map in LEGACY_MAPS.iter().filter(|m| legacy.contains(m)) {
        let (v6, with_ip) = legacy_kind(map).expect("a legacy map");
        let lookup = Rule::new().kw(lookup_key(v6, with_ip)).kw("vmap");
        rules.push(lookup.set_ref(&Ident::constant(map)));
    }
    let hostports = Ident::constant(HOSTPORTS);
    tx.rebuild_chain(FAMILY, &table(), &hostports, None, None, &rules);
}

/// The `hostports` lookups of `classes`, hostIP classes first.
fn dispatch_rules(classes: &[Ident]) -> Vec<Rule> {
    let mut kinds: Vec<(bool, &Ident, bool)> = classes
        .iter()
        .filter_map(|c| class_kind(c.as_str()).map(|(v6, with_ip)| (!with_ip, c, v6)))
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
        .into_iter()
        .map(|(any_ip, class, v6)| {
            Rule::new()
                .kw(lookup_key(v6, !any_ip))
                .set_ref(class)
                .verdict(&Verdict::Jump(class.clone()))
        })
        .collect()
}

/// What `hostports` looks a packet up by: `[daddr .] l4proto . dport` of one family.
fn lookup_key(v6: bool, with_ip: bool) -> &'static str {
    match (v6, with_ip) {
        (false, true) => "ip daddr . meta l4proto . th dport",
        (false, false) => "meta nfproto ipv4 meta l4proto . th dport",
        (true, true) => "ip6 daddr . meta l4proto . th dport",
        (true, false) => "meta nfproto ipv6 meta l4proto . th dport",
    }
}

/// The two DNAT base chains into `hostports` and, with snat, the masquerade base
/// chain of the configured mark bit.
fn base_chains_tx(tx: &mut Transaction, conf: &PortMapConf) {
    let t = table();
    // nft 1.0.6 knows the name `dstnat` in prerouting only; it is -100 in both.
    let to_hostports = Rule::new()
        .kw("fib daddr type local")
        .verdict(&Verdict::Jump(Ident::constant(HOSTPORTS)));
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
}

/// Guarded deletes of `keys` for `owner`: per set one unit that first `add`s the
/// owner element (a no-op if the key is ours, EEXIST if it is someone else's) and
/// then deletes, so a piece already gone (ENOENT) drops only its own unit. The
/// owner goes last. Meant for [`Transaction::apply_ignoring`] with `NotFound` and
/// `Exists`.
pub fn del_tx(keys: &[Installed], owner: &Owner) -> Transaction {
    let t = table();
    let owner = masq::owner_value(owner);
    let mut tx = Transaction::new();
    let mut seen = HashSet::new();
    for i in keys.iter().filter(|i| seen.insert((*i).clone())) {
        let k = &i.key;
        let guard = [Element::new(k.owner_key()).value(owner.clone())];
        // No class: a key of the layout before classes (its record or a listing
        // says so), in a legacy verdict map if anywhere.
        let class = match &i.class {
            Some(c) => Ident::new(c.clone()).ok(),
            None => Some(k.legacy_map()),
        };
        let units = class.map(|c| (c, k.value())).into_iter().chain([
            (k.targets_map(), k.value()),
            (k.owners_map(), k.owner_key()),
        ]);
        for (set, key) in units {
            tx.group(|tx| {
                tx.add_elements(FAMILY, &t, &k.owners_map(), &guard)
                    .delete_elements(FAMILY, &t, &set, &[key]);
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

/// The classes holding `key` in a listing, each with the element's comment.
pub fn holders(l: &Listing, key: &Key) -> Vec<(String, Option<String>)> {
    let kind = (key.v6, key.host_ip.is_some());
    l.sets
        .iter()
        .filter(|s| class_kind(&s.name) == Some(kind))
        .filter_map(|s| {
            let e = s
                .elements
                .iter()
                .find(|e| parse_key(&e.key, kind.0, kind.1) == Some(*key))?;
            Some((s.name.clone(), e.comment.clone()))
        })
        .collect()
}

/// `key` as a listing has it installed: once per class holding it (or once, with
/// no class, when none does).
pub fn installed_in(l: &Listing, key: Key) -> Vec<Installed> {
    let mut found: Vec<Installed> = holders(l, &key)
        .into_iter()
        .map(|(class, _)| Installed {
            key,
            class: Some(class),
        })
        .collect();
    if found.is_empty() {
        found.push(Installed { key, class: None });
    }
    found
}

/// The classes of a listing whose set and chain both exist.
pub fn classes(l: &Listing) -> Vec<Ident> {
    l.sets
        .iter()
        .filter(|s| class_kind(&s.name).is_some() && l.chain(&s.name).is_some())
        .filter_map(|s| Ident::new(s.name.clone()).ok())
        .collect()
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
    chains.extend(plan.classes.iter().map(|(c, _, _)| c.to_string()));
    for c in chains {
        if l.chain(&c).is_none() {
            out.push(format!("chain {c} is missing"));
        } else if l.rules_of(&c).next().is_none() {
            out.push(format!("chain {c} has no rules"));
        }
    }
    for (class, _, _) in &plan.classes {
        if !l.rules_of(HOSTPORTS).any(|r| jumps_to(r, class.as_str())) {
            out.push(format!("chain {HOSTPORTS} has no rule for {class}"));
        }
    }
    let owner = att.owner();
    let owners = owned(l);
    for e in &plan.entries {
        let k = &e.key;
        let held = holders(l, k);
        if !held.iter().any(|(c, _)| c == e.class.as_str()) {
            out.push(format!("{k} has no element in {}", e.class));
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

fn jumps_to(r: &nft::RuleInfo, chain: &str) -> bool {
    r.expr.iter().any(|x| {
        x.get("jump")
            .and_then(|j| j.get("target"))
            .and_then(serde_json::Value::as_str)
            == Some(chain)
    })
}

/// GC's transaction: guarded deletes of every key owned by an attachment of
/// `network` not in `valid`, and the network's classes no mapping uses any more
/// (with their `hostports` rules). Returns the number of attachments removed.
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
            tx.extend(del_tx(&installed_in(l, key), &owner));
            stale.insert(owner);
            freed.insert(key);
        }
    }
    let prefix = network_chain_prefix(network);
    let freed = &freed;
    // The sets of a `kind` with nothing left in them once `freed` is gone.
    let emptied = |kind: fn(&str) -> Option<(bool, bool)>| {
        l.sets.iter().filter(move |s| {
            kind(&s.name).is_some_and(|(v6, with_ip)| {
                s.elements
                    .iter()
                    .all(|e| parse_key(&e.key, v6, with_ip).is_some_and(|k| freed.contains(&k)))
            })
        })
    };
    let dropped: BTreeSet<&str> = emptied(class_kind)
        .map(|s| s.name.as_str())
        .filter(|s| s.starts_with(&prefix))
        .collect();
    // A chain of the network left without its set (tampering, an older layout) goes too.
    let chains: Vec<&str> = l
        .chains
        .iter()
        .map(|c| c.name.as_str())
        .filter(|c| c.starts_with(&prefix) && (dropped.contains(c) || l.set(c).is_none()))
        .collect();
    // The verdict maps of the layout before classes, once nothing is left in them.
    let legacy: Vec<&str> = emptied(legacy_kind).map(|s| s.name.as_str()).collect();
    if dropped.is_empty() && chains.is_empty() && legacy.is_empty() {
        return (tx, stale.len());
    }
    let t = table();
    let live: Vec<Ident> = classes(l)
        .into_iter()
        .filter(|c| !dropped.contains(c.as_str()))
        .collect();
    let kept: Vec<&str> = l
        .sets
        .iter()
        .map(|s| s.name.as_str())
        .filter(|m| legacy_kind(m).is_some() && !legacy.contains(m))
        .collect();
    dispatch_tx(&mut tx, &live, &kept);
    for c in chains.into_iter().filter_map(|c| Ident::new(c).ok()) {
        tx.drop_chain(FAMILY, &t, &c);
    }
    for s in dropped.into_iter().filter_map(|s| Ident::new(s).ok()) {
        tx.delete_set(FAMILY, &t, &s);
    }
    for m in legacy.into_iter().filter_map(|m| Ident::new(m).ok()) {
        tx.delete_map(FAMILY, &t, &m);
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
        let text = format!("{}{}", p.ensure_tx(&conf(), None), p.add_tx(&att));
        insta::assert_snapshot!(text);
    }

    #[test]
    fn del_text() {
        let att = Attachment::new("rsApm", "rsAb1", "eth0");
        insta::assert_snapshot!(del_tx(&plan().installed(), &att.owner()).to_string());
    }

    #[test]
    fn class_names_tell_their_kind() {
        let p = plan();
        let kinds: Vec<_> = p
            .classes
            .iter()
            .map(|(c, _, _)| class_kind(c.as_str()))
            .collect();
        let want = [(false, false), (false, true), (true, false)];
        assert_eq!(kinds, want.map(Some));
        assert_eq!(class_kind("pm-x-y-a5"), None);
        assert_eq!(class_kind("hostports"), None);
        assert_eq!(class_kind("owners_v4"), None);
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
