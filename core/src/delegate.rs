//! Delegation: find another plugin on CNI_PATH exactly as libcni does, run it with
//! the same stdin and an overridden CNI_COMMAND, and read its result or error.

use crate::error::{CniError, Result, code};
use crate::skel::{Command, Env};
use crate::spec::CniResult;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// libcni's `FindInPath`: the first `dir/<plugin>` that is a regular file.
pub fn find_in_path(plugin: &str, paths: &[PathBuf]) -> Result<PathBuf> {
    if plugin.is_empty() {
        return Err(CniError::config("no plugin name provided"));
    }
    if plugin.contains('/') {
        return Err(CniError::config(format!("invalid plugin name: {plugin}")));
    }
    if paths.is_empty() {
        return Err(CniError::env("no paths provided"));
    }
    paths
        .iter()
        .map(|d| d.join(plugin))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file()))
        .ok_or_else(|| {
            let dirs: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            CniError::config(format!(
                "failed to find plugin {plugin:?} in path [{}]",
                dirs.join(" ")
            ))
        })
}

/// The variables a delegate is run with: the invocation's, with `command`.
fn cni_vars(command: Command, env: &Env) -> [(&'static str, String); 6] {
    let path: Vec<String> = env.path.iter().map(|p| p.display().to_string()).collect();
    [
        ("CNI_COMMAND", command.as_str().to_string()),
        ("CNI_CONTAINERID", env.container_id.clone()),
        ("CNI_NETNS", env.netns.clone()),
        ("CNI_IFNAME", env.ifname.clone()),
        ("CNI_ARGS", env.raw_args.clone()),
        ("CNI_PATH", path.join(":")),
    ]
}

/// Run `binary` for `command` with the env of `env` and `stdin`; returns its stdout.
pub fn exec(binary: &Path, command: Command, env: &Env, stdin: &[u8]) -> Result<Vec<u8>> {
    let mut cmd = std::process::Command::new(binary);
    cmd.envs(cni_vars(command, env))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_retrying(&mut cmd, binary)?;
    let mut pipe = child.stdin.take().expect("stdin is piped");
    // Feed stdin from a second thread so a delegate that writes before it has read
    // everything cannot deadlock against us.
    let (out, wrote) = std::thread::scope(|s| {
        let writer = s.spawn(move || pipe.write_all(stdin));
        let out = child.wait_with_output();
        (out, writer.join().expect("the stdin writer does not panic"))
    });
    let out = out.map_err(|e| CniError::io(binary.display(), e))?;
    let _ = std::io::stderr().write_all(&out.stderr);
    if out.status.success() {
        wrote.map_err(|e| CniError::io(format!("writing stdin of {}", binary.display()), e))?;
        return Ok(out.stdout);
    }
    Err(plugin_error(&out.stdout, &out.stderr, out.status))
}

/// A plugin's skel entry point: [`crate::skel::run`] bound to the plugin.
pub type SkelRun = fn(&dyn Fn(&str) -> Option<String>, &mut dyn Read, &mut dyn Write) -> i32;

/// A plugin linked into the caller as a library: its skel entry point and the
/// identity its binary carries (see [`crate::ident`]).
#[derive(Clone, Copy)]
pub struct Linked {
    pub name: &'static str,
    pub ident: &'static str,
    pub run: SkelRun,
}

/// Run `linked` in-process exactly as its binary would run: through its skel, with
/// the delegate's variables (anything else from our own environment), `stdin`, and
/// its reply read back like a child's stdout.
fn run_linked(linked: &Linked, command: Command, env: &Env, stdin: &[u8]) -> Result<Vec<u8>> {
    let vars = cni_vars(command, env);
    let var = |k: &str| match vars.iter().find(|(name, _)| *name == k) {
        Some((_, v)) => Some(v.clone()),
        None => std::env::var(k).ok(),
    };
    let mut out = Vec::new();
    let status = (linked.run)(&var, &mut &stdin[..], &mut out);
    if status == 0 {
        return Ok(out);
    }
    Err(plugin_error(
        &out,
        b"",
        std::process::ExitStatus::from_raw(status << 8),
    ))
}

/// libcni retries exec on ETXTBSY (a binary being installed right now).
fn spawn_retrying(cmd: &mut std::process::Command, binary: &Path) -> Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 5 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100 * tries));
            }
            other => {
                return other.map_err(|e| CniError::io(format!("exec {}", binary.display()), e));
            }
        }
    }
}

/// Turn a failed delegate's output into an error, keeping its CNI code.
fn plugin_error(stdout: &[u8], stderr: &[u8], status: std::process::ExitStatus) -> CniError {
    #[derive(serde::Deserialize)]
    struct Wire {
        code: u32,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    if stdout.iter().all(u8::is_ascii_whitespace) {
        let err = String::from_utf8_lossy(stderr);
        // Worded like libcni (Go's "exit status N"), which operators grep for.
        let how = match (status.code(), status.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => status.to_string(),
        };
        let msg = format!("netplugin failed: {:?}: {how}", err.trim_end());
        return CniError::new(code::DELEGATE_FAILED, msg);
    }
    match serde_json::from_slice::<Wire>(stdout) {
        Ok(w) => CniError {
            code: w.code,
            msg: w.msg,
            details: w.details,
        },
        Err(_) => CniError::new(
            code::DELEGATE_FAILED,
            format!(
                "netplugin failed but error parsing its diagnostic message {:?}",
                String::from_utf8_lossy(stdout)
            ),
        ),
    }
}

/// A delegated plugin (usually IPAM) bound to one invocation's env and stdin.
#[derive(Clone)]
pub struct Delegate<'a> {
    pub binary: PathBuf,
    pub env: &'a Env,
    pub stdin: &'a [u8],
    /// Set when `binary` is this linked plugin: then it runs in-process.
    pub linked: Option<Linked>,
}

