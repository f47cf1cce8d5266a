//! The libcni-like driver, end to end against fake (shell-script) plugins:
//! ADD order and prevResult chaining, the result cache, DEL, CHECK, GC, STATUS,
//! capabilities and error reporting, as reference §1.8 describes libcni.
//! No root needed: the fakes never touch a namespace.

use netns_tests::TempDir;
use netns_tests::driver::{Attachment, Driver};
use netns_tests::fake::{self, Call, FakePlugin};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// A bin dir with fake plugins, their call log, and a cache dir.
struct Rig {
    dir: TempDir,
}

impl Rig {
    fn new(plugins: &[FakePlugin]) -> Rig {
        let dir = TempDir::new("driver");
        std::fs::create_dir(dir.join("bin")).unwrap();
        std::fs::create_dir(dir.join("empty-bin")).unwrap();
        for p in plugins {
            p.install(&dir.join("bin"), &dir.join("log"));
        }
        Rig { dir }
    }

    /// Plugins with default behaviour.
    fn with(names: &[&str]) -> Rig {
        let fakes: Vec<FakePlugin> = names.iter().map(|n| FakePlugin::new(n)).collect();
        Rig::new(&fakes)
    }

    /// CNI_PATH: an empty dir first, so lookup has to go on to the second.
    fn bin_dirs(&self) -> Vec<PathBuf> {
        vec![self.dir.join("empty-bin"), self.dir.join("bin")]
    }

    fn driver(&self, conflist: &Value) -> Driver {
        Driver::from_json(conflist, self.bin_dirs(), self.dir.join("cache")).unwrap()
    }

    /// Replace (or add) one fake, e.g. to make it fail from now on.
    fn install(&self, plugin: FakePlugin) {
        plugin.install(&self.dir.join("bin"), &self.dir.join("log"));
    }

    fn calls(&self) -> Vec<Call> {
        fake::calls(&self.dir.join("log"))
    }

    fn labels(&self) -> Vec<String> {
        fake::labels(&self.dir.join("log"))
    }

    /// Forget earlier calls so the next phase can be asserted on its own.
    fn clear_log(&self) {
        for c in std::fs::read_dir(self.dir.join("log")).unwrap() {
            std::fs::remove_file(c.unwrap().path()).unwrap();
        }
    }
}

/// `{"cniVersion": v, "name": <unique>, "plugins": [{"type": t}, ...]}`.
fn list(version: &str, types: &[&str]) -> Value {
    let plugins: Vec<Value> = types.iter().map(|t| json!({ "type": t })).collect();
    json!({
        "cniVersion": version,
        "name": netns_tests::unique_name("net"),
        "plugins": plugins,
    })
}

/// An attachment whose netns path is only a string: fakes never open it.
fn att(cid: &str, ifname: &str) -> Attachment {
    Attachment::new(cid, &format!("/nonexistent/netns/{cid}"), ifname)
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn add_runs_plugins_in_order_and_chains_prev_result() {
    let rig = Rig::with(&["a", "b", "c"]);
    let d = rig.driver(&list("1.1.0", &["a", "b", "c"]));
    let mut at = att("c1", "eth0");
    at.cni_args = vec![
        ("K8S_POD_NAME".into(), "p".into()),
        ("IgnoreUnknown".into(), "1".into()),
    ];
    let result = d.add(&at).unwrap();

    assert_eq!(rig.labels(), ["a ADD", "b ADD", "c ADD"]);
    let calls = rig.calls();
    assert!(calls[0].stdin.get("prevResult").is_none());
    // Each plugin gets the previous one's result, cniVersion filled in by the runtime.
    assert_eq!(
        calls[1].stdin["prevResult"],
        json!({"interfaces": [{"name": "a"}], "ips": [{"address": "10.99.0.2/24"}], "cniVersion": "1.1.0"})
    );
    assert_eq!(calls[2].stdin["prevResult"]["interfaces"][0]["name"], "b");
    assert_eq!(result["interfaces"][0]["name"], "c");
    assert_eq!(result["cniVersion"], "1.1.0");

    let path = format!(
        "{}:{}",
        rig.dir.join("empty-bin").display(),
        rig.dir.join("bin").display()
    );
    for c in &calls {
        assert_eq!(c.stdin["name"], d.conflist.name);
        assert_eq!(c.stdin["cniVersion"], "1.1.0");
        assert_eq!(c.stdin["type"], c.plugin);
        let env: Vec<(&str, &str)> = c
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("CNI_ARGS", "K8S_POD_NAME=p;IgnoreUnknown=1"),
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/nonexistent/netns/c1"),
                ("CNI_PATH", path.as_str()),
            ]
        );
    }
}

