//! Set-element statements sent straight to the kernel over nfnetlink: the same
//! transaction as `nft -f -` would make of them (one batch, all or nothing), without
//! the ~3 ms exec and cache load of nft. Only element `add`/`create`/`delete` with
//! values whose encoding does not depend on the set's declared type take this path
//! (see [`encodable`]); everything else is text for nft.

use super::{ElemOp, ElemVerb, Element, ElementData, ErrorKind, Family, NftError, StmtError};
use super::{Value, Verdict};
use crate::nfnetlink::{Attrs, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, message};
use std::net::IpAddr;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

// nf_tables.h attribute numbers.
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
/// libnftnl's user-data type for an element comment (what `nft list` shows).
const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;

/// Whether every element of `op` can be encoded without knowing the set's types:
/// addresses, 32-bit marks ([`Value::Hex`]), interface names, MACs, ports, protocol
/// numbers, concatenations of them, verdicts.
pub(super) fn encodable(op: &ElemOp) -> bool {
    op.elems.iter().all(|e| {
        value_bytes(&e.key).is_some()
            && match &e.data {
                None | Some(ElementData::Verdict(_)) => true,
                Some(ElementData::Value(v)) => value_bytes(v).is_some(),
            }
    })
}

/// A value's bytes as the kernel stores them: addresses in network order, marks in
/// host order, concatenation fields each padded to 4 bytes.
fn value_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Addr(IpAddr::V4(a)) => Some(a.octets().to_vec()),
        Value::Addr(IpAddr::V6(a)) => Some(a.octets().to_vec()),
        Value::Hex(n) => Some(u32::try_from(*n).ok()?.to_ne_bytes().to_vec()),
        // The kernel compares interface names as IFNAMSIZ bytes, NUL-padded.
        Value::Iface(name) if name.as_str().len() < 16 => {
            let mut b = name.as_str().as_bytes().to_vec();
            b.resize(16, 0);
            Some(b)
        }
        Value::Mac(m) => Some(m.to_vec()),
        Value::Port(p) => Some(p.to_be_bytes().to_vec()),
        Value::Proto(n) => Some(vec![*n]),
        Value::Concat(parts) => {
            let mut out = Vec::new();
            for p in parts {
                if matches!(p, Value::Concat(_)) {
                    return None;
                }
                let mut b = value_bytes(p)?;
                b.resize(b.len().next_multiple_of(4), 0);
                out.extend(b);
            }
            Some(out)
        }
        Value::Net(_) | Value::Num(_) | Value::Kw(_) | Value::Iface(_) => None,
    }
}

fn family_code(f: Family) -> u8 {
    match f {
        Family::Ip => libc::NFPROTO_IPV4 as u8,
        Family::Ip6 => libc::NFPROTO_IPV6 as u8,
        Family::Inet => libc::NFPROTO_INET as u8,
        Family::Arp => libc::NFPROTO_ARP as u8,
        Family::Bridge => libc::NFPROTO_BRIDGE as u8,
        Family::Netdev => libc::NFPROTO_NETDEV as u8,
    }
}

