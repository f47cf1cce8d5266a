//! Deleting conntrack entries over ctnetlink, what `conntrack -D` does, without the
//! tool. portmap needs it for UDP: a datagram sent to a host port before the DNAT
//! rule existed created an entry that keeps steering that flow past the rule, and a
//! sender that keeps talking keeps the entry alive, so the mapping never takes effect.
//!
//! One dump per port, filtered in the kernel (`CTA_FILTER`, Linux 5.8+) so only
//! matching entries are copied out, then one `IPCTNL_MSG_CT_DELETE` per entry.
//! Every dumped entry is matched again here: older kernels ignore the filter and dump
//! the whole table, and the kernel compares ports only for TCP and UDP.
//! Everything happens in the calling thread's network namespace.

use crate::error::{CniError, Result};
use crate::nfnetlink::{
    Attrs, Msg, NFGENMSG_LEN, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NfSocket, attrs, errno,
};
use netlink_sys::Socket;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;

// nfnetlink_conntrack.h attribute numbers.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
// Filter flags: kernel-internal (net/netfilter/nf_internals.h), not in the uapi headers.
const CTA_FILTER_F_PROTO_NUM: u32 = 1 << 3;
const CTA_FILTER_F_PROTO_DST_PORT: u32 = 1 << 5;

/// Dumps redone after an interruption before giving up.
const DUMP_ATTEMPTS: usize = 3;
/// Receive buffer: the kernel sizes dump datagrams by the reader's buffer, up to 32 KiB.
const RECV_BUF: usize = 64 * 1024;

/// Delete every conntrack entry of IPv4 (`v4`) or IPv6 whose original tuple has
/// protocol `proto` (IPPROTO number, e.g. 17) and destination port in `ports`.
/// Returns how many entries were deleted. Entries that vanish between dump and delete
/// (ENOENT) are not errors. Runs in the calling thread's network namespace.
pub fn delete_by_dport(v4: bool, proto: u8, ports: &[u16]) -> Result<usize> {
    let family = if v4 { libc::AF_INET } else { libc::AF_INET6 } as u8;
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    let mut doomed = Vec::new();
    for dport in ports {
        let t = Target {
            family,
            proto,
            dport,
        };
        doomed.extend(dump(&t).map_err(|e| e.context("dump").context(t))?);
    }
    if doomed.is_empty() {
        return Ok(0);
    }
    let sock = open().map_err(|e| e.context("conntrack delete"))?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut deleted = 0;
    for (seq, e) in (1u32..).zip(&doomed) {
        let gone = delete(&sock, seq, e, &mut buf)
            .map_err(|err| err.context("delete").context(e.target()))?;
        deleted += usize::from(gone);
    }
    Ok(deleted)
}

/// The entries to delete: `family`, protocol `proto`, original destination port `dport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    family: u8,
    proto: u8,
    dport: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = if i32::from(self.family) == libc::AF_INET {
            4
        } else {
            6
        };
        write!(
            f,
            "conntrack entries of IPv{v} protocol {} to port {}",
            self.proto, self.dport
        )
    }
}

/// A dumped entry: what it is matched on, and what names it in a delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    family: u8,
    proto: Option<u8>,
    dport: Option<u16>,
    /// CTA_TUPLE_ORIG's payload as the kernel wrote it. Sent back verbatim it names
    /// exactly this entry, whatever the protocol's tuple fields, including a
    /// per-direction zone (CTA_TUPLE_ZONE).
    orig: Vec<u8>,
    /// CTA_ZONE: present when the entry is not in the default zone; the kernel looks
    /// tuples up per zone.
    zone: Option<u16>,
    /// CTA_ID: with it the kernel refuses (ENOENT) to delete a newer entry that took
    /// over the tuple since the dump.
    id: Option<u32>,
}

impl Entry {
    fn matches(&self, t: &Target) -> bool {
        self.family == t.family && self.proto == Some(t.proto) && self.dport == Some(t.dport)
    }

    fn target(&self) -> Target {
        Target {
            family: self.family,
            proto: self.proto.unwrap_or_default(),
            dport: self.dport.unwrap_or_default(),
        }
    }
}

