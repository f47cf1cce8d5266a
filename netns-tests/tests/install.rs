//! install.sh, run for real (`bash install.sh --no-deps` from the workspace root)
//! with every directory it writes redirected into a scratch root: the plugins, weftd,
//! the systemd unit and a conflist go in, foreign files are refused or kept as
//! `.pre-weft`, and `--uninstall` leaves the scratch root exactly as it was.
//!
//! The install runs `cargo build --release --bins`, a no-op on an up-to-date tree
//! (the README's build command). The installer gets the test's environment (PATH,
//! HOME, CARGO_HOME, RUSTUP_HOME, CARGO_TARGET_DIR...) minus the variables cargo sets
//! for a test process: build scripts watch some of them (ring's `CARGO_PKG_NAME`),
//! and a different value there would rebuild and relink everything, for minutes.

use netns_tests::{PLUGINS, TempDir, workspace_root};
use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CONFLIST: &str = "10-flannel.conflist";

/// What a snapshot knows about one path: its kind, permission bits, and for a file
/// its length and a hash of its bytes (for a symlink, its target).
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    len: u64,
    hash: u64,
}

/// A scratch root holding every directory install.sh writes, at the same relative
/// places as on a real host.
struct Root {
    dir: TempDir,
}

impl Root {
    fn new(tag: &str) -> Root {
        Root {
            dir: TempDir::new(&format!("install-{tag}")),
        }
    }

    fn bin(&self) -> PathBuf {
        self.dir.join("opt/cni/bin")
    }
    fn sbin(&self) -> PathBuf {
        self.dir.join("usr/local/bin")
    }
    fn systemd(&self) -> PathBuf {
        self.dir.join("etc/systemd/system")
    }
    fn conf(&self) -> PathBuf {
        self.dir.join("etc/cni/net.d")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("var/lib/weft")
    }
    fn manifest(&self) -> PathBuf {
        self.state().join("install-manifest")
    }

    /// `bash install.sh args...` from the workspace root, all directories in here.
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("bash");
        for (key, _) in std::env::vars_os() {
            if set_by_cargo_test(&key.to_string_lossy()) {
                cmd.env_remove(key);
            }
        }
        cmd.arg("install.sh")
            .args(args)
            .current_dir(workspace_root())
            .env("CNI_BIN_DIR", self.bin())
            .env("WEFT_SBIN_DIR", self.sbin())
            .env("SYSTEMD_DIR", self.systemd())
            .env("CNI_CONF_DIR", self.conf())
            .env("WEFT_STATE_DIR", self.state())
            .output()
            .expect("running bash install.sh")
    }

    /// `install.sh --no-deps args...`, which must succeed: its stdout.
    fn install(&self, args: &[&str]) -> String {
        let mut argv = vec!["--no-deps"];
        argv.extend_from_slice(args);
        ok(self.run(&argv), &argv)
    }

    /// `install.sh --no-deps args...`, which must fail: its stderr.
    fn install_fails(&self, args: &[&str]) -> String {
        let mut argv = vec!["--no-deps"];
        argv.extend_from_slice(args);
        let out = self.run(&argv);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "install.sh {argv:?} succeeded; stdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    fn uninstall(&self) -> String {
        ok(self.run(&["--uninstall"]), &["--uninstall"])
    }

    /// Every path under the root, recursively.
    fn snapshot(&self) -> BTreeMap<String, Entry> {
        let mut all = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut all);
        all
    }

    fn manifest_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.manifest())
            .expect("reading the manifest")
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A variable cargo sets for the test binary (not one from the developer's shell).
fn set_by_cargo_test(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
        || [
            "CARGO",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
            "RUST_RECURSION_COUNT",
        ]
        .contains(&key)
}

fn ok(out: Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "install.sh {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn walk(root: &Path, dir: &Path, all: &mut BTreeMap<String, Entry>) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    names.sort();
    for path in names {
        let meta = std::fs::symlink_metadata(&path).expect("lstat");
        let rel = path.strip_prefix(root).unwrap().display().to_string();
        let mode = meta.permissions().mode() & 0o7777;
        let (kind, bytes) = if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).expect("readlink");
            ("symlink", target.into_os_string().into_encoded_bytes())
        } else if meta.is_dir() {
            ("dir", Vec::new())
        } else {
            ("file", std::fs::read(&path).expect("reading a file"))
        };
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        let entry = Entry {
            kind,
            mode,
            len: bytes.len() as u64,
            hash: h.finish(),
        };
        all.insert(rel, entry);
        if kind == "dir" {
            walk(root, &path, all);
        }
    }
}

