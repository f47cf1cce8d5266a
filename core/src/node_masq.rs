//! Node-level masquerade for weftd's `--ip-masq` (and flanneld's
//! `--iptables-forward-rules`), with flanneld's POSTRTG semantics, in nftables table
//! `inet weft_node` of our own.
//!
//! # Semantics (flanneld, nftables mode; N = cluster network, P = this node's subnet)
//! ```text
//! table inet weft_node {
//!   chain postrtg { type nat hook postrouting priority srcnat; policy accept;
//!     meta mark & 0x00004000 == 0x00004000 return      # kube-proxy masquerades these itself
//!     ip saddr P ip daddr N return                     # pod to pod: keep the source
//!     ip saddr N ip daddr P return                     # cluster to this node's pods
//!     ip saddr != N ip daddr P return                  # outside to this node's pods
//!     ip saddr N ip daddr != 224.0.0.0/4 masquerade fully-random   # pods to the outside
//!     ip saddr != N ip daddr N masquerade fully-random             # outside to other nodes' pods
//!     (the same for IPv6, with ff00::/8) }
//!   chain forward { type filter hook forward priority filter; policy accept;
//!     ip saddr N accept
//!     ip daddr N accept }
//! }
//! ```
//! Every rule has a comment (they name the rules in [`NodeMasq::check`]'s reports);
//! `fully-random` can be turned off. One IPv4 and/or one IPv6 network per node.
//! Other tables (kube-proxy's, iptables-nft's) are never read or written.
//!
//! # Rebuild and repair
//! [`NodeMasq::transaction`] replaces the whole table in one kernel transaction:
//! `add table` (so that the delete cannot fail), `delete table`, then the table, its
//! chains and their rules. The kernel applies all of it or nothing, so packets never
//! see a half-built table, and it converges from any state: missing or extra rules,
//! a base chain re-created by hand with another priority (which `add chain` cannot
//! change: EOPNOTSUPP), chains or sets someone added to our table, a change of
//! flags. ~20 ms (it deletes), so the agent runs it at start-up and when
//! [`NodeMasq::check`] (one `nft -j list table`, no change) reports damage.

use crate::error::{CniError, Result};
use crate::nft::{
    self, BaseChain, ChainType, Comment, ErrorKind, Family, Hook, Ident, Policy, Priority, Rule,
    Transaction, Value, Verdict,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::IpAddr;

/// The table (family `inet`) holding the node's masquerade and forward rules.
pub const TABLE: &str = "weft_node";
/// The nat base chain (hook postrouting, priority srcnat).
pub const POSTRTG: &str = "postrtg";
/// The filter base chain (hook forward, priority filter).
pub const FORWARD: &str = "forward";

const FAMILY: Family = Family::Inet;
const TABLE_COMMENT: &str = "weftd ip-masq and forward rules - managed by weftd, do not edit";
/// kube-proxy's masquerade mark (`--masquerade-bit` 14): it masquerades these itself.
const KUBE_PROXY_MARK: u64 = 0x4000;

const POSTRTG_BASE: BaseChain = BaseChain {
    kind: ChainType::Nat,
    hook: Hook::Postrouting,
    priority: Priority::SrcNat,
    policy: Policy::Accept,
};
const FORWARD_BASE: BaseChain = BaseChain {
    kind: ChainType::Filter,
    hook: Hook::Forward,
    priority: Priority::Filter,
    policy: Policy::Accept,
};

/// The node's masquerade and forward rules: what weftd derives from its flags and
/// its subnet lease.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeMasq {
    /// The cluster's IPv4 network (N).
    pub network_v4: Option<Ipv4Net>,
    /// This node's IPv4 subnet (P), inside `network_v4`.
    pub subnet_v4: Option<Ipv4Net>,
    /// The cluster's IPv6 network.
    pub network_v6: Option<Ipv6Net>,
    /// This node's IPv6 subnet, inside `network_v6`.
    pub subnet_v6: Option<Ipv6Net>,
    /// `masquerade fully-random` (flanneld's default) instead of `masquerade`.
    pub fully_random: bool,
    /// The forward chain accepting traffic from and to the networks.
    pub forward_rules: bool,
    /// The postrtg chain (`--ip-masq`).
    pub masquerade: bool,
}

/// One family's networks, as `IpNet`s with host bits cleared.
struct Fam {
    v4: bool,
    network: IpNet,
    subnet: Option<IpNet>,
}