/// The payload of a dump reply (nfgenmsg, then attributes) as an [`Entry`]; `None`
/// without an original tuple protocol part.
fn parse_entry(body: &[u8]) -> Option<Entry> {
    let mut e = Entry {
        family: *body.first()?,
        ..Entry::default()
    };
    let mut orig = None;
    for (kind, payload) in attrs(body.get(NFGENMSG_LEN..)?) {
        match kind {
            CTA_TUPLE_ORIG => orig = Some(payload),
            CTA_ZONE => e.zone = be16(payload),
            CTA_ID => e.id = payload.try_into().ok().map(u32::from_be_bytes),
            _ => {}
        }
    }
    let orig = orig?;
    let (_, proto) = attrs(orig).find(|(kind, _)| *kind == CTA_TUPLE_PROTO)?;
    for (kind, payload) in attrs(proto) {
        match kind {
            CTA_PROTO_NUM => e.proto = payload.first().copied(),
            CTA_PROTO_DST_PORT => e.dport = be16(payload),
            _ => {}
        }
    }
    e.orig = orig.to_vec();
    Some(e)
}

fn be16(payload: &[u8]) -> Option<u16> {
    payload.try_into().ok().map(u16::from_be_bytes)
}

/// One ctnetlink request: netlink header, nfgenmsg (version 0, res_id 0), attributes.
fn request(kind: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let kind = (NFNL_SUBSYS_CTNETLINK << 8) | kind;
    crate::nfnetlink::message(&mut buf, kind, flags, seq, family, 0, attrs);
    buf
}

/// A dump of `t.family`'s table, filtered by the kernel on protocol and original
/// destination port (kernels without CTA_FILTER ignore it and dump everything).
fn dump_request(t: &Target, seq: u32) -> Vec<u8> {
    let mut a = Attrs::default();
    a.nest(CTA_TUPLE_ORIG, |tuple| {
        tuple.nest(CTA_TUPLE_PROTO, |p| {
            p.put(CTA_PROTO_NUM, &[t.proto])
                .put(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
        });
    })
    .nest(CTA_FILTER, |f| {
        let flags = CTA_FILTER_F_PROTO_NUM | CTA_FILTER_F_PROTO_DST_PORT;
        f.put(CTA_FILTER_ORIG_FLAGS, &flags.to_ne_bytes());
    });
    request(
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        t.family,
        &a.0,
    )
}

/// The delete of `e`. It always carries the tuple: a delete without one flushes the
/// whole table.
fn delete_request(e: &Entry, seq: u32) -> Vec<u8> {
    let mut a = Attrs::default();
    a.put(CTA_TUPLE_ORIG | NLA_F_NESTED, &e.orig);
    if let Some(zone) = e.zone {
        a.put(CTA_ZONE, &zone.to_be_bytes());
    }
    if let Some(id) = e.id {
        a.put(CTA_ID, &id.to_be_bytes());
    }
    request(
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        e.family,
        &a.0,
    )
}

/// The messages of one datagram.
fn messages(buf: &[u8]) -> Result<Vec<Msg<'_>>> {
    crate::nfnetlink::messages(buf).ok_or_else(|| CniError::internal("malformed ctnetlink reply"))
}

/// An errno the kernel answered with.
fn kernel_err(errno: i32) -> CniError {
    CniError::internal(std::io::Error::from_raw_os_error(errno).to_string())
}

fn open() -> Result<NfSocket> {
    crate::nfnetlink::open().map_err(|e| CniError::io("ctnetlink socket", e))
}

fn send(sock: &Socket, msg: &[u8]) -> Result<()> {
    sock.send(msg, 0)
        .map(drop)
        .map_err(|e| CniError::io("send", e))
}

/// One datagram, retrying EINTR. MSG_TRUNC reports a datagram larger than `buf`
/// (which would lose messages) as an error instead of silently cutting it.
fn recv(sock: &Socket, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match sock.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(n) if n > buf.len() => {
                return Err(std::io::Error::other(format!(
                    "{n}-byte datagram truncated"
                )));
            }
            other => return other,
        }
    }
}

/// The entries matching `t`. A dump that raced with a table change (NLM_F_DUMP_INTR,
/// EINTR) or overran the socket buffer (ENOBUFS) may have missed entries, so it is
/// redone, a few times at most.
fn dump(t: &Target) -> Result<Vec<Entry>> {
    for _ in 0..DUMP_ATTEMPTS {
        if let Some(found) = dump_once(t)? {
            return Ok(found);
        }
    }
    Err(CniError::internal(format!(
        "interrupted {DUMP_ATTEMPTS} times in a row"
    )))
}

