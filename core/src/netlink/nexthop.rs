//! IPv4 nexthop objects (`ip nexthop`, Linux ≥ 5.3) for the overlay backends' peer
//! routes, over a plain NETLINK_ROUTE socket (rtnetlink has no nexthop messages).
//!
//! Why: a flanneld-style peer route (`<subnet> via <gateway> dev flannel.1 onlink`)
//! gets a kernel `fib_info` of its own, and the kernel finds an equal one to share by
//! hashing the device, metric, protocol and scope, not the gateway: every peer route
//! lands in one hash bucket and each insert walks the earlier ones (10,000 routes:
//! 1.8 s). A route through a nexthop object (`<subnet> nhid <id> proto 87`) is hashed
//! by the nexthop's id instead: 10,000 nexthops and their routes take ~0.13 s. What
//! the kernel forwards is unchanged: `ip route` still shows `via <gateway> dev
//! flannel.1 onlink`.
//!
//! The id of a peer's nexthop is its IPv4 subnet address, so it is known without a
//! listing and equal across restarts. An id is only ever created (`EXCL`), or
//! replaced and deleted after the kernel confirmed it carries our protocol: a
//! nexthop of another owner that happens to have that id is never touched.

use crate::error::{CniError, Result};
use crate::nfnetlink::{Attrs, NLM_F_ACK, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, errno};
use netlink_sys::{Socket, SocketAddr};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU32, Ordering};

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const RTNH_F_ONLINK: u32 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const AF_INET: u8 = libc::AF_INET as u8;
/// Messages sent per datagram: their acknowledgements fit the default receive buffer.
const CHUNK: usize = 128;
/// Attempts at a dump the kernel keeps flagging as interrupted.
const DUMP_ATTEMPTS: usize = 10;

/// A single-gateway IPv4 nexthop object, as weft writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nexthop {
    pub id: u32,
    pub gw: Ipv4Addr,
    pub oif: u32,
    /// `RTNH_F_ONLINK`, as on flanneld's vxlan routes.
    pub onlink: bool,
    pub protocol: u8,
}

impl Nexthop {
    /// The nexthop object for a peer route to `dst` via `gw` on `oif`; `None` for
    /// IPv6 (its routes have no such cost) or the unusable id 0.
    pub fn for_route(
        dst: ipnet::IpNet,
        gw: IpAddr,
        oif: u32,
        onlink: bool,
        protocol: u8,
    ) -> Option<Nexthop> {
        let (ipnet::IpNet::V4(dst), IpAddr::V4(gw)) = (dst, gw) else {
            return None;
        };
        let id = u32::from(dst.network());
        (id != 0 && !gw.is_unspecified()).then_some(Nexthop {
            id,
            gw,
            oif,
            onlink,
            protocol,
        })
    }
}

/// `ip nexthop` style: `id 183769856 via 10.244.27.0 dev #5 onlink proto 87`.
impl std::fmt::Display for Nexthop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nexthop id {} via {} dev #{}",
            self.id, self.gw, self.oif
        )?;
        if self.onlink {
            f.write_str(" onlink")?;
        }
        write!(f, " proto {}", self.protocol)
    }
}

/// A NETLINK_ROUTE socket for nexthop requests, in the namespace it was opened in.
/// Sequence numbers only grow over its life, so a reply left over from a request cut
/// short (a failed read) is never taken for a later request's.
pub(super) struct NexthopSocket(Socket, AtomicU32);

impl NexthopSocket {
    pub(super) fn new(mut sock: Socket) -> std::io::Result<NexthopSocket> {
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(NexthopSocket(sock, AtomicU32::new(1)))
    }

    /// The first of `n` fresh sequence numbers.
    fn seqs(&self, n: usize) -> u32 {
        self.1.fetch_add(n as u32, Ordering::Relaxed)
    }

    /// Every IPv4 nexthop object of `protocol` (a dump; the kernel cannot filter by
    /// protocol).
    pub(super) fn list(&self, protocol: u8) -> Result<Vec<Nexthop>> {
        let what = "listing nexthop objects";
        for _ in 0..DUMP_ATTEMPTS {
            let mut req = Vec::new();
            let seq = self.seqs(1);
            request(&mut req, RTM_GETNEXTHOP, NLM_F_DUMP, seq, &nhmsg(0, 0, 0));
            self.0.send(&req, 0).map_err(|e| io(what, e))?;
            let mut out = Vec::new();
            let mut interrupted = false;
            let done = self.replies(what, |m| {
                if m.seq != seq {
                    return Ok(false);
                }
                interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                match m.kind {
                    // The kernel may report an error or an interruption on DONE only.
                    NLMSG_DONE | NLMSG_ERROR => {
                        return match errno(m.body) {
                            0 => Ok(true),
                            e => Err(e),
                        };
                    }
                    RTM_NEWNEXTHOP => {
                        out.extend(parse(m.body).filter(|n| n.protocol == protocol));
                    }
                    _ => {}
                }
                Ok(false)
            });
            match done {
                // No nexthop support: there are none of ours either.
                Err(e) if e == libc::EOPNOTSUPP || e == libc::EINVAL => return Ok(Vec::new()),
                Err(e) => return Err(os(what, e)),
                Ok(()) if !interrupted => return Ok(out),
                Ok(()) => {}
            }
        }
        Err(CniError::internal(format!(
            "{what}: the kernel interrupted the dump {DUMP_ATTEMPTS} times in a row"
        )))
    }

