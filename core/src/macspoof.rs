//! bridge `macspoofchk`: frames a pod sends with any source MAC but its own are
//! dropped before the bridge forwards them, in nftables table `bridge weft_macspoof`.
//!
//! ```text
//! table bridge weft_macspoof {
//!   set ports   { type ifname; }                 # guarded host veths
//!   set allowed { type ifname . ether_addr; }    # each one's pod MAC
//!   chain prerouting { type filter hook prerouting priority dstnat; policy accept;
//!     iifname @ports iifname . ether saddr != @allowed drop }
//! }
//! ```
//!
//! A pod costs two set elements, added and deleted in one kernel transaction (no
//! per-pod chains or rules, unlike the reference, whose DEL needs rule handles). The
//! `ports` element carries the attachment's comment, so a DEL that has lost the
//! interface, and GC, find it by listing.

use crate::error::{CniError, Result};
use crate::masq::Attachment;
use crate::nft::{
    self, BaseChain, ChainType, Comment, Element, ErrorKind, Family, Hook, Ident, Listing, Policy,
    Priority, Rule, SetDecl, Transaction, Value, Verdict,
};

pub const TABLE: &str = "weft_macspoof";
const FAMILY: Family = Family::Bridge;
const PORTS: &str = "ports";
const ALLOWED: &str = "allowed";
const CHAIN: &str = "prerouting";
const TABLE_COMMENT: &str = "weft bridge macspoofchk - managed by weft, do not edit";

fn iface(name: &str) -> Result<Value> {
    Ident::new(name).map(Value::Iface)
}

/// Table, sets and the one rule (idempotent; the chain is rewritten).
pub fn ensure_tx() -> Transaction {
    let (t, chain) = (Ident::constant(TABLE), Ident::constant(CHAIN));
    let (ports, allowed) = (Ident::constant(PORTS), Ident::constant(ALLOWED));
    let mut tx = Transaction::new();
    tx.add_table(FAMILY, &t, Some(&Comment::new(TABLE_COMMENT)))
        .add_set(FAMILY, &t, &ports, &SetDecl::set("ifname"))
        .add_set(FAMILY, &t, &allowed, &SetDecl::set("ifname . ether_addr"))
        .rebuild_chain(
            FAMILY,
            &t,
            &chain,
            Some(&BaseChain {
                kind: ChainType::Filter,
                hook: Hook::Prerouting,
                priority: Priority::DstNat,
                policy: Policy::Accept,
            }),
            None,
            &[Rule::new()
                .kw("iifname")
                .set_ref(&ports)
                .kw("iifname . ether saddr !=")
                .set_ref(&allowed)
                .verdict(&Verdict::Drop)],
        );
    tx
}

fn elements_tx(tx: &mut Transaction, att: &Attachment<'_>, veth: &str, mac: [u8; 6]) -> Result<()> {
    let t = Ident::constant(TABLE);
    let port = iface(veth)?;
    tx.add_elements(
        FAMILY,
        &t,
        &Ident::constant(ALLOWED),
        &[Element::new(Value::Concat(vec![
            port.clone(),
            Value::Mac(mac),
        ]))],
    )
    .add_elements(
        FAMILY,
        &t,
        &Ident::constant(PORTS),
        &[Element::new(port).comment(att.comment())],
    );
    Ok(())
}

/// Allow only `mac` from host veth `veth` (the allowed pair first, then the guard,
/// in one transaction).
pub fn add(att: &Attachment<'_>, veth: &str, mac: [u8; 6]) -> Result<()> {
    let mut tx = Transaction::new();
    elements_tx(&mut tx, att, veth, mac)?;
    match tx.try_apply() {
        Ok(()) => return Ok(()),
        Err(e) if e.only(&[ErrorKind::NotFound]) => {}
        Err(e) => return Err(CniError::from(e).context("macspoofchk")),
    }
    let mut full = ensure_tx();
    full.extend(tx);
    full.apply().map_err(|e| e.context("macspoofchk"))
}

