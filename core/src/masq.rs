//! Per-pod IP masquerade for the bridge plugin's `ipMasq`, on nftables: one
//! listing-free `nft` run per ADD and per DEL whatever the number of pods, and
//! nothing left behind.
//!
//! # Semantics (as the reference bridge plugin)
//! Traffic *from* a pod address to anything outside that address's subnet, and not
//! to multicast (`224.0.0.0/4`, `ff00::/8`), is masqueraded; traffic to the subnet
//! is not. Each address exempts exactly its own subnet (the reference shares one
//! chain per container, so a second subnet's exemption lands after its MASQUERADE
//! rule and does nothing).
//!
//! # Layout: everything in our own table, `inet weft_masq`
//! ```text
//! table inet weft_masq {
//!   map pods_v4   { type ipv4_addr : verdict                    # source → its network's chain
//!                   elements = { 10.1.0.5 comment "net:N id:C if:eth0" : jump masq-<h(N)>-<h(v1, 10.1.0.0/24)> } }
//!   map owners_v4 { type ipv4_addr : mark . mark . mark . mark  # source → owning attachment
//!                   elements = { 10.1.0.5 : <h64(N)> . <h64(C, eth0)> } }
//!   map pods_v6, owners_v6 { the same for IPv6 }
//!   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr vmap @pods_v4
//!     ip6 saddr vmap @pods_v6 }
//!   chain masq-<h(N)>-<h(v1, 10.1.0.0/24)> {  # one per (network, subnet), shared by its pods
//!     comment "net:N subnet:10.1.0.0/24"
//!     ip daddr 10.1.0.0/24 return
//!     ip daddr 224.0.0.0/4 return
//!     masquerade }
//! }
//! ```
//! (`h` is FNV-1a 64, [`nft::hash64`], as 16 hex digits in names and as two 32-bit
//! marks in owner values; `v1` is the chain layout version.)
//! Other tables (kube-proxy's, iptables-nft's `ip nat`) are never read or written. The
//! base chain only jumps (policy accept); a packet from a non-pod source costs one
//! hash lookup.
//!
//! # Why an owner map
//! A DEL must never remove the element of *another* pod that has been given the
//! same address since (a runtime repeating an old pod's DEL with its address), and
//! must work without any address at all. A map value is compared by nft on `add`
//! (EEXIST when it differs; a no-op when equal), so a guarded delete is atomic and
//! listing-free:
//! ```text
//! add element inet weft_masq owners_v4 { 10.1.0.5 : <ours> }   # EEXIST: not ours -> skip
//! delete element inet weft_masq owners_v4 { 10.1.0.5 }
//! delete element inet weft_masq pods_v4 { 10.1.0.5 }           # ENOENT: already gone -> skip
//! ```
//! Element comments cannot do this (nft ignores them when comparing), and reading a
//! comment back costs `nft get element`, which nft 1.0.6 implements by loading the
//! whole map (O(N)). A chain per *attachment* (owner in the jump target) was tried
//! first and measured: nft loads every chain into its cache for `add rule`/`add chain`
//! and even for `add element … : jump`, so ADD grew from 3.5 ms to ~22 ms at 5,000 pods.
//! With one chain per network and subnet the chain count stays tiny.
//!
//! # Costs (nft 1.0.6; see [`crate::nft`] for the measurements behind them)
//! - **ADD** (hot path): `add element` into `pods_*` and `owners_*`, one run that only
//!   adds: ~3.5 ms, flat in the number of pods. If it fails — the table, a map or the
//!   network's chain is missing (first ADD on the node or of the network), or an
//!   address is still held by another attachment — a repair run ensures the base
//!   objects, (re)builds the network's chain (`add chain` + `flush chain` + rules, so
//!   `add rule` is never repeated) and adds the elements (~20 ms: it flushes). An
//!   address held by another attachment is taken over (its elements deleted first,
//!   with a warning): IPAM gave it to us, so the other holder is dead.
//! - **DEL with addresses** (prevResult or the interface): one run of guarded deletes,
//!   ~17 ms (every deletion costs the kernel an RCU grace period), flat in N; pieces
//!   already gone or owned by someone else are dropped and the rest retried, so DEL is
//!   idempotent.
//! - **DEL without addresses**, **CHECK**, **GC**: one `nft -j list table inet weft_masq`
//!   (O(N) elements) plus, for DEL/GC, one deleting run.
//! - ADD trusts an existing network chain and base chain (verifying them would need a
//!   listing): [`check`] reports tampering, [`ensure_network`] repairs it.
//! - Network chains, the table, maps and base chain are never deleted by DEL (other
//!   pods share them); GC deletes the chains of its network that no pod uses.
//!
//! FNV-1a is not collision resistant: someone who can choose container IDs could make
//! one whose owner value equals another attachment's on the same network. Runtimes
//! generate container IDs, so this is accepted.

