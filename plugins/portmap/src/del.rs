//! DEL and GC: remove mappings by owner, with or without what the runtime resends.

use crate::config::PortMapConf;
use crate::layout_lock::LayoutLock;
use crate::rules;
use crate::state;
use weft_core::error::{CniError, Result};
use weft_core::masq::Attachment;
use weft_core::nft::ErrorKind;
use weft_core::skel::Request;

/// Keys come from ADD's record. Without one (the runtime's portMappings name no
/// class), the table is listed and every key this container and ifname own is
/// removed, under any network name. Idempotent; never removes a key another
/// attachment holds.
pub fn del(req: &Request, conf: &PortMapConf) -> Result<()> {
    let env = &req.env;
    let tx = match state::load(&conf.data_dir, &env.container_id, &env.ifname) {
        Some(r) => {
            let owner = Attachment::new(&r.network, &env.container_id, &env.ifname).owner();
            rules::del_tx(&r.keys, &owner)
        }
        None => {
            let Some(l) = rules::list().map_err(|e| e.context("portmap teardown"))? else {
                return Ok(());
            };
            let mine = Attachment::new("", &env.container_id, &env.ifname).owner();
            let mut tx = weft_core::nft::Transaction::new();
            for (key, o) in rules::owned(&l) {
                if o[2..] == mine[2..] {
                    tx.extend(rules::del_tx(&rules::installed_in(&l, key), &o));
                }
            }
            tx
        }
    };
    tx.apply_ignoring(&[ErrorKind::NotFound, ErrorKind::Exists])
        .map_err(|e| CniError::from(e).context("portmap teardown"))?;
    state::remove(&conf.data_dir, &env.container_id, &env.ifname)
}

/// Remove the mappings (and records) of every attachment of this network that is not
/// in `cni.dev/valid-attachments`, and the network's chains nothing uses any more.
pub fn gc(req: &Request, conf: &PortMapConf) -> Result<()> {
    let valid = req.valid_attachments()?;
    let pairs: Vec<(&str, &str)> = valid
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let network = &req.conf.name;
    let lock = LayoutLock::exclusive()?;
    if let Some(l) = rules::list().map_err(|e| e.context("portmap GC"))? {
        let (tx, removed) = rules::gc_tx(&l, network, &pairs);
        tx.apply_ignoring(&[ErrorKind::NotFound, ErrorKind::Exists, ErrorKind::Busy])
            .map_err(|e| CniError::from(e).context("portmap GC"))?;
        if removed > 0 {
            weft_core::info!("portmap GC removed the mappings of {removed} attachment(s)");
        }
    }
    drop(lock);
    // Their keys went with the owners above (a record's keys are owned by its
    // attachment), so only the records are left to remove.
    for r in state::all(&conf.data_dir) {
        let live = pairs.contains(&(r.container_id.as_str(), r.ifname.as_str()));
        if r.network == *network && !live {
            state::remove(&conf.data_dir, &r.container_id, &r.ifname)?;
        }
    }
    // Half-written records of ADDs killed mid-write.
    for dir in state::dirs(&conf.data_dir) {
        weft_core::atomic_file::remove_orphans(&dir)
            .map_err(|e| CniError::io(format!("portmap GC in {}", dir.display()), e))?;
    }
    Ok(())
}
