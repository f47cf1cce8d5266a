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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Run `work` in a detached child process (own session, stdio on /dev/null, so
/// the runtime reading our stdout sees EOF when we exit), or inline when forking is
/// not safe (more than one thread) or fails. Errors of the detached work are logged.
pub fn run(what: &str, work: impl FnOnce() -> Result<()>) {
    let detached = || {
        detach_stdio();
        logged(what, work)
    };
    if let Err(inline) = detached_child(detached) {
        inline()
    }
}

/// Close `fd` in a detached process a little after this one has exited, for a
/// descriptor whose last close blocks in the kernel. The one in mind: releasing any
/// NETLINK_NETFILTER socket flushes nf_tables' release worker (nft_rcv_nl_event),
/// holding the lock every nf_tables transaction takes. While a transaction that
/// deleted something, ours or another program's, is still being released (an RCU
/// grace period, ~10 ms), that release waits for it: most of a portmap DEL, and of an
/// ADD right after a DEL. Closing [`LATE_CLOSE`] after our exit almost always finds
/// the worker done, so the close neither delays us nor blocks the next plugin's
/// transaction. Waiting for our exit (EOF on a pipe only we hold open) makes the
/// detached close the last one; the detached process keeps no other descriptor, so
/// no lock of ours outlives us in it.
pub fn close(fd: OwnedFd) {
    let Ok((exited, alive)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        return drop(fd);
    };
    let keep = [fd.as_raw_fd(), exited.as_raw_fd()];
    let detached = move || {
        close_all_but(&keep);
        let mut b = [0u8; 1];
        while matches!(
            nix::unistd::read(&exited, &mut b),
            Err(nix::errno::Errno::EINTR)
        ) {}
        std::thread::sleep(LATE_CLOSE);
        drop(fd);
    };
    match detached_child(detached) {
        // Open until we exit; exec'd children do not inherit it (O_CLOEXEC).
        Ok(()) => std::mem::forget(alive),
        // Not detached: close here (dropping the work closes what it holds).
        Err(not_run) => drop(not_run),
    }
}

/// Run `f` in a child process in a session of its own, left to outlive us: once we
/// exit, init (or the runtime's subreaper) adopts and reaps it. Not waited for here
/// (one fork, nothing on our path but the fork itself); a child that finishes
/// before we exit stays a zombie only until then. `Err(f)` when forking is not safe
/// (more than one thread) or fails. In this process, `f` and what it owns are dropped.
fn detached_child<F: FnOnce()>(f: F) -> std::result::Result<(), F> {
    if !single_threaded() {
        return Err(f);
    }
    // SAFETY: this process has a single thread (checked above), so the child is a
    // consistent copy of it: allocation, locks and libraries are all usable there.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => Ok(()),
        Ok(ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            f();
            // SAFETY: _exit skips atexit handlers and stdio flushing, which belong to
            // the parent.
            unsafe { libc::_exit(0) }
        }
        Err(e) => {
            crate::debug!("fork failed ({e}); doing it now");
            Err(f)
        }
    }
}

/// How long after our exit [`close`] closes.
const LATE_CLOSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Close every descriptor of this process but `keep` (stdio included): with
/// close_range (Linux ≥ 5.9), else one by one from /proc/self/fd.
fn close_all_but(keep: &[RawFd]) {
    let mut from = 0u32;
    let mut sorted: Vec<u32> = keep.iter().filter_map(|&k| u32::try_from(k).ok()).collect();
    sorted.sort_unstable();
    for k in sorted.into_iter().chain([u32::MAX]) {
        // SAFETY: close_range on this (detached) process's own descriptors.
        if k > from && unsafe { libc::close_range(from, k - 1, 0) } != 0 {
            return close_listed_but(keep);
        }
        from = k.saturating_add(1);
    }
}

fn close_listed_but(keep: &[RawFd]) {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in open.into_iter().filter(|fd| !keep.contains(fd)) {
        // SAFETY: closing this (detached) process's own descriptors; the listing's
        // own, already closed, fails harmlessly.
        unsafe { libc::close(fd) };
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
    for fd in 0..3 {
        // SAFETY: plain dup2 onto the standard descriptors of this (child) process.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only queries the descriptor table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
    }

    #[test]
    fn close_in_a_threaded_process_closes_only_that_descriptor() {
        // The test harness runs threads, so nothing forks: the close happens here,
        // and every other descriptor of the process stays open.
        let _thread = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(1)));
        let (a, b) = nix::unistd::pipe().unwrap();
        let raw = a.as_raw_fd();
        close(a);
        assert!(!is_open(raw));
        assert!(is_open(b.as_raw_fd()));
        assert!(is_open(0) || is_open(1) || is_open(2));
    }
}