#[test]
fn add_caches_the_final_result_with_libcni_keys_and_modes() {
    let rig = Rig::with(&["a", "b"]);
    let conf = list("1.0.0", &["a", "b"]);
    let d = rig.driver(&conf);
    let mut at = att("c1", "eth0");
    at.cni_args = vec![("IgnoreUnknown".into(), "1".into())];
    at.capability_args = json!({"portMappings": [{"hostPort": 80}]})
        .as_object()
        .unwrap()
        .clone();
    let result = d.add(&at).unwrap();

    let file = rig.dir.join(format!(
        "cache/results/{}-c1-eth0",
        conf["name"].as_str().unwrap()
    ));
    assert_eq!(d.cache_path("c1", "eth0"), file);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&rig.dir.join("cache/results")), 0o700);

    let cached: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let keys: Vec<&str> = cached
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "kind",
            "containerId",
            "config",
            "ifName",
            "networkName",
            "netns",
            "cniArgs",
            "capabilityArgs",
            "result"
        ]
    );
    assert_eq!(cached["kind"], "cniCacheV1");
    assert_eq!(cached["containerId"], "c1");
    assert_eq!(cached["ifName"], "eth0");
    assert_eq!(cached["networkName"], conf["name"]);
    assert_eq!(cached["netns"], "/nonexistent/netns/c1");
    assert_eq!(cached["cniArgs"], json!([["IgnoreUnknown", "1"]]));
    assert_eq!(
        cached["capabilityArgs"],
        json!({"portMappings": [{"hostPort": 80}]})
    );
    assert_eq!(cached["result"], result);
    let config = netns_tests::base64::decode(cached["config"].as_str().unwrap()).unwrap();
    assert_eq!(config, d.config_bytes);
}

#[test]
fn add_stops_at_the_first_error_with_libcni_message() {
    let rig = Rig::new(&[
        FakePlugin::new("a"),
        FakePlugin::new("b").fail("ADD", 100, "no more addresses", "range 10.0.0.0/24"),
        FakePlugin::new("c"),
    ]);
    let d = rig.driver(&list("1.1.0", &["a", "b", "c"]));
    let e = d.add(&att("c1", "eth0")).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"plugin type="b" failed (add): no more addresses; range 10.0.0.0/24"#
    );
    assert_eq!(e.code(), Some(100));
    assert_eq!(e.cni.unwrap().details, "range 10.0.0.0/24");
    // No automatic DEL, no cache.
    assert_eq!(rig.labels(), ["a ADD", "b ADD"]);
    assert!(!d.cache_path("c1", "eth0").exists());
}

#[test]
fn plugin_errors_are_read_like_libcni() {
    let rig = Rig::new(&[
        FakePlugin::new("silent").fail_raw("ADD", 2, "", "boom"),
        FakePlugin::new("mute").fail_raw("ADD", 3, "", ""),
        FakePlugin::new("garbage").fail_raw("ADD", 1, "nope", ""),
    ]);
    let msg = |t: &str| {
        rig.driver(&list("1.0.0", &[t]))
            .add(&att("c1", "eth0"))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        msg("silent"),
        r#"plugin type="silent" failed (add): netplugin failed: "boom": exit status 2"#
    );
    assert_eq!(
        msg("mute"),
        r#"plugin type="mute" failed (add): netplugin failed with no error message: exit status 3"#
    );
    assert!(
        msg("garbage").starts_with(
            r#"plugin type="garbage" failed (add): netplugin failed but error parsing its diagnostic message "nope""#
        ),
        "{}",
        msg("garbage")
    );
    let dirs = rig.bin_dirs();
    assert_eq!(
        msg("missing"),
        format!(
            r#"plugin type="missing" failed (add): failed to find plugin "missing" in path [{} {}]"#,
            dirs[0].display(),
            dirs[1].display()
        )
    );
}

