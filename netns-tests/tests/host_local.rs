//! host-local against reference §7.2 (H01–H31), our expected column: real binary,
//! real netns, real files. Each test has its own netns, dataDir and network name.

use netns_tests::{
    Invocation, Outcome, TempDir, TestNetns, bin_dir, reference_dir, require_root, unique_name,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

struct Fixture {
    ns: TestNetns,
    dir: TempDir,
    name: String,
}

impl Fixture {
    fn new() -> Option<Fixture> {
        require_root().then(|| Fixture {
            ns: TestNetns::new(),
            dir: TempDir::new("hl"),
            name: unique_name("hl"),
        })
    }

    /// A 1.0.0 config whose ipam gets `type` and our dataDir added to `ipam`.
    fn conf(&self, ipam: Value) -> Value {
        self.conf_v("1.0.0", ipam)
    }

    fn conf_v(&self, version: &str, mut ipam: Value) -> Value {
        ipam["type"] = json!("host-local");
        ipam["dataDir"] = json!(self.dir.path());
        json!({"cniVersion": version, "name": self.name, "ipam": ipam})
    }

    fn subnet(&self, s: &str) -> Value {
        self.conf(json!({"ranges": [[{"subnet": s}]]}))
    }

    fn net_dir(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    fn call(&self, bin: &Path, cmd: &str, cid: &str, ifname: &str, conf: &Value) -> Invocation {
        Invocation::new(bin.join("host-local"))
            .command(cmd)
            .container_id(cid)
            .ifname(ifname)
            .netns(self.ns.path())
            .path(&[bin])
            .stdin_json(conf)
    }

    fn ours(&self, cmd: &str, cid: &str, ifname: &str, conf: &Value) -> Outcome {
        self.call(&bin_dir(), cmd, cid, ifname, conf).run()
    }

    fn add(&self, cid: &str, conf: &Value) -> Outcome {
        self.ours("ADD", cid, "eth0", conf)
    }

    fn del(&self, cid: &str, conf: &Value) {
        assert_eq!(self.ours("DEL", cid, "eth0", conf).ok(), Value::Null);
    }

    /// The address ADD returned for range set `i`.
    fn add_ip(&self, cid: &str, conf: &Value) -> String {
        self.add(cid, conf).ok()["ips"][0]["address"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Reservation files (named by IP) and their contents.
    fn reservations(&self) -> BTreeMap<String, String> {
        netns_tests::reservations(&self.net_dir())
    }

    fn gc(&self, valid: Value) -> Outcome {
        let mut conf = self.subnet("10.98.0.0/24");
        conf["cniVersion"] = json!("1.1.0");
        conf["cni.dev/valid-attachments"] = valid;
        Invocation::plugin("host-local")
            .command("GC")
            .path(&[bin_dir()])
            .stdin_json(&conf)
            .run()
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn h01_first_add_writes_reference_layout() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.98.0.0/29");
    let r = f.add("c1", &conf).ok();
    assert_eq!(
        r,
        json!({"cniVersion": "1.0.0", "ips": [{"address": "10.98.0.2/29", "gateway": "10.98.0.1"}]})
    );
    let file = f.net_dir().join("10.98.0.2");
    assert_eq!(std::fs::read(&file).unwrap(), b"c1\r\neth0");
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&f.net_dir()), 0o700);
    assert_eq!(
        std::fs::read_to_string(f.net_dir().join("last_reserved_ip.0")).unwrap(),
        "10.98.0.2"
    );
    assert!(f.net_dir().join("lock").exists());
}

#[test]
fn h02_h03_h04_duplicates_second_ifname_round_robin() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.98.0.0/29");
    f.add_ip("c1", &conf);
    let e = f.add("c1", &conf).err();
    assert_eq!(e.code, 101);
    assert_eq!(
        e.msg,
        "failed to allocate for range 0: 10.98.0.2 has been allocated to c1, duplicate allocation is not allowed"
    );
    assert_eq!(f.reservations().len(), 1);
    let eth1 = f.ours("ADD", "c1", "eth1", &conf).ok();
    assert_eq!(eth1["ips"][0]["address"], "10.98.0.3/29");
    f.ours("DEL", "c1", "eth1", &conf).ok();
    assert_eq!(
        f.add_ip("c2", &conf),
        "10.98.0.4/29",
        "freed .3 is not reused before the wrap"
    );
}

#[test]
fn h05_h06_exhaustion_then_reuse_after_wrap() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.98.0.0/29");
    let got: Vec<String> = (1..=5).map(|i| f.add_ip(&format!("c{i}"), &conf)).collect();
    assert_eq!(
        got,
        [
            "10.98.0.2/29",
            "10.98.0.3/29",
            "10.98.0.4/29",
            "10.98.0.5/29",
            "10.98.0.6/29"
        ]
    );
    let e = f.add("c6", &conf).err();
    assert_eq!(e.code, 100);
    assert_eq!(
        e.msg,
        "failed to allocate for range 0: no IP addresses available in range set: 10.98.0.1-10.98.0.6"
    );
    f.del("c2", &conf);
    assert_eq!(f.add_ip("c7", &conf), "10.98.0.3/29");
}

#[test]
fn h07_slash_30_has_one_address() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.96.0.0/30");
    assert_eq!(f.add_ip("c1", &conf), "10.96.0.2/30");
    assert!(
        f.add("c2", &conf)
            .err()
            .msg
            .ends_with("10.96.0.1-10.96.0.2")
    );
}

