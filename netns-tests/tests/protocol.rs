//! Reference §7.1 (protocol / skel cases P01–P22) against our `host-local` binary,
//! with weft's expected behaviour (not the 1.1.1 column). Also: CNI_NETNS values
//! an IPAM plugin must not trip over.
//!
//! P21 and P22 (a prevResult of another version, or without one) are covered by
//! weft-core's unit tests and, through CHECK, by host_local.rs.

use netns_tests::{Invocation, Outcome, TempDir, TestNetns, bin_dir, require_root, unique_name};
use serde_json::{Value, json};

const SUPPORTED: &str = r#"["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]"#;
const ALL_VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

fn host_local() -> Invocation {
    Invocation::plugin("host-local")
}

/// One test's world: its own netns, dataDir and network name.
struct Case {
    ns: TestNetns,
    data: TempDir,
    name: String,
}

impl Case {
    /// `None` (after printing why) when not root: namespaces need it.
    fn new(tag: &str) -> Option<Case> {
        require_root().then(|| Case {
            ns: TestNetns::new(),
            data: TempDir::new(tag),
            name: unique_name(tag),
        })
    }

    /// The single-stack config of the brief: a /29 and a default route.
    fn conf(&self, version: impl Into<Value>) -> Value {
        json!({
            "cniVersion": version.into(),
            "name": self.name,
            "ipam": {
                "type": "host-local",
                "dataDir": self.data.display(),
                "ranges": [[{"subnet": "10.98.0.0/29"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        })
    }

    /// Dual-stack: one v4 and one v6 range set, a default route per family.
    fn dual_conf(&self, version: &str) -> Value {
        let mut c = self.conf(version);
        c["ipam"]["ranges"] = json!([[{"subnet": "10.98.0.0/29"}], [{"subnet": "fd98::/64"}]]);
        c["ipam"]["routes"] = json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]);
        c
    }

    /// The default env E of §7 (container c1, eth0, our netns, CNI_PATH) with a
    /// 1.1.0 config on stdin.
    fn run(&self, cmd: &str) -> Invocation {
        host_local()
            .command(cmd)
            .container_id("c1")
            .netns(self.ns.path())
            .ifname("eth0")
            .path(&[bin_dir()])
            .stdin_json(&self.conf("1.1.0"))
    }

    /// Every regular file under the dataDir (relative paths).
    fn state_files(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(self.data.path(), self.data.path(), &mut out);
        out.sort();
        out
    }
}

/// Assert a CNI error with this code and message.
#[track_caller]
fn assert_err(out: &Outcome, code: u64, msg: &str) -> Option<String> {
    let e = out.err();
    assert_eq!((e.code, e.msg.as_str()), (code, msg), "\n{out}");
    e.details
}

#[test]
fn p01_version_echoes_the_input_version() {
    let out = host_local()
        .command("VERSION")
        .stdin(r#"{"cniVersion":"0.3.1"}"#)
        .run();
    out.ok();
    assert_eq!(
        out.stdout,
        format!("{{\"cniVersion\":\"0.3.1\",\"supportedVersions\":{SUPPORTED}}}\n")
    );
}

#[test]
fn p02_version_with_empty_stdin_reports_ours() {
    let out = host_local().command("VERSION").run();
    out.ok();
    assert_eq!(
        out.stdout,
        format!("{{\"cniVersion\":\"1.1.0\",\"supportedVersions\":{SUPPORTED}}}\n")
    );
}

#[test]
fn p03_no_command_prints_about_text_on_stderr() {
    let out = host_local().run();
    assert_eq!(out.ok(), Value::Null);
    assert!(
        out.stderr.contains("CNI host-local plugin version"),
        "{out}"
    );
}

#[test]
fn p04_unknown_command() {
    let Some(t) = Case::new("p04") else { return };
    assert_err(&t.run("FOO").run(), 4, "unknown CNI_COMMAND: FOO");
}

#[test]
fn p05_add_without_container_id() {
    let Some(t) = Case::new("p05") else { return };
    let out = t.run("ADD").remove("CNI_CONTAINERID").run();
    assert_err(&out, 4, "required env variables [CNI_CONTAINERID] missing");
    // Empty counts as missing.
    let out = t.run("ADD").container_id("").run();
    assert_err(&out, 4, "required env variables [CNI_CONTAINERID] missing");
}

#[test]
fn p06_invalid_container_id() {
    let Some(t) = Case::new("p06") else { return };
    for cmd in ["ADD", "DEL", "CHECK"] {
        let out = t.run(cmd).container_id("-bad/id").run();
        let details = assert_err(&out, 4, "invalid characters in containerID");
        assert_eq!(details.as_deref(), Some("-bad/id"), "{cmd}");
    }
    assert!(t.state_files().is_empty());
}

#[test]
fn p07_netns_required_by_add_not_by_del() {
    let Some(t) = Case::new("p07") else { return };
    let out = t.run("ADD").remove("CNI_NETNS").run();
    assert_err(&out, 4, "required env variables [CNI_NETNS] missing");
    assert_eq!(t.run("DEL").remove("CNI_NETNS").run().ok(), Value::Null);
}

#[test]
fn p08_invalid_interface_names() {
    let Some(t) = Case::new("p08") else { return };
    let long = t.run("ADD").ifname("sixteen-chars-xx").run();
    let details = assert_err(&long, 4, "interface name is too long");
    assert_eq!(
        details.as_deref(),
        Some("interface name should be less than 16 characters")
    );
    let bad = "interface name contains / or : or whitespace characters";
    for name in ["eth/0", "eth:0", "eth 0"] {
        assert_err(&t.run("ADD").ifname(name).run(), 4, bad);
    }
    for name in [".", ".."] {
        assert_err(
            &t.run("ADD").ifname(name).run(),
            4,
            "interface name is . or ..",
        );
    }
    assert!(t.state_files().is_empty());
}

#[test]
fn p09_add_without_cni_path() {
    let Some(t) = Case::new("p09") else { return };
    let out = t.run("ADD").remove("CNI_PATH").run();
    assert_err(&out, 4, "required env variables [CNI_PATH] missing");
}

#[test]
fn p10_only_the_command_lists_every_missing_variable_in_order() {
    let Some(t) = Case::new("p10") else { return };
    let only = |cmd: &str| host_local().command(cmd).stdin_json(&t.conf("1.1.0")).run();
    assert_err(
        &only("ADD"),
        4,
        "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH] missing",
    );
    assert_err(
        &only("DEL"),
        4,
        "required env variables [CNI_CONTAINERID,CNI_IFNAME,CNI_PATH] missing",
    );
}

#[test]
fn p11_malformed_or_empty_stdin() {
    let Some(t) = Case::new("p11") else { return };
    let out = t.run("ADD").stdin("").run();
    assert_err(
        &out,
        6,
        "error unmarshall network config: unexpected end of JSON input",
    );
    for bad in ["{", "{\"cniVersion\":\"1.1.0\",}", "[1]", "nul"] {
        let e = t.run("ADD").stdin(bad).run().err();
        assert_eq!(e.code, 6, "{bad}");
        assert!(
            e.msg.starts_with("error unmarshall network config: "),
            "{bad}: {}",
            e.msg
        );
    }
    assert!(t.state_files().is_empty());
}

#[test]
fn p12_missing_or_invalid_network_name() {
    let Some(t) = Case::new("p12") else { return };
    let mut conf = t.conf("1.1.0");
    conf.as_object_mut().unwrap().remove("name");
    assert_err(
        &t.run("ADD").stdin_json(&conf).run(),
        7,
        "missing network name",
    );
    conf["name"] = "bad name".into();
    let out = t.run("ADD").stdin_json(&conf).run();
    let details = assert_err(&out, 7, "invalid characters found in network name");
    assert_eq!(details.as_deref(), Some("bad name"));
    assert!(t.state_files().is_empty());
}

#[test]
fn p13_unsupported_versions_and_1_1_0_accepted() {
    let Some(t) = Case::new("p13") else { return };
    for v in ["9.9.9", "abc"] {
        let out = t.run("ADD").stdin_json(&t.conf(v)).run();
        let details = assert_err(&out, 1, "incompatible CNI versions");
        let supported = r#"["0.1.0" "0.2.0" "0.3.0" "0.3.1" "0.4.0" "1.0.0" "1.1.0"]"#;
        assert_eq!(
            details,
            Some(format!("config is {v:?}, plugin supports {supported}"))
        );
    }
    let result = t.run("ADD").stdin_json(&t.conf("1.1.0")).run().ok();
    assert_eq!(result["cniVersion"], "1.1.0");
}

#[test]
fn p14_numeric_cni_version() {
    let Some(t) = Case::new("p14") else { return };
    for v in [json!(1.0), json!(1)] {
        let e = t.run("ADD").stdin_json(&t.conf(v.clone())).run().err();
        assert_eq!(e.code, 6, "{v}: {}", e.msg);
    }
}

#[test]
fn p15_check_needs_0_4_0() {
    let Some(t) = Case::new("p15") else { return };
    for v in ["0.1.0", "0.2.0", "0.3.0", "0.3.1"] {
        let out = t.run("CHECK").stdin_json(&t.conf(v)).run();
        assert_err(&out, 1, "config version does not allow CHECK");
    }
}

/// A 1.1.0 GC config listing `valid` as (containerID, ifname) pairs.
fn gc_conf(t: &Case, valid: &[(&str, &str)]) -> Value {
    let list: Vec<Value> = valid
        .iter()
        .map(|(c, i)| json!({"containerID": c, "ifname": i}))
        .collect();
    let mut conf = t.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = list.clone().into();
    conf["cni.dev/attachments"] = list.into();
    conf
}

#[test]
fn p16_gc_needs_only_command_and_path() {
    let Some(t) = Case::new("p16") else { return };
    let out = host_local()
        .command("GC")
        .path(&[bin_dir()])
        .stdin_json(&gc_conf(&t, &[("c1", "eth0")]))
        .run();
    assert_eq!(out.ok(), Value::Null, "no stdout on success");
}

#[test]
fn p16_gc_releases_only_unlisted_attachments() {
    let Some(t) = Case::new("p16b") else { return };
    t.run("ADD").run().ok();
    t.run("ADD").container_id("c2").run().ok();
    let out = host_local()
        .command("GC")
        .path(&[bin_dir()])
        .stdin_json(&gc_conf(&t, &[("c1", "eth0")]))
        .run();
    assert_eq!(out.ok(), Value::Null);
    assert_eq!(t.run("CHECK").run().ok(), Value::Null, "c1 kept");
    assert_ne!(
        t.run("CHECK").container_id("c2").run().status,
        0,
        "c2's reservation must be gone"
    );
}

#[test]
fn p17_status_on_a_fresh_config() {
    let Some(t) = Case::new("p17") else { return };
    let out = host_local()
        .command("STATUS")
        .stdin_json(&t.conf("1.1.0"))
        .run();
    assert_eq!(out.ok(), Value::Null);
}

#[test]
fn p18_error_shape() {
    let Some(t) = Case::new("p18") else { return };
    let out = t.run("FOO").run();
    assert_eq!(out.status, 1);
    // err() checks: one JSON object, numeric code, string msg, optional string
    // details, nothing but cniVersion besides.
    out.err();
    let v = out.json();
    assert_eq!(v["cniVersion"], "1.1.0", "before the config is read: ours");
    assert!(v.get("details").is_none(), "empty details are omitted");
    // Once the config is parsed, errors carry its version.
    let mut conf = t.conf("0.4.0");
    conf["name"] = "bad name".into();
    let out = t.run("ADD").stdin_json(&conf).run();
    out.err();
    assert_eq!(out.json()["cniVersion"], "0.4.0");
}

#[test]
fn p19_empty_version_means_0_1_0() {
    let Some(t) = Case::new("p19") else { return };
    let r = t.run("ADD").stdin_json(&t.conf("")).run().ok();
    assert_eq!(r["cniVersion"], "0.1.0");
    assert_eq!(r["ip4"]["ip"], "10.98.0.2/29");
    assert!(r.get("ips").is_none(), "{r}");
}

#[test]
fn p20_result_shape_per_version() {
    let Some(t) = Case::new("p20") else { return };
    for v in ALL_VERSIONS {
        // A fresh dataDir per version, so every result gets the first addresses.
        let data = TempDir::new("p20");
        let mut conf = t.dual_conf(v);
        conf["ipam"]["dataDir"] = data.display().into();
        let out = t.run("ADD").stdin_json(&conf).run();
        out.ok();
        assert!(!out.stdout.ends_with('\n'), "no trailing newline ({v})");
        insta::assert_snapshot!(format!("p20_result_{v}"), out.stdout);
    }
}

/// IPAM never enters the pod's netns, so like the reference it does not care what
/// CNI_NETNS names: the main plugin vets it. (The refusal of the plugin's own
/// netns for plugins that do enter it is covered by weft-core's skel tests.)
#[test]
fn ipam_ignores_what_cni_netns_names() {
    let Some(t) = Case::new("anyns") else { return };
    let gone = t.data.join("no-such-netns");
    for netns in [gone.display().to_string(), "/proc/self/ns/net".into()] {
        t.run("ADD").netns(&netns).run().ok();
        t.run("CHECK").netns(&netns).run().ok();
        assert_eq!(t.run("DEL").netns(&netns).run().ok(), Value::Null);
        assert!(
            t.state_files().iter().all(|f| !f.contains("/10.")),
            "{:?}",
            t.state_files()
        );
    }
}

/// Every binary answers `--help` (a manual: NAME, SYNOPSIS, CONFIGURATION,
/// ENVIRONMENT, EXIT STATUS for the plugins) and `--version` on stdout with exit 0;
/// a plugin given any other argument exits 2 pointing at `--help`.
#[test]
fn p00_help_and_version_on_every_binary() {
    let run = |name: &str, arg: &str| {
        let out = std::process::Command::new(netns_tests::plugin_path(name))
            .arg(arg)
            .env_remove("CNI_COMMAND")
            .output()
            .unwrap_or_else(|e| panic!("running {name} {arg}: {e}"));
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    for name in netns_tests::PLUGINS {
        let (code, help, _) = run(name, "--help");
        assert_eq!(code, Some(0), "{name} --help");
        assert!(
            help.starts_with(&format!("NAME\n    {name} - ")),
            "{name}: {help}"
        );
        for section in [
            "SYNOPSIS",
            "DESCRIPTION",
            "CONFIGURATION",
            "ENVIRONMENT",
            "EXIT STATUS",
        ] {
            assert!(
                help.contains(&format!("\n{section}")),
                "{name} --help lacks {section}"
            );
        }
        let (code, version, _) = run(name, "--version");
        assert_eq!(code, Some(0), "{name} --version");
        let want = format!("{name} {} (weft)\n", env!("CARGO_PKG_VERSION"));
        assert!(version.starts_with(&want), "{name}: {version}");
        let (code, out, err) = run(name, "--bogus");
        assert_eq!((code, out.as_str()), (Some(2), ""), "{name} --bogus");
        assert!(err.contains("see --help"), "{name}: {err}");
    }
    for arg in ["--help", "--version"] {
        let (code, out, _) = run("weftd", arg);
        assert_eq!(code, Some(0), "weftd {arg}");
        assert!(!out.is_empty(), "weftd {arg} printed nothing");
    }
}
