//! Tenants and their API keys. Keys are random (256 bits), shown once, and
//! stored only as SHA-256 hashes in a JSON file written atomically (temp
//! file, fsync, rename). Lookups compare hashes in constant time.
//!
//! Each tenant also has an incarnation: a tenant deleted and created again
//! under the same name is a different tenant. Every write made for a tenant
//! goes through [`Tenants::write_as`] with the incarnation its request
//! authenticated as, so once a deletion begins nothing more is written for
//! the deleted tenant, and nothing of it reaches a successor of that name.
//! A deletion is recorded in the file before any data is removed, so a
//! crash mid-way is finished at the next start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::adapter_store::{validate_name, StoreError};

/// Why a tenant operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error(transparent)]
    Name(#[from] StoreError),
    #[error("tenant {0} already exists")]
    Exists(String),
    #[error("tenant {0} is still being deleted; retry shortly")]
    BeingDeleted(String),
    #[error("tenant {0} not found")]
    NotFound(String),
    #[error("tenant {0} was deleted")]
    Gone(String),
    #[error("tenant file {path}: {message}")]
    Io { path: String, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TenantRecord {
    key_sha256: String,
    created_at: u64,
    /// Tells this tenant from an earlier one of the same name (files
    /// written before incarnations existed use the creation time).
    #[serde(default)]
    incarnation: u64,
}

/// The tenants file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TenantsFile {
    /// Always 2 (the first format was the bare map of tenants).
    format: u32,
    tenants: BTreeMap<String, TenantRecord>,
    /// Tenants whose data is being removed.
    #[serde(default)]
    deleting: Vec<String>,
}

/// A tenant as a request authenticated it: its name and incarnation.
/// Dereferences to the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantRef {
    name: String,
    incarnation: u64,
}

impl TenantRef {
    /// The single tenant of a server without keys: never deleted.
    pub fn open(name: &str) -> Self {
        TenantRef { name: name.to_string(), incarnation: 0 }
    }

    /// A tenant recorded earlier (a queued job's), by name and incarnation.
    pub fn from_parts(name: &str, incarnation: u64) -> Self {
        TenantRef { name: name.to_string(), incarnation }
    }

    /// The tenant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which tenant of that name this is (0: the open server's own).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
}