/// H08–H15, H26: invalid configs are code 7 and create no state at all.
#[test]
fn h08_to_h15_invalid_ranges_are_code_7() {
    let Some(f) = Fixture::new() else { return };
    let r = |s: Value| json!({"ranges": [[s]]});
    let cases = [
        (
            r(json!({"subnet": "10.96.0.0/31"})),
            "invalid range set 0: network 10.96.0.0/31 too small to allocate from",
        ),
        (
            r(json!({"subnet": "10.96.0.0/32"})),
            "invalid range set 0: network 10.96.0.0/32 too small to allocate from",
        ),
        (
            r(json!({"subnet": "fd96::/127"})),
            "invalid range set 0: network fd96::/127 too small to allocate from",
        ),
        (
            r(json!({"subnet": "10.96.0.1/24"})),
            "invalid range set 0: network has host bits set: for a subnet mask of length 24 the network address is 10.96.0.0",
        ),
        (
            r(json!({"subnet": "10.0.0.0/33"})),
            "invalid range set 0: invalid CIDR address: 10.0.0.0/33",
        ),
        (
            r(json!({"subnet": "banana"})),
            "invalid range set 0: invalid CIDR address: banana",
        ),
        (
            r(json!({"subnet": "10.96.1.0/24", "rangeStart": "10.96.2.5"})),
            "invalid range set 0: rangeStart 10.96.2.5 not in network 10.96.1.0/24",
        ),
        (
            r(json!({"subnet": "10.96.1.0/24", "rangeEnd": "10.96.2.5"})),
            "invalid range set 0: rangeEnd 10.96.2.5 not in network 10.96.1.0/24",
        ),
        (
            r(
                json!({"subnet": "10.96.1.0/24", "rangeStart": "10.96.1.50", "rangeEnd": "10.96.1.10"}),
            ),
            "invalid range set 0: rangeStart 10.96.1.50 is after rangeEnd 10.96.1.10",
        ),
        (
            r(json!({"subnet": "10.96.1.0/24", "gateway": "10.0.0.1"})),
            "invalid range set 0: gateway 10.0.0.1 not in network 10.96.1.0/24",
        ),
        (json!({}), "no IP ranges specified"),
        (
            json!({"ranges": [[]]}),
            "invalid range set 0: empty range set",
        ),
        (
            json!({"ranges": [[{"subnet": "10.1.0.0/16"}], [{"subnet": "10.1.2.0/24"}]]}),
            "range set 0 overlaps with 1",
        ),
        (
            json!({"ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "fd01::/64"}]]}),
            "invalid range set 0: mixed address families",
        ),
    ];
    for (ipam, msg) in cases {
        let conf = f.conf(ipam.clone());
        let e = f.add("c1", &conf).err();
        assert_eq!((e.code, e.msg.as_str()), (7, msg), "{ipam}");
        assert!(!f.net_dir().exists(), "{ipam} left state behind");
    }
    let no_ipam = json!({"cniVersion": "1.0.0", "name": f.name});
    assert_eq!(
        f.add("c1", &no_ipam).err().msg,
        "IPAM config missing 'ipam' key"
    );
    let two_v4 = f.conf_v(
        "0.2.0",
        json!({"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.2.0.0/24"}]]}),
    );
    assert_eq!(
        f.add("c1", &two_v4).err().msg,
        "CNI version 0.2.0 does not support more than 1 address per family"
    );
}

#[test]
fn h16_dual_stack_gets_one_address_per_set() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.conf(json!({"ranges": [[{"subnet": "10.97.0.0/24"}], [{"subnet": "fd97::/64"}]]}));
    let r = f.add("c1", &conf).ok();
    assert_eq!(r["ips"][0]["address"], "10.97.0.2/24");
    assert_eq!(
        r["ips"][1],
        json!({"address": "fd97::2/64", "gateway": "fd97::1"})
    );
    assert_eq!(
        std::fs::read_to_string(f.net_dir().join("last_reserved_ip.1")).unwrap(),
        "fd97::2"
    );
    assert_eq!(
        std::fs::read(f.net_dir().join("fd97::2")).unwrap(),
        b"c1\r\neth0"
    );
}

#[test]
fn h17_requested_ips_from_each_source() {
    let Some(f) = Fixture::new() else { return };
    let mut conf = f.subnet("10.97.0.0/24");
    let ip = |o: Outcome| o.ok()["ips"][0]["address"].as_str().unwrap().to_string();
    assert_eq!(
        ip(f.call(&bin_dir(), "ADD", "c1", "eth0", &conf)
            .args("IP=10.97.0.50/24")
            .run()),
        "10.97.0.50/24"
    );
    conf["args"] = json!({"cni": {"ips": ["10.97.0.51"]}});
    assert_eq!(f.add_ip("c2", &conf), "10.97.0.51/24");
    conf["runtimeConfig"] = json!({"ips": ["10.97.0.52/24"]});
    assert_eq!(
        f.add_ip("c3", &conf),
        "10.97.0.52/24",
        "runtimeConfig wins over args"
    );
}

