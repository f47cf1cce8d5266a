//! weft-core's `nft` and `masq` modules against real nftables, each test in its own
//! throwaway network namespace (never the host's ruleset). The code under test runs
//! on a thread inside the namespace (`NetNs::run`), so the `nft` processes it spawns
//! live there; the checks go through `nsenter … nft`, a separate path.

use ipnet::IpNet;
// `nft_in`: the nft command line in a namespace (`nft` here is weft-core's module).
use netns_tests::{TestNetns, has_nft_table, inside, nft as nft_in, require_root};
use std::net::IpAddr;
use std::time::{Duration, Instant};
use weft_core::masq;
use weft_core::nft::{self, Comment, ErrorKind, Family, Ident, Rule, Transaction, Value, Verdict};

fn masq_table(ns: &TestNetns) -> String {
    nft_in(ns, &["list", "table", "inet", masq::TABLE])
}

fn has_table(ns: &TestNetns) -> bool {
    has_nft_table(ns, "inet", masq::TABLE)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The chain of `subnet` of `network`.
fn chain(network: &str, subnet: &str) -> String {
    masq::network_chain(network, &net(subnet))
        .as_str()
        .to_string()
}

/// An attachment's owner value as `nft list` prints it.
fn owner(network: &str, cid: &str, ifname: &str) -> String {
    let o = masq::Attachment::new(network, cid, ifname).owner();
    format!(
        "0x{:08x} . 0x{:08x} . 0x{:08x} . 0x{:08x}",
        o[0], o[1], o[2], o[3]
    )
}

/// How often `what` occurs in `listing`.
fn count(listing: &str, what: &str) -> usize {
    listing.matches(what).count()
}

fn id(s: &str) -> Ident {
    Ident::new(s).unwrap()
}

// ---------------------------------------------------------------------------------
// nft: transactions
// ---------------------------------------------------------------------------------

#[test]
fn transaction_is_atomic_and_errors_name_the_failing_statement() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let t = id("weft_t");
    let mut setup = Transaction::new();
    setup
        .add_table(Family::Inet, &t, Some(&Comment::new("test \"table\"")))
        .add_chain(Family::Inet, &t, &id("a"), None, None);
    inside(&ns, || setup.apply()).unwrap();

    // A good statement followed by a bad one: nothing is applied.
    let mut tx = Transaction::new();
    tx.add_chain(Family::Inet, &t, &id("b"), None, None)
        .delete_chain(Family::Inet, &t, &id("nosuch"));
    let err = inside(&ns, || tx.apply()).unwrap_err();
    assert_eq!(err.code, 999);
    assert!(
        err.msg.contains("No such file or directory")
            && err.msg.contains("line 2")
            && err.msg.contains("delete chain inet weft_t nosuch"),
        "{err:?}"
    );
    assert!(err.details.contains("/dev/stdin:2:"), "{err:?}");
    let listing = nft_in(&ns, &["list", "table", "inet", "weft_t"]);
    assert!(!listing.contains("chain b"), "{listing}");
    assert!(listing.contains("comment \"test _table_\""), "{listing}");

    // The teardown mode drops the failing unit and applies the rest.
    inside(&ns, || tx.apply_teardown()).unwrap();
    assert!(nft_in(&ns, &["list", "table", "inet", "weft_t"]).contains("chain b"));

    // Other errors are not ignored.
    let mut busy = Transaction::new();
    busy.add_rule(
        Family::Inet,
        &t,
        &id("a"),
        &Rule::new().kw("jump").value(Value::Kw("b")),
    )
    .delete_chain(Family::Inet, &t, &id("b"));
    let err = inside(&ns, || busy.apply_ignoring(&[ErrorKind::NotFound])).unwrap_err();
    assert!(
        err.has(ErrorKind::Busy) || err.only(&[ErrorKind::Busy]),
        "{err:?}"
    );
}

