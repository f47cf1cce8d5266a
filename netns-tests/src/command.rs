//! Commands the harness runs for its servers and daemons: inside a namespace,
//! dying with the thread that spawned them, and curl.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `program` inside the network namespace `netns` (`nsenter --net=<netns> --
/// program`), or `program` itself without one. nsenter (without `--pid` or
/// `--fork`) execs the program: the child's pid is the program's, and
/// [`die_with_thread`] reaches it.
pub fn netns_command(netns: Option<&Path>, program: impl AsRef<OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display()))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// The file `path`, opened for appending (created if missing).
pub(crate) fn append_to(path: &Path) -> File {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// `cmd` with stdin from /dev/null, stdout and stderr appended to the file `log`.
pub(crate) fn output_to<'a>(cmd: &'a mut Command, log: &Path) -> &'a mut Command {
    let err = append_to(log);
    let out = err
        .try_clone()
        .unwrap_or_else(|e| panic!("duplicating {}: {e}", log.display()));
    cmd.stdin(Stdio::null()).stdout(out).stderr(err)
}

/// Have `cmd`'s child SIGKILLed when the *thread* that spawns it ends
/// (`PR_SET_PDEATHSIG`), so a test process killed without unwinding (SIGKILL, a
/// timed-out run) leaves no server or daemon behind. Returns `cmd` for chaining.
///
/// The parent-death signal is tied to the spawning thread, not to the process:
/// spawn (and restart) such children on the test's own thread, never on a
/// short-lived helper thread, or they are killed when that thread returns.
///
/// The setting survives `execve`, so it reaches the real program only if nothing
/// forks in between (see [`netns_command`]). If this process dies between `fork`
/// and the `prctl`, nobody would kill the child: the spawn fails with `ESRCH`
/// instead.
pub fn die_with_thread(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // We may have died between fork and prctl: then nobody would kill it.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    }
}

/// Run curl in `netns` (if any) with `-sS --noproxy '*' --max-time <max_time_secs>`
/// and `args`, nothing else.
pub(crate) fn curl(netns: Option<&Path>, max_time_secs: &str, args: &[String]) -> Output {
    netns_command(netns, "curl")
        .args(["-sS", "--noproxy", "*", "--max-time", max_time_secs])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning curl {args:?}: {e}"))
}

/// The stdout of a curl run `out` that succeeded; otherwise
/// `Err("curl <what> (<exit status>): <stderr>")`.
pub(crate) fn curl_stdout(out: Output, what: &str) -> Result<Vec<u8>, String> {
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "curl {what} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