#[test]
fn h18_bad_requested_ips_roll_back_everything() {
    let Some(f) = Fixture::new() else { return };
    let mut conf =
        f.conf(json!({"ranges": [[{"subnet": "10.98.0.0/24"}], [{"subnet": "fd98::/64"}]]}));
    f.add_ip("c0", &conf); // holds 10.98.0.2 and fd98::2
    let before = f.reservations();
    for (ips, code, msg) in [
        (
            json!(["10.98.0.1"]),
            101,
            "failed to allocate for range 0: requested ip 10.98.0.1 is subnet's gateway",
        ),
        (
            json!(["10.98.0.2"]),
            101,
            "failed to allocate for range 0: requested IP address 10.98.0.2 is not available in range set 10.98.0.1-10.98.0.254",
        ),
        (
            json!(["10.1.1.1"]),
            101,
            "failed to allocate all requested IPs: 10.1.1.1",
        ),
        (
            json!(["10.98.0.9", "10.98.0.10"]),
            101,
            "failed to allocate all requested IPs: 10.98.0.10",
        ),
        (
            json!(["10.98.0.9", "fd98::2"]),
            101,
            "failed to allocate for range 1: requested IP address fd98::2 is not available in range set fd98::1-fd98::ffff:ffff:ffff:ffff",
        ),
    ] {
        conf["runtimeConfig"] = json!({"ips": ips});
        let e = f.add("c1", &conf).err();
        assert_eq!((e.code, e.msg.as_str()), (code, msg));
        assert_eq!(f.reservations(), before, "{ips} left a reservation");
    }
}

#[test]
fn h19_h20_cni_args_handling() {
    let Some(f) = Fixture::new() else { return };
    let mut conf = f.subnet("10.98.0.0/24");
    let with_args = |cid: &str, args: &str, conf: &Value| {
        f.call(&bin_dir(), "ADD", cid, "eth0", conf)
            .args(args)
            .run()
    };
    // Keys meant for other plugins of the chain are ignored, not rejected.
    assert_eq!(
        with_args("c1", "ip=10.98.0.3;FOO=bar;K8S_POD_NAME=p", &conf).ok()["ips"][0]["address"],
        "10.98.0.2/24"
    );
    let e = with_args("c2", "FOO", &conf).err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (4, r#"CNI_ARGS: invalid pair "FOO""#)
    );
    let e = with_args("c2", "IP=nope", &conf).err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (4, r#"CNI_ARGS: invalid IP "nope""#)
    );
    // H20: args.cni.ips takes precedence over CNI_ARGS.
    conf["args"] = json!({"cni": {"ips": ["10.98.0.20"]}});
    assert_eq!(
        with_args("c3", "IP=10.98.0.30", &conf).ok()["ips"][0]["address"],
        "10.98.0.20/24"
    );
    assert!(!f.net_dir().join("10.98.0.30").exists());
}

#[test]
fn h21_h22_del_is_idempotent_and_exact() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.98.0.0/24");
    f.del("never-added", &conf);
    f.add_ip("c1", &conf);
    f.ours("DEL", "c1", "eth1", &conf).ok();
    assert_eq!(f.reservations().len(), 1, "another ifname releases nothing");
    let no_netns = f
        .call(&bin_dir(), "DEL", "c1", "eth0", &conf)
        .remove("CNI_NETNS")
        .run();
    assert_eq!(no_netns.ok(), Value::Null);
    assert!(f.reservations().is_empty());
    f.del("c1", &conf);
}

#[test]
fn h23_check_verifies_the_exact_address() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.98.0.0/24");
    let result = f.add("c5", &conf).ok();
    assert_eq!(f.ours("CHECK", "c5", "eth0", &conf).ok(), Value::Null);
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result;
    f.ours("CHECK", "c5", "eth0", &with_prev).ok();
    with_prev["prevResult"]["ips"][0]["address"] = json!("10.98.0.77/24");
    let e = f.ours("CHECK", "c5", "eth0", &with_prev).err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (
            102,
            "host-local: 10.98.0.2 is reserved for c5/eth0 but not in prevResult"
        )
    );
    f.del("c5", &conf);
    let e = f.ours("CHECK", "c5", "eth0", &conf).err();
    assert_eq!(e.code, 102);
    assert!(
        e.msg
            .starts_with("host-local: Failed to find address added by container c5"),
        "{}",
        e.msg
    );
}

#[test]
fn h24_legacy_files_are_honoured() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.86.0.0/24");
    std::fs::create_dir_all(f.net_dir()).unwrap();
    std::fs::write(f.net_dir().join("10.86.0.9"), "legacyc").unwrap();
    f.ours("CHECK", "legacyc", "eth0", &conf).ok();
    assert!(
        f.add("legacyc", &conf)
            .err()
            .msg
            .contains("10.86.0.9 has been allocated to legacyc")
    );
    f.del("legacyc", &conf);
    assert!(f.reservations().is_empty());
}

#[test]
fn h25_gateway_elsewhere_frees_dot_one() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.conf(json!({"ranges": [[{"subnet": "10.92.0.0/24", "gateway": "10.92.0.254"}]]}));
    let r = f.add("c1", &conf).ok();
    assert_eq!(
        r["ips"][0],
        json!({"address": "10.92.0.1/24", "gateway": "10.92.0.254"})
    );
}