#[test]
fn add_rejects_a_bad_result() {
    let rig = Rig::new(&[FakePlugin::new("a").add_result("not json")]);
    let d = rig.driver(&list("1.0.0", &["a"]));
    let e = d.add(&att("c1", "eth0")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(r#"plugin type="a" failed (add): failed to unmarshal result"#),
        "{e}"
    );
    assert!(!d.cache_path("c1", "eth0").exists());
}

#[test]
fn invalid_attachment_is_rejected_before_exec() {
    let rig = Rig::with(&["a"]);
    let d = rig.driver(&list("1.0.0", &["a"]));
    let e = d.add(&att("-bad/id", "eth0")).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"plugin type="a" failed (add): invalid characters in containerID; -bad/id"#
    );
    assert_eq!(e.code(), Some(4));
    let e = d.del(&att("c1", "sixteen-chars-xx")).unwrap_err();
    assert_eq!(e.code(), Some(4));
    assert!(d.check(&att("c1", "eth/0")).is_err());

    let mut bad_name = list("1.0.0", &["a"]);
    bad_name["name"] = "bad name".into();
    let e = rig.driver(&bad_name).add(&att("c1", "eth0")).unwrap_err();
    assert_eq!(e.code(), Some(7));
    assert!(rig.calls().is_empty());
}

#[test]
fn runtime_config_only_for_declared_capabilities() {
    let rig = Rig::with(&["a", "b", "c"]);
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": netns_tests::unique_name("caps"),
        "plugins": [
            {"type": "a", "capabilities": {"portMappings": true, "bandwidth": false}},
            {"type": "b", "capabilities": {"ips": true}},
            {"type": "c"},
        ],
    });
    let d = rig.driver(&conf);
    let mut at = att("c1", "eth0");
    at.capability_args = json!({
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 1},
        "mac": "02:00:00:00:00:01",
    })
    .as_object()
    .unwrap()
    .clone();
    d.add(&at).unwrap();
    let calls = rig.calls();
    assert_eq!(
        calls[0].stdin["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
    );
    // libcni passes `capabilities` through untouched.
    assert_eq!(calls[0].stdin["capabilities"]["portMappings"], true);
    assert!(
        calls[1].stdin.get("runtimeConfig").is_none(),
        "ips not offered"
    );
    assert!(calls[2].stdin.get("runtimeConfig").is_none());
}

#[test]
fn negotiates_the_highest_supported_version() {
    let rig = Rig::with(&["a"]);
    let mut conf = list("0.4.0", &["a"]);
    conf["cniVersions"] = json!(["1.0.0", "1.1.0", "9.0.0"]);
    rig.driver(&conf).add(&att("c1", "eth0")).unwrap();
    assert_eq!(rig.calls()[0].stdin["cniVersion"], "1.1.0");

    let e = rig
        .driver(&list("9.9.9", &["a"]))
        .add(&att("c2", "eth0"))
        .unwrap_err();
    assert_eq!(e.code(), Some(1));
    assert_eq!(rig.calls().len(), 1);
}

