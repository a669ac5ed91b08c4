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
    #[error("{name}@v{version} was rejected by the learner's gate ({}); promote it explicitly to serve it", reasons.join("; "))]
    Rejected { name: String, version: u32, reasons: Vec<String> },
    #[error("adapter {name} holds {limit} versions, the limit (limits.max_versions_per_adapter); delete old versions with DELETE /v1/adapters/{name}/versions/N")]
    TooManyVersions { name: String, limit: usize },
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
    /// Versions one adapter may hold (0: no limit).
    max_versions: usize,
}

/// A version written, and any the learner removed to make room for it.
#[derive(Debug, Clone)]
pub struct Written {
    pub manifest: Manifest,
    pub pointer: Pointer,
    /// Versions removed first (only for the learner's versions at the cap).
    pub pruned: Vec<u32>,
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
            max_versions: 0,
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

    /// Caps the versions one adapter may hold (0: no limit).
    pub fn with_version_limit(mut self, max_versions: usize) -> Self {
        self.max_versions = max_versions;
        self
    }

    /// The largest adapter this model could take: every site at the rank
    /// limit in f32, plus its config and 1 MiB for the rest of a PEFT
    /// directory (a README). Uploads past it are refused while reading.
    pub fn max_adapter_bytes(&self) -> u64 {
        let rank = self.limits.max_rank.min(1 << 20) as u64;
        let weights: u64 = self.sites.iter().map(|s| (s.in_features + s.out_features) as u64 * rank * 4 + 512).sum();
        weights.saturating_add(2 << 20)
    }

    /// Bytes a tenant's stored versions take.
    pub fn stored_bytes(&self, tenant: &str) -> Result<u64, RegistryError> {
        Ok(self.store.tenant_bytes(tenant)?)
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
        let (manifest, config, weights) = self.store.read_version(tenant, name, version)?;
        if let Some(reasons) = manifest.rejection() {
            if !self.store.pointer(tenant, name)?.servable(&manifest) {
                return Err(RegistryError::Rejected { name: name.to_string(), version, reasons });
            }
        }
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
        let w = self.add_version(tenant, name, config, weights, Source::Upload, parent, serde_json::Value::Null, None, promote)?;
        Ok((w.manifest, w.pointer))
    }

    /// Validates and stores a new version from any source (uploads, the
    /// learner's candidates with their metrics and, when its gate refused
    /// one, the reasons), promoting it if asked. At the version limit an
    /// upload is refused; the learner instead removes the adapter's oldest
    /// version that is neither current nor the new one's parent.
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
        rejected: Option<Vec<String>>,
        promote: bool,
    ) -> Result<Written, RegistryError> {
        crate::adapter_store::validate_name(tenant)?;
        crate::adapter_store::validate_name(name)?;
        let adapter = peft::parse(config, weights, &self.sites, &self.limits, self.dtype, &self.device)?;
        let pruned = self.make_room(tenant, name, source, parent)?;
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
                rejected,
            },
        )?;
        let pointer = if promote { self.promote(tenant, name, manifest.version)? } else { self.store.pointer(tenant, name)? };
        Ok(Written { manifest, pointer, pruned })
    }

    /// Keeps an adapter under its version limit before a new version.
    fn make_room(&self, tenant: &str, name: &str, source: Source, parent: Option<u32>) -> Result<Vec<u32>, RegistryError> {
        if self.max_versions == 0 {
            return Ok(Vec::new());
        }
        let versions = match self.store.versions(tenant, name) {
            Ok(v) => v,
            Err(StoreError::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        if versions.len() < self.max_versions {
            return Ok(Vec::new());
        }
        if source == Source::Upload {
            return Err(RegistryError::TooManyVersions { name: name.to_string(), limit: self.max_versions });
        }
        let current = self.current_version(tenant, name);
        let mut pruned = Vec::new();
        // Rejected versions go first (never served), then the oldest.
        let mut candidates: Vec<&Manifest> = versions.iter().filter(|m| Some(m.version) != current && Some(m.version) != parent).collect();
        candidates.sort_by_key(|m| (m.rejection().is_none(), m.version));
        for m in candidates.into_iter().take(versions.len() + 1 - self.max_versions) {
            self.delete_version(tenant, name, m.version)?;
            pruned.push(m.version);
        }
        if versions.len() - pruned.len() >= self.max_versions {
            return Err(RegistryError::TooManyVersions { name: name.to_string(), limit: self.max_versions });
        }
        Ok(pruned)
    }

    /// Deletes one version that is not current (and its place in the
    /// rollback history); a loaded copy is dropped.
    pub fn delete_version(&self, tenant: &str, name: &str, version: u32) -> Result<Pointer, RegistryError> {
        let lock = self.pointer_lock(tenant, name);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.store.delete_version(tenant, name, version)?;
        self.resident.remove(&(tenant.to_string(), name.to_string(), version));
        self.record_residency();
        Ok(p)
    }

    /// Forgets a tenant: every adapter and version on disk and in memory.
    pub fn delete_tenant(&self, tenant: &str) -> Result<(), RegistryError> {
        self.store.delete_tenant(tenant)?;
        self.current.retain(|k, _| k.0 != tenant);
        self.resident.retain(|k, _| k.0 != tenant);
        self.pointer_locks.retain(|k, _| k.0 != tenant);
        self.record_residency();
        Ok(())
    }

    /// The pointer of an adapter (current version, history, released).
    pub fn pointer(&self, tenant: &str, name: &str) -> Result<Pointer, RegistryError> {
        Ok(self.store.pointer(tenant, name)?)
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
