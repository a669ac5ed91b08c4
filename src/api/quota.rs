//! Per-tenant quotas: generation requests in flight and tokens per minute.
//! One tenant flooding the server gets 429 with `Retry-After`; the others
//! keep their share. A permit is held for as long as a request runs
//! (through the end of its stream) and released when dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use dashmap::DashMap;

use super::error::ApiError;

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Usage {
    in_flight: AtomicUsize,
    /// The current minute's start and the tokens used in it.
    window: Mutex<Option<(Instant, u64)>>,
}

/// The quotas of every tenant.
pub struct Quotas {
    tenants: DashMap<String, Arc<Usage>>,
    max_concurrent: usize,
    tokens_per_minute: u64,
}

/// A request's hold on its tenant's concurrency quota.
pub struct Permit {
    usage: Arc<Usage>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.usage.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn too_many(message: String, retry_after: u64) -> ApiError {
    ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        message,
        kind: "rate_limit_error",
        param: None,
        code: Some("rate_limit_exceeded"),
        retry_after: Some(retry_after),
    }
}

impl Quotas {
    /// `0` turns a quota off.
    pub fn new(max_concurrent: usize, tokens_per_minute: u64) -> Self {
        Quotas { tenants: DashMap::new(), max_concurrent, tokens_per_minute }
    }

    fn usage(&self, tenant: &str) -> Arc<Usage> {
        if let Some(u) = self.tenants.get(tenant) {
            return u.clone();
        }
        self.tenants.entry(tenant.to_string()).or_default().clone()
    }

    /// Admits one generation request of `tenant`, or answers 429.
    pub fn admit(&self, tenant: &str) -> Result<Permit, ApiError> {
        let usage = self.usage(tenant);
        if self.tokens_per_minute > 0 {
            let window = usage.window.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((start, used)) = *window {
                let elapsed = start.elapsed();
                if elapsed < WINDOW && used >= self.tokens_per_minute {
                    let wait = (WINDOW - elapsed).as_secs() + 1;
                    return Err(too_many(
                        format!("tenant {tenant:?} used its {} tokens for this minute; retry in {wait} s", self.tokens_per_minute),
                        wait,
                    ));
                }
            }
        }
        let before = usage.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = Permit { usage };
        if self.max_concurrent > 0 && before >= self.max_concurrent {
            return Err(too_many(format!("tenant {tenant:?} has {} requests in flight, its limit", self.max_concurrent), 1));
        }
        Ok(permit)
    }

    /// Counts tokens a tenant's request used (prompt and generated).
    pub fn charge(&self, tenant: &str, tokens: u64) {
        if self.tokens_per_minute == 0 || tokens == 0 {
            return;
        }
        let usage = self.usage(tenant);
        let mut window = usage.window.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *window {
            Some((start, used)) if start.elapsed() < WINDOW => *used += tokens,
            w => *w = Some((Instant::now(), tokens)),
        }
    }

    /// Requests a tenant has in flight.
    pub fn in_flight(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |u| u.in_flight.load(Ordering::Acquire))
    }

    /// Tokens a tenant used in the current minute.
    pub fn tokens_this_minute(&self, tenant: &str) -> u64 {
        let Some(usage) = self.tenants.get(tenant).map(|u| u.clone()) else { return 0 };
        let window = usage.window.lock().unwrap_or_else(|p| p.into_inner());
        match *window {
            Some((start, used)) if start.elapsed() < WINDOW => used,
            _ => 0,
        }
    }

    /// The limits: requests in flight and tokens per minute (0: none).
    pub fn limits(&self) -> (usize, u64) {
        (self.max_concurrent, self.tokens_per_minute)
    }

    /// Forgets a deleted tenant's counters (a tenant created again under
    /// its name starts from nothing; requests still in flight hold their own).
    pub fn forget(&self, tenant: &str) {
        self.tenants.remove(tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_is_limited_per_tenant_and_freed_by_dropping_permits() {
        let q = Quotas::new(2, 0);
        let a = q.admit("acme").unwrap();
        let _b = q.admit("acme").unwrap();
        let e = q.admit("acme").err().unwrap();
        assert_eq!((e.status.as_u16(), e.retry_after), (429, Some(1)));
        assert!(q.admit("globex").is_ok(), "another tenant keeps its share");
        drop(a);
        assert!(q.admit("acme").is_ok());
        assert_eq!(q.in_flight("acme"), 1);
    }

    #[test]
    fn tokens_per_minute_refuse_with_the_seconds_left_in_the_window() {
        let q = Quotas::new(0, 100);
        drop(q.admit("acme").unwrap());
        q.charge("acme", 60);
        drop(q.admit("acme").unwrap());
        q.charge("acme", 60);
        let e = q.admit("acme").err().unwrap();
        assert_eq!(e.status.as_u16(), 429);
        assert!((1..=61).contains(&e.retry_after.unwrap()), "{:?}", e.retry_after);
        assert!(q.admit("globex").is_ok());
    }
}
