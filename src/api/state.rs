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
    pub tenant: String,
    /// The resolved adapter version (`None`: the base model).
    pub adapter: Option<Arc<crate::lora::LoraAdapter>>,
    /// The adapter's name for metrics, `base` for the base model.
    pub label: String,
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
}

impl AppState {
    /// Resolves a request's `model`: the base model id (no adapter), or one
    /// of the tenant's adapters (`NAME` for its current version, `NAME@vN`).
    /// Another tenant's adapter answers exactly like a missing one.
    pub fn resolve_model(&self, tenant: &str, model: &str) -> Result<Option<Resolved>, ApiError> {
        if model == self.model.id {
            return Ok(None);
        }
        match self.registry.resolve(tenant, model) {
            Ok(r) => Ok(Some(r)),
            Err(crate::registry::RegistryError::NotFound(_) | crate::registry::RegistryError::BadReference(_)) => {
                Err(ApiError::model_not_found(model))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Who a generation request acts as and which adapter it runs: the
    /// prologue both generation endpoints share.
    pub fn target(&self, req: &actix_web::HttpRequest, model: &str, named_tenant: Option<&str>) -> Result<Target, ApiError> {
        let tenant = super::tenant::tenant_for(req, self, named_tenant)?;
        let resolved = self.resolve_model(&tenant, model)?;
        Ok(Target {
            adapter: resolved.as_ref().map(|r| r.adapter.clone()),
            label: resolved.map_or_else(|| "base".to_string(), |r| r.name),
            tenant,
        })
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
