//! The etcd lease source against real etcd servers (Debian's etcd 3.4 on
//! loopback): flanneld's keys and values byte for byte, races between many nodes,
//! restarts, renewal, the peer watch, outages, leader loss and TLS.

use netns_tests::etcd::{EtcdCluster, EtcdOptions};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;
use weft_core::lease::etcd::{EtcdOptions as Connect, EtcdSource};
use weft_core::lease::{
    AcquireRequest, Lease, LeaseAttrs, LeaseError, LeaseSource, NetworkConfig, PeerEvent,
    PeerUpdate, SubnetKey,
};

const PREFIX: &str = "/coreos.com/network";
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn connect_opts(etcd: &EtcdCluster) -> Connect {
    Connect {
        endpoints: etcd.endpoints(),
        prefix: PREFIX.into(),
        ..Default::default()
    }
}

async fn source(etcd: &EtcdCluster) -> EtcdSource {
    EtcdSource::connect(&connect_opts(etcd)).await.unwrap()
}

/// A source connected with `opts`, and the network config it reads.
async fn configured(opts: &Connect) -> (EtcdSource, NetworkConfig) {
    let mut src = EtcdSource::connect(opts).await.unwrap();
    let config = src.network_config().await.unwrap();
    (src, config)
}

/// `req` acquired by a source connected with `opts`: that source and the lease.
async fn leased(opts: &Connect, req: &AcquireRequest) -> (EtcdSource, Lease) {
    let (mut src, config) = configured(opts).await;
    let lease = src.acquire(&config, req).await.unwrap();
    (src, lease)
}

/// A node's request: vxlan with its VTEP MAC, public IP 10.77.0.<n>.
fn request(n: u8) -> AcquireRequest {
    AcquireRequest {
        attrs: LeaseAttrs {
            public_ip: Ipv4Addr::new(10, 77, 0, n),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(
                serde_json::json!({"VNI": 1, "VtepMAC": format!("c6:8a:a6:b1:ae:{n:02x}")}).into(),
            ),
            backend_v6_data: None,
        },
        previous_v4: None,
        previous_v6: None,
    }
}

fn started(config: &str) -> EtcdCluster {
    let etcd = EtcdCluster::start(EtcdOptions::default());
    etcd.put(&format!("{PREFIX}/config"), config);
    etcd
}

/// Node `n`'s lease, acquired by a source of its own.
async fn acquire(etcd: &EtcdCluster, n: u8) -> Lease {
    leased(&connect_opts(etcd), &request(n)).await.1
}

/// The etcd key of the lease `key` (`10.244.X.0-24`, or a [`SubnetKey`]).
fn subnet_path(key: impl std::fmt::Display) -> String {
    format!("{PREFIX}/subnets/{key}")
}

fn leases_in(etcd: &EtcdCluster) -> Vec<(String, String)> {
    etcd.get_prefix(&format!("{PREFIX}/subnets/"))
}

#[test]
fn lease_key_and_value_are_flanneld_bytes() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = started(CONFIG);
    let lease = rt().block_on(acquire(&etcd, 1));
    let stored = leases_in(&etcd);
    assert_eq!(stored.len(), 1);
    let (key, value) = &stored[0];
    let subnet = lease.key.v4.unwrap();
    assert_eq!(key, &format!("{PREFIX}/subnets/{}-24", subnet.network()));
    // The exact form flanneld writes (reference/flannel.md §1).
    assert_eq!(
        value,
        r#"{"PublicIP":"10.77.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:8a:a6:b1:ae:01"}}"#
    );
    // A 24 h etcd lease holds exactly this key.
    let (ttl, keys) = etcd.lease_ttl(lease.etcd_lease);
    assert!((86_000..=86_400).contains(&ttl), "ttl {ttl}");
    assert_eq!(keys, std::slice::from_ref(key));
    // Inside the pool: not the first subnet, a /24 of the network.
    let config = NetworkConfig::parse(CONFIG.as_bytes()).unwrap();
    assert!(config.v4.unwrap().holds(ipnet::IpNet::V4(subnet)));
}

