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
pub fn write(path: &Path, bytes: &[u8], modes: Modes, sync: bool) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(modes.dir)
        .create(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(modes.file)
            .open(&tmp)?;
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

/// Remove a file written by [`write`]; one that is already gone is fine.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
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
}