use crate::error::{CniError, Result, code};
use crate::nft::{
    self, BaseChain, ChainType, Comment, Element, ErrorKind, Family, Hook, Ident, Listing, Policy,
    Priority, Rule, SetDecl, Transaction, Value, Verdict,
};
use ipnet::IpNet;
use std::collections::HashSet;
use std::net::IpAddr;

/// The table (family `inet`) holding everything of ipMasq.
pub const TABLE: &str = "weft_masq";
/// Verdict map: IPv4 source address → `jump <network chain>`.
pub const PODS_V4: &str = "pods_v4";
/// Verdict map: IPv6 source address → `jump <network chain>`.
pub const PODS_V6: &str = "pods_v6";
/// Data map: IPv4 source address → owner (`mark . mark . mark . mark`).
pub const OWNERS_V4: &str = "owners_v4";
/// Data map: IPv6 source address → owner.
pub const OWNERS_V6: &str = "owners_v6";
/// The base chain (nat, hook postrouting, priority srcnat).
pub const BASE_CHAIN: &str = "postrouting";
/// Network chains are `masq-<16 hex: network>-<16 hex: layout version, subnet>`.
pub const CHAIN_PREFIX: &str = "masq";

const FAMILY: Family = Family::Inet;
const TABLE_COMMENT: &str = "weft bridge ipMasq - managed by weft, do not edit";
/// The value type of an owners map: two 64-bit hashes as four marks.
pub const OWNER_TYPE: &str = "mark . mark . mark . mark";
/// Hashed into network chain names: a release that changes [`chain_rules`] bumps it,
/// so its pods jump to new chains instead of trusting old ones.
const CHAIN_LAYOUT: &str = "v1";

fn table() -> Ident {
    Ident::constant(TABLE)
}

fn pods_map(ip: &IpAddr) -> Ident {
    Ident::constant(if ip.is_ipv4() { PODS_V4 } else { PODS_V6 })
}

fn owners_map(ip: &IpAddr) -> Ident {
    Ident::constant(if ip.is_ipv4() { OWNERS_V4 } else { OWNERS_V6 })
}

/// Whom a masquerade belongs to: the CNI attachment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment<'a> {
    pub network: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
}

/// The value of an `owners_*` element: `hash64(network)` and `hash64(container ID,
/// ifname)`, each as two 32-bit halves, high first.
pub type Owner = [u32; 4];

fn halves(h: u64) -> [u32; 2] {
    [(h >> 32) as u32, h as u32]
}

fn network_halves(network: &str) -> [u32; 2] {
    halves(nft::hash64(&[network]))
}

impl<'a> Attachment<'a> {
    pub fn new(network: &'a str, container_id: &'a str, ifname: &'a str) -> Self {
        Attachment {
            network,
            container_id,
            ifname,
        }
    }

    pub fn owner(&self) -> Owner {
        let [a, b] = network_halves(self.network);
        let [c, d] = halves(nft::hash64(&[self.container_id, self.ifname]));
        [a, b, c, d]
    }

    fn owner_value(&self) -> Value {
        owner_value(&self.owner())
    }

    /// `net:<network> id:<container ID> if:<ifname>`, sanitized, at most 128 bytes.
    pub fn comment(&self) -> Comment {
        Comment::new(&format!(
            "{}id:{} if:{}",
            Self::network_comment_prefix(self.network),
            self.container_id,
            self.ifname
        ))
    }

    /// How every [`comment`](Self::comment) of `network`'s attachments starts.
    pub fn network_comment_prefix(network: &str) -> String {
        format!("net:{network} ")
    }
}

/// The prefix of every chain of `network`: `masq-<hash(network)>-`.
pub fn network_chain_prefix(network: &str) -> String {
    format!("{CHAIN_PREFIX}-{}-", nft::hash_hex(&[network]))
}

/// The chain of one subnet of `network` (host bits of `subnet` are ignored):
/// `masq-<hash(network)>-<hash(layout version, subnet)>`.
pub fn network_chain(network: &str, subnet: &IpNet) -> Ident {
    Ident::constant(&format!(
        "{}{}",
        network_chain_prefix(network),
        nft::hash_hex(&[CHAIN_LAYOUT, &subnet.trunc().to_string()])
    ))
}

/// Unique addresses, each with the prefix of its first occurrence.
fn unique(ips: &[IpNet]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = Vec::new();
    for ip in ips {
        if !out.iter().any(|o| o.addr() == ip.addr()) {
            out.push(*ip);
        }
    }
    out
}

