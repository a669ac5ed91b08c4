//! How many sequences wait for admission, in all and per tenant, shared by
//! the HTTP side (which adds) and the engine thread (which admits, drops
//! and preempts). While the queue is more than half full, no tenant may
//! hold more than half of it: one tenant's thousand-sequence request never
//! leaves every other tenant with 429s.

use std::collections::HashMap;
use std::sync::Mutex;

use super::EngineError;

#[derive(Default)]
struct Counts {
    total: usize,
    by_tenant: HashMap<String, usize>,
}

/// The waiting queue's counts.
#[derive(Default)]
pub struct WaitingCounts {
    counts: Mutex<Counts>,
}

impl WaitingCounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `n` sequences of `tenant` in, all or none: refused when the
    /// queue would pass `max_waiting`, or pass half of it with more than
    /// half being this tenant's.
    pub fn try_add(&self, tenant: &str, n: usize, max_waiting: usize) -> Result<(), EngineError> {
        let mut c = self.lock();
        if c.total + n > max_waiting {
            return Err(EngineError::QueueFull { max_waiting });
        }
        let half = max_waiting / 2;
        let mine = c.by_tenant.get(tenant).copied().unwrap_or(0);
        if c.total + n > half && mine + n > half {
            return Err(EngineError::TenantQueueFull { limit: half });
        }
        c.total += n;
        *c.by_tenant.entry(tenant.to_string()).or_default() += n;
        Ok(())
    }

    /// Counts `n` sequences of `tenant` out (admitted, abandoned, or never queued).
    pub fn remove(&self, tenant: &str, n: usize) {
        let mut c = self.lock();
        c.total = c.total.saturating_sub(n);
        if let Some(m) = c.by_tenant.get_mut(tenant) {
            *m = m.saturating_sub(n);
            if *m == 0 {
                c.by_tenant.remove(tenant);
            }
        }
    }

    /// Brings the counts in line with a change of the queue on the engine
    /// thread: per tenant, `before` and `after` the step's planning.
    pub fn apply(&self, before: &HashMap<String, usize>, after: &HashMap<String, usize>) {
        let mut c = self.lock();
        for tenant in before.keys().chain(after.keys().filter(|t| !before.contains_key(*t))) {
            let (b, a) = (before.get(tenant).copied().unwrap_or(0), after.get(tenant).copied().unwrap_or(0));
            if a == b {
                continue;
            }
            c.total = (c.total + a).saturating_sub(b);
            let m = c.by_tenant.entry(tenant.clone()).or_default();
            *m = (*m + a).saturating_sub(b);
            if *m == 0 {
                c.by_tenant.remove(tenant);
            }
        }
    }

    /// Sequences waiting in all.
    pub fn total(&self) -> usize {
        self.lock().total
    }
}

/// Per tenant, how many sequences `queue` holds.
pub fn by_tenant<'a>(queue: impl Iterator<Item = &'a str>) -> HashMap<String, usize> {
    let mut m: HashMap<String, usize> = HashMap::new();
    for t in queue {
        *m.entry(t.to_string()).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_tenant_holds_at_most_half_of_a_busy_queue() {
        let w = WaitingCounts::default();
        assert!(w.try_add("flood", 8, 16).is_ok());
        assert!(matches!(w.try_add("flood", 1, 16), Err(EngineError::TenantQueueFull { limit: 8 })));
        assert!(w.try_add("quiet", 8, 16).is_ok(), "the other half is the others'");
        assert!(matches!(w.try_add("third", 1, 16), Err(EngineError::QueueFull { .. })));
        w.remove("flood", 8);
        assert_eq!(w.total(), 8);
        let before = HashMap::from([("quiet".to_string(), 8)]);
        let after = HashMap::from([("quiet".to_string(), 2), ("flood".to_string(), 1)]);
        w.apply(&before, &after);
        assert_eq!(w.total(), 3);
        assert!(w.try_add("small", 3, 16).is_ok(), "a quiet queue takes anyone");
    }
}
