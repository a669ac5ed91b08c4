//! Typed settings: `config/default.toml` (compiled in), then an optional file,
//! then `LIFELORA_<SECTION>__<KEY>` environment variables, then CLI flags.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The defaults, compiled in so a binary without the repo still starts.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "LIFELORA_";
/// Shortest admin key or metrics token accepted.
pub const MIN_SECRET_CHARS: usize = 32;

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid TOML in {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: String, message: String },
}

/// All settings of one server process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub model: ModelSettings,
    pub engine: EngineSettings,
    pub auth: AuthSettings,
    pub lora: LoraSettings,
    pub storage: StorageSettings,
    pub learning: LearningSettings,
    pub limits: LimitSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
}

/// Who may read `/metrics`, and what it may say about tenants.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// When set, `/metrics` needs `Authorization: Bearer <token>` (what
    /// Prometheus's `authorization` scrape setting sends).
    pub bearer_token: String,
    /// Whether per-tenant series carry tenant and adapter names; off, those
    /// series are summed over every tenant and adapter.
    pub tenant_labels: bool,
}

impl std::fmt::Debug for MetricsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSettings")
            .field("bearer_token", &if self.bearer_token.is_empty() { "" } else { "<set>" })
            .field("tenant_labels", &self.tenant_labels)
            .finish()
    }
}

/// What one request may ask for, and what one tenant may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Longest prompt, in tokens (0: the model's context length).
    pub max_prompt_tokens: usize,
    /// Prompts in one `/v1/completions` request.
    pub max_prompts: usize,
    /// Messages in one chat request.
    pub max_messages: usize,
    /// Stop sequences per request, and bytes per sequence.
    pub max_stop_sequences: usize,
    pub max_stop_bytes: usize,
    /// Generation requests one tenant may have in flight (0: no limit).
    pub max_concurrent_per_tenant: usize,
    /// Prompt plus generated tokens one tenant may use per minute (0: no limit).
    pub tokens_per_minute_per_tenant: u64,
    /// Seconds a client may take to send its request (head and body) before 408.
    pub client_timeout_secs: u64,
    /// Seconds running requests get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Parts in one multipart upload, and bytes of one part's headers
    /// (its name, file name and content type together).
    pub max_multipart_parts: usize,
    pub max_multipart_header_bytes: usize,
    /// Bytes one tenant may keep stored: fine-tuning files, examples and
    /// adapter versions together (0: no limit).
    pub tenant_storage_bytes: u64,
    /// Versions one adapter may hold (0: no limit).
    pub max_versions_per_adapter: usize,
    /// Feedback items one completion may receive (0: no limit).
    pub max_feedback_per_completion: usize,
    /// Log-probability entries one request may ask for: positions (echoed
    /// prompt plus `max_tokens`) × (alternatives + 1) × `n`, over its prompts.
    pub max_logprob_entries: usize,
}

/// The HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
    pub workers: usize,
}

/// Which base model to serve and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub path: String,
    pub cache_dir: String,
    pub served_model_name: String,
    pub dtype: String,
    pub device: String,
}

/// Continuous batching limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    pub max_running: usize,
    pub max_tokens_per_step: usize,
    pub max_waiting: usize,
    pub kv_cache_bytes: u64,
    pub default_max_tokens: usize,
    pub max_tokens_limit: usize,
    pub max_n: usize,
    pub threads: usize,
}

/// Who may call the API.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub admin_key: String,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log the key.
        f.debug_struct("AuthSettings").field("admin_key", &if self.admin_key.is_empty() { "" } else { "<set>" }).finish()
    }
}

/// Adapter limits and residency.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    pub max_rank: usize,
    pub max_resident: usize,
    pub max_resident_bytes: usize,
    pub max_upload_bytes: usize,
    /// Entries in `rank_pattern` and `alpha_pattern` together.
    pub max_patterns: usize,
}

