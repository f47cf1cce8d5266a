//! Fault injection for the hardening tests, compiled into debug builds only.
//!
//! Each ADD step that changes something calls [`point`] with its name once the
//! change is made. In a debug build, `WEFT_FAULT=<name>` makes that step fail
//! (code 999, "injected fault at <name>"), so a test can prove the rollback of
//! everything before it; `WEFT_FAULT=<name>:kill` kills the process there with
//! SIGKILL instead (a crash at exactly that point); `WEFT_FAULT=<name>:pause=<ms>`
//! stalls it, so a test can break the environment at that moment (delete the
//! netns, say). `WEFT_FAULT_TRACE=<file>` appends the name of every point reached,
//! one per line: how a test finds all the steps of an ADD.
//!
//! In release builds — what is installed — [`point`] is an empty inline function
//! and the variables mean nothing.

use crate::error::Result;

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_name: &str) -> Result<()> {
    Ok(())
}

#[cfg(debug_assertions)]
pub fn point(name: &str) -> Result<()> {
    trace(name);
    let Ok(spec) = std::env::var("WEFT_FAULT") else {
        return Ok(());
    };
    let (target, action) = spec.split_once(':').unwrap_or((&spec, "fail"));
    if target != name {
        return Ok(());
    }
    if action == "kill" {
        // SAFETY: raising a signal at ourselves has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    if let Some(ms) = action.strip_prefix("pause=") {
        let ms = ms.parse().unwrap_or(1000);
        std::thread::sleep(std::time::Duration::from_millis(ms));
        return Ok(());
    }
    Err(crate::error::CniError::internal(format!(
        "injected fault at {name}"
    )))
}

#[cfg(debug_assertions)]
fn trace(name: &str) {
    use std::io::Write;
    let Some(path) = std::env::var_os("WEFT_FAULT_TRACE") else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path);
    if let Ok(mut f) = file {
        let _ = writeln!(f, "{name}");
    }
}
