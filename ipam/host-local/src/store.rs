//! On-disk reservations, interchangeable with the reference plugin:
//! `<dataDir>/<network>/<ip>` holds `<containerID>\r\n<ifname>` (legacy files hold
//! only the container ID), `last_reserved_ip.<set>` the round-robin pointer, and
//! `lock` is flock'ed around every operation.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, FileExt, MetadataExt, OpenOptionsExt};
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
///
/// Who holds which address comes from `.weft-owners`, a cache of the reservation
/// files' contents, instead of reading every file on every operation. The cache is
/// trusted only if the directory's mtime and every reservation's (name, inode) are
/// what they were when it was written: ext4 and xfs change the mtime on every
/// create/unlink, and tmpfs (whose mtime can miss a change) never reuses an inode
/// number soon. So any reservation created or removed behind our back (by the
/// reference plugin, a person, a restore) makes the next operation read all files
/// again. A file rewritten in place (`printf … > 10.0.0.5`) keeps its inode and is
/// not noticed: delete `.weft-owners` after editing reservations by hand.
pub struct Store {
    dir: PathBuf,
    owners: BTreeMap<IpAddr, Owner>,
    /// The cache file no longer matches `owners`.
    dirty: bool,
    _lock: File,
}

const CACHE: &str = ".weft-owners";
const CACHE_HEADER: &str = "# weft host-local owner cache v1 (safe to delete)";

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
        // ADD does not write new state through a link planted as the network's
        // directory (dataDir above may be one). DEL, GC, CHECK and STATUS still work on
        // such a directory: an install that set one up must be able to release.
        let meta = std::fs::symlink_metadata(dir).map_err(|e| CniError::io(dir.display(), e))?;
        if create && meta.file_type().is_symlink() {
            let e = std::io::Error::from_raw_os_error(libc::ELOOP);
            return Err(CniError::io(dir.display(), e));
        }
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(|e| CniError::io(lock_path.display(), e))?;
        lock.lock()
            .map_err(|e| CniError::io(format!("locking {}", lock_path.display()), e))?;
        let entries = reservation_entries(dir).map_err(|e| CniError::io(dir.display(), e))?;
        let (owners, dirty) = match read_cache(dir, &entries) {
            Some(owners) => (owners, false),
            None => (read_all(dir, &entries)?, true),
        };
        Ok(Some(Store {
            dir: dir.to_path_buf(),
            owners,
            dirty,
            _lock: lock,
        }))
    }

    /// Atomically claim `ip` (O_EXCL) and move the set's round-robin pointer.
    /// `Ok(false)` when someone holds it already.
    pub fn reserve(&mut self, ip: IpAddr, cid: &str, ifname: &str, set: usize) -> Result<bool> {
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
        let owner = Owner::Attachment {
            container_id: cid.to_string(),
            ifname: ifname.to_string(),
        };
        self.owners.insert(ip, owner);
        self.dirty = true;
        // The caller only rolls back what reserve() reported as taken.
        if let Err(e) = self.write_last_reserved(ip, set) {
            let _ = self.release(ip);
            return Err(e);
        }
        Ok(true)
    }

    fn write_last_reserved(&self, ip: IpAddr, set: usize) -> Result<()> {
        let path = self.dir.join(format!("last_reserved_ip.{set}"));
        write_in_place(&path, ip.to_string().as_bytes())
            .map_err(|e| CniError::io(path.display(), e))
    }

    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        std::fs::read_to_string(self.dir.join(format!("last_reserved_ip.{set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Drop the reservation of `ip`; a missing file is fine.
    pub fn release(&mut self, ip: IpAddr) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(CniError::io(path.display(), e));
            }
            _ => {}
        }
        self.owners.remove(&ip);
        self.dirty = true;
        Ok(())
    }

    /// Every reservation, by address.
    pub fn reservations(&self) -> &BTreeMap<IpAddr, Owner> {
        &self.owners
    }

    /// Addresses held by (cid, ifname). Exact matches win; only when there are none
    /// do legacy files of the same container count, as in the reference.
    pub fn held_by(&self, cid: &str, ifname: &str) -> Vec<IpAddr> {
        let pick = |f: &dyn Fn(&Owner) -> bool| -> Vec<IpAddr> {
            self.owners
                .iter()
                .filter(|(_, o)| f(o))
                .map(|(ip, _)| *ip)
                .collect()
        };
        let exact = pick(&|o| o.is_exactly(cid, ifname));
        if !exact.is_empty() {
            return exact;
        }
        pick(&|o| matches!(o, Owner::Legacy { container_id } if container_id == cid))
    }

    /// Rewrite the cache in place (not by rename, which would change the directory's
    /// mtime), stamped with the mtime the directory has once this operation is done.
    fn write_cache(&self) -> std::io::Result<()> {
        let path = self.dir.join(CACHE);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        let entries = reservation_entries(&self.dir)?;
        let mut body = format!("{CACHE_HEADER}\ndirmtime {}\n", dir_stamp(&self.dir)?);
        // A file we did not expect means our view is off: no trailer, no trust.
        let complete = entries.len() == self.owners.len()
            && self.owners.keys().all(|ip| entries.contains_key(ip));
        for (ip, owner) in &self.owners {
            let ino = entries.get(ip).copied().unwrap_or_default();
            match owner {
                Owner::Attachment {
                    container_id,
                    ifname,
                } => body += &format!("{ip}\t{ino}\t{container_id}\t{ifname}\n"),
                Owner::Legacy { container_id } => body += &format!("{ip}\t{ino}\t{container_id}\n"),
            }
        }
        if complete {
            body += &format!("end {:016x}\n", fnv1a(body.as_bytes()));
        }
        overwrite(&file, body.as_bytes())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Runs before the lock field is dropped, so the cache is written under the lock.
        if let Some(e) = self.dirty.then(|| self.write_cache().err()).flatten() {
            let path = self.dir.join(CACHE);
            weft_core::warn!(
                "could not write {}: {e}; the next operation rescans",
                path.display()
            );
        }
    }
}

