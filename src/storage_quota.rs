//! What each tenant keeps stored (fine-tuning files, examples, adapter
//! versions) and the quota on it: a write that would take a tenant past
//! `limits.tenant_storage_bytes` is refused before anything is written.
//! Writes of one tenant are checked and made one at a time, so two
//! concurrent uploads cannot both slip under the limit.

use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use serde::Serialize;

use crate::registry::{Registry, RegistryError};
use crate::store::{RecordStore, StoreError};

/// Bytes a tenant keeps, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StorageUse {
    pub files: u64,
    pub examples: u64,
    pub adapters: u64,
}

impl StorageUse {
    /// Everything together (what the quota bounds).
    pub fn total(&self) -> u64 {
        self.files + self.examples + self.adapters
    }
}

/// Why a storage write was refused or could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("tenant {tenant} stores {used} bytes; {adding} more would pass its quota of {limit} bytes (limits.tenant_storage_bytes); delete files, examples or adapter versions first")]
    Exceeded { tenant: String, used: u64, adding: u64, limit: u64 },
    #[error(transparent)]
    Records(#[from] StoreError),
    #[error(transparent)]
    Adapters(#[from] RegistryError),
}

/// The storage quota of every tenant.
pub struct TenantStorage {
    records: Arc<dyn RecordStore>,
    registry: Arc<Registry>,
    /// Bytes per tenant (0: no limit).
    limit: u64,
    locks: DashMap<String, Arc<Mutex<()>>>,
}

impl TenantStorage {
    /// Measures tenants in `records` and `registry` against `limit` bytes.
    pub fn new(records: Arc<dyn RecordStore>, registry: Arc<Registry>, limit: u64) -> Self {
        TenantStorage { records, registry, limit, locks: DashMap::new() }
    }

    /// The quota in bytes (0: none).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// What a tenant stores now.
    pub fn usage(&self, tenant: &str) -> Result<StorageUse, StorageError> {
        let stored = self.records.stored_bytes(tenant)?;
        let adapters = match self.registry.stored_bytes(tenant) {
            Ok(b) => b,
            Err(RegistryError::Store(crate::adapter_store::StoreError::InvalidName(_))) => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(StorageUse { files: stored.files, examples: stored.examples, adapters })
    }

    /// Runs `write` (which stores about `adding` bytes for `tenant`) if the
    /// tenant stays within its quota, one writer per tenant at a time.
    pub fn within<T, E: From<StorageError>>(&self, tenant: &str, adding: u64, write: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let lock = self.locks.entry(tenant.to_string()).or_default().clone();
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.limit == 0 {
            return write();
        }
        let used = self.usage(tenant)?.total();
        if used.saturating_add(adding) > self.limit {
            return Err(StorageError::Exceeded { tenant: tenant.to_string(), used, adding, limit: self.limit }.into());
        }
        write()
    }

    /// Drops a deleted tenant's lock.
    pub fn forget(&self, tenant: &str) {
        self.locks.remove(tenant);
    }
}
