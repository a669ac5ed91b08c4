//! Names → versions per tenant, hot swap, and residency. The current
//! version of each (tenant, adapter) sits behind an `ArcSwap`, so promote
//! and rollback are one atomic store after the pointer is durable on disk;
//! a request resolves its adapter once and keeps that version. Loaded
//! adapters are kept up to `max_resident`, least recently used dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use candle_core::{DType, Device};
use dashmap::DashMap;

use crate::adapter_store::{AdapterStore, Manifest, NewVersion, Pointer, Source, StoreError};
use crate::lora::peft::{self, LoraLimits};
use crate::lora::{LoraAdapter, LoraError, SiteSpec};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error("adapter {0} not found")]
    NotFound(String),
    #[error("invalid adapter reference {0:?}: use NAME or NAME@vN")]
    BadReference(String),
}

/// A request's adapter, resolved once.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub name: String,
    pub version: u32,
    pub adapter: Arc<LoraAdapter>,
}

/// What listing shows for one adapter.
#[derive(Debug, Clone)]
pub struct AdapterInfo {
    pub name: String,
    pub current: Option<u32>,
    pub versions: Vec<Manifest>,
}

struct Resident {
    adapter: Arc<LoraAdapter>,
    last_used: AtomicU64,
}

type Key = (String, String);

/// The adapter registry of one server.
pub struct Registry {
    store: AdapterStore,
    sites: Vec<SiteSpec>,
    limits: LoraLimits,
    dtype: DType,
    device: Device,
    current: DashMap<Key, Arc<ArcSwapOption<u32>>>,
    resident: DashMap<(String, String, u32), Resident>,
    max_resident: usize,
    max_resident_bytes: usize,
    tick: AtomicU64,
    metrics: Option<crate::metrics::Metrics>,
    /// Serializes pointer changes per adapter, so the in-memory current
    /// version is swapped in the same order the store wrote it.
    pointer_locks: DashMap<Key, Arc<std::sync::Mutex<()>>>,
}

/// Splits `name@vN`.
pub fn parse_reference(spec: &str) -> Result<(String, Option<u32>), RegistryError> {
    match spec.split_once('@') {
        None => Ok((spec.to_string(), None)),
        Some((name, v)) => {
            let n = v.strip_prefix('v').and_then(|n| n.parse::<u32>().ok()).ok_or_else(|| RegistryError::BadReference(spec.into()))?;
            Ok((name.to_string(), Some(n)))
        }
    }
}

impl Registry {
    /// Rebuilds the in-memory pointers from the store.
    pub fn open(
        store: AdapterStore,
        sites: Vec<SiteSpec>,
        limits: LoraLimits,
        dtype: DType,
        device: Device,
        max_resident: usize,
    ) -> Result<Self, RegistryError> {
        let r = Registry {
            store,
            sites,
            limits,
            dtype,
            device,
            current: DashMap::new(),
            resident: DashMap::new(),
            max_resident: max_resident.max(1),
            max_resident_bytes: usize::MAX,
            tick: AtomicU64::new(0),
            metrics: None,
            pointer_locks: DashMap::new(),
        };
        for tenant in r.store.tenants()? {
            for name in r.store.adapters(&tenant)? {
                let p = r.store.pointer(&tenant, &name)?;
                r.slot(&tenant, &name).store(p.current.map(Arc::new));
            }
        }
        Ok(r)
    }

    /// Caps the bytes loaded adapters may hold (the most recent one always stays).
    pub fn with_byte_budget(mut self, bytes: usize) -> Self {
        self.max_resident_bytes = bytes.max(1);
        self
    }

    /// Bytes held by loaded adapters.
    pub fn resident_bytes(&self) -> usize {
        self.resident.iter().map(|r| r.adapter.bytes()).sum()
    }