#[test]
fn teardown_of_a_partly_deleted_set_of_objects_succeeds_in_few_runs() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let (t, m) = (id("weft_t"), id("m"));
    let mut setup = Transaction::new();
    setup
        .add_table(Family::Ip, &t, None)
        .add_set(Family::Ip, &t, &m, &nft::SetDecl::set("ipv4_addr"))
        .add_elements(
            Family::Ip,
            &t,
            &m,
            &[
                nft::Element::new(ip("10.0.0.1")),
                nft::Element::new(ip("10.0.0.3")),
            ],
        );
    inside(&ns, || setup.apply()).unwrap();
    let mut del = Transaction::new();
    for a in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"] {
        del.delete_elements(Family::Ip, &t, &m, &[Value::Addr(ip(a))]);
    }
    del.delete_chain(Family::Ip, &t, &id("gone"));
    let dropped = inside(&ns, || del.apply_ignoring(&[ErrorKind::NotFound])).unwrap();
    assert_eq!(dropped.len(), 3, "{dropped:?}");
    let listing = nft_in(&ns, &["list", "set", "ip", "weft_t", "m"]);
    assert!(!listing.contains("10.0.0."), "{listing}");
    // Everything gone: succeeds again, and so does a teardown of a missing table.
    inside(&ns, || del.apply_teardown()).unwrap();
    let mut other = Transaction::new();
    other.flush_chain(Family::Ip, &id("nosuch"), &id("c"));
    inside(&ns, || other.apply_teardown()).unwrap();
}

/// Element-only transactions go to the kernel over nfnetlink (no nft exec); what they
/// leave must list exactly like the same statements run through `nft -f -`, and
/// their errors must name the failing statement like nft's.
#[test]
fn element_statements_over_netlink_match_nft() {
    if !require_root() {
        return;
    }
    let (direct, text) = (TestNetns::new(), TestNetns::new());
    let t = id("weft_t");
    let mut setup = Transaction::new();
    setup
        .add_table(Family::Inet, &t, None)
        .add_chain(Family::Inet, &t, &id("target"), None, None)
        .add_set(
            Family::Inet,
            &t,
            &id("v"),
            &nft::SetDecl::map("ipv6_addr", "verdict"),
        )
        .add_set(
            Family::Inet,
            &t,
            &id("o"),
            &nft::SetDecl::map("ipv4_addr", "mark . mark"),
        );
    let mut elems = Transaction::new();
    elems
        .add_elements(
            Family::Inet,
            &t,
            &id("v"),
            &[
                nft::Element::new(ip("fd00::1"))
                    .comment(Comment::new("net:a id:b if:c"))
                    .verdict(Verdict::Jump(id("target"))),
                nft::Element::new(ip("fd00::2")).verdict(Verdict::Drop),
            ],
        )
        .create_elements(
            Family::Inet,
            &t,
            &id("o"),
            &[nft::Element::new(ip("10.1.2.3"))
                .value(Value::Concat(vec![Value::Hex(7), Value::Hex(0xfffffffe)]))],
        )
        .delete_elements(Family::Inet, &t, &id("v"), &[Value::Addr(ip("fd00::2"))]);
    for ns in [&direct, &text] {
        inside(ns, || setup.apply()).unwrap();
    }
    inside(&direct, || elems.apply()).unwrap();
    let script = elems.to_string();
    inside(&text, || nft::run_script(&script)).unwrap();
    let list = |ns: &TestNetns| nft_in(ns, &["list", "table", "inet", "weft_t"]);
    assert_eq!(list(&direct), list(&text));
    assert!(list(&direct).contains("fd00::1 comment \"net:a id:b if:c\" : jump target"));
    // Errors: the `create` of an existing key and the `delete` of a missing one, by
    // line; nothing of the batch applied.
    let mut again = Transaction::new();
    again
        .add_elements(
            Family::Inet,
            &t,
            &id("v"),
            &[nft::Element::new(ip("fd00::3")).verdict(Verdict::Accept)],
        )
        .create_elements(
            Family::Inet,
            &t,
            &id("o"),
            &[nft::Element::new(ip("10.1.2.3"))
                .value(Value::Concat(vec![Value::Hex(7), Value::Hex(0xfffffffe)]))],
        )
        .delete_elements(Family::Inet, &t, &id("v"), &[Value::Addr(ip("fd00::9"))]);
    let err = inside(&direct, || again.try_apply()).unwrap_err();
    let nft::NftError::Failed { errors, .. } = &err else {
        panic!("{err:?}")
    };
    let got: Vec<(usize, ErrorKind)> = errors.iter().map(|e| (e.line, e.kind)).collect();
    assert_eq!(
        got,
        [(2, ErrorKind::Exists), (3, ErrorKind::NotFound)],
        "{err}"
    );
    assert!(
        errors[1]
            .statement
            .starts_with("delete element inet weft_t v"),
        "{err}"
    );
    assert!(!list(&direct).contains("fd00::3"));
    // apply_ignoring drops exactly the failing units.
    let dropped = inside(&direct, || {
        again.apply_ignoring(&[ErrorKind::Exists, ErrorKind::NotFound])
    })
    .unwrap();
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(list(&direct).contains("fd00::3"));
    // A missing table is ENOENT as well.
    let mut missing = Transaction::new();
    missing.add_elements(
        Family::Inet,
        &id("nosuch"),
        &id("v"),
        &[nft::Element::new(ip("fd00::1"))],
    );
    let err = inside(&direct, || missing.try_apply()).unwrap_err();
    assert!(err.only(&[ErrorKind::NotFound]), "{err}");
}

