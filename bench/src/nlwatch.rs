//! When did each peer entry reach the kernel? A netlink socket inside the node's
//! namespace, joined to the route and neighbour multicast groups, timestamps each
//! notification of an expected entry (read in batches every 2 ms, so the error is
//! at most that). Cheaper and more precise than polling dumps of 10,000 routes
//! (which would steal CPU from the daemon under test on a 2-core machine), and it
//! tells the phases apart: neighbours and FDB entries are written before the
//! routes that use them.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use weft_core::netns::NetNs;

const RTM_NEWROUTE: u16 = 24;
const RTM_NEWNEIGH: u16 = 28;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const NUD_PERMANENT: u16 = 0x80;
const RTA_DST: u16 = 1;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const AF_BRIDGE: u8 = libc::AF_BRIDGE as u8;
const AF_INET: u8 = libc::AF_INET as u8;
/// How long the listener sleeps once it has drained the socket. Waking for each
/// of 30,000 notifications cost the writer 20-35% on 2 cores; batches of 2 ms
/// do not, and bound the timestamps' error.
const POLL: std::time::Duration = std::time::Duration::from_millis(2);
/// Room for every notification of 10,000 peers should the reader fall behind.
const RCVBUF: libc::c_int = 256 << 20;

/// One peer's entries: its subnet (the route's destination and the neighbour's
/// address, host order) and its VTEP MAC (the FDB entry's key).
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    pub subnet: u32,
    pub mac: [u8; 6],
}

/// When each expected entry was first announced, indexed like the expectations.
#[derive(Debug, Default)]
pub struct Timeline {
    pub route: Vec<Option<Instant>>,
    pub neigh: Vec<Option<Instant>>,
    pub fdb: Vec<Option<Instant>>,
    /// The socket overflowed (ENOBUFS): announcements were lost, the timeline is
    /// incomplete and the caller must find out otherwise.
    pub overflowed: bool,
}

impl Timeline {
    fn new(n: usize) -> Timeline {
        Timeline {
            route: vec![None; n],
            neigh: vec![None; n],
            fdb: vec![None; n],
            overflowed: false,
        }
    }

    /// First and last announcement among `lists`.
    pub fn span(lists: &[&[Option<Instant>]]) -> Option<(Instant, Instant)> {
        let all = || lists.iter().flat_map(|l| l.iter().flatten().copied());
        Some((all().min()?, all().max()?))
    }

    /// When all three entries of peer `k` were there.
    pub fn peer_done(&self, k: usize) -> Option<Instant> {
        Some(self.route[k]?.max(self.neigh[k]?).max(self.fdb[k]?))
    }
}

/// A listener thread; [`Watcher::finish`] stops it and hands over the timeline.
pub struct Watcher {
    handle: Option<JoinHandle<Timeline>>,
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicUsize>,
    total: usize,
}

impl Watcher {
    /// Subscribe inside the namespace at `netns` (before anything is written, so
    /// nothing is missed) and start listening on a thread of its own.
    pub fn start(netns: &Path, expected: &[Expected]) -> Result<Watcher> {
        let ns = NetNs::open(netns)?;
        let fd = ns.run(subscribe)??;
        let mut subnets = HashMap::with_capacity(expected.len());
        let mut macs = HashMap::with_capacity(expected.len());
        for (k, e) in expected.iter().enumerate() {
            subnets.insert(e.subnet, k);
            macs.insert(e.mac, k);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicUsize::new(0));
        let total = 3 * expected.len();
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let handle = std::thread::Builder::new()
            .name("nlwatch".into())
            .spawn(move || listen(fd, &subnets, &macs, &stop2, &seen2, total))
            .context("spawning the netlink listener thread")?;
        Ok(Watcher {
            handle: Some(handle),
            stop,
            seen,
            total,
        })
    }

    /// All expected entries announced, or the socket overflowed.
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Expected entries announced so far, of `3 × peers`.
    pub fn progress(&self) -> (usize, usize) {
        (self.seen.load(Ordering::Relaxed), self.total)
    }

    pub fn finish(mut self) -> Result<Timeline> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("finished once");
        handle
            .join()
            .map_err(|_| anyhow!("the netlink listener thread panicked"))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A NETLINK_ROUTE socket in the calling thread's namespace, joined to the IPv4
/// route and the neighbour groups (FDB entries are announced there too), with a
/// big receive buffer and a short receive timeout so the thread can be stopped.
fn subscribe() -> Result<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor we own; the structs are zeroed
    // and sized as the kernel expects.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("netlink socket");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let setopt = |level, name, value: libc::c_int| {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF) != 0 {
            return Err(io::Error::last_os_error()).context("SO_RCVBUFFORCE");
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error()).context("SO_RCVTIMEO");
        }
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        sa.nl_groups = RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE;
        if libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error()).context("binding the netlink socket");
        }
        Ok(fd)
    }
}