    /// Reports residency, loads and hits to `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn record_residency(&self) {
        if let Some(m) = &self.metrics {
            m.adapters_resident.set(self.resident.len() as i64);
            m.adapters_resident_bytes.set(self.resident.iter().map(|r| r.adapter.bytes()).sum::<usize>() as i64);
        }
    }

    fn pointer_lock(&self, tenant: &str, name: &str) -> Arc<std::sync::Mutex<()>> {
        self.pointer_locks.entry((tenant.to_string(), name.to_string())).or_default().clone()
    }

    fn slot(&self, tenant: &str, name: &str) -> Arc<ArcSwapOption<u32>> {
        self.current.entry((tenant.to_string(), name.to_string())).or_insert_with(|| Arc::new(ArcSwapOption::empty())).clone()
    }

    /// The current version of an adapter (lock-free read).
    pub fn current_version(&self, tenant: &str, name: &str) -> Option<u32> {
        self.current.get(&(tenant.to_string(), name.to_string())).and_then(|s| s.load().as_deref().copied())
    }

    /// Resolves `NAME` (current version) or `NAME@vN` for `tenant`. Another
    /// tenant's adapter is simply not found.
    pub fn resolve(&self, tenant: &str, spec: &str) -> Result<Resolved, RegistryError> {
        let (name, pinned) = parse_reference(spec)?;
        let version = match pinned {
            Some(v) => v,
            None => self.current_version(tenant, &name).ok_or_else(|| RegistryError::NotFound(name.clone()))?,
        };
        let adapter = self.load(tenant, &name, version).map_err(|e| match e {
            RegistryError::Store(StoreError::NotFound(_) | StoreError::VersionNotFound { .. } | StoreError::InvalidName(_)) => {
                RegistryError::NotFound(spec.to_string())
            }
            other => other,
        })?;
        Ok(Resolved { name, version, adapter })
    }

    /// A version's adapter, from memory or the store (then kept resident).
    pub fn load(&self, tenant: &str, name: &str, version: u32) -> Result<Arc<LoraAdapter>, RegistryError> {
        let key = (tenant.to_string(), name.to_string(), version);
        let now = self.tick.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = self.resident.get(&key) {
            r.last_used.store(now, Ordering::Relaxed);
            if let Some(m) = &self.metrics {
                m.adapter_cache_hits.inc();
            }
            return Ok(r.adapter.clone());
        }
        let started = std::time::Instant::now();
        let (config, weights) = self.store.read_files(tenant, name, version)?;
        let adapter = Arc::new(peft::parse(&config, &weights, &self.sites, &self.limits, self.dtype, &self.device)?);
        self.resident.insert(key, Resident { adapter: adapter.clone(), last_used: AtomicU64::new(now) });
        self.evict();
        if let Some(m) = &self.metrics {
            m.adapter_cache_misses.inc();
            m.adapter_loads.inc();
            m.adapter_load_seconds.observe(started.elapsed().as_secs_f64());
        }
        self.record_residency();
        Ok(adapter)
    }

    /// Drops least recently used adapters beyond the limit (sequences that
    /// hold one keep it alive until they finish; then its memory is freed).
    fn evict(&self) {
        let over = || {
            let bytes: usize = self.resident.iter().map(|r| r.adapter.bytes()).sum();
            self.resident.len() > self.max_resident || (self.resident.len() > 1 && bytes > self.max_resident_bytes)
        };
        while over() {
            let oldest = self
                .resident
                .iter()
                .min_by_key(|r| r.last_used.load(Ordering::Relaxed))
                .map(|r| r.key().clone());
            match oldest {
                Some(k) => {
                    self.resident.remove(&k);
                }
                None => break,
            }
        }
    }

    /// Adapters resident in memory.
    pub fn resident_count(&self) -> usize {
        self.resident.len()
    }

    /// Validates and stores an uploaded adapter as a new version; promotes it
    /// unless told not to. Nothing is written when validation fails.
    pub fn upload(&self, tenant: &str, name: &str, config: &[u8], weights: &[u8], promote: bool) -> Result<(Manifest, Pointer), RegistryError> {
        let parent = self.current_version(tenant, name);
        self.add_version(tenant, name, config, weights, Source::Upload, parent, serde_json::Value::Null, promote)
    }

    /// Validates and stores a new version from any source (uploads, the
    /// learner's candidates with their metrics), promoting it if asked.
    #[allow(clippy::too_many_arguments)]
    pub fn add_version(
        &self,
        tenant: &str,
        name: &str,
        config: &[u8],
        weights: &[u8],
        source: Source,
        parent: Option<u32>,
        metrics: serde_json::Value,
        promote: bool,
    ) -> Result<(Manifest, Pointer), RegistryError> {
        crate::adapter_store::validate_name(tenant)?;
        crate::adapter_store::validate_name(name)?;
        let adapter = peft::parse(config, weights, &self.sites, &self.limits, self.dtype, &self.device)?;
        let manifest = self.store.write_version(
            tenant,
            name,
            NewVersion {
                config,
                weights,
                source,
                parent,
                rank: adapter.max_rank,
                target_modules: adapter.target_modules(),
                metrics,
            },
        )?;
        let pointer = if promote { self.promote(tenant, name, manifest.version)? } else { self.store.pointer(tenant, name)? };
        Ok((manifest, pointer))
    }

    /// Makes a version current: durable on disk first, then one atomic swap.
    pub fn promote(&self, tenant: &str, name: &str, version: u32) -> Result<Pointer, RegistryError> {
        let lock = self.pointer_lock(tenant, name);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.store.promote(tenant, name, version)?;
        self.slot(tenant, name).store(p.current.map(Arc::new));
        Ok(p)
    }

    /// Back to the previously current version.
    pub fn rollback(&self, tenant: &str, name: &str) -> Result<Pointer, RegistryError> {
        let lock = self.pointer_lock(tenant, name);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.store.rollback(tenant, name)?;
        self.slot(tenant, name).store(p.current.map(Arc::new));
        Ok(p)
    }

    /// Deletes an adapter and all its versions.
    pub fn delete(&self, tenant: &str, name: &str) -> Result<(), RegistryError> {
        let lock = self.pointer_lock(tenant, name);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.store.delete(tenant, name)?;
        self.current.remove(&(tenant.to_string(), name.to_string()));
        self.resident.retain(|k, _| !(k.0 == tenant && k.1 == name));
        self.record_residency();
        Ok(())
    }

    /// A tenant's adapters with versions.
    pub fn list(&self, tenant: &str) -> Result<Vec<AdapterInfo>, RegistryError> {
        let mut out = Vec::new();
        for name in self.store.adapters(tenant)? {
            let versions = self.store.versions(tenant, &name)?;
            out.push(AdapterInfo { current: self.current_version(tenant, &name), name, versions });
        }
        Ok(out)
    }

    /// One adapter with versions.
    pub fn info(&self, tenant: &str, name: &str) -> Result<AdapterInfo, RegistryError> {
        let versions = self.store.versions(tenant, name).map_err(|e| match e {
            StoreError::NotFound(_) | StoreError::InvalidName(_) => RegistryError::NotFound(name.to_string()),
            other => other.into(),
        })?;
        Ok(AdapterInfo { name: name.to_string(), current: self.current_version(tenant, name), versions })
    }

    /// The stored PEFT files of a version (for download).
    pub fn files(&self, tenant: &str, name: &str, version: u32) -> Result<(Vec<u8>, Vec<u8>), RegistryError> {
        Ok(self.store.read_files(tenant, name, version)?)
    }
}
