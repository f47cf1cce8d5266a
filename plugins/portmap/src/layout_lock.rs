//! The host's lock on the table's layout: which classes exist and what `hostports`
//! dispatches to.
//!
//! ADD's fast path holds it shared: it only adds elements to classes it expects to
//! exist. Whatever creates or removes a class (ADD's repair path, GC) holds it
//! exclusive from its listing to its commit, so it never acts on a listing another
//! one has made stale: GC never deletes a class set an ADD is filling (`delete set`
//! takes a set with its elements), nor does a repair miss a class GC just dropped.
//! One file for every namespace of the host: taking it costs ~10 µs, and the
//! exclusive holders are rare and short.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use weft_core::error::{CniError, Result};

const PATH: &str = "/run/weft/portmap.lock";

/// Held until dropped.
pub struct LayoutLock(File);

impl LayoutLock {
    /// For adding elements to existing classes.
    pub fn shared() -> Result<LayoutLock> {
        let file = open()?;
        file.lock_shared().map_err(lock_err)?;
        Ok(LayoutLock(file))
    }

    /// For changing which classes exist (waits for every shared holder).
    pub fn exclusive() -> Result<LayoutLock> {
        let file = open()?;
        file.lock().map_err(lock_err)?;
        Ok(LayoutLock(file))
    }

    /// From shared to exclusive. Not atomic (flock drops the shared lock first), so
    /// anything listed before must be listed again.
    pub fn upgrade(self) -> Result<LayoutLock> {
        self.0.lock().map_err(lock_err)?;
        Ok(self)
    }
}

fn open() -> Result<File> {
    let path = Path::new(PATH);
    if let Some(dir) = path.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| CniError::io(dir.display(), e))?;
    }
    // 0600: whoever can open the lock can flock it and stall every portmap ADD.
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CniError::io(PATH, e))
}

fn lock_err(e: std::io::Error) -> CniError {
    CniError::io(format!("locking {PATH}"), e)
}
