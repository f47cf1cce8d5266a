#![no_main]
//! The whole plugin protocol of `skel::run` (environment checks, stdin decoding,
//! version checks, the network name, verb dispatch, result conversion to the
//! config's version, ADD's roll-back, the reply) with a plugin that does nothing:
//! it never enters a netns (`uses_netns` is false) and touches nothing on the host.
//!
//! Input: six lines, the values of CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS,
//! CNI_IFNAME, CNI_ARGS and CNI_PATH (empty or not UTF-8: unset), then stdin.
//!
//! Invariants: exit status 0 or 1; exactly one reply: a JSON error with a code and
//! a supported cniVersion on status 1; on 0, a JSON result for ADD, the version
//! document for VERSION, nothing for the other verbs.

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use weft_core::Result;
use weft_core::skel::{self, About, Command, Env, Plugin, Request, VAR_ORDER};
use weft_core::spec::CniResult;
use weft_fuzz::SUPPORTED;

const ABOUT: About = About {
    name: "fuzz",
    version: "0.0.0",
    help: "",
};

/// ADD answers the config's prevResult (so the reply is converted to the config's
/// version, and rolled back when that version cannot hold it); GC reads the
/// attachments; everything else succeeds.
struct Noop;

impl Plugin for Noop {
    fn uses_netns(&self) -> bool {
        false
    }
    fn add(&self, req: &Request) -> Result<CniResult> {
        Ok(req.conf.prev_result()?.unwrap_or_default())
    }
    fn del(&self, _: &Request) -> Result<()> {
        Ok(())
    }
    fn check(&self, req: &Request) -> Result<()> {
        req.conf.prev_result().map(drop)
    }
    fn gc(&self, req: &Request) -> Result<()> {
        req.valid_attachments().map(drop)
    }
    fn status(&self, _: &Request) -> Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut vals: Vec<Option<String>> = Vec::new();
    for _ in VAR_ORDER {
        let (line, tail) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        rest = tail;
        vals.push(
            std::str::from_utf8(line)
                .ok()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
    }
    let stdin = rest;
    let var = |k: &str| {
        VAR_ORDER
            .iter()
            .position(|v| *v == k)
            .and_then(|i| vals[i].clone())
    };
    // Without CNI_COMMAND the skel prints its banner on stderr: nothing to check.
    if var("CNI_COMMAND").is_none() {
        return;
    }

    let env = Env::from_vars(&var);
    if let Ok(Some(env)) = &env {
        if matches!(env.command, Command::Add | Command::Del | Command::Check) {
            assert!(skel::validate_container_id(&env.container_id).is_ok());
            assert!(skel::validate_ifname(&env.ifname).is_ok());
        }
        assert!(env.path.iter().all(|p| !p.as_os_str().is_empty()));
    }

    let mut out = Vec::new();
    let status = skel::run(&ABOUT, &Noop, &var, &mut &stdin[..], &mut out);
    let out = String::from_utf8(out).expect("the reply is UTF-8");
    match status {
        0 => {
            let env = env
                .expect("status 0 with a bad environment")
                .expect("CNI_COMMAND set");
            match env.command {
                Command::Add => {
                    let v: Value = serde_json::from_str(&out).expect("ADD prints one JSON result");
                    let conf = weft_core::spec::parse_netconf(stdin).expect("ADD ran");
                    assert_eq!(v["cniVersion"], conf.version());
                    CniResult::from_value(&v, "1.1.0").expect("ADD's reply reads as a result");
                }
                Command::Version => {
                    assert!(out.ends_with('\n'));
                    let v: Value = serde_json::from_str(&out).expect("VERSION prints JSON");
                    assert!(v["cniVersion"].is_string());
                    assert_eq!(v["supportedVersions"], serde_json::json!(SUPPORTED));
                }
                _ => assert!(out.is_empty(), "{out:?}"),
            }
        }
        1 => {
            let v: Value = serde_json::from_str(&out).expect("an error prints one JSON document");
            assert!(v["code"].as_u64().is_some_and(|c| c > 0), "{out}");
            assert!(v["msg"].is_string());
            let ver = v["cniVersion"].as_str().expect("cniVersion");
            assert!(SUPPORTED.contains(&ver), "{ver}");
        }
        other => panic!("exit status {other}"),
    }
});
