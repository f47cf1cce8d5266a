//! Running one plugin binary the way a runtime does: a controlled environment,
//! config on stdin, and the exit status, stdout and stderr kept apart.

use serde_json::Value;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// PATH given to plugins: enough for nsenter, ip, iptables and shell tools, and
/// nothing from the developer's own environment.
pub const PLUGIN_PATH_VAR: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("netns-tests lives inside the workspace")
        .to_path_buf()
}

/// Where our plugin binaries are: `$WEFT_BIN_DIR`, else `<workspace>/target/release`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("WEFT_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target/release"),
    }
}

/// Debug builds of our plugins (`$WEFT_DEBUG_BIN_DIR`, else `<workspace>/target/debug`):
/// the only ones with fault injection compiled in (see `weft_core::fault`).
pub fn debug_bin_dir() -> PathBuf {
    match std::env::var_os("WEFT_DEBUG_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target/debug"),
    }
}

/// The reference (Debian containernetworking-plugins) binaries.
pub fn reference_dir() -> PathBuf {
    PathBuf::from("/usr/lib/cni")
}

/// `bin_dir()/<name>`.
pub fn plugin_path(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// One plugin execution, built up step by step. Only the variables set here (and a
/// fixed PATH) reach the plugin, like `env -i`.
#[derive(Debug, Clone)]
pub struct Invocation {
    binary: PathBuf,
    vars: Vec<(String, String)>,
    stdin: Vec<u8>,
    /// Run the plugin inside this netns (as a node), via nsenter.
    node: Option<PathBuf>,
}

impl Invocation {
    /// Run `binary` (any path).
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Invocation {
            binary: binary.into(),
            vars: vec![("PATH".into(), PLUGIN_PATH_VAR.into())],
            stdin: Vec::new(),
            node: None,
        }
    }

    /// Run our plugin `name` from [`bin_dir`].
    pub fn plugin(name: &str) -> Self {
        Self::new(plugin_path(name))
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Run the plugin itself inside `netns`, which then plays the node's (host's)
    /// namespace: plugins that configure "the host" must never touch the real one.
    pub fn in_netns(mut self, netns: impl AsRef<Path>) -> Self {
        self.node = Some(netns.as_ref().to_path_buf());
        self
    }

    /// Set (or replace) an environment variable.
    pub fn var(mut self, key: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        match self.vars.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((key.to_string(), value)),
        }
        self
    }

    /// Unset a variable set earlier (e.g. to test a missing one).
    pub fn remove(mut self, key: &str) -> Self {
        self.vars.retain(|(k, _)| k != key);
        self
    }

    /// CNI_COMMAND (any string, so unknown verbs can be tested).
    pub fn command(self, cmd: &str) -> Self {
        self.var("CNI_COMMAND", cmd)
    }

    pub fn container_id(self, id: &str) -> Self {
        self.var("CNI_CONTAINERID", id)
    }

    pub fn netns(self, path: impl AsRef<Path>) -> Self {
        let p = path.as_ref().display().to_string();
        self.var("CNI_NETNS", p)
    }

    pub fn ifname(self, name: &str) -> Self {
        self.var("CNI_IFNAME", name)
    }

    /// CNI_ARGS, verbatim (`K=V;K2=V2`).
    pub fn args(self, args: &str) -> Self {
        self.var("CNI_ARGS", args)
    }

    /// CNI_PATH from directories, joined with ':'.
    pub fn path<P: AsRef<Path>>(self, dirs: &[P]) -> Self {
        let joined: Vec<String> = dirs
            .iter()
            .map(|d| d.as_ref().display().to_string())
            .collect();
        self.var("CNI_PATH", joined.join(":"))
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = bytes.into();
        self
    }

    /// stdin as compact JSON.
    pub fn stdin_json(self, conf: &Value) -> Self {
        let bytes = serde_json::to_vec(conf).expect("JSON values serialize");
        self.stdin(bytes)
    }

    /// The variables the plugin will see, in the order set.
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// Run to completion. Panics only when the binary is missing (the usual cause:
    /// the plugins were not built) or cannot be started at all.
    pub fn run(&self) -> Outcome {
        self.run_and_kill(None)
    }

    /// [`Self::run`], sending SIGKILL `after` the start unless the plugin is done by
    /// then (a killed one reports 137, as a shell would). How crash tests stop a
    /// plugin at a random point.
    pub fn run_killed_after(&self, after: std::time::Duration) -> Outcome {
        self.run_and_kill(Some(after))
    }

    fn run_and_kill(&self, kill_after: Option<std::time::Duration>) -> Outcome {
        assert!(
            self.binary.exists(),
            "build the plugins first: cargo build --release --workspace --bins, and without \
             --release for the fault-injection builds (looked for {})",
            self.binary.display()
        );
        let mut cmd = match &self.node {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .arg("--")
                    .arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        cmd.env_clear()
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_retrying(&mut cmd, &self.binary);
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let input = self.stdin.clone();
        // A separate writer avoids a deadlock with a plugin that writes before reading;
        // EPIPE from a plugin that never reads is fine.
        let writer = std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
        if let Some(after) = kill_after {
            std::thread::sleep(after);
            // Fails only when the child was already reaped, which wait_with_output
            // below has not done yet: a finished child is a zombie and takes it.
            let _ = child.kill();
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.binary.display()));
        let _ = writer.join();
        Outcome {
            status: exit_code(out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A script written a moment ago may still be open for writing in a child another
/// test thread is forking (ETXTBSY); libcni retries the same way.
fn spawn_retrying(cmd: &mut Command, binary: &Path) -> std::process::Child {
    for attempt in 1.. {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 50 => {
                std::thread::sleep(std::time::Duration::from_millis(10 * attempt));
            }
            other => {
                return other.unwrap_or_else(|e| panic!("exec {}: {e}", binary.display()));
            }
        }
    }
    unreachable!("the loop returns")
}

/// The exit code, or 128+signal as a shell reports a killed process.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// What a plugin did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A CNI error as printed on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniErr {
    pub code: u64,
    pub msg: String,
    pub details: Option<String>,
}

impl Outcome {
    /// stdout as JSON; panics (showing the whole outcome) if it is not one document.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{self}"))
    }

    /// Assert exit 0; the parsed stdout, or `Null` when the plugin printed nothing.
    pub fn ok(&self) -> Value {
        assert_eq!(self.status, 0, "expected success:\n{self}");
        if self.stdout.trim().is_empty() {
            assert_eq!(self.stdout, "", "whitespace-only stdout:\n{self}");
            return Value::Null;
        }
        self.json()
    }

    /// Assert the CNI error protocol: exit 1 and exactly one JSON object on stdout with
    /// a numeric `code`, a string `msg`, an optional string `details` and nothing else
    /// (a `cniVersion` key is allowed: the spec lists it, the reference omits it).
    pub fn err(&self) -> CniErr {
        assert_eq!(self.status, 1, "expected a CNI error (exit 1):\n{self}");
        let v = self.json();
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("error is not a JSON object:\n{self}"));
        let unexpected: Vec<&String> = obj
            .keys()
            .filter(|k| !matches!(k.as_str(), "cniVersion" | "code" | "msg" | "details"))
            .collect();
        assert!(
            unexpected.is_empty(),
            "unexpected keys {unexpected:?}:\n{self}"
        );
        let code = obj.get("code").and_then(Value::as_u64);
        let msg = obj.get("msg").and_then(Value::as_str);
        let details = obj.get("details").map(|d| {
            d.as_str()
                .unwrap_or_else(|| panic!("details is not a string:\n{self}"))
                .to_string()
        });
        CniErr {
            code: code.unwrap_or_else(|| panic!("no numeric code:\n{self}")),
            msg: msg
                .unwrap_or_else(|| panic!("no string msg:\n{self}"))
                .to_string(),
            details,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/bin/sh` with no arguments reads its script from stdin.
    fn sh_stdin(script: &str) -> Outcome {
        Invocation::new("/bin/sh").stdin(script).run()
    }

    #[test]
    fn env_is_cleared_and_vars_replace() {
        let out = Invocation::new("/usr/bin/env")
            .container_id("a")
            .container_id("b")
            .args("X=1")
            .remove("CNI_ARGS")
            .run();
        let mut lines: Vec<&str> = out.stdout.lines().collect();
        lines.sort();
        let path = format!("PATH={PLUGIN_PATH_VAR}");
        assert_eq!(lines, ["CNI_CONTAINERID=b", path.as_str()]);
    }

    #[test]
    fn ok_and_err_helpers() {
        assert_eq!(sh_stdin("true").ok(), Value::Null);
        assert_eq!(sh_stdin("echo '{\"a\":1}'").ok()["a"], 1);
        let e = sh_stdin(r#"echo '{"code":4,"msg":"m","details":"d"}'; exit 1"#).err();
        assert_eq!(
            e,
            CniErr {
                code: 4,
                msg: "m".into(),
                details: Some("d".into())
            }
        );
        let out = sh_stdin("kill -9 $$");
        assert_eq!(out.status, 137);
    }

    #[test]
    #[should_panic(expected = "unexpected keys")]
    fn err_rejects_extra_keys() {
        sh_stdin(r#"echo '{"code":4,"msg":"m","x":1}'; exit 1"#).err();
    }

    #[test]
    #[should_panic(expected = "whitespace-only stdout")]
    fn ok_rejects_stray_newline() {
        sh_stdin("echo").ok();
    }

    #[test]
    #[should_panic(expected = "build the plugins first: cargo build --release --workspace --bins")]
    fn missing_binary_says_how_to_fix() {
        Invocation::new("/nonexistent/p").run();
    }
}
