//! What ADD installed, per attachment, so DEL can remove it when the runtime does
//! not resend portMappings or the network was renamed (reference leaks, plugins#752).
//!
//! One small JSON file per `(container ID, ifname)` under the data dir (0700), file
//! 0600, written to a temporary name and renamed into place. The files are spread
//! over 256 subdirectories by the first byte of their hashed name: creating a file
//! in one directory of thousands costs ext4 ~0.5 ms, in one of tens ~0.03 ms. No
//! fsync: the mappings live in the kernel and are gone after a power loss anyway,
//! and a file that is torn or missing only sends DEL to its listing fallback.

use crate::rules::Installed;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use weft_core::atomic_file;
use weft_core::error::{CniError, Result};
use weft_core::nft;

/// One attachment's mappings as installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The network name at ADD: the owner of the elements, even after a rename.
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    pub keys: Vec<Installed>,
}

fn path(dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    // Hashed: IDs and ifnames may both contain '.', '-' and '_', so no separator
    // between them is unambiguous.
    let name = nft::hash_hex(&[container_id, ifname]);
    dir.join(&name[..2]).join(format!("{name}.json"))
}

/// Where records were before they were spread over subdirectories.
fn flat_path(dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    dir.join(format!("{}.json", nft::hash_hex(&[container_id, ifname])))
}

pub fn save(dir: &Path, rec: &Record) -> Result<()> {
    let dest = path(dir, &rec.container_id, &rec.ifname);
    let text = serde_json::to_vec(rec).map_err(|e| CniError::internal(e.to_string()))?;
    atomic_file::write(&dest, &text, atomic_file::PRIVATE, false)
        .map_err(|e| CniError::io(format!("writing {}", dest.display()), e))
}

/// The attachment's record; `None` when there is none or it cannot be read (logged).
pub fn load(dir: &Path, container_id: &str, ifname: &str) -> Option<Record> {
    let p = path(dir, container_id, ifname);
    let (p, bytes) = match fs::read(&p) {
        Ok(b) => (p, b),
        Err(_) => {
            let flat = flat_path(dir, container_id, ifname);
            let b = fs::read(&flat).ok()?;
            (flat, b)
        }
    };
    match serde_json::from_slice::<Record>(&bytes) {
        Ok(r) if r.container_id == container_id && r.ifname == ifname => Some(r),
        Ok(_) => None,
        Err(e) => {
            weft_core::warn!("ignoring unreadable {}: {e}", p.display());
            None
        }
    }
}

pub fn remove(dir: &Path, container_id: &str, ifname: &str) -> Result<()> {
    let sharded = path(dir, container_id, ifname);
    for p in [&sharded, &flat_path(dir, container_id, ifname)] {
        atomic_file::remove(p).map_err(|e| CniError::io(format!("removing {}", p.display()), e))?;
    }
    // Its subdirectory goes once empty (a racing ADD's write makes it again).
    if let Some(bucket) = sharded.parent() {
        let _ = fs::remove_dir(bucket);
    }
    Ok(())
}

/// The data dir and its subdirectories: where records and their temporary files are.
pub fn dirs(dir: &Path) -> Vec<PathBuf> {
    let subdirs = fs::read_dir(dir).into_iter().flatten().flatten();
    let subdirs = subdirs.filter(|e| e.file_type().is_ok_and(|t| t.is_dir()));
    std::iter::once(dir.to_path_buf())
        .chain(subdirs.map(|e| e.path()))
        .collect()
}

/// Every readable record (GC).
pub fn all(dir: &Path) -> Vec<Record> {
    let files = dirs(dir)
        .into_iter()
        .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten());
    files
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;
    use crate::rules::Key;

    fn record(cid: &str) -> Record {
        Record {
            network: "net".into(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            keys: vec![Installed {
                key: Key {
                    host_ip: None,
                    v6: false,
                    protocol: Protocol::Tcp,
                    host_port: 8080,
                },
                class: Some("pm-a-b-a4".into()),
            }],
        }
    }

    #[test]
    fn records_live_in_subdirectories_and_flat_ones_still_count() {
        let dir = std::env::temp_dir().join(format!("weft-portmap-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        save(&dir, &record("a")).unwrap();
        let p = path(&dir, "a", "eth0");
        assert!(p.is_file());
        assert_eq!(p.parent().unwrap().parent().unwrap(), dir);
        assert_eq!(load(&dir, "a", "eth0"), Some(record("a")));
        // A record of the flat layout, without classes: read, listed and removed.
        let mut old = serde_json::to_value(record("b")).unwrap();
        old["keys"][0].as_object_mut().unwrap().remove("class");
        fs::write(flat_path(&dir, "b", "eth0"), old.to_string()).unwrap();
        let b = load(&dir, "b", "eth0").unwrap();
        assert_eq!(b.keys[0].class, None);
        assert_eq!(all(&dir).len(), 2);
        remove(&dir, "b", "eth0").unwrap();
        remove(&dir, "a", "eth0").unwrap();
        assert!(all(&dir).is_empty());
        assert_eq!(load(&dir, "a", "eth0"), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