/// A float setting that may be written as an integer (`alpha = 16`, `LIFELORA_LEARNING__KL_WEIGHT=20`).
fn float<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(i64),
        Float(f64),
    }
    Ok(match Number::deserialize(d)? {
        Number::Int(i) => i as f64,
        Number::Float(f) => f,
    })
}

/// Learning from feedback: what is kept and how the learner trains.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LearningSettings {
    /// Days a completion (and the feedback on it) stays in the log; 0 keeps all.
    pub retention_days: u64,
    /// The adapter that feedback on the base model trains (created when missing).
    pub default_adapter: String,
    /// New feedback items on one adapter that start a training run by themselves (0: only on demand).
    pub min_new_feedback: usize,
    /// A fresh adapter's rank, alpha and target modules.
    pub rank: usize,
    #[serde(deserialize_with = "float")]
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Optimizer steps per run, learning rate, examples per step.
    pub steps: usize,
    #[serde(deserialize_with = "float")]
    pub learning_rate: f64,
    pub batch_size: usize,
    /// Earlier accepted examples replayed per run, at most.
    pub max_replay: usize,
    /// Gate: the replay set's loss may rise by at most this (nats per token).
    #[serde(deserialize_with = "float")]
    pub max_regression: f64,
    /// Gate: mean KL(base ‖ candidate) on general prompts, at most (nats).
    #[serde(deserialize_with = "float")]
    pub max_base_drift: f64,
    /// Gate: top-1 agreement with the base on general prompts, at least.
    #[serde(deserialize_with = "float")]
    pub min_base_agreement: f64,
    /// Learning without forgetting: weight of KL(base ‖ adapted), anchor
    /// sequences per step, and how many anchors the base model samples.
    #[serde(deserialize_with = "float")]
    pub kl_weight: f64,
    pub kl_anchors_per_step: usize,
    pub kl_anchor_count: usize,
    /// Paraphrases of each corrected question the base model writes and
    /// the learner teaches alongside it (0: none).
    pub paraphrases: usize,
    /// While requests are being served the learner rests this many times
    /// the length of each training step (3: at most a quarter of the time).
    #[serde(deserialize_with = "float")]
    pub serving_priority: f64,
    /// Threads the learner's tensor work may use while requests are served (serving keeps the rest).
    pub threads: usize,
    /// Threads a training step may use while no request is being served (0: all cores).
    pub idle_threads: usize,
    /// After a learner promotion: ratings of the new version to watch (0: no watch),
    /// and how much worse its share of down-ratings may be than its parent's
    /// before the server rolls back by itself.
    pub watch_window: usize,
    #[serde(deserialize_with = "float")]
    pub rollback_margin: f64,
    /// Largest file `POST /v1/files` takes, in bytes.
    pub max_file_bytes: usize,
    /// Jobs one tenant may have queued (not yet running); beyond it 429.
    pub max_queued_jobs_per_tenant: usize,
    /// Most epochs a fine-tuning job may ask for, and most optimizer steps
    /// any run may take (per phase).
    pub max_epochs: usize,
    pub max_steps: usize,
}

/// Where runtime data lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub adapters_dir: String,
    pub tenants_file: String,
    pub database: String,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: String,
    pub level: String,
}