/// Replace a small file's content without truncating it to zero first: ext4 flushes
/// a file on close after a truncate-to-zero-and-rewrite (auto_da_alloc), which
/// costs more than the rest of an ADD. A torn write is caught by its reader.
fn write_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    overwrite(&file, bytes)
}

fn overwrite(file: &File, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all_at(bytes, 0)?;
    file.set_len(bytes.len() as u64)
}

/// FNV-1a: enough to tell a complete cache from a torn one.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The directory's mtime to the nanosecond. Any file created or removed in it changes it.
fn dir_stamp(dir: &Path) -> std::io::Result<String> {
    let m = std::fs::metadata(dir)?;
    Ok(format!("{}.{:09}", m.mtime(), m.mtime_nsec()))
}

/// Reservation files (named by an address) and their inode numbers, from readdir
/// alone. `lock`, `last_reserved_ip.N` and the cache are not reservations.
fn reservation_entries(dir: &Path) -> std::io::Result<BTreeMap<IpAddr, u64>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(ip) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<IpAddr>().ok())
        {
            out.insert(ip, entry.ino());
        }
    }
    Ok(out)
}

/// The cached owners, if the cache is complete and describes `entries` exactly.
fn read_cache(dir: &Path, entries: &BTreeMap<IpAddr, u64>) -> Option<BTreeMap<IpAddr, Owner>> {
    let text = std::fs::read_to_string(dir.join(CACHE)).ok()?;
    let (body, sum) = text.rsplit_once("end ")?;
    (sum.trim_end() == format!("{:016x}", fnv1a(body.as_bytes()))).then_some(())?;
    let mut lines = body.lines();
    (lines.next()? == CACHE_HEADER).then_some(())?;
    (lines.next()?.strip_prefix("dirmtime ")? == dir_stamp(dir).ok()?).then_some(())?;
    let mut owners = BTreeMap::new();
    for line in lines {
        let mut f = line.split('\t');
        let ip: IpAddr = f.next()?.parse().ok()?;
        let ino: u64 = f.next()?.parse().ok()?;
        (entries.get(&ip) == Some(&ino)).then_some(())?;
        let cid = f.next()?.to_string();
        let owner = match f.next() {
            Some(ifname) => Owner::Attachment {
                container_id: cid,
                ifname: ifname.to_string(),
            },
            None => Owner::Legacy { container_id: cid },
        };
        owners.insert(ip, owner);
    }
    (owners.len() == entries.len()).then_some(owners)
}

