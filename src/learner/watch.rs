//! Watching a promotion: after the learner promotes a version, the first
//! `learning.watch_window` ratings of its completions are compared with the
//! parent's share of down-ratings (the base model's when the adapter had no
//! earlier version). Worse by more than `learning.rollback_margin`: the
//! server promotes the parent back and records why in the audit log and on
//! the job that produced the version. Each version is judged once.

use serde_json::json;

use crate::adapter_store::Source;
use crate::config::LearningSettings;
use crate::registry::Registry;
use crate::store::{AuditRecord, JobEvent, RecordStore, StoreError};

/// Audit actions the watch records (each version gets one of them).
pub const WATCH_PASSED: &str = "adapter.watch_passed";
pub const AUTO_ROLLBACK: &str = "adapter.auto_rollback";
/// Recorded when a version failed its watch but had no earlier version to return to.
pub const WATCH_FAILED: &str = "adapter.watch_failed";

/// What one look at a watched version decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not a learner promotion that is current and unjudged, or too few ratings yet.
    Waiting,
    Passed { share: f64, parent_share: f64 },
    RolledBack { to: u32, share: f64, parent_share: f64 },
    /// Worse, but there is no earlier version to return to.
    Failed { share: f64, parent_share: f64 },
}

fn down_share((rated, down): (usize, usize)) -> f64 {
    if rated == 0 { 0.0 } else { down as f64 / rated as f64 }
}

/// Judges `version` of a tenant's adapter if its window is full. Called
/// after each rating lands on one of its completions.
pub fn check(
    registry: &Registry,
    records: &dyn RecordStore,
    settings: &LearningSettings,
    metrics: &crate::metrics::Metrics,
    tenant: &str,
    adapter: &str,
    version: u32,
) -> Result<Verdict, StoreError> {
    let window = settings.watch_window;
    if window == 0 || registry.current_version(tenant, adapter) != Some(version) {
        return Ok(Verdict::Waiting);
    }
    let info = registry.info(tenant, adapter).map_err(|e| StoreError::Database(e.to_string()))?;
    let Some(manifest) = info.versions.iter().find(|m| m.version == version) else { return Ok(Verdict::Waiting) };
    if manifest.source != Source::Learner {
        return Ok(Verdict::Waiting);
    }
    let target = format!("{adapter}@v{version}");
    if records.audited(tenant, &[WATCH_PASSED, AUTO_ROLLBACK, WATCH_FAILED], &target)? {
        return Ok(Verdict::Waiting);
    }
    let mine = records.rating_counts(tenant, Some(adapter), Some(version), window)?;
    if mine.0 < window {
        return Ok(Verdict::Waiting);
    }
    let parent = manifest.parent;
    let theirs = match parent {
        Some(p) => records.rating_counts(tenant, Some(adapter), Some(p), usize::MAX)?,
        None => records.rating_counts(tenant, None, None, usize::MAX)?,
    };
    let (share, parent_share) = (down_share(mine), down_share(theirs));
    let worse = share > parent_share + settings.rollback_margin;
    let detail = json!({
        "window": window,
        "down_share": share,
        "parent_down_share": parent_share,
        "parent_ratings": theirs.0,
        "rollback_margin": settings.rollback_margin,
        "parent_version": parent,
    });
    let (verdict, action, reason) = match (worse, parent) {
        (false, _) => (Verdict::Passed { share, parent_share }, WATCH_PASSED, format!("v{version} passed its watch")),
        (true, Some(to)) => {
            // Only if it is still current (a manual promote in between wins).
            if registry.current_version(tenant, adapter) != Some(version) {
                return Ok(Verdict::Waiting);
            }
            registry.promote(tenant, adapter, to).map_err(|e| StoreError::Database(e.to_string()))?;
            metrics.adapter_rollbacks.inc();
            (
                Verdict::RolledBack { to, share, parent_share },
                AUTO_ROLLBACK,
                format!(
                    "rolled back automatically from v{version} to v{to}: {:.0}% of its first {window} ratings were down against {:.0}% for v{to} (margin {:.0}%)",
                    share * 100.0,
                    parent_share * 100.0,
                    settings.rollback_margin * 100.0
                ),
            )
        }
        (true, None) => (
            Verdict::Failed { share, parent_share },
            WATCH_FAILED,
            format!(
                "v{version} rated worse than the base model ({:.0}% down against {:.0}%) but has no earlier version to roll back to",
                share * 100.0,
                parent_share * 100.0
            ),
        ),
    };
    let mut detail = detail;
    detail["reason"] = json!(reason);
    records.add_audit(&AuditRecord {
        id: crate::store::new_id("audit"),
        created_at: crate::store::now(),
        actor: "server".into(),
        tenant: tenant.to_string(),
        action: action.into(),
        target,
        detail: detail.clone(),
    })?;
    if let Some(job_id) = manifest.metrics.get("job_id").and_then(|v| v.as_str()) {
        let level = if action == WATCH_PASSED { "info" } else { "warn" };
        records.add_job_event(&JobEvent {
            id: crate::store::new_id("ftevent"),
            job_id: job_id.to_string(),
            created_at: crate::store::now(),
            level: level.into(),
            message: reason.clone(),
            data: detail,
        })?;
    }
    match &verdict {
        Verdict::Passed { .. } => tracing::info!(tenant, adapter, version, "{reason}"),
        _ => tracing::warn!(tenant, adapter, version, "{reason}"),
    }
    Ok(verdict)
}
