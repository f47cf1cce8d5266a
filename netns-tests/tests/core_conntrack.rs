//! weft-core's `conntrack` module against the kernel's connection tracking, each test
//! in its own throwaway network namespace (never the host's table). Entries come from
//! real datagrams over `lo`; the code under test runs on a thread inside the namespace
//! (`NetNs::run`); the checks read `/proc/net/nf_conntrack` from a process inside it,
//! a path independent of ctnetlink.

use netns_tests::{TestNetns, require_root};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use weft_core::conntrack::delete_by_dport;
use weft_core::netns::NetNs;

const UDP: u8 = 17;
const TCP: u8 = 6;
const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Run `f` inside `ns` (on a throwaway thread).
fn inside<T: Send>(ns: &TestNetns, f: impl FnOnce() -> T + Send) -> T {
    NetNs::open(ns.path()).unwrap().run(f).unwrap()
}

/// `delete_by_dport` inside `ns`, panicking on error.
fn delete(ns: &TestNetns, v4: bool, proto: u8, ports: &[u16]) -> usize {
    inside(ns, || delete_by_dport(v4, proto, ports)).unwrap()
}

/// A namespace whose traffic is tracked. Conntrack only tracks in a namespace where
/// something uses it: here an nft chain with a `ct state` rule. `extra` adds rules
/// to a chain that runs before conntrack (priority raw), e.g. to set zones.
fn tracking_netns(extra: &[&str]) -> TestNetns {
    let ns = TestNetns::new();
    let mut script = String::from(
        "add table inet weft_ct; \
         add chain inet weft_ct raw { type filter hook output priority raw; }; \
         add chain inet weft_ct out { type filter hook output priority 0; }; \
         add rule inet weft_ct out ct state new counter",
    );
    for rule in extra {
        script += &format!("; add rule inet weft_ct raw {rule}");
    }
    ns.exec_ok(&["nft", &script]);
    ns
}

/// Send one datagram to `ip:dport` from each of `n` source ports starting at
/// `sport`: one conntrack entry each (nothing listens; the entries stay UNREPLIED
/// for 30 s, longer than any test).
fn send(ns: &TestNetns, ip: IpAddr, dport: u16, sport: u16, n: u16) {
    inside(ns, || {
        for p in sport..sport + n {
            let s = UdpSocket::bind(SocketAddr::new(ip, p)).unwrap();
            s.send_to(b"x", SocketAddr::new(ip, dport)).unwrap();
        }
    });
}

/// One line of the table: family, protocol, original destination port, zone fields.
#[derive(Debug)]
struct Flow {
    v4: bool,
    proto: u8,
    dport: u16,
    line: String,
}

/// The namespace's conntrack table (entries with ports).
fn table(ns: &TestNetns) -> Vec<Flow> {
    let path = "/proc/net/nf_conntrack";
    assert!(
        std::path::Path::new(path).exists(),
        "these tests check through {path} (CONFIG_NF_CONNTRACK_PROCFS)"
    );
    // "ipv4 2 udp 17 29 src=… dst=… sport=… dport=5353 [UNREPLIED] src=… …": the
    // first dport= is the original direction's.
    ns.exec_ok(&["cat", path])
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dport = f.iter().find_map(|w| w.strip_prefix("dport="))?;
            Some(Flow {
                v4: f[0] == "ipv4",
                proto: f[3].parse().unwrap(),
                dport: dport.parse().unwrap(),
                line: line.to_string(),
            })
        })
        .collect()
}

/// How many UDP entries of the family go to `dport`.
fn count(table: &[Flow], v4: bool, dport: u16) -> usize {
    table
        .iter()
        .filter(|f| f.v4 == v4 && f.proto == UDP && f.dport == dport)
        .count()
}

#[test]
fn deletes_exactly_the_udp_entries_to_a_port_of_one_family() {
    if !require_root() {
        return;
    }
    let ns = tracking_netns(&[]);
    let (a, b) = (40001, 40002);
    send(&ns, V4, a, 20000, 2);
    send(&ns, V4, b, 20100, 1);
    send(&ns, V6, a, 20200, 1);
    let t = table(&ns);
    assert_eq!(
        (count(&t, true, a), count(&t, true, b), count(&t, false, a)),
        (2, 1, 1),
        "{t:#?}"
    );

    assert_eq!(delete(&ns, true, UDP, &[a]), 2);
    let t = table(&ns);
    assert_eq!(count(&t, true, a), 0, "{t:#?}");
    assert_eq!(count(&t, true, b), 1, "port b is untouched: {t:#?}");
    assert_eq!(count(&t, false, a), 1, "IPv6 is untouched: {t:#?}");
    assert_eq!(delete(&ns, true, UDP, &[a]), 0, "nothing left to delete");

    assert_eq!(delete(&ns, false, UDP, &[a]), 1);
    assert_eq!(delete(&ns, false, UDP, &[a]), 0);
    let t = table(&ns);
    assert_eq!((t.len(), t[0].v4, t[0].dport), (1, true, b), "{t:#?}");

    // Another protocol on the same port is not a match.
    assert_eq!(delete(&ns, true, TCP, &[b]), 0);
    assert_eq!(count(&table(&ns), true, b), 1);
    // Repeated and unused ports are fine.
    assert_eq!(delete(&ns, true, UDP, &[b, 9, b]), 1);
    assert!(table(&ns).is_empty());
    assert_eq!(delete(&ns, true, UDP, &[]), 0);
}

#[test]
fn a_table_larger_than_one_reply_datagram_is_dumped_whole() {
    if !require_root() {
        return;
    }
    let ns = tracking_netns(&[]);
    // ~200 bytes an entry: 1500 are about ten 32 KiB datagrams.
    send(&ns, V4, 40001, 20000, 1500);
    send(&ns, V4, 40002, 30000, 200);
    assert_eq!(count(&table(&ns), true, 40001), 1500);

    assert_eq!(delete(&ns, true, UDP, &[40001]), 1500);
    let t = table(&ns);
    assert_eq!(count(&t, true, 40001), 0);
    assert_eq!(count(&t, true, 40002), 200);
}

#[test]
fn entries_in_other_zones_are_deleted_too() {
    if !require_root() {
        return;
    }
    // Zone 7 for both directions (CTA_ZONE), zone 8 for the original direction only
    // (CTA_TUPLE_ZONE inside the tuple): the kernel looks entries up per zone.
    let ns = tracking_netns(&[
        "udp dport 40003 ct zone set 7",
        "udp dport 40004 ct original zone set 8",
    ]);
    send(&ns, V4, 40003, 20000, 1);
    send(&ns, V4, 40004, 20100, 1);
    send(&ns, V4, 40005, 20200, 1);
    let t = table(&ns);
    assert_eq!(t.len(), 3, "{t:#?}");
    assert!(t.iter().any(|f| f.line.contains(" zone=7 ")), "{t:#?}");
    assert!(t.iter().any(|f| f.line.contains(" zone-orig=8 ")), "{t:#?}");

    assert_eq!(delete(&ns, true, UDP, &[40003, 40004]), 2);
    let t = table(&ns);
    assert_eq!((t.len(), t[0].dport), (1, 40005), "{t:#?}");
}
