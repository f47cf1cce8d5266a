use super::*;
use crate::spec::IpConfig;
use std::collections::HashMap;

/// Records which verb ran; ADD answers a fixed one-IP result.
#[derive(Default)]
struct Probe {
    ran: std::cell::RefCell<Vec<&'static str>>,
    /// Behave like an IPAM plugin: never enter the netns.
    ipam: bool,
    /// ADD answers a result without addresses (an L2 attachment).
    no_ips: bool,
}

impl Plugin for Probe {
    fn uses_netns(&self) -> bool {
        !self.ipam
    }
    fn add(&self, _: &Request) -> Result<CniResult> {
        self.ran.borrow_mut().push("add");
        let ip = IpConfig {
            interface: None,
            address: "10.0.0.2/24".parse().unwrap(),
            gateway: None,
        };
        let ips = if self.no_ips { vec![] } else { vec![ip] };
        Ok(CniResult {
            ips,
            ..Default::default()
        })
    }
    fn del(&self, req: &Request) -> Result<()> {
        let what = if req.env.netns.is_empty() {
            "del-without-netns"
        } else {
            "del"
        };
        self.ran.borrow_mut().push(what);
        Ok(())
    }
    fn check(&self, _: &Request) -> Result<()> {
        self.ran.borrow_mut().push("check");
        Ok(())
    }
    fn gc(&self, req: &Request) -> Result<()> {
        req.valid_attachments()?;
        self.ran.borrow_mut().push("gc");
        Ok(())
    }
    fn status(&self, _: &Request) -> Result<()> {
        Err(CniError::new(code::NOT_AVAILABLE, "no"))
    }
}

const ABOUT: About = About {
    name: "probe",
    version: "test",
    help: "NAME\n    probe - a test plugin\n\nSEE ALSO\n    nothing\n",
};
const CONF: &str = r#"{"cniVersion":"1.1.0","name":"net1","type":"probe"}"#;

fn full_env(cmd: &str) -> HashMap<&'static str, String> {
    let mut m = HashMap::new();
    m.insert("CNI_COMMAND", cmd.to_string());
    m.insert("CNI_CONTAINERID", "c1".into());
    m.insert("CNI_NETNS", "/proc/1/ns/net".into());
    m.insert("CNI_IFNAME", "eth0".into());
    m.insert("CNI_PATH", "/opt/cni/bin".into());
    m
}

/// Run the skel; returns (status, stdout, verbs run).
fn go(env: &HashMap<&'static str, String>, stdin: &str) -> (i32, String, Vec<&'static str>) {
    go_with(Probe::default(), env, stdin)
}

fn go_with(
    p: Probe,
    env: &HashMap<&'static str, String>,
    stdin: &str,
) -> (i32, String, Vec<&'static str>) {
    let mut out = Vec::new();
    let var = |k: &str| env.get(k).cloned();
    let status = run(&ABOUT, &p, &var, &mut stdin.as_bytes(), &mut out);
    (status, String::from_utf8(out).unwrap(), p.ran.take())
}

fn err_of(env: &HashMap<&'static str, String>, stdin: &str) -> (u32, String, String) {
    let (status, out, ran) = go(env, stdin);
    assert_eq!(status, 1, "{out}");
    assert!(ran.is_empty(), "no verb may run on bad input, ran {ran:?}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (
        v["code"].as_u64().unwrap() as u32,
        v["msg"].as_str().unwrap().into(),
        v["details"].as_str().unwrap_or("").into(),
    )
}

/// Tests run in the host netns, so a pod verb must use some other namespace.
/// PID 1's is the host's too when tests run in the root netns, so pick a path
/// that exists but is checked by the skel: the per-test expectation says which.
fn other_netns_env(cmd: &str) -> Option<HashMap<&'static str, String>> {
    let mut env = full_env(cmd);
    let ns = NetNs::open("/proc/1/ns/net").ok()?;
    if ns.is_current().ok()? {
        return None;
    }
    env.insert("CNI_NETNS", "/proc/1/ns/net".into());
    Some(env)
}