impl std::ops::Deref for TenantRef {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for TenantRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// The tenants of this server.
pub struct Tenants {
    path: PathBuf,
    file: RwLock<TenantsFile>,
    /// Per tenant name, the incarnation writes may be made for (0: none).
    /// Writes hold it shared; a deletion takes it exclusively, so it waits
    /// for writes in progress and no write starts after it.
    gates: DashMap<String, Arc<RwLock<u64>>>,
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Equality that takes the same time wherever the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn new_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("ll-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Tenants {
    /// Opens (or starts) the tenant file; reads the first format too.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, TenantError> {
        let path = path.into();
        let io = |e: String| TenantError::Io { path: path.display().to_string(), message: e };
        let mut file = if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| io(e.to_string()))?;
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| io(e.to_string()))?;
            if value.get("format").and_then(serde_json::Value::as_u64) == Some(2) {
                serde_json::from_value(value).map_err(|e| io(e.to_string()))?
            } else {
                let tenants = serde_json::from_value(value).map_err(|e| io(e.to_string()))?;
                TenantsFile { format: 2, tenants, deleting: Vec::new() }
            }
        } else {
            TenantsFile { format: 2, ..Default::default() }
        };
        for rec in file.tenants.values_mut() {
            if rec.incarnation == 0 {
                rec.incarnation = rec.created_at.max(1);
            }
        }
        let gates = DashMap::new();
        for (name, rec) in &file.tenants {
            gates.insert(name.clone(), Arc::new(RwLock::new(rec.incarnation)));
        }
        Ok(Tenants { path, file: RwLock::new(file), gates })
    }

    fn save(&self, file: &TenantsFile) -> Result<(), TenantError> {
        let io = |p: &Path, e: std::io::Error| TenantError::Io { path: p.display().to_string(), message: e.to_string() };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
            f.write_all(&serde_json::to_vec_pretty(file).unwrap_or_default()).map_err(|e| io(&tmp, e))?;
            f.sync_all().map_err(|e| io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| io(&self.path, e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
        }
        Ok(())
    }

    fn gate(&self, name: &str) -> Arc<RwLock<u64>> {
        self.gates.entry(name.to_string()).or_insert_with(|| Arc::new(RwLock::new(0))).clone()
    }

    /// Creates a tenant; returns its key (the only time it is shown).
    pub fn create(&self, name: &str) -> Result<String, TenantError> {
        validate_name(name)?;
        let gate = self.gate(name);
        let mut open = gate.write().unwrap_or_else(|p| p.into_inner());
        let mut file = self.file.write().unwrap_or_else(|p| p.into_inner());
        if file.tenants.contains_key(name) {
            return Err(TenantError::Exists(name.to_string()));
        }
        if file.deleting.iter().any(|d| d == name) {
            return Err(TenantError::BeingDeleted(name.to_string()));
        }
        let key = new_key();
        let incarnation = rand::rngs::OsRng.next_u64().max(1);
        let mut next = file.clone();
        next.tenants.insert(name.to_string(), TenantRecord { key_sha256: sha256_hex(&key), created_at: now(), incarnation });
        self.save(&next)?;
        *file = next;
        *open = incarnation;
        Ok(key)
    }

    /// Replaces a tenant's key; the old one stops working at once.
    pub fn rotate(&self, name: &str) -> Result<String, TenantError> {
        let mut file = self.file.write().unwrap_or_else(|p| p.into_inner());
        let mut next = file.clone();
        let rec = next.tenants.get_mut(name).ok_or_else(|| TenantError::NotFound(name.to_string()))?;
        let key = new_key();
        rec.key_sha256 = sha256_hex(&key);
        self.save(&next)?;
        *file = next;
        Ok(key)
    }

    /// Begins deleting a tenant: waits for writes made for it to finish,
    /// removes it (its key stops working, later writes are refused) and
    /// records the deletion as pending, durably, before returning. Call
    /// [`Tenants::finish_delete`] once its data is gone.
    pub fn begin_delete(&self, name: &str) -> Result<(), TenantError> {
        let gate = self.gate(name);
        let mut open = gate.write().unwrap_or_else(|p| p.into_inner());
        let mut file = self.file.write().unwrap_or_else(|p| p.into_inner());
        if !file.tenants.contains_key(name) {
            return Err(TenantError::NotFound(name.to_string()));
        }
        let mut next = file.clone();
        next.tenants.remove(name);
        if !next.deleting.iter().any(|d| d == name) {
            next.deleting.push(name.to_string());
        }
        self.save(&next)?;
        *file = next;
        *open = 0;
        Ok(())
    }

    /// Records that a deleted tenant's data is gone: its name may be created again.
    pub fn finish_delete(&self, name: &str) -> Result<(), TenantError> {
        let mut file = self.file.write().unwrap_or_else(|p| p.into_inner());
        if !file.deleting.iter().any(|d| d == name) {
            return Ok(());
        }
        let mut next = file.clone();
        next.deleting.retain(|d| d != name);
        self.save(&next)?;
        *file = next;
        Ok(())
    }

    /// Tenants whose deletion began and did not finish (a crash, or an
    /// error on the way): their data is to be removed before serving.
    pub fn pending_deletions(&self) -> Vec<String> {
        self.file.read().unwrap_or_else(|p| p.into_inner()).deleting.clone()
    }

    /// Runs `write` while `who` is still the tenant of its name; holding
    /// the tenant's gate, so a deletion waits for it to finish. A deleted
    /// tenant (or one deleted and created again) is `Gone`.
    pub fn write_as<T>(&self, who: &TenantRef, write: impl FnOnce() -> T) -> Result<T, TenantError> {
        if who.incarnation == 0 {
            return Ok(write());
        }
        let gate = self.gate(&who.name);
        let open = gate.read().unwrap_or_else(|p| p.into_inner());
        if *open != who.incarnation {
            return Err(TenantError::Gone(who.name.clone()));
        }
        let out = write();
        drop(open);
        Ok(out)
    }

    /// Whether `who` is still the tenant of its name.
    pub fn is_current(&self, who: &TenantRef) -> bool {
        who.incarnation == 0 || self.current(&who.name).is_some_and(|c| c.incarnation == who.incarnation)
    }

    /// Tenant names with creation times.
    pub fn list(&self) -> Vec<(String, u64)> {
        self.file.read().unwrap_or_else(|p| p.into_inner()).tenants.iter().map(|(n, r)| (n.clone(), r.created_at)).collect()
    }

    /// A tenant's creation time, if it exists.
    pub fn created_at(&self, name: &str) -> Option<u64> {
        self.file.read().unwrap_or_else(|p| p.into_inner()).tenants.get(name).map(|r| r.created_at)
    }

    /// Whether a tenant exists.
    pub fn exists(&self, name: &str) -> bool {
        self.file.read().unwrap_or_else(|p| p.into_inner()).tenants.contains_key(name)
    }

    /// The tenant of that name as it is now, if it exists.
    pub fn current(&self, name: &str) -> Option<TenantRef> {
        let file = self.file.read().unwrap_or_else(|p| p.into_inner());
        file.tenants.get(name).map(|r| TenantRef { name: name.to_string(), incarnation: r.incarnation })
    }

    /// The tenant a key belongs to (every record compared in constant time).
    pub fn authenticate(&self, key: &str) -> Option<TenantRef> {
        let hash = sha256_hex(key);
        let file = self.file.read().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for (name, rec) in file.tenants.iter() {
            if constant_time_eq(rec.key_sha256.as_bytes(), hash.as_bytes()) {
                found = Some(TenantRef { name: name.clone(), incarnation: rec.incarnation });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_authenticate_rotate_and_are_stored_only_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        let t = Tenants::open(&path).unwrap();
        let key = t.create("acme").unwrap();
        assert!(key.len() >= 64);
        assert_eq!(t.authenticate(&key).as_deref(), Some("acme"));
        assert!(!std::fs::read_to_string(&path).unwrap().contains(&key));
        assert!(matches!(t.create("acme"), Err(TenantError::Exists(_))));
        let new = t.rotate("acme").unwrap();
        assert_eq!(t.authenticate(&key), None);
        assert_eq!(Tenants::open(&path).unwrap().authenticate(&new).as_deref(), Some("acme"));
        t.begin_delete("acme").unwrap();
        assert_eq!(t.authenticate(&new), None);
        assert!(t.create("../x").is_err());
    }

    #[test]
    fn a_deleted_tenants_writes_are_refused_even_after_its_name_is_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tenants::open(dir.path().join("tenants.json")).unwrap();
        let key = t.create("acme").unwrap();
        let old = t.authenticate(&key).unwrap();
        assert_eq!(t.write_as(&old, || 7).unwrap(), 7);
        t.begin_delete("acme").unwrap();
        assert!(matches!(t.write_as(&old, || 7), Err(TenantError::Gone(_))));
        assert!(matches!(t.create("acme"), Err(TenantError::BeingDeleted(_))), "not before its data is gone");
        t.finish_delete("acme").unwrap();
        let again = t.create("acme").unwrap();
        let new = t.authenticate(&again).unwrap();
        assert!(t.write_as(&new, || ()).is_ok());
        assert!(matches!(t.write_as(&old, || ()), Err(TenantError::Gone(_))), "the old incarnation stays gone");
        assert!(t.write_as(&TenantRef::open("default"), || ()).is_ok());
    }

    #[test]
    fn an_unfinished_deletion_survives_a_restart_and_the_first_format_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.json");
        std::fs::write(&path, r#"{"acme": {"key_sha256": "00", "created_at": 5}, "globex": {"key_sha256": "11", "created_at": 6}}"#).unwrap();
        let t = Tenants::open(&path).unwrap();
        assert_eq!(t.list().len(), 2);
        assert_eq!(t.current("acme").map(|r| r.incarnation), Some(5));
        t.begin_delete("acme").unwrap();
        let t = Tenants::open(&path).unwrap();
        assert_eq!(t.pending_deletions(), vec!["acme".to_string()]);
        assert!(!t.exists("acme") && t.exists("globex"));
        t.finish_delete("acme").unwrap();
        assert!(Tenants::open(&path).unwrap().pending_deletions().is_empty());
    }
}
