//! nfnetlink framing shared by the nf_tables element batches ([`crate::nft`]) and
//! ctnetlink ([`crate::conntrack`]): attributes, message headers with their
//! `nfgenmsg`, splitting a reply datagram, and the socket.

use netlink_sys::{Socket, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

pub(crate) const NETLINK_NETFILTER: isize = 12;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLMSG_ERROR: u16 = 0x2;
pub(crate) const NLMSG_DONE: u16 = 0x3;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
/// An attribute's type without the NESTED / NET_BYTEORDER flag bits.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
/// `struct nfgenmsg`: family, version, res_id (big-endian).
pub(crate) const NFGENMSG_LEN: usize = 4;

/// Netlink attributes written into a growing buffer (4-byte aligned).
#[derive(Default)]
pub(crate) struct Attrs(pub(crate) Vec<u8>);

impl Attrs {
    pub(crate) fn put(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0.extend((len as u16).to_ne_bytes());
        self.0.extend(kind.to_ne_bytes());
        self.0.extend(payload);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    /// A NUL-terminated string.
    pub(crate) fn put_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(kind, &b)
    }

    pub(crate) fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::default();
        f(&mut inner);
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

/// The attributes in `buf` as (type without flag bits, payload); stops at the first
/// malformed one.
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(buf.get(0..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(buf.get(2..4)?.try_into().ok()?) & NLA_TYPE_MASK;
        let payload = buf.get(4..len)?;
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, payload))
    })
}

/// Append one message: netlink header (port id 0: the kernel fills in ours),
/// nfgenmsg (version 0), attributes.
pub(crate) fn message(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let mut body = Vec::with_capacity(NFGENMSG_LEN + attrs.len());
    body.extend([family, 0]);
    body.extend(res_id.to_be_bytes());
    body.extend(attrs);
    frame(buf, kind, flags, seq, &body);
}

/// Append one netlink message of any family: the header (port id 0: the kernel fills
/// in ours) and `body`, padded to 4 bytes.
pub(crate) fn frame(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &[u8]) {
    let len = NLMSG_HDRLEN + body.len();
    buf.extend((len as u32).to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend(flags.to_ne_bytes());
    buf.extend(seq.to_ne_bytes());
    buf.extend(0u32.to_ne_bytes());
    buf.extend(body);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// One message of a reply datagram.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Msg<'a> {
    pub(crate) kind: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    pub(crate) body: &'a [u8],
}

/// The messages of one datagram; `None` if it is malformed.
pub(crate) fn messages(mut buf: &[u8]) -> Option<Vec<Msg<'_>>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let hdr = buf.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes(hdr[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        out.push(Msg {
            kind: u16::from_ne_bytes(hdr[4..6].try_into().expect("2 bytes")),
            flags: u16::from_ne_bytes(hdr[6..8].try_into().expect("2 bytes")),
            seq: u32::from_ne_bytes(hdr[8..12].try_into().expect("4 bytes")),
            body: &buf[NLMSG_HDRLEN..len],
        });
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Some(out)
}

/// The errno of an NLMSG_ERROR or NLMSG_DONE body (0: success); EPROTO if cut short.
pub(crate) fn errno(body: &[u8]) -> i32 {
    body.get(..4).map_or(libc::EPROTO, |b| {
        -i32::from_ne_bytes(b.try_into().expect("4 bytes"))
    })
}

/// A NETLINK_NETFILTER socket of the calling thread's namespace, bound and
/// connected to the kernel.
pub(crate) fn open() -> std::io::Result<NfSocket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    Ok(NfSocket(Some(sock)))
}

/// A NETLINK_NETFILTER socket released after this process has exited
/// ([`crate::background::close`]): its release may wait on nf_tables' release
/// worker for ~10 ms, whichever program's transaction queued the work.
pub(crate) struct NfSocket(Option<Socket>);

impl std::ops::Deref for NfSocket {
    type Target = Socket;

    fn deref(&self) -> &Socket {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for NfSocket {
    fn drop(&mut self) {
        if let Some(sock) = self.0.take() {
            // SAFETY: into_raw_fd hands over the socket's only descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(sock.into_raw_fd()) };
            crate::background::close(fd);
        }
    }
}

/// Make `sock` take a batch of `bytes` holding `messages` acknowledged messages.
/// The kernel refuses a send larger than the send buffer (EMSGSIZE), and handles the
/// whole batch inside sendmsg, queueing every reply before the first is read: an ack
/// costs ~1 KiB of receive buffer (its skb's true size), so the default (208 KiB)
/// overflows (ENOBUFS, replies lost) at ~200 messages. Errors echo only the failed
/// message's header (NETLINK_CAP_ACK). As nft does: the FORCE options pass over
/// net.core.[rw]mem_max but need CAP_NET_ADMIN in the initial user namespace; without
/// it the plain ones, capped at the maximum, are the best there is. Best effort: a
/// batch too large for what was granted fails with the kernel's own error.
pub(crate) fn size_for_batch(sock: &Socket, bytes: usize, messages: usize) {
    let fd = sock.as_raw_fd();
    let _ = setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, 1);
    let wanted = |n: usize| i32::try_from(n + 65536).unwrap_or(i32::MAX);
    let sizes = [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, wanted(bytes)),
        (
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            wanted(messages.saturating_mul(2048)),
        ),
    ];
    for (force, plain, size) in sizes.into_iter().filter(|s| s.2 > DEFAULT_BUFFER) {
        if setsockopt(fd, libc::SOL_SOCKET, force, size).is_err() {
            let _ = setsockopt(fd, libc::SOL_SOCKET, plain, size);
        }
    }
}

/// net.core.[rw]mem_default's usual value.
const DEFAULT_BUFFER: i32 = 212_992;
const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;

fn setsockopt(fd: i32, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: an int option, passed by pointer with its exact size, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
