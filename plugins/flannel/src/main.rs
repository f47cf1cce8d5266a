//! The `flannel` plugin: a drop-in for flannel's CNI plugin. It turns the node's
//! subnet.env into a bridge + host-local config, saves that config for DEL, and
//! delegates the pod's plumbing to it.

mod conf;
mod scratch;
mod subnet_file;

use conf::FlannelConf;
use serde_json::Value;
use weft_core::delegate::Delegate;
use weft_core::error::{CniError, Result, code};
use weft_core::skel::{self, About, Command, Plugin, Request};
use weft_core::spec::CniResult;

struct Flannel;

impl Plugin for Flannel {
    fn add(&self, req: &Request) -> Result<CniResult> {
        let fc = FlannelConf::load(req)?;
        let node = subnet_file::load(&fc.subnet_file())?;
        let bytes = to_bytes(&fc.delegate_conf(req, &node)?);
        let dir = fc.data_dir();
        scratch::save(&dir, &req.env.container_id, &req.env.ifname, &bytes)?;
        let delegate = find(req, &bytes, &bytes)?;
        delegate.add(req.version()).map_err(|e| {
            roll_back(req, &delegate, &dir);
            e.context("failed to delegate add")
        })
    }

    /// With the config saved at ADD (the runtime's DEL config may differ from it);
    /// the saved file is kept until the delegate's DEL succeeds, so a retry cleans up.
    fn del(&self, req: &Request) -> Result<()> {
        let fc = FlannelConf::load(req)?;
        let dir = fc.data_dir();
        let Some(saved) = scratch::load(&dir, &req.env.container_id, &req.env.ifname)? else {
            return Ok(());
        };
        let bytes = match delegate_type(&saved.bytes) {
            Some(_) => saved.bytes.clone(),
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
        find(req, &bytes, &bytes)?.run(Command::Del)?;
        if saved.owned {
            scratch::remove(&saved.path)?;
        }
        Ok(())
    }

    /// The delegate's CHECK with the saved config and this CHECK's prevResult, after
    /// making sure the node's subnet is still the one the pod was given.
    fn check(&self, req: &Request) -> Result<()> {
        let fc = FlannelConf::load(req)?;
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
        check_subnet_unchanged(&conf, &subnet_file::load(&fc.subnet_file())?)?;
        conf["cniVersion"] = req.version().into();
        if let Some(prev) = &req.conf.prev_result {
            conf["prevResult"] = prev.clone();
        }
        let bytes = to_bytes(&conf);
        find(req, &bytes, &bytes)?.run(Command::Check)
    }

    /// The delegate's GC with today's config, then the saved files of attachments the
    /// runtime no longer lists.
    fn gc(&self, req: &Request) -> Result<()> {
        let fc = FlannelConf::load(req)?;
        let valid = req.valid_attachments()?;
        let dir = fc.data_dir();
        let saved = scratch::all(&dir);
        let base = match subnet_file::load(&fc.subnet_file()) {
            Ok(node) => Some(fc.delegate_conf(req, &node)?),
            // Without subnet.env, any config saved on this node names the delegate.
            Err(_) => saved.iter().find_map(|(p, _, _)| {
                let bytes = std::fs::read(p).ok()?;
                delegate_type(&bytes)?;
                serde_json::from_slice::<Value>(&bytes).ok()
            }),
        };
        if let Some(mut conf) = base {
            conf["cniVersion"] = req.version().into();
            conf["cni.dev/valid-attachments"] =
                serde_json::to_value(&valid).map_err(|e| CniError::internal(e.to_string()))?;
            let bytes = to_bytes(&conf);
            find(req, &bytes, &bytes)?.run(Command::Gc)?;
        }
        for (path, cid, ifname) in saved {
            let live = valid
                .iter()
                .any(|a| a.container_id == cid && ifname.as_ref().is_none_or(|i| *i == a.ifname));
            if !live {
                scratch::remove(&path)?;
            }
        }
        Ok(())
    }

    /// Not available (50) until the agent has written subnet.env; then the delegate's.
    fn status(&self, req: &Request) -> Result<()> {
        let fc = FlannelConf::load(req)?;
        let node = subnet_file::load(&fc.subnet_file())
            .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))?;
        let bytes = to_bytes(&fc.delegate_conf(req, &node)?);
        find(req, &bytes, &bytes)?.run(Command::Status)
    }
}

fn to_bytes(conf: &Value) -> Vec<u8> {
    serde_json::to_vec(conf).expect("a JSON value serialises")
}

/// The delegate named by `conf`'s type; weft's own bridge runs in-process.
fn find<'a>(req: &'a Request, conf: &[u8], stdin: &'a [u8]) -> Result<Delegate<'a>> {
    let plugin = delegate_type(conf).unwrap_or_else(|| "bridge".into());
    Delegate::find_linked(&plugin, &req.env, stdin, &[bridge::LINKED])
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
/// the reference's may) and drop the saved file once that worked.
fn roll_back(req: &Request, delegate: &Delegate, dir: &std::path::Path) {
    match delegate.run(Command::Del) {
        Ok(()) => {
            if let Ok(Some(saved)) = scratch::load(dir, &req.env.container_id, &req.env.ifname)
                && saved.owned
            {
                let _ = scratch::remove(&saved.path);
            }
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

fn main() {
    weft_core::embed_ident!(concat!("weft flannel ", env!("CARGO_PKG_VERSION")));
    skel::main(
        About {
            name: "flannel",
            version: env!("CARGO_PKG_VERSION"),
        },
        Flannel,
    )
}
