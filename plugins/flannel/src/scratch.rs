//! The delegate config saved at ADD for DEL, CHECK and GC: `<dataDir>/<containerID>`
//! as flannel keeps it, so either plugin can delete what the other added.
//!
//! Unlike flannel, the file is written whole or not at all (temp file, fsync,
//! rename), and a second interface of the same container gets its own file
//! `<containerID>@<ifname>` instead of overwriting the first one's. `@` cannot
//! occur in a container ID, so the two forms never collide.

use std::fs;
use std::path::{Path, PathBuf};
use weft_core::atomic_file;
use weft_core::error::{CniError, Result};

/// The interface name kubelet and most runtimes use, saved under the bare ID.
const DEFAULT_IFNAME: &str = "eth0";

/// One attachment's saved config, as found.
pub struct Saved {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// False when the file is a bare-ID file found for another ifname (a second
    /// interface added by flannel's plugin): DEL must leave it for its owner.
    pub owned: bool,
}

fn path(dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    if ifname == DEFAULT_IFNAME {
        dir.join(container_id)
    } else {
        dir.join(format!("{container_id}@{ifname}"))
    }
}

/// Save `bytes` for `(container_id, ifname)` and return where: directory 0700,
/// file 0600, synced
/// before it replaces anything, so a power loss cannot leave an empty file that
/// DEL cannot use (cni-plugin#43).
pub fn save(dir: &Path, container_id: &str, ifname: &str, bytes: &[u8]) -> Result<PathBuf> {
    let dest = path(dir, container_id, ifname);
    atomic_file::write(&dest, bytes, atomic_file::PRIVATE, true)
        .map_err(|e| CniError::io(format!("writing {}", dest.display()), e))?;
    Ok(dest)
}

/// The saved config of `(container_id, ifname)`, if any. For a non-default ifname
/// without its own file, the bare-ID file flannel's plugin would have written.
pub fn load(dir: &Path, container_id: &str, ifname: &str) -> Result<Option<Saved>> {
    let own = path(dir, container_id, ifname);
    let mut candidates = vec![(own, true)];
    if ifname != DEFAULT_IFNAME {
        candidates.push((dir.join(container_id), false));
    }
    for (path, owned) in candidates {
        match fs::read(&path) {
            Ok(bytes) => return Ok(Some(Saved { path, bytes, owned })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(CniError::io(format!("reading {}", path.display()), e)),
        }
    }
    Ok(None)
}

pub fn remove(path: &Path) -> Result<()> {
    atomic_file::remove(path).map_err(|e| CniError::io(format!("removing {}", path.display()), e))
}

/// Every saved file: `(path, container ID, ifname)`, the ifname `None` for a
/// bare-ID file (whose interface is not recorded). Temporary files are skipped.
pub fn all(dir: &Path) -> Vec<(PathBuf, String, Option<String>)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if name.starts_with('.') {
                return None;
            }
            let (cid, ifname) = match name.split_once('@') {
                Some((cid, ifname)) => (cid.to_string(), Some(ifname.to_string())),
                None => (name, None),
            };
            Some((e.path(), cid, ifname))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn saves_private_files_by_id_and_ifname() {
        let dir = std::env::temp_dir().join(format!("weft-flannel-scratch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        save(&dir, "c1", "eth0", b"one").unwrap();
        save(&dir, "c1", "net1", b"two").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("c1")), 0o600);
        assert_eq!(load(&dir, "c1", "eth0").unwrap().unwrap().bytes, b"one");
        let second = load(&dir, "c1", "net1").unwrap().unwrap();
        assert_eq!((second.bytes.as_slice(), second.owned), (&b"two"[..], true));
        remove(&second.path).unwrap();
        // Without its own file, net1 finds flannel's bare-ID file, not owned.
        let fallback = load(&dir, "c1", "net1").unwrap().unwrap();
        assert_eq!(
            (fallback.bytes.as_slice(), fallback.owned),
            (&b"one"[..], false)
        );
        assert!(load(&dir, "c2", "eth0").unwrap().is_none());
        let mut listed: Vec<_> = all(&dir).into_iter().map(|(_, c, i)| (c, i)).collect();
        listed.sort();
        assert_eq!(listed, [("c1".to_string(), None)]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