#[test]
fn builder_output_is_accepted_by_nft() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let (t, c, m, s) = (id("weft_t"), id("c"), id("vm"), id("nets"));
    let mut tx = Transaction::new();
    tx.add_table(Family::Inet, &t, None)
        .add_chain(Family::Inet, &t, &c, None, Some(&Comment::new("x")))
        .add_set(
            Family::Inet,
            &t,
            &m,
            &nft::SetDecl::map("inet_proto . inet_service", "verdict"),
        )
        .add_set(
            Family::Inet,
            &t,
            &s,
            &nft::SetDecl::set("ipv4_addr")
                .flag("interval")
                .comment(Comment::new("subnets")),
        )
        .add_elements(
            Family::Inet,
            &t,
            &s,
            &[nft::Element::new(net("10.8.0.0/16"))],
        )
        .add_elements(
            Family::Inet,
            &t,
            &m,
            &[
                nft::Element::new(Value::Concat(vec![Value::Kw("tcp"), Value::from(8080u16)]))
                    .comment(Comment::new("hostport"))
                    .verdict(Verdict::Goto(c.clone())),
            ],
        )
        .add_rule(
            Family::Inet,
            &t,
            &c,
            &Rule::new()
                .kw("ip saddr")
                .set_ref(&s)
                .kw("counter")
                .verdict(&Verdict::Accept)
                .comment(&Comment::new("a \"quoted\" comment; flush ruleset")),
        );
    inside(&ns, || tx.apply()).unwrap();
    let listing = nft_in(&ns, &["list", "table", "inet", "weft_t"]);
    assert!(
        listing.contains("tcp . 8080 comment \"hostport\" : goto c"),
        "{listing}"
    );
    assert!(
        listing.contains("comment \"a _quoted_ comment_ flush ruleset\""),
        "{listing}"
    );
    let l = inside(&ns, || nft::list_table(Family::Inet, &t))
        .unwrap()
        .unwrap();
    assert_eq!(l.set("nets").unwrap().elements.len(), 1);
    assert!(
        inside(&ns, || nft::list_table(Family::Inet, &id("nosuch")))
            .unwrap()
            .is_none()
    );
}

// ---------------------------------------------------------------------------------
// masq
// ---------------------------------------------------------------------------------

const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Whether the listing has an element for `addr` (in either map).
fn has_elem(listing: &str, addr: &str) -> bool {
    [
        format!("{{ {addr} "),
        format!(", {addr} "),
        format!("\t{addr} "),
    ]
    .iter()
    .any(|p| listing.contains(p.as_str()))
}