#[test]
fn leases_written_by_flanneld_are_read_as_peers() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = started(
        r#"{"network":"10.244.0.0/16","enableipv6":true,"ipv6network":"fd44::/56","backend":{"type":"vxlan"}}"#,
    );
    // Golden values real flanneld nodes wrote, one without a TTL (a reservation),
    // plus keys flanneld skips.
    let golden = [
        (
            "10.244.84.0-24",
            r#"{"PublicIP":"10.77.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:8a:a6:b1:ae:b5"}}"#,
        ),
        (
            "10.244.37.0-24&fd44:0:0:50::-64",
            r#"{"PublicIP":"10.77.0.2","PublicIPv6":"fd00:77::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"a6:9d:3c:e4:4a:a3"},"BackendV6Data":{"VNI":1,"VtepMAC":"ea:db:52:26:6b:08"}}"#,
        ),
        (
            "10.244.9.0-24",
            r#"{"PublicIP":"10.77.0.3","PublicIPv6":null,"BackendType":"host-gw"}"#,
        ),
    ];
    let id = etcd.lease_grant(86400);
    for (k, v) in &golden[..2] {
        etcd.put_with_lease(&subnet_path(k), v, id);
    }
    etcd.put(&subnet_path(golden[2].0), golden[2].1);
    etcd.put(&subnet_path("10.244.1.7-24"), golden[2].1);
    etcd.put(&subnet_path("garbage"), "{");
    rt().block_on(async {
        let (mut src, config) = configured(&connect_opts(&etcd)).await;
        assert!(config.v6.is_some());
        let PeerUpdate::Snapshot(leases) = src.next_peers().await.unwrap() else {
            panic!("the first update is a snapshot");
        };
        let keys: BTreeSet<String> = leases.iter().map(|l| l.key.to_string()).collect();
        let want: BTreeSet<String> = golden.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys, want);
        for l in &leases {
            let (_, v) = golden
                .iter()
                .find(|(k, _)| *k == l.key.to_string())
                .unwrap();
            assert_eq!(&l.attrs.to_json(), v, "re-serialised value of {}", l.key);
        }
        let reservation = leases
            .iter()
            .find(|l| l.attrs.backend_type == "host-gw")
            .unwrap();
        assert_eq!(reservation.etcd_lease, 0);
        // A dual-stack node of ours never lands on the subnets they hold.
        let mut req = request(9);
        req.attrs.public_ipv6 = Some("fd00:77::9".parse().unwrap());
        let ours = src.acquire(&config, &req).await.unwrap();
        assert!(!want.contains(&ours.key.to_string()));
        assert!(ours.key.v6.is_some());
        let stored = etcd.get(&subnet_path(ours.key)).unwrap();
        assert!(
            stored.starts_with(
                r#"{"PublicIP":"10.77.0.9","PublicIPv6":"fd00:77::9","BackendType":"vxlan""#
            ),
            "{stored}"
        );
    });
}

#[test]
fn racing_nodes_get_distinct_subnets() {
    if !netns_tests::require_root() {
        return;
    }
    // A pool of 6 subnets for 2 nodes, then 50 nodes on a /16: every node a
    // different subnet, no loser gives up.
    for (config, nodes) in [
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.6.0","Backend":{"Type":"vxlan"}}"#,
            2u8,
        ),
        (CONFIG, 50),
    ] {
        let etcd = started(config);
        let leases = rt().block_on(async {
            let mut tasks = Vec::new();
            let local = tokio::task::LocalSet::new();
            for n in 1..=nodes {
                let opts = connect_opts(&etcd);
                tasks.push(local.spawn_local(async move {
                    let (mut src, config) = configured(&opts).await;
                    src.acquire(&config, &request(n)).await
                }));
            }
            local
                .run_until(async {
                    let mut out = Vec::new();
                    for t in tasks {
                        out.push(t.await.unwrap().unwrap());
                    }
                    out
                })
                .await
        });
        let subnets: BTreeSet<SubnetKey> = leases.iter().map(|l| l.key).collect();
        assert_eq!(subnets.len(), nodes as usize, "{leases:#?}");
        let stored = leases_in(&etcd);
        assert_eq!(stored.len(), nodes as usize);
        // Exactly one etcd lease per node: losers revoked the leases they granted.
        assert_eq!(etcd.lease_list().len(), nodes as usize);
    }
}