/// Remove the guard of host veth `veth` and its allowed MAC. With the pair known
/// (`hint`) that is one transaction with no listing; without (the interface is gone)
/// the attachment's guard is found by its comment. Idempotent.
pub fn del(att: &Attachment<'_>, hint: Option<(&str, [u8; 6])>) -> Result<()> {
    let tx = match hint {
        Some((veth, mac)) => {
            let mut tx = Transaction::new();
            delete_guard(&mut tx, veth, &[mac])?;
            tx
        }
        None => {
            let Some(l) = nft::list_table(FAMILY, &Ident::constant(TABLE))
                .map_err(|e| e.context("macspoofchk teardown"))?
            else {
                return Ok(());
            };
            let comment = att.comment();
            let ports: Vec<String> = guards(&l)
                .filter(|(_, c)| *c == Some(comment.as_str()))
                .map(|(p, _)| p)
                .collect();
            delete_tx(&l, &ports)?
        }
    };
    tx.apply_teardown()
        .map_err(|e| e.context("macspoofchk teardown"))
}

/// GC: remove the guards (and MACs) of `network`'s attachments not in `valid`.
pub fn gc(network: &str, valid: &[(&str, &str)]) -> Result<usize> {
    let Some(l) = nft::list_table(FAMILY, &Ident::constant(TABLE))? else {
        return Ok(0);
    };
    let keep: Vec<String> = valid
        .iter()
        .map(|(cid, ifname)| {
            Attachment::new(network, cid, ifname)
                .comment()
                .as_str()
                .to_string()
        })
        .collect();
    let prefix = Attachment::network_comment_prefix(network);
    let stale: Vec<String> = guards(&l)
        .filter(|(_, c)| c.is_some_and(|c| c.starts_with(&prefix) && !keep.iter().any(|k| k == c)))
        .map(|(p, _)| p)
        .collect();
    delete_tx(&l, &stale)?
        .apply_teardown()
        .map_err(|e| e.context("macspoofchk GC"))?;
    Ok(stale.len())
}

/// Whether `veth` is guarded and allows exactly `mac`.
pub fn check(veth: &str, mac: [u8; 6]) -> Result<bool> {
    let Some(l) = nft::list_table(FAMILY, &Ident::constant(TABLE))? else {
        return Ok(false);
    };
    let want = Value::Mac(mac).to_string();
    let guarded = guards(&l).any(|(p, _)| p == veth);
    let macs: Vec<String> = allowed(&l)
        .filter(|(p, _)| p == veth)
        .map(|(_, m)| m)
        .collect();
    Ok(guarded && macs == [want])
}

/// `(port, comment)` of every guard.
fn guards(l: &Listing) -> impl Iterator<Item = (String, Option<&str>)> {
    l.set(PORTS)
        .into_iter()
        .flat_map(|s| &s.elements)
        .filter_map(|e| Some((e.key_str()?, e.comment.as_deref())))
}

/// `(port, mac)` of every allowed pair.
fn allowed(l: &Listing) -> impl Iterator<Item = (String, String)> {
    l.set(ALLOWED)
        .into_iter()
        .flat_map(|s| &s.elements)
        .filter_map(|e| {
            let parts = e.key.get("concat")?.as_array()?;
            Some((
                parts.first()?.as_str()?.to_string(),
                parts.get(1)?.as_str()?.to_string(),
            ))
        })
}

/// The deletion of `port`'s guard and of its allowed pairs with `macs`, each its own
/// statement (so a teardown drops only what is already gone).
fn delete_guard(tx: &mut Transaction, port: &str, macs: &[[u8; 6]]) -> Result<()> {
    let t = Ident::constant(TABLE);
    let key = iface(port)?;
    tx.delete_elements(
        FAMILY,
        &t,
        &Ident::constant(PORTS),
        std::slice::from_ref(&key),
    );
    for mac in macs {
        let pair = Value::Concat(vec![key.clone(), Value::Mac(*mac)]);
        tx.delete_elements(FAMILY, &t, &Ident::constant(ALLOWED), &[pair]);
    }
    Ok(())
}

/// [`delete_guard`] for each of `ports`, with the MACs the listing allows for it.
fn delete_tx(l: &Listing, ports: &[String]) -> Result<Transaction> {
    let mut tx = Transaction::new();
    for port in ports {
        let macs = allowed(l)
            .filter(|(p, _)| p == port)
            .map(|(_, mac)| {
                crate::mac::parse(&mac)
                    .ok_or_else(|| CniError::internal(format!("unexpected MAC {mac:?} in {TABLE}")))
            })
            .collect::<Result<Vec<_>>>()?;
        delete_guard(&mut tx, port, &macs)?;
    }
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_and_add_text() {
        let att = Attachment::new("net1", "c1", "eth0");
        let mut tx = ensure_tx();
        elements_tx(&mut tx, &att, "veth0a1b2c3d", [2, 0, 10, 0, 0, 5]).unwrap();
        insta::assert_snapshot!(tx.to_string());
    }
}