fn verdict_attrs(a: &mut Attrs, v: &Verdict) {
    let (code, chain): (i32, Option<&str>) = match v {
        Verdict::Accept => (1, None),
        Verdict::Drop => (0, None),
        Verdict::Continue => (-1, None),
        Verdict::Return => (-5, None),
        Verdict::Jump(c) => (-3, Some(c.as_str())),
        Verdict::Goto(c) => (-4, Some(c.as_str())),
    };
    a.nest(NFTA_DATA_VERDICT, |v| {
        v.put(NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(c) = chain {
            v.put_str(NFTA_VERDICT_CHAIN, c);
        }
    });
}

fn element_attrs(a: &mut Attrs, e: &Element, with_data: bool) {
    a.nest(NFTA_LIST_ELEM, |el| {
        let key = value_bytes(&e.key).expect("checked by encodable");
        el.nest(NFTA_SET_ELEM_KEY, |k| {
            k.put(NFTA_DATA_VALUE, &key);
        });
        if !with_data {
            return;
        }
        match &e.data {
            Some(ElementData::Verdict(v)) => {
                el.nest(NFTA_SET_ELEM_DATA, |d| verdict_attrs(d, v));
            }
            Some(ElementData::Value(v)) => {
                let data = value_bytes(v).expect("checked by encodable");
                el.nest(NFTA_SET_ELEM_DATA, |d| {
                    d.put(NFTA_DATA_VALUE, &data);
                });
            }
            None => {}
        }
        if let Some(c) = &e.comment {
            let mut udata = vec![NFTNL_UDATA_SET_ELEM_COMMENT, (c.as_str().len() + 1) as u8];
            udata.extend(c.as_str().as_bytes());
            udata.push(0);
            el.put(NFTA_SET_ELEM_USERDATA, &udata);
        }
    });
}

/// The batch for `ops` (sequence numbers 1..=ops.len() are the statements).
fn batch(ops: &[&ElemOp]) -> Vec<u8> {
    let mut buf = Vec::new();
    let unspec = libc::AF_UNSPEC as u8;
    message(
        &mut buf,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        0,
        unspec,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    for (i, op) in ops.iter().enumerate() {
        let (kind, flags) = match op.verb {
            ElemVerb::Add => (NFT_MSG_NEWSETELEM, NLM_F_CREATE),
            ElemVerb::Create => (NFT_MSG_NEWSETELEM, NLM_F_CREATE | NLM_F_EXCL),
            ElemVerb::Delete => (NFT_MSG_DELSETELEM, 0),
        };
        let mut a = Attrs::default();
        a.put_str(NFTA_SET_ELEM_LIST_TABLE, op.table.as_str())
            .put_str(NFTA_SET_ELEM_LIST_SET, op.set.as_str())
            .nest(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                for e in &op.elems {
                    element_attrs(list, e, op.verb != ElemVerb::Delete);
                }
            });
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | kind;
        let flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        message(
            &mut buf,
            kind,
            flags,
            i as u32 + 1,
            family_code(op.family),
            0,
            &a.0,
        );
    }
    let end = ops.len() as u32 + 1;
    message(
        &mut buf,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        end,
        unspec,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    buf
}

fn io_err(what: &str, e: std::io::Error) -> NftError {
    NftError::Io(format!("nfnetlink {what}: {e}"))
}

/// Apply `ops` (with their statement texts, for error messages) as one kernel
/// transaction. Errors come back per statement, numbered like the lines of the
/// equivalent script, so [`super::Transaction::apply_ignoring`] works the same.
pub(super) fn apply(ops: &[(&ElemOp, &str)]) -> Result<(), NftError> {
    let elem_ops: Vec<&ElemOp> = ops.iter().map(|(op, _)| *op).collect();
    let sock = crate::nfnetlink::open().map_err(|e| io_err("socket", e))?;
    let msg = batch(&elem_ops);
    crate::nfnetlink::size_for_batch(&sock, msg.len(), ops.len());
    sock.send(&msg, 0).map_err(|e| io_err("send", e))?;
    let mut pending = ops.len();
    let mut errors = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while pending > 0 {
        let n = sock
            .recv(&mut &mut buf[..], 0)
            .map_err(|e| io_err("recv", e))?;
        let msgs = crate::nfnetlink::messages(&buf[..n])
            .ok_or_else(|| NftError::Io("nfnetlink: malformed reply".into()))?;
        for m in msgs
            .iter()
            .filter(|m| m.kind == NLMSG_ERROR && m.body.len() >= 4)
        {
            pending = pending.saturating_sub(1);
            let errno = crate::nfnetlink::errno(m.body);
            if errno != 0 {
                errors.push(stmt_error(m.seq as usize, errno, ops));
            }
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    errors.sort_by_key(|e| e.line);
    let stderr = errors
        .iter()
        .map(|e| {
            format!(
                "netlink:{}: Error: {}\n{}\n",
                e.line, e.message, e.statement
            )
        })
        .collect();
    Err(NftError::Failed {
        status: "nfnetlink batch aborted".into(),
        stderr,
        errors,
    })
}

fn stmt_error(seq: usize, errno: i32, ops: &[(&ElemOp, &str)]) -> StmtError {
    let kind = match errno {
        libc::ENOENT => ErrorKind::NotFound,
        libc::EEXIST => ErrorKind::Exists,
        libc::EBUSY => ErrorKind::Busy,
        _ => ErrorKind::Other,
    };
    let reason = std::io::Error::from_raw_os_error(errno).to_string();
    // Worded like nft's own message, minus the " (os error N)" Rust appends.
    let reason = reason.split(" (os error").next().unwrap_or_default();
    StmtError {
        line: seq,
        kind,
        message: format!("Could not process rule: {reason}"),
        statement: ops
            .get(seq.wrapping_sub(1))
            .map(|(_, text)| text.to_string())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{Comment, Ident};

    fn op(verb: ElemVerb, elems: Vec<Element>) -> ElemOp {
        ElemOp {
            verb,
            family: Family::Inet,
            table: Ident::new("t").unwrap(),
            set: Ident::new("s").unwrap(),
            elems,
        }
    }

    #[test]
    fn values_encode_like_the_kernel_stores_them() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(value_bytes(&Value::Addr(v4)).unwrap(), [10, 1, 2, 3]);
        let marks = Value::Concat(vec![Value::Hex(1), Value::Hex(0xdeadbeef)]);
        let mut want = 1u32.to_ne_bytes().to_vec();
        want.extend(0xdeadbeefu32.to_ne_bytes());
        assert_eq!(value_bytes(&marks).unwrap(), want);
        // Types that need the set's declaration go through nft.
        let key = Value::Concat(vec![Value::Proto(17), Value::Port(8080)]);
        assert_eq!(value_bytes(&key).unwrap(), [17, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(value_bytes(&Value::Num(80)), None);
        assert_eq!(value_bytes(&Value::Hex(1 << 40)), None);
        assert!(!encodable(&op(ElemVerb::Add, vec![Element::new(80u16)])));
        assert!(encodable(&op(
            ElemVerb::Add,
            vec![Element::new(v4).verdict(Verdict::Jump(Ident::new("c").unwrap()))]
        )));
    }

    #[test]
    fn batch_is_framed_with_one_sequence_number_per_statement() {
        let e = Element::new("10.0.0.1".parse::<IpAddr>().unwrap())
            .comment(Comment::new("x"))
            .verdict(Verdict::Accept);
        let (add, del) = (
            op(ElemVerb::Add, vec![e.clone()]),
            op(ElemVerb::Delete, vec![e]),
        );
        let buf = batch(&[&add, &del]);
        let mut off = 0;
        let mut seen = Vec::new();
        while off < buf.len() {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
            seen.push((kind, seq));
            off += len;
        }
        assert_eq!(off, buf.len());
        let sub = NFNL_SUBSYS_NFTABLES << 8;
        assert_eq!(
            seen,
            [
                (NFNL_MSG_BATCH_BEGIN, 0),
                (sub | NFT_MSG_NEWSETELEM, 1),
                (sub | NFT_MSG_DELSETELEM, 2),
                (NFNL_MSG_BATCH_END, 3)
            ]
        );
    }
}
