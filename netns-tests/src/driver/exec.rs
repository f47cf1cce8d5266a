//! Executing one plugin for the driver and reading its answer as libcni does.

use super::DriverError;
use crate::runner::{Invocation, Outcome};
use serde_json::Value;
use std::path::{Path, PathBuf};
use weft_core::CniError;
use weft_core::spec::CniResult;

/// The CNI_* variables of one call. libcni always sets all six, empty or not.
#[derive(Debug, Clone, Default)]
pub struct PluginEnv {
    pub command: &'static str,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
    /// Run the plugin inside this netns, playing the node's.
    pub node: Option<PathBuf>,
}

impl PluginEnv {
    /// CNI_PATH: the directories joined with ':'.
    pub fn join_path(dirs: &[PathBuf]) -> String {
        let parts: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        parts.join(":")
    }
}

/// Run `binary`; its stdout on exit 0, else the error it reported.
pub fn run(binary: &Path, env: &PluginEnv, stdin: &[u8]) -> Result<String, DriverError> {
    let mut inv = Invocation::new(binary);
    if let Some(node) = &env.node {
        inv = inv.in_netns(node);
    }
    let out = inv
        .command(env.command)
        .container_id(&env.container_id)
        .netns(&env.netns)
        .ifname(&env.ifname)
        .args(&env.args)
        .var("CNI_PATH", env.path.clone())
        .stdin(stdin)
        .run();
    // Plugins log to stderr; keep it visible in the (captured) test output.
    if !out.stderr.is_empty() {
        eprint!("[{} {}] {}", binary.display(), env.command, out.stderr);
    }
    if out.status == 0 {
        Ok(out.stdout)
    } else {
        Err(DriverError::cni(plugin_error(&out)))
    }
}

/// libcni's `pluginErr`: stdout is the error JSON; an empty stdout falls back to
/// stderr; anything unparsable becomes code 0 (ErrUnknown) with the raw text.
pub fn plugin_error(out: &Outcome) -> CniError {
    #[derive(serde::Deserialize)]
    struct Wire {
        #[serde(default)]
        code: u32,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    let exit = format!("exit status {}", out.status);
    if out.stdout.is_empty() {
        let msg = if out.stderr.is_empty() {
            format!("netplugin failed with no error message: {exit}")
        } else {
            format!("netplugin failed: {:?}: {exit}", out.stderr)
        };
        return CniError::new(0, msg);
    }
    match serde_json::from_str::<Wire>(&out.stdout) {
        Ok(w) => CniError::new(w.code, w.msg).with_details(w.details),
        Err(e) => CniError::new(
            0,
            format!(
                "netplugin failed but error parsing its diagnostic message {:?}: {e}",
                out.stdout
            ),
        ),
    }
}

/// An ADD result: one JSON object, `cniVersion` defaulting to the config's (libcni's
/// `fixupResultVersion`), readable as a result of that version. Kept as printed
/// otherwise, since libcni feeds each result forward at its own version.
pub fn parse_result(stdout: &str, config_version: &str) -> Result<Value, DriverError> {
    let mut v: Value = serde_json::from_str(stdout)
        .map_err(|e| DriverError::runtime(format!("failed to unmarshal result: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(DriverError::runtime(
            "failed to unmarshal result: not an object",
        ));
    };
    obj.entry("cniVersion")
        .or_insert_with(|| Value::String(config_version.to_string()));
    CniResult::from_value(&v, config_version).map_err(DriverError::cni)?;
    Ok(v)
}

/// A cached result as the config's version wants it (libcni's `GetAsVersion`).
pub fn as_version(result: &Value, version: &str) -> Result<Value, CniError> {
    if result.get("cniVersion").and_then(Value::as_str) == Some(version) {
        CniResult::from_value(result, version)?;
        return Ok(result.clone());
    }
    CniResult::from_value(result, version)?.to_value(version)
}
