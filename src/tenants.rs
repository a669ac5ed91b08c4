//! Tenants and their API keys. Keys are random (256 bits), shown once, and
//! stored only as SHA-256 hashes in a JSON file written atomically (temp
//! file, fsync, rename). Lookups compare hashes in constant time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

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
    #[error("tenant {0} not found")]
    NotFound(String),
    #[error("tenant file {path}: {message}")]
    Io { path: String, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TenantRecord {
    key_sha256: String,
    created_at: u64,
}

/// The tenants of this server.
pub struct Tenants {
    path: PathBuf,
    records: RwLock<BTreeMap<String, TenantRecord>>,
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

impl Tenants {
    /// Opens (or starts) the tenant file.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, TenantError> {
        let path = path.into();
        let records = if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| TenantError::Io { path: path.display().to_string(), message: e.to_string() })?;
            serde_json::from_str(&text).map_err(|e| TenantError::Io { path: path.display().to_string(), message: e.to_string() })?
        } else {
            BTreeMap::new()
        };
        Ok(Tenants { path, records: RwLock::new(records) })
    }

    fn save(&self, records: &BTreeMap<String, TenantRecord>) -> Result<(), TenantError> {
        let io = |p: &Path, e: std::io::Error| TenantError::Io { path: p.display().to_string(), message: e.to_string() };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
            f.write_all(&serde_json::to_vec_pretty(records).unwrap_or_default()).map_err(|e| io(&tmp, e))?;
            f.sync_all().map_err(|e| io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| io(&self.path, e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
        }
        Ok(())
    }

    /// Creates a tenant; returns its key (the only time it is shown).
    pub fn create(&self, name: &str) -> Result<String, TenantError> {
        validate_name(name)?;
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        if records.contains_key(name) {
            return Err(TenantError::Exists(name.to_string()));
        }
        let key = new_key();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut next = records.clone();
        next.insert(name.to_string(), TenantRecord { key_sha256: sha256_hex(&key), created_at: now });
        self.save(&next)?;
        *records = next;
        Ok(key)
    }

    /// Replaces a tenant's key; the old one stops working at once.
    pub fn rotate(&self, name: &str) -> Result<String, TenantError> {
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        let mut next = records.clone();
        let rec = next.get_mut(name).ok_or_else(|| TenantError::NotFound(name.to_string()))?;
        let key = new_key();
        rec.key_sha256 = sha256_hex(&key);
        self.save(&next)?;
        *records = next;
        Ok(key)
    }

    /// Removes a tenant (its key stops working).
    pub fn delete(&self, name: &str) -> Result<(), TenantError> {
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        let mut next = records.clone();
        next.remove(name).ok_or_else(|| TenantError::NotFound(name.to_string()))?;
        self.save(&next)?;
        *records = next;
        Ok(())
    }

    /// Tenant names with creation times.
    pub fn list(&self) -> Vec<(String, u64)> {
        self.records.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(n, r)| (n.clone(), r.created_at)).collect()
    }

    /// Whether a tenant exists.
    pub fn exists(&self, name: &str) -> bool {
        self.records.read().unwrap_or_else(|p| p.into_inner()).contains_key(name)
    }

    /// The tenant a key belongs to (every record compared in constant time).
    pub fn authenticate(&self, key: &str) -> Option<String> {
        let hash = sha256_hex(key);
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for (name, rec) in records.iter() {
            if constant_time_eq(rec.key_sha256.as_bytes(), hash.as_bytes()) {
                found = Some(name.clone());
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
        t.delete("acme").unwrap();
        assert_eq!(t.authenticate(&new), None);
        assert!(t.create("../x").is_err());
    }
}