/// Where install.sh takes the binaries from.
fn built(name: &str) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target"),
    }
    .join("release")
    .join(name)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn write(path: &Path, content: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn clean_install_then_uninstall_leaves_nothing() {
    if !netns_tests::require_root() {
        return;
    }
    let root = Root::new("clean");
    // A directory that exists already (with someone else's file) must stay; all the
    // others are created by the installer and must go again.
    write(
        &root.systemd().join("other.service"),
        "[Unit]\nDescription=not ours\n",
        0o644,
    );
    let before = root.snapshot();

    let out = root.install(&["--conflist", CONFLIST]);
    assert!(
        out.contains("systemctl enable --now weftd"),
        "no hint how to enable weftd:\n{out}"
    );
    for p in PLUGINS {
        let dest = root.bin().join(p);
        assert_eq!(mode(&dest), 0o755, "{}", dest.display());
        assert!(
            read(&dest) == read(&built(p)),
            "{p} is not the release build"
        );
    }
    let weftd = root.sbin().join("weftd");
    assert_eq!(mode(&weftd), 0o755);
    assert!(read(&weftd) == read(&built("weftd")));

    let unit_path = root.systemd().join("weftd.service");
    assert_eq!(mode(&unit_path), 0o644);
    let unit = String::from_utf8(read(&unit_path)).unwrap();
    let exec = format!("ExecStart={} $WEFTD_ARGS", weftd.display());
    assert!(
        unit.lines().any(|l| l == exec),
        "no {exec:?} in the unit:\n{unit}"
    );
    for line in [
        "EnvironmentFile=-/etc/default/weftd",
        "After=network-online.target",
        "Wants=network-online.target",
        "Restart=always",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line:?} in the unit");
    }
    assert_eq!(unit.matches("ExecStart=").count(), 1);

    let conflist = root.conf().join(CONFLIST);
    assert_eq!(mode(&conflist), 0o644);
    assert!(read(&conflist) == read(&workspace_root().join("conf-examples").join(CONFLIST)));

    // The manifest names every file installed.
    let manifest = root.manifest_lines();
    let mut files: Vec<PathBuf> = PLUGINS.iter().map(|p| root.bin().join(p)).collect();
    files.extend([weftd, unit_path, conflist]);
    for f in &files {
        let want = format!("file\t{}\t", f.display());
        assert!(
            manifest.contains(&want),
            "{} not in the manifest:\n{manifest:#?}",
            f.display()
        );
    }

    root.uninstall();
    assert!(!root.manifest().exists());
    assert_eq!(root.snapshot(), before, "--uninstall left the root changed");
}