/// A network chain's rules: its subnet and multicast are exempt, the rest is
/// masqueraded.
pub fn chain_rules(subnet: &IpNet) -> Vec<Rule> {
    let (daddr, mc) = if subnet.addr().is_ipv4() {
        ("ip daddr", "224.0.0.0/4")
    } else {
        ("ip6 daddr", "ff00::/8")
    };
    let mc: IpNet = mc.parse().expect("constant");
    vec![
        Rule::new()
            .kw(daddr)
            .value(subnet.trunc())
            .verdict(&Verdict::Return),
        Rule::new().kw(daddr).value(mc).verdict(&Verdict::Return),
        Rule::new().kw("masquerade"),
    ]
}

/// The table, the four maps and the base chain with its two lookups. Idempotent and
/// atomic (it repairs a tampered base chain); ~20 ms since it re-declares and flushes
/// a base chain, so ADD runs it only when its fast path failed.
pub fn ensure_tx() -> Transaction {
    let t = table();
    let base = Ident::constant(BASE_CHAIN);
    let mut tx = Transaction::new();
    tx.add_table(FAMILY, &t, Some(&Comment::new(TABLE_COMMENT)))
        .add_set(
            FAMILY,
            &t,
            &Ident::constant(PODS_V4),
            &SetDecl::map("ipv4_addr", "verdict"),
        )
        .add_set(
            FAMILY,
            &t,
            &Ident::constant(PODS_V6),
            &SetDecl::map("ipv6_addr", "verdict"),
        )
        .add_set(
            FAMILY,
            &t,
            &Ident::constant(OWNERS_V4),
            &SetDecl::map("ipv4_addr", OWNER_TYPE),
        )
        .add_set(
            FAMILY,
            &t,
            &Ident::constant(OWNERS_V6),
            &SetDecl::map("ipv6_addr", OWNER_TYPE),
        )
        .rebuild_chain(
            FAMILY,
            &t,
            &base,
            Some(&BaseChain {
                kind: ChainType::Nat,
                hook: Hook::Postrouting,
                priority: Priority::SrcNat,
                policy: Policy::Accept,
            }),
            None,
            &[
                Rule::new()
                    .kw("ip saddr vmap")
                    .set_ref(&Ident::constant(PODS_V4)),
                Rule::new()
                    .kw("ip6 saddr vmap")
                    .set_ref(&Ident::constant(PODS_V6)),
            ],
        );
    tx
}

fn add_elements(tx: &mut Transaction, att: &Attachment<'_>, ips: &[IpNet]) {
    let t = table();
    let ips = unique(ips);
    for v4 in [true, false] {
        let mine: Vec<&IpNet> = ips.iter().filter(|n| n.addr().is_ipv4() == v4).collect();
        let Some(first) = mine.first() else { continue };
        let pods: Vec<Element> = mine
            .iter()
            .map(|n| {
                Element::new(n.addr())
                    .comment(att.comment())
                    .verdict(Verdict::Jump(network_chain(att.network, n)))
            })
            .collect();
        // No comment here: the pods element has it, and listings stay smaller.
        let owners: Vec<Element> = mine
            .iter()
            .map(|n| Element::new(n.addr()).value(att.owner_value()))
            .collect();
        let addr = first.addr();
        tx.add_elements(FAMILY, &t, &pods_map(&addr), &pods)
            .add_elements(FAMILY, &t, &owners_map(&addr), &owners);
    }
}

/// ADD's fast path: two `add element` statements per family, nothing else. Fails
/// atomically with ENOENT when the table, a map or the network's chain is missing,
/// and with EEXIST when an address is held by another attachment or chain.
pub fn add_tx(att: &Attachment<'_>, ips: &[IpNet]) -> Transaction {
    let mut tx = Transaction::new();
    add_elements(&mut tx, att, ips);
    tx
}

/// Ensure the base objects and (re)build the chains of `network` for `subnets`
/// (`add chain` + `flush chain` + its rules: idempotent, atomic, repairs tampering).
pub fn ensure_network_tx(network: &str, subnets: &[IpNet]) -> Transaction {
    let t = table();
    let mut tx = ensure_tx();
    let mut done: Vec<IpNet> = Vec::new();
    for subnet in subnets.iter().map(IpNet::trunc) {
        if done.contains(&subnet) {
            continue;
        }
        done.push(subnet);
        let chain = network_chain(network, &subnet);
        let comment = Comment::new(&format!("net:{network} subnet:{subnet}"));
        tx.rebuild_chain(
            FAMILY,
            &t,
            &chain,
            None,
            Some(&comment),
            &chain_rules(&subnet),
        );
    }
    tx
}

