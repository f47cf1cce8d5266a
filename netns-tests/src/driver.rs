//! A libcni-like conflist runtime, so plugins can be tested the way kubelet (via
//! containerd/CRI-O) and podman drive them. Semantics follow libcni HEAD as written
//! down in the reference (§1.8): version negotiation, prevResult chaining, the result
//! cache, reverse-order DEL, CHECK gating, GC with synthesized DELs, and STATUS.

pub mod cache;
mod exec;

pub use cache::CachedAttachment;
pub use exec::plugin_error;

use exec::PluginEnv;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use weft_core::CniError;
use weft_core::spec::{ConfList, parse_conflist};
use weft_core::{delegate, skel, version};

/// One attachment of a container to the network (libcni's `RuntimeConf`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attachment {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS pairs, in order.
    pub cni_args: Vec<(String, String)>,
    /// Capability values the runtime offers; each plugin gets the ones it declares.
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    pub fn new(container_id: &str, netns: &str, ifname: &str) -> Self {
        Attachment {
            container_id: container_id.into(),
            netns: netns.into(),
            ifname: ifname.into(),
            ..Default::default()
        }
    }

    /// CNI_ARGS as libcni formats it: `K=V;K2=V2`.
    pub fn cni_args_string(&self) -> String {
        let pairs: Vec<String> = self
            .cni_args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        pairs.join(";")
    }
}

/// Why an operation failed. `message` is what libcni's error would print; `cni` is
/// the underlying CNI error (from a plugin, or a validation) when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverError {
    pub message: String,
    pub cni: Option<CniError>,
}

impl DriverError {
    pub fn runtime(message: impl Into<String>) -> Self {
        DriverError {
            message: message.into(),
            cni: None,
        }
    }

    pub fn cni(err: CniError) -> Self {
        DriverError {
            message: err.to_string(),
            cni: Some(err),
        }
    }

    /// `"<ctx>: <message>"`, keeping the CNI error (Go's `fmt.Errorf("ctx: %w")`).
    pub fn context(mut self, ctx: impl std::fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }

    /// Go's `errors.Join`: messages on separate lines; the first CNI error is kept.
    fn join(errs: Vec<DriverError>) -> Result<(), DriverError> {
        if errs.is_empty() {
            return Ok(());
        }
        let message = errs.iter().map(|e| e.message.as_str()).collect::<Vec<_>>();
        Err(DriverError {
            message: message.join("\n"),
            cni: errs.into_iter().find_map(|e| e.cni),
        })
    }

    /// The CNI code, if a CNI error caused this.
    pub fn code(&self) -> Option<u32> {
        self.cni.as_ref().map(|e| e.code)
    }
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DriverError {}

/// The runtime: one network (conflist), where to find plugins, where to cache.
#[derive(Debug, Clone)]
pub struct Driver {
    pub conflist: ConfList,
    /// The conflist as loaded; the cache stores these exact bytes (base64).
    pub config_bytes: Vec<u8>,
    /// CNI_PATH, searched in order.
    pub bin_dirs: Vec<PathBuf>,
    /// libcni's CacheDir (default `/var/lib/cni`); results go to `<cache_dir>/results`.
    pub cache_dir: PathBuf,
    /// Run every plugin inside this netns, which then plays the node's namespace.
    pub node_netns: Option<PathBuf>,
}

impl Driver {
    /// Load a conflist from its bytes, as libcni's `ConfListFromBytes`.
    pub fn new(
        conflist: impl Into<Vec<u8>>,
        bin_dirs: Vec<PathBuf>,
        cache_dir: impl Into<PathBuf>,
    ) -> Result<Driver, DriverError> {
        let config_bytes = conflist.into();
        let conflist = parse_conflist(&config_bytes).map_err(DriverError::cni)?;
        Ok(Driver {
            conflist,
            config_bytes,
            bin_dirs,
            cache_dir: cache_dir.into(),
            node_netns: None,
        })
    }

    /// [`new`](Self::new) from a JSON value (serialized compactly).
    pub fn from_json(
        conflist: &Value,
        bin_dirs: Vec<PathBuf>,
        cache_dir: impl Into<PathBuf>,
    ) -> Result<Driver, DriverError> {
        let bytes = serde_json::to_vec(conflist).expect("JSON values serialize");
        Self::new(bytes, bin_dirs, cache_dir)
    }

    /// Run the plugins inside `netns` (a test "node"), never in this process's own.
    pub fn in_netns(mut self, netns: impl Into<PathBuf>) -> Self {
        self.node_netns = Some(netns.into());
        self
    }

    /// The negotiated spec version every plugin gets.
    pub fn version(&self) -> Result<&'static str, DriverError> {
        self.conflist.negotiated_version().map_err(DriverError::cni)
    }

