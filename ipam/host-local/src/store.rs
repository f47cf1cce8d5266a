//! On-disk reservations, interchangeable with the reference plugin:
//! `<dataDir>/<network>/<ip>` holds `<containerID>\r\n<ifname>` (legacy files hold
//! only the container ID), `last_reserved_ip.<set>` the round-robin pointer, and
//! `lock` is flock'ed around every operation.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use weft_core::error::{CniError, Result};

/// Who holds an address, as read from its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Attachment {
        container_id: String,
        ifname: String,
    },
    /// Written by old reference versions: container ID only.
    Legacy { container_id: String },
}

impl Owner {
    fn parse(content: &str) -> Owner {
        let content = content.trim();
        match content
            .split_once("\r\n")
            .or_else(|| content.split_once('\n'))
        {
            Some((cid, ifname)) => Owner::Attachment {
                container_id: cid.trim().to_string(),
                ifname: ifname.trim().to_string(),
            },
            None => Owner::Legacy {
                container_id: content.to_string(),
            },
        }
    }

    pub fn container_id(&self) -> &str {
        match self {
            Owner::Attachment { container_id, .. } | Owner::Legacy { container_id } => container_id,
        }
    }

    pub fn is_exactly(&self, cid: &str, ifname: &str) -> bool {
        matches!(self, Owner::Attachment { container_id, ifname: i } if container_id == cid && i == ifname)
    }
}

/// A network's state directory, locked for as long as this value lives.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Open and lock the directory, creating it (0700) when `create` is set.
    /// Without `create`, a missing directory means there is no state: `Ok(None)`.
    pub fn open(dir: &Path, create: bool) -> Result<Option<Store>> {
        if create {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| CniError::io(format!("creating {}", dir.display()), e))?;
        } else if !dir.is_dir() {
            return Ok(None);
        }
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| CniError::io(lock_path.display(), e))?;
        lock.lock()
            .map_err(|e| CniError::io(format!("locking {}", lock_path.display()), e))?;
        Ok(Some(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        }))
    }

    /// Atomically claim `ip` (O_EXCL) and move the set's round-robin pointer.
    /// `Ok(false)` when someone holds it already.
    pub fn reserve(&self, ip: IpAddr, cid: &str, ifname: &str, set: usize) -> Result<bool> {
        let path = self.dir.join(ip.to_string());
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(CniError::io(path.display(), e)),
        };
        if let Err(e) = file.write_all(format!("{cid}\r\n{ifname}").as_bytes()) {
            let _ = std::fs::remove_file(&path);
            return Err(CniError::io(path.display(), e));
        }
        self.write_last_reserved(ip, set)?;
        Ok(true)
    }

    fn write_last_reserved(&self, ip: IpAddr, set: usize) -> Result<()> {
        let path = self.dir.join(format!("last_reserved_ip.{set}"));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(ip.to_string().as_bytes())
        };
        write().map_err(|e| CniError::io(path.display(), e))
    }

    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        std::fs::read_to_string(self.dir.join(format!("last_reserved_ip.{set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Drop the reservation of `ip`; a missing file is fine.
    pub fn release(&self, ip: IpAddr) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(CniError::io(path.display(), e)),
            _ => Ok(()),
        }
    }

    /// Every reservation in the directory. Files not named by an address
    /// (`lock`, `last_reserved_ip.N`, anything else) are not reservations.
    pub fn reservations(&self) -> Result<Vec<(IpAddr, Owner)>> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| CniError::io(self.dir.display(), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| CniError::io(self.dir.display(), e))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            match std::fs::read_to_string(entry.path()) {
                Ok(content) => out.push((ip, Owner::parse(&content))),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(CniError::io(entry.path().display(), e)),
            }
        }
        Ok(out)
    }

    /// Addresses held by (cid, ifname). Exact matches win; only when there are none
    /// do legacy files of the same container count, as in the reference.
    pub fn held_by(&self, cid: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        let all = self.reservations()?;
        let exact: Vec<IpAddr> = all
            .iter()
            .filter(|(_, o)| o.is_exactly(cid, ifname))
            .map(|(ip, _)| *ip)
            .collect();
        if !exact.is_empty() {
            return Ok(exact);
        }
        let legacy = |o: &Owner| matches!(o, Owner::Legacy { container_id } if container_id == cid);
        Ok(all
            .into_iter()
            .filter(|(_, o)| legacy(o))
            .map(|(ip, _)| ip)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_formats() {
        assert!(Owner::parse("c1\r\neth0").is_exactly("c1", "eth0"));
        assert!(Owner::parse("c1\neth0\n").is_exactly("c1", "eth0"));
        assert_eq!(
            Owner::parse("legacyc\n"),
            Owner::Legacy {
                container_id: "legacyc".into()
            }
        );
    }
}