#[test]
fn h27_resolv_conf_fills_dns() {
    let Some(f) = Fixture::new() else { return };
    let rc = f.dir.join("resolv.conf");
    std::fs::write(&rc, "nameserver 10.0.0.10\nnameserver 10.0.0.11\ndomain ex.com\nsearch a.ex b.ex\noptions ndots:5\n").unwrap();
    let conf = f.conf(json!({"ranges": [[{"subnet": "10.93.0.0/24"}]], "resolvConf": rc}));
    let dns = &f.add("c1", &conf).ok()["dns"];
    assert_eq!(
        *dns,
        json!({"nameservers": ["10.0.0.10", "10.0.0.11"], "domain": "ex.com", "search": ["a.ex", "b.ex"], "options": ["ndots:5"]})
    );
    let missing =
        f.conf(json!({"ranges": [[{"subnet": "10.93.0.0/24"}]], "resolvConf": f.dir.join("nope")}));
    let e = f.add("c2", &missing).err();
    assert_eq!(e.code, 7);
    assert!(e.msg.contains("No such file or directory"), "{}", e.msg);
}

#[test]
fn h28_runtime_ip_ranges_come_first() {
    let Some(f) = Fixture::new() else { return };
    let mut conf = f.conf(json!({"subnet": "10.95.0.0/24"}));
    conf["runtimeConfig"] = json!({"ipRanges": [[{"subnet": "10.94.0.0/24"}]]});
    let r = f.add("c1", &conf).ok();
    assert_eq!(r["ips"][0]["address"], "10.94.0.2/24");
    assert_eq!(r["ips"][1]["address"], "10.95.0.2/24");
}

#[test]
fn h29_hundred_parallel_adds_get_distinct_addresses() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.90.0.0/24");
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let (f, conf) = (&f, &conf);
                s.spawn(move || f.add_ip(&format!("p{i}"), conf))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: std::collections::HashSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), 100);
    assert_eq!(f.reservations().len(), 100);
}

#[test]
fn h30_del_without_ipam_succeeds() {
    let Some(f) = Fixture::new() else { return };
    f.del("c1", &json!({"cniVersion": "1.0.0", "name": f.name}));
}

#[test]
fn h31_gc_keeps_only_valid_attachments() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.98.0.0/24");
    for cid in ["c1", "c2", "c3"] {
        f.add_ip(cid, &conf);
    }
    std::fs::write(f.net_dir().join("10.98.0.100"), "legacy-live").unwrap();
    std::fs::write(f.net_dir().join("10.98.0.101"), "legacy-dead").unwrap();
    std::fs::write(f.net_dir().join("10.98.0.102"), "").unwrap(); // torn write after a crash
    f.gc(json!([{"containerID": "c1", "ifname": "eth0"}, {"containerID": "legacy-live", "ifname": "eth0"},
        {"containerID": "c3", "ifname": "eth9"}]))
    .ok();
    let left: Vec<String> = f.reservations().into_keys().collect();
    assert_eq!(left, ["10.98.0.100", "10.98.0.2"]);
    assert!(f.net_dir().join("lock").exists() && f.net_dir().join("last_reserved_ip.0").exists());
    f.gc(json!([])).ok();
    assert!(
        f.reservations().is_empty(),
        "an empty valid list releases everything"
    );
    let e = Invocation::plugin("host-local")
        .command("GC")
        .path(&[bin_dir()])
        .stdin_json(&f.subnet("10.98.0.0/24"))
        .run()
        .err();
    assert_eq!(e.code, 1, "GC needs a 1.1.0 config");
}

#[test]
fn status_reports_exhaustion_as_50() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.conf_v(
        "1.1.0",
        json!({"ranges": [[{"subnet": "10.96.0.0/30"}], [{"subnet": "fd96::/64"}]]}),
    );
    let status = || {
        Invocation::plugin("host-local")
            .command("STATUS")
            .stdin_json(&conf)
            .run()
    };
    assert_eq!(status().ok(), Value::Null);
    f.add_ip("c1", &conf);
    let e = status().err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (
            50,
            "range set 0 is exhausted: no free address in 10.96.0.1-10.96.0.2"
        )
    );
    f.del("c1", &conf);
    status().ok();
}

/// The reference and we share one dataDir: each sees and releases the other's state.
#[test]
fn interop_with_reference_both_ways() {
    let Some(f) = Fixture::new() else { return };
    if !reference_dir().join("host-local").exists() {
        eprintln!("skipping: reference host-local not installed");
        return;
    }
    let conf = f.subnet("10.99.0.0/24");
    let reference = |cmd: &str, cid: &str| f.call(&reference_dir(), cmd, cid, "eth0", &conf).run();
    assert_eq!(
        reference("ADD", "r1").ok()["ips"][0]["address"],
        "10.99.0.2/24"
    );
    assert_eq!(
        f.add_ip("w1", &conf),
        "10.99.0.3/24",
        "we continue the reference's round robin"
    );
    assert_eq!(
        reference("ADD", "r2").ok()["ips"][0]["address"],
        "10.99.0.4/24",
        "and it continues ours"
    );
    f.ours("CHECK", "r1", "eth0", &conf).ok();
    reference("CHECK", "w1").ok();
    assert!(
        f.add("r1", &conf)
            .err()
            .msg
            .contains("10.99.0.2 has been allocated to r1")
    );
    f.del("r1", &conf);
    reference("DEL", "w1").ok();
    let left: Vec<String> = f.reservations().into_keys().collect();
    assert_eq!(left, ["10.99.0.4"]);
}