impl<'a> Delegate<'a> {
    /// Locate `plugin` on the invocation's CNI_PATH.
    pub fn find(plugin: &str, env: &'a Env, stdin: &'a [u8]) -> Result<Self> {
        Self::find_linked(plugin, env, stdin, &[])
    }

    /// [`Delegate::find`], running the plugin in-process when the binary found is one
    /// of `linked` at the same version (its identity section says so).
    pub fn find_linked(
        plugin: &str,
        env: &'a Env,
        stdin: &'a [u8],
        linked: &[Linked],
    ) -> Result<Self> {
        let binary = find_in_path(plugin, &env.path)?;
        let linked = linked
            .iter()
            .find(|l| l.name == plugin && crate::ident::matches(&binary, l.ident))
            .copied();
        if linked.is_some() {
            crate::debug!("{} is ours: running it in-process", binary.display());
        }
        Ok(Delegate {
            binary,
            env,
            stdin,
            linked,
        })
    }

    fn call(&self, command: Command) -> Result<Vec<u8>> {
        match &self.linked {
            Some(l) => run_linked(l, command, self.env, self.stdin),
            None => exec(&self.binary, command, self.env, self.stdin),
        }
    }

    /// ADD: the delegate's result, read at `cni_version` (its default when it omits one).
    pub fn add(&self, cni_version: &str) -> Result<CniResult> {
        let out = self.call(Command::Add)?;
        let value: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
            CniError::decode(format!(
                "failed to unmarshal result of {}: {e}",
                self.binary.display()
            ))
        })?;
        CniResult::from_value(&value, cni_version)
    }

    /// DEL, CHECK, GC or STATUS: success or the delegate's error.
    pub fn run(&self, command: Command) -> Result<()> {
        self.call(command).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn env(path: Vec<PathBuf>) -> Env {
        Env {
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/proc/self/ns/net".into(),
            ifname: "eth0".into(),
            args: Default::default(),
            raw_args: "IgnoreUnknown=1".into(),
            path,
        }
    }

    #[test]
    fn finds_first_regular_file() {
        let a = tempdir("find-a");
        let b = tempdir("find-b");
        std::fs::create_dir(a.join("ipam")).unwrap(); // a directory does not count
        script(&b, "ipam", "true");
        let paths = vec![a.to_path_buf(), b.to_path_buf()];
        assert_eq!(find_in_path("ipam", &paths).unwrap(), b.join("ipam"));
        let e = find_in_path("nope", &paths).unwrap_err();
        assert_eq!(
            e.msg,
            format!(
                "failed to find plugin \"nope\" in path [{} {}]",
                a.display(),
                b.display()
            )
        );
        assert_eq!(
            find_in_path("../x", &paths).unwrap_err().msg,
            "invalid plugin name: ../x"
        );
        assert_eq!(
            find_in_path("", &paths).unwrap_err().msg,
            "no plugin name provided"
        );
        assert_eq!(find_in_path("x", &[]).unwrap_err().msg, "no paths provided");
    }

    #[test]
    fn passes_env_and_stdin_and_reads_result_or_error() {
        let d = tempdir("exec");
        script(
            &d,
            "echoer",
            r#"in=$(cat); printf '{"cniVersion":"1.0.0","ips":[{"address":"10.9.0.2/24"}],"dns":{"domain":"%s %s %s"}}' "$CNI_COMMAND" "$CNI_ARGS" "$in""#,
        );
        script(
            &d,
            "failer",
            r#"cat >/dev/null; echo '{"code":100,"msg":"full","details":"d"}'; exit 1"#,
        );
        script(&d, "silent", r#"cat >/dev/null; echo oops >&2; exit 3"#);
        script(&d, "garbage", r#"cat >/dev/null; echo nope; exit 1"#);
        let env = env(vec![d.to_path_buf()]);
        let r = Delegate::find("echoer", &env, b"{}")
            .unwrap()
            .add("1.0.0")
            .unwrap();
        assert_eq!(r.dns.domain, "ADD IgnoreUnknown=1 {}");
        let e = Delegate::find("failer", &env, b"{}")
            .unwrap()
            .run(Command::Del)
            .unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (100, "full", "d")
        );
        let e = Delegate::find("silent", &env, b"{}")
            .unwrap()
            .run(Command::Del)
            .unwrap_err();
        assert_eq!(e.code, code::DELEGATE_FAILED);
        assert_eq!(e.msg, "netplugin failed: \"oops\": exit status 3");
        let e = Delegate::find("garbage", &env, b"{}")
            .unwrap()
            .run(Command::Check)
            .unwrap_err();
        assert!(
            e.msg.contains("error parsing its diagnostic message"),
            "{}",
            e.msg
        );
    }

    /// A scratch directory removed when dropped, even if the test fails.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = PathBuf;
        fn deref(&self) -> &PathBuf {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("weft-delegate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
