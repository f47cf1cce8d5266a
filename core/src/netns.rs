//! Network namespaces: run code inside one on a throwaway thread, never switching back.
//!
//! `setns` changes the calling *thread*. Doing it on a thread that outlives the
//! closure (a runtime worker, the main thread) risks leaving later work in the pod's
//! namespace. So every entry spawns a fresh thread that enters, runs, and exits.

use crate::error::{CniError, Result, code};
use nix::sched::{CloneFlags, setns};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const NSFS_MAGIC: i64 = 0x6e73_6673;
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// An open handle on a network namespace file (`/run/netns/x`, `/proc/PID/ns/net`).
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Open `path`, checking that it is a namespace file. A missing path is the spec's
    /// code 3 (the container is gone); anything else that is not a netns is code 4.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| {
            let c = if e.kind() == std::io::ErrorKind::NotFound {
                code::UNKNOWN_CONTAINER
            } else {
                code::INVALID_ENV
            };
            CniError::new(c, format!("failed to open netns {path:?}: {e}"))
        })?;
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs writes into the zeroed struct we own; the fd is open.
        let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
        #[allow(clippy::unnecessary_cast)]
        let fs_type = st.f_type as i64;
        if rc != 0 || (fs_type != NSFS_MAGIC && fs_type != PROC_SUPER_MAGIC) {
            return Err(CniError::env(format!(
                "{path:?} is not a network namespace"
            )));
        }
        Ok(NetNs {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is the namespace the calling process lives in.
    pub fn is_current(&self) -> Result<bool> {
        let own = std::fs::metadata("/proc/self/ns/net")
            .map_err(|e| CniError::io("/proc/self/ns/net", e))?;
        let this = self
            .file
            .metadata()
            .map_err(|e| CniError::io(self.path.display(), e))?;
        Ok(own.dev() == this.dev() && own.ino() == this.ino())
    }

    /// Run `f` inside the namespace on a new thread and return its value.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                setns(&self.file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| CniError::internal(format!("setns into {:?}: {e}", self.path)))?;
                Ok(f())
            });
            handle
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A netlink socket bound to this namespace. The socket keeps its namespace after
    /// the thread that opened it exits, so the caller can use it from anywhere.
    pub fn netlink_socket(&self, protocol: isize) -> Result<netlink_sys::Socket> {
        self.run(|| netlink_sys::Socket::new(protocol))?
            .map_err(|e| CniError::internal(format!("netlink socket in {:?}: {e}", self.path)))
    }
}

/// The namespace file's descriptor, e.g. to create a link directly inside it.
impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_is_detected() {
        let ns = NetNs::open("/proc/self/ns/net").unwrap();
        assert!(ns.is_current().unwrap());
        assert_eq!(ns.run(|| 41 + 1).unwrap(), 42);
    }

    #[test]
    fn missing_and_non_namespace_paths() {
        assert_eq!(NetNs::open("/nonexistent/ns").unwrap_err().code, 3);
        assert_eq!(NetNs::open("/etc/hostname").unwrap_err().code, 4);
    }
}