/// ADD's repair path: [`ensure_network_tx`] for the attachment's subnets, then the
/// elements.
pub fn add_repair_tx(att: &Attachment<'_>, ips: &[IpNet]) -> Transaction {
    let mut tx = ensure_network_tx(att.network, ips);
    add_elements(&mut tx, att, ips);
    tx
}

/// Unconditional removal of whatever holds `addrs` (for
/// [`Transaction::apply_ignoring`] `NotFound`): the takeover of addresses IPAM has
/// given to a new attachment.
pub fn takeover_tx(addrs: &[IpAddr]) -> Transaction {
    let t = table();
    let mut tx = Transaction::new();
    for ip in addrs {
        tx.delete_elements(FAMILY, &t, &pods_map(ip), &[Value::Addr(*ip)])
            .delete_elements(FAMILY, &t, &owners_map(ip), &[Value::Addr(*ip)]);
    }
    tx
}

/// An owner as the value of an `owners_*` element.
pub fn owner_value(owner: &Owner) -> Value {
    Value::Concat(owner.iter().map(|h| Value::Hex(u64::from(*h))).collect())
}

/// One unit: the `add` of `owner`'s element is a no-op if the address is `owner`'s and
/// fails with EEXIST if it is someone else's, so both deletions happen only for the
/// owner. `with_pods: false` when a listing showed no pods element (an owner element
/// left alone, only by tampering), which would otherwise fail the unit with ENOENT.
fn guarded_delete(tx: &mut Transaction, ip: &IpAddr, owner: &Owner, with_pods: bool) {
    let t = table();
    let (pods, owners) = (pods_map(ip), owners_map(ip));
    tx.group(|tx| {
        tx.add_elements(
            FAMILY,
            &t,
            &owners,
            &[Element::new(*ip).value(owner_value(owner))],
        )
        .delete_elements(FAMILY, &t, &owners, &[Value::Addr(*ip)]);
        if with_pods {
            tx.delete_elements(FAMILY, &t, &pods, &[Value::Addr(*ip)]);
        }
    });
}

/// DEL: for each address, a guarded delete (one unit): `add` of our owner element
/// (a no-op if present, EEXIST if the address is someone else's), then the deletion
/// of both elements. Meant for [`Transaction::apply_ignoring`] with `NotFound`
/// (already gone) and `Exists` (not ours).
pub fn del_tx(att: &Attachment<'_>, addrs: &[IpAddr]) -> Transaction {
    del_tx_with(att, addrs, |_| true)
}

fn del_tx_with(
    att: &Attachment<'_>,
    addrs: &[IpAddr],
    has_pods: impl Fn(&IpAddr) -> bool,
) -> Transaction {
    let owner = att.owner();
    let mut tx = Transaction::new();
    let mut seen = Vec::new();
    for ip in addrs {
        if !seen.contains(ip) {
            seen.push(*ip);
            guarded_delete(&mut tx, ip, &owner, has_pods(ip));
        }
    }
    tx
}

fn setup_err(e: impl Into<CniError>) -> CniError {
    e.into().context("ipMasq")
}

/// Create the table, maps and base chain if needed (e.g. once from an agent).
/// [`add`] does this itself when it has to.
pub fn ensure() -> Result<()> {
    ensure_tx().apply().map_err(setup_err)
}

/// Create or repair the base objects and the chains of `network` for `subnets`.
/// [`add`] trusts an existing network chain (checking it would need a listing), so
/// this is the repair after [`check`] found one tampered with; ~20 ms.
pub fn ensure_network(network: &str, subnets: &[IpNet]) -> Result<()> {
    ensure_network_tx(network, subnets)
        .apply()
        .map_err(setup_err)
}

/// Masquerade traffic from `ips` (addresses with their subnet's prefix) of this
/// attachment. Idempotent; an address still held by another (dead) attachment is
/// taken over. No addresses: nothing to do.
pub fn add(network: &str, container_id: &str, ifname: &str, ips: &[IpNet]) -> Result<()> {
    if ips.is_empty() {
        return Ok(());
    }
    let att = Attachment::new(network, container_id, ifname);
    match add_tx(&att, ips).try_apply() {
        Ok(()) => return Ok(()),
        Err(e) if e.only(&[ErrorKind::NotFound, ErrorKind::Exists]) => {
            crate::debug!("ipMasq fast path for {att:?}: {e}; repairing");
        }
        Err(e) => return Err(setup_err(e)),
    }
    let repair = add_repair_tx(&att, ips);
    match repair.try_apply() {
        Ok(()) => return Ok(()),
        Err(e) if e.only(&[ErrorKind::Exists]) => {
            crate::warn!(
                "ipMasq: an address of {att:?} was still held by another attachment \
                 (a DEL that never came); taking it over: {e}"
            );
        }
        Err(e) => return Err(setup_err(e)),
    }
    let addrs: Vec<IpAddr> = unique(ips).iter().map(IpNet::addr).collect();
    takeover_tx(&addrs)
        .apply_ignoring(&[ErrorKind::NotFound])
        .map_err(setup_err)?;
    repair.apply().map_err(setup_err)
}