    /// Where the cached result of (`container_id`, `ifname`) lives.
    pub fn cache_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        cache::file_path(&self.cache_dir, &self.conflist.name, container_id, ifname)
    }

    /// Every valid cache entry in the cache dir, of any network.
    pub fn cached_attachments(&self) -> Vec<CachedAttachment> {
        cache::scan(&self.cache_dir)
    }

    /// ADD: plugins in order, each result fed to the next as prevResult; the last
    /// one is cached and returned. Stops at the first failure (no automatic DEL).
    pub fn add(&self, att: &Attachment) -> Result<Value, DriverError> {
        let version = self.version()?;
        let mut prev: Option<Value> = None;
        for i in 0..self.conflist.plugins.len() {
            let result = self
                .add_one(i, version, prev.as_ref(), att)
                .map_err(|e| e.context(format!("plugin {} failed (add)", self.describe(i))))?;
            prev = Some(result);
        }
        let result = prev.expect("a parsed conflist has plugins");
        self.cache_add(att, &result).map_err(|e| {
            DriverError::runtime(format!(
                "failed to set network {:?} cached result: {e}",
                self.conflist.name
            ))
        })?;
        Ok(result)
    }

    fn add_one(
        &self,
        i: usize,
        version: &str,
        prev: Option<&Value>,
        att: &Attachment,
    ) -> Result<Value, DriverError> {
        let binary = self.find(i)?;
        self.validate(att)?;
        let stdin = self
            .conflist
            .plugin_stdin(i, version, prev, &att.capability_args);
        let stdout = exec::run(&binary, &self.attachment_env("ADD", att), &stdin)?;
        exec::parse_result(&stdout, version)
    }

    /// CHECK: needs 0.4.0+; a no-op with `disableCheck`; plugins in order with the
    /// cached result as prevResult; the first failure is returned as is.
    pub fn check(&self, att: &Attachment) -> Result<(), DriverError> {
        let version = self.version()?;
        if !version::at_least(version, "0.4.0") {
            return Err(DriverError::runtime(format!(
                "configuration version {version:?} does not support the CHECK command"
            )));
        }
        if self.conflist.disable_check {
            return Ok(());
        }
        self.validate(att)?;
        let prev = self.cached_result(att, version).map_err(|e| {
            DriverError::runtime(format!(
                "failed to get network {:?} cached result: {e}",
                self.conflist.name
            ))
        })?;
        (0..self.conflist.plugins.len())
            .try_for_each(|i| self.run_attached(i, "CHECK", version, prev.as_ref(), att))
    }

    /// DEL: plugins in reverse order, with the cached result as prevResult from 0.4.0
    /// (a corrupt cache is removed and none is sent). Stops at the first failure and
    /// then keeps the cache, so a retry gets the same prevResult.
    pub fn del(&self, att: &Attachment) -> Result<(), DriverError> {
        let version = self.version()?;
        // libcni does not validate on DEL; we do, before the IDs become a cache path.
        self.validate(att)?;
        let path = self.cache_path(&att.container_id, &att.ifname);
        let prev = if version::at_least(version, "0.4.0") {
            self.cached_result(att, version).unwrap_or_else(|_| {
                cache::remove(&path);
                None
            })
        } else {
            None
        };
        for i in (0..self.conflist.plugins.len()).rev() {
            self.run_attached(i, "DEL", version, prev.as_ref(), att)
                .map_err(|e| e.context(format!("plugin {} failed (delete)", self.describe(i))))?;
        }
        cache::remove(&path);
        Ok(())
    }

    /// GC: a no-op with `disableGC`. DELs every cached attachment of this network not
    /// in `valid` (with its cached netns, args and capabilities), then from 1.1.0
    /// sends GC to every plugin. Carries on after errors and returns them joined.
    pub fn gc<S: AsRef<str>>(&self, valid: &[(S, S)]) -> Result<(), DriverError> {
        if self.conflist.disable_gc {
            return Ok(());
        }
        let version = self.version()?;
        let valid: Vec<(&str, &str)> = valid
            .iter()
            .map(|(c, i)| (c.as_ref(), i.as_ref()))
            .collect();
        let mut errs = self.delete_stale(&valid);
        if version::at_least(version, "1.1.0") {
            errs.extend(self.gc_plugins(version, &valid));
        }
        DriverError::join(errs)
    }

    fn delete_stale(&self, valid: &[(&str, &str)]) -> Vec<DriverError> {
        let stale = self.cached_attachments().into_iter().filter(|c| {
            c.network_name == self.conflist.name
                && !valid.contains(&(c.container_id.as_str(), c.if_name.as_str()))
        });
        stale
            .filter_map(|c| {
                let att = Attachment {
                    container_id: c.container_id.clone(),
                    netns: c.netns.clone(),
                    ifname: c.if_name.clone(),
                    cni_args: c.cni_args.clone(),
                    capability_args: c.capability_args.clone(),
                };
                self.del(&att).err().map(|e| {
                    e.context(format!(
                        "failed to delete stale attachment {} {}",
                        c.container_id, c.if_name
                    ))
                })
            })
            .collect()
    }

    fn gc_plugins(&self, version: &str, valid: &[(&str, &str)]) -> Vec<DriverError> {
        let list: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        let extra = [
            ("cni.dev/valid-attachments", Value::from(list.clone())),
            // The spec-v1.1.0 tag named it this way; libcni sends both.
            ("cni.dev/attachments", Value::from(list)),
        ];
        (0..self.conflist.plugins.len())
            .filter_map(|i| {
                self.run_global(i, "GC", version, &extra).err().map(|e| {
                    e.context(format!(
                        "failed to GC plugin {}",
                        self.conflist.plugin_type(i)
                    ))
                })
            })
            .collect()
    }

    /// STATUS: from 1.1.0 only (success otherwise); plugins in order, the first
    /// failure returned as is.
    pub fn status(&self) -> Result<(), DriverError> {
        let version = self.version()?;
        if !version::at_least(version, "1.1.0") {
            return Ok(());
        }
        (0..self.conflist.plugins.len())
            .try_for_each(|i| self.run_global(i, "STATUS", version, &[]))
    }

    /// Run a per-attachment verb (CHECK, DEL) on plugin `i`; success prints nothing.
    fn run_attached(
        &self,
        i: usize,
        command: &'static str,
        version: &str,
        prev: Option<&Value>,
        att: &Attachment,
    ) -> Result<(), DriverError> {
        let binary = self.find(i)?;
        let stdin = self
            .conflist
            .plugin_stdin(i, version, prev, &att.capability_args);
        exec::run(&binary, &self.attachment_env(command, att), &stdin).map(drop)
    }

    /// Run a network-wide verb (GC, STATUS) on plugin `i`: no attachment in the env,
    /// no runtimeConfig, `extra` keys added to the config.
    fn run_global(
        &self,
        i: usize,
        command: &'static str,
        version: &str,
        extra: &[(&str, Value)],
    ) -> Result<(), DriverError> {
        let binary = self.find(i)?;
        let stdin = self.conflist.plugin_stdin(i, version, None, &Map::new());
        let mut conf: Map<String, Value> =
            serde_json::from_slice(&stdin).expect("plugin_stdin writes a JSON object");
        conf.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let stdin = serde_json::to_vec(&conf).expect("JSON maps serialize");
        let env = PluginEnv {
            command,
            path: PluginEnv::join_path(&self.bin_dirs),
            node: self.node_netns.clone(),
            ..Default::default()
        };
        exec::run(&binary, &env, &stdin).map(drop)
    }

    fn attachment_env(&self, command: &'static str, att: &Attachment) -> PluginEnv {
        PluginEnv {
            command,
            container_id: att.container_id.clone(),
            netns: att.netns.clone(),
            ifname: att.ifname.clone(),
            args: att.cni_args_string(),
            path: PluginEnv::join_path(&self.bin_dirs),
            node: self.node_netns.clone(),
        }
    }

    /// libcni's `FindInPath` over `bin_dirs`.
    fn find(&self, i: usize) -> Result<PathBuf, DriverError> {
        delegate::find_in_path(self.conflist.plugin_type(i), &self.bin_dirs)
            .map_err(|e| DriverError::runtime(e.to_string()))
    }

    /// The checks libcni makes before exec: container ID, network name, ifname.
    fn validate(&self, att: &Attachment) -> Result<(), DriverError> {
        skel::validate_container_id(&att.container_id)
            .and_then(|_| skel::validate_network_name(&self.conflist.name))
            .and_then(|_| skel::validate_ifname(&att.ifname))
            .map_err(DriverError::cni)
    }

    /// libcni's `pluginDescription`: `type="x"`, plus ` name="y"` if the entry has one.
    fn describe(&self, i: usize) -> String {
        let mut out = format!("type={:?}", self.conflist.plugin_type(i));
        if let Some(name) = self.conflist.plugins[i]
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            out += &format!(" name={name:?}");
        }
        out
    }

    fn cache_add(&self, att: &Attachment, result: &Value) -> std::io::Result<()> {
        let entry = CachedAttachment {
            kind: cache::KIND.to_string(),
            container_id: att.container_id.clone(),
            config: crate::base64::encode(&self.config_bytes),
            if_name: att.ifname.clone(),
            network_name: self.conflist.name.clone(),
            netns: att.netns.clone(),
            cni_args: att.cni_args.clone(),
            capability_args: att.capability_args.clone(),
            result: Some(result.clone()),
        };
        cache::store(&self.cache_path(&att.container_id, &att.ifname), &entry)
    }

    /// The cached result at `version`: `Ok(None)` without a cache, `Err` if corrupt.
    fn cached_result(&self, att: &Attachment, version: &str) -> Result<Option<Value>, String> {
        let path = self.cache_path(&att.container_id, &att.ifname);
        let Some(entry) = cache::load(&path)? else {
            return Ok(None);
        };
        let result = entry
            .result
            .ok_or_else(|| format!("no result in {}", path.display()))?;
        exec::as_version(&result, version)
            .map(Some)
            .map_err(|e| format!("cached result in {}: {e}", path.display()))
    }
}