#[test]
fn no_command_prints_about_and_nothing_on_stdout() {
    let (status, out, _) = go(&HashMap::new(), "");
    assert_eq!((status, out.as_str()), (0, ""));
}

#[test]
fn version_echoes_input_or_current() {
    let env = HashMap::from([("CNI_COMMAND", "VERSION".to_string())]);
    let (status, out, _) = go(&env, r#"{"cniVersion":"0.3.1"}"#);
    assert_eq!(status, 0);
    assert_eq!(
        out,
        "{\"cniVersion\":\"0.3.1\",\"supportedVersions\":[\"0.1.0\",\"0.2.0\",\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"
    );
    let (_, out, _) = go(&env, "");
    assert!(out.starts_with(r#"{"cniVersion":"1.1.0""#));
    let (_, out, _) = go(&env, "garbage");
    assert!(out.starts_with(r#"{"cniVersion":"1.1.0""#));
}

#[test]
fn env_errors() {
    let mut env = full_env("FOO");
    assert_eq!(
        err_of(&env, CONF),
        (4, "unknown CNI_COMMAND: FOO".into(), String::new())
    );

    env = HashMap::from([("CNI_COMMAND", "ADD".to_string())]);
    assert_eq!(
        err_of(&env, CONF).1,
        "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH] missing"
    );
    for (var, cmd) in [
        ("CNI_CONTAINERID", "ADD"),
        ("CNI_NETNS", "CHECK"),
        ("CNI_IFNAME", "DEL"),
        ("CNI_PATH", "ADD"),
    ] {
        let mut env = full_env(cmd);
        env.insert(var, String::new()); // empty counts as missing
        assert_eq!(
            err_of(&env, CONF),
            (
                4,
                format!("required env variables [{var}] missing"),
                String::new()
            )
        );
    }
    let mut gc = HashMap::from([("CNI_COMMAND", "GC".to_string())]);
    assert_eq!(
        err_of(&gc, CONF).1,
        "required env variables [CNI_PATH] missing"
    );
    gc.insert("CNI_PATH", "/x".into());
    assert_eq!(
        err_of(&gc, CONF).1,
        "GC needs cni.dev/valid-attachments in the config"
    );
}

#[test]
fn identifier_errors() {
    let cases: [(&str, &str, u32, &str, &str); 9] = [
        (
            "CNI_CONTAINERID",
            "-bad/id",
            4,
            "invalid characters in containerID",
            "-bad/id",
        ),
        (
            "CNI_CONTAINERID",
            "a b",
            4,
            "invalid characters in containerID",
            "a b",
        ),
        (
            "CNI_IFNAME",
            "0123456789abcdef",
            4,
            "interface name is too long",
            "interface name should be less than 16 characters",
        ),
        (
            "CNI_IFNAME",
            "eth/0",
            4,
            "interface name contains / or : or whitespace characters",
            "",
        ),
        (
            "CNI_IFNAME",
            "eth:0",
            4,
            "interface name contains / or : or whitespace characters",
            "",
        ),
        (
            "CNI_IFNAME",
            "e th",
            4,
            "interface name contains / or : or whitespace characters",
            "",
        ),
        ("CNI_IFNAME", ".", 4, "interface name is . or ..", ""),
        ("CNI_IFNAME", "..", 4, "interface name is . or ..", ""),
        (
            "CNI_IFNAME",
            "eth\u{0}1",
            4,
            "interface name contains a NUL character",
            "",
        ),
    ];
    for (var, val, code, msg, details) in cases {
        let mut env = full_env("DEL");
        env.insert(var, val.into());
        assert_eq!(
            err_of(&env, CONF),
            (code, msg.into(), details.into()),
            "{var}={val}"
        );
    }
    let env = full_env("DEL");
    for (conf, msg) in [
        (
            r#"{"cniVersion":"1.0.0","type":"probe"}"#,
            "missing network name",
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"bad name"}"#,
            "invalid characters found in network name",
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"../etc"}"#,
            "invalid characters found in network name",
        ),
        (
            r#"{"cniVersion":"1.0.0","name":".hidden"}"#,
            "invalid characters found in network name",
        ),
    ] {
        assert_eq!(err_of(&env, conf).0, 7, "{conf}");
        assert_eq!(err_of(&env, conf).1, msg);
    }
}

#[test]
fn config_errors() {
    let env = full_env("DEL");
    assert_eq!(err_of(&env, "").0, 6);
    assert_eq!(err_of(&env, "{not json").0, 6);
    assert_eq!(err_of(&env, r#"{"cniVersion":1,"name":"n"}"#).0, 6);
    assert_eq!(
        err_of(
            &env,
            r#"{"cniVersion":"1.0.0","name":"n","prevResult":5,"dns":7}"#
        )
        .0,
        6
    );
    let (code, msg, details) = err_of(&env, r#"{"cniVersion":"9.9.9","name":"n"}"#);
    assert_eq!((code, msg.as_str()), (1, "incompatible CNI versions"));
    assert!(details.starts_with(r#"config is "9.9.9""#));
    assert_eq!(err_of(&env, r#"{"cniVersion":"abc","name":"n"}"#).0, 1);
    let check = full_env("CHECK");
    assert_eq!(
        err_of(&check, r#"{"cniVersion":"0.3.1","name":"n"}"#),
        (
            1,
            "config version does not allow CHECK".into(),
            String::new()
        )
    );
    let status = HashMap::from([("CNI_COMMAND", "STATUS".to_string())]);
    assert_eq!(
        err_of(&status, r#"{"cniVersion":"1.0.0","name":"n"}"#).1,
        "config version does not allow STATUS"
    );
}

#[test]
fn error_reply_carries_config_version() {
    let env = full_env("DEL");
    let (_, out, _) = go(&env, r#"{"cniVersion":"0.4.0","name":"bad name"}"#);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
}

#[test]
fn own_netns_is_refused_before_acting() {
    for cmd in ["ADD", "CHECK"] {
        let mut env = full_env(cmd);
        env.insert("CNI_NETNS", "/proc/self/ns/net".into());
        let (code, msg, _) = err_of(&env, CONF);
        assert_eq!(code, 4, "{cmd}");
        assert!(msg.contains("own network namespace"), "{msg}");
    }
}

#[test]
fn del_without_a_usable_netns_still_cleans_up() {
    for netns in [
        "/proc/self/ns/net",
        "/run/netns/weft-does-not-exist",
        "/etc/hostname",
        "",
    ] {
        let mut env = full_env("DEL");
        env.insert("CNI_NETNS", netns.into());
        assert_eq!(
            go(&env, CONF),
            (0, String::new(), vec!["del-without-netns"]),
            "{netns:?}"
        );
    }
}

#[test]
fn missing_netns_fails_add_and_check() {
    for cmd in ["ADD", "CHECK"] {
        let mut env = full_env(cmd);
        env.insert("CNI_NETNS", "/run/netns/weft-does-not-exist".into());
        assert_eq!(err_of(&env, CONF).0, 3, "{cmd}");
        env.insert("CNI_NETNS", "/etc/hostname".into());
        assert_eq!(err_of(&env, CONF).0, 4, "{cmd}");
    }
}

#[test]
fn plugins_that_never_enter_the_netns_are_not_held_to_it() {
    let mut env = full_env("ADD");
    env.insert("CNI_NETNS", "/proc/self/ns/net".into());
    let ipam = || Probe {
        ipam: true,
        ..Default::default()
    };
    assert_eq!(go_with(ipam(), &env, CONF).2, vec!["add"]);
    env.insert("CNI_COMMAND", "DEL".into());
    assert_eq!(
        go_with(ipam(), &env, CONF).2,
        vec!["del"],
        "the netns is passed on untouched"
    );
}

#[test]
fn add_whose_result_cannot_be_expressed_is_rolled_back() {
    let env = full_env("ADD");
    let l2 = Probe {
        ipam: true,
        no_ips: true,
        ..Default::default()
    };
    let (status, out, ran) = go_with(l2, &env, r#"{"cniVersion":"0.2.0","name":"n"}"#);
    assert_eq!((status, ran), (1, vec!["add", "del"]));
    assert!(
        out.contains("cannot convert: no valid IP addresses"),
        "{out}"
    );
}

#[test]
fn verbs_dispatch_and_reply() {
    if let Some(env) = other_netns_env("ADD") {
        let (status, out, ran) = go(&env, CONF);
        assert_eq!((status, ran), (0, vec!["add"]));
        assert!(out.contains("\"10.0.0.2/24\""));
        let (status, out, _) = go(&env, r#"{"cniVersion":"0.2.0","name":"n"}"#);
        assert_eq!(status, 0);
        assert!(out.contains("\"ip4\""), "{out}");
    }
    let gc = HashMap::from([
        ("CNI_COMMAND", "GC".to_string()),
        ("CNI_PATH", "/x".to_string()),
    ]);
    let conf = r#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#;
    assert_eq!(go(&gc, conf), (0, String::new(), vec!["gc"]));
    let status = HashMap::from([("CNI_COMMAND", "STATUS".to_string())]);
    let (s, out, _) = go(&status, CONF);
    assert_eq!(s, 1);
    assert!(out.contains("\"code\": 50"));
}

#[test]
fn malformed_cni_args_only_matter_to_pod_verbs() {
    let version = HashMap::from([
        ("CNI_COMMAND", "VERSION".to_string()),
        ("CNI_ARGS", "FOO".to_string()),
    ]);
    assert_eq!(go(&version, "").0, 0);
    let status = HashMap::from([
        ("CNI_COMMAND", "STATUS".to_string()),
        ("CNI_ARGS", "FOO".to_string()),
    ]);
    assert!(
        go(&status, CONF).1.contains("\"code\": 50"),
        "STATUS reached the plugin"
    );
    let mut del = full_env("DEL");
    del.insert("CNI_ARGS", "FOO".into());
    assert_eq!(
        err_of(&del, CONF),
        (4, r#"CNI_ARGS: invalid pair "FOO""#.into(), String::new())
    );
}

#[test]
fn unreadable_stdin_is_code_5() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("pipe gone"))
        }
    }
    let env = full_env("DEL");
    let mut out = Vec::new();
    let status = run(
        &ABOUT,
        &Probe::default(),
        &|k: &str| env.get(k).cloned(),
        &mut Broken,
        &mut out,
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!((status, v["code"].as_u64()), (1, Some(5)));
    assert_eq!(v["msg"], "error reading from stdin: pipe gone");
}

/// The hook runs in a child copy of this test binary (a panic must not take the
/// test runner with it) and must leave a CNI error on stdout.
#[test]
fn panic_hook_prints_a_cni_error() {
    if std::env::var_os("WEFT_PANIC_CHILD").is_some() {
        install_panic_hook();
        panic!("boom");
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "skel::tests::panic_hook_prints_a_cni_error",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WEFT_PANIC_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("\"code\": 999"), "{stdout}");
    assert!(stdout.contains("\"msg\": \"plugin panicked: "), "{stdout}");
    assert!(stdout.contains("boom"), "{stdout}");
}

#[test]
fn command_line_help_version_and_usage_errors() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(command_line(&ABOUT, &[]), None);
    let (help, code) = command_line(&ABOUT, &args(&["--help"])).unwrap();
    assert_eq!(code, 0);
    assert!(
        help.starts_with("NAME\n    probe - a test plugin\n"),
        "{help}"
    );
    let env = help.find("\nENVIRONMENT\n").expect("the common sections");
    assert!(env < help.find("\nSEE ALSO\n").unwrap(), "{help}");
    let (text, code) = command_line(&ABOUT, &args(&["-V"])).unwrap();
    assert_eq!(code, 0);
    assert!(
        text.starts_with("probe test (weft)\nCNI protocol versions supported: 0.1.0"),
        "{text}"
    );
    let (text, code) = command_line(&ABOUT, &args(&["add"])).unwrap();
    assert_eq!(code, 2);
    assert!(
        text.contains("unexpected argument \"add\"") && text.contains("--help"),
        "{text}"
    );
}