#[test]
fn a_restarted_node_gets_its_subnet_and_etcd_lease_back() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = started(CONFIG);
    let rt = rt();
    let first = rt.block_on(acquire(&etcd, 1));
    let other = rt.block_on(acquire(&etcd, 2));
    // Same public IP: the same key and the same etcd lease (flanneld grants a new
    // one and leaks the old).
    let again = rt.block_on(acquire(&etcd, 1));
    assert_eq!((again.key, again.etcd_lease), (first.key, first.etcd_lease));
    assert_eq!(etcd.lease_list().len(), 2);
    // etcd wiped: the subnet recorded in subnet.env comes back.
    for (k, _) in leases_in(&etcd) {
        etcd.delete(&k);
    }
    let mut req = request(1);
    req.previous_v4 = Some(ipnet::Ipv4Net::new(first.key.v4.unwrap().network(), 24).unwrap());
    let (_, back) = rt.block_on(leased(&connect_opts(&etcd), &req));
    assert_eq!(back.key, first.key);
    // ... unless another node holds it now: then any free one.
    let mut req = request(3);
    req.previous_v4 = other.key.v4;
    etcd.put(
        &subnet_path(other.key),
        r#"{"PublicIP":"10.77.0.2","PublicIPv6":null}"#,
    );
    let (_, third) = rt.block_on(leased(&connect_opts(&etcd), &req));
    assert_ne!(third.key, other.key);
}

#[test]
fn an_incompatible_old_lease_is_replaced() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = started(CONFIG);
    // Our public IP holds a /25 from an older config: flanneld deletes it and
    // leases anew; so do we.
    etcd.put(
        &subnet_path("10.244.3.0-25"),
        r#"{"PublicIP":"10.77.0.1","PublicIPv6":null,"BackendType":"vxlan"}"#,
    );
    let lease = rt().block_on(acquire(&etcd, 1));
    assert_eq!(lease.key.v4.unwrap().prefix_len(), 24);
    let keys: Vec<String> = leases_in(&etcd).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, [subnet_path(lease.key)]);
}

#[test]
fn renewal_keeps_one_etcd_lease() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = started(CONFIG);
    rt().block_on(async {
        let (mut src, mut lease) = leased(&connect_opts(&etcd), &request(1)).await;
        for _ in 0..5 {
            lease = src.renew(&lease).await.unwrap();
        }
        assert_eq!(etcd.lease_list(), [lease.etcd_lease]);
        assert!(lease.ttl.unwrap() > Duration::from_secs(86_000));
        // The etcd lease revoked behind our back (the key goes with it): renewal
        // creates the key again under one new lease.
        etcd.lease_revoke(lease.etcd_lease);
        let renewed = src.renew(&lease).await.unwrap();
        assert_eq!(renewed.key, lease.key);
        assert_eq!(etcd.lease_list(), [renewed.etcd_lease]);
        assert!(etcd.get(&subnet_path(lease.key)).is_some());
        // ... but it never takes a subnet another node grabbed meanwhile.
        etcd.lease_revoke(renewed.etcd_lease);
        etcd.put(
            &subnet_path(lease.key),
            r#"{"PublicIP":"10.77.0.5","PublicIPv6":null}"#,
        );
        let err = src.renew(&renewed).await.unwrap_err();
        assert!(
            err.to_string().contains("another node now holds it"),
            "{err}"
        );
        assert!(etcd.lease_list().is_empty());
    });
}

#[test]
fn the_watch_reports_peers_deletions_and_recovers_from_compaction() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = started(CONFIG);
    rt().block_on(async {
        let own = acquire(&etcd, 1).await;
        let mut src = source(&etcd).await;
        let PeerUpdate::Snapshot(leases) = src.next_peers().await.unwrap() else {
            panic!("snapshot first");
        };
        assert_eq!(leases.iter().map(|l| l.key).collect::<Vec<_>>(), [own.key]);
        let peer = acquire(&etcd, 2).await;
        let events = next_events(&mut src).await;
        assert!(
            matches!(&events[..], [PeerEvent::Added(l)] if l.key == peer.key),
            "{events:?}"
        );
        // A deleted lease (ours, say) is noticed.
        etcd.delete(&subnet_path(own.key));
        assert_eq!(next_events(&mut src).await, [PeerEvent::Removed(own.key)]);
        // Compaction past the revision a source last saw: its watch starts at a
        // compacted revision, etcd cancels it, and the source re-lists (flanneld
        // < v0.28.7 loops on "required revision has been compacted" here).
        let mut stale = source(&etcd).await;
        let PeerUpdate::Snapshot(_) = stale.next_peers().await.unwrap() else {
            panic!()
        };
        etcd.delete(&subnet_path(peer.key));
        let third = acquire(&etcd, 3).await;
        etcd.compact(etcd.revision());
        let update = tokio::time::timeout(Duration::from_secs(10), stale.next_peers())
            .await
            .expect("an update within 10 s")
            .unwrap();
        let PeerUpdate::Snapshot(now) = update else {
            panic!("expected a re-list, got {update:?}")
        };
        assert_eq!(now.iter().map(|l| l.key).collect::<Vec<_>>(), [third.key]);
        // ... and watches from there on.
        etcd.delete(&subnet_path(third.key));
        assert_eq!(
            next_events(&mut stale).await,
            [PeerEvent::Removed(third.key)]
        );
    });
}