#[test]
fn add_creates_table_chain_and_elements() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    assert!(!has_table(&ns));
    inside(&ns, || {
        masq::add("mynet", CID, "eth0", &[net("10.1.0.5/24")])
    })
    .unwrap();
    let c = chain("mynet", "10.1.0.0/24");
    let o = owner("mynet", CID, "eth0");
    let expected = format!(
        r#"table inet weft_masq {{
	comment "weft bridge ipMasq - managed by weft, do not edit"
	map pods_v4 {{
		type ipv4_addr : verdict
		elements = {{ 10.1.0.5 comment "net:mynet id:{CID} if:eth0" : jump {c} }}
	}}

	map pods_v6 {{
		type ipv6_addr : verdict
	}}

	map owners_v4 {{
		type ipv4_addr : mark . mark . mark . mark
		elements = {{ 10.1.0.5 : {o} }}
	}}

	map owners_v6 {{
		type ipv6_addr : mark . mark . mark . mark
	}}

	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr vmap @pods_v4
		ip6 saddr vmap @pods_v6
	}}

	chain {c} {{
		comment "net:mynet subnet:10.1.0.0/24"
		ip daddr 10.1.0.0/24 return
		ip daddr 224.0.0.0/4 return
		masquerade
	}}
}}
"#
    );
    assert_eq!(masq_table(&ns), expected);
    inside(&ns, || {
        masq::check("mynet", CID, "eth0", &[net("10.1.0.5/24")])
    })
    .unwrap();
    // A second pod of the network takes the fast path and shares the chain.
    inside(&ns, || {
        masq::add("mynet", "pod2", "eth0", &[net("10.1.0.6/24")])
    })
    .unwrap();
    let listing = masq_table(&ns);
    assert_eq!(count(&listing, "masquerade\n"), 1, "{listing}");
    assert_eq!(count(&listing, &format!(": jump {c}")), 2, "{listing}");
}

#[test]
fn add_twice_is_idempotent_and_dual_stack_works() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let ips = [net("10.1.0.5/24"), net("fd00::5/64")];
    inside(&ns, || masq::add("mynet", CID, "eth0", &ips)).unwrap();
    let first = masq_table(&ns);
    inside(&ns, || masq::add("mynet", CID, "eth0", &ips)).unwrap();
    assert_eq!(masq_table(&ns), first, "a repeated ADD changes nothing");
    assert_eq!(
        count(&first, "masquerade\n"),
        2,
        "one chain per subnet: {first}"
    );
    assert!(first.contains("ip6 daddr fd00::/64 return"), "{first}");
    assert!(first.contains("ip6 daddr ff00::/8 return"), "{first}");
    assert!(has_elem(&first, "fd00::5"), "{first}");
    inside(&ns, || masq::check("mynet", CID, "eth0", &ips)).unwrap();
}

#[test]
fn del_with_hint_removes_everything_and_repeats() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let ips = [net("10.1.0.5/24"), net("fd00::5/64")];
    let hint = [ip("10.1.0.5"), ip("fd00::5")];
    inside(&ns, || masq::add("mynet", CID, "eth0", &ips)).unwrap();
    inside(&ns, || masq::del("mynet", CID, "eth0", Some(&hint))).unwrap();
    let after = masq_table(&ns);
    assert!(
        !after.contains("10.1.0.5") && !after.contains("fd00::5"),
        "{after}"
    );
    assert!(
        after.contains("chain postrouting"),
        "the base stays: {after}"
    );
    // Again, with and without the hint, and with an empty one.
    inside(&ns, || masq::del("mynet", CID, "eth0", Some(&hint))).unwrap();
    inside(&ns, || masq::del("mynet", CID, "eth0", None)).unwrap();
    inside(&ns, || masq::del("mynet", CID, "eth0", Some(&[]))).unwrap();
    assert_eq!(masq_table(&ns), after);
}

#[test]
fn del_on_a_node_without_the_table_succeeds() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    inside(&ns, || {
        masq::del("mynet", CID, "eth0", Some(&[ip("10.1.0.5")]))
    })
    .unwrap();
    inside(&ns, || masq::del("mynet", CID, "eth0", None)).unwrap();
    assert_eq!(inside(&ns, || masq::gc("mynet", &[])).unwrap(), 0);
    assert!(!has_table(&ns), "DEL and GC create nothing");
}

