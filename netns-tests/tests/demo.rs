//! `weft-demo` (bench/src/bin/weft-demo.rs), the release binary, end to end: it
//! runs all its steps and exits 0, or fails a step with a clear message and exits 1,
//! and either way leaves no process, network namespace or temp dir behind.
//!
//! This test process makes itself a child subreaper: whatever the demo leaves
//! running (its namespace owners, etcd, weftd) is re-parented to it and shows up as
//! its child. A namespace without a process in it is gone.

use netns_tests::{TempDir, bin_dir, require_root};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One demo at a time: the leftover check counts this process's children.
static SERIAL: Mutex<()> = Mutex::new(());

/// Run the demo with `bin_dir` as WEFT_BIN_DIR: its output (printed), and its pid.
fn run_demo(bin_dir: &str) -> (Output, u32) {
    let demo = netns_tests::bin_dir().join("weft-demo");
    assert!(
        demo.exists(),
        "build it first: cargo build --release --workspace --bins (looked for {})",
        demo.display()
    );
    // SAFETY: prctl with constant arguments; affects only this process.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    let child = Command::new(&demo)
        .env("WEFT_BIN_DIR", bin_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning weft-demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("waiting for weft-demo");
    eprintln!(
        "--- weft-demo ({}) ---\n{}{}--- end ---",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, pid)
}

/// Nothing of the demo (pid `pid`) is left: no process re-parented to us (bridge's
/// detached veth deletions are, and exit at once: they are reaped here), no
/// `weft-*-<pid>-*` temp dir.
fn assert_nothing_left(pid: u32) {
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(5);
    let orphans = loop {
        // SAFETY: reaping exited children of this process, without blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        let orphans: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                e.file_name().to_str()?.parse::<u32>().ok()?;
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                let ppid: u32 = stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()?;
                (ppid == me).then_some(stat)
            })
            .collect();
        if orphans.is_empty() || Instant::now() > deadline {
            break orphans;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        orphans.is_empty(),
        "left running by weft-demo: {orphans:#?}"
    );
    let mark = format!("-{pid}-");
    let dirs: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("weft-") && name.contains(&mark)
        })
        .map(|e| e.path())
        .collect();
    assert!(dirs.is_empty(), "temp dirs left by weft-demo: {dirs:?}");
}

#[test]
fn demo_runs_every_step_and_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (out, pid) = run_demo(&bin_dir().display().to_string());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "weft-demo failed: {}", out.status);
    for want in [
        "==> [1/8] two nodes in network namespaces",
        "==> [2/8] etcd up at http://10.77.0.100:2379",
        "==> [3/8] weftd on node 1 leased 10.244.",
        "==> [4/8] weftd on node 2 leased 10.244.",
        "        FLANNEL_NETWORK=10.244.0.0/16",
        "==> [5/8] 4 pods added",
        "3 packets transmitted, 3 received",
        "TCP 1 MiB pod-a -> pod-b: ",
        "TCP 1 MiB pod-c -> web: ",
        "==> [7/8] hostPort 10.77.0.1:18080 -> web 10.244.",
        "arrived in web from 10.77.0.2 (node 2 masquerades",
        "DEL pod-c on node 2: ok",
        "hostPort 10.77.0.1:18080 is gone",
        "no plugin state left on either node",
        "weftd on node 2 exited 0 on SIGTERM",
        "stopped 10 processes",
        "==> done in ",
    ] {
        assert!(stdout.contains(want), "no {want:?} in the demo's output");
    }
    assert_eq!(
        stdout.matches("on node 1: 10.244.").count(),
        2,
        "pods on node 1"
    );
    assert_eq!(
        stdout.matches("on node 2: 10.244.").count(),
        2,
        "pods on node 2"
    );
    assert_nothing_left(pid);
}

/// A plugin that fails every ADD: the demo stops at step 5 with the plugin's
/// message, exits 1 and still tears everything down.
#[test]
fn demo_fails_clearly_and_still_tears_down() {
    if !require_root() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bins = TempDir::new("demo-bins");
    for name in ["weftd", "flannel", "bridge", "host-local"] {
        std::os::unix::fs::symlink(bin_dir().join(name), bins.join(name)).unwrap();
    }
    let portmap = bins.join("portmap");
    let error = r#"{"cniVersion":"0.3.1","code":11,"msg":"portmap fails on purpose"}"#;
    std::fs::write(&portmap, format!("#!/bin/sh\necho '{error}'\nexit 1\n")).unwrap();
    let mut perms = std::fs::metadata(&portmap).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&portmap, perms).unwrap();

    let (out, pid) = run_demo(&bins.display());
    assert_eq!(out.status.code(), Some(1), "weft-demo's exit status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "weft-demo: FAILED at [5/8] adding pods through the CNI plugins:",
        "ADD web on 10.77.0.1: plugin type=\"portmap\" failed (add): portmap fails on purpose",
        "weft-demo: tore down: killed ",
    ] {
        assert!(stderr.contains(want), "no {want:?} in the demo's stderr");
    }
    assert!(!String::from_utf8_lossy(&out.stdout).contains("==> [5/8]"));
    assert_nothing_left(pid);
}