fn listen(
    fd: OwnedFd,
    subnets: &HashMap<u32, usize>,
    macs: &HashMap<[u8; 6], usize>,
    stop: &AtomicBool,
    seen: &AtomicUsize,
    total: usize,
) -> Timeline {
    let mut tl = Timeline::new(subnets.len());
    let mut buf = vec![0u8; 1 << 16];
    let mut count = 0;
    while count < total && !stop.load(Ordering::Relaxed) {
        // SAFETY: reading into a buffer we own, within its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let now = Instant::now();
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => {
                    std::thread::sleep(POLL);
                    continue;
                }
                Some(libc::EINTR) => continue,
                // ENOBUFS, or anything else: the record has a hole.
                _ => {
                    tl.overflowed = true;
                    return tl;
                }
            }
        }
        for (ty, body) in messages(&buf[..n as usize]) {
            let slot = match ty {
                RTM_NEWROUTE => route(body)
                    .and_then(|dst| subnets.get(&dst))
                    .map(|&k| &mut tl.route[k]),
                RTM_NEWNEIGH => match neigh(body) {
                    Some(Entry::Neigh(ip)) => subnets.get(&ip).map(|&k| &mut tl.neigh[k]),
                    Some(Entry::Fdb(mac)) => macs.get(&mac).map(|&k| &mut tl.fdb[k]),
                    None => None,
                },
                _ => None,
            };
            if let Some(slot @ None) = slot {
                *slot = Some(now);
                count += 1;
                seen.store(count, Ordering::Relaxed);
            }
        }
    }
    tl
}

/// The (type, payload) of each netlink message in one datagram.
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        if len < 16 || len > buf.len() {
            return None;
        }
        let body = &buf[16..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, body))
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes (type, payload) after a fixed header of `skip` bytes.
fn attrs(body: &[u8], skip: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = body.get(skip..).unwrap_or_default();
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let payload = &rest[4..len];
        rest = &rest[align4(len).min(rest.len())..];
        Some((ty, payload))
    })
}

/// The destination of an IPv4 route of weft's protocol.
fn route(body: &[u8]) -> Option<u32> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    if body.len() < 12 || body[0] != AF_INET || body[5] != weft_core::backend::ROUTE_PROTOCOL {
        return None;
    }
    attrs(body, 12)
        .find(|(ty, p)| *ty == RTA_DST && p.len() == 4)
        .map(|(_, p)| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
}

enum Entry {
    Neigh(u32),
    Fdb([u8; 6]),
}

/// A permanent IPv4 neighbour (its address) or a bridge-family FDB entry (its MAC).
fn neigh(body: &[u8]) -> Option<Entry> {
    // struct ndmsg: family, pad1, pad2 (u16), ifindex (i32), state (u16), flags, type.
    if body.len() < 12 {
        return None;
    }
    let state = u16::from_ne_bytes([body[8], body[9]]);
    match body[0] {
        AF_INET if state & NUD_PERMANENT != 0 => attrs(body, 12)
            .find(|(ty, p)| *ty == NDA_DST && p.len() == 4)
            .map(|(_, p)| Entry::Neigh(u32::from_be_bytes([p[0], p[1], p[2], p[3]]))),
        AF_BRIDGE => attrs(body, 12)
            .find(|(ty, p)| *ty == NDA_LLADDR && p.len() == 6)
            .and_then(|(_, p)| p.try_into().ok())
            .map(Entry::Fdb),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(ty: u16, body: &[u8]) -> Vec<u8> {
        let len = 16 + body.len();
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend(ty.to_ne_bytes());
        m.extend([0; 10]);
        m.extend(body);
        m.resize(align4(len), 0);
        m
    }

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let len = 4 + payload.len();
        let mut a = (len as u16).to_ne_bytes().to_vec();
        a.extend(ty.to_ne_bytes());
        a.extend(payload);
        a.resize(align4(len), 0);
        a
    }

    #[test]
    fn routes_neighbours_and_fdb_entries_are_recognised() {
        let mut rt = vec![AF_INET, 24, 0, 0, 254, 87, 0, 1, 0, 0, 0, 0];
        rt.extend(attr(RTA_DST, &[10, 1, 2, 0]));
        let mut other = rt.clone();
        other[5] = 3; // proto boot: not ours
        let mut nb = vec![AF_INET, 0, 0, 0, 7, 0, 0, 0];
        nb.extend(NUD_PERMANENT.to_ne_bytes());
        nb.extend([0, 1]);
        nb.extend(attr(NDA_DST, &[10, 1, 2, 0]));
        nb.extend(attr(NDA_LLADDR, &[2, 0, 0, 0, 0, 9]));
        let mut fdb = vec![AF_BRIDGE, 0, 0, 0, 7, 0, 0, 0];
        fdb.extend(NUD_PERMANENT.to_ne_bytes());
        fdb.extend([2, 1]);
        fdb.extend(attr(NDA_LLADDR, &[2, 0, 0, 0, 0, 9]));
        fdb.extend(attr(NDA_DST, &[10, 77, 0, 2]));

        let mut dgram = nlmsg(RTM_NEWROUTE, &rt);
        dgram.extend(nlmsg(RTM_NEWROUTE, &other));
        dgram.extend(nlmsg(RTM_NEWNEIGH, &nb));
        dgram.extend(nlmsg(RTM_NEWNEIGH, &fdb));
        let msgs: Vec<_> = messages(&dgram).collect();
        assert_eq!(msgs.len(), 4);
        assert_eq!(route(msgs[0].1), Some(0x0a01_0200));
        assert_eq!(route(msgs[1].1), None);
        assert!(matches!(neigh(msgs[2].1), Some(Entry::Neigh(0x0a01_0200))));
        assert!(matches!(
            neigh(msgs[3].1),
            Some(Entry::Fdb([2, 0, 0, 0, 0, 9]))
        ));
    }
}