/// Remove this attachment's masquerade. With `ips_hint` (from prevResult or the
/// interface) no listing is needed, and only the named addresses are looked at: pass
/// `None` when the addresses may be incomplete (an address left out stays until a
/// DEL without hint or [`gc`]). Without it the table is listed to find the
/// attachment's addresses. Idempotent; never touches an address now held by another
/// attachment.
pub fn del(
    network: &str,
    container_id: &str,
    ifname: &str,
    ips_hint: Option<&[IpAddr]>,
) -> Result<()> {
    let att = Attachment::new(network, container_id, ifname);
    let tx = match ips_hint {
        Some(hint) => del_tx(&att, hint),
        None => {
            let Some(l) =
                nft::list_table(FAMILY, &table()).map_err(|e| e.context("ipMasq teardown"))?
            else {
                return Ok(());
            };
            let owner = att.owner();
            let addrs: Vec<IpAddr> = owned(&l)
                .into_iter()
                .filter(|(_, o)| *o == owner)
                .map(|(ip, _)| ip)
                .collect();
            let targets = targets(&l);
            del_tx_with(&att, &addrs, |ip| targets.iter().any(|(a, _)| a == ip))
        }
    };
    tx.apply_ignoring(&[ErrorKind::NotFound, ErrorKind::Exists])
        .map(|_| ())
        .map_err(|e| CniError::from(e).context("ipMasq teardown"))
}

fn parse_key(e: &nft::ElementInfo) -> Option<IpAddr> {
    e.key_str()?.parse().ok()
}

/// An `owners_*` element's value back from a listing.
pub fn parse_owner(e: &nft::ElementInfo) -> Option<Owner> {
    let parts = e.data.as_ref()?.get("concat")?.as_array()?;
    let mut out = [0u32; 4];
    if parts.len() != 4 {
        return None;
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u32::try_from(p.as_u64()?).ok()?;
    }
    Some(out)
}

/// Every `(address, owner)` of both owner maps.
fn owned(l: &Listing) -> Vec<(IpAddr, Owner)> {
    [OWNERS_V4, OWNERS_V6]
        .iter()
        .filter_map(|m| l.set(m))
        .flat_map(|s| s.elements.iter())
        .filter_map(|e| Some((parse_key(e)?, parse_owner(e)?)))
        .collect()
}

/// Every `(address, jump target)` of both pods maps.
fn targets(l: &Listing) -> Vec<(IpAddr, String)> {
    [PODS_V4, PODS_V6]
        .iter()
        .filter_map(|m| l.set(m))
        .flat_map(|s| s.elements.iter())
        .filter_map(|e| Some((parse_key(e)?, e.verdict_target()?.1.to_string())))
        .collect()
}

/// nft's JSON for the rule shapes we generate, back to our text; anything else comes
/// out as JSON, so it never compares equal.
fn render_rule(expr: &[serde_json::Value]) -> String {
    let mut parts = Vec::new();
    for e in expr {
        let rendered = (|| -> Option<String> {
            if e.get("masquerade").is_some() {
                return Some("masquerade".into());
            }
            if e.get("return").is_some() {
                return Some("return".into());
            }
            if let Some(v) = e.get("vmap") {
                let p = v.get("key")?.get("payload")?;
                return Some(format!(
                    "{} {} vmap {}",
                    p.get("protocol")?.as_str()?,
                    p.get("field")?.as_str()?,
                    v.get("data")?.as_str()?
                ));
            }
            let m = e.get("match")?;
            if m.get("op")?.as_str()? != "==" {
                return None;
            }
            let p = m.get("left")?.get("payload")?;
            let right = m.get("right")?;
            let net = match right.as_str() {
                Some(a) => {
                    let a: IpAddr = a.parse().ok()?;
                    IpNet::new(a, if a.is_ipv4() { 32 } else { 128 }).ok()?
                }
                None => {
                    let pre = right.get("prefix")?;
                    let a: IpAddr = pre.get("addr")?.as_str()?.parse().ok()?;
                    IpNet::new(a, u8::try_from(pre.get("len")?.as_u64()?).ok()?).ok()?
                }
            };
            Some(format!(
                "{} {} {}",
                p.get("protocol")?.as_str()?,
                p.get("field")?.as_str()?,
                Value::Net(net)
            ))
        })();
        parts.push(rendered.unwrap_or_else(|| e.to_string()));
    }
    parts.join(" ")
}

