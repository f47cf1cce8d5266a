//! Plumbing shared by all rows: running plugins, a scratch network namespace,
//! scratch directories and Ctrl-C handling.

use std::ffi::{CString, OsString};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// One side of the comparison: a directory of plugin binaries.
#[derive(Debug, Clone)]
pub struct Impl {
    /// `ours` or `reference`; also used in network names and container IDs.
    pub label: &'static str,
    pub bin_dir: PathBuf,
    /// An IPv4 range per implementation, big enough never to run out.
    pub subnet: &'static str,
}

impl Impl {
    pub fn plugin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// Move this process into a new, empty network namespace (with `lo` up).
pub fn enter_private_netns() -> Result<()> {
    // SAFETY: unshare affects only the calling thread's namespaces; we are single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("running ip")?;
    anyhow::ensure!(status.success(), "ip link set lo up: {status}");
    Ok(())
}

/// What a row works with for one implementation: fresh state per row.
pub struct Target<'a> {
    pub imp: &'a Impl,
    /// Path of a network namespace that is not ours (`/proc/<pid>/ns/net`).
    pub netns: &'a Path,
    /// The "host" this implementation's plugins and tools run in: a namespace of its
    /// own, so neither side's kernel state (the reference's thousands of iptables
    /// rules cost every nftables transaction in their namespace) weighs on the other.
    pub host: &'a Path,
    /// host-local `dataDir`, fresh for this row and implementation.
    pub data_dir: PathBuf,
    /// Network name for this row and implementation.
    pub network: String,
    seq: u64,
}

impl<'a> Target<'a> {
    pub fn new(
        imp: &'a Impl,
        netns: &'a Path,
        host: &'a Path,
        data_dir: PathBuf,
        network: String,
    ) -> Self {
        Self {
            imp,
            netns,
            host,
            data_dir,
            network,
            seq: 0,
        }
    }

    /// A container ID never used before by this target.
    pub fn next_container_id(&mut self) -> String {
        self.seq += 1;
        format!("weft-bench-{}-{:06}", self.imp.label, self.seq)
    }

    /// host-local network config for `network`, as piped on stdin.
    pub fn host_local_conf(&self, network: &str) -> Vec<u8> {
        serde_json::json!({ "cniVersion": "1.0.0", "name": network, "ipam": self.ipam() })
            .to_string()
            .into_bytes()
    }

    /// host-local over this implementation's own subnet and data dir.
    fn ipam(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "host-local",
            "dataDir": self.data_dir,
            "ranges": [[{ "subnet": self.imp.subnet }]],
        })
    }

    /// A bridge name of this implementation's own: `prefix` and its label's start.
    pub fn bridge_name(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{}",
            self.imp.label.chars().take(3).collect::<String>()
        )
    }

    /// bridge + host-local: a bridge of this implementation's own, with a gateway.
    pub fn bridge_conf(&self, network: &str, ip_masq: bool) -> Vec<u8> {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "type": "bridge",
            "bridge": self.bridge_name("wb"),
            "isGateway": true,
            "ipMasq": ip_masq,
            "ipam": self.ipam(),
        })
        .to_string()
        .into_bytes()
    }

    /// Start `plugin` with a cleared CNI environment and `conf` on stdin.
    pub fn spawn(
        &self,
        plugin: &str,
        cni_command: &str,
        container_id: &str,
        conf: &[u8],
    ) -> Result<Child> {
        let bin = self.imp.plugin(plugin);
        let mut cmd = Command::new(&bin);
        in_netns(&mut cmd, self.host)?;
        let mut child = cmd
            .env_clear()
            // Runtimes pass their PATH; the reference needs it to find iptables.
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", cni_command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.imp.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot execute {}", bin.display()))?;
        // Configs are far below the pipe buffer: this never blocks on the child.
        let mut stdin = child.stdin.take().expect("stdin is piped");
        if let Err(e) = stdin.write_all(conf) {
            // The plugin may have exited early; its status and stderr say why.
            if e.kind() != io::ErrorKind::BrokenPipe {
                return Err(e).context("writing the config to the plugin's stdin");
            }
        }
        Ok(child)
    }

    /// Run `plugin` to completion; time from spawn to exit. Fails unless it succeeded.
    pub fn timed_exec(
        &self,
        plugin: &str,
        cni_command: &str,
        container_id: &str,
        conf: &[u8],
    ) -> Result<(Duration, Output)> {
        let start = Instant::now();
        let child = self.spawn(plugin, cni_command, container_id, conf)?;
        let out = child.wait_with_output().context("waiting for the plugin")?;
        let elapsed = start.elapsed();
        ensure_success(&out, &self.describe(plugin, cni_command, container_id))?;
        Ok((elapsed, out))
    }

    /// Like [`Self::timed_exec`], for untimed setup steps.
    pub fn exec(
        &self,
        plugin: &str,
        cni_command: &str,
        container_id: &str,
        conf: &[u8],
    ) -> Result<Output> {
        self.timed_exec(plugin, cni_command, container_id, conf)
            .map(|(_, out)| out)
    }

    pub fn describe(&self, plugin: &str, cni_command: &str, container_id: &str) -> String {
        format!(
            "{} {} {cni_command} (container {container_id})",
            self.imp.label,
            self.imp.plugin(plugin).display()
        )
    }
}