#[test]
fn del_without_or_with_incomplete_hint() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let ips = [net("10.1.0.5/24"), net("fd00::5/64")];
    inside(&ns, || masq::add("mynet", "c1", "eth0", &ips)).unwrap();
    inside(&ns, || {
        masq::add("mynet", "c2", "eth0", &[net("10.1.0.6/24")])
    })
    .unwrap();
    inside(&ns, || masq::del("mynet", "c1", "eth0", None)).unwrap();
    let after = masq_table(&ns);
    assert!(
        !after.contains("10.1.0.5") && !after.contains("fd00::5"),
        "{after}"
    );
    inside(&ns, || {
        masq::check("mynet", "c2", "eth0", &[net("10.1.0.6/24")])
    })
    .unwrap();

    // A hint that misses an address removes what it names; a DEL without hint the rest.
    inside(&ns, || masq::add("mynet", "c1", "eth0", &ips)).unwrap();
    inside(&ns, || {
        masq::del("mynet", "c1", "eth0", Some(&[ip("10.1.0.5")]))
    })
    .unwrap();
    let after = masq_table(&ns);
    assert!(
        !after.contains("10.1.0.5") && after.contains("fd00::5"),
        "{after}"
    );
    inside(&ns, || masq::del("mynet", "c1", "eth0", None)).unwrap();
    assert!(!masq_table(&ns).contains("fd00::5"));
    inside(&ns, || {
        masq::check("mynet", "c2", "eth0", &[net("10.1.0.6/24")])
    })
    .unwrap();
}

#[test]
fn a_late_del_never_removes_the_new_owner_of_an_address() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let a = [net("10.1.0.5/24")];
    inside(&ns, || masq::add("mynet", "old", "eth0", &a)).unwrap();
    inside(&ns, || {
        masq::del("mynet", "old", "eth0", Some(&[ip("10.1.0.5")]))
    })
    .unwrap();
    inside(&ns, || masq::add("mynet", "new", "eth0", &a)).unwrap();
    // The runtime repeats the old pod's DEL, with the (now reused) address, or without.
    inside(&ns, || {
        masq::del("mynet", "old", "eth0", Some(&[ip("10.1.0.5")]))
    })
    .unwrap();
    inside(&ns, || masq::del("mynet", "old", "eth0", None)).unwrap();
    inside(&ns, || masq::check("mynet", "new", "eth0", &a)).unwrap();
}

#[test]
fn add_takes_over_an_address_left_by_a_dead_attachment() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let a = [net("10.1.0.5/24")];
    inside(&ns, || masq::add("mynet", "dead", "eth0", &a)).unwrap();
    // The dead pod's DEL never came; IPAM hands the address out again.
    inside(&ns, || masq::add("mynet", "new", "eth0", &a)).unwrap();
    inside(&ns, || masq::check("mynet", "new", "eth0", &a)).unwrap();
    let err = inside(&ns, || masq::check("mynet", "dead", "eth0", &a)).unwrap_err();
    assert_eq!(err.code, 102, "{err:?}");
    assert!(err.msg.contains("owned by another attachment"), "{err:?}");
    // Even when the address moves to another network (another chain).
    let b = [net("10.1.0.5/16")];
    inside(&ns, || masq::add("othernet", "new2", "eth0", &b)).unwrap();
    inside(&ns, || masq::check("othernet", "new2", "eth0", &b)).unwrap();
    let listing = masq_table(&ns);
    assert_eq!(count(&listing, "10.1.0.5 "), 2, "pods + owners: {listing}");
    // The dead attachment's late DELs change nothing.
    inside(&ns, || masq::del("mynet", "dead", "eth0", None)).unwrap();
    inside(&ns, || {
        masq::del("mynet", "new", "eth0", Some(&[ip("10.1.0.5")]))
    })
    .unwrap();
    inside(&ns, || masq::check("othernet", "new2", "eth0", &b)).unwrap();
}