fn check_failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, format!("ipMasq: {msg}"))
}

/// Verify that this attachment's masquerade is in place: the base chain looks up the
/// needed maps; every address maps to its network chain and is owned by this
/// attachment; the attachment owns no other address; each network chain holds
/// exactly the expected rules. Lists the table. No addresses: Ok.
pub fn check(network: &str, container_id: &str, ifname: &str, ips: &[IpNet]) -> Result<()> {
    if ips.is_empty() {
        return Ok(());
    }
    let att = Attachment::new(network, container_id, ifname);
    let l = nft::list_table(FAMILY, &table())?
        .ok_or_else(|| check_failed(format!("table {FAMILY} {TABLE} does not exist")))?;

    let base = l
        .chain(BASE_CHAIN)
        .ok_or_else(|| check_failed(format!("base chain {BASE_CHAIN} is missing")))?;
    if base.kind.as_deref() != Some("nat") || base.hook.as_deref() != Some("postrouting") {
        return Err(check_failed(format!(
            "chain {BASE_CHAIN} is not a nat postrouting base chain"
        )));
    }
    let base_rules: Vec<String> = l
        .rules_of(BASE_CHAIN)
        .map(|r| render_rule(&r.expr))
        .collect();
    for (v4, want) in [
        (true, format!("ip saddr vmap @{PODS_V4}")),
        (false, format!("ip6 saddr vmap @{PODS_V6}")),
    ] {
        if ips.iter().any(|n| n.addr().is_ipv4() == v4) && !base_rules.contains(&want) {
            return Err(check_failed(format!(
                "chain {BASE_CHAIN} lacks `{want}` (has {base_rules:?})"
            )));
        }
    }

    let ips = unique(ips);
    let (owned, targets) = (owned(&l), targets(&l));
    let owner = att.owner();
    for n in &ips {
        let ip = n.addr();
        let chain = network_chain(network, n);
        match targets.iter().find(|(a, _)| *a == ip) {
            Some((_, t)) if t == chain.as_str() => {}
            Some((_, t)) => {
                return Err(check_failed(format!("{ip} jumps to {t}, expected {chain}")));
            }
            None => {
                return Err(check_failed(format!(
                    "no masquerade element for {ip} ({att:?})"
                )));
            }
        }
        match owned.iter().find(|(a, _)| *a == ip) {
            Some((_, o)) if *o == owner => {}
            Some(_) => {
                return Err(check_failed(format!(
                    "{ip} is owned by another attachment than {att:?}"
                )));
            }
            None => return Err(check_failed(format!("no owner element for {ip}"))),
        }
        if l.chain(chain.as_str()).is_none() {
            return Err(check_failed(format!("chain {chain} is missing")));
        }
        let got: Vec<String> = l
            .rules_of(chain.as_str())
            .map(|r| render_rule(&r.expr))
            .collect();
        let want: Vec<String> = chain_rules(n).iter().map(Rule::to_string).collect();
        if got != want {
            return Err(check_failed(format!(
                "chain {chain} has rules {got:?}, expected {want:?}"
            )));
        }
    }
    if let Some((extra, _)) = owned
        .iter()
        .find(|(a, o)| *o == owner && !ips.iter().any(|n| n.addr() == *a))
    {
        return Err(check_failed(format!(
            "{extra} is also owned by {att:?}, but is not one of its addresses"
        )));
    }
    Ok(())
}

/// Remove the masquerade of every attachment of `network` that is not in `valid`
/// (`(container ID, ifname)` pairs), and the network's chains no address uses any
/// more. Lists the table once and deletes in one run (plus retries for pieces that
/// vanished meanwhile). Returns how many attachments were removed. Other networks are
/// not touched.
pub fn gc(network: &str, valid: &[(&str, &str)]) -> Result<usize> {
    let Some(l) = nft::list_table(FAMILY, &table()).map_err(|e| e.context("ipMasq GC"))? else {
        return Ok(0);
    };
    let (tx, removed) = gc_tx(&l, network, valid);
    tx.apply_ignoring(&[ErrorKind::NotFound, ErrorKind::Exists, ErrorKind::Busy])
        .map_err(|e| CniError::from(e).context("ipMasq GC"))?;
    Ok(removed)
}

