//! Subnet-delegating meta-plugins: the node's subnet.env becomes a bridge +
//! host-local config, saved for DEL and delegated the pod's plumbing. `flannel` is
//! exactly that (a drop-in for flannel's CNI plugin); the overlay plugins
//! (`vxlan-overlay`, `host-gw`) add the node's own bring-up through [`NodeState`].

mod conf;
#[cfg(feature = "overlay")]
pub mod overlay;
mod scratch;
mod subnet_file;

pub use conf::FlannelConf;
pub use subnet_file::NodeSubnets;

use serde_json::Value;
use std::path::Path;
use weft_core::delegate::Delegate;
use weft_core::error::{CniError, Result, code};
use weft_core::fault;
use weft_core::skel::{Command, Plugin, Request};
use weft_core::spec::CniResult;

/// What a meta-plugin does about the node itself, besides delegating pods.
pub trait NodeState {
    /// Where saved delegate configs go unless the conf's `dataDir` says otherwise.
    fn default_data_dir(&self) -> &'static str;

    /// Before ADD and STATUS read subnet.env: make sure the node is up (has its
    /// lease and node-level state, and subnet.env says so). flannel leaves that to
    /// the agent.
    fn ensure_up(&self, _req: &Request, _subnet_file: &Path) -> Result<()> {
        Ok(())
    }

    /// CHECK: the node-level state behind the node's pods.
    fn check(&self, _req: &Request, _node: &NodeSubnets, _subnet_file: &Path) -> Result<()> {
        Ok(())
    }
}

/// flannel's plugin: the agent (weftd or flanneld) owns the node.
pub struct Flannel;

impl NodeState for Flannel {
    fn default_data_dir(&self) -> &'static str {
        conf::DEFAULT_DATA_DIR
    }
}

/// A subnet-delegating plugin over the node handling `N`.
pub struct SubnetMeta<N>(pub N);

impl<N: NodeState> SubnetMeta<N> {
    fn conf(&self, req: &Request) -> Result<FlannelConf> {
        FlannelConf::load(req, self.0.default_data_dir())
    }
}

impl<N: NodeState> Plugin for SubnetMeta<N> {
    fn add(&self, req: &Request) -> Result<CniResult> {
        let fc = self.conf(req)?;
        self.0.ensure_up(req, &fc.subnet_file())?;
        let node = subnet_file::load(&fc.subnet_file())?;
        let bytes = to_bytes(&fc.delegate_conf(req, &node)?);
        let delegate = find(req, &bytes)?;
        let saved = scratch::save(
            &fc.data_dir(),
            &req.env.container_id,
            &req.env.ifname,
            &bytes,
        )?;
        if let Err(e) = fault::point("flannel.saved") {
            let _ = scratch::remove(&saved);
            return Err(e);
        }
        let added = delegate.add(req.version()).map_err(|e| {
            roll_back(&delegate, &saved);
            e.context("failed to delegate add")
        })?;
        fault::point("flannel.delegated").inspect_err(|_| roll_back(&delegate, &saved))?;
        Ok(added)
    }

    /// With the config saved at ADD (the runtime's DEL config may differ from it);
    /// the saved file is kept until the delegate's DEL succeeds, so a retry cleans up.
    fn del(&self, req: &Request) -> Result<()> {
        let fc = self.conf(req)?;
        let dir = fc.data_dir();
        let Some(saved) = scratch::load(&dir, &req.env.container_id, &req.env.ifname)? else {
            return Ok(());
        };
        let bytes = match delegate_type(&saved.bytes) {
            Some(_) => saved.bytes,
            None => match rebuilt(req, &fc) {
                Some(bytes) => bytes,
                None => {
                    weft_core::warn!(
                        "{} is unreadable and subnet.env cannot replace it: nothing to delegate",
                        saved.path.display()
                    );
                    return scratch::remove(&saved.path);
                }
            },
        };
        find(req, &bytes)?.run(Command::Del)?;
        if saved.owned {
            scratch::remove(&saved.path)?;
        }
        Ok(())
    }

    /// The delegate's CHECK with the saved config and this CHECK's prevResult, after
    /// making sure the node's subnet is still the one the pod was given.
    fn check(&self, req: &Request) -> Result<()> {
        let fc = self.conf(req)?;
        let dir = fc.data_dir();
        let saved =
            scratch::load(&dir, &req.env.container_id, &req.env.ifname)?.ok_or_else(|| {
                CniError::new(
                    code::UNKNOWN_CONTAINER,
                    format!(
                        "no saved config for container {:?} interface {:?} in {}",
                        req.env.container_id,
                        req.env.ifname,
                        dir.display()
                    ),
                )
            })?;
        let mut conf: Value = serde_json::from_slice(&saved.bytes).map_err(|e| {
            CniError::decode(format!("failed to parse {}: {e}", saved.path.display()))
        })?;
        let node = subnet_file::load(&fc.subnet_file())?;
        check_subnet_unchanged(&conf, &node)?;
        self.0.check(req, &node, &fc.subnet_file())?;
        conf["cniVersion"] = req.version().into();
        if let Some(prev) = &req.conf.prev_result {
            conf["prevResult"] = prev.clone();
        }
        let bytes = to_bytes(&conf);
        find(req, &bytes)?.run(Command::Check)
    }