#[test]
fn check_fails_after_tampering_and_add_repairs() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let a = [net("10.1.0.5/24")];
    let c = chain("mynet", "10.1.0.0/24");
    let check = || inside(&ns, || masq::check("mynet", CID, "eth0", &a));
    let add = || inside(&ns, || masq::add("mynet", CID, "eth0", &a)).unwrap();

    let err = check().unwrap_err();
    assert_eq!(err.code, 102);
    assert!(err.msg.contains("does not exist"), "{err:?}");

    add();
    check().unwrap();
    nft_in(
        &ns,
        &[
            "delete",
            "element",
            "inet",
            "weft_masq",
            "pods_v4",
            "{ 10.1.0.5 }",
        ],
    );
    let err = check().unwrap_err();
    assert_eq!(err.code, 102);
    assert!(
        err.msg.contains("no masquerade element for 10.1.0.5"),
        "{err:?}"
    );

    add();
    check().unwrap();
    nft_in(
        &ns,
        &[
            "delete",
            "element",
            "inet",
            "weft_masq",
            "owners_v4",
            "{ 10.1.0.5 }",
        ],
    );
    let err = check().unwrap_err();
    assert!(err.msg.contains("no owner element for 10.1.0.5"), "{err:?}");

    add();
    check().unwrap();
    // Shared chains: ADD trusts them (no listing on the hot path), CHECK sees the
    // damage, ensure_network repairs it.
    let repair = || inside(&ns, || masq::ensure_network("mynet", &a)).unwrap();
    nft_in(&ns, &["flush", "chain", "inet", "weft_masq", &c]);
    let err = check().unwrap_err();
    assert!(err.msg.contains("has rules []"), "{err:?}");
    add();
    assert!(check().is_err());
    repair();
    check().unwrap();

    nft_in(&ns, &["add", "rule", "inet", "weft_masq", &c, "accept"]);
    assert!(check().is_err());
    repair();
    check().unwrap();

    nft_in(&ns, &["flush", "chain", "inet", "weft_masq", "postrouting"]);
    let err = check().unwrap_err();
    assert!(
        err.msg.contains("lacks `ip saddr vmap @pods_v4`"),
        "{err:?}"
    );
    inside(&ns, masq::ensure).unwrap();
    check().unwrap();

    // An extra address owned by the attachment.
    let o = owner("mynet", CID, "eth0");
    nft_in(
        &ns,
        &[
            "add",
            "element",
            "inet",
            "weft_masq",
            "owners_v4",
            &format!("{{ 10.1.0.99 : {o} }}"),
        ],
    );
    let err = check().unwrap_err();
    assert!(err.msg.contains("10.1.0.99 is also owned by"), "{err:?}");
    // DEL without a hint finds both addresses.
    inside(&ns, || masq::del("mynet", CID, "eth0", None)).unwrap();
    let listing = masq_table(&ns);
    assert!(
        !listing.contains("10.1.0.5 ") && !listing.contains("10.1.0.99"),
        "{listing}"
    );
}

#[test]
fn gc_removes_only_stale_attachments_of_its_network() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    inside(&ns, || {
        masq::add("net1", "a", "eth0", &[net("10.1.0.2/24")]).unwrap();
        masq::add("net1", "a", "eth1", &[net("10.1.0.3/24")]).unwrap();
        masq::add(
            "net1",
            "b",
            "eth0",
            &[net("10.1.0.4/24"), net("fd01::4/64")],
        )
        .unwrap();
        masq::add("net1", "c", "eth0", &[net("10.1.0.5/24")]).unwrap();
        masq::add("net2", "b", "eth0", &[net("10.2.0.4/24")]).unwrap();
    });
    let removed = inside(&ns, || masq::gc("net1", &[("a", "eth0"), ("zzz", "eth0")])).unwrap();
    assert_eq!(removed, 3);
    let listing = masq_table(&ns);
    for gone in ["10.1.0.3", "10.1.0.4", "fd01::4", "10.1.0.5"] {
        assert!(!has_elem(&listing, gone), "{gone} left: {listing}");
    }
    // The v6 subnet's chain is unused now and goes; the v4 one stays (a still uses it).
    assert!(!listing.contains(&chain("net1", "fd01::/64")), "{listing}");
    assert!(listing.contains(&chain("net1", "10.1.0.0/24")), "{listing}");
    inside(&ns, || {
        masq::check("net1", "a", "eth0", &[net("10.1.0.2/24")]).unwrap();
        masq::check("net2", "b", "eth0", &[net("10.2.0.4/24")]).unwrap();
    });
    assert_eq!(
        inside(&ns, || masq::gc("net1", &[("a", "eth0")])).unwrap(),
        0
    );
    // An empty valid list clears the network, chains included.
    assert_eq!(inside(&ns, || masq::gc("net1", &[])).unwrap(), 1);
    let listing = masq_table(&ns);
    assert!(!has_elem(&listing, "10.1.0.2"), "{listing}");
    assert!(
        !listing.contains(&masq::network_chain_prefix("net1")),
        "{listing}"
    );
    inside(&ns, || {
        masq::check("net2", "b", "eth0", &[net("10.2.0.4/24")])
    })
    .unwrap();
    // A later ADD of the network rebuilds its chain.
    inside(&ns, || {
        masq::add("net1", "d", "eth0", &[net("10.1.0.9/24")])
    })
    .unwrap();
    inside(&ns, || {
        masq::check("net1", "d", "eth0", &[net("10.1.0.9/24")])
    })
    .unwrap();
}