#[test]
fn del_runs_in_reverse_with_the_cached_result_and_removes_the_cache() {
    let rig = Rig::with(&["a", "b", "c"]);
    let d = rig.driver(&list("0.4.0", &["a", "b", "c"]));
    let at = att("c1", "eth0");
    let result = d.add(&at).unwrap();
    rig.clear_log();

    d.del(&at).unwrap();
    assert_eq!(rig.labels(), ["c DEL", "b DEL", "a DEL"]);
    for c in rig.calls() {
        assert_eq!(c.stdin["prevResult"], result);
        assert_eq!(c.env["CNI_NETNS"], "/nonexistent/netns/c1");
    }
    assert!(!d.cache_path("c1", "eth0").exists());

    // Again: DEL is idempotent; without a cache no prevResult is sent.
    rig.clear_log();
    d.del(&at).unwrap();
    assert_eq!(rig.labels(), ["c DEL", "b DEL", "a DEL"]);
    assert!(
        rig.calls()
            .iter()
            .all(|c| c.stdin.get("prevResult").is_none())
    );
}

#[test]
fn del_removes_a_corrupt_cache_and_sends_no_prev_result() {
    let rig = Rig::with(&["a"]);
    let d = rig.driver(&list("1.0.0", &["a"]));
    let at = att("c1", "eth0");
    d.add(&at).unwrap();
    let file = d.cache_path("c1", "eth0");
    std::fs::write(&file, "{not json").unwrap();
    rig.clear_log();
    d.del(&at).unwrap();
    assert_eq!(rig.labels(), ["a DEL"]);
    assert!(rig.calls()[0].stdin.get("prevResult").is_none());
    assert!(!file.exists());
}

#[test]
fn del_before_0_4_0_sends_no_prev_result() {
    let rig = Rig::with(&["a", "b"]);
    let d = rig.driver(&list("0.3.1", &["a", "b"]));
    let at = att("c1", "eth0");
    d.add(&at).unwrap();
    assert!(d.cache_path("c1", "eth0").exists());
    rig.clear_log();
    d.del(&at).unwrap();
    assert_eq!(rig.labels(), ["b DEL", "a DEL"]);
    assert!(
        rig.calls()
            .iter()
            .all(|c| c.stdin.get("prevResult").is_none())
    );
    assert!(!d.cache_path("c1", "eth0").exists());
}

#[test]
fn del_stops_at_the_first_error_and_keeps_the_cache() {
    let rig = Rig::with(&["a", "b"]);
    let d = rig.driver(&list("1.0.0", &["a", "b"]));
    let at = att("c1", "eth0");
    let result = d.add(&at).unwrap();
    rig.install(FakePlugin::new("b").fail("DEL", 11, "busy", ""));
    rig.clear_log();

    let e = d.del(&at).unwrap_err();
    assert_eq!(e.to_string(), r#"plugin type="b" failed (delete): busy"#);
    assert_eq!(e.code(), Some(11));
    assert_eq!(rig.labels(), ["b DEL"]);
    assert!(d.cache_path("c1", "eth0").exists());

    // The retry still gets the cached result.
    rig.install(FakePlugin::new("b"));
    rig.clear_log();
    d.del(&at).unwrap();
    assert_eq!(rig.labels(), ["b DEL", "a DEL"]);
    assert_eq!(rig.calls()[1].stdin["prevResult"], result);
    assert!(!d.cache_path("c1", "eth0").exists());
}

#[test]
fn del_converts_the_cached_result_to_the_config_version() {
    let rig = Rig::with(&["a"]);
    let old = list("0.4.0", &["a"]);
    let at = att("c1", "eth0");
    let cached = rig.driver(&old).add(&at).unwrap();
    assert_eq!(cached["cniVersion"], "0.4.0");
    // The config was upgraded while the container ran.
    let mut new = old.clone();
    new["cniVersion"] = "1.0.0".into();
    rig.clear_log();
    rig.driver(&new).del(&at).unwrap();
    let prev = &rig.calls()[0].stdin["prevResult"];
    assert_eq!(prev["cniVersion"], "1.0.0");
    assert_eq!(prev["ips"], json!([{"address": "10.99.0.2/24"}]));
}

#[test]
fn check_needs_0_4_0() {
    let rig = Rig::with(&["a"]);
    let d = rig.driver(&list("0.3.1", &["a"]));
    let e = d.check(&att("c1", "eth0")).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"configuration version "0.3.1" does not support the CHECK command"#
    );
    assert!(rig.calls().is_empty());
}