    /// The delegate's GC with today's config, then the saved files of attachments the
    /// runtime no longer lists.
    fn gc(&self, req: &Request) -> Result<()> {
        let fc = self.conf(req)?;
        let valid = req.valid_attachments()?;
        let dir = fc.data_dir();
        let saved = scratch::all(&dir);
        let base = match subnet_file::load(&fc.subnet_file()) {
            Ok(node) => Some(fc.delegate_conf(req, &node)?),
            // Without subnet.env, any config saved on this node names the delegate.
            Err(_) => saved.iter().find_map(|(p, _, _)| {
                let conf: Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
                conf["type"].is_string().then_some(conf)
            }),
        };
        if let Some(mut conf) = base {
            conf["cniVersion"] = req.version().into();
            conf["cni.dev/valid-attachments"] =
                serde_json::to_value(&valid).map_err(|e| CniError::internal(e.to_string()))?;
            let bytes = to_bytes(&conf);
            find(req, &bytes)?.run(Command::Gc)?;
        }
        for (path, cid, ifname) in saved {
            let live = valid
                .iter()
                .any(|a| a.container_id == cid && ifname.as_ref().is_none_or(|i| *i == a.ifname));
            if !live {
                scratch::remove(&path)?;
            }
        }
        // Half-written configs of ADDs killed mid-write.
        weft_core::atomic_file::remove_orphans(&dir)
            .map_err(|e| CniError::io(format!("flannel GC in {}", dir.display()), e))?;
        Ok(())
    }

    /// Not available (50) until the node is up and subnet.env written; then the
    /// delegate's.
    fn status(&self, req: &Request) -> Result<()> {
        let fc = self.conf(req)?;
        let unavailable = |e: CniError| CniError::new(code::NOT_AVAILABLE, e.msg);
        self.0
            .ensure_up(req, &fc.subnet_file())
            .map_err(unavailable)?;
        let node = subnet_file::load(&fc.subnet_file()).map_err(unavailable)?;
        let bytes = to_bytes(&fc.delegate_conf(req, &node)?);
        find(req, &bytes)?.run(Command::Status)
    }
}

fn to_bytes(conf: &Value) -> Vec<u8> {
    serde_json::to_vec(conf).expect("a JSON value serialises")
}

/// The delegate named by the type of `conf`, to be run with it on stdin; weft's
/// own bridge runs in-process.
fn find<'a>(req: &'a Request, conf: &'a [u8]) -> Result<Delegate<'a>> {
    let plugin = delegate_type(conf).unwrap_or_else(|| "bridge".into());
    Delegate::find_linked(&plugin, &req.env, conf, &[bridge::LINKED])
}

/// The `type` of a saved config; `None` when it is not a JSON object with one.
fn delegate_type(conf: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(conf).ok()?;
    Some(v.get("type")?.as_str()?.to_string())
}

/// The config DEL falls back to when the saved one is torn: today's, if subnet.env
/// can still be read.
fn rebuilt(req: &Request, fc: &FlannelConf) -> Option<Vec<u8>> {
    let node = subnet_file::load(&fc.subnet_file()).ok()?;
    Some(to_bytes(&fc.delegate_conf(req, &node).ok()?))
}

/// A failed delegate ADD: undo what it may have left (weft's bridge leaves nothing,
/// the reference's may) and drop the config saved at `saved` once that worked.
fn roll_back(delegate: &Delegate, saved: &Path) {
    match delegate.run(Command::Del) {
        Ok(()) => {
            let _ = scratch::remove(saved);
        }
        Err(e) => weft_core::warn!("rolling back the delegate's ADD failed, kept for DEL: {e}"),
    }
}

/// CHECK fails when the node's subnet changed since the pod was added (a new lease
/// after a reboot or reconfiguration): the pod's address is no longer routed here.
fn check_subnet_unchanged(saved: &Value, node: &subnet_file::NodeSubnets) -> Result<()> {
    let was: Vec<&str> = saved["ipam"]["ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|set| set[0]["subnet"].as_str())
        .collect();
    let now: Vec<String> = node.subnets().iter().map(|s| s.to_string()).collect();
    if was != now {
        return Err(CniError::new(
            code::CHECK_FAILED,
            format!(
                "the node's subnet changed since ADD: the pod was given {} and subnet.env now says {}",
                was.join(","),
                now.join(",")
            ),
        ));
    }
    Ok(())
}
