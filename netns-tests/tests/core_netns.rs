//! weft-core's netns module in real namespaces: code runs inside on a throwaway
//! thread, the caller never moves, and netlink sockets stay bound where they were opened.

use netns_tests::{TestNetns, require_root};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use weft_core::netns::NetNs;

fn ns_of(path: &str) -> PathBuf {
    std::fs::read_link(path).unwrap()
}

#[test]
fn run_enters_the_namespace_and_leaves_the_caller_alone() {
    if !require_root() {
        return;
    }
    let t = TestNetns::new();
    let ns = NetNs::open(t.path()).unwrap();
    assert!(!ns.is_current().unwrap());
    let inside = ns.run(|| ns_of("/proc/thread-self/ns/net")).unwrap();
    assert_eq!(inside, ns_of(&t.path_str()));
    assert_eq!(
        ns_of("/proc/thread-self/ns/net"),
        ns_of("/proc/self/ns/net"),
        "the caller never moved"
    );
}

#[test]
fn netlink_socket_is_bound_to_the_namespace() {
    if !require_root() {
        return;
    }
    let t = TestNetns::new();
    let sock = NetNs::open(t.path())
        .unwrap()
        .netlink_socket(0 /* NETLINK_ROUTE */)
        .unwrap();
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd for the socket's netns.
    let ns_fd = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS) };
    assert!(ns_fd >= 0, "SIOCGSKNS: {}", std::io::Error::last_os_error());
    assert_eq!(
        ns_of(&format!("/proc/self/fd/{ns_fd}")),
        ns_of(&t.path_str())
    );
    // SAFETY: ns_fd was just returned to us and is closed exactly once.
    unsafe { libc::close(ns_fd) };
}

#[test]
fn a_namespace_that_vanishes_is_code_3() {
    if !require_root() {
        return;
    }
    let t = TestNetns::new();
    let path = t.path_str();
    drop(t);
    assert_eq!(NetNs::open(&path).unwrap_err().code, 3);
}