async fn next_events(src: &mut EtcdSource) -> Vec<PeerEvent> {
    let update = tokio::time::timeout(Duration::from_secs(10), src.next_peers())
        .await
        .expect("an event within 10 s")
        .unwrap();
    match update {
        PeerUpdate::Events(e) => e,
        other => panic!("expected events, got {other:?}"),
    }
}

#[test]
fn the_watch_survives_an_etcd_restart() {
    if !netns_tests::require_root() {
        return;
    }
    let mut etcd = started(CONFIG);
    let rt = rt();
    let mut src = rt.block_on(source(&etcd));
    rt.block_on(async {
        let PeerUpdate::Snapshot(_) = src.next_peers().await.unwrap() else {
            panic!()
        };
    });
    etcd.stop(0);
    // Down: lease operations fail within the RPC deadline instead of hanging.
    let err = rt.block_on(async {
        let config = NetworkConfig::parse(CONFIG.as_bytes()).unwrap();
        let mut other = source(&etcd).await;
        tokio::time::timeout(Duration::from_secs(20), other.acquire(&config, &request(7)))
            .await
            .expect("no hang while etcd is down")
    });
    assert!(matches!(err, Err(LeaseError::Store(_))), "{err:?}");
    etcd.start_again(0);
    etcd.put(
        &subnet_path("10.244.200.0-24"),
        r#"{"PublicIP":"10.77.0.9","PublicIPv6":null,"BackendType":"vxlan"}"#,
    );
    let events = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), src.next_peers())
            .await
            .expect("the watch resumes")
    });
    let PeerUpdate::Events(events) = events.unwrap() else {
        panic!("resumed, not re-listed")
    };
    assert!(matches!(&events[..], [PeerEvent::Added(l)] if l.key.to_string() == "10.244.200.0-24"));
}

#[test]
fn leader_loss_during_acquisition_never_duplicates_a_subnet() {
    if !netns_tests::require_root() {
        return;
    }
    let mut etcd = EtcdCluster::start(EtcdOptions {
        members: 3,
        ..Default::default()
    });
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    let leader = etcd.wait_leader(Duration::from_secs(10));
    let rt = rt();
    let local = tokio::task::LocalSet::new();
    let mut tasks = Vec::new();
    for n in 1..=30u8 {
        let opts = connect_opts(&etcd);
        tasks.push(local.spawn_local(async move {
            let mut src = EtcdSource::connect(&opts).await.unwrap();
            let config = NetworkConfig::parse(CONFIG.as_bytes()).unwrap();
            // What the agent does: retry store errors until leased.
            for _ in 0..60 {
                match src.acquire(&config, &request(n)).await {
                    Ok(l) => return l,
                    Err(LeaseError::Store(_)) => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            panic!("node {n} never got a lease");
        }));
    }
    let leases = rt.block_on(local.run_until(async {
        // Let the first acquisitions start, then kill the leader under them.
        tokio::time::sleep(Duration::from_millis(30)).await;
        etcd.kill(leader);
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }));
    let subnets: BTreeSet<SubnetKey> = leases.iter().map(|l| l.key).collect();
    assert_eq!(subnets.len(), 30);
    let stored = leases_in(&etcd);
    assert_eq!(stored.len(), 30, "{stored:#?}");
    let owners: BTreeSet<String> = stored.iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(owners.len(), 30, "one key per node");
}

#[test]
fn tls_with_client_certificates() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = EtcdCluster::start(EtcdOptions {
        tls: true,
        ..Default::default()
    });
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    let rt = rt();
    let opts = Connect {
        ca_file: Some(etcd.ca_path().into()),
        cert_file: Some(etcd.client_cert_path().into()),
        key_file: Some(etcd.client_key_path().into()),
        ..connect_opts(&etcd)
    };
    let (_, lease) = rt.block_on(leased(&opts, &request(1)));
    assert!(etcd.get(&subnet_path(lease.key)).is_some());
    // An untrusted client certificate, and no certificate at all, are refused.
    for (cert, key) in [
        (
            Some(etcd.rogue_client_cert_path().into()),
            Some(etcd.rogue_client_key_path().into()),
        ),
        (None, None),
    ] {
        let opts = Connect {
            cert_file: cert,
            key_file: key,
            ..opts.clone()
        };
        let err = rt.block_on(async {
            let mut src = EtcdSource::connect(&opts).await?;
            src.network_config().await
        });
        assert!(matches!(err, Err(LeaseError::Store(_))), "{err:?}");
    }
    // Half a client identity and unreadable files are config errors.
    let half = Connect {
        key_file: None,
        ..opts.clone()
    };
    let err = rt.block_on(EtcdSource::connect(&half)).err().unwrap();
    assert!(err.to_string().contains("must be given together"), "{err}");
    let missing = Connect {
        ca_file: Some("/nonexistent/ca.crt".into()),
        ..opts
    };
    let err = rt.block_on(EtcdSource::connect(&missing)).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
}

#[test]
fn missing_config_and_a_full_pool_are_reported() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = EtcdCluster::start(EtcdOptions::default());
    let rt = rt();
    let err = rt
        .block_on(async { source(&etcd).await.network_config().await })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "flannel config not found at /coreos.com/network/config (did you create it with the etcd v3 API?)"
    );
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.0.0.0/16","SubnetLen":1}"#,
    );
    let err = rt
        .block_on(async { source(&etcd).await.network_config().await })
        .unwrap_err();
    assert!(matches!(err, LeaseError::Config(_)), "{err:?}");
    // A /26 holds three /28s after the skipped first one.
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.1.2.0/26","Backend":{"Type":"host-gw"}}"#,
    );
    for n in 1..=3 {
        rt.block_on(acquire(&etcd, n));
    }
    let err = rt.block_on(async {
        let (mut src, config) = configured(&connect_opts(&etcd)).await;
        src.acquire(&config, &request(4)).await
    });
    assert_eq!(err, Err(LeaseError::OutOfSubnets));
    assert_eq!(
        etcd.lease_list().len(),
        3,
        "a failed acquisition grants nothing"
    );
}