    /// Create or replace each of `nhs`; per nexthop, `Err` if it could not be
    /// written or its id is another owner's.
    pub(super) fn replace(&self, nhs: &[Nexthop]) -> Vec<Result<()>> {
        let write = |n: &Nexthop, flags| (RTM_NEWNEXTHOP, flags, write_body(n));
        let mut out = self.batch(nhs.iter().map(|n| write(n, NLM_F_CREATE | NLM_F_EXCL)));
        let taken: Vec<usize> = (0..nhs.len())
            .filter(|&i| out[i] == Err(libc::EEXIST))
            .collect();
        let mut foreign = vec![None; nhs.len()];
        let mut ours = Vec::new();
        for (&i, owner) in taken
            .iter()
            .zip(self.owners(taken.iter().map(|&i| nhs[i].id)))
        {
            match owner {
                Ok(Some(p)) if p == nhs[i].protocol => ours.push(i),
                Ok(Some(p)) => foreign[i] = Some(p),
                Ok(None) => out[i] = Err(libc::ENOENT),
                Err(e) => out[i] = Err(e),
            }
        }
        let replaced = self.batch(
            ours.iter()
                .map(|&i| write(&nhs[i], NLM_F_CREATE | NLM_F_REPLACE)),
        );
        for (&i, r) in ours.iter().zip(replaced) {
            out[i] = r;
        }
        nhs.iter()
            .zip(out.into_iter().zip(foreign))
            .map(|(n, (r, foreign))| match foreign {
                Some(p) => Err(CniError::internal(format!(
                    "writing {n}: the id is taken by a nexthop of protocol {p}, not ours"
                ))),
                None => r.map_err(|e| os(&format!("writing {n}"), e)),
            })
            .collect()
    }

    /// Delete the nexthops `ids` that carry `protocol` (and with them any route that
    /// still uses them); absent ones and other owners' are left alone.
    pub(super) fn delete(&self, ids: &[u32], protocol: u8) -> Vec<Result<()>> {
        let mut out = vec![Ok(()); ids.len()];
        let mut ours = Vec::new();
        for (i, owner) in self.owners(ids.iter().copied()).into_iter().enumerate() {
            match owner {
                Ok(Some(p)) if p == protocol => ours.push(i),
                Ok(_) => {}
                Err(e) => out[i] = Err(e),
            }
        }
        let deleted = self.batch(ours.iter().map(|&i| (RTM_DELNEXTHOP, 0, id_body(ids[i]))));
        for (&i, r) in ours.iter().zip(deleted) {
            out[i] = r;
        }
        ids.iter()
            .zip(out)
            .map(|(id, r)| match r {
                Err(e) if e != libc::ENOENT => Err(os(&format!("deleting nexthop id {id}"), e)),
                _ => Ok(()),
            })
            .collect()
    }

    /// The protocol of each nexthop `ids`, `None` if there is no such nexthop.
    fn owners(&self, ids: impl Iterator<Item = u32>) -> Vec<std::result::Result<Option<u8>, i32>> {
        let gets = ids.map(|id| (RTM_GETNEXTHOP, 0, id_body(id)));
        self.exchange(gets)
            .into_iter()
            .map(|r| match r {
                Err(libc::ENOENT) => Ok(None),
                r => r,
            })
            .collect()
    }

    /// Send `msgs` (type, flags beyond REQUEST|ACK, body) in datagrams of [`CHUNK`];
    /// each message's errno result.
    fn batch(
        &self,
        msgs: impl Iterator<Item = (u16, u16, Vec<u8>)>,
    ) -> Vec<std::result::Result<(), i32>> {
        let acked = msgs.map(|(kind, flags, body)| (kind, NLM_F_ACK | flags, body));
        self.exchange(acked)
            .into_iter()
            .map(|r| r.map(drop))
            .collect()
    }