impl Fam {
    /// (source match, destination match, multicast range) of the family.
    fn words(&self) -> (&'static str, &'static str, IpNet) {
        if self.v4 {
            (
                "ip saddr",
                "ip daddr",
                "224.0.0.0/4".parse().expect("constant"),
            )
        } else {
            (
                "ip6 saddr",
                "ip6 daddr",
                "ff00::/8".parse().expect("constant"),
            )
        }
    }

    fn tag(&self) -> &'static str {
        if self.v4 { "v4" } else { "v6" }
    }
}

/// A rule body and its comment (which identifies it in [`NodeMasq::check`]).
struct Spec {
    body: Rule,
    comment: String,
}

impl Spec {
    fn new(body: Rule, comment: String) -> Spec {
        Spec { body, comment }
    }

    fn rule(&self) -> Rule {
        self.body.clone().comment(&Comment::new(&self.comment))
    }
}

fn table() -> Ident {
    Ident::constant(TABLE)
}

fn invalid(msg: String) -> CniError {
    CniError::config(format!("ip-masq: {msg}"))
}

impl NodeMasq {
    fn families(&self) -> Vec<Fam> {
        let mut out = Vec::new();
        if let Some(n) = self.network_v4 {
            out.push(Fam {
                v4: true,
                network: IpNet::V4(n.trunc()),
                subnet: self.subnet_v4.map(|s| IpNet::V4(s.trunc())),
            });
        }
        if let Some(n) = self.network_v6 {
            out.push(Fam {
                v4: false,
                network: IpNet::V6(n.trunc()),
                subnet: self.subnet_v6.map(|s| IpNet::V6(s.trunc())),
            });
        }
        out
    }

    /// Whether anything is to be installed (else the table is removed).
    fn wanted(&self) -> bool {
        self.masquerade || self.forward_rules
    }

    /// Check the combination: each subnet inside its family's network; with
    /// `masquerade`, every network with its subnet; with either chain on, at least one
    /// network. Both chains off is valid (it means: remove the table).
    pub fn validate(&self) -> Result<()> {
        fn pair<N: Copy + std::fmt::Display>(
            fam: &str,
            network: Option<N>,
            subnet: Option<N>,
            contains: impl Fn(&N, &N) -> bool,
            masquerade: bool,
        ) -> Result<()> {
            match (network, subnet) {
                (Some(n), Some(s)) if !contains(&n, &s) => Err(invalid(format!(
                    "this node's {fam} subnet {s} is not inside the {fam} network {n}"
                ))),
                (None, Some(s)) => Err(invalid(format!(
                    "this node's {fam} subnet {s} is given without an {fam} network"
                ))),
                (Some(n), None) if masquerade => Err(invalid(format!(
                    "masquerading needs this node's {fam} subnet of the {fam} network {n}"
                ))),
                _ => Ok(()),
            }
        }
        pair(
            "IPv4",
            self.network_v4,
            self.subnet_v4,
            |n, s| n.contains(s),
            self.masquerade,
        )?;
        pair(
            "IPv6",
            self.network_v6,
            self.subnet_v6,
            |n, s| n.contains(s),
            self.masquerade,
        )?;
        if self.wanted() && self.network_v4.is_none() && self.network_v6.is_none() {
            return Err(invalid(
                "masquerade or forward rules need an IPv4 or IPv6 network".into(),
            ));
        }
        Ok(())
    }

