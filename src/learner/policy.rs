//! Per-adapter learning policies: a tenant may override, for one adapter,
//! the learning settings that are about that adapter (when to train, how,
//! how strict the gate and the watch are). Server-wide settings (threads,
//! retention, the anchors' count) stay server-wide.

use serde_json::{Map, Value};

use crate::config::LearningSettings;

/// Settings an adapter's policy may override.
pub const OVERRIDABLE: &[&str] = &[
    "min_new_feedback",
    "rank",
    "alpha",
    "targets",
    "steps",
    "learning_rate",
    "batch_size",
    "max_replay",
    "max_regression",
    "max_base_drift",
    "min_base_agreement",
    "kl_weight",
    "kl_anchors_per_step",
    "watch_window",
    "rollback_margin",
];

/// Module names a fresh adapter may target.
const TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Why a policy was refused; `field` names the offending key.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> PolicyError {
    PolicyError { field: field.to_string(), message: message.into() }
}

/// `settings` with `overrides` (a JSON object of [`OVERRIDABLE`] keys) applied.
pub fn apply(settings: &LearningSettings, overrides: &Value) -> Result<LearningSettings, PolicyError> {
    let Some(map) = overrides.as_object() else {
        return Err(bad("policy", "must be a JSON object"));
    };
    let mut merged = serde_json::to_value(settings).map_err(|e| bad("policy", e.to_string()))?;
    for (key, value) in map {
        if !OVERRIDABLE.contains(&key.as_str()) {
            return Err(bad(key, format!("is not a per-adapter setting; these are: {}", OVERRIDABLE.join(", "))));
        }
        if !value.is_null() {
            merged[key] = value.clone();
        }
    }
    let s: LearningSettings = serde_json::from_value(merged).map_err(|e| bad("policy", e.to_string()))?;
    check(&s)?;
    Ok(s)
}

/// The overrides without nulls (a null removes an override).
pub fn normalized(overrides: &Value) -> Value {
    let map: Map<String, Value> =
        overrides.as_object().map(|m| m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    Value::Object(map)
}

/// The overridable part of `settings`, as the API shows it.
pub fn effective(settings: &LearningSettings) -> Value {
    let all = serde_json::to_value(settings).unwrap_or(Value::Null);
    Value::Object(OVERRIDABLE.iter().map(|k| (k.to_string(), all.get(*k).cloned().unwrap_or(Value::Null))).collect())
}

fn check(s: &LearningSettings) -> Result<(), PolicyError> {
    let range = |field: &str, v: f64, lo: f64, hi: f64| {
        if v.is_finite() && (lo..=hi).contains(&v) { Ok(()) } else { Err(bad(field, format!("must be between {lo} and {hi}, got {v}"))) }
    };
    range("min_new_feedback", s.min_new_feedback as f64, 0.0, 1e6)?;
    range("rank", s.rank as f64, 1.0, 256.0)?;
    range("alpha", s.alpha, 1e-6, 1e6)?;
    range("steps", s.steps as f64, 1.0, 10_000.0)?;
    range("learning_rate", s.learning_rate, 1e-9, 1.0)?;
    range("batch_size", s.batch_size as f64, 1.0, 256.0)?;
    range("max_replay", s.max_replay as f64, 0.0, 100_000.0)?;
    range("max_regression", s.max_regression, 0.0, 1e6)?;
    range("max_base_drift", s.max_base_drift, 0.0, 1e6)?;
    range("min_base_agreement", s.min_base_agreement, 0.0, 1.0)?;
    range("kl_weight", s.kl_weight, 0.0, 1e6)?;
    range("kl_anchors_per_step", s.kl_anchors_per_step as f64, 0.0, 64.0)?;
    range("watch_window", s.watch_window as f64, 0.0, 1e6)?;
    range("rollback_margin", s.rollback_margin, 0.0, 1.0)?;
    if s.targets.is_empty() {
        return Err(bad("targets", "must name at least one module"));
    }
    if let Some(t) = s.targets.iter().find(|t| !TARGETS.contains(&t.as_str())) {
        return Err(bad("targets", format!("{t:?} is not one of {}", TARGETS.join(", "))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> LearningSettings {
        crate::config::Settings::load(None).unwrap().learning
    }

    #[test]
    fn overrides_replace_only_what_they_name_and_nulls_remove_them() {
        let s = apply(&defaults(), &json!({"steps": 60, "learning_rate": 3e-3, "targets": ["q_proj", "v_proj"], "kl_weight": null})).unwrap();
        assert_eq!((s.steps, s.learning_rate, s.targets.len()), (60, 3e-3, 2));
        assert_eq!(s.kl_weight, defaults().kl_weight);
        assert_eq!(s.batch_size, defaults().batch_size);
        assert_eq!(normalized(&json!({"steps": 60, "kl_weight": null})), json!({"steps": 60}));
        assert_eq!(effective(&s)["steps"], 60);
        assert!(effective(&s).get("threads").is_none());
    }

    #[test]
    fn unknown_server_wide_and_out_of_range_settings_are_refused_by_name() {
        for (policy, field) in [
            (json!({"threads": 4}), "threads"),
            (json!({"retention_days": 1}), "retention_days"),
            (json!({"stepz": 4}), "stepz"),
            (json!({"steps": 0}), "steps"),
            (json!({"learning_rate": 2.0}), "learning_rate"),
            (json!({"min_base_agreement": 1.5}), "min_base_agreement"),
            (json!({"targets": []}), "targets"),
            (json!({"targets": ["lm_head"]}), "targets"),
            (json!({"steps": "many"}), "policy"),
            (json!([1]), "policy"),
        ] {
            let e = apply(&defaults(), &policy).unwrap_err();
            assert_eq!(e.field, field, "{policy}: {e}");
        }
    }
}