/// One dump on a fresh socket (nothing left over from an abandoned one); `None` if
/// it was interrupted.
fn dump_once(t: &Target) -> Result<Option<Vec<Entry>>> {
    const SEQ: u32 = 1;
    let sock = open()?;
    send(&sock, &dump_request(t, SEQ))?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut found = Vec::new();
    loop {
        let n = match recv(&sock, &mut buf) {
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(None),
            other => other.map_err(|e| CniError::io("recv", e))?,
        };
        for m in messages(&buf[..n])? {
            if m.seq != SEQ {
                continue;
            }
            if m.flags & NLM_F_DUMP_INTR != 0 {
                return Ok(None);
            }
            match m.kind {
                NLMSG_DONE | NLMSG_ERROR => {
                    return match errno(m.body) {
                        0 => Ok(Some(found)),
                        libc::EINTR => Ok(None),
                        errno => Err(kernel_err(errno)),
                    };
                }
                k if k >> 8 == NFNL_SUBSYS_CTNETLINK => {
                    found.extend(parse_entry(m.body).filter(|e| e.matches(t)));
                }
                _ => {}
            }
        }
    }
}

/// Delete `e`; `false` if it was already gone.
fn delete(sock: &Socket, seq: u32, e: &Entry, buf: &mut [u8]) -> Result<bool> {
    send(sock, &delete_request(e, seq))?;
    match ack(sock, seq, buf)? {
        0 => Ok(true),
        libc::ENOENT => Ok(false),
        errno => Err(kernel_err(errno)),
    }
}