/// Read every reservation file.
fn read_all(dir: &Path, entries: &BTreeMap<IpAddr, u64>) -> Result<BTreeMap<IpAddr, Owner>> {
    let mut out = BTreeMap::new();
    for ip in entries.keys() {
        let path = dir.join(ip.to_string());
        match std::fs::read_to_string(&path) {
            Ok(content) => {
                out.insert(*ip, Owner::parse(&content));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(CniError::io(path.display(), e)),
        }
    }
    Ok(out)
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

    /// A state directory under `base`, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(base: &str, tag: &str) -> Option<Dir> {
            let base = Path::new(base);
            base.is_dir()
                .then(|| Dir(base.join(format!("weft-store-{tag}-{}", std::process::id()))))
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn owner_of(dir: &Path, addr: &str) -> Option<Owner> {
        Store::open(dir, false)
            .unwrap()
            .unwrap()
            .reservations()
            .get(&ip(addr))
            .cloned()
    }

    /// The cache text with its checksum recomputed after an edit.
    fn reseal(text: &str) -> String {
        let body = text.rsplit_once("end ").unwrap().0;
        format!("{body}end {:016x}\n", fnv1a(body.as_bytes()))
    }

    /// A directory where c1/eth0 holds 10.0.0.2, and the path of its cache.
    fn one_reservation(tag: &str) -> (Dir, PathBuf) {
        let d = Dir::new("/tmp", tag).unwrap();
        let mut store = Store::open(&d.0, true).unwrap().unwrap();
        store.reserve(ip("10.0.0.2"), "c1", "eth0", 0).unwrap();
        drop(store);
        let cache = d.0.join(CACHE);
        (d, cache)
    }

    #[test]
    fn cache_is_used_while_the_directory_is_unchanged() {
        let (d, cache) = one_reservation("used");
        let text = std::fs::read_to_string(&cache).unwrap();
        assert!(text.contains("\tc1\teth0\nend "), "{text}");
        // An in-place edit of the cache does not touch the directory: it is believed.
        write_in_place(&cache, reseal(&text.replace("\tc1\t", "\tc9\t")).as_bytes()).unwrap();
        assert!(owner_of(&d.0, "10.0.0.2").unwrap().is_exactly("c9", "eth0"));
    }

    #[test]
    fn torn_or_stale_caches_are_ignored() {
        let (d, cache) = one_reservation("torn");
        let text = std::fs::read_to_string(&cache)
            .unwrap()
            .replace("\tc1\t", "\tc9\t");
        let body = text.rsplit_once("end ").unwrap().0;
        write_in_place(&cache, body.as_bytes()).unwrap();
        assert!(
            owner_of(&d.0, "10.0.0.2").unwrap().is_exactly("c1", "eth0"),
            "no trailer: rescanned"
        );
        write_in_place(&cache, text.as_bytes()).unwrap();
        assert!(
            owner_of(&d.0, "10.0.0.2").unwrap().is_exactly("c1", "eth0"),
            "edited without a matching checksum: rescanned"
        );
        write_in_place(&cache, b"garbage").unwrap();
        assert!(owner_of(&d.0, "10.0.0.2").unwrap().is_exactly("c1", "eth0"));
    }

    /// What another implementation does between two of ours: replace a reservation
    /// (same name, new owner), add one, remove one. Repeated quickly, so changes land
    /// within one timestamp tick, which tmpfs's mtime alone would miss.
    fn foreign_changes_are_seen(base: &str) {
        let Some(d) = Dir::new(base, "foreign") else {
            return;
        };
        for round in 0..200 {
            let mut s = Store::open(&d.0, true).unwrap().unwrap();
            s.reserve(ip("10.0.0.2"), "ours", "eth0", 0).unwrap();
            drop(s);
            std::fs::remove_file(d.0.join("10.0.0.2")).unwrap();
            std::fs::write(d.0.join("10.0.0.2"), format!("theirs{round}\r\neth0")).unwrap();
            let mut s = Store::open(&d.0, false).unwrap().unwrap();
            assert!(
                s.reservations()[&ip("10.0.0.2")].is_exactly(&format!("theirs{round}"), "eth0"),
                "{base} {round}"
            );
            s.release(ip("10.0.0.2")).unwrap();
            drop(s);
            std::fs::write(d.0.join("10.0.0.3"), "legacy").unwrap();
            assert_eq!(
                owner_of(&d.0, "10.0.0.3"),
                Some(Owner::Legacy {
                    container_id: "legacy".into()
                })
            );
            std::fs::remove_file(d.0.join("10.0.0.3")).unwrap();
            assert_eq!(owner_of(&d.0, "10.0.0.3"), None, "{base} {round}");
        }
    }

    #[test]
    fn foreign_changes_are_seen_on_ext4() {
        foreign_changes_are_seen("/tmp");
    }

    #[test]
    fn foreign_changes_are_seen_on_tmpfs() {
        foreign_changes_are_seen("/dev/shm");
    }
}