    /// The postrtg chain's rules (empty unless `masquerade`).
    fn postrtg_rules(&self) -> Vec<Spec> {
        if !self.masquerade {
            return Vec::new();
        }
        let masq = if self.fully_random {
            "masquerade fully-random"
        } else {
            "masquerade"
        };
        let mut out = vec![Spec::new(
            Rule::new()
                .kw("meta mark &")
                .value(Value::Hex(KUBE_PROXY_MARK))
                .kw("==")
                .value(Value::Hex(KUBE_PROXY_MARK))
                .verdict(&Verdict::Return),
            "weft ip-masq: kube-proxy mark 0x4000, kube-proxy masquerades it".into(),
        )];
        for f in self.families() {
            // An invalid combination (validate() says why) gets what is consistent.
            let Some(p) = f.subnet else { continue };
            let n = f.network;
            let (saddr, daddr, mc) = f.words();
            let c = |what: &str| format!("weft ip-masq {}: {what}", f.tag());
            out.extend([
                Spec::new(
                    Rule::new()
                        .kw(saddr)
                        .value(p)
                        .kw(daddr)
                        .value(n)
                        .verdict(&Verdict::Return),
                    c("node pods to cluster network, keep source"),
                ),
                Spec::new(
                    Rule::new()
                        .kw(saddr)
                        .value(n)
                        .kw(daddr)
                        .value(p)
                        .verdict(&Verdict::Return),
                    c("cluster network to node pods, keep source"),
                ),
                Spec::new(
                    Rule::new()
                        .kw(saddr)
                        .kw("!=")
                        .value(n)
                        .kw(daddr)
                        .value(p)
                        .verdict(&Verdict::Return),
                    c("outside to node pods, keep source"),
                ),
                Spec::new(
                    Rule::new()
                        .kw(saddr)
                        .value(n)
                        .kw(daddr)
                        .kw("!=")
                        .value(mc)
                        .kw(masq),
                    c("cluster network to outside but multicast, masquerade"),
                ),
                Spec::new(
                    Rule::new()
                        .kw(saddr)
                        .kw("!=")
                        .value(n)
                        .kw(daddr)
                        .value(n)
                        .kw(masq),
                    c("outside to cluster network, masquerade"),
                ),
            ]);
        }
        out
    }

    /// The forward chain's rules (empty unless `forward_rules`).
    fn forward_rules(&self) -> Vec<Spec> {
        if !self.forward_rules {
            return Vec::new();
        }
        let mut out = Vec::new();
        for f in self.families() {
            let (saddr, daddr, _) = f.words();
            let c = |what: &str| format!("weft forward {}: {what}", f.tag());
            out.extend([
                Spec::new(
                    Rule::new()
                        .kw(saddr)
                        .value(f.network)
                        .verdict(&Verdict::Accept),
                    c("from cluster network"),
                ),
                Spec::new(
                    Rule::new()
                        .kw(daddr)
                        .value(f.network)
                        .verdict(&Verdict::Accept),
                    c("to cluster network"),
                ),
            ]);
        }
        out
    }

    /// `(chain, its base-chain spec, its rules)` for every chain the table should have.
    fn chains(&self) -> Vec<(&'static str, BaseChain, Vec<Spec>)> {
        let mut out = Vec::new();
        if self.masquerade {
            out.push((POSTRTG, POSTRTG_BASE, self.postrtg_rules()));
        }
        if self.forward_rules {
            out.push((FORWARD, FORWARD_BASE, self.forward_rules()));
        }
        out
    }

    /// The full, idempotent rebuild as one atomic nft transaction: the table is
    /// replaced (`add`, `delete`, then declared again with its chains and rules), so
    /// it converges from any state. With both chains off, only the removal. Does not
    /// validate: [`apply`](Self::apply) does (an invalid combination gets the rules
    /// that are consistent, e.g. no masquerade for a family without a subnet).
    pub fn transaction(&self) -> Transaction {
        let t = table();
        let mut tx = removal();
        if !self.wanted() {
            return tx;
        }
        tx.add_table(FAMILY, &t, Some(&Comment::new(TABLE_COMMENT)));
        // The table is new within the transaction: no flushes needed.
        for (name, base, specs) in self.chains() {
            let chain = Ident::constant(name);
            tx.add_chain(FAMILY, &t, &chain, Some(&base), None);
            for s in &specs {
                tx.add_rule(FAMILY, &t, &chain, &s.rule());
            }
        }
        tx
    }

    /// Validate, then install (or, with both chains off, remove) the table.
    pub fn apply(&self) -> Result<()> {
        self.validate()?;
        self.transaction()
            .apply()
            .map_err(|e| e.context("ip-masq: installing table inet weft_node"))
    }