/// Make `cmd` start in the network namespace at `path` (setns between fork and exec:
/// no extra process, the same cost for every implementation).
pub fn in_netns(cmd: &mut Command, path: &Path) -> Result<()> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns is async-signal-safe; the descriptor stays open in the child (the
    // closure owns it) until exec closes it (O_CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Fail, showing everything the plugin said, unless it exited 0.
pub fn ensure_success(out: &Output, what: &str) -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    if !out.status.success() {
        bail!(
            "{what} failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

/// The addresses (`"10.200.0.2/16"`) of an ADD result; at least one.
pub fn result_addresses(out: &Output, what: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{what}: stdout is not JSON: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let ips: Vec<String> = v
        .get("ips")
        .and_then(|ips| ips.as_array())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str().map(str::to_string))
        .collect();
    ensure!(!ips.is_empty(), "{what}: result has no ips[].address: {v}");
    Ok(ips)
}

/// A network namespace of our own making: `unshare --net sleep infinity`, used
/// through `/proc/<pid>/ns/net`. Killed on drop; should we die without dropping
/// it (abort, SIGKILL), the parent-death signal kills it.
pub struct Netns {
    child: Child,
    path: PathBuf,
}

impl Netns {
    pub fn create() -> Result<Self> {
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "sleep", "infinity"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Out of the terminal's process group: Ctrl-C is ours to handle.
            .process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .context("cannot run `unshare --net sleep infinity` (util-linux)")?;
        let path = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        let mut ns = Self { child, path };
        let own = std::fs::metadata("/proc/self/ns/net")
            .context("stat /proc/self/ns/net")?
            .ino();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = ns.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = ns.child.stderr.take() {
                    let _ = io::Read::read_to_string(&mut e, &mut err);
                }
                bail!(
                    "`unshare --net sleep infinity` exited ({status}): {}",
                    err.trim()
                );
            }
            // Until unshare(2) has run, the child is still in our namespace.
            if let Ok(m) = std::fs::metadata(&ns.path)
                && m.ino() != own
            {
                return Ok(ns);
            }
            ensure!(
                Instant::now() < deadline,
                "the unshare child did not get a new network namespace within 5 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory under `$TMPDIR`, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let template = std::env::temp_dir().join(format!("{prefix}XXXXXX"));
        let mut buf = CString::new(template.into_os_string().into_vec())
            .context("temp dir path contains NUL")?
            .into_bytes_with_nul();
        // SAFETY: buf is a NUL-terminated, writable template ending in XXXXXX.
        let p = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error()).context("mkdtemp");
        }
        buf.pop(); // the NUL
        Ok(Self(PathBuf::from(OsString::from_vec(buf))))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // Second Ctrl-C: give up on tidy cleanup (the netns child still dies
        // of its parent-death signal).
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// On SIGINT/SIGTERM, set a flag the run loop checks between operations, so
/// that cleanup (netns child, temp dirs) runs on the way out.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: plain sigaction with a handler that only touches an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> Result<()> {
    ensure!(!interrupted(), "interrupted");
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