/// Where the reference is right, the same sequence gives the same addresses.
#[test]
fn differential_sequence_matches_reference() {
    let Some(f) = Fixture::new() else { return };
    if !reference_dir().join("host-local").exists() {
        eprintln!("skipping: reference host-local not installed");
        return;
    }
    let g = Fixture {
        ns: TestNetns::new(),
        dir: TempDir::new("hl-ref"),
        name: f.name.clone(),
    };
    let steps = [
        ("ADD", "a"),
        ("ADD", "b"),
        ("ADD", "c"),
        ("DEL", "b"),
        ("ADD", "d"),
        ("ADD", "e"),
        ("ADD", "f"),
        ("ADD", "g"),
    ];
    let ipam = json!({"ranges": [[{"subnet": "10.98.0.0/29"}], [{"subnet": "fd98::/125"}]], "routes": [{"dst": "0.0.0.0/0"}]});
    let (ours_conf, ref_conf) = (f.conf(ipam.clone()), g.conf(ipam));
    for (cmd, cid) in steps {
        let ours = f.ours(cmd, cid, "eth0", &ours_conf);
        let theirs = g.call(&reference_dir(), cmd, cid, "eth0", &ref_conf).run();
        assert_eq!(
            ours.status, theirs.status,
            "{cmd} {cid}\nours: {ours}\nreference: {theirs}"
        );
        if ours.status == 0 && cmd == "ADD" {
            let (a, b) = (ours.json(), theirs.json());
            assert_eq!(a["ips"], b["ips"], "{cmd} {cid}");
            assert_eq!(a["routes"], b["routes"]);
        }
        assert_eq!(f.reservations(), g.reservations(), "{cmd} {cid}");
    }
}