    /// Compare the kernel's table (`nft -j list table inet weft_node`) with what
    /// [`apply`](Self::apply) installs: chains with their hooks, priorities and
    /// policies, and each chain's rules by comment, content and order. `Err` says
    /// everything that is missing or different ("; "-separated); [`apply`](Self::apply)
    /// repairs all of it.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.validate().map_err(|e| e.msg)?;
        let fam = FAMILY.to_string();
        let listing = match nft::run(&["-j", "list", "table", &fam, TABLE], None) {
            Ok(out) => Some(out),
            Err(e) if e.only(&[ErrorKind::NotFound]) => None,
            Err(e) => return Err(format!("listing table {FAMILY} {TABLE}: {e}")),
        };
        let problems = self.diff(listing.as_deref());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// What differs between the table as listed (`nft -j list table` output, `None`
    /// when it does not exist) and what we install.
    fn diff(&self, listing: Option<&str>) -> Vec<String> {
        let Some(text) = listing else {
            return if self.wanted() {
                vec![format!("table {FAMILY} {TABLE} does not exist")]
            } else {
                Vec::new()
            };
        };
        if !self.wanted() {
            return vec![format!(
                "table {FAMILY} {TABLE} exists, but masquerade and forward rules are off"
            )];
        }
        let listed = match Listed::parse(text) {
            Ok(l) => l,
            Err(e) => return vec![e],
        };
        let mut problems = Vec::new();
        let chains = self.chains();
        for (name, base, specs) in &chains {
            let Some(chain) = listed.chains.iter().find(|c| c.name == *name) else {
                problems.push(format!("chain {name} is missing"));
                continue;
            };
            let want = base_text(base);
            if chain.base != want {
                problems.push(format!(
                    "chain {name} is `{}`, expected `{want}`",
                    chain.base
                ));
            }
            let got: Vec<&ListedRule> = listed.rules.iter().filter(|r| r.chain == *name).collect();
            diff_rules(name, specs, &got, &mut problems);
        }
        for c in &listed.chains {
            if !chains.iter().any(|(name, _, _)| *name == c.name) {
                problems.push(format!("unexpected chain {}", c.name));
            }
        }
        for r in &listed.rules {
            if !chains.iter().any(|(name, _, _)| *name == r.chain) {
                problems.push(format!(
                    "unexpected rule in chain {} (handle {}): `{}`",
                    r.chain, r.handle, r.body
                ));
            }
        }
        problems.extend(listed.others);
        problems
    }

    /// Delete table `inet weft_node` if present (`add` + `delete` in one transaction:
    /// an absent table is fine).
    pub fn remove() -> Result<()> {
        removal()
            .apply()
            .map_err(|e| e.context("ip-masq: removing table inet weft_node"))
    }
}

/// `add table` + `delete table`: succeeds whether or not the table exists.
fn removal() -> Transaction {
    let t = table();
    let mut tx = Transaction::new();
    tx.add_table(FAMILY, &t, None).delete_table(FAMILY, &t);
    tx
}

/// One chain's rules against the listing: missing (by comment), changed, unexpected,
/// out of order.
fn diff_rules(chain: &str, specs: &[Spec], got: &[&ListedRule], problems: &mut Vec<String>) {
    let before = problems.len();
    let mut matched = vec![false; got.len()];
    for s in specs {
        let want = s.body.to_string();
        let found = got
            .iter()
            .enumerate()
            .find(|(i, r)| !matched[*i] && r.comment.as_deref() == Some(s.comment.as_str()));
        match found {
            None => problems.push(format!(
                "chain {chain}: rule \"{}\" is missing (`{want}`)",
                s.comment
            )),
            Some((i, r)) => {
                matched[i] = true;
                if r.body != want {
                    problems.push(format!(
                        "chain {chain}: rule \"{}\" is `{}`, expected `{want}`",
                        s.comment, r.body
                    ));
                }
            }
        }
    }
    for (r, m) in got.iter().zip(&matched) {
        if !m {
            let comment = r
                .comment
                .as_deref()
                .map(|c| format!(" comment \"{c}\""))
                .unwrap_or_default();
            problems.push(format!(
                "chain {chain}: unexpected rule (handle {}): `{}`{comment}",
                r.handle, r.body
            ));
        }
    }
    if problems.len() == before {
        let order: Vec<&str> = got.iter().filter_map(|r| r.comment.as_deref()).collect();
        let want: Vec<&str> = specs.iter().map(|s| s.comment.as_str()).collect();
        if order != want {
            problems.push(format!("chain {chain}: rules are out of order"));
        }
    }
}

/// A base chain as we compare it: `type nat hook postrouting prio 100 policy accept`.
fn base_text(b: &BaseChain) -> String {
    let (kind, hook, prio) = match (b.kind, b.hook) {
        (ChainType::Nat, Hook::Postrouting) => ("nat", "postrouting", 100),
        (ChainType::Filter, Hook::Forward) => ("filter", "forward", 0),
        _ => unreachable!("only our two base chains"),
    };
    let policy = match b.policy {
        Policy::Accept => "accept",
        Policy::Drop => "drop",
    };
    format!("type {kind} hook {hook} prio {prio} policy {policy}")
}