#[test]
fn foreign_plugin_is_refused_then_forced_and_restored() {
    if !netns_tests::require_root() {
        return;
    }
    let root = Root::new("foreign-plugin");
    let foreign = "#!/bin/sh\necho somebody else's bridge\n";
    let bridge = root.bin().join("bridge");
    write(&bridge, foreign, 0o750);
    let before = root.snapshot();

    let err = root.install_fails(&[]);
    assert!(
        err.contains(&bridge.display().to_string()) && err.contains("--force"),
        "the refusal does not name {} or --force: {err}",
        bridge.display()
    );
    assert_eq!(root.snapshot(), before, "a refused install changed files");

    // --force keeps the original aside; forcing again must not back up our own copy.
    for _ in 0..2 {
        root.install(&["--force"]);
        let kept = root.bin().join("bridge.pre-weft");
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), foreign);
        assert_eq!(mode(&kept), 0o750);
        assert!(read(&bridge) == read(&built("bridge")));
    }
    // Without --force, a second install is fine too: the bridge is ours now.
    root.install(&[]);

    root.uninstall();
    assert_eq!(std::fs::read_to_string(&bridge).unwrap(), foreign);
    assert_eq!(
        root.snapshot(),
        before,
        "--uninstall did not restore the root"
    );
}

#[test]
fn foreign_conflist_is_refused_then_forced_and_restored() {
    if !netns_tests::require_root() {
        return;
    }
    let root = Root::new("foreign-conflist");
    let foreign = "{\"cniVersion\":\"1.0.0\",\"name\":\"theirs\",\"plugins\":[]}\n";
    let conflist = root.conf().join(CONFLIST);
    write(&conflist, foreign, 0o600);
    let before = root.snapshot();

    let err = root.install_fails(&["--conflist", CONFLIST]);
    assert!(
        err.contains(&conflist.display().to_string()),
        "the refusal does not name {}: {err}",
        conflist.display()
    );
    assert_eq!(root.snapshot(), before, "a refused install changed files");
    // Without --conflist there is nothing in the way.
    root.install(&[]);
    root.uninstall();
    assert_eq!(root.snapshot(), before);

    root.install(&["--force", "--conflist", CONFLIST]);
    let kept = root.conf().join(format!("{CONFLIST}.pre-weft"));
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), foreign);
    assert!(read(&conflist) == read(&workspace_root().join("conf-examples").join(CONFLIST)));

    root.uninstall();
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), foreign);
    assert_eq!(
        root.snapshot(),
        before,
        "--uninstall did not restore the root"
    );
}

#[test]
fn installing_twice_is_idempotent() {
    if !netns_tests::require_root() {
        return;
    }
    let root = Root::new("twice");
    let before = root.snapshot();

    root.install(&["--conflist", CONFLIST]);
    let first = root.manifest_lines();
    root.install(&["--conflist", CONFLIST]);
    let second = root.manifest_lines();
    assert_eq!(first, second, "a second install changed the manifest");
    let mut paths: Vec<&str> = second
        .iter()
        .map(|l| l.split('\t').nth(1).expect("a path in each manifest line"))
        .collect();
    let n = paths.len();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), n, "duplicates in the manifest: {second:#?}");
    // 6 plugins, weftd, the unit, the conflist, and the directories created.
    assert_eq!(second.iter().filter(|l| l.starts_with("file\t")).count(), 9);
    assert!(
        second
            .iter()
            .all(|l| l.starts_with("file\t") || l.starts_with("dir\t"))
    );

    root.uninstall();
    assert!(!root.manifest().exists());
    assert_eq!(root.snapshot(), before, "--uninstall left files behind");
}

#[test]
fn bad_requests_change_nothing() {
    if !netns_tests::require_root() {
        return;
    }
    let root = Root::new("bad");
    let before = root.snapshot();

    let err = String::from_utf8_lossy(&root.run(&["--uninstall"]).stderr).into_owned();
    assert!(err.contains("nothing to uninstall"), "{err}");

    let err = root.install_fails(&["--conflist", "no-such.conflist"]);
    assert!(err.contains(CONFLIST), "the error lists no choices: {err}");
    let err = root.install_fails(&["--conflist", "../install.sh"]);
    assert!(err.contains("not a path"), "{err}");
    let err = root.install_fails(&["--bogus"]);
    assert!(err.contains("unknown option --bogus"), "{err}");

    assert_eq!(root.snapshot(), before);
}
