//! Immutable adapter versions on disk: `<root>/<tenant>/<name>/v<N>/` with
//! the PEFT files and `manifest.json`, and a `pointer.json` naming the
//! current version (and the ones before it, for rollback). Every write goes
//! to a temporary name, is fsynced, then renamed: a crash at any instant
//! leaves the old or the new state, never a mix.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The PEFT files a version holds.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const MANIFEST_FILE: &str = "manifest.json";
const POINTER_FILE: &str = "pointer.json";

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid name {0:?}: use 1-64 characters a-z, 0-9, '-', '_', '.', starting with a letter or digit")]
    InvalidName(String),
    #[error("adapter {0} not found")]
    NotFound(String),
    #[error("version v{version} of {name} not found")]
    VersionNotFound { name: String, version: u32 },
    #[error("{name} has no earlier version to roll back to")]
    NoPrevious { name: String },
    #[error("storage I/O on {path}: {message}")]
    Io { path: String, message: String },
    #[error("corrupt {path}: {message}")]
    Corrupt { path: String, message: String },
    #[error("v{version} of {name} is the current version; promote or roll back to another first")]
    VersionIsCurrent { name: String, version: u32 },
}

/// Where a version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Upload,
    Learner,
}

/// What `manifest.json` records about a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub created_at: u64,
    pub source: Source,
    pub parent: Option<u32>,
    /// sha256 of each file, hex.
    pub sha256: std::collections::BTreeMap<String, String>,
    pub rank: usize,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// Why the learner's gate rejected this version (None: not rejected).
    /// A rejected version is never served until promoted by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Vec<String>>,
}

impl Manifest {
    /// The gate's reasons when it rejected this version (also read from
    /// manifests written before the typed field, whose metrics say so).
    pub fn rejection(&self) -> Option<Vec<String>> {
        if let Some(r) = &self.rejected {
            return Some(r.clone());
        }
        if self.metrics.get("status").and_then(serde_json::Value::as_str) == Some("rejected") {
            let reasons = self.metrics.get("reasons").and_then(serde_json::Value::as_array);
            return Some(reasons.map(|r| r.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default());
        }
        None
    }
}

/// The current version and the ones that were current before it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pointer {
    pub current: Option<u32>,
    #[serde(default)]
    pub history: Vec<u32>,
    /// Gate-rejected versions someone promoted by hand: servable from then on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<u32>,
}

impl Pointer {
    /// Whether `m` may be served: not rejected, or current, or released by hand.
    pub fn servable(&self, m: &Manifest) -> bool {
        m.rejection().is_none() || self.current == Some(m.version) || self.released.contains(&m.version)
    }
}

/// Checks a tenant or adapter name: a short allow-listed alphabet, so no
/// name ever becomes a path outside the store.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName(name.to_string()))
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io { path: path.display().to_string(), message: e.to_string() }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io(path))
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The adapter store rooted at `storage.adapters_dir`.
#[derive(Debug, Clone)]
pub struct AdapterStore {
    root: PathBuf,
    /// One writer at a time per adapter: numbering a version and moving the
    /// pointer are read-modify-write steps (uploads and the learner race).
    locks: std::sync::Arc<dashmap::DashMap<PathBuf, std::sync::Arc<std::sync::Mutex<()>>>>,
}

/// A new version's contents and provenance.
pub struct NewVersion<'a> {
    pub config: &'a [u8],
    pub weights: &'a [u8],
    pub source: Source,
    pub parent: Option<u32>,
    pub rank: usize,
    pub target_modules: Vec<String>,
    pub metrics: serde_json::Value,
    /// The gate's reasons, for a version the learner keeps but does not serve.
    pub rejected: Option<Vec<String>>,
}

/// Bytes of every regular file under `dir` (0 when it does not exist).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