struct ListedChain {
    name: String,
    /// [`base_text`]'s form; `regular chain` for a chain without a hook.
    base: String,
}

struct ListedRule {
    chain: String,
    handle: u64,
    comment: Option<String>,
    /// [`render_rule`]'s form.
    body: String,
}

/// The parts of `nft -j list table` that [`NodeMasq::check`] compares.
struct Listed {
    chains: Vec<ListedChain>,
    rules: Vec<ListedRule>,
    /// Objects that have no business in our table (sets, maps, flowtables, …).
    others: Vec<String>,
}

impl Listed {
    fn parse(text: &str) -> std::result::Result<Listed, String> {
        let doc: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("parsing `nft -j list table` output: {e}"))?;
        let items = doc
            .get("nftables")
            .and_then(|v| v.as_array())
            .ok_or("`nft -j list table` output has no \"nftables\" array")?;
        let s =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let mut l = Listed {
            chains: Vec::new(),
            rules: Vec::new(),
            others: Vec::new(),
        };
        for item in items {
            let Some((kind, v)) = item.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            match kind.as_str() {
                "metainfo" | "table" => {}
                "chain" => {
                    let base = match s(v, "type") {
                        Some(kind) => format!(
                            "type {kind} hook {} prio {} policy {}",
                            s(v, "hook").unwrap_or_default(),
                            v.get("prio").map(|p| p.to_string()).unwrap_or_default(),
                            s(v, "policy").unwrap_or_default()
                        ),
                        None => "regular chain".into(),
                    };
                    l.chains.push(ListedChain {
                        name: s(v, "name").unwrap_or_default(),
                        base,
                    });
                }
                "rule" => l.rules.push(ListedRule {
                    chain: s(v, "chain").unwrap_or_default(),
                    handle: v.get("handle").and_then(|h| h.as_u64()).unwrap_or(0),
                    comment: s(v, "comment"),
                    body: render_rule(
                        v.get("expr")
                            .and_then(|e| e.as_array())
                            .map(Vec::as_slice)
                            .unwrap_or_default(),
                    ),
                }),
                other => l.others.push(format!(
                    "unexpected {other} {}",
                    s(v, "name").unwrap_or_default()
                )),
            }
        }
        Ok(l)
    }
}

