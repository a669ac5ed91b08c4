//! What every handler shares.

use std::sync::Arc;

use crate::config::Settings;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::model::LoadedModel;
use crate::registry::{Registry, Resolved};

use super::error::ApiError;

/// A generation request's tenant and adapter.
pub struct Target {
    pub tenant: crate::tenants::TenantRef,
    /// The resolved adapter version (`None`: the base model).
    pub adapter: Option<Arc<crate::lora::LoraAdapter>>,
    /// The adapter's name for metrics, `base` for the base model.
    pub label: String,
    /// The adapter's name and resolved version (`None`: the base model).
    pub adapter_ref: Option<(String, u32)>,
    /// The tenant's concurrency quota, held until the response ends.
    pub permit: Option<Arc<super::quota::Permit>>,
    /// The request's id (for the line a stream logs when it ends).
    pub request_id: Option<String>,
}

/// A generation request as the completion log records it.
pub struct LogEntry {
    /// The `id` the response carries.
    pub id: String,
    /// `completion` or `chat`.
    pub kind: &'static str,
    /// The request body (parsed); the prompt or messages are taken from it
    /// and the rest kept as the sampling settings.
    pub body: serde_json::Value,
    /// Each prompt as the model saw it, as text and as token ids.
    pub rendered_prompts: Vec<String>,
    pub prompt_ids: Vec<Vec<u32>>,
    pub n: usize,
}

/// Shared by all workers; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub model: Arc<LoadedModel>,
    pub engine: EngineHandle,
    pub metrics: Metrics,
    pub settings: Arc<Settings>,
    pub registry: Arc<Registry>,
    pub tenants: Arc<crate::tenants::Tenants>,
    /// When the model was loaded (`created` of `/v1/models`).
    pub created: u64,
    /// The completion log and feedback.
    pub records: Arc<dyn crate::store::RecordStore>,
    /// The background learner (queues training runs).
    pub learner: crate::learner::Learner,
    /// Per-tenant quotas.
    pub quotas: Arc<super::quota::Quotas>,
    /// Per-tenant storage quota.
    pub storage: Arc<crate::storage_quota::TenantStorage>,
    /// Set by SIGTERM: new requests get 503 while running ones finish.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    /// Resolves a request's `model`: the base model id (no adapter), or one
    /// of the tenant's adapters (`NAME` for its current version, `NAME@vN`).
    /// Another tenant's adapter answers exactly like a missing one. A cold
    /// adapter loads (and is validated) off the HTTP workers.
    pub async fn resolve_model(&self, tenant: &str, model: &str) -> Result<Option<Resolved>, ApiError> {
        if model == self.model.id {
            return Ok(None);
        }
        let (registry, t, m) = (self.registry.clone(), tenant.to_string(), model.to_string());
        match super::blocking::blocking(move || Ok::<_, ApiError>(registry.resolve(&t, &m))).await? {
            Ok(r) => Ok(Some(r)),
            Err(crate::registry::RegistryError::NotFound(_) | crate::registry::RegistryError::BadReference(_)) => {
                Err(ApiError::model_not_found(model))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Who a generation request acts as and which adapter it runs: the
    /// prologue both generation endpoints share. The tenant's quota is
    /// checked first, before any adapter is loaded.
    pub async fn target(&self, req: &actix_web::HttpRequest, model: &str, named_tenant: Option<&str>) -> Result<Target, ApiError> {
        let tenant = super::tenant::tenant_for(req, self, named_tenant)?;
        let permit = Arc::new(self.quotas.admit(&tenant)?);
        let resolved = self.resolve_model(&tenant, model).await?;
        use actix_web::HttpMessage;
        let request_id = req.extensions().get::<super::server::RequestId>().map(|r| r.0.clone());
        if let Some(log) = req.extensions_mut().get_mut::<super::server::RequestLog>() {
            log.adapter = resolved.as_ref().map(|r| format!("{}@v{}", r.name, r.version));
        }
        Ok(Target {
            permit: Some(permit),
            request_id,
            adapter: resolved.as_ref().map(|r| r.adapter.clone()),
            adapter_ref: resolved.as_ref().map(|r| (r.name.clone(), r.version)),
            label: resolved.map_or_else(|| "base".to_string(), |r| r.name),
            tenant,
        })
    }

    /// What runs when a generation request ends: usage metrics, and the
    /// completion log unless the body says `"store": false`.
    pub fn request_end(&self, target: &Target, entry: LogEntry) -> super::sse::UsageSink {
        let LogEntry { id, kind, mut body, rendered_prompts, prompt_ids, n } = entry;
        let store = body.get("store").and_then(serde_json::Value::as_bool) != Some(false);
        let log = store.then(|| {
            let prompt = body
                .as_object_mut()
                .and_then(|o| o.remove(if kind == "chat" { "messages" } else { "prompt" }))
                .unwrap_or_default();
            let record = crate::store::CompletionRecord {
                id,
                tenant: target.tenant.to_string(),
                adapter: target.adapter_ref.as_ref().map(|(n, _)| n.clone()),
                adapter_version: target.adapter_ref.as_ref().map(|(_, v)| *v),
                kind: kind.to_string(),
                prompt,
                rendered_prompts,
                prompt_ids,
                n: n as u32,
                outputs: Vec::new(),
                output_ids: Vec::new(),
                finish_reasons: Vec::new(),
                settings: body,
                created_at: crate::store::now(),
            };
            super::sse::CompletionLog { store: self.records.clone(), record, tenants: self.tenants.clone(), tenant: target.tenant.clone() }
        });
        super::sse::UsageSink {
            metrics: self.metrics.clone(),
            tenant: target.tenant.to_string(),
            adapter: target.label.clone(),
            log,
            quotas: Some((self.quotas.clone(), target.permit.clone())),
            request_id: target.request_id.clone(),
        }
    }

    /// The context length in tokens.
    pub fn context(&self) -> usize {
        self.model.model.config.max_position_embeddings
    }

    /// Checks client-supplied token ids against the vocabulary.
    pub fn check_token_ids(&self, ids: &[u32], param: &str) -> Result<(), ApiError> {
        let vocab = self.model.model.config.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
            return Err(ApiError::invalid(
                format!("token id {bad} in '{param}' is out of range (vocabulary size {vocab})"),
                Some(param),
            ));
        }
        Ok(())
    }
}