    /// Send `msgs` (type, flags beyond REQUEST, body) in datagrams of [`CHUNK`] and
    /// wait for one reply each: the protocol of a nexthop sent back, `None` for an
    /// acknowledgement, or the errno.
    fn exchange(
        &self,
        msgs: impl Iterator<Item = (u16, u16, Vec<u8>)>,
    ) -> Vec<std::result::Result<Option<u8>, i32>> {
        let msgs: Vec<_> = msgs.collect();
        // Unanswered until a reply says otherwise.
        let mut out = vec![Err(libc::EIO); msgs.len()];
        for (base, chunk) in msgs.chunks(CHUNK).enumerate().map(|(i, c)| (i * CHUNK, c)) {
            let first = self.seqs(chunk.len());
            let mut req = Vec::new();
            for (i, (kind, flags, body)) in chunk.iter().enumerate() {
                request(&mut req, *kind, *flags, first.wrapping_add(i as u32), body);
            }
            if let Err(e) = self.0.send(&req, 0) {
                out[base..base + chunk.len()].fill(Err(e.raw_os_error().unwrap_or(libc::EIO)));
                continue;
            }
            let mut answered = vec![false; chunk.len()];
            let mut pending = chunk.len();
            let r = self.replies("nexthop requests", |m| {
                let k = m.seq.wrapping_sub(first) as usize;
                if k >= chunk.len() || answered[k] {
                    return Ok(false);
                }
                out[base + k] = match (m.kind, errno(m.body)) {
                    (RTM_NEWNEXTHOP, _) => Ok(parse_protocol(m.body)),
                    (NLMSG_ERROR, 0) => Ok(None),
                    (NLMSG_ERROR, e) => Err(e),
                    _ => return Ok(false),
                };
                answered[k] = true;
                pending -= 1;
                Ok(pending == 0)
            });
            if let Err(e) = r {
                for (k, _) in answered.iter().enumerate().filter(|(_, a)| !**a) {
                    out[base + k] = Err(e);
                }
            }
        }
        out
    }

    /// Read reply datagrams, handing each message to `on` until it returns `Ok(true)`
    /// (done) or `Err(errno)`.
    fn replies(
        &self,
        what: &str,
        mut on: impl FnMut(&crate::nfnetlink::Msg<'_>) -> std::result::Result<bool, i32>,
    ) -> std::result::Result<(), i32> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .0
                .recv(&mut &mut buf[..], 0)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            let msgs = crate::nfnetlink::messages(&buf[..n]).ok_or_else(|| {
                crate::debug!("{what}: malformed reply");
                libc::EPROTO
            })?;
            for m in &msgs {
                if on(m)? {
                    return Ok(());
                }
            }
        }
    }
}

fn request(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &[u8]) {
    crate::nfnetlink::frame(buf, kind, NLM_F_REQUEST | flags, seq, body);
}

/// `struct nhmsg`: family, scope (always 0), protocol, reserved, flags.
fn nhmsg(family: u8, protocol: u8, flags: u32) -> Vec<u8> {
    let mut b = vec![family, 0, protocol, 0];
    b.extend(flags.to_ne_bytes());
    b
}

fn write_body(n: &Nexthop) -> Vec<u8> {
    let mut b = nhmsg(
        AF_INET,
        n.protocol,
        if n.onlink { RTNH_F_ONLINK } else { 0 },
    );
    let mut a = Attrs::default();
    a.put(NHA_ID, &n.id.to_ne_bytes())
        .put(NHA_OIF, &n.oif.to_ne_bytes())
        .put(NHA_GATEWAY, &n.gw.octets());
    b.extend(a.0);
    b
}

fn id_body(id: u32) -> Vec<u8> {
    let mut b = nhmsg(0, 0, 0);
    b.extend(Attrs::default().put(NHA_ID, &id.to_ne_bytes()).0.iter());
    b
}

fn parse_protocol(body: &[u8]) -> Option<u8> {
    body.get(2).copied()
}

/// A dumped nexthop, if it is a single IPv4 gateway on a device.
fn parse(body: &[u8]) -> Option<Nexthop> {
    let hdr = body.get(..8)?;
    if hdr[0] != AF_INET {
        return None;
    }
    let flags = u32::from_ne_bytes(hdr[4..8].try_into().ok()?);
    let (mut id, mut oif, mut gw) = (None, None, None);
    for (kind, p) in crate::nfnetlink::attrs(&body[8..]) {
        match kind {
            NHA_ID => id = Some(u32::from_ne_bytes(p.try_into().ok()?)),
            NHA_OIF => oif = Some(u32::from_ne_bytes(p.try_into().ok()?)),
            NHA_GATEWAY => gw = Some(Ipv4Addr::from(<[u8; 4]>::try_from(p).ok()?)),
            _ => {}
        }
    }
    Some(Nexthop {
        id: id?,
        gw: gw?,
        oif: oif?,
        onlink: flags & RTNH_F_ONLINK != 0,
        protocol: hdr[2],
    })
}

fn io(what: &str, e: std::io::Error) -> CniError {
    CniError::io(what.to_string(), e)
}

fn os(what: &str, errno: i32) -> CniError {
    CniError::internal(format!(
        "{what}: {}",
        std::io::Error::from_raw_os_error(errno)
    ))
}