/// The bad-input corpus: every case gets its precise code and reserves nothing.
#[test]
fn bad_input_corpus() {
    let Some(f) = Fixture::new() else { return };
    let good = f.subnet("10.80.0.0/24");
    let ipam = |v: Value| f.conf(v);
    let with = |key: &str, v: Value| {
        let mut c = good.clone();
        c[key] = v;
        c
    };
    let raw = |s: &str| s.as_bytes().to_vec();
    let bytes = |v: &Value| serde_json::to_vec(v).unwrap();
    let ns = f.ns.path().display().to_string();
    let mut unwritable = good.clone();
    unwritable["ipam"]["dataDir"] = json!("/proc/weft");
    type Case = (
        &'static str,
        Vec<(&'static str, Option<String>)>,
        Vec<u8>,
        u64,
    );
    let cases: Vec<Case> = vec![
        ("empty stdin", vec![], raw(""), 6),
        ("truncated JSON", vec![], raw("{\"cniVersion\":"), 6),
        ("array", vec![], raw("[]"), 6),
        ("string", vec![], raw("\"x\""), 6),
        (
            "numeric cniVersion",
            vec![],
            bytes(&with("cniVersion", json!(1.0))),
            6,
        ),
        (
            "unknown version",
            vec![],
            bytes(&with("cniVersion", json!("9.9.9"))),
            1,
        ),
        (
            "garbage version",
            vec![],
            bytes(&with("cniVersion", json!("abc"))),
            1,
        ),
        ("no name", vec![], bytes(&with("name", json!(""))), 7),
        (
            "name with space",
            vec![],
            bytes(&with("name", json!("bad name"))),
            7,
        ),
        (
            "traversal name",
            vec![],
            bytes(&with("name", json!("../../etc"))),
            7,
        ),
        ("slash name", vec![], bytes(&with("name", json!("a/b"))), 7),
        (
            "name of wrong type",
            vec![],
            bytes(&with("name", json!(5))),
            6,
        ),
        (
            "no ipam",
            vec![],
            raw(&format!(r#"{{"cniVersion":"1.0.0","name":"{}"}}"#, f.name)),
            7,
        ),
        (
            "ranges wrong type",
            vec![],
            bytes(&ipam(json!({"ranges": "x"}))),
            6,
        ),
        (
            "ranges empty",
            vec![],
            bytes(&ipam(json!({"ranges": []}))),
            7,
        ),
        (
            "empty set",
            vec![],
            bytes(&ipam(json!({"ranges": [[]]}))),
            7,
        ),
        (
            "subnet banana",
            vec![],
            bytes(&ipam(json!({"subnet": "banana"}))),
            7,
        ),
        (
            "prefix 33",
            vec![],
            bytes(&ipam(json!({"subnet": "10.0.0.0/33"}))),
            7,
        ),
        (
            "host bits",
            vec![],
            bytes(&ipam(json!({"subnet": "10.0.0.1/24"}))),
            7,
        ),
        (
            "slash 32",
            vec![],
            bytes(&ipam(json!({"subnet": "10.0.0.1/32"}))),
            7,
        ),
        (
            "start outside",
            vec![],
            bytes(&ipam(
                json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.1.1"}),
            )),
            7,
        ),
        (
            "start garbage",
            vec![],
            bytes(&ipam(json!({"subnet": "10.0.0.0/24", "rangeStart": "x"}))),
            7,
        ),
        (
            "start after end",
            vec![],
            bytes(&ipam(
                json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.3"}),
            )),
            7,
        ),
        (
            "gateway outside",
            vec![],
            bytes(&ipam(
                json!({"subnet": "10.0.0.0/24", "gateway": "10.0.1.1"}),
            )),
            7,
        ),
        (
            "mixed set",
            vec![],
            bytes(&ipam(
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "fd::/64"}]]}),
            )),
            7,
        ),
        (
            "overlapping sets",
            vec![],
            bytes(&ipam(
                json!({"ranges": [[{"subnet": "10.0.0.0/8"}], [{"subnet": "10.1.0.0/16"}]]}),
            )),
            7,
        ),
        (
            "route dst bogus",
            vec![],
            bytes(&ipam(
                json!({"subnet": "10.0.0.0/24", "routes": [{"dst": "bogus"}]}),
            )),
            7,
        ),
        (
            "route gw bogus",
            vec![],
            bytes(&ipam(
                json!({"subnet": "10.0.0.0/24", "routes": [{"dst": "0.0.0.0/0", "gw": "x"}]}),
            )),
            7,
        ),
        (
            "resolvConf missing",
            vec![],
            bytes(&ipam(
                json!({"subnet": "10.0.0.0/24", "resolvConf": "/nonexistent/resolv.conf"}),
            )),
            7,
        ),
        (
            "runtime ips not a list",
            vec![],
            bytes(&with("runtimeConfig", json!({"ips": "10.80.0.5"}))),
            6,
        ),
        (
            "runtime ips garbage",
            vec![],
            bytes(&with("runtimeConfig", json!({"ips": ["nope"]}))),
            7,
        ),
        (
            "ipRanges wrong type",
            vec![],
            bytes(&with("runtimeConfig", json!({"ipRanges": 5}))),
            6,
        ),
        (
            "0.2.0 two v4 sets",
            vec![],
            bytes(&f.conf_v(
                "0.2.0",
                json!({"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.2.0.0/24"}]]}),
            )),
            7,
        ),
        (
            "CNI_ARGS bad IP",
            vec![("CNI_ARGS", Some("IP=10.80.0.300".into()))],
            bytes(&good),
            4,
        ),
        (
            "CNI_ARGS bare word",
            vec![("CNI_ARGS", Some("FOO".into()))],
            bytes(&good),
            4,
        ),
        (
            "containerID traversal",
            vec![("CNI_CONTAINERID", Some("../x".into()))],
            bytes(&good),
            4,
        ),
        (
            "ifname too long",
            vec![("CNI_IFNAME", Some("a23456789012345x".into()))],
            bytes(&good),
            4,
        ),
        (
            "ifname slash",
            vec![("CNI_IFNAME", Some("../../x".into()))],
            bytes(&good),
            4,
        ),
        (
            "requested IP outside every range",
            vec![("CNI_ARGS", Some("IP=10.81.0.5".into()))],
            bytes(&good),
            101,
        ),
        (
            "requested IP is the gateway",
            vec![("CNI_ARGS", Some("IP=10.80.0.1".into()))],
            bytes(&good),
            101,
        ),
        (
            "rangeEnd outside",
            vec![],
            bytes(&ipam(
                json!({"subnet": "10.0.0.0/24", "rangeEnd": "10.0.1.1"}),
            )),
            7,
        ),
        (
            "gateway garbage",
            vec![],
            bytes(&ipam(json!({"subnet": "10.0.0.0/24", "gateway": "10.0.0"}))),
            7,
        ),
        ("no CNI_NETNS", vec![("CNI_NETNS", None)], bytes(&good), 4),
        (
            "unknown command",
            vec![("CNI_COMMAND", Some("BOGUS".into()))],
            bytes(&good),
            4,
        ),
        ("dataDir unwritable", vec![], bytes(&unwritable), 999),
    ];
    assert!(cases.len() >= 30);
    for (label, env, stdin, code) in cases {
        let mut inv = Invocation::plugin("host-local")
            .command("ADD")
            .container_id("c1")
            .ifname("eth0")
            .netns(&ns)
            .path(&[bin_dir()]);
        for (k, v) in env {
            inv = match v {
                Some(v) => inv.var(k, v),
                None => inv.remove(k),
            };
        }
        let e = inv.stdin(stdin).run().err();
        assert_eq!(e.code, code, "{label}: {}", e.msg);
        assert!(f.reservations().is_empty(), "{label} reserved an address");
    }
}

/// The shipped example works as is (with the dataDir pointed at the test's).
#[test]
fn conf_example_dual_stack() {
    let Some(f) = Fixture::new() else { return };
    let path = netns_tests::workspace_root().join("conf-examples/host-local-dualstack.conf");
    let mut conf: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    conf["name"] = json!(f.name);
    conf["ipam"]["dataDir"] = json!(f.dir.path());
    let r = f.add("c1", &conf).ok();
    assert_eq!(r["ips"][0]["address"], "10.88.1.0/16");
    assert_eq!(r["ips"][1]["address"], "fd88::2/64");
    f.ours("CHECK", "c1", "eth0", &conf).ok();
    f.del("c1", &conf);
    assert!(f.reservations().is_empty());
}