#[test]
fn check_is_a_no_op_when_disabled() {
    let rig = Rig::with(&["a"]);
    for flag in [json!(true), json!("true")] {
        let mut conf = list("1.0.0", &["a"]);
        conf["disableCheck"] = flag;
        rig.driver(&conf).check(&att("c1", "eth0")).unwrap();
    }
    assert!(rig.calls().is_empty());
}

#[test]
fn check_runs_in_order_with_the_cached_result() {
    let rig = Rig::with(&["a", "b", "c"]);
    let d = rig.driver(&list("1.1.0", &["a", "b", "c"]));
    let at = att("c1", "eth0");
    let result = d.add(&at).unwrap();
    rig.clear_log();
    d.check(&at).unwrap();
    assert_eq!(rig.labels(), ["a CHECK", "b CHECK", "c CHECK"]);
    assert!(rig.calls().iter().all(|c| c.stdin["prevResult"] == result));

    rig.install(FakePlugin::new("b").fail("CHECK", 102, "address gone", "10.99.0.2"));
    rig.clear_log();
    let e = d.check(&at).unwrap_err();
    // libcni returns CHECK errors unwrapped.
    assert_eq!(e.to_string(), "address gone; 10.99.0.2");
    assert_eq!(rig.labels(), ["a CHECK", "b CHECK"]);
    assert!(
        d.cache_path("c1", "eth0").exists(),
        "CHECK never touches the cache"
    );
}

/// ADD c1/eth0, c1/eth1 and c2/eth0 (with args and capabilities) on `d`.
fn add_three(d: &Driver) -> Attachment {
    let mut c2 = att("c2", "eth0");
    c2.cni_args = vec![("IgnoreUnknown".into(), "1".into())];
    c2.capability_args = json!({"portMappings": [{"hostPort": 81}]})
        .as_object()
        .unwrap()
        .clone();
    for a in [att("c1", "eth0"), att("c1", "eth1"), c2.clone()] {
        d.add(&a).unwrap();
    }
    c2
}

fn with_port_caps(mut conf: Value) -> Value {
    conf["plugins"][0]["capabilities"] = json!({"portMappings": true});
    conf
}

#[test]
fn gc_deletes_stale_attachments_then_forwards_gc() {
    let rig = Rig::with(&["a", "b"]);
    let d = rig.driver(&with_port_caps(list("1.1.0", &["a", "b"])));
    let c2 = add_three(&d);
    let other = rig.driver(&list("1.1.0", &["a", "b"]));
    other.add(&att("c9", "eth0")).unwrap();
    let c2_result =
        serde_json::from_slice::<Value>(&std::fs::read(d.cache_path("c2", "eth0")).unwrap())
            .unwrap()["result"]
            .clone();
    rig.clear_log();

    d.gc(&[("c1", "eth0")]).unwrap();
    assert_eq!(
        rig.labels(),
        ["b DEL", "a DEL", "b DEL", "a DEL", "a GC", "b GC"],
        "stale c1/eth1 then c2/eth0 (cache file order), each in reverse; then GC in order"
    );
    let calls = rig.calls();
    // The synthesized DEL of c2 uses what the cache recorded.
    let del_c2 = &calls[3];
    assert_eq!(del_c2.env["CNI_CONTAINERID"], "c2");
    assert_eq!(del_c2.env["CNI_NETNS"], c2.netns);
    assert_eq!(del_c2.env["CNI_ARGS"], "IgnoreUnknown=1");
    assert_eq!(
        del_c2.stdin["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 81}]})
    );
    assert_eq!(del_c2.stdin["prevResult"], c2_result);

    let valid = json!([{"containerID": "c1", "ifname": "eth0"}]);
    for gc in &calls[4..] {
        assert_eq!(gc.stdin["cni.dev/valid-attachments"], valid);
        assert_eq!(gc.stdin["cni.dev/attachments"], valid);
        assert_eq!(gc.stdin["cniVersion"], "1.1.0");
        assert!(gc.stdin.get("prevResult").is_none());
        assert!(gc.stdin.get("runtimeConfig").is_none());
        for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"] {
            assert_eq!(gc.env[var], "", "{var}");
        }
        assert!(!gc.env["CNI_PATH"].is_empty());
    }
    assert!(d.cache_path("c1", "eth0").exists());
    assert!(!d.cache_path("c1", "eth1").exists());
    assert!(!d.cache_path("c2", "eth0").exists());
    assert!(
        other.cache_path("c9", "eth0").exists(),
        "other networks are left alone"
    );
}

