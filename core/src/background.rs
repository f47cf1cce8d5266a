//! Work a plugin finishes after it has replied: the kernel's slow teardown.
//!
//! Deleting a veth costs the kernel ~20 ms (RCU grace periods while unregistering the
//! device), which is most of a bridge DEL. Once DEL has disconnected the pod's
//! interface and released its addresses, nothing the runtime can observe depends on
//! the deletion finishing before the reply, so it runs in a detached process: DEL
//! replies at once and the kernel object goes away a few milliseconds later (or with
//! the pod's network namespace, whichever comes first).

use crate::error::Result;
use nix::unistd::{ForkResult, fork};

/// Run `work` in a detached grandchild process (own session, stdio on /dev/null, so
/// the runtime reading our stdout sees EOF when we exit), or inline when forking is
/// not safe (more than one thread) or fails. Errors of the detached work are logged.
pub fn run(what: &str, work: impl FnOnce() -> Result<()>) {
    if !single_threaded() {
        return logged(what, work);
    }
    // SAFETY: this process has a single thread (checked above), so the child is a
    // consistent copy of it: allocation, locks and libraries are all usable there.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            // The child forks the worker and exits at once: reaping it here makes the
            // worker an orphan, adopted (and reaped) by init or the runtime's subreaper.
            let _ = nix::sys::wait::waitpid(child, None);
        }
        Ok(ForkResult::Child) => {
            // SAFETY: still single-threaded, as above.
            if let Ok(ForkResult::Child) = unsafe { fork() } {
                let _ = nix::unistd::setsid();
                detach_stdio();
                logged(what, work);
            }
            // SAFETY: _exit skips atexit handlers and stdio flushing, which belong to
            // the parent.
            unsafe { libc::_exit(0) }
        }
        Err(e) => {
            crate::debug!("fork for {what} failed ({e}); doing it now");
            logged(what, work)
        }
    }
}

fn logged(what: &str, work: impl FnOnce() -> Result<()>) {
    if let Err(e) = work() {
        crate::warn!("{what}: {e}");
    }
}

fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

fn detach_stdio() {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        // SAFETY: plain dup2 onto the standard descriptors of this (child) process.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}