/// Go tools marshal the reference's own config structs with zero values: `null`
/// lists, empty strings. Go reads those as unset, and so must we.
#[test]
fn go_zero_values_are_accepted() {
    let Some(f) = Fixture::new() else { return };
    let conf = json!({
        "cniVersion": "1.0.0", "name": f.name, "type": "bridge",
        "dns": {"nameservers": null, "domain": "", "search": null, "options": null},
        "args": {"cni": {"ips": null}},
        "runtimeConfig": {"ips": null, "ipRanges": null},
        "ipam": {"type": "host-local", "routes": null, "dataDir": f.dir.path(), "resolvConf": "",
                 "ranges": [[{"subnet": "10.70.0.0/24", "rangeStart": null, "rangeEnd": null, "gateway": null}]]}
    });
    assert_eq!(f.add_ip("c1", &conf), "10.70.0.2/24");
    f.ours("CHECK", "c1", "eth0", &conf).ok();
    f.del("c1", &conf);
    let mut no_ranges = conf.clone();
    no_ranges["ipam"]["ranges"] = Value::Null;
    assert_eq!(f.add("c2", &no_ranges).err().msg, "no IP ranges specified");
}

/// An empty dataDir is the default directory, as in the reference (not the cwd).
#[test]
fn empty_data_dir_means_the_default() {
    let Some(f) = Fixture::new() else { return };
    /// The network's state dir, and the default dir's parents this test creates
    /// (deepest first): all removed again, so the host is left as found.
    struct Cleanup(PathBuf, Vec<&'static Path>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            for dir in &self.1 {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
    let parents = ["/var/lib/cni/networks", "/var/lib/cni"].map(Path::new);
    let created = parents.into_iter().filter(|d| !d.exists()).collect();
    let state = Cleanup(Path::new("/var/lib/cni/networks").join(&f.name), created);
    let conf = json!({"cniVersion": "1.0.0", "name": f.name,
        "ipam": {"type": "host-local", "dataDir": "", "subnet": "10.71.0.0/24"}});
    f.add_ip("c1", &conf);
    assert_eq!(
        std::fs::read(state.0.join("10.71.0.2")).unwrap(),
        b"c1\r\neth0"
    );
    f.del("c1", &conf);
    assert!(!state.0.join("10.71.0.2").exists());
}

#[test]
fn routes_pass_through_verbatim() {
    let Some(f) = Fixture::new() else { return };
    let routes = json!([
        {"dst": "10.1.2.3/16", "gw": "10.72.0.1", "mtu": 1400, "advmss": 1360, "priority": 5, "table": 100, "scope": 253},
        {"dst": "::/0"}
    ]);
    let conf = f.conf_v(
        "1.1.0",
        json!({"ranges": [[{"subnet": "10.72.0.0/24"}]], "routes": routes}),
    );
    assert_eq!(f.add("c1", &conf).ok()["routes"], routes);
}

/// The reference accepts bounds on the network and broadcast addresses and then
/// hands them out; we accept the config but never give those addresses away.
#[test]
fn network_and_broadcast_bounds_are_never_handed_out() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.conf(json!({"ranges": [[{"subnet": "10.73.0.0/30", "rangeStart": "10.73.0.0", "rangeEnd": "10.73.0.3"}]]}));
    assert_eq!(f.add_ip("c1", &conf), "10.73.0.2/30");
    assert!(
        f.add("c2", &conf)
            .err()
            .msg
            .ends_with("10.73.0.1-10.73.0.2")
    );
}

#[test]
fn gc_takes_the_legacy_key_and_needs_one() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.98.0.0/24");
    f.add_ip("c1", &conf);
    f.add_ip("c2", &conf);
    let mut gc = f.subnet("10.98.0.0/24");
    gc["cniVersion"] = json!("1.1.0");
    let run = |c: &Value| {
        Invocation::plugin("host-local")
            .command("GC")
            .path(&[bin_dir()])
            .stdin_json(c)
            .run()
    };
    let e = run(&gc).err();
    assert_eq!(
        (e.code, e.msg.as_str()),
        (7, "GC needs cni.dev/valid-attachments in the config")
    );
    assert_eq!(
        f.reservations().len(),
        2,
        "a GC without a list releases nothing"
    );
    gc["cni.dev/attachments"] = json!([{"containerID": "c2", "ifname": "eth0"}]);
    run(&gc).ok();
    let left: Vec<String> = f.reservations().into_keys().collect();
    assert_eq!(left, ["10.98.0.3"]);
    let status = Invocation::plugin("host-local")
        .command("STATUS")
        .stdin_json(&conf)
        .run()
        .err();
    assert_eq!(
        (status.code, status.msg.as_str()),
        (1, "config version does not allow STATUS")
    );
}