impl AdapterStore {
    /// Opens (creating) the root and removes leftovers of interrupted writes.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io(&root))?;
        let store = AdapterStore { root, locks: Default::default() };
        store.clean_partial_writes()?;
        Ok(store)
    }

    fn adapter_dir(&self, tenant: &str, name: &str) -> Result<PathBuf, StoreError> {
        validate_name(tenant)?;
        validate_name(name)?;
        Ok(self.root.join(tenant).join(name))
    }

    /// Holds the adapter's write lock for `f`.
    fn exclusive<T>(&self, tenant: &str, name: &str, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let dir = self.adapter_dir(tenant, name)?;
        let lock = self.locks.entry(dir).or_default().clone();
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }

    fn clean_partial_writes(&self) -> Result<(), StoreError> {
        // Tenants whose deletion was interrupted after their directory was renamed away.
        for entry in fs::read_dir(&self.root).map_err(io(&self.root))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".deleted-") {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        for tenant in self.read_names(&self.root)? {
            let tdir = self.root.join(&tenant);
            for entry in fs::read_dir(&tdir).map_err(io(&tdir))?.flatten() {
                let adir = entry.path();
                if !adir.is_dir() {
                    continue;
                }
                if entry.file_name().to_string_lossy().starts_with(".deleted-") {
                    let _ = fs::remove_dir_all(&adir);
                    continue;
                }
                for v in fs::read_dir(&adir).map_err(io(&adir))?.flatten() {
                    let n = v.file_name().to_string_lossy().into_owned();
                    if n.starts_with(".tmp") {
                        let p = v.path();
                        let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                    }
                }
            }
        }
        Ok(())
    }

    fn read_names(&self, dir: &Path) -> Result<Vec<String>, StoreError> {
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut names: Vec<String> = fs::read_dir(dir)
            .map_err(io(dir))?
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| validate_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Tenants with anything stored.
    pub fn tenants(&self) -> Result<Vec<String>, StoreError> {
        self.read_names(&self.root)
    }

    /// A tenant's adapter names.
    pub fn adapters(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        validate_name(tenant)?;
        self.read_names(&self.root.join(tenant))
    }

    /// Every complete version of an adapter, oldest first.
    pub fn versions(&self, tenant: &str, name: &str) -> Result<Vec<Manifest>, StoreError> {
        let dir = self.adapter_dir(tenant, name)?;
        if !dir.exists() {
            return Err(StoreError::NotFound(name.to_string()));
        }
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(v) = n.strip_prefix('v').and_then(|v| v.parse::<u32>().ok()) {
                let mpath = e.path().join(MANIFEST_FILE);
                let text = fs::read_to_string(&mpath).map_err(io(&mpath))?;
                let m: Manifest = serde_json::from_str(&text)
                    .map_err(|err| StoreError::Corrupt { path: mpath.display().to_string(), message: err.to_string() })?;
                if m.version == v {
                    out.push(m);
                }
            }
        }
        out.sort_by_key(|m| m.version);
        Ok(out)
    }

    /// The pointer (current version and history).
    pub fn pointer(&self, tenant: &str, name: &str) -> Result<Pointer, StoreError> {
        let path = self.adapter_dir(tenant, name)?.join(POINTER_FILE);
        if !path.exists() {
            return Ok(Pointer::default());
        }
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt { path: path.display().to_string(), message: e.to_string() })
    }

    fn write_pointer(&self, tenant: &str, name: &str, p: &Pointer) -> Result<(), StoreError> {
        let dir = self.adapter_dir(tenant, name)?;
        let tmp = dir.join(".tmp-pointer.json");
        write_synced(&tmp, &serde_json::to_vec_pretty(p).unwrap_or_default())?;
        let dst = dir.join(POINTER_FILE);
        fs::rename(&tmp, &dst).map_err(io(&dst))?;
        sync_dir(&dir)
    }

    /// Writes a new immutable version (the next number) and returns its manifest.
    pub fn write_version(&self, tenant: &str, name: &str, new: NewVersion<'_>) -> Result<Manifest, StoreError> {
        self.exclusive(tenant, name, || self.write_version_locked(tenant, name, new))
    }

    fn write_version_locked(&self, tenant: &str, name: &str, new: NewVersion<'_>) -> Result<Manifest, StoreError> {
        let dir = self.adapter_dir(tenant, name)?;
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let tenant_dir = self.root.join(tenant);
        sync_dir(&tenant_dir)?;
        sync_dir(&self.root)?;
        let version = self.versions(tenant, name)?.last().map_or(1, |m| m.version + 1);
        let mut sha = std::collections::BTreeMap::new();
        sha.insert(CONFIG_FILE.to_string(), hex_sha256(new.config));
        sha.insert(WEIGHTS_FILE.to_string(), hex_sha256(new.weights));
        let manifest = Manifest {
            version,
            created_at: now(),
            source: new.source,
            parent: new.parent,
            sha256: sha,
            rank: new.rank,
            target_modules: new.target_modules,
            metrics: new.metrics,
            rejected: new.rejected,
        };
        let tmp = dir.join(format!(".tmp-v{version}-{}-{}", std::process::id(), rand::random::<u64>()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        write_synced(&tmp.join(CONFIG_FILE), new.config)?;
        write_synced(&tmp.join(WEIGHTS_FILE), new.weights)?;
        write_synced(&tmp.join(MANIFEST_FILE), &serde_json::to_vec_pretty(&manifest).unwrap_or_default())?;
        sync_dir(&tmp)?;
        let dst = dir.join(format!("v{version}"));
        fs::rename(&tmp, &dst).map_err(io(&dst))?;
        sync_dir(&dir)?;
        Ok(manifest)
    }

    /// The PEFT files of a version, checked against the manifest's hashes.
    pub fn read_files(&self, tenant: &str, name: &str, version: u32) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        self.read_version(tenant, name, version).map(|(_, config, weights)| (config, weights))
    }

    /// A version's manifest and PEFT files, checked against its hashes.
    pub fn read_version(&self, tenant: &str, name: &str, version: u32) -> Result<(Manifest, Vec<u8>, Vec<u8>), StoreError> {
        let vdir = self.adapter_dir(tenant, name)?.join(format!("v{version}"));
        if !vdir.exists() {
            return Err(StoreError::VersionNotFound { name: name.to_string(), version });
        }
        let mpath = vdir.join(MANIFEST_FILE);
        let manifest: Manifest = serde_json::from_str(&fs::read_to_string(&mpath).map_err(io(&mpath))?)
            .map_err(|e| StoreError::Corrupt { path: mpath.display().to_string(), message: e.to_string() })?;
        let read = |f: &str| -> Result<Vec<u8>, StoreError> {
            let p = vdir.join(f);
            let bytes = fs::read(&p).map_err(io(&p))?;
            if manifest.sha256.get(f) != Some(&hex_sha256(&bytes)) {
                return Err(StoreError::Corrupt { path: p.display().to_string(), message: "sha256 differs from the manifest".into() });
            }
            Ok(bytes)
        };
        let (config, weights) = (read(CONFIG_FILE)?, read(WEIGHTS_FILE)?);
        Ok((manifest, config, weights))
    }

    /// Makes `version` current; the previous current goes to the history.
    pub fn promote(&self, tenant: &str, name: &str, version: u32) -> Result<Pointer, StoreError> {
        self.exclusive(tenant, name, || self.promote_locked(tenant, name, version))
    }

    fn promote_locked(&self, tenant: &str, name: &str, version: u32) -> Result<Pointer, StoreError> {
        let versions = self.versions(tenant, name)?;
        let manifest = versions.iter().find(|m| m.version == version).ok_or_else(|| StoreError::VersionNotFound { name: name.to_string(), version })?;
        let mut p = self.pointer(tenant, name)?;
        if p.current == Some(version) {
            return Ok(p);
        }
        if let Some(c) = p.current {
            p.history.push(c);
        }
        if manifest.rejection().is_some() && !p.released.contains(&version) {
            p.released.push(version);
        }
        p.current = Some(version);
        self.write_pointer(tenant, name, &p)?;
        Ok(p)
    }

    /// Goes back to the version that was current before this one.
    pub fn rollback(&self, tenant: &str, name: &str) -> Result<Pointer, StoreError> {
        self.exclusive(tenant, name, || self.rollback_locked(tenant, name))
    }

    fn rollback_locked(&self, tenant: &str, name: &str) -> Result<Pointer, StoreError> {
        let mut p = self.pointer(tenant, name)?;
        let previous = p.history.pop().ok_or_else(|| StoreError::NoPrevious { name: name.to_string() })?;
        p.current = Some(previous);
        self.write_pointer(tenant, name, &p)?;
        Ok(p)
    }

    /// Removes one version that is not current (renamed away first, so a
    /// crash never leaves half a version listed); it leaves the rollback
    /// history too.
    pub fn delete_version(&self, tenant: &str, name: &str, version: u32) -> Result<Pointer, StoreError> {
        self.exclusive(tenant, name, || self.delete_version_locked(tenant, name, version))
    }

    fn delete_version_locked(&self, tenant: &str, name: &str, version: u32) -> Result<Pointer, StoreError> {
        let dir = self.adapter_dir(tenant, name)?;
        let vdir = dir.join(format!("v{version}"));
        if !vdir.exists() {
            return Err(StoreError::VersionNotFound { name: name.to_string(), version });
        }
        let mut p = self.pointer(tenant, name)?;
        if p.current == Some(version) {
            return Err(StoreError::VersionIsCurrent { name: name.to_string(), version });
        }
        if p.history.contains(&version) || p.released.contains(&version) {
            p.history.retain(|&v| v != version);
            p.released.retain(|&v| v != version);
            self.write_pointer(tenant, name, &p)?;
        }
        let gone = dir.join(format!(".tmp-deleted-v{version}-{}", rand::random::<u64>()));
        fs::rename(&vdir, &gone).map_err(io(&vdir))?;
        sync_dir(&dir)?;
        fs::remove_dir_all(&gone).map_err(io(&gone))?;
        Ok(p)
    }

    /// Bytes a tenant's adapter versions take on disk.
    pub fn tenant_bytes(&self, tenant: &str) -> Result<u64, StoreError> {
        validate_name(tenant)?;
        Ok(dir_bytes(&self.root.join(tenant)))
    }

    /// Removes everything a tenant stored (renamed away in one step first,
    /// so a crash leaves all of it or none listed; leftovers are removed at
    /// the next open). Nothing stored is fine.
    pub fn delete_tenant(&self, tenant: &str) -> Result<(), StoreError> {
        validate_name(tenant)?;
        let dir = self.root.join(tenant);
        if !dir.exists() {
            return Ok(());
        }
        let gone = self.root.join(format!(".deleted-{tenant}-{}", rand::random::<u64>()));
        fs::rename(&dir, &gone).map_err(io(&dir))?;
        sync_dir(&self.root)?;
        fs::remove_dir_all(&gone).map_err(io(&gone))
    }

    /// Removes an adapter and all its versions (renamed away first, so a
    /// crash never leaves half an adapter listed).
    pub fn delete(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        self.exclusive(tenant, name, || self.delete_locked(tenant, name))
    }

    fn delete_locked(&self, tenant: &str, name: &str) -> Result<(), StoreError> {
        let dir = self.adapter_dir(tenant, name)?;
        if !dir.exists() {
            return Err(StoreError::NotFound(name.to_string()));
        }
        let gone = self.root.join(tenant).join(format!(".deleted-{name}-{}", now()));
        fs::rename(&dir, &gone).map_err(io(&dir))?;
        sync_dir(&self.root.join(tenant))?;
        fs::remove_dir_all(&gone).map_err(io(&gone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(config: &'static [u8]) -> NewVersion<'static> {
        NewVersion { config, weights: b"w", source: Source::Upload, parent: None, rank: 4, target_modules: vec!["q_proj".into()], metrics: serde_json::Value::Null, rejected: None }
    }

    #[test]
    fn versions_are_numbered_promoted_and_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = AdapterStore::open(dir.path()).unwrap();
        assert_eq!(s.write_version("acme", "support", new(b"{1}")).unwrap().version, 1);
        assert_eq!(s.write_version("acme", "support", new(b"{2}")).unwrap().version, 2);
        assert_eq!(s.pointer("acme", "support").unwrap().current, None);
        s.promote("acme", "support", 1).unwrap();
        s.promote("acme", "support", 2).unwrap();
        assert_eq!(s.pointer("acme", "support").unwrap(), Pointer { current: Some(2), history: vec![1], released: vec![] });
        assert_eq!(s.rollback("acme", "support").unwrap().current, Some(1));
        assert!(matches!(s.rollback("acme", "support"), Err(StoreError::NoPrevious { .. })));
        assert_eq!(s.read_files("acme", "support", 2).unwrap().0, b"{2}");
        assert!(matches!(s.promote("acme", "support", 9), Err(StoreError::VersionNotFound { .. })));
    }

    #[test]
    fn a_rejected_version_is_servable_only_once_promoted_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        let s = AdapterStore::open(dir.path()).unwrap();
        s.write_version("t", "a", new(b"{1}")).unwrap();
        s.promote("t", "a", 1).unwrap();
        let m = s.write_version("t", "a", NewVersion { rejected: Some(vec!["drift".into()]), ..new(b"{2}") }).unwrap();
        assert_eq!(m.rejection(), Some(vec!["drift".to_string()]));
        assert!(!s.pointer("t", "a").unwrap().servable(&m));
        s.promote("t", "a", 2).unwrap();
        s.rollback("t", "a").unwrap();
        let p = s.pointer("t", "a").unwrap();
        assert_eq!((p.current, p.servable(&m)), (Some(1), true));
    }

    #[test]
    fn versions_and_tenants_are_deleted_whole_and_the_current_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = AdapterStore::open(dir.path()).unwrap();
        for body in [&b"{1}"[..], b"{2}", b"{3}"] {
            let v = s.write_version("t", "a", new(body)).unwrap().version;
            s.promote("t", "a", v).unwrap();
        }
        assert!(matches!(s.delete_version("t", "a", 3), Err(StoreError::VersionIsCurrent { .. })));
        let p = s.delete_version("t", "a", 1).unwrap();
        assert_eq!((p.current, p.history.clone()), (Some(3), vec![2]));
        assert_eq!(s.versions("t", "a").unwrap().iter().map(|m| m.version).collect::<Vec<_>>(), vec![2, 3]);
        assert!(s.tenant_bytes("t").unwrap() > 0);
        s.write_version("u", "b", new(b"{}")).unwrap();
        s.delete_tenant("t").unwrap();
        assert_eq!(s.tenants().unwrap(), vec!["u".to_string()]);
        assert_eq!(s.tenant_bytes("t").unwrap(), 0);
        // A deletion interrupted after the rename is finished at the next open.
        std::fs::create_dir_all(dir.path().join(".deleted-u-1/b")).unwrap();
        AdapterStore::open(dir.path()).unwrap();
        assert!(!dir.path().join(".deleted-u-1").exists());
    }

    #[test]
    fn tampered_files_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = AdapterStore::open(dir.path()).unwrap();
        s.write_version("t", "a", new(b"{}")).unwrap();
        std::fs::write(dir.path().join("t/a/v1").join(WEIGHTS_FILE), b"evil").unwrap();
        assert!(matches!(s.read_files("t", "a", 1), Err(StoreError::Corrupt { .. })));
        for bad in ["", "..", "../x", "/abs", "a/b", "A", "x\0y", "é", &"a".repeat(65), ".hidden"] {
            assert!(matches!(s.write_version("t", bad, new(b"{}")), Err(StoreError::InvalidName(_))), "{bad:?}");
        }
    }

    #[test]
    fn leftovers_of_interrupted_writes_are_ignored_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = AdapterStore::open(dir.path()).unwrap();
        s.write_version("t", "a", new(b"{}")).unwrap();
        std::fs::create_dir_all(dir.path().join("t/a/.tmp-v2-1")).unwrap();
        std::fs::write(dir.path().join("t/a/.tmp-pointer.json"), b"{").unwrap();
        assert_eq!(s.versions("t", "a").unwrap().len(), 1);
        let s = AdapterStore::open(dir.path()).unwrap();
        assert!(!dir.path().join("t/a/.tmp-v2-1").exists());
        assert_eq!(s.write_version("t", "a", new(b"{}")).unwrap().version, 2);
    }

    #[test]
    fn concurrent_writers_get_distinct_complete_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = AdapterStore::open(dir.path()).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..5).map(|_| store.write_version("acme", "bot", new(b"{}")).unwrap().version).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut got: Vec<u32> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        got.sort();
        assert_eq!(got, (1..=40).collect::<Vec<_>>());
        assert_eq!(store.versions("acme", "bot").unwrap().len(), 40);
    }
}