#[test]
fn user_and_password_auth() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = started(CONFIG);
    for (path, body) in [
        (
            "/v3/auth/user/add",
            serde_json::json!({"name": "root", "password": "s3cret"}),
        ),
        ("/v3/auth/role/add", serde_json::json!({"name": "root"})),
        (
            "/v3/auth/user/grant",
            serde_json::json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/enable", serde_json::json!({})),
    ] {
        etcd.call(path, &body);
    }
    let rt = rt();
    let with = |user: Option<&str>, password: &str| Connect {
        username: user.map(str::to_owned),
        password: Some(weft_core::lease::etcd::Secret(password.to_owned())),
        ..connect_opts(&etcd)
    };
    let lease = rt.block_on(async {
        let (mut src, lease) = leased(&with(Some("root"), "s3cret"), &request(1)).await;
        let (leases, _) = src.list().await.unwrap();
        assert_eq!(
            leases.iter().map(|l| l.key).collect::<Vec<_>>(),
            [lease.key]
        );
        lease
    });
    assert!(lease.key.v4.is_some());
    // A wrong password fails when connecting; no credentials fail on first use.
    let err = rt
        .block_on(EtcdSource::connect(&with(Some("root"), "wrong")))
        .err()
        .unwrap();
    assert!(matches!(err, LeaseError::Store(_)), "{err:?}");
    let err = rt.block_on(async {
        EtcdSource::connect(&with(None, ""))
            .await
            .unwrap()
            .network_config()
            .await
    });
    assert!(matches!(err, Err(LeaseError::Store(_))), "{err:?}");
}

#[test]
fn a_deleted_key_is_restored_under_its_own_etcd_lease() {
    if !netns_tests::require_root() {
        return;
    }
    let etcd = started(CONFIG);
    rt().block_on(async {
        let (mut src, lease) = leased(&connect_opts(&etcd), &request(1)).await;
        let path = subnet_path(lease.key);
        // Deleting a key leaves its etcd lease alive: restoring reuses it.
        etcd.delete(&path);
        let back = src.restore(&lease).await.unwrap().unwrap();
        assert_eq!((back.key, back.etcd_lease), (lease.key, lease.etcd_lease));
        assert_eq!(etcd.lease_list(), [lease.etcd_lease]);
        assert!(etcd.get(&path).unwrap().contains("10.77.0.1"));
        // Taken by another node meanwhile: None, and our etcd lease is revoked.
        etcd.delete(&path);
        etcd.put(&path, r#"{"PublicIP":"10.77.0.5","PublicIPv6":null}"#);
        assert_eq!(src.restore(&lease).await.unwrap(), None);
        assert!(etcd.lease_list().is_empty());
        assert!(etcd.get(&path).unwrap().contains("10.77.0.5"));
    });
}
