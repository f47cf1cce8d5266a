//! libcni's result cache: `<cacheDir>/results/<net>-<cid>-<ifname>`, one JSON
//! document per attachment, written by ADD and read by CHECK, DEL and GC.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The `kind` libcni writes and insists on when reading.
pub const KIND: &str = "cniCacheV1";

/// One cache file, with libcni's key names (Go's `cachedInfo`; empty optional
/// fields are omitted as Go's `omitempty` does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAttachment {
    pub kind: String,
    #[serde(rename = "containerId")]
    pub container_id: String,
    /// base64 of the whole conflist (Go marshals `[]byte` as base64).
    pub config: String,
    #[serde(rename = "ifName")]
    pub if_name: String,
    #[serde(rename = "networkName")]
    pub network_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub netns: String,
    #[serde(rename = "cniArgs", default, skip_serializing_if = "Vec::is_empty")]
    pub cni_args: Vec<(String, String)>,
    #[serde(
        rename = "capabilityArgs",
        default,
        skip_serializing_if = "Map::is_empty"
    )]
    pub capability_args: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

/// `<cache_dir>/results`.
pub fn results_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("results")
}

/// `<cache_dir>/results/<net>-<cid>-<ifname>`.
pub fn file_path(cache_dir: &Path, net: &str, container_id: &str, ifname: &str) -> PathBuf {
    results_dir(cache_dir).join(format!("{net}-{container_id}-{ifname}"))
}

/// Write `entry` to `path`: directories 0700, file 0600, as libcni does (the cache
/// holds args and capabilities, which may be sensitive).
pub fn store(path: &Path, entry: &CachedAttachment) -> std::io::Result<()> {
    let dir = path.parent().expect("cache files live in a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let bytes = serde_json::to_vec(entry).expect("cache entries serialize");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An older file keeps its mode through O_TRUNC; make sure it is 0600 now.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(&bytes)
}

/// Read a cache file. `Ok(None)` when it cannot be read (libcni ignores read errors:
/// usually there simply is no cache); `Err` when it is there but corrupt.
pub fn load(path: &Path) -> Result<Option<CachedAttachment>, String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(None);
    };
    match serde_json::from_slice::<CachedAttachment>(&bytes) {
        Ok(e) if e.kind == KIND => Ok(Some(e)),
        Ok(e) => Err(format!(
            "unknown cache kind {:?} in {}",
            e.kind,
            path.display()
        )),
        Err(err) => Err(format!("corrupt cache file {}: {err}", path.display())),
    }
}

/// Every valid entry, sorted by file name (libcni's `GetCachedAttachments`);
/// unreadable, corrupt or incomplete files are skipped.
pub fn scan(cache_dir: &Path) -> Vec<CachedAttachment> {
    let Ok(rd) = std::fs::read_dir(results_dir(cache_dir)) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| load(p).ok().flatten())
        .filter(|e| !e.if_name.is_empty() && !e.network_name.is_empty())
        .collect()
}

/// Remove a cache file; a missing one is fine.
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}