/// nft's JSON for the rule shapes we generate, back to our text (so equal rules give
/// equal strings); anything else comes out as JSON, so it never compares equal.
fn render_rule(expr: &[serde_json::Value]) -> String {
    expr.iter()
        .map(|e| render_expr(e).unwrap_or_else(|| e.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn render_expr(e: &serde_json::Value) -> Option<String> {
    let (kind, v) = e.as_object().filter(|o| o.len() == 1)?.iter().next()?;
    match kind.as_str() {
        "return" | "accept" | "drop" | "continue" if v.is_null() => Some(kind.clone()),
        "jump" | "goto" => Some(format!("{kind} {}", v.get("target")?.as_str()?)),
        "masquerade" => {
            if v.is_null() {
                return Some("masquerade".into());
            }
            let o = v.as_object()?;
            if o.len() != 1 {
                return None;
            }
            let flags = match o.get("flags")? {
                serde_json::Value::String(f) => f.clone(),
                serde_json::Value::Array(fs) => fs
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Option<Vec<_>>>()?
                    .join(","),
                _ => return None,
            };
            Some(format!("masquerade {flags}"))
        }
        "match" => {
            let op = v.get("op")?.as_str()?;
            let left = v.get("left")?;
            let right = v.get("right")?;
            if let Some(p) = left.get("payload") {
                let field = format!(
                    "{} {}",
                    p.get("protocol")?.as_str()?,
                    p.get("field")?.as_str()?
                );
                let net = Value::Net(render_net(right)?);
                return match op {
                    "==" => Some(format!("{field} {net}")),
                    "!=" => Some(format!("{field} != {net}")),
                    _ => None,
                };
            }
            // `meta mark & 0x00004000 == 0x00004000`
            let and = left.get("&")?.as_array()?;
            let [m, mask] = and.as_slice() else {
                return None;
            };
            let key = m.get("meta")?.get("key")?.as_str()?;
            Some(format!(
                "meta {key} & {} {op} {}",
                Value::Hex(mask.as_u64()?),
                Value::Hex(right.as_u64()?)
            ))
        }
        _ => None,
    }
}

/// `"10.1.0.5"` (a host) or `{"prefix": {"addr": "10.1.0.0", "len": 24}}`.
fn render_net(v: &serde_json::Value) -> Option<IpNet> {
    if let Some(a) = v.as_str() {
        let a: IpAddr = a.parse().ok()?;
        return IpNet::new(a, if a.is_ipv4() { 32 } else { 128 }).ok();
    }
    let pre = v.get("prefix")?;
    let a: IpAddr = pre.get("addr")?.as_str()?.parse().ok()?;
    IpNet::new(a, u8::try_from(pre.get("len")?.as_u64()?).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> NodeMasq {
        NodeMasq {
            network_v4: Some("10.244.0.0/16".parse().unwrap()),
            subnet_v4: Some("10.244.1.0/24".parse().unwrap()),
            fully_random: true,
            forward_rules: true,
            masquerade: true,
            ..NodeMasq::default()
        }
    }

    fn dual() -> NodeMasq {
        NodeMasq {
            network_v6: Some("fd00:10:244::/56".parse().unwrap()),
            subnet_v6: Some("fd00:10:244:1::/64".parse().unwrap()),
            ..v4()
        }
    }

    #[test]
    fn v4_text() {
        let nm = v4();
        nm.validate().unwrap();
        insta::assert_snapshot!(nm.transaction().to_string());
    }

    #[test]
    fn dual_stack_text() {
        let nm = dual();
        nm.validate().unwrap();
        insta::assert_snapshot!(nm.transaction().to_string());
    }

    #[test]
    fn not_fully_random_text() {
        let nm = NodeMasq {
            fully_random: false,
            forward_rules: false,
            // Host bits are ignored.
            subnet_v4: Some("10.244.1.7/24".parse().unwrap()),
            ..v4()
        };
        nm.validate().unwrap();
        let text = nm.transaction().to_string();
        assert!(!text.contains("fully-random") && !text.contains("chain inet weft_node forward"));
        insta::assert_snapshot!(text);
    }

    #[test]
    fn forward_only_text() {
        let nm = NodeMasq {
            masquerade: false,
            subnet_v4: None,
            ..v4()
        };
        nm.validate().unwrap();
        insta::assert_snapshot!(nm.transaction().to_string());
    }

    #[test]
    fn both_off_is_the_removal() {
        let nm = NodeMasq {
            masquerade: false,
            forward_rules: false,
            ..dual()
        };
        nm.validate().unwrap();
        NodeMasq::default().validate().unwrap();
        insta::assert_snapshot!(nm.transaction().to_string(), @r"
        add table inet weft_node
        delete table inet weft_node
        ");
        assert_eq!(
            nm.transaction().to_string(),
            NodeMasq::default().transaction().to_string()
        );
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let err = |nm: NodeMasq| {
            let e = nm.validate().unwrap_err();
            assert_eq!(e.code, 7, "{e:?}");
            e.msg
        };
        let m = err(NodeMasq {
            subnet_v4: Some("10.245.1.0/24".parse().unwrap()),
            ..v4()
        });
        assert_eq!(
            m,
            "ip-masq: this node's IPv4 subnet 10.245.1.0/24 is not inside the IPv4 network 10.244.0.0/16"
        );
        // A subnet wider than its network is not inside it either.
        let m = err(NodeMasq {
            subnet_v4: Some("10.0.0.0/8".parse().unwrap()),
            ..v4()
        });
        assert!(m.contains("not inside"), "{m}");
        let m = err(NodeMasq {
            subnet_v6: Some("fd00:10:245:1::/64".parse().unwrap()),
            ..dual()
        });
        assert!(
            m.contains("IPv6 subnet fd00:10:245:1::/64 is not inside"),
            "{m}"
        );
        let m = err(NodeMasq {
            subnet_v4: None,
            ..v4()
        });
        assert!(
            m.contains("masquerading needs this node's IPv4 subnet"),
            "{m}"
        );
        let m = err(NodeMasq {
            network_v4: None,
            ..v4()
        });
        assert!(m.contains("without an IPv4 network"), "{m}");
        let m = err(NodeMasq {
            network_v4: None,
            subnet_v4: None,
            ..v4()
        });
        assert!(m.contains("need an IPv4 or IPv6 network"), "{m}");
        // check() refuses too, before listing anything.
        let bad = NodeMasq {
            subnet_v4: Some("10.245.1.0/24".parse().unwrap()),
            ..v4()
        };
        assert!(bad.check().unwrap_err().contains("not inside"));
        // Valid: a v6-only node, a subnet without masquerade (ignored).
        NodeMasq {
            network_v4: None,
            subnet_v4: None,
            ..dual()
        }
        .validate()
        .unwrap();
        NodeMasq {
            masquerade: false,
            ..v4()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn every_rule_has_a_unique_comment() {
        for nm in [
            dual(),
            NodeMasq {
                fully_random: false,
                ..dual()
            },
        ] {
            for (chain, _, specs) in nm.chains() {
                let mut seen = Vec::new();
                for s in &specs {
                    assert_eq!(Comment::new(&s.comment).as_str(), s.comment, "{chain}");
                    assert!(!seen.contains(&s.comment), "{chain}: {}", s.comment);
                    seen.push(s.comment.clone());
                }
            }
        }
    }

    /// What `nft -j list table inet weft_node` (nft 1.0.6) prints for `nm`'s table,
    /// built the way nft builds it.
    fn listing(nm: &NodeMasq) -> serde_json::Value {
        let mut items = vec![
            serde_json::json!({"metainfo": {"version": "1.0.6", "json_schema_version": 1}}),
            serde_json::json!({"table": {"family": "inet", "name": TABLE, "handle": 1}}),
        ];
        let mut handle = 1;
        let mut rules = Vec::new();
        for (name, _, specs) in nm.chains() {
            let (kind, hook, prio) = if name == POSTRTG {
                ("nat", "postrouting", 100)
            } else {
                ("filter", "forward", 0)
            };
            handle += 1;
            items.push(
                serde_json::json!({"chain": {"family": "inet", "table": TABLE,
                "name": name, "handle": handle, "type": kind, "hook": hook, "prio": prio,
                "policy": "accept"}}),
            );
            for s in &specs {
                handle += 1;
                rules.push(
                    serde_json::json!({"rule": {"family": "inet", "table": TABLE,
                    "chain": name, "handle": handle, "comment": s.comment,
                    "expr": expr_of(&s.body.to_string())}}),
                );
            }
        }
        items.extend(rules);
        serde_json::json!({ "nftables": items })
    }

    /// nft's JSON for our rule texts (a tiny parser for the shapes we generate).
    fn expr_of(text: &str) -> Vec<serde_json::Value> {
        let w: Vec<&str> = text.split(' ').collect();
        let mut out = Vec::new();
        let mut i = 0;
        let net = |s: &str| {
            let n: IpNet = s.parse().unwrap();
            serde_json::json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}})
        };
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        while i < w.len() {
            match w[i] {
                "ip" | "ip6" => {
                    let neg = w[i + 2] == "!=";
                    let val = if neg { w[i + 3] } else { w[i + 2] };
                    out.push(
                        serde_json::json!({"match": {"op": if neg { "!=" } else { "==" },
                        "left": {"payload": {"protocol": w[i], "field": w[i + 1]}},
                        "right": net(val)}}),
                    );
                    i += if neg { 4 } else { 3 };
                }
                "meta" => {
                    out.push(serde_json::json!({"match": {"op": w[i + 4],
                        "left": {"&": [{"meta": {"key": w[i + 1]}}, hex(w[i + 3])]},
                        "right": hex(w[i + 5])}}));
                    i += 6;
                }
                "masquerade" if w.get(i + 1) == Some(&"fully-random") => {
                    out.push(serde_json::json!({"masquerade": {"flags": "fully-random"}}));
                    i += 2;
                }
                "masquerade" => {
                    out.push(serde_json::json!({"masquerade": null}));
                    i += 1;
                }
                v => {
                    out.push(serde_json::json!({ (v): null }));
                    i += 1;
                }
            }
        }
        out
    }

    fn diff(nm: &NodeMasq, l: &serde_json::Value) -> Vec<String> {
        nm.diff(Some(&l.to_string()))
    }

    #[test]
    fn listed_rules_render_like_ours() {
        let nm = dual();
        let l = listing(&nm);
        let parsed = Listed::parse(&l.to_string()).unwrap();
        let want: Vec<String> = nm
            .chains()
            .iter()
            .flat_map(|(_, _, specs)| specs.iter().map(|s| s.body.to_string()))
            .collect();
        let got: Vec<String> = parsed.rules.iter().map(|r| r.body.clone()).collect();
        assert_eq!(got, want);
        assert!(diff(&nm, &l).is_empty(), "{:?}", diff(&nm, &l));
        // A verbatim rule of nft 1.0.6 (masquerade with flags, a host address).
        let real = serde_json::json!([
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                "right": {"prefix": {"addr": "fd00:10:244::", "len": 56}}}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                "right": "10.1.0.5"}},
            {"masquerade": {"flags": ["fully-random", "persistent"]}},
            {"counter": {"packets": 0, "bytes": 0}}]);
        assert_eq!(
            render_rule(real.as_array().unwrap()),
            "ip6 saddr != fd00:10:244::/56 ip daddr 10.1.0.5/32 \
             masquerade fully-random,persistent {\"counter\":{\"packets\":0,\"bytes\":0}}"
        );
    }

    #[test]
    fn check_reports_what_differs() {
        let nm = v4();
        assert_eq!(
            nm.diff(None),
            ["table inet weft_node does not exist".to_string()]
        );
        let off = NodeMasq {
            masquerade: false,
            forward_rules: false,
            ..v4()
        };
        assert!(off.diff(None).is_empty());
        assert!(off.diff(Some(&listing(&nm).to_string()))[0].contains("are off"));

        // A rule deleted by hand: named by its comment.
        let mut l = listing(&nm);
        let items = l["nftables"].as_array_mut().unwrap();
        let gone = items
            .iter()
            .position(|i| {
                i["rule"]["comment"]
                    .as_str()
                    .is_some_and(|c| c.contains("outside to node pods"))
            })
            .unwrap();
        items.remove(gone);
        let d = diff(&nm, &l);
        assert_eq!(
            d,
            [
                "chain postrtg: rule \"weft ip-masq v4: outside to node pods, keep source\" is missing \
              (`ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return`)"
            ]
        );

        // A changed rule, an extra rule, a changed policy, a foreign set and chain.
        let mut l = listing(&nm);
        let items = l["nftables"].as_array_mut().unwrap();
        for i in items.iter_mut() {
            if i["rule"]["comment"]
                .as_str()
                .is_some_and(|c| c.contains("to outside"))
            {
                i["rule"]["expr"][2] = serde_json::json!({"masquerade": null});
            }
            if i["chain"]["name"] == FORWARD {
                i["chain"]["policy"] = "drop".into();
            }
        }
        items.push(
            serde_json::json!({"rule": {"chain": FORWARD, "handle": 99, "expr": [{"drop": null}]}}),
        );
        items.push(serde_json::json!({"set": {"name": "s", "type": "ipv4_addr"}}));
        items.push(serde_json::json!({"chain": {"name": "x", "handle": 98}}));
        items.push(
            serde_json::json!({"rule": {"chain": "x", "handle": 97, "expr": [{"accept": null}]}}),
        );
        let d = diff(&nm, &l);
        assert_eq!(
            d,
            [
                "chain postrtg: rule \"weft ip-masq v4: cluster network to outside but multicast, masquerade\" \
                 is `ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade`, \
                 expected `ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random`",
                "chain forward is `type filter hook forward prio 0 policy drop`, \
                 expected `type filter hook forward prio 0 policy accept`",
                "chain forward: unexpected rule (handle 99): `drop`",
                "unexpected chain x",
                "unexpected rule in chain x (handle 97): `accept`",
                "unexpected set s",
            ]
        );

        // Swapped rules: only the order differs.
        let mut l = listing(&nm);
        let items = l["nftables"].as_array_mut().unwrap();
        let first = items
            .iter()
            .position(|i| i["rule"]["chain"] == POSTRTG)
            .unwrap();
        items.swap(first, first + 1);
        assert_eq!(diff(&nm, &l), ["chain postrtg: rules are out of order"]);

        // A chain no longer wanted, one missing.
        let fwd_only = NodeMasq {
            masquerade: false,
            ..v4()
        };
        let d = diff(&fwd_only, &listing(&nm));
        assert_eq!(d.len(), 7, "{d:?}");
        assert_eq!(d[0], "unexpected chain postrtg");
        let d = diff(&nm, &listing(&fwd_only));
        assert_eq!(d, ["chain postrtg is missing"]);
    }
}