/// GC's transaction for a listing, and the number of attachments it removes.
pub fn gc_tx(l: &Listing, network: &str, valid: &[(&str, &str)]) -> (Transaction, usize) {
    let net = network_halves(network);
    let keep: HashSet<Owner> = valid
        .iter()
        .map(|(cid, ifname)| Attachment::new(network, cid, ifname).owner())
        .collect();
    let owned = owned(l);
    let targets = targets(l);
    let mut tx = Transaction::new();
    let mut stale: HashSet<Owner> = HashSet::new();
    let mut freed: HashSet<IpAddr> = HashSet::new();
    for (ip, owner) in &owned {
        if owner[..2] == net && !keep.contains(owner) {
            let with_pods = targets.iter().any(|(a, _)| a == ip);
            guarded_delete(&mut tx, ip, owner, with_pods);
            stale.insert(*owner);
            freed.insert(*ip);
        }
    }
    // Pods elements into this network's chains without any owner (tampering, or
    // state from a version without owners), and the chains nothing uses any more.
    let prefix = network_chain_prefix(network);
    let t = table();
    let mut used: HashSet<&str> = HashSet::new();
    for (ip, target) in &targets {
        if !target.starts_with(&prefix) {
            continue;
        }
        if owned.iter().any(|(a, _)| a == ip) {
            if !freed.contains(ip) {
                used.insert(target);
            }
            continue;
        }
        let Ok(chain) = Ident::new(target.clone()) else {
            continue;
        };
        let map = pods_map(ip);
        tx.group(|tx| {
            tx.add_elements(
                FAMILY,
                &t,
                &map,
                &[Element::new(*ip).verdict(Verdict::Jump(chain))],
            )
            .delete_elements(FAMILY, &t, &map, &[Value::Addr(*ip)]);
        });
    }
    for c in &l.chains {
        if c.name.starts_with(&prefix)
            && !used.contains(c.name.as_str())
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

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn names_and_owners_are_stable() {
        let a = Attachment::new("mynet", CID, "eth0");
        let c = network_chain("mynet", &"10.1.0.5/24".parse().unwrap());
        assert_eq!(c, network_chain("mynet", &"10.1.0.0/24".parse().unwrap()));
        assert_ne!(c, network_chain("mynet", &"10.1.0.0/16".parse().unwrap()));
        assert_ne!(c, network_chain("other", &"10.1.0.0/24".parse().unwrap()));
        assert!(c.as_str().starts_with(&network_chain_prefix("mynet")));
        // Stable across runs and versions: pinned.
        insta::assert_snapshot!(c.as_str(), @"masq-18b1f1418761746b-6e45837240930515");
        assert_eq!(
            a.owner(),
            [0x18b1_f141, 0x8761_746b, 0x1369_be10, 0xbe60_3240]
        );
        assert_ne!(a.owner(), Attachment::new("mynet", CID, "eth1").owner());
        assert_ne!(a.owner(), Attachment::new("other", CID, "eth0").owner());
        // Hostile names never reach the text except through a hash and a sanitized comment.
        let evil = Attachment::new("n\" ; flush ruleset", "x\ny", "e\"0");
        assert_eq!(
            evil.comment().as_str(),
            "net:n_ _ flush ruleset id:x_y if:e_0"
        );
    }

    #[test]
    fn comment_is_truncated_to_nft_limit() {
        let long = "n".repeat(200);
        let a = Attachment::new(&long, CID, "eth0");
        assert_eq!(a.comment().as_str().len(), nft::COMMENT_MAX);
    }

    #[test]
    fn rules_follow_the_reference() {
        let r = |s: &str| -> Vec<String> {
            chain_rules(&s.parse().unwrap())
                .iter()
                .map(Rule::to_string)
                .collect()
        };
        assert_eq!(
            r("10.1.0.5/24"),
            [
                "ip daddr 10.1.0.0/24 return",
                "ip daddr 224.0.0.0/4 return",
                "masquerade"
            ]
        );
        assert_eq!(
            r("fd00::5/64"),
            [
                "ip6 daddr fd00::/64 return",
                "ip6 daddr ff00::/8 return",
                "masquerade"
            ]
        );
    }

    #[test]
    fn ensure_text() {
        insta::assert_snapshot!(ensure_tx().to_string());
    }

    #[test]
    fn add_text() {
        let a = Attachment::new("mynet", CID, "eth0");
        insta::assert_snapshot!(add_tx(&a, &nets(&["10.1.0.5/24"])).to_string());
    }

    #[test]
    fn add_text_dual_stack() {
        let a = Attachment::new("mynet", CID, "eth0");
        let ips = nets(&["10.1.0.5/24", "fd00::5/64", "10.1.0.5/24"]);
        insta::assert_snapshot!(add_tx(&a, &ips).to_string());
    }

    #[test]
    fn add_repair_text() {
        let a = Attachment::new("mynet", CID, "eth0");
        let ips = nets(&["10.1.0.5/24", "fd00::5/64"]);
        insta::assert_snapshot!(add_repair_tx(&a, &ips).to_string());
    }

    #[test]
    fn takeover_text() {
        let addrs: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        insta::assert_snapshot!(takeover_tx(&addrs).to_string());
    }

    #[test]
    fn del_text() {
        let a = Attachment::new("mynet", CID, "eth0");
        let ips: Vec<IpAddr> = vec![
            "10.1.0.5".parse().unwrap(),
            "fd00::5".parse().unwrap(),
            "10.1.0.5".parse().unwrap(),
        ];
        let tx = del_tx(&a, &ips);
        assert_eq!(tx.len(), 6);
        insta::assert_snapshot!(tx.to_string());
    }

    fn sample_listing() -> Listing {
        let a = Attachment::new("mynet", "live", "eth0").owner();
        let d = Attachment::new("mynet", "dead", "eth0").owner();
        let o = Attachment::new("other", "x", "eth0").owner();
        let c1 = network_chain("mynet", &"10.1.0.0/24".parse().unwrap());
        let c_unused = network_chain("mynet", &"10.9.0.0/24".parse().unwrap());
        let c2 = network_chain("other", &"10.2.0.0/24".parse().unwrap());
        let json = serde_json::json!({"nftables": [
            {"map": {"name": "pods_v4", "map": "verdict", "elem": [
                ["10.1.0.2", {"jump": {"target": c1.as_str()}}],
                ["10.1.0.3", {"jump": {"target": c1.as_str()}}],
                ["10.1.0.4", {"jump": {"target": c1.as_str()}}],
                ["10.2.0.2", {"jump": {"target": c2.as_str()}}]]}},
            {"map": {"name": "owners_v4", "map": OWNER_TYPE, "elem": [
                [{"elem": {"val": "10.1.0.2", "comment": "x"}}, {"concat": a}],
                ["10.1.0.3", {"concat": d}],
                ["10.2.0.2", {"concat": o}]]}},
            {"chain": {"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100}},
            {"chain": {"name": c1.as_str()}},
            {"chain": {"name": c_unused.as_str()}},
            {"chain": {"name": c2.as_str()}}]});
        Listing::from_json(&json.to_string()).unwrap()
    }

    #[test]
    fn owners_and_targets_are_read_from_listings() {
        let l = sample_listing();
        let owned = owned(&l);
        assert_eq!(owned.len(), 3);
        assert_eq!(owned[0].0, "10.1.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(owned[0].1, Attachment::new("mynet", "live", "eth0").owner());
        assert_eq!(targets(&l).len(), 4);
    }

    #[test]
    fn gc_text() {
        // The dead attachment's guarded delete, the owner-less element (10.1.0.4), the
        // chain nothing uses; the live attachment and the other network stay.
        let l = sample_listing();
        let (tx, removed) = gc_tx(&l, "mynet", &[("live", "eth0")]);
        assert_eq!(removed, 1);
        insta::assert_snapshot!(tx.to_string());
        // Everything of the network when nothing is valid; the other network stays.
        let (tx, removed) = gc_tx(&l, "mynet", &[]);
        assert_eq!(removed, 2);
        assert!(!tx.to_string().contains("10.2.0.2"));
        let (tx, removed) = gc_tx(&l, "other", &[("x", "eth0")]);
        assert_eq!(removed, 0);
        assert!(tx.is_empty(), "{tx}");
    }

    #[test]
    fn listed_rules_render_like_ours() {
        let json = r#"{"nftables": [
 {"rule": {"family": "inet", "table": "weft_masq", "chain": "c", "handle": 7, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "10.1.0.0", "len": 24}}}}, {"return": null}]}},
 {"rule": {"family": "inet", "table": "weft_masq", "chain": "c", "handle": 8, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.1.0.5"}}, {"return": null}]}},
 {"rule": {"family": "inet", "table": "weft_masq", "chain": "c", "handle": 9, "expr": [{"masquerade": null}]}},
 {"rule": {"family": "inet", "table": "weft_masq", "chain": "c", "handle": 10, "expr": [{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.1.0.5"}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "weft_masq", "chain": "p", "handle": 4, "expr": [{"vmap": {"key": {"payload": {"protocol": "ip6", "field": "saddr"}}, "data": "@pods_v6"}}]}}]}"#;
        let l = Listing::from_json(json).unwrap();
        let got: Vec<String> = l.rules.iter().map(|r| render_rule(&r.expr)).collect();
        assert_eq!(got[0], "ip daddr 10.1.0.0/24 return");
        assert_eq!(got[1], "ip daddr 10.1.0.5/32 return");
        assert_eq!(got[2], "masquerade");
        assert!(got[3].starts_with("{\"match\""), "{}", got[3]);
        assert_eq!(got[4], "ip6 saddr vmap @pods_v6");
    }
}