#[test]
fn gc_is_a_no_op_when_disabled() {
    let rig = Rig::with(&["a"]);
    let mut conf = list("1.1.0", &["a"]);
    conf["disableGC"] = "true".into();
    let d = rig.driver(&conf);
    d.add(&att("c1", "eth0")).unwrap();
    rig.clear_log();
    d.gc::<&str>(&[]).unwrap();
    assert!(rig.calls().is_empty());
    assert!(d.cache_path("c1", "eth0").exists());
}

#[test]
fn gc_before_1_1_0_only_deletes_stale_attachments() {
    let rig = Rig::with(&["a"]);
    let d = rig.driver(&list("1.0.0", &["a"]));
    d.add(&att("c1", "eth0")).unwrap();
    rig.clear_log();
    d.gc::<String>(&[]).unwrap();
    assert_eq!(rig.labels(), ["a DEL"]);
    assert!(!d.cache_path("c1", "eth0").exists());
}

#[test]
fn gc_continues_after_errors_and_joins_them() {
    let rig = Rig::with(&["a", "b"]);
    let d = rig.driver(&list("1.1.0", &["a", "b"]));
    d.add(&att("c2", "eth0")).unwrap();
    rig.install(FakePlugin::new("a").fail("GC", 11, "locked", ""));
    rig.install(FakePlugin::new("b").fail("DEL", 999, "netlink", "EBUSY"));
    rig.clear_log();

    let e = d.gc(&[("c1", "eth0")]).unwrap_err();
    assert_eq!(rig.labels(), ["b DEL", "a GC", "b GC"]);
    assert_eq!(
        e.to_string(),
        "failed to delete stale attachment c2 eth0: plugin type=\"b\" failed (delete): netlink; EBUSY\n\
         failed to GC plugin a: locked"
    );
    assert_eq!(e.code(), Some(999), "the first error's code");
    assert!(d.cache_path("c2", "eth0").exists(), "kept for the next try");
}

#[test]
fn gc_sends_an_empty_list_when_nothing_is_valid() {
    let rig = Rig::with(&["a"]);
    rig.driver(&list("1.1.0", &["a"])).gc::<&str>(&[]).unwrap();
    let calls = rig.calls();
    assert_eq!(rig.labels(), ["a GC"]);
    assert_eq!(calls[0].stdin["cni.dev/valid-attachments"], json!([]));
}

#[test]
fn status_runs_in_order_from_1_1_0_and_stops_at_the_first_error() {
    let rig = Rig::with(&["a", "b"]);
    rig.driver(&list("1.1.0", &["a", "b"])).status().unwrap();
    assert_eq!(rig.labels(), ["a STATUS", "b STATUS"]);
    let c = &rig.calls()[0];
    assert_eq!(c.env["CNI_CONTAINERID"], "");
    assert!(c.stdin.get("runtimeConfig").is_none());

    rig.clear_log();
    rig.driver(&list("1.0.0", &["a", "b"])).status().unwrap();
    assert!(rig.calls().is_empty(), "STATUS needs 1.1.0");

    rig.install(FakePlugin::new("a").fail("STATUS", 50, "no addresses left", ""));
    let e = rig
        .driver(&list("1.1.0", &["a", "b"]))
        .status()
        .unwrap_err();
    assert_eq!(e.to_string(), "no addresses left");
    assert_eq!(e.code(), Some(50));
    assert_eq!(rig.labels(), ["a STATUS"]);
}
