//! Files written whole or not at all: a temporary file in the same directory,
//! renamed over the destination, so readers see the old content or the new, never
//! a torn or empty file.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Modes of the file and of the directories created for it.
#[derive(Debug, Clone, Copy)]
pub struct Modes {
    pub dir: u32,
    pub file: u32,
}

/// State only root may read: directories 0700, files 0600.
pub const PRIVATE: Modes = Modes {
    dir: 0o700,
    file: 0o600,
};

/// Write `bytes` to `path`, creating its directory. With `sync` the data reaches
/// the disk before the rename, so a power loss cannot leave an empty file behind.
///
/// The temporary file (`.<name>.<pid>` next to `path`) is created exclusively and
/// without following a symlink, so nothing planted under that name (a symlink to
/// another file, a leftover of a crashed writer with the same pid) is written
/// through: it is removed and the file created afresh. The rename replaces a symlink
/// at `path` itself rather than writing where it points.
pub fn write(path: &Path, bytes: &[u8], modes: Modes, sync: bool) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(temp_name(&name, std::process::id()));
    // A writer that removes its directory once empty (portmap's record buckets) may
    // do so between our mkdir and our create: make it again, a few times at most.
    let mut attempts = 0;
    let mut f = loop {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(modes.dir)
            .create(dir)?;
        match create_exclusive(&tmp, modes.file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
            other => break other?,
        }
    };
    let result = (|| {
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The longest file name Linux file systems take (NAME_MAX).
const NAME_MAX: usize = 255;

/// `.<name>.<pid>`, with `name` shortened (at a character boundary) so the whole
/// stays within [`NAME_MAX`]: a destination name that fits must not fail because
/// of its temporary name.
fn temp_name(name: &str, pid: u32) -> String {
    let suffix = format!(".{pid}");
    let room = NAME_MAX - 1 - suffix.len();
    let mut end = name.len().min(room);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}{suffix}", &name[..end])
}

/// Create `path` with `mode`, never opening an existing file or following a
/// symlink; whatever is in the way is removed first (the link, not its target).
fn create_exclusive(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            open()
        }
        other => other,
    }
}

/// Remove a file written by [`write`]; one that is already gone is fine.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Remove the temporary files [`write`] left in `dir` when its writer was killed
/// between creating and renaming them (the writer's pid is gone); GC calls this.
/// Returns how many were removed.
pub fn remove_orphans(dir: &Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        other => other?,
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = writer_pid(&name.to_string_lossy()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove(&e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The pid in a [`temp_name`]: `.<name>.<pid>`.
fn writer_pid(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let (name, pid) = rest.rsplit_once('.')?;
    let digits = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    (!name.is_empty() && digits).then(|| pid.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_with_modes_and_replaces_whole() {
        let dir = std::env::temp_dir().join(format!("weft-atomic-{}", std::process::id()));
        let path = dir.join("sub").join("f");
        write(&path, b"one", PRIVATE, true).unwrap();
        write(&path, b"two", PRIVATE, false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&path), mode(path.parent().unwrap())), (0o600, 0o700));
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn orphans_of_dead_writers_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("weft-orphans-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // pid_max is at most 2^22: this pid cannot be running.
        let dead = dir.join(temp_name("a.json", 99_999_999));
        let alive = dir.join(temp_name("b.json", std::process::id()));
        for p in [&dead, &alive, &dir.join("c.json"), &dir.join(".hidden")] {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_orphans(&dir).unwrap(), 1);
        assert!(!dead.exists() && alive.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
        assert_eq!(remove_orphans(&dir.join("missing")).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A symlink planted at the temporary name or at the destination is replaced,
    /// never written through; a destination name of 255 bytes still works.
    #[test]
    fn never_writes_through_a_planted_symlink() {
        let dir = std::env::temp_dir().join(format!("weft-atomic-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let dest = dir.join("saved");
        let tmp = dir.join(temp_name("saved", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        std::os::unix::fs::symlink(&victim, &dest).unwrap();
        write(&dest, b"new", PRIVATE, true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert!(std::fs::symlink_metadata(&dest).unwrap().is_file());
        assert!(!tmp.exists() && std::fs::symlink_metadata(&tmp).is_err());
        // A dangling symlink at the temporary name creates nothing where it points.
        let nowhere = dir.join("created-through-link");
        std::os::unix::fs::symlink(&nowhere, &tmp).unwrap();
        write(&dest, b"newer", PRIVATE, false).unwrap();
        assert!(std::fs::symlink_metadata(&nowhere).is_err());
        assert_eq!(std::fs::read(&dest).unwrap(), b"newer");

        let long = "c".repeat(NAME_MAX);
        write(&dir.join(&long), b"x", PRIVATE, false).unwrap();
        assert_eq!(std::fs::read(dir.join(&long)).unwrap(), b"x");
        assert!(temp_name(&long, u32::MAX).len() <= NAME_MAX);
        assert_eq!(temp_name(&"é".repeat(200), 77).len(), 254);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [long, "saved".to_string(), "victim".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
