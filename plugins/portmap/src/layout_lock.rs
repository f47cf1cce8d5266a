//! The lock on the table's layout in this network namespace: which classes exist
//! and what `hostports` dispatches to.
//!
//! ADD's fast path holds it shared: it only adds elements to classes it expects to
//! exist. Whatever creates or removes a class (ADD's repair path, GC) holds it
//! exclusive from its listing to its commit, so it never acts on a listing another
//! one has made stale: GC never deletes a class set an ADD is filling (`delete set`
//! takes a set with its elements), nor does a repair miss a class GC just dropped.
//!
//! The lock is a `flock` on the namespace's own file (`/proc/self/ns/net`): one per
//! namespace, like the table, and no file to create or leave behind. Taking it costs
//! a few µs; the exclusive holders are rare and short.

use std::fs::File;
use weft_core::error::{CniError, Result};

const PATH: &str = "/proc/self/ns/net";

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
    File::open(PATH).map_err(|e| CniError::io(PATH, e))
}

fn lock_err(e: std::io::Error) -> CniError {
    CniError::io(format!("locking {PATH} (portmap's table layout)"), e)
}