/// A reservation file left empty by a crash mid-write is someone's address: ADD
/// skips it, DEL and CHECK of others are unaffected, GC (h31) reclaims it.
#[test]
fn torn_reservation_files_are_skipped() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.74.0.0/24");
    std::fs::create_dir_all(f.net_dir()).unwrap();
    std::fs::write(f.net_dir().join("10.74.0.2"), "").unwrap();
    assert_eq!(f.add_ip("c1", &conf), "10.74.0.3/24");
    f.ours("CHECK", "c1", "eth0", &conf).ok();
    f.del("c1", &conf);
    assert_eq!(
        f.reservations().into_keys().collect::<Vec<_>>(),
        ["10.74.0.2"]
    );
}

/// Both implementations on one network at once, each DELeting the other's pods:
/// distinct addresses under contention, nothing left at the end.
#[test]
fn concurrent_mixed_with_reference() {
    let Some(f) = Fixture::new() else { return };
    if !reference_dir().join("host-local").exists() {
        eprintln!("skipping: reference host-local not installed");
        return;
    }
    let conf = f.subnet("10.75.0.0/24");
    let bin = |i: usize| {
        if i.is_multiple_of(2) {
            bin_dir()
        } else {
            reference_dir()
        }
    };
    let run_all = |cmd: &'static str, pick: fn(usize) -> usize| -> Vec<Outcome> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..60)
                .map(|i| {
                    let (f, conf, dir) = (&f, &conf, bin(pick(i)));
                    s.spawn(move || f.call(&dir, cmd, &format!("m{i}"), "eth0", conf).run())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let added = run_all("ADD", |i| i);
    let ips: std::collections::HashSet<String> = added
        .iter()
        .map(|o| o.ok()["ips"][0]["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), 60);
    assert_eq!(f.reservations().len(), 60);
    for o in run_all("DEL", |i| i + 1) {
        o.ok();
    }
    assert!(f.reservations().is_empty(), "{:?}", f.reservations());
}

/// P21/P22 through CHECK: a prevResult of another supported version is converted,
/// one without cniVersion takes the config's, an unknown version is code 1.
#[test]
fn check_reads_prev_result_of_any_version() {
    let Some(f) = Fixture::new() else { return };
    let conf = f.subnet("10.76.0.0/24");
    let mut result = f.add("c1", &conf).ok();
    result.as_object_mut().unwrap().remove("cniVersion");
    let check = |prev: Value| {
        let mut c = conf.clone();
        c["prevResult"] = prev;
        f.ours("CHECK", "c1", "eth0", &c)
    };
    check(result).ok();
    check(json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.76.0.2/24"}]}))
        .ok();
    check(json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.76.0.2/24"}})).ok();
    assert_eq!(check(json!({"cniVersion": "9.9.9"})).err().code, 1);
    assert_eq!(
        check(json!({"cniVersion": "1.0.0", "ips": "x"})).err().code,
        6
    );
}

/// host-local driven as a runtime drives a conflist: cached results, CHECK with the
/// cached prevResult, GC that DELs cached attachments the runtime no longer lists
/// and then forwards GC, reverse DEL that removes the cache.
#[test]
fn driven_through_the_conflist_driver() {
    use netns_tests::driver::{Attachment, Driver};
    let Some(f) = Fixture::new() else { return };
    let list = json!({"cniVersion": "1.1.0", "name": f.name, "plugins": [
        {"type": "host-local", "ipam": {"type": "host-local", "dataDir": f.dir.path(), "subnet": "10.77.0.0/24"}}
    ]});
    let cache = f.dir.join("cache");
    let driver = Driver::from_json(&list, vec![bin_dir()], &cache).unwrap();
    let ns = f.ns.path_str();
    let pods: Vec<Attachment> = (1..=3)
        .map(|i| Attachment::new(&format!("pod{i}"), &ns, "eth0"))
        .collect();
    for p in &pods {
        driver.add(p).unwrap();
        driver.check(p).unwrap();
    }
    assert!(driver.cache_path("pod1", "eth0").exists());
    // A file the runtime's cache does not know about, as after a lost DEL.
    std::fs::write(f.net_dir().join("10.77.0.99"), "lost\r\neth0").unwrap();
    driver.gc(&[("pod1", "eth0")]).unwrap();
    let left: Vec<String> = f.reservations().into_keys().collect();
    assert_eq!(left, ["10.77.0.2"]);
    assert!(
        !driver.cache_path("pod2", "eth0").exists(),
        "GC DELs stale cached attachments"
    );
    driver.status().unwrap();
    driver.del(&pods[0]).unwrap();
    assert!(f.reservations().is_empty());
    assert!(!driver.cache_path("pod1", "eth0").exists());
}

/// Logs go to WEFT_LOG_FILE when set, never to stdout.
#[test]
fn logs_go_to_the_configured_file() {
    let Some(f) = Fixture::new() else { return };
    let log = f.dir.join("host-local.log");
    let conf = f.subnet("10.78.0.0/29");
    f.add_ip("c1", &conf);
    let out = f
        .call(&bin_dir(), "ADD", "c1", "eth0", &conf)
        .var("WEFT_LOG_FILE", log.display().to_string())
        .run();
    assert_eq!(out.err().code, 101);
    assert_eq!(out.stderr, "");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("host-local [") && text.contains("duplicate allocation is not allowed"),
        "{text}"
    );
}
