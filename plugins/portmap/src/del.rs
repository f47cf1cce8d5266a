//! DEL and GC: remove mappings by owner, with or without what the runtime resends.

use crate::config::{self, PortMapConf};
use crate::rules::{self, Key};
use crate::state;
use weft_core::error::{CniError, Result};
use weft_core::masq::Attachment;
use weft_core::nft::ErrorKind;
use weft_core::skel::Request;

/// Keys come from ADD's record, else from the runtime's portMappings if it resent
/// them (in both families: no prevResult needed). With neither, the table is listed and
/// every key this container and ifname own is removed, under any network name.
/// Idempotent; never removes a key another attachment holds.
pub fn del(req: &Request, conf: &PortMapConf) -> Result<()> {
    let env = &req.env;
    let record = state::load(&conf.data_dir, &env.container_id, &env.ifname);
    let mappings = config::port_mappings(req).unwrap_or_else(|e| {
        weft_core::warn!("DEL ignores runtimeConfig.portMappings: {e}");
        Vec::new()
    });
    let network = record
        .as_ref()
        .map_or(req.conf.name.as_str(), |r| &r.network);
    let owner = Attachment::new(network, &env.container_id, &env.ifname).owner();
    // The record is exact; the mappings name both families' keys and would cost a
    // failed kernel transaction for the family the pod does not have.
    let keys: Vec<Key> = match &record {
        Some(r) => r.keys.clone(),
        None => mappings.iter().flat_map(Key::all_of).collect(),
    };
    let tx = if record.is_none() && mappings.is_empty() {
        let Some(l) = rules::list().map_err(|e| e.context("portmap teardown"))? else {
            return Ok(());
        };
        let mine = Attachment::new("", &env.container_id, &env.ifname).owner();
        let mut tx = weft_core::nft::Transaction::new();
        for (key, o) in rules::owned(&l) {
            if o[2..] == mine[2..] {
                tx.extend(rules::del_tx(&[key], &o));
            }
        }
        tx
    } else {
        rules::del_tx(&keys, &owner)
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
    if let Some(l) = rules::list().map_err(|e| e.context("portmap GC"))? {
        let (tx, removed) = rules::gc_tx(&l, network, &pairs);
        tx.apply_ignoring(&[ErrorKind::NotFound, ErrorKind::Exists, ErrorKind::Busy])
            .map_err(|e| CniError::from(e).context("portmap GC"))?;
        if removed > 0 {
            weft_core::info!("portmap GC removed the mappings of {removed} attachment(s)");
        }
    }
    // Their keys went with the owners above (a record's keys are owned by its
    // attachment), so only the records are left to remove.
    for r in state::all(&conf.data_dir) {
        let live = pairs.contains(&(r.container_id.as_str(), r.ifname.as_str()));
        if r.network == *network && !live {
            state::remove(&conf.data_dir, &r.container_id, &r.ifname)?;
        }
    }
    // Half-written records of ADDs killed mid-write.
    weft_core::atomic_file::remove_orphans(&conf.data_dir)
        .map_err(|e| CniError::io(format!("portmap GC in {}", conf.data_dir.display()), e))?;
    Ok(())
}