impl Settings {
    /// Defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment passed in (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut root = parse_toml(DEFAULT_TOML, "built-in defaults")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let overlay = parse_toml(&text, &path.display().to_string())?;
            merge(&mut root, overlay);
        }
        for (name, raw) in env {
            if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
                apply_env(&mut root, &name, rest, &raw)?;
            }
        }
        let settings: Settings =
            root.try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: "merged settings".into(),
                    message: e.message().to_string(),
                })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Rejects values the server cannot run with, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message: message.into(),
            })
        };
        if !matches!(self.model.dtype.as_str(), "f32" | "bf16" | "f16") {
            return bad("model.dtype", "must be f32, bf16 or f16");
        }
        if self.engine.max_running == 0 {
            return bad("engine.max_running", "must be at least 1");
        }
        if self.engine.max_tokens_per_step < 16 {
            return bad("engine.max_tokens_per_step", "must be at least 16");
        }
        if self.engine.max_n == 0 {
            return bad("engine.max_n", "must be at least 1");
        }
        if self.server.max_body_bytes < 1024 {
            return bad("server.max_body_bytes", "must be at least 1024");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format", "must be text or json");
        }
        // A short secret falls to guessing; 32 characters is what
        // `openssl rand -hex 16` prints.
        for (key, secret) in [("auth.admin_key", &self.auth.admin_key), ("metrics.bearer_token", &self.metrics.bearer_token)] {
            if !secret.is_empty() && secret.chars().count() < MIN_SECRET_CHARS {
                return bad(key, &format!("is {} characters; use at least {MIN_SECRET_CHARS} (e.g. `openssl rand -hex 32`)", secret.chars().count()));
            }
        }
        if self.limits.max_multipart_parts == 0 {
            return bad("limits.max_multipart_parts", "must be at least 1");
        }
        if self.limits.max_multipart_header_bytes < 64 {
            return bad("limits.max_multipart_header_bytes", "must be at least 64");
        }
        if self.learning.max_epochs == 0 || self.learning.max_steps == 0 {
            return bad("learning.max_epochs", "max_epochs and max_steps must be at least 1");
        }
        Ok(())
    }
}

fn parse_toml(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: e.message().to_string(),
    })
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// `SECTION__KEY=raw`: the value is read as a TOML literal when it parses as one
/// of the same kind as the default, else as a string.
fn apply_env(root: &mut toml::Table, name: &str, rest: &str, raw: &str) -> Result<(), ConfigError> {
    let Some((section, key)) = rest.split_once("__") else {
        return Ok(()); // not a setting (e.g. LIFELORA_LOG used by something else)
    };
    let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
    let unknown = || ConfigError::Invalid {
        key: name.to_string(),
        message: format!("no setting {section}.{key}"),
    };
    let table = root
        .get_mut(&section)
        .and_then(|v| v.as_table_mut())
        .ok_or_else(unknown)?;
    let default = table.get(&key).ok_or_else(unknown)?;
    let value = match default {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        _ => {
            let parsed = format!("v = {raw}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                // An integer where a float is expected is that float.
                .map(|v| match (v, default) {
                    (toml::Value::Integer(i), toml::Value::Float(_)) => toml::Value::Float(i as f64),
                    (v, _) => v,
                })
                .filter(|v| v.same_type(default))
                .ok_or_else(|| ConfigError::Invalid {
                    key: name.to_string(),
                    message: format!("expected a {} value, got {raw:?}", default.type_str()),
                })?;
            parsed
        }
    };
    table.insert(key, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load_with_env(None, Vec::new()).unwrap();
        assert_eq!(s.server.port, 8080);
        assert_eq!(s.storage.adapters_dir, "adapters");
        assert_eq!(s.storage.database, "data/lifelora.db");
    }

    #[test]
    fn env_overrides_any_key_with_its_type() {
        let env = vec![
            ("LIFELORA_SERVER__PORT".to_string(), "9001".to_string()),
            ("LIFELORA_MODEL__PATH".to_string(), "/m".to_string()),
        ];
        let s = Settings::load_with_env(None, env).unwrap();
        assert_eq!(s.server.port, 9001);
        assert_eq!(s.model.path, "/m");
    }

    #[test]
    fn env_with_wrong_type_or_unknown_key_is_refused() {
        let env = vec![("LIFELORA_SERVER__PORT".to_string(), "abc".to_string())];
        assert!(Settings::load_with_env(None, env).is_err());
        let env = vec![("LIFELORA_SERVER__NOPE".to_string(), "1".to_string())];
        assert!(Settings::load_with_env(None, env).is_err());
    }
}
