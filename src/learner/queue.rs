//! Training jobs waiting for the learner, taken round-robin across
//! tenants: the next job is the oldest of the tenant served least
//! recently, so one tenant's thirty queued jobs never stand in front of
//! another tenant's first. Each tenant may have a bounded number queued.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex};

/// A tenant already has as many jobs queued as it may.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenant {tenant} already has {limit} jobs queued (learning.max_queued_jobs_per_tenant); wait for one to start or cancel one")]
pub struct QueueFull {
    pub tenant: String,
    pub limit: usize,
}

#[derive(Default)]
struct State {
    /// Each tenant's queued jobs (arrival number, id), oldest first.
    jobs: HashMap<String, VecDeque<(u64, String)>>,
    /// When each tenant last had a job taken (a tick; never: absent).
    served: HashMap<String, u64>,
    /// Counts arrivals and takings.
    tick: u64,
    closed: bool,
}

/// The learner's queue.
#[derive(Default)]
pub struct JobQueue {
    state: Mutex<State>,
    ready: Condvar,
}

impl JobQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job` of `tenant` unless the tenant has `limit` queued already
    /// (0: no limit). `record` runs first, under the queue's lock, so the
    /// count and the stored job agree even when submissions race; when it
    /// fails nothing is queued.
    pub fn push<E>(&self, tenant: &str, job: &str, limit: usize, record: impl FnOnce() -> Result<(), E>) -> Result<(), PushError<E>> {
        let mut s = self.state();
        if s.closed {
            return Err(PushError::Closed);
        }
        let queued = s.jobs.get(tenant).map_or(0, VecDeque::len);
        if limit > 0 && queued >= limit {
            return Err(PushError::Full(QueueFull { tenant: tenant.to_string(), limit }));
        }
        record().map_err(PushError::Record)?;
        s.tick += 1;
        let arrival = s.tick;
        s.jobs.entry(tenant.to_string()).or_default().push_back((arrival, job.to_string()));
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, `(tenant, job id)`: the oldest of the tenant served
    /// least recently (never served first, then by arrival). Blocks while
    /// the queue is empty; `None` once closed.
    pub fn next(&self) -> Option<(String, String)> {
        let mut s = self.state();
        loop {
            if s.closed {
                return None;
            }
            let pick = s
                .jobs
                .iter()
                .filter_map(|(t, q)| q.front().map(|(arrival, _)| (s.served.get(t).copied().unwrap_or(0), *arrival, t.clone())))
                .min();
            if let Some((_, _, tenant)) = pick {
                s.tick += 1;
                let tick = s.tick;
                s.served.insert(tenant.clone(), tick);
                let (job, empty) = match s.jobs.get_mut(&tenant) {
                    Some(q) => (q.pop_front(), q.is_empty()),
                    None => (None, true),
                };
                if empty {
                    s.jobs.remove(&tenant);
                }
                if let Some((_, job)) = job {
                    return Some((tenant, job));
                }
                continue;
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Takes one queued job out (cancelled before it started); whether it was queued.
    pub fn remove(&self, job: &str) -> bool {
        let mut s = self.state();
        let found = s.jobs.iter().find(|(_, q)| q.iter().any(|(_, j)| j == job)).map(|(t, _)| t.clone());
        let Some(tenant) = found else { return false };
        if let Some(q) = s.jobs.get_mut(&tenant) {
            q.retain(|(_, j)| j != job);
            if q.is_empty() {
                s.jobs.remove(&tenant);
            }
        }
        true
    }

    /// Takes every queued job of a tenant out; returns their ids.
    pub fn remove_tenant(&self, tenant: &str) -> Vec<String> {
        let mut s = self.state();
        s.served.remove(tenant);
        s.jobs.remove(tenant).map(|q| q.into_iter().map(|(_, j)| j).collect()).unwrap_or_default()
    }

    /// Jobs a tenant has queued.
    pub fn queued(&self, tenant: &str) -> usize {
        self.state().jobs.get(tenant).map_or(0, VecDeque::len)
    }

    /// Stops handing out jobs: [`JobQueue::next`] returns `None` from now on.
    pub fn close(&self) {
        self.state().closed = true;
        self.ready.notify_all();
    }
}

/// Why a job could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum PushError<E> {
    #[error(transparent)]
    Full(QueueFull),
    #[error("the learner has stopped")]
    Closed,
    #[error("{0}")]
    Record(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(q: &JobQueue, tenant: &str, job: &str, limit: usize) -> Result<(), PushError<()>> {
        q.push(tenant, job, limit, || Ok::<(), ()>(()))
    }

    #[test]
    fn tenants_take_turns_whatever_order_their_jobs_came_in() {
        let q = JobQueue::new();
        for i in 0..4 {
            push(&q, "flood", &format!("f{i}"), 0).unwrap();
        }
        push(&q, "quiet", "q0", 0).unwrap();
        push(&q, "other", "o0", 0).unwrap();
        let order: Vec<String> = (0..6).map(|_| q.next().unwrap().1).collect();
        assert_eq!(order, ["f0", "q0", "o0", "f1", "f2", "f3"]);
    }

    #[test]
    fn a_tenant_arriving_after_another_was_served_goes_before_its_next_job() {
        let q = JobQueue::new();
        for i in 0..4 {
            push(&q, "flood", &format!("f{i}"), 0).unwrap();
        }
        assert_eq!(q.next().unwrap().1, "f0");
        push(&q, "quiet", "q0", 0).unwrap();
        assert_eq!(q.next().unwrap().1, "q0", "flood was just served");
        assert_eq!(q.next().unwrap().1, "f1");
    }

    #[test]
    fn a_tenant_queues_at_most_its_limit_and_a_failed_record_queues_nothing() {
        let q = JobQueue::new();
        push(&q, "a", "1", 2).unwrap();
        push(&q, "a", "2", 2).unwrap();
        assert!(matches!(push(&q, "a", "3", 2), Err(PushError::Full(QueueFull { limit: 2, .. }))));
        push(&q, "b", "4", 2).unwrap();
        assert!(matches!(q.push("b", "5", 2, || Err("disk full")), Err(PushError::Record("disk full"))));
        assert_eq!((q.queued("a"), q.queued("b")), (2, 1));
        assert_eq!(q.next().unwrap().1, "1");
        push(&q, "a", "3", 2).unwrap();
    }

    #[test]
    fn cancelled_and_deleted_tenants_jobs_leave_the_queue() {
        let q = JobQueue::new();
        push(&q, "a", "1", 0).unwrap();
        push(&q, "a", "2", 0).unwrap();
        push(&q, "b", "3", 0).unwrap();
        assert!(q.remove("1"));
        assert!(!q.remove("nope"));
        assert_eq!(q.remove_tenant("a"), vec!["2".to_string()]);
        assert_eq!(q.next().unwrap(), ("b".to_string(), "3".to_string()));
        q.close();
        assert_eq!(q.next(), None);
    }
}
