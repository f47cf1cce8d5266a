//! Fake plugins: tiny shell scripts that record every call (CNI_* env and stdin) in a
//! log directory and answer as configured. They let the driver, and plugins that
//! delegate, be tested without depending on real plugins.

use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A scripted plugin. By default ADD prints
/// `{"interfaces":[{"name":"<type>"}],"ips":[{"address":"10.99.0.2/24"}]}` (no
/// `cniVersion`, so the runtime assumes the config's) and every other verb succeeds
/// silently.
#[derive(Debug, Clone)]
pub struct FakePlugin {
    name: String,
    add_result: String,
    failures: Vec<Failure>,
}

#[derive(Debug, Clone)]
struct Failure {
    command: String,
    status: i32,
    stdout: String,
    stderr: String,
}

impl FakePlugin {
    /// A plugin whose type (and file name) is `name`.
    pub fn new(name: &str) -> Self {
        FakePlugin {
            name: name.to_string(),
            add_result: format!(
                r#"{{"interfaces":[{{"name":"{name}"}}],"ips":[{{"address":"10.99.0.2/24"}}]}}"#
            ),
            failures: Vec::new(),
        }
    }

    /// What ADD prints on stdout.
    pub fn add_result(mut self, stdout: &str) -> Self {
        self.add_result = stdout.to_string();
        self
    }

    /// Make `command` fail with a CNI error `{"code","msg"[,"details"]}` and exit 1.
    pub fn fail(self, command: &str, code: u32, msg: &str, details: &str) -> Self {
        let mut err = serde_json::json!({"code": code, "msg": msg});
        if !details.is_empty() {
            err["details"] = details.into();
        }
        self.fail_raw(command, 1, &err.to_string(), "")
    }

    /// Make `command` exit with `status`, printing exactly `stdout` and `stderr`.
    pub fn fail_raw(mut self, command: &str, status: i32, stdout: &str, stderr: &str) -> Self {
        self.failures.push(Failure {
            command: command.to_string(),
            status,
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
        });
        self
    }

    /// Write the script to `<bin_dir>/<name>` (mode 0755), logging to `log_dir`.
    pub fn install(&self, bin_dir: &Path, log_dir: &Path) -> PathBuf {
        std::fs::create_dir_all(log_dir).expect("creating the fake plugin log dir");
        let path = bin_dir.join(&self.name);
        std::fs::write(&path, self.script(log_dir))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod fake plugin");
        path
    }

    fn script(&self, log_dir: &Path) -> String {
        let mut s = format!(
            "#!/bin/sh\n# fake CNI plugin {name}: record the call, then answer.\n\
             in=$(cat)\nlog={log}\nn=$(ls \"$log\" | wc -l)\n\
             f=\"$log/$(printf %04d \"$n\")-{name}\"\n\
             {{ env | grep '^CNI_' | sort; echo '{SEPARATOR}'; printf '%s' \"$in\"; }} > \"$f\"\n",
            name = self.name,
            log = sh_quote(&log_dir.display().to_string()),
        );
        for f in &self.failures {
            s += &format!(
                "if [ \"$CNI_COMMAND\" = {} ]; then printf '%s' {}; printf '%s' {} >&2; exit {}; fi\n",
                sh_quote(&f.command),
                sh_quote(&f.stdout),
                sh_quote(&f.stderr),
                f.status
            );
        }
        s += &format!(
            "if [ \"$CNI_COMMAND\" = ADD ]; then printf '%s' {}; fi\nexit 0\n",
            sh_quote(&self.add_result)
        );
        s
    }
}

const SEPARATOR: &str = "--- stdin ---";

/// Single-quote for sh: `'` becomes `'\''`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One recorded plugin call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The plugin (script) name.
    pub plugin: String,
    /// Every CNI_* variable the plugin saw (set-but-empty ones included).
    pub env: BTreeMap<String, String>,
    /// stdin parsed as JSON (`Null` if it was not JSON).
    pub stdin: Value,
    pub raw_stdin: String,
}

impl Call {
    pub fn command(&self) -> &str {
        self.env.get("CNI_COMMAND").map_or("", String::as_str)
    }

    /// `"<plugin> <COMMAND>"`, handy for asserting call order.
    pub fn label(&self) -> String {
        format!("{} {}", self.plugin, self.command())
    }
}

/// All calls recorded in `log_dir`, oldest first.
pub fn calls(log_dir: &Path) -> Vec<Call> {
    let Ok(rd) = std::fs::read_dir(log_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| read_call(&log_dir.join(n), n))
        .collect()
}

/// The labels of all calls, e.g. `["a ADD", "b ADD"]`.
pub fn labels(log_dir: &Path) -> Vec<String> {
    calls(log_dir).iter().map(Call::label).collect()
}

fn read_call(path: &Path, file_name: &str) -> Call {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading call log {}: {e}", path.display()));
    let (env_text, stdin) = text
        .split_once(&format!("{SEPARATOR}\n"))
        .unwrap_or((text.as_str(), ""));
    let env = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Call {
        plugin: file_name
            .split_once('-')
            .map_or(file_name, |(_, p)| p)
            .to_string(),
        env,
        stdin: serde_json::from_str(stdin).unwrap_or(Value::Null),
        raw_stdin: stdin.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Invocation, TempDir};

    #[test]
    fn records_calls_and_answers() {
        let d = TempDir::new("fake");
        let log = d.join("log");
        let bin = FakePlugin::new("p")
            .add_result(r#"{"it's":1}"#)
            .fail("DEL", 7, "no", "")
            .install(d.path(), &log);
        let out = Invocation::new(&bin)
            .command("ADD")
            .args("A=1")
            .var("CNI_NETNS", "")
            .stdin(r#"{"x":"y"}"#)
            .run();
        assert_eq!(out.ok(), serde_json::json!({"it's": 1}));
        let e = Invocation::new(&bin).command("DEL").run().err();
        assert_eq!((e.code, e.msg.as_str(), e.details), (7, "no", None));
        let c = calls(&log);
        assert_eq!(labels(&log), ["p ADD", "p DEL"]);
        assert_eq!(c[0].env["CNI_ARGS"], "A=1");
        assert_eq!(c[0].env["CNI_NETNS"], "");
        assert_eq!(c[0].stdin["x"], "y");
        assert_eq!(c[1].stdin, Value::Null);
    }
}
