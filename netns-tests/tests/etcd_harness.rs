//! The etcd harness itself against real etcd 3.4 servers: KV and lease helpers,
//! leader loss in a 3-member cluster, TLS with client certificates, a cluster inside
//! a netns, and members dying with the thread that started them.

use netns_tests::etcd::{EtcdCluster, EtcdOptions};
use netns_tests::{TestNetns, require_root};
use std::time::{Duration, Instant};

#[test]
fn single_member_kv_and_lease_round_trip() {
    if !require_root() {
        return;
    }
    let etcd = EtcdCluster::start(EtcdOptions::default());
    assert_eq!(etcd.len(), 1);
    assert!(
        etcd.endpoint(0).starts_with("http://127.0.0.1:"),
        "{}",
        etcd.endpoint(0)
    );
    assert_eq!(etcd.endpoints(), [etcd.endpoint(0)]);
    assert_eq!(etcd.leader(), Some(0));

    assert_eq!(etcd.get("/weft/a"), None);
    assert_eq!(etcd.get_prefix(""), []);
    let before = etcd.revision();
    etcd.put("/weft/b", "two");
    etcd.put("/weft/a", r#"{"PublicIP":"10.0.0.1"}"#);
    etcd.put("/weftx", "not under /weft/");
    etcd.put("/other", "x");
    assert_eq!(etcd.revision(), before + 4);
    assert_eq!(
        etcd.get("/weft/a").as_deref(),
        Some(r#"{"PublicIP":"10.0.0.1"}"#)
    );
    assert_eq!(
        etcd.get_prefix("/weft/"),
        [
            (
                "/weft/a".to_string(),
                r#"{"PublicIP":"10.0.0.1"}"#.to_string()
            ),
            ("/weft/b".to_string(), "two".to_string()),
        ]
    );
    assert_eq!(etcd.get_prefix("").len(), 4);
    assert!(etcd.delete("/weft/b"));
    assert!(!etcd.delete("/weft/b"), "already gone");
    assert_eq!(etcd.get("/weft/b"), None);
    etcd.put("/empty", "");
    assert_eq!(etcd.get("/empty").as_deref(), Some(""));

    assert_eq!(etcd.lease_list(), Vec::<i64>::new());
    let lease = etcd.lease_grant(60);
    etcd.put_with_lease("/weft/leased", "v", lease);
    assert_eq!(etcd.lease_list(), [lease]);
    let (ttl, keys) = etcd.lease_ttl(lease);
    assert!((55..=60).contains(&ttl), "ttl {ttl}");
    assert_eq!(keys, ["/weft/leased"]);
    etcd.lease_revoke(lease);
    assert_eq!(etcd.lease_list(), Vec::<i64>::new());
    assert_eq!(etcd.lease_ttl(lease), (-1, vec![]));
    assert_eq!(etcd.get("/weft/leased"), None, "revoking deletes the key");

    let rev = etcd.revision();
    etcd.compact(rev);
    let old = serde_json::json!({ "key": netns_tests::base64::encode(b"/weft/a"), "revision": (rev - 1).to_string() });
    let err = etcd.try_call_at(0, "/v3/kv/range", &old).unwrap_err();
    assert!(err.contains("compacted"), "{err}");
    assert_eq!(
        etcd.get("/weft/a").as_deref(),
        Some(r#"{"PublicIP":"10.0.0.1"}"#)
    );
}

#[test]
fn three_members_elect_a_new_leader_when_the_leader_dies() {
    if !require_root() {
        return;
    }
    let mut etcd = EtcdCluster::start(EtcdOptions {
        members: 3,
        ..Default::default()
    });
    assert_eq!(etcd.endpoints().len(), 3);
    let old = etcd.wait_leader(Duration::from_secs(5));
    etcd.put("/before", "1");

    etcd.kill(old);
    assert!(!etcd.is_running(old));
    let t = Instant::now();
    let new = etcd.wait_leader(Duration::from_secs(5));
    eprintln!("new leader m{new} after {:?}", t.elapsed());
    assert_ne!(new, old);
    etcd.put("/after", "2");
    assert_eq!(etcd.get("/before").as_deref(), Some("1"));

    etcd.start_again(old);
    assert!(etcd.is_running(old));
    assert_eq!(etcd.get_from(old, "/after").as_deref(), Some("2"));
    assert!((0..3).all(|i| etcd.health(i)));
    assert!(etcd.leader().is_some());
}

#[test]
fn tls_requires_a_client_certificate_from_the_ca() {
    if !require_root() {
        return;
    }
    let etcd = EtcdCluster::start(EtcdOptions {
        tls: true,
        ..Default::default()
    });
    let url = etcd.endpoint(0).to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert!(etcd.health(0));
    etcd.put("/tls", "ok");
    assert_eq!(etcd.get("/tls").as_deref(), Some("ok"));

    let health = format!("{url}/health");
    let ca = etcd.ca_path().display().to_string();
    let ok = etcd.curl(&[
        "--cacert",
        &ca,
        "--cert",
        &etcd.client_cert_path().display().to_string(),
        "--key",
        &etcd.client_key_path().display().to_string(),
        &health,
    ]);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains(r#""health":"true""#));

    let no_cert = etcd.curl(&["--cacert", &ca, &health]);
    assert!(!no_cert.status.success(), "no client cert: {no_cert:?}");
    let rogue = etcd.curl(&[
        "--cacert",
        &ca,
        "--cert",
        &etcd.rogue_client_cert_path().display().to_string(),
        "--key",
        &etcd.rogue_client_key_path().display().to_string(),
        &health,
    ]);
    assert!(!rogue.status.success(), "untrusted client cert: {rogue:?}");
    let plain = etcd.curl(&[&health.replacen("https", "http", 1)]);
    assert!(
        !String::from_utf8_lossy(&plain.stdout).contains(r#""health":"true""#),
        "plain http: {plain:?}"
    );
}

#[test]
fn runs_inside_a_netns_and_keeps_its_data_across_restarts() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    ns.exec_ok(&["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"]);
    let mut etcd = EtcdCluster::start(EtcdOptions {
        netns: Some(&ns),
        ip: "10.99.0.1",
        ..Default::default()
    });
    assert_eq!(etcd.endpoint(0), "http://10.99.0.1:2379");
    let pid = etcd.pid(0).unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        std::fs::read_link(ns.path()).unwrap(),
        "etcd itself runs in the netns"
    );
    let listening = ns.exec_ok(&["ss", "-Htln"]);
    assert!(listening.contains("10.99.0.1:2379"), "{listening}");

    etcd.put("/kept", "yes");
    etcd.stop(0);
    assert!(!etcd.is_running(0));
    assert!(!etcd.health(0));
    etcd.start_again(0);
    assert_eq!(etcd.get("/kept").as_deref(), Some("yes"));

    etcd.kill(0);
    etcd.start_again(0);
    assert_eq!(etcd.get("/kept").as_deref(), Some("yes"));
}

#[test]
fn members_die_with_the_thread_that_started_them() {
    if !require_root() {
        return;
    }
    let ns = TestNetns::new();
    // Through nsenter, the harder case: the parent-death signal must survive its exec.
    let (pid, dir) = std::thread::scope(|s| {
        s.spawn(|| {
            let etcd = EtcdCluster::start(EtcdOptions {
                netns: Some(&ns),
                ..Default::default()
            });
            let found = (etcd.pid(0).unwrap(), etcd.dir().to_path_buf());
            // As if the test process died: no Drop, no kill.
            std::mem::forget(etcd);
            found
        })
        .join()
        .unwrap()
    });
    let pid = pid as libc::pid_t;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = 0;
    loop {
        // SAFETY: reaping our own child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid: {}", std::io::Error::last_os_error());
        if r == pid {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "etcd {pid} outlived the thread that started it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "status {status:#x}"
    );
}