#[test]
fn two_networks_and_two_interfaces_coexist() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    inside(&ns, || {
        masq::add("net1", CID, "eth0", &[net("10.1.0.5/24")]).unwrap();
        masq::add("net2", CID, "net1", &[net("10.2.0.5/24")]).unwrap();
        masq::add("net1", CID, "eth1", &[net("10.1.0.6/24")]).unwrap();
    });
    let listing = masq_table(&ns);
    assert!(listing.contains("ip daddr 10.2.0.0/24 return"), "{listing}");
    inside(&ns, || {
        masq::del("net1", CID, "eth0", Some(&[ip("10.1.0.5")]))
    })
    .unwrap();
    inside(&ns, || {
        masq::check("net2", CID, "net1", &[net("10.2.0.5/24")]).unwrap();
        masq::check("net1", CID, "eth1", &[net("10.1.0.6/24")]).unwrap();
        assert!(masq::check("net1", CID, "eth0", &[net("10.1.0.5/24")]).is_err());
    });
}

#[test]
fn foreign_tables_are_untouched() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let foreign = "table ip nat {\n\
        chain postrouting { type nat hook postrouting priority srcnat; policy accept; ip saddr 10.1.0.0/16 masquerade; }\n\
    }\n\
    table inet kube-proxy {\n\
        set cluster-ips { type ipv4_addr; elements = { 10.96.0.1 }; }\n\
        chain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; }\n\
    }\n";
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.path_str()))
        .args(["--", "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(foreign.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(out.success());
    let before = nft_in(&ns, &["list", "ruleset"]);
    inside(&ns, || {
        masq::add("mynet", CID, "eth0", &[net("10.1.0.5/24")]).unwrap();
        masq::check("mynet", CID, "eth0", &[net("10.1.0.5/24")]).unwrap();
        masq::add("mynet", "x", "eth0", &[net("10.1.0.6/24")]).unwrap();
        masq::add("mynet", "y", "eth0", &[net("10.1.0.6/24")]).unwrap();
        masq::gc("mynet", &[(CID, "eth0")]).unwrap();
        masq::del("mynet", CID, "eth0", None).unwrap();
        masq::del("mynet", CID, "eth0", Some(&[ip("10.1.0.5")])).unwrap();
        masq::gc("mynet", &[]).unwrap();
    });
    let after = nft_in(&ns, &["list", "ruleset"]);
    for table in ["table ip nat", "table inet kube-proxy"] {
        let pick = |s: &str| {
            let start = s.find(table).unwrap();
            let end = s[start..].find("\n}\n").unwrap();
            s[start..start + end].to_string()
        };
        assert_eq!(pick(&after), pick(&before), "{table} changed");
    }
}

#[test]
fn no_addresses_is_a_no_op() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    inside(&ns, || {
        masq::add("mynet", CID, "eth0", &[]).unwrap();
        masq::check("mynet", CID, "eth0", &[]).unwrap();
    });
    assert!(!has_table(&ns));
}

