//! Throwaway network namespaces without names under /run/netns.
//!
//! A child process (`unshare --net cat`) owns the namespace; its `/proc/<pid>/ns/net`
//! is the path plugins get. Nothing is mounted, so nothing can leak: when the child
//! dies the kernel frees the namespace with everything in it (links, routes, rules).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A fresh network namespace with `lo` up, alive as long as this value.
#[derive(Debug)]
pub struct TestNetns {
    child: Child,
    /// The child's stdin. `cat` exits on EOF, so if this process dies without running
    /// Drop (SIGKILL, abort, a timed-out test run) the namespace still goes away.
    keepalive: Option<ChildStdin>,
    path: PathBuf,
}

impl TestNetns {
    /// Spawn the owner and wait until it has left our namespace. Panics on failure:
    /// a test without its netns cannot do anything useful.
    pub fn new() -> TestNetns {
        let mut child = Command::new("unshare")
            .args(["--net", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning `unshare --net cat` (util-linux): {e}"));
        let keepalive = child.stdin.take();
        let path = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        let mut ns = TestNetns {
            child,
            keepalive,
            path,
        };
        ns.wait_unshared();
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `unshare` execs `cat` after unshare(2); until then the pid still shows our netns.
    fn wait_unshared(&mut self) {
        let own = ns_id(Path::new("/proc/self/ns/net")).expect("reading /proc/self/ns/net");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let err = self.child_stderr();
                panic!("unshare --net exited early ({status}): {err}");
            }
            if ns_id(&self.path).is_some_and(|id| id != own) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "unshare --net did not create a namespace within 10s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn child_stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// `/proc/<pid>/ns/net`, the value for CNI_NETNS.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a `String`, for env vars and JSON.
    pub fn path_str(&self) -> String {
        self.path.display().to_string()
    }

    /// Pid of the process owning the namespace.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run `argv` inside the namespace (`nsenter --net=<path> argv...`).
    pub fn exec(&self, argv: &[&str]) -> Output {
        assert!(!argv.is_empty(), "TestNetns::exec needs a command");
        Command::new("nsenter")
            .arg(format!("--net={}", self.path.display()))
            .arg("--")
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawning nsenter for {argv:?}: {e}"))
    }

    /// [`exec`](Self::exec), panicking unless it exits 0; returns stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} in {} failed ({}): {}",
            self.path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run `argv` (e.g. `["ip", "-j", "addr"]`) and parse its JSON stdout.
    pub fn exec_json(&self, argv: &[&str]) -> serde_json::Value {
        let out = self.exec_ok(argv);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{argv:?} printed non-JSON ({e}): {out}"))
    }

    /// The names of this namespace's links, in the kernel's order.
    pub fn link_names(&self) -> Vec<String> {
        let links = self.exec_json(&["ip", "-j", "link", "show"]);
        let links = links
            .as_array()
            .expect("`ip -j link` prints an array")
            .iter();
        links
            .map(|l| l["ifname"].as_str().expect("a link has a name").to_owned())
            .collect()
    }
}

impl Default for TestNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        drop(self.keepalive.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (device, inode) of a namespace file: equal ids mean the same namespace.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_namespace_with_only_lo_up() {
        if !crate::require_root() {
            return;
        }
        let ns = TestNetns::new();
        assert_ne!(ns_id(ns.path()), ns_id(Path::new("/proc/self/ns/net")));
        let links = ns.exec_json(&["ip", "-j", "link"]);
        let names: Vec<&str> = links
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["lo"]);
        let flags = &links[0]["flags"];
        assert!(
            flags.as_array().unwrap().iter().any(|f| f == "UP"),
            "{flags}"
        );
        let pid = ns.pid();
        drop(ns);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn two_namespaces_differ() {
        if !crate::require_root() {
            return;
        }
        let (a, b) = (TestNetns::new(), TestNetns::new());
        assert_ne!(ns_id(a.path()), ns_id(b.path()));
    }
}