/// The kernel's answer to request `seq`: its errno, 0 for success.
fn ack(sock: &Socket, seq: u32, buf: &mut [u8]) -> Result<i32> {
    loop {
        let n = recv(sock, buf).map_err(|e| CniError::io("recv", e))?;
        for m in messages(&buf[..n])? {
            if m.seq == seq && m.kind == NLMSG_ERROR {
                return Ok(errno(m.body));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: u8 = 17;
    const V4: u8 = libc::AF_INET as u8;

    fn attr_list(buf: &[u8]) -> Vec<(u16, &[u8])> {
        attrs(buf).collect()
    }

    /// A dump reply for a UDP entry 10.0.0.1:1234 -> 10.0.0.2:`dport`, as the kernel
    /// lays it out (both tuples, status, id, optionally a zone).
    fn reply_body(dport: u16, zone: Option<u16>) -> Vec<u8> {
        let tuple = |t: &mut Attrs, sport: u16, dport: u16| {
            t.nest(1 /* CTA_TUPLE_IP */, |ip| {
                ip.put(1, &[10, 0, 0, 1]).put(2, &[10, 0, 0, 2]);
            })
            .nest(CTA_TUPLE_PROTO, |p| {
                p.put(CTA_PROTO_NUM, &[UDP])
                    .put(2 /* SRC_PORT */, &sport.to_be_bytes())
                    .put(CTA_PROTO_DST_PORT, &dport.to_be_bytes());
            });
        };
        let mut a = Attrs::default();
        a.nest(CTA_TUPLE_ORIG, |t| tuple(t, 1234, dport))
            .nest(2 /* CTA_TUPLE_REPLY */, |t| tuple(t, dport, 1234))
            .put(3 /* CTA_STATUS */, &8u32.to_be_bytes())
            .put(CTA_ID, &0xdead_beefu32.to_be_bytes());
        if let Some(z) = zone {
            a.put(CTA_ZONE, &z.to_be_bytes());
        }
        let mut body = vec![V4, 0, 0, 0];
        body.extend(a.0);
        body
    }

    #[test]
    fn dump_reply_parses_into_a_matchable_entry() {
        let e = parse_entry(&reply_body(5353, Some(7))).unwrap();
        assert_eq!((e.family, e.proto, e.dport), (V4, Some(UDP), Some(5353)));
        assert_eq!((e.zone, e.id), (Some(7), Some(0xdead_beef)));
        let t = Target {
            family: V4,
            proto: UDP,
            dport: 5353,
        };
        assert!(e.matches(&t));
        assert!(!e.matches(&Target { dport: 53, ..t }));
        assert!(!e.matches(&Target { proto: 6, ..t }));
        assert!(!e.matches(&Target {
            family: libc::AF_INET6 as u8,
            ..t
        }));
        // The original tuple is kept whole: IP and protocol parts.
        let kinds: Vec<u16> = attrs(&e.orig).map(|(k, _)| k).collect();
        assert_eq!(kinds, [1, CTA_TUPLE_PROTO]);
        // No zone attribute: the default zone.
        assert_eq!(parse_entry(&reply_body(5353, None)).unwrap().zone, None);
    }

    #[test]
    fn replies_without_an_original_tuple_are_skipped() {
        assert_eq!(parse_entry(&[]), None);
        assert_eq!(parse_entry(&[V4, 0, 0, 0]), None);
        let mut body = vec![V4, 0, 0, 0];
        body.extend(Attrs::default().put(CTA_ID, &[0, 0, 0, 1]).0.clone());
        assert_eq!(parse_entry(&body), None);
    }

    #[test]
    fn attributes_stop_at_garbage_and_lose_their_flag_bits() {
        let mut a = Attrs::default();
        a.put(CTA_PROTO_NUM, &[UDP]).nest(CTA_TUPLE_PROTO, |_| {});
        let mut buf = a.0.clone();
        assert_eq!(
            attr_list(&buf),
            [(CTA_PROTO_NUM, &[UDP][..]), (CTA_TUPLE_PROTO, &[][..])]
        );
        // A length running past the end, then one shorter than a header.
        buf.extend([200, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(attr_list(&buf).len(), 2);
        assert!(attr_list(&[2, 0, 1, 0]).is_empty());
    }

    #[test]
    fn dump_request_filters_on_protocol_and_destination_port() {
        let t = Target {
            family: V4,
            proto: UDP,
            dport: 0x1234,
        };
        let msg = dump_request(&t, 9);
        let m = &messages(&msg).unwrap()[0];
        assert_eq!(
            u32::from_ne_bytes(msg[..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!((m.kind, m.flags, m.seq), (0x101, 0x301, 9));
        assert_eq!(m.body[..4], [V4, 0, 0, 0]);
        let top = attr_list(&m.body[4..]);
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].0, CTA_TUPLE_ORIG);
        let proto = attr_list(top[0].1);
        assert_eq!(proto.len(), 1);
        assert_eq!(
            attr_list(proto[0].1),
            [
                (CTA_PROTO_NUM, &[UDP][..]),
                (CTA_PROTO_DST_PORT, &[0x12, 0x34][..])
            ]
        );
        assert_eq!(top[1].0, CTA_FILTER);
        let flags = 0x28u32.to_ne_bytes(); // PROTO_NUM | PROTO_DST_PORT
        assert_eq!(attr_list(top[1].1), [(CTA_FILTER_ORIG_FLAGS, &flags[..])]);
        // The nests are flagged as such on the wire.
        assert_eq!(u16::from_ne_bytes(m.body[6..8].try_into().unwrap()), 0x8001);
    }

    #[test]
    fn delete_request_names_the_dumped_tuple_zone_and_id() {
        let e = parse_entry(&reply_body(5353, Some(7))).unwrap();
        let msg = delete_request(&e, 3);
        let m = &messages(&msg).unwrap()[0];
        assert_eq!(
            (m.kind, m.flags, m.seq),
            (0x102, NLM_F_REQUEST | NLM_F_ACK, 3)
        );
        assert_eq!(m.body[0], V4);
        assert_eq!(
            attr_list(&m.body[4..]),
            [
                (CTA_TUPLE_ORIG, &e.orig[..]),
                (CTA_ZONE, &[0, 7][..]),
                (CTA_ID, &[0xde, 0xad, 0xbe, 0xef][..])
            ]
        );
        let bare = Entry {
            zone: None,
            id: None,
            ..e.clone()
        };
        let msg = delete_request(&bare, 4);
        assert_eq!(attr_list(&messages(&msg).unwrap()[0].body[4..]).len(), 1);
    }

    #[test]
    fn datagrams_split_into_messages_and_errnos() {
        let mut buf = request(0, 0x2, 5, V4, &[1, 2]);
        buf.resize(buf.len().next_multiple_of(4), 0);
        let mut done = vec![
            20,
            0,
            0,
            0,
            NLMSG_DONE as u8,
            0,
            0x12,
            0,
            5,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        done.extend(0i32.to_ne_bytes());
        buf.extend(&done);
        let msgs = messages(&buf).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].body, [V4, 0, 0, 0, 1, 2]);
        assert_eq!(
            (msgs[1].kind, msgs[1].flags & NLM_F_DUMP_INTR),
            (NLMSG_DONE, 0x10)
        );
        assert_eq!(errno(msgs[1].body), 0);
        assert_eq!(errno(&(-libc::ENOENT).to_ne_bytes()), libc::ENOENT);
        assert_eq!(errno(&[0, 0]), libc::EPROTO);
        // A header claiming more than was received, or less than itself.
        assert!(messages(&buf[..buf.len() - 4]).is_err());
        assert!(messages(&[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(messages(&[1, 2, 3]).is_err());
    }
}