// ---------------------------------------------------------------------------------
// Latency (not an assertion): cargo test -p netns-tests --test core_nft -- --ignored --nocapture
// ---------------------------------------------------------------------------------

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "timing report, run by hand"]
fn masq_latency() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    inside(&ns, || {
        let base: Vec<Duration> = (0..15)
            .map(|_| {
                let t = Instant::now();
                nft::run_script("").unwrap();
                t.elapsed()
            })
            .collect();
        eprintln!(
            "`nft -f -` with empty input (exec floor): {:?}",
            median(base)
        );
        let first = Instant::now();
        masq::add("bench", "first", "eth0", &[net("10.250.0.1/16")]).unwrap();
        eprintln!(
            "first ADD on the node (fast path fails, ensure): {:?}",
            first.elapsed()
        );
        masq::del("bench", "first", "eth0", Some(&[ip("10.250.0.1")])).unwrap();
        for existing in [0usize, 1000, 5000] {
            // Bulk-load `existing` attachments in one transaction.
            let have = masq::gc("bench", &[]).unwrap();
            assert_eq!(have, 0);
            masq::ensure_network("load", &[net("10.0.0.0/8")]).unwrap();
            let mut bulk = Transaction::new();
            for i in 0..existing {
                let cid = format!("pod{i}");
                let addr: IpNet = format!(
                    "10.{}.{}.{}/8",
                    10 + i / 62500,
                    (i / 250) % 250,
                    i % 250 + 1
                )
                .parse()
                .unwrap();
                bulk.extend(masq::add_tx(
                    &masq::Attachment::new("load", &cid, "eth0"),
                    &[addr],
                ));
            }
            bulk.apply().unwrap();
            let (mut add, mut del_hint, mut del_list, mut add_again, mut check) =
                (vec![], vec![], vec![], vec![], vec![]);
            for i in 0..15 {
                let cid = format!("b{i}");
                let a = [net(&format!("10.250.{}.{}/16", i / 200, i % 200 + 1))];
                let hint = [a[0].addr()];
                let t = Instant::now();
                masq::add("bench", &cid, "eth0", &a).unwrap();
                add.push(t.elapsed());
                let t = Instant::now();
                masq::add("bench", &cid, "eth0", &a).unwrap();
                add_again.push(t.elapsed());
                let t = Instant::now();
                masq::check("bench", &cid, "eth0", &a).unwrap();
                check.push(t.elapsed());
                let t = Instant::now();
                masq::del("bench", &cid, "eth0", Some(&hint)).unwrap();
                del_hint.push(t.elapsed());
                let t = Instant::now();
                masq::del("bench", &cid, "eth0", Some(&hint)).unwrap();
                let repeat = t.elapsed();
                masq::add("bench", &cid, "eth0", &a).unwrap();
                let t = Instant::now();
                masq::del("bench", &cid, "eth0", None).unwrap();
                del_list.push(t.elapsed());
                if i == 0 {
                    eprintln!("  N={existing}: repeated DEL (already gone): {repeat:?}");
                }
            }
            eprintln!(
                "N={existing}: ADD {:?}, ADD again {:?}, CHECK {:?}, DEL(hint) {:?}, DEL(no hint) {:?}",
                median(add),
                median(add_again),
                median(check),
                median(del_hint),
                median(del_list)
            );
            let t = Instant::now();
            let n = masq::gc("load", &[]).unwrap();
            eprintln!("  GC of {n} attachments: {:?}", t.elapsed());
        }
    });
}

/// A batch of thousands of element statements is acknowledged statement by
/// statement, and every ack is queued before the first is read: the socket's
/// receive buffer must hold them all (ENOBUFS lost the replies of a large GC).
/// Half of them fail, so the errors come back too, each naming its statement.
#[test]
fn thousands_of_statements_in_one_batch_get_every_reply() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    let t = id("weft_big");
    let mut setup = Transaction::new();
    setup.add_table(Family::Inet, &t, None).add_set(
        Family::Inet,
        &t,
        &id("s"),
        &nft::SetDecl::map("ipv4_addr", "verdict"),
    );
    inside(&ns, || setup.apply()).unwrap();
    let addr = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
    let mut add = Transaction::new();
    for i in 0..3000 {
        add.add_elements(
            Family::Inet,
            &t,
            &id("s"),
            &[nft::Element::new(addr(i)).verdict(Verdict::Accept)],
        );
    }
    inside(&ns, || add.apply()).unwrap();
    let mut del = Transaction::new();
    for i in 1500..4500 {
        del.delete_elements(Family::Inet, &t, &id("s"), &[Value::Addr(addr(i))]);
    }
    let err = inside(&ns, || del.try_apply()).unwrap_err();
    let nft::NftError::Failed { errors, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(errors.len(), 1500);
    assert!(errors.iter().all(|e| e.kind == ErrorKind::NotFound));
    assert_eq!(errors[0].line, 1501);
    let dropped = inside(&ns, || del.apply_ignoring(&[ErrorKind::NotFound])).unwrap();
    assert_eq!(dropped.len(), 1500);
    let listing = nft_in(&ns, &["list", "map", "inet", "weft_big", "s"]);
    assert!(listing.contains("10.0.0.1 "), "{listing}");
    assert!(!listing.contains(&format!("{} ", addr(2000))), "{listing}");
}
