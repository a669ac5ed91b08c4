//! Starting a server process: logging, the model (or the built-in demo),
//! the engine thread and the HTTP edge, and a clean stop.

use std::path::Path;
use std::sync::Arc;

use crate::adapter_store::AdapterStore;
use crate::api::{server, AppState};
use crate::lora::peft::LoraLimits;
use crate::registry::Registry;
use crate::config::Settings;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::model::gguf::load_gguf;
use crate::model::loader::{load_hf_dir, parse_device, parse_dtype, LoadedModel};
use crate::model::{builtin, ModelError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("adapter store: {0}")]
    Store(#[from] crate::adapter_store::StoreError),
    #[error("tenants: {0}")]
    Tenants(#[from] crate::tenants::TenantError),
    #[error("adapter registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("database: {0}")]
    Records(#[from] crate::store::StoreError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error("cannot listen on {address}: {message}")]
    Bind { address: String, message: String },
    #[error("finishing a tenant's deletion: {0}")]
    Purge(#[from] crate::api::tenants::PurgeError),
}

/// Loads the configured model, or the built-in one when none is set.
pub fn load_model(settings: &Settings) -> Result<LoadedModel, ModelError> {
    let dtype = parse_dtype(&settings.model.dtype)?;
    let device = parse_device(&settings.model.device)?;
    if settings.model.path.is_empty() {
        tracing::warn!(
            "no model configured: serving the {}",
            crate::api::models::BUILTIN_NOTE
        );
        return builtin::load_builtin(dtype, &device);
    }
    // A model fetched by name, or named by its Hub id, is served under that
    // name (what the user typed).
    let spec = settings.model.path.as_str();
    let by_name = !Path::new(spec).exists() && (crate::fetch::known(spec).is_some() || crate::hub::HubSpec::parse(spec).is_some());
    let fetched_name = by_name.then_some(spec);
    let name = Some(settings.model.served_model_name.as_str()).filter(|s| !s.is_empty()).or(fetched_name);
    let path = resolve_model_path(&settings.model.path, Path::new(&settings.model.cache_dir))?;
    if path.is_file() {
        if dtype != candle_core::DType::F32 {
            tracing::warn!("model.dtype is ignored for GGUF files: weights stay quantized, activations are f32");
        }
        return load_gguf(&path, name, &device);
    }
    if !path.is_dir() {
        return Err(ModelError::MissingFile(format!(
            "{} is neither a model directory nor a GGUF file",
            path.display()
        )));
    }
    load_hf_dir(&path, name, dtype, &device)
}

/// A path, the name of a model `lifelora fetch` knows (looked up in the
/// cache), or a Hugging Face id `org/name` (the Hub cache, else downloaded).
pub fn resolve_model_path(spec: &str, cache: &Path) -> Result<std::path::PathBuf, ModelError> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if let Some(known) = crate::fetch::known(spec) {
        let cached = crate::fetch::cached_path(cache, known);
        if cached.exists() {
            return Ok(cached);
        }
        return Err(ModelError::MissingFile(format!(
            "{spec} is not downloaded yet (looked for {}); run `lifelora fetch {spec}` first",
            cached.display()
        )));
    }
    if let Some(hub) = crate::hub::HubSpec::parse(spec) {
        return crate::hub::resolve(&hub).map_err(|e| ModelError::MissingFile(format!("{spec}: no such file or directory; as a Hugging Face model: {e}")));
    }
    let known: Vec<&str> = crate::fetch::KNOWN.iter().map(|m| m.name).collect();
    Err(ModelError::MissingFile(format!(
        "{spec}: no such file or directory, not a model `lifelora fetch` knows ({}), and not a Hugging Face id (org/name)",
        known.join(", ")
    )))
}

/// Runs the server until SIGINT/SIGTERM; `on_bound` learns the address.
pub fn serve(
    settings: Settings,
    on_bound: impl FnOnce(std::net::SocketAddr) + Send + 'static,
) -> Result<(), ServeError> {
    crate::cpu::configure(settings.engine.threads);
    // A port already taken is said before minutes of model loading, not after.
    let address = format!("{}:{}", settings.server.host, settings.server.port);
    std::net::TcpListener::bind(address.as_str()).map_err(|e| ServeError::Bind { address: address.clone(), message: e.to_string() })?;
    let started = std::time::Instant::now();
    let model = Arc::new(load_model(&settings)?);
    let cfg = &model.model.config;
    tracing::info!(
        model = %model.id, layers = cfg.num_hidden_layers, hidden = cfg.hidden_size, vocab = cfg.vocab_size,
        context = cfg.max_position_embeddings, dtype = %settings.model.dtype, secs = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    let store = AdapterStore::open(&settings.storage.adapters_dir)?;
    let registry = Registry::open(
        store,
        model.model.lora_sites(),
        LoraLimits { max_rank: settings.lora.max_rank, max_patterns: settings.lora.max_patterns },
        model.model.adapter_dtype(),
        model.model.device().clone(),
        settings.lora.max_resident,
    )?;
    let metrics = Metrics::with_tenant_labels(settings.metrics.tenant_labels);
    let registry = registry
        .with_metrics(metrics.clone())
        .with_byte_budget(settings.lora.max_resident_bytes)
        .with_version_limit(settings.limits.max_versions_per_adapter);
    if settings.auth.admin_key.is_empty() {
        tracing::warn!("no auth.admin_key configured: serving OPEN, as the single tenant `default`; set LIFELORA_AUTH__ADMIN_KEY for tenants and keys");
    }
    if settings.metrics.tenant_labels && settings.metrics.bearer_token.is_empty() {
        tracing::warn!("/metrics is open and names tenants and adapters: set metrics.bearer_token (LIFELORA_METRICS__BEARER_TOKEN) or metrics.tenant_labels = false");
    }
    let tenants = Arc::new(crate::tenants::Tenants::open(&settings.storage.tenants_file)?);
    let records: Arc<dyn crate::store::RecordStore> =
        Arc::new(crate::store::SqliteStore::open(Path::new(&settings.storage.database))?);
    let registry = Arc::new(registry);
    // A deletion a crash interrupted is finished before anything is served.
    for name in tenants.pending_deletions() {
        let purged = crate::api::tenants::remove_tenant_data(records.as_ref(), &registry, &tenants, &name)?;
        tracing::warn!(tenant = %name, ?purged, "finished deleting a tenant whose deletion was interrupted");
    }
    spawn_retention_sweep(records.clone(), settings.learning.retention_days);
    let storage = Arc::new(crate::storage_quota::TenantStorage::new(records.clone(), registry.clone(), settings.limits.tenant_storage_bytes));
    let busy_metrics = metrics.clone();
    let serving_busy = Box::new(move || busy_metrics.running_sequences.get() + busy_metrics.waiting_sequences.get() > 0);
    let learner = crate::learner::Learner::start(
        model.clone(),
        registry.clone(),
        records.clone(),
        tenants.clone(),
        storage.clone(),
        settings.learning.clone(),
        serving_busy,
        metrics.clone(),
    )?;
    let engine = EngineHandle::start(model.clone(), &settings.engine, metrics.clone())?;
    let settings_limits = settings.limits.clone();
    let state = AppState {
        model,
        learner,
        registry,
        tenants,
        storage,
        engine: engine.clone(),
        metrics,
        settings: Arc::new(settings),
        created: crate::api::generate::unix_now(),
        records,
        quotas: Arc::new(crate::api::quota::Quotas::new(
            settings_limits.max_concurrent_per_tenant,
            settings_limits.tokens_per_minute_per_tenant,
        )),
        draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let result = actix_web::rt::System::new().block_on(async move {
        server::run(state, |addr| {
            tracing::info!(%addr, "listening");
            on_bound(addr)
        })
        .await
    });
    engine.shutdown();
    Ok(result?)
}

/// Deletes logged completions (and their feedback) older than
/// `retention_days`, at start and then hourly, on a background thread.
fn spawn_retention_sweep(records: Arc<dyn crate::store::RecordStore>, retention_days: u64) {
    if retention_days == 0 {
        return;
    }
    let spawned = std::thread::Builder::new().name("retention".into()).spawn(move || loop {
        let cutoff = crate::store::now().saturating_sub(retention_days * 86_400);
        match records.tenants() {
            Ok(tenants) => {
                for t in tenants {
                    match records.prune_completions(&t, cutoff) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(tenant = %t, deleted = n, "retention: old completions deleted"),
                        Err(e) => tracing::error!(tenant = %t, "retention sweep failed: {e}"),
                    }
                }
            }
            Err(e) => tracing::error!("retention sweep failed: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_secs(3600));
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the retention sweep: {e}");
    }
}
